"""Fixtures of every tier (unit, integration, e2e): a seeded generator, free ports, a real MLflow tracking
store, small synthetic COCO sets and an untrained tiny checkpoint built once per session. Tier-specific
fixtures (the integration tier's shared Ray cluster, the e2e tier's own clusters) live in the tier's
conftest.py."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import _ray_utils

# Two cores here: keep each test process from oversubscribing them.
torch.set_num_threads(2)
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

ROOT = Path(__file__).resolve().parent.parent
# What a run writes relative to its working directory (.gitignore): no test may leave any of it in the
# repository, nor an image in docs/ (`make docs` sets DOCS_ENV to refresh the screenshots there on purpose).
REPO_OUTPUTS = ("data", "runs", "mlflow.db", "mlruns", "mlartifacts", "bench_out")
DOCS_ENV = "RAY_RETINA_DOCS_DIR"


def _repo_snapshot() -> dict[str, int | None]:
    """Top-level names of the repository, the mtimes of the run outputs there and of the images in docs/."""
    snap: dict[str, int | None] = {p.name: None for p in ROOT.iterdir() if p.name != ".pytest_cache"}
    for name in REPO_OUTPUTS:
        p = ROOT / name
        if p.exists():
            snap[name] = p.stat().st_mtime_ns
    if not os.environ.get(DOCS_ENV):
        snap.update({f"docs/{p.name}": p.stat().st_mtime_ns for p in ROOT.glob("docs/*.png")})
    return snap


@pytest.fixture(scope="session", autouse=True)
def _nothing_written_into_the_repository():
    """Tests write under tmp_path only; a cwd-relative default (mlflow.db, runs/, data/) shows up here."""
    before = _repo_snapshot()
    yield
    after = _repo_snapshot()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k, -1) != after.get(k, -1))
    assert not changed, (
        f"written into the repository {ROOT} during the tests: {changed} (by a test, or by another process"
        " working in this checkout meanwhile, such as `make demo`)"
    )


@pytest.fixture
def gen() -> torch.Generator:
    g = torch.Generator().manual_seed(0)
    return g


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """A function that returns a free TCP port on 127.0.0.1 (call it once per port needed)."""
    return _ray_utils.free_port


@pytest.fixture
def mlflow_uri(tmp_path) -> str:
    """A real MLflow tracking store (SQLite file) for the test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


# ------------------------------------------------------------------------------------ synthetic data sets


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory) -> Path:
    """36 train + 10 val synthetic images (seed 5) as shards: <root>/train (6 rows per shard), <root>/val (4)."""
    from ray_retina.data.shards import write_shards
    from ray_retina.data.synthetic import make_synthetic_coco

    root = tmp_path_factory.mktemp("data")
    p = make_synthetic_coco(root / "synth", num_train=36, num_val=10, seed=5)
    write_shards(p.train_annotations, p.train_images, root / "train", rows_per_shard=6)
    write_shards(p.val_annotations, p.val_images, root / "val", rows_per_shard=4)
    return root


@pytest.fixture(scope="session")
def synth_val(tmp_path_factory):
    """6 small val images (64..112 px, seed 0): their SyntheticPaths and their shard folder (4 rows per shard)."""
    from ray_retina.data.shards import write_shards
    from ray_retina.data.synthetic import make_synthetic_coco

    root = tmp_path_factory.mktemp("synth_val")
    paths = make_synthetic_coco(
        root,
        0,
        6,
        seed=0,
        min_image_size=64,
        max_image_size=112,
        min_object_size=10,
        max_object_size=40,
        max_objects=3,
    )
    shards = root / "shards" / "val"
    write_shards(paths.val_annotations, paths.val_images, shards, rows_per_shard=4)
    return paths, shards


@pytest.fixture(scope="session")
def untrained_checkpoint(synth_val, tmp_path_factory):
    """An untrained tiny model saved as the Ray Train worker saves it: <run>/checkpoint_<it>/checkpoint.pt;
    returns (run folder, model, category ids). prior 0.5 makes every class score about 0.5, so that the model
    detects something."""
    from ray_retina.config import Config, apply_overrides
    from ray_retina.data.shards import read_manifest
    from ray_retina.engine.loop import Engine
    from ray_retina.model import build_criterion, build_model, build_postprocessor

    _, shards = synth_val
    cfg = apply_overrides(
        Config(),
        {
            "model.backbone": "resnet18",
            "model.fpn_channels": 32,
            "model.head_convs": 1,
            "model.prior": 0.5,
            "model.anchor_sizes": [16, 32, 64, 128, 256],
            "model.frozen_bn": False,
            "model.freeze_at": 0,
            "data.test_min_size": 64,
            "data.max_size": 128,
            "data.size_divisibility": 32,
            "data.batch_size": 4,
            "data.val_shards": str(shards),
            "data.train_shards": str(shards),
            "loss.gamma": 1.5,
        },
    )
    cat_ids = sorted(int(c["id"]) for c in read_manifest(shards)["categories"])
    torch.manual_seed(0)
    model = build_model(cfg, len(cat_ids))
    engine = Engine(
        cfg, model, build_criterion(cfg, len(cat_ids)), build_postprocessor(cfg), torch.device("cpu"), cat_ids
    )
    engine.iteration = 10
    run = tmp_path_factory.mktemp("run")
    (run / "checkpoint_0000010").mkdir()
    torch.save(engine.state_dict(), run / "checkpoint_0000010" / "checkpoint.pt")
    return run, model, cat_ids


@pytest.fixture(scope="session")
def val_jpegs(synth_val) -> list[bytes]:
    """The first three synthetic validation JPEGs, encoded bytes."""
    paths, _ = synth_val
    return [p.read_bytes() for p in sorted(paths.val_images.glob("*.jpg"))][:3]


@pytest.fixture(scope="session")
def untrained_pyfunc_dir(untrained_checkpoint, tmp_path_factory) -> Path:
    """The MLflow model directory (``export.save_pyfunc``) of ``untrained_checkpoint``."""
    from ray_retina.checkpoint import load_checkpoint_state
    from ray_retina.export import save_pyfunc

    run, _, _ = untrained_checkpoint
    return save_pyfunc(
        load_checkpoint_state(run / "checkpoint_0000010"), tmp_path_factory.mktemp("pyfunc") / "model"
    )
