"""The training core without Ray: schedule, resolved config, a step, NaN handling, exact resume."""

from __future__ import annotations

import io

import pytest
import torch
from _engine_utils import batch, make_engine

from ray_retina.config import Config, apply_overrides, resolve
from ray_retina.engine.hooks import HookBase, LoopState, ProgressHook, run_loop
from ray_retina.engine.loop import NonFiniteLossError, lr_factor, unwrap
from ray_retina.engine.progress import ProgressPrinter


def small_cfg(**over) -> Config:
    base = {
        "model.backbone": "resnet18",
        "model.fpn_channels": 32,
        "model.head_convs": 1,
        "model.head_norm": "gn",
        "model.frozen_bn": True,
        "model.anchor_sizes": [16, 32, 64, 128, 256],
        "optim.lr": 0.01,
        "optim.max_iters": 12,
        "optim.steps": [8],
        "optim.warmup_iters": 4,
        "optim.warmup_factor": 0.1,
        "train.max_bad_steps": 2,
    }
    base.update(over)
    return apply_overrides(Config(), base)


def test_lr_schedule_warmup_then_steps():
    f = lr_factor(small_cfg())
    assert f(0) == pytest.approx(0.1)
    assert f(2) == pytest.approx(0.1 * 0.5 + 0.5)  # linear from warmup_factor to 1
    assert f(4) == pytest.approx(1.0) and f(7) == pytest.approx(1.0)
    assert f(8) == pytest.approx(0.1) and f(11) == pytest.approx(0.1)
    cos = lr_factor(small_cfg(**{"optim.schedule": "cosine", "optim.warmup_iters": 0}))
    assert cos(0) == pytest.approx(1.0) and cos(6) == pytest.approx(0.5) and cos(12) == pytest.approx(0.0)


def test_resolve_scales_lr_and_schedule_to_global_batch():
    cfg = apply_overrides(
        Config(), {"data.batch_size": 4, "scaling.num_workers": 8, "optim.reference_batch": 16}
    )
    r = resolve(cfg)
    assert r.optim.lr == pytest.approx(0.02)  # 0.01 x 32 / 16
    assert (r.optim.max_iters, r.optim.steps, r.optim.warmup_iters) == (45_000, [30_000, 40_000], 250)
    assert resolve(small_cfg()).optim.max_iters == 12  # no reference batch: as given


def test_train_step_updates_and_reports():
    eng = make_engine(small_cfg())
    before = [p.detach().clone() for p in eng.model.parameters() if p.requires_grad]
    out = eng.train_step(batch())
    assert out is not None and out["loss_cls"] > 0 and out["loss_box"] > 0
    assert out["lr"] == pytest.approx(0.001)  # warm-up start: 0.01 x 0.1
    after = [p for p in eng.model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert eng.iteration == 1


def test_nonfinite_steps_are_skipped_then_stop_with_the_iteration():
    eng = make_engine(small_cfg())
    real_forward = eng.model.forward

    def nan_forward(images):
        out = real_forward(images)
        return out._replace(cls_logits=out.cls_logits * float("nan"))

    eng.model.forward = nan_forward  # type: ignore[method-assign]
    snapshot = {k: v.clone() for k, v in eng.model.state_dict().items()}
    assert eng.train_step(batch()) is None and eng.train_step(batch()) is None
    assert eng.bad_steps == 2
    for k, v in eng.model.state_dict().items():  # skipped steps leave the weights alone
        assert torch.equal(v, snapshot[k]), k
    with pytest.raises(NonFiniteLossError, match="non-finite loss at iteration 2"):
        eng.train_step(batch())


def test_checkpoint_loads_weights_only_and_resume_is_exact():
    cfg = small_cfg()
    straight = make_engine(cfg)
    for i in range(6):
        straight.train_step(batch(i))

    first = make_engine(cfg)
    for i in range(3):
        first.train_step(batch(i))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["iteration"] == 3 and state["config"]["optim"]["lr"] == 0.01

    resumed = make_engine(cfg, seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(state)
    lrs = []
    for i in range(3, 6):
        lrs.append(resumed.train_step(batch(i))["lr"])
    assert lrs == pytest.approx([0.01 * lr_factor(cfg)(i) for i in range(3, 6)])
    for (k, a), b in zip(
        unwrap(straight.model).state_dict().items(), unwrap(resumed.model).state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert resumed.iteration == straight.iteration == 6


def test_predict_maps_back_to_original_ids_and_pixels():
    eng = make_engine(small_cfg(**{"postprocess.score_thresh": 0.0}))
    b = batch()
    dets = eng.predict(b)
    assert dets and {d["category_id"] for d in dets} <= {3, 17, 42}
    img2 = [d for d in dets if d["image_id"] == 2]
    # image 2 was downscaled by 0.5 and is 60x80 in the batch: boxes come back in its 120x160 original pixels
    assert max(d["bbox"][0] + d["bbox"][2] for d in img2) <= 160 + 1e-3
    assert max(d["bbox"][0] + d["bbox"][2] for d in img2) > 80


def test_bf16_autocast_step_keeps_fp32_loss():
    eng = make_engine(small_cfg(**{"optim.amp": "bf16"}))
    ref = make_engine(small_cfg())  # same seed: the same weights, fp32 throughout
    seen: dict[str, torch.dtype] = {}
    criterion = eng.criterion

    def recording_criterion(outputs, *args, **kwargs):
        losses = criterion(outputs, *args, **kwargs)
        seen["head"] = outputs.cls_logits.dtype
        seen.update({k: losses[k].dtype for k in ("loss_cls", "loss_box")})
        return losses

    eng.criterion = recording_criterion
    out, ref_out = eng.train_step(batch()), ref.train_step(batch())
    assert seen["head"] == torch.bfloat16  # autocast was on around the network
    assert seen["loss_cls"] == torch.float32 and seen["loss_box"] == torch.float32
    assert out is not None and ref_out is not None
    for k in ("loss_cls", "loss_box"):  # fp32 losses of bf16 outputs: close to the fp32 step's
        assert out[k] == pytest.approx(ref_out[k], rel=2e-2), k


def test_run_loop_calls_the_hooks_and_stops_when_one_says_so():
    eng = make_engine(small_cfg(**{"optim.max_iters": 5, "optim.steps": [5]}))
    calls: list[object] = []

    class Recorder(HookBase):
        def before_train(self, state):
            calls.append("before")

        def after_step(self, state):
            calls.append((state.engine.iteration, state.step_images))
            state.stop = state.engine.iteration == 3

        def after_train(self, state):
            calls.append("after")

    steps = (([batch(i)], 0.5) for i in range(100))
    out = io.StringIO()
    progress = ProgressHook(ProgressPrinter(5, stream=out), None, log_period=2)
    run_loop(LoopState(eng), steps, [progress, Recorder()])
    assert calls == ["before", (1, 2), (2, 2), (3, 2), "after"]
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "iter 2/5" in lines[0] and "data 1.0 s" in lines[0]  # 2 steps x 0.5 s
    assert eng.iteration == 3 and progress.lr > 0
