from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from ray_retina.config import (
    BASE_KEY,
    PAPER_LR,
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    flatten,
    load_config,
    load_config_dict,
    merge_config_dicts,
)

ROOT = Path(__file__).resolve().parents[2]


SHIPPED = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
# Each shipped config written out key by key, without _base_ (tests/unit/data): what the configs on _base_
# must still resolve to. A deliberate change to a shipped config changes this file with it.
WRITTEN_OUT = json.loads((Path(__file__).parent / "data" / "shipped_configs_written_out.json").read_text())
# Deliberate differences: the fine-tune config inherits the paper config's restarts (max_failures 3).
INHERITED_CHANGES = {"retinanet_r50_fpn_finetune_small.yaml": {"run.max_failures": 3}}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_resolve_to_their_written_out_content(name):
    cfg = load_config(ROOT / "configs" / name)
    expected = apply_overrides(config_from_dict(WRITTEN_OUT[name]), INHERITED_CHANGES.get(name, {}))
    assert flatten(cfg) == flatten(expected)
    assert cfg.loss.gamma == 2.0


def test_shipped_configs_state_only_what_differs_from_their_base():
    assert set(WRITTEN_OUT) == set(SHIPPED)
    bases = {n: yaml.safe_load((ROOT / "configs" / n).read_text()).get(BASE_KEY) for n in SHIPPED}
    assert bases["tune_focal.yaml"] == "smoke.yaml"
    assert (
        bases["tune_focal_gpu.yaml"]
        == bases["retinanet_r50_fpn_finetune_small.yaml"]
        == ("retinanet_r50_fpn_1x_coco.yaml")
    )
    for name, base in bases.items():
        if base is None:
            continue
        own = flatten(yaml.safe_load((ROOT / "configs" / name).read_text()))
        inherited = flatten(load_config_dict(ROOT / "configs" / base))
        repeated = {k for k, v in own.items() if k in inherited and inherited[k] == v and k != BASE_KEY}
        assert not repeated, f"{name} repeats its base: {sorted(repeated)}"


def test_paper_defaults():
    cfg = Config()
    assert (cfg.loss.gamma, cfg.loss.alpha, cfg.model.prior) == (2.0, 0.25, 0.01)
    assert (cfg.loss.fg_iou_thresh, cfg.loss.bg_iou_thresh) == (0.5, 0.4)
    assert cfg.postprocess.model_dump() == {
        "score_thresh": 0.05,
        "topk_candidates": 1000,
        "nms_thresh": 0.5,
        "detections_per_img": 100,
    }
    assert (cfg.optim.max_iters, cfg.optim.steps, cfg.optim.momentum) == (90_000, [60_000, 80_000], 0.9)
    assert cfg.model.p6_from == "c5"


def test_lr_scales_linearly_with_global_batch():
    cfg = apply_overrides(Config(), {"data.batch_size": 4, "scaling.num_workers": 8})
    assert cfg.global_batch == 32
    assert cfg.lr == pytest.approx(PAPER_LR * 2)
    assert apply_overrides(cfg, {"optim.lr": 0.005}).lr == 0.005


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"loss\.gama: unknown key"):
        apply_overrides(Config(), ["loss.gama=2"])


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match=r"model\.prior"):
        apply_overrides(Config(), {"model.prior": 1.5})
    with pytest.raises(ConfigError, match=r"model\.backbone"):
        config_from_dict({"model": {"backbone": "vgg16"}})


def test_yaml_error_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"(?s)bad\.yaml.*optim\.lr"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_overrides_parse_yaml_values():
    cfg = load_config(None, ["optim.lr=0.02", "data.train_min_size=[640, 800]", "model.head_norm=gn"])
    assert cfg.optim.lr == 0.02
    assert cfg.data.train_min_size == [640, 800]
    assert cfg.model.head_norm == "gn"


def test_flatten_round_trips_through_overrides():
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    flat = flatten(cfg)
    assert flat["loss.gamma"] == 2.0 and flat["model.backbone"] == "resnet18"
    rebuilt = apply_overrides(Config(), {k: v for k, v in flat.items()})
    assert rebuilt == cfg


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.loss.gamma = 1.0  # type: ignore[misc]


