"""Serve bench: continuous batching under concurrency (the default run), and what proxy-tuning costs per token.

1. Concurrency. The real app (``app_for``) serves the tiny preset's model (Post-MoE: 4 layers, the last 2 with 12
   language experts, top-2) as ``apollo`` and a proxy-tuned trio (the tiny dense base, a perturbed copy as the expert,
   the base as the anti-expert) as ``apollo-proxy``; each model replica has 1 CPU and 1 torch thread. C clients of
   the official openai client send completions back to back (seeded sampling at temperature 0.8, ``max_tokens``
   fixed, the same prompts and seeds at every C, so every C decodes the same tokens). For C = 1 and C = 16:
   aggregate completion tokens/s, p50 and p99 latency. Measurements interleave (model A C=1, A C=16, B C=1, B C=16,
   then again) and repeat; each ratio is taken within one repetition and printed as min / median / max, since this
   machine's speed drifts by ±15 % from minute to minute.
   Anchor: the same models' ``engine.Decoder`` in this process, 16 requests decoded one at a time against the 16 as
   one batch (tokens/s ratio): what batching gives on this machine before any of Serve's per-request costs.
   Targets: 16-client / 1-client tokens/s ≥ 5 (``apollo``) and ≥ 4 (``apollo-proxy``); p50 latency at 16 clients
   ≤ 3 × one client's.
2. ``--proxy-cost``: proxy-tuning per token, expert = a perturbed copy of the tiny model, anti-expert = the tiny
   model, and as the base first the tiny model itself (the tiny trio), then a "large" tiny model (``--large-*`` dims,
   same tokenizer).
   - co-located: the app's ``<name>-proxy`` deployment, one replica holding the three models;
   - composed: three ``LogitsServer`` deployments, one per model, each keeping its requests' KV caches, and a
     coordinator that fetches the three logit vectors over handles at every token and combines them.
   Per-token time is the difference between a 72- and an 8-token greedy answer (prefill and call overhead cancel),
   divided by 64; the fastest of interleaved repetitions, called through DeploymentHandles (no HTTP). Its ratio is
   (t_proxy / t_base) / (1 + 2·c_small/c_large), c = forward FLOPs per token from ``model.plan``: 1.0 means
   proxy-tuning costs exactly its two extra small forwards; target ≤ 1.15.

The ratio printed last is the concurrency one: ``apollo``'s median 16-client / 1-client tokens/s.

    python bench/serve.py [--repeats 5] [--max-tokens 32] [--proxy-cost]
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
def build_models(root: Path, large: dict[str, int] | None) -> dict[str, Any]:
    """The tiny base (with its tokenizer), a perturbed copy (the expert), the tiny preset's Post-MoE model (the tiny
    base upcycled as the preset says) and, for ``--proxy-cost``, a large model on the same tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from apollo_ray import config as config_mod
    from apollo_ray.model.tiny import build_tiny_model, ensure_base
    from apollo_ray.model.upcycle import upcycle_checkpoint
    from apollo_ray.storage import Storage

    cfg = config_mod.resolve({}, [f"storage.root={root / 'store'}"])
    small = ensure_base(cfg, Storage.from_config(cfg), root / "small")
    tok = AutoTokenizer.from_pretrained(small)
    moe = upcycle_checkpoint(small, str(root / "moe"), cfg)

    expert = AutoModelForCausalLM.from_pretrained(small)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    expert.save_pretrained(root / "expert")
    tok.save_pretrained(root / "expert")
    out = {"small": small, "moe": moe, "expert": str(root / "expert"), "small_arch": cfg.model.arch, "root": root}
    if large:
        arch = {**cfg.model.arch.model_dump(), **large}
        large_cfg = config_mod.resolve({}, [f"storage.root={root / 'store'}", "model.arch=" + json.dumps(arch)])
        big = build_tiny_model(large_cfg, len(tok), tok.eos_token_id, tok.pad_token_id, seed=1)
        big.save_pretrained(root / "large")
        tok.save_pretrained(root / "large")
        out.update(large=str(root / "large"), large_arch=large_cfg.model.arch)
    return out


def forward_flops(arch: Any, context: int) -> float:
    """Forward FLOPs per token: ``plan``'s training FLOPs (forward + backward = 3 forwards) / 3."""
    from apollo_ray import config as config_mod
    from apollo_ray.model.plan import plan

    cfg = config_mod.resolve({}, ["moe.layers=0", f"train.seq_len={max(16, context)}",
                                  "model.arch=" + json.dumps(arch.model_dump())])
    return plan(cfg).flops_per_token / 3


