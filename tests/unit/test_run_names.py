"""One writer per run name: a name that ran before is refused unless resumed, a name that is running is
refused always, default names never collide; and restarts are on by default."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ray_retina.config import Config, apply_overrides, load_config
from ray_retina.engine.session import DRIVER_LOCK, RunNameTaken, claim_run_name, default_run_name

ROOT = Path(__file__).resolve().parents[2]


def test_default_run_names_are_unique_and_readable():
    names = {default_run_name(Config(name="smoke")) for _ in range(200)}
    assert len(names) == 200  # same second, same millisecond: the random suffix still separates them
    assert all(re.fullmatch(r"smoke-\d{8}-\d{6}-\d{3}-[0-9a-f]{4}", n) for n in names)
    assert default_run_name(apply_overrides(Config(), {"run.name": "mine"})) == "mine"


def test_a_run_name_that_ran_is_refused_unless_resumed(tmp_path):
    storage = str(tmp_path / "runs")
    with claim_run_name(storage, "a", resume=False):
        assert (tmp_path / "runs" / "a").is_dir()
    with pytest.raises(RunNameTaken, match=r"'a' already ran in .*--resume a"):
        with claim_run_name(storage, "a", resume=False):
            pass
    with claim_run_name(storage, "a", resume=True):  # the resume of a finished run is allowed
        pass
    with pytest.raises(RunNameTaken, match="nothing to resume: no run 'b'"):
        with claim_run_name(storage, "b", resume=True):
            pass


def test_a_running_name_is_refused_even_with_resume(tmp_path):
    storage = str(tmp_path / "runs")
    with claim_run_name(storage, "a", resume=False):
        # flock belongs to an open file description: a second open in this process conflicts like another
        # process's would
        with pytest.raises(RunNameTaken, match=r"'a' is running now \(driver pid \d+ on "):
            with claim_run_name(storage, "a", resume=True):
                pass
    assert (tmp_path / "runs" / "a" / DRIVER_LOCK).exists()
    with claim_run_name(storage, "a", resume=True):  # released when the first driver is done
        pass


def test_restarts_are_on_by_default():
    assert Config().run.max_failures == 3
    assert load_config(ROOT / "configs" / "smoke.yaml").run.max_failures == 3
