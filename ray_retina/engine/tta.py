"""Test-time augmentation: horizontal flip and several test scales, merged before one NMS.

Each image is run in every view (``scales`` x {plain, flipped}). From each view we keep the post-process's
candidates, i.e. what the paper's inference keeps before NMS (per level: scores > ``score_thresh``, the top
``topk_candidates``; decoded, clipped, mapped back to original pixels, un-flipped); the candidates of all
views of an image then go through ONE per-class NMS at ``nms_thresh`` and the best ``detections_per_img``
are kept. Merging candidates before NMS (rather than NMS per view, then again on the union) lets the views
vote at the box level: a box found in two views survives once, with the higher score.

The scale-1 plain view is the batch exactly as the plain path sees it, so with ``flip`` off and
``scales: [1.0]`` the result equals :func:`ray_retina.engine.evaluate.detect` without TTA (tested).
Other scales resize the already test-resized images (bilinear, antialiased when shrinking) and pad them
to ``size_divisibility``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ray_retina.model.postprocess import PostProcessor, batched_nms

# Every candidate survives the per-view pass: NMS at IoU > 1 suppresses nothing, and this cap is above
# any count the per-level top-k can produce (levels x topk_candidates).
NO_SUPPRESSION = 1.0
NO_CAP = 1 << 30


def tta_views(scales: Sequence[float], flip: bool) -> list[tuple[float, bool]]:
    """The views in run order: (scale, flipped) for every scale, plain then flipped."""
    return [(float(s), f) for s in scales for f in ((False, True) if flip else (False,))]


def candidate_postprocessor(postprocessor: PostProcessor) -> PostProcessor:
    """The same threshold, top-k and box coder as ``postprocessor``, without NMS or the per-image cap: the
    candidates the paper's inference would pass to NMS."""
    return PostProcessor(
        score_thresh=postprocessor.score_thresh,
        topk_candidates=postprocessor.topk_candidates,
        nms_thresh=NO_SUPPRESSION,
        detections_per_img=NO_CAP,
        box_coder=postprocessor.box_coder,
    )


def view_batch(
    images: Tensor, image_sizes: Tensor, scale: float, flip: bool, size_divisibility: int
) -> tuple[Tensor, Tensor]:
    """One view of a padded batch: ``images`` uint8 (B, 3, H, W) with valid regions ``image_sizes`` (B, 2)
    [h, w] (top-left) -> (uint8 (B, 3, H', W'), sizes (B, 2)). Each valid region is resized by ``scale``
    (sides rounded) and/or mirrored left-right inside its own width; padding stays at the bottom-right."""
    if scale == 1.0 and not flip:
        return images, image_sizes
    sizes = image_sizes.tolist()
    new_sizes = [(max(1, round(h * scale)), max(1, round(w * scale))) for h, w in sizes]
    d = size_divisibility
    hmax = math.ceil(max(h for h, _ in new_sizes) / d) * d
    wmax = math.ceil(max(w for _, w in new_sizes) / d) * d
    out = torch.zeros((images.shape[0], 3, hmax, wmax), dtype=images.dtype, device=images.device)
    for i, ((h, w), (nh, nw)) in enumerate(zip(sizes, new_sizes, strict=True)):
        im = images[i, :, :h, :w]
        if (nh, nw) != (h, w):
            resized = F.interpolate(
                im[None].float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1
            )[0]
            im = resized.round_().clamp_(0, 255).to(images.dtype)
        out[i, :, :nh, :nw] = im.flip(-1) if flip else im
    return out, torch.tensor(new_sizes, dtype=image_sizes.dtype)


def unflip(boxes: Tensor, width: Tensor | float) -> Tensor:
    """XYXY boxes of a left-right mirrored image of ``width`` pixels -> the same boxes in the image."""
    return torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), dim=1)


@torch.no_grad()
def detect_tta(
    forward: Callable[[Tensor], Any],
    postprocessor: PostProcessor,
    batch: Mapping[str, Tensor],
    *,
    scales: Sequence[float],
    flip: bool,
    size_divisibility: int,
    device: torch.device,
) -> list[dict[str, Tensor]]:
    """Detections of a collated batch (``images`` uint8 (B, 3, H, W), ``image_sizes`` (B, 2), ``orig_sizes``
    (B, 2) [height, width]) with test-time augmentation; the output is ``evaluate.detect``'s: per image
    ``boxes`` (D, 4) XYXY float32 in original pixels, ``scores`` (D,) descending, ``labels`` (D,) 0..K-1.

    ``forward`` runs the network on a uint8 batch (the caller's device, autocast and memory format) and
    returns its head outputs; ``postprocessor`` gives the threshold, top-k, NMS IoU and per-image cap."""
    cand_pp = candidate_postprocessor(postprocessor)
    orig = batch["orig_sizes"].to(device)
    per_view: list[list[dict[str, Tensor]]] = []
    for scale, flipped in tta_views(scales, flip):
        images, sizes = view_batch(batch["images"], batch["image_sizes"], scale, flipped, size_divisibility)
        dets = cand_pp(forward(images), sizes.to(device), orig)
        if flipped:
            for i, d in enumerate(dets):
                d["boxes"] = unflip(d["boxes"], orig[i, 1].to(d["boxes"].dtype))
        per_view.append(dets)
    return [
        merge_candidates([v[i] for v in per_view], postprocessor.nms_thresh, postprocessor.detections_per_img)
        for i in range(len(per_view[0]))
    ]


def merge_candidates(
    views: Sequence[Mapping[str, Tensor]], nms_thresh: float, detections_per_img: int
) -> dict[str, Tensor]:
    """One image's candidates from several views (each ``boxes`` (N, 4), ``scores`` (N,), ``labels`` (N,))
    -> per-class NMS over their union, the best ``detections_per_img`` by descending score."""
    boxes = torch.cat([v["boxes"] for v in views])
    scores = torch.cat([v["scores"] for v in views])
    labels = torch.cat([v["labels"] for v in views])
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
