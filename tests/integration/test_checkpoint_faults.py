"""A worker killed while it writes a checkpoint: the checkpoint being written never becomes visible, the run
goes on from the previous one (restarts are on by default) and loses nothing else: every step after it is
trained again on the schedule, MLflow gets every metric point (the killed rank's unsent ones from the spool),
and every checkpoint left in the run directory loads."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from _train_utils import tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _kill_when_paused(pause_file: Path, killed: dict[str, int], timeout_s: float = 600.0) -> None:
    """Wait for the worker to pause inside the save (it writes its pid to ``pause_file``), then SIGKILL it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pause_file.exists() and pause_file.read_text().strip():
            pid = int(pause_file.read_text())
            time.sleep(0.5)  # well inside the pause: half the file written under its temporary name
            os.kill(pid, signal.SIGKILL)
            killed["pid"] = pid
            return
        time.sleep(0.2)


def test_kill_during_checkpoint_write_resumes_from_the_previous_one(
    ray_session, tiny_data, tmp_path, mlflow_uri, monkeypatch
):
    from mlflow.tracking import MlflowClient

    from ray_retina.checkpoint import CHECKPOINT_FILE, SAVE_PAUSE_ENV
    from ray_retina.config import resolve
    from ray_retina.engine.loop import lr_factor
    from ray_retina.engine.trainer import train

    cfg = tiny_config(
        tmp_path,
        mlflow_uri,
        name="ckptkill",
        **tiny_data,
        **{"optim.max_iters": 12, "optim.steps": [8], "optim.warmup_iters": 3, "train.eval_period": 4},
    )
    assert cfg.run.max_failures > 0  # the default: a lost worker restarts the group
    pause_file = tmp_path / "paused-in-save"
    monkeypatch.setenv(SAVE_PAUSE_ENV, f"8:{pause_file}")  # rank 0 pauses inside the save of iteration 8
    killed: dict[str, int] = {}
    killer = threading.Thread(target=_kill_when_paused, args=(pause_file, killed), daemon=True)
    killer.start()
    out = train(cfg, run_name="ckptkill")
    killer.join(timeout=5)
    assert killed, "the worker never paused inside the save"
    assert out.error is None and out.metrics["iteration"] == 12

    run_dir = tmp_path / "runs" / "ckptkill"
    assert not list(run_dir.rglob(".checkpoint.pt.partial")), "a partial checkpoint file became visible"
    kept = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert "checkpoint_0000012" in kept
    for name in kept:
        state = torch.load(run_dir / name / CHECKPOINT_FILE, weights_only=True)
        assert state["iteration"] == int(name.rsplit("_", 1)[1])

    # Steps 5..8 ran twice (before the kill and after the restart from checkpoint 4), every other step once;
    # each run of a step logged its lr (the points of the killed rank reached MLflow from the spool), plus
    # one more per eval (the report). A restart from scratch would repeat 1..4, one from 8 nothing.
    client = MlflowClient(mlflow_uri)
    history = client.get_metric_history(out.mlflow_run_id, "train/lr")
    counts = Counter(m.step for m in history)
    expected = Counter({**dict.fromkeys(range(1, 13), 1), **dict.fromkeys(range(5, 9), 2)})
    expected.update([4, 8, 8, 12])  # the report's point at each eval (8 reported twice)
    assert counts == expected
    factor = lr_factor(resolve(cfg))
    assert {m.step: m.value for m in history} == pytest.approx(
        {s: cfg.lr * factor(s - 1) for s in range(1, 13)}
    )
    assert sorted({m.step for m in client.get_metric_history(out.mlflow_run_id, "val/AP")}) == [4, 8, 12]
