"""Every bad input ``prepare`` can meet, for COCO, VOC and YOLO, with its outcome: a one-line error that
names the file, record and field, or the record skipped and counted by reason in the manifest.

Each case builds a small source with one defect in ``tmp_path`` and runs ``prepare_dataset`` in-process.
A counted case also checks that the defective image is not in the shards (nothing trained on it).
"""

from __future__ import annotations

import errno
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ray_retina.data import shards
from ray_retina.data.shards import prepare_dataset, read_shards_table


def jpeg(w: int = 40, h: int = 30, orientation: int | None = None) -> bytes:
    rgb = np.random.default_rng(w * 1000 + h).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    kw: dict[str, Any] = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- COCO


def coco_source(tmp: Path, edit: Callable[[dict[str, Any], Path], None] | None = None) -> dict[str, Any]:
    """Two 40 x 30 images with a box each (``good.jpg``, ``bad.jpg``); ``edit(coco, images)`` breaks one."""
    images = tmp / "images"
    images.mkdir()
    for name in ("good.jpg", "bad.jpg"):
        (images / name).write_bytes(jpeg())
    coco = {
        "images": [
            {"id": 1, "file_name": "good.jpg", "height": 30, "width": 40},
            {"id": 2, "file_name": "bad.jpg", "height": 30, "width": 40},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10], "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [1, 2, 10, 10], "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    if edit is not None:
        edit(coco, images)
    path = tmp / "instances.json"
    if "raw" in coco:
        path.write_bytes(coco["raw"])
    else:
        path.write_text(json.dumps(coco))  # NaN is written as NaN, as Python's and many tools' json do
    return {"format": "coco", "annotations": path, "images": images}


def img(i: int, **kw: Any) -> Callable[[dict[str, Any], Path], None]:
    def edit(coco: dict[str, Any], _: Path) -> None:
        coco["images"][i].update(kw)
        for k in [k for k, v in kw.items() if v is DELETE]:
            del coco["images"][i][k]

    return edit


def ann(i: int, **kw: Any) -> Callable[[dict[str, Any], Path], None]:
    def edit(coco: dict[str, Any], _: Path) -> None:
        coco["annotations"][i].update(kw)
        for k in [k for k, v in kw.items() if v is DELETE]:
            del coco["annotations"][i][k]

    return edit


def file_bytes(name: str, data: bytes) -> Callable[[dict[str, Any], Path], None]:
    def edit(_: dict[str, Any], images: Path) -> None:
        (images / name).write_bytes(data)

    return edit


def outside(coco: dict[str, Any], images: Path) -> None:
    (images.parent / "outside.jpg").write_bytes(jpeg())  # a real image: only the path is wrong
    coco["images"][1]["file_name"] = "../outside.jpg"


def raw(data: bytes) -> Callable[[dict[str, Any], Path], None]:
    def edit(coco: dict[str, Any], _: Path) -> None:
        coco["raw"] = data

    return edit


DELETE = object()
WHOLE = json.dumps({"images": [], "annotations": [], "categories": [{"id": 1}]}).encode()

# case -> (edit, ("count", {reason: n}) | ("error", regex of the one-line message))
COCO_CASES: dict[str, tuple[Any, tuple[str, Any]]] = {
    "height absent": (img(1, height=DELETE), ("count", {"size_invalid": 1})),
    "height zero": (img(1, height=0), ("count", {"size_invalid": 1})),
    "width negative": (img(1, width=-40), ("count", {"size_invalid": 1})),
    "height NaN": (img(1, height=float("nan")), ("count", {"size_invalid": 1})),
    "height text": (img(1, height="thirty"), ("count", {"size_invalid": 1})),
    "height fractional": (img(1, height=29.5), ("count", {"size_invalid": 1})),
    "declared size differs": (img(1, height=60, width=80), ("count", {"size_mismatch": 1})),
    "declared size swapped, no EXIF": (img(1, height=40, width=30), ("count", {"size_mismatch": 1})),
    "file outside the image folder": (outside, ("count", {"outside_root": 1})),
    "absolute file name": (img(1, file_name="/etc/hostname"), ("count", {"outside_root": 1})),
    "URI file name": (img(1, file_name="s3://bucket/x.jpg"), ("count", {"outside_root": 1})),
    "file name not UTF-8": (img(1, file_name="\udcffx.jpg"), ("count", {"name_not_utf8": 1})),
    "truncated JPEG": (file_bytes("bad.jpg", jpeg()[:-200]), ("count", {"image_unreadable": 1})),
    "JPEG without its end marker": (file_bytes("bad.jpg", jpeg()[:-2]), ("count", {"image_unreadable": 1})),
    "empty file": (file_bytes("bad.jpg", b""), ("count", {"image_unreadable": 1})),
    "not an image": (file_bytes("bad.jpg", b"GIF89a but not really" * 5), ("count", {"image_unreadable": 1})),
    "missing file": (img(1, file_name="nope.jpg"), ("count", {"image_missing": 1})),
    "bbox NaN": (ann(1, bbox=[1, 2, float("nan"), 3]), ("count", {"bbox_invalid": 1})),
    "bbox text": (ann(1, bbox=["1", 2, 3, 4]), ("count", {"bbox_invalid": 1})),
    "bbox three numbers": (ann(1, bbox=[1, 2, 3]), ("count", {"bbox_invalid": 1})),
    "bbox outside": (ann(1, bbox=[50, 40, 5, 5]), ("count", {"bbox_outside": 1})),
    "annotation of no image": (ann(1, image_id=9), ("count", {"ann_unknown_image": 1})),
    "category_id NaN": (
        ann(1, category_id=float("nan")),
        ("error", r"instances\.json: annotation id 2 \(annotations\[1\]\): `category_id` is nan"),
    ),
    "category_id text": (
        ann(1, category_id="cat"),
        ("error", r"instances\.json: annotation id 2 \(annotations\[1\]\): `category_id` is 'cat'"),
    ),
    "category_id unknown": (
        ann(1, category_id=7),
        ("error", r"annotation id 2 .*category_id 7, which is not"),
    ),
    "image_id absent": (
        ann(1, image_id=DELETE),
        ("error", r"annotation id 2 \(annotations\[1\]\): no `image_id`"),
    ),
    "annotation id absent": (ann(1, id=DELETE), ("error", r"instances\.json: annotations\[1\]: no `id`")),
    "iscrowd text": (ann(1, iscrowd="yes"), ("error", r"annotation id 2 .*`iscrowd` is 'yes'")),
    "image id absent": (img(1, id=DELETE), ("error", r"instances\.json: images\[1\]: no `id`")),
    "image id twice": (
        img(1, id=1),
        ("error", r"instances\.json: image id 1 \(images\[1\]\): duplicate image id 1"),
    ),
    "file_name absent": (
        img(1, file_name=DELETE),
        ("error", r"image id 2 \(images\[1\]\): `file_name` missing"),
    ),
    "truncated json": (raw(WHOLE[:-9]), ("error", r"instances\.json is not valid JSON .* at line 1 column")),
    "json not UTF-8": (raw(b'{"images": ["\xff\xfe"]}'), ("error", r"instances\.json is not UTF-8")),
    "json not COCO": (raw(b"[1, 2]"), ("error", r"instances\.json is not a COCO json: no `images` list")),
    "no categories": (
        lambda coco, _: coco.update(categories=[]),
        ("error", r"instances\.json has no categories"),
    ),
}


@pytest.mark.parametrize("case", list(COCO_CASES))
def test_coco_bad_input(tmp_path, case):
    edit, (kind, expected) = COCO_CASES[case]
    kwargs = coco_source(tmp_path, edit)
    run = lambda: prepare_dataset(tmp_path / "out", use_ray=False, progress=False, **kwargs)  # noqa: E731
    if kind == "error":
        with pytest.raises(ValueError, match=expected) as err:
            run()
        assert "\n" not in str(err.value)  # one line
        return
    ((out, manifest),) = run().items()
    counted = {k: n for k, n in manifest["validation"].items() if n and k != "image_without_annotations"}
    if "ann" in case or "bbox" in case:
        assert counted == expected and manifest["num_images"] == 2
    else:
        assert counted == expected
        assert [r["file_name"] for r in read_shards_table(out, ["file_name"]).to_pylist()] == ["good.jpg"]


def test_skipped_files_are_named_in_the_log(tmp_path, caplog):
    kwargs = coco_source(tmp_path, img(1, height=60, width=80))
    prepare_dataset(tmp_path / "out", use_ray=False, progress=False, **kwargs)
    assert "bad.jpg: annotation says 80x60, the image is 40x30" in caplog.text
    (tmp_path / "b").mkdir()
    kwargs = coco_source(tmp_path / "b", img(1, height=0))
    prepare_dataset(tmp_path / "out_b", use_ray=False, progress=False, **kwargs)
    assert "image id 2 (images[1]) 'bad.jpg': image width/height absent, zero" in caplog.text


def test_no_space_left_names_the_output_path(tmp_path, monkeypatch):
    kwargs = coco_source(tmp_path)

    def full_disk(fs, path, data):  # the disk fills up at the write
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shards, "write_bytes_atomic", full_disk)
    with pytest.raises(OSError, match=r"cannot write .*out/\S+: No space left on device") as err:
        prepare_dataset(tmp_path / "out", use_ray=False, progress=False, **kwargs)
    assert err.value.errno == errno.ENOSPC and "\n" not in str(err.value)


