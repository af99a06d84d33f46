"""The driver side of a training run: data on disk, Ray up, the TorchTrainer built from config, MLflow run.

`build_trainer` is shared by `ray-retina train` and by each Tune trial (which adds `TuneReportCallback`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_retina.config import Config

logger = logging.getLogger(__name__)


def _is_uri(path: str) -> bool:
    return "://" in path


def abs_storage(path: str) -> str:
    """Ray wants an absolute local path or a URI."""
    return _abs(path)  # type: ignore[return-value]


def _abs(path: str | None) -> str | None:
    return path if path is None or _is_uri(path) else str(Path(path).expanduser().resolve())


def resolve_paths(cfg: Config) -> Config:
    """The config as workers run it: local paths absolute (Ray workers run in other working directories),
    lr and schedule resolved for the global batch (config.resolve)."""
    from ray_retina.config import apply_overrides, resolve

    return apply_overrides(
        resolve(cfg),
        {
            "data.root": _abs(cfg.data.root),
            "data.train_shards": _abs(cfg.data.train_shards),
            "data.val_shards": _abs(cfg.data.val_shards),
            "model.backbone_weights": _abs(cfg.model.backbone_weights),
            "run.storage_path": _abs(cfg.run.storage_path),
        },
    )


def ensure_data(cfg: Config) -> None:
    """Make the synthetic set and its shards when the config asks for it and they are absent.

    Real data sets are prepared explicitly with ``ray-retina prepare``; a missing manifest then is an error.
    """
    from ray_retina.data.shards import read_manifest, write_shards
    from ray_retina.data.synthetic import make_synthetic_coco

    def manifest_exists(path: str) -> bool:
        try:
            read_manifest(path)
            return True
        except FileNotFoundError:
            return False

    need = [s for s in (cfg.data.train_shards, cfg.data.val_shards) if not manifest_exists(s)]
    if not need:
        return
    if cfg.data.synth is None:
        raise FileNotFoundError(
            f"no shard manifest at {', '.join(need)}: run `ray-retina prepare --annotations ... --images ... "
            "--out ...` first, or set data.synth to make the synthetic set"
        )
    root = Path(cfg.data.root)
    s = cfg.data.synth
    if not (root / "annotations" / "instances_val.json").exists():
        t0 = time.perf_counter()
        make_synthetic_coco(
            root, s.num_train, s.num_val, s.seed,
            min_image_size=s.min_image_size, max_image_size=s.max_image_size,
            min_object_size=s.min_object_size, max_object_size=s.max_object_size, max_objects=s.max_objects,
        )  # fmt: skip
        print(f"[ray-retina] synthetic COCO set: {s.num_train} train + {s.num_val} val images in {root} "
              f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    for split, out in (("train", cfg.data.train_shards), ("val", cfg.data.val_shards)):
        if not manifest_exists(out):
            write_shards(root / "annotations" / f"instances_{split}.json", root / split, out, cfg.data.rows_per_shard)
            print(f"[ray-retina] prepared {split} shards in {out}")


def ensure_ray(cfg: Config) -> None:
    """Connect to a running cluster (RAY_ADDRESS or `ray start`), else start a local one with an explicit
    logical CPU count (run.ray_num_cpus) so that train workers and Ray Data tasks both fit."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    from ray_retina.tune import TRIAL_RESOURCE

    # The trial-driver resource lets Tune trial drivers run without holding a CPU (see tune.py).
    kwargs: dict[str, Any] = {
        "address": "local",  # a new local instance, never an unrelated cluster left running on this host
        # The dashboard serves Ray's state API, which Ray Train's PlacementGroupCleaner needs to see that a
        # trial's controller died (ASHA stopping a trial): without it the trial's worker placement group
        # leaks and later trials wait forever for its CPUs. Local only (127.0.0.1).
        "include_dashboard": True,
        "dashboard_host": "127.0.0.1",
        "log_to_driver": True,
        "resources": {TRIAL_RESOURCE: 64},
    }
    if cfg.run.ray_num_cpus is not None:
        kwargs["num_cpus"] = cfg.run.ray_num_cpus
    ray.init(**kwargs)


@dataclass
class TrainOutcome:
    metrics: dict[str, Any]
    checkpoint_path: str | None
    run_name: str
    mlflow_run_id: str | None
    mlflow_uri: str | None
    error: BaseException | None
    seconds: float


