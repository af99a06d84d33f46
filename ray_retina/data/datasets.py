"""Ray Data streams of augmented shard rows for training, and the in-process eval iterator.

- :func:`build_dataset`: the streaming Ray Data set a TorchTrainer splits over its workers.
- :func:`iter_eval_batches` / :func:`eval_plan`: collated test-time batches of some val shard files, read
  in the calling process (each rank evaluates its share; ``ray-retina eval`` runs it alone).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from ray_retina.data.augment import READ_COLUMNS, augment_batch, object_array
from ray_retina.data.collate import RetinaCollate
from ray_retina.data.shards import read_manifest, shard_files
from ray_retina.data.skips import new_counter
from ray_retina.uri import resolve_uri

if TYPE_CHECKING:  # torch is imported where it is used: Ray Data's decode workers never need it
    import ray.data
    import torch

    from ray_retina.config import DataSection

MAP_BATCHES_PER_TASK = 4  # map batches per Ray Data decode task of the read_parquet reader


def augment_kwargs(
    data_cfg: DataSection,
    *,
    train: bool,
    cat_ids: Sequence[int],
    seed: int | None,
    skip_counter: str | None = None,
) -> dict[str, Any]:
    """The ``fn_kwargs`` of :func:`augment_batch` for a ``DataSection``.

    In training, each ``data_cfg.augment`` op with ``prob`` > 0 (photometric, crop, zoom_out) is passed as
    a plain dict (picklable for Ray); ops that are off are left out, so the kwargs, and the images, are the
    same as without the augmentation. Never in evaluation.
    """
    kwargs: dict[str, Any] = {
        "train": train,
        "min_size_range": list(data_cfg.train_min_size) if train else [data_cfg.test_min_size] * 2,
        "max_size": int(data_cfg.max_size),
        "hflip_prob": float(data_cfg.hflip_prob) if train else 0.0,
        "cat_ids": sorted(int(c) for c in cat_ids),
        "seed": seed,
        "skip_counter": skip_counter,
    }
    if train:
        for name in ("photometric", "crop", "zoom_out"):
            op = getattr(data_cfg.augment, name)
            if op.prob > 0:
                kwargs[name] = op.model_dump(mode="json")
    return kwargs


def build_dataset(
    shard_dir: str | os.PathLike[str],
    data_cfg: DataSection,
    *,
    train: bool,
    seed: int | None,
    files: Sequence[str] | None = None,
    reader: str = "row_groups",
    skip_counter: str | None = None,
) -> ray.data.Dataset:
    """A streaming Ray Data set of augmented rows (``AUGMENTED_COLUMNS``) from a complete shard set.

    ``skip_counter``: the name from :func:`ray_retina.data.skips.new_counter` that counts this data set's
    undecodable images (None: a new one). ``data_cfg`` is a ``DataSection`` (fields used: ``train_min_size``, ``test_min_size``,
    ``max_size``, ``hflip_prob``, ``map_batch_size`` (rows per augment call of the ``read_parquet``
    reader), ``map_num_cpus``). Decoding and augmenting
    run as Ray Data tasks asking ``map_num_cpus`` logical CPUs each (fractional is fine), so they
    need CPUs left free by the train workers. ``files`` restricts the read to some shards. Nothing
    executes until the data set is iterated; every pass (epoch) re-executes it.

    ``reader``:
      - ``"row_groups"`` (default): one Ray Data task per Parquet row group (``shards.ROW_GROUP_SIZE``
        images) reads its rows and augments them in the same task, in one call, and returns them as one
        block whose pixels lie in one buffer (moved without copies). In training the row groups are
        visited in a new random order every epoch (seeded by ``seed`` and Ray's execution index).
        No separate read/list operators: on 2 cores this starts an epoch in well under a second and
        moves the encoded bytes through the object store zero times instead of twice.
      - ``"read_parquet"``: ``ray.data.read_parquet`` (file order shuffled per epoch) -> cut into
        blocks of a few map batches -> ``map_batches(augment_batch)``; Ray's native reader.
    Add a local shuffle buffer when iterating (``iter_torch_batches(local_shuffle_buffer_size=...)``)
    to mix images of different row groups within a batch.
    """
    import ray  # deferred: the module's functions also run without Ray (tests, in-process data steps)

    manifest = read_manifest(shard_dir)
    cat_ids = [int(c["id"]) for c in manifest["categories"]]
    paths = list(files) if files is not None else shard_files(shard_dir, manifest)
    if not paths:
        raise ValueError(f"{os.fspath(shard_dir)}: the manifest lists no shards")
    skip_counter = new_counter(skip_counter)
    aug = augment_kwargs(data_cfg, train=train, cat_ids=cat_ids, seed=seed, skip_counter=skip_counter)
    # Per-epoch order: a seed plus Ray's execution index (reseed_after_execution), or fresh entropy.
    order_seed = (
        ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True) if seed is not None else None
    )

    if reader == "row_groups":
        return _row_group_dataset(shard_dir, paths, data_cfg, train=train, aug=aug, order_seed=order_seed)
    if reader != "read_parquet":
        raise ValueError(f"reader must be 'row_groups' or 'read_parquet', got {reader!r}")
    return _read_parquet_dataset(paths, data_cfg, train=train, aug=aug, seed=seed)


def _row_group_dataset(
    shard_dir: str | os.PathLike[str],
    paths: Sequence[str],
    data_cfg: DataSection,
    *,
    train: bool,
    aug: dict[str, Any],
    order_seed: Any,
) -> ray.data.Dataset:
    """``reader="row_groups"`` of :func:`build_dataset`: one read-and-augment task per row group."""
    import ray  # deferred: as in build_dataset

    fragments = [
        {"path": p, "row_group": rg}
        for p, n in zip(paths, _num_row_groups(paths), strict=True)
        for rg in range(n)
    ]
    if not fragments:
        raise ValueError(f"{os.fspath(shard_dir)}: the shards hold no rows")
    ds = ray.data.from_items(fragments, override_num_blocks=len(fragments))
    _preserve_order(ds, data_cfg)
    if train:
        ds = ds.randomize_block_order(seed=order_seed)
    return ds.map_batches(
        read_and_augment,
        # The whole row group in one augment call: one packed pixel buffer, one block per task. Smaller
        # batches would not reach the consumer any sooner (Ray's block shaping gathers a task's outputs
        # up to target_max_block_size, 128 MiB) and their blocks of several chunks were concatenated
        # again, pixel by pixel, by whoever turned them into numpy.
        fn_kwargs={"augment": aug, "batch_size": None},
        batch_format="numpy",
        batch_size=1,  # one row group per task
        num_cpus=data_cfg.map_num_cpus,
    )


def _read_parquet_dataset(
    paths: Sequence[str], data_cfg: DataSection, *, train: bool, aug: dict[str, Any], seed: int | None
) -> ray.data.Dataset:
    """``reader="read_parquet"`` of :func:`build_dataset`: Ray's native reader, then ``augment_batch``."""
    import ray  # deferred: as in build_dataset

    shuffle: Any = None
    if train:
        shuffle = (
            ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=True)
            if seed is not None
            else "files"
        )
    fs, _ = resolve_uri(paths[0])
    ds = ray.data.read_parquet([resolve_uri(p)[1] for p in paths], filesystem=fs, shuffle=shuffle)
    _preserve_order(ds, data_cfg)
    # Ray packs small Parquet files into one read block (one map task: no parallelism) and large
    # ones into blocks of hundreds of images (long tasks, coarse balance): cut the encoded rows into
    # blocks of a few map batches so the decode tasks spread over every CPU Ray Data has.
    batch_size = data_cfg.map_batch_size
    ds = ds.select_columns(READ_COLUMNS).repartition(
        target_num_rows_per_block=batch_size * MAP_BATCHES_PER_TASK
    )
    return ds.map_batches(
        augment_batch,
        fn_kwargs=aug,
        batch_format="numpy",
        batch_size=batch_size,
        num_cpus=data_cfg.map_num_cpus,
    )


