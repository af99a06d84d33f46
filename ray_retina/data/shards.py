"""COCO json (or a VOC / YOLO tree read into COCO form) + images -> Parquet shards + manifest, on a
local path or any pyarrow filesystem.

One row per image (schema ``SHARD_SCHEMA``): the original encoded bytes (never re-encoded) and the
per-object lists in COCO units. The manifest (``manifest.json``) is written last and atomically, so
a directory with a manifest is a complete shard set and one without it is not; readers go through
:func:`read_manifest` / :func:`shard_files` and never list the directory.

Preparing is resumable: the plan (which image goes to which shard) is a pure function of the json
and ``rows_per_shard``; every shard carries a fingerprint of its planned content in its Parquet
metadata, so a rerun skips shards already written with the same content and rewrites the rest.
Shards are written in parallel by Ray tasks (``prepare_shards``) or in-process (``write_shards``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_retina.data.decode import TRANSPOSED, ImageHeader, check_image, exif_transpose_boxes
from ray_retina.data.formats.coco import (
    COCO_REASONS,
    VALIDATION_REASONS,
    ImageRecord,
    build_records,
    check_coco_inputs,
    load_coco,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from ray_retina.uri import dir_exists, file_exists, join_uri, resolve_uri, write_bytes_atomic

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "part-{:05d}.parquet"
SHARD_META_KEY = b"ray_retina.shard"
IO_THREADS = 8  # concurrent image reads per shard-writing task
ROW_GROUP_SIZE = 16  # rows per Parquet row group = images per Ray Data decode task (reader "row_groups")
LOCK_NAME = ".prepare.lock"  # flock'ed by the prepare writing the folder (local folders)
OWNER_NAME = ".prepare-owner.json"  # the source and run token of the prepare that last wrote the folder
MAX_EXAMPLES = 20  # skipped files named in the log per reason (all are counted)


class PrepareConflict(RuntimeError):
    """The output folder belongs to another writer: a running prepare, or another source's shards."""


SHARD_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("file_name", pa.string(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # the file's bytes as they are on disk
        pa.field("ann_id", pa.list_(pa.int64()), nullable=False),
        pa.field("bbox", pa.list_(pa.list_(pa.float32(), 4)), nullable=False),  # COCO XYWH
        pa.field("category_id", pa.list_(pa.int64()), nullable=False),  # original COCO ids
        pa.field("iscrowd", pa.list_(pa.int8()), nullable=False),
        pa.field("area", pa.list_(pa.float32()), nullable=False),
    ]
)
META_COLUMNS = [f.name for f in SHARD_SCHEMA if f.name != "image"]


# ----------------------------------------------------------------------------------------- manifest


