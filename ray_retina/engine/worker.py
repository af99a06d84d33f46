"""Ray Train adapter of the training loop: device, DDP, dataset shards, periodic eval, report, checkpoint.

Contract with Ray Train V2: every rank calls ``ray.train.report`` exactly once per eval period (it is a
barrier costing about 2 s), with the same metrics (computed on rank 0 and broadcast) and a checkpoint from
rank 0 only. Training steps between reports touch Ray only to pull batches.

Resume (``ray.train.get_checkpoint()``) restores the model, optimizer, schedule, AMP scaler, iteration,
epoch and each rank's own random state (Python, numpy, torch; saved per rank). What is not restored: Ray
Data's position inside an epoch (a resumed run starts a new pass over the training set) and, after a
restart of the DRIVER (not of workers), Ray Data's execution index, which seeds the per-epoch row-group
order and the augmentation draws: those then repeat the draws of the first epochs of the original run.
Local shuffle seeds follow the restored epoch.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ray_retina.checkpoint import CHECKPOINT_FILE, checkpoint_dir_name, save_checkpoint
from ray_retina.config import Config, config_from_dict, resolve
from ray_retina.engine.evaluate import STAT_NAMES, evaluate_distributed, gather_to_rank0
from ray_retina.engine.loop import Engine, NonFiniteLossError, rng_state, seed_everything
from ray_retina.engine.progress import ProgressPrinter

logger = logging.getLogger(__name__)

# Test-only fault injection: "RANK:ITERATION" makes that rank's process exit once at that iteration
# (the marker file keeps the restarted worker from dying again). Never set in real runs.
FAIL_ENV = "RAY_RETINA_TEST_FAIL_AT"


def _maybe_inject_failure(rank: int, iteration: int, storage: str) -> None:
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return
    want_rank, want_it = (int(x) for x in spec.split(":"))
    marker = Path(storage) / f".failed-once-{want_rank}-{want_it}"
    if rank == want_rank and iteration == want_it and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        logger.error("test hook %s: rank %d exits at iteration %d", FAIL_ENV, rank, iteration)
        os._exit(1)


def resolved_params(cfg: Config, world: int) -> dict[str, Any]:
    """What the run actually uses after ``config.resolve`` for ``world`` ranks (MLflow tags ``resolved.*``)."""
    o = cfg.optim
    return {
        "resolved.world_size": world,
        "resolved.global_batch": cfg.data.batch_size * world,
        "resolved.optim.lr": o.lr,
        "resolved.optim.max_iters": o.max_iters,
        "resolved.optim.steps": list(o.steps),
        "resolved.optim.warmup_iters": o.warmup_iters,
    }


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The function Ray Train runs on every worker. `loop_config` holds the config (as a dict, paths
    resolved, lr NOT yet resolved) and the run's facts the driver found: ``num_classes``, ``cat_ids``,
    ``val_plan``, ``mlflow_uri``, ``mlflow_run_id``, ``skip_counter``."""
    import ray.train
    import ray.train.torch

    from ray_retina.data.collate import RetinaCollate
    from ray_retina.data.shards import coco_gt_from_shards
    from ray_retina.data.skips import skipped_images
    from ray_retina.model import build_criterion, build_model, build_postprocessor
    from ray_retina.tracking import RunLogger

    if not loop_config.get("verbose"):
        # Ray Train's per-report INFO dump of every metric ("Reporting training result ...") stays out of the
        # console: the progress lines and eval tables below say the same for people.
        from ray_retina._ray_private import quiet_train_report_logs

        logging.getLogger("ray.train").setLevel(logging.WARNING)
        quiet_train_report_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # lr and schedule for the world size that actually runs (an elastic run may have fewer ranks).
    cfg = resolve(config_from_dict(loop_config["config"]), world_size=world)
    if cfg.train.threads_per_worker:
        torch.set_num_threads(cfg.train.threads_per_worker)
    seed_everything(cfg.seed + rank)

    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    num_classes = int(loop_config["num_classes"])
    if cfg.model.init_from and ray.train.get_checkpoint() is None and not loop_config.get("resume_from"):
        # A fine-tuning start, on every rank before DDP wraps the model (a resumed run's own checkpoint,
        # loaded below, wins). It loads every layer, so model.backbone_weights is not read.
        from ray_retina.config import apply_overrides
        from ray_retina.engine.restore import init_model_from

        model = build_model(apply_overrides(cfg, {"model.backbone_weights": None}), num_classes)
        init_model_from(model, cfg, loop_config["cat_ids"], loop_config.get("cat_names"), log=rank == 0)
    else:
        model = build_model(cfg, num_classes)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model, move_to_device=device) if world > 1 else model.to(device)
    if cfg.optim.compile:
        model = torch.compile(model)
    engine = Engine(
        cfg,
        model,
        build_criterion(cfg, num_classes),
        build_postprocessor(cfg),
        device,
        loop_config["cat_ids"],
        cat_names=loop_config.get("cat_names"),
    )

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        engine.load_state_dict(state, rank=rank)
        logger.info("rank %d resumed at iteration %d", rank, engine.iteration)
    elif loop_config.get("resume_from"):  # Ray's snapshot was missing or unreadable: the driver's choice
        from ray_retina.checkpoint import load_checkpoint_state

        engine.load_state_dict(load_checkpoint_state(loop_config["resume_from"]), rank=rank)
        logger.info(
            "rank %d resumed at iteration %d from %s", rank, engine.iteration, loop_config["resume_from"]
        )

    tracker = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        tracker = RunLogger(loop_config["mlflow_uri"], loop_config["mlflow_run_id"])
        tracker.set_tags(resolved_params(cfg, world))  # tags: an elastic restart may change them
    # COCO AP is computed on the images of the val plan (coco_evaluate's img_ids), so a val subset
    # (data.val_max_images) is scored against its own GT only.
    gt = coco_gt_from_shards(cfg.data.val_shards) if rank == 0 else None
    progress = ProgressPrinter(
        cfg.optim.max_iters, start=engine.iteration, enabled=rank == 0, tag=loop_config.get("console_tag")
    )
    if rank == 0:
        logger.info("world size %d, global batch %d, lr %g", world, cfg.data.batch_size * world, cfg.optim.lr)

    train_shard = ray.train.get_dataset_shard("train")
    collate = RetinaCollate(size_divisibility=cfg.data.size_divisibility)
    max_iters = cfg.optim.max_iters
    period = cfg.train.eval_period
    window: dict[str, float] = {"loss_cls": 0.0, "loss_box": 0.0, "n": 0.0, "images": 0.0, "wait": 0.0}
    log_window: dict[str, float] = dict(window)
    window_start = log_start = time.perf_counter()
    last_ckpt: str | None = None
    last_lr = engine.optimizer.param_groups[0]["lr"]

    while engine.iteration < max_iters:
        seen_batch = False
        t_wait = time.perf_counter()
        for batch in train_shard.iter_torch_batches(
            batch_size=cfg.data.batch_size,
            collate_fn=collate,
            drop_last=True,
            prefetch_batches=cfg.data.prefetch_batches,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.seed + engine.epoch if cfg.data.shuffle_buffer else None,
        ):
            seen_batch = True
            waited = time.perf_counter() - t_wait
            _maybe_inject_failure(rank, engine.iteration, loop_config["storage_path"])
            try:
                out = engine.train_step(batch)
            except NonFiniteLossError as err:
                last = ray.train.get_checkpoint() if last_ckpt is None else last_ckpt
                where = getattr(last, "path", last) or "none (no eval period finished yet)"
                raise NonFiniteLossError(f"{err}; last good checkpoint: {where}") from None
            for w in (window, log_window):
                w["images"] += batch["images"].shape[0]
                w["wait"] += waited
                if out is not None:
                    w["loss_cls"] += out["loss_cls"]
                    w["loss_box"] += out["loss_box"]
                    w["n"] += 1
            if out is not None:
                last_lr = out["lr"]
            it = engine.iteration
            if it % cfg.train.log_period == 0 or it >= max_iters:
                n = max(log_window["n"], 1.0)
                elapsed = time.perf_counter() - log_start
                losses = {"loss_cls": log_window["loss_cls"] / n, "loss_box": log_window["loss_box"] / n}
                progress.line(
                    it,
                    **losses,
                    lr=last_lr,
                    images_per_s=log_window["images"] * world / max(elapsed, 1e-9),
                    data_wait_s=log_window["wait"],
                )
                if tracker is not None:
                    tracker.log_metrics(
                        {f"train/{k}": v for k, v in losses.items()} | {"train/lr": last_lr}, step=it
                    )
                log_window = dict.fromkeys(log_window, 0.0)
                log_start = time.perf_counter()
            if it % period == 0 or it >= max_iters:
                elapsed = time.perf_counter() - window_start
                final = engine.iteration >= max_iters
                result = evaluate_distributed(engine, cfg, loop_config["val_plan"], gt, rank, world)
                metrics = dict(result.metrics)
                if rank == 0:
                    progress.eval_table(it, metrics)
                if final and tracker is not None:
                    _log_pictures(engine, cfg, loop_config, gt, result, tracker)
                n = max(window["n"], 1.0)
                metrics.update(
                    {
                        "train/loss_cls": window["loss_cls"] / n,
                        "train/loss_box": window["loss_box"] / n,
                        "train/lr": last_lr,  # the lr of the last step, as the per-step curve logs it
                        # images/s over all workers: each rank processed the same number of batches.
                        "train/images_per_s": window["images"] * world / max(elapsed, 1e-9),
                        "train/data_wait_s": window["wait"],
                        "train/bad_steps": float(engine.bad_steps),
                        "data/skipped_images": float(
                            skipped_images(loop_config.get("skip_counter")) if rank == 0 else 0
                        ),
                        "iteration": float(it),
                        "epoch": float(engine.epoch),
                    }
                )
                last_ckpt = _report(
                    engine, metrics, rank, tracker, loop_config.get("run_dir"), thresholds=result.thresholds
                )
                window = dict.fromkeys(window, 0.0)
                window_start = time.perf_counter()
            if engine.iteration >= max_iters:
                break
            t_wait = time.perf_counter()
        if not seen_batch:
            raise RuntimeError(
                f"training shard of rank {rank} produced no batch of {cfg.data.batch_size} images in epoch "
                f"{engine.epoch}: the data set ({cfg.data.train_shards}) is too small for "
                f"{world} workers x data.batch_size"
            )
        engine.epoch += 1


