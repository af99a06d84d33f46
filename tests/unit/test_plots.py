from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ray_retina import plots, report
from ray_retina.engine.evaluate import coco_evaluate
from ray_retina.model import build_criterion, build_model

from _model_utils import boxes_image, small_cfg

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 2000


# ----------------------------------------------------------------------------------------- Figure 4 math


def test_cdf_hand_numbers():
    # One class, two background anchors with losses softplus(0) = ln 2 and softplus(ln(e - 1)) = 1 (gamma 0):
    # sorted [ln 2, 1], so half the samples carry ln 2 / (1 + ln 2) of the loss.
    logits = torch.tensor([[math.log(math.e - 1)], [0.0]], dtype=torch.float64)
    labels = torch.tensor([1, 1])
    d = report.focal_loss_cdf_data(logits, labels, gammas=[0.0], num_points=3)
    assert d.x.tolist() == [0.0, 0.5, 1.0]
    np.testing.assert_allclose(d.negatives[0], [0.0, math.log(2) / (1 + math.log(2)), 1.0], rtol=1e-12)
    assert d.num_positives == 0 and d.num_negatives == 2
    assert np.isnan(d.positives).all()


def test_cdf_counts_ignore_and_classes(gen):
    k = 3
    logits = torch.randn(10, k, generator=gen)
    labels = torch.tensor([-1, -1, 0, 2, 3, 3, 3, 1, 3, -1])  # 3 ignored, 3 foreground, 4 background
    d = report.focal_loss_cdf_data(logits, labels)
    assert d.num_positives == 3
    assert d.num_negatives == 7 * k - 3  # every target-0 entry of the non-ignored anchors
    assert d.positives.shape == d.negatives.shape == (len(report.FIGURE4_GAMMAS), 501)


@pytest.mark.parametrize("seed", [0, 1])
def test_cdf_properties(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = 4000, 4
    # A trained-like mix: most negatives confidently low, some hard; positives spread around 0.
    labels = torch.full((n,), k)
    labels[:200] = torch.randint(0, k, (200,), generator=g)
    labels[200:260] = -1
    logits = torch.randn(n, k, generator=g) * 2.0 - 4.0
    logits[torch.arange(200), labels[:200]] = torch.randn(200, generator=g) * 2.0 + 1.0
    d = report.focal_loss_cdf_data(logits, labels, gammas=[0, 0.5, 1, 2, 5], alpha=0.25)
    for curves in (d.positives, d.negatives):
        assert np.all(np.diff(curves, axis=1) >= -1e-12)  # monotone
        np.testing.assert_allclose(curves[:, 0], 0.0, atol=1e-12)
        np.testing.assert_allclose(curves[:, -1], 1.0, rtol=1e-12)
        assert np.all(curves <= 1.0 + 1e-12)
    i90 = int(np.searchsorted(d.x, 0.9))
    neg90 = d.negatives[:, i90]
    # A larger gamma moves the loss onto fewer, harder negatives: the curve at 90% of the samples is lower.
    assert np.all(np.diff(neg90) < 0), neg90
    assert neg90[3] < 0.5 * neg90[0]  # gamma 2 vs 0: a large effect, as in the paper
    # alpha scales a whole group by one constant: the normalised curves do not depend on it.
    d2 = report.focal_loss_cdf_data(logits, labels, gammas=[0, 0.5, 1, 2, 5], alpha=0.75)
    np.testing.assert_allclose(d2.negatives, d.negatives, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(d2.positives, d.positives, rtol=1e-9, atol=1e-12)


def test_cdf_rejects_bad_input():
    with pytest.raises(ValueError, match="logits"):
        report.focal_loss_cdf_data(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        report.focal_loss_cdf_data(torch.zeros(2, 3), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="gammas"):
        report.focal_loss_cdf_data(torch.zeros(2, 3), torch.tensor([0, 3]), gammas=[-1])


# ----------------------------------------------------------------------------------------- PR curves


def _tiny_gt():
    cats = [{"id": 3, "name": "rectangle"}, {"id": 17, "name": "ellipse"}, {"id": 42, "name": "triangle"}]
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 100, "width": 120} for i in (1, 2)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 20], "area": 600.0, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 17, "bbox": [50, 40, 40, 40], "area": 1600.0, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [5, 50, 60, 30], "area": 1800.0, "iscrowd": 0},
    ]  # no triangle in the GT
    return {"images": images, "annotations": anns, "categories": cats}


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_pr_curves_from_real_cocoeval(tmp_path, backend):
    gt = _tiny_gt()
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in gt["annotations"]
    ]
    dets.append(
        {"image_id": 2, "category_id": 17, "bbox": [70, 5, 30, 30], "score": 0.95}
    )  # a false positive
    stats, ev = coco_evaluate(gt, dets, backend=backend, return_eval=True)
    data = plots.pr_curve_data(ev)
    assert data.cat_ids == [3, 17, 42]
    assert data.recall.shape == (101,) and data.iou50.shape == (101, 3)
    np.testing.assert_allclose(data.iou50[:, 0], 1.0)  # rectangles: both found, nothing wrong
    np.testing.assert_allclose(data.iou50[:, 1], 0.5)  # ellipse: found after one higher-scored false positive
    assert np.isnan(data.iou50[:, 2]).all() and np.isnan(data.iou50_95[:, 2]).all()  # no triangle GT
    # The curves' means are the COCO APs of the classes; their mean over classes is COCO AP.
    assert np.nanmean(data.iou50_95.mean(0)) == pytest.approx(stats["AP"], abs=1e-6)
    assert np.nanmean(data.iou50.mean(0)) == pytest.approx(stats["AP50"], abs=1e-6)

    out = plots.pr_curves(ev, gt["categories"], tmp_path / "sub" / "pr.png")
    assert out == tmp_path / "sub" / "pr.png" and _is_png(out)


