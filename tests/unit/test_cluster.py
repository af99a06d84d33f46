"""cluster/: the recipes checked without a cluster or the network.

- the Ray cluster launcher YAML validates against Ray's own ``ray/autoscaler/ray-schema.json`` (jsonschema, as
  ``ray.autoscaler._private.util.validate_config`` loads it) and passes the offline part of ``ray up``;
- the KubeRay manifests are ``ray.io/v1`` of the right kinds, name ``jobs/`` scripts and ``configs/`` files
  that exist and load, and ask for the GPUs (and CPUs) the config they run needs;
- the node Dockerfile pins Ray, torch and torchvision exactly as ``pyproject.toml`` does;
- the MLflow server runs ``mlflow server`` on PostgreSQL with ``--allowed-hosts``, behind ClusterIP services,
  and the Ray pods' ``MLFLOW_TRACKING_URI`` names that service with a Host header it allows;
- the MLflow server runs the basic-auth app with its config written from Secrets at pod start (the init
  container's script is run here and its ini read as MLflow reads it), the Ray pods log in with an account
  from a Secret, and no credential is written in a manifest.
"""

from __future__ import annotations

import configparser
import copy
import fnmatch
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from ray_retina.config import Config, load_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "aws-gpu.yaml"
KUBERAY = CLUSTER / "kuberay"
RAYCLUSTER = KUBERAY / "raycluster.yaml"
RAYJOB_TRAIN = KUBERAY / "rayjob-train.yaml"
RAYJOB_TUNE = KUBERAY / "rayjob-tune.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
MLFLOW_DOCKERFILE = CLUSTER / "mlflow" / "Dockerfile"
MLFLOW_SERVER = CLUSTER / "mlflow" / "mlflow-server.yaml"

GPU = "nvidia.com/gpu"
SHARED_MOUNT = "/mnt/shared"
# The config a long-lived RayCluster is sized for (its header and cluster/README.md submit it by hand).
RAYCLUSTER_TARGET_CONFIG = "configs/retinanet_r50_fpn_1x_coco.yaml"


# ---------------------------------------------------------------------------------------------- helpers


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path, kind: str) -> dict[str, Any]:
    found = [d for d in _docs(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def _pyproject_pins() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {(r := Requirement(d)).name: r for d in deps}


def _exact_pin(req: Requirement) -> str:
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"pyproject must pin {req.name} exactly, got {req}"
    return specs[0].version


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        s = raw.strip()
        if s.startswith("#") or (not s and not buf):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        instr, _, rest = buf.partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    return out


def _resolved_dockerfile(path: Path) -> list[tuple[str, str]]:
    """The instructions with ``$VAR`` / ``${VAR}`` replaced by the ARG defaults in scope (global ARGs reach
    FROM, and a stage re-declaring ``ARG NAME`` without a value gets the global default)."""
    global_args: dict[str, str] = {}
    stage_args: dict[str, str] | None = None
    out = []

    def subst(text: str, scope: dict[str, str]) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: scope.get(m.group(1) or m.group(2), m.group(0)), text)

    for instr, rest in _dockerfile(path):
        scope = global_args if stage_args is None else stage_args
        if instr == "ARG":
            name, eq, default = rest.partition("=")
            if eq:
                scope[name] = subst(default.strip().strip('"'), scope)
            elif stage_args is not None and name in global_args:
                stage_args[name] = global_args[name]
            continue
        if instr == "FROM":
            out.append((instr, subst(rest, global_args)))
            stage_args = {}
            continue
        out.append((instr, subst(rest, scope)))
    return out


PIN = re.compile(r"""(?P<name>[A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(?P<version>[A-Za-z0-9_.+!-]+)""")


def _pip_pins(instructions: list[tuple[str, str]]) -> dict[str, str]:
    pins: dict[str, str] = {}
    for instr, rest in instructions:
        if instr == "RUN" and "pip install" in rest:
            for m in PIN.finditer(rest):
                pins[m.group("name").lower()] = m.group("version")
    return pins


def _entrypoint(entry: str) -> tuple[str, str, list[str]]:
    """``python jobs/X.py --config configs/Y.yaml [--set k=v ...]`` -> (script, config, overrides)."""
    argv = shlex.split(entry)
    assert argv[0] in ("python", "python3"), f"entrypoint must run python, got {entry!r}"
    script, rest = argv[1], argv[2:]
    config, overrides = None, []
    i = 0
    while i < len(rest):
        if rest[i] in ("--config", "-c"):
            config = rest[i + 1]
            i += 2
        elif rest[i] in ("--set", "-s"):
            overrides.append(rest[i + 1])
            i += 2
        else:
            raise AssertionError(f"unexpected entrypoint argument {rest[i]!r} in {entry!r}")
    assert config is not None, f"entrypoint names no --config: {entry!r}"
    return script, config, overrides


def _cpu(quantity: str | int | float) -> float:
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _ray_doc(path: Path) -> dict[str, Any]:
    return _one(path, "RayCluster" if path == RAYCLUSTER else "RayJob")


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _pod_specs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in spec["workerGroupSpecs"]
    ]


