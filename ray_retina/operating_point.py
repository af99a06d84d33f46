"""Per-class operating thresholds and the error analysis of a detector on val, at IoU 0.5.

Training and eval keep every detection above the post-process floor (0.05: right for AP, wrong for an
application). This module chooses, per class, the score threshold an application should use:

- the one that maximises F1 = 2 TP / (detections kept + objects), and
- the lowest one whose precision reaches a target (the most recall at that precision).

Both come from one matching of the val detections to the ground truth with COCO's own rules at IoU 0.5
(pycocotools ``evaluateImg``: per image and class, detections by descending score, at most 100, each taking
the unmatched object of highest IoU >= 0.5; an object marked ``iscrowd`` can take any number of detections,
whose IoU is measured against the detection's own area, and those detections are neither true nor false
positives). So a class's TP/FP here are exactly the ones behind its ``AP50`` (tested against both COCO
backends).

A threshold sits halfway between the score of the last detection it keeps and the next lower score (or
the post-process floor below the last one), so ``score > t`` and ``score >= t`` keep the same val
detections. 1.0 keeps nothing: the choice for a class with objects but no threshold that helps (F1 0, or
a precision target it never reaches). A class without objects in val keeps the floor (no evidence either
way) and reports F1 -1, as ``val/AP`` does.

The error analysis (:func:`error_analysis`) applies the chosen thresholds: a confusion matrix over the
classes plus background, the false positives and the missed objects. numpy only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "IOU_THRESH",
    "KEEP_NOTHING",
    "ClassCurve",
    "ClassOperatingPoint",
    "ErrorAnalysis",
    "Matching",
    "OperatingPoints",
    "ValDetections",
    "best_f1_threshold",
    "box_iou_xywh",
    "choose_thresholds",
    "error_analysis",
    "match_detections",
    "match_image",
    "precision_target_threshold",
    "review_val_detections",
]

IOU_THRESH = 0.5  # the operating point's match rule: COCO's AP50 (the paper's and Ultralytics' choice)
MAX_DETS = 100  # COCO's per image and class cap (maxDets[-1]); the post-process keeps <= 100 per image anyway
KEEP_NOTHING = (
    1.0  # the threshold that keeps no detection (sigmoid scores are < 1 in float32 except saturated)
)


# ----------------------------------------------------------------------------------------- matching


def box_iou_xywh(dets: np.ndarray, gts: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """COCO's box IoU (``maskUtils.iou`` for boxes): ``dets`` (D, 4) and ``gts`` (G, 4) XYWH -> (D, G).

    For a crowd object (``crowd`` (G,) bool) the union is the detection's own area, so a detection inside
    a crowd region has IoU 1 with it."""
    d = np.asarray(dets, np.float64).reshape(-1, 4)
    g = np.asarray(gts, np.float64).reshape(-1, 4)
    iw = np.minimum(d[:, None, 0] + d[:, None, 2], g[None, :, 0] + g[None, :, 2]) - np.maximum(
        d[:, None, 0], g[None, :, 0]
    )
    ih = np.minimum(d[:, None, 1] + d[:, None, 3], g[None, :, 1] + g[None, :, 3]) - np.maximum(
        d[:, None, 1], g[None, :, 1]
    )
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    da = (d[:, 2] * d[:, 3])[:, None]
    union = np.where(np.asarray(crowd, bool)[None, :], da, da + (g[:, 2] * g[:, 3])[None, :] - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def match_image(
    det_boxes: np.ndarray,
    det_scores: np.ndarray,
    gt_boxes: np.ndarray,
    gt_crowd: np.ndarray,
    *,
    iou_thresh: float = IOU_THRESH,
    max_dets: int | None = MAX_DETS,
) -> tuple[np.ndarray, np.ndarray]:
    """COCO's greedy matching of one image and class at one IoU threshold (``evaluateImg``, area "all").

    Args:
        det_boxes: (D, 4) XYWH; det_scores: (D,).
        gt_boxes: (G, 4) XYWH; gt_crowd: (G,) bool (COCO's ``iscrowd``: its ``ignore``).
    Returns:
        ``matched`` (D,) int: the index of the object each detection took, -1 for none; and ``ignored``
        (D,) bool: detections that took a crowd object, or beyond the ``max_dets`` best (COCO drops those).
    """
    scores = np.asarray(det_scores, np.float64).reshape(-1)
    crowd = np.asarray(gt_crowd, bool).reshape(-1)
    matched = np.full(scores.shape[0], -1, np.int64)
    ignored = np.zeros(scores.shape[0], bool)
    order = np.argsort(-scores, kind="mergesort")  # COCO's stable descending order
    if max_dets is not None:
        ignored[order[max_dets:]] = True
        order = order[:max_dets]
    if crowd.size == 0 or order.size == 0:
        return matched, ignored
    ious = box_iou_xywh(np.asarray(det_boxes)[order], gt_boxes, crowd)
    taken = np.zeros(crowd.shape[0], bool)
    iou_min = min(iou_thresh, 1 - 1e-10)
    for row, d in enumerate(order):
        free = (~taken | crowd) & (ious[row] >= iou_min)
        # COCO visits non-crowd objects first and stops at the crowd ones once it holds a match, so a
        # non-crowd object wins over any crowd one; among equals, the highest IoU (first on a tie).
        for group in (free & ~crowd, free & crowd):
            if group.any():
                g = int(np.argmax(np.where(group, ious[row], -1.0)))
                matched[d] = g
                ignored[d] = bool(crowd[g])
                taken[g] = True
                break
    return matched, ignored


@dataclass(frozen=True)
class Matching:
    """Every val detection matched to the objects of its own class at IoU 0.5 (COCO's rules).

    Arrays over the N input detections (in input order): ``category_id`` (N,), ``scores`` (N,), ``tp``
    (N,) bool, ``ignored`` (N,) bool (took a crowd object, or on an image outside the evaluated set).
    ``num_gt``: non-crowd objects per category id (every category of the ground truth, 0 included).
    """

    category_id: np.ndarray
    scores: np.ndarray
    tp: np.ndarray
    ignored: np.ndarray
    num_gt: dict[int, int]

    def of_class(self, cat: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, tp) of the counted (not ignored) detections of ``cat``, by descending score."""
        keep = (self.category_id == cat) & ~self.ignored
        s, t = self.scores[keep], self.tp[keep]
        order = np.argsort(-s, kind="mergesort")
        return s[order], t[order]


def _group(
    gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]], img_ids: Iterable[int] | None
) -> tuple[set[int], dict[tuple[int, int], list[int]], dict[tuple[int, int], list[dict[str, Any]]]]:
    images = {int(i["id"]) for i in gt["images"]} if img_ids is None else {int(i) for i in img_ids}
    dets_by: dict[tuple[int, int], list[int]] = defaultdict(list)
    for n, d in enumerate(detections):
        if int(d["image_id"]) in images:
            dets_by[int(d["image_id"]), int(d["category_id"])].append(n)
    gts_by: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for a in gt.get("annotations", []):
        if int(a["image_id"]) in images:
            gts_by[int(a["image_id"]), int(a["category_id"])].append(a)
    return images, dets_by, gts_by