def test_pr_curves_without_detections(tmp_path):
    assert _is_png(plots.pr_curves(None, {3: "a"}, tmp_path / "pr.png"))


# ----------------------------------------------------------------------------------------- other plots


def test_detection_grid(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((64, 96), (80, 64), (96, 96))]
    dets = [
        {
            "boxes": np.array([[5, 5, 40, 30], [10, 20, 60, 60]]),
            "scores": np.array([0.9, 0.2]),
            "labels": np.array([0, 1]),
        },
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)},
        {
            "boxes": torch.tensor([[1.0, 2.0, 50.0, 70.0]]),
            "scores": torch.tensor([0.55]),
            "labels": torch.tensor([2]),
        },
    ]
    gts = [
        {"boxes": np.array([[6, 4, 42, 31], [0, 0, 0, 0]]), "labels": np.array([0, -1])},
        {"boxes": np.zeros((0, 4)), "labels": np.zeros(0)},
        {"boxes": np.array([[0, 0, 48, 72]]), "labels": np.array([2])},
    ]
    out = plots.detection_grid(images, dets, gts, ["rectangle", "ellipse", "triangle"], tmp_path / "grid.png")
    assert _is_png(out)
    with pytest.raises(ValueError, match="detections"):
        plots.detection_grid(images, dets[:1], gts, ["a"], tmp_path / "bad.png")


def test_focal_loss_cdf_png(tmp_path, gen):
    logits = torch.randn(500, 3, generator=gen) - 3
    labels = torch.full((500,), 3)
    labels[:20] = torch.arange(20) % 3
    out = report.focal_loss_cdf(logits, labels, out_path=tmp_path / "fig4.png", gamma=1.5, alpha=0.25)
    assert _is_png(out)


