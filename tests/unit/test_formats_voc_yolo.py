"""VOC and YOLO trees prepare to the same shards as the equivalent COCO json; splits; the CLI.

One table of images and objects (COCO XYWH pixels) is written three ways: a Pascal VOC tree, an
Ultralytics YOLO tree and a COCO json, each with the defects real data has. All three go through
``prepare_dataset`` in-process and must give the same rows, boxes (after clipping), categories and
counts by reason; the format-specific defects must be counted on top.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ray_retina.cli import main
from ray_retina.data.formats.coco import COCO_REASONS
from ray_retina.data.formats.split import split_keys
from ray_retina.data.formats.voc import read_voc, voc_box
from ray_retina.data.formats.yolo import label_path, read_yolo
from ray_retina.data.shards import LOCK_NAME, prepare_dataset, read_manifest, read_shards_table

CLASSES = ["cat", "dog"]  # ids 1, 2 (note: not what sorting the VOC names would give once "bird" is in)

# name -> (display width, height, [(class, [x, y, w, h], difficult)]); COCO pixels, before clipping.
IMAGES: dict[str, tuple[int, int, list[tuple[str, list[float], int]]]] = {
    "a.jpg": (
        80,
        60,
        [
            ("cat", [10, 10, 20, 15], 0),
            ("dog", [70, 50, 20, 20], 0),  # partly outside: clipped to [70, 50, 10, 10]
            ("cat", [90, 10, 5, 5], 0),  # wholly outside: dropped
            ("dog", [0, 0, 30, 30], 1),  # VOC difficult -> iscrowd=1 (not expressible in YOLO)
        ],
    ),
    "b.jpg": (
        64,
        48,
        [
            ("dog", [-5, -5, 10, 10], 0),  # clipped to [0, 0, 5, 5]
            ("cat", [5, 5, 30, 20], 0),
            ("cat", [5, 5, 10, -3], 0),  # h < 0: dropped
        ],
    ),
    "c.jpg": (50, 70, [("cat", [1, 2, 48, 60], 0)]),  # VOC: size 0 in the XML; YOLO: a polygon
    "exif.jpg": (60, 80, [("dog", [5, 10, 30, 40], 0)]),  # stored 80 x 60, EXIF orientation 6
    "neg.jpg": (40, 40, []),  # a negative (VOC: XML without objects; YOLO: empty label file)
}
EXPECTED_SHARED = {  # counts of the COCO reasons for the images above, common to all formats
    "bbox_clipped": 2,
    "bbox_outside": 1,
    "bbox_nonpositive": 1,
    "image_without_annotations": 1,
}


def _jpeg(w: int, h: int, seed: int, exif_rotate: bool = False) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    if exif_rotate:  # stored transposed, displayed w x h after the 90-degree turn
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(rgb.transpose(1, 0, 2)).save(buf, format="JPEG", exif=exif.tobytes())
    else:
        Image.fromarray(rgb).save(buf, format="JPEG")
    return buf.getvalue()


def _image_bytes() -> dict[str, bytes]:
    return {n: _jpeg(w, h, i, exif_rotate=n == "exif.jpg") for i, (n, (w, h, _)) in enumerate(IMAGES.items())}


def _coco(entries: list[tuple[str, int, int, list]], *, crowd: bool) -> dict:
    """The COCO json of (file_name, width, height, objects); no ``area`` (w*h after clipping, as readers)."""
    cat = {n: i + 1 for i, n in enumerate(CLASSES)}
    images, anns = [], []
    for i, (file_name, w, h, objs) in enumerate(entries):
        images.append({"id": i + 1, "file_name": file_name, "width": w, "height": h})
        for name, box, difficult in objs:
            if difficult and not crowd:
                continue
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": cat[name],
                    "bbox": box,
                    "iscrowd": difficult,
                }
            )
    return {"images": images, "annotations": anns, "categories": [{"id": cat[n], "name": n} for n in CLASSES]}


def _voc_xml(filename: str, w: int, h: int, objects: list[tuple[str, list[float], int]]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{x + 1}</xmin><ymin>{y + 1}</ymin>"
        f"<xmax>{x + bw}</xmax><ymax>{y + bh}</ymax></bndbox></object>"
        for n, (x, y, bw, bh), d in objects
    )
    return (
        f"<annotation><folder>VOC</folder><filename>{filename}</filename><size><width>{w}</width>"
        f"<height>{h}</height><depth>3</depth></size>{objs}</annotation>"
    )


def make_voc(root: Path, imgs: dict[str, bytes]) -> tuple[Path, Path]:
    """A VOC tree of IMAGES plus: an unknown class, an XML that does not parse, an XML whose image is
    missing; and its COCO equivalent (json path, image folder)."""
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for name, data in imgs.items():
        (root / "JPEGImages" / name).write_bytes(data)
    entries = []
    for name, (w, h, objs) in IMAGES.items():
        stem = name[:-4]
        xml_w = 0 if name == "c.jpg" else w  # size 0: read from the image header
        extra = [("bird", [3, 3, 5, 5], 0)] if name == "b.jpg" else []  # not in --classes
        (root / "Annotations" / f"{stem}.xml").write_text(_voc_xml(name, xml_w, h, objs + extra))
        entries.append((name, w, h, objs))
    ghost = ("ghost.jpg", 30, 30, [("cat", [1, 1, 5, 5], 0)])  # XML fine, image missing
    (root / "Annotations" / "ghost.xml").write_text(_voc_xml(*ghost))
    entries.append(ghost)
    (root / "JPEGImages" / "broken.jpg").write_bytes(imgs["a.jpg"])
    (root / "Annotations" / "broken.xml").write_text("<annotation><size><width>8</wid")  # does not parse
    coco_path = root.parent / "voc_as_coco.json"
    coco_path.write_text(json.dumps(_coco(entries, crowd=True)))
    return coco_path, root / "JPEGImages"


def _yolo_line(name: str, box: list[float], w: int, h: int) -> str:
    x, y, bw, bh = box
    return f"{CLASSES.index(name)} {(x + bw / 2) / w!r} {(y + bh / 2) / h!r} {bw / w!r} {bh / h!r}"


def make_yolo(root: Path, imgs: dict[str, bytes], *, names: object = None) -> tuple[Path, Path]:
    """A YOLO tree of IMAGES plus: bad lines, an unknown class, an image without a label file, a label
    file without an image, a polygon; and its COCO equivalent (json path, image folder)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "data.yaml").write_text(yaml.safe_dump({"names": names if names is not None else CLASSES}))
    entries = []
    for name, (w, h, objs) in IMAGES.items():
        (root / "images" / name).write_bytes(imgs[name])
        objs = [o for o in objs if not o[2]]  # YOLO has no difficult/crowd
        lines = [_yolo_line(n, box, w, h) for n, box, _ in objs]
        if name == "c.jpg":  # the same box as a polygon (x1 y1 ... x4 y4)
            (x, y, bw, bh) = objs[0][1]
            pts = [(x, y), (x + bw, y), (x + bw, y + bh), (x, y + bh)]
            lines = ["0 " + " ".join(f"{px / w!r} {py / h!r}" for px, py in pts)]
        if name == "a.jpg":
            lines[1:1] = [
                "0 0.5 0.5",
                "x 0.1 0.1 0.1 0.1",
                "7 0.5 0.5 0.1 0.1",
                "",
            ]  # 2 bad, 1 unknown, blank
        (root / "labels" / f"{name[:-4]}.txt").write_text("\n".join(lines) + "\n" if lines else "")
        entries.append((f"images/{name}", w, h, objs))
    (root / "images" / "nolabel.jpg").write_bytes(imgs["neg.jpg"])  # no label file: a negative
    entries.append(("images/nolabel.jpg", 40, 40, []))
    (root / "labels" / "orphan.txt").write_text("0 0.5 0.5 0.2 0.2\n")  # no image
    (root / "labels" / "classes.txt").write_text("cat\ndog\n")  # LabelImg's class list: not a label file
    coco_path = root.parent / "yolo_as_coco.json"
    coco_path.write_text(json.dumps(_coco(entries, crowd=False)))
    return coco_path, root


