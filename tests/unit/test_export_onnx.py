"""The exported network (ONNX, TorchScript) against PyTorch at two image sizes, and the MLflow
pyfunc model in this process: its detections are the detect() path's, in predict's records format too.

The untrained tiny checkpoint of tests/conftest.py (`untrained_checkpoint`, prior 0.5) detects plenty.
Tolerances: ONNX Runtime's convolutions sum in another order than PyTorch's, measured max abs difference
~4e-7 on logits and deltas of this model; asserted below 1e-4. Anchors are exact (the same float32 sums).
"""

from __future__ import annotations

import base64
import importlib.metadata
import json

import numpy as np
import pandas as pd
import pytest
import torch

from _model_utils import reference_records

ONNX_ATOL = 1e-4


@pytest.fixture(scope="module")
def state(untrained_checkpoint):
    from ray_retina.checkpoint import load_checkpoint_state

    run, _, _ = untrained_checkpoint
    return load_checkpoint_state(run / "checkpoint_0000010")


@pytest.fixture(scope="module")
def model(state):
    from ray_retina.engine.restore import model_from_state

    return model_from_state(state, "cpu")[0]


def _inputs(batch: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255


# Two sizes (and batch sizes) unlike the trace's (2 x 64 x 96): the graph's axes are dynamic.
SIZES = [(1, 96, 64), (3, 128, 160)]


@pytest.mark.parametrize("batch,h,w", SIZES)
def test_exportable_module_is_the_forward(model, batch, h, w):
    from ray_retina.onnx_export import ExportableRetinaNet

    x = _inputs(batch, h, w)
    with torch.no_grad():
        ref = model(x)
        cls, deltas, anchors = ExportableRetinaNet(model)(x)
    assert torch.equal(cls, ref.cls_logits) and torch.equal(deltas, ref.box_deltas)
    assert torch.equal(anchors, ref.anchors)


@pytest.fixture(scope="module")
def onnx_files(state, tmp_path_factory):
    pytest.importorskip("onnx")
    from ray_retina.onnx_export import export_onnx

    return export_onnx(state, tmp_path_factory.mktemp("onnx"))


@pytest.mark.parametrize("batch,h,w", SIZES)
def test_onnx_matches_pytorch(onnx_files, model, batch, h, w):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(onnx_files[0]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    x = _inputs(batch, h, w, seed=1)
    cls, deltas, anchors = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        ref = model(x)
    assert cls.shape == tuple(ref.cls_logits.shape) and deltas.shape == tuple(ref.box_deltas.shape)
    assert np.abs(cls - ref.cls_logits.numpy()).max() < ONNX_ATOL
    assert np.abs(deltas - ref.box_deltas.numpy()).max() < ONNX_ATOL
    np.testing.assert_array_equal(anchors, ref.anchors.numpy())


def _padded(seed: int, h: int, w: int, pad_h: int, pad_w: int) -> torch.Tensor:
    x = torch.zeros(1, 3, pad_h, pad_w)
    x[..., :h, :w] = _inputs(1, h, w, seed)
    return x


# (resized h, w inside the padding, padded H, W, original height, width): two sizes, the image padded.
END_TO_END_CASES = [(60, 90, 64, 96, 120, 181), (128, 75, 128, 96, 403, 236)]


@pytest.mark.parametrize("h,w,pad_h,pad_w,height,width", END_TO_END_CASES)
def test_end_to_end_onnx_is_detect(onnx_files, model, state, h, w, pad_h, pad_w, height, width):
    """The graph with the post-process inside gives detect()'s detections: same count, labels and order;
    boxes (original pixels) within 1e-3 px, scores within 1e-5 (measured ~5e-5 px and ~1e-7)."""
    ort = pytest.importorskip("onnxruntime")
    from ray_retina.config import config_from_dict
    from ray_retina.engine.evaluate import detect
    from ray_retina.model import build_postprocessor

    session = ort.InferenceSession(str(onnx_files[2]), providers=["CPUExecutionProvider"])
    x = _padded(3, h, w, pad_h, pad_w)
    size, orig = torch.tensor([h, w]), torch.tensor([height, width])
    ref = detect(
        model,
        build_postprocessor(config_from_dict(state["config"])),
        {"images": x, "image_sizes": size[None], "orig_sizes": orig[None]},
        device=torch.device("cpu"),
    )[0]
    boxes, scores, labels, cats = session.run(
        None, {"images": x.numpy(), "image_size": size.numpy(), "orig_size": orig.numpy()}
    )
    assert len(scores) == len(ref["scores"]) > 0
    np.testing.assert_array_equal(labels, ref["labels"].numpy())
    np.testing.assert_array_equal(cats, np.asarray(state["cat_ids"])[labels])
    np.testing.assert_allclose(boxes, ref["boxes"].numpy(), atol=1e-3, rtol=0)
    np.testing.assert_allclose(scores, ref["scores"].numpy(), atol=1e-5, rtol=0)


def test_end_to_end_onnx_applies_the_f1_thresholds(state, model, tmp_path):
    """A checkpoint with per-class thresholds: the end-to-end graph keeps what detect() keeps above each
    class's F1 threshold (the served model's default); the JSON beside it carries the tables."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from ray_retina.config import config_from_dict
    from ray_retina.engine.evaluate import detect
    from ray_retina.model import build_postprocessor
    from ray_retina.onnx_export import export_onnx

    cat_ids = [int(c) for c in state["cat_ids"]]
    f1 = {str(c): t for c, t in zip(cat_ids, (0.5, 0.52, 0.9), strict=True)}
    files = export_onnx({**state, "thresholds": {"f1": f1, "precision_target": 0.9}}, tmp_path)
    meta = json.loads(files[1].read_text())["thresholds"]
    assert meta["default"] == "f1" and meta["tables"] == {"f1": f1}
    h, w, pad_h, pad_w, height, width = END_TO_END_CASES[0]
    x = _padded(3, h, w, pad_h, pad_w)
    size, orig = torch.tensor([h, w]), torch.tensor([height, width])
    ref = detect(
        model,
        build_postprocessor(config_from_dict(state["config"])),
        {"images": x, "image_sizes": size[None], "orig_sizes": orig[None]},
        device=torch.device("cpu"),
    )[0]
    keep = ref["scores"] > torch.tensor([0.5, 0.52, 0.9])[ref["labels"]]
    session = ort.InferenceSession(str(files[2]), providers=["CPUExecutionProvider"])
    boxes, scores, labels, _ = session.run(
        None, {"images": x.numpy(), "image_size": size.numpy(), "orig_size": orig.numpy()}
    )
    assert 0 < len(scores) == int(keep.sum()) < len(ref["scores"])
    np.testing.assert_array_equal(labels, ref["labels"][keep].numpy())
    np.testing.assert_allclose(scores, ref["scores"][keep].numpy(), atol=1e-5, rtol=0)


def test_onnx_json_rebuilds_the_anchors_and_names_the_labels(onnx_files, model, state, untrained_checkpoint):
    """The JSON beside the graph is enough to make its anchors and read its labels."""
    from ray_retina.model import AnchorGenerator

    meta = json.loads(onnx_files[1].read_text())
    a = meta["anchors"]
    gen = AnchorGenerator(
        sizes=a["sizes"],
        scales_per_octave=a["scales_per_octave"],
        aspect_ratios=a["aspect_ratios"],
        strides=a["strides"],
        torchvision_compat=a["torchvision_compat"],
    )
    feats = [torch.zeros(1, 1, -(-128 // s), -(-160 // s)) for s in a["strides"]]
    with torch.no_grad():
        ref = model(_inputs(1, 128, 160))
    assert torch.equal(gen(feats)[0], ref.anchors)
    _, _, cat_ids = untrained_checkpoint
    assert [c["id"] for c in meta["categories"]] == cat_ids
    assert [c["label"] for c in meta["categories"]] == list(range(len(cat_ids)))
    assert meta["postprocess"]["score_thresh"] == state["config"]["postprocess"]["score_thresh"]
    assert meta["preprocess"]["size_divisibility"] == state["config"]["data"]["size_divisibility"]


def test_torchscript_matches_pytorch(state, model, tmp_path):
    from ray_retina.onnx_export import export_torchscript

    path, _ = export_torchscript(state, tmp_path)
    with pytest.warns(FutureWarning):  # torch.jit is deprecated in torch 2.14; it still loads in LibTorch
        traced = torch.jit.load(str(path))
    for batch, h, w in SIZES:
        x = _inputs(batch, h, w, seed=2)
        with torch.no_grad():
            ref, out = model(x), traced(x)
        for a, b in zip(out, (ref.cls_logits, ref.box_deltas, ref.anchors), strict=True):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------- the pyfunc model


def _as_records(frame: pd.DataFrame, n: int) -> list[list[dict]]:
    from ray_retina.engine.evaluate import coco_records

    return [
        coco_records(
            i, g[["x1", "y1", "x2", "y2"]].to_numpy(), g["score"].to_numpy(), g["category_id"].to_numpy()
        )
        for i, g in ((i, frame[frame["image_index"] == i]) for i in range(n))
    ]


@pytest.fixture(scope="module")
def pyfunc(untrained_pyfunc_dir):
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(str(untrained_pyfunc_dir))


def test_pyfunc_detections_are_predicts(pyfunc, state, val_jpegs):
    from ray_retina.serving import OUTPUT_COLUMNS

    thresh = 0.52  # the untrained model scores ~0.5: keeps some, drops most
    frame = pyfunc.predict(pd.DataFrame({"image": val_jpegs}), params={"score_thresh": thresh})
    assert list(frame.columns) == list(OUTPUT_COLUMNS)
    assert 0 < len(frame) < 100 * len(val_jpegs)
    ref = reference_records(state, val_jpegs, thresh)
    got = _as_records(frame, len(val_jpegs))
    assert got == ref  # the same boxes (1e-3 px), scores (1e-5) and category ids, in the same order
    names = dict(
        zip(state["cat_ids"], ("rectangle", "ellipse", "triangle"), strict=True)
    )  # the synthetic set's
    assert frame["category_name"].tolist() == [names[c] for c in frame["category_id"]]
    np.testing.assert_allclose(frame["bbox_w"], frame["x2"] - frame["x1"])
    np.testing.assert_allclose(frame["bbox_h"], frame["y2"] - frame["y1"])


def test_pyfunc_params_and_inputs(pyfunc, val_jpegs):
    from mlflow.exceptions import MlflowException

    df = pd.DataFrame({"image": val_jpegs[:2]})
    full = pyfunc.predict(df)  # the checkpoint's defaults: score > 0.05, 100 per image
    assert full.groupby("image_index").size().tolist() == [100, 100]
    top3 = pyfunc.predict(df, params={"detections_per_img": 3})
    pd.testing.assert_frame_equal(top3, full.groupby("image_index").head(3).reset_index(drop=True))
    # base64 strings, as JSON carries binary columns, give the same answer
    b64 = pd.DataFrame({"image": [base64.b64encode(b).decode() for b in val_jpegs[:2]]})
    pd.testing.assert_frame_equal(pyfunc.predict(b64, params={"detections_per_img": 3}), top3)
    # nothing above the threshold: no rows, the same columns
    none = pyfunc.predict(df, params={"score_thresh": 1.0})
    assert len(none) == 0 and list(none.columns) == list(full.columns)
    with pytest.raises(MlflowException, match="image 1 is not an image"):
        pyfunc.predict(pd.DataFrame({"image": [val_jpegs[0], b"not an image"]}))
    with pytest.raises(MlflowException, match="score_thresh"):
        pyfunc.predict(df, params={"score_thresh": 1.5})


def test_pyfunc_signature_and_requirements(pyfunc, untrained_pyfunc_dir):
    sig = pyfunc.metadata.signature
    assert sig.inputs.to_dict() == [{"type": "binary", "name": "image", "required": True}]
    params = {p.name: p.default for p in sig.params.params}
    assert params == {"score_thresh": 0.05, "detections_per_img": 100, "thresholds": "eval", "batch_size": 1}
    from packaging.requirements import Requirement

    from ray_retina.export import pip_requirements

    reqs = {Requirement(r).name: Requirement(r) for r in pip_requirements()}
    assert (
        "ray-retina" not in reqs
    )  # not on PyPI: the model carries the package (tests/e2e/test_model_package.py)
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in reqs.values())
    assert all("+" not in str(r.specifier) for r in reqs.values())  # no local labels such as +cu130
    declared = [Requirement(r) for r in importlib.metadata.requires("ray-retina")]
    runtime = {r.name: r for r in declared if r.marker is None}
    assert set(runtime) | {"pandas"} <= set(reqs)  # every runtime dependency of pyproject, pinned
    assert reqs["ray"].extras == runtime["ray"].extras
    for name, req in reqs.items():
        assert str(req.specifier) == f"=={importlib.metadata.version(name).split('+')[0]}", name
    saved = (untrained_pyfunc_dir / "requirements.txt").read_text().split()
    assert "ray-retina" not in " ".join(saved) and any(r.startswith("torch==") for r in saved)


def test_an_image_is_detected_as_alone_at_any_batch_size(state, val_jpegs):
    """An image's detections do not depend on the rest of the request nor on batch_size: images are batched
    only with images of the same padded shape."""
    from ray_retina.serving import Detector

    det = Detector(state, "cpu")
    alone = det.frame(val_jpegs[1:2], {"detections_per_img": 5})
    for batch_size in (1, 3):
        with_other = det.frame(val_jpegs, {"detections_per_img": 5, "batch_size": batch_size})
        second = with_other[with_other["image_index"] == 1].drop(columns="image_index").reset_index(drop=True)
        pd.testing.assert_frame_equal(second, alone.drop(columns="image_index"), rtol=1e-5)


# ----------------------------------------------------------------------------------------- export + registry


def test_export_logs_registers_and_tags(untrained_checkpoint, state, tmp_path, monkeypatch):
    """A checkpoint path with no MLflow run: a run `export-<run dir>` gets the model. Once the training run
    of that run dir is in MLflow, the export goes to it. Each export is a new registered version tagged with
    the focal parameters; the alias follows the newest."""
    from mlflow.tracking import MlflowClient

    from ray_retina import tracking
    from ray_retina.config import config_from_dict
    from ray_retina.export import export

    monkeypatch.chdir(tmp_path)  # the SQLite store's artifacts go to ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run, _, _ = untrained_checkpoint
    first = export(str(run), register="retina", alias="champion", tracking_uri=uri)
    train_run = tracking.create_run(config_from_dict(state["config"]), run_name=run.name, uri=uri)
    tracking.RunLogger(uri, train_run).set_tags(tracking.checkpoint_tags(str(run.parent), run.name))
    second = export(str(run / "checkpoint_0000010"), register="retina", alias="champion", tracking_uri=uri)
    assert second.run_id == second.source.run_id == train_run
    assert (
        first.source.checkpoint
        == second.source.checkpoint
        == str(run / "checkpoint_0000010" / "checkpoint.pt")
    )
    assert (first.registered_version, second.registered_version) == ("1", "2")
    client = MlflowClient(uri, registry_uri=uri)
    v = client.get_model_version_by_alias("retina", "champion")
    assert str(v.version) == "2"
    from ray_retina.config import config_from_dict

    lr = config_from_dict(torch.load(second.source.checkpoint, weights_only=True)["config"]).lr
    assert {k: v.tags[k] for k in ("gamma", "alpha", "prior", "lr")} == {
        "gamma": "1.5",
        "alpha": "0.25",
        "prior": "0.5",
        "lr": str(lr),
    }
    assert (
        v.tags["ray_retina.checkpoint"] == second.source.checkpoint and v.tags["ray_retina.iteration"] == "10"
    )
    assert v.tags["ray_retina.run_id"] == train_run and v.run_id == train_run
    assert client.get_run(first.run_id).data.tags["mlflow.runName"] == f"export-{run.name}"


def test_cli_refuses_options_that_do_not_fit(capsys):
    from ray_retina.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["export", "--run", "x", "--format", "onnx", "--register", "retina", "--out", "y"])
    assert exit_.value.code == 2 and "--register and --alias need --format mlflow" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--run", "x", "--sweep", "y"])
    assert "give one of --run and --sweep" in capsys.readouterr().err


def test_run_and_sweep_ids_resolve_to_checkpoint_dirs(untrained_checkpoint, tmp_path, monkeypatch):
    """A training run's tags, a trial's params + name, a sweep's best-trial tag: each finds its run dir."""
    from mlflow.tracking import MlflowClient

    from ray_retina import tracking
    from ray_retina.export import resolve_source

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir, _, _ = untrained_checkpoint
    client = MlflowClient(uri)
    exp = client.create_experiment("x")
    train = client.create_run(
        exp, tags=tracking.checkpoint_tags(str(run_dir.parent), run_dir.name)
    ).info.run_id
    assert tracking.run_checkpoint_location(uri, train) == str(run_dir)
    parent = client.create_run(exp, tags={tracking.BEST_TRIAL_TAG: "t2"}).info.run_id
    for trial in ("t1", "t2"):
        child = client.create_run(
            exp,
            run_name=run_dir.name if trial == "t2" else "gone",
            tags={tracking.PARENT_TAG: parent, tracking.TRIAL_TAG: trial},
        ).info.run_id
        client.log_param(child, "run.storage_path", str(run_dir.parent))
    best = tracking.best_trial_run(uri, parent)
    assert best.data.tags[tracking.TRIAL_TAG] == "t2"
    assert tracking.run_checkpoint_location(uri, best.info.run_id) == str(run_dir)
    source = resolve_source(sweep=parent, tracking_uri=uri)  # `ray-retina export --sweep <parent>`
    assert source.checkpoint == str(run_dir / "checkpoint_0000010" / "checkpoint.pt")
    assert (source.run_id, source.sweep_run_id, source.trial_id) == (best.info.run_id, parent, "t2")
    assert resolve_source(train, tracking_uri=uri).run_id == train  # `--run <MLflow run id>`
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        tracking.run_checkpoint_location(uri, client.create_run(exp).info.run_id)
    with pytest.raises(ValueError, match="not a finished ray-retina sweep"):
        tracking.best_trial_run(uri, train)
