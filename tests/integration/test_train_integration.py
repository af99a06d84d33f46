"""End to end through real Ray Train (2 DDP workers, gloo), Ray Data, COCO eval and MLflow (SQLite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from _train_utils import tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


CURVES = ("train/loss_cls", "train/loss_box")


@pytest.fixture(scope="module")
def two_worker_run(ray_session, tiny_data, tmp_path_factory):
    """One 2-worker DDP run of the smoke model with the default settings (12 iterations, eval at 6 and 12),
    every detection scored (score threshold 0): its config and outcome, shared by the tests below."""
    from ray_retina.engine.trainer import train

    tmp = tmp_path_factory.mktemp("two_worker_run")
    cfg = tiny_config(tmp, f"sqlite:///{tmp / 'mlflow.db'}", **tiny_data, **{"postprocess.score_thresh": 0.0})
    return cfg, train(cfg, run_name="it-run")


def _curves(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    return {
        k: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)]
        for k in CURVES
    }


def test_train_two_workers_end_to_end(two_worker_run):
    from mlflow.tracking import MlflowClient

    cfg, out = two_worker_run
    mlflow_uri = cfg.tracking.tracking_uri
    assert out.error is None
    assert out.tracking_summary is None  # rank 0 sent every point and said so; the driver has no news
    assert out.metrics["iteration"] == 12
    assert 0.0 <= out.metrics["val/AP"] <= 1.0 and out.metrics["val/num_images"] == 8
    assert out.checkpoint_path and Path(out.checkpoint_path, "checkpoint.pt").is_file()

    client = MlflowClient(mlflow_uri)
    run = client.get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.gamma"] == "2.0" and run.data.params["scaling.num_workers"] == "2"
    assert "val/AP" in run.data.metrics
    assert run.data.tags["ray_retina.final_checkpoint"] == out.checkpoint_path
    ap_steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/AP")]
    assert ap_steps == [6, 12]
    losses = [
        m.value
        for m in sorted(client.get_metric_history(run.info.run_id, "train/loss_cls"), key=lambda m: m.step)
    ]
    assert len(losses) >= 10
    # The focal loss starts at the prior's value and falls as the classifier learns the background.
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {
        f"plots/{name}.png"
        for name in (
            "pr_curves",
            "detections",
            "focal_loss_cdf",
            "confusion_matrix",
            "confidence_curves",
            "error_gallery",
        )
    }

    # Per-class AP from the same COCOeval, one metric per class name.
    for name in ("rectangle", "ellipse", "triangle"):
        assert f"val/AP/{name}" in run.data.metrics and f"val/AP50/{name}" in run.data.metrics
        assert f"val/F1/{name}" in run.data.metrics and f"val/threshold/{name}" in run.data.metrics
    # lr resolved in the worker for the world size that ran, logged as tags
    assert run.data.tags["resolved.world_size"] == "2" and float(run.data.tags["resolved.optim.lr"]) == 0.002

    import torch

    state = torch.load(Path(out.checkpoint_path) / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 12 and state["config"]["loss"]["gamma"] == 2.0
    assert len(state["rng_per_rank"]) == 2  # each rank's random state, saved for an exact resume

    # One detection path: `ray-retina eval` of the final checkpoint gives the val/AP the run reported, to the
    # last digit (same back-mapping, autocast, batching and COCO eval backend).
    from ray_retina.data.shards import read_manifest
    from ray_retina.engine.evaluate import STAT_NAMES, evaluate_checkpoint

    result = evaluate_checkpoint(out.checkpoint_path, cfg.data.val_shards)
    stats = result.metrics
    for k in STAT_NAMES:
        assert stats[k] == out.metrics[f"val/{k}"], k
    assert stats["num_images"] == out.metrics["val/num_images"] == 8
    # The checkpoint carries the per-class thresholds of its eval: the same as eval of it finds.
    assert state["thresholds"] == result.thresholds
    assert set(state["thresholds"]["f1"]) == {
        str(c["id"]) for c in read_manifest(cfg.data.val_shards)["categories"]
    }


def test_two_runs_on_two_workers_are_identical(two_worker_run):
    """Reproducible training: a second run of the same config, seed and world size (Ray Data delivers in the
    seeded order unless told not to) gives every per-iteration loss and every COCO stat equal, bit for bit."""
    from mlflow.tracking import MlflowClient

    from ray_retina.engine.trainer import train

    cfg, first = two_worker_run
    second = train(cfg, run_name="it-run-again")
    assert first.error is None and second.error is None
    client = MlflowClient(cfg.tracking.tracking_uri)
    curves = _curves(client, first.mlflow_run_id)
    assert curves == _curves(client, second.mlflow_run_id)
    assert sorted({s for s, _ in curves["train/loss_cls"]}) == list(range(1, 13))  # every iteration
    stats = {k: v for k, v in first.metrics.items() if k.startswith("val/")}
    assert len(stats) >= 12 and stats == {k: v for k, v in second.metrics.items() if k.startswith("val/")}
    assert stats["val/AP50"] > 0.0  # detections were scored, not an all-empty tie


def test_accumulation_ema_early_stop_and_val_loss_through_ray(ray_session, tiny_data, tmp_path, mlflow_uri):
    import torch
    from mlflow.tracking import MlflowClient

    from ray_retina.engine.trainer import train

    cfg = tiny_config(
        tmp_path,
        mlflow_uri,
        name="it_recipe",
        **tiny_data,
        **{
            "data.batch_size": 2,
            "optim.accumulate": 2,
            "optim.ema.enabled": True,
            "optim.ema.tau": 2.0,
            # AP cannot rise by more than 1: the second eval is the patience's first stale one
            "train.early_stop.patience": 1,
            "train.early_stop.min_delta": 1.0,
            "train.eval_period": 2,
        },
    )
    out = train(cfg, run_name="it-recipe")
    assert out.error is None
    assert out.metrics["iteration"] == 4  # stopped early, not at max_iters 12
    assert out.metrics["val/loss_cls"] > 0 and out.metrics["val/loss_box"] > 0
    state = torch.load(Path(out.checkpoint_path) / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 4 and state["ema"]["updates"] == 4
    assert "thresholds" in state

    run = MlflowClient(mlflow_uri).get_run(out.mlflow_run_id)
    assert run.data.tags["resolved.accumulate"] == "2" and run.data.tags["resolved.global_batch"] == "8"
    assert run.data.tags["ray_retina.early_stop_iteration"] == "4"
    assert run.data.tags["ray_retina.best_iteration"] == "2"
    assert "val/loss_cls" in run.data.metrics and "val/loss_box" in run.data.metrics
