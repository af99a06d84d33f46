"""Decode/augment (plain functions), collate, a shard row group read and augmented, Ray Train's ingest options.
The Ray Data pipeline end to end on real shards: tests/integration/test_pipeline_ray.py."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
import torch
from _data_utils import png_bytes, shard_batch
from PIL import Image

from ray_retina.data.augment import (
    AUGMENTED_COLUMNS,
    Draws,
    Layout,
    augment_batch,
    draw_augment,
    image_rng,
    map_labels,
    move_boxes,
    plan_layout,
    render,
)
from ray_retina.data.collate import RetinaCollate
from ray_retina.data.decode import decode_image
from ray_retina.data.shards import read_shards_table, shard_files

CATS = [3, 17, 42]


def _jpeg(arr: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, **save)
    return buf.getvalue()


def _two_tone(h: int, w: int, x_red: int) -> np.ndarray:
    """Grey image with a red column band starting at x_red (5 px wide) to follow through flips."""
    a = np.full((h, w, 3), 128, np.uint8)
    a[:, x_red : x_red + 5] = (255, 0, 0)
    return a


TEST_KW = dict(train=False, max_size=1000, hflip_prob=0.0, cat_ids=CATS, seed=0)


def test_resize_moves_boxes_by_hand_numbers():
    # 100 x 200 (h x w), box xywh [10, 20, 30, 40] -> xyxy [10, 20, 40, 60]
    b = shard_batch([_jpeg(_two_tone(100, 200, 50))], [(100, 200)], [[[10, 20, 30, 40]]], [[17]])
    out = augment_batch(b, min_size_range=[50, 50], **TEST_KW)  # shorter side 100 -> 50: scale 0.5
    assert set(out) == set(AUGMENTED_COLUMNS)
    assert out["image"][0].shape == (50, 100, 3) and out["image"][0].dtype == np.uint8
    np.testing.assert_allclose(out["gt_boxes"][0], [[5, 10, 20, 30]])
    np.testing.assert_array_equal(out["gt_labels"][0], [1])  # 17 is the second sorted id
    np.testing.assert_array_equal(out["image_size"][0], [50, 100])
    np.testing.assert_array_equal(out["orig_size"][0], [100, 200])
    assert out["scale"][0] == pytest.approx(0.5)

    # Longer side capped: S = 100 would give 200 wide, max_size 150 -> scale 0.75 -> 75 x 150.
    out = augment_batch(b, min_size_range=[100, 100], **{**TEST_KW, "max_size": 150})
    assert out["image"][0].shape == (75, 150, 3)
    np.testing.assert_allclose(out["gt_boxes"][0], [[7.5, 15, 30, 45]])
    assert out["scale"][0] == pytest.approx(0.75)


def test_flip_mirrors_pixels_and_boxes():
    # Scale 1 (S = shorter side) so the numbers stay whole: W = 200, box x in [10, 40] -> [160, 190].
    b = shard_batch(
        [_jpeg(_two_tone(100, 200, 10))], [(100, 200)], [[[10, 20, 30, 40], [0, 0, 200, 100]]], [[3, 42]]
    )
    out = augment_batch(
        b, train=True, min_size_range=[100, 100], max_size=1000, hflip_prob=1.0, cat_ids=CATS, seed=0
    )
    np.testing.assert_allclose(out["gt_boxes"][0], [[160, 20, 190, 60], [0, 0, 200, 100]])
    np.testing.assert_array_equal(out["gt_labels"][0], [0, 2])
    red = out["image"][0][50, :, 0] > 200
    assert red[186:189].all() and not red[:180].any()  # band was at x 10..14, now at 185..189

    out = augment_batch(
        b, train=True, min_size_range=[100, 100], max_size=1000, hflip_prob=0.0, cat_ids=CATS, seed=0
    )
    np.testing.assert_allclose(out["gt_boxes"][0], [[10, 20, 40, 60], [0, 0, 200, 100]])


def test_batch_images_are_packed_views_that_ray_blocks_share_without_copy():
    rng = np.random.default_rng(0)
    arrs = [rng.integers(0, 255, (40 + 8 * i, 56 - 4 * i, 3), dtype=np.uint8) for i in range(3)]
    b = shard_batch([png_bytes(a) for a in arrs], [a.shape[:2] for a in arrs], [[]] * 3, [[]] * 3)
    kw = dict(train=True, min_size_range=[40, 40], max_size=1000, cat_ids=CATS, seed=0)
    flipped = augment_batch(b, hflip_prob=1.0, **kw)["image"]
    plain = augment_batch(b, hflip_prob=0.0, **kw)
    for img, f, p in zip(arrs, flipped, plain["image"], strict=True):
        resized = np.asarray(Image.fromarray(img).resize(p.shape[1::-1], Image.BILINEAR))
        np.testing.assert_array_equal(p, resized)  # the packed copy is the Pillow resize, exactly
        np.testing.assert_array_equal(f, resized[:, ::-1])  # and its mirror image when flipped
    # One buffer, image after image: Ray Data's numpy -> Arrow conversion keeps it as it is (no concatenation).
    base = plain["image"][0].base
    assert all(im.base is base and im.flags.c_contiguous for im in plain["image"])
    from ray.data.block import BlockAccessor

    block = BlockAccessor.batch_to_block(plain)
    col = block.column("image")
    assert col.num_chunks == 1
    data = col.chunk(0).storage.field("data").buffers()[-1]
    assert data.address == base.ctypes.data and data.size >= sum(im.nbytes for im in plain["image"])


def test_pixel_buffers_are_reused_only_when_nothing_refers_to_them():
    from ray_retina.data.augment import _BufferPool

    pool = _BufferPool(max_buffers=2)
    a = pool.take(1000)
    addr = a.ctypes.data
    view = a[10:20].reshape(2, 5)
    del a
    b = pool.take(500)  # the first buffer is still referred to (through `view`): a second one
    assert b.ctypes.data != addr
    del view
    c = pool.take(800)  # free again, and big enough: the same memory
    assert c.ctypes.data == addr
    c[:] = 7
    d = pool.take(4000)  # both in use: a new array outside the pool (full)
    assert d.ctypes.data not in (addr, b.ctypes.data) and len(pool.buffers) == 2
    del b, c, d
    e = pool.take(4000)  # a free one too small is replaced by a larger one
    assert e.size == 4000 and len(pool.buffers) == 2 and any(x.size == 4000 for x in pool.buffers)


def test_train_sizes_jitter_in_range_and_depend_on_seed_image_and_epoch():
    imgs = [_jpeg(np.zeros((60 + i, 80, 3), np.uint8)) for i in range(12)]
    b = shard_batch(imgs, [(60 + i, 80) for i in range(12)], [[]] * 12, [[]] * 12)
    kw = dict(train=True, min_size_range=[40, 56], max_size=1000, hflip_prob=0.5, cat_ids=CATS)
    e0 = augment_batch(b, seed=7, epoch=0, **kw)
    shorter = [min(im.shape[:2]) for im in e0["image"]]
    assert all(40 <= s <= 56 for s in shorter) and len(set(shorter)) > 3
    again = augment_batch(b, seed=7, epoch=0, **kw)
    assert [im.shape for im in again["image"]] == [im.shape for im in e0["image"]]
    # the draws of an image do not depend on which batch it is in
    alone = augment_batch({k: v[5:6] for k, v in b.items()}, seed=7, epoch=0, **kw)
    assert alone["image"][0].shape == e0["image"][5].shape
    e1 = augment_batch(b, seed=7, epoch=1, **kw)
    assert [im.shape for im in e1["image"]] != [im.shape for im in e0["image"]]


def test_zero_boxes_and_crowd_are_carried():
    b = shard_batch(
        [_jpeg(np.zeros((40, 40, 3), np.uint8))] * 2,
        [(40, 40)] * 2,
        [[], [[1, 2, 3, 4], [5, 5, 5, 5]]],
        [[], [42, 3]],
        crowd=[[], [1, 0]],
    )
    out = augment_batch(b, min_size_range=[40, 40], **TEST_KW)
    assert out["gt_boxes"][0].shape == (0, 4) and out["gt_labels"][0].shape == (0,)
    np.testing.assert_array_equal(out["gt_crowd"][1], [True, False])
    np.testing.assert_array_equal(out["gt_labels"][1], [2, 0])


def test_unknown_category_is_an_error():
    b = shard_batch([_jpeg(np.zeros((40, 40, 3), np.uint8))], [(40, 40)], [[[1, 2, 3, 4]]], [[99]])
    with pytest.raises(ValueError, match="99"):
        augment_batch(b, min_size_range=[40, 40], **TEST_KW)


def test_collate_pads_images_and_targets():
    imgs = np.empty(3, dtype=object)
    imgs[0] = np.full((50, 70, 3), 1, np.uint8)
    imgs[1] = np.full((100, 30, 3), 2, np.uint8)
    imgs[2] = np.full((20, 20, 3), 3, np.uint8)
    boxes, labels, crowd = (np.empty(3, dtype=object) for _ in range(3))
    boxes[0], labels[0], crowd[0] = np.array([[1, 2, 3, 4]], np.float32), np.array([2]), np.array([False])
    boxes[1], labels[1], crowd[1] = np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool)
    boxes[2] = np.array([[0, 0, 5, 5], [1, 1, 9, 9], [2, 2, 4, 4]], np.float32)
    labels[2], crowd[2] = np.array([0, 1, 0]), np.array([False, True, False])
    batch = {
        "image": imgs,
        "gt_boxes": boxes,
        "gt_labels": labels,
        "gt_crowd": crowd,
        "image_size": np.array([[50, 70], [100, 30], [20, 20]]),
        "orig_size": np.array([[100, 140], [100, 30], [40, 40]]),
        "scale": np.array([0.5, 1.0, 0.5], np.float32),
        "image_id": np.array([7, 8, 9]),
    }
    out = RetinaCollate(size_divisibility=32)(batch)
    assert out["images"].shape == (3, 3, 128, 96) and out["images"].dtype == torch.uint8
    assert out["images"].is_contiguous()
    assert (out["images"][0, :, :50, :70] == 1).all() and (out["images"][0, :, 50:, :] == 0).all()
    assert (out["images"][1, :, :100, :30] == 2).all() and (out["images"][1, :, :, 30:] == 0).all()
    assert out["image_sizes"].tolist() == [[50, 70], [100, 30], [20, 20]]
    assert out["orig_sizes"].tolist() == [[100, 140], [100, 30], [40, 40]]
    assert out["gt_boxes"].shape == (3, 3, 4) and out["gt_boxes"].dtype == torch.float32
    assert out["gt_labels"].tolist() == [[2, -1, -1], [-1, -1, -1], [0, 1, 0]]
    assert out["gt_crowd"].tolist() == [[False] * 3, [False] * 3, [False, True, False]]
    assert out["gt_boxes"][0, 0].tolist() == [1, 2, 3, 4] and (out["gt_boxes"][1] == 0).all()
    assert out["image_id"].tolist() == [7, 8, 9] and out["image_id"].dtype == torch.int64
    assert out["scale"].dtype == torch.float32

    # A batch without any object still has a GT axis of 1, all padding.
    empty = {
        **batch,
        "gt_boxes": boxes[1:2],
        "gt_labels": labels[1:2],
        "gt_crowd": crowd[1:2],
        "image": imgs[1:2],
        "orig_size": batch["orig_size"][1:2],
        "scale": batch["scale"][1:2],
        "image_id": batch["image_id"][1:2],
    }
    out = RetinaCollate(size_divisibility=128)(empty)
    assert out["images"].shape == (1, 3, 128, 128) and out["gt_labels"].tolist() == [[-1]]


# ------------------------------------------------------------------------------------------------ decoding


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _quadrants() -> np.ndarray:
    """60 x 80 image: red top-left, green top-right, blue bottom-left, white bottom-right."""
    a = np.zeros((60, 80, 3), np.uint8)
    a[:30, :40] = (255, 0, 0)
    a[:30, 40:] = (0, 255, 0)
    a[30:, :40] = (0, 0, 255)
    a[30:, 40:] = (255, 255, 255)
    return a


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize(
    "fmt,mode",
    [
        ("PNG", "RGB"),
        ("PNG", "RGBA"),
        ("PNG", "P"),
        ("PNG", "L"),
        ("JPEG", "RGB"),
        ("JPEG", "L"),
        ("JPEG", "CMYK"),
    ],
)
def test_decode_any_mode_to_rgb(fmt, mode, fast):
    src = _quadrants()
    data = _encode(Image.fromarray(src).convert(mode), fmt)
    out = decode_image(data, fast=fast)
    assert out.shape == (60, 80, 3) and out.dtype == np.uint8
    expect = np.asarray(Image.fromarray(src).convert(mode).convert("RGB"), dtype=int)
    tol = 1 if fmt == "PNG" else 40  # JPEG blurs the colour edges a little
    centres = [(15, 20), (15, 60), (45, 20), (45, 60)]
    for y, x in centres:
        assert np.abs(out[y, x].astype(int) - expect[y, x]).max() <= tol, (y, x, out[y, x], expect[y, x])


def test_exif_orientation_is_applied_and_boxes_stay_in_display_frame():
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    data = _encode(Image.fromarray(_quadrants()), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data)
    assert out.shape == (80, 60, 3)  # 60 wide, 80 high on display
    assert out[10, 50, 0] > 200 and out[10, 50, 1] < 60  # stored top-left red is now top-right
    assert out[70, 10, 1] > 200 and out[70, 10, 0] > 200  # stored bottom-right white is now bottom-left
    # the json describes the display frame (80 x 60 h x w); a box there is scaled, not rotated
    b = shard_batch([data], [(80, 60)], [[[30, 0, 30, 40]]], [[3]])
    aug = augment_batch(b, min_size_range=[30, 30], **TEST_KW)
    assert aug["image"][0].shape == (40, 30, 3)
    np.testing.assert_allclose(aug["gt_boxes"][0], [[15, 0, 30, 20]])
    assert aug["image"][0][5, 25, 0] > 200  # the red quadrant is where the box is


def test_reduced_scale_jpeg_decode_matches_full_decode():
    big = np.kron(_quadrants(), np.ones((8, 8, 1), np.uint8))  # 480 x 640
    data = _encode(Image.fromarray(big), "JPEG", quality=95)
    for fast in (True, False):
        small = decode_image(data, min_size=(100, 140), fast=fast)
        assert small.shape[0] >= 100 and small.shape[1] >= 140 and small.shape[0] < 480  # DCT-scaled
        assert small[20, 20, 0] > 200 and small[-20, -20].min() > 200


def test_simplejpeg_and_pillow_agree():
    pytest.importorskip("simplejpeg")
    data = _encode(Image.fromarray(_quadrants()), "JPEG", quality=95)
    a, b = decode_image(data, fast=True), decode_image(data, fast=False)
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() < 2


def test_corrupt_rows_are_dropped_and_counted():
    from ray_retina.data import skips

    good = _jpeg(_quadrants())
    counter = f"local-test-{uuid.uuid4().hex}"  # a counter of its own: no other test's skips in it
    b = shard_batch(
        [good, good[: len(good) // 2], b"", b"\x00" * 100, good],
        [(60, 80)] * 5,
        [[[1, 1, 5, 5]]] * 5,
        [[3]] * 5,
        ids=[11, 12, 13, 14, 15],
    )
    out = augment_batch(b, min_size_range=[60, 60], skip_counter=counter, **TEST_KW)
    assert out["image_id"].tolist() == [11, 15]  # truncated, zero-byte and garbage rows dropped
    assert [len(x) for x in out["gt_boxes"]] == [1, 1]
    assert skips.skipped_images(counter) == 3
    # all rows bad: an empty batch with the same columns
    out = augment_batch({k: v[2:3] for k, v in b.items()}, min_size_range=[60, 60], **TEST_KW)
    assert set(out) == set(AUGMENTED_COLUMNS) and all(len(v) == 0 for v in out.values())


# ------------------------------------------------------------------ shard reads and ingest options (no Ray)


def test_read_and_augment_is_augment_batch_over_a_row_group(synth_shards):
    from ray_retina.data.datasets import read_and_augment

    files = shard_files(synth_shards / "val")  # 10 rows, 4 per shard: one row group each
    kw = {
        "train": False,
        "min_size_range": [64, 64],
        "max_size": 128,
        "hflip_prob": 0.0,
        "cat_ids": CATS,
        "seed": 0,
    }
    frags = {"path": np.array(files[:2], dtype=object), "row_group": np.array([0, 0])}
    whole = list(read_and_augment(frags, augment=kw))
    assert [len(b["image_id"]) for b in whole] == [4, 4]  # default: a row group per augment call
    out = list(read_and_augment(frags, augment=kw, batch_size=3))
    assert [len(b["image_id"]) for b in out] == [3, 1, 3, 1]  # streamed per map batch
    ids = [int(i) for b in out for i in b["image_id"]]
    table = read_shards_table(synth_shards / "val")
    assert ids == table.column("image_id").to_pylist()[:8]
    first = augment_batch(
        {
            c: table.column(c).to_numpy(zero_copy_only=False)[:3]
            for c in ["image_id", "height", "width", "image", "bbox", "category_id", "iscrowd"]
        },
        **kw,
    )
    for a, b, c in zip(first["image"], out[0]["image"], whole[0]["image"][:3], strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_ray_train_ingest_keeps_deterministic_order():
    """Ray Train replaces a data set's execution options with its ingest defaults: ours must carry
    data.deterministic through (the options Ray Train resolves for "train")."""
    from ray_retina.config import Config, apply_overrides
    from ray_retina.engine.trainer import ingest_config

    on = ingest_config(Config())  # on by default
    off = ingest_config(apply_overrides(Config(), {"data.deterministic": False}))
    assert on._resolve_execution_options("train").preserve_order is True
    assert off._resolve_execution_options("train").preserve_order is False


# ----------------------------------------------------------------------------- the steps of augment_batch


def test_plan_layout_by_hand_numbers():
    plain = plan_layout(60, 80, 30, 1000)  # shorter side 60 -> 30: scale 0.5
    assert (plain.scale, plain.new, plain.canvas, plain.top, plain.left, plain.zoomed) == (
        0.5,
        (30, 40),
        (30, 40),
        0,
        0,
        False,
    )
    assert plan_layout(60, 80, 30, 20).new == (15, 20)  # the longer side capped at 20: scale 0.25
    cropped = plan_layout(60, 80, 30, 1000, window=(10, 20, 50, 50))  # a 40 x 30 window -> 30 short side
    assert cropped.region == (10, 20, 40, 30) and cropped.new == (30, 40)
    zoomed = plan_layout(60, 80, 30, 1000, zoom=(2.0, 1.0, 0.0))  # canvas twice the image, image at right-top
    assert zoomed.canvas == (30, 40) and zoomed.new == (15, 20) and (zoomed.top, zoomed.left) == (0, 20)


def test_move_boxes_shifts_scales_offsets_and_mirrors():
    boxes = np.array([[10, 20, 30, 40]], np.float32)
    layout = Layout(
        region=(10, 20, 40, 30), scale=0.5, new=(15, 20), canvas=(30, 40), top=5, left=10, zoomed=True
    )
    np.testing.assert_array_equal(move_boxes(boxes, layout, flip=False), [[10, 5, 20, 15]])
    np.testing.assert_array_equal(move_boxes(boxes, layout, flip=True), [[20, 5, 30, 15]])  # 40 - x


def test_draws_depend_on_seed_image_epoch_and_off_ops_draw_nothing():
    boxes, crowd = np.zeros((0, 4), np.float32), np.zeros(0, bool)
    args = (24, 32, 0.5, 60, 80, boxes, crowd)
    plain = draw_augment(image_rng(0, 7, 1), *args, None, None, None)
    assert plain == draw_augment(image_rng(0, 7, 1), *args, None, None, None)
    assert plain.window is None and plain.zoom is None and plain.colour is None and 24 <= plain.size <= 32
    draws = {
        draw_augment(image_rng(s, i, e), *args, None, None, None)
        for s, i, e in [(0, 7, 1), (1, 7, 1), (0, 8, 1), (0, 7, 2)]
    }
    assert len(draws) > 1
    zoom = draw_augment(image_rng(0, 7, 1), *args, None, {"prob": 1.0, "max_ratio": 2.0}, None)
    assert (zoom.size, zoom.flip) == (plain.size, plain.flip) and 1.0 <= zoom.zoom[0] <= 2.0
    assert Draws(size=5) == Draws(5, False, None, None, None)


def test_render_and_map_labels():
    rng = np.random.default_rng(0)
    data = png_bytes(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    im = render(data, 60, 80, plan_layout(60, 80, 30, 1000))
    assert im.size == (40, 30) and im.mode == "RGB"
    assert render(
        data, 60, 80, plan_layout(60, 80, 30, 1000, window=(0, 0, 40, 30)), (0, 0, 40, 30)
    ).size == (40, 30)
    np.testing.assert_array_equal(map_labels(np.array([5, 1]), {1: 0, 5: 1}, 3), [1, 0])
    with pytest.raises(ValueError, match="image 3: category id 9 not in cat_ids"):
        map_labels(np.array([9]), {1: 0}, 3)


@pytest.mark.parametrize("size", [(0, 80), (60, 0)])
def test_a_zero_size_row_is_a_clear_error_naming_the_image(size):
    batch = shard_batch(
        [png_bytes(np.zeros((60, 80, 3), np.uint8))], [size], [[[1, 1, 5, 5]]], [[1]], ids=[42]
    )
    with pytest.raises(ValueError, match=r"image 42: height \d+ x width \d+ is not an image size; prepare"):
        augment_batch(
            batch, train=True, min_size_range=[32], max_size=64, hflip_prob=0.5, cat_ids=[1], seed=0
        )
