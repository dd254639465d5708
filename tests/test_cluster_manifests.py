"""cluster/: the KubeRay manifests against the real KubeRay CRD schemas, without drift from ray_config.yaml; the
`ray up` config against Ray's autoscaler schema; and (slow) the local multi-node cluster with token authentication.

Strict validation. The CRDs' openAPIV3Schema never sets ``additionalProperties: false``: the API server drops (or,
with strict field validation, rejects) unknown fields itself, while plain JSON Schema accepts them, so a misspelled
``rayStartParam`` would pass unnoticed. The validator here therefore treats an unknown property as an error wherever
a schema lists ``properties`` and has neither ``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields``
(the API server's own pruning rule). The Kubernetes extensions are translated: ``x-kubernetes-int-or-string`` (int or
string, the quantity pattern applying to strings), ``nullable``, ``x-kubernetes-list-type: set|map`` (unique items,
or unique map keys), and the int32/int64 formats. CEL rules (``x-kubernetes-validations``: immutability, the
``managedBy`` values) need an API server and are not checked.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

from apollo_ray import config as config_mod
from apollo_ray import deploy
from conftest import CRDS, REPO

KUBERAY = REPO / "cluster" / "kuberay"
RAY_UP = REPO / "cluster" / "ray-up.yaml"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

needs_crds = pytest.mark.usefixtures("kuberay_crds")  # skips, saying where they come from, when they are absent


# ---------------------------------------------------------------------------------------------------- the validator
def _structural(node: Any) -> Any:
    """A CRD schema node as strict JSON Schema (see the module docstring)."""
    if isinstance(node, list):
        return [_structural(x) for x in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: _structural(sub) for name, sub in value.items()}
        elif key in ("enum", "default", "example", "required", "x-kubernetes-list-map-keys"):
            out[key] = value  # literal values, not schemas
        else:
            out[key] = _structural(value)
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and isinstance(node.get("type"), str):
        out["type"] = [node["type"], "null"]
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _list_type(validator, list_type: str, instance: Any, schema: dict) -> Iterator[jsonschema.ValidationError]:
    if not isinstance(instance, list):
        return
    if list_type == "set":
        seen: list = []
        for item in instance:
            if item in seen:
                yield jsonschema.ValidationError(f"duplicate item {item!r} in a list-type=set")
            seen.append(item)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen_keys: set = set()
        for item in instance:
            key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys) if isinstance(item, dict) else None
            if key in seen_keys:
                yield jsonschema.ValidationError(f"duplicate entry for map keys {keys}: {item!r}")
            seen_keys.add(key)


_K8sValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type})
_FORMATS = jsonschema.FormatChecker()


@_FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@_FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


@cache
def _crd_schema(kind: str) -> dict:
    # The CRDs are megabytes of YAML: libyaml's loader when present reads them 5x faster.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(), Loader=loader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


@cache
def _validator(kind: str, strict: bool = True) -> jsonschema.Validator:
    schema = _structural(_crd_schema(kind)) if strict else _crd_schema(kind)
    return _K8sValidator(schema, format_checker=_FORMATS)


def _meta_errors(obj: dict) -> list[str]:
    """What the API server checks of every object's metadata (the CRDs leave it to it: ``metadata: {type: object}``)."""
    errors = []
    for key in ("apiVersion", "kind", "metadata"):
        if key not in obj:
            errors.append(f"missing {key}")
    meta = obj.get("metadata", {})
    unknown = set(meta) - {"name", "namespace", "labels", "annotations"}
    if unknown:
        errors.append(f"metadata: unknown fields {sorted(unknown)}")
    name = meta.get("name", "")
    if not (isinstance(name, str) and 0 < len(name) <= 63 and jsonschema.Draft7Validator(
            {"pattern": _DNS_LABEL}).is_valid(name)):
        errors.append(f"metadata.name {name!r} is not a DNS-1123 label")
    for k, v in (meta.get("labels") or {}).items():
        if not isinstance(v, str) or len(v) > 63:
            errors.append(f"label {k}={v!r} is not a valid label value")
    return errors


def validation_errors(obj: dict, strict: bool = True) -> list[str]:
    errors = _meta_errors(obj)
    if obj.get("kind") in CRD_FILES:
        if obj.get("apiVersion") != "ray.io/v1":
            errors.append(f"apiVersion {obj.get('apiVersion')!r}, expected ray.io/v1")
        for e in _validator(obj["kind"], strict).iter_errors(obj):
            errors.append(f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}")
    return errors


# ------------------------------------------------------------------------------------------------------ fixtures
@cache
def repo_config() -> config_mod.Config:
    return config_mod.load(REPO / "ray_config.yaml")