def match_detections(
    gt: Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
    *,
    img_ids: Iterable[int] | None = None,
    iou_thresh: float = IOU_THRESH,
) -> Matching:
    """:func:`match_image` over every image and class of a COCO ground truth dict.

    ``detections``: COCO results records (``image_id``, ``category_id``, ``bbox`` XYWH, ``score``).
    ``img_ids`` restricts the evaluation to those images, as ``coco_evaluate``'s does."""
    _, dets_by, gts_by = _group(gt, detections, img_ids)
    n = len(detections)
    cats = np.fromiter((int(d["category_id"]) for d in detections), np.int64, n)
    scores = np.fromiter((float(d["score"]) for d in detections), np.float64, n)
    boxes = np.asarray([d["bbox"] for d in detections], np.float64).reshape(-1, 4)
    tp = np.zeros(n, bool)
    ignored = np.ones(n, bool)  # detections on images outside the set stay ignored
    for key, idx in dets_by.items():
        objs = gts_by.get(key, [])
        ix = np.asarray(idx, np.int64)
        if not objs and ix.size <= MAX_DETS:  # nothing to take: all false positives (most groups, quickly)
            ignored[ix] = False
            continue
        matched, ign = match_image(
            boxes[ix],
            scores[ix],
            np.asarray([a["bbox"] for a in objs], np.float64).reshape(-1, 4),
            np.asarray([bool(a.get("iscrowd", 0)) for a in objs], bool),
            iou_thresh=iou_thresh,
        )
        tp[ix] = (matched >= 0) & ~ign
        ignored[ix] = ign
    num_gt = {int(c["id"]): 0 for c in gt["categories"]}
    for (_, cat), objs in gts_by.items():
        num_gt[cat] = num_gt.get(cat, 0) + sum(1 for a in objs if not a.get("iscrowd", 0))
    return Matching(category_id=cats, scores=scores, tp=tp, ignored=ignored, num_gt=num_gt)


