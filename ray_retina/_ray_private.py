"""Every private Ray API ray-retina touches, in one place, each with what breaks without it.

Ray does not promise these across versions; ``tests/unit/test_ray_private.py`` fails loudly, naming the
entry, when a Ray upgrade moves or removes one. Keep this list complete: a new use of a private Ray name
elsewhere in the package is a review error.

| name | used for | if it disappears |
| --- | --- | --- |
| ``ray.data.DataContext._execution_idx`` | per-epoch augmentation draws (``data/augment.py``) | every epoch sees epoch 0's draws |
| ``checkpoint_manager_snapshot.json`` (Ray Train's run dir): ``checkpoint_results[].checkpoint_dir_name`` | which checkpoints Ray registered (``checkpoint.py``) | nothing is deleted (doubt); a resume starts from the newest checkpoint that loads |
| logger named ``ray.train.v2._internal.execution.context.__file__`` | silencing the per-report metrics dump (``engine/worker.py``) | "Reporting training result ..." lines come back |
| logger ``ray._private.authentication.authentication_token_setup`` and its "Token authentication is enabled" text | dropping Ray's notice that a new local instance has token auth on (``engine/session.py``) | the notice comes back at every local start |
"""

from __future__ import annotations

import importlib
import logging

# Ray Train V2 writes this file in the run directory with the registered checkpoints (checkpoint_results[].
# checkpoint_dir_name), in place (a kill can truncate it); ray_retina.checkpoint reads it to delete directories
# that were uploaded but never registered (a run that died between the two), and only when it reads cleanly.
CHECKPOINT_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
EXECUTION_INDEX_ATTR = "_execution_idx"


def ray_data_execution_index() -> int:
    """Ray Data's execution index (one per pass over a data set) inside a data task; 0 elsewhere."""
    try:
        from ray.data import DataContext  # deferred: callable from a Ray-free data step

        return int(getattr(DataContext.get_current(), EXECUTION_INDEX_ATTR, 0))
    except Exception:  # pragma: no cover - checked by tests/unit/test_ray_private.py
        return 0


REPORT_LOGGER_MODULE = "ray.train.v2._internal.execution.context"


def quiet_train_report_logs() -> bool:
    """Ray Train V2 logs every ``ray.train.report`` with all its metrics at INFO through a logger named by
    its module's *file path* (``logging.getLogger(__file__)``), under the root logger, so neither
    ``LoggingConfig`` nor the ``ray.train`` logger's level reaches it. Raise that logger to WARNING.
    Returns whether the module was found."""
    try:
        module = importlib.import_module(REPORT_LOGGER_MODULE)
    except ImportError:  # pragma: no cover - checked by tests/unit/test_ray_private.py
        return False
    logging.getLogger(module.__file__).setLevel(logging.WARNING)
    return True


# Ray announces, as a warning, the token auth it turns on for every new local instance. Auth stays on; the
# notice goes unless verbose. Its other warnings (auth off, a token missing) still show.
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
AUTH_ON_NOTICE = "Token authentication is enabled for this Ray cluster"


class _DropNotice(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_auth_notice() -> None:
    """Drop Ray's "token authentication is enabled" notice in this process (idempotent); auth is unchanged."""
    log = logging.getLogger(AUTH_LOGGER)
    if not any(isinstance(f, _DropNotice) for f in log.filters):
        log.addFilter(_DropNotice(AUTH_ON_NOTICE))