def _rows(out: Path) -> dict[str, dict]:
    return {Path(r["file_name"]).name: r for r in read_shards_table(out).to_pylist()}


def _assert_same_shards(got: Path, want: Path) -> None:
    a, b = _rows(got), _rows(want)
    assert sorted(a) == sorted(b)
    for name in a:
        ra, rb = a[name], b[name]
        assert (ra["height"], ra["width"], ra["image"]) == (rb["height"], rb["width"], rb["image"]), name
        assert ra["category_id"] == rb["category_id"] and ra["iscrowd"] == rb["iscrowd"], name
        np.testing.assert_allclose(
            np.array(ra["bbox"]).reshape(-1, 4), np.array(rb["bbox"]).reshape(-1, 4), atol=1e-4
        )
        np.testing.assert_allclose(ra["area"], rb["area"], rtol=1e-5, atol=1e-3)
    ma, mb = read_manifest(got), read_manifest(want)
    assert ma["categories"] == mb["categories"]
    assert {k: ma["validation"][k] for k in COCO_REASONS} == mb["validation"]


def test_voc_prepares_like_its_coco_json(tmp_path, caplog):
    coco_path, coco_images = make_voc(tmp_path / "voc", _image_bytes())
    with caplog.at_level(logging.WARNING):
        ((out, manifest),) = prepare_dataset(
            tmp_path / "out_voc", format="voc", root=tmp_path / "voc", classes=CLASSES, use_ray=False
        ).items()
    ((ref, _),) = prepare_dataset(
        tmp_path / "out_coco", annotations=coco_path, images=coco_images, use_ray=False
    ).items()
    _assert_same_shards(Path(out), Path(ref))
    v = manifest["validation"]
    assert {k: v[k] for k in COCO_REASONS if v[k]} == {**EXPECTED_SHARED, "crowd": 1, "image_missing": 1}
    assert {k: v[k] for k in v if k not in COCO_REASONS} == {
        "label_file_missing": 0,
        "label_file_invalid": 1,
        "class_unknown": 1,
        "split_overlap": 0,
    }
    assert "broken.xml does not parse" in caplog.text
    assert [c["name"] for c in manifest["categories"]] == CLASSES and manifest["source"]["format"] == "voc"
    rows = _rows(Path(out))
    assert rows["a.jpg"]["iscrowd"] == [0, 0, 1]  # the difficult dog
    assert (rows["c.jpg"]["height"], rows["c.jpg"]["width"]) == (70, 50)  # from the header
    assert (rows["exif.jpg"]["height"], rows["exif.jpg"]["width"]) == (80, 60)  # XML size, display order


