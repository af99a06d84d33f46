"""MLflow tracking: one run per training run (a child run per Tune trial), batched metric logging.

The driver creates the run and logs params and the resolved config; rank 0 of the training workers logs
metric curves into that same run by id (so a restarted worker group keeps writing to one continuous run),
each call a single ``log_batch`` request instead of one request per metric.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
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


def get_or_create_experiment(uri: str, name: str) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        # Open in the MLflow UI's "Model training" view (runs table, Compare) rather than the GenAI one.
        return client.create_experiment(name, tags={"mlflow.experimentKind": "custom_model_development"})
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
