"""``serve.engine: vllm`` without a GPU: the generated Ray Serve LLM app config (what vLLM loads, with which engine
arguments and Serve options), checked against Ray's own ``LLMConfig`` model, and the mistakes refused up front.

Building the app itself needs vLLM (``ray[llm]``, GPU images); where it is missing that is a one-line mistake.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

from apollo_ray import config as config_mod

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _ray_llm_config(data: dict):
    """Ray's own validation of an LLMConfig. The public ``ray.serve.llm`` import needs vLLM; the model behind it
    does not."""
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    return LLMConfig.model_validate(data)


def _checkpoint(path, model_type: str) -> str:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return str(path)


def test_a_post_moe_run_is_served_from_its_portable_export(make_cfg, tmp_path):
    from apollo_ray.serve import app, vllm

    cfg = make_cfg(f"storage.root={tmp_path}", "serve.engine=vllm", "train.run_name=r1", "resources.use_gpu=true",
                   "resources.gpus_per_worker=2", "serve.replicas=3", "serve.max_concurrent_requests=77",
                   "model.dtype=bfloat16")
    assert cfg.moe.layers > 0
    out = app.serve_config(cfg)
    (application,) = out["applications"]
    assert application["import_path"] == "ray.serve.llm:build_openai_app"
    (llm,) = application["args"]["llm_configs"]
    assert llm["model_loading_config"] == {"model_id": "apollo", "model_source": f"{tmp_path}/models/r1-qwen2_moe"}
    assert llm["engine_kwargs"] == {"dtype": "bfloat16", "tensor_parallel_size": 2}
    assert llm["deployment_config"] == {"num_replicas": 3, "max_ongoing_requests": 77}
    parsed = _ray_llm_config(llm)
    assert parsed.model_id == "apollo" and parsed.engine_kwargs["tensor_parallel_size"] == 2
    assert yaml.safe_load(yaml.safe_dump(out)) == out  # a file `serve deploy` can take

    dense = make_cfg(f"storage.root={tmp_path}", "serve.engine=vllm", "train.run_name=r1", "moe.layers=0")
    assert vllm.llm_config(dense)["model_loading_config"]["model_source"] == f"{tmp_path}/models/r1"
    auto = vllm.llm_config(cfg, autoscaling={"min_replicas": 1, "max_replicas": 4})["deployment_config"]
    assert auto == {"max_ongoing_requests": 77, "autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}
    _ray_llm_config(vllm.llm_config(cfg, autoscaling={"min_replicas": 1, "max_replicas": 4}))


def test_a_local_post_moe_checkpoint_needs_its_export(make_cfg, tmp_path):
    from apollo_ray.serve import vllm

    moe = _checkpoint(tmp_path / "m", "apollo_post_moe")
    cfg = make_cfg(f"serve.model={moe}", "serve.engine=vllm")
    with pytest.raises(config_mod.ConfigError, match=r"serve.model.*Post-MoE.*apollo-ray export --model"):
        vllm.llm_config(cfg)
    portable = _checkpoint(tmp_path / "m-qwen2_moe", "qwen2_moe")
    assert vllm.llm_config(cfg)["model_loading_config"]["model_source"] == portable
    dense = _checkpoint(tmp_path / "d", "qwen2")
    assert vllm.llm_config(make_cfg(f"serve.model={dense}", "serve.engine=vllm"))[
        "model_loading_config"]["model_source"] == dense
    hub = make_cfg("serve.model=Qwen/Qwen2-0.5B", "serve.engine=vllm")
    assert vllm.llm_config(hub)["model_loading_config"]["model_source"] == "Qwen/Qwen2-0.5B"


def test_remote_models_and_overrides(make_cfg):
    from apollo_ray.serve import vllm

    cfg = make_cfg("serve.model=s3://bucket/models/r1-qwen2_moe", "serve.engine=vllm",
                   "storage.endpoint_url=http://127.0.0.1:8333",
                   'serve.vllm={"engine_kwargs": {"gpu_memory_utilization": 0.8, "tensor_parallel_size": 4}, '
                   '"accelerator_type": "H100", "deployment_config": {"max_ongoing_requests": 9}}')
    llm = vllm.llm_config(cfg)
    assert llm["model_loading_config"]["model_source"] == {"bucket_uri": "s3://bucket/models/r1-qwen2_moe"}
    assert llm["runtime_env"] == {"env_vars": {"AWS_ENDPOINT_URL": "http://127.0.0.1:8333"}}
    assert llm["engine_kwargs"] == {"dtype": cfg.model.dtype, "tensor_parallel_size": 4,
                                    "gpu_memory_utilization": 0.8}
    assert llm["deployment_config"] == {"num_replicas": 1, "max_ongoing_requests": 9}
    assert llm["accelerator_type"] == "H100"
    assert _ray_llm_config(llm).accelerator_type == "H100"


def test_what_vllm_cannot_do_is_refused_naming_the_key(make_cfg):
    proxy = json.dumps({"base": "a", "expert": "b", "anti_expert": "c"})
    with pytest.raises(config_mod.ConfigError, match=r"serve.engine.*proxy"):
        make_cfg("serve.engine=vllm", f"serve.proxy={proxy}")
    with pytest.raises(config_mod.ConfigError, match=r"serve.engine.*API key"):
        make_cfg("serve.engine=vllm", "serve.api_key_env=KEY")
    with pytest.raises(config_mod.ConfigError, match=r"serve.engine"):
        make_cfg("serve.engine=tgi")


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here: the app builds")
def test_building_the_app_without_vllm_is_a_one_line_mistake(make_cfg, tmp_path, capsys):
    from apollo_ray.cli import main
    from apollo_ray.errors import UserError
    from apollo_ray.serve import app

    dense = _checkpoint(tmp_path / "d", "qwen2")
    cfg = make_cfg(f"serve.model={dense}", "serve.engine=vllm")
    with pytest.raises(UserError, match=r"ray\[llm\]"):
        app.app_for(cfg)
    path = tmp_path / "serve.yaml"  # the config file needs no vLLM: the cluster that runs it has it
    assert main(["serve", "--write-config", str(path), "--set", f"serve.model={dense}",
                 "--set", "serve.engine=vllm"]) == 0
    written = yaml.safe_load(path.read_text())["applications"][0]
    assert written["import_path"] == "ray.serve.llm:build_openai_app"
    assert written["args"]["llm_configs"][0]["model_loading_config"]["model_source"] == dense
