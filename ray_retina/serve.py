"""``ray-retina serve``: the detector as a Ray Serve application, batching images across requests.

    ray-retina serve models:/retina@champion --tracking-uri http://mlflow:5000
    ray-retina serve runs/smoke-20261205-101010 --set serve.max_batch_size=16 serve.num_replicas=2

The model: a registered MLflow model (``models:/NAME@alias``, ``models:/NAME/3``, ``runs:/<id>/model``), an
MLflow run id (its best checkpoint, as ``ray-retina export --run``), a Ray Train run directory or a checkpoint
(local or URI). Each replica loads it itself (a cluster's replicas need no file of the driver's).

A request is what the exported MLflow model takes on ``/invocations`` (``{"dataframe_split": {"columns":
["image"], "data": [[<base64>], ...]}, "params": {...}}``, or ``dataframe_records`` / ``inputs``), or a plain
image upload (``Content-Type: image/jpeg`` / ``image/png`` / ``application/octet-stream``, params in the query
string); the answer is the MLflow model's (``{"predictions": [{"image_index", "category_id",
"category_name", "score", "x1", ...}]}``), so a client switches between ``mlflow models serve`` and this
without a change. A refused request (a limit of the ``serve`` config section, a bad image or param) is a 400
naming what was refused, as under ``mlflow models serve``. ``GET /-/batches`` gives the batch sizes the
batcher formed (a histogram, for tests and tuning); ``GET /ping`` answers when the replica is up.

Per request, on the replica: the header checks and the decode (a thread pool of the replica's CPUs), then each
image goes to ``@serve.batch``, which groups images of concurrent requests (up to ``serve.max_batch_size``,
waiting at most ``serve.batch_wait_timeout_s``) into forward passes by padded shape
(``serving.Detector.run``), then the request's operating point (``serving.Detector.select``). The detections
are those of ``serving.Detector``, the MLflow model's.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlflow.artifacts
import numpy as np
import ray
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc.scoring_server import infer_and_parse_data, predictions_to_json
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from ray_retina import tracking
from ray_retina.checkpoint import load_checkpoint_state
from ray_retina.config import ConfigError, ServeSection, apply_overrides, config_from_dict
from ray_retina.export import resolve_source, slim_state
from ray_retina.predict import category_names_of
from ray_retina.serving import MODEL_FILE, Detector, RequestError, images_of

logger = logging.getLogger(__name__)

APP_NAME = "ray-retina"
MODEL_URI_SCHEMES = ("models:/", "runs:/")
IMAGE_CONTENT_TYPES = ("image/", "application/octet-stream")
# Requests a replica takes at once: enough to fill two batches (Ray Serve's default of 5 would cap a batch at 5).
ONGOING_PER_BATCH = 2


def load_model_state(source: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """The checkpoint dict of ``source`` with its class names (``export.slim_state``): an MLflow model URI
    (downloaded from ``tracking_uri``'s registry), else whatever ``export.resolve_source`` takes."""
    if source.startswith(MODEL_URI_SCHEMES):
        uri = tracking_uri or tracking.resolve_tracking_uri()
        with tracking.using_uri(uri):  # the models:/ resolver reads the process's registry URI
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=uri)
        return torch.load(Path(local) / "artifacts" / MODEL_FILE, map_location="cpu", weights_only=True)
    state = load_checkpoint_state(resolve_source(source, tracking_uri=tracking_uri).checkpoint)
    return slim_state(state, category_names_of(state))


def resolve_model_source(source: str, tracking_uri: str | None = None) -> str:
    """What a replica loads: an MLflow model URI as given, else the checkpoint file ``source`` means (an
    MLflow run id resolved here, on the driver, once)."""
    if source.startswith(MODEL_URI_SCHEMES):
        return source
    return resolve_source(source, tracking_uri=tracking_uri).checkpoint


def serve_options(
    state: Mapping[str, Any], overrides: Mapping[str, Any] | Sequence[str] | None = None
) -> ServeSection:
    """The ``serve`` section of the model's config with ``serve.*`` overrides (``{"serve.port": 8001}`` or
    ``["serve.port=8001"]``, as ``--set`` takes them) applied and validated."""
    cfg = config_from_dict(dict(state["config"]), source="checkpoint config")
    if not overrides:
        return cfg.serve
    keys = [str(o).split("=", 1)[0].strip() for o in overrides]
    if any(not k.startswith("serve.") for k in keys):
        raise ConfigError(f"ray-retina serve takes serve.* overrides only, got {keys}")
    over = list(overrides) if not isinstance(overrides, Mapping) else dict(overrides)
    return apply_overrides(cfg, over, "serve overrides").serve


