"""Focal loss forward + backward: ours (fused, from labels) vs torchvision.ops.sigmoid_focal_loss.

    .venv/bin/python benchmarks/focal_loss.py [--shape 8 120000 80] [--repeats 5] [--threads 2]

Logits (B, R, K) float32 with realistic sparse targets: about 1 in 100 anchors foreground (one class
each), the rest background. torchvision's op takes the dense one-hot target (built once, outside the
timing); ours takes the class index per anchor. Both reduce with "sum"; the values are checked equal.
Peak extra memory: the resident-memory high-water mark above the inputs during one forward + backward.
Target: ours >= 3x faster and <= 1/4 of torchvision's peak extra memory.
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from _common import interleaved_medians, load_average, peak_extra_rss, recorded_run

from ray_retina.losses import focal_loss_from_labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[8, 120000, 80])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    b, r, k = args.shape
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(b, r, k, generator=g) * 2 - 4).requires_grad_()
    labels = torch.full((b, r), k, dtype=torch.int64)
    fg = torch.rand(b, r, generator=g) < 0.01
    labels[fg] = torch.randint(0, k, (int(fg.sum()),), generator=g)
    dense = torch.zeros(b, r, k)
    dense[fg, labels[fg]] = 1.0

    def ours():
        logits.grad = None
        loss = focal_loss_from_labels(logits, labels, alpha=0.25, gamma=2.0)
        loss.backward()
        return loss

    def tv():
        logits.grad = None
        loss = torchvision.ops.sigmoid_focal_loss(logits, dense, alpha=0.25, gamma=2.0, reduction="sum")
        loss.backward()
        return loss

    lo, go = ours().detach(), logits.grad.clone()
    lt, gt = tv().detach(), logits.grad.clone()
    torch.testing.assert_close(lo, lt, rtol=1e-5, atol=0)
    torch.testing.assert_close(go, gt, rtol=1e-4, atol=1e-7)
    del go, gt
    logits.grad = None

    mem_tv = peak_extra_rss(tv)
    logits.grad = None
    mem_ours = peak_extra_rss(ours)
    logits.grad = None
    load0 = load_average()
    med, cpu = interleaved_medians({"tv": tv, "ours": ours}, repeats=args.repeats)
    t_tv, t_ours = med["tv"], med["ours"]

    gib = 1024**3
    print(
        f"focal loss fwd+bwd, logits {tuple(logits.shape)} float32, {int(fg.sum())} fg anchors, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}; {load0} before, {load_average()} after"
    )
    print(f"{'':<28}{'torchvision':>14}{'ours':>14}{'ratio':>12}")
    print(f"{'time (s)':<28}{t_tv:>14.3f}{t_ours:>14.3f}{t_tv / t_ours:>11.2f}x")
    print(f"{'CPU time (s)':<28}{cpu['tv']:>14.3f}{cpu['ours']:>14.3f}{cpu['tv'] / cpu['ours']:>11.2f}x")
    print(
        f"{'peak extra memory (GiB)':<28}{mem_tv / gib:>14.3f}{mem_ours / gib:>14.3f}{mem_ours / mem_tv:>11.3f}x"
    )
    print(f"loss equal: torchvision {lt.item():.6g}, ours {lo.item():.6g}")
    print(
        f"targets: speed >= 3x: {'met' if t_tv / t_ours >= 3 else 'NOT met'}; "
        f"memory <= 1/4: {'met' if mem_ours <= mem_tv / 4 else 'NOT met'}"
    )


if __name__ == "__main__":
    with recorded_run("focal_loss"):  # the table and the environment to benchmarks/results/
        main()
