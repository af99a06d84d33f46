"""The end of the pipeline: the best checkpoint of a run or a sweep as an MLflow model (or as ONNX / TorchScript
files, written by ``onnx_export.py``).

    ray-retina export --run <MLflow run id | run dir | checkpoint> --register retina --alias champion
    mlflow models serve -m models:/retina@champion --env-manager local -h 127.0.0.1 -p 5001

Which checkpoint: ``checkpoint.find_checkpoint`` (a run directory means its best checkpoint by ``val/AP``,
read through Ray Train's result API); an MLflow run id goes through the run's tags to its Ray Train run
directory (``tracking.run_checkpoint_location``); a sweep's parent run id goes to its best trial's run
(``tracking.best_trial_run``).

The MLflow model (``mlflow.pyfunc``, :class:`RetinaNetModel`): a DataFrame with one column ``image`` of
encoded JPEG/PNG bytes in (MLflow type ``binary``: base64 strings in JSON over REST), one row per detection
out, with the columns ``OUTPUT_COLUMNS``: the image's position in the request, the original category id and
its name, the score, the box XYXY in original-image pixels and the same box in COCO XYWH. It carries the
weights, the resolved config and the categories in one ``torch.load(weights_only=True)`` file and the
``ray_retina`` package itself (``code_paths``; its requirements pin ray-retina's dependencies), and detects
as ``ray-retina predict`` does, through the same functions: ``predict.preprocess_batch`` (decode with EXIF
orientation, resize to the test size) and ``predict.detect_images`` (``collate.pad_images``, then
``evaluate.detect``: post-process, boxes back to original pixels). ``score_thresh``, ``detections_per_img``
and ``batch_size`` are predict-time params.

``--format onnx`` / ``torchscript``: ``onnx_export.export_onnx`` / ``export_torchscript`` of the same
checkpoint, the files logged to its MLflow run.
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import io
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

from ray_retina import __version__
from ray_retina.onnx_export import export_onnx, export_torchscript
from ray_retina.predict import category_names_of

logger = logging.getLogger(__name__)

Format = Literal["mlflow", "onnx", "torchscript"]

INPUT_COLUMN = "image"
OUTPUT_COLUMNS: tuple[str, ...] = (
    "image_index",
    "category_id",
    "category_name",
    "score",
    "x1",
    "y1",
    "x2",
    "y2",  # XYXY, original-image pixels
    "bbox_x",
    "bbox_y",
    "bbox_w",
    "bbox_h",  # COCO XYWH of the same box
)
MODEL_ARTIFACT = "checkpoint"  # the artifact key of the model file inside the MLflow model
MODEL_FILE = "checkpoint.pt"  # a slim checkpoint: loads with checkpoint.load_checkpoint_state too

# The config keys of the sweep's focal parameters, under the names the registry tags them with.
FOCAL_PARAMS = {"gamma": "loss.gamma", "alpha": "loss.alpha", "prior": "model.prior", "lr": "optim.lr"}
# The MLflow model carries the ray_retina package itself (MLflow ``code_paths``: ``<model>/code/ray_retina``),
# so its requirements are ray-retina's own runtime dependencies (pyproject's ``dependencies``, read from the
# installed metadata) plus pandas, which the model imports directly, pinned at the installed versions;
# simplejpeg only when installed, since it changes how JPEGs decode (DCT scaling).
DISTRIBUTION = "ray-retina"
EXTRA_DISTRIBUTIONS = ("pandas",)
OPTIONAL_DISTRIBUTIONS = ("simplejpeg",)

_RUN_ID = re.compile(r"[0-9a-f]{32}")


# ----------------------------------------------------------------------------------------- the model file


def slim_state(state: Mapping[str, Any], names: Mapping[int, str]) -> dict[str, Any]:
    """What inference needs of a checkpoint dict: weights, resolved config, ``cat_ids`` and their
    ``cat_names``, the iteration, and ``categories`` [{id, name}] in label order. No optimizer, scheduler or
    RNG state (a third of the size with Adam); still a ``checkpoint.pt`` that ``load_checkpoint_state``,
    ``ray-retina predict`` and ``model.init_from`` read."""
    cat_ids = [int(c) for c in state["cat_ids"]]
    return {
        "model": state["model"],
        "config": dict(state["config"]),
        "cat_ids": cat_ids,
        "cat_names": [str(names.get(c, c)) for c in cat_ids],
        "iteration": int(state.get("iteration", 0)),
        "categories": [{"id": c, "name": str(names.get(c, c))} for c in cat_ids],
    }


# ----------------------------------------------------------------------------------------- the pyfunc model


def _invalid(message: str) -> Exception:
    """An error the scoring server answers with 400 (bad request) instead of 500."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _image_bytes(value: Any, index: int) -> bytes:
    """One cell of the ``image`` column as bytes: bytes as they are, a str as base64 (what JSON carries)."""
    if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError) as err:
            raise _invalid(f"image {index}: a string that is not base64: {err}") from None
    raise _invalid(f"image {index}: expected encoded image bytes, got {type(value).__name__}")