def _log_pictures(
    engine: Engine, cfg: Config, loop_config: dict[str, Any], gt: Any, result: Any, tracker: Any
) -> None:
    """Rank 0, last eval round: PR curves, detections on val images and Figure 4 as MLflow artifacts."""
    from ray_retina.engine.loop import unwrap
    from ray_retina.report import write_run_pictures

    try:
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_run_pictures(
                unwrap(engine.model),
                engine.postprocessor,
                cfg,
                loop_config["cat_ids"],
                gt["categories"],
                loop_config["val_plan"],
                result.coco_eval,
                tmp,
                val=result.val,
            )
            for p in paths:
                tracker.log_artifact(p, "plots")
    except Exception as err:  # noqa: BLE001 - pictures must never fail a finished run
        logger.warning("run pictures failed: %s", err)


def _report(
    engine: Engine,
    metrics: dict[str, float],
    rank: int,
    tracker: Any,
    run_dir: str | None,
    *,
    thresholds: dict[str, Any] | None = None,
) -> str | None:
    """Report metrics + rank 0's checkpoint (with every rank's random state); returns where it lands."""
    import ray.train

    rngs = gather_to_rank0([rng_state()])  # a collective: every rank calls it
    if tracker is not None:
        tracker.log_metrics({k: v for k, v in metrics.items() if k != "iteration"}, step=engine.iteration)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            state = engine.state_dict(rng_per_rank=rngs)
            if thresholds is not None:
                state["thresholds"] = thresholds
            save_checkpoint(state, tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        name = checkpoint_dir_name(engine.iteration)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
    return f"{run_dir}/{name}" if run_dir else name


__all__ = ["train_loop_per_worker", "FAIL_ENV", "STAT_NAMES"]
