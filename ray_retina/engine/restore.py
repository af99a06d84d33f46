"""A model back from a checkpoint dict (the network, its config and the categories its labels stand for), and
a model started from other weights to fine-tune (``model.init_from``: torchvision's COCO RetinaNet or another
run's checkpoint, classes mapped by name)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ray_retina.checkpoint import REQUIRED_KEYS, load_checkpoint_state
from ray_retina.config import Config, ConfigError, ModelSection, apply_overrides, config_from_dict
from ray_retina.data.shards import read_manifest
from ray_retina.model import build_model
from ray_retina.model.backbone import is_weights_name, torchvision_weights_file
from ray_retina.model.torchvision_compat import (
    CLS_WEIGHT,
    TORCHVISION_COCO_CATEGORIES,
    infer_architecture,
    load_torchvision_retinanet,
    match_classes,
    required_settings,
)
from ray_retina.uri import absolute, dir_exists, is_uri, open_input, resolve_uri

logger = logging.getLogger(__name__)


def model_from_state(
    state: Mapping[str, Any], device: torch.device | str = "cpu", *, weights: Literal["ema", "model"] = "ema"
) -> tuple[torch.nn.Module, Config, list[int]]:
    """Rebuild the model of a checkpoint dict, in eval mode on ``device``; returns (model, cfg, cat_ids).

    ``weights``: "ema" loads the checkpoint's EMA weights when it has them (``optim.ema`` on; logged), else
    its trained weights; "model" always the trained weights. This is what eval, predict, export and serving
    load."""
    cfg = config_from_dict(dict(state["config"]), source="checkpoint config")
    cat_ids = [int(c) for c in state["cat_ids"]]
    # The checkpoint holds every weight: look for no initial weights (backbone or a COCO start), which the
    # machine running inference need not have.
    model = build_model(
        apply_overrides(cfg, {"model.backbone_weights": None, "model.init_from": None}), len(cat_ids)
    )
    if weights == "ema" and "ema" in state:
        logger.info("loading the checkpoint's EMA weights (%d updates)", int(state["ema"]["updates"]))
        model.load_state_dict(state["ema"]["state_dict"])
    else:
        model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, cat_ids


# --------------------------------------------------------------------------------------------------------
# Fine-tuning starts (model.init_from): torchvision's RetinaNet weights or another run's checkpoint.

# The model settings a checkpoint's weights fix; the rest of its config (loss, data, optim) may differ.
ARCH_KEYS = (
    "backbone",
    "fpn_channels",
    "head_convs",
    "head_norm",
    "p6_from",
    "anchor_sizes",
    "anchor_scales_per_octave",
    "anchor_aspect_ratios",
    "torchvision_anchors",
    "pixel_mean",
    "pixel_std",
)


@dataclass(frozen=True)
class InitSource:
    """Weights to start from, read once.

    kind: "torchvision" (a torchvision RetinaNet state dict) or "checkpoint" (ours).
    state_dict: the network's weights, torchvision's key layout (ours follows it).
    class_names: the name of each source class index (None for an unnamed one), or None when the source has
        no names: torchvision's 91 COCO slots; our checkpoint's ``cat_names``.
    class_ids: our checkpoint's ``cat_ids`` (matched against the target's ids when a side has no names).
    required: config key -> (value, why) that the model must be built with to take these weights.
    """

    kind: str
    where: str
    state_dict: dict[str, torch.Tensor]
    class_names: list[str | None] | None
    class_ids: list[int] | None
    required: dict[str, tuple[Any, str]]

    @property
    def num_classes(self) -> int:
        return int(infer_architecture(self.state_dict)["num_classes"][0])


def read_init_source(value: str) -> InitSource:
    """Read ``model.init_from``: a torchvision weights name, a state dict file, or a checkpoint (file, dir, run
    dir); local path or URI. Raises FileNotFoundError / ValueError naming ``value`` when it is none of these."""
    where = value
    if is_weights_name(value):
        where = str(torchvision_weights_file(value))
    fs, p = resolve_uri(where)
    if dir_exists(fs, p):
        obj: Any = load_checkpoint_state(where)
    else:
        try:
            with open_input(where) as f:
                data = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"model.init_from: {value} does not exist") from None
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"model.init_from: {value} holds a {type(obj).__name__}, not a state dict or checkpoint"
        )
    if all(k in obj for k in REQUIRED_KEYS):
        model_cfg = dict(obj["config"].get("model", {}))
        defaults = ModelSection().model_dump(mode="json")
        names = obj.get("cat_names")
        return InitSource(
            kind="checkpoint",
            where=where,
            state_dict={k: v for k, v in obj["model"].items() if k not in ("pixel_mean", "pixel_std")},
            class_names=[str(n) for n in names] if names is not None else None,
            class_ids=[int(c) for c in obj["cat_ids"]],
            required={
                f"model.{k}": (model_cfg.get(k, defaults.get(k)), "the checkpoint's config")
                for k in ARCH_KEYS
                if k in model_cfg or k in defaults
            },
        )
    for nested in ("model", "state_dict"):  # a state dict wrapped by a training script
        if CLS_WEIGHT not in obj and isinstance(obj.get(nested), Mapping):
            obj = obj[nested]
    if CLS_WEIGHT not in obj:
        raise ValueError(
            f"model.init_from: {value} is neither a torchvision RetinaNet state dict (no {CLS_WEIGHT}) nor a "
            f"ray-retina checkpoint (keys {', '.join(REQUIRED_KEYS)})"
        )
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    required = required_settings(sd)
    num_classes = int(sd[CLS_WEIGHT].shape[0]) // int(required["num_anchors"][0])
    names = list(TORCHVISION_COCO_CATEGORIES) if num_classes == len(TORCHVISION_COCO_CATEGORIES) else None
    return InitSource("torchvision", where, sd, names, None, required)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return abs(float(a) - float(b)) <= 1e-3 * max(1.0, abs(float(b)))
    return a == b


def _cli_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, bool | list | tuple) else str(v)


def init_mismatches(cfg: Config, source: InitSource) -> list[tuple[str, Any, Any, str]]:
    """The config keys whose values differ from what ``source``'s weights need: (key, ours, needed, why)."""
    m = cfg.model
    out = []
    for key, (need, why) in source.required.items():
        if key == "num_anchors":
            have = m.anchor_scales_per_octave * len(m.anchor_aspect_ratios)
            if have != need:
                out.append(
                    ("model.anchor_scales_per_octave x len(model.anchor_aspect_ratios)", have, need, why)
                )
            continue
        have = getattr(m, key.split(".", 1)[1], None)
        if not _same(have, need):
            out.append((key, have, need, why))
    return out


