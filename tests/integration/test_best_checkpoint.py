"""Best by default: a real Ray Train run reports two checkpoints, the later one worse by val/AP.
A run directory means the best one (through Ray's result API) for every consumer: find_checkpoint,
load_checkpoint_state (eval, predict) and `ray-retina export`; a checkpoint directory means exactly itself."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPORTS = ((1, 0.6), (2, 0.3))  # (iteration, val/AP): the latest is the worse


def _two_reports(config: dict) -> None:
    """A trivial train function: rank 0 reports the given checkpoint dict at two iterations."""
    import tempfile

    import ray.train

    from ray_retina.checkpoint import checkpoint_dir_name, save_checkpoint

    state = torch.load(config["state"], weights_only=True)
    for iteration, ap in config["reports"]:
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint({**state, "iteration": iteration}, tmp)
            ray.train.report(
                {"val/AP": ap, "iteration": iteration},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=checkpoint_dir_name(iteration),
            )


@pytest.fixture(scope="module")
def run_dir(ray_session, untrained_checkpoint, tmp_path_factory):
    import sys

    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    # The train function lives in this test module, which the workers cannot import: ship it by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    run, _, _ = untrained_checkpoint
    storage = tmp_path_factory.mktemp("best_runs")
    trainer = TorchTrainer(
        _two_reports,
        train_loop_config={"state": str(run / "checkpoint_0000010" / "checkpoint.pt"), "reports": REPORTS},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(
            name="best",
            storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(
                checkpoint_score_attribute="val/AP", checkpoint_score_order="max"
            ),
        ),
    )
    result = trainer.fit()
    assert result.error is None
    assert result.checkpoint.path.endswith("checkpoint_0000002")  # Ray's latest: the worse one
    return storage / "best"


def test_run_dir_means_its_best_checkpoint(run_dir):
    from ray_retina.checkpoint import find_checkpoint, load_checkpoint_state

    best = run_dir / "checkpoint_0000001" / "checkpoint.pt"
    latest = run_dir / "checkpoint_0000002" / "checkpoint.pt"
    assert find_checkpoint(run_dir) == str(best)
    assert find_checkpoint(str(run_dir), which="latest") == str(latest)
    assert load_checkpoint_state(run_dir)["iteration"] == 1
    # A named checkpoint is taken exactly, worse or not: `--checkpoint .../checkpoint_0000002`.
    assert find_checkpoint(run_dir / "checkpoint_0000002") == str(latest)
    assert load_checkpoint_state(run_dir / "checkpoint_0000002")["iteration"] == 2


def test_export_takes_the_best_unless_told(run_dir, tmp_path, capsys):
    from ray_retina.cli import main
    from ray_retina.export import resolve_source

    source = resolve_source(str(run_dir))
    assert source.checkpoint.endswith("checkpoint_0000001/checkpoint.pt")
    assert source.metrics["val/AP"] == pytest.approx(0.6)
    assert (
        main(["export", "--run", str(run_dir), "--format", "torchscript", "--out", str(tmp_path / "a")]) == 0
    )
    assert "checkpoint_0000001/checkpoint.pt  (val/AP 0.6000)" in capsys.readouterr().out
    named = str(run_dir / "checkpoint_0000002")
    assert main(["export", "--run", named, "--format", "torchscript", "--out", str(tmp_path / "b")]) == 0
    assert "checkpoint_0000002/checkpoint.pt  (val/AP 0.3000)" in capsys.readouterr().out
