"""Counting images whose bytes do not decode: dropped from the stream, never silently.

A count is scoped by a counter name: each data set (each training run, each trial) gets its own
(:func:`new_counter`), so counts never leak between runs or tests of one process. Inside Ray the
counter is a named actor that every decode task adds to and any process of the job reads (rank 0
reports ``data/skipped_images``); without Ray, or without a counter name, the count is this
process's own.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from typing import Any

logger = logging.getLogger(__name__)

COUNTER_PREFIX = "ray_retina_skips_"  # named actors: one per data set
MAX_SKIP_WARNINGS = 20  # per process; every skip is still counted

_local: dict[str | None, set[int]] = defaultdict(set)
_warned = 0
_handles: dict[str, Any] = {}  # counter name -> actor handle created by this process (keeps it alive)


def warn_skip(image_id: int, err: Exception) -> None:
    global _warned
    if _warned < MAX_SKIP_WARNINGS:
        _warned += 1
        logger.warning("image %d does not decode, row skipped: %s: %s", image_id, type(err).__name__, err)


def _counter_class():
    import ray  # deferred: the counters are read where Ray may not be running (tests, Ray-free steps)

    @ray.remote(num_cpus=0, max_restarts=-1)
    class DataCounters:
        """Distinct image ids whose bytes did not decode, over all Ray Data tasks of one data set."""

        def __init__(self) -> None:
            self.ids: set[int] = set()

        def add(self, ids: list[int]) -> None:
            self.ids.update(ids)

        def count(self) -> int:
            return len(self.ids)

    return DataCounters


def new_counter(name: str | None = None) -> str:
    """A fresh counter (a named actor when Ray is initialised); returns its name for ``count_skipped`` /
    ``skipped_images``. Call it on the driver that builds the data set: the actor lives as long as this
    process (a named, non-detached actor dies with its creator's handle)."""
    name = name or f"{COUNTER_PREFIX}{uuid.uuid4().hex[:12]}"
    try:
        import ray  # deferred: the counters are read where Ray may not be running (tests, Ray-free steps)

        if ray.is_initialized() and name not in _handles:
            _handles[name] = _counter_class().options(name=name, get_if_exists=True).remote()
    except ImportError:  # pragma: no cover - Ray is a dependency; the local count still works
        pass
    return name


def count_skipped(ids: list[int], counter: str | None = None) -> None:
    """Record skipped image ids in ``counter`` (and in this process's own count)."""
    _local[counter].update(ids)
    if counter is None:
        return
    try:
        import ray  # deferred: the counters are read where Ray may not be running (tests, Ray-free steps)

        if ray.is_initialized():
            # Wait for it (rare path): the count is in before this batch's rows reach any consumer.
            ray.get(ray.get_actor(counter).add.remote(ids), timeout=30)
    except ValueError:  # no such actor (e.g. the data set was built without Ray): the local count holds
        pass
    except Exception as e:  # never let counting break the data pipeline
        logger.warning("could not record skipped images %s: %s", ids, e)


def skipped_images(counter: str | None = None) -> int:
    """Number of distinct images of ``counter``'s data set dropped because their bytes did not decode:
    the count over all Ray Data tasks when the counter actor exists, else this process's own."""
    if counter is not None:
        try:
            import ray  # deferred: the counters are read where Ray may not be running (tests, Ray-free steps)

            if ray.is_initialized():
                return int(ray.get(ray.get_actor(counter).count.remote()))
        except ValueError:
            pass
    return len(_local[counter])
