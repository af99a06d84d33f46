"""Contracts of the glue between model, eval and checkpoints (no Ray cluster): back-mapping of boxes, per-class AP, exact val subsets, per-rank random state, finding checkpoints."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
import torch

from ray_retina.config import apply_overrides, load_config
from ray_retina.data.synthetic import make_synthetic_coco
from ray_retina.engine.evaluate import STAT_NAMES, coco_evaluate, per_class_ap, per_class_metrics
from ray_retina.model import HeadOutputs, PostProcessor

from _train_utils import ROOT

# ------------------------------------------------------------------------------------------ back-mapping


def test_postprocess_maps_boxes_back_per_axis_and_clips():
    """target_sizes: the same detections as without, boxes scaled per axis to original pixels and clipped."""
    g = torch.Generator().manual_seed(0)
    r, k = 40, 3
    anchors = torch.rand(r, 4, generator=g) * 50
    anchors[:, 2:] = anchors[:, :2] + 5 + torch.rand(r, 2, generator=g) * 40
    out = HeadOutputs(
        cls_logits=torch.randn(2, r, k, generator=g) * 3,
        box_deltas=torch.randn(2, r, 4, generator=g) * 0.3,
        anchors=anchors,
        num_anchors_per_level=[r],
    )
    pp = PostProcessor(score_thresh=0.05, detections_per_img=100)
    sizes = torch.tensor([[64, 96], [60, 80]])
    orig = torch.tensor([[128, 96], [120, 200]])  # image 0: y x2 only; image 1: x 2.5, y 2
    plain = pp(out, sizes)
    back = pp(out, sizes, orig)
    for p, b, (h, w), (oh, ow) in zip(plain, back, sizes.tolist(), orig.tolist(), strict=True):
        assert torch.equal(p["scores"], b["scores"]) and torch.equal(p["labels"], b["labels"])
        expect = p["boxes"] * torch.tensor([ow / w, oh / h, ow / w, oh / h])
        expect = torch.minimum(expect.clamp(min=0), torch.tensor([ow, oh, ow, oh], dtype=torch.float32))
        torch.testing.assert_close(b["boxes"], expect)
        assert (b["boxes"][:, 2] <= ow).all() and (b["boxes"][:, 3] <= oh).all()


# ------------------------------------------------------------------------------------------ per-class AP


def _case() -> tuple[dict, list[dict]]:
    """Two classes on three images: class 1 found perfectly, class 2 half found with a false positive."""
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 100, "width": 100} for i in (1, 2, 3)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [50, 50, 20, 40], "area": 800, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [5, 5, 40, 20], "area": 800, "iscrowd": 0},
        {"id": 4, "image_id": 3, "category_id": 2, "bbox": [60, 10, 30, 30], "area": 900, "iscrowd": 0},
    ]
    gt = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 1, "name": "cat/a"}, {"id": 2, "name": "b"}],
    }
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.9},
        {"image_id": 2, "category_id": 1, "bbox": [51, 50, 20, 40], "score": 0.8},
        {"image_id": 2, "category_id": 2, "bbox": [5, 6, 40, 20], "score": 0.4},
        {"image_id": 3, "category_id": 2, "bbox": [0, 60, 20, 20], "score": 0.7},  # a false positive
    ]
    return gt, dets


def _pycocotools_ap_of(gt: dict, dets: list[dict], cat: int) -> tuple[float, float]:
    """COCOeval's own numbers for one category (catIds = [cat]): stats[0] AP, stats[1] AP50."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        g = COCO()
        g.dataset = copy.deepcopy(gt)
        g.createIndex()
        e = COCOeval(g, g.loadRes(copy.deepcopy(dets)), "bbox")
        e.params.catIds = [cat]
        e.evaluate()
        e.accumulate()
        e.summarize()
    return float(e.stats[0]), float(e.stats[1])


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_per_class_ap_equals_cocoeval_per_category(backend):
    gt, dets = _case()
    stats, ev = coco_evaluate(gt, dets, backend=backend, return_eval=True)
    per = per_class_ap(ev)
    for cat in (1, 2):
        ap, ap50 = _pycocotools_ap_of(gt, dets, cat)
        assert per[cat]["AP"] == pytest.approx(ap, abs=1e-12) and per[cat]["AP50"] == pytest.approx(
            ap50, abs=1e-12
        )
    assert per[1]["AP50"] == pytest.approx(1.0) and per[2]["AP50"] < 1.0  # the hand-made expectation
    # the overall AP is the mean of the per-class APs (COCO's definition)
    assert stats["AP"] == pytest.approx((per[1]["AP"] + per[2]["AP"]) / 2, abs=1e-12)
    m = per_class_metrics(per, {1: "cat/a", 2: "b"})
    assert set(m) == {"val/AP/cat_a", "val/AP50/cat_a", "val/AP/b", "val/AP50/b"}  # "/" would nest the key


def test_per_class_metric_names_are_mlflow_safe():
    from mlflow.utils.validation import _validate_metric_name

    from ray_retina.engine.evaluate import metric_safe

    for raw in ("traffic light", "person:1", "c++", "über", "a/b"):
        _validate_metric_name(f"val/AP/{metric_safe(raw)}")


