"""Batch inference with Ray Data from a trained checkpoint.

    summary = predict("runs/smoke-...", "photos/", "s3://bucket/out", num_actors=2, use_gpu=True)

The checkpoint (``checkpoint.py``: a file, a checkpoint directory, or a run directory meaning its best
checkpoint by val/AP) holds everything needed to rebuild the model and its test-time input size.
Evaluation of a checkpoint is ``engine/evaluate.py::evaluate_checkpoint``.

Batch inference (:func:`predict`) is a Ray Data pipeline: read (image files of every type ``prepare``
takes, or Parquet shards) -> decode + resize to the checkpoint's test size (CPU tasks, the same code as
evaluation; an input that does not decode stays a row marked with its reason, so it is counted) -> the
model in an actor pool (one model per actor, a GPU each when asked; ``serving.detect_images``, test-time
augmentation when asked) -> draw the detections on the original image and write it to the output URI
(CPU tasks) -> the jsons written by the driver. A video file runs in one Ray task instead
(:func:`predict_video`): decode frames with PyAV, detect, draw, encode, write.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
import torch
from PIL import Image, ImageDraw, ImageFont

from ray_retina.checkpoint import load_checkpoint_state
from ray_retina.config import Config, TTASection, apply_overrides, config_from_dict
from ray_retina.data.augment import augment_batch, object_array
from ray_retina.data.decode import decode_image, header_size
from ray_retina.data.formats.files import IMAGE_EXTENSIONS
from ray_retina.data.shards import manifest_exists, read_manifest, shard_files
from ray_retina.engine.evaluate import AMP_DTYPES, coco_records
from ray_retina.engine.restore import model_from_state
from ray_retina.model import build_postprocessor
from ray_retina.plots import class_colour
from ray_retina.serving import detect_images
from ray_retina.uri import absolute, is_uri, join_uri, resolve_uri, write_bytes_atomic

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
RESULTS_FILE = "detections.json"  # COCO results format
IMAGES_FILE = "images.json"  # every image read (id, file_name, height, width), with or without detections
SUMMARY_FILE = "summary.json"  # counts, settings, and the inputs that could not be read
DRAWN_DIR = "images"  # one PNG per input image with its detections drawn

__all__ = ["IMAGE_EXTENSIONS", "PredictSummary", "draw_detections", "predict", "preprocess_batch"]


def manifest_category_names(
    cfg: Config, cat_ids: Sequence[int], *shard_dirs: str | os.PathLike[str] | None
) -> dict[int, str]:
    """id -> name from the first readable manifest among ``shard_dirs`` and the run's own shards; ids
    without a name are named by their number."""

    names: dict[int, str] = {}
    for d in (*shard_dirs, cfg.data.val_shards, cfg.data.train_shards):
        if d is None:
            continue
        try:
            names = {int(c["id"]): str(c["name"]) for c in read_manifest(d)["categories"]}
        except (OSError, ValueError, KeyError):
            continue
        if set(cat_ids) <= set(names):
            break
    return {int(c): names.get(int(c), str(c)) for c in cat_ids}


def category_names_of(state: Mapping[str, Any]) -> dict[int, str]:
    """id -> name: the checkpoint's own ``categories`` when it has them (an exported one), else the run's
    shard manifests (:func:`manifest_category_names`), else the ids as names."""
    if "categories" in state:
        return {int(c["id"]): str(c["name"]) for c in state["categories"]}
    if state.get("cat_names") is not None:  # checkpoints since fine-tuning by class name (model.init_from)
        return {int(c): str(n) for c, n in zip(state["cat_ids"], state["cat_names"], strict=True)}
    cfg = config_from_dict(dict(state["config"]), source="checkpoint config")
    return manifest_category_names(cfg, [int(c) for c in state["cat_ids"]])


# ----------------------------------------------------------------------------------------- drawing


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: Sequence[int],
    names: Mapping[int, str],
) -> Image.Image:
    """The image (HxWx3 uint8 RGB) with its detections drawn: a box per detection in its class colour
    and "name score" on a filled tag. ``boxes`` (D, 4) XYXY in the image's pixels; ``labels`` are the keys
    of ``names`` (category ids); colours follow the order of ``names``."""

    im = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    draw = ImageDraw.Draw(im)
    side = min(im.size)
    width = max(2, round(side / 300))
    font = ImageFont.load_default(size=max(11, round(side / 45)))
    order = {c: i for i, c in enumerate(names)}
    for box, score, lab in zip(
        np.asarray(boxes).reshape(-1, 4), np.asarray(scores).reshape(-1), labels, strict=True
    ):
        colour = tuple(int(255 * v) for v in class_colour(order.get(int(lab), int(lab))))
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        text = f"{names.get(int(lab), str(int(lab)))} {float(score):.2f}"
        tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), text, font=font)
        tw, th = tx1 - tx0, ty1 - ty0
        ty = y0 - th - 4 if y0 - th - 4 >= 0 else y0  # above the box, else inside it at the top edge
        tx = max(0.0, min(x0, im.width - tw - 4))  # kept inside the image at the right edge
        draw.rectangle((tx, ty, tx + tw + 4, ty + th + 4), fill=colour)
        draw.text((tx + 2 - tx0, ty + 2 - ty0), text, fill=(255, 255, 255), font=font)
    return im


# ----------------------------------------------------------------------------------------- Ray Data steps


def _read_header(data: bytes) -> tuple[tuple[int, int], str]:
    """((height, width), "") when the image header reads (EXIF applied), else ((0, 0), the reason)."""

    try:
        return header_size(data), ""
    except Exception as e:  # noqa: BLE001 - any reason Pillow has: the input is unreadable, counted
        return (0, 0), f"{type(e).__name__}: {e}"


def preprocess_batch(
    batch: dict[str, np.ndarray],
    *,
    min_size: int,
    max_size: int,
    files: Mapping[str, tuple[int, str, str]] | None = None,
) -> dict[str, np.ndarray]:
    """Ray Data step (CPU tasks): encoded images -> test-time resized images, as in evaluation.

    Input: shard rows (``image_id``, ``file_name``, ``height``, ``width``, ``image``) or, for a folder,
    ``read_binary_files(include_paths=True)`` rows (``path``, ``bytes``) with ``files`` mapping each path
    to (image_id, file_name, png_name). Output, one row per input row in order: ``image`` uint8 (h, w, 3),
    ``image_size`` [h, w], ``orig_size`` [height, width], ``image_id``, ``file_name``, ``png_name``,
    ``bytes`` (the original encoded image, for drawing) and ``error``: "" for an image that decoded, else
    why it did not (its ``image`` is then (0, 0, 3) and its sizes 0): unreadable inputs are kept as rows so
    that the driver counts them.
    """

    if files is not None:  # a folder of image files
        meta = [files[str(p)] for p in batch["path"]]
        data = [bytes(d) for d in batch["bytes"]]
        ids = [m[0] for m in meta]
        names = [m[1] for m in meta]
        pngs = [m[2] for m in meta]
        sizes, errors = (list(v) for v in zip(*(_read_header(d) for d in data), strict=True))
    else:  # shard rows: sizes from the shard (checked at prepare time); augment_batch drops what does not decode
        data = [bytes(d) for d in batch["image"]]
        ids = [int(i) for i in batch["image_id"]]
        names = [str(f) for f in batch["file_name"]]
        pngs = [Path(f).stem + ".png" for f in names]
        sizes = [(int(h), int(w)) for h, w in zip(batch["height"], batch["width"], strict=True)]
        errors = ["" for _ in ids]
    ok = [i for i, e in enumerate(errors) if not e]
    aug_of: dict[int, int] = {}
    aug: dict[str, np.ndarray] = {}
    if ok:
        src = {
            "image_id": np.asarray([ids[i] for i in ok]),
            "height": np.asarray([sizes[i][0] for i in ok]),
            "width": np.asarray([sizes[i][1] for i in ok]),
            "image": object_array([data[i] for i in ok]),
        }
        empty = object_array([np.zeros(0, np.float32) for _ in ok])
        aug = augment_batch(
            {**src, "bbox": empty, "category_id": empty, "iscrowd": empty},
            train=False,
            min_size_range=[min_size, min_size],
            max_size=max_size,
            hflip_prob=0.0,
            cat_ids=[0],
            seed=None,
        )
        aug_of = {int(image_id): j for j, image_id in enumerate(aug["image_id"])}
        for i in ok:
            if ids[i] not in aug_of:
                errors[i] = "does not decode"
    none = np.zeros((0, 0, 3), np.uint8)
    rows = [aug_of.get(ids[i]) if not errors[i] else None for i in range(len(ids))]
    return {
        "image": object_array([aug["image"][j] if j is not None else none for j in rows]),
        "image_size": np.asarray(
            [aug["image_size"][j] if j is not None else [0, 0] for j in rows], dtype=np.int64
        ).reshape(-1, 2),
        "orig_size": np.asarray(
            [aug["orig_size"][j] if j is not None else [0, 0] for j in rows], dtype=np.int64
        ).reshape(-1, 2),
        "image_id": np.asarray(ids, dtype=np.int64),
        "file_name": np.asarray(names, dtype=object),
        "png_name": np.asarray(pngs, dtype=object),
        "bytes": object_array(data),
        "error": np.asarray(errors, dtype=object),
    }


def with_tta(cfg: Config, tta: TTASection | None) -> Config:
    """``cfg`` with ``eval.tta`` replaced by ``tta`` (None: as it is)."""
    return cfg if tta is None else apply_overrides(cfg, {"eval.tta": tta.model_dump()})


class Predictor:
    """Ray Data actor (``map_batches`` with an actor pool): holds one model, runs it on preprocessed batches.

    Output columns per image: ``image_id``, ``file_name``, ``png_name``, ``bytes``, ``orig_size``, ``error``,
    and the detections with score > ``score_thresh`` (``serving.detect_images``, test-time augmentation as
    ``tta`` or the checkpoint config's ``eval.tta``): ``boxes`` (D, 4) XYXY float32 in original pixels,
    ``scores`` (D,), ``category_ids`` (D,) original category ids; none for an unreadable image.
    """

    def __init__(
        self, state: list[Any], *, score_thresh: float, use_gpu: bool, tta: TTASection | None = None
    ) -> None:

        # The checkpoint comes through the object store (wrapped in a list so Ray hands over the ref):
        # actors on other nodes cannot read the driver's files.
        s = ray.get(state[0]) if isinstance(state[0], ray.ObjectRef) else state[0]
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu" and ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
            torch.set_num_threads(max(1, int(cpus)))
        self.model, cfg, cat_ids = model_from_state(s, self.device)
        self.cat_ids = np.asarray(cat_ids, dtype=np.int64)
        self.postprocess = build_postprocessor(cfg)
        self.cfg = with_tta(cfg, tta)
        self.amp_dtype = AMP_DTYPES[cfg.optim.amp]
        self.score_thresh = score_thresh

    def detect(self, images: Sequence[np.ndarray], orig_sizes: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        """Detections of test-size images (uint8 (h, w, 3)) of originals ``orig_sizes`` [height, width]."""
        if not len(images):
            return []
        return detect_images(
            self.model,
            self.postprocess,
            self.cfg,
            {"image": list(images), "orig_size": list(orig_sizes)},
            device=self.device,
            amp_dtype=self.amp_dtype,
            cat_ids=self.cat_ids,
            score_thresh=self.score_thresh,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = [i for i, e in enumerate(batch["error"]) if not e]
        found = self.detect([batch["image"][i] for i in ok], [batch["orig_size"][i] for i in ok])
        dets = [NO_DETECTIONS] * len(batch["image_id"])
        for i, d in zip(ok, found, strict=True):
            dets[i] = d
        return {
            **{k: batch[k] for k in ("image_id", "file_name", "png_name", "bytes", "orig_size", "error")},
            "boxes": object_array([d["boxes"] for d in dets]),
            "scores": object_array([d["scores"] for d in dets]),
            "category_ids": object_array([d["category_ids"] for d in dets]),
        }


NO_DETECTIONS: dict[str, np.ndarray] = {
    "boxes": np.zeros((0, 4), np.float32),
    "scores": np.zeros(0, np.float32),
    "category_ids": np.zeros(0, np.int64),
}


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def draw_batch(
    batch: dict[str, np.ndarray], *, out_dir: str, names: Mapping[int, str]
) -> dict[str, np.ndarray]:
    """Ray Data step (CPU tasks): draw each readable image's detections on the original image and write it as
    ``png_name`` under ``out_dir`` (a local path or any URI pyarrow writes; written by this task, so nothing
    stays on the node that ran it); passes the rows on without the image bytes."""

    fs, root = resolve_uri(out_dir)
    fs.create_dir(root, recursive=True)
    for data, png, boxes, scores, cats, err in zip(
        batch["bytes"],
        batch["png_name"],
        batch["boxes"],
        batch["scores"],
        batch["category_ids"],
        batch["error"],
        strict=True,
    ):
        if err:
            continue
        pixels = decode_image(bytes(data), fast=False)
        im = draw_detections(
            pixels, np.asarray(boxes), np.asarray(scores), [int(c) for c in np.asarray(cats)], names
        )
        write_bytes_atomic(fs, f"{root.rstrip('/')}/{png}", png_bytes(im))
    return {k: v for k, v in batch.items() if k != "bytes"}


# ----------------------------------------------------------------------------------------- predict


@dataclass(frozen=True)
class PredictSummary:
    """What a :func:`predict` run wrote and counted. ``out``: the output folder (path or URI); ``results``:
    its ``detections.json``; ``images``: inputs read (video: frames run); ``unreadable``: inputs (video:
    packets) that did not decode, listed in ``summary.json``; ``detections``: records written."""

    out: str
    results: str
    images: int
    unreadable: int
    detections: int

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        return (
            f"{self.images} read, {self.unreadable} unreadable (summary.json lists them), "
            f"{self.detections} detections -> {self.results}"
        )


def _list_images(folder: str | os.PathLike[str]) -> tuple[Any, list[tuple[str, str]]]:
    """(filesystem, sorted [(path, name relative to folder)]) of the image files under ``folder`` (every
    extension ``prepare`` takes: ``data.formats.files.IMAGE_EXTENSIONS``)."""

    fs, root = resolve_uri(folder)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    root = root.rstrip("/")
    found = [
        (i.path, i.path[len(root) + 1 :])
        for i in infos
        if i.type == pafs.FileType.File and i.base_name.lower().endswith(IMAGE_EXTENSIONS)
    ]
    return fs, sorted(found, key=lambda t: t[1])


def _png_names(rel_names: Sequence[str]) -> list[str]:
    """Output PNG names: the file's stem (sub-folders joined by "__"), its extension kept when stems clash."""
    stems = [os.path.splitext(r)[0].replace("/", "__") for r in rel_names]
    clash = {s for s in stems if stems.count(s) > 1}
    return [
        (r.replace("/", "__").replace(".", "_") if s in clash else s) + ".png"
        for r, s in zip(rel_names, stems, strict=True)
    ]


def write_json(out: str, name: str, obj: Any, indent: int | None = None) -> str:
    """``obj`` as JSON at ``out``/``name`` (a local folder or URI, created when missing); returns its URI."""
    fs, root = resolve_uri(out)
    fs.create_dir(root, recursive=True)
    write_bytes_atomic(fs, f"{root.rstrip('/')}/{name}", json.dumps(obj, indent=indent).encode())
    return join_uri(out, name)


def predict(
    checkpoint: str | os.PathLike[str],
    input: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    score_thresh: float = 0.3,
    batch_size: int = 4,
    num_actors: int = 1,
    use_gpu: bool = False,
    draw: bool = True,
    tta: TTASection | None = None,
    frame_stride: int = 1,
    max_frames: int | None = None,
) -> PredictSummary:
    """Batch inference with Ray Data (images) or in one Ray task (a video); returns what it wrote and counted.

    ``input``: a shard folder (one holding ``manifest.json``; image ids are the shards'), a folder of images
    (every type ``prepare`` takes: ``IMAGE_EXTENSIONS``, searched recursively, numbered 1, 2, ... in sorted
    path order), or a video file (``VIDEO_EXTENSIONS``: :func:`predict_video`, every
    ``frame_stride``-th frame, at most ``max_frames``). Local paths or URIs. Images are resized to the
    checkpoint's test size (``data.test_min_size`` / ``max_size``) as in evaluation, then run by
    ``num_actors`` actors each holding the model (one GPU each with ``use_gpu``); ``tta`` replaces the
    checkpoint config's ``eval.tta``. Ray is started locally when not initialised.

    Writes into ``out_dir`` (a local folder or any URI pyarrow writes, e.g. ``s3://bucket/out``; each file by
    the process that made it, so nothing is left on a worker node):
      * ``detections.json``: COCO results, ``{"image_id", "category_id" (original id), "bbox" [x, y, w, h] in
        original pixels, "score", "file_name"}`` for every detection with score > ``score_thresh``, sorted
        by image id and descending score (this threshold is for looking at results; for COCO AP use
        :func:`evaluate_checkpoint`, which keeps the post-process's 0.05);
      * ``images.json``: every image read (``id``, ``file_name``, ``height``, ``width``), detections or not;
      * ``summary.json``: counts (``images``, ``unreadable``, ``detections``), the settings, and each
        unreadable input (``file_name``, ``reason``);
      * ``images/<name>.png`` (unless ``draw`` is False): each image at its original size with boxes,
        category names and scores drawn.
    """

    # One piece: the driver's steps in the order a user meets them (the checks before Ray starts, a video or
    # images, the pipeline, its files); the pipeline and the writing are functions of their own.
    if not 0.0 <= score_thresh <= 1.0:
        raise ValueError(f"score_thresh must be in [0, 1], got {score_thresh}")
    if batch_size < 1 or num_actors < 1:
        raise ValueError(f"batch_size and num_actors must be >= 1, got {batch_size}, {num_actors}")
    state = load_checkpoint_state(checkpoint)  # on the driver: a bad path fails here, before Ray starts
    cfg = config_from_dict(dict(state["config"]), source="checkpoint config")
    cat_ids = [int(c) for c in state["cat_ids"]]
    out = absolute(os.fspath(out_dir))  # Ray tasks run in other working directories
    assert out is not None
    fs, in_path = resolve_uri(input)
    kind = fs.get_file_info(in_path).type
    if kind == pafs.FileType.File and in_path.lower().endswith(VIDEO_EXTENSIONS):
        return predict_video(
            state,
            os.fspath(input),
            out,
            score_thresh=score_thresh,
            batch_size=batch_size,
            use_gpu=use_gpu,
            draw=draw,
            tta=tta,
            frame_stride=frame_stride,
            max_frames=max_frames,
        )
    if kind != pafs.FileType.Directory:
        raise FileNotFoundError(
            f"input not found: {os.fspath(input)} is not a folder of images or shards, nor a video file "
            f"({', '.join(VIDEO_EXTENSIONS)})"
        )
    is_shards = manifest_exists(input)
    names = manifest_category_names(cfg, cat_ids, input if is_shards else None)

    if not ray.is_initialized():
        ray.init()
    if use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise ValueError("use_gpu=True but the Ray cluster has no GPU")

    ds = _detections_dataset(
        input, fs, is_shards, cfg, state, score_thresh, batch_size, num_actors, use_gpu, tta
    )
    if draw:
        ds = ds.map_batches(
            draw_batch, fn_kwargs={"out_dir": join_uri(out, DRAWN_DIR), "names": names}, batch_format="numpy"
        )
    else:
        ds = ds.drop_columns(["bytes"])
    images, records, unreadable = _collect(ds)
    settings = {
        "score_thresh": score_thresh,
        "tta": with_tta(cfg, tta).eval.tta.model_dump(),
        "drawn": join_uri(out, DRAWN_DIR) if draw else None,
    }
    return _write_outputs(out, os.fspath(input), images, records, unreadable, settings)


def _write_outputs(
    out: str,
    source: str,
    images: list[dict[str, Any]],
    records: list[dict[str, Any]],
    unreadable: list[dict[str, Any]],
    settings: dict[str, Any],
) -> PredictSummary:
    """Write what :func:`predict` found on a folder or shard set into ``out`` (``images.json``,
    ``detections.json``, ``summary.json`` with the input, the counts, ``settings`` and the unreadable inputs);
    log it."""
    for u in unreadable:
        logger.warning("%s could not be read, skipped: %s", u["file_name"], u["reason"])
    write_json(out, IMAGES_FILE, images, indent=1)
    results = write_json(out, RESULTS_FILE, records)
    summary = PredictSummary(out, results, len(images), len(unreadable), len(records))
    counts = {"images": summary.images, "unreadable": summary.unreadable, "detections": summary.detections}
    write_json(
        out,
        SUMMARY_FILE,
        {"input": source, **counts, **settings, "unreadable_files": unreadable},
        indent=1,
    )
    logger.info("%s", summary.line())
    return summary


def _detections_dataset(
    input: str | os.PathLike[str],
    fs: Any,
    is_shards: bool,
    cfg: Config,
    state: dict[str, Any],
    score_thresh: float,
    batch_size: int,
    num_actors: int,
    use_gpu: bool,
    tta: TTASection | None,
) -> Any:
    """The Ray Data pipeline of :func:`predict` up to the detections: read (shards or image files), decode
    and resize (:func:`preprocess_batch`), detect (``num_actors`` :class:`Predictor` actors)."""

    files: dict[str, tuple[int, str, str]] | None = None
    if is_shards:
        paths = shard_files(input, read_manifest(input))
        ds = ray.data.read_parquet(
            [resolve_uri(p)[1] for p in paths],
            filesystem=fs,
            columns=["image_id", "file_name", "height", "width", "image"],
        )
    else:
        fs, listed = _list_images(input)
        if not listed:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {os.fspath(input)}")
        pngs = _png_names([rel for _, rel in listed])
        files = {p: (i + 1, rel, png) for i, ((p, rel), png) in enumerate(zip(listed, pngs, strict=True))}
        ds = ray.data.read_binary_files([p for p, _ in listed], include_paths=True, filesystem=fs)
    ds = ds.map_batches(
        preprocess_batch,
        fn_kwargs={"min_size": cfg.data.test_min_size, "max_size": cfg.data.max_size, "files": files},
        batch_format="numpy",
        batch_size=batch_size,
    )
    return ds.map_batches(
        Predictor,
        fn_constructor_args=([ray.put(state)],),
        fn_constructor_kwargs={"score_thresh": score_thresh, "use_gpu": use_gpu, "tta": tta},
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_gpus=1 if use_gpu else 0,
        batch_format="numpy",
        batch_size=batch_size,
    )


def _collect(ds: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """``(images, COCO result records, unreadable inputs)`` from the detections stream, each sorted (images and
    unreadable by id, records by image id then descending score)."""
    records: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    unreadable: list[dict[str, Any]] = []
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for i in range(len(batch["image_id"])):
            image_id, file_name = int(batch["image_id"][i]), str(batch["file_name"][i])
            if batch["error"][i]:
                unreadable.append({"id": image_id, "file_name": file_name, "reason": str(batch["error"][i])})
                continue
            h, w = (int(v) for v in batch["orig_size"][i])
            images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
            recs = coco_records(
                image_id,
                np.asarray(batch["boxes"][i]).reshape(-1, 4),
                np.asarray(batch["scores"][i]).reshape(-1),
                np.asarray(batch["category_ids"][i]).reshape(-1),
            )
            records.extend({**r, "file_name": file_name} for r in recs)
    images.sort(key=lambda r: r["id"])
    unreadable.sort(key=lambda r: r["id"])
    records.sort(key=lambda r: (r["image_id"], -r["score"]))
    return images, records, unreadable


# ----------------------------------------------------------------------------------------- video
# A video is one sequential stream, so it runs in ONE Ray task (a GPU when asked) that decodes (PyAV), detects
# (Predictor.detect: the same test-time resize and detection as images), draws, encodes and writes its outputs
# to the output URI itself: nothing stays on the node that ran it.

VIDEO_FILE = "detections.mp4"  # the annotated frames (every frame_stride-th), H.264 when FFmpeg has it
FRAMES_FILE = "frames.json"  # per frame run: index, time, detections
VIDEO_CODECS = ("libx264", "mpeg4")  # first available; mpeg4 is FFmpeg's own encoder, always there


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(h, w) of a ``height`` x ``width`` image at test size: shorter side ``min_size``, longer side at most
    ``max_size``; the rounding of ``data.augment.augment_batch``, so a frame is resized as an image is."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_frame(rgb: np.ndarray, min_size: int, max_size: int) -> np.ndarray:
    """A decoded frame (H, W, 3) uint8 at test size, bilinear (as augment_batch resizes decoded images)."""
    h, w = resized_size(rgb.shape[0], rgb.shape[1], min_size, max_size)
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))


