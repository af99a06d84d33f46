"""EMA weights against a hand-computed average (and through eval, checkpoint, resume and model loading), the
val loss as the training loss of the val set, early stopping's patience."""

from __future__ import annotations

import math

import pytest
import torch
from _engine_utils import batch, make_engine
from torch import nn

from ray_retina.config import Config, apply_overrides
from ray_retina.engine.ema import ModelEMA
from ray_retina.engine.hooks import EarlyStopping
from ray_retina.engine.loop import unwrap
from ray_retina.engine.restore import model_from_state
from ray_retina.model import build_criterion


def small_cfg(**over) -> Config:
    return apply_overrides(
        Config(),
        {
            "model.backbone": "resnet18",
            "model.fpn_channels": 16,
            "model.head_convs": 1,
            "model.head_norm": "gn",
            "model.anchor_sizes": [16, 32, 64, 128, 256],
            "optim.lr": 0.01,
            "optim.max_iters": 10,
            "optim.steps": [10],
            "optim.warmup_iters": 0,
            **over,
        },
    )


def test_model_ema_matches_a_hand_computed_average():
    net = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -2.0]]))
    ema = ModelEMA(net, decay=0.9, tau=2.0)
    expected = torch.tensor([[1.0, -2.0]])
    for u, w in enumerate(([[3.0, 0.0]], [[-1.0, 4.0]], [[0.5, 0.5]]), start=1):
        with torch.no_grad():
            net[0].weight.copy_(torch.tensor(w))
        net[1].num_batches_tracked += 7
        ema.update(net)
        d = 0.9 * (1 - math.exp(-u / 2.0))  # Ultralytics / timm warm-up
        expected = d * expected + (1 - d) * torch.tensor(w)
        torch.testing.assert_close(ema.module[0].weight, expected, rtol=0, atol=1e-6)
        assert int(ema.module[1].num_batches_tracked) == 7 * u  # integers copied, not averaged
    assert ema.updates == 3 and not any(p.requires_grad for p in ema.module.parameters())
    assert ema.decay_at(1) == pytest.approx(0.9 * (1 - math.exp(-0.5)))


def test_engine_ema_per_step_is_evaluated_saved_and_restored(tmp_path):
    cfg = small_cfg(**{"optim.ema.enabled": True, "optim.ema.decay": 0.8, "optim.ema.tau": 1.0})
    engine = make_engine(cfg)
    assert engine.ema is not None and engine.eval_model is engine.ema.module
    avg = {k: v.clone().double() for k, v in unwrap(engine.model).state_dict().items()}
    for step in range(1, 4):
        assert engine.train_step(batch(step)) is not None
        d = 0.8 * (1 - math.exp(-step))
        for k, v in unwrap(engine.model).state_dict().items():
            avg[k] = d * avg[k] + (1 - d) * v.double() if v.is_floating_point() else v.double()
    for k, v in engine.ema.module.state_dict().items():
        torch.testing.assert_close(v.double(), avg[k], rtol=1e-5, atol=1e-6, msg=k)
    name = "head.classification_head.cls_logits.weight"
    assert not torch.equal(engine.ema.module.state_dict()[name], unwrap(engine.model).state_dict()[name])

    state = engine.state_dict()
    assert state["ema"]["updates"] == 3
    resumed = make_engine(cfg)
    resumed.load_state_dict(state)
    assert resumed.ema.updates == 3
    for k, v in resumed.ema.module.state_dict().items():
        assert torch.equal(v, engine.ema.module.state_dict()[k]), k

    # What eval / predict / export load: the EMA weights by default, the trained ones when asked.
    model, _, _ = model_from_state(state)
    assert torch.equal(model.state_dict()[name], engine.ema.module.state_dict()[name])
    raw, _, _ = model_from_state(state, weights="model")
    assert torch.equal(raw.state_dict()[name], unwrap(engine.model).state_dict()[name])


def test_val_loss_is_the_training_loss_of_the_val_batches():
    cfg = small_cfg()
    engine = make_engine(cfg)
    b1, b2 = batch(1), batch(2)
    engine.predict_all([b1, b2])
    got = engine.take_val_loss()
    # By hand: the criterion (global normaliser) on the eval-mode forward of the two batches as one.
    model = unwrap(engine.model).eval()
    sums, num_fg = torch.zeros(2, dtype=torch.float64), 0.0
    with torch.no_grad():
        for b in (b1, b2):
            out = build_criterion(cfg, 3)(
                model(b["images"].float()), b["gt_boxes"], b["gt_labels"], b["gt_crowd"]
            )
            n = float(out["num_fg"])
            sums += torch.tensor([float(out["loss_cls"]), float(out["loss_box"])], dtype=torch.float64) * max(
                n, 1
            )
            num_fg += n
    assert num_fg > 0
    assert got["val/loss_cls"] == pytest.approx(float(sums[0]) / num_fg, rel=1e-5)
    assert got["val/loss_box"] == pytest.approx(float(sums[1]) / num_fg, rel=1e-5)
    assert got["val/loss_cls"] > 0 and got["val/loss_box"] > 0
    # The sums restart with each eval; batches without GT (predict) add nothing.
    engine.predict_all([{k: v for k, v in b1.items() if not k.startswith("gt_")}])
    assert engine.take_val_loss() == {"val/loss_cls": 0.0, "val/loss_box": 0.0}


def test_early_stopping_counts_evals_without_improvement():
    es = EarlyStopping(2, "val/AP", "max", min_delta=0.01)
    seq = [0.10, 0.20, 0.205, 0.15, 0.30, 0.30, 0.29]
    stops = [es.update({"val/AP": v}, 10 * (i + 1)) for i, v in enumerate(seq)]
    assert stops == [False, False, False, True, False, False, True]
    assert (es.best, es.best_iteration) == (0.30, 50)
    low = EarlyStopping(1, "val/loss_cls", "min")
    assert [low.update({"val/loss_cls": v}, i) for i, v in enumerate([1.0, 0.9, 0.95])] == [
        False,
        False,
        True,
    ]
    off = EarlyStopping(None, "val/AP")
    assert not any(off.update({"val/AP": 0.0}, i) for i in range(10))
    with pytest.raises(KeyError, match="val/APx"):
        EarlyStopping(1, "val/APx").update({"val/AP": 0.1}, 1)