def read_manifest(shard_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a complete shard set (categories, counts, shard list, validation counts, ...).

    Raises ``FileNotFoundError`` when there is none: the set is incomplete (prepare interrupted or
    still running), and reading its shards would silently lose images.
    """
    fs, path = resolve_uri(shard_dir)
    mpath = join_uri(path, MANIFEST_NAME)
    try:
        with fs.open_input_stream(mpath) as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {os.fspath(shard_dir)}: not a complete shard set "
            "(run `ray-retina prepare`, or let an interrupted prepare finish)"
        ) from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{mpath}: schema_version {manifest.get('schema_version')} but this code reads {SCHEMA_VERSION}; "
            "prepare the shards again"
        )
    return manifest


def manifest_exists(shard_dir: str | os.PathLike[str]) -> bool:
    """Whether ``shard_dir`` holds a complete shard set (its manifest is written last)."""
    fs, path = resolve_uri(shard_dir)
    return file_exists(fs, join_uri(path, MANIFEST_NAME))


def shard_files(shard_dir: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> list[str]:
    """Paths (or URIs, keeping the scheme of ``shard_dir``) of the shards the manifest lists, in order."""
    manifest = manifest if manifest is not None else read_manifest(shard_dir)
    base = os.fspath(shard_dir)
    if "://" not in base:
        base = os.path.abspath(base)
    return [join_uri(base, s["file"]) for s in manifest["shards"]]


def validation_summary(manifest: dict[str, Any]) -> str:
    """Human-readable lines: rows/annotations written, and every validation count with its meaning."""
    lines = [
        f"{manifest['num_images']} images, {manifest['num_annotations']} annotations in "
        f"{manifest['num_shards']} shards"
    ]
    for reason, n in sorted(manifest["validation"].items()):
        if n:
            lines.append(f"  {reason:>26}: {n:>7}  {VALIDATION_REASONS.get(reason, '')}")
    if not any(manifest["validation"].values()):
        lines.append("  no records skipped, dropped or changed")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- writing


def write_shards(
    annotations: str | os.PathLike[str],
    images: str | os.PathLike[str],
    out: str | os.PathLike[str],
    rows_per_shard: int = 1000,
) -> dict[str, Any]:
    """Write the shards in this process (no Ray). Same output as :func:`prepare_shards`; returns the manifest."""
    return prepare_shards(
        annotations, images, out, rows_per_shard=rows_per_shard, use_ray=False, progress=False
    )


def prepare_shards(
    annotations: str | os.PathLike[str] | Mapping[str, Any],
    images: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rows_per_shard: int = 1000,
    use_ray: bool = True,
    num_cpus_per_task: float = 1.0,
    verify_images: bool = False,
    progress: bool | None = None,
    extra_counts: Mapping[str, int] | None = None,
    source: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prepare Parquet shards + manifest from a COCO json and its image folder; returns the manifest.

    Args:
        annotations: COCO json (``annotations/instances_train2017.json`` or any COCO-format file),
            local path or URI; or a COCO dict already in memory (what the VOC and YOLO readers make,
            see :func:`prepare_dataset`), validated and written exactly like a json.
        images: folder the json's ``file_name`` entries are relative to (``train2017/``), path or URI.
        out: output folder, a local path or any URI pyarrow understands (``file://``, ``s3://``,
            ``gs://``; credentials as pyarrow finds them). Created if missing.
        rows_per_shard: images per shard (the last shard holds the rest). Changing it re-plans
            every shard, so a rerun with another value rewrites them all.
        use_ray: write shards in parallel as Ray tasks (Ray is initialised if it is not yet);
            ``False`` writes them one after another in this process.
        num_cpus_per_task: CPUs each writing task asks Ray for (IO-bound: 0.5 packs two per core).
        verify_images: decode every image while preparing (``decode.check_image(full=True)``); by
            default only the files whose header and end marker cannot settle it are decoded (a truncated
            file is always found). Either way a file the decoder policy refuses is counted
            (``image_unreadable``) and never reaches training; costs per 1,000 images in
            benchmarks/README.md.
        progress: progress as a bar on a terminal, plain log lines otherwise; ``None`` = on.
        extra_counts: counts by reason made before the COCO dict (a reader's: ``label_line_invalid``,
            ...), added to the manifest's ``validation``, whose keys are the COCO reasons plus these.
        source: the manifest's ``source`` (default: the json and image folder).
        overwrite: replace the shards of another source in ``out`` (refused otherwise).

    Each image's real size (header, EXIF applied) is compared with the declared one: equal -> kept; the
    stored size of an EXIF-rotated image -> boxes turned with it (``size_stored_frame``); else skipped
    (``size_mismatch``); a zero or absent size is skipped before (``size_invalid``). Skipped files are
    named in the log (up to ``MAX_EXAMPLES`` per reason).

    One writer per folder: a local ``out`` is locked (``LOCK_NAME``, ``flock``) for the whole run, so a
    second prepare into it fails at once with ``PrepareConflict``; on an object store, where nothing
    locks, the manifest is written only if ``OWNER_NAME`` still holds this run's token. A folder that
    holds another source's shards (its manifest or owner file says so) is refused unless ``overwrite``.

    Validation is counted by reason (``coco.VALIDATION_REASONS``) into ``manifest["validation"]``
    and printed as a summary; an unknown category id raises ``ValueError`` naming the annotation, a
    missing json or image folder ``FileNotFoundError`` naming it.

    Resumable: rerunning with the same inputs skips shards already written (checked by a
    fingerprint of their planned content) and writes only the missing ones. Any old manifest is
    removed first and the new one written last (temp + rename), so an interrupted run never leaves
    a manifest that lists missing shards.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    t0 = time.time()
    show = True if progress is None else progress
    images, out = os.fspath(images), os.fspath(out)
    extra = {k: int(v) for k, v in (extra_counts or {}).items()}
    if unknown := sorted(set(extra) - set(VALIDATION_REASONS)):
        raise ValueError(f"extra_counts has unknown reasons {unknown}; known: {sorted(VALIDATION_REASONS)}")
    coco, ann_name = _load_annotations(annotations, images)
    desc = dict(source or {"format": "coco", "annotations": ann_name, "images": images})
    records, counts = build_records(coco, ann_name or str(desc.get("root") or images))
    counts.update(extra)
    plans = _plan_shards(records, rows_per_shard)

    out_fs, out_path = resolve_uri(out)
    out_fs.create_dir(out_path, recursive=True)
    with writer_lock(out):
        token = _claim(out_fs, out_path, out, desc, overwrite)
        manifest_path = join_uri(out_path, MANIFEST_NAME)
        if file_exists(out_fs, manifest_path):
            out_fs.delete_file(manifest_path)  # from here on the set is incomplete until we finish
        _remove_stale(out_fs, out_path, {p["file"] for p in plans})
        results = _write_all(
            plans, images, out, verify_images, len(records), show, use_ray, num_cpus_per_task
        )
        for r in results:
            counts.update(r["validation"])
        _log_examples(results)
        manifest = _manifest(coco, desc, rows_per_shard, results, counts, extra)
        if _owner(out_fs, out_path).get("token") != token:
            raise PrepareConflict(
                f"another prepare wrote to {out} while this one ran: its shards may be mixed; "
                "prepare again with --overwrite, one writer at a time"
            )
        _write_named(out_fs, manifest_path, json.dumps(manifest, indent=1).encode())
    resumed = sum(r["resumed"] for r in results)
    if show:
        print(
            f"prepared {out} in {time.time() - t0:.1f} s ({resumed} of {len(results)} shards already done)\n"
            + validation_summary(manifest),
            file=sys.stderr,
        )
    return manifest


def _write_all(
    plans: list[dict[str, Any]],
    images: str,
    out: str,
    verify_images: bool,
    total: int,
    show: bool,
    use_ray: bool,
    num_cpus_per_task: float,
) -> list[dict[str, Any]]:
    """Write every planned shard (Ray tasks or in-process) with a progress bar; results in plan order."""
    bar = _Progress(total=total, enabled=show)
    results: list[dict[str, Any]] = []
    if use_ray and plans:
        import ray  # deferred: writing in-process (tests, the demo) needs no Ray

        remote = ray.remote(num_cpus=num_cpus_per_task, max_retries=3)(_write_shard)
        pending = {remote.remote(p, images, out, verify_images): p["index"] for p in plans}
        for p in plans:
            p["records"] = None  # the tasks hold their copies; free the driver's
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                pending.pop(ref)
                try:
                    res = ray.get(ref)
                except ray.exceptions.RayTaskError as err:  # our one-line errors, not a task traceback
                    if isinstance(err.cause, (OSError, ValueError)):
                        raise err.cause from None
                    raise
                results.append(res)
                bar.update(res["planned_rows"], skipped=res["resumed"])
    else:
        for p in plans:
            res = _write_shard(p, images, out, verify_images)
            results.append(res)
            bar.update(res["planned_rows"], skipped=res["resumed"])
    bar.close()
    return sorted(results, key=lambda r: r["index"])


def _manifest(
    coco: Mapping[str, Any],
    desc: Mapping[str, Any],
    rows_per_shard: int,
    results: list[dict[str, Any]],
    counts: Counter[str],
    extra: Mapping[str, int],
) -> dict[str, Any]:
    """The manifest of a written shard set (module docstring)."""
    return {
        "format": "ray-retina-shards",
        "schema_version": SCHEMA_VERSION,
        "source": dict(desc),
        "rows_per_shard": rows_per_shard,
        "num_images": sum(r["num_rows"] for r in results),
        "num_annotations": sum(r["num_annotations"] for r in results),
        "num_shards": len(results),
        "shards": [
            {"file": r["file"], "num_rows": r["num_rows"], "num_annotations": r["num_annotations"]}
            for r in results
        ],
        "categories": [
            {
                "id": int(c["id"]),
                "name": c.get("name", str(c["id"])),
                "supercategory": c.get("supercategory", ""),
            }
            for c in sorted(coco["categories"], key=lambda c: int(c["id"]))
        ],
        "validation": {
            k: int(counts.get(k, 0)) for k in VALIDATION_REASONS if k in COCO_REASONS or k in extra
        },
        "info": coco.get("info", {}),
        "licenses": coco.get("licenses", []),
    }


def _log_examples(results: list[dict[str, Any]]) -> None:
    """Name the skipped files in the log: up to ``MAX_EXAMPLES`` per reason over all shards."""
    shown: Counter[str] = Counter()
    for r in results:
        for reason, lines in r.get("examples", {}).items():
            for line in lines:
                shown[reason] += 1
                if shown[reason] <= MAX_EXAMPLES:
                    logger.warning("%s (row skipped): %s", reason, line)


# ----------------------------------------------------------------------------------------- one writer

_held: set[str] = set()  # folders this process holds the lock of (prepare_dataset, then prepare_shards)


@contextlib.contextmanager
def writer_lock(out: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``out``'s writer lock: ``PrepareConflict`` at once when another process holds it.

    Local folders only (``flock`` on ``LOCK_NAME``: released by the OS when the holder exits, so a killed
    prepare leaves no stale lock); on an object store nothing locks (see :func:`prepare_shards`).
    Re-entrant within a process.
    """
    fs, path = resolve_uri(out)
    if not isinstance(fs, pafs.LocalFileSystem):
        yield
        return
    key = os.path.realpath(path)
    if key in _held:
        yield
        return
    os.makedirs(path, exist_ok=True)
    lock_path = os.path.join(path, LOCK_NAME)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise PrepareConflict(
                f"another prepare is writing {os.fspath(out)} ({holder}); wait for it or give another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        _held.add(key)
        try:
            yield
        finally:
            _held.discard(key)
    finally:
        os.close(fd)  # releases the flock


def _owner(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    """The folder's owner record (``OWNER_NAME``): ``{"source", "token"}``, or ``{}``."""
    try:
        with fs.open_input_stream(join_uri(path, OWNER_NAME)) as f:
            return json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return {}


def _claim(fs: pafs.FileSystem, path: str, out: str, desc: Mapping[str, Any], overwrite: bool) -> str:
    """Make this run the folder's owner; returns its token.

    ``PrepareConflict`` when the folder holds shards of another source (by its manifest's ``source``, or
    the owner record an interrupted run left) and not ``overwrite``; with it, those shards are deleted.
    """
    previous = None
    mpath = join_uri(path, MANIFEST_NAME)
    if file_exists(fs, mpath):
        try:
            with fs.open_input_stream(mpath) as f:
                previous = json.loads(f.read()).get("source")
        except ValueError:
            previous = None
    if previous is None:
        previous = _owner(fs, path).get("source")
    shards = [
        i.path
        for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        if i.base_name.startswith("part-")
    ]
    if previous is not None and shards and not _same_source(previous, desc):
        if not overwrite:
            raise PrepareConflict(
                f"{out} holds the shards of another source ({_describe(previous)}); this one is "
                f"{_describe(desc)}: give another --out, or --overwrite to replace them"
            )
        logger.warning(
            "--overwrite: deleting the %d shards of %s in %s", len(shards), _describe(previous), out
        )
        for p in shards:
            fs.delete_file(p)
    token = uuid.uuid4().hex
    _write_named(fs, join_uri(path, OWNER_NAME), json.dumps({"source": dict(desc), "token": token}).encode())
    return token


def _same_source(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two manifests' ``source`` describe the same input (local paths compared absolute)."""

    def norm(d: Mapping[str, Any]) -> dict[str, Any]:
        return {
            k: os.path.abspath(v)
            if isinstance(v, str) and k in ("annotations", "images", "root", "data") and "://" not in v
            else v
            for k, v in d.items()
        }

    return norm(a) == norm(b)


def _describe(desc: Mapping[str, Any]) -> str:
    keys = ("format", "annotations", "images", "root", "split")
    return ", ".join(f"{k} {desc[k]}" for k in keys if desc.get(k))


def _load_annotations(
    annotations: str | os.PathLike[str] | Mapping[str, Any], images: str
) -> tuple[dict[str, Any], str | None]:
    """The COCO dict and the json's name (None for a dict given in memory), after checking the inputs exist."""
    if isinstance(annotations, Mapping):
        img_fs, img_path = resolve_uri(images)
        if not dir_exists(img_fs, img_path):
            raise FileNotFoundError(f"image folder not found: {images}")
        return dict(annotations), None
    ann_name = os.fspath(annotations)
    check_coco_inputs(ann_name, images)
    return load_coco(ann_name), ann_name


def _plan_shards(records: Sequence[ImageRecord], rows_per_shard: int) -> list[dict[str, Any]]:
    """The shards to write: ``rows_per_shard`` records each, in order, with the fingerprint a rerun checks."""
    chunks = [records[i : i + rows_per_shard] for i in range(0, len(records), rows_per_shard)]
    return [
        {
            "index": i,
            "file": SHARD_PATTERN.format(i),
            "records": [asdict(r) for r in chunk],
            "fingerprint": _fingerprint(chunk),
        }
        for i, chunk in enumerate(chunks)
    ]


def prepare_dataset(
    out: str | os.PathLike[str],
    *,
    format: str = "coco",
    annotations: str | os.PathLike[str] | None = None,
    images: str | os.PathLike[str] | None = None,
    root: str | os.PathLike[str] | None = None,
    data: str | os.PathLike[str] | None = None,
    classes: Sequence[str] | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    splits: Sequence[str] | None = None,
    split_overlap: str = "error",
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Prepare a COCO json, a Pascal VOC or a YOLO tree; returns ``{shard folder: manifest}``.

    One shard set in ``out`` when the source has no splits and ``val_fraction`` is ``None``; else one
    per split in ``out/<split>``: the source's own (VOC ``ImageSets/Main``, YOLO ``images/train``...),
    or ``train`` and ``val`` by :func:`~ray_retina.data.formats.split.split_keys` (``val_fraction``,
    ``seed``), disjoint and together the whole source. ``splits`` writes only those. Format-specific
    counts (``label_line_invalid``, ...) go into the manifest of the split their image belongs to.
    An image in two of the source's splits is a ``ValueError`` naming the images (a train/val leak),
    or with ``split_overlap="first"`` it is kept in the first split (train, val, test order) only and
    counted (``split_overlap``) in the others. ``out`` is locked for the whole run (:func:`writer_lock`).
    ``kwargs`` go to :func:`prepare_shards` (``rows_per_shard``, ``use_ray``, ``overwrite``, ...).
    """
    from ray_retina.data.formats import read_source  # deferred: the readers are not needed for a COCO json

    # One piece: the source's shape decides (a COCO json, a tree without splits, splits), each branch a few
    # checks ending in prepare_shards; which splits there are is _split_parts.
    if split_overlap not in SPLIT_OVERLAP:
        raise ValueError(f"split_overlap must be one of {SPLIT_OVERLAP}, got {split_overlap!r}")
    out = os.fspath(out)
    with writer_lock(out):
        if format == "coco" and val_fraction is None:
            if splits or classes:
                raise ValueError(
                    "a COCO json has no splits or class list to choose: give --val-fraction to split it"
                )
            if annotations is None or images is None:
                raise ValueError(
                    "format coco needs --annotations (a COCO json) and --images (its image folder)"
                )
            return {out: prepare_shards(annotations, images, out, **kwargs)}
        source = read_source(
            format, annotations=annotations, images=images, root=root, data=data, classes=classes
        )
        if source.splits is not None and val_fraction is not None:
            raise ValueError(
                f"{source.description.get('root')} has its own splits ({', '.join(source.splits)}): "
                "drop --val-fraction"
            )
        parts, how, overlap = _split_parts(source, val_fraction, seed, split_overlap)
        if parts is None:
            if splits:
                raise ValueError(
                    f"{source.description.get('root')} has no splits: give --val-fraction to make them"
                )
            coco, counts = source.to_coco()
            return {
                out: prepare_shards(
                    coco, source.images, out, extra_counts=counts, source=source.description, **kwargs
                )
            }
        chosen = list(splits) if splits else list(parts)
        if unknown := [s for s in chosen if s not in parts]:
            raise ValueError(f"no split {unknown} in the source; it has {list(parts)}")
        manifests = {}
        for i, name in enumerate(chosen):
            coco, counts = source.to_coco(parts[name], with_unattached=i == 0)
            if name in overlap:
                counts["split_overlap"] += overlap[name]
            dest = join_uri(out, name)
            desc = {**source.description, "split": name, **how}
            manifests[dest] = prepare_shards(
                coco, source.images, dest, extra_counts=counts, source=desc, **kwargs
            )
        return manifests


def _split_parts(
    source: Any, val_fraction: float | None, seed: int, split_overlap: str
) -> tuple[dict[str, Any] | None, dict[str, Any], Counter[str]]:
    """``(parts, how, overlap)`` of :func:`prepare_dataset`: the source's own splits made disjoint (the images
    counted out of each by ``split_overlap="first"``), or train/val by ``val_fraction``, or None; ``how``
    says which for the manifests."""
    from ray_retina.data.formats.split import split_keys  # deferred: as in prepare_dataset

    if source.splits is not None:
        parts, overlap = _disjoint(
            source.splits, keep_first=split_overlap == "first", root=source.description
        )
        return parts, {"split_by": "source"}, overlap
    if val_fraction is not None:
        return (
            split_keys(source.keys, val_fraction, seed),
            {"val_fraction": val_fraction, "seed": seed},
            Counter(),
        )
    return None, {"split_by": "source"}, Counter()


SPLIT_OVERLAP = ("error", "first")  # an image in two source splits: refuse, or keep it in the first only


def _disjoint(
    parts: dict[str, list[str]], *, keep_first: bool, root: Mapping[str, Any]
) -> tuple[dict[str, list[str]], Counter[str]]:
    """The source's splits with no image in two of them; the number removed from each split.

    ``ValueError`` naming the images (up to 10) and their splits unless ``keep_first``: then each stays in
    the first split that lists it (the order of ``parts``: train, val, test) and is removed from the rest.
    """
    first: dict[str, str] = {}
    twice: dict[str, list[str]] = {}
    for split, keys in parts.items():
        for k in dict.fromkeys(keys):
            if k in first:
                twice.setdefault(k, [first[k]]).append(split)
            else:
                first[k] = split
    if not twice:
        return parts, Counter()
    if not keep_first:
        shown = ", ".join(f"{k} ({' and '.join(s)})" for k, s in list(twice.items())[:10])
        raise ValueError(
            f"{len(twice)} images of {root.get('root')} are in more than one split (a train/val leak): "
            f"{shown}{', ...' if len(twice) > 10 else ''}; fix the split lists, or give --split-overlap first "
            "to keep each in its first split only"
        )
    removed: Counter[str] = Counter()
    out: dict[str, list[str]] = {}
    for split, keys in parts.items():
        out[split] = [k for k in keys if first[k] == split]
        removed[split] = len(keys) - len(out[split])
    logger.warning(
        "%d images are in more than one split; kept in the first only (split_overlap), e.g. %s",
        len(twice),
        next(iter(twice)),
    )
    return out, removed


def _fingerprint(chunk: Sequence[ImageRecord]) -> str:
    h = hashlib.sha256(f"schema{SCHEMA_VERSION}".encode())
    for r in chunk:
        h.update(json.dumps(asdict(r), sort_keys=True).encode())
    return h.hexdigest()[:32]


def _remove_stale(fs: pafs.FileSystem, path: str, keep: set[str]) -> None:
    """Delete shards of an earlier plan that this one does not have, and leftover temp files."""
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        name = info.base_name
        if (name.startswith("part-") and name not in keep) or ".tmp-" in name:
            logger.info("removing stale %s", info.path)
            fs.delete_file(info.path)


def _write_shard(plan: dict[str, Any], images: str, out: str, verify_images: bool) -> dict[str, Any]:
    """Read one shard's images, validate them, write the shard. Runs in a Ray task or in-process."""
    # One piece: the unit a Ray task runs (resume check, read + check every image, write); each check it
    # makes is a function (check_image, _match_size, _write_named).
    out_fs, out_path = resolve_uri(out)
    path = join_uri(out_path, plan["file"])
    records = plan["records"]
    result = {"index": plan["index"], "file": plan["file"], "planned_rows": len(records)}

    if file_exists(out_fs, path):
        meta = _read_shard_meta(out_fs, path)
        if meta is not None and meta.get("fingerprint") == plan["fingerprint"]:
            return {**result, **meta["stats"], "resumed": True}

    img_fs, img_root = resolve_uri(images)

    def load(rec: dict[str, Any]) -> tuple[bytes, ImageHeader] | tuple[str, str]:
        """The file's bytes and header, or (validation reason, log line) when it is skipped."""
        fpath = join_uri(img_root, rec["file_name"])
        try:
            with img_fs.open_input_file(fpath) as f:
                data = f.read()
        except FileNotFoundError:
            return "image_missing", f"{fpath}: no such file"
        except OSError as err:
            return "image_unreadable", f"{fpath}: {err}"
        try:
            return data, check_image(data, full=verify_images)
        except Exception as err:  # empty, not an image, truncated, corrupt: what training would drop
            return "image_unreadable", f"{fpath}: {type(err).__name__}: {err}"

    counts: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    rows: list[dict[str, Any]] = []
    # Threads overlap the reads: little gain on a local disk, much on an object store's latency.
    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        for rec, (data, head) in zip(records, pool.map(load, records), strict=True):
            if isinstance(data, str):
                reason, line = data, head
            else:
                reason, line, rec = _match_size(rec, head, join_uri(img_root, rec["file_name"]))
            if reason is not None:
                counts[reason] += 1
                if line is not None and len(examples.setdefault(reason, [])) < MAX_EXAMPLES:
                    examples[reason].append(line)
            if rec is not None and not isinstance(data, str):
                rows.append({**rec, "image": data})

    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    stats = {
        "num_rows": table.num_rows,
        "num_annotations": sum(len(r["ann_id"]) for r in rows),
        "validation": dict(counts),
        "examples": examples,
    }
    meta = {"fingerprint": plan["fingerprint"], "stats": stats}
    table = table.replace_schema_metadata({SHARD_META_KEY: json.dumps(meta, sort_keys=True).encode()})
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        row_group_size=ROW_GROUP_SIZE,
        compression={c: ("NONE" if c == "image" else "SNAPPY") for c in SHARD_SCHEMA.names},
        use_dictionary=[c for c in SHARD_SCHEMA.names if c != "image"],
        write_statistics=[c for c in SHARD_SCHEMA.names if c != "image"],
    )
    _write_named(out_fs, path, buf.getvalue())
    return {**result, **stats, "resumed": False}


def _match_size(
    rec: dict[str, Any], head: ImageHeader, path: str
) -> tuple[str | None, str | None, dict[str, Any] | None]:
    """Check a record's declared (height, width) against its image; returns (reason, log line, record).

    Equal to the display size (EXIF applied): the record as it is. Equal to the stored size of an image
    that EXIF turns by 90 degrees (orientations 5-8, not square): the annotation was made on the stored
    pixels, so its boxes are turned with the image (``exif_transpose_boxes``) and the size becomes the
    display one (``size_stored_frame``; the record returned is a new one). Anything else: ``size_mismatch``,
    no record. Flips and 180-degree turns keep the size, so they cannot be told apart: an annotation
    is taken to be in display orientation then (what COCO, Ultralytics and CVAT write).
    """
    declared = (rec["height"], rec["width"])
    if declared == (head.height, head.width):
        return None, None, rec
    if head.orientation in TRANSPOSED and declared == (head.stored_height, head.stored_width):
        boxes = np.asarray(rec["bbox"], dtype=np.float64).reshape(-1, 4)
        turned = exif_transpose_boxes(xywh_to_xyxy(boxes), head.orientation, *declared)
        turned_rec = {
            **rec,
            "height": head.height,
            "width": head.width,
            "bbox": xyxy_to_xywh(turned).tolist(),
        }
        return "size_stored_frame", None, turned_rec
    line = (
        f"{path}: annotation says {rec['width']}x{rec['height']}, the image is {head.width}x{head.height}"
        + (f" (EXIF orientation {head.orientation})" if head.orientation != 1 else "")
    )
    return "size_mismatch", line, None


def _write_named(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """``write_bytes_atomic``, an OSError of which (no space left, ...) names ``path`` in one line."""
    try:
        write_bytes_atomic(fs, path, data)
    except OSError as err:
        named = OSError(f"cannot write {path}: {os.strerror(err.errno) if err.errno else err}")
        named.errno = err.errno
        raise named from None


def _read_shard_meta(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_file(path) as f:
            schema = pq.read_schema(f)
        return json.loads(schema.metadata[SHARD_META_KEY])
    except Exception:  # unreadable or foreign file: rewrite it
        return None


# ----------------------------------------------------------------------------------------- reading back


def read_shards_table(shard_dir: str | os.PathLike[str], columns: Sequence[str] | None = None) -> pa.Table:
    """All shards of a complete set as one Arrow table (in manifest order); for tests and eval GT."""
    manifest = read_manifest(shard_dir)
    fs, _ = resolve_uri(shard_dir)
    tables = []
    for uri in shard_files(shard_dir, manifest):
        _, path = resolve_uri(uri)
        tables.append(pq.read_table(path, columns=list(columns) if columns else None, filesystem=fs))
    if not tables:
        return SHARD_SCHEMA.empty_table().select(list(columns) if columns else SHARD_SCHEMA.names)
    return pa.concat_tables(tables).replace_schema_metadata(None)


def coco_gt_from_shards(shard_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The COCO ground truth (images, annotations, categories) rebuilt from a shard set.

    COCO eval of detections against this dict gives the same AP as against the json the shards were
    prepared from (boxes are float32 in the shards; annotations come per image, in image order).
    Images skipped while preparing are absent, and clipped boxes are the clipped ones.
    """
    manifest = read_manifest(shard_dir)
    rows = read_shards_table(shard_dir, META_COLUMNS).to_pylist()
    images, anns = [], []
    for r in rows:
        images.append(
            {"id": r["image_id"], "file_name": r["file_name"], "height": r["height"], "width": r["width"]}
        )
        for ann_id, bbox, cat, crowd, area in zip(
            r["ann_id"], r["bbox"], r["category_id"], r["iscrowd"], r["area"], strict=True
        ):
            anns.append(
                {
                    "id": ann_id,
                    "image_id": r["image_id"],
                    "category_id": cat,
                    "bbox": [float(v) for v in bbox],
                    "area": float(area),
                    "iscrowd": int(crowd),
                }
            )
    return {
        "info": manifest.get("info", {}),
        "licenses": manifest.get("licenses", []),
        "images": images,
        "annotations": anns,
        "categories": manifest["categories"],
    }


# ----------------------------------------------------------------------------------------- progress


class _Progress:
    """Rows/s and ETA: a redrawn bar on a terminal, a plain line every few seconds otherwise."""

    LOG_EVERY_S = 10.0

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.done = self.resumed = 0
        self.t0 = self.last_log = time.time()
        self.tty = sys.stderr.isatty()

    def update(self, rows: int, *, skipped: bool = False) -> None:
        self.done += rows
        self.resumed += rows if skipped else 0
        if not self.enabled:
            return
        now = time.time()
        if not self.tty and now - self.last_log < self.LOG_EVERY_S and self.done < self.total:
            return
        self.last_log = now
        written = self.done - self.resumed
        rate = written / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        frac = self.done / max(self.total, 1)
        msg = f"{self.done}/{self.total} rows ({frac:.0%}), {rate:.0f} rows/s, ETA {_fmt_eta(eta)}"
        if self.resumed:
            msg += f", {self.resumed} already done"
        if self.tty:
            bar = "#" * int(30 * frac)
            print(f"\rprepare [{bar:<30}] {msg}", end="", file=sys.stderr, flush=True)
        else:
            print(f"prepare: {msg}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


def _fmt_eta(s: float) -> str:
    if s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