@cache
def repo_options() -> deploy.DeployOptions:
    return deploy.load_options(KUBERAY / "deploy.yaml")


@cache
def generated(preset: str = "repo") -> dict[str, dict]:
    cfg = repo_config() if preset == "repo" else config_mod.resolve({"preset": preset})
    return deploy.build_manifests(cfg, repo_options())


def _ray_containers(spec: dict) -> Iterator[dict]:
    yield from spec["headGroupSpec"]["template"]["spec"]["containers"]
    for group in spec["workerGroupSpecs"]:
        yield from group["template"]["spec"]["containers"]


def _cluster_specs(objects: dict[str, dict]) -> Iterator[dict]:
    for obj in objects.values():
        spec = obj.get("spec", {})
        for key in ("rayClusterSpec", "rayClusterConfig"):
            if key in spec:
                yield spec[key]
        if obj["kind"] == "RayCluster":
            yield spec


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# ------------------------------------------------------------------------------------------------------ the tests
def test_one_object_per_kind_and_a_rayjob_per_stage():
    kinds = [obj["kind"] for obj in generated().values()]
    assert kinds.count("RayCluster") == 1 and kinds.count("RayService") == 1
    assert kinds.count("RayJob") == len(deploy.JOB_STAGES) == 8
    for stage in deploy.JOB_STAGES:
        job = generated()[f"rayjob-{stage}.yaml"]["spec"]
        assert job["entrypoint"] == f"python jobs/{stage}.py --config {deploy.CONFIG_PATH}"
        assert (REPO / "jobs" / f"{stage}.py").exists(), f"jobs/{stage}.py is the entrypoint of a RayJob"
        assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] >= 0


@needs_crds
@pytest.mark.parametrize("preset", ["repo", "qwen2-7b"])
def test_every_manifest_validates_against_the_crds(preset):
    for name, obj in generated(preset).items():
        assert validation_errors(obj) == [], name


@needs_crds
@pytest.mark.parametrize("path, typo", [
    (("spec", "headGroupSpec", "rayStartParams"), "rayStartParam"),
    (("spec", "headGroupSpec"), "headGroupSpecs"),
    (("spec", "workerGroupSpecs", 0, "maxReplicas"), "maxReplica"),
    (("spec", "headGroupSpec", "template", "spec", "containers", 0, "resources"), "resource"),
    (("spec", "enableInTreeAutoscaling"), "enableInTreeAutoscaler"),
])
def test_a_misspelled_field_is_caught(path, typo):
    obj = copy.deepcopy(generated()["raycluster.yaml"])
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    parent[typo] = parent.pop(path[-1])
    errors = validation_errors(obj)
    assert any(repr(typo) in e for e in errors), errors
    # What the strictness is for: the CRD schema taken as plain JSON Schema says nothing of the unknown field (it
    # notices at most the required field the typo dropped).
    raw = [e.message for e in _validator("RayCluster", strict=False).iter_errors(obj)]
    assert not any(repr(typo) in e for e in raw), raw


@needs_crds
def test_broken_values_are_caught():
    def errors_after(edit) -> list[str]:
        obj = copy.deepcopy(generated()["rayjob-train.yaml"])
        edit(obj["spec"]["rayClusterSpec"])
        return validation_errors(obj)

    def head(spec: dict) -> dict:
        return spec["headGroupSpec"]["template"]["spec"]["containers"][0]

    assert errors_after(lambda s: head(s)["resources"]["limits"].update(cpu=4)) == []  # int-or-string: an int is fine
    assert errors_after(lambda s: head(s)["resources"]["limits"].update(cpu="four"))  # not a quantity
    assert errors_after(lambda s: s["workerGroupSpecs"][0].update(maxReplicas=2**31))  # int32
    assert errors_after(lambda s: s["workerGroupSpecs"][0].update(maxReplicas="3"))  # not an integer
    assert errors_after(lambda s: s["authOptions"].update(mode="password"))  # enum
    assert errors_after(lambda s: head(s)["ports"].append({"name": "again", "containerPort": 6379}))  # list-map keys
    assert errors_after(lambda s: s.pop("headGroupSpec"))  # required
    bad_name = copy.deepcopy(generated()["raycluster.yaml"])
    bad_name["metadata"]["name"] = "Apollo_Cluster"
    assert validation_errors(bad_name)


