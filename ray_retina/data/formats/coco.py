"""COCO json at the boundary: loading, per-image records with validated boxes, label maps, box formats.

Boxes are COCO XYWH only here and in the shards; everything downstream of the pipeline is XYXY.

Validation (:func:`build_records`) never drops anything silently: every change is counted by reason
(the keys of ``VALIDATION_REASONS``), and the counts end up in the shard manifest.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ray_retina.data.formats.source import Source, Unit, Warner
from ray_retina.uri import dir_exists, file_exists, open_input, resolve_uri

COCO_REASONS: dict[str, str] = {
    # per image
    "image_missing": "image file missing (row skipped)",
    "image_unreadable": "image file empty, not an image, or not decodable: truncated, corrupt (row skipped)",
    "size_invalid": "image width/height absent, zero, negative or not a whole number (row skipped)",
    "size_mismatch": "image size differs from the annotation's width/height (row skipped)",
    "size_stored_frame": "annotation in the stored frame of an EXIF-rotated image (boxes turned with it)",
    "outside_root": "file name resolving outside --images / --root (row skipped)",
    "name_not_utf8": "file name not UTF-8 (row skipped; logged by its bytes)",
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
    "split_overlap": "image in more than one source split (kept in the first only: --split-overlap first)",
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
    """Load a COCO json from a local path or any URI pyarrow understands (``s3://``, ``gs://``, ``file://``).

    Raises ``ValueError`` in one line naming the file when it is not JSON (truncated, not UTF-8) or not
    a COCO object with an ``images`` list.
    """
    with open_input(str(path)) as f:
        raw = f.read()
    try:
        coco = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{os.fspath(path)} is not valid JSON (truncated or not a json?): {err.msg} at line {err.lineno} "
            f"column {err.colno}"
        ) from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{os.fspath(path)} is not UTF-8 text: byte {err.start}: {err.reason}") from None
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise ValueError(f"{os.fspath(path)} is not a COCO json: no `images` list at the top level")
    return coco


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


def build_records(
    coco: dict[str, Any], name: str = "the COCO json"
) -> tuple[list[ImageRecord], Counter[str]]:
    """Validate a COCO dict into per-image records, in the order of ``coco["images"]``.

    Images: ``width``/``height`` absent, zero, negative or not a whole number -> skipped and counted
    (``size_invalid``), as is a ``file_name`` that resolves outside the image folder (``outside_root``:
    absolute, a URI, or ``..`` above it) or is not UTF-8 (``name_not_utf8``); their annotations go with
    them. Annotations are checked against their image's ``width``/``height`` from the json: w or h <= 0
    or non-finite -> dropped; partly outside -> clipped (``area`` is kept as given, since COCO's
    area is the segment's area); wholly outside -> dropped; unknown image id -> dropped. Image-file
    checks (exists, decodes, real size) happen later, when the bytes are read.

    A record that cannot be read at all raises ``ValueError`` in one line naming ``name`` (the json's
    path), the record and the field: a missing or non-integer ``id``/``image_id``/``category_id``
    (NaN included), a missing ``file_name``, a category id missing from ``categories``, a duplicate
    image id: that is a broken data set, not a bad record.

    Returns the records and the counts per reason (keys of ``VALIDATION_REASONS``).
    """
    # One piece: two passes (images, then annotations) whose checks read in the order they apply, every
    # rule beside its counter; split up, the counts and the skipped-image set would travel between helpers.
    counts: Counter[str] = Counter()
    warn = Warner()
    known_cats = {
        _whole(c, "id", f"{name}: categories[{i}]") for i, c in enumerate(coco.get("categories", []))
    }
    if not known_cats:
        raise ValueError(f"{name} has no categories")
    records: dict[int, ImageRecord] = {}
    skipped: set[int] = set()
    for i, img in enumerate(coco["images"]):
        where = f"{name}: images[{i}]"
        image_id = _whole(img, "id", where)
        where = f"{name}: image id {image_id} (images[{i}])"
        if image_id in records or image_id in skipped:
            raise ValueError(f"{where}: duplicate image id {image_id}")
        file_name = img.get("file_name") if isinstance(img, dict) else None
        if not isinstance(file_name, str) or not file_name:
            raise ValueError(f"{where}: `file_name` missing or not a string: {file_name!r}")
        reason = _file_name_reason(file_name)
        height, width = _size(img.get("height")), _size(img.get("width"))
        if reason is None and (height is None or width is None):
            reason = "size_invalid"
        if reason is not None:
            counts[reason] += 1
            skipped.add(image_id)
            shown = _shown(file_name)
            warn(reason, "%s %s: %s (row skipped)", where, shown, COCO_REASONS[reason].split(" (")[0])
            continue
        records[image_id] = ImageRecord(image_id=image_id, file_name=file_name, height=height, width=width)

    for j, ann in enumerate(coco.get("annotations", [])):
        where = f"{name}: annotations[{j}]"
        ann_id = _whole(ann, "id", where)
        where = f"{name}: annotation id {ann_id} (annotations[{j}])"
        cat = _whole(ann, "category_id", where)
        image_id = _whole(ann, "image_id", where)
        if cat not in known_cats:
            raise ValueError(
                f"{where}, image {image_id}, has category_id {cat}, which is not in categories {sorted(known_cats)}"
            )
        rec = records.get(image_id)
        if rec is None:
            if image_id not in skipped:  # a skipped image's annotations go with it, counted once there
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
        iscrowd = _whole(ann, "iscrowd", where, default=0)
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


def escapes_root(rel: str) -> bool:
    """Whether a path meant to be relative to a data root leaves it: absolute, a URI, a drive, or ``..``
    above the root after normalising. Lexical: a symbolic link inside the root is the owner's choice."""
    p = rel.replace("\\", "/")
    if p.startswith("/") or "://" in p or (len(p) > 1 and p[1] == ":"):
        return True
    norm = posixpath.normpath(p)
    return norm == ".." or norm.startswith("../")


def _file_name_reason(file_name: str) -> str | None:
    """The reason a ``file_name`` cannot be read under the image folder, or None."""
    try:
        file_name.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes a json writer kept with surrogateescape
        return "name_not_utf8"
    return "outside_root" if escapes_root(file_name) else None


def _shown(name: str) -> str:
    """A file name as a log line can show it: its bytes when it is not UTF-8."""
    try:
        name.encode("utf-8")
        return repr(name)
    except UnicodeEncodeError:
        return repr(os.fsencode(name))


def _size(v: Any) -> int | None:
    """A width or height: a whole number > 0 (``480`` or ``480.0``), else None."""
    if isinstance(v, bool) or not _finite(v) or v <= 0 or v != int(v):
        return None
    return int(v)


_MISSING = object()


def _whole(record: Any, key: str, where: str, default: Any = _MISSING) -> int:
    """``record[key]`` as an int, or ``ValueError`` naming ``where`` and the field (missing, NaN, text)."""
    v = record.get(key, default) if isinstance(record, dict) else _MISSING
    if v is _MISSING:
        raise ValueError(f"{where}: no `{key}`" if isinstance(record, dict) else f"{where} is not an object")
    if isinstance(v, bool) or not _finite(v) or v != int(v):
        raise ValueError(f"{where}: `{key}` is {v!r}, not a whole number")
    return int(v)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_coco_source(coco: dict[str, Any], images: str, name: str = "the COCO json") -> Source:
    """A COCO dict as a :class:`Source` (units keyed by image id), to be split like VOC and YOLO trees.

    Ids are kept as they are; validation happens later, in :func:`build_records`, for each split.
    A missing or non-integer id raises ``ValueError`` naming ``name`` and the record.
    """
    units: dict[int, Unit] = {}
    for i, img in enumerate(coco["images"]):
        image_id = _whole(img, "id", f"{name}: images[{i}]")
        if image_id in units:
            raise ValueError(f"{name}: images[{i}]: duplicate image id {image_id}")
        units[image_id] = Unit(key=str(image_id), image=img)
    unattached = []
    for j, ann in enumerate(coco.get("annotations", [])):
        u = units.get(_whole(ann, "image_id", f"{name}: annotations[{j}]"))
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
