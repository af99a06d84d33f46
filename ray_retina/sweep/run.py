"""``ray-retina tune``: a sweep over the focal parameters (gamma, alpha, prior pi) and the learning rate, with
its noise floor.

A sweep is two Tune experiments side by side in the storage folder: ``<name>.noise`` trains the base config
``tune.noise_repeats`` times under other seeds (every round, no early stop: the noise floor), then
``<name>`` runs the searched trials under ASHA (or FIFO), whose decisions stay as Ray makes them. Trials are
reproducible: the same config, seed and world size give the same losses and AP (``data.deterministic`` and
``train.deterministic`` are on for every trial). Each trial is a child MLflow run of the sweep's parent run;
ASHA reads ``val/AP`` (mode max) after every eval round (``training_iteration`` counts eval rounds, since
every round is exactly one ``ray.train.report``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from ray_retina import tracking
from ray_retina.config import Config, apply_overrides, config_from_dict
from ray_retina.engine.restore import check_init
from ray_retina.engine.session import abs_storage, ensure_data, ensure_ray, resolve_paths
from ray_retina.sweep.console import SweepProgress, format_noise_floor, format_ranking
from ray_retina.sweep.noise import NoiseFloor, noise_floor, versus_default
from ray_retina.sweep.report import (
    SweepSummary,
    close_children,
    importance_of,
    log_to_parent,
    mark_ties,
    markdown_table,
    rows_of,
    summary_markdown,
)
from ray_retina.sweep.space import (
    max_concurrent,
    noise_space,
    preset_space,
    rounds_of,
    search_alg,
    search_space,
)
from ray_retina.sweep.trial import NOISE_SUFFIX, SweepSetup, trainable
from ray_retina.uri import join_uri

REPRODUCIBLE = {"data.deterministic": True, "train.deterministic": True}
NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"  # Tune's choice of console engine (ray.tune.experimental.output)


def run_sweep(
    cfg: Config,
    *,
    sweep_name: str | None = None,
    preset: str | None = None,
    resume: str | None = None,
    verbose: bool = False,
) -> SweepSummary:
    """Run (or, with `resume` = the sweep's directory, restore and finish) a sweep; summarise it in MLflow and
    in ``sweep_summary.md``.

    The console shows :class:`SweepProgress` lines; ``verbose`` adds Tune's own status table and Ray's
    progress bars."""
    cfg = resolve_paths(cfg)
    if cfg.tracking.enabled and (why := tracking.check_reachable(tracking.resolve_tracking_uri(cfg))):
        # One line before Ray starts; a server lost later costs the trials nothing (tracking.RunLogger).
        raise tracking.TrackingUnavailable(
            f"{why}: start it, or sweep without tracking (--set tracking.enabled=false)"
        )
    ensure_data(cfg)
    cfg = check_init(cfg)  # initial weights exist and fit, before any trial starts
    ensure_ray(cfg, verbose=verbose)
    if resume:
        print(f"[tune] resuming the sweep in {resume}", flush=True)
        setup = SweepSetup.load(resume)
        setup = SweepSetup(**{**setup.__dict__, "verbose": verbose})
        cfg = config_from_dict(setup.base)
        sweep_dir = resume.rstrip("/")
    else:
        cfg = apply_overrides(cfg, REPRODUCIBLE)
        sweep_name = sweep_name or f"{cfg.name}-{preset or 'sweep'}-{time.strftime('%Y%m%d-%H%M%S')}"
        sweep_dir = join_uri(abs_storage(cfg.run.storage_path), sweep_name)
        setup = SweepSetup(
            base=cfg.model_dump(mode="json"),
            sweep_name=sweep_name,
            mlflow_uri=tracking.resolve_tracking_uri(cfg) if cfg.tracking.enabled else None,
            parent_run_id=None,
            preset=preset,
            verbose=verbose,
        )
        if setup.mlflow_uri:
            setup = SweepSetup(**{**setup.__dict__, "parent_run_id": _parent_run(cfg, setup)})
        setup.save(sweep_dir)
    rounds = rounds_of(cfg)
    repeats = _noise_phase(cfg, setup, sweep_dir + NOISE_SUFFIX, rounds) if cfg.tune.noise_repeats else None
    if repeats is not None and any(r.error is None and r.rounds < rounds for r in repeats):
        # Tune returns from an interrupted experiment (Ctrl-C) as from a finished one: no search on a floor
        # measured halfway.
        print(f"[tune] the noise repeats stopped before their last round: finish with --resume {sweep_dir}")
        raise KeyboardInterrupt
    floor = None
    if repeats is not None:
        floor = noise_floor((r.history for r in repeats), cfg.tune.noise_repeats, cfg.tune.metric)
        print(format_noise_floor(floor.std, cfg.tune.noise_repeats, cfg.tune.metric), flush=True)
    results = _fit(sweep_dir, setup, lambda: _sweep_tuner(cfg, setup, rounds, floor))
    return _summarize(cfg, setup, results, repeats or [], floor, rounds, sweep_dir)


def _parent_run(cfg: Config, setup: SweepSetup) -> str:
    return tracking.create_run(
        cfg,
        run_name=setup.sweep_name,
        uri=setup.mlflow_uri,
        tags={
            "ray_retina.kind": "sweep",
            "ray_retina.preset": setup.preset or "",
            "ray_retina.scheduler": cfg.tune.scheduler,
            "ray_retina.search_alg": "grid" if setup.preset else cfg.tune.search_alg,
            "ray_retina.noise_repeats": str(cfg.tune.noise_repeats),
        },
    )


def _fit(sweep_dir: str, setup: SweepSetup, make: Callable[[], tune.Tuner]) -> Any:
    """Restore the experiment in ``sweep_dir`` when Tune saved one (a resumed sweep), else start it."""
    with _tune_console(setup.verbose):
        if tune.Tuner.can_restore(sweep_dir):
            return tune.Tuner.restore(sweep_dir, trainable=trainable(setup), resume_errored=True).fit()
        return make().fit()


@contextmanager
def _tune_console(verbose: bool) -> Iterator[None]:
    """Tune's console inside the ``fit`` call: without ``verbose`` none of it (our :class:`SweepProgress`
    lines say what happens). Tune's default output engine prints its experiment box and "View detailed
    results" lines even at ``verbose=0``; its older engine (``RAY_AIR_NEW_OUTPUT=0``, read when ``fit``
    starts) honours ``verbose=0``. The variable is set for the call only and put back after it."""
    if verbose:
        yield
        return
    old = os.environ.get(NEW_OUTPUT_ENV)
    os.environ[NEW_OUTPUT_ENV] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(NEW_OUTPUT_ENV, None)
        else:
            os.environ[NEW_OUTPUT_ENV] = old


def _noise_phase(cfg: Config, setup: SweepSetup, noise_dir: str, rounds: int) -> list[Any]:
    """Train the base config ``tune.noise_repeats`` times (seeds seed..seed+k-1), every round: their rows."""
    noise_setup = SweepSetup(
        **{**setup.__dict__, "noise": True, "sweep_name": setup.sweep_name + NOISE_SUFFIX}
    )
    noise_setup.save(noise_dir)
    k = cfg.tune.noise_repeats
    print(
        f"[tune] noise floor: the base config {k} times (seeds {cfg.seed}..{cfg.seed + k - 1}), "
        f"{rounds} rounds each, before the search",
        flush=True,
    )

    def make() -> tune.Tuner:
        concurrent = max_concurrent(cfg)
        return tune.Tuner(
            trainable(noise_setup),
            param_space=noise_space(cfg),
            tune_config=tune.TuneConfig(
                metric=cfg.tune.metric,
                mode=cfg.tune.mode,
                scheduler=FIFOScheduler(),
                search_alg=search_alg(cfg, concurrent, grid=True),
                num_samples=1,
            ),
            run_config=_run_config(cfg, noise_setup.sweep_name, rounds, setup.verbose),
        )

    return rows_of(_fit(noise_dir, noise_setup, make), rounds, cfg.tune.metric)


def _run_config(cfg: Config, name: str, rounds: int, verbose: bool) -> tune.RunConfig:
    """Tune's run config. A failed trial (a worker killed, e.g. by Ray's memory monitor, beyond what its
    TorchTrainer's own ``run.max_failures`` restarts absorb) is started again up to ``run.max_failures``
    times: the same trial id finds its Ray Train run (continuing from its last checkpoint) and its MLflow
    run again."""
    return tune.RunConfig(
        name=name,
        storage_path=abs_storage(cfg.run.storage_path),
        verbose=1 if verbose else 0,
        callbacks=[SweepProgress(rounds, cfg.tune.metric, cfg.tune.mode)],
        failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures),
    )


def _sweep_tuner(cfg: Config, setup: SweepSetup, rounds: int, floor: NoiseFloor | None) -> tune.Tuner:
    """The searched trials' Tuner: ``param_space`` holds the searched keys only."""
    preset = setup.preset
    space = preset_space(preset) if preset else search_space(cfg)
    grace = min(cfg.tune.grace_period, rounds)
    if cfg.tune.scheduler == "asha" and not preset:
        scheduler: Any = ASHAScheduler(
            time_attr="training_iteration",
            max_t=rounds,
            grace_period=grace,
            reduction_factor=cfg.tune.reduction_factor,
        )
        how = f"ASHA (grace {grace}, reduction {cfg.tune.reduction_factor:g})"
    else:
        scheduler = FIFOScheduler()  # a preset is an ablation: every grid point runs to the end
        how = "every trial to the end"
    concurrent = max_concurrent(cfg)
    noise = ""
    if floor is not None and floor.std:
        last = max(floor.std)
        noise = f"; noise floor {100 * floor.std[last]:.2f} AP points (std at round {last})"
    print(
        f"[tune] sweep {setup.sweep_name}: {'a grid' if preset else cfg.tune.num_samples} trials, {concurrent} at "
        f"a time, {how} on {cfg.tune.metric}, up to {rounds} rounds of {cfg.train.eval_period} iterations"
        + (f"; MLflow parent run {setup.parent_run_id}" if setup.parent_run_id else "")
        + noise,
        flush=True,
    )
    return tune.Tuner(
        trainable(setup),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric,
            mode=cfg.tune.mode,
            scheduler=scheduler,
            search_alg=search_alg(cfg, concurrent, grid=preset is not None),
            num_samples=1 if preset else cfg.tune.num_samples,
        ),
        run_config=_run_config(cfg, setup.sweep_name, rounds, setup.verbose),
    )


