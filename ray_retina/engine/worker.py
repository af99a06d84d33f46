"""Ray Train adapter of the training loop: set-up (device, model, DDP, resume, tracking), a loop of
``Engine.run_step`` over the worker's dataset shard (``hooks.run_loop``), and hooks: metric windows and
progress, eval + report + checkpoint (:class:`EvalReportHook`), early stopping, test fault injection.

Contract with Ray Train V2: every rank calls ``ray.train.report`` exactly once per eval period (it is a
barrier costing about 2 s), with the same metrics (computed on rank 0 and broadcast) and a checkpoint from
rank 0 only. Training steps between reports touch Ray only to pull batches. An early stop happens on every
rank after the same report (the metrics it decides on are the broadcast ones).

Resume (``ray.train.get_checkpoint()``) restores the model, EMA weights, optimizer, schedule, AMP scaler,
iteration (optimizer steps: a checkpoint is always at a step boundary, accumulation included), epoch and each
rank's own random state (Python, numpy, torch; saved per rank). What is not restored: Ray Data's position
inside an epoch (a resumed run starts a new pass over the training set) and, after a restart of the DRIVER
(not of workers), Ray Data's execution index, which seeds the per-epoch row-group order and the augmentation
draws: those then repeat the draws of the first epochs of the original run. Local shuffle seeds follow the
restored epoch.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from ray_retina._ray_private import quiet_train_report_logs
from ray_retina.checkpoint import CHECKPOINT_FILE, checkpoint_dir_name, load_checkpoint_state, save_checkpoint
from ray_retina.config import Config, apply_overrides, config_from_dict, resolve
from ray_retina.data.collate import RetinaCollate
from ray_retina.data.shards import coco_gt_from_shards
from ray_retina.data.skips import skipped_images
from ray_retina.engine.determinism import set_deterministic
from ray_retina.engine.evaluate import STAT_NAMES, EvalResult, evaluate_distributed, gather_to_rank0
from ray_retina.engine.hooks import (
    FAIL_ENV,
    Batch,
    EarlyStopping,
    HookBase,
    LoopState,
    MetricWindow,
    ProgressHook,
    fault_hooks_from_env,
    run_loop,
)
from ray_retina.engine.loop import Engine, rng_state, seed_everything
from ray_retina.engine.progress import ProgressPrinter
from ray_retina.engine.restore import init_model_from
from ray_retina.model import build_criterion, build_model, build_postprocessor
from ray_retina.report import write_run_pictures
from ray_retina.tracking import RunLogger

logger = logging.getLogger(__name__)


def resolved_params(cfg: Config, world: int) -> dict[str, Any]:
    """What the run actually uses after ``config.resolve`` for ``world`` ranks (MLflow tags ``resolved.*``)."""
    o = cfg.optim
    return {
        "resolved.world_size": world,
        "resolved.accumulate": o.accumulate,
        "resolved.global_batch": cfg.data.batch_size * world * o.accumulate,
        "resolved.optim.lr": o.lr,
        "resolved.optim.max_iters": o.max_iters,
        "resolved.optim.steps": list(o.steps),
        "resolved.optim.warmup_iters": o.warmup_iters,
    }


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The function Ray Train runs on every worker. `loop_config` holds the config (as a dict, paths
    resolved, lr NOT yet resolved) and the run's facts the driver found: ``num_classes``, ``cat_ids``,
    ``cat_names``, ``val_plan``, ``mlflow_uri``, ``mlflow_run_id``, ``skip_counter``, ``storage_path``,
    ``run_dir``, ``console_tag``, ``verbose``."""
    if not loop_config.get("verbose"):
        quiet_ray_train_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # lr and schedule for the world size that actually runs (an elastic run may have fewer ranks).
    cfg = resolve(config_from_dict(loop_config["config"]), world_size=world)
    if cfg.train.threads_per_worker:
        torch.set_num_threads(cfg.train.threads_per_worker)
    seed_everything(cfg.seed + rank)
    set_deterministic(cfg.train.deterministic)
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")

    engine = build_engine(cfg, loop_config, device, rank, world)
    resume_if_restarted(engine, rank, loop_config.get("resume_from"))
    tracker = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        # Points wait in the run directory while the server is down and go out in a background thread.
        tracker = RunLogger(
            loop_config["mlflow_uri"], loop_config["mlflow_run_id"], spool_dir=loop_config.get("run_dir")
        )
        tracker.set_tags(resolved_params(cfg, world))  # tags: an elastic restart may change them
    if rank == 0:
        log_step_shape(cfg, world)

    printer = ProgressPrinter(
        cfg.optim.max_iters, start=engine.iteration, enabled=rank == 0, tag=loop_config.get("console_tag")
    )
    progress = ProgressHook(printer, tracker, cfg.train.log_period)
    hooks: list[HookBase] = [
        progress,
        EvalReportHook(loop_config, rank, world, tracker, printer, progress),
        *fault_hooks_from_env(rank, loop_config["storage_path"]),
    ]
    state = LoopState(engine, world=world)
    try:
        run_loop(state, micro_batches(engine, rank, world), hooks)
    finally:
        if tracker is not None:  # bounded flush; what stays unsent waits in the run's spool for the driver
            tracker.close()


