"""Serve bench: latency and throughput under concurrency, and what proxy-tuning costs per token.

1. Concurrency: the tiny preset model served by the real app (``app_for``), C clients (default 16) each sending
   requests back to back over HTTP (``max_tokens`` fixed, seeded sampling); p50 / p99 latency and completion
   tokens per second over the whole run.
2. Proxy-tuning, co-located vs composed, per token: expert = a perturbed copy of the tiny model, anti-expert = the
   tiny model, and as the base first the tiny model itself (the tiny trio), then a "large" tiny model (``--large-*``
   dims, same tokenizer).
   - co-located: the app's ``<name>-proxy`` deployment, one replica holding the three models;
   - composed: three ``LogitsServer`` deployments, one per model, each keeping its requests' KV caches, and a
     coordinator that fetches the three logit vectors over handles at every token and combines them.
   Per-token time is the difference between a 72- and an 8-token greedy answer (prefill and call overhead cancel),
   divided by 64; the fastest of interleaved repetitions, called through DeploymentHandles (no HTTP).

The ratio printed last is (t_proxy / t_base) / (1 + 2·c_small/c_large), c = forward FLOPs per token from
``model.plan`` at the bench's mean context: 1.0 means proxy-tuning costs exactly its two extra small forwards;
target ≤ 1.15. Each replica gets 1 CPU and 1 torch thread (``resources.cpus_per_worker=1``).

    python bench/serve.py [--clients 16] [--requests 160] [--max-tokens 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ray import serve  # noqa: E402

SHORT, LONG = 8, 72
PROMPT = "Deficiency of which vitamin causes scurvy? Explain the mechanism and the treatment."


# --------------------------------------------------------------------------------------------- composed proxy-tuning
@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
class LogitsServer:
    """One model of a composed trio: last-position logits per request, the KV caches kept here between calls."""

    def __init__(self, path: str):
        import torch

        from apollo_ray.serve.engine import load_checkpoint

        torch.set_num_threads(1)
        self.model, _ = load_checkpoint(path)
        self.caches: dict[str, Any] = {}

    def _forward(self, sid: str, ids: list[int]) -> Any:
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids]), cache=self.caches.get(sid), use_cache=True,
                             logits_to_keep=1)
        self.caches[sid] = out.cache
        return out.logits[0, -1].float()

    def prefill(self, sid: str, ids: list[int]) -> Any:
        return self._forward(sid, ids)

    def step(self, sid: str, token: int) -> Any:
        return self._forward(sid, [token])

    def close(self, sid: str) -> None:
        self.caches.pop(sid, None)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class ComposedProxy:
    def __init__(self, base: Any, expert: Any, anti: Any, tokenizer_path: str, alpha: float):
        from transformers import AutoTokenizer

        self.models = (base, expert, anti)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.alpha = alpha

    async def generate(self, prompt: str, max_tokens: int) -> int:
        import torch

        from apollo_ray.serve.engine import completion_prompt_ids
        from apollo_ray.serve.proxy import combine

        sid = uuid.uuid4().hex
        ids = completion_prompt_ids(self.tokenizer, prompt)
        try:
            zs = await asyncio.gather(*(m.prefill.remote(sid, ids) for m in self.models))
            for n in range(1, max_tokens + 1):
                token = int(torch.argmax(combine(*zs, self.alpha)))
                if n == max_tokens:
                    return n
                zs = await asyncio.gather(*(m.step.remote(sid, token) for m in self.models))
            return max_tokens
        finally:
            await asyncio.gather(*(m.close.remote(sid) for m in self.models))


# ------------------------------------------------------------------------------------------------------------ models
def build_models(root: Path, large: dict[str, int]) -> dict[str, Any]:
    """The tiny base (with its tokenizer), a perturbed copy (the expert) and a large model on the same tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from apollo_ray import config as config_mod
    from apollo_ray.model.tiny import build_tiny_model, ensure_base
    from apollo_ray.storage import Storage

    cfg = config_mod.resolve({}, [f"storage.root={root / 'store'}"])
    small = ensure_base(cfg, Storage.from_config(cfg), root / "small")
    tok = AutoTokenizer.from_pretrained(small)

    expert = AutoModelForCausalLM.from_pretrained(small)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    expert.save_pretrained(root / "expert")
    tok.save_pretrained(root / "expert")

    arch = {**cfg.model.arch.model_dump(), **large}
    large_cfg = config_mod.resolve({}, [f"storage.root={root / 'store'}", "model.arch=" + json.dumps(arch)])
    big = build_tiny_model(large_cfg, len(tok), tok.eos_token_id, tok.pad_token_id, seed=1)
    big.save_pretrained(root / "large")
    tok.save_pretrained(root / "large")
    return {"small": small, "expert": str(root / "expert"), "large": str(root / "large"),
            "small_arch": cfg.model.arch, "large_arch": large_cfg.model.arch, "root": root}


