"""ASHA vs FIFO on the same 8-trial focal search (same space, same seed), and MLflow tracking cost per report.

    .venv/bin/python benchmarks/tune_asha.py [--trials 8] [--rounds 8] [--eval-period 20] [--reduction-factor 4] [--out bench_out/tune]
    .venv/bin/python benchmarks/tune_asha.py --reuse-fifo SWEEP_DIR   # FIFO from a finished sweep, said so

With ``--reuse-fifo`` the table says where the FIFO numbers came from and gives its wall time as the span of
its reports' timestamps (as it does for both sweeps beside the measured wall time). The table and the
environment go to ``benchmarks/results/tune_asha-<UTC time>.{md,json}``.

Prints: total training iterations of each sweep and their ratio (target ASHA / FIFO <= 0.4), the best
val/AP of each (the best round of any trial, both sweeps read by the same rule from their trials'
``result.json``; target: ASHA within 0.02 of FIFO), and the time per eval-period report of our tracking
(one `log_batch` request) vs Ray's `MLflowLoggerCallback` path (one `log_metric` request per metric after a
`get_run`), both against the same real `mlflow server` on 127.0.0.1 (medians of repeated reports).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _common import write_results  # noqa: E402  (benchmarks/, this script's folder)

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
        "seconds": time.perf_counter() - t0,
        "errors": s.num_errors,
        "path": str(s.path),
        "source": "this run",
    }


def _trial_results(sweep_dir: Path) -> dict[int, list[dict]]:
    """Each trial's reports (Tune's ``result.json``, one line per eval round), by its index in the search
    (the number after the trial id in Tune's trial folder name, ``..._trial_<id>_<index>_...``)."""
    out = {}
    for f in sorted(sweep_dir.glob("*trial_*/result.json")):
        m = re.search(r"trial_[0-9a-f]+_(\d+)", f.parent.name)
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if m and rows:
            out[int(m.group(1))] = rows
    return out


def ap_curves(sweep_dir: Path) -> dict[int, list[float]]:
    """val/AP per eval round of each trial, by its index in the search."""
    return {i: [r["val/AP"] for r in rows] for i, rows in _trial_results(sweep_dir).items()}


def from_results(sweep_dir: Path, rounds: int) -> dict[str, float]:
    """A finished sweep's numbers from its trials' ``result.json`` files, the one rule for FIFO and ASHA:
    iterations = the sum of each trial's last reported iteration; best val/AP = the best round of any trial
    (and, beside it, the best last round, which the sweep summary ranks by); trials stopped early = those
    with fewer than ``rounds`` reports; wall seconds from the reports' timestamps (first trial start to last
    report: Ray's start and the data preparation are outside it)."""
    trials = _trial_results(sweep_dir)
    if not trials:
        raise SystemExit(f"{sweep_dir}: no trial result.json files (not a Tune sweep directory?)")
    starts = [rows[0]["timestamp"] - rows[0].get("time_this_iter_s", 0.0) for rows in trials.values()]
    ends = [rows[-1]["timestamp"] for rows in trials.values()]
    return {
        "total_iterations": sum(int(rows[-1]["iteration"]) for rows in trials.values()),
        "best_ap": max(max(r["val/AP"] for r in rows) for rows in trials.values()),
        "best_ap_last_round": max(rows[-1]["val/AP"] for rows in trials.values()),
        "seconds_from_timestamps": max(ends) - min(starts),
        "stopped_early": sum(len(rows) < rounds for rows in trials.values()),
        "trials": len(trials),
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
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            resources={TRIAL_RESOURCE: 16},
        )
        if args.reuse_fifo:
            fifo = {
                "seconds": None,
                "errors": None,
                "path": args.reuse_fifo,
                "source": f"reused: a finished FIFO sweep's result.json files in {args.reuse_fifo}",
            }
        else:
            fifo = sweep("fifo", args, url, out)
        asha = sweep("asha", args, url, out)
        ray.shutdown()
    finally:
        proc.terminate()
    # One rule for both sweeps, read from their result.json files (fresh or reused alike).
    for r in (fifo, asha):
        r.update(from_results(Path(r["path"]), args.rounds))
    ratio = asha["total_iterations"] / max(1, fifo["total_iterations"])
    # Same trial, same curve: with data.deterministic each ASHA trial must repeat its FIFO twin's val/AP
    # round for round as far as ASHA let it run (else the comparison measures noise, not the scheduler).
    fifo_c, asha_c = ap_curves(Path(fifo["path"])), ap_curves(Path(asha["path"]))
    lines = [
        f"tracking per report ({track['metrics_per_report']} metrics): ours {1000 * track['ours_s']:.1f} ms, "
        f"Ray MLflowLoggerCallback path {1000 * track['ray_callback_s']:.1f} ms, "
        f"ratio {track['ray_callback_s'] / track['ours_s']:.1f}x",
        f"FIFO numbers: {fifo['source']}",
        f"{'trial':<7}{'FIFO val/AP per round':<60}ASHA rounds  same curve",
    ]
    same = 0
    for i in sorted(fifo_c):
        a = asha_c.get(i, [])
        ok = len(a) > 0 and all(abs(x - y) < 1e-9 for x, y in zip(a, fifo_c[i], strict=False))
        same += ok
        lines.append(
            f"{i:<7}{' '.join(f'{x:.3f}' for x in fifo_c[i]):<60}{len(a):>11}  {'yes' if ok else 'NO'}"
        )
    lines.append(f"ASHA curves equal to FIFO's: {same}/{len(fifo_c)}")
    lines.append(
        f"{'sweep':<6}{'iterations':>12}{'best val/AP':>13}{'(last round)':>14}{'stopped early':>15}"
        f"{'wall s':>9}{'report span s':>15}"
    )
    for name, r in (("FIFO", fifo), ("ASHA", asha)):
        wall = "n/a" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(
            f"{name:<6}{r['total_iterations']:>12}{r['best_ap']:>13.4f}{r['best_ap_last_round']:>14.4f}"
            f"{r['stopped_early']:>15}{wall:>9}{r['seconds_from_timestamps']:>15.0f}"
        )
    lines.append(
        f"ASHA / FIFO iterations: {ratio:.2f} (target <= 0.4); best AP gap FIFO - ASHA (best round of any "
        f"trial, both sweeps): {fifo['best_ap'] - asha['best_ap']:+.4f} (target <= 0.02)"
    )
    print("\n".join(lines), flush=True)
    write_results(
        "tune_asha",
        "```\n" + "\n".join(lines) + "\n```",
        {
            "args": vars(args),
            "fifo": fifo,
            "asha": asha,
            "tracking": track,
            "ratio": ratio,
            "fifo_curves": fifo_c,
            "asha_curves": asha_c,
        },
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
