"""The pictures of a run and of a sweep, as PNG files. matplotlib and numpy only.

Per run (MLflow artifacts): :func:`pr_curves` from the COCO eval, :func:`detection_grid` of val images
with predicted and true boxes, the error analysis at the chosen thresholds (:func:`confusion_matrix`,
:func:`confidence_curves`, :func:`error_gallery`), and the paper's Figure 4 (:func:`figure4`, drawn from curves that
``report.focal_loss_cdf_data`` computes). Per sweep: :func:`ap_vs_param_scatter`,
:func:`parallel_coordinates` and :func:`ap_vs_gamma_with_paper`. Every plotting function writes one PNG
and returns its path.

Figures are built as ``matplotlib.figure.Figure`` objects, never through pyplot: ``Figure.savefig`` renders
a ``.png`` with Agg whatever backend the process has, so importing this module neither picks nor switches
a backend, no display is needed (Ray workers, CI), and no figure is kept in pyplot's global registry (a
figure is freed when its last reference goes). Inputs are numpy arrays (anything ``np.asarray`` reads).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib import patches
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

__all__ = [
    "FocalLossCDF",
    "GalleryTile",
    "PRCurves",
    "ap_vs_gamma_with_paper",
    "ap_vs_param_scatter",
    "class_colour",
    "confidence_curves",
    "confusion_matrix",
    "detection_grid",
    "error_gallery",
    "figure4",
    "parallel_coordinates",
    "pr_curve_data",
    "pr_curves",
]

DPI = 110
# COCOeval's precision array is [T iou thresholds, R recall thresholds, K classes, A areas, M max dets];
# area index 0 is "all" and max dets 100 is the last of (1, 10, 100).
AREA_ALL = 0

PathLike = str | os.PathLike[str]


def _save(fig: Figure, out_path: PathLike) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, bbox_inches="tight")
    return out


def class_colour(label: int) -> tuple[float, float, float]:
    """A stable, distinct RGB colour (0..1) per contiguous class label (tab10, then tab20)."""
    cmap = matplotlib.colormaps["tab10" if label < 10 else "tab20"]
    return tuple(float(c) for c in cmap(label % cmap.N)[:3])  # type: ignore[return-value]


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
    fig = Figure(figsize=(11, 4.6))
    axes = fig.subplots(1, 2, sharey=True)
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
    padding (skipped); None draws no truth. numpy arrays (or anything ``np.asarray`` reads, such as CPU
    tensors). At most ``max_images`` images.
    """
    # One piece: one matplotlib figure laid out, drawn and saved; splitting it would pass the figure and its
    # axes around for no reader's gain.
    n = min(len(images), max_images)
    if len(detections) < n or (ground_truth is not None and len(ground_truth) < n):
        raise ValueError(
            f"need detections (and ground truth) for every image: {len(images)} images, "
            f"{len(detections)} detections, {None if ground_truth is None else len(ground_truth)} ground truth"
        )
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(3.6 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)

    def name(label: int) -> str:
        return class_names[label] if 0 <= label < len(class_names) else str(label)

    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= n:
            continue
        img = np.asarray(images[i])
        ax.imshow(img)
        if ground_truth is not None:
            gb = np.asarray(ground_truth[i]["boxes"], np.float64).reshape(-1, 4)
            gl = np.asarray(ground_truth[i]["labels"], np.int64).reshape(-1)
            for box, lab in zip(gb, gl, strict=True):
                if lab < 0:
                    continue
                ax.add_patch(
                    patches.Rectangle(
                        (box[0], box[1]),
                        box[2] - box[0],
                        box[3] - box[1],
                        fill=False,
                        ls=(0, (3, 2)),
                        lw=1.5,
                        ec=class_colour(int(lab)),
                    )
                )
        det = detections[i]
        db = np.asarray(det["boxes"], np.float64).reshape(-1, 4)
        ds = np.asarray(det["scores"], np.float64).reshape(-1)
        dl = np.asarray(det["labels"], np.int64).reshape(-1)
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
            ax.text(
                box[0],
                box[1],
                f"{name(int(lab))} {score:.2f}",
                fontsize=6.5,
                color="white",
                va="top" if near_top else "bottom",
                bbox={"facecolor": c, "alpha": 0.85, "pad": 1, "lw": 0},
                clip_on=True,
            )
        ax.set_title(f"{shown} detections", fontsize=8)
    fig.suptitle(f"solid: predictions (score >= {score_thresh:g}), dashed: ground truth", fontsize=10)
    return _save(fig, out_path)


