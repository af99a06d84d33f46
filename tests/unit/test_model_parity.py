"""Parity with torchvision's RetinaNet: same weights, same normalised input, same numbers.

torchvision's ``retinanet_resnet50_fpn`` (v1) differs from the paper in four places, each a config option
of ours: P6 from P5, per-image loss normalisation, L1 box loss, 300 detections. Its anchors are integer
sized and rounded; ``load_torchvision_retinanet`` switches ours to them. Built with ``weights=None`` it
uses trainable BatchNorm; we put those BN layers in eval mode, which is what FrozenBatchNorm computes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.detection import retinanet_resnet50_fpn
from torchvision.models.detection.image_list import ImageList

from ray_retina.config import Config, apply_overrides
from ray_retina.model import build_criterion, build_model, build_postprocessor, load_torchvision_retinanet

NUM_CLASSES = 12
SIZE = 256

TV_COMPAT = {
    "model.backbone": "resnet50",
    "model.p6_from": "p5",
    "model.pixel_mean": [0.0, 0.0, 0.0],
    "model.pixel_std": [1.0, 1.0, 1.0],
    "loss.box_loss": "l1",
    "loss.normalizer": "per_image",
    "postprocess.detections_per_img": 300,
}


class _NoTransform(nn.Module):
    """Stands in for GeneralizedRCNNTransform: the input is already normalised and of a fixed size."""

    def forward(self, images, targets=None):
        x = torch.stack(list(images))
        return ImageList(x, [tuple(i.shape[-2:]) for i in images]), targets

    def postprocess(self, result, image_shapes, original_image_sizes):
        return result


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    # Spread the classifier biases so that a fair number of random-weight scores pass the 0.05 threshold.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        bias = tv.head.classification_head.cls_logits.bias
        bias.copy_(torch.randn(bias.shape, generator=g) - 2.5)
    tv.transform = _NoTransform()
    cfg = apply_overrides(Config(), TV_COMPAT)
    ours = build_model(cfg, NUM_CLASSES)
    load_torchvision_retinanet(ours, tv.state_dict())
    return cfg, tv, ours


def _bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def _targets(seed: int, counts: list[int]):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(len(counts), 3, SIZE, SIZE, generator=g)
    gmax = max(counts + [1])
    gt_boxes = torch.zeros(len(counts), gmax, 4)
    gt_labels = torch.full((len(counts), gmax), -1, dtype=torch.int64)
    tv_targets = []
    for i, n in enumerate(counts):
        xy = torch.rand(n, 2, generator=g) * (SIZE - 40)
        wh = 8 + torch.rand(n, 2, generator=g) * 120
        boxes = torch.cat([xy, (xy + wh).clamp(max=SIZE)], 1)
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        gt_boxes[i, :n] = boxes
        gt_labels[i, :n] = labels
        tv_targets.append({"boxes": boxes, "labels": labels})
    return images, gt_boxes, gt_labels, tv_targets


@pytest.mark.slow
@pytest.mark.parametrize("counts", [[80], [3, 0]], ids=["b1-many-boxes", "b2-with-empty-image"])
def test_losses_equal_torchvision(pair, counts):
    cfg, tv, ours = pair
    images, gt_boxes, gt_labels, tv_targets = _targets(len(counts), counts)
    tv.train()
    _bn_eval(tv)
    ours.train()
    crit = build_criterion(cfg, NUM_CLASSES)
    with torch.no_grad():
        ref = tv(list(images), tv_targets)
        out = ours(images)
        got = crit(out, gt_boxes, gt_labels)
    assert got["num_fg"] > 0
    torch.testing.assert_close(got["loss_cls"], ref["classification"], rtol=1e-4, atol=0)
    torch.testing.assert_close(got["loss_box"], ref["bbox_regression"], rtol=1e-4, atol=0)


@pytest.mark.slow
def test_detections_equal_torchvision(pair):
    cfg, tv, ours = pair
    images = _targets(5, [0, 0])[0]
    tv.eval()
    ours.eval()
    post = build_postprocessor(cfg)
    with torch.no_grad():
        ref = tv(list(images))
        got = post(ours(images), torch.tensor([[SIZE, SIZE]] * 2))
    for r, d in zip(ref, got, strict=True):
        assert len(r["scores"]) > 50
        assert len(d["scores"]) == len(r["scores"])
        # same detections, compared in a canonical order (score, then label)
        ko = torch.argsort(d["scores"] * 1000 + d["labels"], descending=True)
        kr = torch.argsort(r["scores"] * 1000 + r["labels"], descending=True)
        assert torch.equal(d["labels"][ko], r["labels"][kr])
        torch.testing.assert_close(d["scores"][ko], r["scores"][kr], rtol=0, atol=1e-5)
        torch.testing.assert_close(d["boxes"][ko], r["boxes"][kr], rtol=0, atol=1e-3)
