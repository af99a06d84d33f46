"""MLflow tracking: one run per training run (a child run per Tune trial), metric logging that never holds up
training, and the redaction of credentials wherever a config or a URI is logged.

The driver creates the run and logs params and the resolved config (credentials in URIs shown as ``***``,
:func:`redact`); rank 0 of the training workers logs metric curves into that same run by id (so a restarted
worker group keeps writing to one continuous run) through :class:`RunLogger`: each point is appended to a
spool file in the run directory and sent by a background thread in ``log_batch`` requests with short HTTP
timeouts, so a tracking server that is down or slow costs a training step nothing and loses no point.

mlflow is imported inside the functions that talk to a server: it takes seconds to import, and what needs no
server (:func:`redact` for the CLI and ``--print-config``, the spool) should not pay for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ray_retina.config import Config, ConfigError, flatten, to_yaml
from ray_retina.uri import dir_exists, join_uri, resolve_uri

logger = logging.getLogger(__name__)

# MLflow caps a param value at 6000 characters and a log_batch call at 100 params / 1000 metrics.
PARAM_VALUE_MAX = 6000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000


# Credentials inside a URI: the user-info part of ``scheme://user:password@host`` (any scheme: s3, https,
# postgresql, ...) and the values of query parameters that carry secrets (pre-signed URLs, tokens).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s'\"]+)@")
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&](?:password|passwd|pwd|secret|token|access_token|api_key|apikey|key|signature|"
    r"x-amz-signature|x-amz-credential|x-amz-security-token|sig)=)(?P<value>[^&\s'\"]+)",
    re.IGNORECASE,
)
REDACTED = "***"


class TrackingUnavailable(ConfigError):
    """The tracking server of ``tracking.tracking_uri`` does not answer when a run starts (one line)."""


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it replaced by ``***``: ``s3://KEY:SECRET@bucket/x`` ->
    ``s3://***@bucket/x``, ``https://user:pass@host`` -> ``https://***@host``, ``?token=abc`` -> ``?token=***``.
    The one redaction used wherever a config or a URI is logged or printed (MLflow params, tags, the logged
    ``config.yaml``, the console)."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}{REDACTED}", text)


# MLflow's defaults retry a request for minutes (7 retries, backoff factor 2, 120 s timeout); a tracking call
# of ours gives up after seconds and tries again later (RunLogger keeps what was not sent). A user's own
# settings of these variables win.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def bound_http_requests() -> None:
    """Short timeouts and few retries for MLflow's REST calls in this process (read by MLflow per request)."""
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)
    # urllib3 logs a "Retrying (...)" WARNING per attempt; RunLogger says once that the server is down.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def check_reachable(uri: str, timeout_s: float = 5.0) -> str | None:
    """None when the tracking server of an http(s) URI answers its ``/health`` (or any other URI: a local
    store needs no server), else one line saying why not."""
    if not uri.startswith(("http://", "https://")):
        return None
    import requests  # deferred: requests comes with mlflow; only the reachability check uses it

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
    except requests.RequestException as err:
        return f"MLflow tracking server {redact(uri)} is not reachable ({type(err).__name__})"
    return None


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
        s = redact(str(v))
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
    bound_http_requests()
    client = _client(uri)
    exp_id = get_or_create_experiment(uri, experiment_name(cfg))
    all_tags = {"mlflow.runName": run_name, "ray_retina.config_name": cfg.name, **(tags or {})}
    all_tags = {k: redact(str(v)) for k, v in all_tags.items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in params_of(cfg).items()]
    for i in range(0, len(params), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[i : i + PARAMS_PER_BATCH])
    client.log_text(run_id, redact(to_yaml(cfg)), "config.yaml")
    client.log_batch(run_id, tags=[RunTag("ray_retina.seed", str(cfg.seed))])
    return run_id


