"""The end of the pipeline, driver side: which checkpoint, the MLflow model of it, the registry (or ONNX /
TorchScript files, written by ``onnx_export.py``).

    ray-retina export --run <MLflow run id | run dir | checkpoint> --register retina --alias champion
    mlflow models serve -m models:/retina@champion --env-manager local -h 127.0.0.1 -p 5001

Which checkpoint: ``checkpoint.find_checkpoint`` (a run directory means its best checkpoint by ``val/AP``,
read through Ray Train's result API); an MLflow run id goes through the run's tags to its Ray Train run
directory (``tracking.run_checkpoint_location``); a sweep's parent run id goes to its best trial's run
(``tracking.best_trial_run``).

The MLflow model runs ``serving.py`` (``serving.RetinaNetModel``; the request, the limits, the operating
point and the detections are described there): a DataFrame with one column ``image`` of encoded JPEG/PNG
bytes in (MLflow type ``binary``: base64 strings in JSON over REST), one row per detection out
(``serving.OUTPUT_COLUMNS``). It carries the weights, the resolved config (its ``serve`` section holds the
limits), the categories and the per-class thresholds in one ``torch.load(weights_only=True)`` file, and the
``ray_retina`` package itself (``code_paths``; its requirements pin ray-retina's dependencies).

``--format onnx`` / ``torchscript``: ``onnx_export.export_onnx`` / ``export_torchscript`` of the same
checkpoint, the files logged to its MLflow run.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import mlflow.pyfunc
import pandas as pd
import ray.train
import torch
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from packaging.requirements import Requirement

import ray_retina
from ray_retina import __version__, tracking
from ray_retina._ray_private import CHECKPOINT_SNAPSHOT_FILE
from ray_retina.checkpoint import find_checkpoint, load_checkpoint_state
from ray_retina.config import apply_overrides, config_from_dict, flatten, to_yaml
from ray_retina.onnx_export import export_onnx, export_torchscript
from ray_retina.predict import category_names_of
from ray_retina.serving import (
    INPUT_COLUMN,
    MODEL_ARTIFACT,
    MODEL_CODE,
    MODEL_FILE,
    OUTPUT_COLUMNS,
    THRESHOLDS_KEY,
    default_table,
    example_image,
    threshold_tables,
)
from ray_retina.sweep.champion import choose_champion
from ray_retina.uri import file_exists, resolve_uri

logger = logging.getLogger(__name__)

Format = Literal["mlflow", "onnx", "torchscript"]

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
    ``cat_names``, the iteration, ``categories`` [{id, name}] in label order, and the per-class
    ``thresholds`` tables when eval chose them (``serving.THRESHOLDS_KEY``). No optimizer, scheduler or RNG
    state (a third of the size with Adam); still a ``checkpoint.pt`` that ``load_checkpoint_state``,
    ``ray-retina predict`` and ``model.init_from`` read."""
    cat_ids = [int(c) for c in state["cat_ids"]]
    # With optim.ema on, the EMA weights are the ones eval scored, so they are the model that ships.
    weights = state["ema"]["state_dict"] if "ema" in state else state["model"]
    if "ema" in state:
        logger.info("exporting the checkpoint's EMA weights (%d updates)", int(state["ema"]["updates"]))
    slim = {
        "model": weights,
        "config": dict(state["config"]),
        "cat_ids": cat_ids,
        "cat_names": [str(names.get(c, c)) for c in cat_ids],
        "iteration": int(state.get("iteration", 0)),
        "categories": [{"id": c, "name": str(names.get(c, c))} for c in cat_ids],
    }
    if state.get(THRESHOLDS_KEY):
        chosen = state[THRESHOLDS_KEY]
        settings = {str(k): float(v) for k, v in chosen.items() if not isinstance(v, Mapping)}
        slim[THRESHOLDS_KEY] = {**threshold_tables(chosen), **settings}
    return slim


# ----------------------------------------------------------------------------------------- the MLflow model


def model_signature(cfg: Any, thresholds: str = "eval") -> ModelSignature:
    """Input: column ``image`` (binary); output: ``OUTPUT_COLUMNS``; params (``serving.RequestParams``) with
    the checkpoint's defaults; ``thresholds``: the default table (``serving.default_table``)."""
    types = {"image_index": "long", "category_id": "long", "category_name": "string"}
    return ModelSignature(
        inputs=Schema([ColSpec("binary", INPUT_COLUMN)]),
        outputs=Schema([ColSpec(types.get(c, "double"), c) for c in OUTPUT_COLUMNS]),
        params=ParamSchema(
            [
                ParamSpec("score_thresh", "double", float(cfg.postprocess.score_thresh)),
                ParamSpec("detections_per_img", "long", int(cfg.postprocess.detections_per_img)),
                ParamSpec("thresholds", "string", thresholds),
                ParamSpec("batch_size", "long", 1),
            ]
        ),
    )


