"""What reproducible training costs on CPU, and which knobs change the bits.

    .venv/bin/python benchmarks/determinism.py [--repeats 7] [--data-repeats 3] [--threads 2]
                                               [--train-iters 40] [--train-repeats 2]

(a) Training step of the smoke model (configs/smoke.yaml: ResNet-18, 64-channel FPN, GN heads), batch 8 at
    160 px, 3 classes: forward, focal + box loss, backward, AdamW step, with ``torch.use_deterministic_algorithms``
    off and on (``train.deterministic``), interleaved, median of ``--repeats`` after a warm-up; wall and CPU.
(b) Bits: two steps from the same weights and batch give the same gradients (same thread count), and the
    gradients with 1 thread against ``--threads`` threads (max |difference|): the thread count is a
    source of run-to-run difference, which the same ``cpus_per_worker`` pins.
(c) Ray Data: one pass over the smoke training set (600 images, decode + augment in Ray Data tasks on a
    local Ray of 4 logical CPUs, tasks of 1 CPU) with ``data.deterministic`` off (rows in the order the
    tasks finish) and on (``preserve_order``: the seeded order), rows/s, interleaved, median of
    ``--data-repeats`` after a warm-up pass each; and whether two passes give the same image order.
(d) End to end: the demo's run (configs/smoke.yaml: 2 Ray Train workers, DDP over gloo, Ray Data decode tasks)
    for ``--train-iters`` iterations, one eval at the end on 8 val images, with ``data.deterministic`` off and
    on, interleaved, ``--train-repeats`` each: the run's wall time, its training images/s (median of the
    logged windows after the first) and the seconds the workers waited for data; and whether every run of a
    setting logged the same loss at every iteration (``--train-iters 0`` skips it).
Each run writes its table to ``benchmarks/results/determinism-<UTC time>.{md,json}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import interleaved_medians, load_average, write_results

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ray_retina.config import apply_overrides, load_config  # noqa: E402
from ray_retina.model import build_criterion, build_model  # noqa: E402


def _batch(n: int, size: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g) * 255
    xy = torch.rand(n, 4, 2, generator=g) * (size - 48)
    wh = 16 + torch.rand(n, 4, 2, generator=g) * 32
    boxes = torch.cat([xy, xy + wh], dim=-1)
    labels = torch.randint(0, k, (n, 4), generator=g)
    return images, boxes, labels


def step_parts(cfg, k: int = 3):  # noqa: ANN001, ANN201
    torch.manual_seed(0)
    model = build_model(cfg, k)
    criterion = build_criterion(cfg, k)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, boxes, labels = _batch(cfg.data.batch_size, 160, k)

    def grads() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        losses = criterion(model(images), boxes, labels, None, divide_by=1.0)
        sum(losses.values()).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    def step(deterministic: bool) -> None:
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        grads()
        opt.step()

    return grads, step


def _synth_in(tmp: str) -> dict[str, object]:
    """Overrides that put the smoke config's synthetic set (with 8 val images) under ``tmp``."""
    return {
        "data.root": f"{tmp}/synth",
        "data.train_shards": f"{tmp}/synth/shards/train",
        "data.val_shards": f"{tmp}/synth/shards/val",
        "data.synth.num_val": 8,
    }


def data_pass(cfg, deterministic: bool) -> list[int]:  # noqa: ANN001
    from ray_retina.data.datasets import build_dataset

    data = apply_overrides(cfg, {"data.deterministic": deterministic}).data
    ds = build_dataset(cfg.data.train_shards, data, train=True, seed=0)
    ids: list[int] = []
    for b in ds.iter_batches(batch_size=8, batch_format="numpy"):
        ids.extend(int(i) for i in b["image_id"])
    return ids


def train_run(cfg, tmp: str, name: str, deterministic: bool) -> dict:  # noqa: ANN001
    """One training run of ``cfg`` with ``data.deterministic`` set: wall s, images/s, data wait, losses."""
    from mlflow.tracking import MlflowClient

    from ray_retina.engine.trainer import train

    uri = f"sqlite:///{tmp}/mlflow.db"
    run_cfg = apply_overrides(
        cfg,
        {
            "data.deterministic": deterministic,
            "tracking.tracking_uri": uri,
            "run.storage_path": f"{tmp}/runs",
        },
    )
    t0 = time.perf_counter()
    out = train(run_cfg, run_name=name)
    wall = time.perf_counter() - t0
    if out.error is not None:
        raise RuntimeError(f"benchmark run {name} failed: {out.error}")
    client = MlflowClient(uri)

    def history(key: str) -> list[float]:
        points = sorted(client.get_metric_history(out.mlflow_run_id, key), key=lambda m: m.step)
        return [m.value for m in points]

    rates = history("train/images_per_s")[1:] or history("train/images_per_s")
    return {
        "wall_s": wall,
        "images_per_s": statistics.median(rates),
        "data_wait_s": sum(history("train/data_wait_s")),
        "losses": history("train/loss_cls") + history("train/loss_box"),
        "AP": out.metrics.get("val/AP"),
    }


