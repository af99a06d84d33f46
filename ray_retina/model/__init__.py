"""RetinaNet in plain PyTorch: no Ray, MLflow or file formats in here.

model = build_model(cfg, num_classes)          # images (B, 3, H, W) 0..255 -> HeadOutputs
criterion = build_criterion(cfg, num_classes)  # HeadOutputs + padded targets -> losses
postprocess = build_postprocessor(cfg)         # HeadOutputs + image sizes -> detections
"""

from __future__ import annotations

from .anchors import AnchorGenerator
from .backbone import BackboneWithFPN
from .box_coder import SCALE_CLAMP, BoxCoder
from .head import RetinaNetHead
from .matcher import Matcher
from .postprocess import PostProcessor
from .retinanet import (
    HeadOutputs,
    RetinaNet,
    RetinaNetLoss,
    build_criterion,
    build_model,
    build_postprocessor,
)
from .torchvision_compat import load_torchvision_retinanet

__all__ = [
    "AnchorGenerator",
    "BackboneWithFPN",
    "BoxCoder",
    "HeadOutputs",
    "Matcher",
    "PostProcessor",
    "RetinaNet",
    "RetinaNetHead",
    "RetinaNetLoss",
    "SCALE_CLAMP",
    "build_criterion",
    "build_model",
    "build_postprocessor",
    "load_torchvision_retinanet",
]
