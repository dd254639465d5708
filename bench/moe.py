"""Post-MoE dispatch overhead on CPU: how close the sparse block and the upcycled model come to their FLOP cost.

1. Block: forward + backward of one PostMoEBlock (E experts, top-K) over N tokens, divided by K × the same for the
   dense MLP it was upcycled from. The block does exactly K MLP passes' worth of matmuls, so whatever exceeds 1 is
   routing, sorting, gathering and scattering. Target ≤ 1.03.
2. Model: a training micro step (forward + backward) of the upcycled model over that of its dense base, divided by
   the analytic FLOP ratio of the two (``apollo_ray.model.plan``). Target ≤ 1.03. The AdamW update is timed too and
   printed apart: its cost follows the parameter count (all E experts), which FLOPs per token do not measure.

Dense and sparse runs alternate, so that load from other processes on the machine hits both alike; each figure is the
median of ``--reps`` after ``--warmup`` runs. Defaults: the block at Qwen2-0.5B's MLP shape (hidden 896,
intermediate 4864), 4096 tokens, 7 experts, top-2; the model scaled down to fit two CPU cores (hidden 512,
intermediate 2816, 4 layers of which the last 2 are sparse, vocabulary 4096, 4 x 512 tokens).

    python bench/moe.py [--threads 2] [--reps 5] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from apollo_ray import config as config_mod
from apollo_ray.model import plan as plan_mod
from apollo_ray.model.post_moe import PostMoEBlock, PostMoEConfig
from apollo_ray.model.tiny import build_tiny_model
from apollo_ray.model.upcycle import moe_config_from, upcycle

TARGET = 1.03


def timed_pair(dense: Callable[[], None], sparse: Callable[[], None], warmup: int, reps: int,
               clock: Callable[[], float] = time.perf_counter) -> tuple[float, float, float]:
    """Median seconds of ``dense`` and ``sparse``, run alternately, and the ratio of their minima (the least disturbed
    runs: on a shared machine other processes only ever add time)."""
    for _ in range(warmup):
        dense()
        sparse()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(reps):
        for fn, out in ((dense, times[0]), (sparse, times[1])):
            t0 = clock()
            fn()
            out.append(clock() - t0)
    return statistics.median(times[0]), statistics.median(times[1]), min(times[1]) / min(times[0])


def bench_block(hidden: int, intermediate: int, tokens: int, experts: int, top_k: int, warmup: int, reps: int,
                clock: Callable[[], float]) -> float:
    cfg = PostMoEConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
                        num_attention_heads=hidden // 64, num_key_value_heads=1, moe_layers=[0], num_experts=experts,
                        num_experts_per_tok=top_k, routing="topk")
    torch.manual_seed(0)
    mlp = Qwen2MLP(Qwen2Config(hidden_size=hidden, intermediate_size=intermediate))
    block = PostMoEBlock(cfg)
    with torch.no_grad():
        for expert in block.experts:  # upcycled: every expert is the dense MLP
            expert.load_state_dict(mlp.state_dict())
        block.router.weight.normal_(0, 0.02)
    x = torch.randn(1, tokens, hidden)
    grad = torch.randn(1, tokens, hidden)

    def dense() -> None:
        mlp.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_()
        mlp(xi).backward(grad)

    def sparse() -> None:
        block.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_()
        y, _ = block(xi)
        y.backward(grad)

    t_dense, t_sparse, min_ratio = timed_pair(dense, sparse, warmup, reps, clock)
    ratio = t_sparse / (top_k * t_dense)
    print(f"block  {tokens} tokens, hidden {hidden}/{intermediate}, {experts} experts, top-{top_k}: dense MLP "
          f"{t_dense * 1e3:.0f} ms, sparse block {t_sparse * 1e3:.0f} ms (medians; of minima "
          f"{min_ratio / top_k:.3f}); sparse / ({top_k} x dense) ratio {ratio:.3f}")
    return ratio


def bench_model(warmup: int, reps: int, clock: Callable[[], float]) -> float:
    overrides = [
        "model.arch.hidden_size=512", "model.arch.intermediate_size=2816", "model.arch.num_hidden_layers=4",
        "model.arch.num_attention_heads=8", "model.arch.num_key_value_heads=2", "model.arch.vocab_size=4096",
        "train.seq_len=512", "train.micro_batch_size=4", "train.precision=fp32", "resources.use_gpu=false",
        "resources.num_workers=1"]
    cfg = config_mod.resolve({"preset": "qwen2-0.5b"}, overrides)  # 7 family experts, top-2, hybrid, last 2 layers
    dense_cfg = config_mod.resolve({"preset": "qwen2-0.5b"}, [*overrides, "moe.layers=0"])
    flop_ratio = plan_mod.plan(cfg).flops_per_token / plan_mod.plan(dense_cfg).flops_per_token

    a, t = cfg.model.arch, cfg.train
    dense = build_tiny_model(cfg, a.vocab_size, eos_id=0, pad_id=1, seed=0).train()
    sparse = upcycle(dense, **moe_config_from(cfg)).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, a.vocab_size, (t.micro_batch_size, t.seq_len), generator=g)
    lang = torch.randint(0, cfg.num_experts, (t.micro_batch_size, 1), generator=g).expand(-1, t.seq_len)
    optimizers = {m: torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (dense, sparse)}

    def step(model, **kw) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids, **kw).loss.backward()
        return run

    t_dense, t_sparse, min_ratio = timed_pair(step(dense), step(sparse, language_ids=lang), warmup, reps, clock)
    o_dense, o_sparse, _ = timed_pair(optimizers[dense].step, optimizers[sparse].step, 1, reps, clock)
    ratio = t_sparse / t_dense / flop_ratio
    print(f"model  {a.num_hidden_layers} layers (last {cfg.moe.layers} sparse), hidden {a.hidden_size}/"
          f"{a.intermediate_size}, {t.micro_batch_size} x {t.seq_len} tokens: dense step {t_dense * 1e3:.0f} ms, "
          f"Post-MoE step {t_sparse * 1e3:.0f} ms (medians; AdamW update {o_dense * 1e3:.0f} / {o_sparse * 1e3:.0f} "
          f"ms apart), FLOP ratio {flop_ratio:.3f} (of minima {min_ratio / flop_ratio:.3f}); "
          f"time ratio / FLOP ratio {ratio:.3f}")
    return ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--intermediate", type=int, default=4864)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--experts", type=int, default=7)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this process's CPU time, which other processes on a shared machine barely disturb "
                        "(best with --threads 1: idle intra-op threads spin and would be counted)")
    p.add_argument("--skip-model", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    block = bench_block(args.hidden, args.intermediate, args.tokens, args.experts, args.top_k, args.warmup, args.reps,
                        clock)
    model = None if args.skip_model else bench_model(args.warmup, args.reps, clock)
    for name, r in (("block", block), ("model", model)):
        if r is not None:
            print(f"{name}: {'ok' if r <= TARGET else 'MISSES'} target {TARGET}; ratio {r:.3f}")


if __name__ == "__main__":
    main()
