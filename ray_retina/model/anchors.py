"""Anchors on P3..P7: 3 scales x 3 aspect ratios = 9 per location (paper section 4).

Level l (stride 2^l, l = 3..7) has base size ``sizes[l - 3]`` (32..512) times the octave scales
2^(i / scales_per_octave), i = 0..scales_per_octave-1, each at aspect ratios h / w in ``aspect_ratios``.
The ordering is torchvision's ``AnchorGenerator``: levels, then rows y, then columns x, then the anchors
of a location with the aspect ratio outer and the scale inner. Head outputs are flattened in the same
order, so a torchvision state dict and its outputs map onto ours one to one.

Anchor centres sit on the top-left corner of each cell, (x * stride, y * stride), as in torchvision and
detectron2 (offset 0).

``torchvision_compat=True`` reproduces torchvision's exact anchors: integer sizes (``int(32 * 2^(1/3))`` =
40 rather than 40.32) and base anchors rounded to integers. The paper's anchors (default) are not rounded.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AnchorGenerator(nn.Module):
    """Anchors for a stack of feature maps, cached per (feature sizes, device, dtype)."""

    def __init__(
        self,
        *,
        sizes: list[float] | tuple[float, ...] = (32, 64, 128, 256, 512),
        scales_per_octave: int = 3,
        aspect_ratios: list[float] | tuple[float, ...] = (0.5, 1.0, 2.0),
        strides: list[int] | tuple[int, ...] = (8, 16, 32, 64, 128),
        torchvision_compat: bool = False,
    ) -> None:
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"need one anchor size per level: {len(sizes)} sizes for {len(strides)} strides")
        if scales_per_octave < 1 or not aspect_ratios or any(a <= 0 for a in aspect_ratios):
            raise ValueError("scales_per_octave must be >= 1 and aspect ratios positive")
        self.sizes = tuple(float(s) for s in sizes)
        self.scales_per_octave = scales_per_octave
        self.aspect_ratios = tuple(float(a) for a in aspect_ratios)
        self.strides = tuple(int(s) for s in strides)
        self.torchvision_compat = torchvision_compat
        self._cache: dict[tuple, Tensor] = {}

    @property
    def torchvision_compat(self) -> bool:
        return self._torchvision_compat

    @torchvision_compat.setter
    def torchvision_compat(self, value: bool) -> None:
        self._torchvision_compat = bool(value)
        self._cache = {}
        self.cell_anchors = [self._cell_anchors(s) for s in self.sizes]

    @property
    def num_anchors_per_location(self) -> int:
        return self.scales_per_octave * len(self.aspect_ratios)

    def _cell_anchors(self, size: float) -> Tensor:
        """(A, 4) zero-centred anchors of one level, ratio-major / scale-minor."""
        octave = [2.0 ** (i / self.scales_per_octave) for i in range(self.scales_per_octave)]
        if self.torchvision_compat:
            scales = torch.tensor([float(int(size * o)) for o in octave])
        else:
            scales = torch.tensor([size * o for o in octave], dtype=torch.float64)
        ratios = torch.tensor(self.aspect_ratios, dtype=scales.dtype)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        base = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
        return base.round() if self.torchvision_compat else base.float()

    def grid_anchors(self, grid_sizes: list[tuple[int, int]], device: torch.device) -> Tensor:
        """(R, 4) float32 anchors for feature maps of the given (h, w) sizes, concatenated over levels."""
        key = (tuple(grid_sizes), str(device))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if len(grid_sizes) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature maps, got {len(grid_sizes)}")
        out = []
        for (gh, gw), stride, base in zip(grid_sizes, self.strides, self.cell_anchors, strict=True):
            shifts_x = torch.arange(gw, dtype=torch.float32, device=device) * stride
            shifts_y = torch.arange(gh, dtype=torch.float32, device=device) * stride
            sy, sx = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shifts = torch.stack((sx.reshape(-1), sy.reshape(-1), sx.reshape(-1), sy.reshape(-1)), dim=1)
            out.append((shifts[:, None, :] + base.to(device)[None, :, :]).reshape(-1, 4))
        anchors = torch.cat(out)
        if len(self._cache) > 32:  # many distinct input sizes (e.g. eval at native size): keep it bounded
            self._cache.clear()
        self._cache[key] = anchors
        return anchors

    def forward(self, features: list[Tensor]) -> tuple[Tensor, list[int]]:
        """Anchors (R, 4) for the feature maps and the number of anchors on each level."""
        sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        anchors = self.grid_anchors(sizes, features[0].device)
        a = self.num_anchors_per_location
        return anchors, [h * w * a for h, w in sizes]