def pip_requirements() -> list[str]:
    """Pinned requirements of the served model: ray-retina's runtime dependencies (torch, torchvision, ray with
    its extras, mlflow, ...) and pandas at the versions installed here, local version labels such as ``+cu130``
    dropped (``torch==2.14.1`` accepts any build of 2.14.1). ray-retina itself is not a requirement: the
    model carries the package (``code_paths``), so any env manager can build its environment from PyPI."""

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
    return Path(ray_retina.__file__).resolve().parent


def save_pyfunc(state: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the MLflow model of a checkpoint dict into the directory ``path`` (``mlflow.pyfunc.save_model``)."""
    with tempfile.TemporaryDirectory() as tmp:
        kwargs = _pyfunc_kwargs(state, Path(tmp))
        mlflow.pyfunc.save_model(path=os.fspath(path), **kwargs)
    return Path(path)


def _pyfunc_kwargs(state: Mapping[str, Any], tmp: Path) -> dict[str, Any]:
    """``mlflow.pyfunc.save_model`` / ``Model.log`` arguments of a checkpoint dict; files written in ``tmp``."""
    slim = slim_state(state, category_names_of(state))
    cfg = config_from_dict(slim["config"], source="checkpoint config")
    torch.save(slim, tmp / MODEL_FILE)
    (tmp / "config.yaml").write_text(to_yaml(cfg))
    # MLflow's "models from code": the model directory holds this two-line script rather than a pickle
    # of the class (which would only have pickled a reference to ray_retina.serving anyway).
    code = tmp / "retinanet_model.py"
    code.write_text(MODEL_CODE)
    return {
        "python_model": str(code),
        "artifacts": {MODEL_ARTIFACT: str(tmp / MODEL_FILE), "config": str(tmp / "config.yaml")},
        "signature": model_signature(cfg, default_table(slim)),
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
            "limits": {k: getattr(cfg.serve, k) for k in ("max_pixels", "max_images", "max_batch_size")},
            "thresholds": slim.get(THRESHOLDS_KEY, {}),
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
    champion: str | None = None  # a sweep's champion choice: ties within the noise floor, the rule applied


def checkpoint_metrics(checkpoint_file: str) -> dict[str, float]:
    """The metrics Ray Train reported with a checkpoint (``val/AP`` ...), from its run directory's result
    metadata; empty when the checkpoint is not in a Ray Train run directory."""
    ckpt_dir = checkpoint_file.rsplit("/", 1)[0]
    run_dir = ckpt_dir.rsplit("/", 1)[0]
    fs, p = resolve_uri(run_dir)
    if not file_exists(fs, f"{p}/{CHECKPOINT_SNAPSHOT_FILE}"):
        return {}
    try:
        result = ray.train.Result.from_path(run_dir)
        name = ckpt_dir.rsplit("/", 1)[-1]
        for ckpt, metrics in result.best_checkpoints:
            if ckpt.path.rstrip("/").rsplit("/", 1)[-1] == name:
                return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    except Exception as err:  # noqa: BLE001 - metadata is a nicety here, the checkpoint is what matters
        logger.warning("could not read Ray's result metadata of %s: %s", run_dir, err)
    return {}


def resolve_source(
    run: str | None = None,
    *,
    sweep: str | None = None,
    tracking_uri: str | None = None,
    champion_rule: str = "best",
) -> ExportSource:
    """The checkpoint that ``--run`` / ``--sweep`` mean (best by ``val/AP`` unless a checkpoint is named).

    ``run``: a ``checkpoint.pt``, a ``checkpoint_*`` directory, a Ray Train run directory (local or URI), or
    an MLflow run id (32 hex digits) of a training run or a sweep trial. ``sweep``: a sweep's parent run id:
    its best trial's run, or among the trials tied with it within the noise floor the one ``champion_rule``
    picks (:func:`ray_retina.sweep.champion.choose_champion`). Raises ``FileNotFoundError`` / ``ValueError``
    naming what was not found."""
    if (run is None) == (sweep is None):
        raise ValueError("give exactly one of run and sweep")
    uri = tracking_uri or tracking.resolve_tracking_uri()
    champion = None
    if sweep is not None:
        choice = choose_champion(uri, sweep, champion_rule)
        run, champion = choice.run_id, choice.note
    assert run is not None
    if "://" in run or os.path.exists(run) or not _RUN_ID.fullmatch(run):
        file = find_checkpoint(run)
        return ExportSource(file, metrics=checkpoint_metrics(file))
    tags = tracking.run_tags(uri, run)
    file = find_checkpoint(tracking.run_checkpoint_location(uri, run))
    return ExportSource(
        file,
        run_id=run,
        sweep_run_id=tags.get(tracking.PARENT_TAG),
        trial_id=tags.get(tracking.TRIAL_TAG),
        metrics=checkpoint_metrics(file),
        champion=champion,
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
    champion_rule: str = "best",
    serve_overrides: Sequence[str] | None = None,
) -> ExportResult:
    """``ray-retina export``: the best checkpoint of ``run`` (or of ``sweep``'s best trial) as

    * ``mlflow``: an MLflow model logged to the MLflow run of the checkpoint (or, for a checkpoint path
      with no run, to a new run ``export-<run dir name>`` in the config's experiment), registered as a new
      version of ``register`` with ``alias`` when given; with ``out`` also saved to that directory;
    * ``onnx`` / ``torchscript``: files in ``out`` (required), logged as artifacts of the MLflow run when
      there is one.

    ``serve_overrides``: ``serve.KEY=VALUE`` pairs (``--set``) replacing the checkpoint config's serve
    section in the exported model: its limits (``serve.max_pixels``, ``max_images``, ``max_batch_size``).
    """
    # One piece: the argument checks, then the steps in the order a user reads them in the log (which
    # checkpoint, which run, the files or the MLflow model, the registry); each step is a function already.
    if format not in ("mlflow", "onnx", "torchscript"):
        raise ValueError(f"format must be mlflow, onnx or torchscript, got {format!r}")
    if format != "mlflow" and (register or alias):
        raise ValueError("--register and --alias need --format mlflow (the registry holds MLflow models)")
    if alias and not register:
        raise ValueError("--alias needs --register NAME")
    if format != "mlflow" and out is None:
        raise ValueError(f"--format {format} needs --out DIR")
    source = resolve_source(run, sweep=sweep, tracking_uri=tracking_uri, champion_rule=champion_rule)
    state = load_checkpoint_state(source.checkpoint)
    cfg = config_from_dict(dict(state["config"]), source="checkpoint config")
    if serve_overrides:
        keys = [str(o).split("=", 1)[0].strip() for o in serve_overrides]
        if any(not k.startswith("serve.") for k in keys):
            raise ValueError(f"export takes serve.* overrides only (the served model's limits), got {keys}")
        cfg = apply_overrides(cfg, list(serve_overrides), "export overrides")
        state = {**state, "config": cfg.model_dump(mode="json")}
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
    run_id = source.run_id
    if run_id is None:
        source, run_id = _export_run(uri, cfg, source)
        result.source = source
    result.run_id = run_id
    with tempfile.TemporaryDirectory() as tmp, tracking.using_uri(uri):
        # deferred: mlflow's fluent module and Model class pull in the whole logging stack
        import mlflow
        from mlflow.models import Model  # deferred with mlflow above

        mlflow.set_experiment(experiment_id=tracking.run_experiment_id(uri, run_id))
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


def _export_run(uri: str, cfg: Any, source: ExportSource) -> tuple[ExportSource, str]:
    """(source, run id): the MLflow run to log a checkpoint path's model to: the training run of its Ray
    Train run directory when the config's experiment has one (same name, and its tags lead to that
    directory; the returned source then carries its run, sweep and trial ids), else a run ``export-<run dir
    name>`` (reused by the next export of that run dir; the source as given)."""
    parts = source.checkpoint.rstrip("/").split("/")
    in_run_dir = len(parts) >= 3 and parts[-2].startswith("checkpoint_")
    name = parts[-3] if in_run_dir else parts[-2]
    experiment = tracking.experiment_name(cfg)
    found = tracking.find_run_by_name(uri, experiment, name) if in_run_dir else None
    if found is not None:
        try:
            if tracking.run_checkpoint_location(uri, found).rstrip("/") == "/".join(parts[:-2]):
                tags = tracking.run_tags(uri, found)
                found_source = replace(
                    source,
                    run_id=found,
                    sweep_run_id=tags.get(tracking.PARENT_TAG),
                    trial_id=tags.get(tracking.TRIAL_TAG),
                )
                return found_source, found
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
    return source, run_id
