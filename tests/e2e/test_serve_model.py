"""The exported model served for real. A real `mlflow server` (SQLite store, Model Registry), two
tiny checkpoints (untrained, from configs/smoke.yaml with the tiny overrides), `ray-retina export --run
<MLflow run id> --register --alias champion`, a second export that takes the alias over, then `mlflow models
serve -m models:/NAME@champion --env-manager local` answering POSTs to /invocations.

The served detections are compared with ray-retina's own detection path in this process, run as
`ray-retina predict` runs it (predict.preprocess_batch, then serving.detect_images, one image per
batch) and written in predict's records format (evaluate.coco_records): the same boxes and category ids,
scores within 1e-4. (`ray-retina predict` itself needs a Ray cluster; its Ray Data steps are these functions.)
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from _train_utils import tiny_config

pytestmark = [pytest.mark.slow]

NAME = "retina-tiny"
SCORE_ATOL = 1e-4  # the served process may sum convolutions with another thread count
BOX_ATOL = 1e-3  # pixels
SERVER_START_S = 120
SERVE_START_S = 300  # imports torch, Ray Data and the model on two shared cores


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            _stop(proc)
            raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(1)


def _start(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "w") as f:  # the child keeps its own descriptor
        return subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """The process and everything it started (its own session): TERM, then KILL after 20 s."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _env(**extra: str) -> dict[str, str]:
    # uvicorn (the scoring server) is started by name: the venv's bin first on PATH.
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return {**os.environ, "PATH": path, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **extra}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, free_port):
    d = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    proc = _start(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{d / 'mlflow.db'}",
            "--default-artifact-root",
            str(d / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        d / "server.log",
        _env(),
    )
    url = f"http://127.0.0.1:{port}"
    _wait_http(f"{url}/health", proc, d / "server.log", SERVER_START_S)
    yield url
    _stop(proc)


@pytest.fixture(scope="module")
def checkpoints(synth_val, mlflow_server, tmp_path_factory):
    """Two untrained tiny models (seeds 0 and 1; prior 0.5 so that they detect) saved as Ray Train saves
    them: runs/<a|b>/checkpoint_0000012/checkpoint.pt. Returns (config, {name: run dir})."""
    from ray_retina.data.shards import read_manifest
    from ray_retina.engine.loop import Engine
    from ray_retina.model import build_criterion, build_model, build_postprocessor

    _, shards = synth_val
    tmp = tmp_path_factory.mktemp("serve")
    cfg = tiny_config(
        tmp,
        mlflow_server,
        name="it_serve",
        **{
            "data.val_shards": str(shards),
            "data.train_shards": str(shards),
            "data.test_min_size": 64,
            "model.prior": 0.5,
            "loss.gamma": 1.5,
            "loss.alpha": 0.5,
        },
    )
    cat_ids = sorted(int(c["id"]) for c in read_manifest(shards)["categories"])
    runs = {}
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        model = build_model(cfg, len(cat_ids))
        engine = Engine(
            cfg,
            model,
            build_criterion(cfg, len(cat_ids)),
            build_postprocessor(cfg),
            torch.device("cpu"),
            cat_ids,
        )
        engine.iteration = 12
        ckpt = tmp / "runs" / name / "checkpoint_0000012"
        ckpt.mkdir(parents=True)
        torch.save(engine.state_dict(), ckpt / "checkpoint.pt")
        runs[name] = tmp / "runs" / name
    return cfg, runs


@pytest.fixture(scope="module")
def images(synth_val) -> list[bytes]:
    """Three encoded images: two of the synthetic JPEGs, one re-encoded as PNG, and one JPEG stored
    sideways with EXIF orientation 6 (decode must turn it upright, in the server as here)."""
    from PIL import Image

    paths, _ = synth_val
    files = sorted(paths.val_images.glob("*.jpg"))
    out = [files[0].read_bytes()]
    png = io.BytesIO()
    Image.open(files[1]).save(png, format="PNG")
    out.append(png.getvalue())
    sideways = io.BytesIO()
    im = Image.open(files[2]).transpose(Image.Transpose.ROTATE_90)  # stored rotated; orientation 6 undoes it
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(sideways, format="JPEG", quality=95, exif=exif.tobytes())
    out.append(sideways.getvalue())
    return out


def _reference(state: dict, images: list[bytes], score_thresh: float, per_image: int) -> list[list[dict]]:
    """predict's records of each image, as predict.Predictor makes them for a batch of one (preprocess_batch,
    then detect_images with predict's score filter)."""
    from ray_retina.data.augment import object_array
    from ray_retina.engine.evaluate import AMP_DTYPES, coco_records
    from ray_retina.engine.restore import model_from_state
    from ray_retina.model import build_postprocessor
    from ray_retina.predict import preprocess_batch
    from ray_retina.serving import detect_images

    model, cfg, cat_ids = model_from_state(state, "cpu")
    out = []
    for i, data in enumerate(images):
        pre = preprocess_batch(
            {"path": np.asarray(["x"]), "bytes": object_array([data])},
            min_size=cfg.data.test_min_size,
            max_size=cfg.data.max_size,
            files={"x": (i, "x", "x.png")},
        )
        d = detect_images(
            model,
            build_postprocessor(cfg),
            cfg,
            pre,
            device=torch.device("cpu"),
            amp_dtype=AMP_DTYPES[cfg.optim.amp],
            cat_ids=np.asarray(cat_ids),
            score_thresh=score_thresh,
        )[0]
        out.append(coco_records(i, d["boxes"], d["scores"], d["category_ids"])[:per_image])
    return out


def _served_records(rows: list[dict], n: int) -> list[list[dict]]:
    from ray_retina.engine.evaluate import coco_records

    out = []
    for i in range(n):
        mine = [r for r in rows if r["image_index"] == i]
        boxes = np.array([[r["x1"], r["y1"], r["x2"], r["y2"]] for r in mine], dtype=np.float64).reshape(
            -1, 4
        )
        out.append(
            coco_records(
                i, boxes, np.array([r["score"] for r in mine]), np.array([r["category_id"] for r in mine])
            )
        )
    return out


def _assert_same(served: list[list[dict]], ref: list[list[dict]]) -> None:
    assert [len(s) for s in served] == [len(r) for r in ref]
    for s_img, r_img in zip(served, ref, strict=True):
        assert [d["category_id"] for d in s_img] == [d["category_id"] for d in r_img]
        np.testing.assert_allclose(
            [d["bbox"] for d in s_img], [d["bbox"] for d in r_img], atol=BOX_ATOL, rtol=0
        )
        np.testing.assert_allclose(
            [d["score"] for d in s_img], [d["score"] for d in r_img], atol=SCORE_ATOL, rtol=0
        )
    pairs = [
        (s, r) for s_img, r_img in zip(served, ref, strict=True) for s, r in zip(s_img, r_img, strict=True)
    ]
    if pairs:  # shown with -s: what the tolerances leave room for
        print(
            f"served vs detect(): {len(pairs)} detections, max |score diff| "
            f"{max(abs(s['score'] - r['score']) for s, r in pairs):.1e}, max |bbox diff| "
            f"{max(np.abs(np.subtract(s['bbox'], r['bbox'])).max() for s, r in pairs):.1e} px"
        )


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{url}/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def test_export_register_serve(mlflow_server, checkpoints, images, free_port, tmp_path):
    from mlflow.tracking import MlflowClient

    from ray_retina import tracking
    from ray_retina.checkpoint import load_checkpoint_state
    from ray_retina.export import export

    cfg, runs = checkpoints
    # A training run as engine/trainer.py leaves it: its MLflow run tagged with the Ray Train run dir.
    run_id = tracking.create_run(cfg, run_name="train-a", uri=mlflow_server)
    tracking.RunLogger(mlflow_server, run_id).set_tags(tracking.checkpoint_tags(str(runs["a"].parent), "a"))

    # 1. The CLI, by MLflow run id: version 1, @champion.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_retina.cli",
            "export",
            "--run",
            run_id,
            "--register",
            NAME,
            "--alias",
            "champion",
            "--tracking-uri",
            mlflow_server,
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"registered: {NAME} version 1, alias @champion" in done.stdout
    assert str(runs["a"] / "checkpoint_0000012" / "checkpoint.pt") in done.stdout

    # 2. In this process, by checkpoint path: version 2 takes @champion over.
    second = export(str(runs["b"]), register=NAME, alias="champion", tracking_uri=mlflow_server)
    assert second.registered_version == "2"

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == "2"
    v1 = client.get_model_version(NAME, "1")
    assert v1.run_id == run_id and v1.tags["ray_retina.run_id"] == run_id
    for v in (v1, champion):
        assert {k: v.tags[k] for k in ("gamma", "alpha", "prior", "lr")} == {
            "gamma": "1.5",
            "alpha": "0.5",
            "prior": "0.5",
            "lr": "0.002",
        }
    assert champion.tags["ray_retina.checkpoint"] == str(runs["b"] / "checkpoint_0000012" / "checkpoint.pt")

    # 3. Serve @champion (checkpoint b) and ask it.
    port = free_port()
    log = tmp_path / "serve.log"
    proc = _start(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            f"models:/{NAME}@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        log,
        _env(MLFLOW_TRACKING_URI=mlflow_server),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/ping", proc, log, SERVE_START_S)
        data = [[base64.b64encode(b).decode()] for b in images]
        rows = _post(url, {"dataframe_split": {"columns": ["image"], "data": data}})["predictions"]
        # params: a threshold that keeps about the best tenth, at most 5 per image
        thresh = round(float(np.quantile([r["score"] for r in rows], 0.9)), 4)
        few = _post(
            url,
            {
                "dataframe_split": {"columns": ["image"], "data": data},
                "params": {"score_thresh": thresh, "detections_per_img": 5},
            },
        )["predictions"]
        bad = urllib.request.Request(
            f"{url}/invocations",
            headers={"Content-Type": "application/json"},
            data=json.dumps(
                {"dataframe_split": {"columns": ["image"], "data": [["bm90IGFuIGltYWdl"]]}}
            ).encode(),
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=60)
        assert err.value.code == 400 and "image 0 is not an image" in err.value.read().decode()
    finally:
        _stop(proc)

    state_b = load_checkpoint_state(runs["b"])
    n = len(images)
    assert {r["image_index"] for r in rows} == set(range(n))
    assert {r["category_name"] for r in rows} <= {"rectangle", "ellipse", "triangle"}
    _assert_same(_served_records(rows, n), _reference(state_b, images, 0.0, 100))
    _assert_same(_served_records(few, n), _reference(state_b, images, thresh, 5))
    assert 0 < len(few) <= 5 * n and all(r["score"] > thresh for r in few)
    # The alias moved: checkpoint a's detections are not what is served.
    ref_a = _reference(load_checkpoint_state(runs["a"]), images, 0.0, 100)
    assert [d["score"] for d in ref_a[0][:5]] != [d["score"] for d in _served_records(rows, n)[0][:5]]


def test_registry_in_mlflow_ui(mlflow_server, open_mlflow_page, shot_dir):
    """The model's Model Registry page in headless chromium, as test_export_register_serve (run before it in
    this module, on the same server) left it: versions 1 and 2, @champion on version 2. The screenshot is
    docs/model_registry.png under `make docs`."""
    from mlflow.tracking import MlflowClient

    if not MlflowClient(mlflow_server, registry_uri=mlflow_server).search_registered_models(
        f"name = '{NAME}'"
    ):
        pytest.fail(f"no registered model {NAME}: run with test_export_register_serve, which registers it")
    page = open_mlflow_page(f"{mlflow_server}/#/models/{NAME}", "Version 2")
    page.get_by_text("champion").first.wait_for(timeout=30_000)
    page.wait_for_timeout(1000)
    body = page.inner_text("body")
    assert NAME in body and "Version 1" in body and "Version 2" in body
    # @champion sits in version 2's row of the versions table, not in version 1's.
    rows = page.get_by_role("row")
    assert "champion" in rows.filter(has_text="Version 2").first.inner_text()
    assert "champion" not in rows.filter(has_text="Version 1").first.inner_text()
    shot = shot_dir / "model_registry.png"
    page.screenshot(path=str(shot), full_page=False)
    assert shot.stat().st_size > 10_000
