"""Timing and memory helpers shared by the benchmark scripts."""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def interleaved_medians(
    fns: dict[str, Callable[[], object]], *, repeats: int = 5, warmup: int = 1
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall time and median process CPU time of each function, the functions run in turn.

    Interleaving makes both sides of a comparison see the same machine load. The CPU time (all threads
    of this process) is printed beside the wall time because this machine is shared: when other jobs
    preempt us, wall time grows while CPU time stays close to the work done.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return {k: statistics.median(v) for k, v in wall.items()}, {
        k: statistics.median(v) for k, v in cpu.items()
    }


def load_average() -> str:
    """The 1-minute load average and the core count, to print beside timings on a shared machine."""
    with open("/proc/loadavg") as f:
        one = f.read().split()[0]
    return f"load average {one} on {os.cpu_count()} cores"


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_rss(fn: Callable[[], object]) -> int:
    """Peak resident memory that ``fn()`` adds above what is resident before it, in bytes (Linux).

    Resets the kernel's high-water mark (``/proc/self/clear_refs``), runs ``fn``, reads ``VmHWM``. Large
    CPU tensors are mmap'd by the allocator and returned on free, so this is the peak of live tensors.
    """
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    fn()
    return max(0, _status("VmHWM") - before)
