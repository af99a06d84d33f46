"""Box <-> delta encoding (R-CNN parametrisation), in float32 whatever the input dtype.

For an anchor with centre (xa, ya) and size (wa, ha) and a box (x, y, w, h):

    tx = wx (x - xa) / wa     ty = wy (y - ya) / ha     tw = ww log(w / wa)     th = wh log(h / ha)

Widths are x2 - x1 (no +1), as torchvision and detectron2 do for float boxes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Largest log-scale a decoded box may have relative to its anchor: a box at most 1000/16 = 62.5 times
# its anchor's side. exp() of anything larger overflows float16 and yields meaningless giant boxes.
SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """Encode boxes as deltas relative to anchors and decode them back. Stateless apart from the weights."""

    def __init__(
        self,
        *,
        weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        scale_clamp: float = SCALE_CLAMP,
    ) -> None:
        if len(weights) != 4 or any(w <= 0 for w in weights):
            raise ValueError(f"box coder weights must be 4 positive numbers, got {weights}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """boxes, anchors: (..., 4) XYXY (broadcastable) -> deltas (..., 4) float32."""
        boxes = boxes.float()
        anchors = anchors.float()
        wx, wy, ww, wh = self.weights
        aw = anchors[..., 2] - anchors[..., 0]
        ah = anchors[..., 3] - anchors[..., 1]
        ax = anchors[..., 0] + 0.5 * aw
        ay = anchors[..., 1] + 0.5 * ah
        bw = boxes[..., 2] - boxes[..., 0]
        bh = boxes[..., 3] - boxes[..., 1]
        bx = boxes[..., 0] + 0.5 * bw
        by = boxes[..., 1] + 0.5 * bh
        return torch.stack(
            (wx * (bx - ax) / aw, wy * (by - ay) / ah, ww * torch.log(bw / aw), wh * torch.log(bh / ah)),
            dim=-1,
        )

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """deltas (..., 4), anchors (..., 4) XYXY (broadcastable) -> boxes (..., 4) float32."""
        deltas = deltas.float()  # fp32 for decoding precision: exp() of bf16 deltas is off by pixels
        anchors = anchors.float()
        wx, wy, ww, wh = self.weights
        aw = anchors[..., 2] - anchors[..., 0]
        ah = anchors[..., 3] - anchors[..., 1]
        ax = anchors[..., 0] + 0.5 * aw
        ay = anchors[..., 1] + 0.5 * ah
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = torch.clamp(deltas[..., 2] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[..., 3] / wh, max=self.scale_clamp)
        cx = dx * aw + ax
        cy = dy * ah + ay
        half_w = 0.5 * (torch.exp(dw) * aw)  # same rounding order as torchvision's decode
        half_h = 0.5 * (torch.exp(dh) * ah)
        return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)
