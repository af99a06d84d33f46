"""The pictures of a run: per-class PR curves, detections on val images, the error analysis at the chosen
thresholds (confusion matrix, F1/precision/recall vs confidence, the worst errors), the paper's Figure 4.

Written by rank 0 at the end of a run (logged to MLflow) and by ``ray-retina eval --plots``
(:func:`write_run_pictures`). This file gathers what the pictures show (runs the model, labels anchors,
computes the Figure 4 curves); the drawing itself is ``plots.py`` (matplotlib only, no torch).

Figure 4 (Lin et al. 2017, section 5.1, "Analysis of the Focal Loss"): take the logits of a trained model
on many anchors; separately for positive and for negative samples, compute FL with a given gamma, sort the
losses from lowest to highest and plot their cumulative sum normalised to 1 against the fraction of
samples. For positives the curves barely move with gamma; for negatives, a larger gamma puts nearly all the
loss on a small fraction of hard negatives (the curve stays near 0 and jumps at the end). A *sample* is one
binary classifier output, an (anchor, class) entry, as the sigmoid loss sees it: a positive is the entry of
a foreground anchor's own class; the negatives are every other entry of the non-ignored anchors (the K
entries of background anchors and the K - 1 other-class entries of foreground anchors). alpha multiplies
all positives (or all negatives) by one constant, so the normalised curves do not depend on it.
The math is the pure function :func:`focal_loss_cdf_data`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from ray_retina import plots
from ray_retina.data.datasets import iter_eval_batches
from ray_retina.data.decode import decode_image
from ray_retina.losses import sigmoid_focal_loss
from ray_retina.model import build_criterion
from ray_retina.operating_point import ErrorAnalysis, ValDetections
from ray_retina.uri import resolve_uri

__all__ = [
    "FIGURE4_GAMMAS",
    "figure4_from_model",
    "focal_loss_cdf",
    "focal_loss_cdf_data",
    "write_error_pictures",
    "write_run_pictures",
]

FIGURE4_GAMMAS: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)  # the paper's Figure 4 shows 0, .5, 1, 2
GRID_IMAGES = 16  # val images in the detection grid
FIGURE4_IMAGES = 16  # val images whose anchors feed Figure 4
GALLERY_ERRORS = 8  # worst false positives, and as many missed objects, in the error gallery
CROP_CONTEXT = 1.0  # a gallery crop reaches this many box sides beyond the error box (at least 32 px)

PathLike = str | os.PathLike[str]


# ----------------------------------------------------------------------------------------- Figure 4


def _cdf_at(losses: Tensor, x: np.ndarray) -> np.ndarray:
    """Sorted ascending, cumulative sum / total, read at the fractions ``x`` (linear between samples)."""
    n = losses.numel()
    if n == 0:
        return np.full(x.shape, np.nan)
    s = torch.sort(losses.double().flatten()).values
    c = torch.cumsum(s, 0)
    total = float(c[-1])
    if not total > 0:  # every loss is exactly 0 (saturated logits): the distribution is undefined
        return np.full(x.shape, np.nan)
    xs = np.concatenate([[0.0], np.arange(1, n + 1, dtype=np.float64) / n])
    ys = np.concatenate([[0.0], (c / total).numpy()])
    return np.interp(x, xs, ys)


def focal_loss_cdf_data(
    logits: Tensor,
    labels: Tensor,
    *,
    gammas: Iterable[float] = FIGURE4_GAMMAS,
    alpha: float = 0.25,
    num_points: int = 501,
) -> plots.FocalLossCDF:
    """The cumulative distributions of the normalised focal loss (the paper's Figure 4), as arrays.

    Args:
        logits: (N, K) classification logits of N anchors (any float dtype; computed in float64).
        labels: (N,) int in {-1 ignore, 0..K-1 class, K background}, as ``RetinaNetLoss.assign`` gives.
        gammas: the focusing exponents, one curve each (same logits for all).
        alpha: the alpha of FL; it scales each group by a constant, so the normalised curves ignore it.
        num_points: P, the evenly spaced fractions of samples the curves are read at.

    Samples are (anchor, class) entries; see the module docstring for positives and negatives.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"need logits (N, K) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2, got {num_points}")
    gammas = tuple(float(g) for g in gammas)
    if not gammas or any(g < 0 for g in gammas):
        raise ValueError(f"gammas must be a non-empty list of numbers >= 0, got {gammas}")
    k = logits.shape[1]
    labels = labels.long().cpu()
    if bool(((labels < -1) | (labels > k)).any()):
        raise ValueError(
            f"labels must be in {{-1, 0..{k - 1}, {k}}}, got values {labels.unique()[:8].tolist()}"
        )
    keep = labels >= 0
    x_all = logits.detach().cpu().double()[keep]
    lab = labels[keep]
    targets = torch.zeros_like(x_all)
    fg = lab < k
    targets[fg.nonzero(as_tuple=True)[0], lab[fg]] = 1.0
    is_pos = targets.bool()

    x = np.linspace(0.0, 1.0, num_points)
    pos_curves, neg_curves = [], []
    for g in gammas:
        fl = sigmoid_focal_loss(x_all, targets, alpha=alpha, gamma=g, reduction="none")
        pos_curves.append(_cdf_at(fl[is_pos], x))
        neg_curves.append(_cdf_at(fl[~is_pos], x))
    return plots.FocalLossCDF(
        gammas=gammas,
        x=x,
        positives=np.stack(pos_curves),
        negatives=np.stack(neg_curves),
        num_positives=int(is_pos.sum()),
        num_negatives=int((~is_pos).sum()),
    )