def quiet_ray_train_logs() -> None:
    """Ray Train's per-report INFO dump of every metric ("Reporting training result ...") stays out of the
    console: the progress lines and eval tables say the same for people."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    quiet_train_report_logs()


def log_step_shape(cfg: Config, world: int) -> None:
    """The optimizer step as it runs (world x batch x accumulate images, lr, steps), and that accumulation is
    not exact with a BatchNorm in training mode."""
    o = cfg.optim
    logger.info(
        "world size %d x batch %d x accumulate %d = global batch %d, lr %g, %d optimizer steps",
        world,
        cfg.data.batch_size,
        o.accumulate,
        cfg.data.batch_size * world * o.accumulate,
        o.lr,
        o.max_iters,
    )
    if o.accumulate > 1 and not cfg.model.frozen_bn:
        logger.warning(
            "optim.accumulate=%d with model.frozen_bn false: BatchNorm's batch statistics are those of each "
            "micro-batch of %d images, so the step is not exactly one batch of %d",
            o.accumulate,
            cfg.data.batch_size,
            cfg.data.batch_size * o.accumulate,
        )


def build_engine(
    cfg: Config, loop_config: dict[str, Any], device: torch.device, rank: int, world: int
) -> Engine:
    """Model (from ``model.init_from`` on a fresh start), on ``device``, DDP-wrapped with several ranks,
    compiled when asked; criterion, post-process, optimizer in an :class:`Engine`."""
    num_classes = int(loop_config["num_classes"])
    if cfg.model.init_from and ray.train.get_checkpoint() is None and not loop_config.get("resume_from"):
        # A fine-tuning start, on every rank before DDP wraps the model (a resumed run's own checkpoint,
        # loaded later, wins). It loads every layer, so model.backbone_weights is not read.
        model = build_model(apply_overrides(cfg, {"model.backbone_weights": None}), num_classes)
        init_model_from(model, cfg, loop_config["cat_ids"], loop_config.get("cat_names"), log=rank == 0)
    else:
        model = build_model(cfg, num_classes)  # channels_last applied there when the config asks
    model = ray.train.torch.prepare_model(model, move_to_device=device) if world > 1 else model.to(device)
    if cfg.optim.compile:
        model = torch.compile(model)
    return Engine(
        cfg,
        model,
        build_criterion(cfg, num_classes),
        build_postprocessor(cfg),
        device,
        loop_config["cat_ids"],
        cat_names=loop_config.get("cat_names"),
    )


def resume_if_restarted(engine: Engine, rank: int, resume_from: str | None = None) -> None:
    """Load Ray's latest checkpoint of this run into ``engine`` when there is one (a worker restart or a
    re-run of the same run name), else ``resume_from``: the checkpoint the driver chose when Ray's snapshot
    was missing or unreadable (``checkpoint.prepare_resume``)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        if resume_from:
            engine.load_state_dict(load_checkpoint_state(resume_from), rank=rank)
            logger.info("rank %d resumed at iteration %d from %s", rank, engine.iteration, resume_from)
        return
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    engine.load_state_dict(state, rank=rank)
    logger.info("rank %d resumed at iteration %d", rank, engine.iteration)


def micro_batches(engine: Engine, rank: int, world: int) -> Iterator[tuple[list[Batch], float]]:
    """This rank's training shard as optimizer steps: ``optim.accumulate`` collated batches of
    ``data.batch_size`` each and the seconds waited for them, epoch after epoch (``engine.epoch`` counts;
    a step may span two epochs)."""
    cfg = engine.cfg
    shard = ray.train.get_dataset_shard("train")
    collate = RetinaCollate(size_divisibility=cfg.data.size_divisibility)
    group: list[Batch] = []
    waited = 0.0
    while True:
        seen_batch = False
        t = time.perf_counter()
        for batch in shard.iter_torch_batches(
            batch_size=cfg.data.batch_size,
            collate_fn=collate,
            drop_last=True,
            prefetch_batches=cfg.data.prefetch_batches,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.seed + engine.epoch if cfg.data.shuffle_buffer else None,
        ):
            seen_batch = True
            waited += time.perf_counter() - t
            group.append(batch)
            if len(group) == cfg.optim.accumulate:
                yield group, waited
                group, waited = [], 0.0
            t = time.perf_counter()
        if not seen_batch:
            raise RuntimeError(
                f"training shard of rank {rank} produced no batch of {cfg.data.batch_size} images in epoch "
                f"{engine.epoch}: the data set ({cfg.data.train_shards}) is too small for "
                f"{world} workers x data.batch_size"
            )
        engine.epoch += 1


