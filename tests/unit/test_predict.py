"""Checkpoints by path, `ray-retina eval` of a checkpoint, predict's argument errors, its inputs (every image
type prepare takes, unreadable files kept as counted rows) and the video frames it reads (a stride and a
limit), without Ray. predict over a folder of mixed types, a shard set and a video through Ray:
tests/integration/test_predict_ray.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _media_utils import make_video, mixed_folder

from ray_retina.checkpoint import load_checkpoint_state
from ray_retina.data.augment import object_array
from ray_retina.data.formats.files import IMAGE_EXTENSIONS
from ray_retina.engine.evaluate import STAT_NAMES, evaluate_checkpoint
from ray_retina.engine.restore import model_from_state
from ray_retina.predict import _list_images, iter_frames, predict, preprocess_batch

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


# ----------------------------------------------------------------------------------------- inputs


def test_every_image_type_prepare_takes_is_listed(synth_val, tmp_path):
    paths, _ = synth_val
    sizes = mixed_folder(sorted(paths.val_images.glob("*.jpg")), tmp_path / "in")
    _, listed = _list_images(tmp_path / "in")
    assert [rel for _, rel in listed] == [
        "a.jpg",
        "b.png",
        "broken.jpg",
        "c.bmp",
        "d.webp",
        "e.tif",
        "f.tiff",
    ]
    assert set(sizes) < {rel for _, rel in listed}
    assert all(ext in IMAGE_EXTENSIONS for ext in (".bmp", ".webp", ".tif", ".tiff", ".png", ".jpeg"))


def test_preprocess_keeps_unreadable_inputs_as_counted_rows(synth_val, tmp_path):
    paths, _ = synth_val
    sizes = mixed_folder(sorted(paths.val_images.glob("*.jpg")), tmp_path / "in")
    _, listed = _list_images(tmp_path / "in")
    files = {p: (i + 1, rel, rel + ".png") for i, (p, rel) in enumerate(listed)}
    batch = {
        "path": np.asarray([p for p, _ in listed]),
        "bytes": object_array([Path(p).read_bytes() for p, _ in listed]),
    }
    out = preprocess_batch(batch, min_size=64, max_size=128, files=files)
    assert list(out["file_name"]) == [rel for _, rel in listed]  # one row per input, in order
    errors = dict(zip(out["file_name"], out["error"], strict=True))
    assert errors.pop("broken.jpg") and not any(errors.values())
    for name, err, orig, image in zip(
        out["file_name"], out["error"], out["orig_size"], out["image"], strict=True
    ):
        if err:
            assert image.shape == (0, 0, 3) and list(orig) == [0, 0]
        else:
            w, h = sizes[name]
            assert list(orig) == [h, w] and min(image.shape[:2]) == 64 or max(image.shape[:2]) == 128


# ----------------------------------------------------------------------------------------- video


def test_video_frames_stride_and_limit(tmp_path):
    make_video(tmp_path / "clip.mp4", frames=7)
    counts = {"frames": 0, "unreadable": 0}
    got = list(iter_frames(str(tmp_path / "clip.mp4"), 2, None, counts))
    assert [i for i, _, _ in got] == [0, 2, 4, 6] and counts == {"frames": 7, "unreadable": 0}
    assert got[0][2].shape == (64, 96, 3) and got[0][2].dtype == np.uint8
    assert [round(t, 3) for _, t, _ in got] == [0.0, 0.2, 0.4, 0.6]
    limited = list(iter_frames(str(tmp_path / "clip.mp4"), 3, 2, {"frames": 0, "unreadable": 0}))
    assert [i for i, _, _ in limited] == [0, 3]
