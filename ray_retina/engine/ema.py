"""EMA weights (``optim.ema``): an exponential moving average of the model's weights, as Ultralytics'
``ModelEMA`` and timm's ``ModelEmaV2`` keep it.

After optimizer step number ``u`` (1, 2, ...) every floating-point entry of the state dict (parameters and
BN running statistics) moves as ``ema = d * ema + (1 - d) * weights`` with

    d(u) = decay * (1 - exp(-u / tau))

so the first steps' weights fade fast (d near 0) and the average reaches its full memory after a few tau.
Integer entries (BN's ``num_batches_tracked``) are copied. The copy is fp32 whatever the training precision,
lives on the model's device, is never trained, and is what evaluation, checkpoints (beside the raw weights)
and export use when EMA is on.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn


class ModelEMA:
    """fp32 EMA of ``model``'s state dict; ``model`` is the plain module (unwrapped from DDP / compile)."""

    def __init__(self, model: nn.Module, *, decay: float, tau: float, updates: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.module = copy.deepcopy(model).float().eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.tau = tau
        self.updates = updates

    def decay_at(self, updates: int) -> float:
        """The decay of update number ``updates`` (1-based): ``decay x (1 - exp(-updates / tau))``."""
        return self.decay * (1.0 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` (same architecture, plain module) into the average."""
        self.updates += 1
        d = self.decay_at(self.updates)
        current = model.state_dict()
        for key, avg in self.module.state_dict().items():
            new = current[key].detach()
            if avg.dtype.is_floating_point:
                avg.mul_(d).add_(new.to(avg.dtype), alpha=1.0 - d)
            else:
                avg.copy_(new)

    def state_dict(self) -> dict[str, Any]:
        """``{"state_dict": the EMA weights, "updates": optimizer steps folded in}`` (checkpoint key "ema")."""
        return {"state_dict": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["state_dict"])
        self.updates = int(state["updates"])
