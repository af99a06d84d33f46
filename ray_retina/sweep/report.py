"""A finished sweep, reported: one row per trial (ranked by the metric, beside the noise floor, with ties
marked), the noise repeats, the parameter importance, plots, and the MLflow parent run that holds them all
(its tie tags are what ``ray-retina export --sweep`` reads: ``sweep/champion.py``)."""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mlflow.tracking import MlflowClient

from ray_retina import plots, tracking
from ray_retina.sweep.champion import NOISE_FLOOR_TAG, TIED_TAG, VS_DEFAULT_TAG
from ray_retina.sweep.importance import ImportanceFit, fit_importance, importance_table
from ray_retina.sweep.noise import TIE_SIGMAS, NoiseFloor, beyond_default, tied, versus_default
from ray_retina.sweep.space import FOCAL_KEYS, PAPER_TABLE1, trial_label, trial_overrides

logger = logging.getLogger(__name__)


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
    per_class_f1: dict[str, float] = field(default_factory=dict)
    """class name -> ``val/F1/<name>`` at the trial's last round, when the run reports it."""
    history: dict[int, dict[str, float]] = field(default_factory=dict)
    """round -> the metrics reported at that round."""
    tied: bool | None = None
    """Gap to the best within the noise floor (None: no floor)."""
    stop_within_noise: bool | None = None
    """Stopped by the scheduler while within the noise floor of the best AP at that round."""
    vs_default: str = "n/a"

    @property
    def label(self) -> str:
        return trial_label(self.params, self.trial_id)


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
    noise: NoiseFloor | None = None
    repeats: list[TrialRow] = field(default_factory=list)
    importance: ImportanceFit | None = None


def rows_of(results: Any, rounds: int, metric: str = "val/AP") -> list[TrialRow]:
    """One row per trial of a Tune ``ResultGrid``, best first: its searched keys (as config overrides), last
    metric, per-class AP and F1, the metrics of every round, and whether the scheduler stopped it."""
    rows = []
    for r in results:
        m = r.metrics or {}
        n = int(m.get("training_iteration", 0))
        rows.append(
            TrialRow(
                trial_id=str(m.get("trial_id") or Path(r.path).name),
                params=trial_overrides(dict(r.config or {})),
                ap=m.get(metric),
                rounds=n,
                iterations=int(m.get("iteration", 0)),
                stopped_early=r.error is None and n < rounds,
                error=None if r.error is None else f"{type(r.error).__name__}: {r.error}"[:300],
                per_class=_by_class(m, "val/AP/"),
                per_class_f1=_by_class(m, "val/F1/"),
                history=_history(r),
            )
        )
    rows.sort(key=lambda x: -math.inf if x.ap is None else -x.ap)
    return rows


