"""Encoded image bytes -> uint8 RGB pixels in display orientation (EXIF applied); header-only sizes.

No Ray, no torch: Ray Data's decode tasks, evaluation, inference and drawing all decode through here.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

try:  # optional fast JPEG decoder (pip install 'ray-retina[fastjpeg]')
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

EXIF_ORIENTATION = 0x0112
EXIF_FORMATS = ("JPEG", "MPO", "TIFF", "WEBP", "PNG")  # formats that can carry an EXIF orientation


def decode_image(data: bytes, min_size: tuple[int, int] | None = None, *, fast: bool = True) -> np.ndarray:
    """Encoded bytes -> uint8 RGB (H, W, 3) in display orientation (EXIF applied).

    ``min_size`` = (h, w) lets a JPEG decoder decode at a reduced scale (1/2, 1/4, 1/8: DCT scaling,
    much cheaper) when the result stays at least that large in both sides; the caller resizes to
    its exact target afterwards. ``fast``: use simplejpeg (libjpeg-turbo) for plain RGB/grey JPEGs
    when it is installed and ``RAY_RETINA_NO_SIMPLEJPEG`` is not set; everything else goes through
    Pillow. Raises on empty, corrupt or truncated data.
    """
    if not data:
        raise ValueError("empty image bytes")
    im = Image.open(io.BytesIO(data))
    orientation = im.getexif().get(EXIF_ORIENTATION, 1) if im.format in EXIF_FORMATS else 1
    transposed = orientation in (5, 6, 7, 8)  # stored with width and height swapped
    stored_min = None if min_size is None else (min_size[::-1] if transposed else min_size)
    if stored_min is not None and (2 * stored_min[0] > im.height or 2 * stored_min[1] > im.width):
        stored_min = None  # scale factors between 1/2 and 1 decode slower than full size

    if fast and _use_simplejpeg() and im.format == "JPEG" and im.mode in ("RGB", "L") and orientation == 1:
        kw = {} if stored_min is None else {"min_height": stored_min[0], "min_width": stored_min[1]}
        return simplejpeg.decode_jpeg(data, colorspace="RGB", **kw)

    if stored_min is not None and im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK"):
        im.draft(im.mode, (stored_min[1], stored_min[0]))
    im.load()  # raises on truncated data (Pillow's LOAD_TRUNCATED_IMAGES is off by default)
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
    return _to_rgb(im)


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


def header_size(data: bytes) -> tuple[int, int]:
    """(height, width) in display orientation, from the header only (no pixels decoded)."""
    im = Image.open(io.BytesIO(data))
    w, h = im.size
    orientation = im.getexif().get(EXIF_ORIENTATION, 1) if im.format in EXIF_FORMATS else 1
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)