def test_voc_classes_default_to_the_sorted_names(tmp_path):
    make_voc(tmp_path / "voc", _image_bytes())
    source = read_voc(tmp_path / "voc")
    assert [(c["id"], c["name"]) for c in source.categories] == [(1, "bird"), (2, "cat"), (3, "dog")]
    _, counts = source.to_coco()
    assert counts["class_unknown"] == 0 and counts["label_file_invalid"] == 1


def test_yolo_prepares_like_its_coco_json(tmp_path, caplog):
    coco_path, coco_images = make_yolo(tmp_path / "yolo", _image_bytes())
    with caplog.at_level(logging.WARNING):
        ((out, manifest),) = prepare_dataset(
            tmp_path / "out_yolo", format="yolo", root=tmp_path / "yolo", use_ray=False
        ).items()
    ((ref, _),) = prepare_dataset(
        tmp_path / "out_coco", annotations=coco_path, images=coco_images, use_ray=False
    ).items()
    _assert_same_shards(Path(out), Path(ref))
    v = manifest["validation"]
    assert {k: v[k] for k in COCO_REASONS if v[k]} == {**EXPECTED_SHARED, "image_without_annotations": 2}
    assert {k: v[k] for k in v if k not in COCO_REASONS} == {
        "label_file_missing": 1,
        "label_file_invalid": 0,
        "label_line_invalid": 2,
        "label_file_orphan": 1,
        "class_unknown": 1,
        "split_overlap": 0,
    }
    assert "labels/a.txt:2: '0 0.5 0.5'" in caplog.text and "labels/a.txt:3" in caplog.text
    assert "labels/a.txt:4: class 7" in caplog.text and "orphan.txt has no image" in caplog.text
    rows = _rows(Path(out))
    assert (rows["exif.jpg"]["height"], rows["exif.jpg"]["width"]) == (80, 60)  # EXIF turned: display size
    assert [c["name"] for c in manifest["categories"]] == CLASSES


