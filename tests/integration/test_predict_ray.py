"""predict through Ray (the tier's shared cluster): a folder of every image type prepare takes with unreadable
files among them, written to a URI; a shard set with --no-draw; a video file. Same ids, file names, boxes
inside the images, unreadable inputs counted, and the same detections for an image read either way."""

from __future__ import annotations

import json
import shutil

import av
import numpy as np
import pytest
from _media_utils import make_video, mixed_folder
from PIL import Image

from ray_retina.predict import predict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_records(records, names, sizes, cat_ids, thresh):
    for r in records:
        assert set(r) >= {"image_id", "category_id", "bbox", "score"}
        assert r["category_id"] in cat_ids and r["score"] >= thresh
        if names is not None:
            assert r["file_name"] == names[r["image_id"]]
        w, h = sizes[r["image_id"]]
        x, y, bw, bh = r["bbox"]
        assert 0 <= x and 0 <= y and bw >= 0 and bh >= 0 and x + bw <= w + 1e-3 and y + bh <= h + 1e-3


@pytest.mark.ray
@pytest.mark.slow
def test_predict_mixed_folder_to_a_uri_and_shards(ray_session, untrained_checkpoint, synth_val, tmp_path):
    run, _, cat_ids = untrained_checkpoint
    paths, shards = synth_val
    jpgs = sorted(paths.val_images.glob("*.jpg"))
    folder = tmp_path / "photos"
    sizes_by_name = mixed_folder(jpgs, folder / "sub")  # every type, a truncated JPEG, a text file
    shutil.copy(jpgs[1], folder / "a.jpg")

    out_uri = (
        tmp_path / "out"
    ).as_uri()  # file://...: written through pyarrow by the tasks, as s3:// would be
    summary = predict(run, folder, out_uri, score_thresh=0.3, batch_size=1)
    assert (summary.images, summary.unreadable) == (7, 1)
    assert summary.results == out_uri + "/detections.json"
    assert summary.line().startswith("7 read, 1 unreadable")
    out = tmp_path / "out"
    written = json.loads((out / "summary.json").read_text())
    assert written["unreadable"] == 1 and written["images"] == 7
    assert [u["file_name"] for u in written["unreadable_files"]] == ["sub/broken.jpg"]
    images = json.loads((out / "images.json").read_text())
    expected_names = ["a.jpg", *(f"sub/{n}" for n in sorted(sizes_by_name))]
    assert [r["file_name"] for r in images] == expected_names
    sizes = {r["id"]: (r["width"], r["height"]) for r in images}
    assert all(sizes_by_name[r["file_name"][4:]] == sizes[r["id"]] for r in images[1:])
    records = json.loads((out / "detections.json").read_text())
    assert records and summary.detections == len(records), "the prior-0.5 model detects something"
    _check_records(records, {r["id"]: r["file_name"] for r in images}, sizes, cat_ids, 0.3)
    drawn = sorted(p.name for p in (out / "images").glob("*.png"))
    assert drawn == [
        "a.png",
        "sub__a.png",
        "sub__b.png",
        "sub__c.png",
        "sub__d.png",
        "sub__e.png",
        "sub__f.png",
    ]
    for r in images:
        png = out / "images" / (r["file_name"].replace("/", "__").rsplit(".", 1)[0] + ".png")
        assert png.read_bytes()[:8] == PNG_MAGIC and Image.open(png).size == sizes[r["id"]]

    # A shard folder, json only: the image ids are the shards' (synthetic val ids start at 1_000_001).
    summary2 = predict(run, shards, tmp_path / "out2", score_thresh=0.3, batch_size=1, draw=False)
    manifest_ids = {1_000_001 + i for i in range(6)}
    images2 = json.loads((tmp_path / "out2" / "images.json").read_text())
    assert {r["id"] for r in images2} == manifest_ids and summary2.unreadable == 0
    records2 = json.loads((tmp_path / "out2" / "detections.json").read_text())
    assert records2 and {r["image_id"] for r in records2} <= manifest_ids
    assert not (tmp_path / "out2" / "images").exists()  # --no-draw
    # Same weights, same preprocessing, same padding (batch_size 1: each image padded alone): the
    # detections of a shard image and of its file agree.
    by_file = [r for r in records if r["file_name"] == "a.jpg"]
    by_shard = [r for r in records2 if r["file_name"] == jpgs[1].name]
    assert len(by_file) == len(by_shard)
    np.testing.assert_allclose(
        sorted(r["bbox"] for r in by_file), sorted(r["bbox"] for r in by_shard), atol=1e-2
    )


@pytest.mark.ray
@pytest.mark.slow
def test_predict_video_to_a_uri(ray_session, untrained_checkpoint, tmp_path):
    run, _, cat_ids = untrained_checkpoint
    make_video(tmp_path / "clip.mp4", frames=5)
    out_uri = (tmp_path / "out").as_uri()
    summary = predict(run, tmp_path / "clip.mp4", out_uri, score_thresh=0.3, batch_size=2, frame_stride=2)
    assert (summary.images, summary.unreadable) == (3, 0)
    out = tmp_path / "out"
    frames = json.loads((out / "frames.json").read_text())
    assert [f["frame"] for f in frames] == [0, 2, 4]
    assert [f["time"] for f in frames] == [0.0, 0.2, 0.4]
    records = json.loads((out / "detections.json").read_text())
    assert summary.detections == len(records) == sum(len(f["detections"]) for f in frames) > 0
    _check_records(records, None, {i: (96, 64) for i in (0, 2, 4)}, cat_ids, 0.3)
    written = json.loads((out / "summary.json").read_text())
    assert (written["frames_decoded"], written["frame_stride"], written["images"]) == (5, 2, 3)
    with av.open(str(out / "detections.mp4")) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(decoded) == 3 and decoded[0].shape == (64, 96, 3)
    # --no-draw and a frame limit: json only, the first two frames run.
    s2 = predict(run, tmp_path / "clip.mp4", tmp_path / "out2", draw=False, max_frames=2)
    assert s2.images == 2 and not (tmp_path / "out2" / "detections.mp4").exists()