class EvalReportHook(HookBase):
    """Every ``train.eval_period`` steps and at the last: COCO AP and val loss on the val plan (all ranks),
    the AP table (rank 0), the eval window's training metrics, ``ray.train.report`` with rank 0's checkpoint
    (thresholds and every rank's random state in it), the early-stop decision, and on the last eval the
    run's pictures (rank 0)."""

    def __init__(
        self,
        loop_config: dict[str, Any],
        rank: int,
        world: int,
        tracker: RunLogger | None,
        printer: ProgressPrinter,
        progress: ProgressHook,
    ) -> None:
        self.loop_config = loop_config
        self.rank = rank
        self.world = world
        self.tracker = tracker
        self.printer = printer
        self.progress = progress
        self.window = MetricWindow()
        self.gt: dict[str, Any] | None = None
        self.early_stop: EarlyStopping | None = None
        self.thresholds: dict[str, Any] = {}

    def before_train(self, state: LoopState) -> None:
        cfg = state.engine.cfg
        # COCO AP is computed on the images of the val plan (coco_evaluate's img_ids), so a val subset
        # (data.val_max_images) is scored against its own GT only.
        self.gt = coco_gt_from_shards(cfg.data.val_shards) if self.rank == 0 else None
        es = cfg.train.early_stop
        self.early_stop = EarlyStopping(es.patience, es.metric, es.mode, es.min_delta)
        self.window.reset()

    def after_step(self, state: LoopState) -> None:
        self.window.add(state)
        engine = state.engine
        it, max_iters = engine.iteration, engine.cfg.optim.max_iters
        if it % engine.cfg.train.eval_period and it < max_iters:
            return
        result = evaluate_distributed(
            engine, engine.cfg, self.loop_config["val_plan"], self.gt, self.rank, self.world
        )
        metrics = {**result.metrics, **engine.take_val_loss(), **self._train_metrics(engine)}
        self.thresholds = result.thresholds
        if self.rank == 0:
            self.printer.eval_table(it, metrics)
        assert self.early_stop is not None
        state.stop = self.early_stop.update(metrics, it)
        if (state.stop or it >= max_iters) and self.tracker is not None:
            self._log_pictures(engine, result)
        state.metrics = metrics
        state.last_checkpoint = self._report(engine, metrics)
        if state.stop and self.rank == 0:
            logger.info(
                "early stop at iteration %d: %s has not improved for %d evals; best %.4f at iteration %d",
                it,
                self.early_stop.metric,
                self.early_stop.patience,
                self.early_stop.best,
                self.early_stop.best_iteration,
            )
            if self.tracker is not None:
                self.tracker.set_tags(
                    {
                        "ray_retina.early_stop_iteration": it,
                        "ray_retina.best_iteration": self.early_stop.best_iteration,
                    }
                )
        self.window.reset()

    def _train_metrics(self, engine: Engine) -> dict[str, float]:
        """The eval window's training numbers, reported beside the val metrics."""
        skipped = skipped_images(self.loop_config.get("skip_counter")) if self.rank == 0 else 0
        return {
            **{f"train/{k}": v for k, v in self.window.losses().items()},
            "train/lr": self.progress.lr,  # the lr of the last step, as the per-step curve logs it
            "train/images_per_s": self.window.images_per_s(self.world),
            "train/data_wait_s": self.window.wait_s,
            "train/bad_steps": float(engine.bad_steps),
            "data/skipped_images": float(skipped),
            "iteration": float(engine.iteration),
            "epoch": float(engine.epoch),
        }

    def _report(self, engine: Engine, metrics: dict[str, float]) -> str:
        """Report metrics + rank 0's checkpoint (with every rank's random state); returns where it lands."""
        rngs = gather_to_rank0([rng_state()])  # a collective: every rank calls it
        if self.tracker is not None:
            self.tracker.log_metrics(
                {k: v for k, v in metrics.items() if k != "iteration"}, step=engine.iteration
            )
        name = checkpoint_dir_name(engine.iteration)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                save_checkpoint({**engine.state_dict(rng_per_rank=rngs), "thresholds": self.thresholds}, tmp)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        run_dir = self.loop_config.get("run_dir")
        return f"{run_dir}/{name}" if run_dir else name

    def _log_pictures(self, engine: Engine, result: EvalResult) -> None:
        """Rank 0, last eval: PR curves, detections on val images and Figure 4 as MLflow artifacts."""
        assert self.tracker is not None and self.gt is not None
        try:
            with tempfile.TemporaryDirectory() as tmp:
                paths = write_run_pictures(
                    engine.eval_model,
                    engine.postprocessor,
                    engine.cfg,
                    self.loop_config["cat_ids"],
                    self.gt["categories"],
                    self.loop_config["val_plan"],
                    result.coco_eval,
                    tmp,
                    val=result.val,
                )
                for p in paths:
                    self.tracker.log_artifact(p, "plots")
        except Exception as err:  # noqa: BLE001 - pictures must never fail a finished run
            logger.warning("run pictures failed: %s", err)


__all__ = ["train_loop_per_worker", "FAIL_ENV", "STAT_NAMES"]
