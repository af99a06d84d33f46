"""COCO box AP with pycocotools semantics.

Two interchangeable backends: ``faster_coco_eval`` (C++; the default, since COCO eval runs at every eval
period) and the reference ``pycocotools``. Both return the same 12 stats on the same input (tested).
Detections come in the COCO results format: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``
with original category ids and boxes in original image pixels.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Literal

import numpy as np

Backend = Literal["faster_coco_eval", "pycocotools"]

# The 12 numbers COCOeval.summarize() prints, in its order, under the names we report everywhere.
STAT_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip


def _classes(backend: Backend) -> tuple[type, type]:
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    raise ValueError(f"unknown COCO eval backend {backend!r}; use 'faster_coco_eval' or 'pycocotools'")


def _quiet(*_args: Any, **_kwargs: Any) -> None:
    pass


def _load_gt(coco_cls: type, gt: dict[str, Any], backend: Backend) -> Any:
    api = coco_cls(print_function=_quiet) if backend == "faster_coco_eval" else coco_cls()
    # COCOeval adds an "ignore" key to every GT annotation dict it evaluates; nothing in either backend
    # changes a bbox list in place. A copy of each annotation dict keeps the caller's `gt` untouched at a
    # fraction of a deepcopy's cost (tested: the caller's dicts stay equal to a deepcopy taken before).
    api.dataset = {**gt, "annotations": [dict(a) for a in gt.get("annotations", [])]}
    api.dataset.setdefault("info", {})
    api.dataset.setdefault("licenses", [])
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def coco_evaluate(
    gt: dict[str, Any],
    detections: list[dict[str, Any]],
    *,
    backend: Backend = "faster_coco_eval",
    img_ids: list[int] | None = None,
    return_eval: bool = False,
) -> dict[str, float] | tuple[dict[str, float], Any]:
    """The 12 COCO box stats (``AP``, ``AP50``, ... ``ARl``) of `detections` against `gt` (a COCO dict).

    With no detections every stat is 0.0 (pycocotools refuses an empty result list). `img_ids` restricts
    the evaluation to those images (default: all images of `gt`). `return_eval` also returns the COCOeval
    object (its ``eval["precision"]`` feeds the PR-curve plots).
    """
    coco_cls, eval_cls = _classes(backend)
    if not detections:
        stats = {k: 0.0 for k in STAT_NAMES}
        return (stats, None) if return_eval else stats
    coco_gt = _load_gt(coco_cls, gt, backend)
    with contextlib.redirect_stdout(io.StringIO()):
        # loadRes adds area/id/iscrowd/segmentation to each result dict: copy the dicts, one level deep.
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])
        kw = {"print_function": _quiet} if backend == "faster_coco_eval" else {}
        ev = eval_cls(coco_gt, coco_dt, iouType="bbox", **kw)
        if img_ids is not None:
            ev.params.imgIds = sorted(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {name: float(v) for name, v in zip(STAT_NAMES, np.asarray(ev.stats)[:12], strict=True)}
    return (stats, ev) if return_eval else stats


def format_stats(stats: dict[str, float]) -> str:
    """A small fixed-width table of the 12 stats, as people read them (in percent)."""
    rows = [
        ("AP", "AP@[.50:.95]"), ("AP50", "AP@.50"), ("AP75", "AP@.75"),
        ("APs", "AP small"), ("APm", "AP medium"), ("APl", "AP large"),
        ("AR1", "AR@1"), ("AR10", "AR@10"), ("AR100", "AR@100"),
        ("ARs", "AR small"), ("ARm", "AR medium"), ("ARl", "AR large"),
    ]  # fmt: skip
    lines = [f"{'metric':<14}{'value':>8}"]
    for key, label in rows:
        v = stats.get(key, float("nan"))
        lines.append(f"{label:<14}{100.0 * v:>8.2f}" if v >= 0 else f"{label:<14}{'n/a':>8}")
    return "\n".join(lines)
