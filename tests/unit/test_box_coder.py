from __future__ import annotations

import math

import torch
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

from ray_retina.model.box_coder import SCALE_CLAMP, BoxCoder


def test_encode_by_hand():
    coder = BoxCoder()
    anchor = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), 10 x 20
    box = torch.tensor([[5.0, 5.0, 25.0, 25.0]])  # centre (15, 15), 20 x 20
    d = coder.encode(box, anchor)
    torch.testing.assert_close(d, torch.tensor([[1.0, 0.25, math.log(2.0), 0.0]]))
    weighted = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).encode(box, anchor)
    torch.testing.assert_close(weighted, torch.tensor([[10.0, 2.5, 5 * math.log(2.0), 0.0]]))


def test_encode_decode_round_trip():
    g = torch.Generator().manual_seed(0)
    anchors = torch.rand(100, 2, generator=g) * 300
    anchors = torch.cat([anchors, anchors + 8 + torch.rand(100, 2, generator=g) * 200], 1)
    boxes = torch.rand(100, 2, generator=g) * 300
    boxes = torch.cat([boxes, boxes + 4 + torch.rand(100, 2, generator=g) * 200], 1)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        coder = BoxCoder(weights=weights)
        torch.testing.assert_close(
            coder.decode(coder.encode(boxes, anchors), anchors), boxes, atol=1e-3, rtol=1e-5
        )


def test_equals_torchvision_box_coder_and_decodes_fp32():
    g = torch.Generator().manual_seed(1)
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [10.0, 20.0, 74.0, 52.0]]).repeat(50, 1)
    deltas = torch.randn(100, 4, generator=g)
    tv = TVBoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    ours = BoxCoder()
    torch.testing.assert_close(
        ours.decode(deltas, anchors), tv.decode_single(deltas, anchors), rtol=0, atol=0
    )
    boxes = ours.decode(deltas, anchors)
    torch.testing.assert_close(ours.encode(boxes, anchors), tv.encode_single(boxes, anchors))
    assert ours.decode(deltas.bfloat16(), anchors).dtype == torch.float32


def test_decode_clamps_scale():
    coder = BoxCoder()
    anchor = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    box = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), anchor)
    assert torch.isfinite(box).all()
    side = box[0, 2] - box[0, 0]
    torch.testing.assert_close(side, torch.tensor(16 * math.exp(SCALE_CLAMP)))  # = 1000 px
