"""QA rewriting: prompts, validation rules, the three backends on a local Ray, fault injection, kill-and-rerun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from apollo_ray import config as config_mod
from apollo_ray import languages as langs
from apollo_ray.config import SAMPLE_DATA
from apollo_ray.data import rewrite as rw
from apollo_ray.data.records import PARAGRAPH, record_id
from apollo_ray.storage import Manifest, Storage, join

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_openai import FakeOpenAI  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------ helpers
def sample_docs(lang: str, kind: str = "corpus") -> list[dict]:
    lines = (SAMPLE_DATA / kind / f"{lang}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def para(pid: str, text: str, lang: str, kind: str = "encyclopedia", **extra) -> dict:
    return {"id": pid, "text": text, "language": lang, "declared_language": lang, "language_mismatch": False,
            "kind": kind, "source": f"test-{kind}", "doc_id": pid, "offset": 0, "n_tokens": len(text) // 4, **extra}


def exam(pid: str, question: str, answer: str, lang: str, **fields) -> dict:
    """An instruction row as collect writes it: text = question + answer, the source record as JSON in ``fields``."""
    record = {"id": pid, "kind": "exam", "question": question, "answer": answer, **fields}
    return para(pid, f"{question}\n{answer}", lang, kind="exam", fields=json.dumps(record, ensure_ascii=False))


def write_corpus(storage: Storage, rows: list[dict], name: str = "corpus/test", shard_rows: int = 8) -> str:
    """A collect-style output: PARAGRAPH shards and a manifest, written last."""
    folder = storage.uri(name)
    schema = PARAGRAPH
    shards = []
    for i in range(0, len(rows), shard_rows):
        chunk = [{k: r.get(k) for k in schema.names} for r in rows[i:i + shard_rows]]
        shard = storage.write_parquet(join(folder, f"shard-{i // shard_rows:05d}.parquet"),
                                      pa.Table.from_pylist(chunk, schema=schema))
        shards.append(shard.relative_to(folder))
    storage.write_manifest(folder, Manifest(stage="collect", fingerprint="test", shards=shards,
                                            counts={"in": len(rows), "kept": len(rows), "dropped": {}}))
    return folder


def read_items(storage: Storage, out: str) -> list[dict]:
    return [r for t in storage.iter_tables(out) for r in t.to_pylist()]


def read_rejects(storage: Storage, out: str) -> list[dict]:
    m = storage.read_manifest(out)
    return [r for s in m.extra["rejects"] for r in storage.read_parquet(join(out, s["path"])).to_pylist()]


# ------------------------------------------------------------------------------------------------- prompts and rules
def test_prompts_native_for_majors_and_fallback_for_minors():
    check = rw.LanguageCheck()
    assert rw.prompt_versions() == ["v1"]
    for lang in langs.MAJORS:
        ps = rw.load_prompts("v1", lang)
        assert ps.file == lang and not ps.fallback and ps.reply_in is None
        for step in ("question", "answer", "dialogue"):
            text = ps.render(step, paragraph="", question="")
            # written natively: the instructions themselves are detected as the language
            assert check.mismatch(text, lang) is None, (lang, step)
        assert ps.leakage and ps.labels["patient"] and "{topic}" in ps.extractive_question
    sw = rw.load_prompts("v1", "sw")
    assert sw.fallback and sw.file == "en"
    for step in ("question", "answer", "dialogue"):
        text = sw.render(step, paragraph="Malaria ni ugonjwa.", question="Malaria ni nini?")
        assert text.endswith("Reply in Swahili.") and "in Swahili" in text
    with pytest.raises(rw.PromptError, match="available versions: v1"):
        rw.load_prompts("v999", "en")


def test_text_rules():
    zh = rw.load_prompts("v1", "zh")
    got = rw.parse_dialogue("好的，以下是对话：\n**患者**：我头疼。\n还有点发烧。\n医生：请量体温。\n患者：好的", zh)
    assert got == [{"role": "user", "content": "我头疼。\n还有点发烧。"}, {"role": "assistant", "content": "请量体温。"}]
    fr = rw.load_prompts("v1", "fr")
    assert rw.parse_dialogue("Patient : J'ai mal.\nMédecin : Reposez-vous.", fr)[1]["role"] == "assistant"
    assert rw.parse_dialogue("Doctor: hello", fr) is None
    assert rw.topic_phrase("Malaria is a disease. It kills.", (" is ",), lowercase=False) == "Malaria"
    assert rw.topic_phrase("HIV is a virus.", (" is ",), lowercase=True) == "HIV"
    assert rw.topic_phrase("疟疾是一种疾病。它很常见。", ("是",)) == "疟疾"
    assert rw.find_leakage("According to the text, rest helps.", rw.load_prompts("v1", "en").leakage)
    assert rw.find_leakage("No texto, ver", ["no texto"]) and not rw.find_leakage("no textoide", ["no texto"])
    assert rw.find_leakage("根据上文，高血压需要治疗。", zh.leakage)
    assert rw.clean_output('**Question:** "What is malaria?"', ["Question"]) == "What is malaria?"


def test_output_folder_follows_semantic_config_only(make_cfg):
    corpus = Manifest(stage="collect", fingerprint="x")
    base = rw.output_folder(make_cfg("rewrite.backend=openai"), corpus)
    operational = ["rewrite.openai.concurrency=300", "rewrite.openai.qps=5", "rewrite.batch_size=64",
                   "rewrite.actors=4", "rewrite.openai.base_url=http://elsewhere/v1", "rewrite.openai.timeout_s=5",
                   "rewrite.openai.max_retries=1"]
    assert rw.output_folder(make_cfg("rewrite.backend=openai", *operational), corpus) == base
    for semantic in ("rewrite.openai.temperature=0.2", "rewrite.openai.model=gpt-4o", "rewrite.min_answer_chars=10",
                     "rewrite.backend=extractive"):
        assert rw.output_folder(make_cfg("rewrite.backend=openai", semantic), corpus) != base, semantic
    assert rw.output_folder(make_cfg("rewrite.backend=openai"), Manifest(stage="collect", fingerprint="y")) != base


# ------------------------------------------------------------------------------------------------ extractive backend
def test_extractive_multilingual(ray_local, make_cfg):
    cfg = make_cfg("tracking.enabled=false", "rewrite.backend=extractive", "rewrite.batch_size=4")
    storage = Storage.from_config(cfg)
    languages = ("en", "zh", "ar", "hi", "es", "ja", "sw")
    rows = [para(f"{lang}-p", sample_docs(lang)[0]["text"], lang) for lang in languages]
    exams = [d for lang in ("en", "zh") for d in sample_docs(lang, "instruct")[:1]]
    rows += [exam(d["id"], d["question"], d["answer"], lang) for d, lang in zip(exams, ("en", "zh"))]
    rows.append(exam("mcq", "Which vitamin deficiency causes scurvy?", "(B)", "en", options="(A) D\n(B) C"))
    rows.append(para("tiny", "Too short.", "en"))
    out = rw.run(cfg, write_corpus(storage, rows))
    m = storage.read_manifest(out)
    assert m.counts == {"in": len(rows), "kept": len(rows) - 1, "dropped": {"answer_too_short": 1}}
    items = {r["parent_id"]: r for r in read_items(storage, out)}
    starts = {"en": "What should be known about", "zh": "关于", "ar": "ما الذي ينبغي معرفته عن", "es": "¿Qué se debe",
              "ja": None, "hi": None, "sw": "Malaria ni ugonjwa"}
    check = rw.LanguageCheck()
    for lang, start in starts.items():
        it = items[f"{lang}-p"]
        q, a = it["messages"][0]["content"], it["messages"][1]["content"]
        assert it["language"] == lang and it["backend"] == "extractive"
        assert it["id"] == record_id(f"{lang}-p", "v1", "extractive", "")
        assert len(a) >= 32 and check.mismatch(a, lang) is None
        assert start is None or q.startswith(start), (lang, q)
    assert items["ja-p"]["messages"][0]["content"].endswith("について知っておくべきことは何ですか？")
    assert items["hi-p"]["messages"][0]["content"].endswith("के बारे में क्या जानना चाहिए?")
    for d in exams:  # passed through untouched
        assert items[d["id"]]["messages"] == [{"role": "user", "content": d["question"]},
                                              {"role": "assistant", "content": d["answer"]}]
        assert items[d["id"]]["backend"] == "passthrough"
    assert items["mcq"]["messages"][0]["content"] == "Which vitamin deficiency causes scurvy?\n(A) D\n(B) C"
    assert not storage.exists(join(out, "parts"))


# ------------------------------------------------------------------------------------- openai backend, fault injection
def test_openai_faults_counted(ray_local, make_cfg):
    en, es, zh = sample_docs("en"), sample_docs("es"), sample_docs("zh")
    rows = [para(f"en-{i}", d["text"], "en") for i, d in enumerate(en[:9])]
    rows += [para("es-0", es[0]["text"], "es"), para("es-1", es[1]["text"], "es"), para("zh-0", zh[0]["text"], "zh")]
    dialogue = "Hypertension often has no symptoms. Blood pressure should be measured regularly in adults."
    rows += [para("dlg-ok", dialogue, "en", kind="dialogue"),
             para("dlg-long", en[9]["text"] * 3, "en", kind="dialogue"),
             para("dlg-bad", "Anaemia in pregnancy is common. Iron supplements are usually offered.", "en",
                  kind="dialogue")]
    ex = sample_docs("en", "instruct")[0]
    rows.append(exam("exam-0", ex["question"], ex["answer"], "en"))
    key = {r["id"]: r["text"][:40] for r in rows}
    # Server failures (5xx, 429, timeouts, empty / body-less / cut-off replies) are asked again; verdicts on the text
    # (short, leaked, wrong language, unparseable, special tokens) are final. en-3's answer fails on all 4 attempts of
    # the first pass, so a second pass asks again for en-3 alone and it succeeds.
    schedule = {"en-0": ["500", "503"], "en-1": ["429"], "en-2": ["timeout"],
                "en-3": ["ok", "500", "500", "500", "500"],
                "en-4": ["empty"], "en-5": ["no_choices"], "en-6": ["ok", "short"], "en-7": ["ok", "leak"],
                "es-1": ["ok", "wrong_lang"], "dlg-bad": ["garbage"], "es-0": ["truncated", "bad_usage"],
                "zh-0": ["malformed"], "en-8": ["special"]}
    faults = {key[k]: v for k, v in schedule.items()}
    # The "timeout" reply is held until the server stops, so the client's timeout fires exactly once (for en-2)
    # however slow the machine; the timeout itself is generous, so no other reply is ever late enough to be retried.
    with FakeOpenAI(faults=faults) as server:
        cfg = make_cfg("rewrite.backend=openai", f"rewrite.openai.base_url={server.base_url}",
                       "rewrite.openai.model=fake-medical", "rewrite.openai.timeout_s=10",
                       "rewrite.openai.max_retries=3", "rewrite.openai.backoff_s=0.01", "rewrite.openai.concurrency=8",
                       "rewrite.openai.qps=200", "rewrite.batch_size=4", "rewrite.max_dialogue_chars=1000")
        storage = Storage.from_config(cfg)
        out = rw.run(cfg, write_corpus(storage, rows))
        assert server.counts["unmatched"] == 0 and server.counts["timeout"] == 1
    m = storage.read_manifest(out)
    expected_dropped = {"answer_too_short": 1, "leakage": 1, "wrong_language": 1, "dialogue_too_long": 1,
                        "dialogue_unparseable": 1, "control_characters": 1}
    assert m.counts == {"in": len(rows), "kept": len(rows) - 6, "dropped": expected_dropped}
    assert m.extra["retry_reasons"] == {"500": 4, "503": 1, "429": 1, "timeout": 1, "empty_output": 1,
                                        "malformed_response": 2, "truncated": 1, "pass:request_failed": 1}
    assert m.extra["retries"] == 12 and m.extra["tokens_in"] > 0 and m.extra["tokens_out"] > 0

    items = {r["parent_id"]: r for r in read_items(storage, out)}
    assert set(items) == {"en-0", "en-1", "en-2", "en-3", "en-4", "en-5", "es-0", "zh-0", "dlg-ok", "exam-0"}
    for pid in ("en-0", "en-1", "en-2", "en-3", "en-4", "en-5", "es-0", "zh-0"):
        text = rw.normalize(next(r["text"] for r in rows if r["id"] == pid))
        q, a = (x["content"] for x in items[pid]["messages"])
        assert a == text and q.rstrip("?？") == rw.sentences(text)[0].rstrip(".。")
        assert items[pid]["id"] == record_id(pid, "v1", "openai", "fake-medical")
    assert [x["role"] for x in items["dlg-ok"]["messages"]] == ["user", "assistant"]
    assert items["dlg-ok"]["messages"][1]["content"] == dialogue
    assert items["exam-0"]["messages"][0]["content"] == ex["question"]

    rejects = {r["reason"]: r for r in read_rejects(storage, out)}
    assert rejects["leakage"]["raw"].startswith("According to the text")
    assert rejects["answer_too_short"]["raw"] == "Yes."
    assert rejects["control_characters"]["raw"] == "\x00{{{<|im_end|>" and "paragraph en-8" in \
        rejects["control_characters"]["where"]

    import mlflow

    client = mlflow.MlflowClient(cfg.tracking_uri())
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    run = client.search_runs([exp.experiment_id], "tags.`apollo.stage` = 'rewrite'")[0]
    assert run.data.metrics["qa_out"] == len(rows) - 6 and run.data.metrics["retries"] == 12
    assert run.data.metrics["rejected.leakage"] == 1 and run.data.metrics["retries.timeout"] == 1


# ------------------------------------------------------------------------------------ kill and rerun (exactly once)
def kill_rewrite_driver_after(parts_wanted: int, ray_local, corpus: str, root: str, overrides: list[str]) -> Path:
    """Run the rewrite stage as a driver process of this test's own Ray, SIGKILL its process group once
    ``parts_wanted`` parts are committed, and wait until Ray has taken its actor away; returns the parts folder."""
    cfg = config_mod.resolve({}, [f"storage.root={root}", *overrides])
    storage = Storage.from_config(cfg)
    parts = Path(join(rw.output_folder(cfg, storage.read_manifest(corpus)), "parts"))
    script = ("import sys; from apollo_ray import config; from apollo_ray.data import rewrite; "
              "rewrite.run(config.resolve({}, sys.argv[2:]), sys.argv[1])")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-c", script, corpus, f"storage.root={root}", *overrides], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while len(list(parts.glob("*.parquet"))) < parts_wanted:
        assert proc.poll() is None, "the rewrite ended before it could be killed"
        assert time.time() < deadline, f"fewer than {parts_wanted} parts committed within 300 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # our own driver's process group, nothing else
    assert proc.wait() == -signal.SIGKILL
    # Ray kills the dead driver's actor; once its CPU share is back it can no longer commit anything.
    deadline = time.time() + 120
    while ray_local.available_resources().get("CPU", 0) < ray_local.cluster_resources()["CPU"]:
        assert time.time() < deadline, "the killed driver's actor did not go away"
        time.sleep(0.1)
    assert not storage.has_manifest(str(parts.parent))
    return parts


def test_kill_and_rerun_exactly_once(ray_local, make_cfg, tmp_path):
    texts = [d["text"] for lang in ("en", "es", "fr") for d in sample_docs(lang)]
    rows = [para(f"p{i:03d}", texts[i % len(texts)], ("en", "es", "fr")[(i % len(texts)) // 16]) for i in range(40)]
    with FakeOpenAI(latency_s=0.25) as server:
        overrides = ["tracking.enabled=false", "rewrite.backend=openai", f"rewrite.openai.base_url={server.base_url}",
                     "rewrite.openai.model=fake", "rewrite.openai.concurrency=2", "rewrite.batch_size=2"]
        cfg = make_cfg(*overrides)
        storage = Storage.from_config(cfg)
        corpus = write_corpus(storage, rows)
        out = rw.output_folder(cfg, storage.read_manifest(corpus))
        parts = kill_rewrite_driver_after(3, ray_local, corpus, cfg.storage.root, overrides)
        committed = rw._done_ids(storage, str(parts))
        assert 0 < len(committed) < len(rows)
        # An overlapping run could commit a paragraph twice; consolidation must keep one record.
        first = sorted(parts.glob("*.parquet"))[0]
        shutil.copy(first, parts / "ffff-duplicate.parquet")

        server.latency_s = 0.0
        before = server.requests
        assert rw.run(cfg, corpus) == out
        assert server.requests - before == 2 * (len(rows) - len(committed))  # only the uncommitted were redone
        items = read_items(storage, out)
        ids = [r["id"] for r in items]
        assert len(ids) == len(set(ids)) == len(rows)
        assert sorted(r["parent_id"] for r in items) == [r["id"] for r in rows]
        m = storage.read_manifest(out)
        assert m.counts == {"in": len(rows), "kept": len(rows), "dropped": {}}

        before, created = server.requests, m.created
        assert rw.run(cfg, corpus) == out  # finished: nothing to do
        assert server.requests == before and storage.read_manifest(out).created == created


# ------------------------------------------------------------------------------------------------------- hf backend
@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory) -> str:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from apollo_ray.model.tiny import train_tokenizer

    path = tmp_path_factory.mktemp("tiny-hf")
    texts = [d["text"] for lang in ("en", "zh", "es") for d in sample_docs(lang)]
    tok = train_tokenizer(texts, vocab_size=400, out_dir=path)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=4096, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    model.save_pretrained(path)
    return str(path)


def test_hf_backend_actor_pool(ray_local, make_cfg, tiny_hf_model):
    cfg = make_cfg("tracking.enabled=false", "rewrite.backend=hf", f"rewrite.hf_model={tiny_hf_model}",
                   "rewrite.hf_max_new_tokens=8", "rewrite.batch_size=4", "rewrite.min_answer_chars=4")
    storage = Storage.from_config(cfg)
    rows = [para("en-0", "Malaria is caused by Plasmodium parasites. Mosquitoes transmit it.", "en"),
            para("en-1", "Hypertension is persistently raised blood pressure. It is often silent.", "en"),
            para("zh-0", "高血压是一种常见的慢性病。需要长期管理。", "zh"),
            para("es-0", "El dengue es una infección viral. La transmiten los mosquitos.", "es"),
            para("dlg-0", "Iron deficiency causes anaemia. Iron tablets are the usual treatment.", "en",
                 kind="dialogue"),
            exam("exam-0", "What treats anaphylaxis?",
                 "Intramuscular adrenaline is the first-line treatment of anaphylaxis.", "en")]
    out = rw.run(cfg, write_corpus(storage, rows))
    m = storage.read_manifest(out)
    c = m.counts
    assert c["in"] == len(rows) == c["kept"] + sum(c["dropped"].values())
    items = read_items(storage, out)
    assert "exam-0" in {r["parent_id"] for r in items}
    for r in items:
        assert r["messages"] and all(x["content"] for x in r["messages"])
    # a random-weight model writes any token: every verdict on the text may occur, no server failure can
    assert set(c["dropped"]) <= {"empty_question", "empty_answer", "answer_too_short", "leakage", "wrong_language",
                                 "dialogue_unparseable", "control_characters", "special_tokens", "no_letters"}
    assert m.extra["tokens_out"] > 0 and m.extra["semantic"]["model"] == tiny_hf_model
    assert all(r["raw"] is not None for r in read_rejects(storage, out))
    # What was kept or rejected is generated text only: at most hf_max_new_tokens tokens of the model's vocabulary
    # (a prompt decoded with its generation would be hundreds of characters, and mostly dropped as leakage).
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf_model)
    longest = max(len(tok.decode([i])) for i in range(len(tok)))
    generated = [x["content"] for r in items if r["backend"] == "hf" for x in r["messages"]]
    generated += [r["raw"] for r in read_rejects(storage, out)]
    assert generated and all(len(t) <= 8 * longest for t in generated), generated
    assert len([r for r in items if r["backend"] == "hf"]) + sum(c["dropped"].values()) == len(rows) - 1
    assert "leakage" not in c["dropped"]


# ------------------------------------------------------------------- hf backend: what it produced, against the model
HF_NEW_TOKENS = 8
GENERATED = [para("en-0", "Malaria is caused by Plasmodium parasites. Mosquitoes transmit it.", "en"),
             para("en-1", "Hypertension is persistently raised blood pressure. It is often silent.", "en"),
             para("zh-0", "高血压是一种常见的慢性病。需要长期管理。", "zh"),
             para("es-0", "El dengue es una infección viral. La transmiten los mosquitos.", "es"),
             para("dlg-0", "Iron deficiency causes anaemia. Iron tablets are the usual treatment.", "en",
                  kind="dialogue")]


def _hf_greedy_cfg(make_cfg, model: str, *extra: str):
    """The hf backend with top-p so small that sampling keeps only the most likely token: greedy decoding, so a
    prompt's continuation does not depend on its batch and can be checked against the model run on it alone."""
    return make_cfg("tracking.enabled=false", "rewrite.backend=hf", f"rewrite.hf_model={model}",
                    f"rewrite.hf_max_new_tokens={HF_NEW_TOKENS}", "rewrite.openai.top_p=1e-9",
                    "rewrite.min_answer_chars=4", *extra)


