"""Post-process: ours (batched) vs torchvision's RetinaNet.postprocess_detections (per image, per level).

    .venv/bin/python benchmarks/postprocess.py [--batch 8] [--size 512] [--classes 80] [--repeats 5]

Same head outputs for both: logits drawn so that a trained-model-like few thousand scores per image pass
0.05, deltas N(0, 0.5). Settings: score 0.05, top 1000 per level, NMS 0.5, 100 per image. The detections
are checked identical before timing; the two sides run in turn in each repeat. Target: ours >= 3x faster.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
from _common import interleaved_medians, load_average, recorded_run
from torchvision.models.detection import RetinaNet as TVRetinaNet
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

from ray_retina.model import HeadOutputs, PostProcessor
from ray_retina.model.anchors import AnchorGenerator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    b, s, k = args.batch, args.size, args.classes

    gen = AnchorGenerator(torchvision_compat=True)
    anchors, per_level = gen([torch.zeros(1, 1, s // st, s // st) for st in (8, 16, 32, 64, 128)])
    r = anchors.shape[0]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(b, r, k, generator=g) * 1.5 - 7.0
    deltas = torch.randn(b, r, 4, generator=g) * 0.5
    sizes = torch.tensor([[s, s]] * b)
    outputs = HeadOutputs(logits, deltas, anchors, per_level)

    ours = PostProcessor(score_thresh=0.05, topk_candidates=1000, nms_thresh=0.5, detections_per_img=100)
    tv_self = SimpleNamespace(
        score_thresh=0.05,
        topk_candidates=1000,
        nms_thresh=0.5,
        detections_per_img=100,
        box_coder=TVBoxCoder(weights=(1.0, 1.0, 1.0, 1.0)),
    )

    def run_ours():
        return ours(outputs, sizes)

    def run_tv():
        head = {
            "cls_logits": list(logits.split(per_level, dim=1)),
            "bbox_regression": list(deltas.split(per_level, dim=1)),
        }
        split_anchors = [list(anchors.split(per_level)) for _ in range(b)]
        return TVRetinaNet.postprocess_detections(tv_self, head, split_anchors, [(s, s)] * b)

    with torch.no_grad():
        a, t = run_ours(), run_tv()
        total = 0
        for d, e in zip(a, t, strict=True):
            assert torch.equal(d["labels"], e["labels"]), "labels differ"
            torch.testing.assert_close(d["scores"], e["scores"], rtol=0, atol=1e-6)
            torch.testing.assert_close(d["boxes"], e["boxes"], rtol=0, atol=1e-3)
            total += len(d["scores"])
        cand = int((torch.sigmoid(logits) > 0.05).sum()) // b
        load0 = load_average()
        med, cpu = interleaved_medians({"tv": run_tv, "ours": run_ours}, repeats=args.repeats)
        t_tv, t_ours = med["tv"], med["ours"]
    print(
        f"post-process, batch {b} at {s} px ({r} anchors x {k} classes), ~{cand} scores > 0.05 per image, "
        f"{total} detections, identical; {torch.get_num_threads()} threads, median of {args.repeats}; "
        f"{load0} before, {load_average()} after"
    )
    print(f"{'':<16}{'torchvision':>14}{'ours':>14}{'ratio':>12}")
    print(f"{'time (ms)':<16}{1000 * t_tv:>14.1f}{1000 * t_ours:>14.1f}{t_tv / t_ours:>11.2f}x")
    print(
        f"{'CPU time (ms)':<16}{1000 * cpu['tv']:>14.1f}{1000 * cpu['ours']:>14.1f}{cpu['tv'] / cpu['ours']:>11.2f}x"
    )
    print(f"target: >= 3x: {'met' if t_tv / t_ours >= 3 else 'NOT met'}")


if __name__ == "__main__":
    with recorded_run("postprocess"):  # the table and the environment to benchmarks/results/
        main()
