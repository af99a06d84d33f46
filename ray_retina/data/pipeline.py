"""Shards -> decoded, resized, flipped images with boxes -> padded tensor batches.

Three layers, each usable alone:

- :func:`augment_batch`, a plain function on a numpy batch (one row per image) that Ray Data runs
  in its CPU pool via ``map_batches(batch_format="numpy")``. It decodes the original bytes
  (EXIF-aware, any mode -> RGB, simplejpeg when installed, else Pillow), resizes the shorter side to
  S (drawn per image in training) with the longer side capped, flips, and moves the boxes exactly.
  Rows whose bytes do not decode are dropped and counted (:func:`skipped_images`).
- :class:`RetinaCollate`, the ``iter_torch_batches(collate_fn=...)`` step on the train worker: pads
  the images into one ``(B, 3, H, W)`` uint8 tensor and the targets to the batch's largest count.
- :func:`build_dataset` (Ray Data, for training) and :func:`iter_eval_batches` (in-process, for the
  per-rank evaluation over a list of val shard files).

Augmented rows have the columns ``AUGMENTED_COLUMNS``: ``image`` uint8 (h, w, 3) of varying size
(Ray stores it as a variable-shaped tensor column), ``image_size`` int64 (2,) = [h, w],
``orig_size`` int64 (2,) = [height, width] of the original, ``scale`` float32, ``image_id`` int64,
``gt_boxes`` float32 (n, 4) XYXY in resized pixels, ``gt_labels`` int64 (n,) in 0..K-1,
``gt_crowd`` bool (n,); n may be 0.
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps
from ray.data.collate_fn import NumpyBatchCollateFn

from ray_retina.data.coco import category_label_maps, xywh_to_xyxy
from ray_retina.data.shards import read_manifest, resolve_uri, shard_files

if TYPE_CHECKING:  # torch is imported where it is used: Ray Data's decode workers never need it
    import torch

try:  # optional fast JPEG decoder (pip install 'ray-retina[fastjpeg]')
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

logger = logging.getLogger(__name__)

READ_COLUMNS = ["image_id", "height", "width", "image", "bbox", "category_id", "iscrowd"]
AUGMENTED_COLUMNS = [
    "image", "image_size", "orig_size", "scale", "image_id", "gt_boxes", "gt_labels", "gt_crowd",
]  # fmt: skip
EXIF_ORIENTATION = 0x0112
EXIF_FORMATS = ("JPEG", "MPO", "TIFF", "WEBP", "PNG")  # formats that can carry an EXIF orientation
COUNTER_ACTOR = "ray_retina_data_counters"  # named actor (per Ray job) holding the skipped-image counts
MAP_BATCHES_PER_TASK = 4  # map batches per Ray Data decode task: enough work per task, yet many tasks
MAX_SKIP_WARNINGS = 20  # per process; every skip is still counted


# ----------------------------------------------------------------------------------------- decoding


def decode_image(data: bytes, min_size: tuple[int, int] | None = None, *, fast: bool = True) -> np.ndarray:
    """Encoded bytes -> uint8 RGB (H, W, 3) in display orientation (EXIF applied).

    ``min_size`` = (h, w) lets a JPEG decoder decode at a reduced scale (1/2, 1/4, 1/8: DCT scaling,
    much cheaper) when the result stays at least that large in both sides; the caller resizes to
    its exact target afterwards. ``fast``: use simplejpeg (libjpeg-turbo) for plain RGB/grey JPEGs
    when it is installed and ``RAY_RETINA_NO_SIMPLEJPEG`` is not set; everything else goes through
    Pillow. Raises on empty, corrupt or truncated data.
    """
    if not data:
        raise ValueError("empty image bytes")
    im = Image.open(io.BytesIO(data))
    orientation = im.getexif().get(EXIF_ORIENTATION, 1) if im.format in EXIF_FORMATS else 1
    transposed = orientation in (5, 6, 7, 8)  # stored with width and height swapped
    stored_min = None if min_size is None else (min_size[::-1] if transposed else min_size)
    if stored_min is not None and (2 * stored_min[0] > im.height or 2 * stored_min[1] > im.width):
        stored_min = None  # scale factors between 1/2 and 1 decode slower than full size

    if fast and _use_simplejpeg() and im.format == "JPEG" and im.mode in ("RGB", "L") and orientation == 1:
        kw = {} if stored_min is None else {"min_height": stored_min[0], "min_width": stored_min[1]}
        return simplejpeg.decode_jpeg(data, colorspace="RGB", **kw)

    if stored_min is not None and im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK"):
        im.draft(im.mode, (stored_min[1], stored_min[0]))
    im.load()  # raises on truncated data (Pillow's LOAD_TRUNCATED_IMAGES is off by default)
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
    return _to_rgb(im)


def _use_simplejpeg() -> bool:
    return simplejpeg is not None and not os.environ.get("RAY_RETINA_NO_SIMPLEJPEG")


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode == "RGB":
        return np.asarray(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: keep the top 8 bits of the range
        a = np.asarray(im).astype(np.float32)
        peak = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        grey = np.clip(a * (255.0 / peak), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # palette with alpha: go through RGBA so the colours are kept
    return np.asarray(im.convert("RGB"))  # L, LA, RGBA (alpha dropped), P, CMYK, YCbCr, 1, F


# ----------------------------------------------------------------------------------------- augment


def augment_batch(
    batch: dict[str, np.ndarray],
    *,
    train: bool,
    min_size_range: Sequence[int],
    max_size: int,
    hflip_prob: float,
    cat_ids: Sequence[int],
    seed: int | None,
    epoch: int | None = None,
) -> dict[str, np.ndarray]:
    """Decode, resize (shorter side S, longer side <= ``max_size``), flip; boxes follow exactly.

    Input columns (``READ_COLUMNS``, as the shards store them): ``image`` bytes, ``image_id``,
    ``height``, ``width``, per-object ``bbox`` (COCO XYWH, original pixels), ``category_id``
    (original ids, mapped to 0..K-1 through the sorted ``cat_ids``), ``iscrowd``. Output columns:
    ``AUGMENTED_COLUMNS`` (see the module docstring). Rows that do not decode are dropped, logged and
    counted (:func:`skipped_images`).

    ``train``: S is drawn uniformly from the integers ``[lo, hi] = min_size_range`` per image and
    the image is flipped with probability ``hflip_prob``; otherwise S = ``lo`` and nothing is
    random. The random draws of an image depend only on ``(seed, image_id, epoch)``, not on how Ray
    batches or orders rows; ``epoch`` defaults to Ray Data's execution index, which grows by one per
    pass over the data set, so each epoch sees different draws. ``seed=None``: fresh entropy.

    Boxes are scaled per axis by the exact resize factors (new_w / width, new_h / height); ``scale``
    is the nominal factor S / shorter side (capped), and ``image_size`` / ``orig_size`` give the exact
    per-axis mapping back to original pixels.
    """
    lo, hi = int(min_size_range[0]), int(min_size_range[-1])
    if not 0 < lo <= hi:
        raise ValueError(f"min_size_range must be [lo, hi] with 0 < lo <= hi, got {list(min_size_range)}")
    cat_to_label, _ = category_label_maps(cat_ids)
    if train and epoch is None and seed is not None:
        epoch = _ray_data_epoch()

    out: dict[str, list[Any]] = {k: [] for k in AUGMENTED_COLUMNS}
    flips: list[bool] = []  # applied when the images are packed
    skipped: list[int] = []
    for i in range(len(batch["image_id"])):
        image_id = int(batch["image_id"][i])
        h, w = int(batch["height"][i]), int(batch["width"][i])
        if train:
            rng = np.random.default_rng(
                None if seed is None else [image_id & 0xFFFFFFFFFFFF, int(epoch or 0), seed & 0xFFFFFFFF]
            )
            size = int(rng.integers(lo, hi + 1))
            flip = bool(rng.random() < hflip_prob)
        else:
            size, flip = lo, False
        scale = min(size / min(h, w), max_size / max(h, w))
        new_h, new_w = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))

        try:
            pixels = decode_image(_as_bytes(batch["image"][i]), min_size=(new_h, new_w))
        except Exception as e:  # corrupt, truncated, empty, unsupported: drop the row, keep training
            skipped.append(image_id)
            _warn_skip(image_id, e)
            continue
        im = Image.fromarray(pixels)
        if im.size != (new_w, new_h):
            im = im.resize((new_w, new_h), Image.BILINEAR)

        boxes = xywh_to_xyxy(_as_array(batch["bbox"][i], np.float32).reshape(-1, 4))
        boxes *= np.array([new_w / w, new_h / h, new_w / w, new_h / h], dtype=np.float32)
        if flip:
            boxes = np.stack([new_w - boxes[:, 2], boxes[:, 1], new_w - boxes[:, 0], boxes[:, 3]], axis=1)
        cats = _as_array(batch["category_id"][i], np.int64).reshape(-1)
        try:
            labels = np.array([cat_to_label[int(c)] for c in cats], dtype=np.int64)
        except KeyError as e:
            raise ValueError(
                f"image {image_id}: category id {e.args[0]} not in cat_ids {sorted(cat_to_label)}"
            ) from None

        out["image"].append(np.asarray(im))
        flips.append(flip)
        out["image_size"].append(np.array([new_h, new_w], dtype=np.int64))
        out["orig_size"].append(np.array([h, w], dtype=np.int64))
        out["scale"].append(np.float32(scale))
        out["image_id"].append(image_id)
        out["gt_boxes"].append(boxes.astype(np.float32, copy=False))
        out["gt_labels"].append(labels)
        out["gt_crowd"].append(_as_array(batch["iscrowd"][i], np.int64).reshape(-1).astype(bool))

    if skipped:
        _count_skipped(skipped)
    n = len(out["image_id"])
    return {
        "image": _pack_images(out["image"], flips),
        "image_size": np.array(out["image_size"], dtype=np.int64).reshape(n, 2),
        "orig_size": np.array(out["orig_size"], dtype=np.int64).reshape(n, 2),
        "scale": np.array(out["scale"], dtype=np.float32),
        "image_id": np.array(out["image_id"], dtype=np.int64),
        "gt_boxes": _object_array(out["gt_boxes"]),
        "gt_labels": _object_array(out["gt_labels"]),
        "gt_crowd": _object_array(out["gt_crowd"]),
    }


class _BufferPool:
    """A few reusable uint8 buffers for the packed images of a batch.

    Fresh memory for every batch costs a page fault per 4 KiB on first write: in a Ray Data decode task
    that made the packing copy about 40 % as expensive as the resize itself. A buffer is handed out again
    only when nothing but the pool refers to it any more (every view of it, the Arrow array Ray built on
    it, the block it went into: all gone, the data having been copied into the object store), which the
    reference count tells exactly in CPython; otherwise a new one is made. Memory held: at most
    ``max_buffers`` buffers of the largest batch seen (a 16-image row group at 1333 x 800: ~51 MB each).
    """

    def __init__(self, max_buffers: int = 4) -> None:
        self.max_buffers = max_buffers
        self.buffers: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        """A writable uint8 array of ``nbytes`` (a view of a pooled buffer, or a new array)."""
        with self._lock:
            free = None
            for i in range(len(self.buffers)):
                b = self.buffers[i]
                # the list's reference, `b` and getrefcount's argument: nobody else holds it
                if sys.getrefcount(b) > 3:
                    continue
                if b.size >= nbytes:
                    return b[:nbytes]
                free = i
            buf = np.empty(nbytes, dtype=np.uint8)
            if free is not None:  # a free buffer too small for this batch: replace it
                self.buffers[free] = buf
            elif len(self.buffers) < self.max_buffers:
                self.buffers.append(buf)
            return buf[:nbytes]


_PIXEL_BUFFERS = _BufferPool()


def _pack_images(images: list[np.ndarray], flips: list[bool]) -> np.ndarray:
    """Copy the batch's (h, w, 3) images, flipped where asked, one after another into one buffer.

    Returns the object array of (h, w, 3) views into that buffer. Ray Data turns a column of contiguous
    views of one buffer into its variable-shaped tensor column without copying (it checks for exactly
    this layout), where separate arrays cost a concatenation of every pixel per batch: with images of
    ~2 MB that second copy into fresh memory was a large part of a decode task's time. The horizontal
    flip happens in the same copy (a reversed view), instead of one more image-sized pass in Pillow.
    """
    sizes = [x.size for x in images]
    flat = _PIXEL_BUFFERS.take(sum(sizes))
    views, offset = [], 0
    for x, n, flip in zip(images, sizes, flips, strict=True):
        dst = flat[offset : offset + n].reshape(x.shape)
        np.copyto(dst, x[:, ::-1] if flip else x)
        views.append(dst)
        offset += n
    return _object_array(views)


def _as_bytes(v: Any) -> bytes:
    return v if isinstance(v, bytes) else bytes(v)


def _as_array(v: Any, dtype: type) -> np.ndarray:
    """A per-row list cell (numpy array, object array of arrays, list) -> a numeric array."""
    if isinstance(v, np.ndarray) and v.dtype != object:
        return v.astype(dtype, copy=False)
    items = list(v) if v is not None else []
    return np.array([np.asarray(x, dtype=dtype) for x in items], dtype=dtype) if items else np.zeros(0, dtype)


def _object_array(items: list[np.ndarray]) -> np.ndarray:
    """1-D object array of arrays: Ray Data stores it as a (variable-shaped) tensor column."""
    arr = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        arr[i] = x
    return arr


def _ray_data_epoch() -> int:
    """Ray Data's execution index (one per pass over a data set) inside a data task; 0 elsewhere."""
    try:
        from ray.data import DataContext

        return int(getattr(DataContext.get_current(), "_execution_idx", 0))
    except Exception:  # pragma: no cover - private attribute moved
        return 0


