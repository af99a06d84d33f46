from __future__ import annotations

import math

import pytest
import torch

from ray_retina.model import (
    HeadOutputs,
    PostProcessor,
    RetinaNet,
    build_criterion,
    build_model,
    build_postprocessor,
)

from _model_utils import boxes_image, small_cfg


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = small_cfg()
    return cfg, build_model(cfg, num_classes=3)


def test_forward_shapes_and_order(tiny):
    cfg, model = tiny
    out = model(torch.rand(2, 3, 128, 256) * 255)
    assert isinstance(out, HeadOutputs)
    per_level = [9 * (128 // s) * (256 // s) for s in (8, 16, 32, 64, 128)]
    assert out.num_anchors_per_level == per_level
    r = sum(per_level)
    assert (
        out.cls_logits.shape == (2, r, 3)
        and out.box_deltas.shape == (2, r, 4)
        and out.anchors.shape == (r, 4)
    )
    # uint8 input is accepted and equals the float input
    x = torch.randint(0, 255, (1, 3, 128, 128), dtype=torch.uint8)
    model.eval()
    torch.testing.assert_close(model(x).cls_logits, model(x.float()).cls_logits)
    model.train()
    with pytest.raises(ValueError):
        model(torch.zeros(1, 1, 128, 128))


@pytest.mark.parametrize("prior", [0.01, 0.1])
def test_prior_init_gives_pi(prior):
    torch.manual_seed(0)
    cfg = small_cfg(**{"model.prior": prior, "model.head_convs": 2})
    model = build_model(cfg, num_classes=5)
    cls = model.head.classification_head
    assert cls.cls_logits.bias.detach().allclose(
        torch.full_like(cls.cls_logits.bias, -math.log((1 - prior) / prior))
    )
    for conv in [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d)]:
        assert abs(conv.weight.std().item() - 0.01) < 0.002
    with torch.no_grad():
        p = torch.sigmoid(model(torch.rand(1, 3, 128, 128) * 255).cls_logits)
    assert abs(p.mean().item() - prior) < 0.1 * prior


def test_no_gt_image_and_batch(tiny):
    cfg, model = tiny
    crit = build_criterion(cfg, num_classes=3)
    images, gt_boxes, gt_labels = boxes_image(2)
    gt_labels[1] = -1  # image 1 has no GT
    out = model(images)
    losses = crit(out, gt_boxes, gt_labels, torch.zeros_like(gt_labels, dtype=torch.bool))
    assert set(losses) == {"loss_cls", "loss_box", "num_fg"}
    assert losses["num_fg"] > 0
    # a batch without any GT: box loss exactly 0, class loss finite and > 0, gradients flow
    empty = crit(out, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.int64), None)
    assert empty["loss_box"].item() == 0.0 and empty["num_fg"].item() == 0
    assert math.isfinite(empty["loss_cls"].item()) and empty["loss_cls"].item() > 0
    (empty["loss_cls"] + empty["loss_box"]).backward()
    assert model.head.classification_head.cls_logits.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_crowd_boxes_are_never_foreground_and_ignore_their_anchors(tiny):
    cfg, model = tiny
    crit = build_criterion(cfg, num_classes=3)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 128, 128) * 255)
    box = torch.tensor([[[16.0, 16.0, 80.0, 80.0]]])
    lab = torch.tensor([[1]])
    cls_labels, _, fg = crit.assign(out.anchors, box, lab, torch.tensor([[True]]))
    assert not fg.any()
    assert (cls_labels == -1).sum() > 0 and ((cls_labels == -1) | (cls_labels == 3)).all()
    losses = crit(out, box, lab, torch.tensor([[True]]))
    assert losses["num_fg"] == 0 and losses["loss_box"] == 0
    cls_labels2, _, fg2 = crit.assign(out.anchors, box, lab, torch.tensor([[False]]))
    assert fg2.sum() > 0
    # the anchors ignored because of the crowd box are exactly those that were fg or ignored for a normal box
    assert torch.equal(cls_labels == -1, cls_labels2 != 3)


def test_nan_logits_raise(tiny):
    cfg, model = tiny
    crit = build_criterion(cfg, num_classes=3)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 128, 128) * 255)
    bad = out.cls_logits.clone()
    bad[0, 5, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="cls_logits"):
        crit(out._replace(cls_logits=bad), torch.zeros(1, 0, 4), torch.zeros(1, 0, dtype=torch.int64))
    bad = out.box_deltas.clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="box_deltas"):
        crit(out._replace(box_deltas=bad), torch.zeros(1, 0, 4), torch.zeros(1, 0, dtype=torch.int64))


def _hand_outputs():
    anchors = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0], [0, 0, 10, 10]]
    )
    logits = torch.full((2, 4, 2), -10.0)
    logits[0, 0, 0] = 2.0  # 0.881, kept
    logits[0, 1, 0] = 1.0  # 0.731, same class, IoU 81/119 with the first: suppressed
    logits[0, 1, 1] = 0.0  # 0.5, other class: kept
    logits[0, 2, 1] = -5.0  # 0.0067 < 0.05: dropped
    logits[1, 2, 0] = 0.5  # 0.622, box clipped to the image
    deltas = torch.zeros(2, 4, 4)
    return HeadOutputs(logits, deltas, anchors, [4])


def test_postprocess_by_hand():
    out = _hand_outputs()
    dets = PostProcessor()(out, torch.tensor([[100, 100], [55, 58]]))
    assert len(dets) == 2
    torch.testing.assert_close(
        dets[0]["boxes"], torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0]])
    )
    torch.testing.assert_close(dets[0]["scores"], torch.sigmoid(torch.tensor([2.0, 0.0])))
    assert dets[0]["labels"].tolist() == [0, 1]
    torch.testing.assert_close(dets[1]["boxes"], torch.tensor([[50.0, 50.0, 58.0, 55.0]]))
    assert dets[1]["labels"].tolist() == [0]
    # at most 1 detection per image; top-1 candidate per level
    one = PostProcessor(detections_per_img=1)(out, torch.tensor([[100, 100], [55, 58]]))
    assert [len(d["scores"]) for d in one] == [1, 1] and one[0]["labels"].tolist() == [0]
    top1 = PostProcessor(topk_candidates=1)(out, torch.tensor([[100, 100], [55, 58]]))
    assert [len(d["scores"]) for d in top1] == [1, 1]
    none = PostProcessor(score_thresh=0.95)(out, torch.tensor([[100, 100], [55, 58]]))
    assert [d["boxes"].shape for d in none] == [(0, 4), (0, 4)]


def test_build_functions_read_the_config():
    cfg = small_cfg(**{"postprocess.detections_per_img": 7, "loss.gamma": 1.5, "loss.normalizer": "ema"})
    pp = build_postprocessor(cfg)
    crit = build_criterion(cfg, 4)
    assert pp.detections_per_img == 7 and crit.gamma == 1.5 and crit.normalizer == "ema"
    assert isinstance(build_model(cfg, 4), RetinaNet)


@pytest.mark.slow
def test_overfits_two_images():
    torch.manual_seed(0)
    cfg = small_cfg(**{"model.head_norm": "gn", "model.head_convs": 2, "model.freeze_at": 0})
    model = build_model(cfg, num_classes=3)
    crit = build_criterion(cfg, num_classes=3)
    images, gt_boxes, gt_labels = boxes_image(2, 128)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    history = []
    for _ in range(20):
        losses = crit(model(images), gt_boxes, gt_labels)
        loss = losses["loss_cls"] + losses["loss_box"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.5 * history[0], history