def forward_flops(arch: Any, context: int) -> float:
    """Forward FLOPs per token: ``plan``'s training FLOPs (forward + backward = 3 forwards) / 3."""
    from apollo_ray import config as config_mod
    from apollo_ray.model.plan import plan

    cfg = config_mod.resolve({}, ["moe.layers=0", f"train.seq_len={max(16, context)}",
                                  "model.arch=" + json.dumps(arch.model_dump())])
    return plan(cfg).flops_per_token / 3


# ------------------------------------------------------------------------------------------------------ measurements
def serve_cfg(models: dict[str, Any], port: int, base: str) -> Any:
    """The app serving ``base`` alone and as the base of a proxy trio with the small expert and anti-expert."""
    from apollo_ray import config as config_mod

    trio = {"base": models[base], "expert": models["expert"], "anti_expert": models["small"], "alpha": 1.0}
    return config_mod.resolve({}, [
        f"storage.root={models['root'] / 'store'}", f"serve.model={models[base]}", f"serve.port={port}",
        "resources.cpus_per_worker=1", "serve.max_tokens=128", "serve.max_concurrent_requests=512",
        "serve.proxy=" + json.dumps(trio)])


def colocated(cfg: Any, repeats: int) -> dict[str, float]:
    """Per-token time of the app's own deployments: the base alone and the proxy trio in one replica."""
    base = serve.get_deployment_handle(cfg.serve.model_name, app_name=cfg.serve.model_name)
    proxy = serve.get_deployment_handle(f"{cfg.serve.model_name}-proxy", app_name=cfg.serve.model_name)
    return per_token({"base": handle_call(base), "proxy": handle_call(proxy)}, repeats)


def composed(models: dict[str, Any], base: str, repeats: int) -> float:
    trio = [LogitsServer.options(name=f"logits-{k}").bind(models[k]) for k in (base, "expert", "small")]
    handle = serve.run(ComposedProxy.bind(*trio, models[base], 1.0), name="composed", route_prefix=None)
    try:
        return per_token({"composed": lambda n: handle.generate.remote(PROMPT, n).result()}, repeats)["composed"]
    finally:
        serve.delete("composed")


async def concurrency(url: str, clients: int, requests: int, max_tokens: int) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    tokens = 0
    todo = iter(range(requests))

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal tokens
        for i in todo:
            t = time.perf_counter()
            r = await c.post("/v1/completions", json={"model": "apollo", "prompt": f"{PROMPT} ({i})",
                                                      "max_tokens": max_tokens, "temperature": 0.8, "seed": i})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=clients)) as c:
        for _ in range(clients):  # warm-up
            (await c.post("/v1/completions", json={"model": "apollo", "prompt": PROMPT, "max_tokens": 2})
             ).raise_for_status()
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {"p50_s": statistics.median(latencies), "p99_s": latencies[min(len(latencies) - 1,
                                                                        int(0.99 * len(latencies)))],
            "tokens_per_s": tokens / wall, "requests": len(latencies), "wall_s": wall}