def focal_loss_cdf(
    logits: Tensor,
    labels: Tensor,
    *,
    out_path: PathLike,
    gamma: float | None = None,
    alpha: float = 0.25,
    gammas: Iterable[float] = FIGURE4_GAMMAS,
    title: str | None = None,
) -> Path:
    """Figure 4 of ``logits`` (N, K) and ``labels`` (N,) in {-1 ignore, 0..K-1 class, K background}, as a PNG.

    One curve per gamma in ``gammas`` plus the run's ``gamma`` (drawn thicker), all on the same logits: the
    curves of :func:`focal_loss_cdf_data`, drawn by ``plots.figure4``.
    """
    gs = sorted({float(g) for g in gammas} | ({float(gamma)} if gamma is not None else set()))
    data = focal_loss_cdf_data(logits, labels, gammas=gs, alpha=alpha)
    return plots.figure4(data, out_path, gamma=gamma, title=title)


@torch.no_grad()
def figure4_from_model(
    model: torch.nn.Module,
    criterion: Any,
    batches: Iterable[Mapping[str, Tensor]],
    gamma: float,
    alpha: float,
    out_path: PathLike,
    max_anchors: int = 200_000,
    *,
    gammas: Iterable[float] = FIGURE4_GAMMAS,
    seed: int = 0,
) -> Path:
    """Figure 4 of a trained model: run it on collated batches, label the anchors, draw the CDFs.

    ``batches``: dicts as ``RetinaCollate`` makes (``images`` (B, 3, H, W), ``gt_boxes`` (B, G, 4) XYXY,
    ``gt_labels`` (B, G) with -1 padding, ``gt_crowd`` optional). Anchors are labelled by the criterion's
    own matcher (``criterion.assign``: -1 ignore, 0..K-1 class, K background), so the samples are those
    the training loss sums. At most ``max_anchors`` anchors are kept: every foreground anchor, and a
    uniform random subset (seeded) of the others, which leaves the shape of each CDF unbiased.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    all_logits, all_labels = [], []
    try:
        for batch in batches:
            images = batch["images"].to(device).float()
            out = model(images)
            crowd = batch.get("gt_crowd")
            cls_labels, _, _ = criterion.assign(
                out.anchors,
                batch["gt_boxes"].to(device).float(),
                batch["gt_labels"].to(device),
                None if crowd is None else crowd.to(device),
            )
            k = out.cls_logits.shape[-1]
            all_logits.append(out.cls_logits.reshape(-1, k).float().cpu())
            all_labels.append(cls_labels.reshape(-1).cpu())
    finally:
        model.train(was_training)
    if not all_logits:
        raise ValueError("figure4_from_model: no batches")
    logits = torch.cat(all_logits)
    labels = torch.cat(all_labels)
    keep = labels >= 0
    logits, labels = logits[keep], labels[keep]
    num_classes = logits.shape[1]
    if labels.numel() > max_anchors:
        fg = (labels < num_classes).nonzero(as_tuple=True)[0]
        rest = (labels == num_classes).nonzero(as_tuple=True)[0]
        g = torch.Generator().manual_seed(seed)
        take = max(0, max_anchors - fg.numel())
        rest = rest[torch.randperm(rest.numel(), generator=g)[:take]]
        idx = torch.cat([fg, rest])
        logits, labels = logits[idx], labels[idx]
    return focal_loss_cdf(
        logits,
        labels,
        out_path=out_path,
        gamma=gamma,
        alpha=alpha,
        gammas=gammas,
        title=f"Figure 4 of this model (trained with $\\gamma$ = {gamma:g}, $\\alpha$ = {alpha:g})",
    )


# ----------------------------------------------------------------------------------------- a run


@torch.no_grad()
def write_run_pictures(
    model: torch.nn.Module,
    postprocess: Any,
    cfg: Any,
    cat_ids: Sequence[int],
    categories: Sequence[Mapping[str, Any]],
    plan: Sequence[Any],
    coco_eval: Any,
    out_dir: PathLike,
    *,
    with_truth: bool = True,
    val: ValDetections | None = None,
) -> list[Path]:
    """PR curves (from the run's COCO eval), a grid of val images with predicted (and, ``with_truth``, true)
    boxes, Figure 4 for the model and, given the eval's matched detections ``val`` (and ``with_truth``),
    the error analysis (:func:`write_error_pictures`), as PNGs in ``out_dir``; returns their paths.
    ``plan``: val shard files or ``(file, rows)`` pairs (``datasets.eval_plan``)."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    label_cats = sorted(int(c) for c in cat_ids) if with_truth else sorted(names)
    written = [plots.pr_curves(coco_eval, categories, out / "pr_curves.png")]
    images, preds, truths = [], [], []
    for batch in iter_eval_batches(plan, cfg.data, max_images=GRID_IMAGES, cat_ids=label_cats):
        per_image = postprocess(model(batch["images"].to(device).float()), batch["image_sizes"].to(device))
        for i, d in enumerate(per_image):
            h, w = batch["image_sizes"][i].tolist()
            images.append(batch["images"][i, :, :h, :w].permute(1, 2, 0).numpy())
            preds.append(
                {k: v.float().cpu().numpy() if k != "labels" else v.cpu().numpy() for k, v in d.items()}
            )
            truths.append(
                {"boxes": batch["gt_boxes"][i].numpy(), "labels": batch["gt_labels"][i].numpy()}
                if with_truth
                else {"boxes": torch.zeros(0, 4).numpy(), "labels": torch.zeros(0).numpy()}
            )
    written.append(
        plots.detection_grid(
            images,
            preds,
            truths,
            [names.get(int(c), str(c)) for c in cat_ids],
            out / "detections.png",
            score_thresh=0.3,
            max_images=GRID_IMAGES,
        )
    )
    if with_truth:
        criterion = build_criterion(cfg, len(cat_ids))
        batches = iter_eval_batches(plan, cfg.data, max_images=FIGURE4_IMAGES, cat_ids=label_cats)
        written.append(
            figure4_from_model(
                model, criterion, batches, cfg.loss.gamma, cfg.loss.alpha, out / "focal_loss_cdf.png"
            )
        )
    model.train(was_training)
    if with_truth and val is not None:
        written.extend(write_error_pictures(val, plan, out))
    return written


# ----------------------------------------------------------------------------------------- errors


def write_error_pictures(val: ValDetections, plan: Sequence[Any], out_dir: PathLike) -> list[Path]:
    """The error analysis of one eval at its F1-optimal thresholds, as PNGs in ``out_dir``:
    ``confusion_matrix.png`` (classes + background, IoU 0.5), ``confidence_curves.png`` (F1, precision
    and recall vs confidence per class, the chosen thresholds marked) and ``error_gallery.png`` (the
    highest-scoring false positives and the largest missed objects, cropped from the val images of
    ``plan``, class names on the boxes)."""
    out = Path(out_dir)
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in val.gt["categories"]}
    errors = val.errors()
    written = [
        plots.confusion_matrix(
            errors.matrix, [names[c] for c in errors.cat_ids], out / "confusion_matrix.png"
        )
    ]
    curves = val.curves()
    written.append(
        plots.confidence_curves(
            next(iter(curves.values())).confidence if curves else np.linspace(0, 1, 2),
            {names[c]: {"f1": v.f1, "precision": v.precision, "recall": v.recall} for c, v in curves.items()},
            {names[c]: val.points.classes[c].threshold for c in curves},
            out / "confidence_curves.png",
        )
    )
    written.append(plots.error_gallery(_gallery(val, errors, plan, names), out / "error_gallery.png"))
    return written


