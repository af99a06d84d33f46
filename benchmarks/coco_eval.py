"""COCO box AP: our `coco_evaluate` with backend faster_coco_eval vs the reference pycocotools.

    .venv/bin/python benchmarks/coco_eval.py [--images 5000] [--dets 100] [--classes 80] [--repeats 3]

The size of COCO val2017: 5000 images, 80 categories, ~7 objects per image (1 to 15 here; small, medium and
large; 1% crowd), 100 detections per image as a trained detector emits them: for each object a few jittered
boxes of its class (one of them sometimes of a confused class) with scores that fall with the jitter, then
low-scoring false positives of random classes and places up to 100. Both backends go through the same
function (`ray_retina.engine.evaluate.coco_evaluate`: copy GT and detections, loadRes, evaluate, accumulate,
summarize), so the times are what an eval period pays. Wall and CPU time of this process are both
reported: on a shared machine the CPU time is the steadier number (both backends are single-threaded). The 12 stats must agree within 1e-12.
Target: faster_coco_eval >= 5x faster than pycocotools, same stats.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import numpy as np
from _common import recorded_run

from ray_retina.engine.evaluate import STAT_NAMES, coco_evaluate


def synthetic_coco(
    num_images: int, dets_per_image: int, num_classes: int, seed: int = 0
) -> tuple[dict, list[dict]]:
    """A COCO GT dict and a detection list in the results format (XYWH, original category ids)."""
    rng = np.random.default_rng(seed)
    cat_ids = [int(c) for c in np.sort(rng.choice(np.arange(1, 2 * num_classes), num_classes, replace=False))]
    images, anns, dets = [], [], []
    ann_id = 1
    for image_id in range(1, num_images + 1):
        w, h = int(rng.integers(320, 641)), int(rng.integers(240, 481))
        images.append({"id": image_id, "width": w, "height": h, "file_name": f"{image_id:012d}.jpg"})
        gts = []
        for _ in range(int(rng.integers(1, 16))):
            # Side lengths log-uniform in 8..400 px: small (< 32^2), medium and large areas all occur.
            bw, bh = np.exp(rng.uniform(np.log(8), np.log(min(400, w, h)), 2))
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            cat = cat_ids[int(rng.integers(num_classes))]
            crowd = int(rng.random() < 0.01)
            anns.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [x, y, bw, bh],
                    "area": float(bw * bh),
                    "iscrowd": crowd,
                }
            )
            ann_id += 1
            gts.append((x, y, bw, bh, cat))
        mine = []
        for x, y, bw, bh, cat in gts:
            for _ in range(int(rng.integers(1, 5))):
                noise = rng.normal(0, 0.12, 4)  # relative jitter of centre and size
                cx, cy = x + bw / 2 + noise[0] * bw, y + bh / 2 + noise[1] * bh
                nw, nh = bw * np.exp(noise[2]), bh * np.exp(noise[3])
                score = float(
                    np.clip(0.95 * np.exp(-4 * np.abs(noise).mean()) + rng.normal(0, 0.05), 0.05, 1)
                )
                c = cat if rng.random() > 0.1 else cat_ids[int(rng.integers(num_classes))]
                mine.append((cx - nw / 2, cy - nh / 2, nw, nh, score, c))
        mine = mine[:dets_per_image]
        while len(mine) < dets_per_image:
            bw, bh = np.exp(rng.uniform(np.log(8), np.log(min(400, w, h)), 2))
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            mine.append(
                (x, y, bw, bh, float(rng.uniform(0.05, 0.5)), cat_ids[int(rng.integers(num_classes))])
            )
        for x, y, bw, bh, score, c in mine:
            dets.append(
                {
                    "image_id": image_id,
                    "category_id": int(c),
                    "bbox": [round(float(v), 2) for v in (x, y, bw, bh)],
                    "score": round(score, 5),
                }
            )
    gt = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": c, "name": f"class_{c}"} for c in cat_ids],
    }
    return gt, dets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--dets", type=int, default=100)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    t0 = time.perf_counter()
    gt, dets = synthetic_coco(args.images, args.dets, args.classes)
    print(
        f"{args.images} images, {len(gt['annotations'])} GT boxes, {len(dets)} detections, "
        f"{args.classes} classes (made in {time.perf_counter() - t0:.1f} s)"
    )

    stats: dict[str, dict[str, float]] = {}
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    variants = {"faster_coco_eval": ("faster_coco_eval", dets), "pycocotools": ("pycocotools", dets)}
    # Round-robin over the variants, so that a change of load on a shared machine hits all of them.
    for name in variants:
        wall[name], cpu[name] = [], []
    for _ in range(args.repeats):
        for name, (backend, d) in variants.items():
            gc.collect()
            w0, c0 = time.perf_counter(), time.process_time()
            stats[name] = coco_evaluate(gt, d, backend=backend)  # type: ignore[assignment]
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    for name in variants:
        print(
            f"  {name:<21} wall {', '.join(f'{t:.2f}' for t in wall[name])} s; "
            f"cpu {', '.join(f'{t:.2f}' for t in cpu[name])} s"
        )

    fast, ref = stats["faster_coco_eval"], stats["pycocotools"]
    med = {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in wall}
    print(f"\nCOCO eval through coco_evaluate(), median of {args.repeats} runs")
    print(f"{'':<14}{'pycocotools':>14}{'faster_coco_eval':>18}{'abs diff':>12}")
    worst = 0.0
    for k in STAT_NAMES:
        d = abs(fast[k] - ref[k])
        worst = max(worst, d)
        print(f"{k:<14}{ref[k]:>14.10f}{fast[k]:>18.10f}{d:>12.1e}")
    for i, what in enumerate(("wall time (s)", "cpu time (s)")):
        r, f = med["pycocotools"][i], med["faster_coco_eval"][i]
        print(f"{what:<14}{r:>14.2f}{f:>18.2f}{r / f:>11.1f}x")
    speedup = med["pycocotools"][0] / med["faster_coco_eval"][0]
    speedup_cpu = med["pycocotools"][1] / med["faster_coco_eval"][1]
    print(
        f"coco_evaluate speed-up: {speedup:.1f}x wall, {speedup_cpu:.1f}x cpu; largest stat difference {worst:.1e}"
    )
    same = worst <= 1e-12
    print(
        f"targets: all 12 stats equal within 1e-12: {'met' if same else 'NOT met'}; "
        f">= 5x faster: {'met' if speedup >= 5 else 'NOT met'} (wall), {'met' if speedup_cpu >= 5 else 'NOT met'} (cpu)"
    )
    assert same, f"stats differ by up to {worst}"


if __name__ == "__main__":
    with recorded_run("coco_eval"):  # the table and the environment to benchmarks/results/
        main()