def serve_cfg(models: dict[str, Any], port: int, served: str, base: str) -> Any:
    """The app serving ``served`` as ``apollo`` and ``base`` + the small expert and anti-expert as ``apollo-proxy``."""
    from apollo_ray import config as config_mod

    trio = {"base": models[base], "expert": models["expert"], "anti_expert": models["small"], "alpha": 1.0}
    return config_mod.resolve({}, [
        f"storage.root={models['root'] / 'store'}", f"serve.model={models[served]}", f"serve.port={port}",
        "resources.cpus_per_worker=1", "serve.max_tokens=128", "serve.max_concurrent_requests=512",
        "serve.proxy=" + json.dumps(trio)])


# ------------------------------------------------------------------------------------------------------ concurrency
def prompt(i: int) -> str:
    return f"{PROMPT} (case {i})"


async def concurrency(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict[str, float]:
    """``clients`` openai clients sending ``requests`` completions in all, back to back; request i is always the
    same prompt and seed, so any C decodes the same tokens."""
    from openai import AsyncOpenAI

    api = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    latencies: list[float] = []
    tokens = 0
    todo = iter(range(requests))

    async def client() -> None:
        nonlocal tokens
        for i in todo:
            t = time.perf_counter()
            out = await api.completions.create(model=model, prompt=prompt(i), max_tokens=max_tokens, temperature=0.8,
                                               seed=i)
            latencies.append(time.perf_counter() - t)
            tokens += out.usage.completion_tokens

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    await api.close()
    latencies.sort()
    return {"tokens_per_s": tokens / wall, "p50_s": statistics.median(latencies),
            "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], "tokens": tokens}


def anchor(lm: Any, tokenizer: Any, n: int, max_tokens: int) -> float:
    """Tokens/s of ``n`` requests decoded as one batch over the same ``n`` decoded one at a time (``engine.Decoder``
    in this process, 1 torch thread, the requests of ``concurrency``)."""
    from apollo_ray.serve.engine import Decoder, Generation, Sampling, completion_prompt_ids, eos_ids

    def generations() -> list[Generation]:
        return [Generation(tokenizer, completion_prompt_ids(tokenizer, prompt(i)),
                           Sampling(max_tokens=max_tokens, temperature=0.8, seed=i), eos_ids(lm, tokenizer))
                for i in range(n)]

    def drive(gens: list[Generation]) -> int:
        decoder = Decoder(lm)
        for g in gens:
            decoder.submit(g)
        while not decoder.idle:
            decoder.step()
        return sum(g.completion_tokens for g in gens)

    t = time.perf_counter()
    alone = sum(drive([g]) for g in generations())
    t_alone = time.perf_counter() - t
    t = time.perf_counter()
    batched = drive(generations())
    t_batched = time.perf_counter() - t
    assert alone == batched, (alone, batched)  # the same tokens either way
    return (batched / t_batched) / (alone / t_alone)


def spread(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def measure_concurrency(url: str, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Interleaved repetitions: for each repetition, each model at 1 then ``args.clients`` clients."""
    per_rep = {m: {k: [] for k in ("tps_1", "tps_n", "p50_1", "p50_n", "p99_1", "p99_n")}
               for m in ("apollo", "apollo-proxy")}
    for model in per_rep:  # warm-up: first-call costs out of the measurement
        asyncio.run(concurrency(url, model, args.clients, args.clients, 4))
    for rep in range(args.repeats):
        for model, out in per_rep.items():
            one = asyncio.run(concurrency(url, model, 1, args.requests_one, args.max_tokens))
            many = asyncio.run(concurrency(url, model, args.clients, args.requests_many, args.max_tokens))
            for key, r in (("1", one), ("n", many)):
                out[f"tps_{key}"].append(r["tokens_per_s"])
                out[f"p50_{key}"].append(r["p50_s"])
                out[f"p99_{key}"].append(r["p99_s"])
            print(f"  rep {rep + 1} {model:13s} 1 client {one['tokens_per_s']:6.0f} tok/s p50 "
                  f"{one['p50_s'] * 1000:5.0f} ms | {args.clients} clients {many['tokens_per_s']:6.0f} tok/s p50 "
                  f"{many['p50_s'] * 1000:5.0f} ms p99 {many['p99_s'] * 1000:5.0f} ms | ratio "
                  f"{many['tokens_per_s'] / one['tokens_per_s']:.2f}", flush=True)
    return per_rep


def measure_anchor(models: dict[str, Any], args: argparse.Namespace) -> dict[str, list[float]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import apollo_ray  # noqa: F401  (registers Post-MoE)
    from apollo_ray.serve.proxy import ProxyLM

    torch.set_num_threads(1)  # as a replica with 1 CPU
    tok = AutoTokenizer.from_pretrained(models["small"])
    load = lambda k: AutoModelForCausalLM.from_pretrained(models[k]).eval()  # noqa: E731
    lms = {"apollo": load("moe"), "apollo-proxy": ProxyLM(load("small"), load("expert"), load("small"), alpha=1.0)}
    out: dict[str, list[float]] = {m: [] for m in lms}
    for name, lm in lms.items():
        anchor(lm, tok, 4, 4)  # warm-up
    for _ in range(args.repeats):
        for name, lm in lms.items():
            out[name].append(anchor(lm, tok, args.clients, args.max_tokens))
    return out


# ------------------------------------------------------------------------------------------------------ proxy cost
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


def proxy_cost(models: dict[str, Any], args: argparse.Namespace) -> None:
    from apollo_ray.serve import app
    from apollo_ray.services import free_port

    results = {}
    for base in ("small", "large"):
        cfg = serve_cfg(models, free_port(), base, base)
        app.run(cfg, block=False)
        results[base] = colocated(cfg, args.repeats)
        serve.delete(cfg.serve.model_name)
        results[base]["composed"] = composed(models, base, args.repeats)
    context = len(PROMPT) // 3 + (SHORT + LONG) // 2  # rough mean context over the measured tokens
    c_small, c_large = forward_flops(models["small_arch"], context), forward_flops(models["large_arch"], context)
    ideal = 1 + 2 * c_small / c_large
    print(f"proxy-tuning per token (greedy, 1 CPU per replica); FLOPs/token: tiny {c_small / 1e6:.2f} M, "
          f"large {c_large / 1e6:.1f} M")
    for name, t in (("tiny base + tiny experts", results["small"]), ("large base + tiny experts", results["large"])):
        print(f"  {name}: base alone {t['base'] * 1000:.2f} ms, co-located {t['proxy'] * 1000:.2f} ms "
              f"({t['proxy'] / t['base']:.2f}×), composed {t['composed'] * 1000:.2f} ms "
              f"({t['composed'] / t['base']:.2f}×)")
    print(f"  FLOPs say the large trio costs {ideal:.3f}× the base")
    ratio = results["large"]["proxy"] / results["large"]["base"] / ideal
    print(f"  proxy cost (t_proxy/t_base)/(1+2·c_small/c_large) = {ratio:.3f}  (target ≤ 1.15)")


# ------------------------------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests-one", type=int, default=12, help="requests per measurement at 1 client")
    p.add_argument("--requests-many", type=int, default=64, help="requests per measurement at --clients clients")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--proxy-cost", action="store_true", help="also measure proxy-tuning's per-token cost (slow)")
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
        models = build_models(Path(tmp), large if args.proxy_cost else None)
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            cfg = serve_cfg(models, free_port(), "moe", "small")
            url = app.run(cfg, block=False)
            print(f"concurrency: 1 vs {args.clients} clients × {args.max_tokens} tokens, seeded sampling; "
                  f"{args.repeats} interleaved repetitions", flush=True)
            load = measure_concurrency(url, args)
            serve.delete(cfg.serve.model_name)
            anchors = measure_anchor(models, args)
            if args.proxy_cost:
                proxy_cost(models, args)
        finally:
            serve.shutdown()
            ray.shutdown()

    n = args.clients
    print(f"summary (min / median / max over {args.repeats} repetitions)")
    for model, r in load.items():
        ratio = [b / a for a, b in zip(r["tps_1"], r["tps_n"])]
        p50 = [b / a for a, b in zip(r["p50_1"], r["p50_n"])]
        target = 5 if model == "apollo" else 4
        print(f"  {model}: tokens/s 1 client {spread(r['tps_1'])}, {n} clients {spread(r['tps_n'])}")
        print(f"    {n}-client / 1-client tokens/s {spread(ratio)}  (target ≥ {target})")
        print(f"    p50 latency ms 1 client {spread([x * 1000 for x in r['p50_1']])}, {n} clients "
              f"{spread([x * 1000 for x in r['p50_n']])}; ratio {spread(p50)}  (target ≤ 3)")
        print(f"    p99 latency ms 1 client {spread([x * 1000 for x in r['p99_1']])}, {n} clients "
              f"{spread([x * 1000 for x in r['p99_n']])}")
        print(f"    anchor, in-process batched / one-at-a-time decode of {n} requests: {spread(anchors[model])}")
    ratio = [b / a for a, b in zip(load["apollo"]["tps_1"], load["apollo"]["tps_n"])]
    print(f"ratio {n}-client / 1-client tokens/s (apollo, median) = {statistics.median(ratio):.2f}  (target ≥ 5)")


if __name__ == "__main__":
    main()
