"""Tracking never holds up training: a real `mlflow server` on 127.0.0.1 is SIGKILLed while `ray-retina
train` runs and started again on the same port and store some seconds later. The run finishes, says in
one line that everything was sent, and MLflow holds every metric point, each once. The wall time against an
undisturbed run is measured by `benchmarks/tracking_outage.py` (medians of several runs), not asserted here."""

from __future__ import annotations

import pytest
from _mlflow_server import MlflowServer, train_against
from mlflow.tracking import MlflowClient

from ray_retina.config import to_yaml
from ray_retina.engine.session import ensure_data

from _train_utils import tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ITERS = 30
EVAL_PERIOD = 15
DOWN_S = 5.0  # plus the server's own start (~6 s idle, more on a loaded machine)


def test_training_goes_on_through_an_mlflow_outage_and_every_point_arrives(tmp_path, free_port):
    cfg = tiny_config(
        tmp_path,
        "",
        name="outage",
        **{
            "optim.max_iters": ITERS,
            "optim.steps": [ITERS],
            "train.eval_period": EVAL_PERIOD,
            "train.log_period": 1,
            "tracking.tracking_uri": None,  # MLFLOW_TRACKING_URI of the server
        },
    )
    ensure_data(cfg)
    config_file = tmp_path / "outage.yaml"
    config_file.write_text(to_yaml(cfg))
    server = MlflowServer(tmp_path / "mlflow", free_port())
    server.start()
    try:
        run = train_against(server, config_file, "outage-run", kill_after_points=2, down_s=DOWN_S)
        assert run.returncode == 0, run.output[-3000:]
        assert run.down_s >= DOWN_S, "the server was not killed mid-run"
        assert "MLflow: everything sent to run" in run.output, run.output[-3000:]

        client = MlflowClient(server.url)
        exp = client.get_experiment_by_name("outage")
        (mlflow_run,) = client.search_runs(
            [exp.experiment_id], filter_string="tags.`mlflow.runName` = 'outage-run'"
        )
        run_id = mlflow_run.info.run_id
        assert mlflow_run.info.status == "FINISHED"
        evals = list(range(EVAL_PERIOD, ITERS + 1, EVAL_PERIOD))
        for key in ("train/lr", "train/loss_cls", "train/loss_box"):
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            # every point, each once: one per step from the progress log, one more per eval from the report
            assert sorted(steps) == sorted([*range(1, ITERS + 1), *evals]), key
        for key in ("val/AP", "train/images_per_s"):
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            assert sorted(steps) == evals, key
        assert mlflow_run.data.tags["ray_retina.best_checkpoint"].endswith(f"checkpoint_{ITERS:07d}")
    finally:
        server.kill()
