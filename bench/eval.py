"""Evaluation bench: batched option log-likelihood vs one-by-one greedy generation, items per second.

The same tiny Post-MoE model (the tiny base upcycled, built in a temporary storage root), the same N sample MCQ items
with the same seeded k-shot prompts (the tiny preset's eval settings). Log-likelihood scores ``eval.batch_size``
items per call through ``score_options``, all options of those items in one forward; generation is the reference's
way, one prompt at a time, greedy, up to ``eval.max_new_tokens``, then answer extraction. Both run in this process
(no Ray around them) after a warm-up, interleaved batch by batch. The ratio printed last is loglik items/s ÷
generation items/s (wall clock), target ≥ 5.

    python bench/eval.py [--items 64] [--threads 1] [--set eval.batch_size=16 ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=64, help="sample MCQ items, taken round-robin over the languages")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--set", action="append", default=[], help="config override, e.g. eval.max_new_tokens=64")
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from apollo_ray.config import resolve
    from apollo_ray.evaluation.benchmark import MAX_OPTIONS
    from apollo_ray.evaluation.runner import build_prompts, load_items
    from apollo_ray.evaluation.scoring import extract_answer, generate_answers, score_options
    from apollo_ray.model.tiny import ensure_base
    from apollo_ray.model.upcycle import upcycle_checkpoint
    from apollo_ray.storage import Storage

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve({}, [f"storage.root={tmp}", "tracking.enabled=false", "moe.ep_size=1", *args.set])
        storage = Storage.from_config(cfg)
        path = upcycle_checkpoint(ensure_base(cfg, storage), cfg.uri("models", "bench-moe"), cfg)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)

        items = load_items(cfg, storage)
        prompts, _ = build_prompts(cfg.eval, items, tokenizer)
        # Round-robin over languages, so the mix of scripts (prompt lengths) is that of the whole set.
        by_lang: dict[str, list] = {}
        for e in items.items:
            if e.uid in prompts:
                by_lang.setdefault(e.item.language, []).append(e)
        chosen = []
        while len(chosen) < args.items and any(by_lang.values()):
            for queue in by_lang.values():
                if queue and len(chosen) < args.items:
                    chosen.append(queue.pop(0))
        its = [e.item for e in chosen]
        ps = [prompts[e.uid] for e in chosen]
        ecfg = cfg.eval
        n_tokens = sum(len(tokenizer(x)["input_ids"]) for x in ps)

        score_options(model, tokenizer, ps[:2], its[:2])  # warm-up: allocator, kernels, tokenizer caches
        generate_answers(model, tokenizer, ps[:1], 4, batch_size=1)
        # Interleaved batch by batch, so both ways see the same machine: on a shared box the load drifts, and two
        # back-to-back phases would each time a different neighbour. CPU time is kept too (immune to the
        # neighbours when single-threaded).
        wall = {"loglik": 0.0, "generate": 0.0}
        cpu = {"loglik": 0.0, "generate": 0.0}
        new_tokens = 0
        for i in range(0, len(ps), ecfg.batch_size):
            w0, c0 = time.perf_counter(), time.process_time()
            score_options(model, tokenizer, ps[i:i + ecfg.batch_size], its[i:i + ecfg.batch_size],
                          batch_rows=ecfg.batch_size * MAX_OPTIONS)
            w1, c1 = time.perf_counter(), time.process_time()
            for prompt in ps[i:i + ecfg.batch_size]:
                (text,) = generate_answers(model, tokenizer, [prompt], ecfg.max_new_tokens, batch_size=1)
                extract_answer(text)
                new_tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
            w2, c2 = time.perf_counter(), time.process_time()
            wall["loglik"] += w1 - w0
            wall["generate"] += w2 - w1
            cpu["loglik"] += c1 - c0
            cpu["generate"] += c2 - c1

    n = len(ps)
    print(f"{n} items ({len(by_lang)} languages, {ecfg.shots}-shot, {n_tokens / n:.0f} prompt tokens/item), "
          f"{args.threads} thread(s)")
    print(f"loglik   (batches of {ecfg.batch_size}): {n / wall['loglik']:8.2f} items/s  "
          f"({wall['loglik']:.2f}s wall, {cpu['loglik']:.2f}s CPU)")
    print(f"generate (one by one, ≤{ecfg.max_new_tokens} new tokens, {new_tokens / n:.1f} on average): "
          f"{n / wall['generate']:8.2f} items/s  ({wall['generate']:.2f}s wall, {cpu['generate']:.2f}s CPU)")
    print(f"ratio by CPU time: {cpu['generate'] / cpu['loglik']:.2f}")
    print(f"ratio loglik/generate (items/s, wall): {wall['generate'] / wall['loglik']:.2f}")


if __name__ == "__main__":
    main()
