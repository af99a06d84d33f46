"""Model options (P6 source, frozen BN and stages, GroupNorm heads, pixel statistics, channels_last, bf16) and
the edge cases every detector suite has (all-crowd, degenerate and out-of-image boxes, mixed sizes, normalisers)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from ray_retina.model import (
    HeadOutputs,
    RetinaNetLoss,
    build_criterion,
    build_model,
    build_postprocessor,
    load_torchvision_retinanet,
)
from ray_retina.model.backbone import BackboneWithFPN
from ray_retina.model.box_coder import BoxCoder
from ray_retina.model.matcher import Matcher

from _model_utils import boxes_image, small_cfg


@pytest.mark.parametrize("p6_from", ["c5", "p5"])
def test_p6_source(p6_from):
    torch.manual_seed(0)
    bb = BackboneWithFPN(name="resnet18", out_channels=64, p6_from=p6_from)
    extra = bb.fpn.extra_blocks
    assert extra.p6.in_channels == (512 if p6_from == "c5" else 64)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        c = bb.body(x)
        p = bb.fpn(c)
        p3, p4, p5, p6, p7 = p.values()
        src = c["2"] if p6_from == "c5" else p5
        torch.testing.assert_close(p6, extra.p6(src))
        torch.testing.assert_close(p7, extra.p7(torch.relu(p6)))  # P7 = ReLU then conv on P6
    assert [t.shape[-1] for t in (p3, p4, p5, p6, p7)] == [16, 8, 4, 2, 1]
    # 512 FPN channels on a ResNet-18 (C5 = 512): torchvision's in == out rule would pick P5; we do not
    bb512 = BackboneWithFPN(name="resnet18", out_channels=512, p6_from="c5")
    assert bb512.fpn.extra_blocks.use_P5 is False


def test_frozen_bn_and_frozen_stages():
    bb = BackboneWithFPN(name="resnet18", out_channels=32, frozen_bn=True, freeze_at=2)
    norms = [m for m in bb.body.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    assert not any(p.requires_grad for p in bb.body.conv1.parameters())
    assert not any(p.requires_grad for p in bb.body.layer1.parameters())
    assert all(p.requires_grad for p in bb.body.layer2.parameters())
    stem_only = BackboneWithFPN(name="resnet18", out_channels=32, freeze_at=1)
    assert (
        not stem_only.body.conv1.weight.requires_grad and stem_only.body.layer1[0].conv1.weight.requires_grad
    )
    free = BackboneWithFPN(name="resnet18", out_channels=32, frozen_bn=False, freeze_at=0)
    assert any(isinstance(m, nn.BatchNorm2d) for m in free.body.modules())
    assert all(p.requires_grad for p in free.parameters())
    with pytest.raises(ValueError, match="backbone"):
        BackboneWithFPN(name="vgg16")


def test_group_norm_heads():
    model = build_model(
        small_cfg(**{"model.head_norm": "gn", "model.fpn_channels": 48, "model.head_convs": 2}), 3
    )
    gns = [m for m in model.head.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 4 and all(m.num_groups == 16 for m in gns)  # gcd(48, 32)
    convs = [m for m in model.head.classification_head.conv.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs)  # GN follows: no conv bias
    model256 = build_model(small_cfg(**{"model.head_norm": "gn", "model.fpn_channels": 64}), 3)
    assert all(m.num_groups == 32 for m in model256.head.modules() if isinstance(m, nn.GroupNorm))


def test_pixel_mean_std_are_buffers():
    torch.manual_seed(0)
    model = build_model(small_cfg(), 3).eval()
    names = dict(model.named_buffers())
    assert "pixel_mean" in names and "pixel_std" in names
    assert "pixel_mean" in model.state_dict()
    torch.manual_seed(0)
    plain = build_model(small_cfg(**{"model.pixel_mean": [0, 0, 0], "model.pixel_std": [1, 1, 1]}), 3).eval()
    x = torch.rand(1, 3, 128, 128) * 255
    with torch.no_grad():
        normalised = (x - torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)) / torch.tensor(
            [58.395, 57.12, 57.375]
        ).view(1, 3, 1, 1)
        torch.testing.assert_close(model(x).cls_logits, plain(normalised).cls_logits)
    assert model.to(torch.float64).pixel_mean.dtype == torch.float64


def test_backbone_weights_from_local_file(tmp_path):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    model = build_model(small_cfg(**{"model.backbone_weights": str(path)}), 3)
    torch.testing.assert_close(model.backbone.body.conv1.weight, resnet.conv1.weight)
    torch.testing.assert_close(
        model.backbone.body.layer3[1].bn2.running_var, resnet.layer3[1].bn2.running_var
    )
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model(small_cfg(**{"model.backbone_weights": str(missing)}), 3)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ValueError, match="does not match"):
        build_model(small_cfg(**{"model.backbone_weights": str(tmp_path / "r34.pth")}), 3)


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    ref = build_model(small_cfg(), 3).eval()
    torch.manual_seed(0)
    cl = build_model(small_cfg(**{"model.channels_last": True}), 3).eval()
    assert cl.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 128, 128) * 255
    with torch.no_grad():
        a, b = ref(x), cl(x)
    torch.testing.assert_close(a.cls_logits, b.cls_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.box_deltas, b.box_deltas, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_keeps_loss_and_decode_fp32():
    torch.manual_seed(0)
    cfg = small_cfg()
    model = build_model(cfg, 3)
    crit = build_criterion(cfg, 3)
    images, gt_boxes, gt_labels = boxes_image(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
        losses = crit(out, gt_boxes, gt_labels)
    assert out.cls_logits.dtype == torch.bfloat16
    assert losses["loss_cls"].dtype == torch.float32 and losses["loss_box"].dtype == torch.float32
    assert all(math.isfinite(v.item()) for v in losses.values())
    (losses["loss_cls"] + losses["loss_box"]).backward()
    assert torch.isfinite(model.head.classification_head.cls_logits.weight.grad).all()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        dets = build_postprocessor(small_cfg(**{"postprocess.score_thresh": 0.0}))(
            model(images), torch.tensor([[128, 128]] * 2)
        )
    assert dets[0]["boxes"].dtype == torch.float32 and len(dets[0]["boxes"]) == 100


def _outputs(b: int, size: int, k: int = 3, seed: int = 0) -> HeadOutputs:
    from ray_retina.model.anchors import AnchorGenerator

    g = torch.Generator().manual_seed(seed)
    feats = [torch.zeros(1, 1, size // s, size // s) for s in (8, 16, 32, 64, 128)]
    anchors, per_level = AnchorGenerator()(feats)
    r = anchors.shape[0]
    return HeadOutputs(
        torch.randn(b, r, k, generator=g) - 2, torch.randn(b, r, 4, generator=g) * 0.1, anchors, per_level
    )


def _crit(normalizer: str, **kw) -> RetinaNetLoss:
    return RetinaNetLoss(num_classes=3, matcher=Matcher(), box_coder=BoxCoder(), normalizer=normalizer, **kw)


def test_all_crowd_image_degenerate_and_out_of_image_boxes():
    out = _outputs(2, 128)
    gt = torch.tensor(
        [
            [[10.0, 10.0, 60.0, 60.0], [70.0, 20.0, 120.0, 100.0], [0.0, 0.0, 0.0, 0.0]],
            [[10.0, 10.0, 10.0, 40.0], [-900.0, -900.0, -850.0, -850.0], [90.0, 90.0, 260.0, 250.0]],
        ]
    )
    labels = torch.tensor([[0, 2, -1], [1, 1, 2]])
    crowd = torch.tensor([[True, True, False], [False, False, False]])
    crit = _crit("global")
    cls_labels, _, fg = crit.assign(out.anchors, gt, labels, crowd)
    assert not fg[0].any()  # image 0: only crowd boxes
    losses = crit(out, gt, labels, crowd)
    assert all(math.isfinite(v.item()) for v in losses.values())
    # image 1: the zero-width box and the box outside the image match nothing; the partly outside box does
    matched = crit.assign(out.anchors, gt[1:], labels[1:], None)[1][0][fg[1]]
    assert fg[1].any() and (matched == 2).all()


def test_one_image_much_larger_than_the_other():
    torch.manual_seed(0)
    cfg = small_cfg()
    model = build_model(cfg, 3)
    big, gb, gl = boxes_image(1, 256, seed=1)
    small, sb, sl = boxes_image(1, 128, seed=2)
    images = torch.zeros(2, 3, 256, 256)
    images[0] = big[0]
    images[1, :, :128, :128] = small[0]
    gt_boxes = torch.cat([gb, sb])
    gt_labels = torch.cat([gl, sl])
    losses = build_criterion(cfg, 3)(model(images), gt_boxes, gt_labels)
    assert all(math.isfinite(v.item()) for v in losses.values())
    model.eval()
    with torch.no_grad():
        dets = build_postprocessor(small_cfg(**{"postprocess.score_thresh": 0.0}))(
            model(images), torch.tensor([[256, 256], [128, 100]])
        )
    assert dets[1]["boxes"][:, 2].max() <= 100 and dets[1]["boxes"][:, 3].max() <= 128
    assert dets[0]["boxes"][:, 2].max() > 128


def test_normalisers():
    out = _outputs(2, 128, seed=3)
    gt = torch.tensor(
        [[[10.0, 10.0, 60.0, 60.0], [64.0, 64.0, 128.0, 128.0]], [[0.0, 0.0, 40.0, 90.0], [0, 0, 0, 0]]]
    )
    labels = torch.tensor([[0, 2], [1, -1]])
    single = [
        {
            n: _crit(n)(
                HeadOutputs(
                    out.cls_logits[i : i + 1],
                    out.box_deltas[i : i + 1],
                    out.anchors,
                    out.num_anchors_per_level,
                ),
                gt[i : i + 1],
                labels[i : i + 1],
            )
            for n in ("global", "per_image")
        }
        for i in range(2)
    ]
    n = [s["global"]["num_fg"] for s in single]
    # per_image (torchvision): mean over images of each image's loss / its num_fg
    per_image = _crit("per_image")(out, gt, labels)
    for key in ("loss_cls", "loss_box"):
        torch.testing.assert_close(
            per_image[key], (single[0]["per_image"][key] + single[1]["per_image"][key]) / 2
        )
    # global (paper): all anchors of the batch / num_fg of the batch
    glob = _crit("global")(out, gt, labels)
    assert glob["num_fg"] == n[0] + n[1]
    for key in ("loss_cls", "loss_box"):
        expected = (single[0]["global"][key] * n[0] + single[1]["global"][key] * n[1]) / (n[0] + n[1])
        torch.testing.assert_close(glob[key], expected)
    # ema (detectron2): starts at 100 and moves by (1 - momentum) towards num_fg, in training only
    ema = _crit("ema", ema_momentum=0.9)
    first = ema(out, gt, labels)
    torch.testing.assert_close(ema.loss_normalizer, 0.9 * torch.tensor(100.0) + 0.1 * (n[0] + n[1]))
    torch.testing.assert_close(first["loss_box"] * ema.loss_normalizer, glob["loss_box"] * (n[0] + n[1]))
    ema.eval()
    before = ema.loss_normalizer.clone()
    ema(out, gt, labels)
    assert torch.equal(ema.loss_normalizer, before)


def _ddp_worker(rank: int, world: int, init_file: str, q) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = _outputs(1, 128, seed=rank)
        gts = [torch.tensor([[[10.0, 10.0, 60.0, 60.0]]]), torch.tensor([[[0.0, 0.0, 40.0, 90.0]]])]
        crit = _crit("global")
        losses = crit(out, gts[rank], torch.tensor([[0]]))
        dist.destroy_process_group()
        local = _crit("global")(out, gts[rank], torch.tensor([[0]]))  # no process group: local count
        q.put((rank, losses["loss_box"].item(), local["loss_box"].item(), local["num_fg"].item()))
    except Exception as e:  # pragma: no cover - reported to the test
        q.put((rank, repr(e), None, None))


@pytest.mark.slow
def test_global_normaliser_all_reduces_over_workers(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("fork")  # fork: no re-import of torch in the children (seconds each)
    q = ctx.Queue()
    init_file = str(tmp_path / "pg")
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, init_file, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r[0], r[1:]) for r in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    assert all(isinstance(results[r][0], float) for r in range(2)), results
    n_total = results[0][2] + results[1][2]
    for r in range(2):
        ddp_loss, local_loss, local_fg = results[r]
        # each worker divides its own sum by the global count / world size
        assert ddp_loss == pytest.approx(local_loss * local_fg / (n_total / 2), rel=1e-5)


def test_load_torchvision_state_dict_with_category_subset_and_old_keys():
    from torchvision.models.detection.retinanet import RetinaNetHead as TVHead

    torch.manual_seed(0)
    model = build_model(
        small_cfg(**{"model.fpn_channels": 32, "model.head_convs": 4, "model.p6_from": "p5"}), 3
    )
    tv_head = TVHead(32, 9, 91)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    for k, v in tv_head.state_dict().items():
        key = "head." + k
        key = key.replace("conv.0.0.", "conv.0.")  # pre-0.13 key style for the first conv
        sd[key] = v
    with pytest.raises(ValueError, match="category_ids"):
        load_torchvision_retinanet(model, sd)
    ids = [1, 5, 90]
    load_torchvision_retinanet(model, sd, category_ids=ids)
    w = model.head.classification_head.cls_logits.weight
    tvw = tv_head.classification_head.cls_logits.weight.view(9, 91, 32, 3, 3)
    torch.testing.assert_close(w.view(9, 3, 32, 3, 3), tvw[:, ids])
    torch.testing.assert_close(
        model.head.classification_head.conv[0][0].weight, tv_head.classification_head.conv[0][0].weight
    )
    assert model.anchor_generator.torchvision_compat
