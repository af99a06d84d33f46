"""The sweep's noise floor, tie marks, parameter importance and champion rule, on hand-made trials."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from ray_retina.sweep.champion import NOISE_FLOOR_TAG, TIED_TAG, VS_DEFAULT_TAG, choose_champion
from ray_retina.sweep.console import format_noise_floor, format_ranking
from ray_retina.sweep.importance import fit_importance, importance_table
from ray_retina.sweep.noise import TIE_SIGMAS, noise_floor, versus_default
from ray_retina.sweep.report import TrialRow, importance_of, mark_ties, markdown_table
from ray_retina.sweep.trial import SweepSetup


def _history(*aps: float, cls: float | None = None) -> dict[int, dict[str, float]]:
    out = {}
    for i, ap in enumerate(aps, start=1):
        m = {"val/AP": ap, "iteration": 10 * i}
        if cls is not None:
            m["val/AP/dog"] = cls + 0.01 * i
        out[i] = m
    return out


def test_noise_floor_is_the_sample_std_per_round():
    repeats = [_history(0.10, 0.20, cls=0.3), _history(0.12, 0.26, cls=0.5), _history(0.14, 0.23, cls=0.4)]
    floor = noise_floor(repeats, 3)
    assert floor.std[1] == pytest.approx(np.std([0.10, 0.12, 0.14], ddof=1))
    assert floor.std[2] == pytest.approx(np.std([0.20, 0.26, 0.23], ddof=1))
    assert floor.mean[2] == pytest.approx(0.23)
    assert floor.iteration == {1: 10, 2: 20}
    assert floor.class_std["dog"][1] == pytest.approx(np.std([0.31, 0.51, 0.41], ddof=1))
    assert floor.at(5) == floor.std[2] and floor.threshold(1) == pytest.approx(TIE_SIGMAS * floor.std[1])
    one = noise_floor([_history(0.1)], 1)  # one repeat: a mean, no std
    assert one.std == {} and one.at(1) is None
    line = format_noise_floor(floor.std, 3)
    assert line.startswith("[tune] noise floor (std of val/AP over 3 seeds") and "round 2 3.00" in line


def _row(tid: str, ap: float, rounds: int, hist: dict, stopped: bool = False, **params) -> TrialRow:
    return TrialRow(tid, params or {"loss.gamma": 1.0}, ap, rounds, 10 * rounds, stopped, None, history=hist)


def test_ties_and_stops_within_noise():
    floor = noise_floor([_history(0.20, 0.30), _history(0.22, 0.34)], 2)  # std r1 0.0141, r2 0.0283
    rows = [
        _row("best", 0.40, 2, _history(0.25, 0.40)),
        _row("close", 0.36, 2, _history(0.21, 0.36)),  # gap 0.04 <= 2 x 0.0283
        _row("far", 0.30, 2, _history(0.20, 0.30)),  # gap 0.10
        _row("cut_close", 0.23, 1, _history(0.23), stopped=True),  # 0.25 - 0.23 <= 2 x 0.0141
        _row("cut_far", 0.15, 1, _history(0.15), stopped=True),
    ]
    mark_ties(rows, floor)
    assert [r.tied for r in rows] == [True, True, False, False, False]
    assert [r.stop_within_noise for r in rows] == [None, None, None, True, False]
    assert rows[0].vs_default == "+8.0 (beyond noise)" and rows[1].vs_default == "+4.0 (within noise)"
    md = markdown_table(rows)
    assert "| best | 1 | 0.4000 | yes | +8.0 (beyond noise) | 2 | 20 | no |  |" in md
    assert "| cut_close | 1 | 0.2300 | no | +2.0 (within noise) | 1 | 10 | yes | yes |" in md
    mark_ties(rows, None)  # no floor: nothing changes


def test_importance_matches_a_single_predictor_regression():
    """One varying parameter: the effect and its 95 % interval are linregress's slope x range and
    t x stderr x range."""
    rng = np.random.default_rng(0)
    gammas = np.linspace(0.0, 5.0, 9)
    aps = 0.30 + 0.02 * gammas + rng.normal(0, 0.01, gammas.size)
    fit = fit_importance(
        [{"loss.gamma": g, "loss.alpha": 0.25, "val/AP": a} for g, a in zip(gammas, aps, strict=True)],
        ["loss.gamma", "loss.alpha"],
        round_=3,
        noise_floor=0.01,
    )
    ref = stats.linregress(gammas, aps)
    (p,) = fit.params  # alpha does not vary: left out
    assert p.effect == pytest.approx(ref.slope * 5.0)
    assert p.ci95 == pytest.approx(stats.t.ppf(0.975, 7) * ref.stderr * 5.0)
    assert fit.dof == 7 and p.verdict == "matters"


def test_importance_finds_the_planted_parameter_and_calls_the_rest_noise():
    rng = np.random.default_rng(1)
    pts = []
    for _ in range(24):
        g, a, lp, llr = rng.uniform(0, 5), rng.uniform(0.1, 0.9), rng.uniform(-3, -1), rng.uniform(-4, -2)
        pts.append(
            {
                "loss.gamma": g,
                "loss.alpha": a,
                "model.prior": 10**lp,
                "optim.lr": 10**llr,
                "val/AP": 0.3 + 0.05 * (llr + 3) + rng.normal(0, 0.005),
            }
        )
    fit = fit_importance(
        pts, ["loss.gamma", "loss.alpha", "model.prior", "optim.lr"], round_=4, noise_floor=0.005
    )
    assert fit.params[0].key == "optim.lr" and fit.params[0].transform == "log10 x"
    assert fit.params[0].effect == pytest.approx(0.05 * 2, abs=0.02) and fit.params[0].verdict == "matters"
    assert all(p.verdict != "matters" for p in fit.params[1:])
    table = importance_table(fit, 0.005)
    assert "| optim.lr | log10 x | +" in table and "noise floor 0.50" in table
    assert fit_importance(pts[:4], ["loss.gamma", "loss.alpha", "model.prior", "optim.lr"], round_=1) is None


def test_importance_counts_the_noise_repeats_at_the_base_values():
    rows = [_row(f"t{i}", 0.1, 1, _history(0.1 + 0.01 * i), **{"loss.gamma": float(i)}) for i in range(3)]
    repeats = [_row(f"n{i}", 0.1, 1, _history(0.12 + 0.001 * i)) for i in range(2)]
    fit = importance_of(rows, repeats, {"loss.gamma": 2.0}, noise_floor([r.history for r in repeats], 2))
    assert fit is not None and fit.rows == 5 and fit.round == 1 and fit.params[0].noise is not None


def test_setup_round_trips_through_the_sweep_folder(tmp_path):
    setup = SweepSetup(base={"name": "x"}, sweep_name="s", mlflow_uri=None, parent_run_id="p", preset=None)
    setup.save(str(tmp_path / "s"))
    assert SweepSetup.load(str(tmp_path / "s")) == setup
    with pytest.raises(FileNotFoundError, match="not a ray-retina sweep folder"):
        SweepSetup.load(str(tmp_path / "other"))


def test_champion_among_tied_trials_by_a_stated_rule(mlflow_uri):
    from mlflow.tracking import MlflowClient

    from ray_retina import tracking

    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("sweep")
    parent = client.create_run(exp).info.run_id

    def child(tid: str, ap: float, rounds: int, gamma: float) -> None:
        run = client.create_run(
            exp, tags={tracking.PARENT_TAG: parent, tracking.TRIAL_TAG: tid, "last_round": str(rounds)}
        )
        client.log_metric(run.info.run_id, "val/AP", ap)
        for k, v in {"loss.gamma": gamma, "loss.alpha": 0.25, "model.prior": 0.01}.items():
            client.log_param(run.info.run_id, k, v)

    child("a", 0.40, 2, 4.0)
    child("b", 0.39, 3, 2.1)
    child("c", 0.30, 3, 2.0)
    client.set_tag(parent, tracking.BEST_TRIAL_TAG, "a")
    no_floor = choose_champion(mlflow_uri, parent)
    assert no_floor.trial_id == "a" and "no noise floor" in no_floor.note
    client.set_tag(parent, TIED_TAG, json.dumps(["a", "b"]))
    client.set_tag(parent, NOISE_FLOOR_TAG, "0.01")
    assert choose_champion(mlflow_uri, parent).trial_id == "a"
    most = choose_champion(mlflow_uri, parent, "most-rounds")
    assert most.trial_id == "b" and most.tied == ["a", "b"] and "tied within noise: 2 trials" in most.note
    paper = choose_champion(mlflow_uri, parent, "paper-defaults")
    assert paper.trial_id == "b" and client.get_run(paper.run_id).data.tags[tracking.TRIAL_TAG] == "b"
    with pytest.raises(ValueError, match="unknown champion rule"):
        choose_champion(mlflow_uri, parent, "luck")
    # The base config's repeats beat the best trial beyond noise: the note says so, whatever the rule.
    client.set_tag(parent, VS_DEFAULT_TAG, json.dumps({"ap_points": -2.1, "beyond_noise": True}))
    worse = choose_champion(mlflow_uri, parent, "most-rounds")
    assert worse.trial_id == "b"
    assert "-2.1 AP points against the base config's repeats, beyond noise" in worse.note
    assert "the base config (the defaults the sweep started from) beat every trial" in worse.note


def test_best_trial_against_the_base_config():
    """The closing lines and the verdict: beyond noise above, within noise, beyond noise below the repeats'
    mean at the best trial's round (threshold 2 x std)."""
    floor = noise_floor([_history(0.20, 0.30), _history(0.22, 0.34)], 2)  # r2: mean 0.32, std 0.0283
    best = _row("best", 0.40, 2, _history(0.25, 0.40))
    assert versus_default(0.40, floor, 2) == (pytest.approx(0.08), True)
    assert versus_default(0.30, floor, 2) == (pytest.approx(-0.02), False)
    assert versus_default(0.20, floor, 2) == (pytest.approx(-0.12), True)
    assert versus_default(0.40, floor, 3) is None  # no repeat reached round 3
    lines = format_ranking([best], best.label, versus_default(0.40, floor, 2))
    assert (
        lines[1]
        == "[tune] the best trial is +8.0 AP points against the base config's repeats, beyond noise: it beat the base config"
    )
    within = format_ranking([best], best.label, versus_default(0.30, floor, 2))[1]
    assert within.endswith(
        "-2.0 AP points against the base config's repeats, within noise: no trial beat the base config beyond noise"
    )
    below = format_ranking([best], best.label, versus_default(0.20, floor, 2))[1]
    assert "-12.0 AP points" in below and "beat every trial" in below
    assert format_ranking([best], best.label) == [f"[tune] best: {best.label}"]  # no floor: no verdict


