"""Test-time augmentation: COCO AP and detection cost of a trained checkpoint, plain vs flip vs flip + scales.

    # the demo model (configs/smoke.yaml, 200 iterations), trained outside the repository:
    (cd /tmp/tta && ray-retina train --set run.storage_path=/tmp/tta/runs tracking.enabled=false run.name=demo)
    .venv/bin/python benchmarks/tta.py --checkpoint /tmp/tta/runs/demo --shards /tmp/tta/data/synth/shards/val

Cost first: the detection of the same preloaded val batches (decode and COCO eval outside the timing), the
modes run in turn in each repeat, medians of ``--repeats``; wall and process CPU time per image, and their
ratios to plain. Then AP: ``evaluate_checkpoint`` on the whole val set for each mode (deterministic: one run
each; ``--skip-ap`` leaves it out).
"""

from __future__ import annotations

import argparse

import torch
from _common import interleaved_medians, load_average, recorded_run

from ray_retina.checkpoint import load_checkpoint_state
from ray_retina.config import TTASection
from ray_retina.data.datasets import eval_plan, iter_eval_batches
from ray_retina.engine.evaluate import AMP_DTYPES, detect, evaluate_checkpoint
from ray_retina.engine.restore import model_from_state
from ray_retina.model import build_postprocessor

MODES: dict[str, TTASection] = {
    "plain": TTASection(enabled=False),
    "flip": TTASection(enabled=True, flip=True, scales=[1.0]),
    "flip + scales 1, 1.25": TTASection(enabled=True, flip=True, scales=[1.0, 1.25]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a run dir (its best), checkpoint dir or file")
    ap.add_argument("--shards", required=True, help="the val shards")
    ap.add_argument("--timed-images", type=int, default=32, help="val images in the timed detection")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-ap", action="store_true", help="time the detection only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, cfg, _ = model_from_state(load_checkpoint_state(args.checkpoint), "cpu")
    pp = build_postprocessor(cfg)
    batches = list(iter_eval_batches(eval_plan(args.shards, args.timed_images), cfg.data))
    amp = AMP_DTYPES[cfg.optim.amp]

    def run(tta: TTASection) -> None:
        for b in batches:
            detect(
                model,
                pp,
                b,
                device=torch.device("cpu"),
                amp_dtype=amp,
                tta=tta,
                size_divisibility=cfg.data.size_divisibility,
            )

    wall, cpu = interleaved_medians(
        {name: (lambda t=tta: run(t)) for name, tta in MODES.items()}, repeats=args.repeats
    )
    n = args.timed_images
    print(f"checkpoint {args.checkpoint}; detection of {n} val images, {load_average()}")
    print(f"{'mode':<24}{'ms/img':>9}{'CPU ms':>9}{'x plain':>9}{'CPU x':>7}")
    for name in MODES:
        print(
            f"{name:<24}{1000 * wall[name] / n:9.1f}{1000 * cpu[name] / n:9.1f}"
            f"{wall[name] / wall['plain']:9.2f}{cpu[name] / cpu['plain']:7.2f}",
            flush=True,
        )
    if args.skip_ap:
        return
    # AP after the timing: the longer part, one evaluation per mode (deterministic).
    print(f"{'mode':<24}{'AP':>7}{'AP50':>7}{'AP75':>7}{'APs':>7}{'APm':>7}")
    for name, tta in MODES.items():
        st = evaluate_checkpoint(args.checkpoint, args.shards, tta=tta, device="cpu").metrics
        print(
            f"{name:<24}" + "".join(f"{100 * st[k]:7.2f}" for k in ("AP", "AP50", "AP75", "APs", "APm")),
            flush=True,
        )


if __name__ == "__main__":
    with recorded_run("tta"):
        main()