# ----------------------------------------------------------------------------------------- errors


def confusion_matrix(
    matrix: np.ndarray, class_names: Sequence[str], out_path: PathLike, *, title: str | None = None
) -> Path:
    """A detection confusion matrix: ``matrix`` (K + 1, K + 1) counts, rows the true class (``class_names``
    order, then background), columns the predicted class (same, then background), as
    ``operating_point.ErrorAnalysis.matrix``. Cells are shaded by their share of the row (what became of a
    true class's objects; the background row by its share of all false detections) and show the count."""
    m = np.asarray(matrix, np.int64)
    k = len(class_names)
    if m.shape != (k + 1, k + 1):
        raise ValueError(f"need a ({k + 1}, {k + 1}) matrix for {k} classes, got {m.shape}")
    labels = [*class_names, "background"]
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    side = max(4.0, 0.6 * (k + 1) + 2.4)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k + 1):
        for j in range(k + 1):
            if i == k and j == k:
                continue
            ax.text(
                j,
                i,
                str(int(m[i, j])),
                ha="center",
                va="center",
                fontsize=9,
                color="white" if share[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(k + 1), labels, rotation=45, ha="right", fontsize=9)
    ax.set_yticks(range(k + 1), labels, fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label("share of the row")
    ax.set_title(title or "Confusion matrix (IoU 0.5, per-class F1 thresholds)", fontsize=10)
    return _save(fig, out_path)


def confidence_curves(
    confidence: np.ndarray,
    curves: Mapping[str, Mapping[str, np.ndarray]],
    thresholds: Mapping[str, float],
    out_path: PathLike,
) -> Path:
    """F1, precision and recall against the confidence threshold, one panel each, one line per class.

    ``confidence`` (P,) in [0, 1]; ``curves[name]`` holds ``f1``, ``precision`` and ``recall`` (P,) of that
    class (``operating_point.ClassCurve``); ``thresholds[name]`` its chosen (F1-optimal) threshold, marked
    with a dot on each of its curves."""
    x = np.asarray(confidence, np.float64)
    fig = Figure(figsize=(12.5, 3.8))
    axes = fig.subplots(1, 3, sharey=True)
    for ax, key in zip(axes, ("f1", "precision", "recall"), strict=True):
        for n, (name, c) in enumerate(curves.items()):
            y = np.asarray(c[key], np.float64)
            colour = class_colour(n)
            ax.plot(x, y, color=colour, lw=1.6, label=name)
            t = thresholds.get(name)
            if t is not None and 0.0 <= t <= 1.0:
                ax.plot([t], [float(np.interp(t, x, y))], "o", color=colour, ms=6, mec="black", mew=0.6)
        if not curves:
            ax.text(0.5, 0.5, "no class with objects", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("confidence threshold")
        ax.set_title({"f1": "F1", "precision": "precision", "recall": "recall"}[key])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("value at IoU 0.5")
    if curves:
        axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle("Per-class F1, precision and recall vs confidence (dots: the chosen thresholds)")
    return _save(fig, out_path)


@dataclass(frozen=True)
class GalleryTile:
    """One error of the gallery: ``image`` (H, W, 3) uint8 (a crop around the error), ``boxes`` to draw as
    ``(xyxy in the crop's pixels, label, kind)`` with kind ``"error"`` (the false positive or the missed
    object: thick red) or ``"context"`` (other objects and detections: thin, the class colour),
    ``title`` one line under which it is shown."""

    image: np.ndarray
    boxes: Sequence[tuple[Sequence[float], str, str]]
    title: str


def error_gallery(rows: Mapping[str, Sequence[GalleryTile]], out_path: PathLike, *, cols: int = 4) -> Path:
    """The worst errors drawn on their val images: one block per entry of ``rows`` (e.g. "false positives",
    "missed objects"), ``cols`` tiles a row, each tile with its boxes and class names on them."""
    blocks = [(name, list(tiles)) for name, tiles in rows.items()]
    nrows = sum(max(1, math.ceil(len(t) / cols)) for _, t in blocks)
    fig = Figure(figsize=(2.7 * cols, 2.9 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    r = 0
    for name, tiles in blocks:
        used = max(1, math.ceil(len(tiles) / cols))
        for i, ax in enumerate(axes[r : r + used].flat):
            ax.set_axis_off()
            if i == 0 and not tiles:
                ax.text(0.0, 0.5, f"{name}: none", fontsize=10, transform=ax.transAxes)
            if i >= len(tiles):
                continue
            _draw_tile(ax, tiles[i], first=f"{name}\n" if i == 0 else "")
        r += used
    return _save(fig, out_path)


def _draw_tile(ax: Any, tile: GalleryTile, *, first: str) -> None:
    ax.imshow(np.asarray(tile.image))
    for box, label, kind in tile.boxes:
        x0, y0, x1, y1 = (float(v) for v in box)
        error = kind == "error"
        colour = (0.9, 0.1, 0.1) if error else (0.1, 0.7, 0.2)
        ax.add_patch(
            patches.Rectangle(
                (x0, y0),
                x1 - x0,
                y1 - y0,
                fill=False,
                lw=2.4 if error else 1.0,
                ec=colour,
                ls="-" if error else (0, (3, 2)),
            )
        )
        ax.text(
            x0,
            y0,
            label,
            fontsize=7 if error else 6,
            color="white",
            va="bottom",
            bbox={"facecolor": colour, "alpha": 0.85, "pad": 1, "lw": 0},
            clip_on=True,
        )
    ax.set_title(first + tile.title, fontsize=8, loc="left")


# ----------------------------------------------------------------------------------------- Figure 4


@dataclass(frozen=True)
class FocalLossCDF:
    """The curves of Figure 4, as ``report.focal_loss_cdf_data`` computes them. ``gammas`` one per row;
    ``x`` (P,) fractions of samples in [0, 1]; ``positives`` / ``negatives`` (len(gammas), P) cumulative
    normalised loss at ``x`` (0 at x=0, 1 at x=1, non-decreasing), NaN rows when there is no such sample;
    ``num_positives`` / ``num_negatives`` the sample counts."""

    gammas: tuple[float, ...]
    x: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray
    num_positives: int
    num_negatives: int


def figure4(
    data: FocalLossCDF, out_path: PathLike, *, gamma: float | None = None, title: str | None = None
) -> Path:
    """Draw Figure 4: cumulative normalised loss vs fraction of samples, positives and negatives panels.

    One curve per gamma of ``data`` (``report.focal_loss_cdf_data``); the curve of the run's ``gamma``, if
    ``data`` has it, is drawn thicker in crimson. A panel whose curves are all NaN says "no samples".
    """
    cmap = matplotlib.colormaps["viridis"]
    fig = Figure(figsize=(11, 4.6))
    axes = fig.subplots(1, 2, sharey=True)
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
            ax.plot(
                data.x,
                curves[i],
                color="crimson" if run else colour,
                lw=2.6 if run else 1.5,
                label=f"$\\gamma$ = {g:g}" + (" (this run)" if run else ""),
            )
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
    fig = Figure(figsize=(4.0 * cols, 3.4 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False, sharey=True)
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
    fig = Figure(figsize=(max(6.0, 1.9 * len(keys)), 4.6))
    ax = fig.subplots()
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
    cmap = matplotlib.colormaps["viridis"]
    if ok.any():
        lo_m, hi_m = float(np.nanmin(y[ok])), float(np.nanmax(y[ok]))
        span = hi_m - lo_m if hi_m > lo_m else 1.0
        for i in np.argsort(np.where(ok, y, -np.inf)):  # ascending: the best is drawn last, on top
            if not ok[i]:
                continue
            ax.plot(xs, data[i], color=cmap((y[i] - lo_m) / span), lw=1.6, alpha=0.9)
        sm = ScalarMappable(cmap=cmap, norm=Normalize(lo_m, hi_m))
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
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.subplots()
    ours = sorted(
        (float(r["loss.gamma"]), 100.0 * float(r[metric])) for r in rows if r.get(metric) is not None
    )
    if ours:
        ax.plot(
            [g for g, _ in ours], [a for _, a in ours], "o-", color="tab:blue", label=f"ours ({metric} x 100)"
        )
    ax.plot(
        [g for g, _, _ in paper],
        [ap for _, _, ap in paper],
        "s--",
        color="tab:gray",
        label="paper Table 1b (R50-FPN, 600 px, COCO)",
    )
    for g, a, ap in paper:
        ax.annotate(f"a={a}", (g, ap), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xlabel("focal loss gamma (with the paper's alpha)")
    ax.set_ylabel("AP")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_path)
