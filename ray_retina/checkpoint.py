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
import time
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


# Test-only fault injection: "ITERATION:PAUSE_FILE" makes the process that saves the checkpoint of that
# iteration write half of it under its temporary name, create PAUSE_FILE holding its pid, and sleep (a test
# kills it there). Never set in real runs.
SAVE_PAUSE_ENV = "RAY_RETINA_TEST_PAUSE_IN_SAVE"


def save_checkpoint(state: dict[str, Any], directory: str | os.PathLike[str]) -> Path:
    """Write ``state`` as ``directory/checkpoint.pt`` (a local directory Ray then uploads).

    Written under a temporary name and renamed when complete, so that ``checkpoint.pt`` is either absent or
    whole whatever moment the process dies at; Ray uploads the directory only after this returns."""
    path = Path(directory) / CHECKPOINT_FILE
    tmp = path.with_name(f".{CHECKPOINT_FILE}.partial")
    buf = io.BytesIO()
    torch.save(state, buf)
    with open(tmp, "wb") as f:
        data = buf.getbuffer()
        f.write(data[: len(data) // 2])
        _maybe_pause_in_save(int(state.get("iteration", -1)))
        f.write(data[len(data) // 2 :])
        f.flush()
        os.fsync(f.fileno())  # the bytes on disk before the name says the file is complete
    os.replace(tmp, path)
    return path


def _maybe_pause_in_save(iteration: int) -> None:
    spec = os.environ.get(SAVE_PAUSE_ENV)
    if not spec:
        return
    want, pause_file = spec.split(":", 1)
    if int(want) == iteration and not os.path.exists(pause_file):
        Path(pause_file).write_text(str(os.getpid()))
        logger.error("test hook %s: pausing inside the save of iteration %d", SAVE_PAUSE_ENV, iteration)
        time.sleep(600)


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
    registered, problem = read_registered(fs, p)
    if problem is not None and problem != "missing":
        logger.warning("%s: Ray's checkpoint snapshot is %s", uri, problem)
    if registered is not None:
        import ray.train  # deferred: reading and writing checkpoints needs no Ray

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


def read_registered(fs: pafs.FileSystem, run_dir: str) -> tuple[set[str] | None, str | None]:
    """The checkpoint directory names Ray Train registered in ``run_dir`` (its snapshot file), and why they
    are unknown when they are: ``(names, None)``, or ``(None, "missing" | "unreadable: <error>")``."""
    snap = join_uri(run_dir, CHECKPOINT_SNAPSHOT_FILE)
    if not file_exists(fs, snap):
        return None, "missing"
    try:
        with fs.open_input_stream(snap) as f:
            state = json.loads(f.read())
        results = state["checkpoint_results"]
        return {str(r["checkpoint_dir_name"]) for r in results}, None
    except (ValueError, KeyError, TypeError) as err:  # truncated (Ray writes it in place) or reshaped
        return None, f"unreadable: {type(err).__name__}: {err}"


def _checkpoint_dirs(fs: pafs.FileSystem, run_dir: str) -> list[pafs.FileInfo]:
    """The ``checkpoint_*`` directories of a run directory, oldest first (names hold the iteration)."""
    infos = fs.get_file_info(pafs.FileSelector(run_dir))
    dirs = [
        i for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX)
    ]
    return sorted(dirs, key=lambda i: i.base_name)


def newest_loadable_checkpoint(storage: str, run_name: str) -> tuple[str | None, list[str]]:
    """The newest ``checkpoint_*`` directory of a run whose ``checkpoint.pt`` loads (checked by loading it:
    a half-copied file does not), or None; and the names of the newer ones that did not load."""
    fs, root = resolve_uri(storage)
    uri_dir = join_uri(storage, run_name)
    failed = []
    for info in reversed(_checkpoint_dirs(fs, join_uri(root, run_name))):
        where = join_uri(uri_dir, info.base_name)
        try:
            load_checkpoint_state(where)
        except Exception as err:  # noqa: BLE001 - any failure to load means "not this one"
            logger.info("checkpoint %s does not load: %s", where, str(err).splitlines()[0][:200])
            failed.append(info.base_name)
            continue
        return where, failed
    return None, failed


def cleanup_unregistered_checkpoints(storage: str, run_name: str) -> list[str]:
    """Delete checkpoint directories of a run that Ray uploaded but never registered (the run died between
    the upload and the registration), so that neither a resume nor a user picks up a half-reported state.

    Deletes only what Ray's snapshot proves unregistered: a directory absent from a readable snapshot and
    newer than every checkpoint it lists (older ones are Ray's evictions or a fallback's history, left alone).
    Without a readable snapshot nothing is deleted. Returns what was removed."""
    fs, root = resolve_uri(storage)
    run_dir = join_uri(root, run_name)
    if not dir_exists(fs, run_dir):
        return []
    registered, _ = read_registered(fs, run_dir)
    if registered is None:
        return []
    newest = max(registered, default="")
    removed = []
    for info in _checkpoint_dirs(fs, run_dir):
        if info.base_name not in registered and info.base_name > newest:
            fs.delete_dir(info.path)
            removed.append(info.path)
    if removed:
        logger.warning(
            "removed %d unregistered checkpoint dir(s) of run %s: %s", len(removed), run_name, removed
        )
    return removed


def prepare_resume(storage: str, run_name: str) -> str | None:
    """Make a run directory safe to resume and say where to resume from when Ray cannot.

    With a readable snapshot: unregistered directories are cleaned (:func:`cleanup_unregistered_checkpoints`)
    and Ray resumes from its snapshot (returns None). Without one (a copied run directory) nothing is
    deleted; with an unreadable one the file is moved aside (``.corrupt``) so that Ray starts a new snapshot.
    In both cases the newest checkpoint that loads is returned, with one warning line, for the workers to
    start from (``loop_config["resume_from"]``); None when the run has no checkpoint directory."""
    fs, root = resolve_uri(storage)
    run_dir = join_uri(root, run_name)
    if not dir_exists(fs, run_dir):
        return None
    registered, problem = read_registered(fs, run_dir)
    if registered is not None:
        cleanup_unregistered_checkpoints(storage, run_name)
        return None
    if not _checkpoint_dirs(fs, run_dir):
        return None
    if problem != "missing":
        snap = join_uri(run_dir, CHECKPOINT_SNAPSHOT_FILE)
        fs.move(snap, f"{snap}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    found, failed = newest_loadable_checkpoint(storage, run_name)
    logger.warning(
        "run %s: Ray's checkpoint snapshot is %s; nothing deleted; resuming from %s%s",
        run_name,
        problem,
        found or "scratch (no checkpoint loads)",
        f" (newer, not loadable: {', '.join(failed)})" if failed else "",
    )
    return found
