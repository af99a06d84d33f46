"""The pictures of a run: per-class PR curves, detections on val images, the paper's Figure 4.

Written by rank 0 at the end of a run (logged to MLflow) and by ``ray-retina eval --plots``; the drawing
itself is ``plots.py``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

GRID_IMAGES = 16  # val images in the detection grid
FIGURE4_IMAGES = 16  # val images whose anchors feed Figure 4


@torch.no_grad()
def write_run_pictures(
    model: torch.nn.Module,
    postprocess: Any,
    cfg: Any,
    cat_ids: Sequence[int],
    categories: Sequence[Mapping[str, Any]],
    plan: Sequence[Any],
    coco_eval: Any,
    out_dir: str | os.PathLike[str],
    *,
    with_truth: bool = True,
) -> list[Path]:
    """PR curves (from the run's COCO eval), a grid of val images with predicted (and, ``with_truth``, true)
    boxes, and Figure 4 for the model, as PNGs in ``out_dir``; returns their paths. ``plan``: val shard
    files or ``(file, rows)`` pairs (``datasets.eval_plan``)."""
    from ray_retina import plots
    from ray_retina.data.datasets import iter_eval_batches
    from ray_retina.model import build_criterion

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
            preds.append({k: v.float().cpu().numpy() if k != "labels" else v.cpu().numpy() for k, v in d.items()})
            truths.append(
                {"boxes": batch["gt_boxes"][i].numpy(), "labels": batch["gt_labels"][i].numpy()} if with_truth
                else {"boxes": torch.zeros(0, 4).numpy(), "labels": torch.zeros(0).numpy()}
            )  # fmt: skip
    written.append(
        plots.detection_grid(images, preds, truths, [names.get(int(c), str(c)) for c in cat_ids],
                             out / "detections.png", score_thresh=0.3, max_images=GRID_IMAGES)
    )  # fmt: skip
    if with_truth:
        criterion = build_criterion(cfg, len(cat_ids))
        batches = iter_eval_batches(plan, cfg.data, max_images=FIGURE4_IMAGES, cat_ids=label_cats)
        written.append(
            plots.figure4_from_model(model, criterion, batches, cfg.loss.gamma, cfg.loss.alpha, out / "focal_loss_cdf.png")
        )
    model.train(was_training)
    return written