def test_cli_prints_no_space_left_as_one_line(tmp_path, monkeypatch, capsys):
    from ray_retina.cli import main

    kwargs = coco_source(tmp_path)
    monkeypatch.setattr(
        shards, "write_bytes_atomic", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left"))
    )
    argv = ["prepare", "--annotations", str(kwargs["annotations"]), "--images", str(kwargs["images"])]
    assert main([*argv, "--out", str(tmp_path / "out"), "--no-ray"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot write") and "No space left on device" in err[-1]


# ----------------------------------------------------------------------------------------------- VOC


def voc_tree(
    root: Path, sets: dict[str, list[str]] | None = None, sizes: dict[str, tuple] | None = None
) -> Path:
    """``a`` and ``b``: 40 x 30 JPEGs with one ``thing`` each; ``sizes`` overrides an XML's (w, h)."""
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for key in ("a", "b"):
        (root / "JPEGImages" / f"{key}.jpg").write_bytes(jpeg())
        w, h = (sizes or {}).get(key, (40, 30))
        (root / "Annotations" / f"{key}.xml").write_text(
            f"<annotation><size><width>{w}</width><height>{h}</height></size><object><name>thing</name>"
            "<bndbox><xmin>2</xmin><ymin>3</ymin><xmax>12</xmax><ymax>13</ymax></bndbox></object></annotation>"
        )
    if sets is not None:
        (root / "ImageSets" / "Main").mkdir(parents=True)
        for split, keys in sets.items():
            (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(k + "\n" for k in keys))
    return root


def test_voc_imagesets_line_outside_the_tree_is_refused(tmp_path):
    root = voc_tree(tmp_path / "deep" / "voc", {"train": ["a", "../../x"], "val": ["b"]})
    (tmp_path / "x.xml").write_text("<annotation><object><name>secret</name></object></annotation>")
    manifests = prepare_dataset(tmp_path / "out", format="voc", root=root, use_ray=False, progress=False)
    train = manifests[str(tmp_path / "out" / "train")]
    assert train["validation"]["outside_root"] == 1 and train["num_images"] == 1
    assert [c["name"] for c in train["categories"]] == ["thing"]  # nothing read from x.xml


def test_voc_id_in_two_splits_is_an_error_or_kept_in_the_first(tmp_path):
    root = voc_tree(tmp_path / "voc", {"train": ["a", "b"], "val": ["b"]})
    with pytest.raises(
        ValueError, match=r"1 images of .* are in more than one split .*: b \(train and val\)"
    ):
        prepare_dataset(tmp_path / "out", format="voc", root=root, use_ray=False, progress=False)
    manifests = prepare_dataset(
        tmp_path / "out", format="voc", root=root, use_ray=False, progress=False, split_overlap="first"
    )
    train, val = (manifests[str(tmp_path / "out" / s)] for s in ("train", "val"))
    assert (train["num_images"], val["num_images"]) == (2, 0)
    assert (train["validation"]["split_overlap"], val["validation"]["split_overlap"]) == (0, 1)


def test_voc_xml_size_is_checked_against_the_image(tmp_path):
    root = voc_tree(tmp_path / "voc", sizes={"b": (80, 60)})
    ((_, manifest),) = prepare_dataset(
        tmp_path / "out", format="voc", root=root, use_ray=False, progress=False
    ).items()
    assert manifest["validation"]["size_mismatch"] == 1 and manifest["num_images"] == 1


def test_voc_names_that_are_not_utf8_are_counted(tmp_path):
    root = voc_tree(tmp_path / "voc")
    with open(os.path.join(os.fsencode(root / "JPEGImages"), b"\xffc.jpg"), "wb") as f:
        f.write(jpeg())
    ((_, manifest),) = prepare_dataset(
        tmp_path / "out", format="voc", root=root, use_ray=False, progress=False
    ).items()
    assert manifest["validation"]["name_not_utf8"] == 1 and manifest["num_images"] == 2


def test_voc_imagesets_not_utf8_is_named(tmp_path):
    root = voc_tree(tmp_path / "voc", {"train": ["a"]})
    (root / "ImageSets" / "Main" / "val.txt").write_bytes(b"b\xff\n")
    with pytest.raises(ValueError, match=r"ImageSets/Main/val\.txt is not UTF-8 text"):
        prepare_dataset(tmp_path / "out", format="voc", root=root, use_ray=False, progress=False)


# ----------------------------------------------------------------------------------------------- YOLO


def yolo_tree(root: Path, val_dir: str = "images/val") -> Path:
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        (root / "images" / split / f"{split}.jpg").write_bytes(jpeg())
        (root / "labels" / split / f"{split}.txt").write_text("0 0.5 0.5 0.25 0.5\n")
    (root / "data.yaml").write_text(f"train: images/train\nval: {val_dir}\nnames: [thing]\n")
    return root


def test_yolo_image_in_two_splits_is_an_error_or_kept_in_the_first(tmp_path):
    root = yolo_tree(tmp_path / "yolo", val_dir="images/train")  # val lists train's folder: a leak
    with pytest.raises(
        ValueError, match=r"are in more than one split .*images/train/train\.jpg \(train and val\)"
    ):
        prepare_dataset(tmp_path / "out", format="yolo", root=root, use_ray=False, progress=False)
    manifests = prepare_dataset(
        tmp_path / "out", format="yolo", root=root, use_ray=False, progress=False, split_overlap="first"
    )
    val = manifests[str(tmp_path / "out" / "val")]
    assert val["num_images"] == 0 and val["validation"]["split_overlap"] == 1


@pytest.mark.parametrize(
    ("defect", "reason"),
    [
        ("label NaN", "label_line_invalid"),
        ("label not UTF-8", "label_file_invalid"),
        ("truncated image", "image_unreadable"),
        ("image name not UTF-8", "name_not_utf8"),
    ],
)
def test_yolo_bad_files_are_counted(tmp_path, defect, reason):
    root = yolo_tree(tmp_path / "yolo")
    label, image = root / "labels" / "val" / "val.txt", root / "images" / "val" / "val.jpg"
    if defect == "label NaN":
        label.write_text("0 nan 0.5 0.25 0.5\n")
    elif defect == "label not UTF-8":
        label.write_bytes(b"0 0.5 0.5 0.25 0.5 \xff\n")
    elif defect == "truncated image":
        image.write_bytes(jpeg()[:-100])
    else:
        with open(os.path.join(os.fsencode(image.parent), b"\xfe.jpg"), "wb") as f:
            f.write(jpeg())
    manifests = prepare_dataset(tmp_path / "out", format="yolo", root=root, use_ray=False, progress=False)
    counts: dict[str, int] = {}
    for m in manifests.values():
        for k, n in m["validation"].items():
            counts[k] = counts.get(k, 0) + n
    assert counts[reason] == 1
