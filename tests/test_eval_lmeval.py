"""lm-evaluation-harness as a peer: the task files ``evaluate --export-lm-eval`` writes, run by lm-eval itself on the
tiny model, must give our predictions item for item.

Skipped where lm-eval (``lm_eval[hf]``) is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apollo_ray import cli
from apollo_ray import config as config_mod
from apollo_ray.evaluation import apollo, lmeval, runner
from apollo_ray.evaluation.scoring import generate_answers, score_options
from apollo_ray.model.tiny import ensure_base
from apollo_ray.storage import Storage

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls are fastest single-threaded


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("lmeval")
    cfg = config_mod.resolve({}, [f"storage.root={root}", "tracking.enabled=false"])
    return root, ensure_base(cfg, Storage.from_config(cfg))


def _cfg(root: Path, *extra: str) -> config_mod.Config:
    return config_mod.resolve({}, [f"storage.root={root}", "tracking.enabled=false", *extra])


def _load(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _run_lm_eval(model, tokenizer, task_dir: Path) -> dict[str, dict]:
    """lm-eval's own run of the exported group; uid -> its logged sample."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'lm_eval[hf]')")
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (pip install 'lm_eval[hf]')")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    out = lm_eval.simple_evaluate(model=lm, tasks=[lmeval.GROUP], task_manager=TaskManager(include_path=str(task_dir)),
                                  log_samples=True, bootstrap_iters=0)
    return {s["doc"]["uid"]: s for samples in out["samples"].values() for s in samples}


def test_export_writes_every_benchmark_and_counts_its_rejects(base, tmp_path, capsys):
    """Catches a benchmark without its task, an item silently missing from the export, and a CLI flag that does not
    reach the exporter."""
    root, model = base
    benches = json.dumps([{"name": "Sample A", "path": str(config_mod.SAMPLE_DATA / "mcq")},
                          {"name": "sample-b", "path": str(config_mod.SAMPLE_DATA / "mcq" / "en.json")}])
    args = ["--set", f"storage.root={root}", "--set", "tracking.enabled=false", "--set", f"eval.benchmarks={benches}",
            "--set", "eval.max_prompt_tokens=200", "--set", "eval.shots=0"]
    assert cli.main(["evaluate", *args, "--model", model, "--export-lm-eval", str(tmp_path / "tasks")]) == 0
    summary = json.loads(capsys.readouterr().out)
    items = runner.load_items(_cfg(root, f"eval.benchmarks={benches}"), Storage("/nonexistent-root"))
    n_rejects = sum(summary["rejects"].values())
    assert set(summary["tasks"]) == {"apollo_ray_sample_a", "apollo_ray_sample_b"}
    assert sum(summary["tasks"].values()) + n_rejects == len(items.items) + len(items.rejects)
    assert n_rejects > 0 and set(summary["rejects"]) == {"prompt_too_long"}  # 200 tokens: some do not fit
    rejects = json.loads((tmp_path / "tasks" / "rejects.json").read_text(encoding="utf-8"))
    assert len(rejects) == n_rejects and all(r["detail"] for r in rejects)
    for task, n in summary["tasks"].items():
        docs = (tmp_path / "tasks" / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(docs) == n
        assert "output_type: \"multiple_choice\"" in (tmp_path / "tasks" / f"{task}.yaml").read_text(encoding="utf-8")


def test_lm_eval_agrees_with_our_loglik_item_for_item(base, tmp_path):
    """Catches any difference between our option log-likelihood (prompt once, KV cache reused per option) and lm-eval's
    (each option's full sequence): a continuation tokenized differently, a prompt token lost or added, an off-by-one
    in the scored positions. Log-likelihoods must agree to 1e-4 and predictions exactly, on every sample item."""
    root, path = base
    cfg = _cfg(root, "eval.protocol=native", "eval.scoring=loglik")
    lmeval.export(cfg, [path], str(tmp_path))
    model, tokenizer = _load(path)
    samples = _run_lm_eval(model, tokenizer, tmp_path)
    docs = [json.loads(x) for x in (tmp_path / f"{lmeval.task_name('apollo-sample')}.jsonl").read_text(
        encoding="utf-8").splitlines()]
    items = {e.uid: e.item for e in runner.load_items(cfg, Storage.from_config(cfg)).items}
    assert len(docs) == len(samples) == len(items) > 100
    ours = score_options(model, tokenizer, [d["prompt"] for d in docs], [items[d["uid"]] for d in docs])
    for d, s in zip(docs, ours):
        theirs = [r[0][0] for r in samples[d["uid"]]["resps"]]
        assert theirs == pytest.approx(list(s.sums), abs=1e-4), d["uid"]
        assert s.letters[max(range(len(theirs)), key=theirs.__getitem__)] == s.predicted, d["uid"]


def test_lm_eval_agrees_with_the_apollo_protocol_item_for_item(base, tmp_path):
    """Catches a generation setting lm-eval and we do not share (minimum tokens, EOS stop, special tokens in the
    text) and an extraction that lm-eval's task would not apply: the same text and the same letter for every item."""
    root, path = base
    cfg = _cfg(root, "eval.protocol=apollo", "eval.max_new_tokens=6", "eval.limit=3")
    lmeval.export(cfg, [path], str(tmp_path))
    model, tokenizer = _load(path)
    samples = _run_lm_eval(model, tokenizer, tmp_path)
    docs = [json.loads(x) for x in (tmp_path / f"{lmeval.task_name('apollo-sample')}.jsonl").read_text(
        encoding="utf-8").splitlines()]
    assert len(docs) == len(samples) > 20
    assert all(d["prompt"].endswith("Assistant:") for d in docs)
    texts = generate_answers(model, tokenizer, [d["prompt"] for d in docs], 6, min_new_tokens=apollo.MIN_NEW_TOKENS)
    for d, text in zip(docs, texts):
        s = samples[d["uid"]]
        assert s["resps"][0][0] == text, d["uid"]
        assert s["acc"] == float(apollo.extract_reference(text) == d["answer"]), d["uid"]
