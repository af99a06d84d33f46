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
        40, 200, loss_cls=0.51234, loss_box=0.30111, lr=0.01, images_per_s=11.84, data_wait_s=0.42, eta_s=135.2
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
    ProgressPrinter(100, enabled=False, stream=silent).line(1, loss_cls=1, loss_box=1, lr=1, images_per_s=1, data_wait_s=0)
    assert silent.getvalue() == ""


def test_eval_lines_show_ap_table_per_class_and_skips():
    metrics = {"val/AP": 0.5, "val/AP50": 0.9, "val/AP75": 0.45, "val/APs": -1.0, "val/APm": 0.4, "val/APl": 0.6,
               "val/num_images": 10, "val/skipped_images": 1, "val/AP/dog": 0.7, "val/AP50/dog": 0.95,
               "val/AP/traffic light": -1.0, "val/AP50/traffic light": -1.0}  # fmt: skip
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
    rc, _, err = _run(["prepare", "--annotations", str(tmp_path / "missing.json"), "--images", str(tmp_path),
                       "--out", str(tmp_path / "out")], capsys)  # fmt: skip
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
    rc, _, err = _run(["train", "--set", f"data.train_shards={tmp_path / 'nope'}", f"data.val_shards={tmp_path / 'nope'}",
                       "data.synth=null", f"run.storage_path={tmp_path / 'runs'}", "tracking.enabled=false"], capsys)  # fmt: skip
    assert rc == 2 and "Traceback" not in err, err
    line = [x for x in err.splitlines() if x.startswith("error:")][0]
    assert str(tmp_path / "nope") in line and "ray-retina prepare" in line


def test_verbose_shows_the_traceback(tmp_path):
    from ray_retina.config import ConfigError

    with pytest.raises(ConfigError):
        cli.main(["train", "--verbose", "--config", str(tmp_path / "nope.yaml")])


def test_set_takes_several_pairs_each_validated(capsys):
    args = cli.build_parser().parse_args(["train", "--set", "optim.lr=0.02", "loss.gamma=1", "--set", "seed=3"])
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
