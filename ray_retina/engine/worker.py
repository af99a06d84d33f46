"""Ray Train adapter of the training loop: device, DDP, dataset shards, periodic eval, report, checkpoint.

Contract with Ray Train V2: every rank calls ``ray.train.report`` exactly once per eval period (it is a
barrier costing about 2 s), with the same metrics (computed on rank 0 and broadcast) and a checkpoint from
rank 0 only. Training steps between reports touch Ray only to pull batches.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ray_retina.config import Config, config_from_dict
from ray_retina.engine.evaluate import STAT_NAMES, coco_evaluate
from ray_retina.engine.loop import Engine, NonFiniteLossError, seed_everything

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
# Test-only fault injection: "RANK:ITERATION" makes that rank's process exit once at that iteration
# (the marker file keeps the restarted worker from dying again). Never set in real runs.
FAIL_ENV = "RAY_RETINA_TEST_FAIL_AT"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _broadcast(obj: Any) -> Any:
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather_to_rank0(items: list[Any]) -> list[Any]:
    if not _distributed():
        return items
    parts: list[list[Any]] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None  # type: ignore[list-item]
    dist.gather_object(items, parts, dst=0)
    return [x for p in parts for x in p] if parts is not None else []


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


def evaluate_distributed(
    engine: Engine,
    cfg: Config,
    val_files: list[str],
    gt: dict[str, Any] | None,
    rank: int,
    world: int,
    keep_eval: list[Any] | None = None,
) -> dict[str, float]:
    """Each rank runs detection on its share of the val shard files; rank 0 computes COCO AP on the union.
    Returns the 12 stats on every rank (broadcast), keyed ``val/AP`` ... ``val/ARl``. On rank 0 the
    COCOeval object is appended to `keep_eval` when given (for the PR-curve pictures)."""
    from ray_retina.data.pipeline import iter_eval_batches

    my_files = val_files[rank::world]
    dets: list[dict[str, Any]] = []
    img_ids: list[int] = []
    if my_files:
        dets, img_ids = engine.predict_all(iter_eval_batches(my_files, cfg.data, max_images=None))
    all_dets = _gather_to_rank0(dets)
    all_ids = _gather_to_rank0(img_ids)
    stats: dict[str, float] = {}
    if rank == 0:
        assert gt is not None
        ids = sorted(set(all_ids))
        stats, ev = coco_evaluate(gt, all_dets, backend=cfg.train.eval_backend, img_ids=ids, return_eval=True)
        if keep_eval is not None:
            keep_eval.append(ev)
        stats = {f"val/{k}": v for k, v in stats.items()}
        stats["val/num_images"] = float(len(ids))
        stats["val/num_detections"] = float(len(all_dets))
    return _broadcast(stats)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The function Ray Train runs on every worker. `loop_config` holds the config (as a dict) and the run's
    facts the driver resolved: ``num_classes``, ``cat_ids``, ``val_files``, ``mlflow_uri``, ``mlflow_run_id``."""
    import ray.train
    import ray.train.torch

    from ray_retina.data.pipeline import RetinaCollate, skipped_images
    from ray_retina.data.shards import coco_gt_from_shards
    from ray_retina.model import build_criterion, build_model, build_postprocessor
    from ray_retina.tracking import RunLogger

    cfg = config_from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.train.threads_per_worker:
        torch.set_num_threads(cfg.train.threads_per_worker)
    seed_everything(cfg.seed + rank)

    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    num_classes = int(loop_config["num_classes"])
    model = build_model(cfg, num_classes)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model, move_to_device=device) if world > 1 else model.to(device)
    if cfg.optim.compile:
        model = torch.compile(model)
    engine = Engine(
        cfg, model, build_criterion(cfg, num_classes), build_postprocessor(cfg), device, loop_config["cat_ids"]
    )

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        engine.load_state_dict(state)
        logger.info("rank %d resumed at iteration %d", rank, engine.iteration)

    tracker = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        tracker = RunLogger(loop_config["mlflow_uri"], loop_config["mlflow_run_id"])
    # COCO AP is computed on the images actually evaluated (coco_evaluate's img_ids), so a val subset
    # (data.val_max_images) is scored against its own GT only.
    gt = coco_gt_from_shards(cfg.data.val_shards) if rank == 0 else None

    train_shard = ray.train.get_dataset_shard("train")
    collate = RetinaCollate(size_divisibility=cfg.data.size_divisibility)
    max_iters = cfg.optim.max_iters
    period = cfg.train.eval_period
    window: dict[str, float] = {"loss_cls": 0.0, "loss_box": 0.0, "n": 0.0, "images": 0.0, "wait": 0.0}
    window_start = time.perf_counter()
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
            window["wait"] += time.perf_counter() - t_wait
            _maybe_inject_failure(rank, engine.iteration, loop_config["storage_path"])
            try:
                out = engine.train_step(batch)
            except NonFiniteLossError as err:
                last = ray.train.get_checkpoint() if last_ckpt is None else last_ckpt
                where = getattr(last, "path", last) or "none (no eval period finished yet)"
                raise NonFiniteLossError(f"{err}; last good checkpoint: {where}") from None
            window["images"] += batch["images"].shape[0]
            if out is not None:
                last_lr = out["lr"]
                window["loss_cls"] += out["loss_cls"]
                window["loss_box"] += out["loss_box"]
                window["n"] += 1
            it = engine.iteration
            if tracker is not None and it % cfg.train.log_period == 0 and out is not None:
                tracker.log_metrics(
                    {"train/loss_cls": out["loss_cls"], "train/loss_box": out["loss_box"], "train/lr": out["lr"]},
                    step=it,
                )
            if it % period == 0 or it >= max_iters:
                elapsed = time.perf_counter() - window_start
                final = engine.iteration >= max_iters
                coco_eval: list[Any] = []
                metrics = evaluate_distributed(engine, cfg, loop_config["val_files"], gt, rank, world, coco_eval)
                if final and tracker is not None:
                    _log_pictures(engine, cfg, loop_config, gt, coco_eval[0] if coco_eval else None, tracker)
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
                        "data/skipped_images": float(skipped_images() if rank == 0 else 0),
                        "iteration": float(it),
                        "epoch": float(engine.epoch),
                    }
                )
                last_ckpt = _report(engine, metrics, rank, tracker, loop_config.get("run_dir"))
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