def per_token(calls: dict[str, Any], repeats: int) -> dict[str, float]:
    """Seconds per generated token of each named call (n_tokens → None), from interleaved repetitions.

    (min T(72) − min T(8)) / 64: noise from other processes only ever adds time, so the fastest of several runs is
    the closest to the call's own cost, and the difference removes prefill and per-call overhead.
    """
    times: dict[str, dict[int, list[float]]] = {name: {SHORT: [], LONG: []} for name in calls}
    for call in calls.values():
        call(SHORT), call(LONG)  # warm-up: first-call costs (allocation, lazy imports) out of the measurement
    for _ in range(repeats):
        for name, call in calls.items():
            for n in (SHORT, LONG):
                t = time.perf_counter()
                call(n)
                times[name][n].append(time.perf_counter() - t)
    return {name: (min(t[LONG]) - min(t[SHORT])) / (LONG - SHORT) for name, t in times.items()}


def handle_call(handle: Any, alpha: float | None = None):
    from apollo_ray.serve.api import GenerateRequest
    from apollo_ray.serve.engine import Sampling

    def call(n: int) -> None:
        out = handle.generate.remote(GenerateRequest(Sampling(max_tokens=n, temperature=0.0), prompt=PROMPT,
                                                     alpha=alpha)).result()
        if out.get("completion_tokens") != n:  # an EOS would shorten the answer and bias the difference
            raise RuntimeError(f"asked {n} tokens, got {out}")
    return call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--large-hidden", type=int, default=1024)
    p.add_argument("--large-layers", type=int, default=16)
    p.add_argument("--large-intermediate", type=int, default=2816)
    args = p.parse_args()

    import ray

    from apollo_ray.serve import app
    from apollo_ray.services import free_port

    large = {"hidden_size": args.large_hidden, "num_hidden_layers": args.large_layers,
             "intermediate_size": args.large_intermediate, "num_attention_heads": 16, "num_key_value_heads": 4}
    with tempfile.TemporaryDirectory(prefix="apollo-bench-serve-") as tmp:
        models = build_models(Path(tmp), large)
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            # 1. the tiny model: concurrency over HTTP, then proxy-tuning per token with a tiny base
            cfg = serve_cfg(models, free_port(), "small")
            url = app.run(cfg, block=False)
            load = asyncio.run(concurrency(url, args.clients, args.requests, args.max_tokens))
            tiny = colocated(cfg, args.repeats)
            serve.delete(cfg.serve.model_name)
            tiny["composed"] = composed(models, "small", args.repeats)

            # 2. the large base with the tiny expert and anti-expert
            cfg = serve_cfg(models, free_port(), "large")
            app.run(cfg, block=False)
            big = colocated(cfg, args.repeats)
            serve.delete(cfg.serve.model_name)
            big["composed"] = composed(models, "large", args.repeats)
        finally:
            serve.shutdown()
            ray.shutdown()

    context = len(PROMPT) // 3 + (SHORT + LONG) // 2  # rough mean context over the measured tokens
    c_small, c_large = forward_flops(models["small_arch"], context), forward_flops(models["large_arch"], context)
    ideal = 1 + 2 * c_small / c_large
    print(f"concurrency: {args.clients} clients, {load['requests']} requests × {args.max_tokens} tokens, tiny model")
    print(f"  latency p50 {load['p50_s'] * 1000:.0f} ms   p99 {load['p99_s'] * 1000:.0f} ms   "
          f"throughput {load['tokens_per_s']:.0f} tokens/s")
    print(f"proxy-tuning per token (greedy, 1 CPU per replica); FLOPs/token: tiny {c_small / 1e6:.2f} M, "
          f"large {c_large / 1e6:.1f} M")
    for name, t in (("tiny base + tiny experts", tiny), ("large base + tiny experts", big)):
        print(f"  {name}: base alone {t['base'] * 1000:.2f} ms, co-located {t['proxy'] * 1000:.2f} ms "
              f"({t['proxy'] / t['base']:.2f}×), composed {t['composed'] * 1000:.2f} ms "
              f"({t['composed'] / t['base']:.2f}×)")
    print(f"  FLOPs say the large trio costs {ideal:.3f}× the base")
    ratio = big["proxy"] / big["base"] / ideal
    print(f"ratio (t_proxy/t_base)/(1+2·c_small/c_large) = {ratio:.3f}  (target ≤ 1.15)")


if __name__ == "__main__":
    main()