def test_voc_and_yolo_agree_on_the_boxes_they_share(tmp_path):
    imgs = _image_bytes()
    make_voc(tmp_path / "voc", imgs)
    make_yolo(tmp_path / "yolo", imgs)
    ((voc_out, _),) = prepare_dataset(
        tmp_path / "v", format="voc", root=tmp_path / "voc", classes=CLASSES, use_ray=False
    ).items()
    ((yolo_out, _),) = prepare_dataset(
        tmp_path / "y", format="yolo", root=tmp_path / "yolo", use_ray=False
    ).items()
    voc, yolo = _rows(Path(voc_out)), _rows(Path(yolo_out))
    for name in IMAGES:
        keep = [i for i, c in enumerate(voc[name]["iscrowd"]) if not c]
        np.testing.assert_allclose(
            np.array(voc[name]["bbox"])[keep].reshape(-1, 4),
            np.array(yolo[name]["bbox"]).reshape(-1, 4),
            atol=1e-4,
        )
        assert [voc[name]["category_id"][i] for i in keep] == yolo[name]["category_id"]


def test_voc_corners_are_one_based_inclusive(tmp_path):
    # Devkit convention: xmin=1, xmax=W covers the whole width -> COCO x = 0, w = W.
    assert voc_box(1, 1, 80, 60) == [0.0, 0.0, 80.0, 60.0]
    assert voc_box(11, 21, 30, 40) == [10.0, 20.0, 20.0, 20.0]  # pixels 11..30: 20 wide, from x = 10
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "JPEGImages" / "x.jpg").write_bytes(_jpeg(80, 60, 0))
    xml = _voc_xml("x.jpg", 80, 60, [])
    boxes = "".join(
        f"<object><name>a</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
        f"<ymax>{b[3]}</ymax></bndbox></object>"
        for b in [(1, 1, 80, 60), (11, 21, 30, 40)]
    )
    (root / "Annotations" / "x.xml").write_text(xml.replace("</annotation>", boxes + "</annotation>"))
    ((out, manifest),) = prepare_dataset(tmp_path / "out", format="voc", root=root, use_ray=False).items()
    row = read_shards_table(out).to_pylist()[0]
    assert row["bbox"] == [[0, 0, 80, 60], [10, 20, 20, 20]] and row["area"] == [4800, 400]
    assert manifest["validation"]["bbox_clipped"] == 0  # the whole-image box is inside, not clipped


def test_yolo_label_path_mirrors_images():
    assert label_path("images/train/a.jpg") == "labels/train/a.txt"
    assert label_path("train/images/sub/a.b.png") == "train/labels/sub/a.b.txt"  # Roboflow layout
    assert label_path("images/images/a.jpg") == "images/labels/a.txt"  # the last /images/ only


def test_yolo_names_as_dict_and_classes_without_yaml(tmp_path):
    imgs = _image_bytes()
    make_yolo(tmp_path / "y1", imgs, names={0: "cat", 1: "dog"})
    assert [(c["id"], c["name"]) for c in read_yolo(tmp_path / "y1").categories] == [(1, "cat"), (2, "dog")]
    (tmp_path / "y1" / "data.yaml").unlink()
    with pytest.raises(FileNotFoundError, match=r"no data.yaml in .*y1: give --data"):
        read_yolo(tmp_path / "y1")
    assert [c["name"] for c in read_yolo(tmp_path / "y1", classes=CLASSES).categories] == CLASSES


