"""`ray job submit` for real: a head started with `ray start`, token authentication on, a shortened smoke run.

What it proves: `jobs/train.py` + `jobs/runtime_env.yaml` + `--working-dir .` run the whole path (driver on
the cluster, 2 Ray Train workers, Ray Data, COCO eval, MLflow) on a cluster the test did not start
in-process, and a client that speaks token auth (``RAY_AUTH_MODE=token`` + the token) can submit to it.

Isolation from other Ray clusters on this host (never ``ray stop``: it has no per-cluster option and kills
every cluster of every user session on the machine):

- the head runs as ``ray start --head --block`` in a session of its own (``start_new_session``); ``--block``
  keeps that process as the owner of every Ray process of the node, and on SIGTERM it kills them all;
- every port is chosen free and passed explicitly, ``--temp-dir`` is a fresh short directory under /tmp, and
  the token is a fresh one in that directory (``RAY_AUTH_TOKEN_PATH``), never ``~/.ray/auth_token``;
- teardown: SIGTERM to the ``ray start`` process (drain disabled, so it takes ~3 s), then whatever is still
  ours (same session, or our marker variable in its environment, or our temp dir on its command line) is
  SIGKILLed by pid, and the test asserts that nothing of ours is left.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from _train_utils import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
# The venv's bin (not resolved: .venv/bin/python is a symlink to the base interpreter). Ray workers and the
# job's `python` entrypoint use the interpreter of the raylet, so it must come first on PATH.
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
TRIAL_RESOURCE = "ray_retina_trial"
# Set in the environment of `ray start` only; every process of that head inherits it (see _pids_of_head).
HEAD_MARKER = "RAY_RETINA_TEST_HEAD"

pytestmark = [pytest.mark.ray, pytest.mark.slow]

HEAD_START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 480  # about 2 minutes on an idle 2-core machine; generous for a loaded CI host
STOP_TIMEOUT_S = 30


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (all held open together while choosing, so no repeats)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(closing(socket.socket())) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _pids_of_head(temp_dir: Path, sid: int) -> list[int]:
    """Live processes of the head whose temp dir is `temp_dir` and whose `ray start` leads session `sid`.

    Three marks, as no single one covers every process: the session (all that `ray start` spawned, unless
    they left it: the job driver and its watcher run in sessions of their own), the marker variable in the
    environment (inherited by everything, the driver included, but processes that rename themselves with
    setproctitle, like ``ray::DashboardAgent``, overwrite what /proc shows of it), and the temp dir on the
    command line (GCS, raylet, agents)."""
    marker = f"{HEAD_MARKER}={temp_dir}".encode()
    needle = str(temp_dir).encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            if (
                os.getsid(pid) == sid
                or needle in (entry / "cmdline").read_bytes()
                or marker in (entry / "environ").read_bytes().split(b"\0")
            ):
                out.append(pid)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return out


@dataclass
class Head:
    dashboard: str  # http://127.0.0.1:<port>, the job API
    gcs_port: int
    temp_dir: Path
    env: dict[str, str]  # what a client needs: PATH, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH
    token_path: Path
    proc: subprocess.Popen
    log: Path

    def job_info(self, job_id: str | None = None, *, token: bool = True) -> dict:
        """GET /api/jobs/[id] with the token as a Bearer header (what the SDK sends under RAY_AUTH_MODE=token)."""
        headers = {"Authorization": f"Bearer {self.token_path.read_text().strip()}"} if token else {}
        req = urllib.request.Request(f"{self.dashboard}/api/jobs/{job_id or ''}", headers=headers)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def ray(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        """Run a `ray` CLI command as a token-auth client of this head."""
        res = subprocess.run(
            [RAY, *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and res.returncode != 0:
            raise AssertionError(f"ray {' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
        return res


def _client_env(token_path: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH"))
    }
    env.update(
        {
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            # Token auth stays on: the head and every client read the token from this file.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            # SIGTERM on `ray start --block` would first wait up to 30 s for the node to drain.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        }
    )
    return env


def _stop_head(proc: subprocess.Popen, temp_dir: Path) -> list[int]:
    """Stop exactly this head: SIGTERM to its `ray start --block` (its handler kills every process the node
    started), wait for the rest to go, then SIGKILL by pid what is still ours (`_pids_of_head`).
    Returns the pids that had to be killed that way."""
    sid = proc.pid  # start_new_session: `ray start` leads its own session, whose id is its pid
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _pids_of_head(temp_dir, sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    leftovers = _pids_of_head(temp_dir, sid)
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while leftovers and _pids_of_head(temp_dir, sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return leftovers


@pytest.fixture
def ray_head() -> Iterator[Head]:
    # A short path under /tmp: Ray's Unix sockets live below it and their paths are limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rrjob-", dir="/tmp"))
    token_path = temp_dir / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    env = _client_env(token_path)
    (gcs, dash, agent_http, agent_grpc, rt_env, metrics, client_srv, node_mgr, obj_mgr) = free_ports(9)
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs),
        "--num-cpus",
        "4",
        "--resources",
        json.dumps({TRIAL_RESOURCE: 8}),
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--dashboard-agent-listen-port",
        str(agent_http),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--runtime-env-agent-port",
        str(rt_env),
        "--metrics-export-port",
        str(metrics),
        "--ray-client-server-port",
        str(client_srv),
        "--node-manager-port",
        str(node_mgr),
        "--object-manager-port",
        str(obj_mgr),
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
    ]
    # Ray-internal clients inside the cluster (Ray Train's placement-group cleaner asks the state API with no
    # address) auto-detect "the" local cluster and fail when a host runs several, as a shared test machine
    # does: point them at this head's API server. A one-cluster node never needs this.
    head_env = {**env, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dash}", HEAD_MARKER: str(temp_dir)}
    log = temp_dir / "ray_start.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=head_env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = Head(f"http://127.0.0.1:{dash}", gcs, temp_dir, env, token_path, proc, log)
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"ray start did not come up (rc={proc.poll()}):\n{log.read_text()[-4000:]}"
                )
            time.sleep(0.5)
        # The job API answers once the dashboard's job module is up.
        while True:
            try:
                head.job_info()
                break
            except (urllib.error.URLError, ConnectionError) as err:
                if time.monotonic() > deadline:
                    raise AssertionError(f"job API not ready: {err}") from err
                time.sleep(1)
        print(f"[job-submit test] head up in {time.monotonic() - t0:.0f} s")
        yield head
    finally:
        t1 = time.monotonic()
        leftovers = _stop_head(proc, temp_dir)
        print(f"[job-submit test] head stopped in {time.monotonic() - t1:.0f} s")
        still = _pids_of_head(temp_dir, proc.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not still, f"processes of our head survived SIGKILL: {still}"
        if leftovers:  # stopped, but not by ray start's own shutdown: worth a look, not a failure
            print(f"killed {len(leftovers)} leftover process(es) of the head by pid: {leftovers}")


PROGRESS_LINE = re.compile(
    r"\[train\] iter +\d+/4  loss_cls \d+\.\d{4}  loss_box \d+\.\d{4}  lr \d\.\d\de[-+]\d\d  "
    r"\d+\.\d img/s  data \d+\.\d s  ETA (\d+m\d\ds|--)$"
)


def _overrides(tmp: Path, mlflow_uri: str) -> list[str]:
    """`tiny_config` as `--set` arguments (values as JSON, which YAML reads)."""
    values = tiny_overrides(
        tmp,
        mlflow_uri,
        name="it_job",
        **{
            "run.name": "job-run",
            # One epoch (32 images / 2 workers / 4 per batch) with two eval periods: every pass of the
            # training data re-runs the Ray Data pipeline, the slowest part of a tiny run on 2 cores.
            "optim.max_iters": 4,
            "optim.steps": [4],
            "optim.warmup_iters": 1,
            "train.eval_period": 2,
        },
    )
    out: list[str] = []
    for k, v in values.items():
        out += ["--set", f"{k}={json.dumps(v)}"]
    return out


def test_job_submit_smoke(ray_head: Head, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    # Token auth is on: the job API refuses a client without the token.
    with pytest.raises(urllib.error.HTTPError) as refused:
        ray_head.job_info(token=False)
    assert refused.value.code == 401

    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # tmp_path is absolute: sqlite:////...
    job_id = f"rr-test-{secrets.token_hex(4)}"
    submit = [
        "job",
        "submit",
        "--address",
        ray_head.dashboard,
        "--submission-id",
        job_id,
        "--working-dir",
        ".",
        "--runtime-env",
        "jobs/runtime_env.yaml",
        "--",
        "python",
        "jobs/train.py",
        "--config",
        "configs/smoke.yaml",
        *_overrides(tmp_path, mlflow_uri),
    ]
    t0 = time.monotonic()
    try:
        # Blocks, tailing the job's logs, until the job ends; exits 1 if the job FAILED.
        res = ray_head.ray(*submit, timeout=JOB_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        ray_head.ray("job", "stop", "--address", ray_head.dashboard, job_id, check=False)
        logs = ray_head.ray("job", "logs", "--address", ray_head.dashboard, job_id, check=False).stdout
        pytest.fail(f"job did not finish in {JOB_TIMEOUT_S} s; its logs:\n{logs[-6000:]}")
    out = res.stdout + res.stderr
    status = ray_head.job_info(job_id).get("status")
    assert res.returncode == 0 and status == "SUCCEEDED", (
        f"submit rc={res.returncode}, status {status}\n{out[-6000:]}"
    )
    print(f"[job-submit test] job ran {time.monotonic() - t0:.0f} s (submit to SUCCEEDED)")
    # The driver (ray_retina.cli) printed the run summary to the job's log.
    assert "COCO box AP on 8 val images" in out, out[-4000:]
    # The console a person reads: rank 0's progress line per log period and the eval tables, and none of
    # Ray Data's progress bars or Ray Train's per-report metric dumps (they come back with --verbose).
    progress = [line for line in out.splitlines() if "[train] iter" in line]
    assert len(progress) == 4, out[-4000:]  # log_period 1, 4 iterations, rank 0 only
    assert all(PROGRESS_LINE.search(line) for line in progress), progress
    assert sum("[eval]  iter" in line for line in out.splitlines()) == 2
    for noise in ("Running Dataset", "Reporting training result", "it/s]", "row/s]", "Dataset train_"):
        assert noise not in out, f"{noise!r} in the job's output:\n{out[-4000:]}"

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("it_job")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`mlflow.runName` = 'job-run'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert 0.0 <= run.data.metrics["val/AP"] <= 1.0
    assert run.data.params["loss.gamma"] == "2.0" and run.data.params["scaling.num_workers"] == "2"
    assert run.data.params["optim.max_iters"] == "4"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/AP")] == [2, 4]
    final = run.data.tags["ray_retina.final_checkpoint"]
    assert final.startswith(str(tmp_path / "runs")) and Path(final, "checkpoint.pt").is_file()
