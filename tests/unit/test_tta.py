"""Test-time augmentation (engine/tta.py through evaluate.detect): views, the merge before one NMS, and the
flip symmetry it buys, against a reference built from torchvision's batched_nms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms as tv_batched_nms

from ray_retina.config import ConfigError, TTASection, apply_overrides
from ray_retina.data.collate import pad_images
from ray_retina.engine.evaluate import detect, model_inputs
from ray_retina.engine.tta import candidate_postprocessor, unflip, view_batch
from ray_retina.model import build_model, build_postprocessor

from _model_utils import small_cfg

DIV = 32


@pytest.fixture(scope="module")
def setup():
    # prior 0.08 with score_thresh 0.05: an untrained model scores many anchors above the threshold; the top
    # 100 per level and 30 per image give NMS and the cap work while staying fast.
    cfg = small_cfg(
        **{
            "model.prior": 0.08,
            "model.anchor_sizes": [16, 32, 64, 128, 256],
            "postprocess.topk_candidates": 100,
            "postprocess.detections_per_img": 30,
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg, 3).eval()
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (64, 80, 3), dtype=np.uint8),
        rng.integers(0, 256, (72, 64, 3), dtype=np.uint8),
    ]
    for im in images:  # a bright block off-centre, so that the image is not its own mirror
        im[10:40, 5:30] = 250
    return cfg, model, build_postprocessor(cfg), images


def _batch(images: list[np.ndarray], orig: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    padded, sizes = pad_images(images, DIV)
    return {
        "images": torch.from_numpy(padded),
        "image_sizes": torch.from_numpy(sizes),
        "orig_sizes": torch.tensor(orig, dtype=torch.int64),
    }


ORIG = [(128, 160), (144, 128)]  # the test images stand for originals twice their size


def _detect(model, pp, batch, tta=None):
    return detect(model, pp, batch, device=torch.device("cpu"), tta=tta, size_divisibility=DIV)


def _sorted(d: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detections in a canonical order (score, label, box), for comparing sets with tied scores."""
    b, s, lab = d["boxes"].numpy(), d["scores"].numpy(), d["labels"].numpy()
    order = np.lexsort((b[:, 3], b[:, 2], b[:, 1], b[:, 0], lab, -s))
    return b[order], s[order], lab[order]


