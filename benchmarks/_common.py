"""Timing and memory helpers shared by the benchmark scripts, and the writer of their results files."""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO


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


RESULTS_DIR = Path(__file__).resolve().parent / "results"
_VERSIONS = (
    "torch",
    "torchvision",
    "numpy",
    "pillow",
    "pyarrow",
    "ray",
    "mlflow",
    "faster-coco-eval",
    "pycocotools",
)


def _commit() -> str:
    """HEAD of the repository, with "+dirty" when tracked files differ from it; ``BENCH_COMMIT`` wins (a copy of
    the tree without .git, such as the GPU machine's)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    return head + ("+dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    """What a timing depends on besides the code: commit, load averages (1, 5, 15 min) and core count, CPU
    model, Python and the versions of the libraries the benchmarks time (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in _VERSIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    with open("/proc/loadavg") as f:
        load = [float(x) for x in f.read().split()[:3]]
    return {
        "commit": _commit(),
        "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "load_average_1_5_15": load,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "versions": versions,
    }


def write_results(
    name: str, table: str, data: dict[str, Any], *, out_dir: Path | None = None, note: str = ""
) -> Path:
    """Write one run's table (markdown) and its numbers with the environment it ran in (JSON) as
    ``<out_dir>/<name>-<UTC yyyymmdd-hhmmss>.{md,json}``; returns the JSON path. ``environment()`` is read
    at the end of the run, so its load averages cover the run (the 5- and 15-minute ones a longer run).
    ``out_dir`` defaults to ``benchmarks/results``, the folder the READMEs' tables cite."""
    env = environment()
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    payload = {"benchmark": name, "environment": env, "note": note, "table": table, "results": data}
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    load = ", ".join(f"{x:g}" for x in env["load_average_1_5_15"])
    header = (
        f"# {name}, {env['utc']} UTC\n\ncommit {env['commit']}; load average {load} (1/5/15 min) on "
        f"{env['cpu_count']} cores ({env['cpu_model']}); Python {env['python']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
        + "\n\n"
        + (f"{note}\n\n" if note else "")
    )
    (out_dir / f"{stem}.md").write_text(header + table.rstrip() + "\n")
    print(f"results: {json_path} (+ .md)", flush=True)
    return json_path


class _Tee(io.TextIOBase):
    """Writes to the real stdout and keeps a copy."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.copy = out, io.StringIO()

    def write(self, s: str) -> int:
        self.copy.write(s)
        return self.out.write(s)

    def flush(self) -> None:
        self.out.flush()


@contextlib.contextmanager
def recorded_run(name: str) -> Iterator[dict[str, Any]]:
    """Run a benchmark's ``main()`` inside: what it prints (its table) is also written, with the command line
    and the environment, by :func:`write_results` when it returns without an exception. The yielded dict takes
    numbers the script wants kept in the JSON as well (``rec["key"] = ...``)."""
    tee, data = _Tee(sys.stdout), {"argv": sys.argv[1:]}
    old, sys.stdout = sys.stdout, tee
    try:
        yield data
    finally:
        sys.stdout = old
    write_results(
        name, "```\n" + tee.copy.getvalue().rstrip() + "\n```", {**data, "stdout": tee.copy.getvalue()}
    )
