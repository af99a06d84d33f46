"""A model back from a checkpoint dict: the network, its config and the categories its labels stand for."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from ray_retina.config import Config, apply_overrides, config_from_dict

AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def model_from_state(
    state: Mapping[str, Any], device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, Config, list[int]]:
    """Rebuild the model of a checkpoint dict, in eval mode on ``device``; returns (model, cfg, cat_ids)."""
    from ray_retina.model import build_model

    cfg = config_from_dict(dict(state["config"]), source="checkpoint config")
    cat_ids = [int(c) for c in state["cat_ids"]]
    # The checkpoint holds every weight: look for no initial weights (backbone or a COCO start), which the
    # machine running inference need not have.
    overrides: dict[str, Any] = {"model.backbone_weights": None}
    if "init_from" in type(cfg.model).model_fields:
        overrides["model.init_from"] = None
    model = build_model(apply_overrides(cfg, overrides), len(cat_ids))
    model.load_state_dict(state["model"])
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.to(device).eval(), cfg, cat_ids


def load_checkpoint(
    path: str | os.PathLike[str], *, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, Config, list[int]]:
    """Load a checkpoint: ``(model in eval mode, its Config, cat_ids)``; label i of the model is category
    ``cat_ids[i]``. ``path``: a ``checkpoint.pt`` file, a checkpoint directory holding one, or a run
    directory (its best checkpoint by val/AP); a local path or a URI (``s3://``, ...)."""
    from ray_retina.checkpoint import load_checkpoint_state

    return model_from_state(load_checkpoint_state(path), device)
