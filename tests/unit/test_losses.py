from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from ray_retina.losses import (
    box_regression_loss,
    focal_loss_from_labels,
    l1_loss,
    sigmoid_focal_loss,
    smooth_l1_loss,
)


def _data(seed: int, n: int = 64, k: int = 7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, k, generator=g) * 3).to(dtype)
    labels = torch.randint(-1, k + 1, (n,), generator=g)  # -1 ignore, 0..k-1, k background
    return logits, labels


def _dense_reference(logits, labels, alpha, gamma, weights=None):
    k = logits.shape[-1]
    keep = labels != -1
    target = F.one_hot(labels.clamp(min=0), k + 1)[..., :k].to(logits.dtype)
    loss = torchvision.ops.sigmoid_focal_loss(logits, target, alpha=alpha, gamma=gamma, reduction="none").sum(
        -1
    )
    if weights is not None:
        loss = loss * weights
    return loss[keep].sum()


@pytest.mark.parametrize("alpha", [0.25, 0.5, -1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_sigmoid_focal_loss_equals_torchvision(alpha, gamma, dtype, reduction):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(40, 5, generator=g) * 3).to(dtype)
    t = (torch.rand(40, 5, generator=g) < 0.2).to(dtype)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    ours = sigmoid_focal_loss(x1, t, alpha, gamma, reduction)
    ref = torchvision.ops.sigmoid_focal_loss(x2, t, alpha, gamma, reduction)
    torch.testing.assert_close(ours, ref)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("seed", [0, 1])
def test_focal_properties(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 3, generator=g) * 4
    t = (torch.rand(200, 3, generator=g) < 0.3).float()
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    fl = sigmoid_focal_loss(x, t, alpha=-1, gamma=2.0)
    assert (fl <= bce + 1e-7).all()  # focal <= BCE
    p = torch.sigmoid(x)
    p_t = p * t + (1 - p) * (1 - t)
    torch.testing.assert_close(fl, bce * (1 - p_t) ** 2)  # exact modulating factor
    # gamma 0, no alpha: BCE, with the same gradient
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    sigmoid_focal_loss(x1, t, alpha=-1, gamma=0.0, reduction="sum").backward()
    F.binary_cross_entropy_with_logits(x2, t, reduction="sum").backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_bad_arguments():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="reduction"):
        sigmoid_focal_loss(x, x, reduction="avg")
    with pytest.raises(ValueError, match="gamma"):
        sigmoid_focal_loss(x, x, gamma=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        sigmoid_focal_loss(x, x, alpha=1.5)
    with pytest.raises(ValueError, match="shape"):
        sigmoid_focal_loss(x, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="labels"):
        focal_loss_from_labels(x, torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="shape"):
        focal_loss_from_labels(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="reduction"):
        smooth_l1_loss(x, x, 0.1, reduction="x")
    with pytest.raises(ValueError):
        box_regression_loss(x, x, kind="giou")


@pytest.mark.parametrize("alpha", [0.25, 0.75, -1.0])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 2.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_equals_dense_reference(alpha, gamma, seed):
    logits, labels = _data(seed)
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    ours = focal_loss_from_labels(x1, labels, alpha, gamma)
    ref = _dense_reference(x2, labels, alpha, gamma)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    (ours * 3.0).backward()
    (ref * 3.0).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-7)


def test_fused_chunked_batched_weighted_and_low_precision(monkeypatch):
    import ray_retina.losses as losses

    monkeypatch.setattr(losses, "_CHUNK_ELEMS_CPU", 50)  # many chunks, a ragged last one
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 97, 11, generator=g) * 2
    labels = torch.randint(-1, 12, (3, 97), generator=g)
    w = torch.rand(3, 1, generator=g).expand(3, 97)
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    ours = focal_loss_from_labels(x1, labels, 0.25, 2.0, weights=w)
    ref = _dense_reference(x2, labels, 0.25, 2.0, weights=w)
    torch.testing.assert_close(ours, ref)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    # bf16 logits: the math runs in fp32 and the loss is fp32; the gradient comes back in bf16
    xb = logits.bfloat16().requires_grad_()
    lb = focal_loss_from_labels(xb, labels, 0.25, 2.0)
    assert lb.dtype == torch.float32
    torch.testing.assert_close(lb, _dense_reference(logits.bfloat16().float(), labels, 0.25, 2.0))
    lb.backward()
    assert xb.grad.dtype == torch.bfloat16


def test_fused_extremes_and_no_grad():
    logits = torch.tensor([[60.0, -60.0], [-60.0, -60.0], [0.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 2, -1])
    loss = focal_loss_from_labels(logits, labels, 0.25, 2.0)
    assert torch.isfinite(loss) and loss < 1e-6
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[2], torch.zeros(2))  # ignored row
    with torch.no_grad():
        assert focal_loss_from_labels(logits, labels, 0.25, 2.0) == loss.detach()
    # gamma < 1 at q = 0: our analytic gradient is finite where autograd of the dense form is NaN
    x = torch.tensor([[100.0]], requires_grad=True)
    focal_loss_from_labels(x, torch.tensor([0]), 0.25, 0.5).backward()
    assert torch.isfinite(x.grad).all()


def test_box_losses():
    a = torch.tensor([[0.0, 0.05, 1.0, -2.0]])
    z = torch.zeros(1, 4)
    torch.testing.assert_close(
        smooth_l1_loss(a, z, beta=0.1), torch.tensor([[0.0, 0.5 * 0.05**2 / 0.1, 0.95, 1.95]])
    )
    torch.testing.assert_close(l1_loss(a, z), a.abs())
    torch.testing.assert_close(smooth_l1_loss(a, z, beta=0.0), a.abs())
    torch.testing.assert_close(box_regression_loss(a, z, kind="l1"), torch.tensor([3.05]))
    torch.testing.assert_close(
        smooth_l1_loss(a, z, beta=1.0 / 9, reduction="sum"),
        F.smooth_l1_loss(a, z, beta=1.0 / 9, reduction="sum"),
    )


def test_vectorised_softplus_error_is_absolute_and_tiny():
    from ray_retina.losses import _sigmoid_and_softplus

    x = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor([0.0, 1e-6, -1e-6, 88.0, -88.0])])
    p, q, s, t = (torch.empty_like(x) for _ in range(4))
    _sigmoid_and_softplus(x, p, q, s, t, torch.tensor(1.0))
    ref = torch.nn.functional.softplus(x.double())
    torch.testing.assert_close(p, torch.sigmoid(x), rtol=0, atol=0)
    torch.testing.assert_close(q, 1 - torch.sigmoid(x), rtol=0, atol=0)
    err = (s.double() - ref).abs()
    assert float((err - 1e-7 * ref).max()) <= 1.2e-7  # |error| <= ~2^-23 + 1e-7 relative, at any x
    assert bool((s >= 0).all())
