"""Data: COCO json and images -> Parquet shards + manifest -> Ray Data decode/augment -> padded batches.

- ``synthetic``: a real COCO-format set of drawn shapes (``make_synthetic_coco``)
- ``formats``: annotation readers (COCO json; validation into per-image records, label maps, XYWH <-> XYXY)
- ``shards``: the Parquet schema, ``prepare_shards`` (parallel, resumable) / ``write_shards``,
  ``read_manifest``, ``shard_files``, ``coco_gt_from_shards``
- ``decode``: bytes -> RGB pixels (EXIF-aware); ``augment``: ``augment_batch`` (the Ray Data step, no Ray)
- ``collate``: ``pad_images``, ``RetinaCollate``; ``skips``: undecodable-image counters
- ``datasets``: ``build_dataset`` (Ray Data), ``iter_eval_batches`` / ``eval_plan`` (in-process eval)

The names below are importable from ``ray_retina.data`` directly; they load their module on first
use, so ``import ray_retina.data.synthetic`` stays free of Ray and pyarrow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "make_synthetic_coco": "synthetic",
    "load_coco": "formats.coco",
    "build_records": "formats.coco",
    "category_label_maps": "formats.coco",
    "xywh_to_xyxy": "formats.coco",
    "xyxy_to_xywh": "formats.coco",
    "prepare_shards": "shards",
    "write_shards": "shards",
    "read_manifest": "shards",
    "manifest_exists": "shards",
    "shard_files": "shards",
    "coco_gt_from_shards": "shards",
    "validation_summary": "shards",
    "augment_batch": "augment",
    "decode_image": "decode",
    "pad_images": "collate",
    "RetinaCollate": "collate",
    "build_dataset": "datasets",
    "iter_eval_batches": "datasets",
    "eval_plan": "datasets",
    "skipped_images": "skips",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
