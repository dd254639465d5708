"""KubeRay manifests generated from the run's config, so that the cluster never drifts from ``ray_config.yaml``.

``apollo-ray manifests --out cluster/kuberay`` resolves ``ray_config.yaml`` (plus ``--set``), rewrites it for the
cluster with the deployment knobs of ``cluster/kuberay/deploy.yaml`` (namespace, images, the s3:// storage root, the
MLflow URI, ...: :class:`DeployOptions`) and writes one YAML file per object plus a ``kustomization.yaml``:

- ``raycluster.yaml``: a long-lived RayCluster (head; a CPU worker group; a GPU worker group scaling from zero), in-tree
  autoscaling on. Worker pods are sized from ``resources``: one Ray Train worker per pod.
- ``rayjob-<stage>.yaml`` for every stage and ``rayjob-pipeline.yaml``: each brings up its own cluster (same spec),
  runs ``python jobs/<stage>.py --config /home/ray/apollo/ray_config.yaml`` and is torn down afterwards.
- ``rayservice.yaml``: the Serve app ``apollo_ray.serve.app:build_app`` with ``args: {config: <that path>}``.
- ``mlflow-*.yaml``: an MLflow tracking server (sqlite on a PVC, or a database URI from a Secret; artifacts on S3),
  behind MLflow's basic-auth app by default.
- ``networkpolicy-*.yaml``: Ray pods admit only Ray pods of this deployment (all ports), the job submitters and the
  KubeRay operator (dashboard port) and the ingress controller (Serve port); MLflow admits only the Ray pods.
- ``configmap.yaml``: the cluster's ``ray_config.yaml``.

Closed by default: Serve requires a bearer key (``serve.api_key_env``, from a Secret the Ray pods cannot start
without), MLflow requires a user, every pod runs as a non-root user with no privilege escalation, no capabilities and
the runtime's seccomp profile, and the NetworkPolicies above admit nothing else. Opening any of it is an explicit
deploy option (``serve_api_key_env: null``, ``mlflow.auth: none``, ``ingress_from``/``operator_from``).

How the config reaches a job: a **ConfigMap mounted** at ``/home/ray/apollo`` on every Ray pod, and the entrypoint
points ``--config`` at it. Not the runtime env's working_dir: that is a code archive (``working_dir``), shared by all
jobs and built from a checkout whose ``ray_config.yaml`` names a local root; the ConfigMap carries the cluster's
values and changes without re-uploading code. Its content is the config written as a diff from its preset (the
``--set`` view), so defaults keep coming from the code version that runs, and machine-specific absolute paths of the
built-in sample data never enter a committed file.

Credentials never enter a manifest: they are referenced from Secrets that the operator of the cluster creates
(``kubectl create secret generic ...``, see the kustomization's header):

- ``<secrets.s3>``: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and, optional, ``AWS_ENDPOINT_URL`` (SeaweedFS,
  MinIO, ...), set on every Ray container and on MLflow;
- ``<secrets.ray_auth>``: ``auth_token``, the Ray cluster token. Ray >= 2.52 token authentication is on when
  ``RAY_AUTH_MODE=token`` is in the environment of *every* Ray process (head, workers, autoscaler, job submitter):
  a node or client whose mode is unset does not send the token and is refused. The token comes from
  ``RAY_AUTH_TOKEN``. Both are set explicitly on each container (works with any KubeRay), and ``authOptions``
  names the same Secret so that KubeRay >= 1.5.1 authenticates its own dashboard calls (RayJob status, RayService
  deployment) instead of generating a second token;
- ``<secrets.api_keys>``: one key per ``*_env`` name in the config: ``serve.api_key_env`` (``APOLLO_SERVE_API_KEY``
  unless the config or the deploy options name another) is *required*, so that no Ray pod, and so no Serve replica,
  comes up without its key; ``rewrite.openai.api_key_env`` is optional;
- ``<secrets.mlflow_auth>`` (with ``mlflow.auth: basic``): ``username``, ``password`` (at least 12 characters) and
  ``flask_secret_key``. MLflow creates that admin user on its first start; every Ray container gets the same pair as
  ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``. With ``mlflow.database_secret``, that Secret also
  holds ``auth_uri``: the database of MLflow's users (it may equal ``uri``: the auth tables are versioned apart).
"""

from __future__ import annotations

import importlib.metadata
import math
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from apollo_ray import config as config_mod
from apollo_ray.config import PACKAGE_DIR, Config, ConfigError

