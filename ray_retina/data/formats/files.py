"""Files of a source tree on any filesystem: listing, reading, image sizes from the header only."""

from __future__ import annotations

import os
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
) -> tuple[list[str], list[bytes]]:
    """Paths relative to ``folder`` ('/'-separated, sorted) of the files whose name ends in a suffix (any
    case), and the paths (bytes) of those whose name is not UTF-8: pyarrow cannot list, open or store
    them, so the readers count them (``name_not_utf8``) and log them by their bytes."""
    sel = pafs.FileSelector(folder, recursive=recursive, allow_not_found=True)
    root = folder.rstrip("/") + "/"
    out = []
    try:
        for info in fs.get_file_info(sel):
            if info.type == pafs.FileType.File and info.base_name.lower().endswith(tuple(suffixes)):
                out.append(info.path[len(root) :] if info.path.startswith(root) else info.base_name)
    except UnicodeDecodeError:  # a name that is not UTF-8 (object stores' keys always are)
        if not isinstance(fs, pafs.LocalFileSystem):
            raise
        return _list_local(folder, suffixes, recursive)
    return sorted(out), []


def _list_local(folder: str, suffixes: Sequence[str], recursive: bool) -> tuple[list[str], list[bytes]]:
    """``list_files`` of a local folder through the OS's bytes names (what pyarrow fails on)."""
    good, bad = [], []
    base = os.fsencode(folder)
    for dirpath, dirnames, filenames in os.walk(base):
        if not recursive:
            dirnames.clear()
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), base)
            try:
                text = rel.decode("utf-8")
            except UnicodeDecodeError:
                if name.lower().endswith(tuple(x.encode() for x in suffixes)):
                    bad.append(os.path.join(dirpath, name))
                continue
            if text.lower().endswith(tuple(suffixes)):
                good.append(text.replace(os.sep, "/"))
    return sorted(good), sorted(bad)


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
