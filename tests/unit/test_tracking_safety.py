"""Tracking against a real MLflow store (one SQLite file for the module): credentials in URIs never reach
params, tags, the logged config.yaml or the console; a dead server never holds up a log call and loses no
point (they wait in the spool and a later logger of the run sends them); a run name with an MLflow run is
refused before Ray starts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ray_retina import tracking
from ray_retina.config import apply_overrides, load_config
from ray_retina.engine.session import RunNameTaken

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-pa55"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite tracking store for the module (its first creation costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _config(tmp_path: Path, uri: str, **over):
    base = {"name": "safety", "run.storage_path": str(tmp_path / "runs"), "tracking.tracking_uri": uri}
    return apply_overrides(load_config(ROOT / "configs" / "smoke.yaml"), {**base, **over})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs", "s3://***@bucket/runs"),
        (f"https://user:{SECRET}@mlflow.example.com:5000", "https://***@mlflow.example.com:5000"),
        (f"postgresql://mlflow:{SECRET}@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        (
            f"see gs://bucket/x?token={SECRET}&a=1 and sqlite:///x.db",
            "see gs://bucket/x?token=***&a=1 and sqlite:///x.db",
        ),
        ("s3://bucket/plain/path", "s3://bucket/plain/path"),
        ("user@example.com is an address, not a URI", "user@example.com is an address, not a URI"),
    ],
)
def test_redact(text, expected):
    assert tracking.redact(text) == expected


def test_credentials_stay_out_of_params_tags_config_and_console(tmp_path, store, capsys):
    from mlflow.tracking import MlflowClient

    from ray_retina.cli import _print_summary
    from ray_retina.engine.trainer import TrainOutcome

    cfg = _config(
        tmp_path,
        store,
        **{
            "run.storage_path": f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs",
            "data.train_shards": f"https://user:{SECRET}@data.example.com/train",
        },
    )
    run_id = tracking.create_run(cfg, run_name="creds", uri=store, tags={"where": f"s3://k:{SECRET}@b/x"})
    logger = tracking.RunLogger(store, run_id, spool_dir=tmp_path)
    logger.set_tags({"ray_retina.storage_path": cfg.run.storage_path})
    assert "everything sent" in logger.end()
    assert logger.all_sent and logger.resumed == 0  # the driver has no news to print

    client = MlflowClient(store)
    run = client.get_run(run_id)
    config_yaml = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()
    logged = [*run.data.params.values(), *run.data.tags.values(), config_yaml]
    assert not [v for v in logged if SECRET in v]
    assert run.data.params["run.storage_path"] == "s3://***@bucket/runs"
    assert run.data.tags["ray_retina.storage_path"] == "s3://***@bucket/runs"
    assert run.data.tags["where"] == "s3://***@b/x"
    assert "https://***@data.example.com/train" in config_yaml

    outcome = TrainOutcome({}, None, "creds", run_id, f"https://u:{SECRET}@mlflow:5000", None, 1.0)
    _print_summary(outcome, cfg)
    out = capsys.readouterr().out
    assert SECRET not in out and "https://***@mlflow:5000" in out


def test_a_dead_server_costs_a_log_call_nothing_and_loses_no_point(tmp_path, store, free_port, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run_id = tracking.create_run(_config(tmp_path, store), run_name="outage", uri=store)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    logger = tracking.RunLogger(dead, run_id, spool_dir=tmp_path, flush_s=0.5)
    t0 = time.perf_counter()
    for step in range(1, 21):
        logger.log_metrics({"train/loss_cls": 1.0 / step, "train/lr": 0.01}, step=step)
    # Each call only appends to the spool; a call that waited on the server would take >= 1 s by itself.
    assert time.perf_counter() - t0 < 1.0
    summary = logger.close()
    assert summary.startswith(
        "MLflow: 40 metric points and 0 tags/status could not be sent to http://127.0.0.1"
    )
    assert not logger.all_sent
    spool = tmp_path / f"mlflow-pending-{run_id}.jsonl"
    assert len(spool.read_text().splitlines()) == 40

    # The server back (here: the store itself): the next logger of the run sends what waited, in order.
    again = tracking.RunLogger(store, run_id, spool_dir=tmp_path)
    assert again.resumed == 40  # what the earlier logger left: the driver says it sent them
    again.log_metrics({"train/loss_cls": 0.01}, step=21)
    assert "everything sent" in again.end()
    assert again.all_sent
    history = MlflowClient(store).get_metric_history(run_id, "train/loss_cls")
    assert sorted(m.step for m in history) == list(range(1, 22))
    assert {m.step: m.value for m in history}[4] == pytest.approx(0.25)
    assert MlflowClient(store).get_run(run_id).info.status == "FINISHED"
    assert not spool.exists()


def test_end_logs_its_line_unless_told_not_to(tmp_path, store, caplog):
    """Rank 0 logs its closing line; the driver's logger returns it unlogged (the CLI prints it when news)."""
    run_id = tracking.create_run(_config(tmp_path, store), run_name="lines", uri=store)
    with caplog.at_level("INFO", logger="ray_retina.tracking"):
        line = tracking.RunLogger(store, run_id, spool_dir=tmp_path).end(log=False)
        assert "everything sent" in line and not caplog.records
        tracking.RunLogger(store, run_id, spool_dir=tmp_path).end()
        assert [r.getMessage() for r in caplog.records] == [
            f"MLflow: everything sent to run {run_id} (1 item)"
        ]


def test_train_refuses_a_name_that_has_an_mlflow_run_before_ray_starts(tmp_path, store):
    from ray_retina.engine.trainer import train

    cfg = _config(tmp_path, store)
    tracking.create_run(cfg, run_name="taken", uri=store)
    with pytest.raises(RunNameTaken, match="'taken' already has MLflow run"):
        train(cfg, run_name="taken")
    assert not (tmp_path / "runs").exists()  # refused before anything was created


def test_a_tracking_server_down_at_start_stops_the_run_in_one_line(tmp_path, free_port):
    from ray_retina.engine.trainer import train

    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(
        tracking.TrackingUnavailable, match=r"^MLflow tracking server http://127.0.0.1:\d+ is not"
    ):
        train(_config(tmp_path, dead), run_name="x")
    assert not (tmp_path / "runs").exists()
