"""Ultralytics YOLO trees (``images/``, ``labels/`` mirroring it, ``data.yaml``) -> :class:`Source`.

Layout. Images anywhere under ``images/`` (or under the folders ``data.yaml``'s ``train``/``val``/``test``
name, relative to the root; ``data.yaml``'s ``path`` is ignored, the root says where the tree is); the
label file of ``<a>/images/<b>/x.jpg`` is ``<a>/labels/<b>/x.txt``, Ultralytics' rule. Splits: the
``train``/``val``/``test`` folders of ``data.yaml``, else ``images/{train,val,test}`` when present,
else none. Image-list ``.txt`` entries in ``data.yaml`` are not supported.

Labels. One object a line, ``class cx cy w h`` normalised to [0, 1] by the image's size in display
orientation (EXIF applied: the size Ultralytics labels against), or a polygon ``class x1 y1 ... xn yn``
(n >= 3), kept as its bounding box. Class ``i`` is category id ``i + 1`` with ``names[i]`` as its name
(``names`` a list or ``{i: name}`` in ``data.yaml``, or ``classes`` when there is no ``data.yaml``).

Counted, not fatal: a line that is not numbers of those shapes (``label_line_invalid``, dropped), a
class without a name (``class_unknown``, dropped), an image without a label file
(``label_file_missing``, kept as a negative, as Ultralytics does), a label file that is not text
(``label_file_invalid``, image skipped), a label file without an image (``label_file_orphan``). Boxes
outside the image are clipped or dropped later by the shared validation, as for COCO. An image in two
splits' folders is a train/val leak: an error, or kept in the first split only
(``shards.prepare_dataset(split_overlap="first")``, counted as ``split_overlap``).
"""

from __future__ import annotations

import math
import os
import posixpath
from collections import Counter
from collections.abc import Sequence
from typing import Any

import yaml

from ray_retina.data.formats.files import IMAGE_EXTENSIONS, header_size, list_files, read_bytes, thread_map
from ray_retina.data.formats.source import Source, Unit, Warner, number
from ray_retina.uri import dir_exists, file_exists, is_uri, join_uri, resolve_uri

YOLO_REASONS = (
    "label_file_missing",
    "label_file_invalid",
    "label_line_invalid",
    "label_file_orphan",
    "class_unknown",
    "split_overlap",
)
YOLO_SPLITS = ("train", "val", "test")
NOT_LABELS = ("classes.txt",)  # LabelImg writes the class names beside the labels


def label_path(image: str) -> str:
    """The label file of an image path ('/'-separated): last ``/images/`` -> ``/labels/``, extension -> .txt."""
    p = "/" + image
    if "/images/" in p:
        head, tail = p.rsplit("/images/", 1)
        p = f"{head}/labels/{tail}"
    return posixpath.splitext(p[1:])[0] + ".txt"


def read_yolo(
    root: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | None = None,
    classes: Sequence[str] | None = None,
) -> Source:
    """Read an Ultralytics-style tree into a :class:`Source` (module docstring).

    Args:
        root: the folder holding ``images/`` and ``labels/``; path or URI.
        data: the dataset yaml (default ``root/data.yaml``, optional when ``classes`` is given).
        classes: class names of ids 0, 1, ... for a tree without ``data.yaml``; with one, it must
            equal its ``names``.

    Raises ``FileNotFoundError`` (one line: the path and what to give) for a missing root, images
    folder, split folder or yaml.
    """
    # One piece, top to bottom: list images and labels per split, read them (threads), make the units and
    # the orphans; the listings and the warner are shared.
    root = os.fspath(root)
    fs, base = resolve_uri(root)
    if not dir_exists(fs, base):
        raise FileNotFoundError(
            f"YOLO dataset folder not found: {root} (give --root the folder holding images/ and labels/)"
        )
    cfg = _load_yaml(root, fs, base, data)
    names = _names(root, cfg, data, classes)
    split_dirs = _split_dirs(root, fs, base, cfg or {})
    warn = Warner()

    # Units: every image of every split folder, then every label file no image claims.
    split_of: dict[str, list[str]] = {}
    images: list[str] = []
    loose: Counter[str] = Counter()
    for split, dirs in split_dirs.items():
        for d in dirs:
            found, not_utf8 = list_files(fs, join_uri(base, d), IMAGE_EXTENSIONS)
            for path in not_utf8:
                loose["name_not_utf8"] += 1
                warn("name_not_utf8", "file name not UTF-8 (skipped): %r", path)
            for name in found:
                rel = posixpath.join(d, name)
                if rel not in split_of:
                    images.append(rel)
                split_of.setdefault(rel, []).append(split)
    claimed = {label_path(rel) for rel in images}
    orphans: dict[str, str] = {}
    for split, dirs in split_dirs.items():
        for d in dirs:
            label_dir = posixpath.dirname(label_path(d + "/x"))
            for name in list_files(fs, join_uri(base, label_dir), (".txt",))[0]:
                rel = posixpath.join(label_dir, name)
                if rel not in claimed and posixpath.basename(rel) not in NOT_LABELS:
                    orphans.setdefault(rel, split)

    def read(rel: str) -> tuple[tuple[int, int] | str, bytes | None]:
        return header_size(fs, join_uri(base, rel)), read_bytes(fs, join_uri(base, label_path(rel)))

    units: list[Unit] = []
    for rel, (size, raw) in zip(images, thread_map(read, images), strict=True):
        u = Unit(key=rel)
        units.append(u)
        if isinstance(size, str):  # image_unreadable: the same count the shard writer would make
            u.counts[size] += 1
            continue
        lpath = join_uri(root, label_path(rel))
        if raw is None:
            u.counts["label_file_missing"] += 1
            text = ""
        else:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                warn("label_file_invalid", "%s is not UTF-8 text (image skipped)", lpath)
                u.counts["label_file_invalid"] += 1
                continue
        h, w = size
        u.image = {"file_name": rel, "height": h, "width": w}
        for lineno, line in enumerate(text.splitlines(), 1):
            ann = _parse_line(line, w, h)
            if ann is None:
                continue
            if isinstance(ann, str):
                warn(
                    ann, "%s:%d: %r is not `class cx cy w h` or a polygon (line dropped)", lpath, lineno, line
                )
                u.counts[ann] += 1
            elif ann["category_id"] - 1 not in names:
                warn(
                    "class_unknown",
                    "%s:%d: class %d has no name (line dropped)",
                    lpath,
                    lineno,
                    ann["category_id"] - 1,
                )
                u.counts["class_unknown"] += 1
            else:
                u.annotations.append(ann)
    for rel, split in orphans.items():
        warn("label_file_orphan", "%s has no image (ignored)", join_uri(root, rel))
        units.append(Unit(key=rel, counts=Counter(label_file_orphan=1)))
        split_of[rel] = [split]
    number(units)

    splits = None
    if list(split_dirs) != [None]:
        splits = {s: [u.key for u in units if s in split_of[u.key]] for s in split_dirs}
    return Source(
        format="yolo",
        images=root if is_uri(root) else base,
        categories=[{"id": i + 1, "name": n, "supercategory": ""} for i, n in sorted(names.items())],
        units=units,
        splits=splits,  # type: ignore[arg-type]
        reasons=YOLO_REASONS,
        description={"format": "yolo", "root": root, "data": os.fspath(data) if data else None},
        loose_counts=loose,
    )


