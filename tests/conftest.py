"""Shared fixtures: real services (SeaweedFS S3, MLflow sqlite), a local Ray, the developers' shared/ data.

Data that is not in the repository lives in the developers' ``shared/`` folder beside the checkout (``SHARED``); every
test reaches it through ``xmedbench_dev`` / ``kuberay_crds`` (or the constants below), which skip with where the data
comes from when a clone has no such folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from apollo_ray import config as config_mod

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
XMEDBENCH_DEV = SHARED / "data" / "xmedbench" / "dev"
CRDS = SHARED / "kuberay" / "crds"


def _shared_or_skip(path: Path, what: str) -> Path:
    if not path.is_dir():
        pytest.skip(f"{what} from the developers' shared/ folder beside the checkout: {path} not found")
    return path


@pytest.fixture(scope="session")
def xmedbench_dev() -> Path:
    """The XMedBench dev split (one JSON file per language), or a skip."""
    return _shared_or_skip(XMEDBENCH_DEV, "XMedBench dev split (1,114 real exam questions)")


@pytest.fixture(scope="session")
def kuberay_crds() -> Path:
    """The KubeRay CRDs (RayCluster, RayJob, RayService YAML), or a skip."""
    return _shared_or_skip(CRDS, "KubeRay CRD schemas (ray.io_rayclusters/rayjobs/rayservices.yaml)")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS ``weed mini``) on 127.0.0.1 with a bucket ``apollo``; env set for s3fs clients."""
    from apollo_ray.services import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray of 2 CPUs for the module, with its dashboard on 127.0.0.1 as ``runtime.init_ray`` starts it: the
    State API (``ray.util.state``, which fault tests use to find their targets in this cluster only) needs it.

    Workers inherit the environment at ``ray.init``: a module whose workers need the S3 server marks its tests
    ``usefixtures("s3")`` — the session-scoped server then starts (and sets its env) before this fixture runs.
    """
    import ray

    assert not ray.is_initialized(), "a Ray from an earlier module is still up"
    saved = os.environ.pop("RAY_ADDRESS", None)  # never a cluster someone has running: a Ray of our own
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for the module: tiny matmuls are fastest single-threaded, and a second thread on a
    busy 2-core box only contends (up to ~100x slower)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def make_cfg(tmp_path):
    """A resolved config rooted in a fresh tmp folder; extra ``--set`` style overrides as args."""

    def make(*overrides: str, root: str | None = None) -> config_mod.Config:
        return config_mod.resolve({}, [f"storage.root={root or tmp_path / 'store'}", *overrides])

    return make