# ----------------------------------------------------------------------------------------- thresholds


def _cuts(scores: np.ndarray, tp: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct ways to cut a descending score list: kept counts k (K,), TP among them (K,), and the
    threshold of each cut (halfway to the next lower score, or to ``floor`` after the last)."""
    s = np.asarray(scores, np.float64)
    last = np.flatnonzero(np.append(s[1:] != s[:-1], True)) if s.size else np.zeros(0, np.int64)
    kept = last + 1
    cum_tp = np.cumsum(np.asarray(tp, np.int64))[last] if s.size else np.zeros(0, np.int64)
    below = np.append(s[1:], min(floor, float(s[-1]) if s.size else floor))[last]
    return kept, cum_tp, (s[last] + below) / 2


def best_f1_threshold(
    scores: np.ndarray, tp: np.ndarray, num_gt: int, *, floor: float = 0.0
) -> tuple[float, float, float, float]:
    """The F1-optimal cut of one class: ``(f1, threshold, precision, recall)``.

    ``scores`` (D,) descending and ``tp`` (D,) bool of the class's counted detections, ``num_gt`` its
    non-crowd objects (> 0). F1 = 2 TP / (kept + num_gt). On a tie the higher threshold wins (the same F1
    with fewer detections); with F1 0 everywhere that is :data:`KEEP_NOTHING`."""
    if num_gt <= 0:
        raise ValueError(f"best_f1_threshold needs num_gt > 0, got {num_gt}")
    kept, cum_tp, thr = _cuts(scores, tp, floor)
    f1 = np.concatenate([[0.0], 2.0 * cum_tp / (kept + num_gt)])
    i = int(np.argmax(f1))  # first maximum: the fewest detections
    if i == 0:
        return 0.0, KEEP_NOTHING, 0.0, 0.0
    return float(f1[i]), float(thr[i - 1]), float(cum_tp[i - 1] / kept[i - 1]), float(cum_tp[i - 1] / num_gt)


def precision_target_threshold(
    scores: np.ndarray, tp: np.ndarray, num_gt: int, target: float, *, floor: float = 0.0
) -> tuple[float, float, float]:
    """The lowest threshold of one class whose precision is >= ``target``: ``(threshold, precision,
    recall)``; ``(KEEP_NOTHING, 0, 0)`` when no cut reaches it. Arguments as :func:`best_f1_threshold`."""
    if num_gt <= 0:
        raise ValueError(f"precision_target_threshold needs num_gt > 0, got {num_gt}")
    kept, cum_tp, thr = _cuts(scores, tp, floor)
    ok = np.flatnonzero(cum_tp >= target * kept - 1e-12)  # precision >= target without a division
    if ok.size == 0:
        return KEEP_NOTHING, 0.0, 0.0
    i = int(ok[-1])
    return float(thr[i]), float(cum_tp[i] / kept[i]), float(cum_tp[i] / num_gt)


@dataclass(frozen=True)
class ClassOperatingPoint:
    """One class's operating points. ``f1`` in [0, 1] (-1: no object of the class in val), ``threshold``
    its F1-optimal threshold with ``precision`` and ``recall`` there; ``precision_threshold`` the lowest
    threshold reaching the precision target, with ``target_precision`` and ``target_recall`` there."""

    f1: float
    threshold: float
    precision: float
    recall: float
    precision_threshold: float
    target_precision: float
    target_recall: float
    num_gt: int
    num_detections: int


@dataclass(frozen=True)
class OperatingPoints:
    """Per category id, the chosen thresholds (``classes``), and the target they were chosen for."""

    classes: dict[int, ClassOperatingPoint]
    precision_target: float
    floor: float

    def f1_thresholds(self) -> dict[int, float]:
        return {c: p.threshold for c, p in self.classes.items()}

    def checkpoint_entry(self) -> dict[str, Any]:
        """The checkpoint's ``"thresholds"`` value: ``{"f1": {"<category_id>": float}, "precision":
        {"<category_id>": float}, "precision_target": float}`` (string keys, plain floats: loads with
        ``torch.load(weights_only=True)`` and is JSON as it stands)."""
        return {
            "f1": {str(c): float(p.threshold) for c, p in self.classes.items()},
            "precision": {str(c): float(p.precision_threshold) for c, p in self.classes.items()},
            "precision_target": float(self.precision_target),
        }


def choose_thresholds(
    matching: Matching, *, precision_target: float = 0.9, floor: float = 0.0
) -> OperatingPoints:
    """Both operating points of every category of the matching (see the module docstring).

    ``floor``: the post-process score threshold the detections were made with (every score is above it);
    the threshold of a class without objects, and the lower end of the last cut."""
    if not 0.0 < precision_target <= 1.0:
        raise ValueError(f"precision_target must be in (0, 1], got {precision_target}")
    out: dict[int, ClassOperatingPoint] = {}
    for cat in sorted(matching.num_gt):
        s, t = matching.of_class(cat)
        n = matching.num_gt[cat]
        if n == 0:
            out[cat] = ClassOperatingPoint(-1.0, floor, 0.0, 0.0, floor, 0.0, 0.0, 0, int(s.size))
            continue
        f1, thr, p, r = best_f1_threshold(s, t, n, floor=floor)
        pthr, pp, pr = precision_target_threshold(s, t, n, precision_target, floor=floor)
        out[cat] = ClassOperatingPoint(f1, thr, p, r, pthr, pp, pr, n, int(s.size))
    return OperatingPoints(classes=out, precision_target=float(precision_target), floor=float(floor))


@dataclass(frozen=True)
class ClassCurve:
    """Precision, recall and F1 of one class against the confidence threshold (kept: score >= t):
    ``confidence`` (P,) in [0, 1], ``precision`` / ``recall`` / ``f1`` (P,) (precision 1 where nothing is
    kept, the convention of PR curves), ``num_gt`` > 0."""

    confidence: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    num_gt: int


def class_curve(scores: np.ndarray, tp: np.ndarray, num_gt: int, num_points: int = 201) -> ClassCurve:
    """:class:`ClassCurve` of one class's counted detections (``scores`` descending, ``tp`` bool)."""
    conf = np.linspace(0.0, 1.0, num_points)
    s = np.asarray(scores, np.float64)
    kept = np.searchsorted(-s, -conf, side="right")  # detections with score >= conf
    cum = np.concatenate([[0], np.cumsum(np.asarray(tp, np.int64))])[kept]
    precision = np.where(kept > 0, cum / np.maximum(kept, 1), 1.0)
    recall = cum / num_gt
    f1 = 2.0 * cum / (kept + num_gt)
    return ClassCurve(conf, precision, recall, f1, int(num_gt))


