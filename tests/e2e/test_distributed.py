"""Multi-node DDP on a simulated 2-node cluster, and distributed evaluation (2 workers == 1 worker)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from _train_utils import tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def two_node_cluster():
    """Head + 1 worker node, 1 CPU each (ray.cluster_utils.Cluster: real raylets on 127.0.0.1)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    # The probe functions below live in this test module: workers import it from its folder, and the
    # helpers it imports (_train_utils) from tests/.
    here = Path(__file__).resolve().parent
    pythonpath = os.pathsep.join([str(here), str(here.parent)])
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    boxes = torch.tensor([[[8.0, 8.0, 40.0, 48.0], [30.0, 20.0, 60.0, 60.0]]]).repeat(2, 1, 1)
    return {
        "images": torch.randint(0, 255, (2, 3, 64, 64), generator=g, dtype=torch.uint8),
        "image_sizes": torch.tensor([[64, 64], [64, 64]]),
        "gt_boxes": boxes + torch.rand(2, 2, 4, generator=g) * 4,
        "gt_labels": torch.tensor([[0, 1], [2, -1]]),
        "gt_crowd": torch.zeros(2, 2, dtype=torch.bool),
        "image_id": torch.tensor([1, 2]),
        "scale": torch.ones(2),
    }


def _ddp_probe(config: dict) -> None:
    """Our Engine under Ray Train DDP: each rank trains on different data; record node and parameters."""
    import ray
    import ray.train
    import ray.train.torch

    from ray_retina.config import config_from_dict
    from ray_retina.engine.loop import Engine, unwrap
    from ray_retina.model import build_criterion, build_model, build_postprocessor

    cfg = config_from_dict(config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's weights
    model = ray.train.torch.prepare_model(build_model(cfg, 3), move_to_device=torch.device("cpu"))
    engine = Engine(
        cfg, model, build_criterion(cfg, 3), build_postprocessor(cfg), torch.device("cpu"), [3, 17, 42]
    )

    def trainable() -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in unwrap(engine.model).parameters() if p.requires_grad])

    before = trainable().clone()  # after DDP's broadcast of rank 0's weights
    for i in range(3):
        assert engine.train_step(_batch(100 * rank + i)) is not None
    out = Path(config["out"])
    torch.save({"before": before, "after": trainable()}, out / f"params_{rank}.pt")
    (out / f"node_{rank}.json").write_text(json.dumps({"node_id": ray.get_runtime_context().get_node_id()}))
    ray.train.report({"done": 1.0})


def _eval_probe(config: dict) -> None:
    import ray.train

    from ray_retina.config import config_from_dict
    from ray_retina.data.shards import coco_gt_from_shards
    from ray_retina.engine.evaluate import evaluate_distributed
    from ray_retina.engine.loop import Engine
    from ray_retina.model import build_criterion, build_model, build_postprocessor

    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model = build_model(cfg, 3)
    model.load_state_dict(torch.load(config["weights"], weights_only=True))
    engine = Engine(
        cfg, model, build_criterion(cfg, 3), build_postprocessor(cfg), torch.device("cpu"), config["cat_ids"]
    )
    gt = coco_gt_from_shards(cfg.data.val_shards) if rank == 0 else None
    result = evaluate_distributed(engine, cfg, config["val_plan"], gt, rank, world)
    stats = {**result.metrics, "thresholds": result.thresholds}
    (Path(config["out"]) / f"stats_{world}_{rank}.json").write_text(json.dumps(stats))
    ray.train.report({})


def _run(fn, loop_config: dict, workers: int, storage: Path, name: str):
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        fn,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, resources_per_worker={"CPU": 1}, placement_strategy="SPREAD"
        ),
        run_config=ray.train.RunConfig(name=name, storage_path=str(storage)),
    )
    result = trainer.fit()
    assert result.error is None
    return result


def test_ddp_across_two_nodes_keeps_ranks_identical(two_node_cluster, tmp_path):
    cfg = tiny_config(tmp_path, f"sqlite:///{tmp_path / 'm.db'}")
    _run(_ddp_probe, {"cfg": cfg.model_dump(mode="json"), "out": str(tmp_path)}, 2, tmp_path / "runs", "ddp")
    nodes = {json.loads((tmp_path / f"node_{r}.json").read_text())["node_id"] for r in (0, 1)}
    assert len(nodes) == 2, "SPREAD must place the two workers on different nodes"
    p0, p1 = torch.load(tmp_path / "params_0.pt"), torch.load(tmp_path / "params_1.pt")
    assert torch.equal(p0["before"], p1["before"])  # DDP started both ranks from rank 0's weights
    # The steps moved the weights (each rank saw different data, so equal results need the all-reduce) ...
    moved = (p0["after"] - p0["before"]).abs()
    assert moved.max() > 1e-4 and (moved > 0).float().mean() > 0.5, (moved.max(), (moved > 0).float().mean())
    # ... and both ranks moved them identically.
    assert torch.equal(p0["after"], p1["after"])


def test_distributed_eval_equals_single_worker(two_node_cluster, tmp_path):
    from ray_retina.data.datasets import eval_plan
    from ray_retina.data.shards import read_manifest
    from ray_retina.engine.session import ensure_data, resolve_paths
    from ray_retina.model import build_model

    cfg = resolve_paths(
        tiny_config(
            tmp_path,
            f"sqlite:///{tmp_path / 'm.db'}",
            **{"postprocess.score_thresh": 0.0, "data.rows_per_shard": 3},
        )
    )
    ensure_data(cfg)
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    torch.save(build_model(cfg, 3).state_dict(), weights)
    cat_ids = sorted(c["id"] for c in read_manifest(cfg.data.val_shards)["categories"])
    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "weights": str(weights),
        "cat_ids": cat_ids,
        "val_plan": eval_plan(cfg.data.val_shards),
        "out": str(tmp_path),
    }
    assert len(loop_config["val_plan"]) >= 2  # both ranks get shards
    _run(_eval_probe, loop_config, 1, tmp_path / "runs", "eval1")
    _run(_eval_probe, loop_config, 2, tmp_path / "runs", "eval2")
    one = json.loads((tmp_path / "stats_1_0.json").read_text())
    two = json.loads((tmp_path / "stats_2_0.json").read_text())
    assert json.loads((tmp_path / "stats_2_1.json").read_text()) == two  # every rank gets rank 0's stats
    assert one["val/num_images"] == two["val/num_images"] == 8
    assert one["val/num_detections"] == two["val/num_detections"] > 0
    for k in ("val/AP", "val/AP50", "val/AP75", "val/AR100", "thresholds"):
        assert one[k] == two[k], k
