"""Training augmentation for real photos: photometric jitter, a crop that keeps boxes, zoom-out.

Boxes after every transform are checked against numbers worked out by hand for given crop / zoom parameters
and against torchvision.transforms.v2 on ``tv_tensors.BoundingBoxes`` (crop, resize, pad, flip with the
same parameters); colours against float64 formulas and torchvision's ``adjust_*``. Off is bit-identical to
the pipeline without augmentation; on, the draws depend only on (seed, image_id, epoch).
"""

from __future__ import annotations

import colorsys
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from _data_utils import png_bytes, shard_batch
from PIL import Image

from ray_retina.config import ConfigError, DataSection, apply_overrides, load_config
from ray_retina.data import augment
from ray_retina.data.augment import AUGMENTED_COLUMNS, augment_batch, color_matrix, crop_boxes, photometric
from ray_retina.data.datasets import augment_kwargs
from ray_retina.data.decode import decode_image

CATS = [3, 17, 42]
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LUMA = np.array([0.299, 0.587, 0.114])
CROP = {"prob": 1.0, "min_scale": 0.3, "min_visible": 0.5}
ZOOM = {"prob": 1.0, "max_ratio": 3.0, "fill": [124, 116, 104]}
PHOTO = {"prob": 1.0, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}
ALL_ON = {"photometric": PHOTO, "crop": CROP, "zoom_out": ZOOM}


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth colour image (gradients + a low-frequency pattern): resizes and colour ops stay in range."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi, 3)
    chans = [128 + 70 * np.sin(xx / (7 + 3 * c) + yy / (11 + 2 * c) + phase[c]) for c in range(3)]
    return np.clip(np.stack(chans, axis=2), 0, 255).astype(np.uint8)


def _random_set(n: int, seed: int, *, crowd_share: float = 0.2, empty_every: int = 5) -> dict:
    """n JPEG images of 60-220 px with 0-6 boxes inside the image (some crowd, some images without)."""
    rng = np.random.default_rng(seed)
    images, sizes, boxes, cats, crowd = [], [], [], [], []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(60, 220, size=2))
        images.append(_jpeg(_smooth(h, w, seed + i)))
        sizes.append((h, w))
        k = 0 if i % empty_every == 0 else int(rng.integers(1, 7))
        x0, y0 = rng.uniform(0, w - 4, k), rng.uniform(0, h - 4, k)
        bw, bh = rng.uniform(2, w - x0), rng.uniform(2, h - y0)
        boxes.append(np.stack([x0, y0, bw, bh], axis=1) if k else np.zeros((0, 4)))
        cats.append(list(rng.choice(CATS, k)))
        crowd.append(list((rng.random(k) < crowd_share).astype(int)))
    return shard_batch(images, sizes, boxes, cats, crowd=crowd, ids=[1000 + 7 * i for i in range(n)])


def _same(a: dict, b: dict) -> bool:
    """Bit-identical outputs: same columns, dtypes, shapes and values."""
    if set(a) != set(b):
        return False
    for c in a:
        for x, y in zip(a[c], b[c], strict=True):
            x, y = np.asarray(x), np.asarray(y)
            if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y):
                return False
    return len(a["image_id"]) == len(b["image_id"])


TRAIN = dict(train=True, max_size=1000, cat_ids=CATS)


# ------------------------------------------------------------------------------------------- off: unchanged


def test_off_is_bit_identical_to_the_pipeline_without_augmentation():
    b = _random_set(10, seed=1)
    kw = dict(TRAIN, min_size_range=[50, 90], hflip_prob=0.5, seed=3, epoch=2)
    plain = augment_batch(b, **kw)
    off = {
        "photometric": {**PHOTO, "prob": 0.0},
        "crop": {**CROP, "prob": 0},
        "zoom_out": {**ZOOM, "prob": 0},
    }
    assert _same(plain, augment_batch(b, **kw, **off))
    assert _same(plain, augment_batch(b, **kw, photometric=None, crop=None, zoom_out=None))
    # the default config passes nothing new: the kwargs are the ones from before the augmentation existed
    k = augment_kwargs(DataSection(), train=True, cat_ids=CATS, seed=0)
    assert set(k) == {"train", "min_size_range", "max_size", "hflip_prob", "cat_ids", "seed", "skip_counter"}


