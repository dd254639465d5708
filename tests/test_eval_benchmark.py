"""XMedBench loading: the real dev split as it is, malformed items as rejects, options in every accepted form."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from apollo_ray.config import BenchmarkConfig
from apollo_ray.evaluation.benchmark import Item, ItemError, load_benchmark, load_shot_pool, parse_answer, parse_options
from apollo_ray.storage import Storage

DEV_TOTALS = {"ar": 54, "en": 416, "es": 137, "fr": 16, "hi": 54, "zh": 437}


@pytest.fixture
def storage(tmp_path) -> Storage:
    return Storage(str(tmp_path / "store"))


@pytest.fixture(scope="module")
def dev(xmedbench_dev):
    return load_benchmark(BenchmarkConfig(name="xmedbench-dev", path=str(xmedbench_dev)),
                          Storage("/nonexistent-root"))


def test_real_dev_split_loads_unchanged_with_exact_counts(dev, xmedbench_dev):
    items, rejects = dev
    assert rejects == []
    expected: Counter = Counter()
    raw_by_id: dict[str, dict] = {}
    for f in sorted(xmedbench_dev.glob("*.json")):
        raw = json.loads(f.read_text(encoding="utf-8"))
        expected.update((f.stem, r["source"]) for r in raw)
        raw_by_id.update({f"{f.stem}-{i}": r for i, r in enumerate(raw)})
    assert Counter((it.language, it.source) for it in items) == expected
    assert Counter(it.language for it in items) == DEV_TOTALS
    assert len(items) == sum(DEV_TOTALS.values()) == 1114
    for it in items:  # nothing rewritten: options render back to the source text, answers are the first letter
        raw = raw_by_id[it.id]
        assert it.options_text() == raw["options"], it.id
        assert it.question == raw["question"].strip() and it.context == (raw.get("context") or "").strip()
        assert f"({''.join(it.answers)})" == raw["answer"] and it.answer == raw["answer"][1]
        assert 2 <= len(it.options) <= 6
    assert len({it.id for it in items}) == len(items)
    assert all(Item.from_dict(json.loads(json.dumps(it.to_dict()))) == it for it in items)  # Ray Data rows


def test_real_dev_quirks_are_kept(dev):
    items, _ = dev
    by_id = {it.id: it for it in items}
    # four cmexam items have several correct letters; the reference scores them against the first
    multi = {it.id: it.answers for it in items if len(it.answers) > 1}
    assert len(multi) == 4 and all(by_id[i].source == "cmexam" for i in multi)
    # a stray '".' line after the last option of two en items stays part of option D
    tails = [it for it in items if it.options[-1][1].endswith('\n".')]
    assert len(tails) == 2 and all(it.language == "en" for it in tails)
    assert {len(it.options) for it in items if it.source == "pubmedqa"} == {3}
    assert all(it.context for it in items if it.source == "pubmedqa")


def test_malformed_items_are_rejected_with_file_index_reason(tmp_path, storage):
    good = {"question": "Q?", "options": "(A) a\n(B) b", "answer": "(B)", "source": "s"}
    bad = [
        good,
        {**good, "question": ""},
        {**good, "answer": "(C)"},
        {**good, "options": "(A) only one"},
        {**good, "options": "(A) a\n(C) c"},
        {k: v for k, v in good.items() if k != "answer"},
        "not an object",
        {**good, "language": "xx"},
    ]
    folder = tmp_path / "bench"
    folder.mkdir()
    (folder / "fr.json").write_text(json.dumps(bad), encoding="utf-8")
    (folder / "de.json").write_text("[{broken", encoding="utf-8")
    (folder / "it.jsonl").write_text(json.dumps(good) + "\n{oops\n", encoding="utf-8")
    items, rejects = load_benchmark(BenchmarkConfig(name="b", path=str(folder)), storage)
    assert [(it.id, it.language) for it in items] == [("fr-0", "fr"), ("it-0", "it")]
    got = {(Path(r.file).name, r.index): r.reason for r in rejects}
    assert set(got) == {("fr.json", i) for i in range(1, 8)} | {("de.json", None), ("it.jsonl", 1)}
    assert got[("fr.json", 1)] == "missing question"
    assert "answer letter C not among options AB" in got[("fr.json", 2)]
    assert "1 options" in got[("fr.json", 3)]
    assert "option letters 'AC'" in got[("fr.json", 4)]
    assert got[("fr.json", 5)] == "missing answer"
    assert "expected an object" in got[("fr.json", 6)]
    assert "unknown language" in got[("fr.json", 7)]
    assert got[("de.json", None)].startswith("bad JSON") and got[("it.jsonl", 1)].startswith("bad JSON")
    assert all(r.raw for r in rejects if r.index is not None)
    assert len(items) + len(rejects) == len(bad) + 1 + 2  # every record accounted for (de.json as one)


def test_language_from_config_item_field_or_missing(tmp_path, storage):
    rows = [{"question": "Q", "options": ["x", "y", "z"], "answer": "C", "source": "s"},
            {"question": "Q2", "options": {"A": "x", "B": "y"}, "answer": 0, "source": "s", "language": "ja"}]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    items, rejects = load_benchmark(BenchmarkConfig(name="b", path=str(path)), storage)
    assert [it.id for it in items] == ["mixed-1"] and items[0].language == "ja" and items[0].answer == "A"
    assert rejects[0].index == 0 and rejects[0].reason.startswith("no language")
    items, rejects = load_benchmark(BenchmarkConfig(name="b", path=str(path), language="ko"), storage)
    assert [(it.language, it.answer, it.options) for it in items] == [
        ("ko", "C", (("A", "x"), ("B", "y"), ("C", "z"))), ("ja", "A", (("A", "x"), ("B", "y")))]
    assert rejects == []


def test_options_forms_and_answers():
    assert parse_options("(A) a.\n(B) b\n continued\n(C) c") == (("A", "a."), ("B", "b\n continued"), ("C", "c"))
    assert parse_options("（A）全角\n（B）括号") == (("A", "全角"), ("B", "括号"))
    assert parse_options(["(A) x", "y"]) == (("A", "x"), ("B", "y"))
    assert parse_options({"(B)": "y", "(A)": "x"}) == (("A", "x"), ("B", "y"))
    for bad in ("(A) a\n(B) b\n(C) c\n(D) d\n(E) e\n(F) f\n(G) g", ["x"], "no label\n(A) a", {"A": "x", "B": "  "}):
        with pytest.raises(ItemError):
            parse_options(bad)
    assert parse_answer("(B)", ("A", "B")) == ("B",)
    assert parse_answer(" b. ", ("A", "B")) == ("B",)
    assert parse_answer("(ACE)", tuple("ABCDE")) == ("A", "C", "E")
    with pytest.raises(ItemError):
        parse_answer("(E)", tuple("ABCD"))


def test_remote_uri_and_limit_and_dev_pool(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    rows = [{"question": f"Q{i}", "options": "(A) a\n(B) b", "answer": "(A)", "source": "s"} for i in range(5)]
    fs.pipe_file("memory://bench/test/es.json", json.dumps(rows).encode())
    fs.pipe_file("memory://bench/dev/es.json", json.dumps(rows[:2]).encode())
    storage = Storage(str(tmp_path / "store"))
    cfg = BenchmarkConfig(name="b", path="memory://bench/test", dev_path="memory://bench/dev")
    items, rejects = load_benchmark(cfg, storage, limit=3)
    assert [it.id for it in items] == ["es-0", "es-1", "es-2"] and rejects == []
    pool, _ = load_shot_pool(cfg, storage, items)
    assert [it.question for it in pool] == ["Q0", "Q1"]


def test_hugging_face_dataset_from_a_local_path(tmp_path, storage):
    folder = tmp_path / "hfds"
    folder.mkdir()
    rows = [{"question": "Q", "options": ["x", "y"], "answer": 1, "source": "s", "language": "pt"},
            {"question": "Q", "options": ["x", "y"], "answer": 5, "source": "s", "language": "pt"}]
    (folder / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    items, rejects = load_benchmark(BenchmarkConfig(name="b", path=f"hf://{folder}:test"), storage)
    assert [(it.id, it.language, it.answer) for it in items] == [("test-0", "pt", "B")]
    assert rejects[0].index == 1 and "not among options" in rejects[0].reason
