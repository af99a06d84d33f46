"""One decoder policy: the same file accepted or refused by prepare, training, eval, predict and serving,
with or without simplejpeg; EXIF-rotated images whose annotation gives the stored size get their boxes
turned with the pixels, both ways round."""

from __future__ import annotations

import io
import json
import zlib

import numpy as np
import pytest
from _data_utils import shard_batch
from PIL import Image

from ray_retina.data import decode
from ray_retina.data.augment import augment_batch
from ray_retina.data.decode import check_decodes, check_image, decode_image, exif_transpose_boxes, read_header
from ray_retina.data.shards import prepare_shards, read_shards_table


def _jpeg(h: int = 48, w: int = 64, *, progressive: bool = False, orientation: int | None = None) -> bytes:
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 4 % 256, yy * 5 % 256, (xx + yy) % 256], axis=2).astype(np.uint8)
    buf = io.BytesIO()
    kw = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90, progressive=progressive, **kw)
    return buf.getvalue()


GOOD = _jpeg()
SOS = GOOD.find(b"\xff\xda")
FILES = {
    "whole": (GOOD, True),
    "progressive": (_jpeg(progressive=True), True),
    "truncated": (GOOD[: len(GOOD) // 2], False),
    "no end marker": (GOOD[:-2], False),
    "truncated progressive": (_jpeg(progressive=True)[:-300], False),
    # recoverable libjpeg errors: simplejpeg (strict) refuses, Pillow decodes; the policy accepts
    "extraneous bytes before a marker": (GOOD[:SOS] + b"\x00\x00" + GOOD[SOS:], True),
    "bytes after the end marker": (GOOD + b"trailing camera data", True),
    "empty": (b"", False),
    "not an image": (b"hello" * 40, False),
}


def _accepts(fn, data: bytes) -> bool:
    try:
        fn(data)
    except Exception:
        return False
    return True


@pytest.mark.parametrize("name", list(FILES))
@pytest.mark.parametrize("simplejpeg", [True, False])
def test_every_path_accepts_or_refuses_the_same_files(name, simplejpeg, monkeypatch):
    if not simplejpeg:
        monkeypatch.setenv("RAY_RETINA_NO_SIMPLEJPEG", "1")
    data, ok = FILES[name]
    assert decode._use_simplejpeg() is (simplejpeg and decode.simplejpeg is not None)
    assert _accepts(decode_image, data) is ok  # training, eval, predict, serving
    assert _accepts(lambda d: decode_image(d, min_size=(12, 16)), data) is ok  # reduced JPEG scale
    assert _accepts(check_decodes, data) is ok
    assert _accepts(check_image, data) is ok  # prepare, default
    assert _accepts(lambda d: check_image(d, full=True), data) is ok  # prepare --verify-images


def test_simplejpeg_refusal_falls_back_to_the_same_pixels_as_pillow(monkeypatch):
    data = FILES["extraneous bytes before a marker"][0]
    fast = decode_image(data)
    monkeypatch.setenv("RAY_RETINA_NO_SIMPLEJPEG", "1")
    np.testing.assert_array_equal(fast, decode_image(data))


def test_default_check_decodes_only_what_the_end_marker_cannot_settle(monkeypatch):
    calls = []
    monkeypatch.setattr(decode, "check_decodes", lambda d: calls.append(len(d)))
    check_image(GOOD)
    assert calls == []  # header + end marker settle a whole JPEG
    check_image(GOOD + b"tail")
    check_image(GOOD, full=True)
    assert len(calls) == 2


def _marked(h: int, w: int, box: list[int], orientation: int) -> bytes:
    """A PNG of stored size (h, w), white inside ``box`` (XYXY stored pixels), with an EXIF orientation."""
    a = np.zeros((h, w, 3), np.uint8)
    a[box[1] : box[3], box[0] : box[2]] = 255
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "PNG", exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_transpose_boxes_moves_boxes_as_the_pixels_move(orientation):
    box = [5, 3, 17, 11]
    shown = decode_image(_marked(30, 50, box, orientation))
    ys, xs = np.nonzero(shown[..., 0] > 128)
    turned = exif_transpose_boxes(np.array([box], np.float32), orientation, 30, 50)
    np.testing.assert_array_equal(turned[0], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert read_header(_marked(30, 50, box, orientation)).height == shown.shape[0]


@pytest.mark.parametrize("orientation", [6, 8, 5, 7])
@pytest.mark.parametrize("frame", ["display", "stored"])
def test_exif_rotated_image_trains_on_its_boxes_in_either_annotation_frame(tmp_path, orientation, frame):
    """Stored 30 x 50 (h x w), displayed 50 x 30. An annotation of the display frame is kept as it is; one
    of the stored frame (declared 50 wide, 30 high) gets its box turned with the image: either way the box
    that reaches training covers the white mark of the decoded (EXIF-applied) pixels."""
    stored_box = [5, 3, 17, 11]
    data = _marked(30, 50, stored_box, orientation)
    display_box = exif_transpose_boxes(np.array([stored_box], float), orientation, 30, 50)[0]
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(data)
    (h, w), box = ((50, 30), display_box) if frame == "display" else ((30, 50), np.array(stored_box, float))
    coco = {
        "images": [{"id": 1, "file_name": "x.png", "height": h, "width": w}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [*box[:2], *(box[2:] - box[:2])], "iscrowd": 0}
        ],
        "categories": [{"id": 1, "name": "mark"}],
    }
    (tmp_path / "a.json").write_text(json.dumps(coco))
    manifest = prepare_shards(
        tmp_path / "a.json", tmp_path / "images", tmp_path / "out", use_ray=False, progress=False
    )
    assert manifest["validation"]["size_stored_frame"] == (frame == "stored")
    row = read_shards_table(tmp_path / "out").to_pylist()[0]
    assert (row["height"], row["width"]) == (50, 30)
    out = augment_batch(
        shard_batch([row["image"]], [(50, 30)], [row["bbox"]], [row["category_id"]]),
        train=False,
        min_size_range=[50],
        max_size=100,
        hflip_prob=0.0,
        cat_ids=[1],
        seed=0,
    )
    pixels, (gt,) = out["image"][0], out["gt_boxes"][0]
    ys, xs = np.nonzero(pixels[..., 0] > 128)
    scale = pixels.shape[0] / 50
    np.testing.assert_allclose(
        gt, np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]), atol=1.5 * scale
    )


def test_png_header_is_read_without_decoding_pixels():
    """A PNG's size and orientation come from its header: a file whose pixel data is garbage still has a header
    (a decode would raise), and an 11000 x 11000 PNG costs no pixel buffer."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = (11000).to_bytes(4, "big") + (11000).to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"not zlib data") + chunk(b"IEND", b"")
    head = read_header(png)
    assert (head.height, head.width, head.orientation) == (11000, 11000, 1)
    with pytest.raises(Exception):  # noqa: B017 - Pillow's error type for a broken stream varies
        decode_image(png)
