"""Decode + resize + flip of a numpy batch of shard rows, boxes moved exactly: the Ray Data step.

:func:`augment_batch` is a plain function on a numpy batch (one row per image) that Ray Data runs in
its CPU pool via ``map_batches(batch_format="numpy")``; it needs neither Ray nor torch (import-safe in
any process). Rows whose bytes do not decode are dropped and counted (``data/skips.py``).

Augmented rows have the columns ``AUGMENTED_COLUMNS``: ``image`` uint8 (h, w, 3) of varying size
(Ray stores it as a variable-shaped tensor column), ``image_size`` int64 (2,) = [h, w],
``orig_size`` int64 (2,) = [height, width] of the original, ``scale`` float32, ``image_id`` int64,
``gt_boxes`` float32 (n, 4) XYXY in resized pixels, ``gt_labels`` int64 (n,) in 0..K-1,
``gt_crowd`` bool (n,); n may be 0.

Training images can also get, each off unless asked for (``data.augment`` in the config), for small data
sets of real photos: photometric jitter (:func:`photometric`), a random crop that keeps boxes and a
zoom-out onto a canvas of the pixel mean. The order, per image: crop (a window in original pixels) ->
zoom-out (the window placed on a larger canvas) -> resize (the shorter side of the canvas to S, as
without them) -> photometric (on the image, never on the canvas' fill, which stays the mean) -> flip.
Geometry is done once, by one resize of the window straight from the decoded pixels, with the image's
offset on the canvas in whole output pixels, so boxes stay exact; the colour jitter runs before the resize
instead when that touches fewer pixels (an upscaled image: it is affine, so the two orders agree up to
rounding).
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageStat

from ray_retina.data.decode import decode_image
from ray_retina.data.formats.coco import category_label_maps, xywh_to_xyxy
from ray_retina.data.skips import count_skipped, warn_skip

READ_COLUMNS = ["image_id", "height", "width", "image", "bbox", "category_id", "iscrowd"]
AUGMENTED_COLUMNS = [
    "image",
    "image_size",
    "orig_size",
    "scale",
    "image_id",
    "gt_boxes",
    "gt_labels",
    "gt_crowd",
]

MAX_CROP_TRIALS = 10  # windows tried per cropped image before giving up (SSD: 50, torchvision: 40 x options)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 luma, the grey of PIL's "L" and torchvision's rgb_to_grayscale
# RGB -> YIQ (FCC NTSC); rows I and Q sum to 0, so grey (r = g = b) has no chroma and stays fixed.
_YIQ = np.array([LUMA, (0.5959, -0.2746, -0.3213), (0.2115, -0.5227, 0.3112)], dtype=np.float64)
_YIQ_INV = np.linalg.inv(_YIQ)
# zoom-out canvas: the ImageNet pixel mean (model.pixel_mean) in whole levels, about 0 after normalising
DEFAULT_FILL = (124, 116, 104)


def augment_batch(
    batch: dict[str, np.ndarray],
    *,
    train: bool,
    min_size_range: Sequence[int],
    max_size: int,
    hflip_prob: float,
    cat_ids: Sequence[int],
    seed: int | None,
    epoch: int | None = None,
    skip_counter: str | None = None,
    photometric: Mapping[str, float] | None = None,
    crop: Mapping[str, float] | None = None,
    zoom_out: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Decode, resize (shorter side S, longer side <= ``max_size``), flip; boxes follow exactly.

    Input columns (``READ_COLUMNS``, as the shards store them): ``image`` bytes, ``image_id``,
    ``height``, ``width``, per-object ``bbox`` (COCO XYWH, original pixels), ``category_id``
    (original ids, mapped to 0..K-1 through the sorted ``cat_ids``), ``iscrowd``. Output columns:
    ``AUGMENTED_COLUMNS`` (see the module docstring). Rows that do not decode are dropped, logged and
    counted in ``skip_counter`` (:func:`ray_retina.data.skips.skipped_images`).

    ``train``: S is drawn uniformly from the integers ``[lo, hi] = min_size_range`` per image and
    the image is flipped with probability ``hflip_prob``; otherwise S = ``lo`` and nothing is
    random. The random draws of an image depend only on ``(seed, image_id, epoch)``, not on how Ray
    batches or orders rows; ``epoch`` defaults to Ray Data's execution index, which grows by one per
    pass over the data set, so each epoch sees different draws. ``seed=None``: fresh entropy.

    Boxes are scaled per axis by the exact resize factors (new_w / width, new_h / height); ``scale``
    is the nominal factor S / shorter side (capped), and ``image_size`` / ``orig_size`` give the exact
    per-axis mapping back to original pixels.

    Optional training augmentation (``train`` only; None or ``prob`` 0: off, and then nothing of it runs,
    draws nothing and copies nothing: the output is bit-identical to a call without it). Each is a mapping
    (``data.augment.*`` of the config, see :func:`ray_retina.data.datasets.augment_kwargs`); its draws come
    from the image's generator after S and the flip, in the order below, so they too depend only on
    ``(seed, image_id, epoch)``:

    - ``crop`` ``{prob, min_scale, min_visible}``: with probability ``prob``, a window of
      ``round(width x u)`` by ``round(height x v)`` original pixels, u and v uniform in ``[min_scale, 1]``
      independently, at a uniform whole-pixel position. Boxes are clipped to it; a box (crowd or not) whose
      clipped area is below ``min_visible`` of its own area is dropped with its label (a zero-area box is
      kept only when it lies inside the window). A window is accepted only when it keeps at least one box
      of an image that has some (a non-crowd one if the image has any); up to ``MAX_CROP_TRIALS`` windows
      are drawn, and when none is accepted the image is not cropped. The window then takes the image's
      place: S applies to its shorter side, ``scale`` maps original to output pixels.
    - ``zoom_out`` ``{prob, max_ratio, fill}``: with probability ``prob``, the image (or window) is placed
      on a canvas r times its size, r uniform in ``[1, max_ratio]``, filled with ``fill`` (RGB levels,
      default the pixel mean). S applies to the canvas' shorter side; the image part is resized by the
      same nominal factor to ``round(side x scale)`` and put at a uniformly drawn whole-pixel offset of
      the output canvas (the same as placing it at original resolution and resizing, but with the offset
      rounded to whole output pixels, and without ever making the large canvas at full resolution).
      Boxes: scaled by the image part's exact per-axis factors, then shifted by the offset.
    - ``photometric`` ``{prob, brightness, contrast, saturation, hue}``: with probability ``prob``, factors
      drawn uniformly from ``[max(0, 1 - x), 1 + x]`` (hue: ``[-hue, hue]``, in turns) and applied by
      :func:`photometric` to the shown image (the window, else the whole image) at the smaller of its
      decoded and output resolutions: after the resize, or before it when the image is upscaled. Boxes do
      not move.

    With crop or zoom-out, ``image_size`` / ``orig_size`` no longer map output pixels back to the original
    (training only needs the boxes; evaluation and inference never augment).
    """
    lo, hi = int(min_size_range[0]), int(min_size_range[-1])
    if not 0 < lo <= hi:
        raise ValueError(f"min_size_range must be [lo, hi] with 0 < lo <= hi, got {list(min_size_range)}")
    cat_to_label, _ = category_label_maps(cat_ids)
    photometric, crop, zoom_out = (
        _enabled(photometric, "photometric"),
        _enabled(crop, "crop"),
        _enabled(zoom_out, "zoom_out"),
    )
    if (photometric or crop or zoom_out) and not train:
        raise ValueError("photometric / crop / zoom_out augment training images only (train=True)")
    _check_augment(photometric, crop, zoom_out)
    fill = np.array(zoom_out.get("fill") or DEFAULT_FILL, dtype=np.uint8) if zoom_out else None
    if train and epoch is None and seed is not None:
        epoch = _ray_data_epoch()

    # Per row: draws -> layout -> render (decode, crop, resize, colour) -> labels and boxes; each step is
    # a function below with its own test. The loop itself only gathers the columns, so it stays one piece.
    out: dict[str, list[Any]] = {k: [] for k in AUGMENTED_COLUMNS}
    flips: list[bool] = []  # applied when the images are packed
    canvases: list[tuple[int, int, int, int, np.ndarray] | None] = []  # zoom-out: placed when packed
    skipped: list[int] = []
    for i in range(len(batch["image_id"])):
        image_id = int(batch["image_id"][i])
        h, w = int(batch["height"][i]), int(batch["width"][i])
        if h <= 0 or w <= 0:  # prepare refuses these (size_invalid); shards from elsewhere may not
            raise ValueError(
                f"image {image_id}: height {h} x width {w} is not an image size; prepare the shards again "
                "(`ray-retina prepare` skips and counts such records as size_invalid)"
            )
        boxes = xywh_to_xyxy(_as_array(batch["bbox"][i], np.float32).reshape(-1, 4))
        crowd = _as_array(batch["iscrowd"][i], np.int64).reshape(-1).astype(bool)
        if train:
            draws = draw_augment(
                image_rng(seed, image_id, epoch),
                lo,
                hi,
                hflip_prob,
                h,
                w,
                boxes,
                crowd,
                crop,
                zoom_out,
                photometric,
            )
        else:
            draws = Draws(size=lo)
        layout = plan_layout(h, w, draws.size, max_size, draws.window, draws.zoom)
        try:
            im = render(_as_bytes(batch["image"][i]), h, w, layout, draws.window, draws.colour)
        except Exception as e:  # corrupt, truncated, empty, unsupported: drop the row, keep training
            skipped.append(image_id)
            warn_skip(image_id, e)
            continue
        labels = map_labels(_as_array(batch["category_id"][i], np.int64).reshape(-1), cat_to_label, image_id)
        if draws.window is not None:
            boxes, keep = crop_boxes(boxes, draws.window, float(crop["min_visible"]))
            labels, crowd = labels[keep], crowd[keep]
        boxes = move_boxes(boxes, layout, draws.flip)

        out["image"].append(np.asarray(im))
        flips.append(draws.flip)
        canvases.append(None if draws.zoom is None else (*layout.canvas, layout.top, layout.left, fill))
        out["image_size"].append(np.array(layout.canvas, dtype=np.int64))
        out["orig_size"].append(np.array([h, w], dtype=np.int64))
        out["scale"].append(np.float32(layout.scale))
        out["image_id"].append(image_id)
        out["gt_boxes"].append(boxes.astype(np.float32, copy=False))
        out["gt_labels"].append(labels)
        out["gt_crowd"].append(crowd)

    if skipped:
        count_skipped(skipped, skip_counter)
    n = len(out["image_id"])
    return {
        "image": _pack_images(out["image"], flips, canvases),
        "image_size": np.array(out["image_size"], dtype=np.int64).reshape(n, 2),
        "orig_size": np.array(out["orig_size"], dtype=np.int64).reshape(n, 2),
        "scale": np.array(out["scale"], dtype=np.float32),
        "image_id": np.array(out["image_id"], dtype=np.int64),
        "gt_boxes": object_array(out["gt_boxes"]),
        "gt_labels": object_array(out["gt_labels"]),
        "gt_crowd": object_array(out["gt_crowd"]),
    }


