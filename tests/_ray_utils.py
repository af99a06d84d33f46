"""Local Ray clusters and free ports for the tests of every tier."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_ray(num_cpus: int = 4) -> Iterator[ModuleType]:
    """A fresh local Ray cluster of this process (address="local": never one another process started):
    `num_cpus` logical CPUs (train workers + data tasks on the 2 cores), the trial resource, and the
    dashboard on 127.0.0.1, which serves the state API that Ray Train's placement-group cleaner needs.

    That cleaner asks the state API without an address and, where a host runs several Ray clusters (a
    shared machine), fails on "multiple active Ray instances": the placement groups of trials that ASHA
    stopped then leak and the next trial waits for CPUs forever. So the dashboard gets a port of ours and
    the cluster's processes RAY_API_SERVER_ADDRESS pointing at it; they inherit the variable from this
    process at start-up, and the test process itself keeps its environment as it was."""
    import ray

    from ray_retina.engine.session import TRIAL_RESOURCE

    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    saved = os.environ.get(API_SERVER_ENV)
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    try:
        ray.init(
            address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
            dashboard_port=port, log_to_driver=False, resources={TRIAL_RESOURCE: 64},
        )  # fmt: skip
    finally:
        if saved is None:
            os.environ.pop(API_SERVER_ENV, None)
        else:
            os.environ[API_SERVER_ENV] = saved
    try:
        yield ray
    finally:
        ray.shutdown()
