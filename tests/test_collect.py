"""collect on a local Ray: corrupt lines quarantined, filters and dedup counted by reason, paragraphs within budget on
sentence boundaries with exact offsets, reruns skipped; the same on a real S3 server; XMedBench dev and the shipped
sample corpus as sources."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from apollo_ray import config as config_mod
from apollo_ray.config import SAMPLE_DATA
from apollo_ray.data import collect
from apollo_ray.storage import Storage, join

# The workers read and write S3 in some tests: the server (and its env) must be up before the module's Ray starts,
# which a session-scoped fixture requested by every test is (see ``ray_local`` in conftest.py).
pytestmark = pytest.mark.usefixtures("s3")
MAX_TOKENS = 40
END_MARKS = ".!?。！？।॥؟۔"

EN_A = ("Hypertension is a chronic condition in which the blood pressure in the arteries is persistently raised. "
        "It often causes no symptoms, so regular measurement matters. Lifestyle changes such as less salt, more "
        "exercise and weight loss lower the pressure. When they are not enough, doctors prescribe thiazide "
        "diuretics, ACE inhibitors or calcium channel blockers. Untreated, it damages the heart, brain and kidneys.")
EN_NEAR = EN_A.replace("regular measurement matters", "regular measurement is important")
EN_B = ("Influenza is a contagious respiratory illness caused by influenza viruses. Typical signs are fever, cough, "
        "sore throat and muscle aches! Annual vaccination is the best way to prevent it. Antiviral drugs such as "
        "oseltamivir shorten the illness when started early? Rest and fluids help most patients recover.\n\n"
        "Older adults, young children and pregnant women are at higher risk of complications like pneumonia.")
ZH = ("糖尿病是一种以血糖升高为特征的慢性代谢性疾病。典型症状包括多饮、多尿、多食和体重下降。长期高血糖会损害眼睛、肾脏、神经和血管。"
      "治疗包括饮食控制、规律运动和药物治疗！二甲双胍通常是二型糖尿病的一线药物。患者应定期监测血糖吗？是的，应当定期监测。")
HI = ("मधुमेह एक दीर्घकालिक रोग है जिसमें रक्त में शर्करा का स्तर बढ़ जाता है। इसके सामान्य लक्षण अधिक प्यास लगना, "
      "बार-बार पेशाब आना और थकान हैं। नियमित व्यायाम और संतुलित आहार से इसे नियंत्रित किया जा सकता है॥ "
      "कई रोगियों को दवाओं की भी आवश्यकता होती है। "
      "समय पर उपचार से आंखों, गुर्दों और नसों की जटिलताओं को रोका जा सकता है।")
GUIDE = ("Home > Guidelines > Asthma\n"
         "We use cookies to improve your experience. Accept all cookies\n"
         "Asthma   management starts with an   inhaled corticosteroid for persistent symptoms.\n"
         "Short-acting beta agonists relieve acute bronchospasm.\n\n\n"
         "Review the treatment every three months and step down when control is good.\n"
         "Copyright 2024 Example Health. All rights reserved.\n")
FR = ("La pneumonie est une infection des poumons causée le plus souvent par des bactéries ou des virus. Les "
      "symptômes habituels sont la fièvre, la toux et la difficulté à respirer. Le traitement dépend de la cause.")
EN_AS_FR = ("Appendicitis is an inflammation of the appendix that causes pain in the lower right abdomen. Surgery to "
            "remove the appendix is the usual treatment, and antibiotics are given before the operation.")
BOOK = ("The liver is the largest internal organ and performs hundreds of functions, from producing bile to storing "
        "glycogen. Chronic alcohol use, viral hepatitis and fatty liver disease are the commonest causes of damage.")
BOOK2 = ("Anaemia means a lack of healthy red blood cells or haemoglobin. Iron deficiency is the most frequent "
         "cause worldwide, and it is treated with oral iron and by finding the source of any blood loss.")
WEB_HF = ("Dehydration occurs when the body loses more fluid than it takes in. Children with diarrhoea are at "
          "particular risk, and oral rehydration solution is the first treatment for mild to moderate cases.")
WEB_HF2 = ("Migraine is a headache disorder with recurrent attacks of throbbing pain, often with nausea and "
           "sensitivity to light. Triptans and simple analgesics treat attacks; some patients need prevention.")
SYMBOLS = "#### $$$ %%% @@@ !!! ^^^ &&& *** ((( ))) ||| ~~~ <<< >>> {{{ }}} [[[ ]]] ### $$$ %%% @@@ ok"
REPETITIVE = "Buy cheap pills online now. " * 20

# Expected outcome, by reason, of the synthetic inputs written below.
EXPECTED_DROPPED = {"bad_json": 1, "invalid_utf8": 1, "missing_text": 1, "wrong_type": 1, "exact_duplicate": 1,
                    "near_duplicate": 1, "too_short": 1, "symbol_ratio": 1, "repetition": 1}
EXPECTED_KEPT = 13  # EN_A, EN_B, ZH, HI, GUIDE, FR, EN_AS_FR, 2 exam items, BOOK, BOOK2, WEB_HF, WEB_HF2
ORIGINAL = {"a": EN_A, "b": EN_B, "zh": ZH, "hi": HI, "guide.txt": GUIDE, "fr1": FR, "fr2": EN_AS_FR, "book1": BOOK,
            "book2": BOOK2, "hf1": WEB_HF, "hf2": WEB_HF2}


def write_inputs(folder: Path) -> dict[str, Path]:
    """Multi-source synthetic input: one of each corrupt line and each filter reason, in several formats."""
    folder.mkdir(parents=True, exist_ok=True)
    web = folder / "web.jsonl"
    lines = [
        json.dumps({"id": "a", "text": EN_A}).encode(),                         # 1 kept
        b'{"id": "bad", "text": "unterminated',                                # 2 bad_json
        b'{"id": "utf", "text": "caf\xe9 \xff\xfe"}',                          # 3 invalid_utf8
        json.dumps({"id": "nt", "title": "no text here"}).encode(),             # 4 missing_text
        json.dumps({"id": "num", "text": 42}).encode(),                         # 5 wrong_type
        json.dumps({"id": "dup", "text": "  " + EN_A.replace(". ", ".   ")}).encode(),  # 6 exact (after normalise)
        json.dumps({"id": "near", "text": EN_NEAR}).encode(),                   # 7 near_duplicate
        b"",                                                                   # blank: layout, not a record
        json.dumps({"id": "short", "text": "Too short."}).encode(),             # 9 too_short
        json.dumps({"id": "sym", "text": SYMBOLS}).encode(),                    # 10 symbol_ratio
        json.dumps({"id": "rep", "text": REPETITIVE}).encode(),                 # 11 repetition
        json.dumps({"id": "b", "text": EN_B}).encode(),                         # 12 kept
    ]
    web.write_bytes(b"\n".join(lines) + b"\n")
    enc = folder / "encyclopedia.json"
    enc.write_text(json.dumps([{"id": "zh", "text": ZH, "language": "zh"}, {"id": "hi", "text": HI}],
                              ensure_ascii=False), encoding="utf-8")
    guide = folder / "guide.txt"
    guide.write_text(GUIDE, encoding="utf-8")
    paper = folder / "paper.parquet"
    pq.write_table(pa.table({"id": ["fr1", "fr2"], "text": [FR, EN_AS_FR]}), paper)
    exam = folder / "exam.jsonl"
    exam.write_text("\n".join(json.dumps(r) for r in [
        {"id": "q1", "question": "Drug of choice for anaphylaxis?", "answer": "Adrenaline IM."},
        {"id": "q2", "question": "Normal adult resting heart rate?", "answer": 60, "options": "(A) 60 (B) 200"},
    ]) + "\n", encoding="utf-8")
    hf_json = folder / "hf_web.json"
    hf_json.write_text("\n".join(json.dumps({"id": f"hf{i}", "text": t}) for i, t in enumerate([WEB_HF, WEB_HF2], 1)))
    import datasets

    hf_disk = folder / "hf_books"
    datasets.Dataset.from_dict({"id": ["book1", "book2"], "text": [BOOK, BOOK2]}).save_to_disk(str(hf_disk))
    return {"web": web, "enc": enc, "guide": guide, "paper": paper, "exam": exam, "hf_json": hf_json,
            "hf_disk": hf_disk}


def sources(files: dict[str, str]) -> list[dict]:
    return [
        {"name": "web", "path": files["web"], "kind": "web", "language": "en"},
        {"name": "enc", "path": files["enc"], "kind": "encyclopedia", "language": "auto"},
        {"name": "guide", "path": files["guide"], "kind": "guideline", "language": "en"},
        {"name": "paper", "path": files["paper"], "kind": "paper", "language": "fr"},
        {"name": "exam", "path": files["exam"], "kind": "exam", "language": "en"},
        {"name": "hf-web", "path": "json", "format": "hf", "hf_data_files": [files["hf_json"]], "kind": "web",
         "language": "auto"},
        {"name": "hf-books", "path": files["hf_disk"], "format": "hf", "kind": "book", "language": "en"},
    ]


def make_config(root: str, srcs: list[dict], *overrides: str, tracking: str | None = None) -> config_mod.Config:
    raw = {"storage": {"root": root}, "data": {"sources": srcs, "paragraph_tokens": MAX_TOKENS},
           "tracking": {"enabled": tracking is not None, "uri": tracking}}
    return config_mod.resolve(raw, list(overrides))


@pytest.fixture(scope="module")
def local_run(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("collect")
    files = {k: str(v) for k, v in write_inputs(tmp / "in").items()}
    cfg = make_config(str(tmp / "store"), sources(files), tracking=f"sqlite:///{tmp / 'mlflow.db'}")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # MLflow's sqlite store puts artifacts under ./mlruns
        out = collect.run(cfg)
    return cfg, files, out


def check_counts(storage: Storage, out: str, files: dict[str, str]) -> tuple[pa.Table, pa.Table]:
    m = storage.read_manifest(out)
    c = m.counts
    assert c["dropped"] == EXPECTED_DROPPED
    assert c["kept"] == EXPECTED_KEPT
    assert c["in"] == c["kept"] + sum(c["dropped"].values()) == 22
    assert m.extra["language_mismatch"] == 1

    rejects = collect.read_quarantine(storage, out)
    assert Counter(rejects["reason"].to_pylist()) == Counter(EXPECTED_DROPPED)
    where = dict(zip(rejects["reason"].to_pylist(), rejects["where"].to_pylist()))
    web = files["web"]
    for reason, line in {"bad_json": 2, "invalid_utf8": 3, "missing_text": 4, "wrong_type": 5,
                         "exact_duplicate": 6, "near_duplicate": 7, "too_short": 9, "symbol_ratio": 10,
                         "repetition": 11}.items():
        assert where[reason] == f"{web}:{line}", reason
    raw = dict(zip(rejects["reason"].to_pylist(), rejects["raw"].to_pylist()))
    assert "\\xff" in raw["invalid_utf8"] and raw["bad_json"].startswith('{"id": "bad"')

    paras = collect.read_paragraphs(storage, out)
    assert paras.schema.equals(collect.PARAGRAPH)
    assert paras.num_rows == m.rows == m.extra["paragraphs"]
    assert sum(paras["n_tokens"].to_pylist()) == m.extra["tokens"]
    assert len(set(paras["id"].to_pylist())) == paras.num_rows
    return paras, rejects


def test_counts_quarantine_and_stats(local_run):
    cfg, files, out = local_run
    storage = Storage.from_config(cfg)
    assert out.startswith(cfg.uri("corpus") + "/")
    paras, _ = check_counts(storage, out, files)
    docs = {r["doc_id"]: r for r in paras.to_pylist()}
    assert set(docs) == {*ORIGINAL, "q1", "q2"}
    # languages: declared, from the record, detected; the English text declared fr keeps fr and is flagged
    assert docs["zh"]["language"] == "zh" and docs["hi"]["language"] == "hi" and docs["hf1"]["language"] == "en"
    assert docs["hi"]["declared_language"] == "auto"
    assert docs["fr2"]["language"] == "fr" and docs["fr2"]["language_mismatch"]
    assert not docs["fr1"]["language_mismatch"]
    assert {r["kind"] for r in docs.values()} == {"web", "encyclopedia", "guideline", "paper", "exam", "book"}
    # boilerplate and whitespace gone, paragraph break kept
    guide = collect.normalise(GUIDE)
    assert guide == ("Asthma management starts with an inhaled corticosteroid for persistent symptoms.\n"
                     "Short-acting beta agonists relieve acute bronchospasm.\n\n"
                     "Review the treatment every three months and step down when control is good.")
    # instruction items: one row each, the whole record kept
    q2 = paras.filter(pa.compute.equal(paras["doc_id"], "q2")).to_pylist()
    assert len(q2) == 1 and q2[0]["text"] == "Normal adult resting heart rate?\n60"
    assert json.loads(q2[0]["fields"])["options"] == "(A) 60 (B) 200"

    m = storage.read_manifest(out)
    stats = {(r["language"], r["kind"]): r for r in m.extra["stats"]}
    assert stats[("en", "exam")]["documents"] == 2 and stats[("zh", "encyclopedia")]["documents"] == 1
    assert sum(r["paragraphs"] for r in stats.values()) == paras.num_rows
    assert sum(r["documents"] for r in stats.values()) == EXPECTED_KEPT
    assert storage.read_json(join(out, "stats.json"))["counts"] == m.counts
    png = storage.read_bytes(join(out, m.files["plot"]))
    assert png.startswith(b"\x89PNG")


def test_paragraphs_within_budget_on_sentence_boundaries_with_offsets(local_run):
    cfg, _, out = local_run
    paras = collect.read_paragraphs(Storage.from_config(cfg), out).to_pylist()
    by_doc: dict[str, list[dict]] = {}
    for p in paras:
        if p["kind"] != "exam":
            by_doc.setdefault(p["doc_id"], []).append(p)
    for doc_id, ps in by_doc.items():
        doc = collect.normalise(ORIGINAL[doc_id])
        ps.sort(key=lambda p: p["offset"])
        for i, p in enumerate(ps):
            assert p["n_tokens"] <= MAX_TOKENS and p["n_tokens"] == collect.count_tokens(p["text"])
            assert doc[p["offset"]:p["offset"] + len(p["text"])] == p["text"]
            end = p["offset"] + len(p["text"])
            if i < len(ps) - 1:  # every cut is after a sentence end mark or at a newline
                assert p["text"][-1] in END_MARKS or doc[end] == "\n", (doc_id, p["text"])
        assert "".join(doc.split()) == "".join("".join(p["text"] for p in ps).split())  # nothing lost
    assert len(by_doc["zh"]) > 1 and len(by_doc["hi"]) > 1 and len(by_doc["b"]) > 1
    assert all(p["text"][-1] in "。！？" for p in by_doc["zh"])
    assert all(p["text"][-1] in "।॥" for p in by_doc["hi"])


def test_rerun_skips(local_run, caplog):
    cfg, _, out = local_run
    storage = Storage.from_config(cfg)
    manifest = Path(out) / "manifest.json"
    before = (manifest.stat().st_mtime_ns, sorted(p.name for p in Path(out).rglob("*")))
    with caplog.at_level("INFO", logger="apollo_ray.data.collect"):
        assert collect.run(cfg) == out
    assert f"collect: up to date ({out}), skipping" in caplog.text
    assert (manifest.stat().st_mtime_ns, sorted(p.name for p in Path(out).rglob("*"))) == before
    assert storage.verify(out).stage == "collect"


def test_tracking_logs_counts_and_artifacts(local_run):
    import mlflow

    cfg, _, out = local_run
    client = mlflow.MlflowClient(cfg.tracking_uri())
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    (run,) = client.search_runs([exp.experiment_id], f"tags.`apollo.output_uri` = '{out}'")
    assert run.data.metrics["kept"] == EXPECTED_KEPT and run.data.metrics["dropped.near_duplicate"] == 1
    assert {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "collect")} == {
        "stats.json", "stats.csv", "tokens_by_language.png"}


def test_config_change_makes_a_new_folder(local_run, tmp_path):
    cfg, files, out = local_run
    # A sampling knob is not part of the corpus; a filter threshold is.
    same = make_config(cfg.storage.root, sources(files), "data.priorities.web=3")
    other = make_config(cfg.storage.root, sources(files), "data.min_chars=41")
    identity = collect.plan_inputs(Storage.from_config(cfg), list(cfg.data.sources)).identity
    assert collect.output_uri(same, identity)[0] == out
    assert collect.output_uri(other, identity)[0] != out


@pytest.mark.s3
def test_same_run_on_s3(ray_local, s3, tmp_path):
    prefix = f"s3://{s3.bucket}/collect-{uuid.uuid4().hex[:8]}"
    storage = Storage(prefix, s3.endpoint)
    local = write_inputs(tmp_path / "in")
    files = {k: str(v) for k, v in local.items()}
    for key in ("web", "enc", "guide", "paper", "exam"):  # HF sources stay local: datasets reads them itself
        files[key] = join(prefix, "in", local[key].name)
        storage.write_bytes(files[key], local[key].read_bytes())
    cfg = make_config(join(prefix, "store"), sources(files), f"storage.endpoint_url={s3.endpoint}",
                      "storage.shard_rows=4")
    out = collect.run(cfg)
    assert out.startswith(f"{prefix}/store/corpus/")
    check_counts(storage, out, files)
    m = storage.verify(out)
    assert len(m.shards) > 1 and all(s.rows <= 4 for s in m.shards)
    assert all(q["rows"] <= 4 for q in m.extra["quarantine"])
    assert storage.exists(join(out, "tokens_by_language.png"))
    assert collect.run(cfg) == out


def test_xmedbench_dev_loads_as_exam_source(ray_local, xmedbench_dev, tmp_path):
    src = {"name": "xmedbench-dev", "path": str(xmedbench_dev), "format": "json", "kind": "exam",
           "text_field": "question", "language": "auto"}
    cfg = make_config(str(tmp_path / "store"), [src])
    out = collect.run(cfg)
    storage = Storage.from_config(cfg)
    m = storage.read_manifest(out)
    n_files = {p.stem: len(json.loads(p.read_text(encoding="utf-8"))) for p in xmedbench_dev.glob("*.json")}
    assert m.counts == {"in": 1114, "kept": 1114, "dropped": {}} and sum(n_files.values()) == 1114
    paras = collect.read_paragraphs(storage, out)
    assert Counter(paras["language"].to_pylist()) == Counter(n_files)
    first = json.loads(paras["fields"][0].as_py())
    assert {"question", "options", "answer"} <= set(first)


def test_sample_corpus_has_every_language(ray_local, tmp_path):
    cfg = make_config(str(tmp_path / "store"), [s.model_dump() for s in config_mod.DataConfig().sources])
    out = collect.run(cfg)
    storage = Storage.from_config(cfg)
    m = storage.read_manifest(out)
    assert not set(m.counts["dropped"]) & set(collect.CORRUPT_REASONS)
    expected = {p.stem for p in (SAMPLE_DATA / "corpus").glob("*.jsonl")} | \
        {p.stem for p in (SAMPLE_DATA / "instruct").glob("*.jsonl")}
    assert {r["language"] for r in m.extra["stats"]} == expected
