from __future__ import annotations

import pytest
import torch
from torchvision.models.detection._utils import Matcher as TVMatcher
from torchvision.ops import box_iou

from ray_retina.model.matcher import Matcher, pairwise_iou

ANCHORS = torch.tensor(
    [[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 20.0, 20.0], [30.0, 30.0, 40.0, 40.0]]
)
GT = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 10.0], [30.0, 30.0, 45.0, 45.0]])
# IoU (anchors x GT), computed by hand:
IOU = torch.tensor([[1.0, 0.5, 0.0], [1 / 3, 0.5, 0.0], [0.25, 0.5, 0.0], [0.0, 0.0, 100 / 225]])


def test_iou_3x4_by_hand():
    torch.testing.assert_close(pairwise_iou(ANCHORS, GT[None])[0], IOU.T)  # (B, G, R) layout


def test_matches_3x4_by_hand():
    valid = torch.ones(1, 3, dtype=torch.bool)
    idx, labels = Matcher(allow_low_quality_matches=False)(ANCHORS, GT[None], valid)
    assert idx.tolist() == [[0, 1, 1, 2]]
    assert labels.tolist() == [[1, 1, 1, -1]]  # 4/9 is between 0.4 and 0.5: ignored
    idx, labels = Matcher(allow_low_quality_matches=True)(ANCHORS, GT[None], valid)
    assert idx.tolist() == [[0, 1, 1, 2]]
    assert labels.tolist() == [[1, 1, 1, 1]]  # anchor 3 is GT 2's best anchor


def test_padding_and_crowd():
    gt = torch.stack([GT, torch.zeros(3, 4)])  # image 1: all padding
    valid = torch.tensor([[True, True, True], [False, False, False]])
    crowd = torch.tensor([[False, False, True], [False, False, False]])
    idx, labels = Matcher()(ANCHORS, gt, valid, crowd)
    # GT 2 is a crowd box: anchor 3 (IoU 4/9 >= 0.4 with it) is ignored, not foreground
    assert labels[0].tolist() == [1, 1, 1, -1]
    assert labels[1].tolist() == [0, 0, 0, 0]


def test_degenerate_gt_adds_no_low_quality_matches():
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 100.0, 120.0], [500.0, 500.0, 510.0, 510.0]]])
    idx, labels = Matcher()(ANCHORS, gt, torch.ones(1, 3, dtype=torch.bool))
    assert labels.tolist() == [[1, 0, 0, 0]]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("low_quality", [True, False])
def test_equals_torchvision_matcher_batched_and_chunked(seed, low_quality):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(300, 2, generator=g) * 200
    anchors = torch.cat([xy, xy + 8 + torch.rand(300, 2, generator=g) * 60], 1).round()  # rounding makes ties
    b, gmax = 3, 40
    counts = [gmax, 7, 0]
    gt = torch.zeros(b, gmax, 4)
    valid = torch.zeros(b, gmax, dtype=torch.bool)
    for i, n in enumerate(counts):
        bxy = torch.rand(n, 2, generator=g) * 200
        gt[i, :n] = torch.cat([bxy, bxy + 4 + torch.rand(n, 2, generator=g) * 60], 1).round()
        valid[i, :n] = True
    tv = TVMatcher(0.5, 0.4, allow_low_quality_matches=low_quality)
    for chunk in (1 << 22, 300 * 3 * 7):  # one chunk; several GT chunks
        idx, labels = Matcher(allow_low_quality_matches=low_quality, chunk_elems=chunk)(anchors, gt, valid)
        for i, n in enumerate(counts):
            if n == 0:
                assert (labels[i] == 0).all()
                continue
            m = tv(box_iou(gt[i, :n], anchors))
            fg = m >= 0
            assert torch.equal(labels[i] == 1, fg)
            assert torch.equal(labels[i] == -1, m == TVMatcher.BETWEEN_THRESHOLDS)
            assert torch.equal(idx[i][fg], m[fg])


def test_many_gt_memory_is_chunked():
    # 2 images x 20k anchors x 600 GT would be a 96 MB IoU tensor; with a 1M-entry chunk it never exists
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20000, 2, generator=g) * 800
    anchors = torch.cat([xy, xy + 32], 1)
    gxy = torch.rand(2, 600, 2, generator=g) * 800
    gt = torch.cat([gxy, gxy + 24], 2)
    valid = torch.ones(2, 600, dtype=torch.bool)
    a = Matcher(chunk_elems=1 << 20)(anchors, gt, valid)
    b = Matcher(chunk_elems=1 << 30)(anchors, gt, valid)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_thresholds():
    with pytest.raises(ValueError):
        Matcher(fg_iou_thresh=0.3, bg_iou_thresh=0.4)
