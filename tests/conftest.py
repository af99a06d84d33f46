from __future__ import annotations

import os
import socket

import pytest
import torch

# Two cores here: keep each test process from oversubscribing them.
torch.set_num_threads(2)
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@pytest.fixture
def gen() -> torch.Generator:
    g = torch.Generator().manual_seed(0)
    return g


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_local():
    """A small local Ray cluster for the module: 4 logical CPUs on the 2 cores (train workers + data tasks)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    from ray_retina.engine.session import TRIAL_RESOURCE

    # The dashboard (127.0.0.1) serves the state API that Ray Train's placement-group cleaner needs.
    ray.init(
        address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
        log_to_driver=False, resources={TRIAL_RESOURCE: 64},
    )  # fmt: skip
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path) -> str:
    """A real MLflow tracking store (SQLite file) for the test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
