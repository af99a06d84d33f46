"""Driver-side set-up of a run or a sweep: Ray up, paths resolved for workers, data present, names.

Used by ``engine/trainer.py`` (one run) and ``tune.py`` (a sweep and each of its trials); knows nothing of
training itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ray_retina._ray_private import quiet_auth_notice
from ray_retina.config import Config, ConfigError, apply_overrides
from ray_retina.data.shards import manifest_exists, write_shards
from ray_retina.data.synthetic import make_synthetic_coco
from ray_retina.uri import absolute, dir_exists, is_uri, join_uri, resolve_uri

# A custom resource that only Tune trial drivers ask for: a driver just waits on its TorchTrainer, so it
# must not hold a CPU the trainers or Ray Data need. `ray-retina` declares it on the local Ray it starts;
# on a cluster, add it to the head's `ray start --resources` (cluster/ does).
TRIAL_RESOURCE = "ray_retina_trial"
# Where a local instance's processes find its state API (``local_instance_options``).
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
# Ray Data's per-operator progress bars and INFO lines ("Dataset ... execution finished") off in every
# process of a run unless --verbose: the console shows our own progress lines.
QUIET_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_DATA_LOG_LEVEL": "WARNING"}


def abs_storage(path: str) -> str:
    """Ray wants an absolute local path or a URI."""
    return absolute(path)  # type: ignore[return-value]


def resolve_paths(cfg: Config) -> Config:
    """The config as workers get it: local paths absolute (Ray workers run in other working directories).

    The lr and schedule are resolved later, by each worker for the world size that actually runs
    (``config.resolve(cfg, world_size)``): an elastic run may start with fewer workers than configured."""
    return apply_overrides(
        cfg,
        {
            "data.root": absolute(cfg.data.root),
            "data.train_shards": absolute(cfg.data.train_shards),
            "data.val_shards": absolute(cfg.data.val_shards),
            "model.backbone_weights": _weights_path(cfg.model.backbone_weights),
            "model.init_from": _weights_path(cfg.model.init_from),
            "run.storage_path": absolute(cfg.run.storage_path),
        },
    )


def _weights_path(value: str | None) -> str | None:
    """A weights file made absolute; a torchvision weights name (``ResNet50_Weights.IMAGENET1K_V2``) kept."""
    if value is None or (
        "." in value and "/" not in value and not os.path.exists(value) and "_Weights." in value
    ):
        return value
    return absolute(value)


def ensure_data(cfg: Config) -> None:
    """Make the synthetic set and its shards when the config asks for it and they are absent.

    Real data sets are prepared explicitly with ``ray-retina prepare``; a missing manifest then is an error.
    """

    need = [s for s in (cfg.data.train_shards, cfg.data.val_shards) if not manifest_exists(s)]
    if not need:
        return
    if cfg.data.synth is None:
        raise FileNotFoundError(
            f"no shard set at {', '.join(need)}: run `ray-retina prepare ... --out DIR` first and point "
            "data.train_shards / data.val_shards at it, or set data.synth to make the synthetic set"
        )
    root = Path(cfg.data.root)
    s = cfg.data.synth
    if not (root / "annotations" / "instances_val.json").exists():
        t0 = time.perf_counter()
        make_synthetic_coco(
            root,
            s.num_train,
            s.num_val,
            s.seed,
            min_image_size=s.min_image_size,
            max_image_size=s.max_image_size,
            min_object_size=s.min_object_size,
            max_object_size=s.max_object_size,
            max_objects=s.max_objects,
            class_weights=s.class_weights,
        )
        print(
            f"[ray-retina] synthetic COCO set: {s.num_train} train + {s.num_val} val images in {root} "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    for split, out in (("train", cfg.data.train_shards), ("val", cfg.data.val_shards)):
        if not manifest_exists(out):
            write_shards(
                root / "annotations" / f"instances_{split}.json", root / split, out, cfg.data.rows_per_shard
            )
            print(f"[ray-retina] prepared {split} shards in {out}")


def ensure_ray(cfg: Config, *, verbose: bool = False) -> None:
    """Connect to a running cluster (RAY_ADDRESS or `ray start`), else start a local one with an explicit
    logical CPU count (run.ray_num_cpus) so that train workers and Ray Data tasks both fit.

    Unless ``verbose``, Ray Data's progress bars are turned off for this driver (our own progress lines
    say how training goes)."""
    import ray  # deferred: paths and synthetic data are resolved before Ray is imported

    if not verbose:
        quiet_ray_data()
        from ray.util.annotations import RayDeprecationWarning

        # Ray warns about its own internal calls (e.g. ExecutionOptions.exclude_resources): not the user's.
        warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    if ray.is_initialized():
        return
    if not verbose:
        # Inherited by the local Ray's processes (raylet, workers, Ray Data's coordinators) started below;
        # on a running cluster the job's runtime_env sets them (jobs/runtime_env.yaml).
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    port = free_port()
    kwargs = local_instance_options(port)
    kwargs["log_to_driver"] = True  # rank 0's progress lines reach the console this way
    if cfg.run.ray_num_cpus is not None:
        kwargs["num_cpus"] = cfg.run.ray_num_cpus
    if not verbose:
        kwargs["logging_level"] = logging.WARNING  # no "Started a local Ray instance ..." banner
        quiet_auth_notice()  # Ray's notice that the new instance has token auth on (it stays on)
    # Ray Train's placement-group cleaner asks the state API without an address; on a host with several Ray
    # instances it fails ("Found multiple active Ray instances") and the placement groups of ASHA-stopped
    # trials leak. Our instance's processes inherit RAY_API_SERVER_ADDRESS naming its own dashboard.
    os.environ.setdefault(API_SERVER_ENV, f"http://127.0.0.1:{port}")
    ray.init(**kwargs)


def local_instance_options(dashboard_port: int) -> dict[str, Any]:
    """``ray.init`` keyword arguments of a new local instance as ray-retina starts one (``ensure_ray``, and
    the tests' clusters): never an unrelated cluster left running on this host, the trial resource, and the
    dashboard on 127.0.0.1 at ``dashboard_port``. The dashboard serves Ray's state API, which Ray Train's
    PlacementGroupCleaner needs to see that a trial's controller died (ASHA stopping a trial): without it
    the trial's worker placement group leaks and later trials wait forever for its CPUs. The instance's
    processes should get ``RAY_API_SERVER_ADDRESS`` = ``http://127.0.0.1:<dashboard_port>`` at start-up."""
    return {
        "address": "local",
        "include_dashboard": True,
        "dashboard_host": "127.0.0.1",
        "dashboard_port": dashboard_port,
        "resources": {TRIAL_RESOURCE: 64},
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def quiet_ray_data() -> None:
    """Ray Data's progress bars off in this process (they are per operator and per data set: hundreds of
    lines in a run). Workers get the same through ``RAY_DATA_DISABLE_PROGRESS_BARS`` (worker_env)."""
    from ray.data import DataContext  # deferred with ray above

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False


def default_run_name(cfg: Config) -> str:
    """``run.name``, else the config name, the time to the millisecond and 4 random hex digits (two runs
    started in the same millisecond on two machines still differ)."""
    if cfg.run.name:
        return cfg.run.name
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return f"{cfg.name}-{stamp}-{int(now * 1000) % 1000:03d}-{secrets.token_hex(2)}"


class RunNameTaken(ConfigError):
    """A run name that another run holds (finished, failed or running), or a resume of a name never run."""


# Held (flock) by the driver of a run for as long as it trains: a second driver of the same run name, resumed
# or not, fails to take it. Local and NFS storage; on object stores only the run directory's existence counts.
DRIVER_LOCK = ".ray-retina-driver.lock"


@contextlib.contextmanager
def claim_run_name(storage: str, run_name: str, *, resume: bool) -> Iterator[None]:
    """One writer per run name: a new run creates its run directory (refused when it exists: that name ran
    before), a resume needs it; both hold the driver lock while inside the block. Raises ``RunNameTaken``
    (one line, before Ray starts)."""

    fs, root = resolve_uri(storage)
    run_dir = join_uri(root, run_name)
    where = join_uri(storage, run_name)
    hint = f"resume it with `ray-retina train --resume {run_name}` or choose another run.name"
    if is_uri(storage):
        exists = dir_exists(fs, run_dir)
        if exists and not resume:
            raise RunNameTaken(f"run.name {run_name!r} already ran in {storage} ({where} exists): {hint}")
        if not exists and resume:
            raise RunNameTaken(f"nothing to resume: no run {run_name!r} in {storage}")
        yield
        return
    if resume:
        if not os.path.isdir(run_dir):
            raise RunNameTaken(f"nothing to resume: no run {run_name!r} in {storage}")
    else:
        os.makedirs(root, exist_ok=True)
        try:
            os.mkdir(run_dir)  # atomic: of two drivers racing for one name exactly one creates it
        except FileExistsError:
            raise RunNameTaken(
                f"run.name {run_name!r} already ran in {storage} ({where} exists): {hint}"
            ) from None
    with open(os.path.join(run_dir, DRIVER_LOCK), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise RunNameTaken(
                f"run {run_name!r} is running now ({holder}): wait for it or choose another run.name"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"driver pid {os.getpid()} on {socket.gethostname()}")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