def _preserve_order(ds: Any, data_cfg: DataSection) -> None:
    """``data.deterministic``: this data set's rows come out in the (seeded) order, not in the order the
    parallel tasks finish (set on the data set's own context, not the process-wide one)."""
    if data_cfg.deterministic:
        ds.context.execution_options.preserve_order = True


def read_and_augment(
    fragments: dict[str, np.ndarray], *, augment: dict[str, Any], batch_size: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data step of the ``"row_groups"`` reader: read the given (path, row_group) rows, augment them.

    A generator yielding one augmented batch per ``batch_size`` rows of each row group (``None``: the
    whole row group at once, as :func:`build_dataset` asks).
    """
    import pyarrow.parquet as pq  # deferred: parquet's reader loads only where shards are read

    for path, rg in zip(fragments["path"], fragments["row_group"], strict=True):
        fs, p = resolve_uri(str(path))
        with fs.open_input_file(p) as f:
            pf = pq.ParquetFile(f)
            n = pf.metadata.row_group(int(rg)).num_rows
            for rb in pf.iter_batches(
                batch_size=batch_size or max(1, n), row_groups=[int(rg)], columns=READ_COLUMNS
            ):
                yield augment_batch(
                    {c: rb.column(c).to_numpy(zero_copy_only=False) for c in READ_COLUMNS}, **augment
                )


def _num_row_groups(paths: Sequence[str]) -> list[int]:
    """Row groups per Parquet file, from the footers (read concurrently: object stores have latency)."""
    import pyarrow.parquet as pq  # deferred: parquet's reader loads only where shards are read

    def count(uri: str) -> int:
        fs, p = resolve_uri(uri)
        with fs.open_input_file(p) as f:
            return pq.ParquetFile(f).metadata.num_row_groups

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(count, paths))


EvalFiles = Sequence["str | tuple[str, int | None]"]


def iter_eval_batches(
    files: EvalFiles,
    data_cfg: DataSection,
    *,
    max_images: int | None = None,
    batch_size: int | None = None,
    cat_ids: Sequence[int] | None = None,
    skipped: list[int] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated test-time batches (no randomness) from some shard files, read in this process.

    For evaluation on each rank over its own share of the val shard files, without Ray Data. ``files``
    are shard paths, or ``(path, rows)`` pairs that read only the first ``rows`` images of a file (the
    plan of :func:`eval_plan`); ``max_images`` caps the total. ``cat_ids`` defaults to the categories of
    the manifest beside the first file. Images that do not decode are dropped from the batches and their
    ids appended to ``skipped`` (so the caller can keep them in the AP denominator and report them).
    Batches never span two files: a file's images are batched (and so padded) the same way whichever rank
    reads it, so the detections do not depend on the number of workers.
    """
    import pyarrow.parquet as pq  # deferred: parquet's reader loads only where shards are read

    plan = [(f, None) if isinstance(f, (str, os.PathLike)) else (f[0], f[1]) for f in files]
    if not plan:
        return
    if cat_ids is None:
        first = os.fspath(plan[0][0])
        cat_ids = [int(c["id"]) for c in read_manifest(first.rsplit("/", 1)[0])["categories"]]
    kwargs = augment_kwargs(data_cfg, train=False, cat_ids=cat_ids, seed=None)
    collate = RetinaCollate(size_divisibility=data_cfg.size_divisibility)
    bs = int(batch_size or data_cfg.batch_size)
    seen = 0
    for uri, rows_of_file in plan:
        budget = [
            n for n in (rows_of_file, None if max_images is None else max_images - seen) if n is not None
        ]
        limit = min(budget) if budget else None
        if limit is not None and limit <= 0:
            continue
        taken = 0
        pending: dict[str, list[Any]] = {}
        fs, path = resolve_uri(uri)
        with fs.open_input_file(path) as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=bs, columns=READ_COLUMNS):
                rows = {c: rb.column(c).to_numpy(zero_copy_only=False) for c in READ_COLUMNS}
                if limit is not None:
                    rows = {c: v[: max(0, limit - taken)] for c, v in rows.items()}
                n = len(rows["image_id"])
                if n == 0:
                    break
                taken += n
                aug = augment_batch(rows, **kwargs)
                if skipped is not None and len(aug["image_id"]) < n:
                    done = {int(i) for i in aug["image_id"]}
                    skipped.extend(int(i) for i in rows["image_id"] if int(i) not in done)
                for c, v in aug.items():
                    pending.setdefault(c, []).extend(list(v))
                while len(pending.get("image_id", [])) >= bs:
                    yield collate(_take(pending, bs))
                if limit is not None and taken >= limit:
                    break
        if pending.get("image_id"):
            yield collate(_take(pending, len(pending["image_id"])))
        seen += taken


def eval_plan(shard_dir: str | os.PathLike[str], max_images: int | None = None) -> list[tuple[str, int]]:
    """The val shard files with the number of images to read from each: the first ``max_images`` images of
    the set in manifest order (all when None), so that a run evaluates exactly that many whatever the
    number of workers (each rank takes whole entries of this plan)."""
    manifest = read_manifest(shard_dir)
    plan: list[tuple[str, int]] = []
    left = max_images
    for path, shard in zip(shard_files(shard_dir, manifest), manifest["shards"], strict=True):
        n = int(shard["num_rows"]) if left is None else min(int(shard["num_rows"]), left)
        if n <= 0:
            break
        plan.append((path, n))
        if left is not None:
            left -= n
    return plan


def _take(pending: dict[str, list[Any]], n: int) -> dict[str, np.ndarray]:
    batch = {}
    for c, v in pending.items():
        batch[c] = (
            object_array(v[:n]) if c in ("image", "gt_boxes", "gt_labels", "gt_crowd") else np.array(v[:n])
        )
        del v[:n]
    return batch
