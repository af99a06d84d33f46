"""Checkpoints by path, `ray-retina eval` of a checkpoint, predict's argument errors (no Ray). predict over a
folder and a shard set, through Ray Data: tests/integration/test_predict_ray.py."""

from __future__ import annotations

import pytest
import torch

from ray_retina.checkpoint import load_checkpoint_state
from ray_retina.engine.evaluate import STAT_NAMES, evaluate_checkpoint
from ray_retina.engine.restore import model_from_state
from ray_retina.predict import predict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_load_checkpoint_forms(untrained_checkpoint, tmp_path):
    run, model, cat_ids = untrained_checkpoint
    for path in (run, run / "checkpoint_0000010", run / "checkpoint_0000010" / "checkpoint.pt"):
        loaded, cfg, ids = model_from_state(load_checkpoint_state(path))
        assert ids == cat_ids == [3, 17, 42]
        assert cfg.loss.gamma == 1.5 and not loaded.training
        for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
            assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match="nowhere/checkpoint.pt"):
        load_checkpoint_state(tmp_path / "nowhere" / "checkpoint.pt")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_checkpoint_state(tmp_path)  # a folder without a checkpoint


def test_evaluate_checkpoint(untrained_checkpoint, synth_val, tmp_path):
    run, _, _ = untrained_checkpoint
    _, shards = synth_val
    result = evaluate_checkpoint(run, shards, device=torch.device("cpu"), plots_dir=tmp_path / "plots")
    stats = result.metrics
    assert list(stats) == [*STAT_NAMES, "num_images", "skipped_images"]
    assert all(v == -1 or 0.0 <= v <= 1.0 for k, v in stats.items() if k in STAT_NAMES), stats
    assert stats["skipped_images"] == 0 and stats["num_images"] > 0
    for name in (
        "pr_curves.png",
        "detections.png",
        "focal_loss_cdf.png",
        "confusion_matrix.png",
        "confidence_curves.png",
        "error_gallery.png",
    ):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000, name
    # The CLI's call (str paths, no plots); the first images only.
    few = evaluate_checkpoint(str(run), str(shards), device=torch.device("cpu"), max_images=2).metrics
    assert list(few) == [*STAT_NAMES, "num_images", "skipped_images"] and few["num_images"] == 2


def test_predict_errors(untrained_checkpoint, tmp_path):
    run, _, _ = untrained_checkpoint
    with pytest.raises(FileNotFoundError, match="missing-ckpt"):
        predict(tmp_path / "missing-ckpt", tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no-such-input"):
        predict(run, tmp_path / "no-such-input", tmp_path / "out")
