"""Load torchvision's ``retinanet_resnet50_fpn`` (v1) weights into our RetinaNet, mapping classes by name.

Our module names follow torchvision's, so the mapping is nearly the identity. What this module adds:
old (pre-0.13) head keys are renamed, the classifier rows are picked per class (by COCO slot, or by class
name through :func:`match_classes`; classes without a match keep the head's own prior init), BatchNorm
bookkeeping keys are dropped, the anchors are switched to torchvision's, and :func:`required_settings`
reads from a state dict which config the model must be built with.

Our model must be built torchvision-compatible: ``model.backbone = "resnet50"``, ``model.p6_from = "p5"``,
``model.head_norm = "none"``, ``model.head_convs = 4``, ``model.fpn_channels = 256``,
``model.torchvision_anchors = true`` (and, for its training behaviour, ``loss.box_loss = "l1"``,
``loss.normalizer = "per_image"``, ``postprocess.detections_per_img = 300``). Its input normalisation
(ImageNet mean/std on 0..1 images) is our default ``pixel_mean`` / ``pixel_std`` on 0..255 images.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from .retinanet import RetinaNet

_OLD_HEAD_KEY = re.compile(r"^(head\.(?:classification|regression)_head\.conv\.\d+)\.(weight|bias)$")
CLS_WEIGHT = "head.classification_head.cls_logits.weight"
CLS_BIAS = "head.classification_head.cls_logits.bias"
BOX_WEIGHT = "head.regression_head.bbox_reg.weight"


def _coco_slots() -> tuple[str, ...]:
    # torchvision's 91 COCO slots (index = COCO category id; "__background__" at 0 and "N/A" for the 11 ids
    # COCO never used), the `categories` of its detection weights' meta. A private module: read it once here.
    from torchvision.models._meta import _COCO_CATEGORIES

    return tuple(_COCO_CATEGORIES)


TORCHVISION_COCO_CATEGORIES: tuple[str, ...] = _coco_slots()
NOT_A_CLASS = frozenset({"__background__", "N/A"})

# Pascal VOC's names of the COCO classes that COCO spells otherwise (after normalisation: lower case, letters
# and digits only, so that "diningtable" / "dining table" and "pottedplant" / "potted plant" already agree).
NAME_ALIASES: dict[str, str] = {
    "aeroplane": "airplane",
    "motorbike": "motorcycle",
    "sofa": "couch",
    "tvmonitor": "tv",
}

# What torchvision's RetinaNet weights were trained with beyond the layers a state dict shows: its anchors
# (integer sizes 32..512 x 3 scales x 3 ratios, rounded corners) and its ImageNet normalisation (of 0..1
# images, i.e. these values on 0..255). Config key -> value.
TORCHVISION_SETTINGS: dict[str, Any] = {
    "model.torchvision_anchors": True,
    "model.anchor_sizes": [32, 64, 128, 256, 512],
    "model.anchor_scales_per_octave": 3,
    "model.anchor_aspect_ratios": [0.5, 1.0, 2.0],
    "model.pixel_mean": [123.675, 116.28, 103.53],
    "model.pixel_std": [58.395, 57.12, 57.375],
}


def canonical_name(name: str) -> str:
    """The form class names are compared in: lower case, letters and digits only, VOC spellings as COCO's."""
    key = "".join(ch for ch in str(name).lower() if ch.isalnum())
    return NAME_ALIASES.get(key, key)


def match_classes(target_names: Sequence[str], source_names: Sequence[str | None]) -> list[int | None]:
    """For each target class, the index of the source class of the same name (:func:`canonical_name`), or
    None. Source entries that are None, "__background__" or "N/A" (torchvision's empty COCO slots) never match;
    when two source classes share a name the first wins."""
    index: dict[str, int] = {}
    for i, name in enumerate(source_names):
        if name is not None and name not in NOT_A_CLASS:
            index.setdefault(canonical_name(name), i)
    return [index.get(canonical_name(n)) for n in target_names]