def _check_matches(cfg: Config, source: InitSource) -> None:
    bad = init_mismatches(cfg, source)
    if not bad:
        return
    what = "torchvision RetinaNet weights" if source.kind == "torchvision" else "a ray-retina checkpoint"
    lines = [
        f"model.init_from={cfg.model.init_from} ({what}) needs the model built as its weights were; "
        "these config keys differ:"
    ]
    lines += [f"  {k}: {have!r}, the weights need {need!r} (from {why})" for k, have, need, why in bad]
    settable = [(k, need) for k, _, need, _ in bad if " " not in k]
    if settable:
        lines.append("set them: --set " + " ".join(f"{k}={_cli_value(v)}" for k, v in settable))
    raise ConfigError("\n".join(lines))


def class_map_for(
    source: InitSource, cat_ids: Sequence[int], cat_names: Sequence[str] | None
) -> tuple[list[int | None], str]:
    """The source class index of each of our labels (None: a new class, prior init), by name where both
    sides have names, else by category id (our checkpoints), else by position when the class counts are
    equal (an unnamed torchvision-format file); and one line saying what matched."""
    targets = list(cat_names) if cat_names is not None else [str(c) for c in cat_ids]
    if source.class_names is not None and cat_names is not None:
        cmap, how = match_classes(targets, source.class_names), "by name"
    elif source.class_ids is not None:
        pos = {c: i for i, c in enumerate(source.class_ids)}
        cmap, how = [pos.get(int(c)) for c in cat_ids], "by category id (a side has no class names)"
    elif source.num_classes == len(targets):
        cmap, how = (
            list(range(len(targets))),
            "by position (the weights name no classes; the counts are equal)",
        )
    else:
        cmap, how = [None] * len(targets), "none (the weights name no classes and the counts differ)"
    src_names = source.class_names or [str(c) for c in (source.class_ids or range(source.num_classes))]
    matched = [
        f"{t}<-{src_names[c]}" if t != src_names[c] else t
        for t, c in zip(targets, cmap, strict=True)
        if c is not None
    ]
    new = [t for t, c in zip(targets, cmap, strict=True) if c is None]
    line = (
        f"model.init_from {source.where}: {len(matched)} of {len(targets)} classes matched {how}: "
        f"{', '.join(matched) or '-'}; new (prior init): {', '.join(new) or '-'}"
    )
    return cmap, line


