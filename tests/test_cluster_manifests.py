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
    (("spec", "headGroupSpec", "template", "spec", "securityContext", "runAsNonRoot"), "runAsNonroot"),
    (("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "securityContext",
      "allowPrivilegeEscalation"), "allowPrivilegedEscalation"),
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
    (claim,) = [v["persistentVolumeClaim"]["claimName"] for v in deployment["spec"]["template"]["spec"]["volumes"]
                if "persistentVolumeClaim" in v]
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


# ------------------------------------------------------------------------------------------ closed by default
def _ray_pod_templates(objects: dict[str, dict]) -> Iterator[tuple[str, dict]]:
    for name, obj in objects.items():
        for spec in _cluster_specs({name: obj}):
            yield f"{name}:head", spec["headGroupSpec"]["template"]
            for group in spec["workerGroupSpecs"]:
                yield f"{name}:{group['groupName']}", group["template"]


def _submitter_templates(objects: dict[str, dict]) -> Iterator[tuple[str, dict]]:
    for name, obj in objects.items():
        if obj["kind"] == "RayJob":
            yield f"{name}:submitter", obj["spec"]["submitterPodTemplate"]


def _mlflow_template(objects: dict[str, dict]) -> dict:
    return objects["mlflow-deployment.yaml"]["spec"]["template"]


def _all_pod_templates(objects: dict[str, dict]) -> list[tuple[str, dict]]:
    return [*_ray_pod_templates(objects), *_submitter_templates(objects), ("mlflow", _mlflow_template(objects))]


def test_serve_requires_its_key_by_default():
    opts, objects = repo_options(), generated()
    assert repo_config().serve.api_key_env is None  # the repo's config names none: the cluster's is the default
    shipped = config_mod.resolve(yaml.safe_load(objects["configmap.yaml"]["data"][deploy.CONFIG_FILE]))
    key = shipped.serve.api_key_env
    assert key == opts.serve_api_key_env == deploy.SERVE_API_KEY_ENV
    # Serve listens on every interface of its pods: the key is what closes it.
    serve = yaml.safe_load(objects["rayservice.yaml"]["spec"]["serveConfigV2"])
    assert serve["http_options"]["host"] == "0.0.0.0" and serve["applications"][0]["args"]["config"] == \
        deploy.CONFIG_PATH
    specs = list(_cluster_specs(objects))
    assert len(specs) == 10
    for spec in specs:
        for c in _ray_containers(spec):
            env = _env(c)
            # Required: a Secret without the key keeps the pod from starting, never lets it serve openly.
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": opts.secrets.api_keys, "key": key}
            other = env[repo_config().rewrite.openai.api_key_env]["valueFrom"]["secretKeyRef"]
            assert other["optional"] is True  # the rewrite key is not needed to run
    header = deploy.render(repo_config(), opts)["kustomization.yaml"]
    assert f"--from-literal={key}=" in header and opts.secrets.api_keys in header


def test_serve_key_name_from_the_config_or_the_options():
    cfg = config_mod.resolve(config_mod.to_dict(repo_config()), ["serve.api_key_env=MY_SERVE_KEY"])
    objects = deploy.build_manifests(cfg, repo_options())
    assert deploy.for_cluster(cfg, repo_options()).serve.api_key_env == "MY_SERVE_KEY"  # the config's name is kept
    env = _env(objects["raycluster.yaml"]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0])
    assert "optional" not in env["MY_SERVE_KEY"]["valueFrom"]["secretKeyRef"]
    assert deploy.SERVE_API_KEY_ENV not in env
    # Opening Serve is explicit: serve_api_key_env null, and no name in the config.
    opened = repo_options().model_copy(update={"serve_api_key_env": None})
    assert deploy.for_cluster(repo_config(), opened).serve.api_key_env is None
    env = _env(deploy.build_manifests(repo_config(), opened)["raycluster.yaml"]["spec"]["headGroupSpec"]["template"]
               ["spec"]["containers"][0])
    assert deploy.SERVE_API_KEY_ENV not in env
    assert "Serve is OPEN" in deploy.render(repo_config(), opened)["kustomization.yaml"]


def test_deploy_options_reject_a_bad_serve_key_name(tmp_path):
    bad = tmp_path / "deploy.yaml"
    bad.write_text("serve_api_key_env: 'MY KEY'\n")
    with pytest.raises(config_mod.ConfigError, match="serve_api_key_env"):
        deploy.load_options(bad)