# ------------------------------------------------------------------------------------------ eval denominators


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    """5 synthetic val images in shards of 2 rows, the second image's bytes truncated (its header reads).

    prepare refuses a truncated image; shards made elsewhere may hold one, so these are written with the
    header-only check to let it in."""
    from ray_retina.data import shards
    from ray_retina.data.decode import read_header

    root = tmp_path_factory.mktemp("val")
    p = make_synthetic_coco(root / "synth", num_train=0, num_val=5, seed=3)
    f = sorted(p.val_images.glob("*.jpg"))[1]
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shards, "check_image", lambda data, full=False: read_header(data))
        shards.write_shards(p.val_annotations, p.val_images, root / "shards", rows_per_shard=2)
    return root / "shards"


def _cfg():
    return apply_overrides(
        load_config(ROOT / "configs" / "smoke.yaml"),
        {
            "data.test_min_size": 64,
            "data.max_size": 96,
            "data.size_divisibility": 32,
            "data.batch_size": 2,
            "model.backbone": "resnet18",
            "model.fpn_channels": 16,
            "model.head_convs": 1,
            "postprocess.score_thresh": 0.0,
        },
    )


@pytest.mark.parametrize("n", [1, 3, 4, 5, None])
def test_val_max_images_evaluates_exactly_n(val_set, n):
    from ray_retina.data.datasets import eval_plan, iter_eval_batches

    plan = eval_plan(val_set, n)
    assert sum(rows for _, rows in plan) == (5 if n is None else n)
    skipped: list[int] = []
    seen = [int(i) for b in iter_eval_batches(plan, _cfg().data, skipped=skipped) for i in b["image_id"]]
    assert len(seen) + len(skipped) == (5 if n is None else n)
    assert skipped == ([1000002] if n is None or n >= 2 else [])


def test_undecodable_val_image_stays_in_the_ap_denominator(val_set, tmp_path):
    from ray_retina.engine.evaluate import evaluate_checkpoint
    from ray_retina.engine.loop import Engine
    from ray_retina.model import build_criterion, build_model, build_postprocessor

    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg, 3)
    eng = Engine(
        cfg, model, build_criterion(cfg, 3), build_postprocessor(cfg), torch.device("cpu"), [3, 17, 42]
    )
    torch.save(eng.state_dict(), tmp_path / "checkpoint.pt")
    stats = evaluate_checkpoint(tmp_path / "checkpoint.pt", val_set).metrics
    assert stats["num_images"] == 5 and stats["skipped_images"] == 1
    assert set(STAT_NAMES) <= set(stats)


# ------------------------------------------------------------------------------------------ resume


def test_each_rank_gets_its_own_random_state_back():
    from ray_retina.engine.loop import Engine, rng_state, seed_everything
    from ray_retina.model import build_criterion, build_model, build_postprocessor

    cfg = _cfg()
    eng = Engine(
        cfg,
        build_model(cfg, 3),
        build_criterion(cfg, 3),
        build_postprocessor(cfg),
        torch.device("cpu"),
        [1, 2, 3],
    )
    states = []
    for rank in range(3):  # what three ranks would hold at a report
        seed_everything(100 + rank)
        states.append(rng_state())
    saved = eng.state_dict(rng_per_rank=states)
    buf = io.BytesIO()
    torch.save(saved, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)  # still weights_only-loadable
    for rank in range(3):
        seed_everything(100 + rank)
        import random

        expect = (torch.rand(3), np.random.rand(), random.random())
        seed_everything(12345)  # scramble
        eng.load_state_dict(loaded, rank=rank)
        got = (torch.rand(3), np.random.rand(), random.random())
        assert torch.equal(expect[0], got[0]) and expect[1:] == got[1:], rank
    # today's bug: every rank got rank 0's state. Rank 1 must not draw what rank 0 draws.
    eng.load_state_dict(loaded, rank=0)
    r0 = torch.rand(3)
    eng.load_state_dict(loaded, rank=1)
    assert not torch.equal(r0, torch.rand(3))


# ------------------------------------------------------------------------------------------ checkpoints


def test_find_checkpoint_file_dir_and_run_without_metadata(tmp_path):
    from ray_retina.checkpoint import CHECKPOINT_FILE, find_checkpoint

    for it in (6, 12):
        d = tmp_path / "run" / f"checkpoint_{it:07d}"
        d.mkdir(parents=True)
        (d / CHECKPOINT_FILE).write_bytes(b"x")
    f = tmp_path / "run" / "checkpoint_0000006" / CHECKPOINT_FILE
    assert find_checkpoint(f) == str(f)
    assert find_checkpoint(f.parent) == str(f)
    # a run dir copied without Ray's result metadata: its latest, with a warning
    assert find_checkpoint(tmp_path / "run").endswith(f"checkpoint_0000012/{CHECKPOINT_FILE}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        find_checkpoint(tmp_path / "empty")