def test_committed_manifests_do_not_drift():
    fresh = deploy.render(repo_config(), repo_options())
    committed = {p.name: p.read_text(encoding="utf-8") for p in KUBERAY.glob("*.yaml")
                 if p.read_text(encoding="utf-8").startswith(deploy.HEADER)}
    assert sorted(committed) == sorted(fresh), "regenerate: apollo-ray manifests --out cluster/kuberay"
    for name, text in fresh.items():
        assert committed[name] == text, f"{name} drifted: apollo-ray manifests --out cluster/kuberay"


def test_cli_writes_the_same_files(tmp_path):
    from apollo_ray import cli

    out = tmp_path / "kuberay"
    assert cli.main(["manifests", "--out", str(out), "--deploy", str(KUBERAY / "deploy.yaml"),
                     "--config", str(REPO / "ray_config.yaml")]) == 0
    fresh = deploy.render(repo_config(), repo_options())
    assert {p.name: p.read_text() for p in out.glob("*.yaml")} == fresh


def test_write_manifests_removes_only_stale_generated_files(tmp_path):
    (tmp_path / "rayjob-gone.yaml").write_text(deploy.HEADER + "kind: RayJob\n")
    (tmp_path / "deploy.yaml").write_text("namespace: x\n")
    deploy.write_manifests(repo_config(), tmp_path, repo_options())
    assert not (tmp_path / "rayjob-gone.yaml").exists()
    assert (tmp_path / "deploy.yaml").read_text() == "namespace: x\n"


def test_non_crd_objects_hang_together():
    objects = generated()
    opts = repo_options()
    by_kind = {(o["kind"], o["metadata"]["name"]): o for o in objects.values()}
    assert {o["kind"] for o in objects.values()} - set(CRD_FILES) >= {
        "Namespace", "ConfigMap", "Deployment", "Service", "PersistentVolumeClaim"}
    for name, obj in objects.items():
        # What the API server checks of every object; the Ray kinds against their CRDs are test_every_manifest_...
        assert _meta_errors(obj) == [], name
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == opts.namespace
    deployment = by_kind[("Deployment", opts.mlflow_service)]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    service = by_kind[("Service", opts.mlflow_service)]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["port"] == deploy.MLFLOW_PORT
    claim = deployment["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in by_kind
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--artifacts-destination") + 1].startswith("s3://")
    assert args[args.index("--backend-store-uri") + 1].startswith("sqlite:////mlflow/")
    assert ("ConfigMap", f"{opts.name}-config") in by_kind
    # Every Secret reference names one of the configured Secrets; no credential is ever written as a value.
    secrets = set(opts.secrets.model_dump().values())
    text = json.dumps(objects)
    for obj in objects.values():
        for ref in _find(obj, "secretKeyRef"):
            assert ref["name"] in secrets, ref
    for key in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "RAY_AUTH_TOKEN"):
        assert f'"name": "{key}", "value"' not in text