# ----------------------------------------------------------------------------------------- skip counter

_local_skipped: set[int] = set()
_warned = 0
_counter_handles: dict[str, Any] = {}  # Ray job id -> counter actor handle created by this process


def _warn_skip(image_id: int, err: Exception) -> None:
    global _warned
    if _warned < MAX_SKIP_WARNINGS:
        _warned += 1
        logger.warning("image %d does not decode, row skipped: %s: %s", image_id, type(err).__name__, err)


def _counter_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)
    class DataCounters:
        """Distinct image ids whose bytes did not decode, over all Ray Data tasks of this job."""

        def __init__(self) -> None:
            self.ids: set[int] = set()

        def add(self, ids: list[int]) -> None:
            self.ids.update(ids)

        def count(self) -> int:
            return len(self.ids)

    return DataCounters


def ensure_skip_counter() -> None:
    """Create the job's named counter actor if needed (``build_dataset`` calls this on the driver)."""
    import ray

    if not ray.is_initialized():
        return
    job = ray.get_runtime_context().get_job_id()
    if job not in _counter_handles:
        # Keep the creating handle for the life of this process: a named (non-detached) actor dies
        # when its creator's handle goes away, even while others look it up by name.
        _counter_handles[job] = _counter_class().options(name=COUNTER_ACTOR, get_if_exists=True).remote()