def _gallery(
    val: ValDetections, errors: ErrorAnalysis, plan: Sequence[Any], names: Mapping[int, str]
) -> dict[str, list[plots.GalleryTile]]:
    """The tiles of the error gallery: the :data:`GALLERY_ERRORS` highest-scoring false positives and
    largest missed objects, each cropped around its box with the image's other objects for context."""
    dets = val.detections
    fps = sorted(errors.false_positives, key=lambda f: -float(dets[f.detection]["score"]))[:GALLERY_ERRORS]
    misses = sorted(errors.misses, key=lambda m: -_xywh_area(m.annotation["bbox"]))[:GALLERY_ERRORS]
    wanted = {int(dets[f.detection]["image_id"]) for f in fps} | {
        int(m.annotation["image_id"]) for m in misses
    }
    images = _val_images(plan, wanted)
    objects: dict[int, list[Mapping[str, Any]]] = {}
    for a in val.gt.get("annotations", []):
        objects.setdefault(int(a["image_id"]), []).append(a)
    rows: dict[str, list[plots.GalleryTile]] = {"false positives": [], "missed objects": []}
    for f in fps:
        d = dets[f.detection]
        name, score = names.get(int(d["category_id"]), str(d["category_id"])), float(d["score"])
        what = {"duplicate": "duplicate", "localisation": "poorly placed", "background": "on background"}
        on = what.get(f.kind, f"on a {names.get(f.true_category, f.true_category)}")
        tile = _tile(images, objects, d["image_id"], d["bbox"], f"{name} {score:.2f}", names)
        if tile is not None:
            rows["false positives"].append(plots.GalleryTile(tile[0], tile[1], f"{name} {score:.2f}: {on}"))
    for m in misses:
        a = m.annotation
        name = names.get(int(a["category_id"]), str(a["category_id"]))
        how = (
            "not detected" if m.predicted_category is None else f"taken for {names.get(m.predicted_category)}"
        )
        tile = _tile(images, objects, a["image_id"], a["bbox"], f"missed {name}", names, skip=a)
        if tile is not None:
            rows["missed objects"].append(plots.GalleryTile(tile[0], tile[1], f"{name}: {how}"))
    return rows


