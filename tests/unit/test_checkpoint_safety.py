"""Resume never deletes a checkpoint on doubt: a run directory without Ray's snapshot, or with a truncated one,
keeps every checkpoint and resumes from the newest that loads; only a readable snapshot proves a directory
unregistered. A checkpoint file is complete or absent."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from ray_retina._ray_private import CHECKPOINT_SNAPSHOT_FILE
from ray_retina.checkpoint import (
    CHECKPOINT_FILE,
    checkpoint_dir_name,
    cleanup_unregistered_checkpoints,
    find_checkpoint,
    prepare_resume,
    save_checkpoint,
)


def _write_run(run: Path, iterations: list[int], truncated: tuple[int, ...] = ()) -> None:
    """A run directory with one small loadable checkpoint per iteration; those in ``truncated`` cut in half
    (a copy that died midway)."""
    for it in iterations:
        d = run / checkpoint_dir_name(it)
        d.mkdir(parents=True)
        state = {
            "model": {"w": torch.full((4,), float(it))},
            "config": {"name": "x"},
            "cat_ids": [1],
            "iteration": it,
        }
        f = save_checkpoint(state, d)
        if it in truncated:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _snapshot(run: Path, registered: list[int]) -> None:
    results = [{"checkpoint_dir_name": checkpoint_dir_name(i)} for i in registered]
    (run / CHECKPOINT_SNAPSHOT_FILE).write_text(json.dumps({"checkpoint_results": results}))


def _dirs(run: Path) -> list[str]:
    return sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir())


def test_missing_snapshot_deletes_nothing_and_resumes_from_newest_loadable(tmp_path, caplog):
    run = tmp_path / "runs" / "r"
    _write_run(run, [4, 8, 12], truncated=(12,))
    with caplog.at_level(logging.WARNING, logger="ray_retina.checkpoint"):
        start = prepare_resume(str(tmp_path / "runs"), "r")
    assert start == str(run / "checkpoint_0000008")
    assert _dirs(run) == ["checkpoint_0000004", "checkpoint_0000008", "checkpoint_0000012"]
    assert cleanup_unregistered_checkpoints(str(tmp_path / "runs"), "r") == []
    said = [r.getMessage() for r in caplog.records if "snapshot" in r.getMessage()]
    assert len(said) == 1 and "missing" in said[0] and "nothing deleted" in said[0]


def test_truncated_snapshot_falls_back_to_newest_loadable_with_one_warning(tmp_path, caplog):
    run = tmp_path / "runs" / "r"
    _write_run(run, [4, 8])
    _snapshot(run, [4, 8])
    snap = run / CHECKPOINT_SNAPSHOT_FILE
    snap.write_text(snap.read_text()[:25])  # Ray writes it in place: a kill leaves a prefix
    with caplog.at_level(logging.WARNING, logger="ray_retina.checkpoint"):
        start = prepare_resume(str(tmp_path / "runs"), "r")
    assert start == str(run / "checkpoint_0000008")
    assert torch.load(Path(start) / CHECKPOINT_FILE, weights_only=True)["iteration"] == 8
    assert _dirs(run) == ["checkpoint_0000004", "checkpoint_0000008"]
    # moved aside (kept for a post-mortem) so that Ray starts a new snapshot instead of failing on it
    assert not snap.exists() and len(list(run.glob(f"{CHECKPOINT_SNAPSHOT_FILE}.corrupt-*"))) == 1
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and "unreadable" in said[0] and "JSONDecodeError" in said[0]


def test_find_checkpoint_survives_a_truncated_snapshot(tmp_path):
    run = tmp_path / "r"
    _write_run(run, [4, 8])
    (run / CHECKPOINT_SNAPSHOT_FILE).write_text('{"checkpoint_results": [{"checkpoint_')
    assert find_checkpoint(run, "latest") == str(run / "checkpoint_0000008" / CHECKPOINT_FILE)


def test_readable_snapshot_deletes_only_newer_unregistered_dirs(tmp_path):
    run = tmp_path / "runs" / "r"
    _write_run(run, [2, 4, 8, 12])
    _snapshot(run, [4, 8])  # 12: uploaded, never registered; 2: older than what Ray lists, left alone
    assert prepare_resume(str(tmp_path / "runs"), "r") is None  # Ray resumes from its snapshot
    assert _dirs(run) == ["checkpoint_0000002", "checkpoint_0000004", "checkpoint_0000008"]


def test_snapshot_without_checkpoint_list_is_doubt_not_proof(tmp_path):
    run = tmp_path / "runs" / "r"
    _write_run(run, [4])
    (run / CHECKPOINT_SNAPSHOT_FILE).write_text(json.dumps({"renamed_by_a_future_ray": []}))
    assert cleanup_unregistered_checkpoints(str(tmp_path / "runs"), "r") == []
    assert prepare_resume(str(tmp_path / "runs"), "r") == str(run / "checkpoint_0000004")
    assert _dirs(run) == ["checkpoint_0000004"]


def test_save_leaves_no_partial_checkpoint_file(tmp_path):
    save_checkpoint({"model": {}, "config": {}, "cat_ids": []}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]


def test_prepare_resume_of_a_new_run_is_a_no_op(tmp_path):
    assert prepare_resume(str(tmp_path), "new") is None
    (tmp_path / "empty").mkdir()
    assert prepare_resume(str(tmp_path), "empty") is None


@pytest.mark.parametrize("registered", [[], [4]])
def test_every_unregistered_newer_dir_is_removed(tmp_path, registered):
    run = tmp_path / "runs" / "r"
    _write_run(run, [4, 8])
    _snapshot(run, registered)
    removed = cleanup_unregistered_checkpoints(str(tmp_path / "runs"), "r")
    expected = [
        c for c in ("checkpoint_0000004", "checkpoint_0000008") if int(c[-7:]) > max(registered, default=0)
    ]
    assert sorted(Path(p).name for p in removed) == expected
