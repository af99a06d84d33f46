"""Wall time of a `ray-retina train` run whose MLflow server is SIGKILLed mid-run and started again, against
the same run with the server up throughout (target: within 10 %).

    .venv/bin/python benchmarks/tracking_outage.py [--rounds 3] [--iters 30] [--down-s 5]

Each round runs both, undisturbed first then disturbed, on the tiny synthetic set of the tests (2 workers,
the same config and shards), each against a real `mlflow server` on 127.0.0.1 (SQLite store, one worker).
The disturbed run's server is killed once MLflow holds 2 of its train/lr points, kept down ``--down-s``
seconds and started again on the same port and store (its start adds several seconds of outage). Prints the
wall time of every run, the medians and their ratio, and checks that every metric point reached MLflow;
the table and the environment go to ``benchmarks/results/tracking_outage-<UTC time>.{md,json}``.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from _common import write_results  # noqa: E402  (benchmarks/, this script's folder)
from _mlflow_server import MlflowServer, train_against  # noqa: E402  (tests/: the e2e test's helpers)

from ray_retina.config import to_yaml  # noqa: E402
from ray_retina.engine.session import ensure_data  # noqa: E402

from _train_utils import tiny_config  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_points(server: MlflowServer, run_name: str, iters: int, eval_period: int) -> bool:
    """Every train/lr point of the run reached MLflow: one per step plus one per eval."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.url)
    exp = client.get_experiment_by_name("outage")
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.runName` = '{run_name}'")
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/lr"))
    return steps == sorted([*range(1, iters + 1), *range(eval_period, iters + 1, eval_period)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--down-s", type=float, default=5.0)
    args = ap.parse_args()
    eval_period = args.iters // 2
    tmp = Path(tempfile.mkdtemp(prefix="tracking_outage-"))
    cfg = tiny_config(
        tmp,
        "",
        name="outage",
        **{
            "optim.max_iters": args.iters,
            "optim.steps": [args.iters],
            "train.eval_period": eval_period,
            "train.log_period": 1,
            "tracking.tracking_uri": None,
        },
    )
    ensure_data(cfg)
    config_file = tmp / "outage.yaml"
    config_file.write_text(to_yaml(cfg))
    rows, walls = [], {"undisturbed": [], "server killed": []}
    for r in range(args.rounds):
        for label, kill in (("undisturbed", None), ("server killed", 2)):
            server = MlflowServer(tmp / f"mlflow-{r}-{label.split()[0]}", _free_port())
            server.start()
            try:
                name = f"r{r}-{label.split()[0]}"
                run = train_against(server, config_file, name, kill_after_points=kill, down_s=args.down_s)
                complete = run.returncode == 0 and _all_points(server, name, args.iters, eval_period)
            finally:
                server.kill()
            walls[label].append(run.wall_s)
            rows.append((r, label, run.wall_s, run.down_s, complete))
            print(
                f"round {r} {label:13s} wall {run.wall_s:6.1f} s  server down {run.down_s:5.1f} s  "
                f"all points in MLflow: {complete}",
                flush=True,
            )
    med = {k: statistics.median(v) for k, v in walls.items()}
    ratio = med["server killed"] / med["undisturbed"]
    lines = [
        "| round | run | wall s | server down s | every point in MLflow |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {r} | {label} | {w:.1f} | {d:.1f} | {c} |" for r, label, w, d, c in rows],
        "",
        f"median wall: undisturbed {med['undisturbed']:.1f} s, server killed {med['server killed']:.1f} s: "
        f"ratio {ratio:.3f} (target <= 1.10)",
    ]
    table = "\n".join(lines)
    print(table)
    write_results("tracking_outage", table, {"rows": rows, "medians": med, "ratio": ratio})
    return 0 if ratio <= 1.10 and all(c for *_, c in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