def test_off_equals_an_independent_decode_resize_flip():
    """The off path by hand: the image's generator draws S then the flip; Pillow resize; mirrored boxes."""
    a = _smooth(70, 120)
    b = shard_batch([png_bytes(a)], [(70, 120)], [[[10, 20, 30, 40]]], [[17]], ids=[42])
    out = augment_batch(b, **TRAIN, min_size_range=[35, 60], hflip_prob=0.5, seed=9, epoch=4)
    rng = np.random.default_rng([42, 4, 9])
    s = int(rng.integers(35, 61))
    flip = bool(rng.random() < 0.5)
    scale = s / 70
    nh, nw = int(70 * scale + 0.5), int(120 * scale + 0.5)
    ref = np.asarray(Image.fromarray(a).resize((nw, nh), Image.BILINEAR))
    box = np.array([10, 20, 40, 60]) * [nw / 120, nh / 70, nw / 120, nh / 70]
    if flip:
        ref, box = ref[:, ::-1], np.array([nw - box[2], box[1], nw - box[0], box[3]])
    np.testing.assert_array_equal(out["image"][0], ref)
    np.testing.assert_allclose(out["gt_boxes"][0], [box], rtol=1e-6)


# ------------------------------------------------------------------------------------------ crop: boxes


def test_crop_boxes_by_hand():
    window = (10, 20, 110, 80)
    boxes = np.array(
        [
            [20, 30, 60, 70],  # inside: kept as it is
            [0, 30, 40, 70],  # x clipped to 10..40: 30 of 40 wide visible (0.75)
            [100, 70, 140, 90],  # clipped to [100, 70, 110, 80]: 100 of 800 (0.125)
            [200, 200, 210, 210],  # outside (0)
            [50, 50, 50, 60],  # zero width, inside: kept
            [5, 50, 5, 60],  # zero width, outside: dropped
        ],
        dtype=np.float32,
    )
    kept, keep = crop_boxes(boxes, window, min_visible=0.5)
    np.testing.assert_array_equal(keep, [True, True, False, False, True, False])
    np.testing.assert_array_equal(kept, [[20, 30, 60, 70], [10, 30, 40, 70], [50, 50, 50, 60]])
    assert kept.dtype == np.float32
    # the number dropped follows min_visible exactly at the boundaries
    for min_visible, n_kept in [(0.1, 4), (0.125, 4), (0.13, 3), (0.75, 3), (0.76, 2), (1.0, 2)]:
        assert crop_boxes(boxes, window, min_visible)[1].sum() == n_kept, min_visible
    assert crop_boxes(np.zeros((0, 4), np.float32), window, 0.5)[0].shape == (0, 4)


def _fixed(monkeypatch, *, window=None, zoom=None, colour=None) -> None:  # noqa: ANN001
    """Given crop / zoom / colour parameters instead of drawn ones (the draws are tested on their own)."""
    if window is not None:
        monkeypatch.setattr(augment, "_draw_crop", lambda *a, **k: window)
    if zoom is not None:
        monkeypatch.setattr(augment, "_draw_zoom", lambda *a, **k: zoom)
    if colour is not None:
        monkeypatch.setattr(augment, "_draw_photometric", lambda *a, **k: colour)


def _crop_case():
    """100 x 200 (h x w) with a red band at x 60..69; three boxes (xywh), the second one crowd."""
    a = _smooth(100, 200)
    a[:, 60:70] = (255, 0, 0)
    boxes = [[50, 20, 40, 30], [20, 30, 40, 40], [130, 80, 40, 20]]
    return a, shard_batch([png_bytes(a)], [(100, 200)], [boxes], [[3, 17, 42]], crowd=[[0, 1, 0]])


