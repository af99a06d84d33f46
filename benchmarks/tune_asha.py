"""ASHA vs FIFO on the same 8-trial focal search (same space, same seed), and MLflow tracking cost per report.

    .venv/bin/python benchmarks/tune_asha.py [--trials 8] [--rounds 8] [--eval-period 20] [--reduction-factor 4] [--out bench_out/tune]

Prints: total training iterations of each sweep and their ratio (target ASHA / FIFO <= 0.4), the best
val/AP of each (target: ASHA within 0.02 of FIFO), and the time per eval-period report of our tracking
(one `log_batch` request) vs Ray's `MLflowLoggerCallback` path (one `log_metric` request per metric after a
`get_run`), both against the same real `mlflow server` on 127.0.0.1 (medians of repeated reports).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REPORT_KEYS = [
    "val/AP",
    "val/AP50",
    "val/AP75",
    "val/APs",
    "val/APm",
    "val/APl",
    "val/AR1",
    "val/AR10",
    "val/AR100",
    "val/ARs",
    "val/ARm",
    "val/ARl",
    "val/num_images",
    "val/num_detections",
    "train/loss_cls",
    "train/loss_box",
    "train/lr",
    "train/images_per_s",
    "train/data_wait_s",
    "train/bad_steps",
    "data/skipped_images",
    "epoch",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(workdir: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{workdir / 'mlflow.db'}",
            "--artifacts-destination",
            str(workdir / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(180):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not start")


def tracking_overhead(url: str, reports: int) -> dict[str, float]:
    """Seconds per eval-period report of ~22 metrics: ours (log_batch) vs Ray's MLflowLoggerCallback path."""
    from mlflow.tracking import MlflowClient
    from ray.air._internal.mlflow import _MLflowLoggerUtil

    from ray_retina.tracking import RunLogger

    client = MlflowClient(url)
    exp = client.create_experiment(f"bench-tracking-{time.time_ns()}")
    ours_run = client.create_run(exp).info.run_id
    ray_run = client.create_run(exp).info.run_id
    ours = RunLogger(url, ours_run)
    ray_util = _MLflowLoggerUtil()
    ray_util.setup_mlflow(tracking_uri=url, experiment_id=exp)
    t_ours, t_ray = [], []
    for step in range(reports):
        metrics = {k: 0.001 * step + i for i, k in enumerate(REPORT_KEYS)}
        t0 = time.perf_counter()
        ours.log_metrics(metrics, step=step)
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ray_util.log_metrics(step=step, metrics_to_log=metrics, run_id=ray_run)
        t_ray.append(time.perf_counter() - t0)
    # Same data landed on both sides.
    assert (
        len(client.get_metric_history(ours_run, "val/AP"))
        == len(client.get_metric_history(ray_run, "val/AP"))
        == reports
    )
    return {
        "ours_s": statistics.median(t_ours),
        "ray_callback_s": statistics.median(t_ray),
        "metrics_per_report": len(REPORT_KEYS),
    }


def sweep(scheduler: str, args: argparse.Namespace, url: str, out: Path) -> dict[str, float]:
    from ray_retina.config import apply_overrides, load_config
    from ray_retina.sweep.run import run_sweep

    cfg = load_config(ROOT / "configs" / "tune_focal.yaml")
    cfg = apply_overrides(
        cfg,
        {
            "name": f"bench_{scheduler}",
            "data.root": str(out / "synth"),
            "data.train_shards": str(out / "synth" / "shards" / "train"),
            "data.val_shards": str(out / "synth" / "shards" / "val"),
            "data.synth": {
                "num_train": 128,
                "num_val": 32,
                "seed": 0,
                "min_image_size": 96,
                "max_image_size": 128,
                "min_object_size": 16,
                "max_object_size": 56,
                "max_objects": 3,
            },
            "data.train_min_size": [96, 96],
            "data.test_min_size": 96,
            "data.max_size": 128,
            "data.batch_size": 8,
            "data.deterministic": True,
            "model.fpn_channels": 32,
            "model.head_convs": 1,
            "optim.max_iters": args.rounds * args.eval_period,
            "optim.steps": [args.rounds * args.eval_period],
            "optim.warmup_iters": 5,
            "train.eval_period": args.eval_period,
            "train.log_period": args.eval_period,
            "tune.num_samples": args.trials,
            "tune.scheduler": scheduler,
            "tune.grace_period": 1,
            "tune.reduction_factor": args.reduction_factor,
            "tune.max_concurrent_trials": 2,
            "seed": 0,
            "run.storage_path": str(out / "runs"),
            "tracking.tracking_uri": url,
        },
    )
    t0 = time.perf_counter()
    s = run_sweep(cfg, sweep_name=f"bench-{scheduler}")
    print(f"\n{scheduler.upper()} sweep ({s.path}):\n{s.table}\n", flush=True)
    return {
        "total_iterations": s.total_iterations,
        "best_ap": s.best_ap or 0.0,
        "errors": s.num_errors,
        "seconds": time.perf_counter() - t0,
        "stopped_early": sum(r.stopped_early for r in s.rows),
        "path": str(s.path),
    }