def iter_frames(
    path: str, frame_stride: int, max_frames: int | None, counts: dict[str, int]
) -> Iterator[tuple[int, float, np.ndarray]]:
    """(frame index, time in seconds, RGB (H, W, 3) uint8) of every ``frame_stride``-th frame of the first
    video stream, at most ``max_frames``. Packets that do not decode are skipped and counted in
    ``counts["unreadable"]``; ``counts["frames"]`` is the number of frames decoded."""
    import av  # PyAV: only this module needs FFmpeg

    with av.open(path) as container:
        stream = container.streams.video[0]
        taken = 0
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as err:  # a corrupt packet: skip it, keep the rest of the video
                counts["unreadable"] += 1
                logger.warning("%s: a packet does not decode, skipped: %s", path, err)
                continue
            for frame in frames:
                index = counts["frames"]
                counts["frames"] += 1
                if index % frame_stride:
                    continue
                if max_frames is not None and taken >= max_frames:
                    return
                taken += 1
                t = float(frame.time) if frame.time is not None else index / float(stream.average_rate or 25)
                yield index, t, frame.to_ndarray(format="rgb24")


class VideoWriter:
    """Annotated frames -> a video file (yuv420p, so the frame is cropped to even sides)."""

    def __init__(self, path: str, rate: Fraction, height: int, width: int) -> None:
        import av  # PyAV loads FFmpeg: only the video path pays for it

        self.container = av.open(path, "w")
        codec = next(c for c in VIDEO_CODECS if c in av.codecs_available)
        self.stream = self.container.add_stream(codec, rate=rate)
        self.stream.height, self.stream.width = height - height % 2, width - width % 2
        self.stream.pix_fmt = "yuv420p"

    def write(self, rgb: np.ndarray) -> None:
        import av  # PyAV loads FFmpeg: only the video path pays for it

        rgb = np.ascontiguousarray(rgb[: self.stream.height, : self.stream.width])
        for packet in self.stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():  # flush the encoder
            self.container.mux(packet)
        self.container.close()