@serve.deployment(name="RetinaNet")
class RetinaNetServer:
    """One replica: the model on the replica's device, a decode pool, and the batcher (module docstring)."""

    def __init__(self, source: str, tracking_uri: str | None, options: Mapping[str, Any]) -> None:
        opts = ServeSection(**options)
        state = load_model_state(source, tracking_uri)
        use_gpu = opts.num_gpus > 0 and torch.cuda.is_available()
        cpus = max(1, int(opts.num_cpus))
        if not use_gpu:
            torch.set_num_threads(cpus)
        self.detector = Detector(state, "cuda" if use_gpu else "cpu", limits=opts, amp=opts.amp)
        self.decode_pool = ThreadPoolExecutor(cpus, thread_name_prefix="decode")
        self.model_pool = ThreadPoolExecutor(1, thread_name_prefix="model")  # one forward at a time
        self.batch_sizes: Counter[int] = Counter()
        self.detect_batch.set_max_batch_size(opts.max_batch_size)
        self.detect_batch.set_batch_wait_timeout_s(opts.batch_wait_timeout_s)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        if request.method == "GET":
            if path.endswith("/-/batches"):
                return JSONResponse({"batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}})
            return PlainTextResponse("\n")  # /ping, /health, /
        try:
            images, params = await _parse(request)
            p = self.detector.params(params)
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(self.decode_pool, self.detector.prepare, images)
            key = self.detector.postprocess_key(p)
            dets = await asyncio.gather(*(self.detect_batch((image, key)) for image in prepared))
            frame = self.detector.to_frame([self.detector.select(d, p) for d in dets])
        except MlflowException as err:  # RequestError, or MLflow's own parser refusing the JSON
            return Response(
                err.serialize_as_json(), status_code=err.get_http_status_code(), media_type="application/json"
            )
        out = io.StringIO()
        predictions_to_json(frame, out)
        return Response(out.getvalue(), media_type="application/json")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def detect_batch(self, items: list[tuple[dict[str, np.ndarray], tuple[float, int]]]) -> list[Any]:
        """Images of concurrent requests (prepared image, post-process key) -> their detections, in order."""
        self.batch_sizes[len(items)] += 1
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.model_pool,
            self.detector.run,
            [image for image, _ in items],
            [key for _, key in items],
            len(items),
        )


async def _parse(request: Request) -> tuple[list[bytes], dict[str, Any] | None]:
    """(encoded images, params) of an /invocations JSON body or a plain image upload."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    body = await request.body()
    if content_type.startswith(IMAGE_CONTENT_TYPES):
        return [body], dict(request.query_params) or None
    if content_type != "application/json":
        raise RequestError(
            f"content type {content_type!r}: send application/json (as /invocations) or image/*"
        )
    try:
        payload = json.loads(body)
    except ValueError as err:
        raise RequestError(f"the body is not JSON: {err}") from None
    if not isinstance(payload, dict):
        raise RequestError("the body must be a JSON object: {'dataframe_split': ..., 'params': {...}}")
    params = payload.pop("params", None)
    return images_of(infer_and_parse_data(payload)), params


def build_app(
    source: str,
    *,
    tracking_uri: str | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> tuple[serve.Application, ServeSection]:
    """The Serve application of ``source`` (module docstring), with its ``serve`` options (the model config's
    section, ``overrides`` applied): replicas, autoscaling, CPUs and GPU fraction per replica."""
    replica_source = resolve_model_source(source, tracking_uri)
    opts = serve_options(load_model_state(replica_source, tracking_uri), overrides)
    scaling: dict[str, Any] = {"num_replicas": opts.num_replicas}
    if opts.max_replicas is not None:
        scaling = {
            "autoscaling_config": {
                "min_replicas": opts.min_replicas,
                "max_replicas": opts.max_replicas,
                "target_ongoing_requests": opts.target_ongoing_requests,
            }
        }
    deployment = RetinaNetServer.options(
        ray_actor_options={"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus},
        max_ongoing_requests=ONGOING_PER_BATCH * opts.max_batch_size,
        **scaling,
    )
    return deployment.bind(replica_source, tracking_uri, opts.model_dump()), opts


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Ray Serve's application builder (``import_path: ray_retina.serve:app_builder`` in a Serve config or
    a KubeRay RayService): ``args`` = ``{"source": ..., "tracking_uri": ..., "overrides": {"serve.x": v}}``."""
    app, _ = build_app(
        str(args["source"]), tracking_uri=args.get("tracking_uri"), overrides=args.get("overrides")
    )
    return app


def run(
    source: str,
    *,
    tracking_uri: str | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    num_cpus: int | None = None,
    blocking: bool = True,
) -> str:
    """Start the application on the Ray cluster (a local one with ``num_cpus`` when none is running) at
    ``serve.host:serve.port``; returns its URL. ``blocking``: wait until interrupted, then shut Serve down."""
    app, opts = build_app(source, tracking_uri=tracking_uri, overrides=overrides)
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": opts.host, "port": opts.port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{opts.host}:{opts.port}"
    if blocking:
        print(f"serving {source} at {url}/invocations (Ctrl-C stops)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url


def batch_sizes(url: str) -> dict[int, int]:
    """The batch-size histogram of the replica that answers ``url`` (``GET /-/batches``)."""
    import urllib.request  # deferred: a client helper, for tests and the benchmark

    with urllib.request.urlopen(f"{url.rstrip('/')}/-/batches", timeout=30) as r:
        return {int(k): int(v) for k, v in json.loads(r.read())["batch_sizes"].items()}


__all__ = ["RetinaNetServer", "app_builder", "batch_sizes", "build_app", "load_model_state", "run"]