# ----------------------------------------------------------------------------- the steps of one image


@dataclass(frozen=True)
class Draws:
    """What the random draws decided for one image (evaluation: ``Draws(size=S)``, nothing else).

    ``size``: S, the shorter side asked for; ``flip``: horizontal flip; ``window``: crop (x0, y0, x1, y1) in
    whole original pixels or None; ``zoom``: (ratio, fx, fy) of :func:`_draw_zoom` or None; ``colour``:
    (brightness, contrast, saturation, hue) of :func:`_draw_photometric` or None.
    """

    size: int
    flip: bool = False
    window: tuple[int, int, int, int] | None = None
    zoom: tuple[float, float, float] | None = None
    colour: tuple[float, float, float, float] | None = None


def image_rng(seed: int | None, image_id: int, epoch: int | None) -> np.random.Generator:
    """The generator of one image's draws: a function of ``(seed, image_id, epoch)`` only (fresh entropy
    when ``seed`` is None), so the draws do not depend on how Ray batches or orders rows."""
    return np.random.default_rng(
        None if seed is None else [image_id & 0xFFFFFFFFFFFF, int(epoch or 0), seed & 0xFFFFFFFF]
    )


def draw_augment(
    rng: np.random.Generator,
    lo: int,
    hi: int,
    hflip_prob: float,
    h: int,
    w: int,
    boxes: np.ndarray,
    crowd: np.ndarray,
    crop: Mapping[str, Any] | None,
    zoom_out: Mapping[str, Any] | None,
    photometric: Mapping[str, Any] | None,
) -> Draws:
    """A training image's draws, in this order: S uniform in the integers [lo, hi], the flip, then each
    enabled op's ``prob`` draw and parameters (crop, zoom-out, photometric; :func:`augment_batch`).
    An op that is off (None) draws nothing, so turning it off leaves the other draws as they were."""
    size = int(rng.integers(lo, hi + 1))
    flip = bool(rng.random() < hflip_prob)
    window = zoom = colour = None
    if crop and rng.random() < crop["prob"]:
        window = _draw_crop(rng, h, w, boxes, crowd, float(crop["min_scale"]), float(crop["min_visible"]))
    if zoom_out and rng.random() < zoom_out["prob"]:
        zoom = _draw_zoom(rng, float(zoom_out["max_ratio"]))
    if photometric and rng.random() < photometric["prob"]:
        colour = _draw_photometric(rng, photometric)
    return Draws(size, flip, window, zoom, colour)