def run_video(
    state: Mapping[str, Any],
    video: str,
    out: str,
    *,
    score_thresh: float,
    batch_size: int,
    use_gpu: bool,
    draw: bool,
    tta: TTASection | None,
    frame_stride: int,
    max_frames: int | None,
) -> dict[str, Any]:
    """The whole video job in this process (a Ray task in :func:`predict_video`): returns the summary it wrote.

    Frames go through ``predict.Predictor.detect`` ``batch_size`` at a time. Writes ``detections.json`` (COCO
    results, ``image_id`` = frame index), ``frames.json`` (``frame``, ``time``, ``detections`` per frame run),
    ``summary.json`` and, with ``draw``, ``detections.mp4`` (at the input's frame rate / ``frame_stride``)."""
    # One piece: the one Ray task of a video (decode, detect, draw, encode, write) shares its open container
    # and writer; the per-frame work is Predictor.detect and draw_detections.
    predictor = Predictor([state], score_thresh=score_thresh, use_gpu=use_gpu, tta=tta)
    cfg = predictor.cfg
    names = category_names_of(state)
    tmp = tempfile.mkdtemp(prefix="ray-retina-video-")
    try:
        local = video
        if is_uri(video):  # FFmpeg reads local files: copy the object down first
            local = os.path.join(tmp, "input" + os.path.splitext(video)[1])
            fs, path = resolve_uri(video)
            with fs.open_input_stream(path) as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst)
        counts = {"frames": 0, "unreadable": 0}
        frames: list[dict[str, Any]] = []
        records: list[dict[str, Any]] = []
        writer: VideoWriter | None = None
        rate = _frame_rate(local) / frame_stride
        batch: list[tuple[int, float, np.ndarray]] = []

        def flush() -> None:
            nonlocal writer
            small = [resize_frame(rgb, cfg.data.test_min_size, cfg.data.max_size) for _, _, rgb in batch]
            dets = predictor.detect(small, [rgb.shape[:2] for _, _, rgb in batch])
            for (index, t, rgb), d in zip(batch, dets, strict=True):
                recs = coco_records(index, d["boxes"], d["scores"], d["category_ids"])
                records.extend(recs)
                frames.append({"frame": index, "time": round(t, 4), "detections": recs})
                if draw:
                    if writer is None:
                        writer = VideoWriter(os.path.join(tmp, VIDEO_FILE), rate, *rgb.shape[:2])
                    im = draw_detections(rgb, d["boxes"], d["scores"], d["category_ids"].tolist(), names)
                    writer.write(np.asarray(im))
            batch.clear()

        for item in iter_frames(local, frame_stride, max_frames, counts):
            batch.append(item)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        if writer is not None:
            writer.close()
            fs, root = resolve_uri(out)
            fs.create_dir(root, recursive=True)
            with open(os.path.join(tmp, VIDEO_FILE), "rb") as f:
                write_bytes_atomic(fs, f"{root.rstrip('/')}/{VIDEO_FILE}", f.read())
        results = write_json(out, RESULTS_FILE, records)
        write_json(out, FRAMES_FILE, frames)
        summary = {
            "input": video,
            "images": len(frames),
            "unreadable": counts["unreadable"],
            "detections": len(records),
            "frames_decoded": counts["frames"],
            "frame_stride": frame_stride,
            "max_frames": max_frames,
            "score_thresh": score_thresh,
            "tta": cfg.eval.tta.model_dump(),
            "video": join_uri(out, VIDEO_FILE) if writer is not None else None,
            "results": results,
        }
        write_json(out, SUMMARY_FILE, summary, indent=1)
        return summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _frame_rate(path: str) -> Fraction:
    import av  # PyAV loads FFmpeg: only the video path pays for it

    with av.open(path) as container:
        rate = container.streams.video[0].average_rate
    return Fraction(rate) if rate else Fraction(25)