def _log_pictures(engine: Engine, cfg: Config, loop_config: dict[str, Any], gt: Any, coco_eval: Any, tracker: Any) -> None:
    """Rank 0, last eval round: PR curves, detections on val images and Figure 4 as MLflow artifacts."""
    from ray_retina.engine.loop import unwrap
    from ray_retina.predict import write_run_pictures

    try:
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_run_pictures(
                unwrap(engine.model), engine.criterion, engine.postprocessor, cfg, loop_config["cat_ids"],
                gt["categories"], loop_config["val_files"], coco_eval, tmp,
            )  # fmt: skip
            for p in paths:
                tracker.log_artifact(p, "plots")
    except Exception as err:  # noqa: BLE001 - pictures must never fail a finished run
        logger.warning("run pictures failed: %s", err)


def _report(engine: Engine, metrics: dict[str, float], rank: int, tracker: Any, run_dir: str | None) -> str | None:
    """Report metrics + rank 0's checkpoint; returns where the checkpoint lands in storage."""
    import ray.train

    if tracker is not None:
        tracker.log_metrics({k: v for k, v in metrics.items() if k != "iteration"}, step=engine.iteration)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            torch.save(engine.state_dict(), Path(tmp) / CHECKPOINT_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        name = f"checkpoint_{engine.iteration:07d}"
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
    return f"{run_dir}/{name}" if run_dir else name


__all__ = ["train_loop_per_worker", "evaluate_distributed", "CHECKPOINT_FILE", "STAT_NAMES"]