def _xywh_area(bbox: Sequence[float]) -> float:
    return float(bbox[2]) * float(bbox[3])


def _tile(
    images: Mapping[int, np.ndarray],
    objects: Mapping[int, Sequence[Mapping[str, Any]]],
    image_id: Any,
    bbox: Sequence[float],
    label: str,
    names: Mapping[int, str],
    skip: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, list[tuple[list[float], str, str]]] | None:
    """A crop of image ``image_id`` around ``bbox`` (XYWH, original pixels) with the error box (``label``)
    and the image's other objects inside the crop, in crop pixels; None when the image did not load."""
    img = images.get(int(image_id))
    if img is None:
        return None
    x, y, w, h = (float(v) for v in bbox)
    pad = max(32.0, CROP_CONTEXT * max(w, h))
    x0, y0 = int(max(0, x - pad)), int(max(0, y - pad))
    x1, y1 = int(min(img.shape[1], x + w + pad)), int(min(img.shape[0], y + h + pad))
    boxes: list[tuple[list[float], str, str]] = []
    for a in objects.get(int(image_id), []):
        if a is skip:
            continue
        ax, ay, aw, ah = (float(v) for v in a["bbox"])
        if ax < x1 and ay < y1 and ax + aw > x0 and ay + ah > y0:
            name = names.get(int(a["category_id"]), str(a["category_id"]))
            boxes.append(([ax - x0, ay - y0, ax + aw - x0, ay + ah - y0], name, "context"))
    boxes.append(([x - x0, y - y0, x + w - x0, y + h - y0], label, "error"))
    return img[y0:y1, x0:x1], boxes


def _val_images(plan: Sequence[Any], image_ids: set[int]) -> dict[int, np.ndarray]:
    """The decoded val images (display orientation, original pixels) of ``image_ids``, read from the shard
    files of ``plan`` with the one decoder policy; images that do not decode are left out."""
    found: dict[int, np.ndarray] = {}
    if not image_ids:
        return found
    for entry in plan:
        uri = entry if isinstance(entry, (str, os.PathLike)) else entry[0]
        fs, path = resolve_uri(uri)
        with fs.open_input_file(path) as f:
            shard = pq.ParquetFile(f)
            ids = shard.read(columns=["image_id"])["image_id"]
            wanted = pc.is_in(ids, value_set=pa.array(sorted(image_ids), ids.type))
            if not pc.any(wanted).as_py():  # the image bytes of a shard are read only when it holds one
                continue
            table = shard.read(columns=["image_id", "image"]).filter(wanted)
        for image_id, data in zip(table["image_id"].to_pylist(), table["image"].to_pylist(), strict=True):
            try:
                found[int(image_id)] = decode_image(data)
            except Exception:  # noqa: BLE001 - the eval counted it as skipped: no tile, no failure
                continue
        if len(found) == len(image_ids):
            break
    return found
