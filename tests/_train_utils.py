"""Shared by the Ray integration tests: a RetinaNet run that takes seconds, through the whole stack."""

from __future__ import annotations

from pathlib import Path

from ray_retina.config import Config, apply_overrides, load_config

ROOT = Path(__file__).resolve().parent.parent


def tiny_overrides(tmp: Path, mlflow_uri: str, **over) -> dict[str, object]:
    """The dotted-key overrides of configs/smoke.yaml that make `tiny_config` (also passed as `--set`)."""
    base = {
        "name": "it_train",
        "data.root": str(tmp / "synth"),
        "data.train_shards": str(tmp / "synth" / "shards" / "train"),
        "data.val_shards": str(tmp / "synth" / "shards" / "val"),
        "data.synth": {
            "num_train": 32,
            "num_val": 8,
            "seed": 1,
            "min_image_size": 96,
            "max_image_size": 128,
            "min_object_size": 16,
            "max_object_size": 56,
            "max_objects": 3,
        },
        "data.rows_per_shard": 8,
        "data.train_min_size": [96, 96],
        "data.test_min_size": 96,
        "data.max_size": 128,
        "data.batch_size": 4,
        "data.size_divisibility": 32,
        "model.fpn_channels": 32,
        "model.head_convs": 1,
        "optim.lr": 0.002,
        "optim.max_iters": 12,
        "optim.steps": [12],
        "optim.warmup_iters": 2,
        "train.eval_period": 6,
        "train.log_period": 1,
        "run.storage_path": str(tmp / "runs"),
        "tracking.tracking_uri": mlflow_uri,
    }
    base.update(over)
    return base


def tiny_config(tmp: Path, mlflow_uri: str, **over) -> Config:
    """A few-second RetinaNet on a tiny synthetic set: the whole path, not a toy of it."""
    return apply_overrides(
        load_config(ROOT / "configs" / "smoke.yaml"), tiny_overrides(tmp, mlflow_uri, **over)
    )
