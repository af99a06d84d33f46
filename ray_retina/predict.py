"""Using a trained checkpoint: COCO evaluation on val shards, and batch inference with Ray Data.

    model, cfg, cat_ids = load_checkpoint("runs/smoke-.../checkpoint_0000600")
    stats = evaluate_checkpoint(ckpt, "data/synth/shards/val", plots_dir="plots")   # the 12 COCO stats
    results_json = predict(ckpt, "photos/", "out/", num_actors=2, use_gpu=True)    # Ray Data, actor pool

A checkpoint is the dict ``Engine.state_dict()`` saves as ``checkpoint.pt`` (loadable with
``torch.load(weights_only=True)``): the model weights, the resolved config and the ``cat_ids`` the
contiguous labels 0..K-1 stand for. Everything needed to rebuild the model and its test-time input
size comes from it; nothing else of the training run is needed.

Batch inference (:func:`predict`) is a Ray Data pipeline: read (image files, or Parquet shards) ->
decode + resize to the checkpoint's test size (CPU tasks, the same code as evaluation) -> the model in
an actor pool (one model per actor, a GPU each when asked) -> draw the detections on the original
image (CPU tasks) -> COCO-results json written by the driver.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ray_retina.config import Config, apply_overrides, config_from_dict
from ray_retina.engine.evaluate import STAT_NAMES, Backend, coco_evaluate

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"  # the file name the Ray Train worker saves (engine/worker.py)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
RESULTS_FILE = "detections.json"  # COCO results format
IMAGES_FILE = "images.json"  # every input image (id, file_name, height, width), with or without detections
DRAWN_DIR = "images"  # one PNG per input image with its detections drawn
GRID_IMAGES = 16  # val images in the evaluation's detection grid
FIGURE4_IMAGES = 16  # val images whose anchors feed the evaluation's Figure 4

__all__ = [
    "draw_detections",
    "evaluate_checkpoint",
    "load_checkpoint",
    "load_checkpoint_state",
    "model_from_state",
    "predict",
]


# ----------------------------------------------------------------------------------------- checkpoints


def _fs_path(path: str | os.PathLike[str]) -> tuple[Any, str]:
    from ray_retina.data.shards import resolve_uri

    return resolve_uri(path)


def _checkpoint_file(path: str | os.PathLike[str]) -> tuple[Any, str]:
    """(filesystem, file) of a checkpoint given as a ``checkpoint.pt`` file, a Ray Train checkpoint
    directory holding one, or a run directory (its latest ``checkpoint_*`` directory is used)."""
    import pyarrow.fs as pafs

    fs, p = _fs_path(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.File:
        return fs, p
    if info.type == pafs.FileType.Directory:
        direct = f"{p.rstrip('/')}/{CHECKPOINT_FILE}"
        if fs.get_file_info(direct).type == pafs.FileType.File:
            return fs, direct
        subdirs = sorted(
            i.path for i in fs.get_file_info(pafs.FileSelector(p)) if i.type == pafs.FileType.Directory
            and i.base_name.startswith("checkpoint_")
            and fs.get_file_info(f"{i.path}/{CHECKPOINT_FILE}").type == pafs.FileType.File
        )  # fmt: skip
        if subdirs:  # Ray Train names them checkpoint_<iteration, zero padded>: the last sorts last
            logger.info("using the latest checkpoint of %s: %s", os.fspath(path), subdirs[-1])
            return fs, f"{subdirs[-1]}/{CHECKPOINT_FILE}"
        raise FileNotFoundError(
            f"no checkpoint in {os.fspath(path)}: expected {CHECKPOINT_FILE} in it, or checkpoint_* "
            f"directories holding one"
        )
    raise FileNotFoundError(f"checkpoint not found: {os.fspath(path)} does not exist")


def load_checkpoint_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint dict (on CPU) from a file, a checkpoint directory or a run directory; local or URI."""
    fs, file = _checkpoint_file(path)
    with fs.open_input_stream(file) as f:
        data = f.read()
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    missing = [k for k in ("model", "config", "cat_ids") if k not in state]
    if missing:
        raise ValueError(f"{file}: not a ray-retina checkpoint (missing {missing})")
    return state