def class_curves(matching: Matching, num_points: int = 201) -> dict[int, ClassCurve]:
    """:func:`class_curve` of every category with objects in val."""
    return {
        c: class_curve(*matching.of_class(c), n, num_points)
        for c, n in sorted(matching.num_gt.items())
        if n > 0
    }


@dataclass(frozen=True)
class ValDetections:
    """The val detections of one eval, matched, with the thresholds chosen on them: what the eval reports
    (:attr:`points`) and what the error-analysis pictures draw. ``gt`` a COCO dict, ``detections`` COCO
    results records (original category ids, XYWH in original pixels), ``img_ids`` the evaluated images."""

    gt: Mapping[str, Any]
    detections: Sequence[Mapping[str, Any]]
    img_ids: list[int]
    matching: Matching
    points: OperatingPoints

    def errors(self) -> ErrorAnalysis:
        """:func:`error_analysis` at the F1-optimal thresholds."""
        return error_analysis(self.gt, self.detections, self.points.f1_thresholds(), img_ids=self.img_ids)

    def curves(self, num_points: int = 201) -> dict[int, ClassCurve]:
        return class_curves(self.matching, num_points)


def review_val_detections(
    gt: Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
    img_ids: Iterable[int],
    *,
    precision_target: float,
    floor: float,
) -> ValDetections:
    """Match ``detections`` on ``img_ids`` to ``gt`` at IoU 0.5 and choose both thresholds per class."""
    ids = sorted({int(i) for i in img_ids})
    matching = match_detections(gt, detections, img_ids=ids)
    points = choose_thresholds(matching, precision_target=precision_target, floor=floor)
    return ValDetections(gt, detections, ids, matching, points)