def test_single_plain_view_equals_detect_without_tta(setup):
    _, model, pp, images = setup
    batch = _batch(images, ORIG)
    plain = _detect(model, pp, batch)
    one_view = _detect(model, pp, batch, TTASection(enabled=True, flip=False, scales=[1.0]))
    assert sum(len(d["scores"]) for d in plain) > 10
    for a, b in zip(plain, one_view, strict=True):
        for k in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_flip_views_merged_before_one_nms_equal_the_reference(setup):
    cfg, model, pp, images = setup
    batch = _batch(images, ORIG)
    got = _detect(model, pp, batch, TTASection(enabled=True, flip=True, scales=[1.0]))

    # Reference, by hand: the post-process's pre-NMS candidates of each image and of its mirror image (as a
    # separate input), the mirror's boxes reflected back, then torchvision's per-class NMS on the union.
    cand = candidate_postprocessor(pp)
    flipped = _batch([np.ascontiguousarray(im[:, ::-1]) for im in images], ORIG)
    with torch.no_grad():
        c0 = cand(
            model(model_inputs(batch["images"], torch.device("cpu"), False)),
            batch["image_sizes"],
            batch["orig_sizes"],
        )
        c1 = cand(
            model(model_inputs(flipped["images"], torch.device("cpu"), False)),
            flipped["image_sizes"],
            flipped["orig_sizes"],
        )
    for i, g in enumerate(got):
        width = float(ORIG[i][1])
        b1 = c1[i]["boxes"]
        mirrored = torch.stack((width - b1[:, 2], b1[:, 1], width - b1[:, 0], b1[:, 3]), dim=1)
        boxes = torch.cat([c0[i]["boxes"], mirrored])
        scores = torch.cat([c0[i]["scores"], c1[i]["scores"]])
        labels = torch.cat([c0[i]["labels"], c1[i]["labels"]])
        keep = tv_batched_nms(boxes.double(), scores.double(), labels, cfg.postprocess.nms_thresh)
        keep = keep[: cfg.postprocess.detections_per_img]
        ref = {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
        assert len(c0[i]["scores"]) > 0 and len(c1[i]["scores"]) > 0
        gb, gs, gl = _sorted(g)
        rb, rs, rl = _sorted(ref)
        np.testing.assert_array_equal(gl, rl)
        np.testing.assert_allclose(gs, rs, rtol=0, atol=0)
        np.testing.assert_allclose(gb, rb, rtol=0, atol=1e-4)


def test_tta_detections_are_mirror_symmetric_plain_ones_are_not(setup):
    # With the flip view, an image and its mirror image have the same views: their detections are mirrors
    # of each other. Without TTA an untrained network is not symmetric, so this fails. (At scale 1 the
    # views are bit-identical; a resized view of a mirror image is the mirror of the resized view only up
    # to float rounding, which view_batch's test covers.)
    _, model, pp, images = setup
    batch = _batch(images, ORIG)
    mirror = _batch([np.ascontiguousarray(im[:, ::-1]) for im in images], ORIG)
    tta = TTASection(enabled=True, flip=True, scales=[1.0])
    for use in (tta, None):
        a, b = _detect(model, pp, batch, use), _detect(model, pp, mirror, use)
        symmetric = True
        for i, (da, db) in enumerate(zip(a, b, strict=True)):
            back = {**db, "boxes": unflip(db["boxes"], float(ORIG[i][1]))}
            (ab, as_, al), (bb, bs, bl) = _sorted(da), _sorted(back)
            same = len(as_) == len(bs) and (al == bl).all() and np.allclose(as_, bs, atol=1e-6)
            symmetric &= bool(same and np.allclose(ab, bb, atol=1e-3))
        assert symmetric == (use is not None)


def test_view_batch_resizes_and_mirrors_each_valid_region():
    images = torch.zeros((2, 3, 64, 64), dtype=torch.uint8)
    images[0, :, :40, :50] = torch.arange(50, dtype=torch.uint8)  # a horizontal ramp in the valid region
    images[1, :, :64, :30] = 7
    sizes = torch.tensor([[40, 50], [64, 30]])
    out, new = view_batch(images, sizes, 1.0, True, 32)
    assert out.shape == images.shape and torch.equal(new, sizes)
    assert torch.equal(
        out[0, 0, 0, :50], torch.arange(49, -1, -1, dtype=torch.uint8)
    )  # mirrored in its width
    assert (out[0, :, :, 50:] == 0).all() and (out[1, :, :, 30:] == 0).all()  # padding stays right
    out2, new2 = view_batch(images, sizes, 1.5, False, 32)
    assert new2.tolist() == [[60, 75], [96, 45]] and out2.shape[-2:] == (96, 96)
    assert (out2[1, :, :96, :45] == 7).all() and (out2[1, :, :, 45:] == 0).all()


def test_unflip_is_its_own_inverse():
    boxes = torch.tensor([[1.0, 2.0, 11.0, 12.0], [0.0, 0.0, 100.0, 5.0]])
    torch.testing.assert_close(
        unflip(boxes, 100.0), torch.tensor([[89.0, 2.0, 99.0, 12.0], [0.0, 0.0, 100.0, 5.0]])
    )
    torch.testing.assert_close(unflip(unflip(boxes, 100.0), 100.0), boxes)


def test_tta_config_is_validated():
    cfg = apply_overrides(small_cfg(), {"eval.tta.enabled": True, "eval.tta.scales": [0.75, 1.0, 1.25]})
    assert cfg.eval.tta.flip and cfg.eval.tta.scales == [0.75, 1.0, 1.25]
    for bad in ([], [1.0, 1.0], [0.0]):
        with pytest.raises(ConfigError, match=r"eval\.tta\.scales"):
            apply_overrides(small_cfg(), {"eval.tta.scales": bad})


def test_served_and_predicted_detections_follow_the_config_tta(setup):
    # serving.detect_images (predict's actors, the MLflow model, Ray Serve) turns TTA on from eval.tta.
    from ray_retina.serving import detect_images

    cfg, model, pp, images = setup
    cat_ids = np.array([3, 17, 42])
    on = apply_overrides(cfg, {"eval.tta.enabled": True, "data.size_divisibility": DIV})
    off = apply_overrides(cfg, {"data.size_divisibility": DIV})
    batch = {"image": images, "orig_size": ORIG}
    kw = {"device": torch.device("cpu"), "amp_dtype": None, "cat_ids": cat_ids}
    served_on, served_off = (
        detect_images(model, pp, on, batch, **kw),
        detect_images(model, pp, off, batch, **kw),
    )
    ref = _detect(model, pp, _batch(images, ORIG), on.eval.tta)
    for s_on, s_off, r in zip(served_on, served_off, ref, strict=True):
        np.testing.assert_array_equal(s_on["scores"], r["scores"].numpy())
        np.testing.assert_array_equal(s_on["category_ids"], cat_ids[r["labels"].numpy()])
        assert len(s_on["scores"]) != len(s_off["scores"]) or not np.array_equal(
            s_on["scores"], s_off["scores"]
        )
