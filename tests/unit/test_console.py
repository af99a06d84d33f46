"""What a person sees: progress lines, eval tables, one-line errors, `--set` with several pairs."""

from __future__ import annotations

import io
import json
import re

import pytest

from ray_retina import cli
from ray_retina.engine.progress import ProgressPrinter, format_eta, format_eval_lines, format_progress_line


def test_progress_line_format():
    line = format_progress_line(
        40,
        200,
        loss_cls=0.51234,
        loss_box=0.30111,
        lr=0.01,
        images_per_s=11.84,
        data_wait_s=0.42,
        eta_s=135.2,
    )
    assert line == (
        "[train] iter  40/200  loss_cls 0.5123  loss_box 0.3011  lr 1.00e-02  11.8 img/s  data 0.4 s  ETA 2m15s"
    )
    assert format_eta(3725) == "1h02m" and format_eta(0) == "0m00s" and format_eta(-3) == "0m00s"


def test_progress_printer_eta_from_measured_rate_and_rank0_only():
    buf = io.StringIO()
    p = ProgressPrinter(100, start=20, stream=buf)
    p._t0 -= 8.0  # 8 s for 20 iterations -> 0.4 s per iteration
    p.line(40, loss_cls=1.0, loss_box=1.0, lr=0.01, images_per_s=1.0, data_wait_s=0.0)
    eta = re.search(r"ETA (\d+)m(\d\d)s", buf.getvalue())
    assert eta and 22 <= int(eta[1]) * 60 + int(eta[2]) <= 26  # 60 iterations left at 0.4 s
    silent = io.StringIO()
    ProgressPrinter(100, enabled=False, stream=silent).line(
        1, loss_cls=1, loss_box=1, lr=1, images_per_s=1, data_wait_s=0
    )
    assert silent.getvalue() == ""


def test_eval_lines_show_ap_table_per_class_and_skips():
    metrics = {
        "val/AP": 0.5,
        "val/AP50": 0.9,
        "val/AP75": 0.45,
        "val/APs": -1.0,
        "val/APm": 0.4,
        "val/APl": 0.6,
        "val/num_images": 10,
        "val/skipped_images": 1,
        "val/AP/dog": 0.7,
        "val/AP50/dog": 0.95,
        "val/AP/traffic light": -1.0,
        "val/AP50/traffic light": -1.0,
    }
    lines = format_eval_lines(600, metrics)
    assert lines[0] == (
        "[eval]  iter 600  AP 50.0  AP50 90.0  AP75 45.0  APs n/a  APm 40.0  APl 60.0  (10 images)"
        "  1 did not decode (counted with no detections)"
    )
    assert lines[1].split() == ["[eval]", "class", "AP", "AP50"]
    assert lines[2].split() == ["[eval]", "dog", "70.0", "95.0"]
    assert lines[3].split() == ["[eval]", "traffic", "light", "n/a", "n/a"]


