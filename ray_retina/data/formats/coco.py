"""COCO json at the boundary: loading, per-image records with validated boxes, label maps, box formats.

Boxes are COCO XYWH only here and in the shards; everything downstream of the pipeline is XYXY.

Validation (:func:`build_records`) never drops anything silently: every change is counted by reason
(the keys of ``VALIDATION_REASONS``), and the counts end up in the shard manifest.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ray_retina.data.formats.source import Source, Unit
from ray_retina.uri import dir_exists, file_exists, open_input, resolve_uri

COCO_REASONS: dict[str, str] = {
    # per image
    "image_missing": "image file missing (row skipped)",
    "image_unreadable": "image file empty or not a readable image (row skipped)",
    "image_without_annotations": "image without annotations (kept as a negative)",
    # per annotation
    "bbox_invalid": "bbox not 4 finite numbers (annotation dropped)",
    "bbox_nonpositive": "bbox with w or h <= 0 (annotation dropped)",
    "bbox_clipped": "bbox partly outside the image (clipped to it)",
    "bbox_outside": "bbox wholly outside the image (annotation dropped)",
    "ann_unknown_image": "annotation whose image id is not in images (annotation dropped)",
    "crowd": "crowd annotation or VOC difficult object (kept with iscrowd=1, an ignore region)",
}
# Counted while reading a VOC or YOLO tree (formats/voc.py, formats/yolo.py), before the records above.
SOURCE_REASONS: dict[str, str] = {
    "label_file_missing": "image without a label file (kept as a negative)",
    "label_file_invalid": "label file that does not parse (image skipped)",
    "label_line_invalid": "label line not `class cx cy w h` (or a polygon) in numbers (line dropped)",
    "label_file_orphan": "label file without an image (ignored)",
    "class_unknown": "object of a class not in --classes / data.yaml names (object dropped)",
}
# Every reason a manifest can count. A manifest lists the COCO reasons always, plus the reasons of the
# format its source was read from (zeros included), so its keys say what was checked.
VALIDATION_REASONS: dict[str, str] = {**COCO_REASONS, **SOURCE_REASONS}


@dataclass
class ImageRecord:
    """One image and its validated annotations, in COCO units (bbox XYWH, original category ids)."""

    image_id: int
    file_name: str
    height: int
    width: int
    ann_id: list[int] = field(default_factory=list)
    bbox: list[list[float]] = field(default_factory=list)
    category_id: list[int] = field(default_factory=list)
    iscrowd: list[int] = field(default_factory=list)
    area: list[float] = field(default_factory=list)


def load_coco(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a COCO json from a local path or any URI pyarrow understands (``s3://``, ``gs://``, ``file://``)."""
    with open_input(str(path)) as f:
        return json.load(f)


def category_label_maps(cat_ids: Iterable[int]) -> tuple[dict[int, int], list[int]]:
    """Contiguous labels from category ids: sorted ids -> 0..K-1, and back (``label_to_cat[label]``)."""
    label_to_cat = sorted({int(c) for c in cat_ids})
    return {c: i for i, c in enumerate(label_to_cat)}, label_to_cat