def end_to_end(cfg, iters: int, repeats: int) -> dict:  # noqa: ANN001
    """(d): interleaved off/on training runs of the demo's shape on a local Ray of 4 logical CPUs."""
    import ray

    runs: dict[bool, list[dict]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        run_cfg = apply_overrides(
            cfg,
            {
                **_synth_in(tmp),
                "optim.max_iters": iters,
                "optim.steps": [iters],
                "train.eval_period": iters,
                "train.log_period": 5,
            },
        )
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            for i in range(repeats):
                for det in (False, True):
                    runs[det].append(train_run(run_cfg, tmp, f"bench-{int(det)}-{i}", det))
        finally:
            ray.shutdown()
    med = {
        det: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "images_per_s", "data_wait_s")}
        for det, rs in runs.items()
    }
    same = {det: all(r["losses"] == rs[0]["losses"] for r in rs) for det, rs in runs.items()}
    return {"median": med, "same_losses": same, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--data-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-iters", type=int, default=40)
    ap.add_argument("--train-repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = apply_overrides(load_config(ROOT / "configs" / "smoke.yaml"), {"data.batch_size": 8})
    grads, step = step_parts(cfg)
    wall, cpu = interleaved_medians(
        {"off": lambda: step(False), "on": lambda: step(True)}, repeats=args.repeats
    )
    torch.use_deterministic_algorithms(False)
    a, b = grads(), grads()
    same = all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    torch.set_num_threads(1)
    one = grads()
    torch.set_num_threads(args.threads)
    diff = max(float((x - y).abs().max()) for x, y in zip(one, a, strict=True))

    rows = [
        "| measure | off | on | on / off |",
        "|---|---|---|---|",
        f"| train step, wall s (median of {args.repeats}) | {wall['off']:.3f} | {wall['on']:.3f} | "
        f"{wall['on'] / wall['off']:.3f} |",
        f"| train step, CPU s | {cpu['off']:.3f} | {cpu['on']:.3f} | {cpu['on'] / cpu['off']:.3f} |",
    ]
    data: dict = {
        "step_wall": wall,
        "step_cpu": cpu,
        "same_bits_same_threads": same,
        "threads_max_diff": diff,
    }

    import ray

    from ray_retina.engine.session import ensure_data

    with tempfile.TemporaryDirectory() as tmp:
        dcfg = apply_overrides(
            cfg,
            {
                **_synth_in(tmp),
            },
        )
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            ensure_data(dcfg)
            orders: dict[bool, list[list[int]]] = {False: [], True: []}
            times: dict[bool, list[float]] = {False: [], True: []}
            for det in (False, True):  # warm-up pass each
                data_pass(dcfg, det)
            for _ in range(args.data_repeats):
                for det in (False, True):
                    t0 = time.perf_counter()
                    orders[det].append(data_pass(dcfg, det))
                    times[det].append(time.perf_counter() - t0)
        finally:
            ray.shutdown()
    n = len(orders[True][0])
    rate = {d: n / statistics.median(t) for d, t in times.items()}
    same_order = {d: all(o == orders[d][0] for o in orders[d]) for d in (False, True)}
    rows.append(
        f"| Ray Data pass, rows/s (median of {args.data_repeats}, {n} images) | {rate[False]:.1f} | "
        f"{rate[True]:.1f} | {rate[True] / rate[False]:.3f} |"
    )
    rows.append(
        f"| the same image order in every pass | {'yes' if same_order[False] else 'no'} | "
        f"{'yes' if same_order[True] else 'no'} | |"
    )
    if args.train_iters > 0:
        e2e = end_to_end(cfg, args.train_iters, args.train_repeats)
        med, same_losses = e2e["median"], e2e["same_losses"]
        label = f"demo run of {args.train_iters} iterations (2 workers), median of {args.train_repeats}"
        for key, what in (
            ("wall_s", "wall s"),
            ("images_per_s", "train images/s"),
            ("data_wait_s", "data wait s"),
        ):
            off, on = med[False][key], med[True][key]
            ratio = f"{on / off:.3f}" if off else "-"
            rows.append(f"| {label}: {what} | {off:.2f} | {on:.2f} | {ratio} |")
        rows.append(
            f"| the same loss at every iteration in every run | {'yes' if same_losses[False] else 'no'} | "
            f"{'yes' if same_losses[True] else 'no'} | |"
        )
        data["end_to_end"] = {
            "median": {str(k): v for k, v in med.items()},
            "same_losses": {str(k): v for k, v in same_losses.items()},
            "runs": {
                str(k): [{x: r[x] for x in ("wall_s", "images_per_s", "data_wait_s", "AP")} for r in v]
                for k, v in e2e["runs"].items()
            },
        }
    table = "\n".join(rows) + (
        f"\n\nTwo steps from the same weights, {args.threads} threads: same gradients bit for bit: "
        f"{'yes' if same else 'no'}. 1 thread against {args.threads}: max |grad difference| {diff:.3g} "
        f"({'identical' if diff == 0 else 'not identical: keep the thread count fixed'})."
    )
    print(table)
    data.update({"data_rows_per_s": rate, "same_order": same_order})
    write_results("determinism", table, data, note=f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
