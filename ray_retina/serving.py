"""What a served model runs: encoded images in, checked against limits, decoded, detected, thresholded.

The MLflow model (:class:`RetinaNetModel`, shipped with this package through ``code_paths``), ``ray-retina
serve`` (``serve.py``, Ray Serve), ``ray-retina predict`` and the tests all detect through
:class:`Detector`, so their detections are equal. This module imports nothing driver-only (no tracking,
export, CLI or Ray Train code).

A request: encoded JPEG/PNG images (bytes, or base64 strings as JSON carries them) and params
(:class:`RequestParams`). Per image, in order:

1. the header is read (no pixel decoded) and the image refused when it is not an image or has more than
   ``serve.max_pixels`` pixels; a request with more than ``serve.max_images`` images is refused whole;
2. the image is decoded by the one decoder policy (``data/decode.py``) and resized to the checkpoint's test
   size as evaluation does (``augment_batch(train=False)``: shorter side ``data.test_min_size``, longer side at
   most ``data.max_size``, so even a 1 x 1 image becomes no more than ``test_min_size``-square);
3. images with the same padded shape go through the network together, at most ``batch_size`` at a time
   (an image's detections never depend on what it shares a batch with: the same padding as alone);
4. the post-process (score > the eval threshold ``postprocess.score_thresh``, per-class NMS, the best
   ``detections_per_img``), boxes back to original pixels;
5. the operating point: a detection is kept when its score is above the request's ``score_thresh`` and above
   its class's threshold from the checkpoint's ``thresholds`` table (``"f1"`` by default when the checkpoint
   has one; ``thresholds="eval"`` keeps the post-process's threshold only).

A refused request raises :class:`RequestError` (an ``MlflowException`` with ``INVALID_PARAMETER_VALUE``):
``mlflow models serve`` and ``ray-retina serve`` answer it as HTTP 400 with its message.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from PIL import Image, ImageDraw

from ray_retina.config import Config, ConfigError, ServeSection, apply_overrides, config_from_dict
from ray_retina.data.augment import augment_batch, object_array
from ray_retina.data.collate import pad_images
from ray_retina.data.decode import header_size
from ray_retina.engine.evaluate import AMP_DTYPES, detect
from ray_retina.engine.restore import model_from_state
from ray_retina.model import build_postprocessor

INPUT_COLUMN = "image"
OUTPUT_COLUMNS: tuple[str, ...] = (
    "image_index",
    "category_id",
    "category_name",
    "score",
    "x1",
    "y1",
    "x2",
    "y2",  # XYXY, original-image pixels
    "bbox_x",
    "bbox_y",
    "bbox_w",
    "bbox_h",  # COCO XYWH of the same box
)
MODEL_ARTIFACT = "checkpoint"  # the artifact key of the model file inside the MLflow model
MODEL_FILE = "checkpoint.pt"  # a slim checkpoint: loads with checkpoint.load_checkpoint_state too
THRESHOLDS_KEY = "thresholds"  # checkpoint key: {"f1": {"<category id>": score}, "precision": {...}}
EVAL_THRESHOLDS = "eval"  # the post-process's own threshold, no per-class table
DEFAULT_TABLE = "f1"  # the per-class table a served model applies by default when the checkpoint has it

__all__ = [
    "Detector",
    "RequestError",
    "RequestParams",
    "RetinaNetModel",
    "detect_images",
    "images_of",
]


class RequestError(MlflowException):
    """A request the served model refuses (bad image, a limit exceeded, a bad param): HTTP 400 under
    ``mlflow models serve`` (``INVALID_PARAMETER_VALUE``) and under ``ray-retina serve``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


# ----------------------------------------------------------------------------------------- request parsing


def _image_bytes(value: Any, index: int) -> bytes:
    """One cell of the ``image`` column as bytes: bytes as they are, a str as base64 (what JSON carries)."""
    if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError) as err:
            raise RequestError(f"image {index}: a string that is not base64: {err}") from None
    raise RequestError(f"image {index}: expected encoded image bytes, got {type(value).__name__}")