class _Oracle:
    """``model.generate`` on one prompt alone, unpadded, greedy; only the new tokens decoded, cut at EOS."""

    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from apollo_ray.data.mixture import ASSISTANT_PREFIX, USER_PREFIX

        self.tok = AutoTokenizer.from_pretrained(path)
        assert not getattr(self.tok, "chat_template", None)  # the Apollo template below is what the backend uses
        self.lm = AutoModelForCausalLM.from_pretrained(path).eval()
        self.template = USER_PREFIX + "{}\n" + ASSISTANT_PREFIX
        self.calls = 0

    def __call__(self, prompt: str) -> tuple[str, int, int]:
        """(decoded new text, prompt tokens, new tokens)"""
        import torch

        self.calls += 1
        enc = self.tok(self.template.format(prompt), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            gen = self.lm.generate(**enc, do_sample=False, max_new_tokens=HF_NEW_TOKENS,
                                   pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id)
        new = gen[0, enc["input_ids"].shape[1]:].tolist()
        if self.tok.eos_token_id in new:
            new = new[:new.index(self.tok.eos_token_id)]
        return self.tok.decode(new, skip_special_tokens=True), enc["input_ids"].shape[1], len(new)


@pytest.fixture(scope="module")
def hf_oracle(tiny_hf_model) -> _Oracle:
    return _Oracle(tiny_hf_model)


def test_hf_backend_returns_only_the_generated_text(make_cfg, tiny_hf_model, hf_oracle, monkeypatch):
    """Catches the hf backend decoding prompt + generation (or another row's tokens, or not cutting at EOS): each
    completion is exactly the model's own continuation of its prompt, batched requests mapped back in order."""
    import asyncio

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # fp32 on CPU, as the oracle (a GPU means bf16)
    cfg = _hf_greedy_cfg(make_cfg, tiny_hf_model, "rewrite.batch_size=2")
    backend = rw.HFBackend(cfg.rewrite)
    requests = [rw.Request("question", rw.load_prompts("v1", r["language"]).render("question", paragraph=r["text"]),
                           r["text"], rw.load_prompts("v1", r["language"])) for r in GENERATED]
    lengths = {len(hf_oracle.tok(r.prompt)["input_ids"]) for r in requests}
    assert len(lengths) > 1  # prompts of different lengths: the batch is left-padded

    async def all_at_once():  # one event-loop turn: generated as batches of 2, 2 and 1
        return await asyncio.gather(*(backend.complete(r) for r in requests))

    got = asyncio.run(all_at_once())
    assert len(got) == len(requests)
    for r, c in zip(requests, got):
        text, n_in, n_out = hf_oracle(r.prompt)
        assert c.error is None and c.text == c.raw == text, (r.paragraph, c.text, text)
        assert c.tokens_in == n_in and c.tokens_out == n_out and 0 < n_out <= HF_NEW_TOKENS
        assert r.prompt[:40] not in c.text


def test_hf_rewriter_counts_what_the_model_generated(make_cfg, tiny_hf_model, hf_oracle, monkeypatch):
    """Catches generated items lost or altered between the model and the records (e.g. the prompt decoded with the
    generation, so items drop as leakage): every record is what the model said, accepted + rejected = input."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # fp32 on CPU, as the oracle
    cfg = _hf_greedy_cfg(make_cfg, tiny_hf_model, "rewrite.batch_size=4")
    storage = Storage.from_config(cfg)
    out = storage.uri("qa", "direct")
    ex = exam("exam-0", "What treats anaphylaxis?",
              "Intramuscular adrenaline is the first-line treatment of anaphylaxis.", "en")
    rows = [{**r, "question": None, "answer": None} for r in [*GENERATED, ex]]
    writer = rw.Rewriter(cfg.rewrite, storage, out)  # in-process: the actor's work without Ray
    summaries = writer.rewrite_rows(rows).to_pylist()
    records = [r for u in rw._part_uris(storage, join(out, "parts")) for r in storage.read_parquet(u).to_pylist()]
    assert sorted(r["parent_id"] for r in records) == sorted(r["id"] for r in rows)  # one record per input
    assert sum(s["rows"] for s in summaries) == len(rows)
    ok = [r for r in records if r["status"] == "ok"]
    assert sum(s["ok"] for s in summaries) == len(ok)
    assert len(ok) + sum(r["status"] == "reject" for r in records) == len(rows)

    generated_ok = 0
    tokens_out = 0
    for rec in records:
        row = next(r for r in rows if r["id"] == rec["parent_id"])
        if row["kind"] == "exam":
            assert rec["status"] == "ok" and rec["backend"] == "passthrough"
            continue
        prompts = rw.load_prompts("v1", row["language"])
        if row["kind"] == "dialogue":
            text, _, n = hf_oracle(prompts.render("dialogue", paragraph=row["text"]))
            tokens_out += n
            assert rec["tokens_out"] == n
            if rec["status"] == "ok":
                assert rec["messages"] == rw.parse_dialogue(text, prompts)
            else:
                assert rec["step"] == "dialogue" and rec["raw"] == text
                assert rw.parse_dialogue(text, prompts) is None or rec["reason"] not in ("dialogue_unparseable",
                                                                                         "empty_output")
            continue
        q_text, _, n_q = hf_oracle(prompts.render("question", paragraph=row["text"]))
        question = rw.clean_output(q_text, [prompts.labels["question"], "Question", "Q"])
        if rec["step"] == "question":
            assert rec["status"] == "reject" and rec["raw"] == q_text and rec["tokens_out"] == n_q
            assert rec["reason"] == writer._check(question, prompts, is_answer=False)
            tokens_out += n_q
            continue
        assert writer._check(question, prompts, is_answer=False) is None
        a_text, _, n_a = hf_oracle(prompts.render("answer", paragraph=row["text"], question=question))
        answer = rw.clean_output(a_text, [prompts.labels["answer"], "Answer", "A"])
        assert rec["tokens_out"] == n_q + n_a
        tokens_out += n_q + n_a
        if rec["status"] == "ok":
            generated_ok += 1
            assert rec["messages"] == [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            assert rec["backend"] == "hf" and rec["model"] == tiny_hf_model
        else:
            assert rec["step"] == "answer" and rec["raw"] == a_text
            assert rec["reason"] == writer._check(answer, prompts, is_answer=True)
    assert sum(s["tokens_out"] for s in summaries) == tokens_out
    # what the validation rules make of these continuations (a fixed model: every reject above has its reason)
    assert generated_ok >= 2, records
