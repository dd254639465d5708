"""PII scrubbing (``data/pii.py``) and its place in collect: every planted value of every type, in five languages, is
replaced by its placeholder and counted; text without PII comes out byte-identical. No Ray, except the collect test."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from apollo_ray.config import SAMPLE_DATA
from apollo_ray.data import pii

# (language, template with {slots}, the planted value of each slot and its type). Phone numbers are in national format
# for the language's country, ids pass their country's check digits, MRN and DOB follow a keyword of the language.
PLANTS: list[tuple[str, str, dict[str, tuple[str, str]]]] = [
    ("en", "Patient: Hi doctor, my chest hurts. You can call me on {phone} or write to {email}. My SSN is {id}, "
           "MRN: {mrn}, date of birth: {dob}. My blog is {url} and the clinic portal logged me from {ip}.\n"
           "Doctor: Thank you. Chest pain with sweating needs an ECG within 10 minutes.",
     {"phone": ("(415) 555-0132", "PHONE"), "email": ("jane.doe@example.org", "EMAIL"), "id": ("536-90-4399", "ID"),
      "mrn": ("00482913", "MRN"), "dob": ("03/12/1985", "DOB"), "url": ("https://twitter.com/janedoe85", "URL"),
      "ip": ("192.168.10.44", "IP")}),
    ("fr", "Patiente : Bonjour docteur, j'ai de la fièvre. Mon numéro est le {phone}, mon courriel {email}. "
           "Numéro de sécurité sociale {id}, n° de dossier : {mrn}, née le {dob}. Mon profil : {url} ; "
           "adresse IP {ip}.\nMédecin : Une fièvre de trois jours chez l'adulte justifie un examen clinique.",
     {"phone": ("06 12 34 56 78", "PHONE"), "email": ("claire.martin@exemple.fr", "EMAIL"),
      "id": ("2 84 05 73 123 456 29", "ID"), "mrn": ("2019-44731", "MRN"), "dob": ("12 mars 1985", "DOB"),
      "url": ("https://www.facebook.com/claire.martin.75", "URL"), "ip": ("10.12.0.7", "IP")}),
    ("zh", "患者：医生您好，我咳嗽两周了。我的手机号是{phone}，邮箱{email}，身份证号{id}，病历号：{mrn}，"
           "出生日期：{dob}。我的主页{url}，登录地址{ip}。\n医生：咳嗽超过两周需要拍胸片。",
     {"phone": ("13812345678", "PHONE"), "email": ("wang.li@example.cn", "EMAIL"), "id": ("11010519491231002X", "ID"),
      "mrn": ("A1234567", "MRN"), "dob": ("1985年3月12日", "DOB"), "url": ("https://weibo.com/u/5012345678", "URL"),
      "ip": ("172.16.5.20", "IP")}),
    ("es", "Paciente: Doctor, tengo dolor de cabeza. Mi teléfono es {phone} y mi correo {email}. Mi DNI es {id}, "
           "historia clínica {mrn}, fecha de nacimiento: {dob}. Me encuentra en {url} desde la IP {ip}.\n"
           "Médico: Un dolor de cabeza súbito e intenso requiere valoración urgente.",
     {"phone": ("612 345 678", "PHONE"), "email": ("lucia.garcia@ejemplo.es", "EMAIL"), "id": ("12345678Z", "ID"),
      "mrn": ("884321", "MRN"), "dob": ("12/03/1985", "DOB"), "url": ("https://www.instagram.com/lucia.garcia", "URL"),
      "ip": ("2001:db8:85a3::8a2e:370:7334", "IP")}),
    ("ar", "المريض: مرحبا دكتور، أعاني من ألم في البطن. رقم هاتفي {phone} وبريدي {email}. رقم الهوية {id} "
           "ورقم الملف الطبي {mrn} وتاريخ الميلاد {dob}. صفحتي {url} وعنوان IP {ip}.\n"
           "الطبيب: ألم البطن الشديد المفاجئ يحتاج إلى فحص عاجل.",
     {"phone": ("+966 50 123 4567", "PHONE"), "email": ("ahmed.ali@example.sa", "EMAIL"), "id": ("1102233440", "ID"),
      "mrn": ("556677", "MRN"), "dob": ("12/03/1985", "DOB"), "url": ("https://example.sa/users/ahmed.ali", "URL"),
      "ip": ("192.0.2.15", "IP")}),
]
# Medical text with the numbers that look like PII to a careless pattern: doses, ranges, years, ratios, codes, a link.
CLEAN = [
    ("en", "Give 0.5 mg adrenaline IM, repeat after 5 minutes. BP 120/80 mmHg, HR 110/min, glucose 7.9 mmol/L. "
           "Between 1990-2000 incidence fell by 30%. ICD-10 J45.909. See https://www.who.int/news-room/fact-sheets."),
    ("fr", "La dose est de 1 000 mg toutes les 8 heures, soit 3 g/jour. Recommandations HAS 2019, p. 12-14."),
    ("zh", "成人每日剂量为500毫克，分2次服用，疗程7至14天。2020年版指南建议血压控制在130/80毫米汞柱以下。"),
    ("es", "La prevalencia fue del 12,5 % (IC 95 %: 10,1-14,9) en 2018; 1 de cada 8 adultos."),
    ("ar", "الجرعة 250 ملغ كل 12 ساعة لمدة 7 أيام، ونسبة الشفاء 92.5% في دراسة عام 2015."),
]


def _dialogue(template: str, plants: dict[str, tuple[str, str]]) -> str:
    return template.format(**{k: v for k, (v, _) in plants.items()})


@pytest.mark.parametrize("language,template,plants", PLANTS, ids=[p[0] for p in PLANTS])
def test_every_planted_value_is_replaced_by_its_placeholder(language, template, plants):
    """Bug caught: a detector missing a format of one language (an id in Chinese text touching 号, a French phone in
    pairs, an IPv6 address, a month name), or a placeholder of the wrong type, or a count that is not one per value."""
    text = _dialogue(template, plants)
    out, counts = pii.Scrubber().scrub(text, language)
    for value, kind in plants.values():
        assert value not in out, (kind, value, out)
    assert counts == Counter(kind for _, kind in plants.values()), out
    # each placeholder stands exactly where its value stood: the text around the values is untouched
    expected = template.format(**{k: pii.PLACEHOLDER[kind] for k, (_, kind) in plants.items()})
    assert out == expected


def test_text_without_pii_is_the_same_string():
    """Bug caught: normalising, re-joining or "cleaning" a text on the way, or a dose, a year range, a blood pressure, a
    confidence interval or a link to a guideline taken for a phone number, an id or a URL."""
    s = pii.Scrubber()
    texts = list(CLEAN)
    for f in sorted((SAMPLE_DATA / "corpus").glob("*.jsonl")) + sorted((SAMPLE_DATA / "instruct").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            texts += [(f.stem, r[k]) for k in ("text", "question", "answer") if k in r]
    assert len(texts) > 300
    for language, text in texts:
        for lang in (language, None):  # the document's language, and none known (every rule and region)
            out, counts = s.scrub(text, lang)
            assert out is text and not counts, (language, counts, [text[f.start:f.end] for f in s.find(text, lang)])


def test_a_record_is_scrubbed_in_every_string_field_and_left_alone_without_pii():
    """Bug caught: rewrite passes exam-like records through from ``fields``, so scrubbing only the text would train on
    the record's own copy of the e-mail; and a record without PII re-serialised differently would change its dedup
    key."""
    s = pii.Scrubber()
    rec = json.dumps({"answer": "Write to me at jane.doe@example.org", "question": "Q?", "meta": ["ip 10.0.0.1", 3]},
                     ensure_ascii=False, sort_keys=True)
    out, counts = s.scrub_json(rec, "en")
    assert counts == Counter({"EMAIL": 1, "IP": 1})
    assert json.loads(out) == {"answer": "Write to me at <EMAIL>", "question": "Q?", "meta": ["ip <IP>", 3]}
    clean = json.dumps({"b": "no personal data", "a": [1, "x"]})  # not collect's key order: must come back as is
    assert s.scrub_json(clean, "en") == (clean, Counter())


def test_overlaps_keep_one_placeholder_and_only_personal_urls_go():
    """Bug caught: an e-mail inside a URL replaced twice (a mangled '<URL>' with an '<EMAIL>' in it), or every link
    replaced, which would strip references to guidelines from web text."""
    s = pii.Scrubber()
    out, counts = s.scrub("see https://portal.example.com/profile/jdoe?email=jane@example.org and "
                          "https://www.nice.org.uk/guidance/ng136.", "en")
    assert out == "see <URL> and https://www.nice.org.uk/guidance/ng136."
    assert counts == Counter({"URL": 1})


def test_types_not_configured_stay():
    """Bug caught: hygiene.pii.types ignored."""
    out, counts = pii.Scrubber(types=("EMAIL",)).scrub("mail a@b.org, ip 10.0.0.1", "en")
    assert (out, counts) == ("mail <EMAIL>, ip 10.0.0.1", Counter({"EMAIL": 1}))


def test_names_need_a_ner_model_and_the_log_says_so(caplog, monkeypatch):
    """Bug caught: names silently left in place (no log line), or a NER model's persons not merged with the pattern
    findings (a name overlapping an e-mail must not produce two placeholders)."""
    with caplog.at_level(logging.INFO, logger="apollo_ray.data.pii"):
        assert pii.Scrubber(ner_model=None).ner is None
    assert "person names are not scrubbed" in caplog.text
    with caplog.at_level(logging.WARNING, logger="apollo_ray.data.pii"):
        assert pii.load_ner("no_such_spacy_pipeline_xx") is None
    assert "person names are not scrubbed" in caplog.text

    text = "John Smith wrote from john.smith@example.org"
    monkeypatch.setattr(pii, "load_ner", lambda model: (lambda t: [(0, 10), (22, 32)]))  # 'John Smith', 'smith@exam'
    out, counts = pii.Scrubber(ner_model="fake").scrub(text, "en")
    assert out == "<NAME> wrote from <EMAIL>" and counts == Counter({"NAME": 1, "EMAIL": 1})


@pytest.mark.usefixtures("ray_local")
def test_collect_scrubs_dialogue_and_web_counts_per_type_and_leaves_other_kinds(make_cfg, tmp_path):
    """Bug caught: the scrubber not called in the cleaning step, counts lost between the workers and the manifest,
    other kinds (exam) scrubbed though not configured, or a dialogue without PII changed."""
    from apollo_ray.data import collect
    from apollo_ray.storage import Storage

    src = tmp_path / "src"
    src.mkdir()
    rows = [{"id": f"d{i}", "kind": "dialogue", "language": lang, "question": _dialogue(t, p).split("\n")[0],
             "answer": _dialogue(t, p).split("\n")[1]} for i, (lang, t, p) in enumerate(PLANTS)]
    clean_q = "Patient: I have had a dry cough for three weeks and I am 45 years old."
    clean_a = "Doctor: A cough lasting more than three weeks needs a chest X-ray and a sputum test."
    rows.append({"id": "clean", "kind": "dialogue", "language": "en", "question": clean_q, "answer": clean_a})
    exam = "Contact the lab at lab@example.org for the result of this exam question about anaemia?"
    rows.append({"id": "exam", "kind": "exam", "language": "en", "question": exam, "answer": "Iron deficiency."})
    (src / "dialogues.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    cfg = make_cfg(f"data.sources=[{{name: d, path: '{src}', kind: dialogue, format: jsonl}}]")
    out = collect.run(cfg)
    storage = Storage.from_config(cfg)
    m = storage.read_manifest(out)
    assert m.counts["in"] == m.counts["kept"] == len(rows)
    expected = Counter(kind for _, _, p in PLANTS for _, kind in p.values())
    assert m.extra["pii"] == dict(sorted(expected.items()))
    paragraphs = {r["doc_id"]: r for r in collect.read_paragraphs(storage, out).to_pylist()}
    for i, (_, _, plants) in enumerate(PLANTS):
        doc = paragraphs[f"d{i}"]
        for value, _ in plants.values():
            assert value not in doc["text"] and value not in doc["fields"], value
    assert paragraphs["clean"]["text"] == f"{clean_q}\n{clean_a}"
    assert paragraphs["exam"]["text"].startswith(exam)  # exam is not a configured kind: left as it is
    assert m.config["pii"]["kinds"] == ["dialogue", "web"]