def _parse_line(line: str, width: int, height: int) -> dict[str, Any] | str | None:
    """A COCO annotation (bbox in pixels, category id = class + 1), a validation reason, or None (blank)."""
    tokens = line.split()
    if not tokens:
        return None
    try:
        vals = [float(t) for t in tokens]
    except ValueError:
        return "label_line_invalid"
    n = len(vals)
    if (
        not (n == 5 or (n >= 7 and n % 2 == 1))
        or not all(math.isfinite(v) for v in vals)
        or vals[0] != int(vals[0])
    ):
        return "label_line_invalid"
    if n == 5:
        cx, cy, bw, bh = vals[1:]
        x, y = cx - bw / 2, cy - bh / 2
    else:  # polygon: its bounding box
        xs, ys = vals[1::2], vals[2::2]
        x, y, bw, bh = min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
    return {
        "bbox": [x * width, y * height, bw * width, bh * height],
        "category_id": int(vals[0]) + 1,
        "iscrowd": 0,
    }


def _names(
    root: str, cfg: dict[str, Any] | None, data: str | os.PathLike[str] | None, classes: Sequence[str] | None
) -> dict[int, str]:
    if cfg is None:
        if classes is None:
            raise FileNotFoundError(
                f"no data.yaml in {root}: give --data PATH/TO/data.yaml, or --classes a,b,c "
                "(the names of classes 0, 1, ...)"
            )
        return dict(enumerate(classes))
    raw = cfg.get("names")
    if isinstance(raw, list):
        names = {i: str(n) for i, n in enumerate(raw)}
    elif isinstance(raw, dict):
        names = {int(k): str(v) for k, v in raw.items()}
    else:
        raise ValueError(
            f"{data or join_uri(root, 'data.yaml')}: `names` must be a list or a dict, got {raw!r}"
        )
    if classes is not None and list(classes) != [names[i] for i in sorted(names)]:
        raise ValueError(f"--classes {list(classes)} differs from data.yaml's names {names}: drop one")
    return names


def _load_yaml(root: str, fs: Any, base: str, data: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    if data is None:
        dfs, path = fs, join_uri(base, "data.yaml")
        if not file_exists(dfs, path):
            return None
    else:
        dfs, path = resolve_uri(data)
        if not file_exists(dfs, path):
            raise FileNotFoundError(
                f"dataset yaml not found: {os.fspath(data)} (give --data the yaml with `names`)"
            )
    with dfs.open_input_stream(path) as f:
        cfg = yaml.safe_load(f.read())
    return cfg if isinstance(cfg, dict) else {}


def _split_dirs(root: str, fs: Any, base: str, cfg: dict[str, Any]) -> dict[str | None, list[str]]:
    """``{split: [folders relative to root]}``; ``{None: ["images"]}`` for a tree without splits."""
    out: dict[str | None, list[str]] = {}
    for split in YOLO_SPLITS:
        entry = cfg.get(split)
        if not entry:
            continue
        dirs = []
        for e in [entry] if isinstance(entry, str) else list(entry):
            d = posixpath.normpath(str(e))
            if posixpath.isabs(d) or "://" in d or d.startswith(".."):
                raise ValueError(
                    f"data.yaml {split}: {e} is outside --root {root}; give folders relative to it"
                )
            if d.endswith(".txt"):
                raise ValueError(f"data.yaml {split}: image lists ({e}) are not supported; give a folder")
            if not dir_exists(fs, join_uri(base, d)):
                raise FileNotFoundError(f"data.yaml {split} folder not found: {join_uri(root, d)}")
            dirs.append(d)
        out[split] = dirs
    if out:
        return out
    if not dir_exists(fs, join_uri(base, "images")):
        raise FileNotFoundError(
            f"not a YOLO tree: no images/ in {root} (give --root the folder holding images/ and labels/)"
        )
    found = {s: [f"images/{s}"] for s in YOLO_SPLITS if dir_exists(fs, join_uri(base, f"images/{s}"))}
    return found or {None: ["images"]}
