"""A 4-trial ASHA sweep with 2 noise repeats of its base config against a real `mlflow server`, checked
through MlflowClient (trials, noise floor, ties, parameter importance) and on its console (our sweep lines,
not Tune's), and the MLflow UI driven in headless Chromium to compare the trials."""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
from pathlib import Path

import pytest
from _mlflow_server import MlflowServer

from _train_utils import tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PARAMS = ("loss.gamma", "loss.alpha", "model.prior", "optim.lr")
EVAL_PERIOD = 4
ROUNDS = 2


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, free_port):
    """A real tracking server: SQLite backend, local artifact store, 127.0.0.1 on a free port."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"), free_port())
    server.start()
    yield server.url
    server.kill()


@pytest.fixture(scope="module")
def swept(ray_local, mlflow_server, tmp_path_factory):
    """The sweep's summary and everything it printed."""
    from ray_retina.sweep.run import run_sweep

    tmp = tmp_path_factory.mktemp("sweep")
    cfg = tiny_config(
        tmp,
        mlflow_server,
        name="it_sweep",
        **{
            "scaling.num_workers": 1,
            "data.batch_size": 8,
            "optim.max_iters": ROUNDS * EVAL_PERIOD,
            "optim.steps": [ROUNDS * EVAL_PERIOD],
            "train.eval_period": EVAL_PERIOD,
            "postprocess.score_thresh": 0.0,
            "tune.search_space": {
                "loss.gamma": {"type": "uniform", "low": 0.0, "high": 5.0},
                "loss.alpha": {"type": "uniform", "low": 0.1, "high": 0.9},
                "model.prior": {"type": "loguniform", "low": 0.001, "high": 0.1},
                "optim.lr": {"type": "loguniform", "low": 0.0003, "high": 0.003},
            },
            "tune.num_samples": 4,
            "tune.grace_period": 1,
            "tune.reduction_factor": 2,
            "tune.max_concurrent_trials": 2,
            # Optuna's TPE here (the random default runs in test_tune_resume and the benchmark).
            "tune.search_alg": "optuna",
            "tune.noise_repeats": 2,
        },
    )
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        summary = run_sweep(cfg, sweep_name="it-sweep")
    print(console.getvalue())  # shown by pytest when a test of the module fails
    return summary, console.getvalue()


@pytest.fixture(scope="module")
def sweep(swept):
    return swept[0]


def test_sweep_console_shows_our_lines_not_tunes(swept):
    """The console: the sweep's header, a round line and an end line per trial; not Tune's status table
    (whose "current best trial" line dumps the whole base config), experiment box or "View detailed results"
    lines, which its default engine prints even at verbose=0."""
    summary, out = swept
    tune_lines = [line for line in out.splitlines() if line.startswith("[tune]")]
    assert any(line.startswith("[tune] sweep it-sweep: 4 trials, 2 at a time, ASHA") for line in tune_lines)
    for row in summary.rows:
        mine = [line for line in tune_lines if line.split("  ")[0].endswith(f"[{row.trial_id}]")]
        assert any(" round 1/" in line for line in mine), (row.trial_id, tune_lines)
        assert any(" finished " in line or " stopped by the scheduler " in line for line in mine), mine
    assert "Current best trial" not in out and "__base__" not in out
    assert "Configuration for experiment" not in out and "View detailed results" not in out
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ  # set for the fit call only
    # MLflow's "View run" link for the parent run only, not one per trial it closes
    links = [line for line in out.splitlines() if "View run" in line]
    assert len(links) == 1 and "View run it-sweep at: " in links[0], links
    assert "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ  # restored