@dataclass(frozen=True)
class Layout:
    """Where the shown region of an image goes in the output, all in whole pixels.

    ``region`` (x0, y0, rw, rh): the part of the original shown (the crop window, else the whole image);
    ``scale``: the nominal factor S / shorter side (capped by ``max_size``); ``new`` (new_h, new_w): the
    region's output size; ``canvas`` (canvas_h, canvas_w): the output image (= ``new`` without zoom-out);
    ``top``, ``left``: the region's offset on the canvas; ``zoomed``: whether there is a canvas (zoom-out).
    """

    region: tuple[int, int, int, int]
    scale: float
    new: tuple[int, int]
    canvas: tuple[int, int]
    top: int = 0
    left: int = 0
    zoomed: bool = False


def plan_layout(
    h: int,
    w: int,
    size: int,
    max_size: int,
    window: tuple[int, int, int, int] | None = None,
    zoom: tuple[float, float, float] | None = None,
) -> Layout:
    """The :class:`Layout` of an (h, w) image resized to shorter side ``size`` (longer <= ``max_size``),
    of its crop ``window`` when given, placed on a zoom-out canvas when ``zoom`` = (ratio, fx, fy) is."""
    x0, y0, rw, rh = (
        (0, 0, w, h) if window is None else (*window[:2], window[2] - window[0], window[3] - window[1])
    )
    if zoom is None:
        scale = min(size / min(rh, rw), max_size / max(rh, rw))
        new_h, new_w = max(1, int(rh * scale + 0.5)), max(1, int(rw * scale + 0.5))
        return Layout((x0, y0, rw, rh), scale, (new_h, new_w), (new_h, new_w))
    ratio, fx, fy = zoom
    scale = min(size / (ratio * min(rh, rw)), max_size / (ratio * max(rh, rw)))
    canvas_h, canvas_w = max(1, int(ratio * rh * scale + 0.5)), max(1, int(ratio * rw * scale + 0.5))
    new_h = min(canvas_h, max(1, int(rh * scale + 0.5)))
    new_w = min(canvas_w, max(1, int(rw * scale + 0.5)))
    top = min(canvas_h - new_h, int(fy * (canvas_h - new_h + 1)))
    left = min(canvas_w - new_w, int(fx * (canvas_w - new_w + 1)))
    return Layout((x0, y0, rw, rh), scale, (new_h, new_w), (canvas_h, canvas_w), top, left, zoomed=True)


