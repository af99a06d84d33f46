"""Evaluation, one code path: detections in original pixels -> COCO results -> COCO box AP (pycocotools
semantics), for training-time eval on every rank (:func:`evaluate_distributed`) and for
``ray-retina eval`` of a checkpoint (:func:`evaluate_checkpoint`). Both detect with :func:`detect`, whose
post-processor maps boxes back to original pixels (``PostProcessor(..., target_sizes=...)``), so the
``val/AP`` a run reports and ``ray-retina eval`` of its checkpoint agree to the last digit (tested).

Each eval also chooses per-class operating thresholds on its val detections (``operating_point``: the
F1-optimal score threshold and the lowest reaching ``eval.precision_target``, at IoU 0.5), reported as
``val/F1/<class>`` and ``val/threshold/<class>`` and returned in :class:`EvalResult` for the checkpoint.

Two interchangeable backends: ``faster_coco_eval`` (C++; the default, since COCO eval runs at every eval
period) and the reference ``pycocotools``. Both return the same 12 stats on the same input (tested).
Detections come in the COCO results format: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``
with original category ids and boxes in original image pixels.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from ray_retina.checkpoint import load_checkpoint_state
from ray_retina.engine.restore import model_from_state
from ray_retina.engine.tta import detect_tta
from ray_retina.model import build_postprocessor
from ray_retina.operating_point import ValDetections, review_val_detections

if TYPE_CHECKING:
    from ray_retina.config import Config, TTASection

logger = logging.getLogger(__name__)

Backend = Literal["faster_coco_eval", "pycocotools"]

# The 12 numbers COCOeval.summarize() prints, in its order, under the names we report everywhere.
STAT_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


def _classes(backend: Backend) -> tuple[type, type]:
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster  # deferred: only the backend asked for loads

        return COCO, COCOeval_faster
    if backend == "pycocotools":
        # deferred: only the backend asked for loads
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
        ("AP", "AP@[.50:.95]"),
        ("AP50", "AP@.50"),
        ("AP75", "AP@.75"),
        ("APs", "AP small"),
        ("APm", "AP medium"),
        ("APl", "AP large"),
        ("AR1", "AR@1"),
        ("AR10", "AR@10"),
        ("AR100", "AR@100"),
        ("ARs", "AR small"),
        ("ARm", "AR medium"),
        ("ARl", "AR large"),
    ]
    lines = [f"{'metric':<14}{'value':>8}"]
    for key, label in rows:
        v = stats.get(key, float("nan"))
        lines.append(f"{label:<14}{100.0 * v:>8.2f}" if v >= 0 else f"{label:<14}{'n/a':>8}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- per class


def metric_safe(name: str) -> str:
    """A class name as an MLflow metric-key component (letters, digits, ``_ - . space`` kept; rest ``_``)."""
    return re.sub(r"[^A-Za-z0-9_\-. ]", "_", str(name)).strip() or "_"


def per_class_ap(coco_eval: Any, names: Mapping[int, str] | None = None) -> dict[int, dict[str, float]]:
    """Per-category ``{"AP", "AP50"}`` from a COCOeval after ``accumulate`` (the same object that gives
    ``val/AP``): precision[T, R, K, area=all, maxDets=100] averaged over the entries > -1 (COCO's own
    summarize rule), over all IoU thresholds (AP) or at IoU 0.5 (AP50); -1 for a category without GT."""
    if coco_eval is None:
        return {}
    precision = np.asarray(coco_eval.eval["precision"])  # (T, R, K, A, M)
    iou = np.asarray(coco_eval.params.iouThrs)
    t50 = int(np.argmin(np.abs(iou - 0.5)))
    out: dict[int, dict[str, float]] = {}
    for k, cat in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, 0, -1]
        p50 = p[t50]
        out[int(cat)] = {
            "AP": float(p[p > -1].mean()) if (p > -1).any() else -1.0,
            "AP50": float(p50[p50 > -1].mean()) if (p50 > -1).any() else -1.0,
        }
    return out


# Per-class entries -> metric key prefixes: AP and AP50 from the COCOeval, F1 and the F1-optimal threshold
# from the operating point (``operating_point``), all at ``val/<prefix>/<class name>``.
PER_CLASS_KEYS: tuple[tuple[str, str], ...] = (
    ("AP", "AP"),
    ("AP50", "AP50"),
    ("F1", "F1"),
    ("threshold", "threshold"),
)


def per_class_results(coco_eval: Any, val: ValDetections) -> dict[int, dict[str, float]]:
    """Per category id (every category of the ground truth): ``AP`` and ``AP50`` (:func:`per_class_ap`;
    absent when the model made no detection), ``F1`` (-1 without objects in val), ``threshold`` (F1-optimal)
    and ``precision_threshold`` (the lowest reaching the precision target)."""
    ap = per_class_ap(coco_eval)
    out: dict[int, dict[str, float]] = {}
    for cat, op in val.points.classes.items():
        out[cat] = {
            **ap.get(cat, {}),
            "F1": op.f1,
            "threshold": op.threshold,
            "precision_threshold": op.precision_threshold,
        }
    return out


def per_class_metrics(
    per_class: Mapping[int, Mapping[str, float]], names: Mapping[int, str]
) -> dict[str, float]:
    """``val/AP/<class name>``, ``val/AP50/<class name>``, ``val/F1/<class name>`` and
    ``val/threshold/<class name>`` (MLflow-safe names) of the entries each class has."""
    out: dict[str, float] = {}
    for cat, v in per_class.items():
        name = metric_safe(names.get(cat, str(cat)))
        out.update({f"val/{prefix}/{name}": float(v[key]) for key, prefix in PER_CLASS_KEYS if key in v})
    return out


def format_per_class(per_class: Mapping[int, Mapping[str, float]], names: Mapping[int, str]) -> str:
    """The per-class table people read: class, AP, AP50 and best F1 in percent, then the F1-optimal score
    threshold and the one reaching the precision target (n/a where a class has no value)."""
    width = max([5] + [len(names.get(c, str(c))) for c in per_class])
    lines = [f"{'class':<{width}}  {'AP':>6}  {'AP50':>6}  {'F1':>6}  {'thr F1':>6}  {'thr P':>6}"]
    for cat, v in per_class.items():
        cells = [f"{100 * v[k]:6.2f}" if v.get(k, -1) >= 0 else f"{'n/a':>6}" for k in ("AP", "AP50", "F1")]
        cells += [f"{v[k]:6.3f}" if k in v else f"{'n/a':>6}" for k in ("threshold", "precision_threshold")]
        lines.append(f"{names.get(cat, str(cat)):<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


@dataclass(frozen=True)
class EvalResult:
    """What one evaluation computed.

    ``metrics``: flat numbers (``evaluate_distributed``: ``val/...`` keys on every rank;
    ``evaluate_checkpoint``: the 12 ``STAT_NAMES`` plus ``num_images`` and ``skipped_images``).
    ``per_class``: :func:`per_class_results`. ``thresholds``: the checkpoint's ``"thresholds"`` entry
    (``OperatingPoints.checkpoint_entry``: ``{"f1": {"<category_id>": float}, "precision": {...},
    "precision_target": float}``). ``coco_eval`` (the COCOeval after ``accumulate``, None without
    detections) and ``val`` (the matched detections, for the pictures) are set where COCO AP was computed
    (rank 0) and None elsewhere."""

    metrics: dict[str, float]
    per_class: dict[int, dict[str, float]]
    thresholds: dict[str, Any]
    coco_eval: Any = None
    val: ValDetections | None = None


# ----------------------------------------------------------------------------------------- detection

# optim.amp -> the autocast dtype that training, eval, predict and serving run the model under (None: fp32).
AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_context(
    device: torch.device, amp_dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[Any]:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def model_inputs(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float on ``device`` (channels_last when the model runs so)."""
    x = images.to(device, non_blocking=True).float()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def detect(
    model: torch.nn.Module,
    postprocessor: Any,
    batch: Mapping[str, torch.Tensor],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    tta: TTASection | None = None,
    size_divisibility: int = 128,
) -> list[dict[str, torch.Tensor]]:
    """Detections of a collated batch, boxes XYXY in ORIGINAL image pixels (clipped), labels 0..K-1.

    The one detection path of training eval, ``ray-retina eval``, ``predict`` and the exported model: the
    model (eval mode, under the run's autocast) and the post-processor with ``target_sizes``. With
    ``tta`` enabled (the config's ``eval.tta``) every view's candidates are merged before one NMS
    (``engine/tta.py``; other scales are padded to ``size_divisibility``, the config's data value)."""
    was_training = model.training
    model.eval()

    def forward(images: torch.Tensor) -> Any:
        with amp_context(device, amp_dtype):
            return model(model_inputs(images, device, channels_last))

    if tta is not None and tta.enabled:
        dets = detect_tta(
            forward,
            postprocessor,
            batch,
            scales=tta.scales,
            flip=tta.flip,
            size_divisibility=size_divisibility,
            device=device,
        )
    else:
        dets = postprocessor(
            forward(batch["images"]), batch["image_sizes"].to(device), batch["orig_sizes"].to(device)
        )
    model.train(was_training)
    return dets


