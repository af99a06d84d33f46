"""A full training step, ours vs torchvision's RetinaNet: same backbone, same weights, same inputs.

    .venv/bin/python benchmarks/train_step.py [--settings r50 r18] [--repeats 9] [--threads 2]

Settings: (a) ResNet-50, 2 x 512 px; (b) ResNet-18, 16 x 128 px; 80 classes, about 7 GT boxes
per image. Both models: frozen BN, stem + res2 frozen, P6 from P5, torchvision's head and anchors; ours
is loaded from torchvision's state dict and runs torchvision's loss settings (L1 box loss, per-image
normaliser), so both steps compute the same losses (checked). torchvision's resize transform is replaced
by normalisation only (the input already has its size), as ours does.

A step = forward, matching, losses, backward, SGD step (momentum 0.9, weight decay 1e-4, fused=True on both
sides). "network" = forward + backward of backbone, FPN
and head alone (identical architecture on both sides); "outside" = step - network: anchors, matching,
target encoding, losses and their backward, the optimizer step. The four timings are interleaved per
repeat (ABBA: torchvision first in even repeats, ours first in odd ones) so that both sides see the
same machine load; medians of the repeats after one warm-up, and the paired comparison of the two
steps (in how many repeats ours was faster, the median per-repeat ratio), in wall
time and in process CPU time (this machine is shared: CPU time stays close to the work done when other
jobs preempt us). The network part is the same work on both sides: normalisation, backbone + FPN, head
(ours without its anchor generator, as torchvision's). "outside (direct)" times the outside part on its own
(wall): from fixed head outputs to the losses' gradients, plus the optimizer step, with the same work on both
sides: anchors included on both (each side's generator as its step calls it: torchvision builds them per
step, ours looks them up in its per-size cache) and, as a second row, excluded on both (anchors made before
the timing); it does not suffer from subtracting two large noisy numbers.
Targets: our step faster in both settings; our outside time <= 1/3 of torchvision's.
Each run writes its table and environment to ``benchmarks/results/train_step-<UTC time>.{md,json}``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from _common import load_average, write_results
from torch import nn
from torchvision.models.detection import RetinaNet as TVRetinaNet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from ray_retina.config import Config, apply_overrides
from ray_retina.model import build_criterion, build_model, load_torchvision_retinanet

SETTINGS = {"r50": ("resnet50", 2, 512), "r18": ("resnet18", 16, 128)}
NUM_CLASSES = 80
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


class NormalizeOnly(nn.Module):
    """torchvision's transform without the resize: normalise and batch (our model does the same)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images, targets=None):
        x = (torch.stack(list(images)) - self.mean) / self.std
        return ImageList(x, [tuple(i.shape[-2:]) for i in images]), targets

    def postprocess(self, result, image_shapes, original_image_sizes):
        return result