@pytest.mark.parametrize("flip", [False, True])
def test_crop_resize_flip_boxes_by_hand(monkeypatch, flip):
    # window x 40..140, y 10..90 (100 x 80); S = 40 on its shorter side: scale 0.5 -> 50 x 40 out
    a, b = _crop_case()
    _fixed(monkeypatch, window=(40, 10, 140, 90))
    out = augment_batch(b, **TRAIN, min_size_range=[40, 40], hflip_prob=float(flip), seed=0, crop=CROP)
    # [50,20,90,50] inside -> -(40,10) -> [10,10,50,40] -> x0.5 -> [5,5,25,20]
    # [20,30,60,70] clipped to [40,30,60,70]: half visible (= min_visible 0.5, kept) -> [0,20,20,60] -> [0,10,10,30]
    # [130,80,170,100] clipped to [130,80,140,90]: 1/8 visible -> dropped with its label
    expected = np.array([[5, 5, 25, 20], [0, 10, 10, 30]], np.float32)
    if flip:
        expected = np.stack([50 - expected[:, 2], expected[:, 1], 50 - expected[:, 0], expected[:, 3]], 1)
    np.testing.assert_array_equal(out["gt_boxes"][0], expected)
    np.testing.assert_array_equal(out["gt_labels"][0], [0, 1])
    np.testing.assert_array_equal(out["gt_crowd"][0], [False, True])
    np.testing.assert_array_equal(out["image_size"][0], [40, 50])
    np.testing.assert_array_equal(out["orig_size"][0], [100, 200])
    assert out["scale"][0] == pytest.approx(0.5)
    # pixels: the window resized (the band at x 60..69 is at 10..14 of the 50 px output, mirrored when flipped)
    img = out["image"][0][:, ::-1] if flip else out["image"][0]
    ref = np.asarray(Image.fromarray(a[10:90, 40:140]).resize((50, 40), Image.BILINEAR))
    np.testing.assert_array_equal(img[1:-1, 1:-1], ref[1:-1, 1:-1])  # the edges also see pixels outside
    assert (img[20, 11:14] == (255, 0, 0)).all() and (img[20, :9, 0] < 250).all()


def test_crop_at_scale_one_is_the_window_exactly(monkeypatch):
    a, b = _crop_case()
    _fixed(monkeypatch, window=(40, 10, 140, 90))
    out = augment_batch(b, **TRAIN, min_size_range=[80, 80], hflip_prob=0.0, seed=0, crop=CROP)
    np.testing.assert_array_equal(out["image"][0], a[10:90, 40:140])
    np.testing.assert_array_equal(out["gt_boxes"][0], [[10, 10, 50, 40], [0, 20, 20, 60]])


# ----------------------------------------------------------------------------------------- zoom-out


@pytest.mark.parametrize("flip", [False, True])
def test_zoom_out_boxes_and_canvas_by_hand(monkeypatch, flip):
    # 60 x 80 on a canvas x2 (120 x 160); S = 60: scale 0.5 -> canvas 60 x 80, image 30 x 40;
    # offset: left = int(0.1 * (80 - 40 + 1)) = 4, top = int(0.25 * (60 - 30 + 1)) = 7
    a = _smooth(60, 80)
    b = shard_batch([png_bytes(a)], [(60, 80)], [[[10, 20, 30, 20], [0, 0, 80, 60]]], [[3, 42]])
    _fixed(monkeypatch, zoom=(2.0, 0.1, 0.25))
    out = augment_batch(b, **TRAIN, min_size_range=[60, 60], hflip_prob=float(flip), seed=0, zoom_out=ZOOM)
    # [10,20,40,40] x 0.5 + (4, 7); the whole image [0,0,80,60] x 0.5 + (4, 7)
    expected = np.array([[9, 17, 24, 27], [4, 7, 44, 37]], np.float32)
    canvas = np.empty((60, 80, 3), np.uint8)
    canvas[:] = ZOOM["fill"]
    canvas[7:37, 4:44] = np.asarray(Image.fromarray(a).resize((40, 30), Image.BILINEAR))
    if flip:
        expected = np.stack([80 - expected[:, 2], expected[:, 1], 80 - expected[:, 0], expected[:, 3]], 1)
        canvas = canvas[:, ::-1]
    np.testing.assert_array_equal(out["gt_boxes"][0], expected)
    np.testing.assert_array_equal(out["image"][0], canvas)
    np.testing.assert_array_equal(out["image_size"][0], [60, 80])
    assert out["scale"][0] == pytest.approx(0.5)


def test_zoom_out_keeps_packed_views_in_one_buffer(monkeypatch):
    b = _random_set(4, seed=2, empty_every=100)
    _fixed(monkeypatch, zoom=(1.7, 0.3, 0.9))
    out = augment_batch(b, **TRAIN, min_size_range=[50, 50], hflip_prob=0.5, seed=1, zoom_out=ZOOM)
    base = out["image"][0].base
    assert all(im.base is base and im.flags.c_contiguous for im in out["image"])


# -------------------------------------------------------------------- all geometry vs torchvision v2


def _tv_boxes(xyxy, hw, window, out_hw, canvas, flip):  # noqa: ANN001
    """The same geometry by torchvision v2 on BoundingBoxes: crop -> resize -> pad -> flip."""
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as F

    bb = tv_tensors.BoundingBoxes(torch.as_tensor(xyxy, dtype=torch.float64), format="XYXY", canvas_size=hw)
    x0, y0, x1, y1 = window
    bb = F.crop(bb, top=y0, left=x0, height=y1 - y0, width=x1 - x0)  # translates and clamps to the window
    bb = F.resize(bb, size=list(out_hw))
    ch, cw, top, left = canvas
    bb = F.pad(bb, padding=[left, top, cw - left - out_hw[1], ch - top - out_hw[0]])
    if flip:
        bb = F.horizontal_flip(bb)
    return bb.as_subclass(torch.Tensor).numpy()


