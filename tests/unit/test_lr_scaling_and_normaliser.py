"""Correctness debts: lr scaling with optim.reference_batch and the world size that runs, the global focal
normaliser under torch.distributed, float64 in the fused focal loss."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision

from ray_retina.config import PAPER_LR, Config, apply_overrides, load_config, resolve
from ray_retina.losses import focal_loss_from_labels
from ray_retina.model.box_coder import BoxCoder
from ray_retina.model.matcher import Matcher
from ray_retina.model.retinanet import HeadOutputs, RetinaNetLoss

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------------
# 1. optim.reference_batch rescales an explicit lr too; resolve(cfg, world_size) for elastic runs.


def _ref_cfg(**over) -> Config:
    return apply_overrides(Config(), {"data.batch_size": 4, "scaling.num_workers": 8, **over})


def test_reference_batch_rescales_explicit_lr():
    cfg = _ref_cfg(**{"optim.lr": 0.01, "optim.reference_batch": 16})  # 0.01 for 16 images, run at 32
    assert cfg.global_batch == 32
    assert cfg.lr == pytest.approx(0.02)
    r = resolve(cfg)
    assert r.optim.lr == pytest.approx(0.02)
    assert (r.optim.max_iters, r.optim.steps, r.optim.warmup_iters) == (45_000, [30_000, 40_000], 250)
    assert r.optim.reference_batch is None


def test_paper_config_with_reference_batch_on_fewer_gpus():
    # The paper config (lr 0.01 at 16 images) on 4 GPUs x 2 images: half the batch, half the lr, twice the iters.
    cfg = load_config(
        ROOT / "configs/retinanet_r50_fpn_1x_coco.yaml", ["optim.reference_batch=16", "scaling.num_workers=4"]
    )
    r = resolve(cfg)
    assert r.optim.lr == pytest.approx(0.005)
    assert (r.optim.max_iters, r.optim.steps, r.optim.warmup_iters) == (180_000, [120_000, 160_000], 1000)


def test_explicit_lr_without_reference_batch_is_kept():
    cfg = _ref_cfg(**{"optim.lr": 0.005})
    assert cfg.lr == 0.005
    assert resolve(cfg).optim.lr == 0.005
    assert resolve(cfg, world_size=3).optim.lr == 0.005
    assert resolve(cfg, world_size=3).optim.max_iters == 90_000


def test_resolve_for_the_world_size_that_runs():
    # Elastic run: configured for 8 workers, 3 are running -> global batch 12.
    cfg = _ref_cfg(**{"optim.reference_batch": 16})
    r = resolve(cfg, world_size=3)
    assert r.optim.lr == pytest.approx(PAPER_LR * 12 / 16)
    assert (r.optim.max_iters, r.optim.steps, r.optim.warmup_iters) == (120_000, [80_000, 106_667], 667)
    explicit = resolve(_ref_cfg(**{"optim.lr": 0.02, "optim.reference_batch": 16}), world_size=2)  # batch 8
    assert explicit.optim.lr == pytest.approx(0.01)
    assert explicit.optim.max_iters == 180_000
    # No reference batch, lr None: the paper's lr scaled to the batch that runs, schedule as given.
    plain = resolve(_ref_cfg(), world_size=3)
    assert plain.optim.lr == pytest.approx(PAPER_LR * 12 / 16)
    assert plain.optim.max_iters == 90_000
    # world_size None: scaling.num_workers (at least 1; 0 runs in the driver)
    assert resolve(cfg) == resolve(cfg, world_size=8)
    driver = apply_overrides(cfg, {"scaling.num_workers": 0})
    assert resolve(driver) == resolve(driver, world_size=1)
    assert resolve(driver).optim.lr == pytest.approx(PAPER_LR * 4 / 16)


def test_resolved_config_is_pinned():
    cfg = _ref_cfg(**{"optim.lr": 0.01, "optim.reference_batch": 16})
    r = resolve(cfg)
    for w in (None, 1, 3, 8):
        assert resolve(r, world_size=w) == r
    with pytest.raises(ValueError, match="world_size"):
        resolve(cfg, world_size=0)


# ---------------------------------------------------------------------------------------------------------
# 2. The global normaliser clamps the all-reduced foreground count before dividing by the world size.

K = 3
# Six disjoint 10x10 anchors in a row; a GT box equal to an anchor makes exactly that anchor foreground.
ANCHORS = torch.tensor([[20.0 * i, 0.0, 20.0 * i + 10, 10.0] for i in range(6)])


def _rank_inputs(rank: int, num_gt: int) -> tuple[HeadOutputs, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    logits = torch.randn(1, len(ANCHORS), K, generator=g)
    deltas = torch.randn(1, len(ANCHORS), 4, generator=g) * 0.1
    gt_boxes = torch.zeros(1, 4, 4)
    gt_labels = torch.full((1, 4), -1)
    gt_boxes[0, :num_gt] = ANCHORS[:num_gt] + 0.5  # IoU 0.82 with its anchor, 0 with the others
    gt_labels[0, :num_gt] = torch.arange(num_gt) % K
    return HeadOutputs(logits, deltas, ANCHORS, [len(ANCHORS)]), gt_boxes, gt_labels


def _normaliser_worker(rank: int, world: int, port: int, fg_per_rank: list[list[int]], out: str) -> None:
    torch.set_num_threads(1)
    crit = RetinaNetLoss(num_classes=K, matcher=Matcher(), box_coder=BoxCoder(), normalizer="global")
    results = []
    # Before the process group exists: the loss sum / max(own num_fg, 1), i.e. each rank's own loss sum.
    local = [crit(*_rank_inputs(rank, case[rank])) for case in fg_per_rank]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for case, loc in zip(fg_per_rank, local, strict=True):
            glob = crit(*_rank_inputs(rank, case[rank]))
            n = glob["num_fg"].clone()
            dist.all_reduce(n)
            own_sum = {k: loc[k] * loc["num_fg"].clamp(min=1) for k in ("loss_cls", "loss_box")}
            results.append(
                {
                    "num_fg": float(glob["num_fg"]),
                    "total_fg": float(n),
                    **{k: float(glob[k]) for k in ("loss_cls", "loss_box")},
                    **{f"own_{k}": float(v) for k, v in own_sum.items()},
                }
            )
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def test_global_normaliser_clamps_the_sum_before_dividing_by_world(tmp_path, free_port):
    world = 2
    # per case, the foreground anchors of rank 0 and rank 1: 1 in all (fewer than the world), 0, and 2 + 3
    fg_per_rank = [[1, 0], [0, 0], [2, 3]]
    args = (world, free_port(), fg_per_rank, str(tmp_path))
    mp.spawn(_normaliser_worker, args=args, nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for c, case in enumerate(fg_per_rank):
        total = sum(case)
        # 1 fg over 2 ranks: 0.5 (the bug clamped the per-rank mean 0.5 to 1)
        norm = max(total, 1) / world
        for r in range(world):
            out = res[r][c]
            assert out["num_fg"] == case[r] and out["total_fg"] == total
            for k in ("loss_cls", "loss_box"):
                assert out[k] == pytest.approx(out[f"own_{k}"] / norm, rel=1e-6)
        # DDP averages over ranks: the mean of the ranks' losses is the global sum / max(global fg, 1)
        for k in ("loss_cls", "loss_box"):
            mean = sum(res[r][c][k] for r in range(world)) / world
            global_sum = sum(res[r][c][f"own_{k}"] for r in range(world))
            assert mean == pytest.approx(global_sum / max(total, 1), rel=1e-6)
    assert res[0][0]["loss_cls"] == pytest.approx(2 * res[0][0]["own_loss_cls"], rel=1e-6)  # by hand: / 0.5


# ---------------------------------------------------------------------------------------------------------
# 3. float64 logits: the fused focal loss computes in float64.


@pytest.mark.parametrize("alpha", [0.25, 0.5, -1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.5])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_focal_float64_matches_torchvision_float64(alpha, gamma, weighted, monkeypatch):
    import ray_retina.losses as losses

    monkeypatch.setattr(losses, "_CHUNK_ELEMS_CPU", 64)  # several chunks, a ragged last one
    g = torch.Generator().manual_seed(7)
    n, k = 97, 5
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(-1, k + 1, (n,), generator=g)  # -1 ignore, 0..k-1 class, k background
    weights = torch.rand(n, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    ours = focal_loss_from_labels(x1, labels, alpha, gamma, weights=weights)
    target = F.one_hot(labels.clamp(min=0), k + 1)[:, :k].double()
    per_row = torchvision.ops.sigmoid_focal_loss(x2, target, alpha=alpha, gamma=gamma, reduction="none")
    per_row = per_row.sum(-1)
    row_w = (labels != -1).double() * (weights if weights is not None else 1.0)
    ref = (per_row * row_w).sum()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-12, atol=0)
    (ours * 3.0).backward()
    (ref * 3.0).backward()
    # relative to the largest gradient: both sides' terms for x << 0 carry absolute (not relative) rounding
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-12 * float(x2.grad.abs().max()))
    assert ours.dtype == torch.float64