# ---------------------------------------------------------------------------------------------- splits


def test_split_keys_is_a_deterministic_partition():
    keys = [f"img{i:03d}" for i in range(40)]
    s = split_keys(keys, 0.25, seed=0)
    assert (
        len(s["val"]) == 10 and sorted(s["train"] + s["val"]) == keys and not set(s["train"]) & set(s["val"])
    )
    assert s == split_keys(keys, 0.25, seed=0)
    assert split_keys(keys[::-1], 0.25, seed=0)["val"] == s["val"][::-1]  # listing order does not matter
    assert set(split_keys(keys, 0.25, seed=1)["val"]) != set(s["val"])
    assert len(split_keys(keys[:3], 0.01, seed=0)["val"]) == 1  # at least one val image
    assert len(split_keys(keys[:3], 0.99, seed=0)["train"]) == 1  # at least one train image
    with pytest.raises(ValueError, match="val_fraction"):
        split_keys(keys, 1.0, seed=0)


def _flat_yolo(root: Path, n: int) -> None:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "data.yaml").write_text("names: [cat, dog]\n")
    for i in range(n):
        (root / "images" / f"im{i:02d}.jpg").write_bytes(_jpeg(16 + i, 12, i))
        (root / "labels" / f"im{i:02d}.txt").write_text(
            f"{i % 2} 0.5 0.5 0.5 0.5\n" + ("bad\n" if i % 3 == 0 else "")
        )


def test_val_fraction_writes_a_disjoint_deterministic_train_val(tmp_path):
    _flat_yolo(tmp_path / "yolo", 20)

    def split(seed: int, out: str) -> dict[str, set[str]]:
        manifests = prepare_dataset(
            tmp_path / out,
            format="yolo",
            root=tmp_path / "yolo",
            val_fraction=0.25,
            seed=seed,
            use_ray=False,
            progress=False,
        )
        assert sorted(Path(p).name for p in manifests) == ["train", "val"]
        assert (
            sum(m["validation"]["label_line_invalid"] for m in manifests.values()) == 7
        )  # each counted once
        for p, m in manifests.items():
            assert m["source"]["split"] == Path(p).name and m["source"]["seed"] == seed
        return {Path(p).name: {r["file_name"] for r in read_shards_table(p).to_pylist()} for p in manifests}

    a = split(0, "s0")
    assert a["train"] | a["val"] == {f"images/im{i:02d}.jpg" for i in range(20)}
    assert not a["train"] & a["val"] and len(a["val"]) == 5
    assert split(0, "s0_again") == a
    assert split(1, "s1")["val"] != a["val"]