def test_mlflow_on_a_database_secret_needs_no_volume():
    opts = repo_options().model_copy(update={"mlflow": deploy.MLflowOptions(database_secret="mlflow-db")})
    objects = deploy.build_manifests(repo_config(), opts)
    assert "mlflow-pvc.yaml" not in objects
    container = objects["mlflow-deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    assert "--backend-store-uri" not in container["args"]
    assert _env(container)["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db",
                                                                                         "key": "uri"}


def _find(node: Any, key: str) -> Iterator[Any]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _find(v, key)
    elif isinstance(node, list):
        for x in node:
            yield from _find(x, key)


def test_every_ray_process_gets_the_token_and_the_s3_credentials():
    opts = repo_options()
    objects = generated()
    specs = list(_cluster_specs(objects))
    assert len(specs) == 10  # RayCluster, RayService, 8 RayJobs
    token_ref = {"name": opts.secrets.ray_auth, "key": "auth_token"}
    for spec in specs:
        assert spec["authOptions"] == {"mode": "token", "secretName": opts.secrets.ray_auth}
        assert spec["enableInTreeAutoscaling"] is True
        containers = [*_ray_containers(spec), spec["autoscalerOptions"]]
        for c in containers:
            env = _env(c)
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == token_ref
        for c in _ray_containers(spec):
            env = _env(c)
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
                assert env[key]["valueFrom"]["secretKeyRef"]["name"] == opts.secrets.s3
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert deploy.CONFIG_DIR in mounts
    for stage in deploy.JOB_STAGES:
        submitter = objects[f"rayjob-{stage}.yaml"]["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
        assert _env(submitter)["RAY_AUTH_MODE"]["value"] == "token"
        assert "command" not in submitter  # KubeRay fills in `ray job submit ...`


def test_worker_groups_follow_resources():
    def groups(*overrides: str) -> dict[str, dict]:
        cfg = config_mod.resolve({"preset": "qwen2-7b"}, list(overrides))
        spec = deploy.build_manifests(cfg, repo_options())["raycluster.yaml"]["spec"]
        return {g["groupName"]: g for g in spec["workerGroupSpecs"]}

    gpu = groups()["gpu-workers"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1 and limits["cpu"] == "8"
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (0, 8)
    assert gpu["template"]["spec"]["containers"][0]["image"].endswith("-gpu")
    gpu = groups("resources.gpus_per_worker=2", "resources.num_workers=4")["gpu-workers"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert gpu["maxReplicas"] == 4
    cpu = groups("resources.cpus_per_worker=0.5")["cpu-workers"]
    assert cpu["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "500m"
    assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    # The repo's tiny CPU config: the GPU group exists but scales from zero.
    tiny = {g["groupName"]: g for g in generated()["raycluster.yaml"]["spec"]["workerGroupSpecs"]}
    assert tiny["gpu-workers"]["minReplicas"] == 0
    assert tiny["cpu-workers"]["maxReplicas"] >= repo_config().resources.num_workers


def test_images_match_the_installed_ray():
    import ray

    opts = deploy.DeployOptions()
    assert opts.ray_version == repo_options().ray_version == ray.__version__
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert opts.ray_image() == f"rayproject/ray:{ray.__version__}-{py}-cpu"
    assert opts.ray_image(gpu=True) == f"rayproject/ray:{ray.__version__}-{py}-gpu"


def test_the_configmap_is_the_cluster_config():
    cfg, opts = repo_config(), repo_options()
    text = generated()["configmap.yaml"]["data"][deploy.CONFIG_FILE]
    shipped = config_mod.resolve(yaml.safe_load(text))
    assert shipped == deploy.for_cluster(cfg, opts)
    assert shipped.storage.root == opts.storage_root and shipped.storage.root.startswith("s3://")
    assert shipped.tracking.uri == opts.tracking_uri
    assert str(REPO) not in text  # no machine-specific path in a committed file


def test_serve_config_and_runtime_env_are_what_ray_accepts():
    from ray.runtime_env import RuntimeEnv
    from ray.serve.schema import ServeDeploySchema

    spec = generated()["rayservice.yaml"]["spec"]
    serve = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    (app,) = serve.applications
    assert app.import_path == deploy.SERVE_IMPORT_PATH and app.args == {"config": deploy.CONFIG_PATH}
    assert serve.http_options.port == repo_config().serve.port
    env = yaml.safe_load(generated()["rayjob-collect.yaml"]["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**env)  # raises on a bad working_dir URI or pip spec
    assert env["working_dir"] == repo_options().working_dir
    assert not any(p.startswith("ray") and not p.startswith("ray-") for p in env["pip"]), "the image provides Ray"
    # the tested versions: every dependency pinned to constraints.txt, the lock the Makefile installs
    locked = deploy.locked_versions(REPO / "constraints.txt")
    assert locked and all("==" in p for p in env["pip"])
    assert f"transformers=={locked['transformers']}" in env["pip"] and f"torch=={locked['torch']}" in env["pip"]


def test_deploy_options_reject_unknown_keys(tmp_path):
    bad = tmp_path / "deploy.yaml"
    bad.write_text("namespace: apollo\nstorage_rot: s3://x\n")
    with pytest.raises(config_mod.ConfigError, match="storage_rot"):
        deploy.load_options(bad)
    bad.write_text("namespace: Apollo_NS\n")
    with pytest.raises(config_mod.ConfigError, match="namespace"):
        deploy.load_options(bad)


# --------------------------------------------------------------------------------------------------------- ray up
@cache
def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _ray_up_errors(cfg: dict) -> list[str]:
    """The checks `ray up` makes before touching a cloud: the JSON schema, then defaults merged and cross-checked."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    errors = [e.message for e in jsonschema.Draft7Validator(_ray_schema()).iter_errors(cfg)]
    if not errors:
        try:
            validate_config(prepare_config(copy.deepcopy(cfg)))
        except (ValueError, jsonschema.ValidationError) as e:
            errors.append(str(e))
    return errors


def test_ray_up_config_is_valid():
    cfg = yaml.safe_load(RAY_UP.read_text())
    assert _ray_up_errors(cfg) == []
    types = cfg["available_node_types"]
    assert {"head", "cpu-worker", "gpu-worker"} <= set(types) and cfg["head_node_type"] == "head"
    assert any("pip install" in c and "-c ~/apollo-ray/constraints.txt" in c for c in cfg["setup_commands"])
    locked_ray = deploy.locked_versions(REPO / "constraints.txt")["ray"]
    assert deploy.DeployOptions().ray_version == locked_ray and f"rayproject/ray:{locked_ray}-" in RAY_UP.read_text()
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in
               [cfg["head_start_ray_commands"][-1], cfg["worker_start_ray_commands"][-1]])
    import ray

    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")


@pytest.mark.parametrize("edit", [
    lambda c: c["available_node_types"]["gpu-worker"].update(max_worker=2),  # misspelled
    lambda c: c["available_node_types"]["cpu-worker"].pop("resources"),  # required
    lambda c: c.update(head_node_typ="head"),  # unknown top-level key
    lambda c: c.update(head_node_type="nope"),  # not a node type
    lambda c: c["available_node_types"]["cpu-worker"].update(min_workers=99),  # above max_workers
])
def test_a_broken_ray_up_config_fails(edit):
    cfg = yaml.safe_load(RAY_UP.read_text())
    edit(cfg)
    assert _ray_up_errors(cfg)


# ---------------------------------------------------------------------------------------------- the local cluster
_CLIENT = textwrap.dedent("""
    import json, sys, ray
    ray.init(address=sys.argv[1], logging_level="ERROR")

    @ray.remote(resources={"worker": 1})
    def on_worker():
        return ray.get_runtime_context().get_node_id()

    print(json.dumps({"nodes": [n for n in ray.nodes() if n["Alive"]], "worker_node": ray.get(on_worker.remote())}))
""")


@pytest.mark.slow
def test_local_cluster_scripts(tmp_path):
    """cluster/local/start.sh: two alive nodes for a client holding the token, S3 and MLflow answering at the env
    file's endpoints; stop.sh: every process it started gone, its temp dir and the env file removed."""
    import httpx
    import s3fs

    from apollo_ray.localcluster import ENV_DIR_KEY, STATE_FILE, _read_env_file, cluster_processes

    scripts = REPO / "cluster" / "local"
    env_file = tmp_path / ".env"  # not the repository's: a cluster someone runs there stays untouched
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    shell = {**base, "PYTHON": sys.executable}
    started = subprocess.run([str(scripts / "start.sh"), "--env-file", str(env_file)], env=shell,
                             capture_output=True, text=True, timeout=600)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-3000:]
    env = _read_env_file(env_file)
    workdir = Path(env[ENV_DIR_KEY])
    pids = json.loads((workdir / STATE_FILE).read_text())["pids"]
    try:
        assert set(pids) == {"s3", "mlflow", "ray-head", "ray-worker"}
        assert env["RAY_ADDRESS"].startswith("http://127.0.0.1:") and env["RAY_AUTH_MODE"] == "token"
        token = {"RAY_AUTH_MODE": env["RAY_AUTH_MODE"], "RAY_AUTH_TOKEN_PATH": env["RAY_AUTH_TOKEN_PATH"]}
        # A client with the token: two alive nodes, each with its own resources, a task placed on the worker.
        out = subprocess.run([sys.executable, "-c", _CLIENT, env["APOLLO_RAY_GCS_ADDRESS"]], env={**base, **token},
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        assert len(seen["nodes"]) == 2
        (head,) = [n for n in seen["nodes"] if "head" in n["Resources"]]
        (worker,) = [n for n in seen["nodes"] if "worker" in n["Resources"]]
        assert head["Resources"]["CPU"] == worker["Resources"]["CPU"] == 1
        assert seen["worker_node"] == worker["NodeID"]
        # The same client with the mode unset is refused, though the token file is in reach.
        refused = subprocess.run([sys.executable, "-c", _CLIENT, env["APOLLO_RAY_GCS_ADDRESS"]],
                                 env={**base, "RAY_AUTH_TOKEN_PATH": env["RAY_AUTH_TOKEN_PATH"]},
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode != 0
        # S3 and MLflow answer at the env file's endpoints.
        fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                               client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
        fs.pipe_file("apollo/probe.txt", b"hello")
        assert fs.cat_file("apollo/probe.txt") == b"hello"
        assert httpx.get(f"{env['MLFLOW_TRACKING_URI']}/health", timeout=10).status_code == 200
        search = httpx.post(f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search",
                            json={"max_results": 5}, timeout=10)
        assert search.status_code == 200, search.text
        # A second start while this one lives is refused.
        again = subprocess.run([str(scripts / "start.sh"), "--env-file", str(env_file)], env=shell,
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        stopped = subprocess.run([str(scripts / "stop.sh"), "--env-file", str(env_file)], env=shell,
                                 capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr[-2000:]
    assert cluster_processes(workdir) == []
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    assert not workdir.exists() and not env_file.exists()
