"""Batch inference with Ray Data from a trained checkpoint.

    results_json = predict("runs/smoke-...", "photos/", "out/", num_actors=2, use_gpu=True)

The checkpoint (``checkpoint.py``: a file, a checkpoint directory, or a run directory meaning its best
checkpoint by val/AP) holds everything needed to rebuild the model and its test-time input size.
Evaluation of a checkpoint is ``engine/evaluate.py::evaluate_checkpoint``.

Batch inference (:func:`predict`) is a Ray Data pipeline: read (image files, or Parquet shards) ->
decode + resize to the checkpoint's test size (CPU tasks, the same code as evaluation) -> the model in
an actor pool (one model per actor, a GPU each when asked) -> draw the detections on the original
image (CPU tasks) -> COCO-results json written by the driver.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ray_retina.config import Config, config_from_dict
from ray_retina.data.augment import object_array
from ray_retina.engine.evaluate import coco_records
from ray_retina.serving import detect_images
from ray_retina.uri import resolve_uri

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
RESULTS_FILE = "detections.json"  # COCO results format
IMAGES_FILE = "images.json"  # every input image (id, file_name, height, width), with or without detections
DRAWN_DIR = "images"  # one PNG per input image with its detections drawn

__all__ = ["detect_images", "draw_detections", "predict", "preprocess_batch"]


def manifest_category_names(
    cfg: Config, cat_ids: Sequence[int], *shard_dirs: str | os.PathLike[str] | None
) -> dict[int, str]:
    """id -> name from the first readable manifest among ``shard_dirs`` and the run's own shards; ids
    without a name are named by their number."""
    from ray_retina.data.shards import read_manifest

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
    from ray_retina.plots import class_colour

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
    to (image_id, file_name, png_name). Output columns: ``image`` uint8 (h, w, 3), ``image_size`` [h, w],
    ``orig_size`` [height, width], ``image_id``, ``file_name``, ``png_name``, ``bytes`` (the original
    encoded image, for drawing). Images that do not decode are dropped with a warning.
    """
    from ray_retina.data.augment import augment_batch
    from ray_retina.data.decode import header_size

    if files is not None:  # a folder of image files
        rows: dict[str, list[Any]] = {
            k: [] for k in ("image_id", "height", "width", "image", "file_name", "png_name")
        }
        for path, data in zip(batch["path"], batch["bytes"], strict=True):
            image_id, file_name, png_name = files[str(path)]
            try:
                h, w = header_size(bytes(data))
            except Exception as e:  # not an image after all: skip it, keep the rest
                logger.warning("%s does not decode, skipped: %s", file_name, e)
                continue
            for k, v in zip(rows, (image_id, h, w, bytes(data), file_name, png_name), strict=True):
                rows[k].append(v)
        n = len(rows["image_id"])
        src = {k: object_array(v) if k == "image" else np.asarray(v) for k, v in rows.items()}
    else:  # shard rows
        n = len(batch["image_id"])
        src = {k: batch[k] for k in ("image_id", "height", "width", "image", "file_name")}
        src["png_name"] = np.asarray([Path(str(f)).stem + ".png" for f in batch["file_name"]])
    empty = object_array([np.zeros(0, np.float32) for _ in range(n)])
    aug = augment_batch(
        {**src, "bbox": empty, "category_id": empty, "iscrowd": empty},
        train=False,
        min_size_range=[min_size, min_size],
        max_size=max_size,
        hflip_prob=0.0,
        cat_ids=[0],
        seed=None,
    )
    keep = {int(i): j for j, i in enumerate(src["image_id"])}  # augment_batch drops rows that do not decode
    idx = [keep[int(i)] for i in aug["image_id"]]
    return {
        "image": aug["image"],
        "image_size": aug["image_size"],
        "orig_size": aug["orig_size"],
        "image_id": aug["image_id"],
        "file_name": np.asarray([str(src["file_name"][j]) for j in idx], dtype=object),
        "png_name": np.asarray([str(src["png_name"][j]) for j in idx], dtype=object),
        "bytes": object_array([bytes(src["image"][j]) for j in idx]),
    }


class Predictor:
    """Ray Data actor (``map_batches`` with an actor pool): holds one model, runs it on preprocessed batches.

    Output columns per image: ``image_id``, ``file_name``, ``png_name``, ``bytes``, ``orig_size``, and the
    detections with score > ``score_thresh`` (:func:`detect_images`): ``boxes`` (D, 4) XYXY float32 in original pixels, ``scores``
    (D,), ``category_ids`` (D,) original category ids.
    """

    def __init__(self, state: list[Any], *, score_thresh: float, use_gpu: bool) -> None:
        import ray

        from ray_retina.engine.evaluate import AMP_DTYPES
        from ray_retina.engine.restore import model_from_state
        from ray_retina.model import build_postprocessor

        # The checkpoint comes through the object store (wrapped in a list so Ray hands over the ref):
        # actors on other nodes cannot read the driver's files.
        s = ray.get(state[0]) if isinstance(state[0], ray.ObjectRef) else state[0]
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
            torch.set_num_threads(max(1, int(cpus)))
        self.model, cfg, cat_ids = model_from_state(s, self.device)
        self.cat_ids = np.asarray(cat_ids, dtype=np.int64)
        self.postprocess = build_postprocessor(cfg)
        self.cfg = cfg
        self.amp_dtype = AMP_DTYPES[cfg.optim.amp]
        self.score_thresh = score_thresh

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        dets = detect_images(
            self.model,
            self.postprocess,
            self.cfg,
            batch,
            device=self.device,
            amp_dtype=self.amp_dtype,
            cat_ids=self.cat_ids,
            score_thresh=self.score_thresh,
        )
        return {
            "image_id": batch["image_id"],
            "file_name": batch["file_name"],
            "png_name": batch["png_name"],
            "bytes": batch["bytes"],
            "orig_size": batch["orig_size"],
            "boxes": object_array([d["boxes"] for d in dets]),
            "scores": object_array([d["scores"] for d in dets]),
            "category_ids": object_array([d["category_ids"] for d in dets]),
        }


