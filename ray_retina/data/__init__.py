"""Data: COCO json and images -> Parquet shards + manifest -> Ray Data decode/augment -> padded batches.

- ``synthetic``: a real COCO-format set of drawn shapes (``make_synthetic_coco``)
- ``coco``: json loading, validation into per-image records, label maps, XYWH <-> XYXY
- ``shards``: the Parquet schema, ``prepare_shards`` (parallel, resumable) / ``write_shards``,
  ``read_manifest``, ``shard_files``, ``coco_gt_from_shards``
- ``pipeline``: ``augment_batch``, ``RetinaCollate``, ``build_dataset``, ``iter_eval_batches``,
  ``skipped_images``

The names below are importable from ``ray_retina.data`` directly; they load their module on first
use, so ``import ray_retina.data.synthetic`` stays free of Ray and pyarrow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "make_synthetic_coco": "synthetic",
    "load_coco": "coco",
    "build_records": "coco",
    "category_label_maps": "coco",
    "xywh_to_xyxy": "coco",
    "xyxy_to_xywh": "coco",
    "prepare_shards": "shards",
    "write_shards": "shards",
    "read_manifest": "shards",
    "manifest_exists": "shards",
    "shard_files": "shards",
    "coco_gt_from_shards": "shards",
    "validation_summary": "shards",
    "augment_batch": "pipeline",
    "decode_image": "pipeline",
    "RetinaCollate": "pipeline",
    "build_dataset": "pipeline",
    "iter_eval_batches": "pipeline",
    "skipped_images": "pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
