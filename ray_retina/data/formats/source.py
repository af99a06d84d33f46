"""A data set read into COCO form, image by image, so that it can be split before it is written.

Every reader (``coco.read_coco_source``, ``voc.read_voc``, ``yolo.read_yolo``) returns a
:class:`Source`: one :class:`Unit` per image of the source (the things a split is made of), each with
its COCO image entry and annotations (XYWH pixels, category ids 1..K) or ``None`` when the reader had
to skip it, and the counts of what the reader found wrong with it (keys of ``VALIDATION_REASONS``).
``Source.to_coco(keys)`` assembles the COCO dict and counts of any subset; ``shards.prepare_shards``
then validates and writes it exactly as it does a COCO json.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

MAX_WARNINGS_PER_REASON = 20  # then one line saying the rest are only counted


@dataclass
class Unit:
    """One image of a source: its key (what splits list), COCO entries, and the reader's counts."""

    key: str  # VOC image id, YOLO image path relative to the root, COCO image id
    image: dict[str, Any] | None = None  # COCO image entry {id, file_name, height, width}; None: skipped
    annotations: list[dict[str, Any]] = field(default_factory=list)  # COCO annotations with ids
    counts: Counter[str] = field(default_factory=Counter)


@dataclass
class Source:
    """A data set in COCO form, split-able by unit key.

    ``images`` is the folder (path or URI) the ``file_name`` entries are relative to; ``splits`` maps a
    split name to unit keys when the source defines its own (VOC ``ImageSets/Main``, YOLO
    ``images/train``), else ``None``; ``reasons`` are the format's own validation reasons (the manifest
    lists them, zeros included); ``description`` goes to the manifest's ``source``.
    """

    format: str
    images: str
    categories: list[dict[str, Any]]
    units: list[Unit]
    splits: dict[str, list[str]] | None = None
    reasons: tuple[str, ...] = ()
    description: dict[str, Any] = field(default_factory=dict)
    unattached: list[dict[str, Any]] = field(default_factory=list)  # COCO annotations of no image
    loose_counts: Counter[str] = field(default_factory=Counter)  # of no unit: files whose name is not UTF-8
    info: dict[str, Any] = field(default_factory=dict)
    licenses: list[Any] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        return [u.key for u in self.units]

    def to_coco(
        self, keys: Iterable[str] | None = None, *, with_unattached: bool = True
    ) -> tuple[dict[str, Any], Counter[str]]:
        """The COCO dict of the units ``keys`` (all when ``None``, source order kept) and their counts.

        Annotations attached to no image (COCO only) and ``loose_counts`` go to the subsets made
        ``with_unattached``, so that, written split by split, each is counted once.
        """
        wanted = None if keys is None else set(keys)
        if wanted is not None and (unknown := wanted - set(self.keys)):
            raise ValueError(f"{len(unknown)} keys not in the source, e.g. {sorted(unknown)[:3]}")
        units = [u for u in self.units if wanted is None or u.key in wanted]
        counts: Counter[str] = Counter({r: 0 for r in self.reasons})
        images, anns = [], []
        for u in units:
            counts.update(u.counts)
            if u.image is not None:
                images.append(u.image)
                anns.extend(u.annotations)
        if with_unattached:
            anns.extend(self.unattached)
            counts.update(self.loose_counts)
        coco = {
            "info": self.info,
            "licenses": self.licenses,
            "images": images,
            "annotations": anns,
            "categories": self.categories,
        }
        return coco, counts


def categories_from_names(names: Iterable[str]) -> list[dict[str, Any]]:
    """COCO categories with ids 1..K in the order of ``names`` (COCO ids are positive; 0 is nothing)."""
    names = list(names)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"class names must be unique, got {dup} more than once")
    return [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(names)]


def number(units: list[Unit]) -> None:
    """Give image ids 1..N by unit position (a skipped unit keeps its number unused), annotation ids 1..M.

    Ids follow the source's order, not the split, so an image has the same id in every subset.
    """
    ann_id = 0
    for i, u in enumerate(units):
        if u.image is not None:
            u.image["id"] = i + 1
        for a in u.annotations:
            ann_id += 1
            a["id"], a["image_id"] = ann_id, i + 1


class Warner:
    """``logger.warning`` for bad records, at most ``MAX_WARNINGS_PER_REASON`` per reason (all are counted)."""

    def __init__(self) -> None:
        self.n: Counter[str] = Counter()

    def __call__(self, reason: str, msg: str, *args: Any) -> None:
        self.n[reason] += 1
        if self.n[reason] <= MAX_WARNINGS_PER_REASON:
            logger.warning(msg, *args)
        elif self.n[reason] == MAX_WARNINGS_PER_REASON + 1:
            logger.warning("more %s records: counted in the manifest, not logged one by one", reason)
