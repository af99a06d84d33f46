"""What distribution costs per training step at the smoke config (configs/smoke.yaml), on this machine.

    .venv/bin/python benchmarks/ddp_overhead.py [--part a|b|both] [--steps 20] [--ray-iters 80] [--eval-period 20]

(a) DDP. Our `Engine.train_step` (smoke model, our criterion, AdamW, grad clipping) on random uint8 images of
    the smoke training size (8 x 3 x 160 x 192 per worker, 1-5 boxes each), 1 thread per worker:
      1 worker   plain model in one process (what Ray Train's worker does with world size 1);
      2 workers  torch.multiprocessing, gloo on 127.0.0.1, DistributedDataParallel, same per-worker batch;
      2, no_sync the same inside ``model.no_sync()``: no gradient all-reduce (the loss's num_fg all-reduce
                 and the finite-loss agreement stay).
    Communication share = (2 workers - 2 no_sync) / 2 workers: the all-reduce time DDP could not hide
    behind the backward pass.
(b) Ray Train. The real thing, `ray_retina.engine.trainer.train` (our train_loop_per_worker: Ray Data
    ingest, DDP over 2 Ray workers, one `ray.train.report` + checkpoint per eval period, MLflow) on the
    smoke data set (600 synthetic images, made under a temporary directory), against a bare loop: the same
    2-process DDP `Engine.train_step` on the same training images, decoded, augmented and collated in
    advance. Ray's step time comes from its own metrics (``train/images_per_s`` per eval period: the
    training steps and data waits of the window) and from the MLflow timestamps of the eval-period reports
    (adding eval, report and checkpoint); the first window (start-up) is left out.
    Ray's overhead per step = (ray step - bare step) / bare step. Target: <= 5%.

(a) gives medians of per-step times; (b) compares means (Ray reports totals per eval period), the bare loop
run once before and once after Ray. Wall and CPU times: on a shared machine CPU time is the steadier one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import recorded_run

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"
IMAGE_HW = (160, 192)  # smoke: shorter side 112..144, longer <= 192, padded to multiples of 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke_config(**over: Any):
    from ray_retina.config import apply_overrides, load_config

    return apply_overrides(load_config(SMOKE), {"train.threads_per_worker": 1, **over})


def random_batches(n: int, batch: int, num_classes: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Collated batches as RetinaCollate makes them, with random pixels and 1-5 boxes of 12-64 px."""
    g = torch.Generator().manual_seed(seed)
    h, w = IMAGE_HW
    out = []
    for _ in range(n):
        g_max = 5
        count = torch.randint(1, g_max + 1, (batch,), generator=g)
        wh = torch.randint(12, 65, (batch, g_max, 2), generator=g).float()
        xy = torch.rand(batch, g_max, 2, generator=g) * (torch.tensor([w, h]) - wh)
        valid = torch.arange(g_max)[None] < count[:, None]
        labels = torch.randint(0, num_classes, (batch, g_max), generator=g)
        out.append(
            {
                "images": torch.randint(0, 256, (batch, 3, h, w), generator=g, dtype=torch.uint8),
                "image_sizes": torch.tensor([[h, w]] * batch),
                "gt_boxes": torch.cat([xy, xy + wh], -1) * valid[..., None],
                "gt_labels": torch.where(valid, labels, -1),
                "gt_crowd": torch.zeros(batch, g_max, dtype=torch.bool),
                "image_id": torch.arange(batch),
                "scale": torch.ones(batch),
            }
        )
    return out


