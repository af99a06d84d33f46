"""Encoded image bytes -> uint8 RGB pixels in display orientation (EXIF applied); header-only sizes.

No Ray, no torch: ``prepare``'s checks, Ray Data's decode tasks, evaluation, ``predict``, the served model
and drawing all decode through here, so one policy decides which files are images:

**The decoder policy.** A file is an image when Pillow decodes it with its defaults (truncated data is an
error: ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off). simplejpeg (libjpeg-turbo, ``pip install
'ray-retina[fastjpeg]'``, in the cluster image too) is only a faster path to the same answer: it runs
strict, and any error it raises (a truncated file, or a recoverable one such as "extraneous bytes before
marker" that Pillow decodes) sends the file to Pillow, which accepts or refuses it. So the same file is
accepted or refused whether or not simplejpeg is installed; ``prepare`` refuses (and counts) what this
refuses, so training never meets a file it cannot decode.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import IO

import numpy as np
from PIL import Image, ImageOps

try:  # optional fast JPEG decoder (pip install 'ray-retina[fastjpeg]')
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

EXIF_ORIENTATION = 0x0112
EXIF_FORMATS = ("JPEG", "MPO", "TIFF", "WEBP", "PNG")  # formats that can carry an EXIF orientation
TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees (width and height swap)
END_MARKERS = {
    "JPEG": b"\xff\xd9",
    "MPO": b"\xff\xd9",
    "PNG": b"IEND\xaeB`\x82",
}  # last bytes of a whole file
CHECK_SIZE = (1, 1)  # what check_decodes asks for: the smallest DCT scale (1/8) of a JPEG, full elsewhere


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, without decoding pixels.

    ``height`` / ``width``: display orientation (EXIF applied, what :func:`decode_image` returns);
    ``stored_height`` / ``stored_width``: the pixels as stored (before EXIF); ``orientation`` in 1..8
    (1: none); ``format``: Pillow's format name (``JPEG``, ``PNG``, ...).
    """

    height: int
    width: int
    stored_height: int
    stored_width: int
    orientation: int
    format: str


def read_header(fp: bytes | IO[bytes]) -> ImageHeader:
    """The :class:`ImageHeader` of encoded bytes or an open binary file (only the header is read).

    Raises what Pillow raises on data that is not a readable image (``PIL.UnidentifiedImageError``, ...).
    """
    with Image.open(io.BytesIO(fp) if isinstance(fp, bytes) else fp) as im:
        w, h = im.size
        orientation = _orientation(im)
        fmt = im.format or ""
    if orientation in TRANSPOSED:
        return ImageHeader(w, h, h, w, orientation, fmt)
    return ImageHeader(h, w, h, w, orientation, fmt)


def header_size(data: bytes) -> tuple[int, int]:
    """(height, width) in display orientation, from the header only (no pixels decoded)."""
    head = read_header(data)
    return head.height, head.width


def decode_image(data: bytes, min_size: tuple[int, int] | None = None, *, fast: bool = True) -> np.ndarray:
    """Encoded bytes -> uint8 RGB (H, W, 3) in display orientation (EXIF applied).

    ``min_size`` = (h, w) lets a JPEG decoder decode at a reduced scale (1/2, 1/4, 1/8: DCT scaling,
    much cheaper) when the result stays at least that large in both sides; the caller resizes to
    its exact target afterwards. ``fast``: try simplejpeg (libjpeg-turbo) first for plain RGB/grey JPEGs
    when it is installed and ``RAY_RETINA_NO_SIMPLEJPEG`` is not set; whatever it refuses, and every
    other file, goes through Pillow (the policy in the module docstring). Raises on empty, corrupt or
    truncated data.
    """
    if not data:
        raise ValueError("empty image bytes")
    im = Image.open(io.BytesIO(data))
    orientation = _orientation(im)
    transposed = orientation in TRANSPOSED  # stored with width and height swapped
    stored_min = None if min_size is None else (min_size[::-1] if transposed else min_size)
    if stored_min is not None and (2 * stored_min[0] > im.height or 2 * stored_min[1] > im.width):
        stored_min = None  # scale factors between 1/2 and 1 decode slower than full size

    if fast and _use_simplejpeg() and im.format == "JPEG" and im.mode in ("RGB", "L") and orientation == 1:
        kw = {} if stored_min is None else {"min_height": stored_min[0], "min_width": stored_min[1]}
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", **kw)
        except ValueError:  # strict libjpeg error: Pillow decides (the policy), so both paths agree
            pass

    if stored_min is not None and im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK"):
        im.draft(im.mode, (stored_min[1], stored_min[0]))
    im.load()  # raises on truncated data (Pillow's LOAD_TRUNCATED_IMAGES is off by default)
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
    return _to_rgb(im)