def _ray_container(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["containers"][0]  # KubeRay runs Ray in the first container


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _gpu_groups(spec: dict[str, Any]) -> list[tuple[int, int, float]]:
    """(replicas, GPUs per pod, CPUs per pod) of each worker group that asks for GPUs."""
    groups = []
    for g in spec["workerGroupSpecs"]:
        res = _ray_container(g["template"]["spec"])["resources"]
        limits, requests = res.get("limits", {}), res.get("requests", {})
        if GPU in limits or GPU in requests:
            assert str(limits.get(GPU)) == str(requests.get(GPU)), (
                f"group {g['groupName']}: {GPU} requests and limits must be equal (extended resources)"
            )
            groups.append((int(g["replicas"]), int(limits[GPU]), _cpu(limits["cpu"])))
    return groups


def _trials_at_once(cfg: Config, script: str) -> int:
    return (cfg.tune.max_concurrent_trials or 1) if script.endswith("tune.py") else 1


def _check_fits(spec: dict[str, Any], cfg: Config, trials: int, where: str) -> None:
    """GPU pods x GPUs per pod >= workers x GPUs per worker x trials at once, and every GPU pod has the CPUs
    of the train workers it hosts plus one Ray Data task (else the data tasks never run and the job hangs)."""
    groups = _gpu_groups(spec)
    assert cfg.scaling.use_gpu, f"{where}: the cluster has GPUs but {cfg.name} has scaling.use_gpu false"
    assert groups, f"{where}: no worker group requests {GPU}"
    have = sum(replicas * gpus for replicas, gpus, _ in groups)
    need = cfg.scaling.num_workers * cfg.scaling.gpus_per_worker * trials
    assert have >= need, (
        f"{where}: {have} GPUs (replicas x {GPU}) < {need} = scaling.num_workers {cfg.scaling.num_workers}"
        f" x gpus_per_worker {cfg.scaling.gpus_per_worker} x trials at once {trials}"
    )
    for _, gpus, cpus in groups:
        workers_per_pod = gpus / cfg.scaling.gpus_per_worker
        need_cpu = workers_per_pod * cfg.scaling.cpus_per_worker + cfg.data.map_num_cpus
        assert cpus >= need_cpu, f"{where}: {cpus} CPUs per pod < {need_cpu} (train workers + one data task)"


def _ray_schema() -> dict[str, Any]:
    # Exactly what ray.autoscaler._private.util.validate_config loads.
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        return json.load(f)


def _mlflow_pod() -> dict[str, Any]:
    return _one(MLFLOW_SERVER, "Deployment")["spec"]["template"]["spec"]


def _named(containers: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(c for c in containers if c["name"] == name)


def _mlflow_server_argv() -> list[str]:
    c = _named(_mlflow_pod()["containers"], "mlflow")
    return [*c.get("command", []), *c.get("args", [])]


def _secret_refs(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """env name -> (Secret name, key) of the variables taken from a Secret."""
    return {
        e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def _flag(argv: list[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value``; "" for a bare flag; None when absent."""
    for i, a in enumerate(argv):
        if a == name:
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            return "" if nxt.startswith("--") else nxt
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


# ---------------------------------------------------------------------------------- Ray cluster launcher


@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    return yaml.safe_load(LAUNCHER.read_text())


def test_launcher_validates_against_ray_schema(launcher):
    jsonschema.validate(launcher, _ray_schema())


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c.__setitem__("head_node_types", "head.cpu"),  # unknown top-level key
        lambda c: c["available_node_types"]["gpu.g5.12xlarge"]["resources"].__setitem__("GPU", "4"),
        lambda c: c["available_node_types"]["head.cpu"].pop("node_config"),
        lambda c: c["docker"].__setitem__("gpus", "all"),
    ],
    ids=["unknown-key", "string-resource", "no-node-config", "unknown-docker-key"],
)
def test_ray_schema_rejects_a_broken_launcher(launcher, break_it):
    """The schema check above is not vacuous: the same validator refuses typical mistakes."""
    bad = copy.deepcopy(launcher)
    break_it(bad)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _ray_schema())


def test_launcher_passes_ray_up_offline_checks(launcher):
    """What `ray up` does before it calls AWS: merge Ray's AWS defaults, then validate_config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(launcher))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head.cpu"
    assert prepared["available_node_types"]["head.cpu"]["resources"] == {"CPU": 0, "ray_retina_trial": 64}


@pytest.mark.parametrize("config", ["configs/retinanet_r50_fpn_1x_coco.yaml", "configs/tune_focal_gpu.yaml"])
def test_launcher_gpu_types_fit_the_gpu_configs(launcher, config):
    cfg = load_config(ROOT / config)
    trials = (cfg.tune.max_concurrent_trials or 1) if cfg.tune.search_space else 1
    need = cfg.scaling.num_workers * cfg.scaling.gpus_per_worker * trials
    fits = []
    for name, t in launcher["available_node_types"].items():
        gpus, cpus = t["resources"].get("GPU", 0), t["resources"].get("CPU", 0)
        if not gpus:
            continue
        nodes = min(t.get("max_workers", launcher["max_workers"]), launcher["max_workers"])
        workers_per_node = gpus / cfg.scaling.gpus_per_worker
        assert cpus >= workers_per_node * cfg.scaling.cpus_per_worker + cfg.data.map_num_cpus, name
        fits.append(nodes * gpus >= need)
    assert fits and any(fits), f"no GPU node type of {LAUNCHER.name} reaches {need} GPUs for {config}"


def test_launcher_auth_mlflow_storage_and_private_dashboard(launcher):
    run_options = " ".join(launcher["docker"]["run_options"])
    assert "--env RAY_AUTH_MODE=token" in run_options
    assert re.search(r"--env MLFLOW_TRACKING_URI=https?://\S+", run_options)
    assert f"--volume {SHARED_MOUNT}:{SHARED_MOUNT}" in run_options
    # The host mounts the shared file system where the container expects it, on every node.
    assert any(
        f" {SHARED_MOUNT}" in cmd and "mount -t nfs4" in cmd for cmd in launcher["initialization_commands"]
    )
    # The token made by `ray get-auth-token --generate` reaches the default token path in every container.
    assert launcher["file_mounts"]["/home/ray/.ray"] == "~/.ray"
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    # The checkout is synced and installed on every node.
    assert launcher["file_mounts"]["/home/ray/ray-retina"] == "."
    assert any("pip install" in c and "/home/ray/ray-retina" in c for c in launcher["setup_commands"])


def test_nothing_in_cluster_turns_token_auth_off():
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"RAY_AUTH_MODE\W{0,3}disabled", text), path
            assert not re.search(r"mode:\s*disabled", text), path


# ------------------------------------------------------------------------------------------------ KubeRay


@pytest.mark.parametrize(
    ("path", "kinds"),
    [
        (RAYCLUSTER, {"RayCluster", "PersistentVolumeClaim"}),
        (RAYJOB_TRAIN, {"RayJob"}),
        (RAYJOB_TUNE, {"RayJob"}),
    ],
)
def test_kuberay_manifests_parse_with_the_right_kinds(path, kinds):
    docs = _docs(path)
    assert {d["kind"] for d in docs} == kinds
    for d in docs:
        if d["kind"].startswith("Ray"):
            assert d["apiVersion"] == "ray.io/v1"
        assert d["metadata"]["name"]


@pytest.mark.parametrize(
    ("path", "script", "config"),
    [
        (RAYJOB_TRAIN, "jobs/train.py", "configs/retinanet_r50_fpn_1x_coco.yaml"),
        (RAYJOB_TUNE, "jobs/tune.py", "configs/tune_focal_gpu.yaml"),
    ],
)
def test_rayjob_entrypoint_names_files_that_exist_and_load(path, script, config):
    entry = _one(path, "RayJob")["spec"]["entrypoint"]
    got_script, got_config, overrides = _entrypoint(entry)
    assert (got_script, got_config) == (script, config)
    assert (ROOT / got_script).is_file(), got_script
    assert (ROOT / got_config).is_file(), got_config
    cfg = load_config(ROOT / got_config, overrides)
    if got_script == "jobs/tune.py":
        assert cfg.tune.search_space, f"{got_config} has no tune.search_space"


def test_every_jobs_and_configs_path_named_in_cluster_exists_and_loads():
    """Entrypoints, comments and README commands alike: a renamed script or config breaks this test first."""
    named: dict[str, set[str]] = {}
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            for ref in re.findall(
                r"(?<![\w/.-])((?:jobs/[\w./-]+\.py)|(?:configs/[\w./-]+\.ya?ml))", path.read_text()
            ):
                named.setdefault(ref, set()).add(str(path.relative_to(ROOT)))
    assert {"jobs/train.py", "jobs/tune.py", "configs/retinanet_r50_fpn_1x_coco.yaml"} <= set(named)
    for ref, where in sorted(named.items()):
        assert (ROOT / ref).is_file(), f"{ref} (named in {sorted(where)}) does not exist"
        if ref.startswith("configs/"):
            load_config(ROOT / ref)


@pytest.mark.parametrize("path", [RAYJOB_TRAIN, RAYJOB_TUNE])
def test_rayjob_gpus_match_the_config_it_runs(path):
    job = _one(path, "RayJob")
    script, config, overrides = _entrypoint(job["spec"]["entrypoint"])
    cfg = load_config(ROOT / config, overrides)
    _check_fits(job["spec"]["rayClusterSpec"], cfg, _trials_at_once(cfg, script), path.name)


def test_raycluster_gpus_match_the_config_it_is_sized_for():
    cfg = load_config(ROOT / RAYCLUSTER_TARGET_CONFIG)
    spec = _one(RAYCLUSTER, "RayCluster")["spec"]
    _check_fits(spec, cfg, 1, RAYCLUSTER.name)
    for g in spec["workerGroupSpecs"]:
        assert g.get("minReplicas", 0) <= g["replicas"] <= g.get("maxReplicas", g["replicas"]), g["groupName"]


def test_gpu_check_catches_too_few_gpus():
    job = copy.deepcopy(_one(RAYJOB_TRAIN, "RayJob"))
    _, config, overrides = _entrypoint(job["spec"]["entrypoint"])
    cfg = load_config(ROOT / config, overrides)
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = 1
    with pytest.raises(AssertionError, match="GPUs"):
        _check_fits(job["spec"]["rayClusterSpec"], cfg, 1, "one pod")


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB_TRAIN, RAYJOB_TUNE])
def test_kuberay_auth_version_private_dashboard(path):
    doc = _ray_doc(path)
    spec = _cluster_spec(doc)
    assert spec["authOptions"] == {"mode": "token", "secretName": "ray-retina-auth"}
    assert spec["rayVersion"] == _exact_pin(_pyproject_pins()["ray"])
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB_TRAIN, RAYJOB_TUNE])
def test_kuberay_pods_mount_the_shared_volume_and_set_mlflow(path):
    pvc = _one(RAYCLUSTER, "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    spec = _cluster_spec(_ray_doc(path))
    for pod in _pod_specs(spec):
        container = _ray_container(pod)
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert claims.get(mounts.get(SHARED_MOUNT)) == pvc["metadata"]["name"], (
            f"{path.name}: {SHARED_MOUNT} not the PVC"
        )
        assert _env(container).get("MLFLOW_TRACKING_URI"), (
            f"{path.name}: {container['name']} has no MLFLOW_TRACKING_URI"
        )


@pytest.mark.parametrize(
    "config",
    ["configs/retinanet_r50_fpn_1x_coco.yaml", "configs/tune_focal_gpu.yaml"],
)
def test_cluster_configs_keep_data_and_results_on_the_shared_volume(config):
    """Every node reads the shards and writes checkpoints: those paths must be on the shared mount."""
    cfg = load_config(ROOT / config)
    for key, value in {
        "data.train_shards": cfg.data.train_shards,
        "data.val_shards": cfg.data.val_shards,
        "model.backbone_weights": cfg.model.backbone_weights,
        "run.storage_path": cfg.run.storage_path,
    }.items():
        assert value is not None and value.startswith(SHARED_MOUNT + "/"), f"{config}: {key}={value}"


def test_rayjob_clusters_use_the_raycluster_pod_templates():
    """One pod template, three copies: the RayJobs' clusters must not drift from raycluster.yaml."""
    ref = _one(RAYCLUSTER, "RayCluster")["spec"]
    for path in (RAYJOB_TRAIN, RAYJOB_TUNE):
        spec = _one(path, "RayJob")["spec"]["rayClusterSpec"]
        assert spec["headGroupSpec"] == ref["headGroupSpec"], (
            f"{path.name}: head differs from raycluster.yaml"
        )
        assert [g["template"] for g in spec["workerGroupSpecs"]] == [
            g["template"] for g in ref["workerGroupSpecs"]
        ]


def test_rayjob_working_dir_is_the_image_project_dir():
    workdir = [rest for instr, rest in _resolved_dockerfile(DOCKERFILE) if instr == "WORKDIR"][-1]
    for path in (RAYJOB_TRAIN, RAYJOB_TUNE):
        runtime_env = yaml.safe_load(_one(path, "RayJob")["spec"]["runtimeEnvYAML"])
        assert runtime_env["working_dir"] == workdir, path.name
    copied = " ".join(rest for instr, rest in _resolved_dockerfile(DOCKERFILE) if instr == "COPY")
    for needed in ("jobs", "configs", "ray_retina", "pyproject.toml"):
        assert needed in copied, f"the image lacks {needed}, which the jobs need in {workdir}"


def test_every_node_runs_one_image():
    images = {
        _ray_container(pod)["image"]
        for path in (RAYCLUSTER, RAYJOB_TRAIN, RAYJOB_TUNE)
        for pod in _pod_specs(_cluster_spec(_ray_doc(path)))
    }
    images.add(yaml.safe_load(LAUNCHER.read_text())["docker"]["image"])
    assert len(images) == 1, images


# ---------------------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_pins_match_pyproject():
    pins = _pyproject_pins()
    want = {name: _exact_pin(pins[name]) for name in ("ray", "torch", "torchvision")}
    instructions = _resolved_dockerfile(DOCKERFILE)
    got = _pip_pins(instructions)
    for name, version in want.items():
        assert got.get(name) == version, (
            f"Dockerfile installs {name}=={got.get(name)}, pyproject pins {version}"
        )
    base = [rest for instr, rest in instructions if instr == "FROM"][-1]
    image, _, tag = base.partition(":")
    assert image == "rayproject/ray" and tag.split("-")[0] == want["ray"], f"base image {base}"
    assert "$" not in base


def test_dockerfile_parser_sees_a_drifted_pin(tmp_path):
    drifted = DOCKERFILE.read_text().replace("ARG TORCH_VERSION=2.14.1", "ARG TORCH_VERSION=2.13.0")
    assert drifted != DOCKERFILE.read_text()
    p = tmp_path / "Dockerfile"
    p.write_text(drifted)
    assert _pip_pins(_resolved_dockerfile(p))["torch"] == "2.13.0"


def test_mlflow_image_is_inside_the_clients_range():
    server = _pip_pins(_resolved_dockerfile(MLFLOW_DOCKERFILE))["mlflow"]
    assert Version(server) in _pyproject_pins()["mlflow"].specifier, server


# ---------------------------------------------------------------------------------------- MLflow server


def test_mlflow_server_runs_on_postgresql_with_allowed_hosts():
    argv = _mlflow_server_argv()
    assert argv[:2] == ["mlflow", "server"]
    backend = _flag(argv, "--backend-store-uri")
    assert backend and backend.startswith("postgresql://"), backend
    hosts = _flag(argv, "--allowed-hosts")
    assert hosts and "*" not in hosts.split(","), hosts
    assert _flag(argv, "--serve-artifacts") == ""
    assert (_flag(argv, "--artifacts-destination") or "").startswith("s3://")
    # The database the URI names is the StatefulSet's service in this manifest.
    db_host = urlsplit(backend).hostname
    services = [d["metadata"] for d in _docs(MLFLOW_SERVER) if d["kind"] == "Service"]
    assert db_host in {f"{m['name']}.{m['namespace']}.svc.cluster.local" for m in services}, db_host
    sts = _one(MLFLOW_SERVER, "StatefulSet")
    assert sts["spec"]["template"]["spec"]["containers"][0]["image"].startswith("postgres:")


def test_mlflow_is_private():
    docs = _docs(MLFLOW_SERVER)
    assert not [d for d in docs if d["kind"] in ("Ingress", "Route", "Gateway", "HTTPRoute")]
    for d in docs:
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP", d["metadata"]["name"]


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB_TRAIN, RAYJOB_TUNE])
def test_ray_pods_reach_mlflow_by_an_allowed_host(path):
    """MLFLOW_TRACKING_URI names the MLflow Service and port, and its Host header passes --allowed-hosts
    (MLflow answers 403 to any other Host)."""
    svc = next(
        d for d in _docs(MLFLOW_SERVER) if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow"
    )
    allowed = _flag(_mlflow_server_argv(), "--allowed-hosts").split(",")
    spec = _cluster_spec(_ray_doc(path))
    for pod in _pod_specs(spec):
        url = urlsplit(_env(_ray_container(pod))["MLFLOW_TRACKING_URI"])
        assert url.hostname == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
        assert url.port == svc["spec"]["ports"][0]["port"]
        assert any(fnmatch.fnmatch(url.netloc, a) if "*" in a else url.netloc == a for a in allowed), (
            url.netloc
        )


