"""Decode + resize + flip of a numpy batch of shard rows, boxes moved exactly: the Ray Data step.

:func:`augment_batch` is a plain function on a numpy batch (one row per image) that Ray Data runs in
its CPU pool via ``map_batches(batch_format="numpy")``; it needs neither Ray nor torch (import-safe in
any process). Rows whose bytes do not decode are dropped and counted (``data/skips.py``).

Augmented rows have the columns ``AUGMENTED_COLUMNS``: ``image`` uint8 (h, w, 3) of varying size
(Ray stores it as a variable-shaped tensor column), ``image_size`` int64 (2,) = [h, w],
``orig_size`` int64 (2,) = [height, width] of the original, ``scale`` float32, ``image_id`` int64,
``gt_boxes`` float32 (n, 4) XYXY in resized pixels, ``gt_labels`` int64 (n,) in 0..K-1,
``gt_crowd`` bool (n,); n may be 0.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ray_retina.data.decode import decode_image
from ray_retina.data.formats.coco import category_label_maps, xywh_to_xyxy
from ray_retina.data.skips import count_skipped, warn_skip

READ_COLUMNS = ["image_id", "height", "width", "image", "bbox", "category_id", "iscrowd"]
AUGMENTED_COLUMNS = [
    "image", "image_size", "orig_size", "scale", "image_id", "gt_boxes", "gt_labels", "gt_crowd",
]  # fmt: skip

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
    skip_counter: str | None = None,
) -> dict[str, np.ndarray]:
    """Decode, resize (shorter side S, longer side <= ``max_size``), flip; boxes follow exactly.

    Input columns (``READ_COLUMNS``, as the shards store them): ``image`` bytes, ``image_id``,
    ``height``, ``width``, per-object ``bbox`` (COCO XYWH, original pixels), ``category_id``
    (original ids, mapped to 0..K-1 through the sorted ``cat_ids``), ``iscrowd``. Output columns:
    ``AUGMENTED_COLUMNS`` (see the module docstring). Rows that do not decode are dropped, logged and
    counted in ``skip_counter`` (:func:`ray_retina.data.skips.skipped_images`).

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
            warn_skip(image_id, e)
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
        count_skipped(skipped, skip_counter)
    n = len(out["image_id"])
    return {
        "image": _pack_images(out["image"], flips),
        "image_size": np.array(out["image_size"], dtype=np.int64).reshape(n, 2),
        "orig_size": np.array(out["orig_size"], dtype=np.int64).reshape(n, 2),
        "scale": np.array(out["scale"], dtype=np.float32),
        "image_id": np.array(out["image_id"], dtype=np.int64),
        "gt_boxes": object_array(out["gt_boxes"]),
        "gt_labels": object_array(out["gt_labels"]),
        "gt_crowd": object_array(out["gt_crowd"]),
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
    return object_array(views)


def _as_bytes(v: Any) -> bytes:
    return v if isinstance(v, bytes) else bytes(v)


def _as_array(v: Any, dtype: type) -> np.ndarray:
    """A per-row list cell (numpy array, object array of arrays, list) -> a numeric array."""
    if isinstance(v, np.ndarray) and v.dtype != object:
        return v.astype(dtype, copy=False)
    items = list(v) if v is not None else []
    return np.array([np.asarray(x, dtype=dtype) for x in items], dtype=dtype) if items else np.zeros(0, dtype)


def object_array(items: list[np.ndarray]) -> np.ndarray:
    """1-D object array of arrays: Ray Data stores it as a (variable-shaped) tensor column."""
    arr = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        arr[i] = x
    return arr


def _ray_data_epoch() -> int:
    """Ray Data's execution index (one per pass over a data set) inside a data task; 0 elsewhere."""
    from ray_retina._ray_private import ray_data_execution_index

    return ray_data_execution_index()