# ----------------------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class FalsePositive:
    """A kept detection that found no object of its class: ``detection`` its index in the input list;
    ``true_category`` the category id of the other-class object it was matched to (a confusion) or None;
    ``kind`` the error in TIDE's terms (Bolya et al. 2020): ``"confusion"`` (IoU >= 0.5 with an object of
    another class), ``"duplicate"`` (IoU >= 0.5 with an object of its class a higher score already took),
    ``"localisation"`` (best IoU with an object of its class in [0.1, 0.5)) or ``"background"`` (the rest).
    All but confusions sit in the confusion matrix's background row."""

    detection: int
    true_category: int | None
    kind: str = "background"


@dataclass(frozen=True)
class Miss:
    """An object no kept detection of its class found: ``annotation`` the GT annotation dict;
    ``predicted_category`` the category a kept other-class detection gave it, or None (not detected)."""

    annotation: Mapping[str, Any]
    predicted_category: int | None


@dataclass(frozen=True)
class ErrorAnalysis:
    """The detections kept at per-class thresholds, against the objects, at IoU 0.5.

    ``matrix`` (K + 1, K + 1) int64: rows the true class (``cat_ids`` order, then background), columns the
    predicted class (same order, then background). The diagonal holds the true positives (COCO's
    same-class matching, so row sums minus background equal the objects found); [i, j] with i != j an
    object of class i found only by a detection of class j (the two matched class-agnostically among what
    is left); the last column the objects nobody found; the last row the detections of nothing; [K, K] is
    0. Crowd objects and the detections they take are left out. ``false_positives`` and ``misses`` list the
    off-diagonal entries one by one."""

    cat_ids: list[int]
    thresholds: dict[int, float]
    matrix: np.ndarray
    false_positives: list[FalsePositive] = field(default_factory=list)
    misses: list[Miss] = field(default_factory=list)


def error_analysis(
    gt: Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
    thresholds: Mapping[int, float],
    *,
    img_ids: Iterable[int] | None = None,
    iou_thresh: float = IOU_THRESH,
) -> ErrorAnalysis:
    """The confusion matrix, false positives and misses of ``detections`` (COCO results records) kept at
    ``thresholds`` (category id -> threshold; a detection is kept when its score is >= its class's
    threshold; a class not in the dict keeps everything) against ``gt`` (a COCO dict).

    Per image: first each class on its own with COCO's rules (:func:`match_image`): the true positives;
    then what is left, detections greedily by descending score against the remaining non-crowd objects of
    any class at IoU >= ``iou_thresh``: the confusions; the rest is background."""
    cat_ids = sorted(int(c["id"]) for c in gt["categories"])
    col = {c: i for i, c in enumerate(cat_ids)}
    bg = len(cat_ids)
    matrix = np.zeros((bg + 1, bg + 1), np.int64)
    images, dets_by, gts_by = _group(gt, detections, img_ids)
    kept_by: dict[int, list[int]] = defaultdict(list)
    for (img, cat), idx in dets_by.items():
        t = thresholds.get(cat, -np.inf)
        kept_by[img].extend(i for i in idx if float(detections[i]["score"]) >= t)
    objs_by: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for (img, _), objs in gts_by.items():
        objs_by[img].extend(objs)
    false_positives: list[FalsePositive] = []
    misses: list[Miss] = []
    for img in sorted(images):
        dets = sorted(kept_by.get(img, []), key=lambda i: -float(detections[i]["score"]))
        objs = objs_by.get(img, [])
        left_dets, left_objs = _same_class_pass(detections, dets, objs, matrix, col)
        found = _cross_class_pass(detections, left_dets, objs, left_objs, iou_thresh)
        found_by = {g: i for i, g in found.items()}
        for i in left_dets:
            true = int(objs[found[i]]["category_id"]) if i in found else None
            matrix[bg if true is None else col[true], col[int(detections[i]["category_id"])]] += 1
            kind = "confusion" if true is not None else _background_kind(detections[i], objs, iou_thresh)
            false_positives.append(FalsePositive(i, true, kind))
        for g in left_objs:
            det = found_by.get(g)
            if det is None:
                matrix[col[int(objs[g]["category_id"])], bg] += 1
            misses.append(Miss(objs[g], None if det is None else int(detections[det]["category_id"])))
    return ErrorAnalysis(
        cat_ids, {int(k): float(v) for k, v in thresholds.items()}, matrix, false_positives, misses
    )