# ---------------------------------------------------------------------------------- MLflow authentication

AUTH_SECRET = "mlflow-auth"  # the server's admin and CSRF key
RAY_MLFLOW_SECRET = "ray-retina-mlflow"  # the account the Ray pods log with
# Env names that carry a credential: only ever from a Secret.
CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|USERNAME|_USER$|^PGUSER$")


def test_mlflow_server_runs_the_basic_auth_app():
    argv = _mlflow_server_argv()
    assert _flag(argv, "--app-name") == "basic-auth", argv
    pod = _mlflow_pod()
    server = _named(pod["containers"], "mlflow")
    refs = _secret_refs(server)
    assert refs["MLFLOW_AUTH_ADMIN_USERNAME"] == (AUTH_SECRET, "admin-username")
    assert refs["MLFLOW_AUTH_ADMIN_PASSWORD"] == (AUTH_SECRET, "admin-password")
    assert refs["MLFLOW_FLASK_SERVER_SECRET_KEY"] == (AUTH_SECRET, "flask-secret-key")
    # The auth-config init container writes the file the server reads, on a volume both mount.
    writer = _named(pod["initContainers"], "auth-config")
    path = _env(server)["MLFLOW_AUTH_CONFIG_PATH"]
    assert _env(writer)["MLFLOW_AUTH_CONFIG_PATH"] == path
    volumes = {v["name"]: v for v in pod["volumes"]}
    for c in (writer, server):
        mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
        assert volumes[mount["name"]]["emptyDir"].get("medium") == "Memory", mount
    assert writer["image"] == server["image"], "the init container runs the server's own image"
    # The server image has the auth extra (Flask-WTF); without it `--app-name basic-auth` fails to start.
    pip = " ".join(rest for instr, rest in _resolved_dockerfile(MLFLOW_DOCKERFILE) if instr == "RUN")
    assert re.search(r"mlflow\[[^\]]*\bauth\b[^\]]*\]==", pip), pip