def default_run_name(cfg: Config) -> str:
    return cfg.run.name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def val_files_of(cfg: Config) -> list[str]:
    from ray_retina.data.shards import shard_files

    files = shard_files(cfg.data.val_shards)
    if cfg.data.val_max_images is not None:
        from ray_retina.data.shards import read_manifest

        m = read_manifest(cfg.data.val_shards)
        per = max(1, int(m.get("rows_per_shard") or cfg.data.rows_per_shard))
        files = files[: max(1, -(-cfg.data.val_max_images // per))]
    return files


SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def cleanup_unregistered_checkpoints(storage: str, run_name: str) -> list[str]:
    """Delete checkpoint directories of a run that Ray uploaded but never registered (the run died between
    the upload and the registration), so that neither a resume nor a user picks up a half-reported state.
    Registered checkpoints are the ones in Ray Train's checkpoint manager snapshot. Returns what was removed."""
    import json

    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(storage) if _is_uri(storage) else (pafs.LocalFileSystem(), storage)
    run_dir = f"{root.rstrip('/')}/{run_name}"
    if fs.get_file_info(run_dir).type != pafs.FileType.Directory:
        return []
    registered: set[str] = set()
    snap = f"{run_dir}/{SNAPSHOT_FILE}"
    if fs.get_file_info(snap).type == pafs.FileType.File:
        with fs.open_input_stream(snap) as f:
            state = json.loads(f.read())
        registered = {r["checkpoint_dir_name"] for r in state.get("checkpoint_results", [])}
    removed = []
    for info in fs.get_file_info(pafs.FileSelector(run_dir)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_"):
            if info.base_name not in registered:
                fs.delete_dir(info.path)
                removed.append(info.path)
    if removed:
        logger.warning("removed %d unregistered checkpoint dir(s) of run %s: %s", len(removed), run_name, removed)
    return removed


def _worker_env() -> dict[str, Any] | None:
    """Environment the driver passes on to train workers: only the test-only fault-injection hook."""
    from ray_retina.engine.worker import FAIL_ENV

    if os.environ.get(FAIL_ENV):
        return {"env_vars": {FAIL_ENV: os.environ[FAIL_ENV]}}
    return None


def build_trainer(
    cfg: Config,
    *,
    run_name: str,
    mlflow_uri: str | None,
    mlflow_run_id: str | None,
    callbacks: list[Any] | None = None,
):
    """A TorchTrainer for `cfg`: scaling, storage, checkpoint retention (best by val/AP), failure policy."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ray_retina.data.pipeline import build_dataset
    from ray_retina.data.shards import read_manifest
    from ray_retina.engine.worker import train_loop_per_worker

    manifest = read_manifest(cfg.data.train_shards)
    cat_ids = sorted(int(c["id"]) for c in manifest["categories"])
    storage = abs_storage(cfg.run.storage_path)
    cleanup_unregistered_checkpoints(storage, run_name)
    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    backend = sc.backend if sc.backend != "auto" else ("nccl" if sc.use_gpu else "gloo")
    loop_config = {
        "config": cfg.model_dump(mode="json"),
        "num_classes": len(cat_ids),
        "cat_ids": cat_ids,
        "val_files": val_files_of(cfg),
        "mlflow_uri": mlflow_uri,
        "mlflow_run_id": mlflow_run_id,
        "storage_path": storage,
        "run_dir": f"{storage.rstrip('/')}/{run_name}",
    }
    train_ds = build_dataset(cfg.data.train_shards, cfg.data, train=True, seed=cfg.seed)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=(sc.min_workers, sc.num_workers) if sc.min_workers else sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=resources if sc.num_workers > 0 else None,
            placement_strategy=sc.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.keep_checkpoints,
                checkpoint_score_attribute="val/AP",
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=callbacks or [],
            worker_runtime_env=_worker_env(),
        ),
        datasets={"train": train_ds},
        dataset_config=ingest_config(cfg),
    )


def ingest_config(cfg: Config) -> Any:
    """Ray Train's DataConfig: split "train" across the workers. Ray Train replaces each data set's execution
    options with its ingest defaults, so ``data.deterministic`` (preserve_order) is passed here too."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = options.preserve_order or cfg.data.deterministic
    return ray.train.DataConfig(datasets_to_split=["train"], execution_options={"train": options})


def train(cfg: Config, *, run_name: str | None = None) -> TrainOutcome:
    """Run a whole training: data, Ray, MLflow run, TorchTrainer.fit(), final summary in MLflow."""
    from ray_retina import tracking

    t0 = time.perf_counter()
    cfg = resolve_paths(cfg)
    ensure_data(cfg)
    ensure_ray(cfg)
    run_name = run_name or default_run_name(cfg)
    uri = run_id = None
    if cfg.tracking.enabled:
        uri = tracking.resolve_tracking_uri(cfg)
        run_id = tracking.find_run_by_name(uri, tracking.experiment_name(cfg), run_name) or tracking.create_run(
            cfg, run_name=run_name, uri=uri
        )
    trainer = build_trainer(cfg, run_name=run_name, mlflow_uri=uri, mlflow_run_id=run_id)
    result = trainer.fit()
    ckpt_path = result.checkpoint.path if result.checkpoint is not None else None
    best = None
    if result.best_checkpoints:
        best = max(result.best_checkpoints, key=lambda cm: cm[1].get("val/AP", -1.0))[0].path
    outcome = TrainOutcome(
        metrics=dict(result.metrics or {}),
        checkpoint_path=ckpt_path,
        run_name=run_name,
        mlflow_run_id=run_id,
        mlflow_uri=uri,
        error=result.error,
        seconds=time.perf_counter() - t0,
    )
    if run_id is not None and uri is not None:
        log = tracking.RunLogger(uri, run_id)
        tags = {"ray_retina.ray_run_name": run_name, "ray_retina.storage_path": abs_storage(cfg.run.storage_path)}
        if ckpt_path:
            tags["ray_retina.final_checkpoint"] = ckpt_path
        if best:
            tags["ray_retina.best_checkpoint"] = best
        log.set_tags(tags)
        log.end("FAILED" if result.error is not None else "FINISHED")
    return outcome