# ``jobs/<stage>.py`` entrypoints that get a RayJob; "pipeline" runs them all in one job.
JOB_STAGES: tuple[str, ...] = ("collect", "rewrite", "train", "tune", "evaluate", "analyze", "serve", "pipeline")
SERVE_IMPORT_PATH = "apollo_ray.serve.app:build_app"
CONFIG_DIR = "/home/ray/apollo"
CONFIG_FILE = "ray_config.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
MLFLOW_PORT = 5000
DASHBOARD_PORT = 8265
SERVE_API_KEY_ENV = "APOLLO_SERVE_API_KEY"
# The rayproject/ray images run as user `ray`: uid 1000, primary group `users` (gid 100), owner of /home/ray (and of
# the image's Python under /home/ray/anaconda3). The MLflow image has no user of its own (it runs as root unless
# told otherwise): any non-root uid works, its writable paths being volumes.
RAY_UID, RAY_GID = 1000, 100
MLFLOW_UID = MLFLOW_GID = 1000
MLFLOW_AUTH_DIR = "/etc/mlflow-auth"
MLFLOW_AUTH_CONFIG = f"{MLFLOW_AUTH_DIR}/basic_auth.ini"
# Pod labels (app.kubernetes.io/component) the NetworkPolicies select on. KubeRay's own pod labels do not serve:
# ray.io/cluster of a RayJob's or a RayService's cluster is a generated name.
RAY_POD = "ray"
SUBMITTER_POD = "ray-job-submitter"
MLFLOW_POD = "mlflow"
HEADER = ("# Generated by `apollo-ray manifests` from ray_config.yaml and cluster/kuberay/deploy.yaml.\n"
          "# Do not edit: change those and regenerate (tests/test_cluster_manifests.py fails on drift).\n")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ---------------------------------------------------------------------------------------------------- deploy knobs
class _Knobs(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PodSize(_Knobs):
    cpu: str | None = Field(None, description="Kubernetes CPU quantity; default: resources.cpus_per_worker")
    memory: str = "8Gi"


class WorkerGroup(PodSize):
    min_replicas: int = Field(0, ge=0)
    max_replicas: int | None = Field(None, ge=1, description="default: derived from resources.num_workers")


class MLflowOptions(_Knobs):
    image: str = Field("ghcr.io/mlflow/mlflow:v3.17.2-full",
                       description="the -full variant carries boto3 (S3 artifacts), the database drivers and the "
                                   "basic-auth app")
    auth: Literal["basic", "none"] = Field("basic", description="basic: `mlflow server --app-name basic-auth`, its "
                                                                "admin user from secrets.mlflow_auth; none: open")
    database_secret: str | None = Field(None, description="Secret with key `uri` (a SQLAlchemy URI with its password)"
                                                          "; unset = sqlite on a PersistentVolumeClaim")
    artifacts_destination: str | None = Field(None, description="default: <storage_root>/mlflow-artifacts")
    storage: str = Field("10Gi", description="size of the sqlite PVC")
    storage_class: str | None = None
    cpu: str = "1"
    memory: str = "2Gi"


class SecretNames(_Knobs):
    s3: str = "apollo-s3"
    ray_auth: str = "apollo-ray-auth"
    api_keys: str = "apollo-api-keys"
    mlflow_auth: str = "apollo-mlflow-auth"


class SelectorRequirement(_Knobs):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] | None = None


class LabelSelector(_Knobs):
    """A Kubernetes label selector; empty selects everything (in a namespaceSelector: every namespace)."""

    matchLabels: dict[str, str] | None = None
    matchExpressions: list[SelectorRequirement] | None = None


class IPBlock(_Knobs):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    cidr: str
    except_: list[str] | None = Field(None, alias="except")


class NetworkPeer(_Knobs):
    """A NetworkPolicy peer: pods by namespaceSelector and/or podSelector, or addresses by ipBlock (an ingress
    controller on the host network)."""

    namespaceSelector: LabelSelector | None = None
    podSelector: LabelSelector | None = None
    ipBlock: IPBlock | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> NetworkPeer:
        selectors = self.namespaceSelector is not None or self.podSelector is not None
        if selectors == (self.ipBlock is not None):
            raise ValueError("a peer is namespaceSelector and/or podSelector, or ipBlock")
        return self

    def manifest(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True)


def _ingress_controllers() -> list[NetworkPeer]:
    return [NetworkPeer(namespaceSelector=LabelSelector(matchLabels={"apollo-ray.io/serve-ingress": "true"}))]


def _kuberay_operator() -> list[NetworkPeer]:
    # The operator's pods, in whatever namespace it was installed into (its Helm chart labels them so).
    return [NetworkPeer(namespaceSelector=LabelSelector(),
                        podSelector=LabelSelector(matchLabels={"app.kubernetes.io/name": "kuberay-operator"}))]


