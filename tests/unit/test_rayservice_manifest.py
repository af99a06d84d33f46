"""cluster/kuberay/rayservice.yaml: a Serve config Ray accepts, an application builder that exists, serve
overrides the config validates, and GPU pods enough for the most replicas it scales to."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from ray_retina.config import Config, apply_overrides

MANIFEST = Path(__file__).resolve().parents[2] / "cluster" / "kuberay" / "rayservice.yaml"


def test_rayservice_serves_the_champion_within_its_gpus():
    doc = yaml.safe_load(MANIFEST.read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    serve_cfg = ServeDeploySchema(**yaml.safe_load(doc["spec"]["serveConfigV2"]))
    (app,) = serve_cfg.applications
    module, name = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), name))
    assert app.args["source"] == "models:/retina@champion"
    opts = apply_overrides(Config(), app.args["overrides"]).serve
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "ray-retina-auth"}
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    gpus = sum(
        g["maxReplicas"]
        * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in cluster["workerGroupSpecs"]
    )
    assert opts.max_replicas is not None and opts.max_replicas * opts.num_gpus <= gpus
