"""Benchmark decontamination (``data/decontam.py``): units and the index without Ray; then the stage on a local Ray
with 30 XMedBench dev questions planted into the sample training items — verbatim, lightly edited, and through a
translation round trip that changed no word — every plant quarantined and named, every other item kept as it was."""

from __future__ import annotations

import json
import random
import re

import pyarrow as pa
import pytest

from apollo_ray import config as config_mod
from apollo_ray.config import SAMPLE_DATA
from apollo_ray.data import decontam
from apollo_ray.data.records import ITEM, record_id
from apollo_ray.storage import Manifest, Storage

LANGS = ("en", "zh", "es", "fr", "ar", "hi")


# ------------------------------------------------------------------------------------------------------- no Ray
def _index(questions: list[str], options: list[tuple[str, ...]] | None = None, **over):
    dcfg = config_mod.DecontamConfig(**over)
    items = [decontam.BenchItem(f"b/q-{i}", "b", "test", "src", q, (options or [()] * len(questions))[i], "")
             for i, q in enumerate(questions)]
    return decontam.Matcher(decontam.build_index(items, dcfg))


def test_units_ignore_case_width_punctuation_and_option_labels():
    """Bug caught: a round trip through a translator or a web page (full-width letters, 'A.' for '(A)', other quotes
    and spacing) hides a verbatim copy from the n-grams; CJK read as one 'word' per sentence instead of per character."""
    assert decontam.units("(A) Vitamin C.\n(B) «Iron»") == decontam.units("a. VITAMIN  c\nB) \"iron\"") == \
        ["vitamin", "c", "iron"]
    assert decontam.units("ＡＢＣ１２３ 维生素C缺乏") == ["abc123", "维", "生", "素", "c", "缺", "乏"]
    assert decontam.units("비타민 결핍") == ["비타민", "결핍"]  # Hangul is written with spaces: words


def test_a_shared_ngram_quarantines_and_a_template_shared_by_many_benchmark_items_does_not():
    """Bug caught: 13-grams not matched across an item's messages, or template phrases that many benchmark questions
    share ('which of the following ... is most likely') counted as evidence, which would quarantine clean items."""
    template = "which of the following findings on examination is most likely to be seen in a patient with"
    questions = [f"{template} disease number {i}?" for i in range(12)]
    long_q = "A 34 year old woman returns from a trip to Kenya with cyclic fevers every 48 hours and a low platelet count"
    m = _index(questions + [long_q], max_ngram_items=10)
    assert m.check(f"Exam practice. {template} anaemia of chronic kidney disease?") is None
    hit = m.check("Case: a 34-year-old woman returns from a trip to Kenya with cyclic fevers every 48 hours. Treat?")
    assert hit is not None and hit.reason == "ngram_overlap" and m.describe(hit.owner)["benchmark_item"] == "b/q-12"
    assert hit.evidence == "a 34 year old woman returns from a trip to kenya with cyclic"


def test_light_edits_are_near_verbatim_and_a_neighbour_question_is_not():
    """Bug caught: only exact n-grams (one word changed in ten leaves no 13-gram), or the alignment counting scattered
    common words, which would quarantine a different question of the same template."""
    q = ("Which of the following drugs is the first line treatment of uncomplicated falciparum malaria in adults "
         "returning from sub-Saharan Africa")
    m = _index([q], options=[("Chloroquine", "Artemether-lumefantrine", "Quinine", "Doxycycline")])
    words = q.split()
    for k in (9, 19):  # two of twenty words changed, evenly spaced: no 13-gram survives
        words[k] = "XX"
    hit = m.check(" ".join(words))
    assert hit is not None and hit.reason == "near_verbatim" and hit.score >= 0.88
    other = ("Which of the following drugs is the first line treatment of severe vivax malaria in pregnant women "
             "returning from South East Asia")
    assert m.check(other) is None


def test_an_item_that_cannot_be_checked_is_quarantined_and_the_others_go_on(monkeypatch):
    """Bug caught: one bad item stopping the stage, or an unchecked item passed on to training."""
    m = _index(["an unrelated benchmark question about the renal handling of potassium in the distal tubule"])
    rows = [dict(id=f"i{i}", parent_id="p", language="en", kind="exam", source="s",
                 messages=[{"role": "user", "content": f"question {i} about asthma inhalers and their dose"}],
                 prompt_version="", backend="", model="") for i in range(3)]
    real = decontam.Matcher.check

    def check(self, text):
        if "question 1 " in text:
            raise ValueError("boom")
        return real(self, text)

    monkeypatch.setattr(decontam.Matcher, "check", check)
    clean, quarantine, counts = decontam.check_table(pa.Table.from_pylist(rows, schema=ITEM), m)
    assert clean == [0, 2]
    assert [(q["id"], q["reason"]) for q in quarantine] == [("i1", "check_error")]
    assert counts["by_source"]["s"] == {"in": 3, "kept": 2, "check_error": 1}


