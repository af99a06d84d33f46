"""Who may register and promote: the tracking server of the cluster runs MLflow's basic-auth app
(cluster/mlflow/mlflow-server.yaml), and training, sweeps and export authenticate with
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` from the environment (cluster/kuberay/*.yaml).

A real ``mlflow server --app-name basic-auth`` on 127.0.0.1, configured the way the cluster configures it:
the ini that the manifest's ``auth-config`` init container writes (``default_permission = READ``, no password
in it; only ``database_uri`` points at a SQLite file here instead of PostgreSQL), named by
``MLFLOW_AUTH_CONFIG_PATH``, the admin from ``MLFLOW_AUTH_ADMIN_USERNAME`` / ``MLFLOW_AUTH_ADMIN_PASSWORD``, a
static Flask secret key. The admin creates the accounts through ``mlflow.server.get_app_client("basic-auth")``
as cluster/README.md tells; the project's own code (``ray_retina.tracking.create_run`` / ``RunLogger``) then
runs with a user's credentials in the environment and nothing else changed.

- no credentials, or a wrong password: 401, and nothing is created;
- a user's run: params, config artifact, metrics, tags, model files and status all land, and that user
  registers a model version from it and gives it an alias (the user who creates a model may manage it);
- a second user (default READ) sees the model but may not move its alias until the admin grants EDIT on it.
"""

from __future__ import annotations

import base64
import configparser
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from ray_retina.config import Config

from _train_utils import tiny_config

pytestmark = pytest.mark.slow

import flask_wtf  # noqa: E402,F401 - MLflow's basic-auth app needs mlflow[auth] (the dev extra installs it)

ROOT = Path(__file__).resolve().parents[2]
MLFLOW_SERVER = ROOT / "cluster" / "mlflow" / "mlflow-server.yaml"
START_TIMEOUT_S = 60
ADMIN = ("admin", "admin-pw-" + "x" * 16)  # MLflow wants >= 12 characters
TRAINER = ("trainer", "trainer-pw-0123456789")
VIEWER = ("viewer", "viewer-pw-0123456789")
MODEL_NAME = "retinanet_r50_fpn_auth"
# What a request with no credentials of ours must not inherit from the developer's shell.
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server (basic-auth) did not answer: {log.read_text()[-3000:]}")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (uvicorn and its worker), SIGKILL after 15 s."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _cluster_auth_ini(path: Path, database_uri: str) -> None:
    """Runs the manifest's auth-config init container script, then points its database_uri elsewhere."""
    deploy = next(d for d in yaml.safe_load_all(MLFLOW_SERVER.read_text()) if d and d["kind"] == "Deployment")
    writer = next(
        c for c in deploy["spec"]["template"]["spec"]["initContainers"] if c["name"] == "auth-config"
    )
    env = {
        "PATH": os.environ["PATH"],
        "DB_USER": "unused",
        "DB_PASSWORD": "unused",
        "MLFLOW_AUTH_CONFIG_PATH": str(path),
    }
    subprocess.run(writer["command"], env=env, check=True, timeout=30)
    ini = configparser.ConfigParser()
    ini.read(path)
    assert ini["mlflow"]["default_permission"] == "READ" and "admin_password" not in ini["mlflow"]
    ini["mlflow"]["database_uri"] = database_uri
    with open(path, "w") as f:
        ini.write(f)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, free_port) -> Iterator[str]:
    """The server's URL; the admin has created TRAINER and VIEWER."""
    d = tmp_path_factory.mktemp("mlflow_auth")
    ini = d / "basic_auth.ini"
    _cluster_auth_ini(ini, f"sqlite:///{d / 'auth.db'}")
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_ENV and k != "MLFLOW_TRACKING_URI"}
    env.update(
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        MLFLOW_AUTH_CONFIG_PATH=str(ini),
        MLFLOW_AUTH_ADMIN_USERNAME=ADMIN[0],
        MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN[1],
        MLFLOW_FLASK_SERVER_SECRET_KEY="test-flask-secret-key",
    )
    port = free_port()
    log = d / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--app-name",
                "basic-auth",
                "--backend-store-uri",
                f"sqlite:///{d / 'mlflow.db'}",
                "--artifacts-destination",
                str(d / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            cwd=d,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, log)
        with _as(ADMIN):
            from mlflow.server import get_app_client

            admin = get_app_client("basic-auth", tracking_uri=url)
            for name, password in (TRAINER, VIEWER):
                admin.create_user(username=name, password=password)
        yield url
    finally:
        _stop(proc)


