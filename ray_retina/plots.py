"""The pictures of a run and of a sweep, as PNG files (matplotlib, Agg backend: no display needed).

Per run (MLflow artifacts): :func:`pr_curves` from the COCO eval, :func:`detection_grid` of val images
with predicted and true boxes, and the paper's Figure 4 (:func:`focal_loss_cdf`, or
:func:`figure4_from_model` which runs the final model first). Per sweep: :func:`ap_vs_param_scatter` and
:func:`parallel_coordinates`. Every plotting function writes one PNG and returns its path; the math of
Figure 4 is the pure function :func:`focal_loss_cdf_data`.

Figure 4 (Lin et al. 2017, section 5.1, "Analysis of the Focal Loss"): take the logits of a trained model
on many anchors; separately for positive and for negative samples, compute FL with a given gamma, sort the
losses from lowest to highest and plot their cumulative sum normalised to 1 against the fraction of
samples. For positives the curves barely move with gamma; for negatives, a larger gamma puts nearly all the
loss on a small fraction of hard negatives (the curve stays near 0 and jumps at the end). A *sample* is one
binary classifier output, an (anchor, class) entry, as the sigmoid loss sees it: a positive is the entry of
a foreground anchor's own class; the negatives are every other entry of the non-ignored anchors (the K
entries of background anchors and the K - 1 other-class entries of foreground anchors). alpha multiplies
all positives (or all negatives) by one constant, so the normalised curves do not depend on it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window (workers and CI have no display)

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib import patches  # noqa: E402
from torch import Tensor  # noqa: E402

from ray_retina.losses import sigmoid_focal_loss  # noqa: E402

__all__ = [
    "FIGURE4_GAMMAS",
    "FocalLossCDF",
    "PRCurves",
    "ap_vs_param_scatter",
    "class_colour",
    "detection_grid",
    "figure4_from_model",
    "focal_loss_cdf",
    "focal_loss_cdf_data",
    "parallel_coordinates",
    "pr_curve_data",
    "pr_curves",
]

FIGURE4_GAMMAS: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)  # the paper's Figure 4 shows 0, .5, 1, 2
DPI = 110
# COCOeval's precision array is [T iou thresholds, R recall thresholds, K classes, A areas, M max dets];
# area index 0 is "all" and max dets 100 is the last of (1, 10, 100).
AREA_ALL = 0

PathLike = str | os.PathLike[str]


def _save(fig: Any, out_path: PathLike) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return out


def class_colour(label: int) -> tuple[float, float, float]:
    """A stable, distinct RGB colour (0..1) per contiguous class label (tab10, then tab20)."""
    cmap = plt.get_cmap("tab10") if label < 10 else plt.get_cmap("tab20")
    return tuple(float(c) for c in cmap(label % cmap.N)[:3])  # type: ignore[return-value]


def _numpy(x: Any, dtype: Any = None) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


# ----------------------------------------------------------------------------------------- PR curves


def _category_names(categories: Sequence[Mapping[str, Any]] | Mapping[int, str] | None) -> dict[int, str]:
    if categories is None:
        return {}
    if isinstance(categories, Mapping):
        return {int(k): str(v) for k, v in categories.items()}
    return {int(c["id"]): str(c.get("name", c["id"])) for c in categories}


@dataclass(frozen=True)
class PRCurves:
    """Per-class precision at the 101 COCO recall thresholds (area all, max 100 detections per image).

    ``recall`` (R,); ``iou50`` and ``iou50_95`` (R, K) precision at IoU 0.5 and its mean over the ten IoU
    thresholds 0.5:0.95; NaN for a class without ground truth. ``cat_ids`` (K,) the columns' category ids.
    The mean over recall of a column is that class's AP (COCO's definition)."""

    recall: np.ndarray
    iou50: np.ndarray
    iou50_95: np.ndarray
    cat_ids: list[int]


def pr_curve_data(coco_eval: Any) -> PRCurves:
    """The curves of :func:`pr_curves` from a COCOeval after ``accumulate()`` (pycocotools or faster_coco_eval).

    ``coco_eval.eval["precision"]`` has shape [T=10 IoU, R=101 recall, K, A=4 areas, M=3 max dets]; -1 marks
    "no ground truth" and is excluded from the IoU mean (NaN when every threshold has no data).
    """
    params = coco_eval.params
    precision = np.asarray(coco_eval.eval["precision"], dtype=np.float64)
    max_dets = [int(m) for m in params.maxDets]
    m = max_dets.index(100) if 100 in max_dets else len(max_dets) - 1
    iou = np.asarray(params.iouThrs, dtype=np.float64)
    t50 = int(np.argmin(np.abs(iou - 0.5)))
    p = precision[:, :, :, AREA_ALL, m]  # (T, R, K)
    valid = p > -1
    n_valid = valid.sum(0)
    mean = np.where(valid, p, 0.0).sum(0) / np.maximum(n_valid, 1)
    return PRCurves(
        recall=np.asarray(params.recThrs, dtype=np.float64),
        iou50=np.where(valid[t50], p[t50], np.nan),
        iou50_95=np.where(n_valid > 0, mean, np.nan),
        cat_ids=[int(c) for c in params.catIds],
    )


def pr_curves(
    coco_eval: Any,
    categories: Sequence[Mapping[str, Any]] | Mapping[int, str] | None,
    out_path: PathLike,
) -> Path:
    """Precision-recall curves per class from a COCOeval after ``accumulate()`` (see :func:`pr_curve_data`).

    Two panels, area "all" and at most 100 detections per image: IoU 0.5, and the mean over the ten IoU
    thresholds 0.5:0.95 (the curve whose area is COCO AP); a dashed black line for the mean over classes.
    Classes without ground truth are left out. The legend gives each class's AP (the mean of its curve).
    ``categories``: the COCO category dicts (``id``, ``name``) or a mapping id -> name. ``coco_eval`` None
    (no detections at all, see ``coco_evaluate``) draws empty panels saying so.
    """
    names = _category_names(categories)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    titles = ("IoU 0.50", "IoU 0.50:0.95 (mean)")
    if coco_eval is None or "precision" not in (getattr(coco_eval, "eval", None) or {}):
        for ax, title in zip(axes, titles, strict=True):
            ax.set_title(title)
            ax.text(0.5, 0.5, "no detections", ha="center", va="center", transform=ax.transAxes)
    else:
        data = pr_curve_data(coco_eval)
        for ax, title, pk in zip(axes, titles, (data.iou50, data.iou50_95), strict=True):
            drawn = []
            for k, cid in enumerate(data.cat_ids):
                if np.isnan(pk[:, k]).all():
                    continue
                ap = float(np.mean(pk[:, k]))
                ax.plot(
                    data.recall,
                    pk[:, k],
                    color=class_colour(k),
                    lw=1.6,
                    label=f"{names.get(cid, cid)} (AP {ap:.3f})",
                )
                drawn.append(pk[:, k])
            if drawn:
                mean = np.mean(np.stack(drawn, 1), axis=1)
                ax.plot(
                    data.recall,
                    mean,
                    color="black",
                    lw=2.2,
                    ls="--",
                    label=f"mean (AP {float(np.mean(mean)):.3f})",
                )
                ax.legend(loc="upper right", fontsize=8, framealpha=0.85)
            else:
                ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(title)
    for ax in axes:
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("precision")
    fig.suptitle("Precision-recall per class (area all, max 100 detections)")
    return _save(fig, out_path)


# ----------------------------------------------------------------------------------------- detections


def detection_grid(
    images: Sequence[np.ndarray],
    detections: Sequence[Mapping[str, Any]],
    ground_truth: Sequence[Mapping[str, Any]] | None,
    class_names: Sequence[str],
    out_path: PathLike,
    score_thresh: float = 0.3,
    max_images: int = 16,
) -> Path:
    """A grid of images with predicted boxes (solid, class colour, "name score") and true boxes (dashed).

    ``images``: HxWx3 uint8 RGB. ``detections[i]``: ``boxes`` (D, 4) XYXY in the pixels of ``images[i]``,
    ``scores`` (D,), ``labels`` (D,) contiguous 0..K-1 (indices into ``class_names``); only scores >=
    ``score_thresh`` are drawn. ``ground_truth[i]``: ``boxes`` (G, 4) XYXY, ``labels`` (G,) with -1 for
    padding (skipped); None draws no truth. Arrays or tensors. At most ``max_images`` images.
    """
    n = min(len(images), max_images)
    if len(detections) < n or (ground_truth is not None and len(ground_truth) < n):
        raise ValueError(
            f"need detections (and ground truth) for every image: {len(images)} images, "
            f"{len(detections)} detections, {None if ground_truth is None else len(ground_truth)} ground truth"
        )
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows), squeeze=False)

    def name(label: int) -> str:
        return class_names[label] if 0 <= label < len(class_names) else str(label)

    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= n:
            continue
        img = _numpy(images[i])
        ax.imshow(img)
        if ground_truth is not None:
            gb = _numpy(ground_truth[i]["boxes"], np.float64).reshape(-1, 4)
            gl = _numpy(ground_truth[i]["labels"], np.int64).reshape(-1)
            for box, lab in zip(gb, gl, strict=True):
                if lab < 0:
                    continue
                ax.add_patch(patches.Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                                               ls=(0, (3, 2)), lw=1.5, ec=class_colour(int(lab))))  # fmt: skip
        det = detections[i]
        db = _numpy(det["boxes"], np.float64).reshape(-1, 4)
        ds = _numpy(det["scores"], np.float64).reshape(-1)
        dl = _numpy(det["labels"], np.int64).reshape(-1)
        shown = 0
        for box, score, lab in zip(db, ds, dl, strict=True):
            if score < score_thresh:
                continue
            shown += 1
            c = class_colour(int(lab))
            ax.add_patch(
                patches.Rectangle(
                    (box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False, lw=1.8, ec=c
                )
            )
            near_top = box[1] < 0.08 * img.shape[0]  # no room above the box: write inside it
            ax.text(box[0], box[1], f"{name(int(lab))} {score:.2f}", fontsize=6.5, color="white",
                    va="top" if near_top else "bottom",
                    bbox={"facecolor": c, "alpha": 0.85, "pad": 1, "lw": 0}, clip_on=True)  # fmt: skip
        ax.set_title(f"{shown} detections", fontsize=8)
    fig.suptitle(f"solid: predictions (score >= {score_thresh:g}), dashed: ground truth", fontsize=10)
    return _save(fig, out_path)


# ----------------------------------------------------------------------------------------- Figure 4


@dataclass(frozen=True)
class FocalLossCDF:
    """The curves of Figure 4. ``x`` (P,) fractions of samples in [0, 1]; ``positives`` / ``negatives``
    (len(gammas), P) cumulative normalised loss at ``x`` (0 at x=0, 1 at x=1, non-decreasing), NaN rows
    when there is no such sample; ``num_positives`` / ``num_negatives`` the sample counts."""

    gammas: tuple[float, ...]
    x: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray
    num_positives: int
    num_negatives: int


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
) -> FocalLossCDF:
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
    return FocalLossCDF(
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
    """Draw Figure 4: cumulative normalised loss vs fraction of samples, positives and negatives panels.

    One curve per gamma in ``gammas`` plus the run's ``gamma`` (drawn thicker), all on the same ``logits``
    (N, K) and ``labels`` (N,) in {-1 ignore, 0..K-1 class, K background}. See :func:`focal_loss_cdf_data`.
    """
    gs = sorted({float(g) for g in gammas} | ({float(gamma)} if gamma is not None else set()))
    data = focal_loss_cdf_data(logits, labels, gammas=gs, alpha=alpha)
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    panels = (
        (axes[0], data.positives, f"positive samples (n = {data.num_positives:,})"),
        (axes[1], data.negatives, f"negative samples (n = {data.num_negatives:,})"),
    )
    for ax, curves, label in panels:
        for i, g in enumerate(data.gammas):
            run = gamma is not None and g == float(gamma)
            colour = cmap(i / max(1, len(data.gammas) - 1) * 0.9)
            if np.isnan(curves[i]).all():
                continue
            ax.plot(data.x, curves[i], color="crimson" if run else colour, lw=2.6 if run else 1.5,
                    label=f"$\\gamma$ = {g:g}" + (" (this run)" if run else ""))  # fmt: skip
        if np.isnan(curves).all():
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(loc="upper left", fontsize=8)
        ax.set_title(label)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("fraction of samples (sorted by loss, lowest first)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cumulative normalised loss")
    fig.suptitle(title or "Cumulative distribution of the normalised focal loss (Lin et al. 2017, Fig. 4)")
    return _save(fig, out_path)


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
                out.anchors, batch["gt_boxes"].to(device).float(), batch["gt_labels"].to(device),
                None if crowd is None else crowd.to(device),
            )  # fmt: skip
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
    return focal_loss_cdf(logits, labels, out_path=out_path, gamma=gamma, alpha=alpha, gammas=gammas,
                          title=f"Figure 4 of this model (trained with $\\gamma$ = {gamma:g}, $\\alpha$ = {alpha:g})")  # fmt: skip


# ----------------------------------------------------------------------------------------- sweeps


def _column(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, list[str] | None]:
    """Values of ``key`` over rows as floats; strings (categorical) become indices into the returned labels.
    Missing values are NaN."""
    vals = [r.get(key) for r in rows]
    try:
        return np.array([np.nan if v is None else float(v) for v in vals], dtype=np.float64), None
    except (TypeError, ValueError):
        cats = sorted({str(v) for v in vals if v is not None})
        return np.array([np.nan if v is None else cats.index(str(v)) for v in vals], dtype=np.float64), cats


def _log_scale(v: np.ndarray) -> bool:
    """Log axis for positive parameters spanning at least a decade (lr, prior)."""
    f = v[np.isfinite(v)]
    return f.size > 1 and bool((f > 0).all()) and f.max() / f.min() >= 10


def _out_path(out_path: PathLike | None, fn: str) -> PathLike:
    if out_path is None:
        raise TypeError(f"{fn}() needs out_path")
    return out_path


def ap_vs_param_scatter(
    rows: Sequence[Mapping[str, Any]],
    params: Sequence[str],
    metric: str = "val/AP",
    out_path: PathLike | None = None,
) -> Path:
    """One scatter per parameter of ``metric`` against it over the trials of a sweep; the best trial starred.

    ``rows``: one dict per trial with the parameter keys (dotted config keys, e.g. ``loss.gamma``) and the
    metric; rows without the metric are left out. Positive parameters spanning >= 1 decade get a log axis;
    non-numeric values (a choice) are drawn as categories. ``out_path`` is required.
    """
    out_path = _out_path(out_path, "ap_vs_param_scatter")
    if not params:
        raise ValueError("params must name at least one parameter")
    y, _ = _column(rows, metric)
    ok = np.isfinite(y)
    best = int(np.nanargmax(np.where(ok, y, -np.inf))) if ok.any() else -1
    cols = min(len(params), 4)
    nrows = math.ceil(len(params) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.0 * cols, 3.4 * nrows), squeeze=False, sharey=True)
    for ax, p in zip(axes.flat, params, strict=False):
        x, cats = _column(rows, p)
        m = ok & np.isfinite(x)
        ax.scatter(x[m], y[m], s=28, c="tab:blue", alpha=0.8, edgecolors="none")
        if best >= 0 and m[best]:
            ax.scatter([x[best]], [y[best]], s=160, marker="*", c="crimson", zorder=3, label="best")
            ax.legend(fontsize=8, loc="best")
        if cats is not None:
            ax.set_xticks(range(len(cats)), cats, rotation=30, fontsize=8)
        elif _log_scale(x[m]):
            ax.set_xscale("log")
        ax.set_xlabel(p)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(params) :]:
        ax.set_axis_off()
    for r in range(nrows):
        axes[r, 0].set_ylabel(metric)
    fig.suptitle(f"{metric} vs parameter ({int(ok.sum())} trials)")
    return _save(fig, out_path)


def parallel_coordinates(
    rows: Sequence[Mapping[str, Any]],
    params: Sequence[str],
    metric: str = "val/AP",
    out_path: PathLike | None = None,
) -> Path:
    """Parallel-coordinates plot of a sweep: one vertical axis per parameter and one for ``metric``, one line
    per trial coloured by the metric (the best on top). Each axis is scaled to its own [min, max] (log for
    positive parameters spanning >= 1 decade) with its end values written beside it. Trials without the
    metric are left out. ``out_path`` is required.
    """
    out_path = _out_path(out_path, "parallel_coordinates")
    if not params:
        raise ValueError("params must name at least one parameter")
    keys = [*params, metric]
    y, _ = _column(rows, metric)
    ok = np.isfinite(y)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * len(keys)), 4.6))
    cols: list[np.ndarray] = []
    ticks: list[tuple[str, str]] = []
    for key in keys:
        v, cats = _column(rows, key)
        if cats is not None:
            norm = v / max(1, len(cats) - 1)
            ticks.append((cats[0], cats[-1]) if cats else ("", ""))
        else:
            f = v[ok & np.isfinite(v)]
            log = _log_scale(f)
            t = np.log10(v) if log else v
            lo, hi = (
                (float(np.nanmin(np.log10(f) if log else f)), float(np.nanmax(np.log10(f) if log else f)))
                if f.size
                else (0.0, 1.0)
            )
            norm = (t - lo) / (hi - lo) if hi > lo else np.full_like(t, 0.5)
            ticks.append((f"{f.min():.3g}", f"{f.max():.3g}") if f.size else ("", ""))
        cols.append(norm)
    data = np.stack(cols, axis=1)  # (trials, axes) in [0, 1]
    xs = np.arange(len(keys))
    cmap = plt.get_cmap("viridis")
    if ok.any():
        lo_m, hi_m = float(np.nanmin(y[ok])), float(np.nanmax(y[ok]))
        span = hi_m - lo_m if hi_m > lo_m else 1.0
        for i in np.argsort(np.where(ok, y, -np.inf)):  # ascending: the best is drawn last, on top
            if not ok[i]:
                continue
            ax.plot(xs, data[i], color=cmap((y[i] - lo_m) / span), lw=1.6, alpha=0.9)
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(lo_m, hi_m))
        fig.colorbar(sm, ax=ax, pad=0.02).set_label(metric)
    else:
        ax.text(0.5, 0.5, f"no trial reported {metric}", ha="center", va="center", transform=ax.transAxes)
    for j, (lo_t, hi_t) in enumerate(ticks):
        ax.axvline(j, color="0.3", lw=0.8)
        ax.text(j, -0.04, lo_t, ha="center", va="top", fontsize=8)
        ax.text(j, 1.04, hi_t, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, keys, fontsize=9)
    ax.tick_params(axis="x", pad=16)
    ax.set_yticks([])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(-0.3, len(keys) - 0.7)
    for s in ("top", "right", "left"):
        ax.spines[s].set_visible(False)
    ax.set_title(f"Sweep: {int(ok.sum())} trials, coloured by {metric}", pad=22)
    return _save(fig, out_path)


def ap_vs_gamma_with_paper(
    rows: Sequence[Mapping[str, Any]],
    paper: Sequence[tuple[float, float, float]],
    out_path: PathLike,
    metric: str = "val/AP",
) -> Path:
    """The paper-table1 ablation: our AP vs gamma beside the paper's Table 1b (gamma, alpha, AP in percent)."""
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    ours = sorted((float(r["loss.gamma"]), 100.0 * float(r[metric])) for r in rows if r.get(metric) is not None)
    if ours:
        ax.plot([g for g, _ in ours], [a for _, a in ours], "o-", color="tab:blue", label=f"ours ({metric} x 100)")
    ax.plot([g for g, _, _ in paper], [ap for _, _, ap in paper], "s--", color="tab:gray",
            label="paper Table 1b (R50-FPN, 600 px, COCO)")  # fmt: skip
    for g, a, ap in paper:
        ax.annotate(f"a={a}", (g, ap), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xlabel("focal loss gamma (with the paper's alpha)")
    ax.set_ylabel("AP")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_path)
