from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ray_retina.config import (
    PAPER_LR,
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    flatten,
    load_config,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["smoke.yaml", "retinanet_r50_fpn_1x_coco.yaml", "tune_focal.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.loss.gamma == 2.0


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
