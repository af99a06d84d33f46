"""Ray Tune sweeps over the focal parameters (gamma, alpha, prior pi) and the learning rate.

Train V2 pattern: Tune runs a function trainable per trial; that function builds the trial's TorchTrainer
with ``TuneReportCallback`` (a Trainer passed to ``Tuner`` fails under Train V2). Each trial is a child
MLflow run of the sweep's parent run; ASHA reads ``val/AP`` (mode max) after every eval round
(``training_iteration`` counts eval rounds, since every round is exactly one ``ray.train.report``).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback

from ray_retina.config import Config, apply_overrides, config_from_dict
from ray_retina.engine.progress import format_trial_end, format_trial_round
from ray_retina.engine.session import TRIAL_RESOURCE, abs_storage, ensure_data, ensure_ray, resolve_paths

logger = logging.getLogger(__name__)

TRIAL_TAG = "ray_retina.trial_id"
FOCAL_PAIR = "__focal_pair__"

# Paper Table 1b (R50-FPN, 600 px, COCO minival): gamma with the best alpha for it, and the AP reached.
PAPER_TABLE1 = [
    # (gamma, alpha, AP)
    (0.0, 0.75, 31.1),
    (0.1, 0.75, 31.4),
    (0.2, 0.75, 31.9),
    (0.5, 0.50, 32.9),
    (1.0, 0.25, 33.7),
    (2.0, 0.25, 34.0),
    (5.0, 0.25, 32.2),
]
PRESETS = ("paper-table1",)


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
        probe = spec.get("low", (spec.get("values") or [None])[0])
        apply_overrides(cfg, {key: probe})  # fails now, naming the key, if the key is not a config key
    return space


def preset_space(preset: str) -> dict[str, Any]:
    """The search space of a preset. paper-table1: gamma with the alpha the paper pairs with it, as a grid."""
    from ray import tune

    if preset == "paper-table1":
        return {FOCAL_PAIR: tune.grid_search([[g, a] for g, a, _ in PAPER_TABLE1])}
    raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")


def trial_overrides(trial_params: dict[str, Any]) -> dict[str, Any]:
    """The dotted config overrides of one trial (a focal pair expands to loss.gamma and loss.alpha)."""
    params = {k: v for k, v in trial_params.items() if not k.startswith("__")}
    if FOCAL_PAIR in trial_params:
        gamma, alpha = trial_params[FOCAL_PAIR]
        params.update({"loss.gamma": float(gamma), "loss.alpha": float(alpha)})
    return params


# Short names of the swept keys in trial labels (the paper's symbols, spelled out for every font).
LABEL_NAMES = {"loss.gamma": "gamma", "loss.alpha": "alpha", "model.prior": "pi", "optim.lr": "lr"}


def trial_label(params: dict[str, Any], trial_id: str) -> str:
    """A trial's MLflow run name: its parameters, then its id, e.g.
    ``gamma=2 alpha=0.25 pi=0.01 lr=0.005 [abc12_00003]`` (3 significant digits)."""
    parts = []
    for key in sorted(params, key=lambda k: (list(LABEL_NAMES).index(k) if k in LABEL_NAMES else 99, k)):
        v = params[key]
        shown = f"{v:.3g}" if isinstance(v, float) else str(v)
        parts.append(f"{LABEL_NAMES.get(key, key.rsplit('.', 1)[-1])}={shown}")
    return " ".join(parts + [f"[{trial_id}]"])


def _trial(trial_params: dict[str, Any]) -> None:
    """One trial: the base config with the sampled dotted keys, trained by its own TorchTrainer."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_retina import tracking
    from ray_retina.engine.trainer import build_trainer

    if not trial_params.get("__verbose__"):
        import warnings

        from ray.util.annotations import RayDeprecationWarning

        # Ray warns about its own internal calls (ExecutionOptions.exclude_resources): not the user's.
        warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    base = config_from_dict(trial_params["__base__"])
    params = trial_overrides(trial_params)
    cfg = apply_overrides(base, params)
    trial_id = ray.tune.get_context().get_trial_id()
    run_name = f"{trial_params['__sweep__']}-{trial_id}"  # the Ray Train run (a directory name)
    uri = trial_params["__mlflow_uri__"]
    run_id = None
    if uri:
        # Named by its parameters in the MLflow UI, so a Compare view reads without a lookup table. A restored
        # trial (same params, same trial id) finds its run again by that name: one MLflow run per trial.
        label = trial_label(params, trial_id)
        run_id = tracking.find_run_by_name(uri, tracking.experiment_name(cfg), label) or tracking.create_run(
            cfg,
            run_name=label,
            uri=uri,
            parent_run_id=trial_params["__parent_run_id__"],
            tags={
                TRIAL_TAG: trial_id,
                **{f"sweep.{k}": str(v) for k, v in params.items()},
                # where `ray-retina export --run/--sweep` finds the trial's checkpoints (its MLflow name is
                # its parameters, not the Ray Train run name)
                **tracking.checkpoint_tags(abs_storage(cfg.run.storage_path), run_name),
            },
        )
    trainer = build_trainer(
        cfg,
        run_name=run_name,
        mlflow_uri=uri,
        mlflow_run_id=run_id,
        callbacks=[TuneReportCallback()],
        verbose=bool(trial_params.get("__verbose__")),
        console_tag=trial_id,
    )
    result = trainer.fit()
    if run_id:
        tracking.RunLogger(uri, run_id).end("FAILED" if result.error is not None else "FINISHED")
    if result.error is not None:
        raise result.error