def make_pair(backbone: str):
    torch.manual_seed(0)
    resnet = getattr(torchvision.models, backbone)(weights=None, norm_layer=FrozenBatchNorm2d)
    body = _resnet_fpn_extractor(resnet, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    tv = TVRetinaNet(body, num_classes=NUM_CLASSES)
    tv.transform = NormalizeOnly()
    cfg = apply_overrides(
        Config(),
        {
            "model.backbone": backbone,
            "model.p6_from": "p5",
            "loss.box_loss": "l1",
            "loss.normalizer": "per_image",
        },
    )
    ours = build_model(cfg, NUM_CLASSES)
    load_torchvision_retinanet(ours, tv.state_dict())
    return tv, ours, build_criterion(cfg, NUM_CLASSES)


def network_ours(ours: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our model's forward without its anchor generator: normalisation, backbone + FPN, head, as
    ``RetinaNet.forward`` runs them. The network part of the step, the same work as torchvision's
    ``transform`` + ``backbone`` + ``head``."""
    x = (images.float() - ours.pixel_mean) / ours.pixel_std
    if ours.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return ours.head(ours.backbone(x))


def make_batch(b: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, size, size, generator=g) * 255
    counts = torch.randint(1, 14, (b,), generator=g).tolist()
    gmax = max(counts)
    gt_boxes = torch.zeros(b, gmax, 4)
    gt_labels = torch.full((b, gmax), -1, dtype=torch.int64)
    targets = []
    for i, n in enumerate(counts):
        xy = torch.rand(n, 2, generator=g) * size * 0.8
        wh = size * (0.05 + torch.rand(n, 2, generator=g) * 0.4)
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1)
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        gt_boxes[i, :n] = boxes
        gt_labels[i, :n] = labels
        targets.append({"boxes": boxes, "labels": labels})
    return images, gt_boxes, gt_labels, targets


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    # The same optimizer on both sides. fused=True: PyTorch's single-kernel SGD (CPU and CUDA), about 2x
    # faster than the default per-parameter loop here; it is part of both sides' "outside" time.
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4, fused=True)


def run(setting: str, repeats: int) -> dict[str, float]:
    backbone, b, size = SETTINGS[setting]
    tv, ours, crit = make_pair(backbone)
    tv.train()
    ours.train()
    images, gt_boxes, gt_labels, targets = make_batch(b, size)
    opt_tv, opt_ours = sgd(tv), sgd(ours)

    with torch.no_grad():  # the same losses before any step
        ref = tv(list(images), targets)
        got = crit(ours(images), gt_boxes, gt_labels)
    torch.testing.assert_close(got["loss_cls"], ref["classification"], rtol=1e-4, atol=0)
    torch.testing.assert_close(got["loss_box"], ref["bbox_regression"], rtol=1e-4, atol=0)

    def step_tv():
        losses = tv(list(images), targets)
        (losses["classification"] + losses["bbox_regression"]).backward()
        opt_tv.step()
        opt_tv.zero_grad(set_to_none=True)

    def step_ours():
        losses = crit(ours(images), gt_boxes, gt_labels)
        (losses["loss_cls"] + losses["loss_box"]).backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def net_tv():
        x = tv.transform(list(images))[0].tensors
        feats = list(tv.backbone(x).values())
        out = tv.head(feats)
        (out["cls_logits"].sum() + out["bbox_regression"].sum()).backward()
        tv.zero_grad(set_to_none=True)

    def net_ours():
        cls_logits, box_deltas = network_ours(ours, images)
        (cls_logits.sum() + box_deltas.sum()).backward()
        ours.zero_grad(set_to_none=True)

    # Outside the network, measured directly: from fixed head outputs (leaves, so the backward stops at
    # them) to the losses' gradients, plus the optimizer step on gradients that exist.
    with torch.no_grad():
        image_list = tv.transform(list(images))[0]
        tv_feats = list(tv.backbone(image_list.tensors).values())
        tv_head = {k: v.detach().requires_grad_() for k, v in tv.head(tv_feats).items()}
        tv_anchors = tv.anchor_generator(image_list, tv_feats)
        our_feats = ours.backbone((images.float() - ours.pixel_mean) / ours.pixel_std)
        our_out = ours(images)
    our_out = our_out._replace(
        cls_logits=our_out.cls_logits.detach().requires_grad_(),
        box_deltas=our_out.box_deltas.detach().requires_grad_(),
    )
    for model in (tv, ours):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)

    # Anchors included on both sides (each generator as its step calls it), and excluded on both.
    def loss_tv(anchors: list[torch.Tensor] | None = None):
        if anchors is None:
            anchors = tv.anchor_generator(image_list, tv_feats)
        losses = tv.compute_loss(targets, tv_head, anchors)  # per-image matching and losses
        (losses["classification"] + losses["bbox_regression"]).backward()
        tv_head["cls_logits"].grad = tv_head["bbox_regression"].grad = None

    def loss_ours(with_anchors: bool = True):
        out = our_out
        if with_anchors:
            anchors, per_level = ours.anchor_generator(our_feats)
            out = our_out._replace(anchors=anchors, num_anchors_per_level=per_level)
        losses = crit(out, gt_boxes, gt_labels)
        (losses["loss_cls"] + losses["loss_box"]).backward()
        our_out.cls_logits.grad = our_out.box_deltas.grad = None

    # The optimizer step alone, on the same gradients each time. (No zero_grad here: the real step frees
    # the gradients with set_to_none=True, which costs nothing; zeroing them in place would add a memset of
    # every gradient to both sides.)
    def opt_tv_step():
        opt_tv.step()

    def opt_ours_step():
        opt_ours.step()

    direct = {
        "loss_tv": loss_tv,
        "loss_ours": loss_ours,
        "lossnoanc_tv": lambda: loss_tv(tv_anchors),
        "lossnoanc_ours": lambda: loss_ours(False),
        "opt_tv": opt_tv_step,
        "opt_ours": opt_ours_step,
    }
    for fn in direct.values():
        fn()
    direct_times: dict[str, list[float]] = {k: [] for k in direct}
    for _ in range(repeats):
        for k, fn in direct.items():
            t0 = time.perf_counter()
            fn()
            direct_times[k].append(time.perf_counter() - t0)
    for model in (tv, ours):
        model.zero_grad(set_to_none=True)

    fns = {"step_tv": step_tv, "step_ours": step_ours, "net_tv": net_tv, "net_ours": net_ours}
    for fn in fns.values():  # warm-up
        fn()
    result: dict[str, dict[str, list[float]]] = {"wall": {k: [] for k in fns}, "cpu": {k: [] for k in fns}}
    for i in range(repeats):
        # ABBA: torchvision first in even repeats, ours first in odd ones, so that neither side always
        # runs right after the other's allocations (freed memory, warm caches) and order effects cancel.
        order = list(fns) if i % 2 == 0 else ["step_ours", "step_tv", "net_ours", "net_tv"]
        for k in order:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[k]()
            result["wall"][k].append(time.perf_counter() - t0)
            result["cpu"][k].append(time.process_time() - c0)
    med = {}
    for clock_name, times in result.items():
        m = {k: statistics.median(v) for k, v in times.items()}
        # outside = step - network, per repeat (same load), then the median
        for side in ("tv", "ours"):
            m[f"out_{side}"] = statistics.median(
                [s - n for s, n in zip(times[f"step_{side}"], times[f"net_{side}"], strict=True)]
            )
        # Paired per repeat (both steps ran back to back under the same load): how often ours was faster,
        # and the median of the per-repeat ratios.
        pairs = list(zip(times["step_tv"], times["step_ours"], strict=True))
        m["step_wins"] = sum(o < t for t, o in pairs)
        m["step_paired_ratio"] = statistics.median(t / o for t, o in pairs)
        m["raw"] = {k: [round(x, 3) for x in v] for k, v in times.items()}
        med[clock_name] = m
    med["direct"] = {
        f"out_{side}": statistics.median(
            [a + b for a, b in zip(direct_times[f"loss_{side}"], direct_times[f"opt_{side}"], strict=True)]
        )
        for side in ("tv", "ours")
    }
    med["direct_no_anchors"] = {
        f"out_{side}": statistics.median(
            [
                a + b
                for a, b in zip(direct_times[f"lossnoanc_{side}"], direct_times[f"opt_{side}"], strict=True)
            ]
        )
        for side in ("tv", "ours")
    }
    med["direct_raw"] = {k: [round(x, 4) for x in v] for k, v in direct_times.items()}
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=["r50", "r18"], choices=sorted(SETTINGS))
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--raw", action="store_true", help="also print every repeat's wall times")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        f"training step, {torch.get_num_threads()} threads, median of {args.repeats} (s); {load_average()}",
        f"{'setting':<22}{'':<26}{'torchvision':>12}{'ours':>10}{'ratio':>9}",
    ]
    print("\n".join(lines), flush=True)
    labels = {
        "wall": ("step", "net", "out"),
        "cpu": ("step", "net", "out"),
        "direct": ("out",),
        "direct_no_anchors": ("out",),
    }
    verdicts, results = [], {}
    for s in args.settings:
        backbone, b, size = SETTINGS[s]
        med = results[s] = run(s, args.repeats)
        name = f"{backbone} {b}x{size}px"
        for clock_name, parts in labels.items():
            m = med[clock_name]
            for part in parts:
                label = {"step": "step", "net": "network", "out": "outside"}[part] + f" ({clock_name})"
                tv_t, our_t = m[f"{part}_tv"], m[f"{part}_ours"]
                ratio = f"{tv_t / our_t:>8.2f}x" if our_t > 0 and tv_t > 0 else f"{'n/a':>9}"
                lines.append(f"{name:<22}{label:<26}{tv_t:>12.3f}{our_t:>10.3f}{ratio}")
                print(lines[-1], flush=True)
                name = ""
        for clock_name in ("wall", "cpu"):
            m = med[clock_name]
            lines.append(
                f"{'':<22}{'step, paired (' + clock_name + ')':<26}ours faster in {m['step_wins']}/{args.repeats} "
                f"repeats, median per-repeat ratio {m['step_paired_ratio']:.3f}x"
            )
            print(lines[-1])
        if args.raw:
            for k, v in med["wall"]["raw"].items():
                print(f"{'':<22}{k + ' (wall, per repeat)':<26}{' '.join(f'{x:.3f}' for x in v)}")
        m, d = med["wall"], med["direct"]
        verdicts.append(
            f"{s}: step faster {'met' if m['step_ours'] < m['step_tv'] else 'NOT met'}, "
            f"outside <= 1/3 {'met' if m['out_ours'] <= m['out_tv'] / 3 else 'NOT met'} (wall), "
            f"{'met' if d['out_ours'] <= d['out_tv'] / 3 else 'NOT met'} (direct)"
        )
    lines.append(f"targets: {'; '.join(verdicts)}; {load_average()} at the end")
    print(lines[-1])
    write_results(
        "train_step",
        "```\n" + "\n".join(lines) + "\n```",
        {"settings": args.settings, "repeats": args.repeats, "threads": args.threads, "medians": results},
    )


if __name__ == "__main__":
    main()