def check_init(cfg: Config) -> Config:
    """The start-up check, in the driver before Ray Train starts: the weights the run starts from exist and
    fit the model config. ``model.backbone_weights`` given as a torchvision weights name is fetched into
    torch's hub cache (or stops with a one-line message naming the URL and the exact path to put it at);
    ``model.init_from`` is read, its architecture compared with the config (``ConfigError`` naming every
    differing key and what to set) and the class matches logged. Returns ``cfg`` with a local relative
    ``init_from`` made absolute (workers run in other directories)."""
    m = cfg.model
    bw = m.backbone_weights
    if bw is not None and is_weights_name(bw):
        net = bw.split("_Weights", 1)[0].lower()
        if net != m.backbone:
            raise ConfigError(
                f"model.backbone_weights={bw} are weights of {net}, model.backbone is {m.backbone}: "
                f"set model.backbone={net} or other weights"
            )
        if m.init_from is None:
            logger.info("model.backbone_weights %s: %s", bw, torchvision_weights_file(bw))
    if m.init_from is None:
        return cfg
    if bw is not None:
        logger.info("model.init_from loads every layer: model.backbone_weights (%s) is not read", bw)
    init_from = m.init_from
    if not is_uri(init_from) and not is_weights_name(init_from):
        init_from = absolute(init_from)
        cfg = apply_overrides(cfg, {"model.init_from": init_from})
    source = read_init_source(init_from)
    _check_matches(cfg, source)
    cats = sorted(read_manifest(cfg.data.train_shards)["categories"], key=lambda c: int(c["id"]))
    _, line = class_map_for(source, [int(c["id"]) for c in cats], [str(c.get("name", c["id"])) for c in cats])
    logger.info(line)
    return cfg


def init_model_from(
    model: torch.nn.Module,
    cfg: Config,
    cat_ids: Sequence[int],
    cat_names: Sequence[str] | None,
    *,
    log: bool = True,
) -> list[int | None]:
    """Load ``cfg.model.init_from`` into a freshly built ``model`` (in place; before DDP wraps it), mapping
    classes by name (see :func:`class_map_for`); classes without a match keep the head's prior init.
    Returns the class map (source class index of each label, or None)."""
    if cfg.model.init_from is None:
        raise ValueError("model.init_from is not set")
    source = read_init_source(cfg.model.init_from)
    _check_matches(cfg, source)
    cmap, line = class_map_for(source, cat_ids, cat_names)
    if log:
        logger.info(line)
    load_torchvision_retinanet(
        model, source.state_dict, class_map=cmap, torchvision_anchors=source.kind == "torchvision"
    )  # type: ignore[arg-type]
    return cmap
