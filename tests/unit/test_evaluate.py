from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest

from ray_retina.engine.evaluate import STAT_NAMES, coco_evaluate, format_stats


def _gt(num_images: int = 20, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    cats = [{"id": 3, "name": "a"}, {"id": 17, "name": "b"}, {"id": 42, "name": "c"}]
    images, anns = [], []
    aid = 1
    for i in range(1, num_images + 1):
        images.append({"id": i, "file_name": f"{i}.jpg", "height": 400, "width": 500})
        for _ in range(int(rng.integers(0, 6))):
            w, h = rng.uniform(8, 200, size=2)
            x, y = rng.uniform(0, 500 - w), rng.uniform(0, 400 - h)
            anns.append(
                {
                    "id": aid,
                    "image_id": i,
                    "category_id": int(rng.choice([3, 17, 42])),
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": 0,
                }
            )
            aid += 1
    return {"images": images, "annotations": anns, "categories": cats}


def _noisy_dets(gt: dict, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    dets = []
    for a in gt["annotations"]:
        if rng.random() < 0.2:
            continue  # a miss
        x, y, w, h = a["bbox"]
        jit = rng.normal(0, 0.08, size=4) * [w, h, w, h]
        cat = a["category_id"] if rng.random() < 0.9 else 3
        dets.append(
            {
                "image_id": a["image_id"],
                "category_id": cat,
                "bbox": [x + jit[0], y + jit[1], max(1.0, w + jit[2]), max(1.0, h + jit[3])],
                "score": float(rng.uniform(0.05, 1.0)),
            }
        )
    for _ in range(30):  # false positives
        dets.append(
            {
                "image_id": int(rng.integers(1, 21)),
                "category_id": 17,
                "bbox": [float(rng.uniform(0, 300)), float(rng.uniform(0, 200)), 50.0, 40.0],
                "score": float(rng.uniform(0.05, 0.6)),
            }
        )
    return dets


def _pycocotools_reference(gt: dict, dets: list[dict]) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        g = COCO()
        g.dataset = copy.deepcopy(gt)
        g.createIndex()
        d = g.loadRes(copy.deepcopy(dets))
        e = COCOeval(g, d, "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return np.asarray(e.stats)


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_perfect_detections_score_one(backend):
    gt = _gt()
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in gt["annotations"]
    ]
    stats = coco_evaluate(gt, dets, backend=backend)
    assert stats["AP"] == pytest.approx(1.0)
    assert stats["AP50"] == pytest.approx(1.0)
    assert stats["AR100"] == pytest.approx(1.0)


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_equals_pycocotools_reference(backend):
    gt = _gt()
    dets = _noisy_dets(gt)
    ref = _pycocotools_reference(gt, dets)
    stats = coco_evaluate(gt, dets, backend=backend)
    assert list(stats) == list(STAT_NAMES)
    np.testing.assert_allclose([stats[k] for k in STAT_NAMES], ref, atol=1e-12)
    assert 0.2 < stats["AP50"] < 1.0


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_inputs_left_untouched_and_repeatable(backend):
    """coco_evaluate copies only one dict level deep: the caller's GT and detections must come back as they
    went in (COCOeval adds keys to GT annotations, loadRes to result dicts), even with a crowd box and a
    GT with segmentation, and a second call on the same objects gives the same stats."""
    gt = _gt()
    gt["annotations"][0]["iscrowd"] = 1
    gt["annotations"][1]["segmentation"] = [[1.0, 1.0, 9.0, 1.0, 9.0, 9.0]]
    dets = _noisy_dets(gt)
    gt0, dets0 = copy.deepcopy(gt), copy.deepcopy(dets)
    first = coco_evaluate(gt, dets, backend=backend)
    assert gt == gt0
    assert dets == dets0
    assert coco_evaluate(gt, dets, backend=backend) == first


def test_no_detections_is_zero_and_img_ids_restrict():
    gt = _gt()
    assert coco_evaluate(gt, [])["AP"] == 0.0
    dets = _noisy_dets(gt)
    sub = [d for d in dets if d["image_id"] <= 10]
    part = coco_evaluate(gt, sub, img_ids=list(range(1, 11)))
    gt10 = {
        **gt,
        "images": gt["images"][:10],
        "annotations": [a for a in gt["annotations"] if a["image_id"] <= 10],
    }
    assert part == coco_evaluate(gt10, sub)


def test_unknown_backend_and_table():
    with pytest.raises(ValueError, match="unknown COCO eval backend"):
        coco_evaluate(_gt(), _noisy_dets(_gt()), backend="nope")  # type: ignore[arg-type]
    table = format_stats({k: 0.5 for k in STAT_NAMES})
    assert "AP@[.50:.95]" in table and "50.00" in table


def test_score_detections_reports_operating_points():
    """One eval gives AP and the operating points of the same detections: per-class entries, the metric keys
    every eval logs, the checkpoint's thresholds entry and the CLI's table."""
    from ray_retina.config import Config, apply_overrides
    from ray_retina.engine.evaluate import format_per_class, per_class_metrics, score_detections
    from ray_retina.operating_point import choose_thresholds, match_detections

    gt, dets = _gt(), _noisy_dets(_gt())
    cfg = apply_overrides(Config(), {"eval.precision_target": 0.8})
    stats, result = score_detections(gt, dets, [i["id"] for i in gt["images"]], cfg)
    assert stats == coco_evaluate(gt, dets)
    ops = choose_thresholds(
        match_detections(gt, dets), precision_target=0.8, floor=cfg.postprocess.score_thresh
    )
    assert result.thresholds == ops.checkpoint_entry() and result.thresholds["precision_target"] == 0.8
    assert set(result.per_class) == {3, 17, 42}
    for cat, v in result.per_class.items():
        assert v["F1"] == ops.classes[cat].f1 and v["threshold"] == ops.classes[cat].threshold
        assert 0.0 < v["F1"] < 1.0 and 0.0 < v["AP50"] <= 1.0
    names = {3: "a", 17: "b/x", 42: "c"}
    metrics = per_class_metrics(result.per_class, names)
    assert metrics["val/F1/b_x"] == result.per_class[17]["F1"]
    assert metrics["val/threshold/a"] == result.per_class[3]["threshold"]
    table = format_per_class(result.per_class, names).splitlines()
    assert table[0].split() == ["class", "AP", "AP50", "F1", "thr", "F1", "thr", "P"]
    assert table[1].split()[4] == f"{result.per_class[3]['threshold']:.3f}"
    # No detection at all: no AP entries, F1 0 and nothing kept for every class with objects.
    _, empty = score_detections(gt, [], [i["id"] for i in gt["images"]], cfg)
    assert all(
        v == {"F1": 0.0, "threshold": 1.0, "precision_threshold": 1.0} for v in empty.per_class.values()
    )
    assert "n/a" in format_per_class(empty.per_class, names)