def _count_skipped(ids: list[int]) -> None:
    _local_skipped.update(ids)
    try:
        import ray

        if ray.is_initialized():
            # Wait for it (rare path): the count is in before this batch's rows reach any consumer.
            ray.get(ray.get_actor(COUNTER_ACTOR).add.remote(ids), timeout=30)
    except ValueError:  # no counter actor: build_dataset was not used; the local count still holds
        pass
    except Exception as e:  # never let counting break the data pipeline
        logger.warning("could not record skipped images %s: %s", ids, e)


def skipped_images() -> int:
    """Number of distinct images dropped because their bytes did not decode.

    Inside a Ray job that built its data set with :func:`build_dataset`, this is the job-wide count
    over all Ray Data tasks (a named actor); any process of the job can call it (e.g. rank 0 of the
    train loop, to report ``data/skipped_images``). Elsewhere it is this process's own count.
    """
    try:
        import ray

        if ray.is_initialized():
            return int(ray.get(ray.get_actor(COUNTER_ACTOR).count.remote()))
    except ValueError:
        pass
    return len(_local_skipped)


# ----------------------------------------------------------------------------------------- collate


class RetinaCollate(NumpyBatchCollateFn):
    """Augmented numpy batch -> padded tensors for the model and the loss.

    Output (B images, G = max(1, most boxes in an image of the batch)):
        images      uint8 (B, 3, H, W), H and W the smallest multiples of ``size_divisibility`` that
                    hold every image; each image sits top-left, the rest is ``pad_value``
        image_sizes int64 (B, 2) [h, w] of the valid region
        orig_sizes  int64 (B, 2) [height, width] of the original images
        gt_boxes    float32 (B, G, 4) XYXY in resized pixels, 0 where padded
        gt_labels   int64 (B, G) in 0..K-1, -1 where padded
        gt_crowd    bool (B, G), False where padded
        image_id    int64 (B,)
        scale       float32 (B,) nominal resized / original (per axis exactly: image_sizes / orig_sizes)
    G is at least 1 so that no tensor has a zero-sized GT axis; an image without objects has only
    padding (-1 labels).
    """

    def __init__(self, size_divisibility: int = 128, pad_value: int = 0) -> None:
        if size_divisibility < 1:
            raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}")
        self.size_divisibility = size_divisibility
        self.pad_value = pad_value

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        import torch

        images = list(batch["image"])
        b = len(images)
        d = self.size_divisibility
        sizes = np.array([im.shape[:2] for im in images], dtype=np.int64).reshape(b, 2)
        hmax = int(math.ceil(sizes[:, 0].max(initial=1) / d) * d)
        wmax = int(math.ceil(sizes[:, 1].max(initial=1) / d) * d)
        padded = np.full((b, 3, hmax, wmax), self.pad_value, dtype=np.uint8)
        for i, im in enumerate(images):
            padded[i, :, : im.shape[0], : im.shape[1]] = np.asarray(im).transpose(2, 0, 1)

        boxes = [np.asarray(x, dtype=np.float32).reshape(-1, 4) for x in batch["gt_boxes"]]
        g = max([1] + [len(x) for x in boxes])
        gt_boxes = np.zeros((b, g, 4), dtype=np.float32)
        gt_labels = np.full((b, g), -1, dtype=np.int64)
        gt_crowd = np.zeros((b, g), dtype=bool)
        for i, (bx, lb, cr) in enumerate(zip(boxes, batch["gt_labels"], batch["gt_crowd"], strict=True)):
            n = len(bx)
            gt_boxes[i, :n] = bx
            gt_labels[i, :n] = np.asarray(lb, dtype=np.int64).reshape(-1)
            gt_crowd[i, :n] = np.asarray(cr, dtype=bool).reshape(-1)
        return {
            "images": torch.from_numpy(padded),
            "image_sizes": torch.from_numpy(sizes),
            # np.array copies: Ray hands read-only views, and torch wants writable memory.
            "orig_sizes": torch.from_numpy(np.array(batch["orig_size"], dtype=np.int64).reshape(b, 2)),
            "gt_boxes": torch.from_numpy(gt_boxes),
            "gt_labels": torch.from_numpy(gt_labels),
            "gt_crowd": torch.from_numpy(gt_crowd),
            "image_id": torch.from_numpy(np.array(batch["image_id"], dtype=np.int64).reshape(b)),
            "scale": torch.from_numpy(np.array(batch["scale"], dtype=np.float32).reshape(b)),
        }