# ------------------------------------------------------------------------------------------------ plants (Ray)
def _sample_rows() -> list[dict]:
    """Every sample instruct item (exam, passed through) and every corpus paragraph (as an extractive QA item)."""
    rows = []
    for f in sorted((SAMPLE_DATA / "instruct").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            rows.append(_item(r["id"], f.stem, "exam", "sample-exam", r["question"], r["answer"]))
    for f in sorted((SAMPLE_DATA / "corpus").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            for k, para in enumerate(r["text"].split("\n\n")):
                rows.append(_item(f"{r['id']}:{k}", f.stem, r["kind"], "sample-encyclopedia",
                                  f"What should be known about {r['title']}?", para))
    return rows


def _item(key: str, language: str, kind: str, source: str, question: str, answer: str) -> dict:
    return dict(id=record_id(key, "qa"), parent_id=key, language=language, kind=kind, source=source,
                messages=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                prompt_version="v1", backend="extractive", model="")


def _light_edit(text: str, language: str, rng: random.Random) -> tuple[str, float]:
    """At most 10 % of the words changed (characters in Chinese); returns the text and the share changed."""
    if language == "zh":
        spots = [i for i, ch in enumerate(text) if "\u4e00" <= ch <= "\u9fff"]
        k = max(1, len(spots) // 10)
        chars = list(text)
        for i in rng.sample(spots, k):
            chars[i] = "某" if chars[i] != "某" else "甲"
        return "".join(chars), k / len(spots)
    tokens = text.split(" ")
    words = [i for i, t in enumerate(tokens) if any(c.isalpha() for c in t) and not re.fullmatch(r"\(?[A-F]\)", t)]
    k = max(1, len(words) // 10)
    for i in rng.sample(words, k):
        tokens[i] = "qqz"
    return " ".join(tokens), k / len(words)


_FULLWIDTH = {c: chr(ord(c) + 0xFEE0) for c in "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"}


def _round_trip(text: str, language: str) -> str:
    """What a translation round trip that changed no word leaves: other labels, quotes, spacing, width and case."""
    text = re.sub(r"(?m)^\(([A-F])\) ", r"\1. ", text).replace(" ", "  ").replace("\n", " \n")
    if language == "zh":
        return "".join(_FULLWIDTH.get(c, c) for c in text).replace("?", "？")
    return text[:1].swapcase() + text[1:].replace("'", "’").replace("?", " ?")


def _plants(xmedbench_dev) -> list[dict]:
    """30 dev questions, 5 in each of six languages, one third each verbatim, lightly edited and round-tripped; half
    as an exam item (the MCQ as the question, its answer as the reply), half inside a paragraph of an answer."""
    rng = random.Random(19)
    plants = []
    for lang in LANGS:
        items = json.loads((xmedbench_dev / f"{lang}.json").read_text(encoding="utf-8"))
        questions = {}
        for idx, it in enumerate(items):
            questions.setdefault(it["question"], idx)  # ar repeats two questions: plant the first index of each
        for idx in rng.sample(sorted(questions.values()), 5):
            it = items[idx]
            n = len(plants)
            form = ("verbatim", "light", "round_trip")[n % 3]
            mcq = f"{it['question']}\n{it['options']}"
            changed = 0.0
            if form == "light":
                mcq, changed = _light_edit(mcq, lang, rng)
            elif form == "round_trip":
                mcq = _round_trip(mcq, lang)
            if n % 2 == 0:
                row = _item(f"plant-{n}", lang, "exam", "scraped-exams", mcq, f"{it['answer']}")
            else:
                row = _item(f"plant-{n}", lang, "web", "web-crawl", "What does this page say?",
                            f"Practice question from a forum.\n{mcq}\nThe answer is {it['answer']}.")
            plants.append({"row": row, "uid": f"xmedbench-dev/{lang}-{idx}", "form": form, "changed": changed,
                           "question": it["question"]})
    return plants


@pytest.fixture(scope="module")
def planted(xmedbench_dev, ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("decontam")
    cfg = config_mod.resolve({"eval": {"benchmarks": [
        {"name": "apollo-sample", "path": str(SAMPLE_DATA / "mcq")},
        {"name": "xmedbench-dev", "path": str(xmedbench_dev)}]}}, [f"storage.root={root}"])
    storage = Storage.from_config(cfg)
    plants = _plants(xmedbench_dev)
    rows = _sample_rows()
    for k, p in enumerate(plants):  # spread over the shards, between clean items
        rows.insert(7 + k * (len(rows) // len(plants)), p["row"])
    qa = cfg.uri("qa", "planted")
    shards = [storage.write_parquet(f"{qa}/items/part-{s:05d}.parquet",
                                    pa.Table.from_pylist(rows[s * 100:(s + 1) * 100], schema=ITEM)).relative_to(qa)
              for s in range((len(rows) + 99) // 100)]
    storage.write_manifest(qa, Manifest(stage="rewrite", fingerprint="planted", shards=shards,
                                        counts={"in": len(rows), "kept": len(rows), "dropped": {}}))
    import ray

    puts = []
    real_put = ray.put

    def put(value, *a, **k):
        puts.append(isinstance(value, dict) and "exact_keys" in value)  # Ray Data puts its own things too
        return real_put(value, *a, **k)

    ray.put = put
    try:
        out = decontam.run(cfg, qa)
    finally:
        ray.put = real_put
    return {"cfg": cfg, "storage": storage, "qa": qa, "out": out, "rows": rows, "plants": plants, "puts": puts}


# The sample instruct set holds one light edit of a sample benchmark question: hi-ins-001 is the question of
# apollo-sample hi-8 with one of its 13 words ("अनुशंसित", recommended) dropped, 7.7 % changed, with the answer to it.
# By the definition the plants follow (at most 10 % of the words changed) it is contamination, and it is quarantined.
SAMPLE_CONTAMINATED = {record_id("hi-ins-001", "qa"): "apollo-sample/hi-8"}


def test_every_plant_is_quarantined_and_named(planted):
    """Bug caught: a missed plant of any form or language (answers not scanned, CJK read in words, a round trip's
    width or labels breaking the n-grams, light edits checked by exact n-grams only), or the wrong benchmark item named."""
    q = decontam.read_quarantine(planted["storage"], planted["out"]).to_pylist()
    by_id = {r["id"]: r for r in q}
    for p in planted["plants"]:
        r = by_id.get(p["row"]["id"])
        assert r is not None, (p["form"], p["uid"], f"{p['changed']:.0%} changed", p["row"]["messages"])
        assert p["changed"] <= 0.10
        assert r["benchmark"] == "xmedbench-dev" and r["benchmark_split"] == "test"
        assert r["benchmark_item"] == p["uid"], (r, p["question"])
        assert json.loads(r["item"])["messages"] == p["row"]["messages"]
        assert r["reason"] in ("ngram_overlap", "near_verbatim") and r["evidence"]
    forms = {p["form"]: sum(1 for x in planted["plants"] if x["form"] == p["form"]) for p in planted["plants"]}
    assert forms == {"verbatim": 10, "light": 10, "round_trip": 10}


def test_clean_items_are_kept_unchanged_and_in_order(planted):
    """Bug caught: a false positive on the sample corpus (a template phrase, a 13-character CJK phrase two questions
    share), or kept items altered, reordered or lost on the way to the mixture."""
    plant_ids = {p["row"]["id"] for p in planted["plants"]}
    q = decontam.read_quarantine(planted["storage"], planted["out"]).to_pylist()
    assert {r["id"]: r["benchmark_item"] for r in q if r["id"] not in plant_ids} == SAMPLE_CONTAMINATED
    expected = [r for r in planted["rows"] if r["id"] not in plant_ids and r["id"] not in SAMPLE_CONTAMINATED]
    st = planted["storage"]
    kept = pa.concat_tables(list(st.iter_tables(planted["out"]))).to_pylist()  # what train.dataset.build reads
    assert kept == expected


def test_manifest_counts_add_up_per_source_and_benchmark(planted):
    """Bug caught: counts lost between the tasks and the manifest, a source or benchmark miscounted, or the index
    shipped with every task instead of once through the object store."""
    m = planted["storage"].verify(planted["out"])
    n = len(planted["rows"])
    assert m.stage == "decontaminate" and m.counts["in"] == n
    assert m.counts["kept"] + sum(m.counts["dropped"].values()) == n
    assert m.counts["kept"] == n - len(planted["plants"]) - len(SAMPLE_CONTAMINATED)
    src = m.extra["by_source"]
    assert src["scraped-exams"]["quarantined"] == 15 and src["scraped-exams"]["kept"] == 0
    assert src["web-crawl"]["quarantined"] == 15 and src["sample-encyclopedia"]["quarantined"] == 0
    assert src["sample-exam"]["quarantined"] == len(SAMPLE_CONTAMINATED)
    b = m.extra["by_benchmark"]
    assert b["xmedbench-dev"]["training_items"] == 30 and b["xmedbench-dev"]["benchmark_items"] == 30
    assert b["apollo-sample"]["training_items"] == 1
    assert m.extra["index"]["bytes"] > 0 and m.extra["index"]["items"] == 156 + 1114
    assert m.inputs["qa"] == planted["storage"].read_manifest(planted["qa"]).hash
    assert sum(planted["puts"]) == 1  # the index, once


def test_rerun_skips_and_a_decontaminated_folder_is_not_decontaminated_again(planted):
    """Bug caught: the stage redoing its work (or writing a second folder) when its manifest exists, or the trainer,
    handed the pipeline's decontaminated folder, decontaminating it again into another folder."""
    st, out = planted["storage"], planted["out"]
    before = st.read_json(f"{out}/manifest.json")
    assert decontam.run(planted["cfg"], planted["qa"]) == out
    assert decontam.run(planted["cfg"], out) == out
    assert st.read_json(f"{out}/manifest.json") == before
    off = planted["cfg"].model_copy(deep=True)
    off.hygiene.decontam.enabled = False
    assert decontam.run(off, planted["qa"]) == planted["qa"]