def annotations_by_image(coco: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """Annotations grouped by image id, in file order; images without annotations map to ``[]``."""
    index: dict[int, list[dict[str, Any]]] = {int(img["id"]): [] for img in coco["images"]}
    for ann in coco.get("annotations", []):
        index.setdefault(int(ann["image_id"]), []).append(ann)
    return index


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(..., 4) COCO [x, y, w, h] -> [x1, y1, x2, y2] (same dtype)."""
    boxes = np.asarray(boxes)
    return np.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:4]], axis=-1)


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """(..., 4) [x1, y1, x2, y2] -> COCO [x, y, w, h] (same dtype)."""
    boxes = np.asarray(boxes)
    return np.concatenate([boxes[..., :2], boxes[..., 2:4] - boxes[..., :2]], axis=-1)


def build_records(coco: dict[str, Any]) -> tuple[list[ImageRecord], Counter[str]]:
    """Validate a COCO dict into per-image records, in the order of ``coco["images"]``.

    Annotations are checked against their image's ``width``/``height`` from the json: w or h <= 0
    or non-finite -> dropped; partly outside -> clipped (``area`` is kept as given, since COCO's
    area is the segment's area); wholly outside -> dropped; unknown image id -> dropped. A category
    id missing from ``categories`` raises ``ValueError`` naming the annotation: that is a broken data
    set, not a bad record. Image-file checks happen later, when the bytes are read.

    Returns the records and the counts per reason (keys of ``VALIDATION_REASONS``).
    """
    counts: Counter[str] = Counter()
    known_cats = {int(c["id"]) for c in coco.get("categories", [])}
    if not known_cats:
        raise ValueError("COCO json has no categories")
    records: dict[int, ImageRecord] = {}
    for img in coco["images"]:
        image_id = int(img["id"])
        if image_id in records:
            raise ValueError(f"duplicate image id {image_id} in images")
        records[image_id] = ImageRecord(
            image_id=image_id,
            file_name=str(img["file_name"]),
            height=int(img["height"]),
            width=int(img["width"]),
        )

    for ann in coco.get("annotations", []):
        ann_id = int(ann["id"])
        cat = int(ann["category_id"])
        if cat not in known_cats:
            raise ValueError(
                f"annotation id {ann_id} (image {ann.get('image_id')}) has category_id {cat}, "
                f"which is not in categories {sorted(known_cats)}"
            )
        rec = records.get(int(ann["image_id"]))
        if rec is None:
            counts["ann_unknown_image"] += 1
            continue
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_finite(v) for v in bbox):
            counts["bbox_invalid"] += 1
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            counts["bbox_nonpositive"] += 1
            continue
        x1, y1 = min(max(x, 0.0), rec.width), min(max(y, 0.0), rec.height)
        x2, y2 = min(max(x + w, 0.0), rec.width), min(max(y + h, 0.0), rec.height)
        if x2 <= x1 or y2 <= y1:
            counts["bbox_outside"] += 1
            continue
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            counts["bbox_clipped"] += 1
            x, y, w, h = x1, y1, x2 - x1, y2 - y1
        iscrowd = int(ann.get("iscrowd", 0))
        counts["crowd"] += iscrowd
        area = ann.get("area")
        rec.ann_id.append(ann_id)
        rec.bbox.append([x, y, w, h])
        rec.category_id.append(cat)
        rec.iscrowd.append(iscrowd)
        rec.area.append(float(area) if _finite(area) else w * h)

    out = list(records.values())
    counts["image_without_annotations"] += sum(1 for r in out if not r.ann_id)
    return out, counts


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_coco_source(coco: dict[str, Any], images: str) -> Source:
    """A COCO dict as a :class:`Source` (units keyed by image id), to be split like VOC and YOLO trees.

    Ids are kept as they are; validation happens later, in :func:`build_records`, for each split.
    """
    units = {int(img["id"]): Unit(key=str(img["id"]), image=img) for img in coco["images"]}
    if len(units) != len(coco["images"]):
        raise ValueError("duplicate image ids in images")
    unattached = []
    for ann in coco.get("annotations", []):
        u = units.get(int(ann["image_id"]))
        (unattached if u is None else u.annotations).append(ann)
    return Source(
        format="coco",
        images=images,
        categories=coco.get("categories", []),
        units=list(units.values()),
        unattached=unattached,
        info=coco.get("info", {}),
        licenses=coco.get("licenses", []),
    )


def check_coco_inputs(annotations: str | os.PathLike[str], images: str | os.PathLike[str]) -> None:
    """``FileNotFoundError`` with one line naming the path and what to give, when either input is absent."""
    fs, path = resolve_uri(annotations)
    if not file_exists(fs, path):
        raise FileNotFoundError(
            f"annotations file not found: {os.fspath(annotations)} (give --annotations a COCO json, "
            "e.g. annotations/instances_train2017.json)"
        )
    fs, path = resolve_uri(images)
    if not dir_exists(fs, path):
        raise FileNotFoundError(
            f"image folder not found: {os.fspath(images)} (give --images the folder the json's file_name "
            "entries are relative to, e.g. train2017/)"
        )
