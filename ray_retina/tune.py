"""Ray Tune sweeps over the focal parameters (gamma, alpha, prior pi) and the learning rate.

Train V2 pattern: Tune runs a function trainable per trial; that function builds the trial's TorchTrainer
with ``TuneReportCallback`` (a Trainer passed to ``Tuner`` fails under Train V2). Each trial is a child
MLflow run of the sweep's parent run; ASHA reads ``val/AP`` (mode max) after every eval round.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from ray_retina.config import Config, apply_overrides, config_from_dict

logger = logging.getLogger(__name__)

TRIAL_TAG = "ray_retina.trial_id"
# A custom resource that only Tune trial drivers ask for: a driver just waits on its TorchTrainer, so it
# must not hold a CPU the trainers or Ray Data need. `ray-retina` declares it on the local Ray it starts;
# on a cluster, add it to the head's `ray start --resources` (cluster/ does).
TRIAL_RESOURCE = "ray_retina_trial"


def search_space(cfg: Config) -> dict[str, Any]:
    """Tune distributions from ``tune.search_space``: dotted key -> {type, low, high | values}."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, spec in cfg.tune.search_space.items():
        kind = spec.get("type")
        if kind == "uniform":
            space[key] = tune.uniform(float(spec["low"]), float(spec["high"]))
        elif kind == "loguniform":
            space[key] = tune.loguniform(float(spec["low"]), float(spec["high"]))
        elif kind == "choice":
            space[key] = tune.choice(list(spec["values"]))
        elif kind == "grid":
            space[key] = tune.grid_search(list(spec["values"]))
        else:
            raise ValueError(
                f"tune.search_space.{key}: type must be uniform, loguniform, choice or grid, got {kind!r}"
            )
        apply_overrides(cfg, {key: spec.get("low", (spec.get("values") or [None])[0])})  # the key must exist
    return space