class DeployOptions(_Knobs):
    """``cluster/kuberay/deploy.yaml``: what the run's config cannot know about the cluster it runs on."""

    namespace: str = "apollo"
    name: str = Field("apollo", description="prefix of every object name")
    ray_version: str = Field("2.60.0", description="must equal the Ray of the driver (a test checks it)")
    python: str = Field("py311", description="Python tag of the rayproject/ray images")
    image: str | None = Field(None, description="default: rayproject/ray:<ray_version>-<python>-cpu")
    gpu_image: str | None = Field(None, description="default: rayproject/ray:<ray_version>-<python>-gpu")
    storage_root: str = Field("s3://apollo/runs", description="becomes storage.root of the cluster's config")
    s3_region: str = "us-east-1"
    mlflow_uri: str | None = Field(None, description="tracking.uri; default: the MLflow server deployed here")
    working_dir: str = Field("s3://apollo/code/apollo-ray.zip",
                             description="runtime env working_dir: a zip of the repository (remote URI: the job "
                                         "submitter pod has no checkout)")
    pip: list[str] | None = Field(None, description="runtime env pip; default: the project's dependencies minus "
                                                    "ray (the image has it); [] for an image with them baked in")
    env_vars: dict[str, str] = Field(default_factory=dict, description="extra runtime env env_vars")
    config_overrides: list[str] = Field(default_factory=list, description="--set style overrides for the cluster")
    secrets: SecretNames = Field(default_factory=SecretNames)
    head: PodSize = Field(default_factory=lambda: PodSize(cpu="2", memory="8Gi"))
    cpu_workers: WorkerGroup = Field(default_factory=lambda: WorkerGroup(min_replicas=1, memory="8Gi"))
    gpu_workers: WorkerGroup = Field(default_factory=lambda: WorkerGroup(min_replicas=0, memory="64Gi"))
    idle_timeout_seconds: int = Field(60, ge=0, description="autoscaler: remove a worker idle this long")
    job_ttl_seconds: int = Field(600, ge=0, description="RayJob ttlSecondsAfterFinished")
    mlflow: MLflowOptions = Field(default_factory=MLflowOptions)
    serve_api_key_env: str | None = Field(SERVE_API_KEY_ENV, description="serve.api_key_env on the cluster when the "
                                          "config names none (its key: secrets.api_keys); null: keep the config's")
    ingress_from: list[NetworkPeer] = Field(default_factory=_ingress_controllers,
                                            description="who may reach the Serve port: the ingress controller; "
                                                        "default: namespaces labelled apollo-ray.io/serve-ingress=true")
    operator_from: list[NetworkPeer] = Field(default_factory=_kuberay_operator,
                                             description="who may reach the dashboard port besides the cluster: the "
                                                         "KubeRay operator (RayJob status, RayService deployment)")

    @field_validator("serve_api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.match(v):
            raise ValueError(f"{v!r} is not an environment variable name")
        return v

    @field_validator("namespace", "name")
    @classmethod
    def _dns(cls, v: str) -> str:
        # Object names are "<name>-<suffix>" and KubeRay derives Service names from them: DNS-1123 labels.
        if not _DNS_LABEL.match(v) or len(v) > 40:
            raise ValueError(f"{v!r} must be a DNS-1123 label of at most 40 characters (lowercase, digits, '-')")
        return v

    def ray_image(self, gpu: bool = False) -> str:
        if gpu:
            return self.gpu_image or f"rayproject/ray:{self.ray_version}-{self.python}-gpu"
        return self.image or f"rayproject/ray:{self.ray_version}-{self.python}-cpu"

    @property
    def mlflow_service(self) -> str:
        return f"{self.name}-mlflow"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_uri or f"http://{self.mlflow_service}.{self.namespace}.svc.cluster.local:{MLFLOW_PORT}"


def load_options(path: str | Path | None) -> DeployOptions:
    """Read ``deploy.yaml`` (None or a missing file = the defaults); errors name the key and the file."""
    if path is None or not Path(path).exists():
        return DeployOptions()
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    try:
        return DeployOptions.model_validate(raw)
    except ValidationError as err:
        lines = [f"  {'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"invalid deploy options ({path}):\n" + "\n".join(lines)) from None


# ---------------------------------------------------------------------------------------------- the cluster config
def for_cluster(cfg: Config, opts: DeployOptions) -> Config:
    """The run's config as the cluster sees it: storage on S3, tracking on the MLflow service, Serve on all interfaces
    (pods are reached through a Service, never over loopback) and so behind a bearer key (the config's
    ``serve.api_key_env``, else ``opts.serve_api_key_env``), then the deploy file's own overrides."""
    overrides = [f"storage.root={opts.storage_root}", f"tracking.uri={opts.tracking_uri}", "serve.host=0.0.0.0"]
    if opts.serve_api_key_env and not cfg.serve.api_key_env:
        overrides.append(f"serve.api_key_env={opts.serve_api_key_env}")
    overrides += opts.config_overrides
    return config_mod.resolve(config_mod.to_dict(cfg), overrides, origin="deploy options")


def _diff(value: dict, base: dict) -> dict:
    """Keys of ``value`` that differ from ``base``, recursively (lists compare whole)."""
    out: dict = {}
    for key, v in value.items():
        b = base.get(key)
        if isinstance(v, dict) and isinstance(b, dict):
            sub = _diff(v, b)
            if sub:
                out[key] = sub
        elif v != b:
            out[key] = v
    return out


def config_yaml(cfg: Config) -> str:
    """``cfg`` as a ``ray_config.yaml``: its preset plus what differs from it."""
    full = config_mod.to_dict(cfg)
    changes = _diff(full, config_mod.to_dict(config_mod.resolve({"preset": cfg.preset})))
    changes.pop("preset", None)
    return yaml.safe_dump({"preset": cfg.preset, **changes}, sort_keys=False, allow_unicode=True)


# ------------------------------------------------------------------------------------------------------ pod pieces
def _quantity(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{round(cpus * 1000)}m"


def _secret_env(name: str, secret: str, key: str, optional: bool = False) -> dict:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _api_key_envs(cfg: Config) -> list[str]:
    names = [cfg.rewrite.openai.api_key_env, cfg.serve.api_key_env]
    return sorted({n for n in names if n})


def auth_env(opts: DeployOptions) -> list[dict]:
    """Ray token authentication: the mode must be set explicitly in every Ray process, the token comes from a Secret."""
    return [{"name": "RAY_AUTH_MODE", "value": "token"},
            _secret_env("RAY_AUTH_TOKEN", opts.secrets.ray_auth, "auth_token")]


def mlflow_client_env(opts: DeployOptions) -> list[dict]:
    """The MLflow user of the stages (the server's admin, from the same Secret), with ``mlflow.auth: basic``."""
    if opts.mlflow.auth != "basic":
        return []
    s = opts.secrets.mlflow_auth
    return [_secret_env("MLFLOW_TRACKING_USERNAME", s, "username"),
            _secret_env("MLFLOW_TRACKING_PASSWORD", s, "password")]


def ray_env(cfg: Config, opts: DeployOptions) -> list[dict]:
    """Environment of every Ray container: token auth, S3 credentials, the MLflow user, API keys; secrets by reference
    only. The Serve key is required: without it in the Secret the pod does not start (rather than serve openly)."""
    s = opts.secrets
    return [
        *auth_env(opts),
        _secret_env("AWS_ACCESS_KEY_ID", s.s3, "AWS_ACCESS_KEY_ID"),
        _secret_env("AWS_SECRET_ACCESS_KEY", s.s3, "AWS_SECRET_ACCESS_KEY"),
        # Optional: absent for AWS S3 proper, set for SeaweedFS / MinIO.
        _secret_env("AWS_ENDPOINT_URL", s.s3, "AWS_ENDPOINT_URL", optional=True),
        {"name": "AWS_DEFAULT_REGION", "value": opts.s3_region},
        *mlflow_client_env(opts),
        *[_secret_env(n, s.api_keys, n, optional=n != cfg.serve.api_key_env) for n in _api_key_envs(cfg)],
    ]


def pod_security(uid: int, gid: int) -> dict:
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": gid, "fsGroup": gid,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security(uid: int, gid: int, read_only_root: bool) -> dict:
    """Complete on its own (the autoscaler sidecar gets only this one, not the pod's)."""
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": gid, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": read_only_root,
            "seccompProfile": {"type": "RuntimeDefault"}}


def ray_container_security() -> dict:
    # Root filesystem writable: Ray writes its session (logs, sockets, spilled objects), the runtime env (working_dir
    # unpacked, the pip virtualenv) under /tmp/ray, and pip, Hugging Face, torch and triton write caches under
    # /home/ray, which also holds the image's Python (/home/ray/anaconda3) and so cannot become an emptyDir. Nothing
    # else is granted: non-root, no privilege escalation, no capabilities, the runtime's seccomp profile.
    return container_security(RAY_UID, RAY_GID, read_only_root=False)


def pod_labels(opts: DeployOptions, component: str) -> dict:
    """Labels of a pod template: what the NetworkPolicies select (KubeRay adds its own ray.io/* labels)."""
    return {"app.kubernetes.io/instance": opts.name, "app.kubernetes.io/component": component}


def _config_volume(opts: DeployOptions) -> dict:
    return {"name": "apollo-config", "configMap": {"name": f"{opts.name}-config"}}


def _shm_volume() -> dict:
    # The object store lives in /dev/shm, which a container gets at 64 MiB unless given a memory-backed volume.
    return {"name": "dshm", "emptyDir": {"medium": "Memory"}}


def _mounts() -> list[dict]:
    return [{"name": "apollo-config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"}]


def _resources(cpu: str, memory: str, gpus: int = 0) -> dict:
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    requests = {"cpu": cpu, "memory": memory}
    return {"limits": limits, "requests": requests}


def _ray_container(name: str, image: str, env: list[dict], resources: dict, ports: list[dict] | None = None) -> dict:
    c: dict[str, Any] = {"name": name, "image": image, "env": env}
    if ports:
        c["ports"] = ports
    c["resources"] = resources
    c["securityContext"] = ray_container_security()
    c["volumeMounts"] = _mounts()
    return c


def _ray_pod_template(opts: DeployOptions, spec: dict) -> dict:
    # KubeRay copies the Ray container's securityContext to the init container it injects into workers.
    return {"metadata": {"labels": pod_labels(opts, RAY_POD)},
            "spec": {"securityContext": pod_security(RAY_UID, RAY_GID), **spec}}


def head_group(cfg: Config, opts: DeployOptions) -> dict:
    ports = [{"name": "gcs-server", "containerPort": 6379}, {"name": "dashboard", "containerPort": DASHBOARD_PORT},
             {"name": "client", "containerPort": 10001}, {"name": "serve", "containerPort": cfg.serve.port}]
    container = _ray_container("ray-head", opts.ray_image(), ray_env(cfg, opts),
                               _resources(opts.head.cpu or "2", opts.head.memory), ports)
    return {
        # num-cpus 0: no tasks on the head, whose memory the GCS and the job drivers need; workers do the work.
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
        "template": _ray_pod_template(opts, {"containers": [container],
                                             "volumes": [_config_volume(opts), _shm_volume()]}),
    }


def _worker_group(name: str, size: WorkerGroup, max_replicas: int, image: str, cpu: str, gpus: int,
                  env: list[dict], opts: DeployOptions) -> dict:
    container = _ray_container("ray-worker", image, env, _resources(size.cpu or cpu, size.memory, gpus))
    spec: dict[str, Any] = {"containers": [container], "volumes": [_config_volume(opts), _shm_volume()]}
    if gpus:
        # GPU node pools are usually tainted so that only pods asking for GPUs land there.
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    replicas = min(size.min_replicas, max_replicas)
    return {"groupName": name, "replicas": replicas, "minReplicas": replicas, "maxReplicas": max_replicas,
            "rayStartParams": {}, "template": _ray_pod_template(opts, spec)}


def worker_groups(cfg: Config, opts: DeployOptions) -> list[dict]:
    """One Ray Train worker per pod. CPU pods take ``cpus_per_worker``; GPU pods add ``ceil(gpus_per_worker)`` GPUs
    and scale from zero, so a CPU-only run never holds a GPU node."""
    r = cfg.resources
    env = ray_env(cfg, opts)
    cpu = _quantity(r.cpus_per_worker)
    # One spare CPU pod beyond the train workers: Ray Data and Train coordinator actors need CPUs of their own.
    cpu_max = opts.cpu_workers.max_replicas or r.num_workers + 1
    gpu_max = opts.gpu_workers.max_replicas or r.num_workers
    return [
        _worker_group("cpu-workers", opts.cpu_workers, cpu_max, opts.ray_image(), cpu, 0, env, opts),
        _worker_group("gpu-workers", opts.gpu_workers, gpu_max, opts.ray_image(gpu=True), cpu,
                      max(1, math.ceil(r.gpus_per_worker)), env, opts),
    ]


def cluster_spec(cfg: Config, opts: DeployOptions) -> dict:
    """The RayCluster spec shared by the RayCluster, every RayJob and the RayService."""
    return {
        "rayVersion": opts.ray_version,
        "authOptions": {"mode": "token", "secretName": opts.secrets.ray_auth},
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": opts.idle_timeout_seconds,
            # The autoscaler talks to the GCS like any other Ray process: it needs the token too.
            "env": auth_env(opts),
            "securityContext": ray_container_security(),
        },
        "headGroupSpec": head_group(cfg, opts),
        "workerGroupSpecs": worker_groups(cfg, opts),
    }


# ------------------------------------------------------------------------------------------------------ the objects
def _meta(opts: DeployOptions, name: str, component: str) -> dict:
    return {"name": name, "namespace": opts.namespace,
            "labels": {"app.kubernetes.io/name": "apollo-ray", "app.kubernetes.io/instance": opts.name,
                       "app.kubernetes.io/component": component}}


def project_requirements() -> list[str]:
    """The project's runtime dependencies, minus Ray (the image provides the matching one), each pinned to the
    version of ``constraints.txt`` — what the tests passed with — when the lock is there (a source checkout)."""
    pyproject = PACKAGE_DIR.parent / "pyproject.toml"
    if pyproject.exists():
        deps = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    else:
        deps = [d for d in importlib.metadata.requires("apollo-ray") or [] if "extra ==" not in d]
    locked = locked_versions(PACKAGE_DIR.parent / "constraints.txt")
    out = []
    for d in deps:
        name = re.match(r"^[A-Za-z0-9_.\-]+", d).group(0)
        if name.lower() == "ray":
            continue
        extras = re.match(r"^[A-Za-z0-9_.\-]+(\[[^\]]*\])?", d).group(1) or ""
        version = locked.get(_normal(name))
        out.append(f"{name}{extras}=={version}" if version else d)
    return out


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(path: Path) -> dict[str, str]:
    """``name==version`` lines of a pip constraints file, by normalised name; {} when there is none."""
    if not path.exists():
        return {}
    pins = (re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line) for line in path.read_text().splitlines())
    return {_normal(m.group(1)): m.group(2) for m in pins if m}