def _summarize(
    cfg: Config,
    setup: SweepSetup,
    results: Any,
    repeats: list[Any],
    floor: NoiseFloor | None,
    rounds: int,
    sweep_dir: str,
) -> SweepSummary:
    """Rank, mark ties, fit the importance, print the closing lines, log the parent run and close it."""
    rows = rows_of(results, rounds, cfg.tune.metric)
    mark_ties(rows, floor, cfg.tune.metric)
    base = {k: float(v) for k, v in _base_values(cfg).items()}
    best = rows[0] if rows and rows[0].ap is not None else None
    summary = SweepSummary(
        table=markdown_table(rows),
        rows=rows,
        best_params=best.params if best else None,
        best_ap=best.ap if best else None,
        num_trials=len(rows),
        num_errors=sum(r.error is not None for r in rows + repeats),
        parent_run_id=setup.parent_run_id,
        total_iterations=sum(r.iterations for r in rows + repeats),
        path=sweep_dir,
        noise=floor,
        repeats=repeats,
        importance=importance_of(rows, repeats, base, floor),
    )
    text = summary_markdown(summary, setup.preset, setup.sweep_name)
    if floor is not None:
        print(format_noise_floor(floor.std, floor.repeats, cfg.tune.metric), flush=True)
    vs_default = (
        versus_default(best.ap, floor, best.rounds) if best and floor and best.ap is not None else None
    )
    for line in format_ranking(rows, best.label if best else None, vs_default):
        print(line, flush=True)
    if setup.mlflow_uri and setup.parent_run_id:
        close_children(setup.mlflow_uri, setup.parent_run_id, rows + repeats, best)
        summary.artifacts = log_to_parent(setup.mlflow_uri, setup.parent_run_id, summary, text, setup.preset)
    summary.table = text
    return summary


def _base_values(cfg: Config) -> dict[str, Any]:
    """The base config's values of the focal keys (where the noise repeats sit in the importance fit)."""
    return {
        "loss.gamma": cfg.loss.gamma,
        "loss.alpha": cfg.loss.alpha,
        "model.prior": cfg.model.prior,
        "optim.lr": cfg.optim.lr,
    }