def model_from_state(
    state: Mapping[str, Any], device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, Config, list[int]]:
    """Rebuild the model of a checkpoint dict, in eval mode on ``device``; returns (model, cfg, cat_ids)."""
    from ray_retina.model import build_model

    cfg = config_from_dict(dict(state["config"]), source="checkpoint config")
    cat_ids = [int(c) for c in state["cat_ids"]]
    # The checkpoint holds every weight: do not look for the backbone's initial weights file, which the
    # machine running inference need not have.
    model = build_model(apply_overrides(cfg, {"model.backbone_weights": None}), len(cat_ids))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, cat_ids


def load_checkpoint(
    path: str | os.PathLike[str], *, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, Config, list[int]]:
    """Load a checkpoint: ``(model in eval mode, its Config, cat_ids)``; label i of the model is category
    ``cat_ids[i]``. ``path``: a ``checkpoint.pt`` file, a checkpoint directory holding one, or a run
    directory (latest ``checkpoint_*``); a local path or a URI (``s3://``, ...). Raises
    ``FileNotFoundError`` naming ``path`` when there is no checkpoint there."""
    return model_from_state(load_checkpoint_state(path), device)


def _category_names(
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


# ----------------------------------------------------------------------------------------- evaluation


def _to_original(boxes: np.ndarray, image_size: Sequence[int], orig_size: Sequence[int]) -> np.ndarray:
    """XYXY boxes in resized pixels -> original pixels, per axis exactly (the resize was per axis)."""
    h, w = float(image_size[0]), float(image_size[1])
    oh, ow = float(orig_size[0]), float(orig_size[1])
    out = boxes.astype(np.float64) * np.array([ow / w, oh / h, ow / w, oh / h])
    return np.clip(out, 0.0, [ow, oh, ow, oh])


def _coco_records(
    image_id: int, boxes: np.ndarray, scores: np.ndarray, cats: np.ndarray
) -> list[dict[str, Any]]:
    """COCO results records of one image; ``boxes`` XYXY in original pixels."""
    return [
        {
            "image_id": int(image_id),
            "category_id": int(c),
            "bbox": [
                round(float(b[0]), 3),
                round(float(b[1]), 3),
                round(float(b[2] - b[0]), 3),
                round(float(b[3] - b[1]), 3),
            ],
            "score": round(float(s), 5),
        }
        for b, s, c in zip(boxes, scores, cats, strict=True)
    ]


@torch.no_grad()
def write_run_pictures(
    model: torch.nn.Module,
    criterion: Any,
    postprocess: Any,
    cfg: Any,
    cat_ids: list[int],
    categories: list[dict[str, Any]],
    val_files: list[str],
    coco_eval: Any,
    out_dir: str | os.PathLike[str],
) -> list[Path]:
    """The pictures of a finished run: per-class PR curves (from its COCO eval), a grid of val images with
    predicted and true boxes, and the paper's Figure 4 for the model, as PNGs in `out_dir`."""
    from ray_retina import plots
    from ray_retina.data.pipeline import iter_eval_batches

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    written = [plots.pr_curves(coco_eval, categories, out / "pr_curves.png")]
    images, preds, truths = [], [], []
    with torch.no_grad():
        for batch in iter_eval_batches(val_files, cfg.data, max_images=GRID_IMAGES, cat_ids=cat_ids):
            per_image = postprocess(model(batch["images"].to(device).float()), batch["image_sizes"].to(device))
            for i, d in enumerate(per_image):
                h, w = batch["image_sizes"][i].tolist()
                images.append(batch["images"][i, :, :h, :w].permute(1, 2, 0).numpy())
                preds.append({k: v.float().cpu().numpy() if k != "labels" else v.cpu().numpy() for k, v in d.items()})
                truths.append({"boxes": batch["gt_boxes"][i].numpy(), "labels": batch["gt_labels"][i].numpy()})
    written.append(
        plots.detection_grid(images, preds, truths, [names.get(c, str(c)) for c in cat_ids], out / "detections.png",
                             score_thresh=0.3, max_images=GRID_IMAGES)
    )  # fmt: skip
    batches = iter_eval_batches(val_files, cfg.data, max_images=FIGURE4_IMAGES, cat_ids=cat_ids)
    written.append(
        plots.figure4_from_model(model, criterion, batches, cfg.loss.gamma, cfg.loss.alpha, out / "focal_loss_cdf.png")
    )
    model.train(was_training)
    return written


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str],
    shards: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    backend: Backend = "faster_coco_eval",
    plots_dir: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    max_images: int | None = None,
) -> dict[str, float]:
    """COCO box AP of a checkpoint on a val shard set: the 12 stats keyed as ``STAT_NAMES`` (AP, AP50, AP75,
    APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl), each in [0, 1], or -1 where COCO has no data (e.g. no
    small objects).

    Runs in this process (no Ray) with the checkpoint's test-time preprocessing and post-process, the
    ground truth rebuilt from the shards. ``batch_size`` defaults to the config's ``data.batch_size``;
    ``max_images`` evaluates the first N images only. With ``plots_dir`` it also writes
    ``pr_curves.png`` (per-class precision-recall), ``detections.png`` (a grid of the first val images with
    predicted and true boxes) and ``focal_loss_cdf.png`` (the paper's Figure 4 for this model).
    """
    from ray_retina.data.pipeline import iter_eval_batches
    from ray_retina.data.shards import coco_gt_from_shards, read_manifest, shard_files
    from ray_retina.model import build_criterion, build_postprocessor

    device = torch.device(device)
    model, cfg, cat_ids = load_checkpoint(checkpoint, device=device)
    postprocess = build_postprocessor(cfg)
    manifest = read_manifest(shards)
    files = shard_files(shards, manifest)
    gt = coco_gt_from_shards(shards)
    shard_cats = sorted(int(c["id"]) for c in manifest["categories"])
    # GT labels are the model's labels when the shards' categories are among the checkpoint's; otherwise
    # they are only needed to read the shards, and the pictures that compare them with predictions are off.
    same_labels = set(shard_cats) <= set(cat_ids)
    if not same_labels:
        logger.warning(
            "categories of %s %s are not all among the checkpoint's %s",
            os.fspath(shards),
            shard_cats,
            cat_ids,
        )
    label_cats = sorted(cat_ids) if same_labels else shard_cats
    cat_lookup = np.asarray(cat_ids, dtype=np.int64)

    dets: list[dict[str, Any]] = []
    img_ids: list[int] = []
    grid: list[tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]] = []
    batches = iter_eval_batches(
        files, cfg.data, max_images=max_images, batch_size=batch_size, cat_ids=label_cats
    )
    for batch in batches:
        outputs = model(batch["images"].to(device).float())
        per_image = postprocess(outputs, batch["image_sizes"].to(device))
        for i, d in enumerate(per_image):
            boxes = d["boxes"].float().cpu().numpy()
            scores = d["scores"].float().cpu().numpy()
            labels = d["labels"].cpu().numpy()
            size = batch["image_sizes"][i].tolist()
            image_id = int(batch["image_id"][i])
            img_ids.append(image_id)
            orig = _to_original(boxes, size, batch["orig_sizes"][i].tolist())
            dets.extend(_coco_records(image_id, orig, scores, cat_lookup[labels]))
            if plots_dir is not None and len(grid) < GRID_IMAGES:
                pixels = batch["images"][i, :, : size[0], : size[1]].permute(1, 2, 0).numpy()
                truth = {"boxes": batch["gt_boxes"][i].numpy(), "labels": batch["gt_labels"][i].numpy()}
                grid.append((pixels, {"boxes": boxes, "scores": scores, "labels": labels},
                             truth if same_labels else {"boxes": np.zeros((0, 4)), "labels": np.zeros(0)}))  # fmt: skip
    if not img_ids:
        raise ValueError(f"{os.fspath(shards)}: no val image could be read")
    stats, coco_eval = coco_evaluate(
        gt, dets, backend=backend, img_ids=sorted(set(img_ids)), return_eval=True
    )
    stats = {k: float(stats[k]) for k in STAT_NAMES}

    if plots_dir is not None:
        from ray_retina import plots

        out = Path(plots_dir)
        names = _category_names(cfg, cat_ids, shards)
        written = [plots.pr_curves(coco_eval, manifest["categories"], out / "pr_curves.png")]
        written.append(
            plots.detection_grid(
                [g[0] for g in grid], [g[1] for g in grid], [g[2] for g in grid], [names[c] for c in cat_ids],
                out / "detections.png", score_thresh=0.3, max_images=GRID_IMAGES,
            )
        )  # fmt: skip
        if same_labels:
            criterion = build_criterion(cfg, len(cat_ids))
            fig4_batches = iter_eval_batches(
                files, cfg.data, max_images=FIGURE4_IMAGES, batch_size=batch_size, cat_ids=label_cats
            )
            written.append(
                plots.figure4_from_model(
                    model, criterion, fig4_batches, cfg.loss.gamma, cfg.loss.alpha, out / "focal_loss_cdf.png"
                )
            )
        logger.info("wrote %s", ", ".join(str(p) for p in written))
    return stats


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