def test_coco_json_splits_by_val_fraction(tmp_path):
    coco_path, images = make_voc(tmp_path / "voc", _image_bytes())
    manifests = prepare_dataset(
        tmp_path / "out",
        annotations=coco_path,
        images=images,
        val_fraction=0.4,
        seed=3,
        use_ray=False,
        progress=False,
    )
    ids = [{r["image_id"] for r in read_shards_table(p).to_pylist()} for p in manifests]
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 5  # 6 images, ghost.jpg is missing
    total = {k: sum(m["validation"][k] for m in manifests.values()) for k in COCO_REASONS}
    assert total["image_missing"] == 1 and total["crowd"] == 1


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_voc_writes_the_image_sets_splits(tmp_path, capsys):
    root = tmp_path / "voc"
    make_voc(root, _image_bytes())
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\nc\nbroken\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("exif\nneg\nnoxml\n")  # noxml: no XML, no image
    (root / "ImageSets" / "Main" / "aeroplane_train.txt").write_text("a 1\n")  # per-class lists: ignored
    out = tmp_path / "shards"
    rc = main(
        [
            "prepare",
            "--format",
            "voc",
            "--root",
            str(root),
            "--classes",
            "cat, dog",
            "--out",
            str(out),
            "--no-ray",
            "--rows-per-shard",
            "2",
        ]
    )
    assert rc == 0
    train, val = read_manifest(out / "train"), read_manifest(out / "val")
    assert {r["file_name"] for r in read_shards_table(out / "train").to_pylist()} == {
        "a.jpg",
        "b.jpg",
        "c.jpg",
    }
    assert {r["file_name"] for r in read_shards_table(out / "val").to_pylist()} == {"exif.jpg", "neg.jpg"}
    assert train["validation"]["label_file_invalid"] == 1 and val["validation"]["label_file_invalid"] == 0
    assert val["validation"]["label_file_missing"] == 1 and val["validation"]["image_missing"] == 1
    assert (
        train["categories"]
        == val["categories"]
        == [
            {"id": 1, "name": "cat", "supercategory": ""},
            {"id": 2, "name": "dog", "supercategory": ""},
        ]
    )
    assert train["source"] | {"root": None} == {
        "format": "voc",
        "root": None,
        "classes": CLASSES,
        "split": "train",
        "split_by": "source",
    }
    printed = capsys.readouterr().out
    assert f"to {out}/train" in printed and f"to {out}/val" in printed
    # the source has splits: --val-fraction is refused with one line
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--format", "voc", "--root", str(root), "--out", str(out), "--val-fraction", "0.2"])
    assert (
        e.value.code == 2
        and "has its own splits (train, val): drop --val-fraction" in capsys.readouterr().err
    )


def test_cli_yolo_writes_train_and_val(tmp_path):
    root = tmp_path / "yolo"
    for split, n in (("train", 3), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            (root / "images" / split / f"{split}{i}.jpg").write_bytes(_jpeg(32, 24, i))
            (root / "labels" / split / f"{split}{i}.txt").write_text("1 0.5 0.5 0.25 0.5\n")
    (root / "data.yaml").write_text(
        "path: ../elsewhere\ntrain: images/train\nval: images/val\nnames: {0: cat, 1: dog}\n"
    )
    out = tmp_path / "shards"
    assert main(["prepare", "--format", "yolo", "--root", str(root), "--out", str(out), "--no-ray"]) == 0
    for split, n in (("train", 3), ("val", 2)):
        rows = read_shards_table(out / split).to_pylist()
        assert sorted(r["file_name"] for r in rows) == [f"images/{split}/{split}{i}.jpg" for i in range(n)]
        assert all(r["bbox"] == [[12, 6, 8, 12]] and r["category_id"] == [2] for r in rows)
        assert [c["name"] for c in read_manifest(out / split)["categories"]] == CLASSES
    assert (
        main(
            [
                "prepare",
                "--format",
                "yolo",
                "--root",
                str(root),
                "--out",
                str(tmp_path / "v"),
                "--no-ray",
                "--split",
                "val",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "v").iterdir() if p.name != LOCK_NAME) == ["val"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"format": "voc", "root": "nope"}, r"Pascal VOC folder not found: .*nope \(give --root"),
        ({"format": "yolo", "root": "nope"}, r"YOLO dataset folder not found: .*nope \(give --root"),
        (
            {"annotations": "nope.json", "images": "."},
            r"annotations file not found: nope.json \(give --annotations",
        ),
        ({"annotations": "ann.json", "images": "nope"}, r"image folder not found: nope \(give --images"),
    ],
)
def test_missing_inputs_are_one_line_errors(tmp_path, monkeypatch, kwargs, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ann.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=match) as e:
        prepare_dataset(tmp_path / "out", use_ray=False, **kwargs)
    assert "\n" not in str(e.value)


def test_voc_tree_without_jpegimages_is_named(tmp_path):
    (tmp_path / "voc" / "Annotations").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"not a Pascal VOC tree: no JPEGImages/ in .*voc"):
        read_voc(tmp_path / "voc")