def test_mlflow_auth_config_written_at_start_is_what_mlflow_reads(tmp_path):
    """Runs the init container's script with stand-in Secret values and reads its ini the way
    ``mlflow.server.auth.config.read_auth_config`` does (``configparser``, section ``mlflow``)."""
    pod = _mlflow_pod()
    writer = _named(pod["initContainers"], "auth-config")
    argv = writer["command"] + writer.get("args", [])
    assert argv[:2] == ["sh", "-c"], argv
    ini = tmp_path / "basic_auth.ini"
    env = {"PATH": os.environ["PATH"], "DB_USER": "db-user", "MLFLOW_AUTH_CONFIG_PATH": str(ini)}
    subprocess.run(["sh", "-c", argv[2]], env=env, check=True, timeout=30)
    assert ini.stat().st_mode & 0o077 == 0, "the ini names the database and its user: owner-only"
    parser = configparser.ConfigParser()
    parser.read(ini)
    conf = parser["mlflow"]
    # Unauthenticated requests get 401 whatever this is; READ lets every signed-in user see everything.
    assert conf["default_permission"] in ("READ", "NO_PERMISSIONS")
    assert not conf.get("admin_password"), "the admin password comes from the Secret, not the ini"
    assert conf.get("authorization_function", "mlflow.server.auth:authenticate_request_basic_auth") == (
        "mlflow.server.auth:authenticate_request_basic_auth"
    )
    # The auth store: the same PostgreSQL server as the tracking store, a database of its own, which the
    # wait-for-postgres init container creates.
    auth_db = urlsplit(conf["database_uri"])
    tracking_db = urlsplit(_flag(_mlflow_server_argv(), "--backend-store-uri"))
    # No password in it: libpq takes PGPASSWORD from the server's environment (test below).
    assert auth_db.scheme == "postgresql" and (auth_db.username, auth_db.password) == ("db-user", None)
    assert (auth_db.hostname, auth_db.port) == (tracking_db.hostname, tracking_db.port)
    db_name = auth_db.path.lstrip("/")
    assert db_name and db_name != tracking_db.path.lstrip("/")
    creator = " ".join(_named(pod["initContainers"], "wait-for-postgres")["command"])
    assert f"createdb {db_name}" in creator and f"datname = '{db_name}'" in creator
    names = [c["name"] for c in pod["initContainers"]]
    assert names.index("wait-for-postgres") < names.index("auth-config"), names