def draw_batch(
    batch: dict[str, np.ndarray], *, out_dir: str, names: Mapping[int, str]
) -> dict[str, np.ndarray]:
    """Ray Data step (CPU tasks): draw each image's detections on the original image, write ``png_name``
    under ``out_dir``; passes the detections on (without the image bytes)."""
    from ray_retina.data.decode import decode_image

    os.makedirs(out_dir, exist_ok=True)
    for data, png, boxes, scores, cats in zip(
        batch["bytes"], batch["png_name"], batch["boxes"], batch["scores"], batch["category_ids"], strict=True
    ):
        pixels = decode_image(bytes(data), fast=False)
        im = draw_detections(
            pixels, np.asarray(boxes), np.asarray(scores), [int(c) for c in np.asarray(cats)], names
        )
        im.save(os.path.join(out_dir, str(png)), format="PNG")
    return {k: v for k, v in batch.items() if k != "bytes"}


# ----------------------------------------------------------------------------------------- predict


def _list_images(folder: str | os.PathLike[str]) -> tuple[Any, list[tuple[str, str]]]:
    """(filesystem, sorted [(path, name relative to folder)]) of the jpg/png files under ``folder``."""
    import pyarrow.fs as pafs

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


def predict(
    checkpoint: str | os.PathLike[str],
    input: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    score_thresh: float = 0.3,
    batch_size: int = 4,
    num_actors: int = 1,
    use_gpu: bool = False,
) -> Path:
    """Batch inference with Ray Data; returns the path of the COCO-results json.

    ``input``: a shard folder (one holding ``manifest.json``; image ids are the shards') or a folder of
    images (``.jpg``/``.jpeg``/``.png``, searched recursively, numbered 1, 2, ... in sorted path order).
    Images are resized to the checkpoint's test size (``data.test_min_size`` / ``max_size``) as in
    evaluation, then run by ``num_actors`` actors each holding the model (one GPU each with ``use_gpu``).
    Ray is started locally when not initialised; Ray Data shows the progress bar.

    Writes into ``out_dir``:
      * ``detections.json``: COCO results, ``{"image_id", "category_id" (original id), "bbox" [x, y, w, h] in
        original pixels, "score", "file_name"}`` for every detection with score > ``score_thresh``, sorted
        by image id and descending score (this threshold is for looking at results; for COCO AP use
        :func:`evaluate_checkpoint`, which keeps the post-process's 0.05);
      * ``images.json``: every image read (``id``, ``file_name``, ``height``, ``width``), detections or not;
      * ``images/<name>.png``: each image at its original size with boxes, category names and scores drawn.
    """
    import pyarrow.fs as pafs
    import ray

    from ray_retina.checkpoint import load_checkpoint_state
    from ray_retina.data.shards import manifest_exists, read_manifest, shard_files

    if not 0.0 <= score_thresh <= 1.0:
        raise ValueError(f"score_thresh must be in [0, 1], got {score_thresh}")
    if batch_size < 1 or num_actors < 1:
        raise ValueError(f"batch_size and num_actors must be >= 1, got {batch_size}, {num_actors}")
    state = load_checkpoint_state(checkpoint)  # on the driver: a bad path fails here, before Ray starts
    cfg = config_from_dict(dict(state["config"]), source="checkpoint config")
    cat_ids = [int(c) for c in state["cat_ids"]]
    fs, in_path = resolve_uri(input)
    if fs.get_file_info(in_path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"input not found: {os.fspath(input)} is not a folder of images or shards")
    is_shards = manifest_exists(input)
    names = manifest_category_names(cfg, cat_ids, input if is_shards else None)

    if not ray.is_initialized():
        ray.init()
    if use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise ValueError("use_gpu=True but the Ray cluster has no GPU")

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

    state_ref = ray.put(state)
    ds = ds.map_batches(
        preprocess_batch,
        fn_kwargs={"min_size": cfg.data.test_min_size, "max_size": cfg.data.max_size, "files": files},
        batch_format="numpy",
        batch_size=batch_size,
    )
    ds = ds.map_batches(
        Predictor,
        fn_constructor_args=([state_ref],),
        fn_constructor_kwargs={"score_thresh": score_thresh, "use_gpu": use_gpu},
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_gpus=1 if use_gpu else 0,
        batch_format="numpy",
        batch_size=batch_size,
    )
    out = Path(out_dir)
    ds = ds.map_batches(
        draw_batch, fn_kwargs={"out_dir": str(out / DRAWN_DIR), "names": names}, batch_format="numpy"
    )

    records: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for i in range(len(batch["image_id"])):
            image_id, file_name = int(batch["image_id"][i]), str(batch["file_name"][i])
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
    records.sort(key=lambda r: (r["image_id"], -r["score"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / IMAGES_FILE).write_text(json.dumps(images, indent=1))
    results = out / RESULTS_FILE
    results.write_text(json.dumps(records))
    logger.info(
        "%d images, %d detections (score > %g) -> %s, drawn in %s",
        len(images),
        len(records),
        score_thresh,
        results,
        out / DRAWN_DIR,
    )
    return results
