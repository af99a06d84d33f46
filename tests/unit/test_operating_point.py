from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
import torch
from test_evaluate import _gt, _noisy_dets

from ray_retina.engine.evaluate import coco_evaluate
from ray_retina.operating_point import (
    KEEP_NOTHING,
    best_f1_threshold,
    choose_thresholds,
    class_curve,
    error_analysis,
    match_detections,
    precision_target_threshold,
)

# ----------------------------------------------------------------------------------------- by hand

# One class with 4 objects; detections by descending score, their matches: the F1 of keeping the first k is
# 2 TP / (k + 4): k=1 0.4, 2 1/3, 3 4/7, 4 0.75, 5 2/3, 6 0.8, 7 8/11: the best keeps 6 (score 0.2, next 0.1).
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.1])
TP = np.array([1, 0, 1, 1, 0, 1, 0], bool)


def test_f1_optimum_by_hand():
    f1, thr, p, r = best_f1_threshold(SCORES, TP, 4, floor=0.05)
    assert f1 == pytest.approx(0.8)
    assert thr == pytest.approx(0.15)  # halfway between the last kept (0.2) and the first dropped (0.1)
    assert (p, r) == (pytest.approx(4 / 6), pytest.approx(1.0))
    # Without the last false positive the best cut keeps everything: halfway down to the floor.
    assert best_f1_threshold(SCORES[:6], TP[:6], 4, floor=0.05)[1] == pytest.approx(0.125)


@pytest.mark.parametrize(
    ("target", "thr", "precision", "recall"),
    [(0.75, 0.45, 0.75, 0.75), (0.8, 0.85, 1.0, 0.25), (1.0, 0.85, 1.0, 0.25), (0.5, 0.075, 4 / 7, 1.0)],
)
def test_precision_target_by_hand(target, thr, precision, recall):
    # Precision of the cuts: 1, .5, .67, .75, .6, .67, .57: the lowest threshold at or above the target.
    got = precision_target_threshold(SCORES, TP, 4, target, floor=0.05)
    assert got == (pytest.approx(thr), pytest.approx(precision), pytest.approx(recall))


def test_ties_no_true_positive_and_bad_input():
    # Equal scores are kept or dropped together: the only cut keeps both.
    assert best_f1_threshold(np.array([0.5, 0.5]), np.array([True, False]), 1)[:2] == (
        pytest.approx(2 / 3),
        pytest.approx(0.25),
    )
    # No detection helps: keep nothing, whatever the target.
    assert best_f1_threshold(np.array([0.9, 0.4]), np.zeros(2, bool), 3) == (0.0, KEEP_NOTHING, 0.0, 0.0)
    assert precision_target_threshold(np.array([0.9]), np.zeros(1, bool), 3, 0.5) == (KEEP_NOTHING, 0.0, 0.0)
    assert best_f1_threshold(np.zeros(0), np.zeros(0, bool), 2) == (0.0, KEEP_NOTHING, 0.0, 0.0)
    with pytest.raises(ValueError, match="num_gt > 0"):
        best_f1_threshold(SCORES, TP, 0)


