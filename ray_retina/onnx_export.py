"""The network as ONNX and TorchScript, for runtimes without Python or without ray-retina.

    ray-retina export --run <MLflow run id | run dir | checkpoint> --format onnx --out exported/

:func:`export_onnx`: the network, images in, class logits, box deltas and anchors out, batch and image size
dynamic; a JSON file beside it (:func:`onnx_meta`) holds what the graph does not do (resize, padding, anchor
and box coder settings, post-process parameters, categories); and an end-to-end graph for one image with the
post-process inside (NMS as ONNX ``NonMaxSuppression``). :func:`export_torchscript`: the network traced.
Which checkpoint, and the MLflow model: ``export.py``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ray_retina import __version__
from ray_retina.config import config_from_dict
from ray_retina.engine.restore import model_from_state
from ray_retina.model import SCALE_CLAMP
from ray_retina.model.retinanet import build_box_coder
from ray_retina.predict import category_names_of
from ray_retina.serving import (
    DEFAULT_TABLE,
    EVAL_THRESHOLDS,
    THRESHOLDS_KEY,
    class_thresholds,
    threshold_tables,
)

ONNX_FILE = "retinanet.onnx"
END_TO_END_FILE = "retinanet_end2end.onnx"  # one image in, detections out
META_FILE = "retinanet.json"  # beside the .onnx / TorchScript file
TORCHSCRIPT_FILE = "retinanet.torchscript.pt"
ONNX_OPSET = 17  # every op of both graphs (Resize with dynamic sizes, NonMaxSuppression) exports; tested in onnxruntime 1.32

__all__ = ["EndToEndRetinaNet", "ExportableRetinaNet", "export_onnx", "export_torchscript", "onnx_meta"]


def level_anchors(feature: Tensor, stride: int, cell_anchors: Tensor) -> Tensor:
    """``AnchorGenerator``'s anchors (h * w * A, 4) of one feature map, written so that a trace keeps them a
    function of its size (``torch.arange`` of the traced sizes: no ``int()``, no cache)."""
    xs = torch.arange(feature.shape[-1], dtype=torch.float32, device=feature.device) * stride
    ys = torch.arange(feature.shape[-2], dtype=torch.float32, device=feature.device) * stride
    sy, sx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack((sx.reshape(-1), sy.reshape(-1), sx.reshape(-1), sy.reshape(-1)), dim=1)
    return (shifts[:, None, :] + cell_anchors.to(feature.device)[None, :, :]).reshape(-1, 4)


def anchors_of(features: Sequence[Tensor], generator: Any) -> Tensor:
    """The anchors (R, 4) of a stack of feature maps, as ``generator`` (an ``AnchorGenerator``) makes them."""
    return torch.cat(
        [
            level_anchors(f, s, b)
            for f, s, b in zip(features, generator.strides, generator.cell_anchors, strict=True)
        ]
    )


class ExportableRetinaNet(nn.Module):
    """``RetinaNet.forward`` for tracing: ``images`` float32 (B, 3, H, W) RGB 0..255 (resized, padded to
    multiples of ``size_divisibility``) -> ``cls_logits`` (B, R, K), ``box_deltas`` (B, R, 4), ``anchors``
    (R, 4) XYXY in input pixels; R and the anchors follow H and W. Equal to ``RetinaNet.forward`` (tested)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m = self.model
        x = (images.float() - m.pixel_mean) / m.pixel_std
        features = m.backbone(x)
        cls_logits, box_deltas = m.head(features)
        return cls_logits, box_deltas, anchors_of(features, m.anchor_generator)


