"""Mistakes that only show at run time fail in seconds with one line naming the key, and credentials inside URL values
never reach MLflow params, manifests or logs; MLflow artifacts live under the storage root.

Every server these tests talk to is one they start (sqlite MLflow in a temp folder) or a port they reserved and
closed themselves, so nothing answers there."""

from __future__ import annotations

import io
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from apollo_ray import config as config_mod
from apollo_ray.redact import redact, redact_text, redact_url
from apollo_ray.storage import Manifest, Storage
from apollo_ray.tracking import Tracker

SECRET = "s3cr3t-Tok3n"


def _dead_port() -> int:
    """A port this test reserved and released: nothing listens there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(tmp_path: Path, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([str(Path(sys.executable).parent / "apollo-ray"), *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=base | (env or {}))


def _one_line_exit_2(r: subprocess.CompletedProcess, command: str) -> str:
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"apollo-ray {command}: "), last
    return last


@pytest.mark.parametrize("env", [
    {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""},  # no credentials
    {"AWS_ACCESS_KEY_ID": "apollo", "AWS_SECRET_ACCESS_KEY": "apollo"},  # credentials, dead endpoint
])
def test_unreachable_object_storage_is_one_line_in_seconds(tmp_path, env):
    t0 = time.monotonic()
    r = _cli(tmp_path, "collect", "--set", "storage.root=s3://apollo/runs",
             "--set", f"storage.endpoint_url=http://127.0.0.1:{_dead_port()}", env=env)
    line = _one_line_exit_2(r, "collect")
    assert "storage.root=s3://apollo/runs" in line and "cannot reach it" in line
    assert time.monotonic() - t0 < 60, "the check must not wait out S3 retries"


def test_unreachable_mlflow_server_is_one_line_and_hides_the_password(tmp_path):
    r = _cli(tmp_path, "evaluate", "--set", f"storage.root={tmp_path}",
             "--set", f"tracking.uri=http://alice:{SECRET}@127.0.0.1:{_dead_port()}")
    line = _one_line_exit_2(r, "evaluate")
    assert "tracking.uri=http://***@127.0.0.1:" in line and "no MLflow server answers" in line
    assert SECRET not in r.stderr + r.stdout


def test_gpus_asked_for_on_a_machine_without_them(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = _cli(tmp_path, "train", "--set", f"storage.root={tmp_path}", "--set", "resources.use_gpu=true",
             "--set", "resources.gpus_per_worker=1")
    assert "resources.use_gpu=true" in _one_line_exit_2(r, "train")


def test_serve_with_an_empty_key_variable(tmp_path):
    r = _cli(tmp_path, "serve", "--set", f"storage.root={tmp_path}", "--set", "serve.api_key_env=APOLLO_TEST_KEY",
             env={"APOLLO_TEST_KEY": ""})
    assert "serve.api_key_env='APOLLO_TEST_KEY'" in _one_line_exit_2(r, "serve")


@pytest.mark.parametrize("override, key", [
    ("train.lr=.inf", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("train.seq_len=4096", "train.seq_len"),  # the tiny model has 2,048 positions
    ("rewrite.prompt_version=v9", "rewrite.prompt_version"),
])
def test_impossible_settings_are_rejected(override, key):
    with pytest.raises(config_mod.ConfigError, match=key.replace(".", r"\.")):
        config_mod.resolve({}, [override])


def test_a_config_that_is_not_text_or_not_a_file(tmp_path):
    binary = tmp_path / "run.yaml"
    binary.write_bytes(b"preset: tiny\n\xff\xfe\n")
    with pytest.raises(config_mod.ConfigError, match="not UTF-8"):
        config_mod.load(binary)
    with pytest.raises(config_mod.ConfigError, match="not a file"):
        config_mod.load(tmp_path)


# -------------------------------------------------------------------------------------------------------- secrets
@pytest.mark.parametrize("url, shown", [
    (f"https://bob:{SECRET}@mlflow.example.org:5000/x", "https://***@mlflow.example.org:5000/x"),
    (f"http://h:8000/v1?api_key={SECRET}&model=m", "http://h:8000/v1?api_key=***&model=m"),
    (f"https://h/p?X-Amz-Signature={SECRET}", "https://h/p?X-Amz-Signature=***"),
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
    ("s3://bucket/runs", "s3://bucket/runs"),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown
    assert redact_text(f"uri {url} used") == f"uri {shown} used"


def test_secrets_reach_neither_params_nor_manifests_nor_logs_and_artifacts_stay_under_the_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a ./mlruns here would be the bug
    root = tmp_path / "runs"
    cfg = config_mod.resolve({}, [f"storage.root={root}",
                                  f"rewrite.openai.base_url=https://user:{SECRET}@llm.example.org/v1",
                                  f"storage.endpoint_url=http://key:{SECRET}@127.0.0.1:1"])
    tracker = Tracker(cfg)
    with tracker.stage("rewrite", section=cfg.rewrite.model_dump(mode="json")) as run:
        run.set_tags({"apollo.endpoint": cfg.storage.endpoint_url})
        (tmp_path / "plot.txt").write_text("x")
        run.log_artifact(tmp_path / "plot.txt")
        run_id = run.run_id
    client = mlflow.MlflowClient(cfg.tracking_uri())
    got = client.get_run(run_id)
    values = list(got.data.params.values()) + list(got.data.tags.values())
    assert any("https://***@llm.example.org/v1" == v for v in values)  # logged, redacted
    assert not [v for v in values if SECRET in v]
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    assert exp.artifact_location == (root / "mlflow-artifacts").as_uri()
    assert list((root / "mlflow-artifacts").rglob("plot.txt")) and not (tmp_path / "mlruns").exists()

    st = Storage(str(root))
    m = Manifest(stage="rewrite", fingerprint="f", config=cfg.rewrite.model_dump(mode="json"),
                 extra={"endpoint": cfg.storage.endpoint_url})
    st.write_manifest(str(root / "qa"), m)
    text = (root / "qa" / "manifest.json").read_text()
    assert SECRET not in text and "https://***@llm.example.org/v1" in text
    assert redact({"a": [f"http://u:{SECRET}@h"]}) == {"a": ["http://***@h"]}


def test_log_lines_are_redacted():
    from apollo_ray.runtime import setup_logging

    setup_logging()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        setup_logging()  # installs the filter on every root handler, this one included
        logging.getLogger("apollo_ray.test").warning("tracking at %s", f"http://u:{SECRET}@mlflow:5000")
    finally:
        root.removeHandler(handler)
    assert "http://***@mlflow:5000" in stream.getvalue() and SECRET not in stream.getvalue()
