"""Files on any filesystem pyarrow reads: local paths and URIs (``file://``, ``s3://``, ``gs://``, ...).

The one place that turns a user's path into ``(filesystem, path)``; shards, checkpoints, predict and the
trainer all go through it, so a run's storage can be a local disk, NFS or an object store alike.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pyarrow.fs as pafs


def is_uri(path: str | os.PathLike[str]) -> bool:
    return "://" in os.fspath(path)


def resolve_uri(uri: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """A local path (absolute or relative) or a URI (``file://``, ``s3://``, ``gs://``, ...) -> (fs, path)."""
    uri = os.fspath(uri)
    if is_uri(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def absolute(path: str | None) -> str | None:
    """A local path made absolute (Ray workers run in other working directories); URIs and None as they are."""
    return path if path is None or is_uri(path) else str(Path(path).expanduser().resolve())


def join_uri(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


@contextlib.contextmanager
def open_input(uri: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A readable binary stream of a local file or URI; ``FileNotFoundError`` names it when absent."""
    fs, path = resolve_uri(uri)
    with fs.open_input_stream(path) as f:
        yield f  # type: ignore[misc]


def file_exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def dir_exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.Directory


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write so that ``path`` is either absent or complete.

    Local disks: a temporary name in the same folder, then a rename. Object stores (S3, GCS) make
    an object visible only when its upload completes, so a direct write is already atomic there.
    """
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        os.replace(tmp, path)  # atomic on POSIX; fs.move may copy
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)