class EndToEndRetinaNet(nn.Module):
    """One image in, its detections out, post-process included, for ONNX: ``images`` float32 (1, 3, H, W)
    RGB 0..255 padded as for the network, ``image_size`` int64 (2,) [h, w] of the resized image inside the
    padding, ``orig_size`` int64 (2,) [height, width] of the original -> ``boxes`` (D, 4) XYXY in original
    pixels, ``scores`` (D,) descending, ``labels`` (D,) 0..K-1, ``category_ids`` (D,).

    The post-process of ``PostProcessor`` written again in traceable ops, level by level (per level
    ``sigmoid > score_thresh`` and the top ``topk_candidates``; fp32 decode; clip; per-class NMS through
    ``torchvision.ops.batched_nms``, which exports as ``NonMaxSuppression``; the best
    ``detections_per_img``; back to original pixels per axis): equal to :func:`evaluate.detect` (tested).
    Then the operating point: ``class_thresh`` (K,) keeps a detection when its score is above its class's
    threshold (``serving.Detector``'s default table, as the served model applies it; zeros: none)."""

    def __init__(
        self, model: nn.Module, cfg: Any, cat_ids: Sequence[int], class_thresh: Sequence[float] | None = None
    ) -> None:

        super().__init__()
        self.model = model
        self.box_coder = build_box_coder(cfg)
        pc = cfg.postprocess
        self.score_thresh, self.topk, self.nms_thresh = pc.score_thresh, pc.topk_candidates, pc.nms_thresh
        self.detections_per_img = pc.detections_per_img
        self.register_buffer("cat_ids", torch.tensor(list(cat_ids), dtype=torch.int64))
        thresh = [0.0] * len(cat_ids) if class_thresh is None else [float(t) for t in class_thresh]
        self.register_buffer("class_thresh", torch.tensor(thresh, dtype=torch.float32))

    def forward(
        self, images: Tensor, image_size: Tensor, orig_size: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from torchvision.models.detection._utils import _topk_min  # min(k, n) that a trace keeps dynamic
        from torchvision.ops import batched_nms  # deferred with _topk_min above

        m = self.model
        x = (images.float() - m.pixel_mean) / m.pixel_std
        k = m.num_classes
        boxes, scores, labels = [], [], []
        gen = m.anchor_generator
        for f, stride, cell in zip(m.backbone(x), gen.strides, gen.cell_anchors, strict=True):
            cls, deltas = m.head([f])  # the heads are shared over levels: one level at a time
            s = torch.sigmoid(cls[0].float().reshape(-1))  # (R_l * K,), order (anchor, class)
            idx = torch.nonzero(s > self.score_thresh).squeeze(1)
            s, top = s[idx].topk(_topk_min(s[idx], self.topk, 0))
            idx = idx[top]
            anchor = torch.div(idx, k, rounding_mode="floor")
            boxes.append(self.box_coder.decode(deltas[0][anchor], level_anchors(f, stride, cell)[anchor]))
            scores.append(s)
            labels.append(idx - anchor * k)
        b, s, lab = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        hw = image_size.float()
        wh = torch.stack((hw[1], hw[0], hw[1], hw[0]))
        b = torch.minimum(b.clamp(min=0), wh)
        keep = batched_nms(b, s, lab, self.nms_thresh)[: self.detections_per_img]
        o = orig_size.float()
        owh = torch.stack((o[1], o[0], o[1], o[0]))
        b = torch.minimum((b[keep] * (owh / wh)).clamp(min=0), owh)
        s, lab = s[keep], lab[keep]
        above = s > self.class_thresh[lab]
        return b[above], s[above], lab[above], self.cat_ids[lab[above]]


def onnx_meta(
    cfg: Any,
    generator: Any,
    cat_ids: Sequence[int],
    names: Mapping[int, str],
    iteration: int,
    thresholds: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """What the exported graph does not do, for whoever runs it: input preparation, the anchor settings
    (``generator``: the model's ``AnchorGenerator``), box decoding, post-process, the per-class operating
    thresholds (``thresholds``: the checkpoint's tables, ``{"f1": {"<category id>": score}, ...}``) and
    categories (label i of ``cls_logits`` is ``categories[i]``)."""
    # One piece: the JSON that travels beside an exported graph, built field by field in the order it is
    # written, so that a reader sees the whole contract at once.

    d, pc = cfg.data, cfg.postprocess
    return {
        "format": "ray-retina export 1",
        "ray_retina_version": __version__,
        "iteration": int(iteration),
        "onnx_opset": ONNX_OPSET,
        "inputs": {"images": "float32 (B, 3, H, W), RGB 0..255 (mean/std normalisation is inside the graph)"},
        "outputs": {
            "cls_logits": "float32 (B, R, K): sigmoid -> per-class score",
            "box_deltas": "float32 (B, R, 4): (tx, ty, tw, th), decode with box_coder against anchors",
            "anchors": "float32 (R, 4): XYXY in input pixels, the same for every image of the batch",
        },
        "end_to_end": {
            "file": END_TO_END_FILE,
            "inputs": {
                "images": "float32 (1, 3, H, W) as above, one image",
                "image_size": "int64 (2,) [h, w] of the resized image inside the padding",
                "orig_size": "int64 (2,) [height, width] of the original",
            },
            "outputs": {
                "boxes": "float32 (D, 4) XYXY in original pixels",
                "scores": "float32 (D,) descending",
                "labels": "int64 (D,) 0..K-1",
                "category_ids": "int64 (D,) the original category ids",
            },
        },
        "preprocess": {
            "decode": "EXIF orientation applied, any mode to RGB",
            "resize": "bilinear (Pillow) so that the shorter side is test_min_size and the longer <= max_size; "
            "new size = int(side * scale + 0.5) per axis, scale = min(test_min_size / shorter, max_size / longer)",
            "test_min_size": d.test_min_size,
            "max_size": d.max_size,
            "pad": "bottom and right with 0 to multiples of size_divisibility (batch max)",
            "size_divisibility": d.size_divisibility,
        },
        "anchors": {
            "sizes": list(generator.sizes),
            "scales_per_octave": generator.scales_per_octave,
            "aspect_ratios": list(generator.aspect_ratios),
            "strides": list(generator.strides),
            "torchvision_compat": bool(generator.torchvision_compat),
            "order": "level, y, x, aspect ratio, scale; centres at (x * stride, y * stride)",
        },
        "box_coder": {"weights": list(cfg.loss.box_coder_weights), "scale_clamp": SCALE_CLAMP},
        "postprocess": {
            "score_thresh": pc.score_thresh,
            "topk_candidates": pc.topk_candidates,
            "nms_thresh": pc.nms_thresh,
            "detections_per_img": pc.detections_per_img,
            "rule": "per level keep sigmoid > score_thresh, top topk_candidates per image; decode; clip to the "
            "resized image; per-class NMS; best detections_per_img; scale x by width / w and y by height / h",
        },
        "thresholds": {
            "default": DEFAULT_TABLE if DEFAULT_TABLE in (thresholds or {}) else EVAL_THRESHOLDS,
            "tables": threshold_tables(thresholds),
            "rule": "after the post-process keep a detection when its score > its class's threshold in the "
            "default table (a class not in it: 0); 'eval': the post-process's score_thresh only; the "
            "end-to-end graph applies the default table",
        },
        "categories": [
            {"label": i, "id": int(c), "name": str(names.get(int(c), c))} for i, c in enumerate(cat_ids)
        ],
    }


def _example_input(cfg: Any, batch: int = 2) -> Tensor:
    """A trace input of the test size: batch 2 and H != W, so that no dimension is traced as a constant 1 or
    mistaken for another."""
    d = cfg.data.size_divisibility
    h = -(-cfg.data.test_min_size // d) * d
    w = h + d
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(0)) * 255


def _traceable(
    state: Mapping[str, Any], out_dir: str | os.PathLike[str]
) -> tuple[ExportableRetinaNet, Tensor, Path]:
    """The checkpoint's network ready to trace (CPU, float32, contiguous), a trace input, and ``out_dir``
    (created) with the JSON of :func:`onnx_meta` written in it."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, cfg, cat_ids = model_from_state(state, "cpu")
    module = ExportableRetinaNet(model.to(memory_format=torch.contiguous_format)).eval()
    meta = onnx_meta(
        cfg,
        model.anchor_generator,
        cat_ids,
        category_names_of(state),
        int(state.get("iteration", 0)),
        state.get(THRESHOLDS_KEY),
    )
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return module, _example_input(cfg), out


def export_onnx(
    state: Mapping[str, Any], out_dir: str | os.PathLike[str], *, end_to_end: bool = True
) -> list[Path]:
    """Write into ``out_dir`` ``retinanet.onnx`` (the network, dynamic batch, height and width),
    ``retinanet.json`` (:func:`onnx_meta`) and, with ``end_to_end``, ``retinanet_end2end.onnx``
    (:class:`EndToEndRetinaNet`: one image, dynamic height and width, post-process included); returns the
    paths written.

    The TorchScript-based exporter (``dynamo=False``): it needs only ``onnx``; the torch.export-based one
    needs ``onnxscript`` besides."""
    module, example, out = _traceable(state, out_dir)
    written = [out / ONNX_FILE, out / META_FILE]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings(
            "ignore", category=DeprecationWarning
        )  # the legacy exporter says it is legacy
        warnings.filterwarnings(
            "ignore", category=FutureWarning
        )  # torch.jit (under it) says it is deprecated
        # torchvision's batched_nms tests a size in Python (under a trace it takes its traceable branch either
        # way) and _topk_min makes its constant k with torch.tensor: both as they mean it.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            (example,),
            str(written[0]),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["images"],
            output_names=["cls_logits", "box_deltas", "anchors"],
            dynamic_axes={
                "images": {0: "batch", 2: "height", 3: "width"},
                "cls_logits": {0: "batch", 1: "anchors"},
                "box_deltas": {0: "batch", 1: "anchors"},
                "anchors": {0: "anchors"},
            },
        )
        if end_to_end:
            cfg = config_from_dict(dict(state["config"]), source="checkpoint config")
            cat_ids = [int(c) for c in state["cat_ids"]]
            tables = class_thresholds(state, cat_ids)
            e2e = EndToEndRetinaNet(module.model, cfg, cat_ids, tables.get(DEFAULT_TABLE)).eval()
            h, w = example.shape[-2:]
            # image_size inside the padding and an original size of another aspect: no axis mistaken for another
            sizes = (torch.tensor([h - 3, w - 5]), torch.tensor([2 * h + 1, 3 * w - 7]))
            torch.onnx.export(
                e2e,
                (example[:1], *sizes),
                str(out / END_TO_END_FILE),
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=["images", "image_size", "orig_size"],
                output_names=["boxes", "scores", "labels", "category_ids"],
                dynamic_axes={
                    "images": {2: "height", 3: "width"},
                    **{n: {0: "detections"} for n in ("boxes", "scores", "labels", "category_ids")},
                },
            )
            written.append(out / END_TO_END_FILE)
    return written


def export_torchscript(state: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``retinanet.torchscript.pt`` (``torch.jit.trace`` of :class:`ExportableRetinaNet`: sizes stay
    dynamic, as in the ONNX graph; ``torch.jit.load`` or LibTorch) and the same ``retinanet.json``.

    torch 2.14 marks ``torch.jit`` deprecated (a FutureWarning); ``torch.export`` of this module works but
    specialises a feature map of size 1 (images under 2 x 128 px a side), so it is not offered yet."""
    module, example, out = _traceable(state, out_dir)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        traced = torch.jit.trace(module, (example,), check_trace=False)
    traced.save(str(out / TORCHSCRIPT_FILE))
    return [out / TORCHSCRIPT_FILE, out / META_FILE]
