"""Data helpers shared by the test tiers: encoded images and numpy batches shaped like a shard read."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_bytes(arr: np.ndarray) -> bytes:
    """``arr`` (H, W, 3) uint8 encoded as PNG (lossless: decoding gives ``arr`` back)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def shard_batch(
    images: list[bytes],
    sizes: list[tuple[int, int]],
    boxes: list[list[list[float]]],
    cats: list[list[int]],
    crowd: list[list[int]] | None = None,
    ids: list[int] | None = None,
) -> dict:
    """A numpy batch shaped like a shard read (``augment_batch``'s input): encoded bytes, (h, w), per-object
    lists as object arrays; ``ids`` default 1..n, ``crowd`` default all 0."""
    n = len(images)
    crowd = crowd or [[0] * len(c) for c in cats]

    def obj(items: list, dtype: type) -> np.ndarray:
        a = np.empty(n, dtype=object)
        for i, x in enumerate(items):
            a[i] = np.asarray(x, dtype=dtype)
        return a

    return {
        "image_id": np.array(ids or list(range(1, n + 1)), dtype=np.int64),
        "height": np.array([s[0] for s in sizes], dtype=np.int32),
        "width": np.array([s[1] for s in sizes], dtype=np.int32),
        "image": np.array(images, dtype=object),
        "bbox": obj([np.asarray(b, np.float32).reshape(-1, 4) for b in boxes], np.float32),
        "category_id": obj(cats, np.int64),
        "iscrowd": obj(crowd, np.int8),
    }
