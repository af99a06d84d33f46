"""Local Ray clusters and free ports for the tests of every tier."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from ray_retina.engine.session import API_SERVER_ENV, free_port, local_instance_options

__all__ = ["free_port", "local_ray"]


@contextmanager
def local_ray(num_cpus: int = 4) -> Iterator[ModuleType]:
    """A fresh local Ray cluster of this process, started as ``ensure_ray`` starts one
    (``session.local_instance_options``: address="local", the trial resource, the dashboard on 127.0.0.1),
    with `num_cpus` logical CPUs (train workers + data tasks on the 2 cores).

    Ray Train's placement-group cleaner asks the state API without an address and, where a host runs several Ray clusters (a
    shared machine), fails on "multiple active Ray instances": the placement groups of trials that ASHA
    stopped then leak and the next trial waits for CPUs forever. So the dashboard gets a port of ours and
    the cluster's processes RAY_API_SERVER_ADDRESS pointing at it; they inherit the variable from this
    process at start-up, and the test process itself keeps its environment as it was."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    saved = os.environ.get(API_SERVER_ENV)
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    try:
        ray.init(num_cpus=num_cpus, log_to_driver=False, **local_instance_options(port))
    finally:
        if saved is None:
            os.environ.pop(API_SERVER_ENV, None)
        else:
            os.environ[API_SERVER_ENV] = saved
    try:
        yield ray
    finally:
        ray.shutdown()
