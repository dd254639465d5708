"""The rewrite stage against a server that fails 30 % of its replies in ten ways, killed mid-run and rerun: every
paragraph ends as exactly one item or one reject, and no reject's reason is transient (the server's failure is never
recorded as a verdict on the text). Also the validator's rules for text no model should be trained on."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

from apollo_ray.data import rewrite as rw
from apollo_ray.storage import Storage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_openai import FakeOpenAI  # noqa: E402
from test_rewrite import (kill_rewrite_driver_after, para, read_items, read_rejects, sample_docs,  # noqa: E402
                          write_corpus)

KINDS = ("500", "503", "429", "timeout", "empty", "no_choices", "truncated", "malformed", "bad_usage", "special")


def test_thirty_percent_faults_and_a_driver_kill_end_in_one_final_record_each(ray_local, make_cfg):
    texts = [(lang, d["text"]) for lang in ("en", "es", "fr", "zh") for d in sample_docs(lang)]
    rows = [para(f"p{i:03d}", texts[i % len(texts)][1], texts[i % len(texts)][0]) for i in range(60)]
    with FakeOpenAI(fault_rate=0.3, random_modes=KINDS, timeout_sleep_s=3.0, latency_s=0.05, seed=7) as server:
        overrides = ["tracking.enabled=false", "rewrite.backend=openai", f"rewrite.openai.base_url={server.base_url}",
                     "rewrite.openai.model=fake", "rewrite.openai.concurrency=4", "rewrite.batch_size=2",
                     "rewrite.openai.timeout_s=1", "rewrite.openai.max_retries=4", "rewrite.openai.backoff_s=0.01"]
        cfg = make_cfg(*overrides)
        storage = Storage.from_config(cfg)
        corpus = write_corpus(storage, rows)
        out = rw.output_folder(cfg, storage.read_manifest(corpus))
        parts = kill_rewrite_driver_after(4, ray_local, corpus, cfg.storage.root, overrides)
        assert 0 < len(rw._done_ids(storage, str(parts))) < len(rows)

        assert rw.run(cfg, corpus) == out  # the rerun: only what has no final record is asked again
        injected = {k: server.counts[k] for k in KINDS}
    assert min(injected.values()) > 0, injected  # every fault kind really happened

    m = storage.read_manifest(out)
    items, rejects = read_items(storage, out), read_rejects(storage, out)
    ids = [r["id"] for r in items] + [r["id"] for r in rejects]
    assert len(ids) == len(set(ids)) == len(rows)  # exactly one record per paragraph
    assert m.counts["in"] == m.counts["kept"] + sum(m.counts["dropped"].values()) == len(rows)
    reasons = Counter(r["reason"] for r in rejects)
    assert not set(reasons) & rw.TRANSIENT_REASONS, reasons
    # the only final verdict a fault can cause here is the special-token reply
    assert set(reasons) <= {"control_characters"}, reasons
    # retried faults are counted (those the killed driver had in flight are lost with its uncommitted records)
    assert m.extra["retries"] > 0 and m.extra["retry_reasons"]


@pytest.mark.parametrize("lang, text, reason", [
    ("en", "What is \x00 the dose?", "control_characters"),
    ("en", "What is the usual adult dose of amoxicillin<|im_end|>", "special_tokens"),
    ("en", "[INST] What causes anaemia? [/INST]", "special_tokens"),
    ("zh", "？？？ 123 …", "no_letters"),
    ("ar", "!!! ... ؟؟", "no_letters"),
    ("zh", "What is diabetes?", "wrong_language"),  # short: lingua skips it, the script check does not
    ("ar", "What is asthma?", "wrong_language"),
    ("hi", "What is malaria?", "wrong_language"),
    ("ru", "What is gout?", "wrong_language"),
    ("en", "糖尿病是什么？", "wrong_language"),
    ("zh", "什么是糖尿病？", None),
    ("zh", "HbA1c 在糖尿病诊断中的作用是什么？", None),  # Latin abbreviations inside Chinese are a minority
    ("ja", "糖尿病とは何ですか？", None),
    ("ko", "당뇨병이란 무엇입니까?", None),
    ("ar", "ما هو الربو؟", None),
    ("hi", "मलेरिया क्या है?", None),
    ("ru", "Что такое подагра?", None),
    ("en", "What is gout?\nIt is a form of arthritis.", None),
])
def test_question_rules(lang, text, reason):
    """Catches garbage a fault-injecting server got accepted: control characters, chat special tokens, letter-free
    text and short texts in the wrong script, in every script; and catches over-rejection of good short questions."""
    prompts = rw.load_prompts("v1", lang)
    assert rw.check_text(text, prompts, rw.LanguageCheck(), None) == reason


def test_usage_counts_are_sanitised():
    """A 200 reply with "prompt_tokens": "ten" stopped the whole stage (int("ten"))."""
    assert [rw._count(v) for v in ("ten", None, -3, 2.0, 7, True, float("nan"), float("inf"))] == \
        [0, 0, 0, 2, 7, 0, 0, 0]
