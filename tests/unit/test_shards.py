"""Parquet shards: every field round-trips, the manifest is complete, the rebuilt GT evaluates like the json."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ray_retina.data import shards
from ray_retina.data.formats.coco import COCO_REASONS, category_label_maps, xywh_to_xyxy, xyxy_to_xywh
from ray_retina.data.shards import (
    SCHEMA_VERSION,
    coco_gt_from_shards,
    manifest_exists,
    prepare_shards,
    read_manifest,
    read_shards_table,
    shard_files,
    write_shards,
)
from ray_retina.data.synthetic import make_synthetic_coco


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("synth"), num_train=30, num_val=12, seed=1)


@pytest.fixture(scope="module")
def train_shards(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "train"
    manifest = write_shards(synth.train_annotations, synth.train_images, out, rows_per_shard=8)
    return out, manifest


def test_box_format_helpers_and_label_maps():
    xywh = np.array([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 1.0, 2.0]], dtype=np.float32)
    xyxy = xywh_to_xyxy(xywh)
    np.testing.assert_array_equal(xyxy, [[10, 20, 40, 60], [0, 0, 1, 2]])
    assert xyxy.dtype == np.float32
    np.testing.assert_array_equal(xyxy_to_xywh(xyxy), xywh)
    to_label, to_cat = category_label_maps([42, 3, 17, 3])
    assert to_label == {3: 0, 17: 1, 42: 2} and to_cat == [3, 17, 42]


def test_every_field_round_trips(synth, train_shards):
    out, manifest = train_shards
    coco = json.loads(synth.train_annotations.read_text())
    anns: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    rows = read_shards_table(out).to_pylist()
    assert [r["image_id"] for r in rows] == [i["id"] for i in coco["images"]]  # json order kept
    for r, img in zip(rows, coco["images"], strict=True):
        assert (r["file_name"], r["height"], r["width"]) == (img["file_name"], img["height"], img["width"])
        assert r["image"] == (synth.train_images / img["file_name"]).read_bytes()  # never re-encoded
        mine = anns[img["id"]]
        assert r["ann_id"] == [a["id"] for a in mine]
        assert r["category_id"] == [a["category_id"] for a in mine]
        assert r["iscrowd"] == [a["iscrowd"] for a in mine]
        np.testing.assert_array_equal(np.array(r["bbox"]), np.array([a["bbox"] for a in mine], np.float32))
        np.testing.assert_array_equal(np.array(r["area"]), np.array([a["area"] for a in mine], np.float32))


def test_manifest(synth, train_shards):
    out, manifest = train_shards
    assert manifest == read_manifest(out)
    assert manifest_exists(out) and not manifest_exists(out.parent / "nope")
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["num_images"] == 30 and manifest["num_shards"] == 4
    assert manifest["num_annotations"] == len(json.loads(synth.train_annotations.read_text())["annotations"])
    assert [s["num_rows"] for s in manifest["shards"]] == [8, 8, 8, 6]
    assert [c["id"] for c in manifest["categories"]] == [3, 17, 42]
    assert manifest["source"]["annotations"].endswith("instances_train.json")
    assert not any(v for k, v in manifest["validation"].items())
    files = shard_files(out)
    assert [f.rsplit("/", 1)[1] for f in files] == [f"part-{i:05d}.parquet" for i in range(4)]
    assert all((out / f.rsplit("/", 1)[1]).exists() for f in files)


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(tmp_path)


def _coco_stats(gt: COCO, dets: list[dict]) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _coco_from_dict(d: dict) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        c = COCO()
        c.dataset = d
        c.createIndex()
    return c


def test_rebuilt_gt_gives_the_same_ap_as_the_json(synth, tmp_path):
    out = tmp_path / "val"
    write_shards(synth.val_annotations, synth.val_images, out, rows_per_shard=5)
    original = json.loads(synth.val_annotations.read_text())
    rebuilt = coco_gt_from_shards(out)
    assert [i["id"] for i in rebuilt["images"]] == [i["id"] for i in original["images"]]
    assert len(rebuilt["annotations"]) == len(original["annotations"])
    assert rebuilt["categories"] == original["categories"]

    # Imperfect detections: jittered GT boxes, some with the wrong class, plus false positives.
    rng = np.random.default_rng(0)
    dets = []
    for a in original["annotations"]:
        x, y, w, h = a["bbox"]
        j = rng.normal(0, 0.15, 4) * [w, h, w, h]
        cat = a["category_id"] if rng.random() > 0.2 else 17
        dets.append(
            {
                "image_id": a["image_id"],
                "category_id": cat,
                "bbox": [x + j[0], y + j[1], w + j[2], h + j[3]],
                "score": float(rng.random()),
            }
        )
    for img in original["images"]:
        dets.append({"image_id": img["id"], "category_id": 42, "bbox": [5.0, 5.0, 30.0, 30.0], "score": 0.3})
    a = _coco_stats(_coco_from_dict(original), dets)
    b = _coco_stats(_coco_from_dict(rebuilt), dets)
    assert 0.05 < a[0] < 0.95  # a non-trivial AP
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------ real-format inputs


def _save(path, arr_or_img, fmt, **kw) -> bytes:
    im = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    im.save(path, format=fmt, **kw)
    return path.read_bytes()


def make_messy_coco(root):
    """A COCO-format set with the defects and formats real data has; returns (json path, image dir)."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    rgb = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    _save(img_dir / "rgb.jpg", rgb, "JPEG", quality=90)
    _save(img_dir / "rgba.png", Image.fromarray(rgb).convert("RGBA"), "PNG")
    _save(img_dir / "gray.jpg", Image.fromarray(rgb).convert("L"), "JPEG")
    _save(img_dir / "cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), "JPEG")
    _save(img_dir / "palette.png", Image.fromarray(rgb).convert("P"), "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 80 x 60, displayed rotated 90 degrees clockwise: 60 wide, 80 high
    _save(img_dir / "exif.jpg", rgb, "JPEG", exif=exif.tobytes())
    whole = _save(img_dir / "whole.jpg", rgb, "JPEG")
    (img_dir / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (img_dir / "zero.jpg").write_bytes(b"")
    (img_dir / "garbage.jpg").write_bytes(b"this is not an image at all" * 10)
    _save(img_dir / "noann.jpg", rgb, "JPEG")

    names = [
        "rgb.jpg",
        "rgba.png",
        "gray.jpg",
        "cmyk.jpg",
        "palette.png",
        "exif.jpg",
        "truncated.jpg",
        "zero.jpg",
        "garbage.jpg",
        "missing.jpg",
        "noann.jpg",
    ]
    images = [{"id": 100 + i, "file_name": n, "height": 60, "width": 80} for i, n in enumerate(names)]
    images[names.index("exif.jpg")].update(height=80, width=60)  # display orientation
    anns = []

    def ann(image_id, bbox, cat=1, crowd=0):
        anns.append(
            {
                "id": 1000 + len(anns),
                "image_id": image_id,
                "category_id": cat,
                "bbox": bbox,
                "area": 12.5,
                "iscrowd": crowd,
                "segmentation": [],
            }
        )

    for img in images:
        if img["file_name"] != "noann.jpg":
            ann(img["id"], [10, 10, 20, 15], cat=5)
    ann(100, [5, 5, 0, 10])  # w = 0: dropped
    ann(100, [5, 5, 10, -3])  # h < 0: dropped
    ann(100, [70, 50, 20, 20])  # partly outside (80 x 60): clipped to [70, 50, 10, 10]
    ann(100, [-5, -5, 10, 10])  # partly outside on the left/top: clipped to [0, 0, 5, 5]
    ann(100, [90, 10, 5, 5])  # wholly outside: dropped
    ann(100, [1, 2, 3])  # malformed: dropped
    ann(999, [1, 2, 3, 4])  # unknown image: dropped
    ann(101, [0, 0, 40, 40], crowd=1)  # crowd: kept
    coco = {
        "info": {"description": "messy"},
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": [
            {"id": 1, "name": "a", "supercategory": "x"},
            {"id": 5, "name": "b", "supercategory": "x"},
        ],
    }
    path = root / "instances.json"
    path.write_text(json.dumps(coco))
    return path, img_dir


def test_validation_is_counted_by_reason_and_records_round_trip(tmp_path, capsys):
    ann_path, img_dir = make_messy_coco(tmp_path)
    manifest = prepare_shards(ann_path, img_dir, tmp_path / "out", rows_per_shard=3, use_ray=False)
    v = manifest["validation"]
    assert set(v) == set(COCO_REASONS)  # every reason listed, zeros included: the keys say what was checked
    assert {k: n for k, n in v.items() if n} == {
        "image_missing": 1,
        "image_unreadable": 3,
        "image_without_annotations": 1,
        "bbox_invalid": 1,
        "bbox_nonpositive": 2,
        "bbox_clipped": 2,
        "bbox_outside": 1,
        "ann_unknown_image": 1,
        "crowd": 1,
    }
    summary = capsys.readouterr().err
    assert "bbox_clipped" in summary and "clipped to it" in summary and "image_missing" in summary

    rows = {r["file_name"]: r for r in read_shards_table(tmp_path / "out").to_pylist()}
    # zero-byte, garbage, missing and truncated files are skipped: training never meets a file it drops
    assert sorted(rows) == sorted(
        ["rgb.jpg", "rgba.png", "gray.jpg", "cmyk.jpg", "palette.png", "exif.jpg", "noann.jpg"]
    )
    assert manifest["num_images"] == 7 and manifest["num_shards"] == 4
    for name, r in rows.items():
        assert r["image"] == (img_dir / name).read_bytes()
    assert rows["noann.jpg"]["ann_id"] == [] and rows["noann.jpg"]["bbox"] == []
    rgb = rows["rgb.jpg"]
    assert rgb["category_id"] == [5, 1, 1]
    np.testing.assert_array_equal(rgb["bbox"], [[10, 10, 20, 15], [70, 50, 10, 10], [0, 0, 5, 5]])
    assert rows["rgba.png"]["iscrowd"] == [0, 1] and rows["rgba.png"]["area"] == [12.5, 12.5]
    assert rows["exif.jpg"]["height"] == 80 and rows["exif.jpg"]["width"] == 60
    assert manifest["num_annotations"] == sum(len(r["ann_id"]) for r in rows.values())


def test_unknown_category_is_a_clear_error(tmp_path):
    ann_path, img_dir = make_messy_coco(tmp_path)
    coco = json.loads(ann_path.read_text())
    coco["annotations"][3]["category_id"] = 77
    ann_path.write_text(json.dumps(coco))
    bad_id = coco["annotations"][3]["id"]
    with pytest.raises(ValueError, match=rf"annotation id {bad_id} .*category_id 77"):
        prepare_shards(ann_path, img_dir, tmp_path / "out", use_ray=False, progress=False)
    assert not manifest_exists(tmp_path / "out")


def test_file_uri_in_and_out(synth, tmp_path):
    out = f"file://{tmp_path}/uri_out"
    manifest = prepare_shards(
        f"file://{synth.val_annotations}", f"file://{synth.val_images}", out, rows_per_shard=5, use_ray=False
    )
    assert manifest_exists(out) and read_manifest(out) == manifest
    files = shard_files(out)
    assert files[0].startswith("file://") and (tmp_path / "uri_out" / "part-00000.parquet").exists()
    local = write_shards(synth.val_annotations, synth.val_images, tmp_path / "local_out", rows_per_shard=5)
    assert {k: v for k, v in local.items() if k != "source"} == {
        k: v for k, v in manifest.items() if k != "source"
    }
    assert coco_gt_from_shards(out) == coco_gt_from_shards(tmp_path / "local_out")


def _snapshot(d) -> dict[str, bytes]:
    """The shard set's files (not the writer's lock and owner record, which name the run)."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith(".")}


def test_interrupted_prepare_resumes_to_the_identical_result(synth, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    write_shards(synth.train_annotations, synth.train_images, clean, rows_per_shard=4)  # 30 rows: 8 shards

    out = tmp_path / "resumed"
    real = shards._write_shard
    calls = {"n": 0}

    def dies_after_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "_write_shard", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        write_shards(synth.train_annotations, synth.train_images, out, rows_per_shard=4)
    assert not manifest_exists(out)  # an interrupted run leaves no manifest
    assert sorted(_snapshot(out)) == [f"part-{i:05d}.parquet" for i in range(3)]
    with pytest.raises(FileNotFoundError, match="not a complete shard set"):
        read_manifest(out)
    (out / "part-00005.parquet.tmp-deadbeef").write_bytes(b"half a file")  # debris of a killed writer
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    monkeypatch.setattr(shards, "_write_shard", real)
    write_shards(synth.train_annotations, synth.train_images, out, rows_per_shard=4)
    assert _snapshot(out) == _snapshot(clean)  # byte-identical, debris gone
    for i in range(3):  # finished shards were kept, not rewritten
        assert (out / f"part-{i:05d}.parquet").stat().st_mtime_ns == mtimes[f"part-{i:05d}.parquet"]


def test_replanning_removes_the_old_manifest_first_and_stale_shards(synth, tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_shards(synth.train_annotations, synth.train_images, out, rows_per_shard=4)  # 8 shards
    monkeypatch.setattr(shards, "_write_shard", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        write_shards(synth.train_annotations, synth.train_images, out, rows_per_shard=10)
    assert not manifest_exists(out)  # the old manifest no longer claims shards that are being replaced
    monkeypatch.undo()
    manifest = write_shards(synth.train_annotations, synth.train_images, out, rows_per_shard=10)
    assert manifest["num_shards"] == 3
    assert sorted(p.name for p in out.glob("part-*")) == [f"part-{i:05d}.parquet" for i in range(3)]
    assert read_shards_table(out).num_rows == 30


# ----------------------------------------------------------------------------------------- one writer


def test_a_folder_locked_by_another_prepare_is_refused_at_once(synth, tmp_path):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / shards.LOCK_NAME, "w") as f:  # another process's prepare holds the folder
        f.write("pid 4242 on elsewhere")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(shards.PrepareConflict, match=r"another prepare is writing .*out \(pid 4242"):
            write_shards(synth.val_annotations, synth.val_images, out)
    assert not manifest_exists(out) and not list(out.glob("part-*"))
    write_shards(synth.val_annotations, synth.val_images, out)  # released: it goes through
    assert manifest_exists(out)


def test_another_sources_shards_are_refused_unless_overwrite(synth, tmp_path):
    out = tmp_path / "out"
    write_shards(synth.val_annotations, synth.val_images, out, rows_per_shard=5)
    write_shards(synth.val_annotations, synth.val_images, out, rows_per_shard=5)  # same source: resumes
    with pytest.raises(shards.PrepareConflict, match=r"holds the shards of another source .*instances_val"):
        write_shards(synth.train_annotations, synth.train_images, out, rows_per_shard=5)
    assert read_manifest(out)["source"]["annotations"] == str(synth.val_annotations)  # untouched
    manifest = shards.prepare_shards(
        synth.train_annotations, synth.train_images, out, rows_per_shard=5, use_ray=False, overwrite=True
    )
    assert manifest["num_images"] == 30 and read_manifest(out)["source"]["annotations"] == str(
        synth.train_annotations
    )
    assert len(read_shards_table(out, ["image_id"])) == 30


def test_an_interrupted_run_of_another_source_is_refused_too(synth, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = shards._write_shard
    calls = {"n": 0}

    def dies_after_one(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "_write_shard", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        write_shards(synth.val_annotations, synth.val_images, out, rows_per_shard=5)
    monkeypatch.setattr(shards, "_write_shard", real)
    with pytest.raises(shards.PrepareConflict, match="another source"):  # no manifest: the owner record says
        write_shards(synth.train_annotations, synth.train_images, out, rows_per_shard=5)