def _header_size(data: bytes) -> tuple[int, int]:
    """(height, width) in display orientation, from the header only."""
    from ray_retina.data.pipeline import EXIF_FORMATS, EXIF_ORIENTATION

    im = Image.open(io.BytesIO(data))
    w, h = im.size
    orientation = im.getexif().get(EXIF_ORIENTATION, 1) if im.format in EXIF_FORMATS else 1
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


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
    from ray_retina.data.pipeline import _object_array, augment_batch

    if files is not None:  # a folder of image files
        rows: dict[str, list[Any]] = {
            k: [] for k in ("image_id", "height", "width", "image", "file_name", "png_name")
        }
        for path, data in zip(batch["path"], batch["bytes"], strict=True):
            image_id, file_name, png_name = files[str(path)]
            try:
                h, w = _header_size(bytes(data))
            except Exception as e:  # not an image after all: skip it, keep the rest
                logger.warning("%s does not decode, skipped: %s", file_name, e)
                continue
            for k, v in zip(rows, (image_id, h, w, bytes(data), file_name, png_name), strict=True):
                rows[k].append(v)
        n = len(rows["image_id"])
        src = {k: _object_array(v) if k == "image" else np.asarray(v) for k, v in rows.items()}
    else:  # shard rows
        n = len(batch["image_id"])
        src = {k: batch[k] for k in ("image_id", "height", "width", "image", "file_name")}
        src["png_name"] = np.asarray([Path(str(f)).stem + ".png" for f in batch["file_name"]])
    empty = _object_array([np.zeros(0, np.float32) for _ in range(n)])
    aug = augment_batch(
        {**src, "bbox": empty, "category_id": empty, "iscrowd": empty},
        train=False, min_size_range=[min_size, min_size], max_size=max_size, hflip_prob=0.0, cat_ids=[0], seed=None,
    )  # fmt: skip
    keep = {int(i): j for j, i in enumerate(src["image_id"])}  # augment_batch drops rows that do not decode
    idx = [keep[int(i)] for i in aug["image_id"]]
    return {
        "image": aug["image"],
        "image_size": aug["image_size"],
        "orig_size": aug["orig_size"],
        "image_id": aug["image_id"],
        "file_name": np.asarray([str(src["file_name"][j]) for j in idx], dtype=object),
        "png_name": np.asarray([str(src["png_name"][j]) for j in idx], dtype=object),
        "bytes": _object_array([bytes(src["image"][j]) for j in idx]),
    }


