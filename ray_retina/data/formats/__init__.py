"""Annotation formats at the boundary: each reader turns its source into one validated record type
(:class:`ray_retina.data.formats.coco.ImageRecord`, COCO units) that ``data/shards.py`` writes.

- ``coco``: COCO json -> records (the validation every format goes through), ``VALIDATION_REASONS``
- ``voc``, ``yolo``: Pascal VOC and Ultralytics YOLO trees -> a :class:`~.source.Source` in COCO form
- ``source``: the ``Source`` of any format, split-able by image before it is written
- ``split``: the deterministic train/val split for sources without one
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ray_retina.data.formats.coco import check_coco_inputs, load_coco, read_coco_source
from ray_retina.data.formats.source import Source
from ray_retina.data.formats.voc import read_voc
from ray_retina.data.formats.yolo import read_yolo

FORMATS = ("coco", "voc", "yolo")


def read_source(
    format: str,
    *,
    annotations: str | os.PathLike[str] | None = None,
    images: str | os.PathLike[str] | None = None,
    root: str | os.PathLike[str] | None = None,
    data: str | os.PathLike[str] | None = None,
    classes: Sequence[str] | None = None,
) -> Source:
    """Read a data set of ``format``: ``coco`` from ``annotations`` + ``images``; ``voc`` from ``root``
    (+ ``classes``); ``yolo`` from ``root`` (+ ``data`` yaml, or ``classes`` without one)."""
    if format == "coco":
        if annotations is None or images is None:
            raise ValueError("format coco needs annotations (a COCO json) and images (its image folder)")
        if classes is not None:
            raise ValueError("classes applies to voc and yolo; a COCO json names its categories")
        check_coco_inputs(annotations, images)
        source = read_coco_source(load_coco(annotations), os.fspath(images), os.fspath(annotations))
        source.description = {
            "format": "coco",
            "annotations": os.fspath(annotations),
            "images": os.fspath(images),
        }
        return source
    if root is None:
        raise ValueError(f"format {format} needs root (the data set's folder)")
    if format == "voc":
        return read_voc(root, classes=classes)
    if format == "yolo":
        return read_yolo(root, data=data, classes=classes)
    raise ValueError(f"unknown format {format!r}; one of {FORMATS}")
