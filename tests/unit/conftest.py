"""The unit tier: plain functions, models and files in this process. No Ray cluster, no subprocess services;
the whole tier runs in under two minutes on two cores (`make test-fast`)."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(autouse=True)
def _no_ray_cluster(request):
    """A unit test that needs Ray belongs in tests/integration (its one shared cluster) or tests/e2e."""
    if request.node.get_closest_marker("ray"):
        pytest.fail("a `ray` test in the unit tier: move it to tests/integration (fixture ray_session)")
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail("this test started a Ray cluster: move it to tests/integration (fixture ray_session)")