def _box_gt(objects: list[tuple[int, int, list[float], int]], cats=((1, "cat"), (2, "dog"))) -> dict:
    """objects: (image_id, category_id, xywh, iscrowd)."""
    return {
        "images": [{"id": i, "height": 100, "width": 100} for i in sorted({o[0] for o in objects} | {1})],
        "annotations": [
            {"id": n + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": crowd}
            for n, (i, c, b, crowd) in enumerate(objects)
        ],
        "categories": [{"id": c, "name": name} for c, name in cats],
    }


def _det(image_id: int, cat: int, bbox: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": bbox, "score": score}


def test_thresholds_from_detections_by_hand():
    gt = _box_gt(
        [
            (1, 1, [0, 0, 10, 10], 0),
            (1, 1, [50, 50, 10, 10], 0),
            (2, 1, [0, 0, 20, 20], 0),
            (2, 1, [60, 0, 40, 40], 1),  # a crowd region
        ]
    )
    dets = [
        _det(1, 1, [0, 0, 10, 10], 0.9),  # TP
        _det(1, 1, [0, 0, 10, 10], 0.8),  # duplicate: FP
        _det(2, 1, [1, 1, 20, 20], 0.7),  # IoU 361/439 = 0.82: TP
        _det(2, 1, [65, 5, 10, 10], 0.95),  # inside the crowd region: neither
        _det(1, 1, [50, 50, 10, 30], 0.6),  # IoU 1/3: FP
        _det(3, 1, [0, 0, 5, 5], 0.99),  # image 3 is not evaluated
    ]
    m = match_detections(gt, dets, img_ids=[1, 2])
    assert m.tp.tolist() == [True, False, True, False, False, False]
    assert m.ignored.tolist() == [False, False, False, True, False, True]
    assert m.num_gt == {1: 3, 2: 0}
    ops = choose_thresholds(m, precision_target=0.9, floor=0.05)
    # Counted, by score: .9 TP, .8 FP, .7 TP, .6 FP of 3 objects: F1 .5, .4, .67, .57 -> keep 3, t = .65.
    cat = ops.classes[1]
    assert cat.f1 == pytest.approx(2 / 3) and cat.threshold == pytest.approx(0.65)
    assert cat.precision_threshold == pytest.approx(0.85) and cat.target_recall == pytest.approx(1 / 3)
    dog = ops.classes[2]  # no object in val: the floor, F1 -1
    assert (dog.f1, dog.threshold, dog.precision_threshold) == (-1.0, 0.05, 0.05)
    entry = ops.checkpoint_entry()
    assert entry == {
        "f1": {"1": pytest.approx(0.65), "2": 0.05},
        "precision": {"1": pytest.approx(0.85), "2": 0.05},
        "precision_target": 0.9,
    }
    assert all(type(v) is float for d in (entry["f1"], entry["precision"]) for v in d.values())


def test_checkpoint_entry_loads_with_weights_only(tmp_path):
    m = match_detections(_gt(), _noisy_dets(_gt()))
    entry = choose_thresholds(m, precision_target=0.8, floor=0.05).checkpoint_entry()
    torch.save({"thresholds": entry}, tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt", weights_only=True)["thresholds"] == entry


# ----------------------------------------------------------------------------------------- oracles


def _pycocotools_matches(gt: dict, dets: list[dict]) -> tuple[set[int], set[int]]:
    """Detection ids (1-based input order) that pycocotools counts as TP and that it ignores, at IoU 0.5,
    area all, 100 detections."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        g = COCO()
        g.dataset = copy.deepcopy(gt)
        g.createIndex()
        e = COCOeval(g, g.loadRes(copy.deepcopy(dets)), "bbox")
        e.params.iouThrs = np.array([0.5])
        e.evaluate()
    tp, ign = set(), set()
    for r in e.evalImgs:
        if r is None or r["aRng"] != [0, 1e10]:
            continue
        for d, m, i in zip(r["dtIds"], r["dtMatches"][0], r["dtIgnore"][0], strict=True):
            if i:
                ign.add(int(d))
            elif m > 0:
                tp.add(int(d))
    return tp, ign


def _crowded(seed: int) -> tuple[dict, list[dict]]:
    gt = _gt(seed=seed)
    for a in gt["annotations"][::7]:
        a["iscrowd"] = 1
    dets = _noisy_dets(gt, seed=seed + 1)
    rng = np.random.default_rng(seed)
    for d in dets[::5]:  # duplicates of found objects
        dets.append({**d, "score": float(rng.uniform(0.05, 1.0))})
    return gt, dets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matching_equals_cocoeval(seed):
    """The TP and ignored detections are pycocotools' own at IoU 0.5; faster-coco-eval's matches of the
    eval pass (COCOeval_faster.eval["matched"]) pair the same detections with non-crowd objects."""
    gt, dets = _crowded(seed)
    m = match_detections(gt, dets)
    tp, ign = _pycocotools_matches(gt, dets)
    assert set(np.flatnonzero(m.tp) + 1) == tp
    assert set(np.flatnonzero(m.ignored) + 1) == ign
    assert len(tp) > 20 and ign
    _, ev = coco_evaluate(gt, dets, backend="faster_coco_eval", return_eval=True)
    crowd = {a["id"] for a in gt["annotations"] if a["iscrowd"]}
    pairs = (k.split("_") for k in ev.eval["matched"])
    assert {int(d) for d, g in pairs if int(g) not in crowd} == tp


def _brute_force_f1(gt: dict, dets: list[dict], cat: int, n_gt: int) -> tuple[float, float]:
    """Best F1 over every threshold at a detection score, each cut matched again from scratch."""
    best = (0.0, KEEP_NOTHING)
    for t in sorted({d["score"] for d in dets if d["category_id"] == cat}, reverse=True):
        kept = [d for d in dets if d["category_id"] == cat and d["score"] >= t]
        m = match_detections(gt, kept)
        f1 = 2 * int(m.tp.sum()) / (int((~m.ignored).sum()) + n_gt)
        if f1 > best[0] + 1e-12:
            best = (f1, t)
    return best


@pytest.mark.parametrize("seed", [3, 4])
def test_f1_threshold_equals_brute_force(seed):
    gt, dets = _crowded(seed)
    gt["images"] = gt["images"][:8]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] <= 8]
    dets = [d for d in dets if d["image_id"] <= 8]
    ops = choose_thresholds(match_detections(gt, dets), precision_target=0.8, floor=0.05)
    for cat, op in ops.classes.items():
        if op.num_gt == 0:
            continue
        f1, last_kept = _brute_force_f1(gt, dets, cat, op.num_gt)
        assert op.f1 == pytest.approx(f1, abs=1e-12)
        # The chosen threshold keeps exactly the brute force's detections, with > as with >=.
        assert op.threshold <= last_kept or f1 == 0.0
        for keep in (lambda s, t=op.threshold: s >= t, lambda s, t=op.threshold: s > t):
            kept = [d for d in dets if d["category_id"] == cat and keep(d["score"])]
            m = match_detections(gt, kept)
            got = 2 * int(m.tp.sum()) / (int((~m.ignored).sum()) + op.num_gt)
            assert got == pytest.approx(f1, abs=1e-12)


def test_class_curve_agrees_with_the_threshold():
    curve = class_curve(SCORES, TP, 4, num_points=101)
    assert curve.f1.max() == pytest.approx(0.8)  # reached on the grid between 0.1 and 0.2
    assert curve.confidence[np.argmax(curve.f1)] == pytest.approx(0.11)
    assert curve.precision[-1] == 1.0 and curve.recall[0] == 1.0
    assert np.all(np.diff(curve.recall) <= 0)


# ----------------------------------------------------------------------------------------- confusion


def test_confusion_matrix_by_hand():
    gt = _box_gt(
        [
            (1, 1, [0, 0, 10, 10], 0),  # A: cat, found
            (1, 2, [30, 30, 10, 10], 0),  # B: dog, found only by a cat detection
            (1, 1, [60, 60, 10, 10], 0),  # C: cat, missed
            (1, 2, [80, 0, 20, 20], 1),  # D: crowd of dogs
        ]
    )
    dets = [
        _det(1, 1, [0, 0, 10, 10], 0.9),  # cat on A: TP
        _det(1, 1, [30, 30, 10, 10], 0.8),  # cat on B: a dog called cat
        _det(1, 2, [0, 0, 10, 10], 0.75),  # dog on A (taken by the cat): background
        _det(1, 2, [82, 2, 5, 5], 0.7),  # dog inside the crowd: left out
        _det(1, 1, [45, 0, 10, 10], 0.6),  # cat on nothing: background
        _det(1, 1, [60, 60, 10, 10], 0.2),  # cat on C, below the cat threshold: not kept
    ]
    ea = error_analysis(gt, dets, {1: 0.5, 2: 0.3})
    assert ea.cat_ids == [1, 2]
    # rows: true cat, dog, background; columns: predicted cat, dog, background
    assert ea.matrix.tolist() == [[1, 0, 1], [1, 0, 0], [1, 1, 0]]
    assert sorted((f.detection, f.true_category, f.kind) for f in ea.false_positives) == [
        (1, 2, "confusion"),
        (2, None, "background"),  # a dog on a cat the cat detection took: nothing of its class there
        (4, None, "background"),
    ]
    more = [_det(1, 1, [0, 0, 10, 11], 0.85), _det(1, 1, [60, 60, 10, 30], 0.84)]
    kinds = {f.detection: f.kind for f in error_analysis(gt, dets + more, {1: 0.5, 2: 0.3}).false_positives}
    assert (kinds[6], kinds[7]) == ("duplicate", "localisation")  # IoU 10/11 with A; 1/3 with C
    assert sorted((m.annotation["id"], m.predicted_category) for m in ea.misses) == [(2, 1), (3, None)]
    # A lower cat threshold finds C.
    assert error_analysis(gt, dets, {1: 0.1, 2: 0.3}).matrix.tolist() == [[2, 0, 0], [1, 0, 0], [1, 1, 0]]


@pytest.mark.parametrize("seed", [0, 5])
def test_confusion_matrix_agrees_with_the_thresholds(seed):
    """At the chosen thresholds the diagonal holds each class's TP and the rows its objects."""
    gt, dets = _crowded(seed)
    m = match_detections(gt, dets)
    ops = choose_thresholds(m, floor=0.05)
    ea = error_analysis(gt, dets, ops.f1_thresholds())
    for k, cat in enumerate(ea.cat_ids):
        op = ops.classes[cat]
        if op.num_gt == 0:
            continue
        assert ea.matrix[k].sum() == op.num_gt
        assert ea.matrix[k, k] == round(op.recall * op.num_gt)
        kept = (m.category_id == cat) & ~m.ignored & (m.scores >= op.threshold)
        assert ea.matrix[:, k].sum() == kept.sum()
    assert ea.matrix[-1, -1] == 0
    assert len(ea.false_positives) == ea.matrix[:, :-1].sum() - np.trace(ea.matrix)
    assert len(ea.misses) == ea.matrix[:-1, :].sum() - np.trace(ea.matrix)