class RunLogger:
    """Logs into an existing run by id without ever holding up training.

    Metric points and tags are written to a spool file (``<spool_dir>/mlflow-pending-<run id>.jsonl``, one
    JSON line each) and handed to a background thread that sends them in ``log_batch`` requests; a point
    leaves the spool only once MLflow accepted it. So a training step costs one local append whatever the
    server does; while the server is down the points wait on disk (a killed process loses none) and go out
    when it answers again, every ``RETRY_S``; a later RunLogger of the same run and spool directory (a
    restarted worker, the driver at the end of the run) sends what an earlier one left. ``spool_dir``: the
    run directory when it is local (default: ``<tmp>/ray-retina-tracking``; a URI is replaced by that too).

    HTTP requests are bounded (:func:`bound_http_requests`). Artifacts go out directly, and only while the
    server answers; otherwise they are copied next to the spool and named in the summary.
    :meth:`close` (or :meth:`end`) flushes for at most ``flush_s`` seconds and returns a one-line summary."""

    RETRY_S = 2.0

    def __init__(
        self, uri: str, run_id: str, *, spool_dir: str | os.PathLike[str] | None = None, flush_s: float = 10.0
    ) -> None:
        bound_http_requests()
        self.uri = uri
        self.run_id = run_id
        self.flush_s = flush_s
        self._client = _client(uri)
        spool = Path(spool_dir) if spool_dir is not None and "://" not in os.fspath(spool_dir) else None
        spool = spool or Path(tempfile.gettempdir()) / "ray-retina-tracking"
        spool.mkdir(parents=True, exist_ok=True)
        self.spool = spool / f"mlflow-pending-{run_id}.jsonl"
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._stop = threading.Event()
        self._pending: list[dict[str, Any]] = self._read_spool()
        self._resumed = len(self._pending)
        self.sent = 0
        self.failures = 0
        self.last_error: str | None = None
        self.server_up = True
        self.unsent_artifacts: list[str] = []
        self._thread = threading.Thread(target=self._run, name=f"mlflow-{run_id[:8]}", daemon=True)
        self._thread.start()
        if self._pending:
            self._wake.set()

    # ------------------------------------------------------------------------------------- the public calls

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self._add(
            [{"m": k, "v": float(v), "t": ts, "s": int(step)} for k, v in metrics.items() if v is not None]
        )

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._add([{"tag": k, "v": redact(str(v))} for k, v in tags.items()])

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        if self.server_up:
            try:
                self._client.log_artifact(self.run_id, str(path), artifact_path)
                return
            except Exception as err:  # noqa: BLE001 - tracking must never kill training
                self._down(err)
        self._keep_artifact(Path(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.server_up:
            try:
                self._client.log_text(self.run_id, text, artifact_file)
                return
            except Exception as err:  # noqa: BLE001
                self._down(err)
        kept = self.spool.parent / f"mlflow-artifacts-{self.run_id}" / artifact_file
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(text)
        self.unsent_artifacts.append(str(kept))

    def end(self, status: str = "FINISHED", *, log: bool = True) -> str:
        """Flush (bounded), mark the run terminated; the summary line of :meth:`close`."""
        self._add([{"end": status}])
        return self.close(log=log)

    def close(self, *, log: bool = True) -> str:
        """Send what is pending for at most ``flush_s`` seconds, stop the thread; returns (and, with ``log``,
        logs) one line: what was sent and what could not be, and where the rest waits."""
        deadline = time.monotonic() + self.flush_s
        self._wake.set()
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    break
            time.sleep(0.05)
        self._closing = True
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        return self.summary(log=log)

    @property
    def resumed(self) -> int:
        """Items this logger found in the spool at its start (left unsent by an earlier logger of the run)."""
        return self._resumed

    @property
    def all_sent(self) -> bool:
        """Nothing of this logger (nor of the spool it took over) is waiting: every point, tag and artifact out."""
        with self._lock:
            return not self._pending and not self.unsent_artifacts

    def summary(self, *, log: bool = False) -> str:
        if self.all_sent:
            line = f"MLflow: everything sent to run {self.run_id} ({self.sent} item{'' if self.sent == 1 else 's'})"
            if log:
                logger.info(line)
            return line
        with self._lock:
            points = sum(1 for p in self._pending if "m" in p)
            others = len(self._pending) - points
        line = (
            f"MLflow: {points} metric points and {others} tags/status could not be sent to {redact(self.uri)} "
            f"(last error: {self.last_error}); kept in {self.spool}, sent when this run resumes or is logged again"
        )
        if self.unsent_artifacts:
            line += f"; {len(self.unsent_artifacts)} artifacts kept in {self.spool.parent / f'mlflow-artifacts-{self.run_id}'}"
        if log:
            logger.warning(line)
        return line

    # -------------------------------------------------------------------------------------------- internals

    def _add(self, items: list[dict[str, Any]]) -> None:
        if not items:
            return
        lines = "".join(json.dumps(i) + "\n" for i in items)
        with self._lock:
            try:
                with open(self.spool, "a") as f:
                    f.write(lines)
            except OSError as err:  # a full or read-only disk: keep them in memory only
                logger.warning("MLflow spool %s not writable: %s", self.spool, err)
            self._pending.extend(items)
        self._wake.set()

    def _read_spool(self) -> list[dict[str, Any]]:
        if not self.spool.exists():
            return []
        items = []
        for line in self.spool.read_text().splitlines():
            try:
                items.append(json.loads(line))
            except ValueError:  # the last line of a process killed mid-write
                continue
        return items

    def _run(self) -> None:
        """The sender: wait for work, send everything pending, retry every RETRY_S while the server is down."""
        while True:
            self._wake.wait(timeout=self.RETRY_S)
            self._wake.clear()
            with self._lock:
                batch = list(self._pending)
            if batch:
                try:
                    self._send(batch)
                except Exception as err:  # noqa: BLE001 - kept in the spool, tried again
                    self._down(err)
                    self._stop.wait(self.RETRY_S)  # not once per new point while the server is down
                else:
                    if not self.server_up:
                        logger.warning(
                            "MLflow at %s answers again: sent %d waiting items", redact(self.uri), len(batch)
                        )
                    self.server_up = True
                    self.sent += len(batch)
                    with self._lock:
                        del self._pending[: len(batch)]
                        self._rewrite_spool()
            if self._closing:
                return

    def _send(self, batch: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric, RunTag

        metrics = [Metric(i["m"], i["v"], i["t"], i["s"]) for i in batch if "m" in i]
        tags = [RunTag(i["tag"], i["v"]) for i in batch if "tag" in i]
        for i in range(0, max(len(metrics), 1), METRICS_PER_BATCH):
            chunk, tag_chunk = metrics[i : i + METRICS_PER_BATCH], tags if i == 0 else []
            if chunk or tag_chunk:
                self._client.log_batch(self.run_id, metrics=chunk, tags=tag_chunk)
        for i in batch:
            if "end" in i:
                self._client.set_terminated(self.run_id, status=i["end"])

    def _rewrite_spool(self) -> None:
        """The spool holds exactly what is pending (called under the lock)."""
        if not self._pending:
            self.spool.unlink(missing_ok=True)
            return
        tmp = self.spool.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(i) + "\n" for i in self._pending))
        os.replace(tmp, self.spool)

    def _down(self, err: BaseException) -> None:
        self.failures += 1
        # MLflow wraps urllib3's multi-line story: its innermost reason ("Connection refused") is enough.
        text = str(err)
        reason = re.search(r"\[Errno -?\d+\] [^'\")]+|Read timed out|status code \d+", text)
        self.last_error = type(err).__name__ + (f": {reason.group(0)}" if reason else "")
        if self.server_up:
            logger.warning(
                "MLflow at %s not answering (%s): training goes on; metrics wait in %s",
                redact(self.uri),
                self.last_error,
                self.spool,
            )
        self.server_up = False

    def _keep_artifact(self, path: Path, artifact_path: str | None) -> None:
        kept = self.spool.parent / f"mlflow-artifacts-{self.run_id}" / (artifact_path or "") / path.name
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, kept)
        self.unsent_artifacts.append(str(kept))


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


SUPPRESS_LINKS_ENV = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


@contextlib.contextmanager
def no_run_links() -> Iterator[None]:
    """Inside the block, ending a run on a tracking server prints nothing: MLflow writes a "View run" and a
    "View experiment" link to stdout for every run it closes, and a sweep closes one per trial (the parent
    run's link, printed as the sweep ends, is the one to follow). The variable is restored after."""
    saved = os.environ.get(SUPPRESS_LINKS_ENV)
    os.environ[SUPPRESS_LINKS_ENV] = "true"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(SUPPRESS_LINKS_ENV, None)
        else:
            os.environ[SUPPRESS_LINKS_ENV] = saved


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
