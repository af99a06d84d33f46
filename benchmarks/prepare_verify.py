"""What ``prepare``'s image check costs per 1,000 images: header only; the default check
(``decode.check_image``: header + end marker, decoding only files without one); the same on truncated
files (all decoded, all refused); every file decoded at its 1/8 DCT scale (``--verify-images``); and a
full decode (what training does).

Photo-like JPEGs (smooth gradients + shapes + sensor-like noise, quality 90) at COCO's typical 640 x 480
and a phone's 4032 x 3024; one thread, in-memory bytes (no disk), CPU seconds, medians of ``--repeats``
passes.

    .venv/bin/python benchmarks/prepare_verify.py [--images 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from ray_retina.data.decode import _use_simplejpeg, check_decodes, check_image, decode_image, read_header


def photo_jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
    """A JPEG with the entropy of a photo more than of a drawing: gradients, blobs, noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 200, yy / h * 180, (xx + yy) / (h + w) * 220], axis=2)
    for _ in range(12):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.3) * min(h, w)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
        base[mask] = rng.uniform(0, 255, size=3)
    base += rng.normal(0, 6, size=base.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def per_1000(fn: Callable[[bytes], object], data: list[bytes], repeats: int) -> float:
    """Median CPU seconds of this process per 1,000 images of ``fn`` over ``data`` (one thread: CPU time is
    the work, whatever else the shared machine runs)."""
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        for d in data:
            fn(d)
        times.append((time.process_time() - t0) / len(data) * 1000)
    return statistics.median(times)


def refused(data: bytes) -> None:
    """``check_image`` on a file it must refuse (raises: caught here)."""
    try:
        check_image(data)
    except Exception:
        return
    raise AssertionError("a truncated file passed check_image")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"simplejpeg in use: {_use_simplejpeg()}")
    print(
        f"{'size':>11} {'header':>8} {'default':>8} {'truncated':>10} {'1/8 all':>8} {'full':>8}"
        "  CPU s per 1,000 images (one thread)"
    )
    for h, w, n in ((480, 640, args.images), (3024, 4032, max(10, args.images // 10))):
        data = [photo_jpeg(rng, h, w) for _ in range(min(n, 20))]
        data = (data * (n // len(data) + 1))[:n]
        cut = [d[: len(d) * 9 // 10] for d in data]  # truncated files: the default check decodes them
        head = per_1000(read_header, data, args.repeats)
        default = per_1000(check_image, data, args.repeats)
        truncated = per_1000(refused, cut, args.repeats)
        check = per_1000(check_decodes, data, args.repeats)
        full = per_1000(decode_image, data, args.repeats)
        print(
            f"{w:>5} x {h:<4} {head:>7.2f}s {default:>7.2f}s {truncated:>9.2f}s {check:>7.2f}s {full:>7.2f}s"
            f"  1/8 / full = {check / full:.2f}"
        )


if __name__ == "__main__":
    main()