def test_database_password_only_in_the_environment_from_the_secret():
    """The database password reaches the server as PGPASSWORD (libpq, both stores) from the Secret
    ``mlflow-db``: never in a URI on a command line (``ps``, ``/proc/<pid>/cmdline``, the pod spec) or in a
    file the pod writes."""
    pod = _mlflow_pod()
    server = _named(pod["containers"], "mlflow")
    assert _secret_refs(server)["PGPASSWORD"] == ("mlflow-db", "password")
    assert urlsplit(_flag(_mlflow_server_argv(), "--backend-store-uri")).password is None
    for c in pod.get("initContainers", []) + pod["containers"]:
        argv = " ".join(c.get("command", []) + c.get("args", []))
        assert "PASSWORD" not in argv.upper(), f"{c['name']}: a password on its command line"
        if c["name"] == "auth-config":
            assert not [e for e in c.get("env", []) if "PASSWORD" in e["name"]], "the ini writer needs none"


def test_aws_cluster_lets_ssh_in_from_the_operators_cidr_only():
    """Every node type names its security group, so Ray creates none (Ray's own group opens port 22 to the
    world, checked against Ray's rule below); the recipe in the file opens 22 to ``$SSH_CIDR`` only."""
    # Ray's AWS provider source (importing it needs boto3): its default SSH rule, and that a node type
    # with SecurityGroupIds gets no group of Ray's.
    import ray.autoscaler

    ray_aws = (Path(ray.autoscaler.__file__).parent / "_private" / "aws" / "config.py").read_text()
    default_ssh = ray_aws.split("def _create_default_ssh_inbound_rules", 1)[1].split("\ndef ", 1)[0]
    assert '"FromPort": 22' in default_ssh and '"CidrIp": "0.0.0.0/0"' in default_ssh
    assert 'if "SecurityGroupIds" not in node_type["node_config"]' in ray_aws
    config = yaml.safe_load(LAUNCHER.read_text())
    for name, node_type in config["available_node_types"].items():
        groups = node_type["node_config"].get("SecurityGroupIds")
        assert groups and all(g.startswith("sg-") for g in groups), name
    assert "IpPermissions" not in config["provider"].get("security_group", {})
    text = LAUNCHER.read_text()
    assert "0.0.0.0/0" not in text.replace("port 22 to 0.0.0.0/0", "")
    rule = re.search(r"authorize-security-group-ingress[^\n]*--port 22[^\n]*", text)
    assert rule and '--cidr "$SSH_CIDR"' in rule.group(0), rule
    assert re.search(r"^#\s+SSH_CIDR=\S+/\d+", text, re.M), "the CIDR the operator sets"


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB_TRAIN, RAYJOB_TUNE])
def test_ray_pods_log_in_to_mlflow_with_an_account_from_a_secret(path):
    """MLflow's client reads MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD itself, and Ray's worker
    processes inherit the pod's environment: the driver, the trials and the train workers all log in."""
    for pod in _pod_specs(_cluster_spec(_ray_doc(path))):
        refs = _secret_refs(_ray_container(pod))
        assert refs.get("MLFLOW_TRACKING_USERNAME") == (RAY_MLFLOW_SECRET, "username"), path.name
        assert refs.get("MLFLOW_TRACKING_PASSWORD") == (RAY_MLFLOW_SECRET, "password"), path.name