def test_importance_prefers_a_round_with_three_degrees_of_freedom():
    """Round 2 reached by 3 of 6 rows (1 degree of freedom for one parameter), round 1 by all 6: round 1."""
    rows = [
        _row(
            f"t{i}",
            0.1,
            2 if i < 3 else 1,
            _history(*([0.1 + 0.01 * i] * (2 if i < 3 else 1))),
            **{"loss.gamma": float(i)},
        )
        for i in range(6)
    ]
    fit = importance_of(rows, [], {"loss.gamma": 2.0}, None)
    assert fit is not None and fit.round == 1 and fit.dof == 4


def test_noise_band_plot_ticks_whole_rounds(tmp_path):
    """Rounds are whole numbers: the per-round plot's x-axis has no tick at 1.5 even with two rounds."""
    from ray_retina.sweep.report import noise_band_figure, noise_band_plot

    floor = noise_floor([_history(0.20, 0.30), _history(0.22, 0.34)], 2)
    rows = [_row("a", 0.31, 2, _history(0.21, 0.31)), _row("b", 0.25, 1, _history(0.25))]
    fig = noise_band_figure(rows, floor)
    fig.canvas.draw()
    ticks = [t for t in fig.axes[0].get_xticks() if 1 <= t <= 2]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert noise_band_plot(rows, floor, tmp_path / "p.png").stat().st_size > 5_000
