"""The MLflow model is self-contained: it carries the ray_retina package (MLflow ``code_paths``) and its
requirements name ray-retina's dependencies, not ray-retina (not on PyPI). Checked in a subprocess whose
Python cannot import the installed ray_retina. (Done by hand once, 2026-12-02: a fresh venv with only the
model's requirements.txt installed, then ``mlflow models predict --env-manager local``, gave the first
detection of README's exchange.)"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import sysconfig

import mlflow.pyfunc
import pandas as pd


def test_model_carries_the_package(untrained_pyfunc_dir, val_jpegs, tmp_path):
    """The model directory holds ray_retina (MLflow code_paths), so an environment without ray-retina
    installed serves it: a Python whose site-packages are a plain path entry (``-S``: the editable install's
    .pth finder never runs, so the installed ray_retina cannot be imported) loads the model from its own
    directory alone and detects what the model loaded here detects."""
    code = untrained_pyfunc_dir / "code" / "ray_retina"
    assert (code / "serving.py").is_file() and (code / "engine" / "evaluate.py").is_file()
    assert not list(code.rglob("__pycache__"))
    (tmp_path / "images.json").write_text(json.dumps([base64.b64encode(b).decode() for b in val_jpegs]))
    script = f"""
import base64, importlib.util, json, sys
assert importlib.util.find_spec("ray_retina") is None, "the installed ray_retina is importable"
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model({str(untrained_pyfunc_dir)!r})
import ray_retina
assert ray_retina.__file__.startswith({str(untrained_pyfunc_dir)!r}), ray_retina.__file__
val_jpegs = [base64.b64decode(s) for s in json.load(open("images.json"))]
frame = model.predict(pd.DataFrame({{"image": val_jpegs}}), params={{"score_thresh": 0.52}})
frame.to_json("frame.json", orient="split", double_precision=15)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = sysconfig.get_paths()["purelib"]
    proc = subprocess.run(
        [sys.executable, "-S", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = pd.read_json(tmp_path / "frame.json", orient="split", dtype=False)
    ref = mlflow.pyfunc.load_model(str(untrained_pyfunc_dir)).predict(
        pd.DataFrame({"image": val_jpegs}), params={"score_thresh": 0.52}
    )
    assert len(ref) > 0
    pd.testing.assert_frame_equal(got, ref, check_dtype=False, rtol=1e-6)
