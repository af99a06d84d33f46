"""A tiny Engine on the CPU and a hand-made two-image batch, for the tests of the training core."""

from __future__ import annotations

import torch

from ray_retina.config import Config
from ray_retina.engine.loop import Engine
from ray_retina.model import build_criterion, build_model, build_postprocessor


def make_engine(cfg: Config, seed: int = 0) -> Engine:
    torch.manual_seed(seed)
    model = build_model(cfg, 3)
    return Engine(
        cfg, model, build_criterion(cfg, 3), build_postprocessor(cfg), torch.device("cpu"), [3, 17, 42]
    )


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "images": torch.randint(0, 255, (2, 3, 64, 96), generator=g, dtype=torch.uint8),
        "image_sizes": torch.tensor([[64, 96], [60, 80]]),
        "orig_sizes": torch.tensor([[64, 96], [120, 160]]),
        "gt_boxes": torch.tensor(
            [
                [[4.0, 6.0, 40.0, 50.0], [50.0, 10.0, 90.0, 30.0]],
                [[10.0, 10.0, 30.0, 30.0], [0.0, 0.0, 0.0, 0.0]],
            ]
        ),
        "gt_labels": torch.tensor([[0, 2], [1, -1]]),
        "gt_crowd": torch.zeros(2, 2, dtype=torch.bool),
        "image_id": torch.tensor([1, 2]),
        "scale": torch.tensor([1.0, 0.5]),
    }