def test_figure4_draws_given_curves(tmp_path):
    # The drawing takes computed curves (numpy only): a panel with no sample (NaN rows) still draws.
    x = np.linspace(0.0, 1.0, 11)
    data = plots.FocalLossCDF(
        gammas=(0.0, 2.0),
        x=x,
        positives=np.full((2, 11), np.nan),
        negatives=np.stack([x, x**4]),
        num_positives=0,
        num_negatives=40,
    )
    assert _is_png(plots.figure4(data, tmp_path / "fig4.png", gamma=2.0, title="hand-made"))


def test_figure4_from_model(tmp_path):
    torch.manual_seed(0)
    cfg = small_cfg(**{"model.anchor_sizes": [16, 32, 64, 128, 256]})
    model = build_model(cfg, 3)
    criterion = build_criterion(cfg, 3)
    images, gt_boxes, gt_labels = boxes_image(b=2, size=64)
    batch = {
        "images": images.to(torch.uint8),
        "gt_boxes": gt_boxes,
        "gt_labels": gt_labels,
        "gt_crowd": torch.zeros_like(gt_labels, dtype=torch.bool),
    }
    model.train()
    out = report.figure4_from_model(
        model, criterion, [batch], 2.0, 0.25, tmp_path / "fig4.png", max_anchors=300
    )
    assert _is_png(out)
    assert model.training  # the mode is restored
    with pytest.raises(ValueError, match="no batches"):
        report.figure4_from_model(model, criterion, [], 2.0, 0.25, tmp_path / "x.png")


# ----------------------------------------------------------------------------------------- error analysis


def _not_blank(path) -> bool:
    """A PNG with more than one colour in it (something was drawn)."""
    from matplotlib.image import imread

    pixels = imread(path)
    return _is_png(path) and float(pixels[..., :3].std()) > 0.01


def test_confusion_matrix_and_confidence_curves_png(tmp_path):
    m = np.array([[5, 1, 2], [0, 3, 1], [4, 2, 0]])
    assert _not_blank(plots.confusion_matrix(m, ["cat", "dog"], tmp_path / "cm.png"))
    with pytest.raises(ValueError, match=r"\(3, 3\) matrix for 2 classes"):
        plots.confusion_matrix(m[:2], ["cat", "dog"], tmp_path / "bad.png")
    x = np.linspace(0, 1, 11)
    curves = {"cat": {"f1": x * (1 - x), "precision": x, "recall": 1 - x}}
    assert _not_blank(plots.confidence_curves(x, curves, {"cat": 0.5}, tmp_path / "conf.png"))
    assert _not_blank(plots.confidence_curves(x, {}, {}, tmp_path / "empty.png"))


def test_error_pictures_on_val_images(synth_val, tmp_path):
    """Perfect detections of every object but the first two; the first missed, the second found only by a
    detection of another class, and a confident box on background: the matrix says so, and the gallery
    draws those errors on the val images, cropped around them, largest miss and highest score first."""
    from ray_retina.data.datasets import eval_plan
    from ray_retina.data.shards import coco_gt_from_shards
    from ray_retina.operating_point import review_val_detections

    _, shards = synth_val
    gt = coco_gt_from_shards(shards)
    names = {c["id"]: c["name"] for c in gt["categories"]}
    anns = [a for a in gt["annotations"] if not a["iscrowd"]]
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in anns[2:]
    ]
    # Classes with a true positive keep everything above 0.9 at their F1 threshold (one extra false
    # positive costs less than the objects it would drop).
    found = sorted({a["category_id"] for a in anns[2:]})
    other = next(c for c in found if c != anns[1]["category_id"])
    confused = {"image_id": anns[1]["image_id"], "category_id": other, "bbox": anns[1]["bbox"], "score": 0.97}
    background = {
        "image_id": anns[0]["image_id"],
        "category_id": found[0],
        "bbox": [0, 0, 6, 6],
        "score": 0.95,
    }
    dets += [confused, background]
    val = review_val_detections(gt, dets, [i["id"] for i in gt["images"]], precision_target=0.5, floor=0.05)
    errors = val.errors()
    cats, k = errors.cat_ids, len(errors.cat_ids)
    assert np.trace(errors.matrix) == len(anns) - 2
    assert errors.matrix[:k, k].sum() == 1  # the first object: nobody found it
    assert errors.matrix[cats.index(anns[1]["category_id"]), cats.index(other)] == 1
    assert errors.matrix[k].sum() == 1  # the box on background
    rows = report._gallery(val, errors, eval_plan(shards), names)
    fps, misses = rows["false positives"], rows["missed objects"]
    assert [t.title for t in fps] == [
        f"{names[other]} 0.97: on a {names[anns[1]['category_id']]}",
        f"{names[found[0]]} 0.95: on background",
    ]
    assert all(t.image.ndim == 3 and min(t.image.shape[:2]) >= 6 for t in fps + misses)
    assert sorted(t.title for t in misses) == sorted(
        [
            f"{names[anns[0]['category_id']]}: not detected",
            f"{names[anns[1]['category_id']]}: taken for {names[other]}",
        ]
    )
    assert [b[2] for b in fps[1].boxes].count("error") == 1
    written = report.write_error_pictures(val, eval_plan(shards), tmp_path)
    assert [p.name for p in written] == ["confusion_matrix.png", "confidence_curves.png", "error_gallery.png"]
    assert all(_not_blank(p) for p in written)