@pytest.mark.parametrize("seed", range(6))
def test_crop_zoom_flip_boxes_match_torchvision_v2(monkeypatch, seed):
    rng = np.random.default_rng(seed)
    b = _random_set(1, seed=seed + 10, empty_every=100)
    h, w = int(b["height"][0]), int(b["width"][0])
    xywh = b["bbox"][0]
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float64)
    cw, ch = int(rng.integers(w // 3, w + 1)), int(rng.integers(h // 3, h + 1))
    window = (int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)))
    window = (*window, window[0] + cw, window[1] + ch)
    ratio, fx, fy = float(rng.uniform(1, 3)), float(rng.random()), float(rng.random())
    flip, size, min_visible = bool(seed % 2), int(rng.integers(40, 120)), 0.3
    _fixed(monkeypatch, window=window, zoom=(ratio, fx, fy))
    out = augment_batch(
        b,
        **TRAIN,
        min_size_range=[size, size],
        hflip_prob=float(flip),
        seed=seed,
        crop={**CROP, "min_visible": min_visible},
        zoom_out=ZOOM,
    )
    # independent: the output sizes from the documented rule, the boxes by torchvision
    scale = min(size / (ratio * min(ch, cw)), 1000 / (ratio * max(ch, cw)))
    canvas_h, canvas_w = int(ratio * ch * scale + 0.5), int(ratio * cw * scale + 0.5)
    out_h, out_w = int(ch * scale + 0.5), int(cw * scale + 0.5)
    top, left = int(fy * (canvas_h - out_h + 1)), int(fx * (canvas_w - out_w + 1))
    tv = _tv_boxes(xyxy, (h, w), window, (out_h, out_w), (canvas_h, canvas_w, top, left), flip)
    cx = xyxy.copy()
    cx[:, 0::2] = cx[:, 0::2].clip(window[0], window[2])
    cx[:, 1::2] = cx[:, 1::2].clip(window[1], window[3])
    visible = (
        (cx[:, 2] - cx[:, 0])
        * (cx[:, 3] - cx[:, 1])
        / ((xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1]))
    )
    keep = visible >= min_visible
    np.testing.assert_array_equal(out["image_size"][0], [canvas_h, canvas_w])
    np.testing.assert_allclose(out["gt_boxes"][0], tv[keep], atol=1e-3)
    assert len(out["gt_labels"][0]) == len(out["gt_crowd"][0]) == keep.sum()


# ------------------------------------------------------------------------ drawn parameters: properties


def test_augmented_boxes_stay_in_the_image_and_never_all_go():
    b = _random_set(40, seed=3)
    n_in = [len(x) for x in b["bbox"]]
    has_fg = [bool(len(c)) and not np.asarray(c).all() for c in b["iscrowd"]]
    dropped = 0
    for epoch in range(3):
        out = augment_batch(
            b, **TRAIN, min_size_range=[64, 96], hflip_prob=0.5, seed=0, epoch=epoch, **ALL_ON
        )
        assert set(out) == set(AUGMENTED_COLUMNS) and len(out["image_id"]) == 40
        for i in range(40):
            hw, boxes = out["image_size"][i], out["gt_boxes"][i]
            assert out["image"][i].shape == (*hw, 3) and out["image"][i].dtype == np.uint8
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
            assert (boxes[:, 2] <= hw[1] + 1e-3).all() and (boxes[:, 3] <= hw[0] + 1e-3).all()
            assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
            assert len(boxes) == len(out["gt_labels"][i]) == len(out["gt_crowd"][i]) <= n_in[i]
            if has_fg[i]:  # a crop never removes every (non-crowd) box of an image that has some
                assert (~out["gt_crowd"][i]).any()
            elif n_in[i]:
                assert len(boxes) > 0
            dropped += n_in[i] - len(boxes)
    assert dropped > 0  # the crops did drop boxes (the rule was exercised)


