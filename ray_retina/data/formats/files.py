"""Files of a source tree on any filesystem: listing, reading, image sizes from the header only."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pyarrow.fs as pafs

from ray_retina.data.decode import read_header

IO_THREADS = 8  # concurrent reads: little gain on a local disk, much on an object store's latency
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".mpo")

T = TypeVar("T")
R = TypeVar("R")


def list_files(
    fs: pafs.FileSystem, folder: str, suffixes: Sequence[str], *, recursive: bool = True
) -> list[str]:
    """Paths relative to ``folder`` ('/'-separated, sorted) of the files whose name ends in a suffix (any case)."""
    sel = pafs.FileSelector(folder, recursive=recursive, allow_not_found=True)
    root = folder.rstrip("/") + "/"
    out = []
    for info in fs.get_file_info(sel):
        if info.type == pafs.FileType.File and info.base_name.lower().endswith(tuple(suffixes)):
            out.append(info.path[len(root) :] if info.path.startswith(root) else info.base_name)
    return sorted(out)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes | None:
    """The file's bytes, or ``None`` when it does not exist."""
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def header_size(fs: pafs.FileSystem, path: str) -> tuple[int, int] | str:
    """(height, width) in display orientation (EXIF applied), reading only the image header.

    ``decode.header_size`` of an open file instead of its bytes, so that only what the header needs is
    read (ranged reads on an object store), not the whole image.

    Returns the validation reason instead when the file is absent (``image_missing``) or not a readable
    image (``image_unreadable``): the same reasons, for the same files, as the shard writer counts.
    """
    try:
        with fs.open_input_file(path) as f:
            head = read_header(f)
    except FileNotFoundError:
        return "image_missing"
    except Exception:  # empty, truncated header, not an image
        return "image_unreadable"
    return head.height, head.width


def thread_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]`` with ``IO_THREADS`` reads in flight, in order."""
    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        return list(pool.map(fn, items))
