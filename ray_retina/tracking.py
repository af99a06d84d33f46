"""MLflow tracking: one run per training run (a child run per Tune trial), batched metric logging.

The driver creates the run and logs params and the resolved config; rank 0 of the training workers logs
metric curves into that same run by id (so a restarted worker group keeps writing to one continuous run),
each call a single ``log_batch`` request instead of one request per metric.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ray_retina.config import Config, flatten, to_yaml

logger = logging.getLogger(__name__)

# MLflow caps a param value at 6000 characters and a log_batch call at 100 params / 1000 metrics.
PARAM_VALUE_MAX = 6000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000


def resolve_tracking_uri(cfg: Config | None = None) -> str:
    """The config's URI, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db`` (absolute, so that
    Ray workers started in other directories write to the same file)."""
    if cfg is not None and cfg.tracking.tracking_uri:
        uri = cfg.tracking.tracking_uri
    else:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def experiment_name(cfg: Config) -> str:
    return cfg.tracking.experiment or cfg.name


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _artifact_location(uri: str, name: str) -> str | None:
    """Artifacts of a local SQLite store beside its database file (``<db dir>/mlartifacts/<experiment>``),
    not MLflow's default ``./mlruns`` of whatever directory the process runs in. None (the server's or
    store's own default) for any other tracking URI."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :])
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return (db.parent.resolve() / "mlartifacts" / safe).as_uri()


def get_or_create_experiment(uri: str, name: str) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        # Open in the MLflow UI's "Model training" view (runs table, Compare) rather than the GenAI one.
        return client.create_experiment(
            name,
            artifact_location=_artifact_location(uri, name),
            tags={"mlflow.experimentKind": "custom_model_development"},
        )
    except Exception:  # another process created it between our two calls
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def params_of(cfg: Config) -> dict[str, str]:
    out = {}
    for k, v in flatten(cfg).items():
        s = str(v)
        out[k] = s if len(s) <= PARAM_VALUE_MAX else s[: PARAM_VALUE_MAX - 3] + "..."
    return out


def create_run(
    cfg: Config,
    *,
    run_name: str,
    uri: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Create the MLflow run of a training run: params (flattened config), the config file, tags. Returns its id."""
    from mlflow.entities import Param, RunTag

    uri = uri or resolve_tracking_uri(cfg)
    client = _client(uri)
    exp_id = get_or_create_experiment(uri, experiment_name(cfg))
    all_tags = {"mlflow.runName": run_name, "ray_retina.config_name": cfg.name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in params_of(cfg).items()]
    for i in range(0, len(params), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[i : i + PARAMS_PER_BATCH])
    client.log_text(run_id, to_yaml(cfg), "config.yaml")
    client.log_batch(run_id, tags=[RunTag("ray_retina.seed", str(cfg.seed))])
    return run_id


class RunLogger:
    """Logs into an existing run by id. Every call is one request (``log_batch``); failures of the tracking
    server are logged and swallowed so that tracking can never stop a training run."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri = uri
        self.run_id = run_id
        self._client = _client(uri)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if v is not None]
        try:
            for i in range(0, len(items), METRICS_PER_BATCH):
                self._client.log_batch(self.run_id, metrics=items[i : i + METRICS_PER_BATCH])
        except Exception as err:  # noqa: BLE001 - tracking must never kill training
            logger.warning("MLflow log_batch failed (run %s): %s", self.run_id, err)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        try:
            self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        except Exception as err:  # noqa: BLE001
            logger.warning("MLflow set tags failed (run %s): %s", self.run_id, err)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        try:
            self._client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as err:  # noqa: BLE001
            logger.warning("MLflow log_artifact failed (run %s): %s", self.run_id, err)

    def log_text(self, text: str, artifact_file: str) -> None:
        try:
            self._client.log_text(self.run_id, text, artifact_file)
        except Exception as err:  # noqa: BLE001
            logger.warning("MLflow log_text failed (run %s): %s", self.run_id, err)

    def end(self, status: str = "FINISHED") -> None:
        try:
            self._client.set_terminated(self.run_id, status=status)
        except Exception as err:  # noqa: BLE001
            logger.warning("MLflow set_terminated failed (run %s): %s", self.run_id, err)