def test_no_window_that_keeps_a_box_means_no_crop():
    # a box over the whole image and min_visible 1: no window smaller than the image keeps it, so after
    # MAX_CROP_TRIALS windows the image is left whole: the output of the pipeline without the crop
    b = shard_batch([png_bytes(_smooth(100, 120))] * 5, [(100, 120)] * 5, [[[0, 0, 120, 100]]] * 5, [[3]] * 5)
    kw = dict(TRAIN, min_size_range=[80, 80], hflip_prob=0.5, seed=0)
    out = augment_batch(b, **kw, crop={"prob": 1.0, "min_scale": 0.5, "min_visible": 1.0})
    assert _same(out, augment_batch(b, **kw))
    # with min_visible 0.5 a window is found and the box is clipped to it
    out = augment_batch(b, **kw, crop={"prob": 1.0, "min_scale": 0.5, "min_visible": 0.5})
    for i in range(5):
        hw = out["image_size"][i]
        np.testing.assert_allclose(out["gt_boxes"][i], [[0, 0, hw[1], hw[0]]], atol=1e-4)
    assert any(tuple(hw) != (80, 96) for hw in out["image_size"])


def test_draws_depend_only_on_seed_image_and_epoch():
    b = _random_set(8, seed=4)
    kw = dict(TRAIN, min_size_range=[50, 80], hflip_prob=0.5, **ALL_ON)
    e0 = augment_batch(b, seed=7, epoch=0, **kw)
    assert _same(e0, augment_batch(b, seed=7, epoch=0, **kw))
    alone = augment_batch({k: v[3:4] for k, v in b.items()}, seed=7, epoch=0, **kw)
    assert _same({k: v[3:4] for k, v in e0.items()}, alone)
    reordered = augment_batch({k: v[::-1] for k, v in b.items()}, seed=7, epoch=0, **kw)
    assert _same({k: v[::-1] for k, v in e0.items()}, reordered)
    assert not _same(e0, augment_batch(b, seed=7, epoch=1, **kw))
    assert not _same(e0, augment_batch(b, seed=8, epoch=0, **kw))
    # S and the flip are drawn first, as without augmentation: with only photometric on, sizes and boxes
    # are those of the plain pipeline
    plain = augment_batch(b, seed=7, epoch=0, **dict(kw, photometric=None, crop=None, zoom_out=None))
    colour = augment_batch(b, seed=7, epoch=0, **dict(kw, crop=None, zoom_out=None))
    for c in ("image_size", "gt_boxes", "gt_labels", "scale"):
        for x, y in zip(plain[c], colour[c], strict=True):
            np.testing.assert_array_equal(x, y)


def test_drawn_parameters_stay_in_their_ranges():
    rng = np.random.default_rng(0)
    f = np.array([augment._draw_photometric(rng, {**PHOTO, "brightness": 1.5}) for _ in range(2000)])
    assert f[:, 0].min() >= 0 and f[:, 0].max() <= 2.5 and f[:, 0].min() < 0.1  # clipped at 0
    assert 0.6 <= f[:, 1].min() < 0.62 and 1.38 < f[:, 1].max() <= 1.4
    assert -0.1 <= f[:, 3].min() < -0.09 and 0.09 < f[:, 3].max() <= 0.1
    z = np.array([augment._draw_zoom(rng, 3.0) for _ in range(2000)])
    assert z[:, 0].min() >= 1 and z[:, 0].max() <= 3 and ((z[:, 1:] >= 0) & (z[:, 1:] < 1)).all()
    boxes, crowd = np.zeros((0, 4), np.float32), np.zeros(0, bool)
    for _ in range(200):
        x0, y0, x1, y1 = augment._draw_crop(rng, 100, 200, boxes, crowd, 0.3, 0.5)
        assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 100
        assert 60 <= x1 - x0 and 30 <= y1 - y0