def normalise_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Old (pre-0.13) head keys renamed to ``conv.<i>.0.*``, BatchNorm ``num_batches_tracked`` dropped.
    (Old FPN keys are renamed by torchvision's ``FeaturePyramidNetwork`` itself when loading.)"""
    sd: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        m = _OLD_HEAD_KEY.match(key)
        sd[f"{m.group(1)}.0.{m.group(2)}" if m else key] = value
    return sd


def _first(sd: Mapping[str, Tensor], *keys: str) -> tuple[str, Tensor] | None:
    for k in keys:
        if k in sd:
            return k, sd[k]
    return None


def infer_architecture(state_dict: Mapping[str, Tensor]) -> dict[str, tuple[Any, str]]:
    """The model settings a torchvision-layout RetinaNet state dict was built with, read from its keys and
    shapes: config key -> (value, the state-dict keys that show it). Keys it cannot tell are left out;
    ``num_anchors`` and ``num_classes`` (per location, from the head's last convs) are included as if keys."""
    sd = normalise_state_dict(state_dict)
    if CLS_WEIGHT not in sd or BOX_WEIGHT not in sd:
        raise ValueError(f"not a torchvision-layout RetinaNet state dict: no {CLS_WEIGHT} / {BOX_WEIGHT}")
    out: dict[str, tuple[Any, str]] = {}
    body = "backbone.body."
    blocks3 = {int(k.split(".")[3]) for k in sd if k.startswith(body + "layer3.")}
    bottleneck = f"{body}layer1.0.conv3.weight" in sd
    conv2 = sd.get(f"{body}layer1.0.conv2.weight")
    grouped = conv2 is not None and conv2.shape[1] != conv2.shape[0]
    kind = "grouped bottleneck" if grouped else "bottleneck" if bottleneck else "basic"
    name = {
        ("basic", 2): "resnet18",
        ("basic", 6): "resnet34",
        ("bottleneck", 6): "resnet50",
        ("bottleneck", 23): "resnet101",
        ("grouped bottleneck", 23): "resnext101_32x8d",
    }.get((kind, len(blocks3)))
    if name is not None:
        out["model.backbone"] = (name, f"{body}layer3.* ({len(blocks3)} {kind} blocks)")
    layer = _first(sd, "backbone.fpn.layer_blocks.0.0.weight", "backbone.fpn.layer_blocks.0.weight")
    if layer is not None:
        out["model.fpn_channels"] = (int(layer[1].shape[0]), f"{layer[0]} {tuple(layer[1].shape)}")
    p6 = sd.get("backbone.fpn.extra_blocks.p6.weight")
    c5 = sd.get(f"{body}layer4.0.conv1.weight")  # its input channels are C4's; C5 = 2x C4 for ResNets
    if p6 is not None and layer is not None and c5 is not None:
        c5_channels = 2 * int(c5.shape[1])
        if c5_channels != int(layer[1].shape[0]):  # equal: P5 and C5 inputs look the same, cannot tell
            src = "p5" if p6.shape[1] == layer[1].shape[0] else "c5"
            out["model.p6_from"] = (src, f"backbone.fpn.extra_blocks.p6.weight {tuple(p6.shape)}")
    head = "head.classification_head.conv."
    convs = sorted({int(k[len(head) :].split(".")[0]) for k in sd if k.startswith(head)})
    out["model.head_convs"] = (len(convs), f"{head}0..{len(convs) - 1}" if convs else f"no {head}*")
    gn = f"{head}0.1.weight" in sd
    out["model.head_norm"] = (
        "gn" if gn else "none",
        f"{head}0.1.weight (GroupNorm)" if gn else f"{head}0.0.bias",
    )
    num_anchors = int(sd[BOX_WEIGHT].shape[0]) // 4
    out["num_anchors"] = (num_anchors, f"{BOX_WEIGHT} {tuple(sd[BOX_WEIGHT].shape)}")
    out["num_classes"] = (
        int(sd[CLS_WEIGHT].shape[0]) // num_anchors,
        f"{CLS_WEIGHT} {tuple(sd[CLS_WEIGHT].shape)}",
    )
    return out


def required_settings(state_dict: Mapping[str, Tensor]) -> dict[str, tuple[Any, str]]:
    """Config key -> (value, why) that a model must be built with to take torchvision RetinaNet weights:
    what the state dict shows (:func:`infer_architecture`) and torchvision's anchors and normalisation."""
    arch = infer_architecture(state_dict)
    req = {k: v for k, v in arch.items() if k.startswith("model.")}
    req.update({k: (v, "torchvision's RetinaNet") for k, v in TORCHVISION_SETTINGS.items()})
    req["num_anchors"] = arch["num_anchors"]
    return req


def load_torchvision_retinanet(
    model: RetinaNet,
    state_dict: Mapping[str, Tensor],
    *,
    category_ids: Sequence[int] | None = None,
    class_map: Sequence[int | None] | None = None,
    torchvision_anchors: bool = True,
) -> RetinaNet:
    """Copy a torchvision RetinaNet state dict into ``model`` (in place; returns it).

    Args:
        model: our RetinaNet built torchvision-compatible (see the module docstring).
        state_dict: ``torchvision.models.detection.retinanet_resnet50_fpn().state_dict()``, the loaded
            contents of its COCO weights file, or one of our checkpoints' ``"model"`` (same layout).
        category_ids: when our model has fewer classes than the state dict (torchvision's COCO weights have
            91 slots indexed by COCO category id), the torchvision class index of each of our contiguous
            labels 0..K-1, e.g. the manifest's sorted COCO category ids. None: class counts must be equal.
        class_map: instead of ``category_ids``, the source class index of each of our labels or None: the
            classifier rows of a None label keep the model's own init (the head's N(0, 0.01^2) weights and
            prior bias -log((1 - pi) / pi)), so a new class starts as the paper starts every class.
            Build it by name with :func:`match_classes`.
        torchvision_anchors: switch the model's anchors to torchvision's (integer sizes, rounded corners),
            the anchors its weights were trained with. Needed for exact parity.
    """
    if category_ids is not None and class_map is not None:
        raise ValueError("pass category_ids or class_map, not both")
    sd = normalise_state_dict(state_dict)
    ours = model.state_dict()
    num_anchors = model.anchor_generator.num_anchors_per_location
    k_ours = model.num_classes
    w = sd.get(CLS_WEIGHT)
    if w is None:
        raise ValueError(f"state dict has no {CLS_WEIGHT}: not a torchvision RetinaNet")
    k_tv = w.shape[0] // num_anchors
    if category_ids is not None:
        class_map = list(category_ids)
    elif class_map is None and k_tv != k_ours:
        raise ValueError(
            f"the state dict has {k_tv} classes and the model {k_ours}: pass category_ids (the torchvision "
            "class index of each of our labels) or class_map to pick the rows"
        )
    if class_map is not None:
        if len(class_map) != k_ours or not all(c is None or 0 <= c < k_tv for c in class_map):
            raise ValueError(
                f"class_map / category_ids must be {k_ours} indices in [0, {k_tv}) or None, got "
                f"{list(class_map)[:10]}..."
            )
        if w.shape[0] != num_anchors * k_tv:
            raise ValueError(f"{CLS_WEIGHT} {tuple(w.shape)} is not {num_anchors} anchors x classes")
        # Row a * K + k of the last conv is anchor a, class k (torchvision's order, and ours).
        for name in ("weight", "bias"):
            key = f"head.classification_head.cls_logits.{name}"
            rows = ours[key].detach().clone()
            for k, c in enumerate(class_map):
                if c is not None:
                    rows[k::k_ours] = sd[key][c::k_tv].to(rows.dtype)
            sd[key] = rows

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
    missing = [
        k for k in missing if k not in ("pixel_mean", "pixel_std") and not k.endswith("num_batches_tracked")
    ]
    if missing or unexpected:
        raise ValueError(f"state dict does not match: missing {missing[:8]}, unexpected {unexpected[:8]}")
    if torchvision_anchors:
        model.anchor_generator.torchvision_compat = True
    return model