def ap_curves(sweep_dir: Path) -> dict[int, list[float]]:
    """val/AP per eval round of each trial, by its index in the search (Tune's trial-name suffix)."""
    curves = {}
    for f in sorted(sweep_dir.glob("_trial_*/result.json")):
        index = int(f.parent.name.split("_")[3])  # _trial_<id>_<00000 index>_<n>_<params>...
        curves[index] = [json.loads(line)["val/AP"] for line in f.read_text().splitlines() if line.strip()]
    return curves


def from_results(sweep_dir: Path, rounds: int) -> dict[str, float]:
    """The FIFO numbers of a finished sweep, from Tune's per-trial result.json files."""
    iters, best, n = 0, 0.0, 0
    for f in sweep_dir.glob("_trial_*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows:
            iters += int(rows[-1]["iteration"])
            best = max(best, max(r["val/AP"] for r in rows[-1:]))
            n += 1
    return {
        "total_iterations": iters,
        "best_ap": best,
        "errors": 0,
        "seconds": float("nan"),
        "stopped_early": 0,
        "trials": n,
        "path": str(sweep_dir),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--eval-period", type=int, default=20)
    ap.add_argument("--reduction-factor", type=int, default=4, help="ASHA's (Ray's default: 4)")
    ap.add_argument("--reports", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "bench_out" / "tune"))
    ap.add_argument(
        "--reuse-fifo",
        default=None,
        metavar="SWEEP_DIR",
        help="take the FIFO numbers from a finished FIFO sweep's Tune directory",
    )
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import ray

    from ray_retina.engine.session import TRIAL_RESOURCE

    proc, url = start_mlflow_server(out)
    try:
        track = tracking_overhead(url, args.reports)
        print(
            f"tracking per report ({track['metrics_per_report']} metrics): ours {1000 * track['ours_s']:.1f} ms, "
            f"Ray MLflowLoggerCallback path {1000 * track['ray_callback_s']:.1f} ms, "
            f"ratio {track['ray_callback_s'] / track['ours_s']:.1f}x"
        )
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            resources={TRIAL_RESOURCE: 16},
        )
        fifo = (
            from_results(Path(args.reuse_fifo), args.rounds)
            if args.reuse_fifo
            else sweep("fifo", args, url, out)
        )
        asha = sweep("asha", args, url, out)
        ray.shutdown()
    finally:
        proc.terminate()
    ratio = asha["total_iterations"] / max(1, fifo["total_iterations"])
    # Same trial, same curve: with data.deterministic each ASHA trial must repeat its FIFO twin's val/AP
    # round for round as far as ASHA let it run (else the comparison measures noise, not the scheduler).
    fifo_c, asha_c = ap_curves(Path(fifo["path"])), ap_curves(Path(asha["path"]))
    print(f"{'trial':<7}{'FIFO val/AP per round':<60}ASHA rounds  same curve")
    same = 0
    for i in sorted(fifo_c):
        a = asha_c.get(i, [])
        ok = len(a) > 0 and all(abs(x - y) < 1e-9 for x, y in zip(a, fifo_c[i], strict=False))
        same += ok
        print(f"{i:<7}{' '.join(f'{x:.3f}' for x in fifo_c[i]):<60}{len(a):>11}  {'yes' if ok else 'NO'}")
    print(f"ASHA curves equal to FIFO's: {same}/{len(fifo_c)}")
    print(f"{'sweep':<6}{'iterations':>12}{'best val/AP':>13}{'stopped early':>15}{'seconds':>10}")
    for name, r in (("FIFO", fifo), ("ASHA", asha)):
        print(
            f"{name:<6}{r['total_iterations']:>12}{r['best_ap']:>13.4f}{r['stopped_early']:>15}{r['seconds']:>10.0f}"
        )
    print(
        f"ASHA / FIFO iterations: {ratio:.2f} (target <= 0.4); best AP gap FIFO - ASHA: "
        f"{fifo['best_ap'] - asha['best_ap']:+.4f} (target <= 0.02)"
    )
    (out / "result.json").write_text(
        json.dumps(
            {
                "fifo": fifo,
                "asha": asha,
                "tracking": track,
                "ratio": ratio,
                "fifo_curves": fifo_c,
                "asha_curves": asha_c,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
