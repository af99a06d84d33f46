"""The exported model served for real. A real `mlflow server` (SQLite store, Model Registry), two
tiny checkpoints (untrained, from configs/smoke.yaml with the tiny overrides), `ray-retina export --run
<MLflow run id> --register --alias champion`, a second export that takes the alias over, then `mlflow models
serve -m models:/NAME@champion --env-manager local` answering POSTs to /invocations.

The served detections are compared with ray-retina's own detection path in this process, run as
`ray-retina predict` runs it (predict.preprocess_batch, then serving.detect_images, one image per
batch) and written in predict's records format (evaluate.coco_records): the same boxes and category ids,
scores within 1e-4. (`ray-retina predict` itself needs a Ray cluster; its Ray Data steps are these functions.)

The served model's limits under a small concurrent load (oversized requests mixed in: each a 400 naming the
limit, no 5xx); then `ray-retina serve models:/NAME@champion` (Ray Serve on a local Ray) answers the same
request with the same detections, a plain image upload too, and batches concurrent requests' images.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from _model_utils import reference_records
from _train_utils import tiny_config

pytestmark = [pytest.mark.slow]

NAME = "retina-tiny"
SCORE_ATOL = 1e-4  # the served process may sum convolutions with another thread count
BOX_ATOL = 1e-3  # pixels
SERVER_START_S = 120
SERVE_START_S = 300  # imports torch, Ray Data and the model on two shared cores
SERVED: dict[str, list[dict]] = {}  # what `mlflow models serve` answered, for the Ray Serve comparison


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


def _assert_rows_close(got: list[dict], ref: list[dict]) -> None:
    """Two answers' rows: the same images, categories and names in the same order; boxes within BOX_ATOL
    px and scores within 1e-5 (a batch of several images may sum convolutions in another order)."""
    for key in ("image_index", "category_id", "category_name"):
        assert [r[key] for r in got] == [r[key] for r in ref], key
    cols = ("x1", "y1", "x2", "y2")
    np.testing.assert_allclose(
        [[r[c] for c in cols] for r in got], [[r[c] for c in cols] for r in ref], atol=BOX_ATOL, rtol=0
    )
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in ref], atol=1e-5, rtol=0)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{url}/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def _status(url: str, body: dict) -> tuple[int, str]:
    """(HTTP status, body text) of a POST to /invocations, errors included."""
    req = urllib.request.Request(
        f"{url}/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _bomb_png(width: int = 11000, height: int = 11000) -> bytes:
    """A ~100-byte PNG whose header claims width x height (the pixel data cut short): costs a server that
    decodes it ~1 GB; a server that checks the header first refuses it at once."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64)[:-4])
        + chunk(b"IEND", b"")
    )


def _frame_body(images: list[bytes], **params) -> dict:
    body: dict = {
        "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode()] for b in images]}
    }
    if params:
        body["params"] = params
    return body


def _load_with_oversized(
    url: str, images: list[bytes], clients: int = 4, per_client: int = 4
) -> list[tuple[str, int, str]]:
    """``clients`` threads x ``per_client`` requests, every fourth one oversized (a 121 MP PNG header, or 17
    images: serve.max_images is 16): [(kind, status, body)]."""
    kinds = ["ok", "ok", "pixels", "ok", "ok", "ok", "images", "ok"]

    def one(i: int) -> tuple[str, int, str]:
        kind = kinds[i % len(kinds)]
        batch = {
            "ok": [images[i % len(images)]],
            "pixels": [images[0], _bomb_png()],
            "images": images[:1] * 17,
        }
        return (kind, *_status(url, _frame_body(batch[kind])))

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(clients * per_client)))