class Predictor:
    """Ray Data actor (``map_batches`` with an actor pool): holds one model, runs it on preprocessed batches.

    Output columns per image: ``image_id``, ``file_name``, ``png_name``, ``bytes``, ``orig_size``, and the
    detections with score >= ``score_thresh``: ``boxes`` (D, 4) XYXY float32 in original pixels, ``scores``
    (D,), ``category_ids`` (D,) original category ids.
    """

    def __init__(self, state: list[Any], *, score_thresh: float, use_gpu: bool) -> None:
        import ray

        from ray_retina.data.pipeline import RetinaCollate
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
        self.collate = RetinaCollate(size_divisibility=cfg.data.size_divisibility)
        self.score_thresh = score_thresh

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ray_retina.data.pipeline import _object_array

        n = len(batch["image_id"])
        empty = [np.zeros((0, 4), np.float32)] * n
        collated = self.collate(
            {"image": list(batch["image"]), "gt_boxes": empty, "gt_labels": [np.zeros(0, np.int64)] * n,
             "gt_crowd": [np.zeros(0, bool)] * n, "orig_size": batch["orig_size"], "image_id": batch["image_id"],
             "scale": np.ones(n, np.float32)}
        )  # fmt: skip
        outputs = self.model(collated["images"].to(self.device, non_blocking=True).float())
        dets = self.postprocess(outputs, collated["image_sizes"].to(self.device))
        boxes, scores, cats = [], [], []
        for i, d in enumerate(dets):
            keep = d["scores"] >= self.score_thresh
            b = _to_original(
                d["boxes"][keep].float().cpu().numpy(), batch["image_size"][i], batch["orig_size"][i]
            )
            boxes.append(b.astype(np.float32).reshape(-1, 4))
            scores.append(d["scores"][keep].float().cpu().numpy())
            cats.append(self.cat_ids[d["labels"][keep].cpu().numpy()])
        return {
            "image_id": batch["image_id"],
            "file_name": batch["file_name"],
            "png_name": batch["png_name"],
            "bytes": batch["bytes"],
            "orig_size": batch["orig_size"],
            "boxes": _object_array(boxes),
            "scores": _object_array(scores),
            "category_ids": _object_array(cats),
        }