def coco_records(
    image_id: int, boxes: np.ndarray, scores: np.ndarray, category_ids: np.ndarray
) -> list[dict[str, Any]]:
    """COCO results records of one image: ``boxes`` (D, 4) XYXY in original pixels -> ``bbox`` XYWH rounded
    to 1e-3, ``score`` rounded to 1e-5, original ``category_id``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return [
        {
            "image_id": int(image_id),
            "category_id": int(c),
            "bbox": [
                round(float(b[0]), 3),
                round(float(b[1]), 3),
                round(float(b[2] - b[0]), 3),
                round(float(b[3] - b[1]), 3),
            ],
            "score": round(float(s), 5),
        }
        for b, s, c in zip(
            boxes, np.asarray(scores).reshape(-1), np.asarray(category_ids).reshape(-1), strict=True
        )
    ]


def detections_to_coco(
    dets: Sequence[Mapping[str, torch.Tensor]], image_ids: Iterable[int], cat_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """COCO results records of per-image detections (boxes XYXY in original pixels, labels 0..K-1 standing
    for ``cat_ids``)."""
    lookup = np.asarray(cat_ids, dtype=np.int64)
    results: list[dict[str, Any]] = []
    for image_id, d in zip(image_ids, dets, strict=True):
        results.extend(
            coco_records(
                image_id,
                d["boxes"].detach().double().cpu().numpy(),
                d["scores"].detach().float().cpu().numpy(),
                lookup[d["labels"].cpu().numpy().reshape(-1)],
            )
        )
    return results


# ----------------------------------------------------------------------------------------- distributed


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def broadcast(obj: Any) -> Any:
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_rank0(items: list[Any]) -> list[Any]:
    if not _distributed():
        return items
    parts: list[list[Any]] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None  # type: ignore[list-item]
    dist.gather_object(items, parts, dst=0)
    return [x for p in parts for x in p] if parts is not None else []


def names_by_id(categories: Sequence[Mapping[str, Any]]) -> dict[int, str]:
    """id -> name of a COCO ``categories`` list (a category without a name is named by its id)."""
    return {int(c["id"]): str(c.get("name", c["id"])) for c in categories}


def score_detections(
    gt: dict[str, Any],
    detections: list[dict[str, Any]],
    img_ids: Iterable[int],
    cfg: Config,
    *,
    backend: Backend | None = None,
) -> tuple[dict[str, float], EvalResult]:
    """COCO AP and the operating points of ``detections`` on ``img_ids``: the 12 stats (``STAT_NAMES``
    keys) and an :class:`EvalResult` without ``metrics`` yet (per class, thresholds, COCOeval, matches).
    ``backend`` defaults to the config's ``train.eval_backend``; the precision target is
    ``eval.precision_target``, the floor of the thresholds ``postprocess.score_thresh``."""
    ids = sorted({int(i) for i in img_ids})
    stats, ev = coco_evaluate(
        gt, detections, backend=backend or cfg.train.eval_backend, img_ids=ids, return_eval=True
    )
    val = review_val_detections(
        gt,
        detections,
        ids,
        precision_target=cfg.eval.precision_target,
        floor=cfg.postprocess.score_thresh,
    )
    result = EvalResult({}, per_class_results(ev, val), val.points.checkpoint_entry(), ev, val)
    return stats, result


def evaluate_distributed(
    engine: Any,
    cfg: Config,
    plan: Sequence[tuple[str, int]],
    gt: dict[str, Any] | None,
    rank: int,
    world: int,
) -> EvalResult:
    """Each rank detects (``engine.predict_all``, an ``engine.loop.Engine``) on its share of the val plan
    (``datasets.eval_plan``); rank 0 computes COCO AP and the per-class operating points on the union.

    Returns on every rank (broadcast) the metrics: the 12 stats keyed ``val/AP`` ... ``val/ARl``, per class
    ``val/AP/<name>``, ``val/AP50/<name>``, ``val/F1/<name>`` and ``val/threshold/<name>``,
    ``val/num_images`` (images in the AP), ``val/skipped_images`` (val images that did not decode: kept in
    the AP with no detections, so they count against it, never silently out of the denominator) and
    ``val/num_detections``; and the per-class results and thresholds (the checkpoint's ``"thresholds"``).
    The COCOeval and the matched detections (for the pictures) on rank 0 only."""
    # deferred: the served model imports this module for detect() and needs no Ray Data stream
    from ray_retina.data.datasets import (
        iter_eval_batches,  # deferred: serving imports this module for detect()
    )

    mine = list(plan[rank::world])
    dets: list[dict[str, Any]] = []
    img_ids: list[int] = []
    skipped: list[int] = []
    if mine:
        dets, img_ids = engine.predict_all(iter_eval_batches(mine, cfg.data, skipped=skipped))
    parts = gather_to_rank0([(dets, img_ids, skipped)])  # one gather per eval: every rank's three lists
    all_dets = [d for p in parts for d in p[0]]
    all_ids = [i for p in parts for i in (*p[1], *p[2])]
    all_skipped = [i for p in parts for i in p[2]]
    local = EvalResult({}, {}, {})
    if rank == 0:
        assert gt is not None
        raw, local = score_detections(gt, all_dets, all_ids, cfg)
        stats = {f"val/{k}": v for k, v in raw.items()}
        stats.update(per_class_metrics(local.per_class, names_by_id(gt["categories"])))
        stats["val/num_images"] = float(len(set(all_ids)))
        stats["val/skipped_images"] = float(len(set(all_skipped)))
        stats["val/num_detections"] = float(len(all_dets))
        local = EvalResult(stats, local.per_class, local.thresholds, local.coco_eval, local.val)
    metrics, per_class, thresholds = broadcast((local.metrics, local.per_class, local.thresholds))
    return EvalResult(metrics, per_class, thresholds, local.coco_eval, local.val)


# ----------------------------------------------------------------------------------------- offline


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str],
    shards: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    backend: Backend | None = None,
    plots_dir: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    max_images: int | None = None,
    tta: TTASection | None = None,
) -> EvalResult:
    """COCO box AP and operating points of a checkpoint on a val shard set. ``metrics``: the 12 stats keyed
    as ``STAT_NAMES`` (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl), each in [0, 1], or
    -1 where COCO has no data (e.g. no small objects), plus ``num_images`` and ``skipped_images``;
    ``per_class``, ``thresholds``, ``coco_eval`` and ``val`` as :class:`EvalResult` says.

    Runs in this process (no Ray), through the same :func:`detect` and COCO eval as training: the same
    test-time preprocessing, autocast, post-process and back-mapping. ``checkpoint``: a file, a checkpoint
    directory, or a run directory (its best checkpoint by val/AP). ``batch_size`` defaults to the
    config's ``data.batch_size`` (as in training eval: a different batch pads differently and can move AP
    in the last digit); ``backend`` to the config's ``train.eval_backend``; ``max_images`` evaluates the
    first N images only. ``tta``: the test-time augmentation (None: the checkpoint config's ``eval.tta``).
    With ``plots_dir`` it also writes the run's pictures (``report.write_run_pictures``), the error
    analysis at the F1-optimal thresholds included.
    """
    # One piece: `ray-retina eval` from a checkpoint path to its result, the same steps as training's eval
    # pass (model, plan, stream, detect, score, pictures) read in order.
    # Deferred: the served model imports this module for detect() and needs no shards or Ray Data stream.
    from ray_retina.data.datasets import eval_plan, iter_eval_batches
    from ray_retina.data.shards import coco_gt_from_shards, read_manifest

    device = torch.device(device)
    model, cfg, cat_ids = model_from_state(load_checkpoint_state(checkpoint), device)
    postprocess = build_postprocessor(cfg)
    manifest = read_manifest(shards)
    gt = coco_gt_from_shards(shards)
    shard_cats = sorted(int(c["id"]) for c in manifest["categories"])
    # GT labels are the model's labels when the shards' categories are among the checkpoint's; otherwise
    # they are only needed to read the shards, and the pictures that compare them with predictions are off.
    same_labels = set(shard_cats) <= set(cat_ids)
    if not same_labels:
        logger.warning(
            "categories of %s %s are not all among the checkpoint's %s",
            os.fspath(shards),
            shard_cats,
            cat_ids,
        )
    label_cats = sorted(cat_ids) if same_labels else shard_cats
    plan = eval_plan(shards, max_images)
    dets: list[dict[str, Any]] = []
    img_ids: list[int] = []
    skipped: list[int] = []
    amp = AMP_DTYPES[cfg.optim.amp]
    for batch in iter_eval_batches(
        plan, cfg.data, batch_size=batch_size, cat_ids=label_cats, skipped=skipped
    ):
        per_image = detect(
            model,
            postprocess,
            batch,
            device=device,
            amp_dtype=amp,
            channels_last=cfg.model.channels_last,
            tta=cfg.eval.tta if tta is None else tta,
            size_divisibility=cfg.data.size_divisibility,
        )
        ids = [int(i) for i in batch["image_id"]]
        img_ids.extend(ids)
        dets.extend(detections_to_coco(per_image, ids, cat_ids))
    if not img_ids:
        raise ValueError(f"{os.fspath(shards)}: no val image could be read")
    ids = sorted(set(img_ids) | set(skipped))
    raw, result = score_detections(gt, dets, ids, cfg, backend=backend)
    stats = {k: float(raw[k]) for k in STAT_NAMES}
    stats["num_images"] = float(len(ids))
    stats["skipped_images"] = float(len(set(skipped)))
    if plots_dir is not None:
        from ray_retina.report import write_run_pictures  # deferred: matplotlib only when pictures are asked

        written = write_run_pictures(
            model,
            postprocess,
            cfg,
            cat_ids,
            manifest["categories"],
            plan,
            result.coco_eval,
            Path(plots_dir),
            with_truth=same_labels,
            val=result.val,
        )
        logger.info("wrote %s", ", ".join(str(p) for p in written))
    return EvalResult(stats, result.per_class, result.thresholds, result.coco_eval, result.val)