def _mlflow_auth_config_module():
    """mlflow/server/auth/config.py (how the server reads the ini and the MLFLOW_AUTH_ADMIN_* variables), loaded on
    its own: importing the package runs the auth app's module, which needs Flask-WTF (mlflow[auth], the image's)."""
    import importlib.util

    import mlflow

    path = Path(mlflow.__file__).parent / "server" / "auth" / "config.py"
    spec = importlib.util.spec_from_file_location("_mlflow_auth_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mlflow_requires_a_user_and_the_stages_have_one(tmp_path, monkeypatch):
    read_auth_config = _mlflow_auth_config_module().read_auth_config
    opts, objects = repo_options(), generated()
    assert opts.mlflow.auth == "basic"
    pod = _mlflow_template(objects)["spec"]
    (server,) = pod["containers"]
    (init,) = pod["initContainers"]
    assert server["args"][server["args"].index("--app-name") + 1] == "basic-auth"
    env = _env(server)
    secret = opts.secrets.mlflow_auth
    refs = {n: env[n]["valueFrom"]["secretKeyRef"] for n in
            ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")}
    assert refs == {"MLFLOW_AUTH_ADMIN_USERNAME": {"name": secret, "key": "username"},
                    "MLFLOW_AUTH_ADMIN_PASSWORD": {"name": secret, "key": "password"},
                    "MLFLOW_FLASK_SERVER_SECRET_KEY": {"name": secret, "key": "flask_secret_key"}}
    # The ini the init container writes is where the server reads it, on a volume both mount.
    config_path = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    assert _env(init)["MLFLOW_AUTH_CONFIG_PATH"]["value"] == config_path
    mounted = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]}.items() <= mounted.items()
    assert any(config_path.startswith(path + "/") for path in mounted.values())
    db_uri = _env(init)["MLFLOW_AUTH_DATABASE_URI"]["value"]
    assert db_uri.startswith("sqlite:////mlflow/") and mounted["mlflow-db"] == "/mlflow"  # users kept on the PVC
    # Run the init container's script, then read the result as MLflow does (a %-encoded password survives).
    ini = tmp_path / "basic_auth.ini"
    uri = "postgresql://mlflow:p%40ss%25word@db:5432/auth"
    done = subprocess.run([sys.executable, "-c", init["command"][-1]], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MLFLOW_AUTH_DATABASE_URI": uri, "MLFLOW_AUTH_CONFIG_PATH": str(ini)})
    assert done.returncode == 0, done.stderr
    for key, value in {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": "apollo",
                       "MLFLOW_AUTH_ADMIN_PASSWORD": "a-long-password"}.items():
        monkeypatch.setenv(key, value)
    auth = read_auth_config()
    assert (auth.database_uri, auth.admin_username, auth.admin_password) == (uri, "apollo", "a-long-password")
    assert auth.default_permission == "READ"
    assert auth.authorization_function == "mlflow.server.auth:authenticate_request_basic_auth"
    # Every Ray container logs as that user.
    for spec in _cluster_specs(objects):
        for c in _ray_containers(spec):
            env = _env(c)
            assert env["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"] == refs["MLFLOW_AUTH_ADMIN_USERNAME"]
            assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == refs["MLFLOW_AUTH_ADMIN_PASSWORD"]
    header = deploy.render(repo_config(), opts)["kustomization.yaml"]
    assert f"create secret generic {secret}" in header and "flask_secret_key" in header


def test_mlflow_auth_on_a_database_and_switched_off():
    base = repo_options()
    on_db = base.model_copy(update={"mlflow": deploy.MLflowOptions(database_secret="mlflow-db")})
    pod = _mlflow_template(deploy.build_manifests(repo_config(), on_db))["spec"]
    assert _env(pod["initContainers"][0])["MLFLOW_AUTH_DATABASE_URI"]["valueFrom"]["secretKeyRef"] == {
        "name": "mlflow-db", "key": "auth_uri"}
    assert "auth_uri" in deploy.render(repo_config(), on_db)["kustomization.yaml"]
    off = base.model_copy(update={"mlflow": deploy.MLflowOptions(auth="none")})
    objects = deploy.build_manifests(repo_config(), off)
    pod = _mlflow_template(objects)["spec"]
    assert "initContainers" not in pod and "--app-name" not in pod["containers"][0]["args"]
    assert not any(e["name"].startswith("MLFLOW_AUTH") for e in pod["containers"][0]["env"])
    env = _env(objects["raycluster.yaml"]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0])
    assert "MLFLOW_TRACKING_USERNAME" not in env and "MLFLOW_TRACKING_PASSWORD" not in env
    assert "MLflow is OPEN" in deploy.render(repo_config(), off)["kustomization.yaml"]
    with pytest.raises(ValueError):
        deploy.MLflowOptions(auth="oauth")