def _same_class_pass(
    detections: Sequence[Mapping[str, Any]],
    dets: list[int],
    objs: list[Mapping[str, Any]],
    matrix: np.ndarray,
    col: Mapping[int, int],
) -> tuple[list[int], list[int]]:
    """COCO's per-class matching of one image's kept detections (indices ``dets``) to its objects ``objs``:
    adds the true positives to the diagonal of ``matrix``; returns the detections left (neither true
    positive nor taken by a crowd object) and the non-crowd objects left (indices into ``objs``)."""
    left_dets: list[int] = []
    used: set[int] = set()
    for cat in sorted({int(detections[i]["category_id"]) for i in dets}):
        mine = [i for i in dets if int(detections[i]["category_id"]) == cat]
        obj_idx = [g for g, a in enumerate(objs) if int(a["category_id"]) == cat]
        matched, ignored = match_image(
            np.asarray([detections[i]["bbox"] for i in mine], np.float64),
            np.asarray([float(detections[i]["score"]) for i in mine]),
            np.asarray([objs[g]["bbox"] for g in obj_idx], np.float64).reshape(-1, 4),
            np.asarray([bool(objs[g].get("iscrowd", 0)) for g in obj_idx], bool),
            max_dets=None,
        )
        for i, m, ign in zip(mine, matched, ignored, strict=True):
            if ign:
                continue
            if m >= 0:
                matrix[col[cat], col[cat]] += 1
                used.add(obj_idx[m])
            else:
                left_dets.append(i)
    left_objs = [g for g, a in enumerate(objs) if g not in used and not a.get("iscrowd", 0)]
    left_dets.sort(key=lambda i: -float(detections[i]["score"]))
    return left_dets, left_objs


BACKGROUND_IOU = 0.1  # TIDE's background threshold: below it a detection overlaps nothing of its class


def _background_kind(det: Mapping[str, Any], objs: Sequence[Mapping[str, Any]], iou_thresh: float) -> str:
    """``"duplicate"``, ``"localisation"`` or ``"background"`` for an unmatched detection of no other
    class's object, by its best IoU with the non-crowd objects of its own class (see :class:`FalsePositive`)."""
    own = [
        a["bbox"]
        for a in objs
        if int(a["category_id"]) == int(det["category_id"]) and not a.get("iscrowd", 0)
    ]
    if not own:
        return "background"
    best = float(
        box_iou_xywh(
            np.asarray([det["bbox"]], np.float64), np.asarray(own, np.float64), np.zeros(len(own), bool)
        ).max()
    )
    return "duplicate" if best >= iou_thresh else "localisation" if best >= BACKGROUND_IOU else "background"


def _cross_class_pass(
    detections: Sequence[Mapping[str, Any]],
    left_dets: list[int],
    objs: list[Mapping[str, Any]],
    left_objs: list[int],
    iou_thresh: float,
) -> dict[int, int]:
    """The leftovers of one image matched class-agnostically: each detection (``left_dets``, by descending
    score) takes the free object (``left_objs``) of highest IoU >= ``iou_thresh``. Returns detection index
    -> object index (into ``objs``)."""
    if not left_dets or not left_objs:
        return {}
    ious = box_iou_xywh(
        np.asarray([detections[i]["bbox"] for i in left_dets], np.float64),
        np.asarray([objs[g]["bbox"] for g in left_objs], np.float64),
        np.zeros(len(left_objs), bool),
    )
    free = np.ones(len(left_objs), bool)
    found: dict[int, int] = {}
    for row, i in enumerate(left_dets):
        ok = free & (ious[row] >= iou_thresh)
        j = int(np.argmax(np.where(ok, ious[row], -1.0)))
        if ok[j]:
            free[j] = False
            found[i] = left_objs[j]
    return found
