"""Evaluation bench: batched option log-likelihood vs batched greedy generation, and vs lm-evaluation-harness on the
same prompts; items per second.

The same tiny Post-MoE model (the tiny base upcycled, built in a temporary storage root), the same N sample MCQ items
with the same seeded k-shot prompts (the tiny preset's native protocol). Three ways to score them, each over all N
items per run, in this process (no Ray), after the model is loaded and warmed up:

- ``loglik``: ``score_options``, ``eval.batch_size`` items per call, each prompt run once and its KV cache reused for
  every option;
- ``generate``: ``generate_answers``, greedy, batches of ``eval.batch_size``, up to ``eval.max_new_tokens``, then
  answer extraction (the apollo protocol's work per item, minus its longer prompts);
- ``lm-eval`` (when ``lm_eval[hf]`` is installed): lm-eval's own ``HFLM.loglikelihood`` on the identical
  (prompt, option) pairs, batch ``eval.batch_size`` × options; its predictions are checked against ours.

Runs are interleaved (the order rotates every repeat) so each way sees the same machine, repeated ``--repeats`` times;
each way's items/s is printed as min / median / max, then the ratios of paired runs. The last line is loglik items/s
÷ batched generation items/s (median of the paired ratios), target ≥ 1.5.

    python bench/eval.py [--items 64] [--repeats 5] [--threads 1] [--set eval.batch_size=16 ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def spread(xs: list[float]) -> str:
    return f"{min(xs):8.2f} / {statistics.median(xs):8.2f} / {max(xs):8.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=64, help="sample MCQ items, taken round-robin over the languages")
    p.add_argument("--repeats", type=int, default=5, help="interleaved runs of each way")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--set", action="append", default=[], help="config override, e.g. eval.max_new_tokens=64")
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from apollo_ray.config import resolve
    from apollo_ray.evaluation.benchmark import MAX_OPTIONS
    from apollo_ray.evaluation.prompts import continuations
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
    bs = ecfg.batch_size
    n = len(ps)

    def loglik() -> list[str]:
        return [s.predicted for s in score_options(model, tokenizer, ps, its, batch_rows=bs * MAX_OPTIONS)]

    new_tokens: list[int] = []

    def generate() -> list[str | None]:
        texts = generate_answers(model, tokenizer, ps, ecfg.max_new_tokens, batch_size=bs)
        new_tokens.append(sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts))
        return [extract_answer(t) for t in texts]

    ways = {"loglik": loglik, "generate": generate}
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=bs * MAX_OPTIONS)
        requests = [(i, j, Instance(request_type="loglikelihood", doc={}, arguments=(prompt, cont), idx=j))
                    for i, (prompt, it) in enumerate(zip(ps, its)) for j, cont in enumerate(continuations(it))]

        def lm_eval_loglik() -> list[str]:
            scores = lm.loglikelihood([r for _, _, r in requests], disable_tqdm=True)
            per_item: list[list[float]] = [[] for _ in its]
            for (i, _, _), (ll, _) in zip(requests, scores):
                per_item[i].append(ll)
            return [it.letters[max(range(len(s)), key=s.__getitem__)] for it, s in zip(its, per_item)]

        ways["lm-eval"] = lm_eval_loglik
    except ImportError as e:
        print(f"lm-eval not measured: {e} (pip install 'lm_eval[hf]')")

    for way in ways.values():  # warm-up: allocator, kernels, tokenizer caches
        way()
    new_tokens.clear()
    rates: dict[str, list[float]] = {name: [] for name in ways}
    predictions: dict[str, list] = {}
    names = list(ways)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order every repeat
            t0 = time.perf_counter()
            predictions[name] = ways[name]()
            rates[name].append(n / (time.perf_counter() - t0))

    print(f"{n} items ({len(by_lang)} languages, {ecfg.shots}-shot, "
          f"{sum(len(tokenizer(x)['input_ids']) for x in ps) / n:.0f} prompt tokens/item), batches of {bs}, "
          f"{args.threads} thread(s), {args.repeats} interleaved repeats")
    print("items/s, min / median / max:")
    print(f"  loglik                    {spread(rates['loglik'])}")
    print(f"  generate (≤{ecfg.max_new_tokens} new tokens, "
          f"{statistics.mean(new_tokens) / n:.1f} on average) {spread(rates['generate'])}")
    if "lm-eval" in rates:
        same = sum(a == b for a, b in zip(predictions["loglik"], predictions["lm-eval"]))
        print(f"  lm-eval loglikelihood     {spread(rates['lm-eval'])}  (same prediction as ours on {same}/{n})")
        ratios = [a / b for a, b in zip(rates["loglik"], rates["lm-eval"])]
        print(f"ratio loglik / lm-eval (items/s, paired runs, min / median / max): {spread(ratios)}")
    ratios = [a / b for a, b in zip(rates["loglik"], rates["generate"])]
    print(f"ratio loglik / batched generate (items/s, paired runs, min / median / max): {spread(ratios)}")
    print(f"ratio loglik / batched generate (items/s, median of paired runs): {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