def render(
    data: bytes,
    h: int,
    w: int,
    layout: Layout,
    window: tuple[int, int, int, int] | None = None,
    colour: tuple[float, float, float, float] | None = None,
) -> Image.Image:
    """Decode an (h, w) image and make its shown region at ``layout.new`` pixels, colour-jittered by
    ``colour`` when given (not flipped, not on the canvas: :func:`_pack_images` does both).

    Decoded at a reduced JPEG scale when the region still comes out at its size; resized once, straight
    from the decoded pixels. Raises what :func:`~ray_retina.data.decode.decode_image` raises.
    """
    x0, y0, rw, rh = layout.region
    new_h, new_w = layout.new
    # the full image must decode at least this large for the region to come out at (new_h, new_w)
    need = (min(h, -(-new_h * h // rh)), min(w, -(-new_w * w // rw)))
    pixels = decode_image(data, min_size=need)
    im = Image.fromarray(pixels)
    # the window in decoded pixels (maybe DCT-reduced): resized straight from the decoded image
    fh, fw = pixels.shape[0] / h, pixels.shape[1] / w
    box = None if window is None else (x0 * fw, y0 * fh, (x0 + rw) * fw, (y0 + rh) * fh)
    if colour is not None and (fh, fw) == (1, 1) and rh * rw < new_h * new_w:
        # Upscaling: the colour matrix on the shown region before the resize touches fewer pixels
        # (COCO's 640 x 480 at S = 800: 2.8x fewer); it is affine, so it commutes with the bilinear
        # resize up to rounding and clipping.
        if window is not None:
            im, box = im.crop(window), None
        im, colour = _photometric_pil(im, *colour), None
    if box is not None:
        im = im.resize((new_w, new_h), Image.BILINEAR, box=box)
    elif im.size != (new_w, new_h):
        im = im.resize((new_w, new_h), Image.BILINEAR)
    if colour is not None:
        im = _photometric_pil(im, *colour)
    return im


def map_labels(cats: np.ndarray, cat_to_label: Mapping[int, int], image_id: int) -> np.ndarray:
    """Original category ids (n,) -> contiguous labels (n,) int64; ``ValueError`` naming the image for an id
    outside ``cat_to_label``."""
    try:
        return np.array([cat_to_label[int(c)] for c in cats], dtype=np.int64)
    except KeyError as e:
        raise ValueError(
            f"image {image_id}: category id {e.args[0]} not in cat_ids {sorted(cat_to_label)}"
        ) from None


def move_boxes(boxes: np.ndarray, layout: Layout, flip: bool) -> np.ndarray:
    """XYXY boxes (n, 4) float32 in original pixels (already clipped to the crop window) -> output pixels:
    shifted to the region, scaled by its exact per-axis factors, offset on the zoom-out canvas, mirrored
    on the canvas when ``flip``. A new array; float32."""
    x0, y0, rw, rh = layout.region
    new_h, new_w = layout.new
    if (x0, y0) != (0, 0):
        boxes = boxes - np.array([x0, y0, x0, y0], dtype=np.float32)
    boxes = boxes * np.array([new_w / rw, new_h / rh, new_w / rw, new_h / rh], dtype=np.float32)
    if layout.zoomed:
        boxes += np.array([layout.left, layout.top, layout.left, layout.top], dtype=np.float32)
    if flip:
        canvas_w = layout.canvas[1]
        boxes = np.stack([canvas_w - boxes[:, 2], boxes[:, 1], canvas_w - boxes[:, 0], boxes[:, 3]], axis=1)
    return boxes


class _BufferPool:
    """A few reusable uint8 buffers for the packed images of a batch.

    Fresh memory for every batch costs a page fault per 4 KiB on first write: in a Ray Data decode task
    that made the packing copy about 40 % as expensive as the resize itself. A buffer is handed out again
    only when nothing but the pool refers to it any more (every view of it, the Arrow array Ray built on
    it, the block it went into: all gone, the data having been copied into the object store), which the
    reference count tells exactly in CPython; otherwise a new one is made. Memory held: at most
    ``max_buffers`` buffers of the largest batch seen (a 16-image row group at 1333 x 800: ~51 MB each).
    """

    def __init__(self, max_buffers: int = 4) -> None:
        self.max_buffers = max_buffers
        self.buffers: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        """A writable uint8 array of ``nbytes`` (a view of a pooled buffer, or a new array)."""
        with self._lock:
            free = None
            for i in range(len(self.buffers)):
                b = self.buffers[i]
                # the list's reference, `b` and getrefcount's argument: nobody else holds it
                if sys.getrefcount(b) > 3:
                    continue
                if b.size >= nbytes:
                    return b[:nbytes]
                free = i
            buf = np.empty(nbytes, dtype=np.uint8)
            if free is not None:  # a free buffer too small for this batch: replace it
                self.buffers[free] = buf
            elif len(self.buffers) < self.max_buffers:
                self.buffers.append(buf)
            return buf[:nbytes]


_PIXEL_BUFFERS = _BufferPool()


def _pack_images(
    images: list[np.ndarray],
    flips: list[bool],
    canvases: Sequence[tuple[int, int, int, int, np.ndarray] | None] | None = None,
) -> np.ndarray:
    """Copy the batch's (h, w, 3) images, flipped where asked, one after another into one buffer.

    Returns the object array of (h, w, 3) views into that buffer. Ray Data turns a column of contiguous
    views of one buffer into its variable-shaped tensor column without copying (it checks for exactly
    this layout), where separate arrays cost a concatenation of every pixel per batch: with images of
    ~2 MB that second copy into fresh memory was a large part of a decode task's time. The horizontal
    flip happens in the same copy (a reversed view), instead of one more image-sized pass in Pillow.

    ``canvases`` (zoom-out): per image None, or ``(canvas_h, canvas_w, top, left, fill)``: the view is the
    canvas, its border written with ``fill`` (3 uint8) and the image copied in at (top, left) (mirrored
    to ``canvas_w - left - w`` when flipped: the flip of the whole canvas), so no canvas is made apart.
    """
    canvases = canvases or [None] * len(images)
    shapes = [x.shape if c is None else (c[0], c[1], 3) for x, c in zip(images, canvases, strict=True)]
    sizes = [math.prod(s) for s in shapes]
    flat = _PIXEL_BUFFERS.take(sum(sizes))
    views, offset = [], 0
    for x, shape, n, flip, canvas in zip(images, shapes, sizes, flips, canvases, strict=True):
        dst = flat[offset : offset + n].reshape(shape)
        if canvas is None:
            np.copyto(dst, x[:, ::-1] if flip else x)
        else:
            _, canvas_w, top, left, fill = canvas
            h, w = x.shape[:2]
            if flip:
                left = canvas_w - left - w
            dst[:top] = fill
            dst[top + h :] = fill
            dst[top : top + h, :left] = fill
            dst[top : top + h, left + w :] = fill
            np.copyto(dst[top : top + h, left : left + w], x[:, ::-1] if flip else x)
        views.append(dst)
        offset += n
    return object_array(views)


# ----------------------------------------------------------------------------- training augmentation


def crop_boxes(
    boxes: np.ndarray, window: Sequence[float], min_visible: float
) -> tuple[np.ndarray, np.ndarray]:
    """Clip XYXY ``boxes`` (n, 4) to ``window`` = (x0, y0, x1, y1), same pixels; which to keep.

    Returns the clipped boxes of those kept (still in the boxes' pixels, not shifted to the window) and the
    keep mask (n,) bool: visible fraction (clipped area / own area) >= ``min_visible``. A zero-area box has
    fraction 1 when it lies inside the window (edges included), else 0.
    """
    b = boxes.astype(np.float64).reshape(-1, 4)
    x0, y0, x1, y1 = (float(v) for v in window)
    c = np.stack(
        [b[:, 0].clip(x0, x1), b[:, 1].clip(y0, y1), b[:, 2].clip(x0, x1), b[:, 3].clip(y0, y1)], axis=1
    )
    visible = np.maximum(c[:, 2] - c[:, 0], 0) * np.maximum(c[:, 3] - c[:, 1], 0)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    inside = (c == b).all(axis=1)
    fraction = np.where(area > 0, visible / np.where(area > 0, area, 1.0), inside.astype(np.float64))
    keep = fraction >= min_visible
    return c[keep].astype(np.float32), keep


def _draw_crop(
    rng: np.random.Generator,
    h: int,
    w: int,
    boxes: np.ndarray,
    crowd: np.ndarray,
    min_scale: float,
    min_visible: float,
) -> tuple[int, int, int, int] | None:
    """A crop window (x0, y0, x1, y1) in whole original pixels, or None (no window kept a box)."""
    must = ~crowd if (~crowd).any() else np.ones(len(boxes), dtype=bool)  # the boxes one of which must stay
    for _ in range(MAX_CROP_TRIALS):
        u, v = rng.uniform(min_scale, 1.0, size=2)
        cw, ch = max(1, int(w * u + 0.5)), max(1, int(h * v + 0.5))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        window = (x0, y0, x0 + cw, y0 + ch)
        if not len(boxes) or crop_boxes(boxes, window, min_visible)[1][must].any():
            return window
    return None


def _draw_zoom(rng: np.random.Generator, max_ratio: float) -> tuple[float, float, float]:
    """(ratio, fx, fy): the canvas / image side ratio in [1, max_ratio], the offset's fractions of the room."""
    return float(rng.uniform(1.0, max_ratio)), float(rng.random()), float(rng.random())


def _draw_photometric(rng: np.random.Generator, p: Mapping[str, float]) -> tuple[float, float, float, float]:
    """(brightness, contrast, saturation, hue) factors: 1 +- strength (not below 0), hue in +-hue turns."""
    factors = [
        float(rng.uniform(max(0.0, 1.0 - float(p[k])), 1.0 + float(p[k])))
        for k in ("brightness", "contrast", "saturation")
    ]
    return (*factors, float(rng.uniform(-float(p["hue"]), float(p["hue"]))))  # type: ignore[return-value]


def color_matrix(
    brightness: float, contrast: float, saturation: float, hue: float, mean_luma: float
) -> tuple[np.ndarray, np.ndarray]:
    """(M (3, 3), t (3,)) with ``out = M @ rgb + t``: the four jitters of :func:`photometric` as one map.

    brightness b: ``b x``; contrast c: ``c x + (1 - c) mean_luma`` (``mean_luma``: the image's mean grey);
    saturation s: ``s x + (1 - s) luma(x)``; hue h: a rotation by ``-2 pi h`` of the chroma plane (I, Q)
    of YIQ. Each keeps grey grey and all but brightness keep the mean luma, so the four commute (before
    clipping) and their product needs no order.
    """
    w = np.array(LUMA, dtype=np.float64)
    sat = saturation * np.eye(3) + (1.0 - saturation) * np.outer(np.ones(3), w)
    th = -2.0 * math.pi * hue  # positive hue turns red towards yellow, as the HSV hue shift
    rot = np.array([[1.0, 0.0, 0.0], [0.0, math.cos(th), -math.sin(th)], [0.0, math.sin(th), math.cos(th)]])
    m = brightness * contrast * (_YIQ_INV @ rot @ _YIQ) @ sat
    t = np.full(3, (1.0 - contrast) * brightness * mean_luma)
    return m, t


def photometric(
    image: np.ndarray,
    *,
    brightness: float = 1.0,
    contrast: float = 1.0,
    saturation: float = 1.0,
    hue: float = 0.0,
) -> np.ndarray:
    """Colour jitter of a uint8 RGB (h, w, 3) image by the given factors; a new uint8 array.

    ``brightness`` / ``contrast`` / ``saturation``: factors (1: unchanged; 0: black / mean grey / grey), as
    torchvision's ``adjust_*`` and PIL's ``ImageEnhance``; ``hue`` in turns in [-0.5, 0.5] (a rotation of the
    YIQ chroma plane that keeps luma, close to torchvision's HSV shift but linear). All four are linear in
    RGB and commute, so they run as one 3 x 4 colour matrix (:func:`color_matrix`) in one Pillow pass
    (``Image.convert("RGB", matrix)``: rounded, clipped to [0, 255] once at the end); the contrast's mean
    luma comes from Pillow's histogram. torchvision clips after each op and truncates: within a level or
    two of these while nothing saturates. On an (800, 1067) image, one thread: ~6 ms against ~150 ms for
    torchvision v2's four ``adjust_*`` (its HSV hue alone ~125 ms; benchmarks/README.md).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (h, w, 3), got {image.dtype} {image.shape}")
    if not -0.5 <= hue <= 0.5 or min(brightness, contrast, saturation) < 0:
        raise ValueError(
            f"factors must be >= 0 and hue in [-0.5, 0.5], got {brightness, contrast, saturation, hue}"
        )
    return np.asarray(_photometric_pil(Image.fromarray(image), brightness, contrast, saturation, hue))


def _photometric_pil(
    im: Image.Image, brightness: float, contrast: float, saturation: float, hue: float
) -> Image.Image:
    mean_luma = float(np.dot(LUMA, ImageStat.Stat(im).mean)) if contrast != 1.0 else 0.0
    m, t = color_matrix(brightness, contrast, saturation, hue, mean_luma)
    return im.convert("RGB", tuple(float(v) for v in np.concatenate([m, t[:, None]], axis=1).ravel()))


def _enabled(p: Mapping[str, Any] | None, name: str) -> Mapping[str, Any] | None:
    """The mapping when the op is on (prob > 0), else None."""
    if p is None:
        return None
    if not isinstance(p, Mapping) or "prob" not in p:
        raise ValueError(f"{name} must be a mapping with a 'prob' (or None), got {p!r}")
    if not 0.0 <= float(p["prob"]) <= 1.0:
        raise ValueError(f"{name}.prob must be in [0, 1], got {p['prob']}")
    return p if float(p["prob"]) > 0 else None


def _check_augment(
    photometric: Mapping[str, Any] | None, crop: Mapping[str, Any] | None, zoom_out: Mapping[str, Any] | None
) -> None:
    """ValueError for parameters the ops cannot use (the config validates the same, for a clear key)."""
    if photometric:
        for k in ("brightness", "contrast", "saturation", "hue"):
            if float(photometric.get(k, -1)) < 0:
                raise ValueError(f"photometric.{k} must be given and >= 0, got {photometric.get(k)!r}")
        if float(photometric["hue"]) > 0.5:
            raise ValueError(f"photometric.hue must be <= 0.5 (turns), got {photometric['hue']}")
    if crop and not (0 < float(crop.get("min_scale", 0)) <= 1 and 0 < float(crop.get("min_visible", 0)) <= 1):
        raise ValueError(f"crop needs min_scale and min_visible in (0, 1], got {dict(crop)}")
    if zoom_out:
        if float(zoom_out.get("max_ratio", 0)) < 1:
            raise ValueError(f"zoom_out.max_ratio must be >= 1, got {zoom_out.get('max_ratio')!r}")
        fill = zoom_out.get("fill")
        if fill is not None and (len(fill) != 3 or not all(0 <= int(v) <= 255 for v in fill)):
            raise ValueError(f"zoom_out.fill must be 3 levels in [0, 255], got {fill!r}")


def _as_bytes(v: Any) -> bytes:
    return v if isinstance(v, bytes) else bytes(v)


def _as_array(v: Any, dtype: type) -> np.ndarray:
    """A per-row list cell (numpy array, object array of arrays, list) -> a numeric array."""
    if isinstance(v, np.ndarray) and v.dtype != object:
        return v.astype(dtype, copy=False)
    items = list(v) if v is not None else []
    return np.array([np.asarray(x, dtype=dtype) for x in items], dtype=dtype) if items else np.zeros(0, dtype)


def object_array(items: list[np.ndarray]) -> np.ndarray:
    """1-D object array of arrays: Ray Data stores it as a (variable-shaped) tensor column."""
    arr = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        arr[i] = x
    return arr


def _ray_data_epoch() -> int:
    """Ray Data's execution index (one per pass over a data set) inside a data task; 0 elsewhere."""
    from ray_retina._ray_private import ray_data_execution_index  # deferred: augment imports no Ray module

    return ray_data_execution_index()