def find_run_by_name(uri: str, experiment: str, run_name: str) -> str | None:
    """The id of the newest run called `run_name` in `experiment` (re-running a run name resumes into it)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`mlflow.runName` = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


# ----------------------------------------------------------------------------------------- checkpoints of runs

# Tags that say where a run's Ray Train run directory and its best checkpoint are (engine/trainer.py sets them
# at the end of `train`; a sweep trial's run has none of them, see `run_checkpoint_location`).
STORAGE_TAG = "ray_retina.storage_path"
RAY_RUN_TAG = "ray_retina.ray_run_name"
BEST_CHECKPOINT_TAG = "ray_retina.best_checkpoint"
BEST_TRIAL_TAG = "ray_retina.best_trial"  # on a sweep's parent run (tune.py)
TRIAL_TAG = "ray_retina.trial_id"  # on each trial's child run (tune.py)
PARENT_TAG = "mlflow.parentRunId"


def checkpoint_tags(
    storage_path: str, ray_run_name: str, best_checkpoint: str | None = None
) -> dict[str, str]:
    """The tags that let `run_checkpoint_location` (and so ``ray-retina export --run <id>``) find a run's
    checkpoints: the Ray Train storage path and run name, and the best checkpoint directory when known."""
    tags = {STORAGE_TAG: storage_path, RAY_RUN_TAG: ray_run_name}
    if best_checkpoint:
        tags[BEST_CHECKPOINT_TAG] = best_checkpoint
    return tags


def run_checkpoint_location(uri: str, run_id: str) -> str:
    """Where the checkpoints of an MLflow run are: its Ray Train run directory, whose best checkpoint by
    ``val/AP`` ``checkpoint.find_checkpoint`` picks, else the best checkpoint directory it was tagged with.

    Looked up, in order: tags ``ray_retina.storage_path`` + ``ray_retina.ray_run_name`` (a training run);
    tag ``ray_retina.best_checkpoint``; param ``run.storage_path`` + the run's name (a sweep trial, whose Ray
    Train run is named after its MLflow run). The first that exists wins. Raises ``FileNotFoundError``
    naming the run and the places looked at."""
    from ray_retina.uri import dir_exists, join_uri, resolve_uri

    run = _client(uri).get_run(run_id)
    tags, params = run.data.tags, run.data.params
    candidates = []
    if tags.get(STORAGE_TAG) and tags.get(RAY_RUN_TAG):
        candidates.append(join_uri(tags[STORAGE_TAG], tags[RAY_RUN_TAG]))
    if tags.get(BEST_CHECKPOINT_TAG):
        candidates.append(tags[BEST_CHECKPOINT_TAG])
    if params.get("run.storage_path") and tags.get("mlflow.runName"):
        candidates.append(join_uri(params["run.storage_path"], tags["mlflow.runName"]))
    for c in candidates:
        fs, p = resolve_uri(c)
        if dir_exists(fs, p):
            return c
    raise FileNotFoundError(
        f"MLflow run {run_id}: no checkpoint directory found"
        + (
            f" (looked at {', '.join(candidates)})"
            if candidates
            else " (it has no ray_retina checkpoint tags)"
        )
    )


def best_trial_run(uri: str, parent_run_id: str) -> Any:
    """The child run of the best trial of a sweep (parent tag ``ray_retina.best_trial``; the child's tag
    ``ray_retina.trial_id``). Raises ``ValueError`` when the sweep has no best trial (unfinished, or no trial
    reported ``val/AP``) or its run is missing."""
    client = _client(uri)
    parent = client.get_run(parent_run_id)
    best = parent.data.tags.get(BEST_TRIAL_TAG)
    if not best:
        raise ValueError(
            f"MLflow run {parent_run_id} has no tag {BEST_TRIAL_TAG}: not a finished ray-retina sweep"
        )
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{best}'",
        max_results=2,
    )
    if not runs:
        raise ValueError(f"sweep {parent_run_id}: no child run of its best trial {best}")
    return runs[0]


def run_tags(uri: str, run_id: str) -> dict[str, str]:
    """The tags of an MLflow run. Raises ``FileNotFoundError`` naming the run and store when it is not
    there."""
    from mlflow.exceptions import MlflowException

    try:
        return dict(_client(uri).get_run(run_id).data.tags)
    except MlflowException as err:  # no such run in this store: a user error, one line
        raise FileNotFoundError(f"no MLflow run {run_id} at {uri} (--tracking-uri?): {err.message}") from None


def run_experiment_id(uri: str, run_id: str) -> str:
    """The id of the experiment an MLflow run belongs to."""
    return str(_client(uri).get_run(run_id).info.experiment_id)


# ----------------------------------------------------------------------------------------- the model registry


@contextlib.contextmanager
def using_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``Model.log``, ``register_model``) on ``uri`` for tracking and registry. Both
    setters also export ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI``: the variables as they were (set
    or not) come back on exit, and with them the URIs the process used before."""
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # None unsets the variable
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        if saved["MLFLOW_REGISTRY_URI"] is None:
            os.environ.pop("MLFLOW_REGISTRY_URI", None)


def register_model_version(
    uri: str,
    model_uri: str,
    name: str,
    *,
    tags: Mapping[str, Any] | None = None,
    alias: str | None = None,
    description: str | None = None,
) -> Any:
    """Register ``model_uri`` (``models:/<model id>`` of a logged model, or ``runs:/...``) as a new version of
    registered model ``name`` (created when missing), with ``tags`` on the version, and point ``alias`` (e.g.
    ``champion``) at it. Returns the ``ModelVersion``. Every call makes a new version."""
    import mlflow

    client = _client(uri)
    with using_uri(uri):
        version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in (tags or {}).items()})
    if description:
        client.update_model_version(name, version.version, description=description)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return client.get_model_version(name, version.version)
