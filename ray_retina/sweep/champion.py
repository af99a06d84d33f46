"""Which trial of a sweep ``ray-retina export --sweep`` ships: the best by ``val/AP``, or, when other trials
are tied with it within the noise floor (the parent run's tags, written by ``sweep/report.py``), the one a
stated rule picks among them. MLflow only: the export side imports no Ray Tune."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from mlflow.tracking import MlflowClient

from ray_retina import tracking
from ray_retina.sweep.noise import TIE_SIGMAS, default_verdict

TIED_TAG = "ray_retina.tied_trials"  # on a sweep's parent run: JSON list of the trial ids tied with the best
# on a sweep's parent run: the floor (std of val/AP over the noise repeats) at the best trial's last round
NOISE_FLOOR_TAG = "ray_retina.noise_floor"
# on a sweep's parent run: the best trial against the base config's repeats, {"ap_points": d, "beyond_noise": b}
VS_DEFAULT_TAG = "ray_retina.best_vs_default"
CHAMPION_RULES = ("best", "most-rounds", "paper-defaults")
# The paper's defaults (gamma 2, alpha 0.25, pi 0.01), in the space the distance is measured in (log10 pi).
PAPER_DEFAULTS = {"loss.gamma": 2.0, "loss.alpha": 0.25, "model.prior": math.log10(0.01)}


@dataclass
class ChampionChoice:
    trial_id: str
    """The trial the rule picks (the best by val/AP when there is no tie)."""
    run_id: str
    """Its MLflow run."""
    tied: list[str]
    """The trials tied with the best within the noise floor, the best included (empty: no floor measured)."""
    note: str
    """One line for the user: the tie and the rule applied, and the best trial against the base config."""


def choose_champion(uri: str, parent_run_id: str, rule: str = "best") -> ChampionChoice:
    """The trial ``export --sweep`` ships. ``rule`` among tied trials: ``best`` (the highest val/AP, which
    may be luck), ``most-rounds`` (the most eval rounds completed, then val/AP: the longest evidence), or
    ``paper-defaults`` (the closest to gamma 2, alpha 0.25, pi 0.01: |d gamma| / 5 + |d alpha| +
    |d log10 pi| / 2, each term the searched range's usual width)."""
    if rule not in CHAMPION_RULES:
        raise ValueError(f"unknown champion rule {rule!r}; known: {', '.join(CHAMPION_RULES)}")
    client = MlflowClient(tracking_uri=uri)
    tags = client.get_run(parent_run_id).data.tags
    best = tags.get(tracking.BEST_TRIAL_TAG)
    if not best:
        raise ValueError(
            f"MLflow run {parent_run_id} has no tag {tracking.BEST_TRIAL_TAG}: not a finished sweep"
        )
    ids = json.loads(tags.get(TIED_TAG, "[]"))
    exp = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs(
        [exp], filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent_run_id}'", max_results=1000
    )
    by_id = {r.data.tags.get(tracking.TRIAL_TAG): r for r in runs}
    if best not in by_id:
        raise ValueError(f"sweep {parent_run_id}: no child run of its best trial {best}")
    vs_default = ""
    if VS_DEFAULT_TAG in tags:
        vs = json.loads(tags[VS_DEFAULT_TAG])
        vs_default = "; " + default_verdict(vs["ap_points"] / 100, vs["beyond_noise"])
    if len(ids) <= 1:
        why = "no noise floor measured" if TIED_TAG not in tags else "no other trial within the noise floor"
        note = f"champion {best}: the best val/AP ({why}){vs_default}"
        return ChampionChoice(best, by_id[best].info.run_id, ids, note)
    cands = [by_id[t] for t in ids if t in by_id]

    def key(run: Any) -> tuple[float, float]:
        ap = float(run.data.metrics.get("val/AP", -1.0))
        if rule == "most-rounds":
            return (float(run.data.tags.get("last_round", 0)), ap)
        if rule == "paper-defaults":
            p = {k: float(run.data.params[k]) for k in PAPER_DEFAULTS if k in run.data.params}
            d = abs(p.get("loss.gamma", 2.0) - 2.0) / 5 + abs(p.get("loss.alpha", 0.25) - 0.25)
            d += abs(math.log10(max(p.get("model.prior", 0.01), 1e-12)) - PAPER_DEFAULTS["model.prior"]) / 2
            return (-d, ap)
        return (ap, 0.0)

    pick = max(cands, key=key).data.tags[tracking.TRIAL_TAG] if cands else best
    floor = tags.get(NOISE_FLOOR_TAG, "?")
    note = (
        f"champion tied within noise: {len(ids)} trials ({', '.join(ids)}) lie within {TIE_SIGMAS:g} x the noise "
        f"floor (std {floor}) of the best val/AP ({best}); rule '{rule}' picks {pick}{vs_default}"
    )
    return ChampionChoice(pick, by_id[pick].info.run_id, ids, note)
