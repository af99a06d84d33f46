"""Anchor <-> ground-truth assignment by IoU, for a whole batch at once.

Each anchor takes the GT box it overlaps most. With IoU >= ``fg_iou_thresh`` it is foreground, below
``bg_iou_thresh`` background, in between ignored (paper: 0.5 / 0.4). With ``allow_low_quality_matches``
an anchor that is the best anchor of some GT box (ties included) is made foreground even below the
threshold, matched to *its own* best GT; this is the rule of torchvision's and detectron2's ``Matcher``,
so that no GT box is left without an anchor.

One deliberate difference from both: a GT box whose best IoU is 0 (degenerate, or outside every anchor)
adds no low-quality matches. Their rule would make every anchor with IoU 0 to it, i.e. nearly all
anchors, foreground.

Crowd boxes never become foreground; anchors with IoU >= ``bg_iou_thresh`` to a crowd box (that are not
already foreground for a normal box) are ignored rather than trained as background.

The IoU matrix is (B, R, G): 2 images x 120k anchors x 500 GT would be 480 MB of float32 (and several
temporaries of that size), so it is computed over chunks of GT columns with a running max; the chunk is
sized to keep about ``chunk_elems`` IoU entries alive at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

FOREGROUND = 1
BACKGROUND = 0
IGNORE = -1


def box_area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_iou(anchors: Tensor, boxes: Tensor) -> Tensor:
    """IoU of anchors (R, 4) with a batch of boxes (B, G, 4) -> (B, R, G), torchvision's arithmetic."""
    area_a = box_area(anchors)  # (R,)
    area_b = box_area(boxes)  # (B, G)
    lt = torch.max(anchors[None, :, None, :2], boxes[:, None, :, :2])
    rb = torch.min(anchors[None, :, None, 2:], boxes[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[None, :, None] + area_b[:, None, :] - inter
    return inter / union


class Matcher:
    """Batched IoU matcher. Call with anchors (R, 4), gt_boxes (B, G, 4), gt_valid (B, G) bool and
    optionally gt_crowd (B, G) bool; returns ``matched_idxs`` (B, R) int64 in [0, G) (0 where nothing
    matched) and ``match_labels`` (B, R) int8 in {1 foreground, 0 background, -1 ignore}."""

    def __init__(
        self,
        *,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.4,
        allow_low_quality_matches: bool = True,
        chunk_elems: int = 1 << 22,
    ) -> None:
        if not 0 <= bg_iou_thresh <= fg_iou_thresh <= 1:
            raise ValueError(f"need 0 <= bg_iou_thresh <= fg_iou_thresh <= 1, got {bg_iou_thresh}, {fg_iou_thresh}")
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.allow_low_quality_matches = allow_low_quality_matches
        self.chunk_elems = chunk_elems

    @torch.no_grad()
    def __call__(
        self, anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor, gt_crowd: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        anchors = anchors.float()
        gt_boxes = gt_boxes.float()
        b, g = gt_valid.shape
        r = anchors.shape[0]
        device = anchors.device
        if gt_crowd is None:
            gt_crowd = torch.zeros_like(gt_valid)
        # A degenerate GT box (zero or negative width/height) can match nothing; drop it here.
        nondegenerate = (gt_boxes[..., 2] > gt_boxes[..., 0]) & (gt_boxes[..., 3] > gt_boxes[..., 1])
        matchable = gt_valid & ~gt_crowd & nondegenerate
        crowd = gt_valid & gt_crowd & nondegenerate

        best_iou = torch.full((b, r), -1.0, device=device)
        best_idx = torch.zeros((b, r), dtype=torch.int64, device=device)
        if g == 0:
            labels = torch.zeros((b, r), dtype=torch.int8, device=device)
            return best_idx, labels
        has_crowd = bool(crowd.any())
        crowd_iou = torch.zeros((b, r), device=device) if has_crowd else None
        gt_best = torch.full((b, g), -1.0, device=device)  # best IoU of each GT over the anchors

        step = max(1, min(g, self.chunk_elems // max(1, b * r)))
        chunks = [(lo, min(g, lo + step)) for lo in range(0, g, step)]
        cached: Tensor | None = None
        for lo, hi in chunks:
            iou = pairwise_iou(anchors, gt_boxes[:, lo:hi])  # (B, R, g)
            if has_crowd:
                c = iou.masked_fill(~crowd[:, None, lo:hi], 0.0).amax(dim=2)
                torch.maximum(crowd_iou, c, out=crowd_iou)
            iou.masked_fill_(~matchable[:, None, lo:hi], -1.0)
            vals, idx = iou.max(dim=2)  # first max on ties, as torch.max / torchvision
            better = vals > best_iou  # strict: an earlier chunk keeps its GT on ties
            best_iou = torch.where(better, vals, best_iou)
            best_idx = torch.where(better, idx + lo, best_idx)
            gt_best[:, lo:hi] = iou.amax(dim=1)
            if len(chunks) == 1:
                cached = iou

        labels = torch.full((b, r), BACKGROUND, dtype=torch.int8, device=device)
        labels[best_iou >= self.bg_iou_thresh] = IGNORE
        labels[best_iou >= self.fg_iou_thresh] = FOREGROUND

        if self.allow_low_quality_matches:
            # GTs that take part: valid, non-crowd, with a positive best IoU (see module docstring).
            gt_best_ok = torch.where(matchable & (gt_best > 0), gt_best, torch.full_like(gt_best, 2.0))
            low_quality = torch.zeros((b, r), dtype=torch.bool, device=device)
            for lo, hi in chunks:
                iou = cached if cached is not None else pairwise_iou(anchors, gt_boxes[:, lo:hi]).masked_fill_(
                    ~matchable[:, None, lo:hi], -1.0
                )
                low_quality |= (iou == gt_best_ok[:, None, lo:hi]).any(dim=2)
            labels[low_quality] = FOREGROUND

        if has_crowd:
            labels[(crowd_iou >= self.bg_iou_thresh) & (labels != FOREGROUND)] = IGNORE
        return best_idx, labels
