"""The cluster path for real: a two-node Ray cluster with token auth, SeaweedFS S3 and an MLflow server on this
machine; `jobs/pipeline.py` submitted with the real `ray job submit` CLI on the tiny preset; outputs checked in S3
and MLflow; everything torn down."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ROOT = "s3://apollo/e2e"


def test_pipeline_submitted_to_a_local_multinode_cluster():
    import mlflow

    import apollo_ray  # noqa: F401
    from apollo_ray.localcluster import LocalCluster
    from apollo_ray.storage import Storage

    cluster = LocalCluster().start()
    try:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **cluster.env()}
        ray_bin = str(Path(sys.executable).parent / "ray")
        runtime_env = {"env_vars": {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                         "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}}
        args = ["python", "jobs/pipeline.py", "--config", "ray_config.yaml", "--set", f"storage.root={ROOT}",
                "--set", f"tracking.uri={cluster.mlflow.uri}", "--set", "train.max_steps=4",
                "--set", "train.checkpoint_every=4", "--set", "train.eval_every=2"]
        sub = subprocess.run([ray_bin, "job", "submit", "--address", cluster.dashboard_url, "--no-wait",
                              "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env), "--", *args],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert sub.returncode == 0, sub.stdout[-2000:] + sub.stderr[-3000:]
        job_id = re.search(r"raysubmit_[A-Za-z0-9]+", sub.stdout + sub.stderr).group(0)
        deadline, status = time.time() + 1800, ""
        while time.time() < deadline:
            st = subprocess.run([ray_bin, "job", "status", "--address", cluster.dashboard_url, job_id], env=env,
                                capture_output=True, text=True, timeout=120)
            # The CLI says "Job '...' succeeded / failed / was stopped" on stderr, status "RUNNING" etc. on stdout.
            status = (st.stdout + st.stderr).lower()
            if any(s in status for s in ("succeeded", "failed", "stopped")):
                break
            time.sleep(10)
        logs = subprocess.run([ray_bin, "job", "logs", "--address", cluster.dashboard_url, job_id], env=env,
                              capture_output=True, text=True, timeout=120).stdout
        assert "succeeded" in status, status[-2000:] + logs[-6000:]

        result = json.JSONDecoder().raw_decode(logs[logs.rindex('{\n "corpus"'):])[0]
        st = Storage(ROOT, endpoint_url=env["AWS_ENDPOINT_URL"])
        os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
        for key in ("corpus", "qa", "model", "evaluation", "analysis"):
            assert result[key].startswith(ROOT), result[key]
            st.verify(result[key])  # every stage's manifest is in S3 and its shards match their hashes
        from transformers import AutoModelForCausalLM

        local = st.get_dir(result["model"], tempfile.mkdtemp())
        model = AutoModelForCausalLM.from_pretrained(local)
        assert model.config.model_type == "apollo_post_moe"
        table = st.read_text(f"{result['evaluation']}/table.md")
        assert "Major" in table and "zh" in table

        client = mlflow.MlflowClient(cluster.mlflow.uri)
        exp = client.get_experiment_by_name("apollo-ray")
        runs = client.search_runs([exp.experiment_id], max_results=200)
        parent = [r for r in runs if r.info.run_name == "pipeline"][0]
        children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert {"collect", "rewrite", "train", "evaluate", "analyze"} <= children
        lineage = {k: v for k, v in parent.data.tags.items() if k.startswith("apollo.lineage.")}
        assert any(v.endswith(result["model"]) for v in lineage.values())
    finally:
        cluster.stop()