def _sweep_rows():
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(8):
        rows.append(
            {
                "loss.gamma": float(rng.uniform(0, 5)),
                "loss.alpha": str(rng.choice(["0.25", "0.5", "0.75"])),
                "model.prior": float(10 ** rng.uniform(-3, -1)),
                "optim.lr": float(10 ** rng.uniform(-4, -2)),
                "val/AP": float(rng.uniform(0, 0.4)),
            }
        )
    rows.append({"loss.gamma": 1.0, "loss.alpha": "0.25", "model.prior": 0.01, "optim.lr": 1e-3})  # no AP yet
    return rows


def test_sweep_plots(tmp_path):
    rows = _sweep_rows()
    params = ["loss.gamma", "loss.alpha", "model.prior", "optim.lr"]
    assert _is_png(plots.ap_vs_param_scatter(rows, params, "val/AP", tmp_path / "scatter.png"))
    assert _is_png(plots.parallel_coordinates(rows, params, "val/AP", tmp_path / "parallel.png"))
    assert _is_png(plots.ap_vs_param_scatter(rows, ["loss.gamma"], out_path=tmp_path / "one.png"))
    with pytest.raises(TypeError, match="out_path"):
        plots.parallel_coordinates(rows, params)


_HEADLESS = """
import sys
import matplotlib
{before}
backend = matplotlib.get_backend(auto_select=False)
import numpy as np
from ray_retina import plots
plots.pr_curves(None, {{3: "a"}}, sys.argv[1] + "/pr.png")
plots.ap_vs_param_scatter([{{"a": 1.0, "val/AP": 0.1}}, {{"a": 2.0, "val/AP": 0.3}}], ["a"], out_path=sys.argv[1] + "/s.png")
assert matplotlib.get_backend(auto_select=False) == backend, (backend, matplotlib.get_backend(auto_select=False))
assert "matplotlib.pyplot" not in sys.modules, "plots imported pyplot"
assert "torch" not in sys.modules, "plots imported torch"
print(matplotlib.get_backend())
"""


@pytest.mark.parametrize("before", ["", "matplotlib.use('svg')"])
def test_plots_import_keeps_backend_headless(tmp_path, before):
    # No display, no MPLBACKEND: importing plots and writing PNGs neither picks nor switches the process's
    # backend (no pyplot, no matplotlib.use) and needs no torch.
    env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "DISPLAY", "WAYLAND_DISPLAY")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    code = textwrap.dedent(_HEADLESS.format(before=before))
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert _is_png(tmp_path / "pr.png") and _is_png(tmp_path / "s.png")
    if before:
        assert res.stdout.strip() == "svg"
