"""lm-evaluation-harness task files for the configured benchmarks (``apollo-ray evaluate --export-lm-eval DIR``).

A peer implementation to check ours against, and a way for users to run lm-eval on our benchmarks. Each benchmark
becomes one task whose documents carry the prompt exactly as ``evaluate`` renders it for the model (protocol, shots,
budget, chat template), so the two tools differ only in how they score:

- protocol ``native`` with ``scoring: loglik``: an lm-eval ``multiple_choice`` task, the choices being our scored
  continuations (`` (A)``, ``(A)`` where the script does not space words) with no target delimiter; lm-eval's
  per-item argmax must equal our ``predicted``;
- generation (protocol ``apollo``, or ``native`` with ``scoring: generate``): a ``generate_until`` task, greedy, up
  to ``eval.max_new_tokens`` tokens (and at least 2 under ``apollo``), stopped at the tokenizer's EOS, scored by our
  answer extraction (``apollo_ray_lmeval.py`` beside the tasks imports it: apollo-ray must be installed where
  lm-eval runs).

Written: ``<task>.jsonl`` (one document per kept item: uid, language, source, prompt, choices, gold, answer),
``<task>.yaml``, ``apollo_ray_lmeval.py``, ``_apollo_ray.yaml`` (a group of all the tasks) and ``rejects.json``
(items that are not exported, each with its reason: the same rejects as ``evaluate``). Run with
``lm_eval --model hf --model_args pretrained=MODEL --include_path DIR --tasks apollo_ray --log_samples ...``.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

from apollo_ray.config import Config
from apollo_ray.errors import UserError
from apollo_ray.evaluation import apollo
from apollo_ray.evaluation.prompts import continuations
from apollo_ray.storage import Storage

log = logging.getLogger(__name__)

GROUP = "apollo_ray"
UTILS = "apollo_ray_lmeval"

_UTILS_SOURCE = '''"""Answer extraction for apollo-ray's exported generation tasks (written by apollo-ray evaluate --export-lm-eval)."""

from apollo_ray.evaluation.apollo import extract_reference
from apollo_ray.evaluation.scoring import extract_answer


def _score(doc, results, extract):
    predicted = extract(results[0])
    return {"acc": float(predicted is not None and predicted == doc["answer"])}


def process_results_apollo(doc, results):
    return _score(doc, results, extract_reference)


def process_results_native(doc, results):
    return _score(doc, results, extract_answer)
'''


def task_name(benchmark: str) -> str:
    """An lm-eval task name for a benchmark: ``apollo_ray_<name>`` in lower-case letters, digits and underscores."""
    return f"{GROUP}_" + re.sub(r"[^a-z0-9]+", "_", benchmark.lower()).strip("_")


def export(cfg: Config, models: list[str] | None, out_dir: str) -> dict[str, Any]:
    """Write the task files for ``cfg.eval.benchmarks`` under ``out_dir``, prompts rendered for the model's tokenizer
    (the first of ``models``, default this run's); a summary of what was written."""
    from apollo_ray.evaluation import runner

    ecfg = cfg.eval
    storage = Storage.from_config(cfg)
    refs = runner.resolve_models(cfg, storage, models)
    keys = {}
    for ref in refs:
        tok = runner.load_tokenizer(runner.model_dir(ref, cfg.storage.endpoint_url, weights=False), cfg.model.tokenizer)
        keys.setdefault(runner._tokenizer_key(tok), (ref, tok))
    if len(keys) > 1:
        raise UserError(f"--export-lm-eval: the models {', '.join(r.name for r in refs)} have different tokenizers, so "
                        f"different prompts; export with one --model at a time")
    ((ref, tokenizer),) = keys.values()
    items = runner.load_items(cfg, storage)
    prompts, too_long = runner.build_prompts(ecfg, items, tokenizer)
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    generate = ecfg.scoring == "generate"
    tasks: dict[str, int] = {}
    for bench in ecfg.benchmarks:
        name = task_name(bench.name)
        kept = [e for e in items.items if e.benchmark == bench.name and e.uid in prompts]
        docs = [{"uid": e.uid, "language": e.item.language, "source": e.item.source, "prompt": prompts[e.uid],
                 "choices": continuations(e.item), "gold": e.item.letters.index(e.item.answer),
                 "answer": e.item.answer} for e in kept]
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), "utf-8")
        (out / f"{name}.yaml").write_text(_task_yaml(name, data, ecfg, apollo.eos_text(tokenizer)), "utf-8")
        tasks[name] = len(docs)
    (out / f"_{GROUP}.yaml").write_text(f"group: {GROUP}\ntask:\n" + "".join(f"  - {t}\n" for t in tasks)
                                        + "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
                                        + "metadata:\n  version: 1\n", "utf-8")
    if generate:
        (out / f"{UTILS}.py").write_text(_UTILS_SOURCE, "utf-8")
    by_uid = {e.uid: e for e in items.items}
    rejects = list(items.rejects) + [{"benchmark": by_uid[u].benchmark, "uid": u, "reason": "prompt_too_long",
                                      "detail": why} for u, why in sorted(too_long.items())]
    (out / "rejects.json").write_text(json.dumps(rejects, indent=1, ensure_ascii=False), "utf-8")
    summary = {"dir": str(out), "protocol": ecfg.protocol, "scoring": ecfg.scoring, "model": ref.name,
               "tasks": tasks, "rejects": dict(Counter(runner.reason_key(r["reason"]) for r in rejects))}
    log.info("export-lm-eval: %d task(s), %d items, rejects %s -> %s", len(tasks), sum(tasks.values()),
             summary["rejects"], out)
    return summary


def _task_yaml(name: str, data: Path, ecfg: Any, eos: str) -> str:
    head = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
            "doc_to_text": "prompt", "num_fewshot": 0}
    if ecfg.scoring == "generate":
        gen = {"until": [eos], "do_sample": False, "max_gen_toks": ecfg.max_new_tokens}
        if ecfg.protocol == "apollo":
            gen["min_new_tokens"] = apollo.MIN_NEW_TOKENS
        body = {"output_type": "generate_until", "doc_to_target": "answer", "generation_kwargs": gen}
        scorer = f"process_results: !function {UTILS}.process_results_{ecfg.protocol}\n"
    else:
        body = {"output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "gold",
                "target_delimiter": ""}
        scorer = ""
    metrics = {"metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
               "metadata": {"version": 1, "protocol": ecfg.protocol, "scoring": ecfg.scoring}}
    # JSON values are valid YAML; the one custom tag (!function) is written as text
    return "".join(f"{k}: {json.dumps(v, ensure_ascii=False)}\n" for k, v in {**head, **body, **metrics}.items()) + scorer