def test_sweep_in_mlflow(sweep, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    assert sweep.num_trials == 4 and sweep.num_errors == 0
    assert any(r.stopped_early for r in sweep.rows), "ASHA stopped no trial early"
    assert any(r.rounds == ROUNDS for r in sweep.rows), "no trial ran all its eval rounds"
    client = MlflowClient(mlflow_server)
    parent = client.get_run(sweep.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["ray_retina.search_alg"] == "optuna"
    # Optuna suggested four distinct points inside the space.
    gammas = {round(r.params["loss.gamma"], 9) for r in sweep.rows}
    assert len(gammas) == 4 and all(0.0 <= g <= 5.0 for g in gammas)
    assert all(0.0003 <= r.params["optim.lr"] <= 0.003 for r in sweep.rows)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{sweep.parent_run_id}'"
    )
    # the 4 searched trials and the 2 noise repeats (the base config under seeds 0 and 1), each run to the end
    assert len(children) == 6
    repeats = [c for c in children if c.data.tags["ray_retina.noise_repeat"] == "true"]
    assert sorted(c.data.params["seed"] for c in repeats) == ["0", "1"]
    assert all(c.info.status == "FINISHED" and c.data.tags["last_round"] == str(ROUNDS) for c in repeats)
    assert all(c.info.run_name.startswith("seed=") for c in repeats)
    children = [c for c in children if c not in repeats]
    by_trial = {r.trial_id: r for r in sweep.rows}
    for child in children:
        row = by_trial[child.data.tags["ray_retina.trial_id"]]
        # the trial's params: the flattened config, nothing the sweep smuggled in
        assert not [k for k in child.data.params if k.startswith("__")]
        for key in PARAMS:
            assert float(child.data.params[key]) == pytest.approx(row.params[key])
        hist = client.get_metric_history(child.info.run_id, "val/AP")
        assert [m.step for m in sorted(hist, key=lambda m: m.step)] == [
            EVAL_PERIOD * (i + 1) for i in range(row.rounds)
        ]
        assert child.data.tags["stopped_early"] == str(row.stopped_early).lower()
        assert child.info.status == ("KILLED" if row.stopped_early else "FINISHED")
        if not row.stopped_early:
            names = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
            assert "plots/focal_loss_cdf.png" in names and "plots/pr_curves.png" in names
    best = [c for c in children if c.data.tags["best_trial"] == "true"]
    assert (
        len(best) == 1
        and parent.data.tags["ray_retina.best_trial"] == best[0].data.tags["ray_retina.trial_id"]
    )
    parent_files = {a.path for a in client.list_artifacts(sweep.parent_run_id)}
    assert "sweep_summary.md" in parent_files
    # the summary has a column per class: the focal parameters trade rare classes against frequent ones
    summary = Path(
        client.download_artifacts(sweep.parent_run_id, "sweep_summary.md", str(tmp_path))
    ).read_text()
    header = next(line for line in summary.splitlines() if line.startswith("| trial |"))
    for name in ("rectangle", "ellipse", "triangle"):
        assert f"| AP {name} |" in header, header
        assert f"val/AP/{name}" in children[0].data.metrics
    plots = {a.path for a in client.list_artifacts(sweep.parent_run_id, "plots")}
    assert {
        "plots/parallel_coordinates.png",
        "plots/ap_vs_params.png",
        "plots/ap_per_round_noise.png",
    } <= plots
    # The noise floor per round on the parent run, equal to the std of the repeats' val/AP there.
    std = client.get_metric_history(sweep.parent_run_id, "noise/val/AP/std")
    assert [m.step for m in sorted(std, key=lambda m: m.step)] == [
        EVAL_PERIOD * (i + 1) for i in range(ROUNDS)
    ]
    last = max(std, key=lambda m: m.step)
    aps = [client.get_run(c.info.run_id).data.metrics["val/AP"] for c in repeats]
    assert last.value == pytest.approx(statistics.stdev(aps))
    assert "noise/val/AP/triangle/std" in parent.data.metrics
    # Ties: the tag lists the trials within 2 floors of the best, and the summary marks the same ones.
    tied = json.loads(parent.data.tags["ray_retina.tied_trials"])
    assert parent.data.tags["ray_retina.best_trial"] in tied
    assert tied == [r.trial_id for r in sweep.rows if r.tied]
    assert "## Noise floor" in summary and "## Parameter importance" in summary
    # The best trial against the base config's repeats at the best trial's last round.
    vs = json.loads(parent.data.tags["ray_retina.best_vs_default"])
    best_row = next(r for r in sweep.rows if r.trial_id == parent.data.tags["ray_retina.best_trial"])
    if best_row.rounds == ROUNDS:
        assert vs["ap_points"] == pytest.approx(100 * (best_row.ap - statistics.mean(aps)), abs=1e-3)
    assert vs["beyond_noise"] == (abs(vs["ap_points"]) > 100 * 2 * last.value) or best_row.rounds != ROUNDS
    assert "| tied with best |" in header
    # Parameter importance: a fit over 4 trials + 2 repeats needs 4 + 2 rows, so it is at round 1.
    assert sweep.importance is not None and sweep.importance.round == 1
    assert {f"importance/{k}/effect" for k in PARAMS} <= set(parent.data.metrics)


def test_compare_trials_in_mlflow_ui(sweep, mlflow_server, open_mlflow_page, shot_dir):
    """The 4 trials in MLflow's compare-runs page, in headless chromium: the parallel-coordinates plot of the
    four swept params against the per-class APs and val/AP (the last axis, which colours the lines), and the
    trials' run names (their parameters). The screenshot is docs/mlflow_compare.png under `make docs`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    exp_id = client.get_run(sweep.parent_run_id).info.experiment_id
    children = client.search_runs(
        [exp_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{sweep.parent_run_id}' "
        "and tags.`ray_retina.noise_repeat` = 'false'",
    )
    run_ids = [c.info.run_id for c in children]
    classes = sorted({k for c in children for k in c.data.metrics if k.startswith("val/AP/")})
    assert len(run_ids) == 4 and classes, classes
    page = open_mlflow_page(
        f"{mlflow_server}/#/compare-runs?runs={json.dumps(run_ids)}&experiments={json.dumps([exp_id])}",
        "val/AP",
    )
    page.get_by_role("tab", name="Parallel Coordinates Plot").click()
    page.get_by_role("button", name="Clear All").click()  # the UI preselects the first 3 params, 1 metric
    _choose(page, 0, PARAMS)
    _choose(page, 1, [*classes, "val/AP"])
    page.wait_for_timeout(1500)  # let the plot redraw before the screenshot
    axes = page.locator(".js-plotly-plot").first.inner_text()  # the plot's axis titles and ticks
    for key in (*PARAMS, *classes, "val/AP"):
        assert key in axes, key
    body = page.inner_text("body")
    for c in children:
        assert c.info.run_name.startswith("gamma=") and c.info.run_name in body, c.info.run_name
    shot = shot_dir / "mlflow_compare.png"
    page.screenshot(path=str(shot), full_page=False)
    assert shot.stat().st_size > 10_000


def _choose(page, which: int, names) -> None:
    """Pick `names`, in order, in the plot's Parameters (`which` 0) or Metrics (1) multi-select: type each
    into the select's search box and click its option."""
    select = page.locator(".du-bois-light-select-selector").nth(which)
    select.click()
    for name in names:
        select.locator("input").fill(name)
        page.locator(f".du-bois-light-select-item-option[title='{name}']:visible").click()
    page.keyboard.press("Escape")
    chosen = select.locator(".du-bois-light-select-selection-item-content").all_inner_texts()
    assert chosen == list(names), chosen
