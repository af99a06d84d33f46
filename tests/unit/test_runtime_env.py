"""jobs/runtime_env.yaml: what `ray job submit --runtime-env` uploads and sets (the submission itself:
tests/e2e/test_job_submit.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_runtime_env_yaml_excludes_local_state():
    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    assert set(env) <= {"excludes", "env_vars", "pip", "working_dir"}
    for pattern in (".venv/", "data/", "runs/", "mlruns/", "mlflow.db", ".git/"):
        assert pattern in env["excludes"]
    assert env["env_vars"]["PYTHONUNBUFFERED"] == "1"
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray rejects non-string values
