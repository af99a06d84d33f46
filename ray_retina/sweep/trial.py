"""One trial of a sweep: the base config with the trial's sampled keys, trained by its own TorchTrainer.

Train V2 pattern: Tune runs a function trainable per trial; that function builds the trial's TorchTrainer
with ``TuneReportCallback`` (a Trainer passed to ``Tuner`` fails under Train V2). ``param_space`` holds only
the searched keys; the sweep's constants (:class:`SweepSetup`) travel beside the trainable through
``tune.with_parameters`` (Ray's object store), and are saved as JSON in the sweep's folder so that
``--resume`` rebuilds the same trainable.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import ray
import ray.tune
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.annotations import RayDeprecationWarning

from ray_retina import tracking
from ray_retina.config import apply_overrides, config_from_dict
from ray_retina.engine.session import TRIAL_RESOURCE, abs_storage
from ray_retina.engine.trainer import build_trainer
from ray_retina.sweep.space import trial_label, trial_overrides
from ray_retina.uri import file_exists, join_uri, open_input, resolve_uri, write_bytes_atomic

logger = logging.getLogger(__name__)

SETUP_FILE = "ray_retina_sweep.json"
NOISE_TAG = "ray_retina.noise_repeat"  # "true" on the child runs of a sweep's noise repeats
NOISE_SUFFIX = ".noise"  # the noise repeats' Tune experiment: a folder beside the sweep's


@dataclass(frozen=True)
class SweepSetup:
    """What every trial of a sweep shares and nothing searches."""

    base: dict[str, Any]
    """The base config (``Config.model_dump(mode="json")``, paths resolved)."""
    sweep_name: str
    mlflow_uri: str | None
    parent_run_id: str | None
    preset: str | None
    verbose: bool = False
    noise: bool = False
    """The trials are the noise repeats of the base config (tagged :data:`NOISE_TAG`)."""

    def save(self, sweep_dir: str) -> None:
        """Write to ``<sweep_dir>/ray_retina_sweep.json`` (read back by ``--resume``)."""
        fs, path = resolve_uri(join_uri(sweep_dir, SETUP_FILE))
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        write_bytes_atomic(fs, path, json.dumps(dataclasses.asdict(self), indent=1).encode())

    @classmethod
    def load(cls, sweep_dir: str) -> SweepSetup:
        uri = join_uri(sweep_dir, SETUP_FILE)
        fs, path = resolve_uri(uri)
        if not file_exists(fs, path):
            raise FileNotFoundError(f"{uri}: not a ray-retina sweep folder (no {SETUP_FILE})")
        with open_input(uri) as f:
            return cls(**json.loads(f.read()))


def run_trial(trial_params: dict[str, Any], setup: SweepSetup) -> None:
    """One trial: ``trial_params`` (the searched keys only) applied to ``setup.base``, trained by its own
    TorchTrainer; its metrics reach Tune through ``TuneReportCallback`` and MLflow as a child run of the
    sweep's parent run (named by its parameters)."""
    if not setup.verbose:
        # Ray warns about its own internal calls (ExecutionOptions.exclude_resources): not the user's.
        warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    params = trial_overrides(trial_params)
    cfg = apply_overrides(config_from_dict(setup.base), params)
    trial_id = ray.tune.get_context().get_trial_id()
    run_name = f"{setup.sweep_name}-{trial_id}"  # the Ray Train run (a directory name)
    run_id = None
    if setup.mlflow_uri:
        # Named by its parameters in the MLflow UI, so a Compare view reads without a lookup table. A restored
        # trial (same params, same trial id) finds its run again by that name: one MLflow run per trial.
        label = trial_label(params, trial_id)
        run_id = _trial_run(cfg, setup, label, trial_id, params, run_name)
    trainer = build_trainer(
        cfg,
        run_name=run_name,
        mlflow_uri=setup.mlflow_uri,
        mlflow_run_id=run_id,
        callbacks=[TuneReportCallback()],
        verbose=setup.verbose,
        console_tag=trial_id,
    )
    result = trainer.fit()
    if run_id:
        # The trial's workers spool into its run directory: what they could not send goes out here.
        spool = join_uri(abs_storage(cfg.run.storage_path), run_name)
        log = tracking.RunLogger(setup.mlflow_uri, run_id, spool_dir=spool)
        with tracking.no_run_links():  # one link per trial would crowd the sweep's console
            log.end("FAILED" if result.error is not None else "FINISHED")
    if result.error is not None:
        raise result.error


def _trial_run(
    cfg: Any, setup: SweepSetup, label: str, trial_id: str, params: dict[str, Any], run_name: str
) -> str | None:
    """The trial's MLflow run (found again by its name on a restore, else created); None, said in one line,
    when the tracking server does not answer: the trial trains anyway and only its MLflow run is missing."""
    try:
        return tracking.find_run_by_name(
            setup.mlflow_uri, tracking.experiment_name(cfg), label
        ) or tracking.create_run(
            cfg,
            run_name=label,
            uri=setup.mlflow_uri,
            parent_run_id=setup.parent_run_id,
            tags={
                tracking.TRIAL_TAG: trial_id,
                NOISE_TAG: str(setup.noise).lower(),
                **{f"sweep.{k}": str(v) for k, v in params.items()},
                # where `ray-retina export --run/--sweep` finds the trial's checkpoints (its MLflow name is
                # its parameters, not the Ray Train run name)
                **tracking.checkpoint_tags(abs_storage(cfg.run.storage_path), run_name),
            },
        )
    except Exception as err:  # noqa: BLE001 - tracking must never stop a trial
        print(
            f"[tune] trial {trial_id}: MLflow at {tracking.redact(setup.mlflow_uri or '')} did not answer "
            f"({type(err).__name__}): the trial trains without its MLflow run",
            flush=True,
        )
        return None


def trainable(setup: SweepSetup) -> Any:
    """:func:`run_trial` bound to ``setup`` (``tune.with_parameters``), asking for the drivers' resource.

    The trial function only drives its TorchTrainer: it asks for the drivers' custom resource and no CPU,
    so the CPUs go to the trainers (a cluster without the resource: a hundredth of a CPU)."""
    if ray.cluster_resources().get(TRIAL_RESOURCE, 0) >= 1:
        driver_resources = {"CPU": 0, TRIAL_RESOURCE: 1}
    else:
        logger.warning("cluster has no %r resource; trial drivers take 0.01 CPU each", TRIAL_RESOURCE)
        driver_resources = {"CPU": 0.01}
    return tune.with_resources(tune.with_parameters(run_trial, setup=setup), driver_resources)