# ----------------------------------------------------------------------------------------- datasets


def _cfg(data_cfg: Any, name: str, default: Any) -> Any:
    return getattr(data_cfg, name, default) if data_cfg is not None else default


def augment_kwargs(data_cfg: Any, *, train: bool, cat_ids: Sequence[int], seed: int | None) -> dict[str, Any]:
    """The ``fn_kwargs`` of :func:`augment_batch` for a ``DataConfig``."""
    return {
        "train": train,
        "min_size_range": list(data_cfg.train_min_size) if train else [data_cfg.test_min_size] * 2,
        "max_size": int(data_cfg.max_size),
        "hflip_prob": float(data_cfg.hflip_prob) if train else 0.0,
        "cat_ids": sorted(int(c) for c in cat_ids),
        "seed": seed,
    }


def build_dataset(
    shard_dir: str | os.PathLike[str],
    data_cfg: Any,
    *,
    train: bool,
    seed: int | None,
    files: Sequence[str] | None = None,
    reader: str = "row_groups",
) -> Any:
    """A streaming Ray Data set of augmented rows (``AUGMENTED_COLUMNS``) from a complete shard set.

    ``data_cfg`` is a ``DataConfig`` (fields used: ``train_min_size``, ``test_min_size``,
    ``max_size``, ``hflip_prob``, ``map_batch_size`` (rows per augment call of the ``read_parquet``
    reader), ``map_num_cpus``). Decoding and augmenting
    run as Ray Data tasks asking ``map_num_cpus`` logical CPUs each (fractional is fine), so they
    need CPUs left free by the train workers. ``files`` restricts the read to some shards. Nothing
    executes until the data set is iterated; every pass (epoch) re-executes it.

    ``reader``:
      - ``"row_groups"`` (default): one Ray Data task per Parquet row group (``shards.ROW_GROUP_SIZE``
        images) reads its rows and augments them in the same task, in one call, and returns them as one
        block whose pixels lie in one buffer (moved without copies). In training the row groups are
        visited in a new random order every epoch (seeded by ``seed`` and Ray's execution index).
        No separate read/list operators: on 2 cores this starts an epoch in well under a second and
        moves the encoded bytes through the object store zero times instead of twice.
      - ``"read_parquet"``: ``ray.data.read_parquet`` (file order shuffled per epoch) -> cut into
        blocks of a few map batches -> ``map_batches(augment_batch)``; Ray's native reader.
    Add a local shuffle buffer when iterating (``iter_torch_batches(local_shuffle_buffer_size=...)``)
    to mix images of different row groups within a batch.
    """
    import ray

    manifest = read_manifest(shard_dir)
    cat_ids = [int(c["id"]) for c in manifest["categories"]]
    paths = list(files) if files is not None else shard_files(shard_dir, manifest)
    if not paths:
        raise ValueError(f"{os.fspath(shard_dir)}: the manifest lists no shards")
    ensure_skip_counter()
    batch_size = int(_cfg(data_cfg, "map_batch_size", 8))
    num_cpus = float(_cfg(data_cfg, "map_num_cpus", 1.0))
    aug = augment_kwargs(data_cfg, train=train, cat_ids=cat_ids, seed=seed)
    # Per-epoch order: a seed plus Ray's execution index (reseed_after_execution), or fresh entropy.
    order_seed = (
        ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True) if seed is not None else None
    )

    if reader == "row_groups":
        fragments = [
            {"path": p, "row_group": rg}
            for p, n in zip(paths, _num_row_groups(paths), strict=True)
            for rg in range(n)
        ]
        if not fragments:
            raise ValueError(f"{os.fspath(shard_dir)}: the shards hold no rows")
        ds = ray.data.from_items(fragments, override_num_blocks=len(fragments))
        _preserve_order(ds, data_cfg)
        if train:
            ds = ds.randomize_block_order(seed=order_seed)
        return ds.map_batches(
            read_and_augment,
            # The whole row group in one augment call: one packed pixel buffer, one block per task. Smaller
            # batches would not reach the consumer any sooner (Ray's block shaping gathers a task's outputs
            # up to target_max_block_size, 128 MiB) and their blocks of several chunks were concatenated
            # again, pixel by pixel, by whoever turned them into numpy.
            fn_kwargs={"augment": aug, "batch_size": None},
            batch_format="numpy",
            batch_size=1,  # one row group per task
            num_cpus=num_cpus,
        )
    if reader != "read_parquet":
        raise ValueError(f"reader must be 'row_groups' or 'read_parquet', got {reader!r}")
    shuffle: Any = None
    if train:
        shuffle = (
            ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=True)
            if seed is not None
            else "files"
        )
    fs, _ = resolve_uri(paths[0])
    ds = ray.data.read_parquet([resolve_uri(p)[1] for p in paths], filesystem=fs, shuffle=shuffle)
    _preserve_order(ds, data_cfg)
    # Ray packs small Parquet files into one read block (one map task: no parallelism) and large
    # ones into blocks of hundreds of images (long tasks, coarse balance): cut the encoded rows into
    # blocks of a few map batches so the decode tasks spread over every CPU Ray Data has.
    ds = ds.select_columns(READ_COLUMNS).repartition(
        target_num_rows_per_block=batch_size * MAP_BATCHES_PER_TASK
    )
    return ds.map_batches(
        augment_batch, fn_kwargs=aug, batch_format="numpy", batch_size=batch_size, num_cpus=num_cpus
    )


