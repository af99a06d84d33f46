"""Fine-tuning starts: ``model.init_from`` with torchvision's COCO RetinaNet weights or one of our
checkpoints, classes mapped by name, new classes at the prior init, and the start-up check of the config.

The COCO start is checked against torchvision's own model with the same weights before any training step: the
logits of the matched classes, the box deltas and the anchors equal torchvision's, so the detections are the
same (the post-process is tested against torchvision in test_model_parity.py).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torchvision.models.detection import retinanet_resnet50_fpn
from torchvision.models.detection.image_list import ImageList

from ray_retina.config import Config, ConfigError, apply_overrides
from ray_retina.engine.loop import Engine
from ray_retina.engine.restore import check_init, class_map_for, init_model_from, read_init_source
from ray_retina.model import build_criterion, build_model, build_postprocessor
from ray_retina.model.torchvision_compat import TORCHVISION_COCO_CATEGORIES, match_classes

from _model_utils import boxes_image, small_cfg

PRIOR = 0.05  # not the default 0.01: the new class's bias must follow the config
NAMES = ["person", "dog", "giraffe-not-in-coco"]
IDS = [1, 2, 3]  # our data set's own ids: only the names say which COCO classes these are
COCO_SLOT = {"person": 1, "dog": 18}
# torchvision's weights: resnet50, P6 from P5, 4 head convs, 256 channels, no GN, its anchors.
TV_MODEL = {"model.backbone": "resnet50", "model.p6_from": "p5", "model.torchvision_anchors": True}


def _prior_bias(pi: float) -> torch.Tensor:
    return torch.tensor(-math.log((1 - pi) / pi), dtype=torch.float32)


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory):
    """A torchvision ``retinanet_resnet50_fpn`` with random weights and COCO's 91 class slots (the real key
    layout of ``retinanet_resnet50_fpn_coco-eeacb38b.pth``), saved as a plain state dict file."""
    torch.manual_seed(0)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a different bias per row, so that a wrong row shows
        bias = tv.head.classification_head.cls_logits.bias
        bias.copy_(torch.randn(bias.shape, generator=g) - 2.5)
    tv.eval()  # BatchNorm on its running statistics: what our FrozenBatchNorm computes
    path = tmp_path_factory.mktemp("weights") / "retinanet_resnet50_fpn_coco-random.pth"
    torch.save(tv.state_dict(), path)
    return tv, path


def test_match_classes_by_name_with_voc_spellings():
    names = [
        "aeroplane",
        "diningtable",
        "potted plant",
        "TV Monitor",
        "Person",
        "dog",
        "giraffe-not-in-coco",
        "N/A",
    ]
    assert match_classes(names, TORCHVISION_COCO_CATEGORIES) == [5, 67, 64, 72, 1, 18, None, None]
    assert match_classes(["b", "a"], ["a", None, "b", "a"]) == [2, 0]


def test_coco_start_equals_torchvision_before_training(coco_like, caplog):
    tv, path = coco_like
    cfg = apply_overrides(Config(), {**TV_MODEL, "model.prior": PRIOR, "model.init_from": str(path)})
    torch.manual_seed(3)
    model = build_model(cfg, len(NAMES))
    with caplog.at_level(logging.INFO, logger="ray_retina.engine.restore"):
        cmap = init_model_from(model, cfg, IDS, NAMES)
    assert cmap == [1, 18, None]
    assert "2 of 3 classes matched by name: person, dog; new (prior init): giraffe-not-in-coco" in caplog.text
    model.eval()

    images = boxes_image(b=1, size=128, seed=2)[0]
    with torch.no_grad():
        out = model(images)
        x = (images - model.pixel_mean) / model.pixel_std  # torchvision's transform, minus the resize
        feats = list(tv.backbone(x).values())
        ref = tv.head(feats)
        ref_anchors = tv.anchor_generator(ImageList(x, [(128, 128)]), feats)[0]
    for label, name in enumerate(NAMES[:2]):
        torch.testing.assert_close(
            out.cls_logits[..., label], ref["cls_logits"][..., COCO_SLOT[name]], rtol=0, atol=1e-5
        )
    torch.testing.assert_close(out.box_deltas, ref["bbox_regression"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.anchors, ref_anchors, rtol=0, atol=0)

    # The class COCO lacks: the head's own init, as if the paper's model had been built for it.
    k = len(NAMES)
    w = model.head.classification_head.cls_logits.weight.detach()[2::k]
    b = model.head.classification_head.cls_logits.bias[2::k]
    assert torch.equal(b, _prior_bias(PRIOR).expand(9))
    assert abs(float(w.std()) - 0.01) < 5e-4 and abs(float(w.mean())) < 5e-4
    tv_rows = tv.head.classification_head.cls_logits.weight.view(9, 91, -1)
    assert not any(torch.allclose(w[0].flatten(), tv_rows[0, c]) for c in range(91))


@pytest.mark.parametrize(
    ("overrides", "keys", "suggestion"),
    [
        (
            {},
            ["model.p6_from", "model.torchvision_anchors"],
            "--set model.p6_from=p5 model.torchvision_anchors=true",
        ),
        (
            {**TV_MODEL, "model.backbone": "resnet18", "model.head_convs": 2},
            [
                "model.backbone: 'resnet18', the weights need 'resnet50'",
                "model.head_convs: 2, the weights need 4",
                "backbone.body.layer3.*",
                "head.classification_head.conv.0..3",
            ],
            "--set model.backbone=resnet50 model.head_convs=4",
        ),
    ],
    ids=["paper-defaults", "resnet18-2-convs"],
)
def test_mismatching_model_config_stops_at_start_up(coco_like, overrides, keys, suggestion):
    _, path = coco_like
    cfg = apply_overrides(Config(), {**overrides, "model.init_from": str(path)})
    with pytest.raises(ConfigError) as err:
        check_init(cfg)  # the driver's check: raises before reading any data
    msg = str(err.value)
    assert f"model.init_from={path} (torchvision RetinaNet weights)" in msg
    for key in keys:
        assert key in msg
    assert msg.splitlines()[-1] == "set them: " + suggestion


def test_worker_side_init_checks_too(coco_like):
    _, path = coco_like
    cfg = apply_overrides(Config(), {**TV_MODEL, "model.fpn_channels": 128, "model.init_from": str(path)})
    with pytest.raises(ConfigError, match=r"model.fpn_channels: 128, the weights need 256"):
        init_model_from(build_model(small_cfg(), 3), cfg, IDS, NAMES)


def test_check_init_makes_the_path_absolute_and_logs_matches(coco_like, synth_val, monkeypatch, caplog):
    _, path = coco_like
    _, shards = synth_val
    monkeypatch.chdir(path.parent)
    cfg = apply_overrides(
        Config(), {**TV_MODEL, "model.init_from": path.name, "data.train_shards": str(shards)}
    )
    with caplog.at_level(logging.INFO, logger="ray_retina.engine.restore"):
        out = check_init(cfg)
    assert out.model.init_from == str(path)
    assert f"model.init_from {path}:" in caplog.text and "classes matched by name" in caplog.text


# ---------------------------------------------------------------------------------------- our checkpoints

ARCH = {"model.backbone": "resnet18", "model.fpn_channels": 32, "model.head_convs": 1}


@pytest.fixture(scope="module")
def abc_checkpoint(tmp_path_factory):
    """A run of ours with classes a, b, c (ids 1, 2, 3): <run>/checkpoint_0000010/checkpoint.pt."""
    cfg = apply_overrides(Config(), ARCH)
    torch.manual_seed(0)
    model = build_model(cfg, 3)
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_()  # unlike any fresh init
    engine = Engine(
        cfg,
        model,
        build_criterion(cfg, 3),
        build_postprocessor(cfg),
        torch.device("cpu"),
        [1, 2, 3],
        cat_names=["a", "b", "c"],
    )
    run = tmp_path_factory.mktemp("run")
    (run / "checkpoint_0000010").mkdir()
    state = engine.state_dict()
    torch.save(state, run / "checkpoint_0000010" / "checkpoint.pt")
    state["cat_names"] = None  # as a checkpoint written before names were saved
    torch.save(state, run / "no_names.pt")
    return run, model


def _rows(model, label: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    h = model.head.classification_head.cls_logits
    return h.weight[label::k], h.bias[label::k]


@pytest.mark.parametrize("form", ["file", "checkpoint-dir", "run-dir", "uri"])
def test_own_checkpoint_maps_classes_by_name(abc_checkpoint, form):
    run, src = abc_checkpoint
    ckpt_dir = run / "checkpoint_0000010"
    where = {
        "file": ckpt_dir / "checkpoint.pt",
        "checkpoint-dir": ckpt_dir,
        "run-dir": run,
        "uri": f"file://{ckpt_dir / 'checkpoint.pt'}",
    }[form]
    cfg = apply_overrides(Config(), {**ARCH, "model.prior": PRIOR, "model.init_from": str(where)})
    torch.manual_seed(1)
    model = build_model(cfg, 3)
    assert init_model_from(model, cfg, [7, 8, 9], ["c", "a", "d"]) == [2, 0, None]
    for ours, theirs in ((0, 2), (1, 0)):
        for got, want in zip(_rows(model, ours, 3), _rows(src, theirs, 3), strict=True):
            assert torch.equal(got, want)
    assert torch.equal(_rows(model, 2, 3)[1], _prior_bias(PRIOR).expand(9))  # d: fresh
    sd, ref = model.state_dict(), src.state_dict()
    same = [k for k in ref if "cls_logits" not in k]
    assert all(torch.equal(sd[k], ref[k]) for k in same if k not in ("pixel_mean", "pixel_std"))
    assert not model.anchor_generator.torchvision_compat  # our anchors follow our config


def test_own_checkpoint_without_names_maps_by_id(abc_checkpoint):
    run, src = abc_checkpoint
    source = read_init_source(str(run / "no_names.pt"))
    cmap, line = class_map_for(source, [3, 1, 9], ["c", "a", "d"])
    assert cmap == [2, 0, None]
    assert "by category id" in line


def test_own_checkpoint_with_another_architecture_stops(abc_checkpoint):
    run, _ = abc_checkpoint
    cfg = apply_overrides(Config(), {**ARCH, "model.head_convs": 2, "model.init_from": str(run)})
    with pytest.raises(
        ConfigError, match=r"model.head_convs: 2, the weights need 1 \(from the checkpoint's config\)"
    ):
        check_init(cfg)
