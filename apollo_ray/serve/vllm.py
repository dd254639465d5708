"""``serve.engine: vllm``: the served model as a Ray Serve LLM app (``ray.serve.llm``, vLLM underneath) for GPUs.

Ray Serve LLM brings vLLM's paged attention, CUDA graphs and tensor parallelism behind the same OpenAI routes
(``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``). It runs checkpoints vLLM knows: a dense Qwen2 one
as trained, and a Post-MoE one through its portable export (``model.export``: ``models/<run>-qwen2_moe/``, a stock
``Qwen2MoeForCausalLM``), which the app picks for this run's model. What stays with ``serve.engine: apollo``:
language / hybrid routing at inference, proxy-tuning, the ``/v1/eval`` routes and the API key check (the config
refuses the last two with vllm).

``llm_config(cfg)`` is the generated ``LLMConfig`` as plain data: the model (id = ``serve.model_name``; a path, or
``{"bucket_uri": ...}`` for s3://), vLLM's dtype from ``model.dtype``, tensor parallelism from
``resources.gpus_per_worker``, replicas and ``max_ongoing_requests`` from ``serve``, and ``serve.vllm`` merged over
it. ``serve_config(cfg)`` writes it as a Serve config file whose app is ``ray.serve.llm:build_openai_app``, so the
cluster needs no apollo_ray to run it. Building the app needs vLLM (``pip install 'ray[llm]'`` with the image's Ray,
GPU images only); without it only the config can be generated.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from apollo_ray.config import Config, ConfigError
from apollo_ray.errors import UserError

IMPORT_PATH = "ray.serve.llm:build_openai_app"
INSTALL = "pip install -c constraints.txt 'ray[llm]' (the image's Ray; GPU images)"


def model_source(cfg: Config) -> str:
    """What vLLM loads: ``serve.model`` as given, else this run's trained model — its portable Qwen2-MoE export when
    the run is Post-MoE. A local Post-MoE checkpoint is refused unless its export sits beside it (then that is used)."""
    from apollo_ray.model.export import portable_uri

    if not cfg.serve.model:
        trained = cfg.uri("models", cfg.train.run_name)
        return portable_uri(trained) if cfg.moe.layers else trained
    path = cfg.serve.model
    local = Path(path.removeprefix("file://")).expanduser()
    if ("://" in path and not path.startswith("file://")) or not (local / "config.json").exists():
        return path  # a hub id or a remote folder: vLLM finds out what it is
    if json.loads((local / "config.json").read_text()).get("model_type") != "apollo_post_moe":
        return path
    portable = Path(portable_uri(str(local)))
    if (portable / "config.json").exists():
        return str(portable)
    raise ConfigError(f"serve.model = {path!r} is a Post-MoE checkpoint, which vLLM cannot open; write its portable "
                      f"copy with `apollo-ray export --model {path}` (to {portable}) or point serve.model at one")


def llm_config(cfg: Config, autoscaling: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``LLMConfig`` of the served model, as plain data (JSON/YAML-able)."""
    s, r = cfg.serve, cfg.resources
    source = model_source(cfg)
    remote = "://" in source and not source.startswith("file://")
    deployment: dict[str, Any] = {"max_ongoing_requests": s.max_concurrent_requests}
    deployment.update({"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": s.replicas})
    out: dict[str, Any] = {
        "model_loading_config": {"model_id": s.model_name,
                                 "model_source": {"bucket_uri": source} if remote else source.removeprefix("file://")},
        "engine_kwargs": {"dtype": cfg.model.dtype,
                          "tensor_parallel_size": max(1, int(r.gpus_per_worker)) if r.use_gpu else 1},
        "deployment_config": deployment,
    }
    if remote and cfg.storage.endpoint_url:  # an S3-compatible store (SeaweedFS, MinIO): the download must find it
        out["runtime_env"] = {"env_vars": {"AWS_ENDPOINT_URL": cfg.storage.endpoint_url}}
    return _merged(out, s.vllm)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def serving_args(cfg: Config, autoscaling: dict[str, Any] | None = None) -> dict[str, Any]:
    """``build_openai_app``'s argument (``LLMServingArgs`` as data)."""
    return {"llm_configs": [llm_config(cfg, autoscaling)]}


def serve_config(cfg: Config) -> dict[str, Any]:
    """A Serve config file (``serve deploy``) running Ray Serve LLM's own app on this model."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.serve.host, "port": cfg.serve.port},
        "applications": [{"name": cfg.serve.model_name, "route_prefix": "/", "import_path": IMPORT_PATH,
                          "args": serving_args(cfg)}],
    }


def app(cfg: Config, autoscaling: dict[str, Any] | None = None) -> Any:
    """The Ray Serve LLM application (needs vLLM)."""
    try:
        from ray.serve.llm import build_openai_app
    except ImportError as e:
        raise UserError(f"serve.engine=vllm needs Ray Serve LLM with vLLM, which is not installed here ({e}); "
                        f"{INSTALL}, or use serve.engine=apollo") from None
    return build_openai_app(serving_args(cfg, autoscaling))
