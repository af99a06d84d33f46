"""Pascal VOC trees (``Annotations/*.xml``, ``JPEGImages/``, optional ``ImageSets/Main/*.txt``) -> :class:`Source`.

Boxes. The devkit's ``xmin..xmax`` and ``ymin..ymax`` are 1-based pixel indices, both ends inclusive: a
box ``xmin=1, xmax=W`` covers the whole width. In continuous pixel coordinates (COCO's, ours) that box
spans ``[0, W]``, so

    x = xmin - 1,   y = ymin - 1,   w = xmax - xmin + 1,   h = ymax - ymin + 1.

This is detectron2's reading (``pascal_voc.py`` subtracts 1 from xmin and ymin and keeps xmax and
ymax as XYXY) and that of the COCO conversions of VOC; torchvision's ``VOCDetection`` returns the raw
numbers and leaves the choice to the user.

Classes. ``name`` fields, sorted (or ``classes`` to fix the order and the set); ids 1..K in that order.
An object of a class outside ``classes`` is dropped and counted (``class_unknown``). ``difficult=1``
objects are kept as ignore regions (``iscrowd=1``), as VOC's own evaluation ignores them.

Images. The image of id ``X`` is ``JPEGImages/X.<ext>`` (the XML's ``filename`` when there is none);
its size is the XML's ``size``, or the image header's (EXIF orientation applied) when that is missing
or zero. Splits: ``ImageSets/Main/{train,val,test}.txt`` when present (only ids listed there are
read), else every ``Annotations/*.xml`` without a split (``trainval.txt`` alone: its ids, no split).
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ray_retina.data.formats.coco import escapes_root
from ray_retina.data.formats.files import IMAGE_EXTENSIONS, header_size, list_files, read_bytes, thread_map
from ray_retina.data.formats.source import Source, Unit, Warner, categories_from_names, number
from ray_retina.uri import dir_exists, is_uri, join_uri, resolve_uri

VOC_REASONS = ("label_file_missing", "label_file_invalid", "class_unknown", "split_overlap")
VOC_SPLITS = ("train", "val", "test")
BOX_TAGS = ("xmin", "ymin", "xmax", "ymax")


@dataclass
class _Object:
    name: str
    difficult: int
    corners: list[float] | None  # xmin, ymin, xmax, ymax; None: not 4 numbers


@dataclass
class _Parsed:
    """One XML read, or the reason it could not be."""

    key: str
    xml: str | None = None  # file name in Annotations/
    filename: str | None = None  # file name in JPEGImages/
    height: int = 0
    width: int = 0
    objects: list[_Object] = field(default_factory=list)
    skip: str | None = None  # validation reason the image is skipped for
    counts: Counter[str] = field(default_factory=Counter)


def voc_box(xmin: float, ymin: float, xmax: float, ymax: float) -> list[float]:
    """VOC 1-based inclusive pixel corners -> COCO [x, y, w, h] in continuous pixels (module docstring)."""
    return [xmin - 1.0, ymin - 1.0, xmax - xmin + 1.0, ymax - ymin + 1.0]


def read_voc(root: str | os.PathLike[str], *, classes: Sequence[str] | None = None) -> Source:
    """Read a Pascal VOC tree (e.g. ``VOCdevkit/VOC2007``) into a :class:`Source` (module docstring).

    Raises ``FileNotFoundError`` (one line: the path and what to give) when ``root``, its
    ``Annotations/`` or ``JPEGImages/`` is missing; ``ValueError`` when no class name is found.
    """
    # One piece, top to bottom: list the tree, parse each XML (threads), name the classes, make the units;
    # the closures share the listings and the warner.
    root = os.fspath(root)
    fs, base = resolve_uri(root)
    if not dir_exists(fs, base):
        raise FileNotFoundError(
            f"Pascal VOC folder not found: {root} (give --root the folder holding Annotations/ and "
            "JPEGImages/, e.g. VOCdevkit/VOC2007)"
        )
    ann_dir, img_dir = join_uri(base, "Annotations"), join_uri(base, "JPEGImages")
    for d in (ann_dir, img_dir):
        if not dir_exists(fs, d):
            raise FileNotFoundError(
                f"not a Pascal VOC tree: no {d.rsplit('/', 1)[1]}/ in {root} (give --root the folder "
                "holding Annotations/ and JPEGImages/, e.g. VOCdevkit/VOC2007)"
            )
    warn = Warner()
    xml_names, bad_xml = list_files(fs, ann_dir, (".xml",), recursive=False)
    xmls = {os.path.splitext(n)[0]: n for n in xml_names}
    jpegs: dict[str, str] = {}
    jpeg_list, bad_jpeg = list_files(fs, img_dir, IMAGE_EXTENSIONS, recursive=False)
    for n in jpeg_list:
        jpegs.setdefault(os.path.splitext(n)[0], n)
    jpeg_names = set(jpegs.values())
    loose: Counter[str] = Counter()
    for path in (*bad_xml, *bad_jpeg):
        loose["name_not_utf8"] += 1
        warn("name_not_utf8", "file name not UTF-8 (skipped): %r", path)

    splits = _image_sets(fs, join_uri(base, "ImageSets/Main"))
    if splits is None:
        keys = sorted(xmls)
    else:
        keys = sorted({k for ks in splits.values() for k in ks})
        splits = {s: ks for s, ks in splits.items() if s in VOC_SPLITS} or None

    def parse(key: str) -> _Parsed:
        p = _Parsed(key=key, xml=xmls.get(key))
        if escapes_root(key):  # an ImageSets line like ../../x: never read outside the tree
            warn("outside_root", "ImageSets id %r resolves outside %s (skipped)", key, root)
            p.skip = "outside_root"
            return p
        if p.xml is None:
            p.counts["label_file_missing"] += 1  # listed in ImageSets, no XML: a negative if its image reads
        else:
            path = join_uri(ann_dir, p.xml)
            try:
                tree = ET.fromstring(read_bytes(fs, path) or b"")
            except ET.ParseError as err:
                warn("label_file_invalid", "%s does not parse (image skipped): %s", path, err)
                p.skip = "label_file_invalid"
                return p
            p.filename = (tree.findtext("filename") or "").strip() or None
            p.width, p.height = _int(tree.findtext("size/width")), _int(tree.findtext("size/height"))
            for obj in tree.iter("object"):
                box = obj.find("bndbox")
                vals = [_float(box.findtext(t)) if box is not None else math.nan for t in BOX_TAGS]
                corners = vals if all(math.isfinite(v) for v in vals) else None
                name = (obj.findtext("name") or "").strip()
                p.objects.append(_Object(name, _int(obj.findtext("difficult")), corners))
        p.filename = jpegs.get(key) or (p.filename if p.filename in jpeg_names else None)
        if p.filename is None:
            p.filename = f"{key}.jpg"  # absent: counted as image_missing below or by the shard writer
        if p.width <= 0 or p.height <= 0 or p.xml is None:
            size = header_size(fs, join_uri(img_dir, p.filename))
            if isinstance(size, str):
                p.skip = size
            else:
                p.height, p.width = size
        return p

    parsed = thread_map(parse, keys)
    names = list(classes) if classes is not None else sorted({o.name for p in parsed for o in p.objects})
    if not names:
        raise ValueError(f"no object names in the XML files of {root}: give --classes a,b,c")
    categories = categories_from_names(names)
    cat_of = {c["name"]: c["id"] for c in categories}

    units = []
    for p in parsed:
        u = Unit(key=p.key, counts=p.counts)
        units.append(u)
        if p.skip is not None:
            u.counts[p.skip] += 1
            continue
        u.image = {"file_name": p.filename, "height": p.height, "width": p.width}
        for o in p.objects:
            if o.name not in cat_of:
                u.counts["class_unknown"] += 1
                warn(
                    "class_unknown",
                    "%s: class %r not in --classes (object dropped)",
                    join_uri(ann_dir, p.xml),
                    o.name,
                )
                continue
            bbox = voc_box(*o.corners) if o.corners is not None else None  # None: counted as bbox_invalid
            u.annotations.append(
                {"bbox": bbox, "category_id": cat_of[o.name], "iscrowd": int(o.difficult == 1)}
            )
    number(units)
    return Source(
        format="voc",
        images=join_uri(root if is_uri(root) else base, "JPEGImages"),
        categories=categories,
        units=units,
        splits=splits,
        reasons=VOC_REASONS,
        description={"format": "voc", "root": root, "classes": names},
        loose_counts=loose,
    )


def _image_sets(fs: Any, main: str) -> dict[str, list[str]] | None:
    """``{split: ids}`` from ImageSets/Main (train/val/test, or trainval alone), or ``None`` without them."""
    found = {}
    for name in (*VOC_SPLITS, "trainval"):
        path = join_uri(main, f"{name}.txt")
        data = read_bytes(fs, path)
        if data is not None:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path} is not UTF-8 text: byte {err.start}: {err.reason}") from None
            found[name] = [line.split()[0] for line in text.splitlines() if line.strip()]
    if not found:
        return None
    if any(s in found for s in VOC_SPLITS):
        found.pop("trainval", None)
    return found


def _int(text: str | None) -> int:
    v = _float(text)
    return int(v) if math.isfinite(v) else 0


def _float(text: str | None) -> float:
    try:
        return float((text or "").strip())
    except ValueError:
        return math.nan
