"""optim.accumulate is exact: k micro-batches of b images give the loss and gradients of one batch of k x b
images (frozen BN, GroupNorm heads), on one process and on a real 2-rank gloo process group with DDP."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ray_retina.config import Config, apply_overrides, resolve
from ray_retina.engine.loop import Engine
from ray_retina.model import build_criterion, build_model, build_postprocessor

# fp32: the two sides sum the same terms in another order (per micro-batch, then over micro-batches), so
# they differ by rounding: relative 1e-7 per addition over thousands of anchors and a few conv layers; 1e-5
# relative to the largest gradient is 100x that and 1000x below what a wrong normaliser gives (a factor ~k).
FP32_RTOL = 1e-5


def _cfg(batch: int, k: int, **over) -> Config:
    return apply_overrides(
        Config(),
        {
            "model.backbone": "resnet18",
            "model.fpn_channels": 16,
            "model.head_convs": 1,
            "model.head_norm": "gn",
            "model.frozen_bn": True,
            "model.anchor_sizes": [16, 32, 64, 128, 256],
            "data.batch_size": batch,
            "optim.accumulate": k,
            "optim.lr": 0.01,
            "optim.max_iters": 10,
            "optim.steps": [10],
            "optim.warmup_iters": 0,
            **over,
        },
    )


def _images(n: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` images of one padded size (so a micro-batch pads as the full batch does), 0-3 boxes each."""
    g = torch.Generator().manual_seed(seed)
    boxes = torch.zeros(n, 3, 4)
    labels = torch.full((n, 3), -1)
    for i in range(n):
        for j in range(int(torch.randint(0, 4, (1,), generator=g))):
            x, y = torch.randint(0, 60, (2,), generator=g).tolist()
            w, h = torch.randint(12, 36, (2,), generator=g).tolist()
            boxes[i, j] = torch.tensor([x, y, x + w, y + h], dtype=torch.float32)
            labels[i, j] = int(torch.randint(0, 3, (1,), generator=g))
    return {
        "images": torch.randint(0, 255, (n, 3, 64, 96), generator=g, dtype=torch.uint8),
        "image_sizes": torch.tensor([[64, 96]] * n),
        "orig_sizes": torch.tensor([[64, 96]] * n),
        "gt_boxes": boxes,
        "gt_labels": labels,
        "gt_crowd": torch.zeros(n, 3, dtype=torch.bool),
        "image_id": torch.arange(n),
        "scale": torch.ones(n),
    }


def _split(batch: dict[str, torch.Tensor], k: int) -> list[dict[str, torch.Tensor]]:
    return [
        dict(zip(batch, parts, strict=True))
        for parts in zip(*(v.chunk(k) for v in batch.values()), strict=True)
    ]


def _step(cfg: Config, batches, weights, dtype, wrap=None) -> tuple[dict[str, float], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model(cfg, 3)
    model.load_state_dict(weights)
    model = model.to(dtype)
    model = wrap(model) if wrap is not None else model
    engine = Engine(
        cfg, model, build_criterion(cfg, 3), build_postprocessor(cfg), torch.device("cpu"), [1, 2, 3]
    )
    out = engine.run_step(batches)
    # SGD keeps .grad after the step: the step's (unclipped, unscaled) gradients
    return out, [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _compare(dtype: torch.dtype, batch: dict[str, torch.Tensor], k: int, wrap=None) -> tuple[float, float]:
    weights = build_model(_cfg(2, 1), 3).state_dict()
    n = batch["images"].shape[0]
    acc, g_acc = _step(_cfg(n // k, k), _split(batch, k), weights, dtype, wrap)
    one, g_one = _step(_cfg(n, 1), [batch], weights, dtype, wrap)
    loss_diff = max(abs(acc[key] - one[key]) for key in ("loss_cls", "loss_box"))
    scale = max(float(g.abs().max()) for g in g_one)
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(g_acc, g_one, strict=True))
    assert acc["lr"] == one["lr"]
    assert one["loss_cls"] > 0 and one["loss_box"] > 0 and scale > 0
    return loss_diff / max(one["loss_cls"], one["loss_box"]), grad_diff / scale


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, FP32_RTOL)])
def test_accumulated_step_equals_one_big_batch(dtype, tol):
    torch.set_num_threads(1)
    loss_diff, grad_diff = _compare(dtype, _images(8, seed=1), k=4)
    assert loss_diff < tol and grad_diff < tol, (loss_diff, grad_diff)


def test_per_micro_batch_normaliser_would_not_be_exact():
    # The same data normalised per micro-batch (what the step would do without the step-wide count): the
    # gradients differ by far more than the tolerance, so the test above can fail.
    batch = _images(8, seed=1)
    weights = build_model(_cfg(2, 1), 3).state_dict()
    model = build_model(_cfg(2, 1), 3).double()
    model.load_state_dict(weights)
    crit = build_criterion(_cfg(2, 1), 3)
    for mb in _split(batch, 4):
        out = model(mb["images"])
        losses = crit(out, mb["gt_boxes"], mb["gt_labels"], mb["gt_crowd"])
        (losses["loss_cls"] + losses["loss_box"]).backward()
    naive = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    _, exact = _step(_cfg(8, 1), [batch], weights, torch.float64)
    scale = max(float(g.abs().max()) for g in exact)
    assert max(float((a - b).abs().max()) for a, b in zip(naive, exact, strict=True)) / scale > 1e-2


def test_accumulate_resolves_the_paper_lr_and_schedule_for_16_images():
    cfg = apply_overrides(
        Config(),
        {
            "data.batch_size": 2,
            "scaling.num_workers": 2,
            "optim.accumulate": 4,
            "optim.reference_batch": 16,
            "optim.lr": 0.01,
        },
    )
    assert cfg.global_batch == 16
    r = resolve(cfg)
    assert r.optim.lr == 0.01
    assert (r.optim.max_iters, r.optim.steps, r.optim.warmup_iters) == (90_000, [60_000, 80_000], 500)
    assert resolve(cfg, world_size=1).optim.lr == pytest.approx(0.005)  # 8 images per optimizer step


def test_run_step_needs_accumulate_micro_batches():
    cfg = _cfg(2, 2)
    engine = Engine(
        cfg,
        build_model(cfg, 3),
        build_criterion(cfg, 3),
        build_postprocessor(cfg),
        torch.device("cpu"),
        [1, 2, 3],
    )
    with pytest.raises(ValueError, match="optim.accumulate=2"):
        engine.run_step([_images(2, 0)])


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for dtype in (torch.float64, torch.float32):
            # Each rank its own images; the step's foreground count is over both ranks' micro-batches.
            results[str(dtype)] = _compare(
                dtype, _images(8, seed=10 + rank), k=4, wrap=lambda m: nn.parallel.DistributedDataParallel(m)
            )
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def test_accumulated_step_equals_one_big_batch_on_two_ranks(tmp_path, free_port):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, FP32_RTOL)):
            loss_diff, grad_diff = res[str(dtype)]
            assert loss_diff < tol and grad_diff < tol, (rank, dtype, loss_diff, grad_diff)