def _effective_security(pod_spec: dict, container: dict) -> dict:
    # Container fields win over the pod's (Kubernetes' own merge); fsGroup and the like exist on the pod only.
    return {**pod_spec.get("securityContext", {}), **container.get("securityContext", {})}


@pytest.mark.parametrize("preset", ["repo", "qwen2-7b"])
def test_every_container_runs_restricted(preset):
    objects = generated(preset)
    templates = _all_pod_templates(objects)
    assert len(templates) == 10 * 3 + 8 + 1  # head + 2 worker groups per cluster, a submitter per job, MLflow
    seen = 0
    for where, template in templates:
        spec = template["spec"]
        mlflow = where == "mlflow"
        assert spec["securityContext"]["fsGroup"] == (deploy.MLFLOW_GID if mlflow else deploy.RAY_GID), where
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            sc = _effective_security(spec, c)
            assert "securityContext" in c, f"{where}/{c['name']}: the container states its own"
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0 and sc["runAsGroup"] != 0, where
            assert sc["allowPrivilegeEscalation"] is False and not sc.get("privileged"), where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            if mlflow:
                assert sc["readOnlyRootFilesystem"] is True
            else:
                # The rayproject/ray images' user; root stays writable (deploy.ray_container_security says why).
                assert (sc["runAsUser"], sc["runAsGroup"]) == (deploy.RAY_UID, deploy.RAY_GID)
                assert sc["readOnlyRootFilesystem"] is False
            seen += 1
    # The autoscaler sidecar KubeRay adds gets only autoscalerOptions.securityContext: complete on its own.
    for spec in _cluster_specs(objects):
        sc = spec["autoscalerOptions"]["securityContext"]
        assert sc == deploy.ray_container_security() and sc["runAsNonRoot"] is True
    assert seen == len(templates) + 1  # MLflow's init container


def test_mlflow_writes_only_to_volumes():
    spec = _mlflow_template(generated())["spec"]
    (server,) = spec["containers"]
    env = _env(server)
    volumes = {v["name"] for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    assert {m["name"] for m in server["volumeMounts"]} <= volumes
    # What MLflow writes on a read-only root: temp files (uploads, locks), $HOME (~/.config/mlflow), sqlite files.
    assert "/tmp" in mounts and env["HOME"]["value"] == "/tmp" and "/mlflow" in mounts
    assert mounts[deploy.MLFLOW_AUTH_DIR].get("readOnly") is True  # only the init container writes the ini
    (auth_volume,) = [v for v in spec["volumes"] if v["name"] == "mlflow-auth"]
    assert auth_volume["emptyDir"]["medium"] == "Memory"  # the ini may hold a database password: never on disk


# A minimal strict schema of networking.k8s.io/v1 NetworkPolicy (no CRD to validate against): the fields used here.
_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["key", "operator"], "properties": {
            "key": {"type": "string"}, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
            "values": {"type": "array", "items": {"type": "string"}}}}}}}
_PEER = {"type": "object", "additionalProperties": False, "minProperties": 1, "properties": {
    "podSelector": _SELECTOR, "namespaceSelector": _SELECTOR,
    "ipBlock": {"type": "object", "additionalProperties": False, "required": ["cidr"], "properties": {
        "cidr": {"type": "string"}, "except": {"type": "array", "items": {"type": "string"}}}}},
    "not": {"required": ["ipBlock", "podSelector"]}}
_PORT = {"type": "object", "additionalProperties": False, "properties": {
    "protocol": {"enum": ["TCP", "UDP", "SCTP"]}, "port": {"type": ["integer", "string"]},
    "endPort": {"type": "integer"}}}
NETWORK_POLICY_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "networking.k8s.io/v1"}, "kind": {"const": "NetworkPolicy"},
        "metadata": {"type": "object"},
        "spec": {"type": "object", "required": ["podSelector"], "additionalProperties": False, "properties": {
            "podSelector": _SELECTOR,
            "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
            "ingress": {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
                "from": {"type": "array", "items": _PEER}, "ports": {"type": "array", "items": _PORT}}}},
            "egress": {"type": "array"}}}}}