def _assert_bounded(results: list[tuple[str, int, str]]) -> None:
    assert not [r for r in results if r[1] >= 500], "5xx under load"
    for kind, status, text in results:
        if kind == "ok":
            assert status == 200, text[-500:]
        else:  # every oversized request refused, naming the limit it broke
            assert status == 400 and f"serve.max_{kind}" in text, (kind, status, text[-500:])


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
        _assert_bounded(_load_with_oversized(url, images))
    finally:
        _stop(proc)

    state_b = load_checkpoint_state(runs["b"])
    n = len(images)
    assert {r["image_index"] for r in rows} == set(range(n))
    assert {r["category_name"] for r in rows} <= {"rectangle", "ellipse", "triangle"}
    _assert_same(_served_records(rows, n), reference_records(state_b, images, 0.0, 100))
    _assert_same(_served_records(few, n), reference_records(state_b, images, thresh, 5))
    assert 0 < len(few) <= 5 * n and all(r["score"] > thresh for r in few)
    # The alias moved: checkpoint a's detections are not what is served.
    ref_a = reference_records(load_checkpoint_state(runs["a"]), images, 0.0, 100)
    assert [d["score"] for d in ref_a[0][:5]] != [d["score"] for d in _served_records(rows, n)[0][:5]]
    SERVED.update(rows=rows, few=few, thresh=[thresh])


def test_ray_serve_answers_as_mlflow_serve(mlflow_server, checkpoints, images, ray_local, free_port):
    """`ray-retina serve models:/NAME@champion` (Ray Serve, local Ray): the same request as
    test_export_register_serve sent to `mlflow models serve` gets the same detections; a plain image upload
    gets that image's; concurrent single-image requests are batched together (batches of more than one image
    formed), each answered with its own image's detections; the limits are 400s here too."""
    from ray import serve

    from ray_retina.checkpoint import load_checkpoint_state
    from ray_retina.predict import category_names_of
    from ray_retina.serve import batch_sizes, run
    from ray_retina.serving import Detector

    if not SERVED:
        pytest.fail(
            "run with test_export_register_serve, which registers the model and serves it with MLflow"
        )
    port = free_port()
    url = run(
        f"models:/{NAME}@champion",
        tracking_uri=mlflow_server,
        overrides=[f"serve.port={port}", "serve.max_batch_size=4", "serve.batch_wait_timeout_s=0.5"],
        blocking=False,
    )
    try:
        data = [[base64.b64encode(b).decode()] for b in images]
        rows = _post(url, {"dataframe_split": {"columns": ["image"], "data": data}})["predictions"]
        few = _post(
            url,
            {
                "dataframe_split": {"columns": ["image"], "data": data},
                "params": {"score_thresh": SERVED["thresh"][0], "detections_per_img": 5},
            },
        )["predictions"]
        upload = urllib.request.Request(
            f"{url}/invocations?detections_per_img=5", data=images[2], headers={"Content-Type": "image/jpeg"}
        )
        with urllib.request.urlopen(upload, timeout=120) as r:
            uploaded = json.loads(r.read())["predictions"]
        before = batch_sizes(url)
        with ThreadPoolExecutor(8) as pool:  # 8 single-image requests at once, the three images in turn
            answers = list(
                pool.map(lambda i: _post(url, _frame_body([images[i % 3]], detections_per_img=5)), range(8))
            )
        after = batch_sizes(url)
        _assert_bounded(_load_with_oversized(url, images, clients=2, per_client=4))
    finally:
        serve.shutdown()

    _assert_rows_close(rows, SERVED["rows"])
    _assert_rows_close(few, SERVED["few"])
    # in-process reference: serving.Detector, one image at a time
    state_b = load_checkpoint_state(checkpoints[1]["b"])
    detector = Detector(state_b, "cpu", names=category_names_of(state_b))
    alone = [detector.frame([b], {"detections_per_img": 5}).to_dict(orient="records") for b in images]
    _assert_rows_close(uploaded, alone[2])
    for i, answer in enumerate(answers):
        _assert_rows_close(answer["predictions"], alone[i % 3])
    formed = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    print(f"batch sizes formed under 8 concurrent requests: {formed}")
    assert sum(k * v for k, v in formed.items()) == 8  # every image went through the batcher once
    assert any(k > 1 and v > 0 for k, v in formed.items()), formed


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
