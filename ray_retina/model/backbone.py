"""ResNet / ResNeXt bottom-up (torchvision) + FPN top-down giving P3..P7 (paper section 3.1 and 4).

Module names follow torchvision's ``retinanet_resnet50_fpn`` (``body`` is an ``IntermediateLayerGetter``
over the ResNet, ``fpn`` a ``FeaturePyramidNetwork`` with ``LastLevelP6P7``) so its state dicts load
as they are. The backbone starts from a torchvision-format ResNet state dict when one is given (a local
file, or a torchvision weights name such as ``ResNet50_Weights.IMAGENET1K_V2`` found in torch's hub cache or
downloaded into it), else from random init.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext101_32x8d")
# C3, C4, C5 channels: 2 x the block width for basic blocks, 4 x for bottlenecks.
_C345 = {
    "resnet18": (128, 256, 512),
    "resnet34": (128, 256, 512),
    "resnet50": (512, 1024, 2048),
    "resnet101": (512, 1024, 2048),
    "resnext101_32x8d": (512, 1024, 2048),
}
# freeze_at k freezes the first k stages: 1 the stem (conv1 + bn1), 2 also res2 (layer1), ... 5 all.
_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))


class WeightsUnavailableError(FileNotFoundError):
    """A torchvision weights name whose file is neither in torch's hub cache nor downloadable now; the
    message is one line naming the URL to fetch and the exact path to put the file at."""


def is_weights_name(value: str) -> bool:
    """True for a torchvision weights name (``ResNet50_Weights.IMAGENET1K_V2``), False for a path or URI.
    The rule of ``engine/session.py`` ``_weights_path``, which keeps such names un-absolutised."""
    return "_Weights." in value and "/" not in value and not os.path.exists(value)


def weights_url(name: str) -> str:
    """The download URL torchvision gives a weights name (no network: ``torchvision.models.get_weight``)."""
    try:
        return torchvision.models.get_weight(name).url
    except (ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"{name!r} is not a torchvision weights name ({err})") from None


def weights_cache_path(url: str) -> Path:
    """Where torch's hub keeps the file of ``url``: ``torch.hub.get_dir()/checkpoints/<file name>``
    (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def torchvision_weights_file(name: str, *, url_of: Callable[[str], str] | None = None) -> Path:
    """The local file of torchvision weights ``name``: from torch's hub cache, else downloaded into it with
    its sha256 prefix checked (``torch.hub.load_state_dict_from_url(check_hash=True)``).

    ``url_of``: name -> URL (default :func:`weights_url`; tests point it at a local server). Raises
    :class:`WeightsUnavailableError` when the file is not cached and the download fails (offline, say).
    """
    url = (url_of or weights_url)(name)
    cached = weights_cache_path(url)
    if cached.is_file():
        return cached
    try:
        torch.hub.load_state_dict_from_url(
            url,
            model_dir=str(cached.parent),
            map_location="cpu",
            check_hash=True,
            progress=False,
            weights_only=True,
        )
    # URLError / HTTPError / timeouts are OSErrors; a file whose sha256 does not match its name: RuntimeError.
    except (OSError, RuntimeError, ValueError) as err:
        raise WeightsUnavailableError(
            f"cannot get torchvision weights {name}: not in the cache and the download failed "
            f"({' '.join(str(err).split())}); download {url} and put it at {cached}"
        ) from None
    return cached


def load_backbone_weights(resnet: nn.Module, path: str | Path) -> None:
    """Load a torchvision-format ResNet state dict (``resnet50-0676ba61.pth`` style) from a local file, or
    torchvision weights by name (``ResNet50_Weights.IMAGENET1K_V2``: see :func:`torchvision_weights_file`)."""
    if isinstance(path, str) and is_weights_name(path):
        path = torchvision_weights_file(path)
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"backbone weights file not found: {p} (model.backbone_weights must be a local torchvision-format "
            "state dict or a torchvision weights name such as ResNet50_Weights.IMAGENET1K_V2; null: random init)"
        )
    state = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    # The classifier (fc) is never used; anything else missing means the file is for another network.
    missing = [k for k in missing if not k.startswith("fc.")]
    unexpected = [k for k in unexpected if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"{p} does not match the backbone: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


class BackboneWithFPN(nn.Module):
    """Images (B, 3, H, W) normalised -> [P3, P4, P5, P6, P7], each (B, out_channels, H / 2^l, W / 2^l)."""

    def __init__(
        self,
        *,
        name: str = "resnet50",
        out_channels: int = 256,
        p6_from: str = "c5",
        frozen_bn: bool = True,
        freeze_at: int = 2,
        weights_path: str | None = None,
    ) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
        if p6_from not in ("c5", "p5"):
            raise ValueError(f"p6_from must be 'c5' (paper) or 'p5' (torchvision v1), got {p6_from!r}")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be in 0..5, got {freeze_at}")
        norm_layer = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        resnet = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)
        if weights_path is not None:
            load_backbone_weights(resnet, weights_path)
        for stage in _STAGES[:freeze_at]:
            for module_name in stage:
                getattr(resnet, module_name).requires_grad_(False)
        self.body = IntermediateLayerGetter(
            resnet, return_layers={"layer2": "0", "layer3": "1", "layer4": "2"}
        )

        c3, c4, c5 = _C345[name]
        # torchvision's LastLevelP6P7 infers "from P5" from in == out channels; set it explicitly, so
        # that e.g. a ResNet-18 (C5 = 512) with 512 FPN channels still takes P6 from C5 when asked.
        extra = LastLevelP6P7(c5 if p6_from == "c5" else out_channels, out_channels)
        extra.use_P5 = p6_from == "p5"
        self.fpn = FeaturePyramidNetwork([c3, c4, c5], out_channels, extra_blocks=extra)
        self.out_channels = out_channels
        self.p6_from = p6_from
        self.strides = (8, 16, 32, 64, 128)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats: OrderedDict[str, Tensor] = self.body(x)
        return list(self.fpn(feats).values())


def num_groups(channels: int, preferred: int = 32) -> int:
    """GroupNorm groups: 32 (the GN paper's choice) when it divides the channels, else the gcd; at least 2
    channels per group, so that a 1x1 map (P7 of a small image) of a single image still normalises over
    more than one value (GroupNorm raises otherwise, and a 1-value group would normalise to 0)."""
    g = math.gcd(channels, preferred)
    while g > 1 and channels // g < 2:
        g //= 2
    return g