def images_of(model_input: Any) -> list[bytes]:
    """The encoded images of a pyfunc input: a DataFrame with a column ``image`` (or a single column), a
    dict ``{"image": [...]}``, or a list of bytes / base64 strings."""
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN in model_input.columns:
            column = model_input[INPUT_COLUMN]
        elif len(model_input.columns) == 1:
            column = model_input.iloc[:, 0]
        else:
            raise RequestError(
                f"expected a column {INPUT_COLUMN!r} of encoded images, got {list(model_input.columns)}"
            )
        values = column.tolist()
    elif isinstance(model_input, Mapping):
        if INPUT_COLUMN not in model_input:
            raise RequestError(f"expected a key {INPUT_COLUMN!r} of encoded images, got {list(model_input)}")
        values = list(model_input[INPUT_COLUMN])
    elif isinstance(model_input, (bytes, bytearray, str)):
        values = [model_input]
    else:
        values = list(model_input)
    return [_image_bytes(v, i) for i, v in enumerate(values)]


@dataclass(frozen=True)
class RequestParams:
    """The per-request params, validated (the MLflow model's ``ParamSchema``, the Ray Serve app's JSON
    ``params`` or query string).

    ``score_thresh`` in [0, 1]: keep scores above it (below the checkpoint's eval threshold the post-process
    runs with it); ``thresholds``: the per-class table to apply on top (``"f1"``, ``"precision"`` when the
    checkpoint has it, or ``"eval"`` for none); ``detections_per_img`` >= 1: the best this many per image;
    ``batch_size`` in [1, ``serve.max_batch_size``]: images per forward pass."""

    score_thresh: float
    thresholds: str
    detections_per_img: int
    batch_size: int


# ----------------------------------------------------------------------------------------- detection


@torch.no_grad()
def detect_images(
    model: torch.nn.Module,
    postprocess: Any,
    cfg: Config,
    batch: Mapping[str, Any],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    cat_ids: np.ndarray,
    score_thresh: float | None = None,
) -> list[dict[str, np.ndarray]]:
    """The detections of preprocessed images (``image`` uint8 (h, w, 3) at test size, ``orig_size``
    [height, width]): padded into one batch (``collate.pad_images``), then ``evaluate.detect`` (the network,
    the post-process, boxes back to original pixels). Per image, in order: ``boxes`` (D, 4) float32 XYXY in
    original pixels, ``scores`` (D,) float32 descending, ``labels`` (D,) int64 0..K-1, ``category_ids`` (D,)
    original ids (``cat_ids[label]``); with ``score_thresh`` only scores above it (the post-process's own
    rule, ``>``). ``ray-retina predict``'s actors, the MLflow model and Ray Serve all run this."""
    padded, sizes = pad_images(list(batch["image"]), cfg.data.size_divisibility)
    inputs = {
        "images": torch.from_numpy(padded),
        "image_sizes": torch.from_numpy(sizes),
        "orig_sizes": torch.from_numpy(np.array(list(batch["orig_size"]), dtype=np.int64).reshape(-1, 2)),
    }
    dets = detect(
        model,
        postprocess,
        inputs,
        device=device,
        amp_dtype=amp_dtype,
        channels_last=cfg.model.channels_last,
        tta=cfg.eval.tta,  # test-time augmentation when the config turns it on (engine/tta.py)
        size_divisibility=cfg.data.size_divisibility,
    )
    out = []
    for d in dets:
        keep = d["scores"] > score_thresh if score_thresh is not None else slice(None)
        labels = d["labels"][keep].cpu().numpy().reshape(-1).astype(np.int64)
        out.append(
            {
                "boxes": d["boxes"][keep].float().cpu().numpy().reshape(-1, 4),
                "scores": d["scores"][keep].float().cpu().numpy().reshape(-1),
                "labels": labels,
                "category_ids": np.asarray(cat_ids, dtype=np.int64)[labels].reshape(-1),
            }
        )
    return out