@pytest.mark.parametrize("size", [40, 150])
def test_photometric_only_changes_colours(monkeypatch, size):
    """Downscaling (S 40 of 60-100 px): the jitter runs on the resized image; upscaling (S 150): on the
    original before the resize (fewer pixels). Same boxes and sizes as without it either way."""
    rng = np.random.default_rng(5)
    arrs = [_smooth(int(rng.integers(60, 100)), int(rng.integers(60, 100)), seed=i) for i in range(3)]
    b = shard_batch(
        [png_bytes(a) for a in arrs], [a.shape[:2] for a in arrs], [[[5, 6, 20, 30]]] * 3, [[3]] * 3
    )
    kw = dict(TRAIN, min_size_range=[size, size], hflip_prob=0.5, seed=2)
    plain = augment_batch(b, **kw)
    factors = dict(brightness=1.2, contrast=0.8, saturation=1.3, hue=0.05)
    _fixed(monkeypatch, colour=tuple(factors.values()))
    out = augment_batch(b, **kw, photometric=PHOTO)
    for i, a in enumerate(arrs):
        np.testing.assert_array_equal(out["gt_boxes"][i], plain["gt_boxes"][i])
        np.testing.assert_array_equal(out["image_size"][i], plain["image_size"][i])
        shown = np.ascontiguousarray(plain["image"][i])
        after = photometric(shown, **factors)  # per pixel: commutes with the flip
        if size == 40:
            np.testing.assert_array_equal(out["image"][i], after)
        else:
            h, w = plain["image_size"][i]
            before = np.asarray(Image.fromarray(photometric(a, **factors)).resize((w, h), Image.BILINEAR))
            flipped = not np.array_equal(shown, np.asarray(Image.fromarray(a).resize((w, h), Image.BILINEAR)))
            np.testing.assert_array_equal(out["image"][i], before[:, ::-1] if flipped else before)
            assert np.abs(out["image"][i].astype(int) - after).max() <= 3  # the two orders: rounding apart


def test_photometric_before_an_upscaled_crop_is_on_the_window(monkeypatch):
    a, b = _crop_case()
    factors = dict(brightness=0.9, contrast=1.3, saturation=0.7, hue=-0.04)
    _fixed(monkeypatch, window=(40, 10, 140, 90), colour=tuple(factors.values()))
    out = augment_batch(
        b, **TRAIN, min_size_range=[120, 120], hflip_prob=0.0, seed=0, crop=CROP, photometric=PHOTO
    )
    window = np.ascontiguousarray(a[10:90, 40:140])
    ref = np.asarray(Image.fromarray(photometric(window, **factors)).resize((150, 120), Image.BILINEAR))
    np.testing.assert_array_equal(out["image"][0], ref)
    np.testing.assert_allclose(out["gt_boxes"][0], [[15, 15, 75, 60], [0, 30, 30, 90]])  # x 1.5


# ----------------------------------------------------------------------------------------- colours


def _ref(x: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(x + 0.5), 0, 255)


@pytest.mark.parametrize("factor", [0.0, 0.6, 1.0, 1.3])
def test_brightness_contrast_saturation_by_formula_and_torchvision(factor):
    from torchvision.transforms.v2 import functional as F

    a = _smooth(48, 64, seed=1)
    x = a.astype(np.float64)
    t = torch.from_numpy(a).permute(2, 0, 1)
    luma = x @ LUMA
    cases = {
        "brightness": (x * factor, F.adjust_brightness),
        "contrast": (factor * x + (1 - factor) * luma.mean(), F.adjust_contrast),
        "saturation": (factor * x + (1 - factor) * luma[..., None], F.adjust_saturation),
    }
    for name, (formula, tv) in cases.items():
        got = photometric(a, **{name: factor}).astype(np.int64)
        assert np.abs(got - _ref(formula)).max() <= 1, name  # float32 inside Pillow: an odd level at .5
        assert np.abs(got - tv(t, factor).permute(1, 2, 0).numpy().astype(np.int64)).max() <= 2, name


def test_identity_factors_change_nothing():
    a = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(photometric(a), a)


def test_four_jitters_at_once_equal_the_ops_one_after_another():
    a = _smooth(40, 50, seed=2)
    x = a.astype(np.float64)
    b, c, s, h = 1.1, 0.85, 1.2, 0.07
    # each op by its own formula, in float64, in the order brightness -> contrast -> saturation -> hue
    x = x * b
    x = c * x + (1 - c) * (x @ LUMA).mean()
    x = s * x + (1 - s) * (x @ LUMA)[..., None]
    yiq = np.array([LUMA, [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]])
    th = -2 * np.pi * h
    q = x @ yiq.T
    i2 = np.cos(th) * q[..., 1] - np.sin(th) * q[..., 2]
    q2 = np.sin(th) * q[..., 1] + np.cos(th) * q[..., 2]
    x = np.linalg.solve(yiq, np.stack([q[..., 0], i2, q2], -1).reshape(-1, 3).T).T.reshape(x.shape)
    assert x.min() > 0 and x.max() < 255  # no clipping in this case: the order does not matter
    got = photometric(a, brightness=b, contrast=c, saturation=s, hue=h)
    assert np.abs(got.astype(np.int64) - _ref(x)).max() <= 1
    # the other order gives the same (the four commute)
    m1, t1 = color_matrix(b, c, s, h, 100.0)
    sat = s * np.eye(3) + (1 - s) * np.outer(np.ones(3), LUMA)
    hue, _ = color_matrix(1, 1, 1, h, 0.0)
    np.testing.assert_allclose(hue @ sat, sat @ hue, atol=1e-12)
    np.testing.assert_allclose(m1, b * c * hue @ sat, atol=1e-12)
    np.testing.assert_allclose(t1, (1 - c) * b * 100.0)


