"""Data: COCO json, Pascal VOC or YOLO trees and images -> Parquet shards + manifest -> Ray Data
decode/augment -> padded batches. Import from the modules themselves:

- ``formats``: annotation readers (COCO json, VOC, YOLO -> one validated record type), splits
- ``shards``: the Parquet schema, ``prepare_dataset`` / ``prepare_shards`` (sizes checked against the
  images, one writer per folder), ``read_manifest``, ``shard_files``, ``coco_gt_from_shards``
- ``decode``: the one decoder policy (bytes -> RGB pixels, EXIF-aware; ``check_image`` for prepare)
- ``augment``: ``augment_batch`` (the Ray Data step, no Ray), composed of small transforms
- ``collate``: ``pad_images``, ``RetinaCollate``; ``skips``: undecodable-image counters
- ``datasets``: ``build_dataset`` (Ray Data), ``iter_eval_batches`` / ``eval_plan`` (in-process eval)
- ``synthetic``: a real COCO-format set of drawn shapes (``make_synthetic_coco``)
"""
