"""Head outputs -> detections, for the whole batch at once (paper section 4, "Inference").

Per level: keep scores > ``score_thresh``, then the ``topk_candidates`` best per image; merge the levels,
decode in float32, clip to each image, per-class NMS, keep the ``detections_per_img`` best.

Batched: the threshold and top-k run on (B, R_l * K) at once (top-k only when some image has more than
k candidates, on a (B, max candidates) matrix), and one NMS call serves every image and class by shifting
each (image, class) group's boxes to its own region of the plane (the ``batched_nms`` coordinate trick).
The shifted boxes are float64: offsets up to B * K * (max coordinate + 1) would cost float32 boxes their
sub-pixel bits and flip borderline NMS decisions; in float64 the shift is exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import nms

from .box_coder import BoxCoder


class PostProcessor:
    """``PostProcessor(outputs, image_sizes (B, 2) [h, w]) -> list of B dicts`` with ``boxes`` (D, 4) XYXY
    float32 in input pixels clipped to [0, w] x [0, h], ``scores`` (D,) descending and ``labels`` (D,)
    int64 contiguous 0..K-1."""

    def __init__(
        self,
        *,
        score_thresh: float = 0.05,
        topk_candidates: int = 1000,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        box_coder: BoxCoder | None = None,
    ) -> None:
        if not 0 <= score_thresh <= 1 or not 0 < nms_thresh <= 1 or topk_candidates < 1 or detections_per_img < 1:
            raise ValueError("need 0 <= score_thresh <= 1, 0 < nms_thresh <= 1, topk_candidates >= 1, detections_per_img >= 1")
        self.score_thresh = score_thresh
        self.topk_candidates = topk_candidates
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.box_coder = box_coder or BoxCoder()

    def _logit_prefilter(self) -> float:
        # sigmoid is monotonic: x > logit(t) pre-selects candidates without a sigmoid over all B*R*K
        # logits. A small margin keeps every entry whose float32 sigmoid could exceed t; the exact test
        # ``sigmoid(x) > t`` (torchvision's) is then applied to the few candidates.
        t = self.score_thresh
        if t <= 0:
            return -math.inf
        if t >= 1:
            return math.inf
        return math.log(t / (1 - t)) - 1e-3

    @torch.no_grad()
    def __call__(self, outputs: Any, image_sizes: Tensor) -> list[dict[str, Tensor]]:
        logits, deltas, anchors = outputs.cls_logits, outputs.box_deltas, outputs.anchors
        num_anchors_per_level = list(outputs.num_anchors_per_level)
        b, r, k = logits.shape
        device = logits.device
        with torch.autocast(device_type=device.type, enabled=False):
            pre = self._logit_prefilter()
            all_b, all_anchor, all_label, all_score = [], [], [], []
            start = 0
            for n in num_anchors_per_level:
                flat = logits[:, start : start + n].reshape(b, n * k)
                bi, fi = (flat > pre).nonzero(as_tuple=True)
                scores = torch.sigmoid(flat[bi, fi].float())
                keep = scores > self.score_thresh
                bi, fi, scores = bi[keep], fi[keep], scores[keep]
                sel = self._topk_per_image(bi, scores, b)
                if sel is not None:
                    bi, fi, scores = bi[sel], fi[sel], scores[sel]
                all_b.append(bi)
                all_anchor.append(start + torch.div(fi, k, rounding_mode="floor"))
                all_label.append(fi % k)
                all_score.append(scores)
                start += n
            bi = torch.cat(all_b)
            ai = torch.cat(all_anchor)
            labels = torch.cat(all_label)
            scores = torch.cat(all_score)

            boxes = self.box_coder.decode(deltas[bi, ai], anchors[ai])  # fp32 decode
            sizes = image_sizes.to(device=device, dtype=torch.float32)[bi]  # (M, 2) [h, w]
            boxes = torch.stack(
                (
                    boxes[:, 0].clamp(min=0).minimum(sizes[:, 1]),
                    boxes[:, 1].clamp(min=0).minimum(sizes[:, 0]),
                    boxes[:, 2].clamp(min=0).minimum(sizes[:, 1]),
                    boxes[:, 3].clamp(min=0).minimum(sizes[:, 0]),
                ),
                dim=1,
            )

            keep = self._nms(boxes, scores, bi * k + labels)  # sorted by decreasing score
            # Group by image (stable: each image's detections stay in score order), keep the first D.
            order = torch.sort(bi[keep], stable=True).indices
            keep = keep[order]
            kb = bi[keep]
            counts = torch.bincount(kb, minlength=b)
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(kb.numel(), device=device) - starts[kb]
            keep = keep[rank < self.detections_per_img]
            per_image = torch.clamp(counts, max=self.detections_per_img).tolist()

            out = []
            for bx, sc, lb in zip(
                boxes[keep].split(per_image), scores[keep].split(per_image), labels[keep].split(per_image), strict=True
            ):
                out.append({"boxes": bx, "scores": sc, "labels": lb})
        return out

    def _topk_per_image(self, bi: Tensor, scores: Tensor, b: int) -> Tensor | None:
        """Indices (into the candidate list, grouped by image) of each image's top-k; None if all fit."""
        if bi.numel() == 0:
            return None
        counts = torch.bincount(bi, minlength=b)
        most = int(counts.max())
        if most <= self.topk_candidates:
            return None
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(bi.numel(), device=bi.device) - starts[bi]
        mat = torch.full((b, most), -1.0, device=bi.device)  # scores are > 0 > -1: padding never wins
        mat[bi, pos] = scores
        top_v, top_i = mat.topk(self.topk_candidates, dim=1)
        sel = (starts[:, None] + top_i)[top_v >= 0]
        return sel

    def _nms(self, boxes: Tensor, scores: Tensor, groups: Tensor) -> Tensor:
        if boxes.numel() == 0:
            return torch.empty((0,), dtype=torch.int64, device=boxes.device)
        boxes64 = boxes.double()
        offsets = groups.double() * (boxes64.max() + 1)
        return nms(boxes64 + offsets[:, None], scores.double(), self.nms_thresh)
