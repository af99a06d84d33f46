from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torchvision
from torchvision.models.detection import RetinaNet as TVRetinaNet
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

from ray_retina.model import HeadOutputs, PostProcessor
from ray_retina.model.anchors import AnchorGenerator
from ray_retina.model.postprocess import batched_nms


@pytest.mark.parametrize("method", ["pairs", "offsets"])
@pytest.mark.parametrize("seed", range(4))
def test_batched_nms_equals_torchvision(method, seed):
    g = torch.Generator().manual_seed(seed)
    m = 1500
    xy = (torch.rand(m, 2, generator=g) * 300).round()
    boxes = torch.cat([xy, xy + (4 + torch.rand(m, 2, generator=g) * 80).round()], 1)
    scores = (torch.rand(m, generator=g) * 50).round() / 50  # many ties
    groups = torch.randint(0, 9, (m,), generator=g)
    ref = torchvision.ops.batched_nms(boxes, scores, groups, 0.5)
    got = batched_nms(boxes, scores, groups, 0.5, method=method)
    assert torch.equal(torch.sort(got).values, torch.sort(ref).values)
    assert (scores[got][:-1] >= scores[got][1:]).all()  # decreasing score


def test_batched_nms_empty_and_bad_method():
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).numel() == 0
    with pytest.raises(ValueError):
        batched_nms(torch.zeros(1, 4), torch.zeros(1), torch.zeros(1, dtype=torch.int64), 0.5, method="x")


@pytest.mark.parametrize("topk", [1000, 30])
def test_postprocess_equals_torchvision(topk):
    b, s, k = 3, 256, 6
    anchors, per_level = AnchorGenerator()(
        [torch.zeros(1, 1, s // st, s // st) for st in (8, 16, 32, 64, 128)]
    )
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(b, anchors.shape[0], k, generator=g) * 1.5 - 5.0
    deltas = torch.randn(b, anchors.shape[0], 4, generator=g) * 0.5
    sizes = [(256, 256), (200, 150), (256, 100)]
    got = PostProcessor(topk_candidates=topk, detections_per_img=100)(
        HeadOutputs(logits, deltas, anchors, per_level), torch.tensor(sizes)
    )
    tv_self = SimpleNamespace(
        score_thresh=0.05,
        topk_candidates=topk,
        nms_thresh=0.5,
        detections_per_img=100,
        box_coder=TVBoxCoder(weights=(1.0, 1.0, 1.0, 1.0)),
    )
    head = {
        "cls_logits": list(logits.split(per_level, 1)),
        "bbox_regression": list(deltas.split(per_level, 1)),
    }
    ref = TVRetinaNet.postprocess_detections(tv_self, head, [list(anchors.split(per_level))] * b, sizes)
    for d, r in zip(got, ref, strict=True):
        assert len(d["scores"]) == len(r["scores"]) > 10
        assert torch.equal(d["labels"], r["labels"])
        torch.testing.assert_close(d["scores"], r["scores"], rtol=0, atol=1e-6)
        torch.testing.assert_close(d["boxes"], r["boxes"], rtol=0, atol=1e-3)
