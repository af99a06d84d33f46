"""A real `mlflow server` on 127.0.0.1 that a test or a benchmark can kill and start again on the same port
and store, and a `ray-retina train` subprocess run against it with the server killed for a while mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


class MlflowServer:
    """``mlflow server`` (SQLite store and artifacts in ``directory``, one worker, no job execution) on
    127.0.0.1:``port``, in a process group of its own."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def start(self, timeout_s: float = 90.0) -> None:
        """Start it and return once ``/health`` answers."""
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        argv = [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.directory / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.directory / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        with open(self.directory / "server.log", "a") as log:
            self.proc = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                log = (self.directory / "server.log").read_text()[-2000:]
                raise RuntimeError(f"mlflow server did not start: {log}")
            time.sleep(0.3)

    def kill(self) -> None:
        """SIGKILL the server's whole process group (its uvicorn workers too), as a crash would."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        self.proc = None


@dataclass
class TrainRun:
    returncode: int
    wall_s: float
    output: str
    down_s: float  # how long the server was down while the run trained (0: undisturbed)


def train_against(
    server: MlflowServer,
    config_file: Path,
    run_name: str,
    *,
    kill_after_points: int | None = None,
    down_s: float = 0.0,
) -> TrainRun:
    """``ray-retina train --config config_file`` with the tracking URI of ``server``. With
    ``kill_after_points``: once MLflow holds that many ``train/lr`` points of the run, SIGKILL the server, keep
    it down ``down_s`` seconds, start it again on the same port and store. Returns when training exits."""
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url}
    argv = [str(BIN / "ray-retina"), "train", "--config", str(config_file), "--set", f"run.name={run_name}"]
    log_path = server.directory / f"{run_name}.log"
    down = 0.0
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if kill_after_points is not None:
            client = MlflowClient(server.url)
            while proc.poll() is None:
                runs = client.search_runs(
                    [e.experiment_id for e in client.search_experiments()],
                    filter_string=f"tags.`mlflow.runName` = '{run_name}'",
                )
                if (
                    runs
                    and len(client.get_metric_history(runs[0].info.run_id, "train/lr")) >= kill_after_points
                ):
                    break
                time.sleep(0.5)
            if proc.poll() is None:
                server.kill()
                t_down = time.perf_counter()
                time.sleep(down_s)
                server.start()
                down = time.perf_counter() - t_down
        proc.wait(600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    return TrainRun(proc.returncode, time.perf_counter() - t0, log_path.read_text(), down)