def _trial(trial_params: dict[str, Any]) -> None:
    """One trial: the base config with the sampled dotted keys, trained by its own TorchTrainer."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_retina import tracking
    from ray_retina.engine.trainer import build_trainer

    base = config_from_dict(trial_params["__base__"])
    params = {k: v for k, v in trial_params.items() if not k.startswith("__")}
    cfg = apply_overrides(base, params)
    ctx = ray.tune.get_context()
    trial_id = ctx.get_trial_id()
    run_name = f"{trial_params['__sweep__']}-{trial_id}"
    uri = trial_params["__mlflow_uri__"]
    run_id = None
    if uri:
        run_id = tracking.find_run_by_name(uri, tracking.experiment_name(cfg), run_name) or tracking.create_run(
            cfg, run_name=run_name, uri=uri, parent_run_id=trial_params["__parent_run_id__"],
            tags={TRIAL_TAG: trial_id, **{f"sweep.{k}": str(v) for k, v in params.items()}},
        )  # fmt: skip
    trainer = build_trainer(
        cfg, run_name=run_name, mlflow_uri=uri, mlflow_run_id=run_id, callbacks=[TuneReportCallback()]
    )
    result = trainer.fit()
    if run_id:
        tracking.RunLogger(uri, run_id).end("FAILED" if result.error is not None else "FINISHED")
    if result.error is not None:
        raise result.error


@dataclass
class SweepSummary:
    table: str
    best_params: dict[str, Any] | None
    best_ap: float | None
    num_trials: int
    num_errors: int
    parent_run_id: str | None
    total_iterations: int


def max_concurrent(cfg: Config) -> int:
    """Trials that fit at once: cluster CPUs / (workers x CPUs per worker + one data task)."""
    import ray

    if cfg.tune.max_concurrent_trials is not None:
        return cfg.tune.max_concurrent_trials
    total = ray.cluster_resources().get("CPU", 1.0)
    per_trial = max(1, cfg.scaling.num_workers) * cfg.scaling.cpus_per_worker + cfg.data.map_num_cpus
    return max(1, int(total // per_trial))


def run_sweep(cfg: Config, *, sweep_name: str | None = None) -> SweepSummary:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from ray_retina import tracking
    from ray_retina.engine.trainer import abs_storage, ensure_data, ensure_ray, resolve_paths

    cfg = resolve_paths(cfg)
    ensure_data(cfg)
    ensure_ray(cfg)
    sweep_name = sweep_name or f"{cfg.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    space = search_space(cfg)
    rounds = cfg.tune.max_t or max(1, math.ceil(cfg.optim.max_iters / cfg.train.eval_period))
    if cfg.tune.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=rounds,
            grace_period=min(cfg.tune.grace_period, rounds),
            reduction_factor=cfg.tune.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()

    uri = parent_id = None
    if cfg.tracking.enabled:
        uri = tracking.resolve_tracking_uri(cfg)
        parent_id = tracking.create_run(cfg, run_name=sweep_name, uri=uri, tags={"ray_retina.kind": "sweep"})

    param_space = {
        **space,
        "__base__": cfg.model_dump(mode="json"),
        "__sweep__": sweep_name,
        "__mlflow_uri__": uri,
        "__parent_run_id__": parent_id,
    }
    # The trial function only drives its TorchTrainer: it asks for the drivers' custom resource and no
    # CPU, so the CPUs go to the trainers (a cluster without the resource: a hundredth of a CPU).
    if ray.cluster_resources().get(TRIAL_RESOURCE, 0) >= 1:
        driver_resources = {"CPU": 0, TRIAL_RESOURCE: 1}
    else:
        logger.warning("cluster has no %r resource; trial drivers take 0.01 CPU each", TRIAL_RESOURCE)
        driver_resources = {"CPU": 0.01}
    trainable = tune.with_resources(_trial, driver_resources)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric,
            mode=cfg.tune.mode,
            scheduler=scheduler,
            num_samples=cfg.tune.num_samples,
            max_concurrent_trials=max_concurrent(cfg),
        ),
        run_config=tune.RunConfig(name=sweep_name, storage_path=abs_storage(cfg.run.storage_path)),
    )
    results = tuner.fit()
    summary = _summarize(results, list(space), rounds, uri, parent_id)
    logger.info("sweep %s done on %s", sweep_name, ray.cluster_resources())
    return summary


def _summarize(results: Any, keys: list[str], rounds: int, uri: str | None, parent_id: str | None) -> SweepSummary:
    from ray_retina import tracking

    rows = []
    total_iters = 0
    num_errors = 0
    for r in results:
        m = r.metrics or {}
        cfg_ = {k: r.config.get(k) for k in keys}
        ap = m.get("val/AP")
        n_rounds = int(m.get("training_iteration", 0))
        total_iters += int(m.get("iteration", 0))
        num_errors += r.error is not None
        rows.append((cfg_, ap, n_rounds, m.get("trial_id", ""), r.error))
    rows.sort(key=lambda x: -1.0 if x[1] is None else -x[1])
    head = "| trial | " + " | ".join(keys) + " | val/AP | rounds | stopped early |"
    lines = [head, "|" + "---|" * (len(keys) + 4)]
    for params, ap, n, tid, err in rows:
        vals = " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in params.values())
        ap_s = "error" if err is not None else ("n/a" if ap is None else f"{ap:.4f}")
        lines.append(f"| {tid} | {vals} | {ap_s} | {n} | {'yes' if n < rounds else 'no'} |")
    table = "\n".join(lines)
    best = rows[0] if rows and rows[0][1] is not None else None
    if uri and parent_id:
        _close_children(uri, parent_id, rounds, results)
        log = tracking.RunLogger(uri, parent_id)
        log.log_text(table, "sweep_summary.md")
        if best:
            log.log_metrics({"best/val/AP": best[1]}, step=0)
            log.set_tags({"ray_retina.best_trial": best[3]})
        log.end("FINISHED" if num_errors == 0 else "FAILED")
    return SweepSummary(
        table=table,
        best_params=best[0] if best else None,
        best_ap=best[1] if best else None,
        num_trials=len(rows),
        num_errors=num_errors,
        parent_run_id=parent_id,
        total_iterations=total_iters,
    )


def _close_children(uri: str, parent_id: str, rounds: int, results: Any) -> None:
    """Tag each trial's run with its ASHA outcome; a trial stopped by the scheduler is killed mid-fit, so
    its run would stay RUNNING: close it as KILLED (stopped early) here."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    by_trial = {str((r.metrics or {}).get("trial_id")): r for r in results}
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=1000
    )
    for run in children:
        tid = run.data.tags.get(TRIAL_TAG)
        r = by_trial.get(tid)
        n = int((r.metrics or {}).get("training_iteration", 0)) if r is not None else 0
        stopped = r is not None and r.error is None and n < rounds
        client.set_tag(run.info.run_id, "stopped_early", str(stopped).lower())
        client.set_tag(run.info.run_id, "last_round", str(n))
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED" if stopped else "FINISHED")
