"""Load torchvision's ``retinanet_resnet50_fpn`` (v1) weights into our RetinaNet.

Our module names follow torchvision's, so the mapping is nearly the identity. What this function adds:
old (pre-0.13) head keys are renamed, the classifier rows can be picked for a subset of torchvision's 91
COCO class slots, BatchNorm bookkeeping keys are dropped, and the anchors are switched to torchvision's.

Our model must be built torchvision-compatible: ``model.backbone = "resnet50"``, ``model.p6_from = "p5"``,
``model.head_norm = "none"``, ``model.head_convs = 4``, ``model.fpn_channels = 256`` (and, for its
training behaviour, ``loss.box_loss = "l1"``, ``loss.normalizer = "per_image"``,
``postprocess.detections_per_img = 300``). Its input normalisation (ImageNet mean/std on 0..1 images) is
our default ``pixel_mean`` / ``pixel_std`` on 0..255 images.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .retinanet import RetinaNet

_OLD_HEAD_KEY = re.compile(r"^(head\.(?:classification|regression)_head\.conv\.\d+)\.(weight|bias)$")


def load_torchvision_retinanet(
    model: RetinaNet,
    state_dict: Mapping[str, Tensor],
    *,
    category_ids: Sequence[int] | None = None,
    torchvision_anchors: bool = True,
) -> RetinaNet:
    """Copy a torchvision RetinaNet state dict into ``model`` (in place; returns it).

    Args:
        model: our RetinaNet built torchvision-compatible (see the module docstring).
        state_dict: ``torchvision.models.detection.retinanet_resnet50_fpn().state_dict()`` or the loaded
            contents of its COCO weights file.
        category_ids: when our model has fewer classes than the state dict (torchvision's COCO weights have
            91 slots indexed by COCO category id), the torchvision class index of each of our contiguous
            labels 0..K-1, e.g. the manifest's sorted COCO category ids. None: class counts must be equal.
        torchvision_anchors: switch the model's anchors to torchvision's (integer sizes, rounded corners),
            the anchors its weights were trained with. Needed for exact parity.
    """
    sd: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        m = _OLD_HEAD_KEY.match(key)
        sd[f"{m.group(1)}.0.{m.group(2)}" if m else key] = value
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}

    ours = model.state_dict()
    num_anchors = model.anchor_generator.num_anchors_per_location
    k_ours = model.num_classes
    w = sd.get("head.classification_head.cls_logits.weight")
    if w is None:
        raise ValueError("state dict has no head.classification_head.cls_logits.weight: not a torchvision RetinaNet")
    k_tv = w.shape[0] // num_anchors
    if k_tv != k_ours:
        if category_ids is None:
            raise ValueError(
                f"the state dict has {k_tv} classes and the model {k_ours}: pass category_ids (the torchvision "
                "class index of each of our labels) to pick the rows"
            )
        if len(category_ids) != k_ours or not all(0 <= c < k_tv for c in category_ids):
            raise ValueError(f"category_ids must be {k_ours} indices in [0, {k_tv}), got {list(category_ids)[:10]}...")
        rows = torch.tensor([a * k_tv + c for a in range(num_anchors) for c in category_ids])
        for name in ("weight", "bias"):
            key = f"head.classification_head.cls_logits.{name}"
            sd[key] = sd[key][rows]

    mismatched = [
        f"{k}: {tuple(v.shape)} vs ours {tuple(ours[k].shape)}"
        for k, v in sd.items()
        if k in ours and ours[k].shape != v.shape
    ]
    if mismatched:
        raise ValueError(
            "shapes differ (is the model built torchvision-compatible: resnet50, p6_from p5, 256 FPN channels, "
            "4 head convs, no GN?): " + "; ".join(mismatched[:5])
        )
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in ("pixel_mean", "pixel_std") and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"state dict does not match: missing {missing[:8]}, unexpected {unexpected[:8]}")
    if torchvision_anchors:
        model.anchor_generator.torchvision_compat = True
    return model