def images_of(model_input: Any) -> list[bytes]:
    """The encoded images of a pyfunc input: a DataFrame with a column ``image`` (or a single column), a
    dict ``{"image": [...]}``, or a list of bytes."""
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN in model_input.columns:
            column = model_input[INPUT_COLUMN]
        elif len(model_input.columns) == 1:
            column = model_input.iloc[:, 0]
        else:
            raise _invalid(
                f"expected a column {INPUT_COLUMN!r} of encoded images, got {list(model_input.columns)}"
            )
        values = column.tolist()
    elif isinstance(model_input, Mapping):
        values = list(model_input[INPUT_COLUMN])
    elif isinstance(model_input, (bytes, bytearray, str)):
        values = [model_input]
    else:
        values = list(model_input)
    return [_image_bytes(v, i) for i, v in enumerate(values)]


def empty_detections() -> pd.DataFrame:
    return detections_frame([], [], [], [], np.zeros((0, 4)))


def detections_frame(
    image_index: Sequence[int],
    category_ids: Sequence[int],
    names: Sequence[str],
    scores: Sequence[float],
    boxes: np.ndarray | Sequence[Sequence[float]],
) -> pd.DataFrame:
    """One row per detection: ``OUTPUT_COLUMNS``; ``boxes`` (D, 4) XYXY in original pixels. Coordinates and
    scores are float64 made from the model's float32 values, XYWH computed in float64 as
    ``evaluate.coco_records`` does (so its rounded ``bbox`` equals round(bbox_*, 3))."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return pd.DataFrame(
        {
            "image_index": np.asarray(image_index, dtype=np.int64),
            "category_id": np.asarray(category_ids, dtype=np.int64),
            "category_name": pd.Series(list(names), dtype=object),
            "score": np.asarray(scores, dtype=np.float64),
            "x1": b[:, 0],
            "y1": b[:, 1],
            "x2": b[:, 2],
            "y2": b[:, 3],
            "bbox_x": b[:, 0],
            "bbox_y": b[:, 1],
            "bbox_w": b[:, 2] - b[:, 0],
            "bbox_h": b[:, 3] - b[:, 1],
        }
    )


class Detector:
    """A checkpoint dict ready to detect on encoded images, in this process: the pyfunc model's engine, and
    the in-process reference the serving test compares the served detections with."""

    def __init__(self, state: Mapping[str, Any], device: torch.device | str | None = None) -> None:
        from ray_retina.engine.restore import AMP_DTYPES, model_from_state

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.cfg, cat_ids = model_from_state(state, self.device)
        self.cat_ids = np.asarray(cat_ids, dtype=np.int64)
        names = category_names_of(state)
        self.names = np.asarray([names.get(int(c), str(c)) for c in cat_ids], dtype=object)
        self.amp_dtype = AMP_DTYPES[self.cfg.optim.amp]

    def postprocessor(self, score_thresh: float | None = None, detections_per_img: int | None = None) -> Any:
        """The checkpoint's post-processor with these two parameters replaced (validated as config values).

        With ``score_thresh`` t >= the checkpoint's and ``detections_per_img`` D <= the checkpoint's, the
        result is the checkpoint's detections with score > t, the first D: a lower-scoring box neither
        enters the top-k before a higher one nor suppresses it in NMS."""
        from ray_retina.config import ConfigError, apply_overrides
        from ray_retina.model import build_postprocessor

        over: dict[str, Any] = {}
        if score_thresh is not None:
            over["postprocess.score_thresh"] = float(score_thresh)
        if detections_per_img is not None:
            over["postprocess.detections_per_img"] = int(detections_per_img)
        try:
            return build_postprocessor(apply_overrides(self.cfg, over) if over else self.cfg)
        except ConfigError as err:
            raise _invalid(str(err)) from None

    def detect(
        self, images: Sequence[bytes], postprocess: Any, first: int = 0
    ) -> list[dict[str, np.ndarray]]:
        """Per image (in order): ``boxes`` (D, 4) float32 XYXY in original pixels, ``scores`` (D,),
        ``category_ids`` (D,): one padded batch of ``images`` through ``predict.detect_images``, as
        ``predict.Predictor`` runs one.
        ``first``: the request position of ``images[0]``, for error messages."""
        from ray_retina.data.augment import object_array
        from ray_retina.data.decode import header_size
        from ray_retina.predict import detect_images, preprocess_batch

        for i, data in enumerate(images):
            try:
                header_size(data)
            except Exception as err:  # noqa: BLE001 - any reason Pillow has: the request is bad
                raise _invalid(
                    f"image {first + i} is not an image Pillow can read: {type(err).__name__}: {err}"
                ) from None
        keys = [str(i) for i in range(len(images))]
        pre = preprocess_batch(
            {"path": np.asarray(keys), "bytes": object_array(list(images))},
            min_size=self.cfg.data.test_min_size,
            max_size=self.cfg.data.max_size,
            files={k: (i, f"image {i}", "") for i, k in enumerate(keys)},
        )
        if len(pre["image_id"]) != len(images):
            bad = sorted({first + i for i in range(len(images))} - {first + int(i) for i in pre["image_id"]})
            raise _invalid(f"image(s) {bad} do not decode")
        return detect_images(
            self.model,
            postprocess,
            self.cfg,
            pre,
            device=self.device,
            amp_dtype=self.amp_dtype,
            cat_ids=self.cat_ids,
        )

    def frame(
        self,
        images: Sequence[bytes],
        *,
        score_thresh: float | None = None,
        detections_per_img: int | None = None,
        batch_size: int = 1,
    ) -> pd.DataFrame:
        """The detections of ``images`` as the pyfunc returns them (``OUTPUT_COLUMNS``), sorted by image and
        descending score. Images go through the network ``batch_size`` at a time, each batch padded to its
        largest image: with the default 1 an image's detections do not depend on the rest of the request."""
        if int(batch_size) < 1:
            raise _invalid(f"batch_size must be >= 1, got {batch_size}")
        postprocess = self.postprocessor(score_thresh, detections_per_img)
        cols: dict[str, list[Any]] = {"index": [], "cats": [], "scores": [], "boxes": []}
        for start in range(0, len(images), int(batch_size)):
            for j, d in enumerate(self.detect(images[start : start + int(batch_size)], postprocess, start)):
                cols["index"].extend([start + j] * len(d["scores"]))
                cols["cats"].extend(d["category_ids"].tolist())
                cols["scores"].extend(d["scores"].tolist())
                cols["boxes"].append(d["boxes"])
        if not cols["index"]:
            return empty_detections()
        lookup = dict(zip(self.cat_ids.tolist(), self.names.tolist(), strict=True))
        boxes = np.concatenate(cols["boxes"]).astype(np.float64)
        return detections_frame(
            cols["index"], cols["cats"], [lookup[c] for c in cols["cats"]], cols["scores"], boxes
        )


