"""predict over a folder of images and over a shard set (Ray Data, the tier's shared cluster): same ids,
file names, boxes inside the images, and the same detections for an image read either way."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from ray_retina.predict import predict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.ray
@pytest.mark.slow
def test_predict_folder_and_shards(ray_session, untrained_checkpoint, synth_val, tmp_path):
    run, _, cat_ids = untrained_checkpoint
    paths, shards = synth_val
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
