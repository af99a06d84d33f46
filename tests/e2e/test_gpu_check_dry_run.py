"""`benchmarks/gpu_check.py --dry-run` (`make gpu-check-dry`): every code path of the first-GPU check runs on
the CPU at tiny sizes, the table has every row, and no check that only a GPU can answer is reported as passed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The rows of the table, and which of them only a GPU can answer (benchmarks/gpu_check.py, ROWS).
DEVICE_INDEPENDENT = {"parity_torchvision", "amp_bf16", "amp_fp16", "channels_last", "data_per_core"}
GPU_ONLY = {
    "postprocess_gpu_cpu",
    "matcher_gpu_cpu",
    "step_b2",
    "step_b8",
    "vs_detectron2",
    "channels_last_speed",
    "outside_b2",
    "outside_b8",
    "memory_b2",
    "memory_b8",
    "tflops_b2",
    "tflops_b8",
    "cores_per_gpu",
    "ray_train_gpu",
    "compile",
}


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the same table on a machine with a GPU
    # A generous budget: on a loaded machine the sections must still all run (the dry run's point is that every
    # code path executes); the time the dry run takes is measured in benchmarks/README.md, not here.
    cmd = [
        sys.executable,
        "benchmarks/gpu_check.py",
        "--dry-run",
        "--out",
        str(tmp_path),
        "--budget-s",
        "1200",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"

    result = json.loads((tmp_path / "gpu_check_dry.json").read_text())
    rows = {r["key"]: r for r in result["rows"]}
    assert set(rows) == DEVICE_INDEPENDENT | GPU_ONLY
    assert result["meta"]["dry_run"] is True and result["meta"]["cuda"] is False
    for key in GPU_ONLY:
        r = rows[key]
        assert r["gpu_only"] is True, key
        assert r["status"].startswith("skipped: no CUDA"), (key, r["status"])
        assert "time budget" not in r["status"], (key, r["status"])  # the stand-in ran
        assert r["status"] != "PASS", key
    for key in DEVICE_INDEPENDENT:
        r = rows[key]
        assert r["gpu_only"] is False, key
        assert r["status"] in ("PASS", "info"), (key, r["status"], r["value"])
    # The CPU stand-in of the Ray Train run trained and evaluated (and Ray was shut down: the process exited).
    assert rows["ray_train_gpu"]["data"]["iteration"] == 2
    assert 0.0 <= rows["ray_train_gpu"]["data"]["val_AP"] <= 1.0
    assert "| check / measure |" in proc.stdout
