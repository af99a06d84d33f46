"""The sweep's pieces that need no cluster: search space, presets, trial overrides, summary tables."""

from __future__ import annotations

import os

import pytest

from ray_retina.config import Config, ConfigError, apply_overrides
from ray_retina.sweep.report import TrialRow, markdown_table, paper_table
from ray_retina.sweep.space import (
    FOCAL_PAIR,
    PAPER_TABLE1,
    preset_space,
    search_alg,
    search_space,
    trial_label,
    trial_overrides,
)


def test_search_space_types_and_bounds():
    cfg = apply_overrides(
        Config(),
        {
            "tune.search_space": {
                "loss.gamma": {"type": "uniform", "low": 0.0, "high": 5.0},
                "model.prior": {"type": "loguniform", "low": 0.001, "high": 0.1},
                "loss.alpha": {"type": "choice", "values": [0.25, 0.5]},
                "optim.lr": {"type": "grid", "values": [0.01, 0.02]},
            }
        },
    )
    space = search_space(cfg)
    assert space["loss.gamma"].lower == 0.0 and space["loss.gamma"].upper == 5.0
    assert space["model.prior"].lower == 0.001
    assert space["loss.alpha"].categories == [0.25, 0.5]
    assert space["optim.lr"] == {"grid_search": [0.01, 0.02]}
    samples = [space["model.prior"].sample() for _ in range(200)]
    assert all(0.001 <= s <= 0.1 for s in samples)
    assert sum(s < 0.01 for s in samples) > 60  # log-uniform: half the mass below the geometric middle


def test_search_space_rejects_unknown_keys_and_types():
    bad_key = apply_overrides(
        Config(), {"tune.search_space": {"loss.gama": {"type": "uniform", "low": 0, "high": 1}}}
    )
    with pytest.raises(ConfigError, match=r"loss\.gama"):
        search_space(bad_key)
    bad_type = apply_overrides(Config(), {"tune.search_space": {"loss.gamma": {"type": "normal"}}})
    with pytest.raises(ValueError, match="tune.search_space.loss.gamma"):
        search_space(bad_type)


def test_paper_preset_is_the_papers_grid():
    space = preset_space("paper-table1")
    grid = space[FOCAL_PAIR]["grid_search"]
    assert [g for g, _ in grid] == [0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]
    assert dict(map(tuple, grid))[2.0] == 0.25 and dict(map(tuple, grid))[0.0] == 0.75
    over = trial_overrides({FOCAL_PAIR: [0.5, 0.5], "optim.lr": 0.01})
    assert over == {"loss.gamma": 0.5, "loss.alpha": 0.5, "optim.lr": 0.01}
    cfg = apply_overrides(Config(), over)
    assert (cfg.loss.gamma, cfg.loss.alpha) == (0.5, 0.5)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_space("table2")


def test_tables():
    rows = [
        TrialRow("t1", {"loss.gamma": 2.0, "loss.alpha": 0.25}, 0.40, 3, 300, False, None),
        TrialRow("t0", {"loss.gamma": 0.0, "loss.alpha": 0.75}, 0.31, 1, 100, True, None),
    ]
    md = markdown_table(rows)
    assert "| t1 | 0.25 | 2 | 0.4000 | n/a | n/a | 3 | 300 | no |  |" in md
    assert "| t0 | 0.75 | 0 | 0.3100 | n/a | n/a | 1 | 100 | yes | n/a |" in md
    pt = paper_table(rows)
    assert "| 2.0 | 0.25 | 40.0 | 34.0 |" in pt and "| 0.0 | 0.75 | 31.0 | 31.1 |" in pt
    assert pt.count("\n") == len(PAPER_TABLE1) + 1


def test_random_search_is_seeded_by_the_config():
    """The same `seed` draws the same trials (what lets the ASHA and FIFO benchmark compare the same points);
    another seed draws others."""
    from ray.tune.experiment import Experiment

    cfg = apply_overrides(
        Config(),
        {
            "seed": 3,
            "tune.search_space": {
                "loss.gamma": {"type": "uniform", "low": 0.0, "high": 5.0},
                "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
            },
        },
    )

    def draw(c):
        gen = search_alg(c, 8)
        gen.add_configurations([Experiment("x", run=lambda _: None, config=search_space(c), num_samples=4)])
        return [(t.config["loss.gamma"], t.config["optim.lr"]) for t in (gen.next_trial() for _ in range(4))]

    first = draw(cfg)
    assert draw(cfg) == first
    assert search_alg(cfg, 3).max_concurrent == 3  # Tune would ignore TuneConfig's limit for it
    assert len(set(first)) == 4 and all(0 <= g <= 5 and 1e-4 <= lr <= 1e-2 for g, lr in first)
    assert draw(apply_overrides(cfg, {"seed": 4})) != first


def test_trial_label_names_a_trial_by_its_parameters():
    label = trial_label(
        {
            "optim.lr": 0.0051234,
            "loss.alpha": 0.25,
            "model.prior": 0.01,
            "loss.gamma": 2.0,
            "data.hflip_prob": 0.5,
        },
        "abc_00003",
    )
    assert label == "gamma=2 alpha=0.25 pi=0.01 lr=0.00512 hflip_prob=0.5 [abc_00003]"


def test_summary_table_has_a_column_per_class():
    rows = [
        TrialRow("t1", {"loss.gamma": 2.0}, 0.40, 3, 300, False, None, per_class={"dog": 0.5, "cat": 0.3}),
        TrialRow("t0", {"loss.gamma": 0.0}, 0.31, 1, 100, True, None, per_class={"dog": 0.2, "cat": -1.0}),
    ]
    lines = markdown_table(rows).splitlines()
    assert (
        lines[0]
        == "| trial | loss.gamma | val/AP | tied with best | vs default (AP points) | AP cat | AP dog "
        "| rounds | iterations | stopped early | stop within noise |"
    )
    assert lines[2] == "| t1 | 2 | 0.4000 | n/a | n/a | 0.3000 | 0.5000 | 3 | 300 | no |  |"
    assert lines[3] == "| t0 | 0 | 0.3100 | n/a | n/a | n/a | 0.2000 | 1 | 100 | yes | n/a |"


@pytest.mark.parametrize("before", [None, "1"])
def test_tune_console_is_quiet_for_the_fit_call_only(monkeypatch, before):
    """Without --verbose Tune's older console engine (which honours verbose=0) runs the fit call; the
    variable that picks it is put back afterwards, as it was."""
    from ray_retina.sweep.run import NEW_OUTPUT_ENV, _tune_console

    if before is None:
        monkeypatch.delenv(NEW_OUTPUT_ENV, raising=False)
    else:
        monkeypatch.setenv(NEW_OUTPUT_ENV, before)
    with _tune_console(verbose=False):
        assert os.environ[NEW_OUTPUT_ENV] == "0"
    assert os.environ.get(NEW_OUTPUT_ENV) == before
    with _tune_console(verbose=True):
        assert os.environ.get(NEW_OUTPUT_ENV) == before
    with pytest.raises(RuntimeError), _tune_console(verbose=False):
        raise RuntimeError("a failed fit")
    assert os.environ.get(NEW_OUTPUT_ENV) == before