def _selects(selector: dict | None, labels: dict) -> bool:
    """A Kubernetes label selector against a label set (an empty selector selects everything)."""
    if selector is None:
        return False
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        has, value = e["key"] in labels, labels.get(e["key"])
        ok = {"In": has and value in e.get("values", []), "NotIn": not has or value not in e.get("values", []),
              "Exists": has, "DoesNotExist": not has}[e["operator"]]
        if not ok:
            return False
    return True


def _admits(policy: dict, pod: dict, port: int, ns: str, ns_labels: dict) -> bool:
    """Whether ``policy`` lets a pod (its labels, in namespace ``ns`` with ``ns_labels``) reach ``port`` (TCP) of
    the pods it selects: the NetworkPolicy semantics of the fields used (a peer without namespaceSelector means the
    policy's namespace; a rule without ports means every port)."""
    spec = policy["spec"]
    for rule in spec.get("ingress", []):
        if rule.get("ports") and not any(p.get("protocol", "TCP") == "TCP" and p["port"] == port
                                         for p in rule["ports"]):
            continue
        for peer in rule["from"]:
            in_ns = (_selects(peer["namespaceSelector"], ns_labels) if "namespaceSelector" in peer
                     else ns == policy["metadata"]["namespace"])
            if in_ns and ("podSelector" not in peer or _selects(peer["podSelector"], pod)):
                return True
    return False


def _kuberay_pod_labels(template_labels: dict, cluster: str, node_type: str, group: str) -> dict:
    """The labels KubeRay gives a Ray pod (ray-operator/controllers/ray/common/pod.go, labelPod): its own, with the
    template's on top except ray.io/node-type, ray.io/group and ray.io/cluster."""
    labels = {"ray.io/is-ray-node": "yes", "ray.io/cluster": cluster, "ray.io/node-type": node_type,
              "ray.io/group": group, "ray.io/identifier": f"{cluster}-{node_type}",
              "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    labels.update({k: v for k, v in template_labels.items()
                   if k not in ("ray.io/node-type", "ray.io/group", "ray.io/cluster")})
    return labels