@contextmanager
def _as(user: tuple[str, str] | None) -> Iterator[None]:
    """The MLflow client's credentials, exactly as a Ray pod gets them: two environment variables."""
    with pytest.MonkeyPatch.context() as mp:
        for k in CREDENTIAL_ENV:
            mp.delenv(k, raising=False)
        if user is not None:
            mp.setenv("MLFLOW_TRACKING_USERNAME", user[0])
            mp.setenv("MLFLOW_TRACKING_PASSWORD", user[1])
        yield


def _status(url: str, path: str, user: tuple[str, str] | None = None) -> int:
    req = urllib.request.Request(url + path)
    if user is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def _experiment_names(url: str) -> set[str]:
    from mlflow.tracking import MlflowClient

    with _as(ADMIN):
        return {e.name for e in MlflowClient(url).search_experiments()}


def test_requests_without_valid_credentials_are_refused(auth_server, tmp_path):
    from mlflow.exceptions import MlflowException

    from ray_retina.tracking import create_run

    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    assert _status(auth_server, "/health") == 200  # the kubelet's probes need no account
    assert _status(auth_server, search) == 401
    assert _status(auth_server, search, (TRAINER[0], "not-the-password")) == 401
    assert _status(auth_server, search, ("nobody", TRAINER[1])) == 401
    assert _status(auth_server, search, TRAINER) == 200

    cfg = tiny_config(tmp_path, auth_server, name="auth_refused")
    for user in (None, (TRAINER[0], "not-the-password")):
        with _as(user), pytest.raises(MlflowException, match="401"):
            create_run(cfg, run_name="refused")
    assert "auth_refused" not in _experiment_names(auth_server)


def _train_and_register(url: str, tmp_path: Path) -> tuple[Config, str, str]:
    """As TRAINER: a run through ray_retina.tracking, then a model version from its files.
    Returns (the run's config, run id, model version)."""
    from mlflow.tracking import MlflowClient

    from ray_retina.tracking import RunLogger, create_run

    cfg = tiny_config(tmp_path, url, name="auth_train")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.pt").write_bytes(b"weights")
    with _as(TRAINER):
        run_id = create_run(cfg, run_name="auth-run", tags={"ray_retina.kind": "train"})
        run_log = RunLogger(url, run_id)
        run_log.log_metrics({"train/loss_cls": 1.25, "val/AP": 0.125}, step=6)
        run_log.set_tags({"ray_retina.best_step": 6})
        run_log.log_artifact(model_dir / "model.pt", "model")
        run_log.end()

        client = MlflowClient(url)
        if not client.search_registered_models(filter_string=f"name = '{MODEL_NAME}'"):
            client.create_registered_model(MODEL_NAME)
        artifact_uri = client.get_run(run_id).info.artifact_uri
        version = client.create_model_version(MODEL_NAME, f"{artifact_uri}/model", run_id=run_id).version
        client.set_registered_model_alias(MODEL_NAME, "champion", version)
    return cfg, run_id, str(version)


def test_a_users_run_and_model_version_are_accepted(auth_server, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg, run_id, version = _train_and_register(auth_server, tmp_path)

    # RunLogger swallows tracking errors by design: read everything back to see that it landed.
    with _as(VIEWER):  # default_permission READ: a teammate sees the run and the model
        client = MlflowClient(auth_server)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.metrics == {"train/loss_cls": 1.25, "val/AP": 0.125}
        assert run.data.params["loss.gamma"] == str(cfg.loss.gamma)
        assert run.data.tags["ray_retina.best_step"] == "6" and run.data.tags["ray_retina.kind"] == "train"
        assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "model"}
        assert [a.path for a in client.list_artifacts(run_id, "model")] == ["model/model.pt"]
        mv = client.get_model_version_by_alias(MODEL_NAME, "champion")
        assert (mv.version, mv.run_id) == (version, run_id)


def test_promotion_needs_edit_on_the_model(auth_server, tmp_path):
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client
    from mlflow.tracking import MlflowClient

    _, _, version = _train_and_register(auth_server, tmp_path)
    with _as(VIEWER):
        client = MlflowClient(auth_server)
        assert client.get_registered_model(MODEL_NAME).name == MODEL_NAME
        with pytest.raises(MlflowException, match="403|PERMISSION_DENIED"):
            client.set_registered_model_alias(MODEL_NAME, "production", version)
        with pytest.raises(MlflowException, match="403|PERMISSION_DENIED"):
            client.create_model_version(MODEL_NAME, "mlflow-artifacts:/elsewhere/model")
    with _as(ADMIN):
        get_app_client("basic-auth", tracking_uri=auth_server).grant_user_permission(
            username=VIEWER[0], resource_type="registered_model", resource_id=MODEL_NAME, permission="EDIT"
        )
    with _as(VIEWER):
        MlflowClient(auth_server).set_registered_model_alias(MODEL_NAME, "production", version)
        assert (
            MlflowClient(auth_server).get_model_version_by_alias(MODEL_NAME, "production").version == version
        )
