from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from ray_retina.model.anchors import AnchorGenerator


def test_anchors_of_a_2x2_grid_by_hand():
    gen = AnchorGenerator(sizes=(8,), scales_per_octave=1, aspect_ratios=(1.0,), strides=(4,))
    anchors, per_level = gen([torch.zeros(1, 1, 2, 2)])
    # centres at (x * 4, y * 4), order y then x
    expected = torch.tensor([[-4, -4, 4, 4], [0, -4, 8, 4], [-4, 0, 4, 8], [0, 0, 8, 8]], dtype=torch.float32)
    torch.testing.assert_close(anchors, expected)
    assert per_level == [4]


def test_nine_anchors_per_location_ratio_major_scale_minor():
    gen = AnchorGenerator(sizes=(32,), scales_per_octave=3, aspect_ratios=(0.5, 1.0, 2.0), strides=(8,))
    anchors, _ = gen([torch.zeros(1, 1, 1, 1)])
    assert anchors.shape == (9, 4)
    r = math.sqrt(0.5)
    s1 = 32 * 2 ** (1 / 3)
    # ratio 0.5 (h / w), scale 2^0: w = 32 / sqrt(.5), h = 32 * sqrt(.5)
    torch.testing.assert_close(anchors[0], torch.tensor([-16 / r, -16 * r, 16 / r, 16 * r]))
    # ratio 0.5, scale 2^(1/3)
    torch.testing.assert_close(anchors[1], torch.tensor([-s1 / 2 / r, -s1 / 2 * r, s1 / 2 / r, s1 / 2 * r]))
    # ratio 1, scale 2^0: a 32 x 32 square; ratio 2, scale 2^(2/3): tall
    torch.testing.assert_close(anchors[3], torch.tensor([-16.0, -16.0, 16.0, 16.0]))
    s2 = 32 * 2 ** (2 / 3)
    torch.testing.assert_close(anchors[8], torch.tensor([-s2 / 2 * r, -s2 / 2 / r, s2 / 2 * r, s2 / 2 / r]))
    areas = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    torch.testing.assert_close(areas[:3], torch.tensor([32.0**2, s1**2, s2**2]))


@pytest.mark.parametrize("hw", [(128, 128), (256, 384)])
def test_torchvision_compat_equals_torchvision_anchor_generator(hw):
    h, w = hw
    ours = AnchorGenerator(torchvision_compat=True)
    sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in [32, 64, 128, 256, 512])
    tv = TVAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    feats = [torch.zeros(1, 1, h // s, w // s) for s in (8, 16, 32, 64, 128)]
    anchors, per_level = ours(feats)
    expected = tv(ImageList(torch.zeros(1, 3, h, w), [(h, w)]), feats)[0]
    torch.testing.assert_close(anchors, expected, rtol=0, atol=0)
    assert sum(per_level) == expected.shape[0]


def test_paper_anchors_are_not_rounded_and_cached():
    gen = AnchorGenerator()
    feats = [torch.zeros(1, 1, 16 // 2**i, 16 // 2**i) for i in range(5)]
    a1, _ = gen(feats)
    a2, _ = gen(feats)
    assert a1 is a2  # cached per feature size
    w = a1[:9, 2] - a1[:9, 0]
    assert not torch.allclose(w, w.round())
    gen.torchvision_compat = True
    a3, _ = gen(feats)
    assert torch.equal(a3[:9], a3[:9].round())


def test_bad_arguments():
    with pytest.raises(ValueError):
        AnchorGenerator(sizes=(32, 64), strides=(8,))
    with pytest.raises(ValueError):
        AnchorGenerator()([torch.zeros(1, 1, 2, 2)])
