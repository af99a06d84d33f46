"""The integration tier: the package's Ray paths in this process (Ray Train, Tune, Data), all on one local
Ray cluster that the whole tier shares (`ray_session`). A test that needs a cluster of another shape, or
processes and services of its own (`ray start`, a CLI run, an MLflow server), belongs in tests/e2e."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from _ray_utils import local_ray

TIER = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the tier: 4 logical CPUs on the 2 cores (train workers + data tasks)."""
    with local_ray(num_cpus=4) as ray:
        yield ray


def pytest_runtest_teardown(item, nextitem):
    """A session-scoped fixture lives until the session ends: in a run of several tiers (a bare `pytest`)
    the cluster would idle on through the e2e tier, which starts clusters of its own. Stop it after the
    tier's last test instead (shutdown is idempotent: the fixture's own teardown then does nothing)."""
    if nextitem is None or TIER not in Path(nextitem.path).parents:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    """The synthetic set and shards of `tiny_config` (32 train + 8 val images), made once for the tier: the
    dotted-key overrides that point a `tiny_config` at it. Read-only for the tests."""
    from ray_retina.engine.session import ensure_data

    from _train_utils import tiny_config

    tmp = tmp_path_factory.mktemp("tiny_data")
    cfg = tiny_config(tmp, f"sqlite:///{tmp / 'mlflow.db'}")  # MLflow is not touched here
    ensure_data(cfg)
    return {
        k: getattr(cfg.data, k.split(".", 1)[1])
        for k in ("data.root", "data.train_shards", "data.val_shards")
    }