def test_thresholds_and_steps_validated():
    with pytest.raises(ConfigError, match="bg_iou_thresh"):
        apply_overrides(Config(), {"loss.bg_iou_thresh": 0.6})
    with pytest.raises(ConfigError, match="optim.steps"):
        apply_overrides(Config(), {"optim.steps": [80_000, 60_000]})


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_resolution_order_later_keys_override(tmp_path):
    # base a < base b (later in the list) < the file itself; mappings merge, lists and scalars replace.
    _write(
        tmp_path / "bases/a.yaml", "name: a\nseed: 1\noptim:\n  lr: 0.1\n  steps: [10, 20]\n  max_iters: 30\n"
    )
    _write(tmp_path / "bases/b.yaml", "name: b\noptim:\n  lr: 0.2\ndata:\n  batch_size: 3\n")
    top = _write(
        tmp_path / "exp/top.yaml",
        "_base_: [../bases/a.yaml, ../bases/b.yaml]\noptim:\n  steps: [5]\ndata:\n  test_min_size: 64\n",
    )
    assert load_config_dict(top) == {
        "name": "b",
        "seed": 1,
        "optim": {"lr": 0.2, "steps": [5], "max_iters": 30},
        "data": {"batch_size": 3, "test_min_size": 64},
    }
    cfg = load_config(top, ["optim.lr=0.3"])  # CLI overrides come last
    assert (cfg.name, cfg.seed, cfg.optim.lr, cfg.optim.steps, cfg.data.batch_size) == ("b", 1, 0.3, [5], 3)
    assert cfg.data.test_min_size == 64 and cfg.data.max_size == Config().data.max_size


def test_base_single_path_relative_to_the_file_and_nested(tmp_path):
    _write(tmp_path / "root.yaml", "seed: 7\nloss:\n  gamma: 1.0\n  alpha: 0.5\n")
    _write(tmp_path / "sub/mid.yaml", "_base_: ../root.yaml\nloss:\n  gamma: 3.0\n")
    leaf = _write(tmp_path / "sub/deeper/leaf.yaml", "_base_: ../mid.yaml\nname: leaf\n")
    cfg = load_config(leaf)
    assert (cfg.seed, cfg.loss.gamma, cfg.loss.alpha, cfg.name) == (7, 3.0, 0.5, "leaf")
    assert BASE_KEY not in load_config_dict(leaf)


def test_null_and_lists_replace_mappings_merge():
    base = {"data": {"synth": {"num_train": 5}, "train_min_size": [1, 2]}, "x": 1}
    over = {"data": {"synth": None, "train_min_size": [3, 3]}}
    assert merge_config_dicts(base, over) == {"data": {"synth": None, "train_min_size": [3, 3]}, "x": 1}
    assert base["data"]["synth"] == {"num_train": 5}  # inputs unchanged


def test_base_cycle_is_an_error_naming_the_files(tmp_path):
    a = _write(tmp_path / "a.yaml", "_base_: b.yaml\nseed: 1\n")
    _write(tmp_path / "b.yaml", "_base_: [c.yaml]\n")
    _write(tmp_path / "c.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*c\.yaml -> .*a\.yaml$"):
        load_config(a)
    selfish = _write(tmp_path / "self.yaml", "_base_: self.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*self\.yaml -> .*self\.yaml"):
        load_config(selfish)


def test_diamond_bases_are_not_a_cycle(tmp_path):
    _write(tmp_path / "root.yaml", "seed: 3\n")
    _write(tmp_path / "l.yaml", "_base_: root.yaml\nname: l\n")
    _write(tmp_path / "r.yaml", "_base_: root.yaml\nloss:\n  gamma: 0.5\n")
    top = _write(tmp_path / "top.yaml", "_base_: [l.yaml, r.yaml]\n")
    cfg = load_config(top)
    assert (cfg.seed, cfg.name, cfg.loss.gamma) == (3, "l", 0.5)


def test_base_errors_name_the_file(tmp_path):
    missing = _write(tmp_path / "m.yaml", "_base_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"m\.yaml: _base_ 'nowhere\.yaml' not found"):
        load_config(missing)
    bad = _write(tmp_path / "bad.yaml", "_base_: {a: 1}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: _base_ must be a path or a list"):
        load_config(bad)
    _write(tmp_path / "broken.yaml", "seed: [1\n")
    top = _write(tmp_path / "top.yaml", "_base_: broken.yaml\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:.*not valid YAML"):
        load_config(top)
    _write(tmp_path / "typo.yaml", "optim:\n  lrr: 1\n")
    top2 = _write(tmp_path / "top2.yaml", "_base_: typo.yaml\n")
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key"):
        load_config(top2)


@pytest.mark.parametrize("command", ["train", "tune"])
def test_print_config_shows_the_resolved_config_and_exits(command, capsys):
    from ray_retina.cli import main

    rc = main(
        [command, "--config", str(ROOT / "configs" / "tune_focal.yaml"), "--print-config", "--set", "seed=5"]
    )
    assert rc == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = load_config(ROOT / "configs" / "tune_focal.yaml", ["seed=5"])
    assert printed == expected.model_dump(mode="json")
    assert printed["model"]["backbone"] == "resnet18"  # from smoke.yaml, through _base_
    assert printed["scaling"]["num_workers"] == 1 and BASE_KEY not in printed