def _check_no_credentials(path: Path) -> None:
    docs = _docs(path)
    assert not [d for d in docs if d["kind"] == "Secret"], f"{path.name}: Secrets are made with kubectl"
    for doc in docs:
        spec = doc.get("spec", {})
        pods = [spec["template"]["spec"]] if "template" in spec else []
        if doc["kind"] in ("RayCluster", "RayJob"):
            pods = _pod_specs(_cluster_spec(doc))
        for pod in pods:
            for c in pod.get("initContainers", []) + pod["containers"]:
                for e in c.get("env", []):
                    if CREDENTIAL_NAME.search(e["name"]):
                        assert "secretKeyRef" in e.get("valueFrom", {}), (
                            f"{path.name}: {c['name']} {e['name']}"
                        )
    text = path.read_text()
    # user:password@ in a URI only as Kubernetes or shell variables; no password value after a key.
    for userinfo in re.findall(r"://([^/@\s]+)@", text):
        assert all(part.startswith("$") for part in userinfo.split(":")), userinfo
    assert not re.search(r"(?i)password\s*[=:]\s*[\"']?(?![\"'$]|\s|$)", text), path.name


@pytest.mark.parametrize("path", [MLFLOW_SERVER, RAYCLUSTER, RAYJOB_TRAIN, RAYJOB_TUNE])
def test_no_credential_is_written_in_a_manifest(path):
    _check_no_credentials(path)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("postgresql://$(DB_USER)@", "postgresql://$(DB_USER):s3cretvalue@"),
        (
            "- name: MLFLOW_AUTH_ADMIN_PASSWORD\n              valueFrom:\n                secretKeyRef:\n"
            "                  name: mlflow-auth\n                  key: admin-password",
            "- name: MLFLOW_AUTH_ADMIN_PASSWORD\n              value: s3cretvalue",
        ),
        (
            "default_permission = READ",
            "default_permission = READ\n              admin_password = s3cretvalue",
        ),
    ],
    ids=["uri", "env-value", "ini-key"],
)
def test_credential_check_sees_a_literal(tmp_path, old, new):
    text = MLFLOW_SERVER.read_text()
    assert old in text
    bad = tmp_path / MLFLOW_SERVER.name
    bad.write_text(text.replace(old, new))
    with pytest.raises(AssertionError):
        _check_no_credentials(bad)
