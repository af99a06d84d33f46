"""Every private Ray API listed in ray_retina/_ray_private.py still exists: fails loudly on a Ray upgrade."""

from __future__ import annotations

import importlib
import logging

from ray_retina import _ray_private


def test_data_context_execution_index_exists():
    from ray.data import DataContext

    ctx = DataContext.get_current()
    assert hasattr(ctx, _ray_private.EXECUTION_INDEX_ATTR), (
        f"ray.data.DataContext.{_ray_private.EXECUTION_INDEX_ATTR} is gone: per-epoch augmentation draws "
        "(data/augment.py) need another source of the epoch"
    )
    assert isinstance(getattr(ctx, _ray_private.EXECUTION_INDEX_ATTR), int)
    assert _ray_private.ray_data_execution_index() == getattr(ctx, _ray_private.EXECUTION_INDEX_ATTR)


def test_checkpoint_snapshot_file_name_is_ray_trains():
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    assert CHECKPOINT_MANAGER_SNAPSHOT_FILENAME == _ray_private.CHECKPOINT_SNAPSHOT_FILE


def test_checkpoint_snapshot_holds_the_fields_we_read():
    """checkpoint.read_registered reads checkpoint_results[].checkpoint_dir_name; without them it deletes
    nothing (doubt), so a reshaped snapshot must fail here rather than quietly stop the clean-up."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )

    assert "checkpoint_results" in _CheckpointManagerState.model_fields
    assert "checkpoint_dir_name" in _TrainingResultState.model_fields


def test_no_other_private_ray_name_in_the_package():
    """A new private Ray name used in ray_retina/ must be added to _ray_private.py (and tested here)."""
    import re
    from pathlib import Path

    pkg = Path(_ray_private.__file__).parent
    hits = []
    for f in pkg.rglob("*.py"):
        if f.name == "_ray_private.py":
            continue
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(
                r"\bray\.[\w.]*\._\w+|from ray(\.[\w.]+)?\._internal|from ray(\.[\w.]+)? import _\w+", line
            ):
                hits.append(f"{f.relative_to(pkg)}:{n}: {line.strip()}")
    assert not hits, "private Ray APIs outside _ray_private.py:\n" + "\n".join(hits)


def test_train_report_logger_is_the_one_we_silence():
    import importlib
    import logging

    module = importlib.import_module(_ray_private.REPORT_LOGGER_MODULE)
    assert module.logger is logging.getLogger(module.__file__), "Ray Train's report logger changed its name"
    assert _ray_private.quiet_train_report_logs()
    assert not module.logger.isEnabledFor(logging.INFO)
    module.logger.setLevel(logging.NOTSET)


def test_rays_auth_on_notice_is_dropped_and_its_other_auth_warnings_kept(caplog):
    """The logger and the text are Ray's: its notice for a new local instance goes, the warning that auth is
    off (or any other line of that logger) still shows."""
    auth = importlib.import_module(_ray_private.AUTH_LOGGER)
    _ray_private.quiet_auth_notice()
    _ray_private.quiet_auth_notice()  # idempotent: one filter
    assert len(logging.getLogger(_ray_private.AUTH_LOGGER).filters) == 1
    with caplog.at_level(logging.WARNING, logger=_ray_private.AUTH_LOGGER):
        auth._warn_token_auth_enabled()
        auth._warn_token_auth_disabled()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith("Token authentication is disabled"), messages