def predict_video(
    state: Mapping[str, Any],
    video: str,
    out: str,
    *,
    score_thresh: float,
    batch_size: int,
    use_gpu: bool,
    draw: bool,
    tta: TTASection | None,
    frame_stride: int,
    max_frames: int | None,
) -> Any:
    """:func:`run_video` in one Ray task (one GPU with ``use_gpu``); returns ``predict.PredictSummary``."""

    if frame_stride < 1 or (max_frames is not None and max_frames < 1):
        raise ValueError(f"frame_stride and max_frames must be >= 1, got {frame_stride}, {max_frames}")
    config_from_dict(dict(state["config"]), source="checkpoint config")  # a bad config fails here
    if not ray.is_initialized():
        ray.init()
    if use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise ValueError("use_gpu=True but the Ray cluster has no GPU")
    task = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1)(run_video)
    s = ray.get(
        task.remote(
            state,
            video,
            out,
            score_thresh=score_thresh,
            batch_size=batch_size,
            use_gpu=use_gpu,
            draw=draw,
            tta=tta,
            frame_stride=frame_stride,
            max_frames=max_frames,
        )
    )
    summary = PredictSummary(out, s["results"], s["images"], s["unreadable"], s["detections"])
    logger.info("%s", summary.line())
    return summary
