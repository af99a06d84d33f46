"""Reproducible training: the same config, seed and world size give the same run to the last bit on CPU."""

from __future__ import annotations

import pytest

from _train_utils import tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CURVES = ("train/loss_cls", "train/loss_box")


def test_two_runs_on_two_workers_are_identical(ray_session, tiny_data, tmp_path, mlflow_uri):
    """Two 2-worker DDP runs of the smoke model with the default settings (Ray Data delivers in the seeded
    order unless told not to): every per-iteration loss and every COCO stat equal, bit for bit."""
    from mlflow.tracking import MlflowClient

    from ray_retina.engine.trainer import train

    client = MlflowClient(mlflow_uri)
    runs = []
    for name in ("repro-a", "repro-b"):
        cfg = tiny_config(
            tmp_path,
            mlflow_uri,
            name="it_repro",
            **tiny_data,
            **{
                "optim.max_iters": 6,
                "optim.steps": [6],
                "train.eval_period": 6,
                "postprocess.score_thresh": 0.0,
            },
        )
        out = train(cfg, run_name=name)
        assert out.error is None
        curves = {
            k: [
                (m.step, m.value)
                for m in sorted(client.get_metric_history(out.mlflow_run_id, k), key=lambda m: m.step)
            ]
            for k in CURVES
        }
        runs.append((curves, {k: v for k, v in out.metrics.items() if k.startswith("val/")}))
    (curves_a, stats_a), (curves_b, stats_b) = runs
    assert curves_a == curves_b
    assert sorted({s for s, _ in curves_a["train/loss_cls"]}) == list(range(1, 7))  # every iteration
    assert len(stats_a) >= 12 and stats_a == stats_b
    assert stats_a["val/AP50"] > 0.0  # detections were scored, not an all-empty tie