def runtime_env(cfg: Config, opts: DeployOptions) -> dict:
    env_vars = {"MLFLOW_TRACKING_URI": opts.tracking_uri, "PYTHONUNBUFFERED": "1", **opts.env_vars}
    return {"working_dir": opts.working_dir,
            "pip": project_requirements() if opts.pip is None else list(opts.pip),
            "env_vars": env_vars}


def _block_yaml(value: Any) -> str:
    return yaml.safe_dump(value, sort_keys=False, allow_unicode=True, width=120)


def namespace(opts: DeployOptions) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": opts.namespace}}


def config_map(cfg: Config, opts: DeployOptions) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(opts, f"{opts.name}-config", "config"),
            "data": {CONFIG_FILE: config_yaml(cfg)}}


def ray_cluster(cfg: Config, opts: DeployOptions) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _meta(opts, opts.name, "ray-cluster"),
            "spec": cluster_spec(cfg, opts)}


def _submitter(opts: DeployOptions) -> dict:
    # The submitter runs `ray job submit` against the dashboard: without the token it is refused. KubeRay fills in
    # the command when the template leaves it empty.
    container = {"name": "ray-job-submitter", "image": opts.ray_image(), "env": auth_env(opts),
                 "resources": {"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "500m", "memory": "256Mi"}},
                 "securityContext": ray_container_security()}
    return {"metadata": {"labels": pod_labels(opts, SUBMITTER_POD)},
            "spec": {"restartPolicy": "Never", "securityContext": pod_security(RAY_UID, RAY_GID),
                     "containers": [container]}}


def ray_job(cfg: Config, opts: DeployOptions, stage: str) -> dict:
    if stage not in JOB_STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(JOB_STAGES)}")
    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _meta(opts, f"{opts.name}-{stage}", f"job-{stage}"),
        "spec": {
            "entrypoint": f"python jobs/{stage}.py --config {CONFIG_PATH}",
            "runtimeEnvYAML": _block_yaml(runtime_env(cfg, opts)),
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": opts.job_ttl_seconds,
            "submitterPodTemplate": _submitter(opts),
            "rayClusterSpec": cluster_spec(cfg, opts),
        },
    }