def _stored_pixels(data: bytes, index: int, max_pixels: int) -> int:
    """Pixels of an encoded image as its first header chunk states them (``Image.open`` reads no more: the
    size check comes before anything that may decode, such as a PNG's EXIF lookup, which loads the image);
    :class:`RequestError` when over ``max_pixels`` or not an image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, by our limit
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Image.DecompressionBombError as err:  # over Pillow's own refusal limit: over ours too
        raise RequestError(
            f"image {index}: more than serve.max_pixels = {max_pixels} pixels ({err})"
        ) from None
    except Exception as err:  # noqa: BLE001 - any reason Pillow has: the request is bad
        raise RequestError(
            f"image {index} is not an image Pillow can read: {type(err).__name__}: {err}"
        ) from None
    if h < 1 or w < 1:
        raise RequestError(f"image {index} has no pixels ({w} x {h})")
    if h * w > max_pixels:
        raise RequestError(
            f"image {index} has {w} x {h} = {h * w} pixels: more than serve.max_pixels = {max_pixels}"
        )
    return h * w


def threshold_tables(thresholds: Mapping[str, Any] | None) -> dict[str, dict[str, float]]:
    """The per-class tables of a checkpoint's ``thresholds`` entry (``{"f1": {"<category id>": score}, "precision":
    {...}, "precision_target": 0.9}``): the mappings only (its scalars, such as ``precision_target``, are
    settings, not tables), values as floats, missing or non-finite ones left out."""
    return {
        str(name): {
            str(c): float(t) for c, t in dict(table).items() if t is not None and math.isfinite(float(t))
        }
        for name, table in (thresholds or {}).items()
        if isinstance(table, Mapping)
    }


def class_thresholds(state: Mapping[str, Any], cat_ids: Sequence[int]) -> dict[str, np.ndarray]:
    """The checkpoint's per-class threshold tables as arrays (K,) in label order: ``state["thresholds"]`` =
    ``{"f1": {"<category id>": score, ...}, "precision": {...}}``; a class missing from a table gets 0 (only
    the other thresholds apply to it). Empty when the checkpoint has none."""
    out: dict[str, np.ndarray] = {}
    for name, table in threshold_tables(state.get(THRESHOLDS_KEY)).items():
        by_id = {int(k): v for k, v in table.items()}
        out[name] = np.asarray([by_id.get(int(c), 0.0) for c in cat_ids], dtype=np.float32)
    return out


def category_names(state: Mapping[str, Any]) -> dict[int, str]:
    """id -> name from the checkpoint (``categories`` of an exported one, else ``cat_names``), else the ids."""
    if "categories" in state:
        return {int(c["id"]): str(c["name"]) for c in state["categories"]}
    if state.get("cat_names") is not None:
        return {int(c): str(n) for c, n in zip(state["cat_ids"], state["cat_names"], strict=True)}
    return {int(c): str(c) for c in state["cat_ids"]}


class Detector:
    """A checkpoint dict ready to detect on encoded images in this process, within the limits of its
    config's ``serve`` section (or ``limits``).

    ``names``: id -> class name (default: the checkpoint's own, :func:`category_names`); ``amp``: autocast
    dtype name (default: the checkpoint's ``optim.amp``)."""

    def __init__(
        self,
        state: Mapping[str, Any],
        device: torch.device | str | None = None,
        *,
        names: Mapping[int, str] | None = None,
        limits: ServeSection | None = None,
        amp: str | None = None,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.cfg, cat_ids = model_from_state(state, self.device)
        self.cat_ids = np.asarray(cat_ids, dtype=np.int64)
        names = category_names(state) if names is None else names
        self.names = np.asarray([names.get(int(c), str(c)) for c in cat_ids], dtype=object)
        self.amp_dtype = AMP_DTYPES[amp or self.cfg.optim.amp]  # as evaluation and predict run it
        self.limits = limits or self.cfg.serve
        self.tables = class_thresholds(state, cat_ids)
        self.default_table = DEFAULT_TABLE if DEFAULT_TABLE in self.tables else EVAL_THRESHOLDS
        self._postprocessors: dict[tuple[float, int], Any] = {}

    # ---------------------------------------------------------------- params and limits

    def params(self, params: Mapping[str, Any] | None = None) -> RequestParams:
        """A request's params validated, the defaults filled in (unknown keys ignored, as MLflow does)."""
        p = {k: v for k, v in dict(params or {}).items() if v is not None}
        pc = self.cfg.postprocess
        try:
            score_thresh = float(p.get("score_thresh", pc.score_thresh))
            per_image = int(p.get("detections_per_img", pc.detections_per_img))
            batch_size = int(p.get("batch_size", 1))
        except (TypeError, ValueError) as err:
            raise RequestError(f"a param that is not a number: {err}") from None
        table = str(p.get("thresholds", self.default_table))
        if not 0.0 <= score_thresh <= 1.0:
            raise RequestError(f"score_thresh must be in [0, 1], got {score_thresh}")
        if per_image < 1:
            raise RequestError(f"detections_per_img must be >= 1, got {per_image}")
        if not 1 <= batch_size <= self.limits.max_batch_size:
            raise RequestError(
                f"batch_size must be in [1, {self.limits.max_batch_size}] (serve.max_batch_size), got {batch_size}"
            )
        if table != EVAL_THRESHOLDS and table not in self.tables:
            raise RequestError(
                f"thresholds must be one of {sorted([EVAL_THRESHOLDS, *self.tables])}, got {table!r}"
            )
        return RequestParams(score_thresh, table, per_image, batch_size)

    def check(self, images: Sequence[bytes]) -> list[tuple[int, int]]:
        """(height, width) of each image from its header; :class:`RequestError` naming the limit
        (``serve.max_images``, ``serve.max_pixels``) or the image that is not one. No image over the pixel
        limit is decoded."""
        if len(images) > self.limits.max_images:
            raise RequestError(
                f"{len(images)} images in one request: more than serve.max_images = {self.limits.max_images}"
            )
        sizes = []
        for i, data in enumerate(images):
            stored = _stored_pixels(data, i, self.limits.max_pixels)
            try:
                h, w = header_size(data)  # the decoder policy's display size (EXIF orientation applied)
            except Exception as err:  # noqa: BLE001 - any reason Pillow has: the request is bad
                raise RequestError(
                    f"image {i} is not an image Pillow can read: {type(err).__name__}: {err}"
                ) from None
            if h * w != stored:
                raise RequestError(f"image {i}: header sizes disagree ({w} x {h} vs {stored} pixels)")
            sizes.append((h, w))
        return sizes

    # ---------------------------------------------------------------- decode, network, operating point

    def prepare(self, images: Sequence[bytes]) -> list[dict[str, np.ndarray]]:
        """Check (:meth:`check`), decode and resize each image to the test size, as evaluation does. Per image:
        ``image`` uint8 (h, w, 3), ``orig_size`` [height, width]."""
        sizes = self.check(images)
        n = len(images)
        empty = object_array([np.zeros(0, np.float32) for _ in range(n)])
        pre = augment_batch(
            {
                "image_id": np.arange(n, dtype=np.int64),
                "height": np.asarray([h for h, _ in sizes], dtype=np.int64),
                "width": np.asarray([w for _, w in sizes], dtype=np.int64),
                "image": object_array(list(images)),
                "bbox": empty,
                "category_id": empty,
                "iscrowd": empty,
            },
            train=False,
            min_size_range=[self.cfg.data.test_min_size, self.cfg.data.test_min_size],
            max_size=self.cfg.data.max_size,
            hflip_prob=0.0,
            cat_ids=[0],
            seed=None,
        )
        decoded = {int(i): j for j, i in enumerate(pre["image_id"])}  # rows that do not decode are dropped
        bad = [i for i in range(n) if i not in decoded]
        if bad:
            raise RequestError(f"image(s) {bad} do not decode")
        return [
            {"image": pre["image"][decoded[i]], "orig_size": pre["orig_size"][decoded[i]]} for i in range(n)
        ]

    def postprocess_key(self, params: RequestParams) -> tuple[float, int]:
        """The post-process a request needs: the checkpoint's, with a lower ``score_thresh`` or a larger
        ``detections_per_img`` when the request asks for one. With the checkpoint's threshold t0 <= t and
        D0 >= D, its detections above t, the first D, are those of a post-process at (t, D): a lower-scoring
        box neither enters the top-k before a higher one nor suppresses it in NMS."""
        pc = self.cfg.postprocess
        return (
            min(float(pc.score_thresh), params.score_thresh),
            max(int(pc.detections_per_img), params.detections_per_img),
        )

    def postprocessor(self, key: tuple[float, int]) -> Any:
        if key not in self._postprocessors:
            over = {"postprocess.score_thresh": key[0], "postprocess.detections_per_img": key[1]}
            try:
                self._postprocessors[key] = build_postprocessor(apply_overrides(self.cfg, over))
            except ConfigError as err:
                raise RequestError(str(err)) from None
        return self._postprocessors[key]

    def run(
        self, prepared: Sequence[Mapping[str, Any]], keys: Sequence[tuple[float, int]], batch_size: int
    ) -> list[dict[str, np.ndarray]]:
        """The network and post-process over prepared images (``keys``: each image's :meth:`postprocess_key`):
        images with the same padded shape and key go together, ``batch_size`` at a time, so each image is
        padded exactly as it would be alone. Per image, in order: :func:`detect_images`'s dict."""
        d = self.cfg.data.size_divisibility
        groups: dict[tuple[int, int, float, int], list[int]] = defaultdict(list)
        for i, (p, key) in enumerate(zip(prepared, keys, strict=True)):
            h, w = p["image"].shape[:2]
            groups[(-(-h // d), -(-w // d), *key)].append(i)
        out: list[dict[str, np.ndarray] | None] = [None] * len(prepared)
        for (*_, thresh, per_image), idx in groups.items():
            post = self.postprocessor((thresh, per_image))
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                batch = {
                    "image": [prepared[i]["image"] for i in chunk],
                    "orig_size": [prepared[i]["orig_size"] for i in chunk],
                }
                for i, det in zip(chunk, self._detect(batch, post), strict=True):
                    out[i] = det
        return out  # type: ignore[return-value]

    def _detect(self, batch: Mapping[str, Any], postprocess: Any) -> list[dict[str, np.ndarray]]:
        return detect_images(
            self.model,
            postprocess,
            self.cfg,
            batch,
            device=self.device,
            amp_dtype=self.amp_dtype,
            cat_ids=self.cat_ids,
        )

    def select(self, det: Mapping[str, np.ndarray], params: RequestParams) -> dict[str, np.ndarray]:
        """One image's detections at the request's operating point: score > ``score_thresh`` and > its class's
        threshold in the ``thresholds`` table, then the first ``detections_per_img`` (scores descend)."""
        keep = det["scores"] > params.score_thresh
        if params.thresholds != EVAL_THRESHOLDS:
            keep &= det["scores"] > self.tables[params.thresholds][det["labels"]]
        idx = np.flatnonzero(keep)[: params.detections_per_img]
        return {k: v[idx] for k, v in det.items()}

    def detect(self, images: Sequence[bytes], params: RequestParams) -> list[dict[str, np.ndarray]]:
        """Per image (in order): ``boxes`` (D, 4) float32 XYXY in original pixels, ``scores`` (D,),
        ``labels`` (D,), ``category_ids`` (D,) at the request's operating point."""
        prepared = self.prepare(images)
        key = self.postprocess_key(params)
        dets = self.run(prepared, [key] * len(prepared), params.batch_size)
        return [self.select(d, params) for d in dets]

    def frame(self, images: Sequence[bytes], params: Mapping[str, Any] | None = None) -> pd.DataFrame:
        """The detections of ``images`` as the pyfunc returns them (``OUTPUT_COLUMNS``), sorted by image and
        descending score."""
        return self.to_frame(self.detect(images, self.params(params)))

    def to_frame(self, dets: Sequence[Mapping[str, np.ndarray]]) -> pd.DataFrame:
        """Per-image detections -> one row per detection (``OUTPUT_COLUMNS``), ``image_index`` = position."""
        index = np.concatenate([np.full(len(d["scores"]), i, np.int64) for i, d in enumerate(dets)] or [[]])
        labels = np.concatenate([d["labels"] for d in dets] or [np.zeros(0, np.int64)]).astype(np.int64)
        boxes = np.concatenate([d["boxes"] for d in dets] or [np.zeros((0, 4), np.float32)])
        scores = np.concatenate([d["scores"] for d in dets] or [np.zeros(0, np.float32)])
        return detections_frame(index, self.cat_ids[labels], self.names[labels].tolist(), scores, boxes)


def detections_frame(
    image_index: Sequence[int] | np.ndarray,
    category_ids: Sequence[int] | np.ndarray,
    names: Sequence[str],
    scores: Sequence[float] | np.ndarray,
    boxes: np.ndarray | Sequence[Sequence[float]],
) -> pd.DataFrame:
    """One row per detection: ``OUTPUT_COLUMNS``; ``boxes`` (D, 4) XYXY in original pixels. Coordinates and
    scores are float64 made from the model's float32 values, XYWH computed in float64 as
    ``evaluate.coco_records`` does (so its rounded ``bbox`` equals round(bbox_*, 3))."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return pd.DataFrame(
        {
            "image_index": np.asarray(image_index, dtype=np.int64),
            "category_id": np.asarray(category_ids, dtype=np.int64),
            "category_name": pd.Series(list(names), dtype=object),
            "score": np.asarray(scores, dtype=np.float32).astype(np.float64),
            "x1": b[:, 0],
            "y1": b[:, 1],
            "x2": b[:, 2],
            "y2": b[:, 3],
            "bbox_x": b[:, 0],
            "bbox_y": b[:, 1],
            "bbox_w": b[:, 2] - b[:, 0],
            "bbox_h": b[:, 3] - b[:, 1],
        }
    )


# ----------------------------------------------------------------------------------------- the pyfunc model


class RetinaNetModel(PythonModel):
    """The ``mlflow.pyfunc`` model: a DataFrame with a column ``image`` of encoded images in, one row per
    detection out (``OUTPUT_COLUMNS``). Params (``ParamSchema``, defaults from the checkpoint):
    ``score_thresh``, ``thresholds``, ``detections_per_img``, ``batch_size`` (:class:`RequestParams`)."""

    def load_context(self, context: Any) -> None:
        state = torch.load(context.artifacts[MODEL_ARTIFACT], map_location="cpu", weights_only=True)
        self.detector = Detector(state)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        return self.detector.frame(images_of(model_input), params)


MODEL_CODE = """\
# The ray-retina MLflow model (ray_retina.serving.RetinaNetModel). The package ships beside this file in the
# model's code/ directory, which MLflow puts on sys.path before it runs this script.
import mlflow

from ray_retina.serving import RetinaNetModel

mlflow.models.set_model(RetinaNetModel())
"""


def default_table(state: Mapping[str, Any]) -> str:
    """The ``thresholds`` param's default for a checkpoint: ``"f1"`` when it has that table, else ``"eval"``."""
    return DEFAULT_TABLE if DEFAULT_TABLE in (state.get(THRESHOLDS_KEY) or {}) else EVAL_THRESHOLDS


def config_of(state: Mapping[str, Any]) -> Config:
    return config_from_dict(dict(state["config"]), source="checkpoint config")


def example_image(height: int = 96, width: int = 128) -> bytes:
    """A small PNG (a bright rectangle and a dark disc on grey): the model's input example."""
    im = Image.new("RGB", (width, height), (118, 118, 118))
    draw = ImageDraw.Draw(im)
    draw.rectangle((width // 8, height // 6, width // 2, height // 2), fill=(230, 60, 40))
    draw.ellipse((width // 2, height // 3, width - width // 8, height - height // 8), fill=(30, 40, 160))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