class SweepProgress(Callback):
    """The console of a sweep, on the driver: a line per trial per eval round (its AP and the best trial so
    far) and one when a trial ends (finished, stopped by ASHA, failed). It replaces Tune's status table,
    whose "current best trial" line prints a trial's whole config (the base config rides in every trial's
    params); ``--verbose`` brings Tune's table back beside these lines.

    Plain data only: Tune pickles it with the sweep's state (``Tuner.restore`` brings it back)."""

    def __init__(self, rounds: int, metric: str = "val/AP", mode: str = "max") -> None:
        self.rounds, self.metric, self.sign = rounds, metric, 1.0 if mode == "max" else -1.0
        self.latest: dict[str, tuple[str, float]] = {}  # trial id -> (label, its last metric value)

    @staticmethod
    def label(trial: Any) -> str:
        return trial_label(trial_overrides(dict(trial.config or {})), trial.trial_id)

    def best(self) -> tuple[str, float] | None:
        if not self.latest:
            return None
        return max(self.latest.values(), key=lambda t: self.sign * t[1])

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value = result.get(self.metric)
        if isinstance(value, int | float) and math.isfinite(value):
            self.latest[trial.trial_id] = (self.label(trial), float(value))
        print(
            format_trial_round(
                self.label(trial), int(result.get("training_iteration", 0)), self.rounds, result, self.best()
            ),
            flush=True,
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        print(
            format_trial_end(
                self.label(trial),
                rounds_done=int(last.get("training_iteration", 0)),
                rounds=self.rounds,
                ap=last.get(self.metric),
            ),
            flush=True,
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        error = trial.get_error()
        reason = str(error).strip().splitlines()[-1][:200] if error is not None else "see error.txt"
        print(
            format_trial_end(
                self.label(trial),
                rounds_done=int(last.get("training_iteration", 0)),
                rounds=self.rounds,
                ap=last.get(self.metric),
                error=f"{reason} (trial folder: {trial.path})",
            ),
            flush=True,
        )


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    ap: float | None
    rounds: int
    iterations: int
    stopped_early: bool
    error: str | None
    per_class: dict[str, float] = field(default_factory=dict)
    """class name -> val/AP of that class at the trial's last round (``val/AP/<name>``)."""


@dataclass
class SweepSummary:
    table: str
    rows: list[TrialRow]
    best_params: dict[str, Any] | None
    best_ap: float | None
    num_trials: int
    num_errors: int
    parent_run_id: str | None
    total_iterations: int
    path: str
    artifacts: list[str] = field(default_factory=list)


def max_concurrent(cfg: Config) -> int:
    """Trials that fit at once: cluster CPUs / (workers x CPUs per worker + one data task), and GPUs alike."""
    import ray

    if cfg.tune.max_concurrent_trials is not None:
        return cfg.tune.max_concurrent_trials
    res = ray.cluster_resources()
    workers = max(1, cfg.scaling.num_workers)
    n = int(res.get("CPU", 1.0) // (workers * cfg.scaling.cpus_per_worker + cfg.data.map_num_cpus))
    if cfg.scaling.use_gpu:
        n = min(n, int(res.get("GPU", 0.0) // (workers * cfg.scaling.gpus_per_worker)))
    return max(1, n)


def _search_alg(cfg: Config, max_concurrent_trials: int, *, grid: bool = False) -> Any:
    """The searcher, carrying its own concurrency limit (so TuneConfig.max_concurrent_trials stays unset).

    Random search and grids (`grid`: a preset) use Tune's BasicVariantGenerator seeded from the config:
    the same `seed` draws the same trials, so two sweeps (e.g. ASHA against FIFO) compare the same points.
    """
    if grid or cfg.tune.search_alg == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=max_concurrent_trials)
    try:
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as err:  # pragma: no cover - depends on the optional extra
        raise ImportError(
            "tune.search_alg=optuna needs the optuna extra: pip install 'ray-retina[optuna]'"
        ) from err
    return ConcurrencyLimiter(OptunaSearch(seed=cfg.seed), max_concurrent=max_concurrent_trials)


def _rounds(cfg: Config) -> int:
    return cfg.tune.max_t or max(1, math.ceil(cfg.optim.max_iters / cfg.train.eval_period))


def _trainable():
    import ray
    from ray import tune

    # The trial function only drives its TorchTrainer: it asks for the drivers' custom resource and no
    # CPU, so the CPUs go to the trainers (a cluster without the resource: a hundredth of a CPU).
    if ray.cluster_resources().get(TRIAL_RESOURCE, 0) >= 1:
        driver_resources = {"CPU": 0, TRIAL_RESOURCE: 1}
    else:
        logger.warning("cluster has no %r resource; trial drivers take 0.01 CPU each", TRIAL_RESOURCE)
        driver_resources = {"CPU": 0.01}
    return tune.with_resources(_trial, driver_resources)


def run_sweep(
    cfg: Config,
    *,
    sweep_name: str | None = None,
    preset: str | None = None,
    resume: str | None = None,
    verbose: bool = False,
) -> SweepSummary:
    """Run (or, with `resume` = the sweep's directory, restore and finish) a sweep; summarise it in MLflow.

    The console shows :class:`SweepProgress` lines; ``verbose`` adds Tune's own status table and Ray's
    progress bars."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from ray_retina import tracking
    from ray_retina.engine.restore import check_init

    cfg = resolve_paths(cfg)
    ensure_data(cfg)
    cfg = check_init(cfg)  # initial weights exist and fit, before any trial starts
    ensure_ray(cfg, verbose=verbose)
    if resume:
        print(f"[tune] resuming the sweep in {resume}", flush=True)
        tuner = tune.Tuner.restore(resume, trainable=_trainable(), resume_errored=True)
        results = tuner.fit()
        space_keys = _space_keys(results)
        any_cfg = next(iter(results)).config if len(results) else {}
        return _summarize(
            results,
            space_keys,
            _rounds(cfg),
            any_cfg.get("__mlflow_uri__"),
            any_cfg.get("__parent_run_id__"),
            path=resume,
            preset=any_cfg.get("__preset__"),
        )

    sweep_name = sweep_name or f"{cfg.name}-{preset or 'sweep'}-{time.strftime('%Y%m%d-%H%M%S')}"
    space = preset_space(preset) if preset else search_space(cfg)
    rounds = _rounds(cfg)
    if cfg.tune.scheduler == "asha" and not preset:
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=rounds,
            grace_period=min(cfg.tune.grace_period, rounds),
            reduction_factor=cfg.tune.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()  # a preset is an ablation: every grid point runs to the end

    uri = parent_id = None
    if cfg.tracking.enabled:
        uri = tracking.resolve_tracking_uri(cfg)
        parent_id = tracking.create_run(
            cfg,
            run_name=sweep_name,
            uri=uri,
            tags={
                "ray_retina.kind": "sweep",
                "ray_retina.preset": preset or "",
                "ray_retina.scheduler": cfg.tune.scheduler,
                "ray_retina.search_alg": "grid" if preset else cfg.tune.search_alg,
            },
        )
    param_space = {
        **space,
        "__base__": cfg.model_dump(mode="json"),
        "__sweep__": sweep_name,
        "__mlflow_uri__": uri,
        "__parent_run_id__": parent_id,
        "__preset__": preset,
        "__verbose__": verbose,
    }
    storage = abs_storage(cfg.run.storage_path)
    concurrent = max_concurrent(cfg)
    how = (
        f"ASHA (grace {min(cfg.tune.grace_period, rounds)}, reduction {cfg.tune.reduction_factor:g})"
        if isinstance(scheduler, ASHAScheduler)
        else "every trial to the end"
    )
    print(
        f"[tune] sweep {sweep_name}: {'a grid' if preset else cfg.tune.num_samples} trials, {concurrent} at a time, "
        f"{how} on {cfg.tune.metric}, up to {rounds} rounds of {cfg.train.eval_period} iterations"
        + (f"; MLflow parent run {parent_id}" if parent_id else ""),
        flush=True,
    )
    tuner = tune.Tuner(
        _trainable(),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric,
            mode=cfg.tune.mode,
            scheduler=scheduler,
            search_alg=_search_alg(cfg, concurrent, grid=preset is not None),
            num_samples=1 if preset else cfg.tune.num_samples,
        ),
        run_config=tune.RunConfig(
            name=sweep_name,
            storage_path=storage,
            verbose=1 if verbose else 0,
            callbacks=[SweepProgress(rounds, cfg.tune.metric, cfg.tune.mode)],
        ),
    )
    results = tuner.fit()
    return _summarize(
        results, list(space), rounds, uri, parent_id, path=f"{storage}/{sweep_name}", preset=preset
    )


def _space_keys(results: Any) -> list[str]:
    keys: set[str] = set()
    for r in results:
        keys.update(k for k in (r.config or {}) if not k.startswith("__") or k == FOCAL_PAIR)
    return sorted(keys)


def _rows(results: Any, keys: list[str], rounds: int) -> list[TrialRow]:
    rows = []
    for r in results:
        m = r.metrics or {}
        cfg_ = r.config or {}
        params = trial_overrides({k: cfg_.get(k) for k in keys})
        n = int(m.get("training_iteration", 0))
        rows.append(
            TrialRow(
                trial_id=str(m.get("trial_id") or Path(r.path).name),
                params=params,
                ap=m.get("val/AP"),
                rounds=n,
                iterations=int(m.get("iteration", 0)),
                stopped_early=r.error is None and n < rounds,
                error=None if r.error is None else f"{type(r.error).__name__}: {r.error}"[:300],
                per_class={k[len("val/AP/") :]: float(v) for k, v in m.items() if k.startswith("val/AP/")},
            )
        )
    rows.sort(key=lambda x: -1.0 if x.ap is None else -x.ap)
    return rows


def markdown_table(rows: list[TrialRow]) -> str:
    """One row per trial: its parameters, val/AP, an AP column per class (the focal parameters trade rare
    classes against frequent ones), rounds, iterations, whether ASHA stopped it."""
    keys = sorted({k for r in rows for k in r.params})
    classes = sorted({c for r in rows for c in r.per_class})
    head = ["trial", *keys, "val/AP", *(f"AP {c}" for c in classes), "rounds", "iterations", "stopped early"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [
            f"{r.params.get(k):.4g}" if isinstance(r.params.get(k), float) else str(r.params.get(k))
            for k in keys
        ]
        ap = "error" if r.error else ("n/a" if r.ap is None else f"{r.ap:.4f}")
        per = [f"{r.per_class[c]:.4f}" if r.per_class.get(c, -1.0) >= 0 else "n/a" for c in classes]
        cells = [
            r.trial_id,
            *vals,
            ap,
            *per,
            str(r.rounds),
            str(r.iterations),
            "yes" if r.stopped_early else "no",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paper_table(rows: list[TrialRow]) -> str:
    """Our AP per (gamma, alpha) beside the paper's Table 1b."""
    ours = {
        (round(r.params["loss.gamma"], 3), round(r.params["loss.alpha"], 3)): r.ap
        for r in rows
        if r.ap is not None
    }
    lines = ["| gamma | alpha | our val/AP | paper AP (R50-FPN, 600 px, COCO) |", "|---|---|---|---|"]
    for g, a, ap in PAPER_TABLE1:
        v = ours.get((round(g, 3), round(a, 3)))
        lines.append(f"| {g} | {a} | {'n/a' if v is None else f'{100 * v:.1f}'} | {ap} |")
    return "\n".join(lines)


def _summarize(
    results: Any,
    keys: list[str],
    rounds: int,
    uri: str | None,
    parent_id: str | None,
    *,
    path: str,
    preset: str | None,
) -> SweepSummary:
    from ray_retina import tracking

    rows = _rows(results, keys, rounds)
    table = markdown_table(rows)
    if preset == "paper-table1":
        table += "\n\n" + paper_table(rows)
    best = rows[0] if rows and rows[0].ap is not None else None
    num_errors = sum(r.error is not None for r in rows)
    artifacts: list[str] = []
    if uri and parent_id:
        _close_children(uri, parent_id, rounds, rows, best)
        log = tracking.RunLogger(uri, parent_id)
        log.log_text(table, "sweep_summary.md")
        with tempfile.TemporaryDirectory() as tmp:
            artifacts = _sweep_plots(rows, Path(tmp), preset)
            for a in artifacts:
                log.log_artifact(a, "plots")
        artifacts = [f"plots/{Path(a).name}" for a in artifacts]
        if best:
            log.log_metrics(
                {"best/val/AP": best.ap, "sweep/total_iterations": sum(r.iterations for r in rows)}, step=0
            )
            log.set_tags({"ray_retina.best_trial": best.trial_id, "ray_retina.best_params": best.params})
        log.end("FINISHED" if num_errors == 0 else "FAILED")
    return SweepSummary(
        table=table,
        rows=rows,
        best_params=best.params if best else None,
        best_ap=best.ap if best else None,
        num_trials=len(rows),
        num_errors=num_errors,
        parent_run_id=parent_id,
        total_iterations=sum(r.iterations for r in rows),
        path=path,
        artifacts=artifacts,
    )


def _sweep_plots(rows: list[TrialRow], out: Path, preset: str | None) -> list[str]:
    """Parallel coordinates and AP-vs-parameter scatter plots (and AP vs gamma for the paper preset)."""
    try:
        from ray_retina import plots
    except ImportError:  # pragma: no cover
        return []
    data = [{**r.params, "val/AP": r.ap} for r in rows if r.ap is not None]
    if not data:
        return []
    params = sorted({k for r in rows for k in r.params})
    paths = []
    try:
        paths.append(
            str(plots.parallel_coordinates(data, params, "val/AP", out / "parallel_coordinates.png"))
        )
        paths.append(str(plots.ap_vs_param_scatter(data, params, "val/AP", out / "ap_vs_params.png")))
        if preset == "paper-table1":
            paths.append(str(plots.ap_vs_gamma_with_paper(data, PAPER_TABLE1, out / "ap_vs_gamma.png")))
    except Exception as err:  # noqa: BLE001 - a plot must never fail a finished sweep
        logger.warning("sweep plots failed: %s", err)
    return paths


def _close_children(
    uri: str, parent_id: str, rounds: int, rows: list[TrialRow], best: TrialRow | None
) -> None:
    """Tag each trial's run with its ASHA outcome. A trial stopped by the scheduler is killed mid-fit, so its
    run would stay RUNNING: close it here as KILLED (stopped early), or FINISHED / FAILED."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    by_trial = {r.trial_id: r for r in rows}
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
        max_results=1000,
    )
    for run in children:
        tid = run.data.tags.get(TRIAL_TAG, "")
        r = by_trial.get(tid)
        if r is None:
            continue
        client.set_tag(run.info.run_id, "stopped_early", str(r.stopped_early).lower())
        client.set_tag(run.info.run_id, "last_round", str(r.rounds))
        client.set_tag(run.info.run_id, "best_trial", str(best is not None and tid == best.trial_id).lower())
        status = "FAILED" if r.error else ("KILLED" if r.stopped_early else "FINISHED")
        if run.info.status == "RUNNING" or (r.stopped_early and run.info.status != "KILLED"):
            client.set_terminated(run.info.run_id, status=status)
