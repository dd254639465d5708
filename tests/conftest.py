"""Shared fixtures: real services (SeaweedFS S3, MLflow sqlite), started here and stopped after."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from apollo_ray import config as config_mod

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
XMEDBENCH_DEV = SHARED / "data" / "xmedbench" / "dev"
CRDS = SHARED / "kuberay" / "crds"


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


@pytest.fixture
def make_cfg(tmp_path):
    """A resolved config rooted in a fresh tmp folder; extra ``--set`` style overrides as args."""

    def make(*overrides: str, root: str | None = None) -> config_mod.Config:
        return config_mod.resolve({}, [f"storage.root={root or tmp_path / 'store'}", *overrides])

    return make
