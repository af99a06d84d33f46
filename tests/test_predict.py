from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ray_retina.config import Config, apply_overrides
from ray_retina.data.shards import read_manifest, write_shards
from ray_retina.data.synthetic import make_synthetic_coco
from ray_retina.engine.evaluate import STAT_NAMES, evaluate_checkpoint
from ray_retina.engine.loop import Engine
from ray_retina.engine.restore import load_checkpoint
from ray_retina.model import build_criterion, build_model, build_postprocessor
from ray_retina.predict import predict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    paths = make_synthetic_coco(root, 0, 6, seed=0, min_image_size=64, max_image_size=112,
                                min_object_size=10, max_object_size=40, max_objects=3)  # fmt: skip
    shards = root / "shards" / "val"
    write_shards(paths.val_annotations, paths.val_images, shards, rows_per_shard=4)
    return paths, shards


@pytest.fixture(scope="module")
def checkpoint(synth, tmp_path_factory):
    """An untrained tiny model saved as the Ray Train worker saves it: <run>/checkpoint_<it>/checkpoint.pt.
    prior 0.5 makes every class score about 0.5, so that the model detects something."""
    _, shards = synth
    cfg = apply_overrides(Config(), {
        "model.backbone": "resnet18", "model.fpn_channels": 32, "model.head_convs": 1, "model.prior": 0.5,
        "model.anchor_sizes": [16, 32, 64, 128, 256], "model.frozen_bn": False, "model.freeze_at": 0,
        "data.test_min_size": 64, "data.max_size": 128, "data.size_divisibility": 32, "data.batch_size": 4,
        "data.val_shards": str(shards), "data.train_shards": str(shards), "loss.gamma": 1.5,
    })  # fmt: skip
    cat_ids = sorted(int(c["id"]) for c in read_manifest(shards)["categories"])
    torch.manual_seed(0)
    model = build_model(cfg, len(cat_ids))
    engine = Engine(
        cfg, model, build_criterion(cfg, len(cat_ids)), build_postprocessor(cfg), torch.device("cpu"), cat_ids
    )
    engine.iteration = 10
    run = tmp_path_factory.mktemp("run")
    (run / "checkpoint_0000010").mkdir()
    torch.save(engine.state_dict(), run / "checkpoint_0000010" / "checkpoint.pt")
    return run, model, cat_ids


def test_load_checkpoint_forms(checkpoint, tmp_path):
    run, model, cat_ids = checkpoint
    for path in (run, run / "checkpoint_0000010", run / "checkpoint_0000010" / "checkpoint.pt"):
        loaded, cfg, ids = load_checkpoint(path)
        assert ids == cat_ids == [3, 17, 42]
        assert cfg.loss.gamma == 1.5 and not loaded.training
        for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
            assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match="nowhere/checkpoint.pt"):
        load_checkpoint(tmp_path / "nowhere" / "checkpoint.pt")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_checkpoint(tmp_path)  # a folder without a checkpoint


def test_evaluate_checkpoint(checkpoint, synth, tmp_path):
    run, _, _ = checkpoint
    _, shards = synth
    stats = evaluate_checkpoint(run, shards, device=torch.device("cpu"), plots_dir=tmp_path / "plots")
    assert list(stats) == list(STAT_NAMES)
    assert all(v == -1 or 0.0 <= v <= 1.0 for v in stats.values()), stats
    for name in ("pr_curves.png", "detections.png", "focal_loss_cdf.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000, name
    # The CLI's call (str paths, no plots); the first images only.
    few = evaluate_checkpoint(str(run), str(shards), device=torch.device("cpu"), max_images=2)
    assert list(few) == list(STAT_NAMES)


@pytest.fixture(scope="module")
def ray_2cpu():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_predict_folder_and_shards(ray_2cpu, checkpoint, synth, tmp_path):
    run, _, cat_ids = checkpoint
    paths, shards = synth
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    jpgs = sorted(paths.val_images.glob("*.jpg"))[:3]
    shutil.copy(jpgs[0], folder / "b.jpg")
    shutil.copy(jpgs[1], folder / "a.jpg")
    Image.open(jpgs[2]).save(folder / "sub" / "c.png")  # a png in a sub-folder
    (folder / "notes.txt").write_text("not an image")

    out = predict(run, folder, tmp_path / "out", score_thresh=0.3, batch_size=1)
    assert out == tmp_path / "out" / "detections.json"
    images = json.loads((tmp_path / "out" / "images.json").read_text())
    assert [(r["id"], r["file_name"]) for r in images] == [(1, "a.jpg"), (2, "b.jpg"), (3, "sub/c.png")]
    sizes = {r["id"]: (r["width"], r["height"]) for r in images}
    assert sizes[1] == Image.open(jpgs[1]).size
    records = json.loads(out.read_text())
    assert records, "the prior-0.5 model detects something"
    names = {1: "a.jpg", 2: "b.jpg", 3: "sub/c.png"}
    for r in records:
        assert set(r) == {"image_id", "category_id", "bbox", "score", "file_name"}
        assert r["category_id"] in cat_ids and r["score"] >= 0.3
        assert r["file_name"] == names[r["image_id"]]
        w, h = sizes[r["image_id"]]
        x, y, bw, bh = r["bbox"]
        assert 0 <= x and 0 <= y and bw >= 0 and bh >= 0 and x + bw <= w + 1e-3 and y + bh <= h + 1e-3
    for png in ("a.png", "b.png", "sub__c.png"):
        path = tmp_path / "out" / "images" / png
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert (
            Image.open(path).size
            == Image.open(
                folder / ("sub/c.png" if png.startswith("sub") else png.replace(".png", ".jpg"))
            ).size
        )

    # A shard folder: the image ids are the shards' (synthetic val ids start at 1_000_001).
    out2 = predict(run, shards, tmp_path / "out2", score_thresh=0.3, batch_size=1)
    manifest_ids = {1_000_001 + i for i in range(6)}
    images2 = json.loads((tmp_path / "out2" / "images.json").read_text())
    assert {r["id"] for r in images2} == manifest_ids
    records2 = json.loads(out2.read_text())
    assert records2 and {r["image_id"] for r in records2} <= manifest_ids
    assert {r["category_id"] for r in records2} <= set(cat_ids)
    assert len(list((tmp_path / "out2" / "images").glob("*.png"))) == 6
    # Same weights, same preprocessing, same padding (batch_size 1: each image padded alone): the
    # detections of a shard image and of its file agree.
    by_file = [r for r in records if r["image_id"] == 1]
    by_shard = [r for r in records2 if r["file_name"] == jpgs[1].name]
    assert len(by_file) == len(by_shard)
    np.testing.assert_allclose([r["bbox"] for r in by_file], [r["bbox"] for r in by_shard], atol=1e-2)


def test_predict_errors(checkpoint, tmp_path):
    run, _, _ = checkpoint
    with pytest.raises(FileNotFoundError, match="missing-ckpt"):
        predict(tmp_path / "missing-ckpt", tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no-such-input"):
        predict(run, tmp_path / "no-such-input", tmp_path / "out")