def _init_worker(rank: int, world: int, port: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        dist.init_process_group("gloo", rank=rank, world_size=world)


def _engine(cfg, rank: int, world: int):  # noqa: ANN001, ANN202
    from ray_retina.data.synthetic import CATEGORIES
    from ray_retina.engine.loop import Engine, seed_everything
    from ray_retina.model import build_criterion, build_model, build_postprocessor

    k = len(CATEGORIES)
    seed_everything(cfg.seed + rank)
    model = build_model(cfg, k)
    if world > 1:
        # Ray Train's prepare_model: DistributedDataParallel with its defaults.
        model = torch.nn.parallel.DistributedDataParallel(model)
    return Engine(
        cfg,
        model,
        build_criterion(cfg, k),
        build_postprocessor(cfg),
        torch.device("cpu"),
        [c[0] for c in CATEGORIES],
    )


def _timed_steps(engine, batches, warmup: int, no_sync: bool) -> list[tuple[float, float]]:  # noqa: ANN001
    """(wall, cpu) seconds of each step after `warmup`; cpu is this process's, all threads (gloo's too)."""
    import contextlib

    times = []
    for i, batch in enumerate(batches):
        ctx = engine.model.no_sync() if no_sync else contextlib.nullcontext()
        t0, c0 = time.perf_counter(), time.process_time()
        with ctx:
            engine.train_step(batch)
        if i >= warmup:
            times.append((time.perf_counter() - t0, time.process_time() - c0))
    return times


def _ddp_worker(rank: int, world: int, port: int, job: dict[str, Any], queue) -> None:  # noqa: ANN001
    _init_worker(rank, world, port)
    cfg = smoke_config(**job.get("overrides", {}))
    engine = _engine(cfg, rank, world)
    if job["kind"] == "random":
        from ray_retina.data.synthetic import CATEGORIES

        batches = random_batches(
            job["warmup"] + job["steps"], cfg.data.batch_size, len(CATEGORIES), 1000 + rank
        )
    else:
        batches = torch.load(job["batches"][rank], weights_only=True)
    times = _timed_steps(engine, batches, job["warmup"], job.get("no_sync", False))
    queue.put((rank, times))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run_workers(world: int, job: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Per-step wall and CPU times of `job` on `world` processes, each the mean over ranks. (Not the max:
    the ranks meet inside a step, so the time one rank's step waits at the first collective is the tail of
    the other's previous step; the max would count that skew twice.)"""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    mp.start_processes(_ddp_worker, args=(world, port, job, queue), nprocs=world, start_method="spawn")
    per_rank = dict(queue.get() for _ in range(world))
    steps = list(zip(*per_rank.values(), strict=True))
    return [sum(w for w, _ in st) / world for st in steps], [sum(c for _, c in st) / world for st in steps]


def _fmt(x: float) -> str:
    return f"{x * 1000:9.0f}"


# ------------------------------------------------------------------------------------------------- (a)


def part_a(args: argparse.Namespace) -> dict[str, float]:
    cfg = smoke_config()
    job = {"kind": "random", "warmup": args.warmup, "steps": args.steps}
    setups = {
        "1 worker": (1, job),
        "2 workers DDP": (2, job),
        "2 workers DDP, no_sync": (2, {**job, "no_sync": True}),
    }
    wall: dict[str, list[float]] = {k: [] for k in setups}
    cpu: dict[str, list[float]] = {k: [] for k in setups}
    # Rounds interleave the three set-ups, so that a change of load on a shared machine hits all of them.
    for _ in range(args.rounds):
        for name, (world, j) in setups.items():
            w, c = run_workers(world, j)
            wall[name] += w
            cpu[name] += c
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    from ray_retina.data.synthetic import CATEGORIES
    from ray_retina.model import build_model

    params = sum(p.numel() for p in build_model(cfg, len(CATEGORIES)).parameters() if p.requires_grad)
    b = cfg.data.batch_size
    n = args.steps * args.rounds
    print(
        f"\n(a) DDP, smoke model ({cfg.model.backbone}, FPN {cfg.model.fpn_channels}), batch {b} x 3 x "
        f"{IMAGE_HW[0]} x {IMAGE_HW[1]} per worker, 1 thread per worker, gloo; median of {n} steps "
        f"({args.rounds} rounds x {args.steps})"
    )
    print(f"gradient all-reduced per step: {params / 1e6:.2f} M params = {params * 4 / 2**20:.1f} MiB fp32")
    print(f"{'':<26}{'wall ms':>9}{'cpu ms':>9}{'images/s':>10}{'wall vs 1':>11}")
    t1 = med["1 worker"]
    for name, (world, _) in setups.items():
        t = med[name]
        print(f"{name:<26}{_fmt(t)}{_fmt(med_cpu[name])}{world * b / t:>10.1f}{t / t1:>10.2f}x")
    t2, t2n = med["2 workers DDP"], med["2 workers DDP, no_sync"]
    comm = (t2 - t2n) / t2
    comm_cpu = (med_cpu["2 workers DDP"] - med_cpu["2 workers DDP, no_sync"]) / med_cpu["2 workers DDP"]
    print(
        f"communication share of the 2-worker step (all-reduce not hidden by backward): {100 * comm:.1f}% wall, "
        f"{100 * comm_cpu:.1f}% cpu; scaling efficiency (2-worker throughput / 2 x 1-worker): {100 * t1 / t2:.0f}%"
    )
    return {"t1": t1, "t2": t2, "t2_nosync": t2n, "comm": comm}


# ------------------------------------------------------------------------------------------------- (b)


def prepare_bare_batches(cfg, world: int, steps: int, out_dir: Path) -> tuple[list[str], float]:  # noqa: ANN001
    """The training images of the run, decoded and augmented as Ray Data does (same function, same seeds,
    epoch by epoch), split by rank, collated; saved one file per rank. Returns the files and the seconds
    per batch that decode + augment + collate took here (what a loop without a data pool would add)."""
    import numpy as np
    import pyarrow.parquet as pq

    from ray_retina.data.augment import READ_COLUMNS, augment_batch
    from ray_retina.data.collate import RetinaCollate
    from ray_retina.data.datasets import augment_kwargs
    from ray_retina.data.shards import read_manifest, shard_files

    manifest = read_manifest(cfg.data.train_shards)
    cat_ids = [int(c["id"]) for c in manifest["categories"]]
    table = pq.read_table(shard_files(cfg.data.train_shards, manifest), columns=READ_COLUMNS)
    rows = {c: table.column(c).to_numpy(zero_copy_only=False) for c in READ_COLUMNS}
    n = len(rows["image_id"])
    collate = RetinaCollate(size_divisibility=cfg.data.size_divisibility)
    kwargs = augment_kwargs(cfg.data, train=True, cat_ids=cat_ids, seed=cfg.seed)
    b = cfg.data.batch_size
    per_rank: list[list[dict[str, torch.Tensor]]] = [[] for _ in range(world)]
    epoch, spent, made = 0, 0.0, 0
    while len(per_rank[0]) < steps:
        order = np.random.default_rng(epoch).permutation(n)
        for rank in range(world):
            mine = order[rank::world]
            for s in range(0, len(mine) - b + 1, b):
                idx = mine[s : s + b]
                t0 = time.perf_counter()
                aug = augment_batch({c: v[idx] for c, v in rows.items()}, epoch=epoch, **kwargs)
                per_rank[rank].append(collate(aug))
                spent += time.perf_counter() - t0
                made += 1
        epoch += 1
    files = []
    for rank in range(world):
        path = out_dir / f"bare_batches_rank{rank}.pt"
        torch.save(per_rank[rank][:steps], path)
        files.append(str(path))
    return files, spent / made


class TreeCpuSampler:
    """CPU seconds (user + system) used by the processes below this one (the local Ray instance: GCS,
    raylet, agents, train workers, Ray Data tasks), per kind of process, sampled every `interval` s in a
    thread.

    On a shared machine the wall time of a step moves with everyone else's load; the CPU time the Ray
    instance spends per step moves much less. A process that exits keeps the CPU of its last sample.
    """

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, interval: float = 1.0) -> None:
        import threading

        self.interval = interval
        self.samples: list[tuple[float, dict[str, float]]] = []  # (unix time, cpu s so far per kind)
        self._last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def kind(pid: int) -> str:
        """'RayTrainWorker', 'raylet', 'gcs_server', 'dashboard/agent.py', ... from the command line."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").replace("\0", " ").split()
        except OSError:
            return "?"
        if not argv:
            return "?"
        if argv[0].startswith("ray::"):  # Ray workers rename themselves: ray::<actor or task>[.<method>]
            return argv[0][5:].split(".")[0].split("(")[0]
        exe = argv[0].rsplit("/", 1)[-1]
        if exe.startswith("python") and len(argv) > 1:
            script = next((a for a in argv[1:] if not a.startswith("-")), "")
            return "/".join(script.rsplit("/", 2)[-2:]) or exe
        return exe

    def _scan(self) -> dict[str, float]:
        me = os.getpid()
        parent: dict[int, int] = {}
        cpu: dict[int, float] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(entry)
            parent[pid] = int(rest[1])
            cpu[pid] = (int(rest[11]) + int(rest[12])) / self.TICK
        for pid, c in cpu.items():
            p, seen = parent.get(pid, 0), 0
            while p not in (0, 1, me) and seen < 64:
                p, seen = parent.get(p, 0), seen + 1
            if p == me and pid != me:
                # An idle Ray worker that picks up a task renames itself: the kind of its latest title.
                self._last[pid] = (self.kind(pid), c)
        total: dict[str, float] = {}
        for k, c in self._last.values():
            total[k] = total.get(k, 0.0) + c
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self._scan()))
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeCpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, t: float) -> dict[str, float]:
        """CPU seconds per kind at unix time `t`, interpolated between samples."""
        import bisect

        times = [x for x, _ in self.samples]
        i = bisect.bisect_left(times, t)
        if i == 0 or i >= len(times):
            return dict(self.samples[0 if i == 0 else -1][1])
        (t0, c0), (t1, c1) = self.samples[i - 1], self.samples[i]
        a = (t - t0) / max(t1 - t0, 1e-9)
        return {k: c0.get(k, 0.0) + (c1.get(k, 0.0) - c0.get(k, 0.0)) * a for k in c0.keys() | c1.keys()}

    def between(self, t0: float, t1: float) -> dict[str, float]:
        a, b = self.at(t0), self.at(t1)
        return {k: b.get(k, 0.0) - a.get(k, 0.0) for k in a.keys() | b.keys()}


def ray_window_times(uri: str, run_id: str, cfg) -> list[dict[str, float]]:  # noqa: ANN001
    """Per eval period of the Ray run: training seconds (steps + data waits), data wait seconds, and the
    wall seconds between consecutive eval-period reports (MLflow timestamps of val/AP)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)

    def hist(key: str) -> dict[int, Any]:
        return {m.step: m for m in client.get_metric_history(run_id, key)}

    ips, wait, ap = hist("train/images_per_s"), hist("train/data_wait_s"), hist("val/AP")
    world, b = cfg.scaling.num_workers, cfg.data.batch_size
    out, prev = [], 0
    for it in sorted(ips):
        out.append(
            {
                "iteration": it,
                "steps": it - prev,
                "train_s": (it - prev) * b * world / ips[it].value,
                "wait_s": wait[it].value,
                # Rank 0 logs val/AP right after the eval, before ray.train.report: report k-1, window k, eval k.
                "t_start": ap[prev].timestamp / 1000.0 if prev in ap else float("nan"),
                "t_end": ap[it].timestamp / 1000.0,
            }
        )
        prev = it
    for w in out:
        w["between_reports_s"] = w["t_end"] - w["t_start"]
    return out


def part_b(args: argparse.Namespace) -> dict[str, float]:
    import ray

    from ray_retina.engine.session import TRIAL_RESOURCE, ensure_data, resolve_paths
    from ray_retina.engine.trainer import train

    tmp = Path(tempfile.mkdtemp(prefix="rr-ddp-bench-"))
    period, iters = args.eval_period, args.ray_iters
    if iters < 2 * period:
        raise SystemExit("--ray-iters must cover at least two eval periods (the first one is start-up)")
    cfg = resolve_paths(
        smoke_config(
            **{
                "name": "bench_ddp_overhead",
                "data.root": str(tmp / "synth"),
                "data.train_shards": str(tmp / "synth" / "shards" / "train"),
                "data.val_shards": str(tmp / "synth" / "shards" / "val"),
                "data.val_max_images": args.val_images,
                "optim.max_iters": iters,
                "optim.steps": [iters],
                "train.eval_period": period,
                "train.log_period": period,
                "run.storage_path": str(tmp / "runs"),
                "tracking.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
            }
        )
    )
    ensure_data(cfg)
    world, b = cfg.scaling.num_workers, cfg.data.batch_size
    steps = iters - period  # what Ray's windows 2.. cover
    files, prep_s = prepare_bare_batches(cfg, world, args.warmup + steps, tmp)
    job = {"kind": "files", "batches": files, "warmup": args.warmup, "steps": steps}

    # The bare loop runs before and after Ray, so that a change of load on a shared machine shows.
    bare_before, cpu_before = run_workers(world, job)
    # Ray here, not in train(): on 127.0.0.1, 4 logical CPUs (smoke's run.ray_num_cpus), in this process,
    # so that ray.shutdown() stops exactly this instance.
    ray.init(
        address="local",
        num_cpus=cfg.run.ray_num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        resources={TRIAL_RESOURCE: 64},
    )
    try:
        t0 = time.perf_counter()
        with TreeCpuSampler() as sampler:
            outcome = train(cfg, run_name="ray")
        ray_total = time.perf_counter() - t0
    finally:
        ray.shutdown()
    assert outcome.error is None, outcome.error
    bare_after, cpu_after = run_workers(world, job)

    windows = ray_window_times(outcome.mlflow_uri, outcome.mlflow_run_id, cfg)
    measured = windows[1:]  # window 1 carries the start-up (worker group, first Ray Data execution)
    assert sum(w["steps"] for w in measured) == steps
    ray_step = sum(w["train_s"] for w in measured) / steps
    ray_wait = sum(w["wait_s"] for w in measured) / steps
    ray_full = sum(w["between_reports_s"] for w in measured) / steps
    per_report = sum(w["between_reports_s"] - w["train_s"] for w in measured) / len(measured)
    bare = statistics.mean(bare_before + bare_after)
    # CPU of the whole Ray instance from the report that ends window 1 to the last one (windows 2.., with
    # their evals, reports and checkpoints) against the bare loop's CPU of the same steps on both ranks.
    by_kind = {
        k: v / steps for k, v in sampler.between(measured[0]["t_start"], measured[-1]["t_end"]).items()
    }
    ray_cpu = sum(by_kind.values())
    bare_cpu = world * statistics.mean(cpu_before + cpu_after)

    smoke_period = smoke_config().train.eval_period
    print(
        f"\n(b) Ray Train loop vs bare PyTorch loop, smoke config: {world} workers x batch {b}, 1 thread each, "
        f"gloo, DDP; Ray with {cfg.run.ray_num_cpus} logical CPUs (train workers + Ray Data decode tasks)"
    )
    print(
        f"Ray run: {iters} iterations, eval + report + checkpoint every {period} (smoke: {smoke_period}), "
        f"val on {args.val_images} images, {ray_total:.0f} s in all"
    )
    for w in windows:
        print(
            f"  window to it {int(w['iteration']):>4}: steps {w['train_s']:6.1f} s (of which data wait "
            f"{w['wait_s']:5.1f} s), report to report {w['between_reports_s']:6.1f} s"
        )
    print(
        f"bare loop: the same {steps} steps on the same images (decoded in advance), {args.warmup} warm-up; "
        f"before Ray mean {_fmt(statistics.mean(bare_before)).strip()} ms (median "
        f"{_fmt(statistics.median(bare_before)).strip()}), after Ray mean "
        f"{_fmt(statistics.mean(bare_after)).strip()} ms (median {_fmt(statistics.median(bare_after)).strip()}); "
        f"cpu per rank median {_fmt(statistics.median(cpu_before + cpu_after)).strip()} ms"
    )
    print(f"\nper step, steps {period + 1}..{iters} (ms){'bare':>9}{'ray':>9}{'overhead':>10}")
    rows = [
        ("training steps incl. data waits", ray_step),
        ("+ eval/report/checkpoint every " + str(period), ray_full),
    ]
    at_smoke = ray_step + per_report / smoke_period
    rows.append((f"+ the same every {smoke_period} (smoke)", at_smoke))
    for label, r in rows:
        print(f"{label:<38}{_fmt(bare)}{_fmt(r)}{100 * (r - bare) / bare:>9.1f}%")
    print(
        f"Ray Data wait inside the Ray step: {_fmt(ray_wait).strip()} ms; eval ({args.val_images} images) + "
        f"report + checkpoint: {per_report:.1f} s per period; decode + augment + collate of a batch "
        f"in one process: {prep_s * 1000:.0f} ms (Ray Data does it beside the workers)"
    )
    print(
        f"{'cpu, all processes (ray: whole instance)':<38}{_fmt(bare_cpu)}{_fmt(ray_cpu)}"
        f"{100 * (ray_cpu - bare_cpu) / bare_cpu:>9.1f}%   (ray includes eval/report/checkpoint every {period})"
    )
    shown = sorted(((v, k) for k, v in by_kind.items() if v >= 0.002), reverse=True)
    print("  ray cpu per step by process: " + ", ".join(f"{k} {v * 1000:.0f} ms" for v, k in shown))
    overhead = (ray_step - bare) / bare
    print(
        f"target: Ray Train loop overhead <= 5% of the step: {'met' if overhead <= 0.05 else 'NOT met'} "
        f"({100 * overhead:.1f}% per training step; {100 * (at_smoke - bare) / bare:.1f}% with smoke's "
        f"report cadence)"
    )
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "bare": bare,
        "ray": ray_step,
        "ray_full": ray_full,
        "overhead": overhead,
        "cpu_overhead": ray_cpu / bare_cpu - 1,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["a", "b", "both"], default="both")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration in (a)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="rounds over the three set-ups of (a)")
    ap.add_argument("--ray-iters", type=int, default=80)
    ap.add_argument("--eval-period", type=int, default=20)
    ap.add_argument("--val-images", type=int, default=16)
    args = ap.parse_args()
    print(
        f"load average before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} "
        f"on {os.cpu_count()} cores"
    )
    if args.part in ("a", "both"):
        part_a(args)
    if args.part in ("b", "both"):
        part_b(args)
    print(f"load average after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    with recorded_run("ddp_overhead"):  # the table and the environment to benchmarks/results/
        main()