def _by_class(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    return {k[len(prefix) :]: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def _history(result: Any) -> dict[int, dict[str, float]]:
    df = getattr(result, "metrics_dataframe", None)
    if df is None or "training_iteration" not in df:
        return {}
    out: dict[int, dict[str, float]] = {}
    for rec in df.to_dict("records"):  # a round redone after a restore: its last report wins
        out[int(rec["training_iteration"])] = {
            k: float(v) for k, v in rec.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
    return out


def mark_ties(rows: list[TrialRow], floor: NoiseFloor | None, metric: str = "val/AP") -> None:
    """Set each row's ``tied`` (gap to the best within ``TIE_SIGMAS`` floors at the best's round),
    ``stop_within_noise`` (a stopped trial within the floor of the best value any trial had at the round it
    was stopped) and ``vs_default`` (against the repeats' mean at its last round)."""
    scored = [r for r in rows if r.ap is not None and r.error is None]
    if not scored or floor is None:
        return
    best = max(scored, key=lambda r: r.ap)
    limit = floor.threshold(best.rounds)
    for r in scored:
        r.tied = tied(best.ap - r.ap, limit)
        r.vs_default = beyond_default(r.ap, floor, r.rounds)
        if r.stopped_early:
            at_round = [o.history.get(r.rounds, {}).get(metric) for o in scored]
            top = max((v for v in at_round if v is not None), default=r.ap)
            r.stop_within_noise = tied(top - r.ap, floor.threshold(r.rounds))


def _cell(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _yes(v: bool | None) -> str:
    return "n/a" if v is None else ("yes" if v else "no")


def markdown_table(rows: list[TrialRow]) -> str:
    """One row per trial: its parameters, val/AP, whether it is tied with the best within noise and how it
    compares with the base config, an AP (and F1, when reported) column per class (the focal parameters
    trade rare classes against frequent ones), rounds, iterations, whether ASHA stopped it and whether that
    stop was within noise."""
    keys = sorted({k for r in rows for k in r.params})
    classes = sorted({c for r in rows for c in r.per_class})
    f1_classes = sorted({c for r in rows for c in r.per_class_f1})
    head = [
        "trial",
        *keys,
        "val/AP",
        "tied with best",
        "vs default (AP points)",
        *(f"AP {c}" for c in classes),
        *(f"F1 {c}" for c in f1_classes),
        "rounds",
        "iterations",
        "stopped early",
        "stop within noise",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ap = "error" if r.error else ("n/a" if r.ap is None else f"{r.ap:.4f}")
        per = [f"{r.per_class[c]:.4f}" if r.per_class.get(c, -1.0) >= 0 else "n/a" for c in classes]
        f1 = [f"{r.per_class_f1[c]:.4f}" if c in r.per_class_f1 else "n/a" for c in f1_classes]
        cells = [
            r.trial_id,
            *(_cell(r.params.get(k)) for k in keys),
            ap,
            _yes(r.tied),
            r.vs_default,
            *per,
            *f1,
            str(r.rounds),
            str(r.iterations),
            "yes" if r.stopped_early else "no",
            _yes(r.stop_within_noise) if r.stopped_early else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def noise_table(floor: NoiseFloor, repeats: list[TrialRow]) -> str:
    """The noise floor per round: the repeats' mean and std of val/AP, and the std of each class's AP."""
    classes = sorted(floor.class_std)
    head = ["round", "iteration", "mean val/AP", "std val/AP", *(f"std AP {c}" for c in classes)]
    seeds = ", ".join(str(s) for s in sorted(r.params.get("seed") for r in repeats))
    lines = [
        f"Noise floor: the base config trained {floor.repeats} times (seeds {seeds}); tied within noise = a gap of "
        f"at most {TIE_SIGMAS:g} x the std at that round.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for rnd in sorted(floor.mean):
        std = floor.std.get(rnd)
        cells = [
            str(rnd),
            str(floor.iteration.get(rnd, "")),
            f"{floor.mean[rnd]:.4f}",
            "n/a" if std is None else f"{std:.4f}",
            *(f"{floor.class_std[c][rnd]:.4f}" if rnd in floor.class_std[c] else "n/a" for c in classes),
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


def importance_of(
    rows: list[TrialRow], repeats: list[TrialRow], base: dict[str, float], floor: NoiseFloor | None
) -> ImportanceFit | None:
    """:func:`fit_importance` at the deepest round that enough trials reached (the noise repeats counted at
    the base config's values)."""
    points = [(r.params, r.history) for r in rows if r.error is None] + [
        (base, r.history) for r in repeats if r.error is None
    ]
    keys = [k for k in FOCAL_KEYS if any(k in r.params for r in rows)]  # the searched ones
    rounds = sorted({x for _, h in points for x in h}, reverse=True)
    at = {r: [{**p, "val/AP": h[r]["val/AP"]} for p, h in points if "val/AP" in h.get(r, {})] for r in rounds}
    # The deepest round with 3 residual degrees of freedom (1 leaves intervals of +-12 residual stds: no
    # answer), else the deepest with 1.
    for dof in (3, 1):
        for rnd in rounds:
            if len(at[rnd]) >= len(keys) + 1 + dof:
                fl = None if floor is None else floor.at(rnd)
                return fit_importance(at[rnd], keys, round_=rnd, noise_floor=fl)
    return None


def summary_markdown(summary: SweepSummary, preset: str | None, sweep_name: str | None = None) -> str:
    """``sweep_summary.md``: the ranked trials, the noise floor, the parameter importance, the paper table."""
    parts = [f"# Sweep {sweep_name or Path(summary.path).name}", "", summary.table]
    if summary.noise is not None:
        parts += ["", "## Noise floor", "", noise_table(summary.noise, summary.repeats)]
    floor = None
    if summary.noise is not None and summary.importance is not None:
        floor = summary.noise.at(summary.importance.round)
    parts += ["", "## Parameter importance", "", importance_table(summary.importance, floor)]
    if preset == "paper-table1":
        parts += ["", "## Against the paper", "", paper_table(summary.rows)]
    return "\n".join(parts) + "\n"


def noise_band_plot(rows: list[TrialRow], floor: NoiseFloor, out: Path, metric: str = "val/AP") -> Path:
    """val/AP per round of every trial, over the base config's mean +- 1 and 2 noise floors (bands)."""
    fig = noise_band_figure(rows, floor, metric)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def noise_band_figure(rows: list[TrialRow], floor: NoiseFloor, metric: str = "val/AP") -> Figure:
    """The figure of :func:`noise_band_plot`."""
    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.subplots()
    rs = sorted(r for r in floor.mean if r in floor.std)
    if rs:
        mean = [floor.mean[r] for r in rs]
        for k, alpha in ((TIE_SIGMAS, 0.12), (1.0, 0.25)):
            lo = [m - k * floor.std[r] for m, r in zip(mean, rs, strict=True)]
            hi = [m + k * floor.std[r] for m, r in zip(mean, rs, strict=True)]
            ax.fill_between(rs, lo, hi, color="tab:gray", alpha=alpha, lw=0, label=f"base config ± {k:g} std")
        ax.plot(rs, mean, color="black", lw=1.5, label=f"base config, mean of {floor.repeats} seeds")
    for r in rows:
        pts = sorted((k, v[metric]) for k, v in r.history.items() if metric in v)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, lw=1, alpha=0.8)
    ax.set_xlabel("round (eval)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers: no tick at 1.5
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per round of each trial, with the noise floor")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def sweep_plots(rows: list[TrialRow], floor: NoiseFloor | None, out: Path, preset: str | None) -> list[str]:
    """Parallel coordinates, AP-vs-parameter scatter plots, the per-round curves with the noise band, and
    AP vs gamma beside the paper for the paper preset."""
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
        if floor is not None:
            paths.append(str(noise_band_plot(rows, floor, out / "ap_per_round_noise.png")))
        if preset == "paper-table1":
            paths.append(str(plots.ap_vs_gamma_with_paper(data, PAPER_TABLE1, out / "ap_vs_gamma.png")))
    except Exception as err:  # noqa: BLE001 - a plot must never fail a finished sweep
        logger.warning("sweep plots failed: %s", err)
    return paths


def log_to_parent(
    uri: str, parent_id: str, summary: SweepSummary, text: str, preset: str | None
) -> list[str]:
    """The parent run: summary text, plots, best and noise metrics, importance, tie tags; closed."""
    log = tracking.RunLogger(uri, parent_id)
    log.log_text(text, "sweep_summary.md")
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = sweep_plots(summary.rows, summary.noise, Path(tmp), preset)
        for a in artifacts:
            log.log_artifact(a, "plots")
    floor = summary.noise
    if floor is not None:
        for rnd, mean in floor.mean.items():
            step = floor.iteration.get(rnd, rnd)
            m = {"noise/val/AP/mean": mean}
            if rnd in floor.std:
                m["noise/val/AP/std"] = floor.std[rnd]
            m.update({f"noise/val/AP/{c}/std": s[rnd] for c, s in floor.class_std.items() if rnd in s})
            log.log_metrics(m, step=step)
    if summary.importance is not None:
        log.log_metrics(
            {
                **{f"importance/{p.key}/effect": p.effect for p in summary.importance.params},
                **{f"importance/{p.key}/ci95": p.ci95 for p in summary.importance.params},
            },
            step=summary.importance.round,
        )
    best = next((r for r in summary.rows if r.ap is not None and r.error is None), None)
    if best:
        log.log_metrics({"best/val/AP": best.ap, "sweep/total_iterations": summary.total_iterations}, step=0)
        tags: dict[str, Any] = {tracking.BEST_TRIAL_TAG: best.trial_id, "ray_retina.best_params": best.params}
        if floor is not None and floor.at(best.rounds) is not None:
            tags[TIED_TAG] = json.dumps([r.trial_id for r in summary.rows if r.tied])
            tags[NOISE_FLOOR_TAG] = f"{floor.at(best.rounds):.6g}"
            vs = versus_default(best.ap, floor, best.rounds)
            if vs is not None:
                tags[VS_DEFAULT_TAG] = json.dumps({"ap_points": round(100 * vs[0], 4), "beyond_noise": vs[1]})
        log.set_tags(tags)
    log.end("FINISHED" if summary.num_errors == 0 else "FAILED")
    return [f"plots/{Path(a).name}" for a in artifacts]


def close_children(uri: str, parent_id: str, rows: Sequence[TrialRow], best: TrialRow | None) -> None:
    """Tag each trial's run with its ASHA outcome. A trial stopped by the scheduler is killed mid-fit, so its
    run would stay RUNNING: close it here as KILLED (stopped early), or FINISHED / FAILED."""
    client = MlflowClient(tracking_uri=uri)
    by_trial = {r.trial_id: r for r in rows}
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent_id}'",
        max_results=1000,
    )
    for run in children:
        tid = run.data.tags.get(tracking.TRIAL_TAG, "")
        r = by_trial.get(tid)
        if r is None:
            continue
        client.set_tag(run.info.run_id, "stopped_early", str(r.stopped_early).lower())
        client.set_tag(run.info.run_id, "last_round", str(r.rounds))
        client.set_tag(run.info.run_id, "best_trial", str(best is not None and tid == best.trial_id).lower())
        if r.tied is not None:
            client.set_tag(run.info.run_id, "tied_with_best", str(r.tied).lower())
        status = "FAILED" if r.error else ("KILLED" if r.stopped_early else "FINISHED")
        if run.info.status == "RUNNING" or (r.stopped_early and run.info.status != "KILLED"):
            with tracking.no_run_links():  # the parent run's link is the one printed
                client.set_terminated(run.info.run_id, status=status)
