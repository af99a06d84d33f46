"""`benchmarks/gpu_check.py --dry-run` (`make gpu-check-dry`): every code path of the first-GPU check runs on
the CPU at tiny sizes, the table has every row, no check that only a GPU can answer is reported as passed, and a
CPU stand-in that disagrees with its reference fails the run."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

# The rows of the table, and which of them only a GPU can answer (benchmarks/gpu_check.py, ROWS).
DEVICE_INDEPENDENT = {"parity_torchvision", "amp_bf16", "amp_fp16", "channels_last", "data_per_core"}
# GPU-only comparisons with a reference: their CPU stand-in compares too (STANDIN_CHECKS).
STANDIN_CHECKS = {
    "postprocess_gpu_cpu",
    "matcher_gpu_cpu",
    "deterministic_repeat",
    "ray_train_gpu",
    "compile",
}
GPU_ONLY = STANDIN_CHECKS | {
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
    "deterministic_cost",
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
        assert r["value"].startswith("cpu stand-in: "), (key, r["value"])
        assert r["status"] != "PASS", key
    for key in STANDIN_CHECKS:  # the stand-in compared, and agreed with its reference
        assert rows[key]["status"] == "skipped: no CUDA (cpu stand-in agrees)", (key, rows[key]["status"])
    for key in DEVICE_INDEPENDENT:
        r = rows[key]
        assert r["gpu_only"] is False, key
        assert r["status"] in ("PASS", "info"), (key, r["status"], r["value"])
    # The CPU stand-in of the Ray Train run trained and evaluated (and Ray was shut down: the process exited).
    assert rows["ray_train_gpu"]["data"]["iteration"] == 2
    assert 0.0 <= rows["ray_train_gpu"]["data"]["val_AP"] <= 1.0
    assert "| check / measure |" in proc.stdout


@pytest.fixture
def gpu_check(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """benchmarks/gpu_check.py as a module, run in this process (its CPU thread setting restored after)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    threads = torch.get_num_threads()
    yield importlib.import_module("gpu_check")
    torch.set_num_threads(threads)


class _DeviceSideOff:
    """Wraps a matcher or post-processor: its second call (the device side of gpu_check's comparison; the
    first is the CPU reference) returns a result that disagrees, as a broken GPU kernel would."""

    def __init__(self, inner: Any, spoil: Any) -> None:
        self.inner, self.spoil, self.calls = inner, spoil, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        out = self.inner(*args, **kwargs)
        return self.spoil(out) if self.calls == 2 else out


def _one_foreground_label_flipped(
    out: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    idx, labels = out
    labels = labels.clone()
    labels.view(-1)[int((labels.view(-1) == 1).nonzero()[0])] = 0
    return idx, labels


def _boxes_moved_half_a_pixel(dets: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    return [{**d, "boxes": d["boxes"] + 0.5} for d in dets]


def _parity_rows(gpu_check: ModuleType, out: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    code = gpu_check.main(["--dry-run", "--only", "parity", "--out", str(out)])
    rows = {r["key"]: r for r in json.loads((out / "gpu_check_dry.json").read_text())["rows"]}
    return code, rows


def test_dry_run_passes_when_the_stand_ins_agree(gpu_check: ModuleType, tmp_path: Path) -> None:
    code, rows = _parity_rows(gpu_check, tmp_path)
    assert code == 0
    for key in ("postprocess_gpu_cpu", "matcher_gpu_cpu"):
        assert rows[key]["status"] == "skipped: no CUDA (cpu stand-in agrees)", rows[key]
    assert rows["step_b2"]["status"] == "skipped: no CUDA; not selected (--only)"


def test_dry_run_fails_when_the_matcher_stand_in_disagrees(
    gpu_check: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = gpu_check.Matcher
    monkeypatch.setattr(
        gpu_check, "Matcher", lambda **kw: _DeviceSideOff(real(**kw), _one_foreground_label_flipped)
    )
    code, rows = _parity_rows(gpu_check, tmp_path)
    assert code == 1
    row = rows["matcher_gpu_cpu"]
    assert row["status"].startswith("FAIL"), row
    assert row["data"]["label_mismatch"] == 1, row
    assert rows["postprocess_gpu_cpu"]["status"] == "skipped: no CUDA (cpu stand-in agrees)"


def test_dry_run_fails_when_the_postprocess_stand_in_disagrees(
    gpu_check: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = gpu_check.build_postprocessor
    monkeypatch.setattr(
        gpu_check, "build_postprocessor", lambda cfg: _DeviceSideOff(real(cfg), _boxes_moved_half_a_pixel)
    )
    code, rows = _parity_rows(gpu_check, tmp_path)
    assert code == 1
    row = rows["postprocess_gpu_cpu"]
    assert row["status"].startswith("FAIL"), row
    assert row["data"]["box_diff"] == pytest.approx(0.5, abs=1e-4), row  # float32 boxes of a few hundred px