def check_decodes(data: bytes) -> None:
    """Raise what :func:`decode_image` would raise on ``data``, at the least cost.

    JPEGs are decoded at their smallest DCT scale (1/8 per side): the entropy-coded data, where a
    truncated or corrupt file fails, is read whole at any scale, so the verdict is that of a full decode
    (tests/unit/test_decode_policy.py checks it) for a fraction of the time.
    """
    decode_image(data, min_size=CHECK_SIZE)


def check_image(data: bytes, *, full: bool = False) -> ImageHeader:
    """The header of an image that :func:`decode_image` accepts; raises what it would raise otherwise.

    ``prepare`` runs this on every file. What costs nothing settles most files: a readable header and the
    format's end marker as the last bytes (JPEG's EOI, PNG's IEND), which a truncated file lacks. The
    rest (no end marker: truncated, or trailing bytes after it, which Pillow accepts; formats without
    one) are decoded by :func:`check_decodes`; ``full`` decodes every file (also finds corruption inside
    a complete file that Pillow refuses; costs per 1,000 images in benchmarks/README.md).
    """
    if not data:
        raise ValueError("empty image bytes")
    head = read_header(data)
    if full or not _ends_with_marker(data, head.format):
        check_decodes(data)
    return head


def _ends_with_marker(data: bytes, fmt: str) -> bool:
    """Whether the file ends with its format's end marker (zero padding after it allowed)."""
    marker = END_MARKERS.get(fmt)
    return marker is not None and data.rstrip(b"\x00").endswith(marker)


def exif_transpose_boxes(
    boxes: np.ndarray, orientation: int, stored_height: int, stored_width: int
) -> np.ndarray:
    """XYXY boxes (n, 4) in the stored pixels of an image -> the same boxes in its display orientation.

    The map ``ImageOps.exif_transpose`` applies to the pixels, applied to the corners: for stored size
    (H, W), a point (x, y) goes to 2: (W - x, y), 3: (W - x, H - y), 4: (x, H - y), 5: (y, x),
    6: (H - y, x), 7: (H - y, W - x), 8: (y, W - x); 1 (or anything else): unchanged.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    h, w = float(stored_height), float(stored_width)
    corners = {
        2: (w - x2, y1, w - x1, y2),
        3: (w - x2, h - y2, w - x1, h - y1),
        4: (x1, h - y2, x2, h - y1),
        5: (y1, x1, y2, x2),
        6: (h - y2, x1, h - y1, x2),
        7: (h - y2, w - x2, h - y1, w - x1),
        8: (y1, w - x2, y2, w - x1),
    }.get(orientation)
    if corners is None:
        return np.asarray(boxes).reshape(-1, 4).copy()
    return np.stack(corners, axis=1).astype(np.asarray(boxes).dtype, copy=False)


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1..8) of an open image; 1 when absent or out of range."""
    if im.format not in EXIF_FORMATS:
        return 1
    if im.format == "PNG" and "exif" not in im.info:
        # Pillow looks for an eXIf chunk after the pixel data by decoding the whole image; the header-only
        # checks (prepare's size check, a served model's pixel limit) must never decode, so only an eXIf
        # chunk before the pixel data counts, the same on every path.
        return 1
    value = im.getexif().get(EXIF_ORIENTATION, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _use_simplejpeg() -> bool:
    return simplejpeg is not None and not os.environ.get("RAY_RETINA_NO_SIMPLEJPEG")


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode == "RGB":
        return np.asarray(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: keep the top 8 bits of the range
        a = np.asarray(im).astype(np.float32)
        peak = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        grey = np.clip(a * (255.0 / peak), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # palette with alpha: go through RGBA so the colours are kept
    return np.asarray(im.convert("RGB"))  # L, LA, RGBA (alpha dropped), P, CMYK, YCbCr, 1, F