def serve_config(cfg: Config, opts: DeployOptions) -> dict:
    return {
        "http_options": {"host": "0.0.0.0", "port": cfg.serve.port},
        "applications": [{
            "name": cfg.serve.model_name,
            "import_path": SERVE_IMPORT_PATH,
            "route_prefix": "/",
            "args": {"config": CONFIG_PATH},
            "runtime_env": runtime_env(cfg, opts),
        }],
    }


def ray_service(cfg: Config, opts: DeployOptions) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": _meta(opts, f"{opts.name}-serve", "serve"),
            "spec": {"serveConfigV2": _block_yaml(serve_config(cfg, opts)),
                     "rayClusterConfig": cluster_spec(cfg, opts)}}


# Run by an init container (the MLflow image's Python): MLflow reads its auth settings from an ini file, whose database
# URI may come from a Secret, which a ConfigMap cannot template. The admin user and the Flask key are not written:
# MLflow reads them from the environment (MLFLOW_AUTH_ADMIN_USERNAME/_PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY).
MLFLOW_AUTH_INI_SCRIPT = """\
import configparser
import os

ini = configparser.RawConfigParser()
ini["mlflow"] = {
    # Users the admin creates may read every experiment; requests without a known user get 401.
    "default_permission": "READ",
    # '%' is configparser's interpolation character: a URL-encoded password must reach MLflow unchanged.
    "database_uri": os.environ["MLFLOW_AUTH_DATABASE_URI"].replace("%", "%%"),
    "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
}
with open(os.environ["MLFLOW_AUTH_CONFIG_PATH"], "w") as f:
    ini.write(f)
"""