def test_network_policies_admit_only_the_cluster_and_the_ingress():
    opts, objects = repo_options(), generated()
    ns = opts.namespace
    policies = {o["metadata"]["name"]: o for o in objects.values() if o["kind"] == "NetworkPolicy"}
    assert sorted(policies) == [opts.mlflow_service, f"{opts.name}-ray"]
    resources = deploy.kustomization(list(objects), opts)["resources"]
    for name, obj in objects.items():
        if obj["kind"] == "NetworkPolicy":
            assert not list(jsonschema.Draft7Validator(NETWORK_POLICY_SCHEMA).iter_errors(obj)), name
            assert _meta_errors(obj) == [] and name in resources  # applied with the long-lived objects
            assert obj["spec"]["policyTypes"] == ["Ingress"]
            for rule in obj["spec"]["ingress"]:
                assert rule["from"], f"{name}: an empty `from` admits every source"
    ray_policy, mlflow_policy = policies[f"{opts.name}-ray"], policies[opts.mlflow_service]

    # The pods as they run: KubeRay's labels on the Ray pods (a RayJob's cluster has a generated name), the Job
    # controller's on the submitter, the template's on MLflow.
    ray_pods = []
    for where, template in _ray_pod_templates(objects):
        file, group = where.split(":")
        cluster = f"{objects[file]['metadata']['name']}-x7k2q"
        ray_pods.append(_kuberay_pod_labels(template.get("metadata", {}).get("labels", {}), cluster,
                                            "head" if group == "head" else "worker", group))
    assert len(ray_pods) == 30
    submitters = [{**t["metadata"]["labels"], "job-name": "apollo-x7k2q"} for _, t in _submitter_templates(objects)]
    mlflow_pod = _mlflow_template(objects)["metadata"]["labels"]
    for pod in ray_pods:
        assert _selects(ray_policy["spec"]["podSelector"], pod) and not _selects(mlflow_policy["spec"]["podSelector"],
                                                                                  pod)
    for pod in [*submitters, mlflow_pod]:
        assert not _selects(ray_policy["spec"]["podSelector"], pod)
    assert _selects(mlflow_policy["spec"]["podSelector"], mlflow_pod)
    # The template labels the policies rely on survive KubeRay's labelling.
    for _, t in _ray_pod_templates(objects):
        assert not any(k.startswith("ray.io/") or k == "app.kubernetes.io/name" for k in t["metadata"]["labels"])

    serve, dashboard, gcs, mlflow_port = repo_config().serve.port, deploy.DASHBOARD_PORT, 6379, deploy.MLFLOW_PORT
    own_ns = {"kubernetes.io/metadata.name": ns}
    ingress_ns = {"kubernetes.io/metadata.name": "ingress-nginx", "apollo-ray.io/serve-ingress": "true"}
    operator_ns = {"kubernetes.io/metadata.name": "kuberay-system"}
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    stranger = {"app": "something-else"}

    def ray(pod, port, where=ns, where_labels=own_ns):
        return _admits(ray_policy, pod, port, where, where_labels)

    for pod in ray_pods:  # head, workers: every port, whatever cluster of this deployment
        assert all(ray(pod, p) for p in (gcs, dashboard, serve, 10001, 43127))
    for pod in submitters:  # `ray job submit`: the dashboard only
        assert ray(pod, dashboard) and not ray(pod, gcs) and not ray(pod, serve)
    assert ray({"app": "ingress-nginx"}, serve, "ingress-nginx", ingress_ns)
    assert not ray({"app": "ingress-nginx"}, dashboard, "ingress-nginx", ingress_ns)
    assert not ray({"app": "ingress-nginx"}, gcs, "ingress-nginx", ingress_ns)
    assert ray(operator, dashboard, "kuberay-system", operator_ns) and not ray(operator, gcs, "kuberay-system",
                                                                               operator_ns)
    assert not ray(operator, serve, "kuberay-system", operator_ns)
    for port in (gcs, dashboard, serve, 10001):  # anything else: the namespace's other pods, MLflow, other namespaces
        assert not ray(stranger, port) and not ray(mlflow_pod, port)
        assert not ray(stranger, port, "ingress-nginx", {"kubernetes.io/metadata.name": "ingress-nginx"})
        assert not ray(stranger, port, "kuberay-system", operator_ns)

    def to_mlflow(pod, port, where=ns, where_labels=own_ns):
        return _admits(mlflow_policy, pod, port, where, where_labels)

    assert all(to_mlflow(pod, mlflow_port) for pod in ray_pods)
    for pod in [*submitters, stranger]:
        assert not to_mlflow(pod, mlflow_port)
    assert not to_mlflow({"app": "ingress-nginx"}, mlflow_port, "ingress-nginx", ingress_ns)
    assert not to_mlflow(operator, mlflow_port, "kuberay-system", operator_ns)


def test_network_peers_are_options(tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text(textwrap.dedent("""
        ingress_from:
          - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: traefik}}
            podSelector: {matchLabels: {app.kubernetes.io/name: traefik}}
          - ipBlock: {cidr: 10.0.0.0/16, except: [10.0.5.0/24]}
        operator_from: []
    """))
    opts = deploy.load_options(path)
    policy = deploy.build_manifests(repo_config(), opts)["networkpolicy-ray.yaml"]
    assert not list(jsonschema.Draft7Validator(NETWORK_POLICY_SCHEMA).iter_errors(policy))
    serve_rules = [r for r in policy["spec"]["ingress"] if r.get("ports") == [
        {"protocol": "TCP", "port": repo_config().serve.port}]]
    assert serve_rules == [{"from": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "traefik"}},
         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "traefik"}}},
        {"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.5.0/24"]}}],
        "ports": [{"protocol": "TCP", "port": repo_config().serve.port}]}]
    # No operator peers: no rule for them (an empty `from` would admit everyone), the cluster's own rules stay.
    assert all(r["from"] for r in policy["spec"]["ingress"]) and len(policy["spec"]["ingress"]) == 3
    closed = deploy.build_manifests(repo_config(), opts.model_copy(update={"ingress_from": [], "operator_from": []}))
    assert len(closed["networkpolicy-ray.yaml"]["spec"]["ingress"]) == 2
    for bad in ("ingress_from: [{podSelector: {matchLabel: {a: b}}}]\n",  # misspelled
                "ingress_from: [{}]\n",  # neither selector nor block
                "ingress_from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]\n"):  # both
        path.write_text(bad)
        with pytest.raises(config_mod.ConfigError, match="ingress_from"):
            deploy.load_options(path)


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
