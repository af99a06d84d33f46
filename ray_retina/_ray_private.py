"""Every private Ray API ray-retina touches, in one place, each with what breaks without it.

Ray does not promise these across versions; ``tests/unit/test_ray_private.py`` fails loudly, naming the
entry, when a Ray upgrade moves or removes one. Keep this list complete: a new use of a private Ray name
elsewhere in the package is a review error.

| name | used for | if it disappears |
| --- | --- | --- |
| ``ray.data.DataContext._execution_idx`` | per-epoch augmentation draws (``data/augment.py``) | every epoch sees epoch 0's draws |
| ``checkpoint_manager_snapshot.json`` (Ray Train's run dir) | which checkpoints Ray registered (``checkpoint.py``) | half-reported checkpoints are not cleaned |
"""

from __future__ import annotations

# Ray Train V2 writes this file in the run directory with the registered checkpoints (checkpoint_results[].
# checkpoint_dir_name); ray_retina.checkpoint reads it to delete directories that were uploaded but never
# registered (a run that died between the two).
CHECKPOINT_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
EXECUTION_INDEX_ATTR = "_execution_idx"


def ray_data_execution_index() -> int:
    """Ray Data's execution index (one per pass over a data set) inside a data task; 0 elsewhere."""
    try:
        from ray.data import DataContext

        return int(getattr(DataContext.get_current(), EXECUTION_INDEX_ATTR, 0))
    except Exception:  # pragma: no cover - checked by tests/unit/test_ray_private.py
        return 0