def test_hue_keeps_luma_and_grey_and_turns_like_hsv():
    grey = np.repeat(np.arange(0, 256, 5, dtype=np.uint8)[None, :, None], 3, axis=2)
    np.testing.assert_array_equal(photometric(grey, hue=0.3), grey)
    m, _ = color_matrix(1, 1, 1, 0.2, 0.0)
    np.testing.assert_allclose(LUMA @ m, LUMA, atol=1e-12)  # luma kept exactly
    np.testing.assert_allclose(m @ np.ones(3), np.ones(3), atol=1e-12)
    back, _ = color_matrix(1, 1, 1, -0.2, 0.0)
    np.testing.assert_allclose(back @ m, np.eye(3), atol=1e-12)
    # positive hue moves the HSV hue forwards (red towards yellow), by roughly the same turn for small shifts
    colours = np.array(
        [[[180, 60, 60], [60, 160, 60], [70, 70, 190], [170, 150, 60], [120, 80, 170]]], np.uint8
    )
    for shift in (0.03, -0.03):
        out = photometric(colours, hue=shift)
        for before, after in zip(colours[0], out[0], strict=True):
            h0 = colorsys.rgb_to_hsv(*(before / 255))[0]
            h1 = colorsys.rgb_to_hsv(*(after / 255))[0]
            moved = (h1 - h0 + 0.5) % 1 - 0.5
            assert np.sign(moved) == np.sign(shift) and 0.3 * abs(shift) < abs(moved) < 2.5 * abs(shift)


def test_photometric_rejects_bad_input():
    a = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        photometric(a.astype(np.float32))
    with pytest.raises(ValueError, match="hue"):
        photometric(a, hue=0.7)
    with pytest.raises(ValueError, match=">= 0"):
        photometric(a, contrast=-0.1)


# ---------------------------------------------------------------------------------- arguments, config


def test_augment_batch_arguments_are_checked():
    b = _random_set(1, seed=6)
    with pytest.raises(ValueError, match="train=True"):
        augment_batch(
            b,
            train=False,
            min_size_range=[50, 50],
            max_size=100,
            hflip_prob=0.0,
            cat_ids=CATS,
            seed=0,
            crop=CROP,
        )
    kw = dict(TRAIN, min_size_range=[50, 50], hflip_prob=0.0, seed=0)
    for bad, match in [
        ({"crop": {**CROP, "prob": 1.5}}, "crop.prob"),
        ({"crop": {**CROP, "min_visible": 0}}, "min_visible"),
        ({"zoom_out": {**ZOOM, "max_ratio": 0.5}}, "max_ratio"),
        ({"zoom_out": {**ZOOM, "fill": [1, 2]}}, "fill"),
        ({"photometric": {**PHOTO, "hue": 0.6}}, "hue"),
        ({"photometric": {"prob": 1.0}}, "brightness"),
        ({"photometric": [1.0]}, "mapping"),
    ]:
        with pytest.raises(ValueError, match=match):
            augment_batch(b, **kw, **bad)


def test_config_defaults_off_and_validation():
    a = DataSection().augment
    assert a.photometric.prob == a.crop.prob == a.zoom_out.prob == 0.0
    for name in ("retinanet_r50_fpn_1x_coco", "smoke", "tune_focal", "tune_focal_gpu"):
        a = load_config(CONFIGS / f"{name}.yaml").data.augment
        assert a.photometric.prob == a.crop.prob == a.zoom_out.prob == 0.0, name
    small = load_config(CONFIGS / "retinanet_r50_fpn_finetune_small.yaml").data.augment
    assert small.photometric.prob > 0 and small.crop.prob > 0 and small.zoom_out.prob > 0

    cfg = load_config(None)
    on = apply_overrides(cfg, ["data.augment.crop.prob=0.5", "data.augment.photometric.hue=0.05"])
    assert on.data.augment.crop.prob == 0.5 and on.data.augment.photometric.hue == 0.05
    for bad, match in [
        ("data.augment.crop.probability=0.5", "data.augment.crop.probability: unknown key"),
        ("data.augment.blur={prob: 1}", "data.augment.blur: unknown key"),
        ("data.augment.crop.prob=1.5", "data.augment.crop.prob"),
        ("data.augment.crop.min_visible=0", "data.augment.crop.min_visible"),
        ("data.augment.crop.min_scale=1.2", "data.augment.crop.min_scale"),
        ("data.augment.photometric.hue=0.6", "data.augment.photometric.hue"),
        ("data.augment.photometric.brightness=-0.1", "data.augment.photometric.brightness"),
        ("data.augment.zoom_out.max_ratio=0.9", "data.augment.zoom_out.max_ratio"),
        ("data.augment.zoom_out.fill=[1, 2, 300]", "data.augment.zoom_out.fill"),
    ]:
        with pytest.raises(ConfigError, match=match.replace(".", r"\.")):
            apply_overrides(cfg, [bad])


