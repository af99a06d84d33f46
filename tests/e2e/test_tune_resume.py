"""`ray-retina tune --resume` finishes a sweep whose driver was killed.

The sweep runs as a real `ray-retina tune` process (its own local Ray). Once Tune has saved an experiment
state that holds a reported round, the whole process group (driver, GCS, raylet, workers) gets SIGKILL:
what a lost head node or a killed `ray job` driver leaves behind. `ray-retina tune --resume DIR` must then
finish every trial to its last round, each trial's TorchTrainer continuing from its own checkpoint, with
one MLflow child run per trial (found again by name, not a new run per restart) and a closed parent run.
The sweep's constants come back from its folder (``tune.with_parameters`` is given them again): Tune's own
record of each trial holds the searched key only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from _train_utils import tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SWEEP = "it-resume"
ROUNDS = 2
EVAL_PERIOD = 4


def _cli() -> list[str]:
    return [str(Path(sys.executable).parent / "ray-retina")]


def _started_and_reported(sweep_dir: Path) -> bool:
    """Tune's saved experiment state already records a reported round of some trial."""
    states = list(sweep_dir.glob("experiment_state-*.json"))
    return any("val/AP" in s.read_text(errors="replace") for s in states)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


def test_killed_sweep_resumes_to_the_end(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    cfg = tiny_config(
        tmp_path,
        mlflow_uri,
        name="it_resume",
        **{
            "scaling.num_workers": 1,
            "data.batch_size": 8,
            "optim.max_iters": ROUNDS * EVAL_PERIOD,
            "optim.steps": [ROUNDS * EVAL_PERIOD],
            "train.eval_period": EVAL_PERIOD,
            "postprocess.score_thresh": 0.0,
            "tune.scheduler": "fifo",
            "tune.num_samples": 2,
            "tune.max_concurrent_trials": 2,
            "tune.search_space": {"loss.gamma": {"type": "uniform", "low": 0.5, "high": 3.0}},
        },
    )
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    sweep_dir = tmp_path / "runs" / SWEEP
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    log1 = open(tmp_path / "first.log", "w")  # noqa: SIM115 - closed below
    first = subprocess.Popen(
        [*_cli(), "tune", "--config", str(cfg_file), "--name", SWEEP],
        stdout=log1,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 420
        while not _started_and_reported(sweep_dir):
            assert first.poll() is None, (
                f"sweep ended before it could be killed:\n{(tmp_path / 'first.log').read_text()[-3000:]}"
            )
            assert time.monotonic() < deadline, (
                f"no reported round in time:\n{(tmp_path / 'first.log').read_text()[-3000:]}"
            )
            time.sleep(1)
    finally:
        _kill_group(first)
        log1.close()
    assert first.returncode == -signal.SIGKILL

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("it_resume")
    parent = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{SWEEP}'")
    assert len(parent) == 1 and parent[0].info.status == "RUNNING"  # the killed driver could not close it

    second = subprocess.run(
        [*_cli(), "tune", "--config", str(cfg_file), "--resume", str(sweep_dir)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
        start_new_session=True,
    )
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]

    parent_id = parent[0].info.run_id
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    # One run per trial: the restored trials found their runs again instead of opening new ones.
    assert len(children) == 2, [c.info.run_name for c in children]
    for child in children:
        assert child.info.status == "FINISHED", child.info.run_name
        assert child.data.tags["last_round"] == str(ROUNDS)
        assert child.data.tags["stopped_early"] == "false"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val/AP")]
        # Every eval round is in the curve, the final one included; a round redone after the kill logs its
        # step again, so compare the set of steps.
        assert sorted(set(steps)) == [EVAL_PERIOD * (i + 1) for i in range(ROUNDS)], steps
        assert "loss.gamma" in child.data.params
    params = [json.loads(p.read_text()) for p in sweep_dir.glob("*/params.json")]
    assert len(params) == 2 and all(set(p) == {"loss.gamma"} for p in params), params
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert client.get_run(parent_id).data.tags.get("ray_retina.best_trial")
    # The summary table lists both trials at the final iteration.
    assert out.count(f"| {ROUNDS} | {ROUNDS * EVAL_PERIOD} | no |") == 2, out[-3000:]
