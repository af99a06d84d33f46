"""The checkpoint format, and the one place that knows where checkpoints are and which one to use.

A checkpoint is a directory ``checkpoint_<iteration, 7 digits>`` in a Ray Train run directory, holding
``checkpoint.pt``: the dict ``Engine.state_dict()`` returns (model weights, optimizer, scheduler, AMP
scaler, iteration, epoch, per-rank RNG states, the resolved config and the ``cat_ids`` the contiguous
labels 0..K-1 stand for), loadable with ``torch.load(weights_only=True)``.

Which checkpoint a path means (:func:`find_checkpoint`): a ``checkpoint.pt`` file or a ``checkpoint_*``
directory is taken exactly; a run directory means its best checkpoint by ``val/AP`` as Ray Train's public
result API reports it (``ray.train.Result.from_path(run).get_best_checkpoint``), or its latest with
``which="latest"``. Paths are local or URIs (``s3://``, ...).
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import pyarrow.fs as pafs
import torch

from ray_retina._ray_private import CHECKPOINT_SNAPSHOT_FILE
from ray_retina.uri import dir_exists, file_exists, is_uri, join_uri, resolve_uri

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_PREFIX = "checkpoint_"
BEST_METRIC = "val/AP"
REQUIRED_KEYS = ("model", "config", "cat_ids")


def checkpoint_dir_name(iteration: int) -> str:
    """The name Ray Train gives the checkpoint reported at ``iteration`` (``checkpoint_dir_name``)."""
    return f"{CHECKPOINT_PREFIX}{iteration:07d}"


def save_checkpoint(state: dict[str, Any], directory: str | os.PathLike[str]) -> Path:
    """Write ``state`` as ``directory/checkpoint.pt`` (a local directory Ray then uploads)."""
    path = Path(directory) / CHECKPOINT_FILE
    torch.save(state, path)
    return path


def find_checkpoint(path: str | os.PathLike[str], which: Literal["best", "latest"] = "best") -> str:
    """The ``checkpoint.pt`` file (path or URI) that ``path`` means; see the module docstring.

    Raises ``FileNotFoundError`` naming ``path`` when there is no checkpoint there."""
    fs, p = resolve_uri(path)
    uri = os.fspath(path) if is_uri(path) else p  # local paths absolute (Ray's result API needs them so)
    scheme = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    if file_exists(fs, p):
        return uri
    if not dir_exists(fs, p):
        raise FileNotFoundError(f"checkpoint not found: {uri} does not exist")
    if file_exists(fs, join_uri(p, CHECKPOINT_FILE)):
        return join_uri(uri, CHECKPOINT_FILE)
    found = _run_checkpoint(uri, fs, p, which)
    if found is None:
        raise FileNotFoundError(
            f"no checkpoint in {uri}: expected {CHECKPOINT_FILE} in it, or a Ray Train run directory with "
            f"{CHECKPOINT_PREFIX}* directories holding one"
        )
    logger.info("using the %s checkpoint of %s: %s", which, uri, found)
    return join_uri(found if "://" in found or not scheme else scheme + found.lstrip("/"), CHECKPOINT_FILE)


def _run_checkpoint(uri: str, fs: pafs.FileSystem, p: str, which: str) -> str | None:
    """The best (by val/AP, through Ray's result API) or latest registered checkpoint dir of a run dir."""
    if file_exists(fs, join_uri(p, CHECKPOINT_SNAPSHOT_FILE)):
        import ray.train

        result = ray.train.Result.from_path(uri)
        ckpt = None
        if which == "best":
            try:
                ckpt = result.get_best_checkpoint(metric=BEST_METRIC, mode="max")
            except (RuntimeError, ValueError):  # no checkpoint reported val/AP
                ckpt = None
        if ckpt is None and result.best_checkpoints:
            ckpt = max(result.best_checkpoints, key=lambda cm: Path(cm[0].path).name)[0]
        if ckpt is not None and file_exists(fs, join_uri(resolve_uri(ckpt.path)[1], CHECKPOINT_FILE)):
            return ckpt.path
    # A run dir without Ray's snapshot (copied by hand): the newest checkpoint_* holding a checkpoint file.
    dirs = sorted(
        i.path
        for i in fs.get_file_info(pafs.FileSelector(p))
        if i.type == pafs.FileType.Directory
        and i.base_name.startswith(CHECKPOINT_PREFIX)
        and file_exists(fs, join_uri(i.path, CHECKPOINT_FILE))
    )
    if dirs and which == "best":
        logger.warning("%s has no Ray Train result metadata: using its latest checkpoint, not the best", uri)
    return dirs[-1] if dirs else None


def load_checkpoint_state(
    path: str | os.PathLike[str], which: Literal["best", "latest"] = "best"
) -> dict[str, Any]:
    """The checkpoint dict (on CPU) of a file, a checkpoint directory or a run directory; local or URI."""
    file = find_checkpoint(path, which)
    fs, p = resolve_uri(file)
    with fs.open_input_stream(p) as f:
        data = f.read()
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"{file}: not a ray-retina checkpoint (missing {missing})")
    return state


def cleanup_unregistered_checkpoints(storage: str, run_name: str) -> list[str]:
    """Delete checkpoint directories of a run that Ray uploaded but never registered (the run died between
    the upload and the registration), so that neither a resume nor a user picks up a half-reported state.
    Registered checkpoints are the ones in Ray Train's checkpoint manager snapshot. Returns what was removed."""
    fs, root = resolve_uri(storage)
    run_dir = join_uri(root, run_name)
    if not dir_exists(fs, run_dir):
        return []
    registered: set[str] = set()
    snap = join_uri(run_dir, CHECKPOINT_SNAPSHOT_FILE)
    if file_exists(fs, snap):
        with fs.open_input_stream(snap) as f:
            state = json.loads(f.read())
        registered = {r["checkpoint_dir_name"] for r in state.get("checkpoint_results", [])}
    removed = []
    for info in fs.get_file_info(pafs.FileSelector(run_dir)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith(CHECKPOINT_PREFIX):
            if info.base_name not in registered:
                fs.delete_dir(info.path)
                removed.append(info.path)
    if removed:
        logger.warning(
            "removed %d unregistered checkpoint dir(s) of run %s: %s", len(removed), run_name, removed
        )
    return removed