def _run(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_missing_annotations_is_one_line_naming_the_path(capsys, tmp_path):
    rc, _, err = _run(
        [
            "prepare",
            "--annotations",
            str(tmp_path / "missing.json"),
            "--images",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: ") and str(tmp_path / "missing.json") in lines[0]
    assert "Traceback" not in err


def test_missing_config_and_bad_config_are_one_line(capsys, tmp_path):
    rc, _, err = _run(["train", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert rc == 2 and "Traceback" not in err and str(tmp_path / "nope.yaml") in err
    assert len([x for x in err.splitlines() if x.strip()]) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    rc, _, err = _run(["train", "--config", str(bad)], capsys)
    assert rc == 2 and "Traceback" not in err and str(bad) in err


def test_missing_shard_set_says_what_to_do(capsys, tmp_path):
    rc, _, err = _run(
        [
            "train",
            "--set",
            f"data.train_shards={tmp_path / 'nope'}",
            f"data.val_shards={tmp_path / 'nope'}",
            "data.synth=null",
            f"run.storage_path={tmp_path / 'runs'}",
            "tracking.enabled=false",
        ],
        capsys,
    )
    assert rc == 2 and "Traceback" not in err, err
    line = [x for x in err.splitlines() if x.startswith("error:")][0]
    assert str(tmp_path / "nope") in line and "ray-retina prepare" in line


def test_verbose_shows_the_traceback(tmp_path):
    from ray_retina.config import ConfigError

    with pytest.raises(ConfigError):
        cli.main(["train", "--verbose", "--config", str(tmp_path / "nope.yaml")])


def test_set_takes_several_pairs_each_validated(capsys):
    args = cli.build_parser().parse_args(
        ["train", "--set", "optim.lr=0.02", "loss.gamma=1", "--set", "seed=3"]
    )
    assert args.overrides == ["optim.lr=0.02", "loss.gamma=1", "seed=3"]
    from ray_retina.config import load_config

    cfg = load_config(cli._config_path(None, cli.DEFAULT_TRAIN_CONFIG), args.overrides)
    assert (cfg.optim.lr, cfg.loss.gamma, cfg.seed) == (0.02, 1.0, 3)
    rc, _, err = _run(["train", "--set", "optim.lr=0.02", "loss.gama=1"], capsys)
    assert rc == 2 and "loss.gama" in err


def test_data_synth_json_override_round_trips():
    from ray_retina.config import load_config

    synth = {"num_train": 4, "num_val": 2}
    cfg = load_config(cli._config_path(None, cli.DEFAULT_TRAIN_CONFIG), [f"data.synth={json.dumps(synth)}"])
    assert cfg.data.synth.num_train == 4


def _trial(trial_id: str, gamma: float, **last):  # noqa: ANN202
    """What SweepProgress reads of a Tune Trial: id, config (the searched keys only), last result."""
    from types import SimpleNamespace

    config = {"loss.gamma": gamma, "optim.lr": 0.001}
    return SimpleNamespace(
        trial_id=trial_id,
        config=config,
        last_result=last,
        path=f"/runs/s/{trial_id}",
        get_error=lambda: RuntimeError("Traceback ...\nValueError: boom"),
    )


def test_sweep_progress_lines_name_trials_by_parameters_and_track_the_best(capsys):
    import pickle

    from ray_retina.sweep.console import SweepProgress

    cb = SweepProgress(rounds=4)
    a, b = _trial("t_00000", 2.0), _trial("t_00001", 0.5)
    cb.on_trial_result(0, [a, b], a, {"training_iteration": 1, "val/AP": 0.10, "val/AP50": 0.30})
    cb.on_trial_result(0, [a, b], b, {"training_iteration": 1, "val/AP": 0.25, "val/AP50": 0.50})
    cb.on_trial_result(0, [a, b], a, {"training_iteration": 2, "val/AP": 0.20, "val/AP50": 0.40})
    cb = pickle.loads(pickle.dumps(cb))  # Tune pickles callbacks with the sweep's state
    a.last_result = {"training_iteration": 2, "val/AP": 0.20}
    cb.on_trial_complete(0, [a, b], a)  # ASHA stopped it at round 2 of 4
    b.last_result = {"training_iteration": 4, "val/AP": 0.31}
    cb.on_trial_result(0, [a, b], b, {"training_iteration": 4, "val/AP": 0.31, "val/AP50": 0.6})
    cb.on_trial_complete(0, [a, b], b)
    c = _trial("t_00002", 1.0, training_iteration=1)
    cb.on_trial_error(0, [a, b, c], c)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "[tune] gamma=2 lr=0.001 [t_00000]  round 1/4  AP 10.0  AP50 30.0  | best AP 10.0: gamma=2 lr=0.001 [t_00000]",
        "[tune] gamma=0.5 lr=0.001 [t_00001]  round 1/4  AP 25.0  AP50 50.0  | best AP 25.0: gamma=0.5 lr=0.001 [t_00001]",
        "[tune] gamma=2 lr=0.001 [t_00000]  round 2/4  AP 20.0  AP50 40.0  | best AP 25.0: gamma=0.5 lr=0.001 [t_00001]",
        "[tune] gamma=2 lr=0.001 [t_00000]  stopped by the scheduler after round 2/4 (AP 20.0)",
        "[tune] gamma=0.5 lr=0.001 [t_00001]  round 4/4  AP 31.0  AP50 60.0  | best AP 31.0: gamma=0.5 lr=0.001 [t_00001]",
        "[tune] gamma=0.5 lr=0.001 [t_00001]  finished 4/4 rounds (AP 31.0)",
        "[tune] gamma=1 lr=0.001 [t_00002]  FAILED after round 1/4: ValueError: boom (trial folder: /runs/s/t_00002)",
    ]
    assert all("__base__" not in line and "/long/path" not in line for line in lines)


def test_sweep_progress_in_min_mode_keeps_the_lowest():
    from ray_retina.sweep.console import SweepProgress

    cb = SweepProgress(rounds=2, metric="val/loss", mode="min")
    a, b = _trial("a", 1.0), _trial("b", 2.0)
    import contextlib

    with contextlib.redirect_stdout(io.StringIO()):
        cb.on_trial_result(0, [a, b], a, {"training_iteration": 1, "val/loss": 0.5})
        cb.on_trial_result(0, [a, b], b, {"training_iteration": 1, "val/loss": 0.2})
        cb.on_trial_result(0, [a, b], a, {"training_iteration": 2, "val/loss": float("nan")})  # not a best
    assert cb.best() == ("gamma=2 lr=0.001 [b]", 0.2)


def test_progress_lines_of_a_sweep_trial_carry_its_id():
    buf = io.StringIO()
    p = ProgressPrinter(100, stream=buf, tag="92f01_00003")
    p.line(20, loss_cls=1.0, loss_box=0.5, lr=0.01, images_per_s=5.0, data_wait_s=0.1)
    p.eval_table(20, {"val/AP": 0.25, "val/AP50": 0.5, "val/AP/dog": 0.3, "val/AP50/dog": 0.6})
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("[train 92f01_00003] iter  20/100  loss_cls 1.0000")
    assert lines[1].startswith("[eval 92f01_00003]  iter 20  AP 25.0  AP50 50.0")
    assert all(line.startswith("[eval 92f01_00003]") for line in lines[1:]) and len(lines) == 4