def draw_batch(
    batch: dict[str, np.ndarray], *, out_dir: str, names: Mapping[int, str]
) -> dict[str, np.ndarray]:
    """Ray Data step (CPU tasks): draw each image's detections on the original image, write ``png_name``
    under ``out_dir``; passes the detections on (without the image bytes)."""
    from ray_retina.data.pipeline import decode_image

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

    fs, root = _fs_path(folder)
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
        original pixels, "score", "file_name"}`` for every detection with score >= ``score_thresh``, sorted
        by image id and descending score (this threshold is for looking at results; for COCO AP use
        :func:`evaluate_checkpoint`, which keeps the post-process's 0.05);
      * ``images.json``: every image read (``id``, ``file_name``, ``height``, ``width``), detections or not;
      * ``images/<name>.png``: each image at its original size with boxes, category names and scores drawn.
    """
    import pyarrow.fs as pafs
    import ray

    from ray_retina.data.shards import manifest_exists, read_manifest, resolve_uri, shard_files

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
    names = _category_names(cfg, cat_ids, input if is_shards else None)

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
            recs = _coco_records(image_id, np.asarray(batch["boxes"][i]).reshape(-1, 4),
                                 np.asarray(batch["scores"][i]).reshape(-1), np.asarray(batch["category_ids"][i]).reshape(-1))  # fmt: skip
            records.extend({**r, "file_name": file_name} for r in recs)
    images.sort(key=lambda r: r["id"])
    records.sort(key=lambda r: (r["image_id"], -r["score"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / IMAGES_FILE).write_text(json.dumps(images, indent=1))
    results = out / RESULTS_FILE
    results.write_text(json.dumps(records))
    logger.info("%d images, %d detections (score >= %g) -> %s, drawn in %s", len(images), len(records),
                score_thresh, results, out / DRAWN_DIR)  # fmt: skip
    return results
