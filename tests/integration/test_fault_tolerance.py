"""A worker dies mid-run and the run goes on from its last checkpoint; re-running a run resumes it;
the resumed run follows the same lr schedule; MLflow keeps one continuous run."""

from __future__ import annotations

from pathlib import Path

import pytest

from _train_utils import tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_worker_death_restarts_from_checkpoint_and_resume(
    ray_session, tiny_data, tmp_path, mlflow_uri, monkeypatch
):
    from mlflow.tracking import MlflowClient

    from ray_retina.checkpoint import cleanup_unregistered_checkpoints
    from ray_retina.config import resolve
    from ray_retina.engine.loop import lr_factor
    from ray_retina.engine.session import RunNameTaken
    from ray_retina.engine.trainer import train
    from ray_retina.engine.worker import FAIL_ENV

    cfg = tiny_config(
        tmp_path,
        mlflow_uri,
        name="ft",
        **tiny_data,
        **{
            "optim.max_iters": 8,
            "optim.steps": [6],
            "optim.warmup_iters": 3,
            "train.eval_period": 4,
            "run.max_failures": 1,
            "train.log_period": 1,
        },
    )
    monkeypatch.setenv(FAIL_ENV, "1:6")  # rank 1 exits once at iteration 6 (after the checkpoint at 4)
    out = train(cfg, run_name="ft")
    monkeypatch.delenv(FAIL_ENV)
    assert (tmp_path / "runs" / ".failed-once-1-6").exists(), "the injected failure did not happen"
    assert out.error is None
    assert out.metrics["iteration"] == 8

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("ft")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`mlflow.runName` = 'ft'")
    assert len(runs) == 1, "a restart must keep writing into the same MLflow run"
    run_id = runs[0].info.run_id
    assert out.mlflow_run_id == run_id
    # The lr of every iteration is the schedule's, as in an uninterrupted run (the steps after the
    # checkpoint at 4 ran twice and were logged twice, with equal values; the lr drops at 6, where the worker
    # died). Step s logs iteration s - 1's lr.
    factor = lr_factor(resolve(cfg))
    lrs = _history(client, run_id, "train/lr")
    assert sorted(lrs) == list(range(1, 9))
    assert lrs == pytest.approx({s: cfg.lr * factor(s - 1) for s in range(1, 9)})
    assert sorted(_history(client, run_id, "val/AP")) == [4, 8]

    # Resuming the run name with a longer schedule continues at iteration 8, into the same MLflow run.
    # A checkpoint dir Ray never registered (a crash between upload and registration) is removed first.
    stray = tmp_path / "runs" / "ft" / "checkpoint_9999999"
    stray.mkdir()
    longer = tiny_config(
        tmp_path,
        mlflow_uri,
        name="ft",
        **tiny_data,
        **{
            "optim.max_iters": 12,
            "optim.steps": [6],
            "optim.warmup_iters": 3,
            "train.eval_period": 4,
            "train.log_period": 1,
        },
    )
    with pytest.raises(RunNameTaken, match="already"):  # the same name again without --resume: refused
        train(longer, run_name="ft")
    again = train(longer, run_name="ft", resume=True)
    assert again.error is None and again.metrics["iteration"] == 12
    assert not stray.exists()
    assert again.mlflow_run_id == run_id
    assert sorted(_history(client, run_id, "val/AP")) == [4, 8, 12]
    assert cleanup_unregistered_checkpoints(str(tmp_path / "runs"), "ft") == []
    kept = sorted(p.name for p in (tmp_path / "runs" / "ft").glob("checkpoint_*") if p.is_dir())
    assert kept and "checkpoint_0000012" in kept and len(kept) <= 2  # best by val/AP + latest, keep 2
    assert Path(again.checkpoint_path).name == "checkpoint_0000012"
