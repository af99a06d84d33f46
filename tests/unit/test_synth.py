"""The synthetic set is real COCO: pycocotools loads it, files match the json, output is deterministic."""

from __future__ import annotations

import filecmp
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from ray_retina.data import synthetic
from ray_retina.data.synthetic import CATEGORIES, make_synthetic_coco


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("synth"), num_train=24, num_val=8, seed=3)


def test_pycocotools_loads_both_splits(synth):
    for ann_path, img_dir, n in (
        (synth.train_annotations, synth.train_images, 24),
        (synth.val_annotations, synth.val_images, 8),
    ):
        coco = COCO(str(ann_path))
        assert len(coco.getImgIds()) == n
        assert sorted(coco.getCatIds()) == [3, 17, 42]  # non-contiguous on purpose
        assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"rectangle", "ellipse", "triangle"}
        data = json.loads(ann_path.read_text())
        assert set(data) >= {"info", "licenses", "images", "annotations", "categories"}
        ann_ids = [a["id"] for a in data["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids)
        per_image = [len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()]
        assert min(per_image) >= 1 and max(per_image) <= 6 and np.mean(per_image) > 1.5
        for img in coco.loadImgs(coco.getImgIds()):
            with Image.open(img_dir / img["file_name"]) as im:
                assert im.format == "JPEG" and im.size == (img["width"], img["height"])
                assert 160 <= im.width <= 320 and 160 <= im.height <= 320
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])):
                x, y, w, h = ann["bbox"]
                assert ann["iscrowd"] == 0 and ann["segmentation"] and 0 < ann["area"] <= w * h
                assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
                assert 1 <= w <= 96 and 1 <= h <= 96


def test_train_and_val_image_ids_are_disjoint(synth):
    train = {i["id"] for i in json.loads(synth.train_annotations.read_text())["images"]}
    val = {i["id"] for i in json.loads(synth.val_annotations.read_text())["images"]}
    assert not train & val


def test_deterministic_for_a_seed(tmp_path, synth):
    again = make_synthetic_coco(tmp_path / "again", num_train=24, num_val=8, seed=3)
    cmp = filecmp.dircmp(synth.root, again.root)
    files = [p.relative_to(synth.root) for p in synth.root.rglob("*") if p.is_file()]
    match, mismatch, errors = filecmp.cmpfiles(synth.root, again.root, files, shallow=False)
    assert not mismatch and not errors and len(match) == 24 + 8 + 2, cmp.report()
    other = make_synthetic_coco(tmp_path / "other", num_train=24, num_val=0, seed=4)
    assert other.train_annotations.read_bytes() != synth.train_annotations.read_bytes()


def test_bbox_is_the_visible_extent_of_each_shape():
    """On the raw canvas (before JPEG): every side of a bbox touches pixels of its object's colour."""
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(30):
        canvas, objects = synthetic._draw_image(
            rng, min_image_size=160, max_image_size=240, min_object_size=8, max_object_size=96, max_objects=6
        )
        colours = {cid: np.array(col) for cid, _, col in CATEGORIES}
        for obj in objects:
            x, y, w, h = (int(v) for v in obj["bbox"])
            crop = canvas[y : y + h, x : x + w].astype(int)
            near = np.abs(crop - colours[obj["category_id"]]).max(axis=2) <= synthetic.COLOUR_JITTER
            assert near[0].any() and near[-1].any() and near[:, 0].any() and near[:, -1].any()
            assert near.sum() >= obj["area"]  # all visible pixels are inside the box
            checked += 1
    assert checked > 50


def test_some_objects_overlap(synth):
    coco = json.loads(synth.train_annotations.read_text())
    by_img: dict[int, list[list[float]]] = {}
    for a in coco["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a["bbox"])
    overlaps = 0
    for boxes in by_img.values():
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                (x1, y1, w1, h1), (x2, y2, w2, h2) = boxes[i], boxes[j]
                overlaps += min(x1 + w1, x2 + w2) > max(x1, x2) and min(y1 + h1, y2 + h2) > max(y1, y2)
    assert overlaps >= 1


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="min_image_size"):
        make_synthetic_coco(tmp_path, 1, 1, 0, min_image_size=300, max_image_size=200)
    with pytest.raises(ValueError, match="max_objects"):
        make_synthetic_coco(tmp_path, 1, 1, 0, max_objects=0)


def test_class_weights_make_a_rare_class():
    """class_weights [1, 1, 0.1]: triangles about 1 object in 21, the other two about 10 in 21 each."""
    rng = np.random.default_rng(0)
    p = np.array([1.0, 1.0, 0.1]) / 2.1
    counts = dict.fromkeys((cid for cid, _, _ in CATEGORIES), 0)
    for _ in range(150):
        _, objects = synthetic._draw_image(
            rng,
            min_image_size=128,
            max_image_size=160,
            min_object_size=12,
            max_object_size=48,
            max_objects=5,
            class_p=p,
        )
        for obj in objects:
            counts[obj["category_id"]] += 1
    n = sum(counts.values())
    share = {cid: c / n for cid, c in counts.items()}
    assert n > 300
    assert 0 < share[42] < 0.1  # triangle: expected 0.048
    assert 0.38 < share[3] < 0.57 and 0.38 < share[17] < 0.57  # expected 0.476 each


@pytest.mark.parametrize("weights", [[1.0, 1.0], [1.0, -1.0, 1.0], [0.0, 0.0, 0.0]])
def test_class_weights_are_checked(tmp_path, weights):
    with pytest.raises(ValueError, match="class_weights needs 3 weights >= 0 .*rectangle, ellipse, triangle"):
        make_synthetic_coco(tmp_path, num_train=1, num_val=0, seed=0, class_weights=weights)


def test_config_class_weights_reach_the_set(tmp_path):
    """data.synth.class_weights in a config: the set made on demand has the rare class rare."""
    from ray_retina.config import Config, apply_overrides
    from ray_retina.engine.session import ensure_data

    root = tmp_path / "synth"
    cfg = apply_overrides(
        Config(),
        {
            "data.root": str(root),
            "data.train_shards": str(root / "shards" / "train"),
            "data.val_shards": str(root / "shards" / "val"),
            "data.synth": {"num_train": 40, "num_val": 1, "seed": 0, "class_weights": [1.0, 1.0, 0.0]},
        },
    )
    ensure_data(cfg)
    anns = json.loads((root / "annotations" / "instances_train.json").read_text())["annotations"]
    assert len(anns) > 40 and {a["category_id"] for a in anns} == {3, 17}
