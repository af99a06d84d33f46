"""Classification and box subnets, shared over the pyramid levels (paper section 4, Figure 3).

Each subnet: ``num_convs`` x (3x3 conv, C channels [+ GroupNorm] + ReLU), then a 3x3 conv to K*A
(classification, read through a sigmoid) or 4*A (class-agnostic box deltas). New convs are initialised
N(0, 0.01^2) with bias 0; the last classification bias is b = -log((1 - pi) / pi) so that every anchor
starts with foreground probability pi (section 4.1 "Initialization"): without it, the ~100k easy
negatives dominate the first iterations' loss and training diverges.

Module names match torchvision's ``RetinaNetHead`` (``classification_head.conv.0.0``, ``cls_logits``,
``regression_head.bbox_reg``) so its weights load unchanged.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.ops.misc import Conv2dNormActivation

from .backbone import num_groups


def _trunk(channels: int, num_convs: int, norm: str) -> nn.Sequential:
    norm_layer = partial(nn.GroupNorm, num_groups(channels)) if norm == "gn" else None
    return nn.Sequential(
        *[Conv2dNormActivation(channels, channels, norm_layer=norm_layer) for _ in range(num_convs)]
    )


def _flatten(x: Tensor, per_anchor: int) -> Tensor:
    """(B, A * c, H, W) -> (B, H * W * A, c), order (y, x, anchor) as torchvision."""
    b, _, h, w = x.shape
    return x.view(b, -1, per_anchor, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, per_anchor)


class RetinaNetClassificationHead(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        prior: float = 0.01,
        num_convs: int = 4,
        norm: str = "none",
    ) -> None:
        super().__init__()
        if not 0 < prior < 1:
            raise ValueError(f"prior (pi) must be in (0, 1), got {prior}")
        self.conv = _trunk(in_channels, num_convs, norm)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, kernel_size=3, padding=1)
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.prior = prior
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.0)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - self.prior) / self.prior))

    def forward(self, features: list[Tensor]) -> Tensor:
        """[P3..P7] -> logits (B, R, K)."""
        return torch.cat([_flatten(self.cls_logits(self.conv(f)), self.num_classes) for f in features], dim=1)


class RetinaNetRegressionHead(nn.Module):
    def __init__(self, *, in_channels: int, num_anchors: int, num_convs: int = 4, norm: str = "none") -> None:
        super().__init__()
        self.conv = _trunk(in_channels, num_convs, norm)
        self.bbox_reg = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=3, padding=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.0)

    def forward(self, features: list[Tensor]) -> Tensor:
        """[P3..P7] -> deltas (B, R, 4)."""
        return torch.cat([_flatten(self.bbox_reg(self.conv(f)), 4) for f in features], dim=1)


class RetinaNetHead(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        prior: float = 0.01,
        num_convs: int = 4,
        norm: str = "none",
    ) -> None:
        super().__init__()
        if norm not in ("none", "gn"):
            raise ValueError(f"head norm must be 'none' or 'gn', got {norm!r}")
        self.classification_head = RetinaNetClassificationHead(
            in_channels=in_channels,
            num_anchors=num_anchors,
            num_classes=num_classes,
            prior=prior,
            num_convs=num_convs,
            norm=norm,
        )
        self.regression_head = RetinaNetRegressionHead(
            in_channels=in_channels, num_anchors=num_anchors, num_convs=num_convs, norm=norm
        )

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        return self.classification_head(features), self.regression_head(features)