def test_augment_kwargs_pass_ops_that_are_on_in_training_only():
    data = apply_overrides(
        load_config(None), {"data.augment.crop.prob": 0.5, "data.augment.zoom_out.prob": 0.2}
    ).data
    train = augment_kwargs(data, train=True, cat_ids=CATS, seed=0)
    assert train["crop"] == {"prob": 0.5, "min_scale": 0.3, "min_visible": 0.5}
    assert train["zoom_out"] == {"prob": 0.2, "max_ratio": 2.0, "fill": [124, 116, 104]}
    assert "photometric" not in train  # prob 0: left out
    assert pickle.loads(pickle.dumps(train)) == train  # Ray's fn_kwargs
    ev = augment_kwargs(data, train=False, cat_ids=CATS, seed=0)
    assert not {"photometric", "crop", "zoom_out"} & set(ev)


def test_finetune_config_runs_through_the_row_group_step(synth_shards):
    """The kwargs of a config with everything on, through the Ray Data step's function (no Ray): every
    image comes out, boxes inside the images, and a second pass of the same epoch is identical."""
    import pyarrow.parquet as pq

    from ray_retina.data.datasets import read_and_augment
    from ray_retina.data.shards import read_manifest, shard_files

    cfg = load_config(CONFIGS / "retinanet_r50_fpn_finetune_small.yaml").data
    d = synth_shards / "train"
    cats = [c["id"] for c in read_manifest(d)["categories"]]
    kw = augment_kwargs(
        cfg.model_copy(update={"train_min_size": [64, 96], "max_size": 160}), train=True, cat_ids=cats, seed=0
    )
    files = shard_files(d)
    frags = {"path": np.array(files), "row_group": np.zeros(len(files), np.int64)}
    first = [b for b in read_and_augment(frags, augment={**kw, "epoch": 1})]
    again = [b for b in read_and_augment(frags, augment={**kw, "epoch": 1})]
    n = sum(pq.ParquetFile(f).metadata.row_group(0).num_rows for f in files)
    assert sum(len(b["image_id"]) for b in first) == n
    for x, y in zip(first, again, strict=True):
        assert _same(x, y)
        for hw, boxes in zip(x["image_size"], x["gt_boxes"], strict=True):
            assert (
                (boxes >= -1e-3).all()
                and (boxes[:, 2] <= hw[1] + 1e-3).all()
                and (boxes[:, 3] <= hw[0] + 1e-3).all()
            )


def test_decoded_crop_matches_full_decode_when_jpeg_is_dct_reduced(monkeypatch):
    """A small window of a large JPEG at a small S: the decoder may reduce the image (1/2, 1/4, 1/8); the
    window is still taken at the same place (compare with the window of a full-size decode)."""
    a = _smooth(480, 640, seed=3)
    a[:, 300:310] = (0, 0, 255)
    data = _jpeg(a)
    b = shard_batch([data], [(480, 640)], [[[280, 100, 60, 60]]], [[3]])
    _fixed(monkeypatch, window=(200, 80, 520, 400))  # 320 x 320 around the blue band at x 300..309
    out = augment_batch(b, **TRAIN, min_size_range=[40, 40], hflip_prob=0.0, seed=0, crop=CROP)
    full = decode_image(data)
    ref = np.asarray(Image.fromarray(full[80:400, 200:520]).resize((40, 40), Image.BILINEAR)).astype(int)
    assert np.abs(out["image"][0].astype(int) - ref)[2:-2, 2:-2].mean() < 3
    np.testing.assert_allclose(out["gt_boxes"][0], [[10, 2.5, 17.5, 10]], rtol=1e-6)  # [80,20,140,80] / 8