def _mlflow_auth(opts: DeployOptions, sqlite: bool) -> tuple[dict, list[dict]]:
    """The init container writing the auth ini, and the server's environment for basic auth."""
    m, s = opts.mlflow, opts.secrets.mlflow_auth
    db = ({"name": "MLFLOW_AUTH_DATABASE_URI", "value": "sqlite:////mlflow/basic_auth.db"} if sqlite
          else _secret_env("MLFLOW_AUTH_DATABASE_URI", m.database_secret, "auth_uri"))
    config_path = {"name": "MLFLOW_AUTH_CONFIG_PATH", "value": MLFLOW_AUTH_CONFIG}
    init = {
        "name": "mlflow-auth-config", "image": m.image, "command": ["python", "-c", MLFLOW_AUTH_INI_SCRIPT],
        "env": [db, config_path],
        "resources": {"limits": {"cpu": "200m", "memory": "128Mi"}, "requests": {"cpu": "50m", "memory": "64Mi"}},
        "securityContext": container_security(MLFLOW_UID, MLFLOW_GID, read_only_root=True),
        "volumeMounts": [{"name": "mlflow-auth", "mountPath": MLFLOW_AUTH_DIR}],
    }
    env = [config_path,
           _secret_env("MLFLOW_AUTH_ADMIN_USERNAME", s, "username"),
           _secret_env("MLFLOW_AUTH_ADMIN_PASSWORD", s, "password"),
           _secret_env("MLFLOW_FLASK_SERVER_SECRET_KEY", s, "flask_secret_key")]
    return init, env