class RetinaNetModel(PythonModel):
    """The ``mlflow.pyfunc`` model: encoded images in, one row per detection out (module docstring).

    Params at predict time (``ParamSchema``, defaults from the checkpoint's config): ``score_thresh`` (keep
    scores above it), ``detections_per_img`` (at most this many per image, best first), ``batch_size``
    (images per forward pass; default 1, so an image's result is independent of the rest of the request)."""

    def load_context(self, context: Any) -> None:
        state = torch.load(context.artifacts[MODEL_ARTIFACT], map_location="cpu", weights_only=True)
        self.detector = Detector(state)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        p = dict(params or {})
        return self.detector.frame(
            images_of(model_input),
            score_thresh=p.get("score_thresh"),
            detections_per_img=p.get("detections_per_img"),
            batch_size=int(p.get("batch_size") or 1),
        )


MODEL_CODE = """\
# The ray-retina MLflow model (ray_retina.export.RetinaNetModel). The package ships beside this file in the
# model's code/ directory, which MLflow puts on sys.path before it runs this script.
import mlflow

from ray_retina.export import RetinaNetModel

mlflow.models.set_model(RetinaNetModel())
"""


def model_signature(cfg: Any) -> Any:
    """Input: column ``image`` (binary); output: ``OUTPUT_COLUMNS``; params with the checkpoint's defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    types = {"image_index": "long", "category_id": "long", "category_name": "string"}
    return ModelSignature(
        inputs=Schema([ColSpec("binary", INPUT_COLUMN)]),
        outputs=Schema([ColSpec(types.get(c, "double"), c) for c in OUTPUT_COLUMNS]),
        params=ParamSchema(
            [
                ParamSpec("score_thresh", "double", float(cfg.postprocess.score_thresh)),
                ParamSpec("detections_per_img", "long", int(cfg.postprocess.detections_per_img)),
                ParamSpec("batch_size", "long", 1),
            ]
        ),
    )


def example_image(height: int = 96, width: int = 128) -> bytes:
    """A small PNG (a bright rectangle and a dark disc on grey): the model's input example."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (width, height), (118, 118, 118))
    draw = ImageDraw.Draw(im)
    draw.rectangle((width // 8, height // 6, width // 2, height // 2), fill=(230, 60, 40))
    draw.ellipse((width // 2, height // 3, width - width // 8, height - height // 8), fill=(30, 40, 160))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def pip_requirements() -> list[str]:
    """Pinned requirements of the served model: ray-retina's runtime dependencies (torch, torchvision, ray with
    its extras, mlflow, ...) and pandas at the versions installed here, local version labels such as ``+cu130``
    dropped (``torch==2.14.1`` accepts any build of 2.14.1). ray-retina itself is not a requirement: the
    model carries the package (``code_paths``), so any env manager can build its environment from PyPI."""
    from packaging.requirements import Requirement

    def installed(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist).split("+", 1)[0]
        except importlib.metadata.PackageNotFoundError:
            return None

    declared = [Requirement(r) for r in importlib.metadata.requires(DISTRIBUTION) or []]
    runtime = [r for r in declared if r.marker is None or r.marker.evaluate({"extra": ""})]
    pins = [(r.name, f"[{','.join(sorted(r.extras))}]" if r.extras else "") for r in runtime]
    pins += [(d, "") for d in EXTRA_DISTRIBUTIONS if d not in {n for n, _ in pins}]
    missing = [name for name, _ in pins if installed(name) is None]
    if missing:
        raise RuntimeError(f"cannot pin the served model's requirements: {missing} not installed")
    optional = [(d, "") for d in OPTIONAL_DISTRIBUTIONS if installed(d) is not None]
    return [f"{name}{extras}=={installed(name)}" for name, extras in pins + optional]


def package_dir() -> Path:
    """The ray_retina package directory, copied into the MLflow model (``code_paths``)."""
    import ray_retina

    return Path(ray_retina.__file__).resolve().parent


def save_pyfunc(state: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the MLflow model of a checkpoint dict into the directory ``path`` (``mlflow.pyfunc.save_model``)."""
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory() as tmp:
        kwargs = _pyfunc_kwargs(state, Path(tmp))
        mlflow.pyfunc.save_model(path=os.fspath(path), **kwargs)
    return Path(path)


def _pyfunc_kwargs(state: Mapping[str, Any], tmp: Path) -> dict[str, Any]:
    from ray_retina.config import config_from_dict, to_yaml

    slim = slim_state(state, category_names_of(state))
    cfg = config_from_dict(slim["config"], source="checkpoint config")
    torch.save(slim, tmp / MODEL_FILE)
    (tmp / "config.yaml").write_text(to_yaml(cfg))
    # MLflow's "models from code": the model directory holds this two-line script rather than a pickle
    # of the class (which would only have pickled a reference to ray_retina.export anyway).
    code = tmp / "retinanet_model.py"
    code.write_text(MODEL_CODE)
    return {
        "python_model": str(code),
        "artifacts": {MODEL_ARTIFACT: str(tmp / MODEL_FILE), "config": str(tmp / "config.yaml")},
        "signature": model_signature(cfg),
        "input_example": pd.DataFrame({INPUT_COLUMN: [example_image()]}),
        "pip_requirements": pip_requirements(),
        "code_paths": [str(package_dir())],
        "metadata": {
            "ray_retina_version": __version__,
            "cat_ids": slim["cat_ids"],
            "categories": slim["categories"],
            "iteration": slim["iteration"],
            "test_min_size": cfg.data.test_min_size,
            "max_size": cfg.data.max_size,
        },
    }


# ----------------------------------------------------------------------------------------- which checkpoint


@dataclass
class ExportSource:
    """The checkpoint an export uses and where it came from."""

    checkpoint: str  # the checkpoint.pt file (path or URI)
    run_id: str | None = None  # the MLflow run of the training run or trial, when known
    sweep_run_id: str | None = None  # the sweep's parent run, for a trial
    trial_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # what Ray recorded with this checkpoint


def checkpoint_metrics(checkpoint_file: str) -> dict[str, float]:
    """The metrics Ray Train reported with a checkpoint (``val/AP`` ...), from its run directory's result
    metadata; empty when the checkpoint is not in a Ray Train run directory."""
    from ray_retina._ray_private import CHECKPOINT_SNAPSHOT_FILE
    from ray_retina.uri import file_exists, resolve_uri

    ckpt_dir = checkpoint_file.rsplit("/", 1)[0]
    run_dir = ckpt_dir.rsplit("/", 1)[0]
    fs, p = resolve_uri(run_dir)
    if not file_exists(fs, f"{p}/{CHECKPOINT_SNAPSHOT_FILE}"):
        return {}
    try:
        import ray.train

        result = ray.train.Result.from_path(run_dir)
        name = ckpt_dir.rsplit("/", 1)[-1]
        for ckpt, metrics in result.best_checkpoints:
            if ckpt.path.rstrip("/").rsplit("/", 1)[-1] == name:
                return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    except Exception as err:  # noqa: BLE001 - metadata is a nicety here, the checkpoint is what matters
        logger.warning("could not read Ray's result metadata of %s: %s", run_dir, err)
    return {}


def resolve_source(
    run: str | None = None, *, sweep: str | None = None, tracking_uri: str | None = None
) -> ExportSource:
    """The checkpoint that ``--run`` / ``--sweep`` mean (best by ``val/AP`` unless a checkpoint is named).

    ``run``: a ``checkpoint.pt``, a ``checkpoint_*`` directory, a Ray Train run directory (local or URI), or
    an MLflow run id (32 hex digits) of a training run or a sweep trial. ``sweep``: a sweep's parent run id:
    its best trial's run. Raises ``FileNotFoundError`` / ``ValueError`` naming what was not found."""
    from ray_retina import tracking
    from ray_retina.checkpoint import find_checkpoint

    if (run is None) == (sweep is None):
        raise ValueError("give exactly one of run and sweep")
    uri = tracking_uri or tracking.resolve_tracking_uri()
    if sweep is not None:
        child = tracking.best_trial_run(uri, sweep)
        run = child.info.run_id
    assert run is not None
    if "://" in run or os.path.exists(run) or not _RUN_ID.fullmatch(run):
        file = find_checkpoint(run)
        return ExportSource(file, metrics=checkpoint_metrics(file))
    from mlflow.exceptions import MlflowException

    try:
        tags = tracking._client(uri).get_run(run).data.tags
    except MlflowException as err:  # no such run in this store: a user error, one line
        raise FileNotFoundError(f"no MLflow run {run} at {uri} (--tracking-uri?): {err.message}") from None
    file = find_checkpoint(tracking.run_checkpoint_location(uri, run))
    return ExportSource(
        file,
        run_id=run,
        sweep_run_id=tags.get(tracking.PARENT_TAG),
        trial_id=tags.get(tracking.TRIAL_TAG),
        metrics=checkpoint_metrics(file),
    )


# ----------------------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    source: ExportSource
    format: str
    files: list[str] = field(default_factory=list)  # written locally (--out)
    run_id: str | None = None  # the MLflow run the model was logged to
    model_uri: str | None = None  # models:/<model id>
    registered_name: str | None = None
    registered_version: str | None = None
    alias: str | None = None


def registry_tags(source: ExportSource, cfg: Any, iteration: int) -> dict[str, str]:
    """Tags of a registered version: its run, sweep and trial, checkpoint, iteration, ``val/AP`` when known,
    and the focal parameters ``gamma``, ``alpha``, ``prior``, ``lr`` of its config."""
    from ray_retina.config import flatten

    flat = flatten(cfg)
    tags = {k: str(flat[key]) for k, key in FOCAL_PARAMS.items()}
    if cfg.optim.lr is None:  # a checkpoint's config is resolved (lr explicit); else the lr it runs with
        tags["lr"] = str(cfg.lr)
    tags.update(
        {
            "ray_retina.checkpoint": source.checkpoint,
            "ray_retina.iteration": str(iteration),
            "ray_retina.config_name": str(cfg.name),
        }
    )
    for key, value in (
        ("ray_retina.run_id", source.run_id),
        ("ray_retina.sweep_run_id", source.sweep_run_id),
        ("ray_retina.trial_id", source.trial_id),
    ):
        if value:
            tags[key] = value
    if "val/AP" in source.metrics:
        tags["val/AP"] = f"{source.metrics['val/AP']:.6f}"
    return tags


def export(
    run: str | None = None,
    *,
    sweep: str | None = None,
    format: Format = "mlflow",
    out: str | os.PathLike[str] | None = None,
    register: str | None = None,
    alias: str | None = None,
    tracking_uri: str | None = None,
) -> ExportResult:
    """``ray-retina export``: the best checkpoint of ``run`` (or of ``sweep``'s best trial) as

    * ``mlflow``: an MLflow model logged to the MLflow run of the checkpoint (or, for a checkpoint path
      with no run, to a new run ``export-<run dir name>`` in the config's experiment), registered as a new
      version of ``register`` with ``alias`` when given; with ``out`` also saved to that directory;
    * ``onnx`` / ``torchscript``: files in ``out`` (required), logged as artifacts of the MLflow run when
      there is one.
    """
    from ray_retina import tracking
    from ray_retina.checkpoint import load_checkpoint_state
    from ray_retina.config import config_from_dict

    if format not in ("mlflow", "onnx", "torchscript"):
        raise ValueError(f"format must be mlflow, onnx or torchscript, got {format!r}")
    if format != "mlflow" and (register or alias):
        raise ValueError("--register and --alias need --format mlflow (the registry holds MLflow models)")
    if alias and not register:
        raise ValueError("--alias needs --register NAME")
    if format != "mlflow" and out is None:
        raise ValueError(f"--format {format} needs --out DIR")
    source = resolve_source(run, sweep=sweep, tracking_uri=tracking_uri)
    state = load_checkpoint_state(source.checkpoint)
    cfg = config_from_dict(dict(state["config"]), source="checkpoint config")
    iteration = int(state.get("iteration", 0))
    logger.info(
        "exporting %s (iteration %d%s)",
        source.checkpoint,
        iteration,
        f", val/AP {source.metrics['val/AP']:.4f}" if "val/AP" in source.metrics else "",
    )
    result = ExportResult(source=source, format=format)
    # A checkpoint path: its run is the config's tracking store; a run id: the store it was found in.
    uri = tracking_uri or (
        tracking.resolve_tracking_uri(cfg) if source.run_id is None else tracking.resolve_tracking_uri()
    )

    if format != "mlflow":
        writer = export_onnx if format == "onnx" else export_torchscript
        files = writer(state, out)  # type: ignore[arg-type]
        result.files = [str(f) for f in files]
        if source.run_id:
            log = tracking.RunLogger(uri, source.run_id)
            for f in files:
                log.log_artifact(f, f"export/{format}")
            result.run_id = source.run_id
        return result

    if out is not None:
        result.files = [str(save_pyfunc(state, out))]
    run_id = source.run_id or _export_run(uri, cfg, source)
    result.run_id = run_id
    with tempfile.TemporaryDirectory() as tmp, tracking.using_uri(uri):
        import mlflow
        from mlflow.models import Model

        mlflow.set_experiment(experiment_id=tracking._client(uri).get_run(run_id).info.experiment_id)
        info = Model.log(
            artifact_path=None,
            name="model",
            flavor=mlflow.pyfunc,
            run_id=run_id,
            tags=registry_tags(source, cfg, iteration),
            **_pyfunc_kwargs(state, Path(tmp)),
        )
    result.model_uri = info.model_uri
    if register:
        version = tracking.register_model_version(
            uri,
            info.model_uri,
            register,
            tags=registry_tags(source, cfg, iteration),
            alias=alias,
            description=f"ray-retina {cfg.name}: {source.checkpoint} (iteration {iteration})",
        )
        result.registered_name, result.registered_version, result.alias = (
            register,
            str(version.version),
            alias,
        )
    return result


def _export_run(uri: str, cfg: Any, source: ExportSource) -> str:
    """The MLflow run to log a checkpoint path's model to: the training run of its Ray Train run directory
    when the config's experiment has one (same name, and its tags lead to that directory; ``source`` then
    gets its ids), else a run ``export-<run dir name>`` (reused by the next export of that run dir)."""
    from ray_retina import tracking

    parts = source.checkpoint.rstrip("/").split("/")
    in_run_dir = len(parts) >= 3 and parts[-2].startswith("checkpoint_")
    name = parts[-3] if in_run_dir else parts[-2]
    experiment = tracking.experiment_name(cfg)
    found = tracking.find_run_by_name(uri, experiment, name) if in_run_dir else None
    if found is not None:
        try:
            if tracking.run_checkpoint_location(uri, found).rstrip("/") == "/".join(parts[:-2]):
                tags = tracking._client(uri).get_run(found).data.tags
                source.run_id, source.sweep_run_id = found, tags.get(tracking.PARENT_TAG)
                source.trial_id = tags.get(tracking.TRIAL_TAG)
                return found
        except FileNotFoundError:
            pass
    run_id = tracking.find_run_by_name(uri, experiment, f"export-{name}")
    if run_id is None:
        run_id = tracking.create_run(
            cfg,
            run_name=f"export-{name}",
            uri=uri,
            tags={"ray_retina.kind": "export", "ray_retina.checkpoint": source.checkpoint},
        )
        tracking.RunLogger(uri, run_id).end("FINISHED")
    return run_id
