"""Augmented numpy rows -> padded tensor batches: ``pad_images`` for inference, ``RetinaCollate`` for
training and evaluation (the ``iter_torch_batches(collate_fn=...)`` step on the train worker)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

if TYPE_CHECKING:
    import torch


def pad_images(
    images: Sequence[np.ndarray], size_divisibility: int = 128, pad_value: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(h, w, 3) uint8 images -> ``(padded (B, 3, H, W) uint8, sizes (B, 2) int64 [h, w])``.

    H and W are the smallest multiples of ``size_divisibility`` that hold every image; each image sits
    top-left, the rest is ``pad_value``. Inference needs nothing else: no targets, no fake ground truth.
    """
    if size_divisibility < 1:
        raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}")
    b = len(images)
    d = size_divisibility
    sizes = np.array([im.shape[:2] for im in images], dtype=np.int64).reshape(b, 2)
    hmax = int(math.ceil(sizes[:, 0].max(initial=1) / d) * d)
    wmax = int(math.ceil(sizes[:, 1].max(initial=1) / d) * d)
    padded = np.full((b, 3, hmax, wmax), pad_value, dtype=np.uint8)
    for i, im in enumerate(images):
        padded[i, :, : im.shape[0], : im.shape[1]] = np.asarray(im).transpose(2, 0, 1)
    return padded, sizes


class RetinaCollate(NumpyBatchCollateFn):
    """Augmented numpy batch -> padded tensors for the model and the loss.

    Output (B images, G = max(1, most boxes in an image of the batch)):
        images      uint8 (B, 3, H, W), see :func:`pad_images`
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
        import torch  # deferred: the collate module is importable by Ray-free, torch-free data code

        padded, sizes = pad_images(list(batch["image"]), self.size_divisibility, self.pad_value)
        b = len(sizes)
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