def mlflow_objects(cfg: Config, opts: DeployOptions) -> dict[str, dict]:
    """The tracking server: Deployment + Service, and the sqlite PVC unless a database Secret is named. With
    ``mlflow.auth: basic`` (the default) MLflow's basic-auth app, whose users live beside the runs (the PVC, or the
    database Secret's ``auth_uri``). Non-root with a read-only root filesystem: /tmp is an emptyDir, and HOME."""
    m, name, ns = opts.mlflow, opts.mlflow_service, opts.namespace
    s = opts.secrets
    artifacts = m.artifacts_destination or f"{opts.storage_root.rstrip('/')}/mlflow-artifacts"
    # MLflow >= 3.5 rejects Host headers it does not know (DNS-rebinding guard): list the Service's DNS names, and
    # localhost for `kubectl port-forward`.
    hosts = [name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local", "localhost", "127.0.0.1"]
    allowed = ",".join(h for host in hosts for h in (host, f"{host}:*"))
    args = ["server", "--host", "0.0.0.0", "--port", str(MLFLOW_PORT), "--workers", "1",
            "--artifacts-destination", artifacts, "--serve-artifacts", "--allowed-hosts", allowed]
    env = [_secret_env("AWS_ACCESS_KEY_ID", s.s3, "AWS_ACCESS_KEY_ID"),
           _secret_env("AWS_SECRET_ACCESS_KEY", s.s3, "AWS_SECRET_ACCESS_KEY"),
           _secret_env("MLFLOW_S3_ENDPOINT_URL", s.s3, "AWS_ENDPOINT_URL", optional=True),
           {"name": "AWS_DEFAULT_REGION", "value": opts.s3_region},
           {"name": "HOME", "value": "/tmp"}]
    mounts: list[dict] = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[dict] = [{"name": "tmp", "emptyDir": {}}]
    objects: dict[str, dict] = {}
    if m.database_secret:
        env.append(_secret_env("MLFLOW_BACKEND_STORE_URI", m.database_secret, "uri"))
    else:
        args[1:1] = ["--backend-store-uri", "sqlite:////mlflow/mlflow.db"]
        mounts.append({"name": "mlflow-db", "mountPath": "/mlflow"})
        volumes.append({"name": "mlflow-db", "persistentVolumeClaim": {"claimName": name}})
        pvc_spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": m.storage}}}
        if m.storage_class:
            pvc_spec["storageClassName"] = m.storage_class
        objects["mlflow-pvc.yaml"] = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                      "metadata": _meta(opts, name, "mlflow"), "spec": pvc_spec}
    init_containers: list[dict] = []
    if m.auth == "basic":
        args[1:1] = ["--app-name", "basic-auth"]
        init, auth_env_ = _mlflow_auth(opts, sqlite=not m.database_secret)
        init_containers.append(init)
        env += auth_env_
        mounts.append({"name": "mlflow-auth", "mountPath": MLFLOW_AUTH_DIR, "readOnly": True})
        # In memory: the rendered ini may hold a database password.
        volumes.append({"name": "mlflow-auth", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}})
    selector = {"app.kubernetes.io/instance": opts.name, "app.kubernetes.io/component": MLFLOW_POD}
    container: dict[str, Any] = {
        "name": "mlflow", "image": m.image, "command": ["mlflow"], "args": args, "env": env,
        "ports": [{"name": "http", "containerPort": MLFLOW_PORT}],
        # /health needs no user, with or without auth.
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10},
        "resources": _resources(m.cpu, m.memory),
        "securityContext": container_security(MLFLOW_UID, MLFLOW_GID, read_only_root=True),
        "volumeMounts": mounts,
    }
    pod_spec: dict[str, Any] = {"securityContext": pod_security(MLFLOW_UID, MLFLOW_GID)}
    if init_containers:
        pod_spec["initContainers"] = init_containers
    pod_spec["containers"] = [container]
    pod_spec["volumes"] = volumes
    meta = _meta(opts, name, "mlflow")
    objects["mlflow-deployment.yaml"] = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
        "spec": {
            "replicas": 1,
            # sqlite on a ReadWriteOnce volume admits one writer: never run the old and the new pod side by side.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": meta["labels"]}, "spec": pod_spec},
        },
    }
    objects["mlflow-service.yaml"] = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(opts, name, "mlflow"),
        "spec": {"selector": selector, "ports": [{"name": "http", "port": MLFLOW_PORT, "targetPort": "http"}]},
    }
    return objects


def _tcp(port: int) -> dict:
    return {"protocol": "TCP", "port": port}


def network_policies(cfg: Config, opts: DeployOptions) -> dict[str, dict]:
    """Ingress to the Ray pods (of the RayCluster, every RayJob's and the RayService's clusters: one trust domain,
    sharing the token and the Secrets) and to MLflow. Egress stays open: S3, the model hub and PyPI (runtime env)."""
    ray = {"matchLabels": pod_labels(opts, RAY_POD)}
    submitter = {"matchLabels": pod_labels(opts, SUBMITTER_POD)}
    rules: list[dict] = [
        # GCS, raylets, object managers, workers, NCCL: any port, between Ray pods only.
        {"from": [{"podSelector": ray}]},
        # `ray job submit` talks to the dashboard (job API) only.
        {"from": [{"podSelector": submitter}], "ports": [_tcp(DASHBOARD_PORT)]},
    ]
    # An empty `from` would admit every source: a rule exists only for peers that are listed.
    if opts.operator_from:
        rules.append({"from": [p.manifest() for p in opts.operator_from], "ports": [_tcp(DASHBOARD_PORT)]})
    if opts.ingress_from:
        rules.append({"from": [p.manifest() for p in opts.ingress_from], "ports": [_tcp(cfg.serve.port)]})
    mlflow = {"matchLabels": {"app.kubernetes.io/instance": opts.name, "app.kubernetes.io/component": MLFLOW_POD}}

    def policy(name: str, selector: dict, ingress: list[dict]) -> dict:
        return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": _meta(opts, name, "network-policy"),
                "spec": {"podSelector": selector, "policyTypes": ["Ingress"], "ingress": ingress}}

    return {
        "networkpolicy-ray.yaml": policy(f"{opts.name}-ray", ray, rules),
        "networkpolicy-mlflow.yaml": policy(opts.mlflow_service, mlflow,
                                            [{"from": [{"podSelector": ray}], "ports": [_tcp(MLFLOW_PORT)]}]),
    }


def build_manifests(cfg: Config, opts: DeployOptions | None = None) -> dict[str, dict]:
    """File name → object, for the run's config ``cfg`` (as resolved from ``ray_config.yaml``) on this cluster."""
    opts = opts or DeployOptions()
    ccfg = for_cluster(cfg, opts)
    out: dict[str, dict] = {"namespace.yaml": namespace(opts), "configmap.yaml": config_map(ccfg, opts)}
    out.update(mlflow_objects(ccfg, opts))
    out.update(network_policies(ccfg, opts))
    out["raycluster.yaml"] = ray_cluster(ccfg, opts)
    out["rayservice.yaml"] = ray_service(ccfg, opts)
    for stage in JOB_STAGES:
        out[f"rayjob-{stage}.yaml"] = ray_job(ccfg, opts, stage)
    return out


