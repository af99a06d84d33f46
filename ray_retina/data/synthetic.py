"""A small, real COCO-format detection data set of drawn shapes, for the demo and the tests.

Each class is told apart by shape *and* colour: red rectangles, green ellipses, blue triangles.
Category ids are deliberately non-contiguous (3, 17, 42), as in COCO (1..90 with gaps), so the
label maps are exercised. Objects are drawn one after another on a noisy background; a new object
may overlap earlier ones but is rejected when it would hide more than ``MAX_OCCLUDED`` of any of
them. The annotated bbox is the extent of the *visible* pixels of each shape and ``area`` their
count, so what is annotated is what is drawn.

The output is byte-identical for a seed: each image draws from its own generator seeded with
``(seed, split, index)``, JPEG encoding is deterministic, and the json is written with fixed key
order. About 1-2 ms per image, so 500 images take well under a second or two.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# (id, name, RGB colour). Colours are far apart and far from the grey backgrounds.
CATEGORIES: tuple[tuple[int, str, tuple[int, int, int]], ...] = (
    (3, "rectangle", (220, 50, 40)),
    (17, "ellipse", (40, 200, 60)),
    (42, "triangle", (50, 80, 230)),
)
COLOUR_JITTER = 20  # per channel, uniform in [-J, J]
MAX_OCCLUDED = 0.4  # a later object may hide at most this fraction of an earlier one
MAX_TRIES = 30  # placement attempts per object before giving up on it
SPLIT_IDS = {"train": 0, "val": 1}
VAL_ID_OFFSET = 1_000_000  # val image ids start here, so ids are unique across the two splits
JPEG_QUALITY = 90


@dataclass(frozen=True)
class SyntheticPaths:
    """Where :func:`make_synthetic_coco` wrote its output."""

    root: Path
    train_images: Path
    val_images: Path
    train_annotations: Path
    val_annotations: Path


def make_synthetic_coco(
    out_dir: str | os.PathLike[str],
    num_train: int,
    num_val: int,
    seed: int,
    *,
    min_image_size: int = 160,
    max_image_size: int = 320,
    min_object_size: int = 8,
    max_object_size: int = 96,
    max_objects: int = 6,
    class_weights: Sequence[float] | None = None,
) -> SyntheticPaths:
    """Write ``out_dir/{train,val}/*.jpg`` and ``out_dir/annotations/instances_{train,val}.json``.

    Image sides are drawn uniformly from ``[min_image_size, max_image_size]`` (independently, so
    aspect ratios vary); each image holds 1..``max_objects`` objects whose sides are between
    ``min_object_size`` and ``max_object_size`` pixels (log-uniform size, aspect ratio 1:2..2:1).
    Each object's class is drawn uniformly, or in proportion to ``class_weights`` (one weight per class, in
    the order rectangle, ellipse, triangle: ``[1, 1, 0.1]`` makes triangles a rare class).
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train}, {num_val}")
    if not 0 < min_image_size <= max_image_size:
        raise ValueError(f"need 0 < min_image_size <= max_image_size, got {min_image_size}, {max_image_size}")
    if not 1 <= min_object_size <= max_object_size:
        raise ValueError(
            f"need 1 <= min_object_size <= max_object_size, got {min_object_size}, {max_object_size}"
        )
    if min_object_size > min_image_size:
        raise ValueError(f"min_object_size {min_object_size} exceeds min_image_size {min_image_size}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    class_p = None
    if class_weights is not None:
        weights = np.asarray(class_weights, dtype=np.float64)
        if weights.shape != (len(CATEGORIES),) or not np.all(weights >= 0) or weights.sum() <= 0:
            raise ValueError(
                f"class_weights needs {len(CATEGORIES)} weights >= 0 with a positive sum "
                f"({', '.join(c[1] for c in CATEGORIES)}), got {list(class_weights)}"
            )
        class_p = weights / weights.sum()

    root = Path(out_dir)
    paths = SyntheticPaths(
        root=root,
        train_images=root / "train",
        val_images=root / "val",
        train_annotations=root / "annotations" / "instances_train.json",
        val_annotations=root / "annotations" / "instances_val.json",
    )
    params = dict(
        min_image_size=min_image_size,
        max_image_size=max_image_size,
        min_object_size=min_object_size,
        max_object_size=max_object_size,
        max_objects=max_objects,
        class_p=class_p,
    )
    for split, n, img_dir, ann_path in (
        ("train", num_train, paths.train_images, paths.train_annotations),
        ("val", num_val, paths.val_images, paths.val_annotations),
    ):
        coco = _make_split(split, n, seed, img_dir, **params)
        ann_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ann_path.with_name(ann_path.name + ".tmp")
        tmp.write_text(json.dumps(coco, separators=(",", ":")))
        os.replace(tmp, ann_path)
    return paths


def _make_split(split: str, n: int, seed: int, img_dir: Path, **params: Any) -> dict[str, Any]:
    img_dir.mkdir(parents=True, exist_ok=True)
    id_offset = 0 if split == "train" else VAL_ID_OFFSET
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(n):
        rng = np.random.default_rng([seed, SPLIT_IDS[split], i])
        image_id = id_offset + i + 1
        file_name = f"{image_id:012d}.jpg"
        pixels, objects = _draw_image(rng, **params)
        h, w = pixels.shape[:2]
        Image.fromarray(pixels).save(img_dir / file_name, format="JPEG", quality=JPEG_QUALITY)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w, "license": 1})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **obj})
    return {
        "info": {
            "description": f"ray-retina synthetic shapes ({split})",
            "version": "1.0",
            "year": 2024,
            "contributor": "ray-retina",
            "date_created": "2024-01-01",
            "seed": seed,
        },
        "licenses": [
            {"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}
        ],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "shape"} for cid, name, _ in CATEGORIES],
    }


def _draw_image(
    rng: np.random.Generator,
    *,
    min_image_size: int,
    max_image_size: int,
    min_object_size: int,
    max_object_size: int,
    max_objects: int,
    class_p: np.ndarray | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    h = int(rng.integers(min_image_size, max_image_size + 1))
    w = int(rng.integers(min_image_size, max_image_size + 1))
    canvas = _background(rng, h, w)

    # owner[y, x] = index of the object that is visible at that pixel, -1 for background.
    owner = np.full((h, w), -1, dtype=np.int16)
    placed: list[tuple[int, np.ndarray, list[float]]] = []  # (category index, colour, polygon)
    full_area: list[int] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _try in range(MAX_TRIES):
            if class_p is None:
                cls = int(rng.integers(len(CATEGORIES)))
            else:
                cls = int(rng.choice(len(CATEGORIES), p=class_p))
            mask, polygon = _shape_mask(rng, cls, h, w, min_object_size, max_object_size)
            if not mask.any():
                continue
            # Reject a placement that would hide too much of an earlier object.
            hidden = np.bincount(owner[mask & (owner >= 0)], minlength=len(placed))
            visible = np.bincount(owner[owner >= 0], minlength=len(placed))
            if len(placed) and np.any(visible - hidden < (1 - MAX_OCCLUDED) * np.asarray(full_area)):
                continue
            colour = np.clip(
                np.asarray(CATEGORIES[cls][2]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3),
                0,
                255,
            ).astype(np.uint8)
            owner[mask] = len(placed)
            canvas[mask] = colour
            placed.append((cls, colour, polygon))
            full_area.append(int(mask.sum()))
            break

    objects = []
    for k, (cls, _colour, polygon) in enumerate(placed):
        ys, xs = np.nonzero(owner == k)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        objects.append(
            {
                "category_id": CATEGORIES[cls][0],
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": float(len(xs)),
                "iscrowd": 0,
                "segmentation": [[round(v, 2) for v in polygon]],
            }
        )
    return canvas, objects


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Low-saturation grey with a linear gradient and per-pixel noise."""
    base = (rng.uniform(70, 170) + rng.uniform(-12, 12, size=3)).astype(np.float32)
    gx, gy = rng.uniform(-30, 30, size=2)
    ramp = (
        gx * np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]
        + gy * np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
    )
    img = rng.standard_normal(size=(h, w, 3), dtype=np.float32)
    img *= 12.0
    img += ramp[..., None]
    img += base
    return np.clip(img, 0, 255, out=img).astype(np.uint8)


def _shape_mask(
    rng: np.random.Generator, cls: int, h: int, w: int, min_size: int, max_size: int
) -> tuple[np.ndarray, list[float]]:
    """Boolean (h, w) mask of one shape of class ``cls`` and its outline polygon (x, y, x, y, ...)."""
    size = float(np.exp(rng.uniform(np.log(min_size), np.log(max_size))))
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    bw = int(np.clip(round(size * np.sqrt(aspect)), min_size, min(max_size, w)))
    bh = int(np.clip(round(size / np.sqrt(aspect)), min_size, min(max_size, h)))
    x0 = int(rng.integers(0, w - bw + 1))
    y0 = int(rng.integers(0, h - bh + 1))
    x1, y1 = x0 + bw - 1, y0 + bh - 1  # inclusive pixel corners, as PIL draws them

    name = CATEGORIES[cls][1]
    if name == "rectangle":
        polygon = [x0, y0, x1, y0, x1, y1, x0, y1]
    elif name == "ellipse":
        t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        polygon = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1).ravel().tolist()
    else:  # triangle with its apex on a random side
        apex = float(rng.uniform(0.2, 0.8))
        side = int(rng.integers(4))
        if side == 0:  # apex up
            polygon = [x0, y1, x1, y1, x0 + apex * bw, y0]
        elif side == 1:  # apex down
            polygon = [x0, y0, x1, y0, x0 + apex * bw, y1]
        elif side == 2:  # apex left
            polygon = [x1, y0, x1, y1, x0, y0 + apex * bh]
        else:  # apex right
            polygon = [x0, y0, x0, y1, x1, y0 + apex * bh]

    # Draw into a crop of the bounding box only: a full-image canvas per try would dominate the cost.
    crop = Image.new("1", (bw, bh), 0)
    draw = ImageDraw.Draw(crop)
    local = [v - (x0 if j % 2 == 0 else y0) for j, v in enumerate(polygon)]
    if name == "ellipse":
        draw.ellipse([0, 0, bw - 1, bh - 1], fill=1)
    else:
        draw.polygon(local, fill=1)
    mask = np.zeros((h, w), dtype=bool)
    mask[y0 : y0 + bh, x0 : x0 + bw] = np.asarray(crop, dtype=bool)
    return mask, [float(v) for v in polygon]
