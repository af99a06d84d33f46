"""Inputs made by the predict tests: a folder of every image type prepare takes (plus unreadable files) and a
tiny video encoded with PyAV."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def mixed_folder(src_jpgs: list[Path], folder: Path) -> dict[str, tuple[int, int]]:
    """A folder with one image of each type prepare takes (from the synthetic JPEGs, converted), a
    truncated JPEG and a text file; returns file name -> (width, height) of the readable images."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, tuple[int, int]] = {}
    formats = {
        "a.jpg": None,
        "b.png": "PNG",
        "c.bmp": "BMP",
        "d.webp": "WEBP",
        "e.tif": "TIFF",
        "f.tiff": "TIFF",
    }
    for i, (name, fmt) in enumerate(formats.items()):
        src = src_jpgs[i % len(src_jpgs)]
        if fmt is None:
            shutil.copy(src, folder / name)
        else:
            Image.open(src).save(folder / name, format=fmt)
        sizes[name] = Image.open(src).size
    (folder / "broken.jpg").write_bytes(src_jpgs[0].read_bytes()[:300])  # a truncated JPEG
    (folder / "notes.txt").write_text("not an image")
    return sizes


def make_video(
    path: Path, frames: int = 7, size: tuple[int, int] = (96, 64), fps: int = 10
) -> list[np.ndarray]:
    """A tiny MPEG-4 video of moving bright boxes (PyAV); returns its frames (RGB)."""
    import av

    w, h = size
    pictures = []
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            rgb = np.full((h, w, 3), 30, np.uint8)
            rgb[10:40, 5 + 6 * i : 35 + 6 * i] = (230, 40, 40)
            pictures.append(rgb)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return pictures