def kustomization(files: list[str], opts: DeployOptions) -> dict:
    # The long-lived objects only: applying every RayJob at once would start eight clusters.
    resources = [f for f in files if not f.startswith(("rayjob-", "rayservice"))]
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "namespace": opts.namespace, "resources": resources}


def _kustomization_header(cfg: Config, opts: DeployOptions) -> str:
    """``cfg``: the cluster's config (:func:`for_cluster`)."""
    s, ns, m = opts.secrets, opts.namespace, opts.mlflow
    serve_key = cfg.serve.api_key_env
    lines = [
        "#",
        "# Once per cluster (the KubeRay operator installed), create the Secrets the manifests refer to:",
        f"#   kubectl create namespace {ns}",
        f"#   kubectl -n {ns} create secret generic {s.ray_auth} --from-literal=auth_token=$(openssl rand -hex 32)",
        f"#   kubectl -n {ns} create secret generic {s.s3} --from-literal=AWS_ACCESS_KEY_ID=... \\",
        "#       --from-literal=AWS_SECRET_ACCESS_KEY=... [--from-literal=AWS_ENDPOINT_URL=http://...]",
    ]
    keys = [f"--from-literal={n}=$(openssl rand -hex 32)" if n == serve_key else f"[--from-literal={n}=...]"
            for n in _api_key_envs(cfg)]
    if keys:
        lines.append(f"#   kubectl -n {ns} create secret generic {s.api_keys} \\")
        lines += [f"#       {k} \\" for k in keys[:-1]] + [f"#       {keys[-1]}"]
    if m.auth == "basic":
        lines += [
            f"#   kubectl -n {ns} create secret generic {s.mlflow_auth} --from-literal=username=apollo \\",
            "#       --from-literal=password=$(openssl rand -hex 24) \\",
            "#       --from-literal=flask_secret_key=$(openssl rand -hex 32)",
        ]
        if m.database_secret:
            lines.append(f"#   ({m.database_secret}: `uri`, and `auth_uri` for MLflow's users; it may equal `uri`)")
    if serve_key:
        lines += [f"# Serve answers only `Authorization: Bearer <{serve_key}>`; no Ray pod starts without that key",
                  "# (serving openly takes `serve_api_key_env: null` in deploy.yaml and no serve.api_key_env in the config)."]
    else:
        lines.append("# Serve is OPEN: no serve.api_key_env (deploy.yaml has serve_api_key_env: null).")
    if m.auth == "basic":
        lines += ["# MLflow creates its admin user on its first start and ignores the Secret's password afterwards:",
                  "# rotate it through MLflow (mlflow.server.auth.client.AuthServiceClient), then update the Secret."]
    else:
        lines.append("# MLflow is OPEN (mlflow.auth: none): anyone who reaches it reads and writes the runs.")
    lines += [
        "# NetworkPolicies admit the Serve port only from the ingress controller (deploy.yaml ingress_from; default:",
        "# namespaces labelled apollo-ray.io/serve-ingress=true), e.g.",
        "#   kubectl label namespace ingress-nginx apollo-ray.io/serve-ingress=true",
        "# and the dashboard port from the KubeRay operator (operator_from; default: pods labelled",
        "# app.kubernetes.io/name=kuberay-operator, as its Helm chart does), given a CNI that enforces them.",
        f"# Upload the code archive named by working_dir ({opts.working_dir}), e.g.",
        "#   git archive -o apollo-ray.zip HEAD && aws s3 cp apollo-ray.zip <working_dir>",
        "# Then: `kubectl apply -k cluster/kuberay` (namespace, config, MLflow, NetworkPolicies, RayCluster);",
        "# a stage on its own cluster: `kubectl apply -f cluster/kuberay/rayjob-<stage>.yaml`;",
        "# serving: `kubectl apply -f cluster/kuberay/rayservice.yaml`.",
    ]
    return "\n".join(lines) + "\n"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (embedded YAML, the config) as literal blocks, so the files read and diff well; pieces
    shared between objects (the env of every container) written out in full, never as YAML anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def dump(obj: dict) -> str:
    # Key order is the order the objects are built in (apiVersion, kind, metadata, spec): stable and conventional.
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)


def render(cfg: Config, opts: DeployOptions | None = None) -> dict[str, str]:
    """File name → text of every generated file, the kustomization included."""
    opts = opts or DeployOptions()
    objects = build_manifests(cfg, opts)
    texts = {name: HEADER + dump(obj) for name, obj in objects.items()}
    header = _kustomization_header(for_cluster(cfg, opts), opts)
    texts["kustomization.yaml"] = HEADER + header + dump(kustomization(list(objects), opts))
    return texts


def write_manifests(cfg: Config, out_dir: str | Path, opts: DeployOptions | None = None) -> list[Path]:
    """Write every generated file into ``out_dir``; generated files no longer produced are removed, others kept."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = render(cfg, opts)
    for stale in out.glob("*.yaml"):
        if stale.name not in texts and stale.read_text(encoding="utf-8").startswith(HEADER):
            stale.unlink()
    written = []
    for name, text in texts.items():
        path = out / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        written.append(path)
    return written

