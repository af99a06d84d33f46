"""The driver side of a training run: data on disk, Ray up, the TorchTrainer built from config, MLflow run.

`build_trainer` is shared by `ray-retina train` and by each Tune trial (which adds `TuneReportCallback`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ray_retina import tracking
from ray_retina.checkpoint import SAVE_PAUSE_ENV, prepare_resume
from ray_retina.config import Config
from ray_retina.data.datasets import build_dataset, eval_plan
from ray_retina.data.shards import read_manifest
from ray_retina.data.skips import new_counter
from ray_retina.engine.restore import check_init
from ray_retina.engine.session import (
    QUIET_ENV,
    RunNameTaken,
    abs_storage,
    claim_run_name,
    default_run_name,
    ensure_data,
    ensure_ray,
    resolve_paths,
)
from ray_retina.engine.worker import FAIL_ENV, train_loop_per_worker
from ray_retina.uri import join_uri

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer

logger = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    metrics: dict[str, Any]
    checkpoint_path: str | None
    run_name: str
    mlflow_run_id: str | None
    mlflow_uri: str | None
    error: BaseException | None
    seconds: float
    tracking_summary: str | None = None
    """The driver's tracking line when it has news: it sent what a worker left unsent (then "everything
    sent"), or how many items could not be sent and where they wait. None when rank 0's own line (every point
    sent) is the whole story."""


def _worker_env(verbose: bool) -> dict[str, Any] | None:
    """Environment the driver passes on to train workers: Ray Data's progress bars off unless ``verbose``,
    and the test-only fault-injection hooks."""

    env = {} if verbose else dict(QUIET_ENV)
    for key in (FAIL_ENV, SAVE_PAUSE_ENV):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return {"env_vars": env} if env else None


def build_trainer(
    cfg: Config,
    *,
    run_name: str,
    mlflow_uri: str | None,
    mlflow_run_id: str | None,
    callbacks: list[Any] | None = None,
    verbose: bool = False,
    console_tag: str | None = None,
) -> TorchTrainer:
    """A TorchTrainer for `cfg` (paths resolved): scaling, storage, checkpoint retention (best by val/AP),
    failure policy, the training data set and its skip counter. ``console_tag`` goes into the prefix of the
    progress lines (a sweep passes the trial id)."""
    # One piece: the Ray Train TorchTrainer of a run, its configs built from our config field by field;
    # reading them together shows what a run asks of Ray.
    # deferred: config checks and user errors answer before Ray Train loads
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    manifest = read_manifest(cfg.data.train_shards)
    cat_ids = sorted(int(c["id"]) for c in manifest["categories"])
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in manifest["categories"]}
    storage = abs_storage(cfg.run.storage_path)
    # Where workers start when Ray's snapshot cannot say (missing or unreadable); None: Ray's own resume.
    resume_from = prepare_resume(storage, run_name)
    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    backend = sc.backend if sc.backend != "auto" else ("nccl" if sc.use_gpu else "gloo")
    loop_config = {
        "config": cfg.model_dump(mode="json"),
        "num_classes": len(cat_ids),
        "cat_ids": cat_ids,
        "cat_names": [names[c] for c in cat_ids],  # what model.init_from maps classes by
        "val_plan": eval_plan(cfg.data.val_shards, cfg.data.val_max_images),
        "skip_counter": new_counter(),
        "verbose": verbose,
        "console_tag": console_tag,
        "mlflow_uri": mlflow_uri,
        "mlflow_run_id": mlflow_run_id,
        "storage_path": storage,
        "run_dir": f"{storage.rstrip('/')}/{run_name}",
        "resume_from": resume_from,
    }
    train_ds = build_dataset(
        cfg.data.train_shards, cfg.data, train=True, seed=cfg.seed, skip_counter=loop_config["skip_counter"]
    )
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
            worker_runtime_env=_worker_env(verbose),
            # Ray Train's INFO lines (worker group start, "Reporting training result ..." dumps of every
            # metric) only with --verbose: our own progress lines say how training goes.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
        ),
        datasets={"train": train_ds},
        dataset_config=ingest_config(cfg),
    )


def ingest_config(cfg: Config) -> Any:
    """Ray Train's DataConfig: split "train" across the workers. Ray Train replaces each data set's execution
    options with its ingest defaults, so ``data.deterministic`` (preserve_order) is passed here too."""
    import ray.train  # deferred: as in build_trainer

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = options.preserve_order or cfg.data.deterministic
    return ray.train.DataConfig(datasets_to_split=["train"], execution_options={"train": options})


def train(
    cfg: Config, *, run_name: str | None = None, resume: bool = False, verbose: bool = False
) -> TrainOutcome:
    """Run a whole training: data, Ray, MLflow run, TorchTrainer.fit(), final summary in MLflow.

    One writer per run name: a name that ran before (its run directory or its MLflow run exists) is refused
    unless ``resume``, a name that is running now always (``session.claim_run_name``). An http(s) tracking
    server that does not answer at the start stops the run here, in one line, before Ray starts; one that
    goes down later never holds up training (``tracking.RunLogger``)."""

    t0 = time.perf_counter()
    cfg = resolve_paths(cfg)
    run_name = run_name or default_run_name(cfg)
    storage = abs_storage(cfg.run.storage_path)
    uri = run_id = None
    if cfg.tracking.enabled:
        uri = tracking.resolve_tracking_uri(cfg)
        if why := tracking.check_reachable(uri):
            raise tracking.TrackingUnavailable(
                f"{why}: start it, or train without tracking (--set tracking.enabled=false)"
            )
        run_id = tracking.find_run_by_name(uri, tracking.experiment_name(cfg), run_name)
        if run_id is not None and not resume:
            raise RunNameTaken(
                f"run.name {run_name!r} already has MLflow run {run_id} in experiment "
                f"{tracking.experiment_name(cfg)!r}: resume it with `ray-retina train --resume {run_name}` or "
                "choose another run.name"
            )
    with claim_run_name(storage, run_name, resume=resume):
        ensure_data(cfg)
        # Before Ray and MLflow start: the initial weights exist and fit the model config (else one message
        # naming the keys to set), a weights name is fetched once, and which classes match is logged.

        cfg = check_init(cfg)
        ensure_ray(cfg, verbose=verbose)
        if uri is not None and run_id is None:
            run_id = tracking.create_run(cfg, run_name=run_name, uri=uri)
        trainer = build_trainer(cfg, run_name=run_name, mlflow_uri=uri, mlflow_run_id=run_id, verbose=verbose)
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
        # The workers' spool is in the run directory: what rank 0 could not send goes out with these.
        log = tracking.RunLogger(uri, run_id, spool_dir=join_uri(storage, run_name))
        tags = {"ray_retina.ray_run_name": run_name, "ray_retina.storage_path": storage}
        if ckpt_path:
            tags["ray_retina.final_checkpoint"] = ckpt_path
        if best:
            tags["ray_retina.best_checkpoint"] = best
        log.set_tags(tags)
        closing = log.end("FAILED" if result.error is not None else "FINISHED", log=False)
        # Rank 0 already said that its points went out: the driver speaks (the CLI prints the line) when it
        # sent what a worker left behind (a killed rank's spool) or could not send something.
        if log.resumed or not log.all_sent:
            outcome.tracking_summary = closing
    return outcome