def _preserve_order(ds: Any, data_cfg: Any) -> None:
    """``data.deterministic``: this data set's rows come out in the (seeded) order, not in the order the
    parallel tasks finish (set on the data set's own context, not the process-wide one)."""
    if bool(_cfg(data_cfg, "deterministic", False)):
        ds.context.execution_options.preserve_order = True


def read_and_augment(
    fragments: dict[str, np.ndarray], *, augment: dict[str, Any], batch_size: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data step of the ``"row_groups"`` reader: read the given (path, row_group) rows, augment them.

    A generator yielding one augmented batch per ``batch_size`` rows of each row group (``None``: the
    whole row group at once, as :func:`build_dataset` asks).
    """
    import pyarrow.parquet as pq

    for path, rg in zip(fragments["path"], fragments["row_group"], strict=True):
        fs, p = resolve_uri(str(path))
        with fs.open_input_file(p) as f:
            pf = pq.ParquetFile(f)
            n = pf.metadata.row_group(int(rg)).num_rows
            for rb in pf.iter_batches(batch_size=batch_size or max(1, n), row_groups=[int(rg)], columns=READ_COLUMNS):
                yield augment_batch(
                    {c: rb.column(c).to_numpy(zero_copy_only=False) for c in READ_COLUMNS}, **augment
                )


def _num_row_groups(paths: Sequence[str]) -> list[int]:
    """Row groups per Parquet file, from the footers (read concurrently: object stores have latency)."""
    import pyarrow.parquet as pq

    def count(uri: str) -> int:
        fs, p = resolve_uri(uri)
        with fs.open_input_file(p) as f:
            return pq.ParquetFile(f).metadata.num_row_groups

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(count, paths))


def iter_eval_batches(
    files: Sequence[str],
    data_cfg: Any,
    *,
    max_images: int | None = None,
    batch_size: int | None = None,
    cat_ids: Sequence[int] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated test-time batches (no randomness) from some shard files, read in this process.

    For evaluation on each rank over its own share of the val shard files, without Ray Data.
    ``cat_ids`` defaults to the categories of the manifest beside the first file. Images that do not
    decode are skipped (and counted) as in training.
    """
    import pyarrow.parquet as pq

    if not files:
        return
    if cat_ids is None:
        first = os.fspath(files[0])
        cat_ids = [int(c["id"]) for c in read_manifest(first.rsplit("/", 1)[0])["categories"]]
    kwargs = augment_kwargs(data_cfg, train=False, cat_ids=cat_ids, seed=None)
    collate = RetinaCollate(size_divisibility=int(_cfg(data_cfg, "size_divisibility", 128)))
    bs = int(batch_size or _cfg(data_cfg, "batch_size", 2))
    seen = 0
    pending: dict[str, list[np.ndarray]] = {}
    for uri in files:
        fs, path = resolve_uri(uri)
        with fs.open_input_file(path) as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=bs, columns=READ_COLUMNS):
                rows = {c: rb.column(c).to_numpy(zero_copy_only=False) for c in READ_COLUMNS}
                if max_images is not None:
                    rows = {c: v[: max(0, max_images - seen)] for c, v in rows.items()}
                seen += len(rows["image_id"])
                aug = augment_batch(rows, **kwargs)
                for c, v in aug.items():
                    pending.setdefault(c, []).extend(list(v))
                while len(pending.get("image_id", [])) >= bs:
                    yield collate(_take(pending, bs))
                if max_images is not None and seen >= max_images:
                    break
        # Batches never span two files: a file's images are then batched (and so padded) the same way
        # whichever rank reads it, and the detections do not depend on the number of workers.
        if pending.get("image_id"):
            yield collate(_take(pending, len(pending["image_id"])))
        if max_images is not None and seen >= max_images:
            break


def _take(pending: dict[str, list[Any]], n: int) -> dict[str, np.ndarray]:
    batch = {}
    for c, v in pending.items():
        batch[c] = (
            _object_array(v[:n]) if c in ("image", "gt_boxes", "gt_labels", "gt_crowd") else np.array(v[:n])
        )
        del v[:n]
    return batch
