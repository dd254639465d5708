"""The ``apollo`` evaluation protocol against the reference recipe (docs/methods.md §9).

- Prompts: an independent renderer written from the reference's test preparation (its strings verbatim, its draw,
  its character budget) must give the same bytes as ``evaluation.apollo`` for every real XMedBench dev item, and
  keep and drop the same items.
- Extraction: a table of tricky outputs with the letter the reference's rules read (checked against its code when the
  table was written) and the letter our native extraction reads.
- Averages: the papers' source lists; the protocol as the presets configure it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from apollo_ray import config as config_mod
from apollo_ray.config import BenchmarkConfig
from apollo_ray.evaluation import apollo
from apollo_ray.evaluation.aggregate import aggregate, markdown_table
from apollo_ray.evaluation.benchmark import Item, load_benchmark
from apollo_ray.evaluation.prompts import PromptTooLong, ShotPool
from apollo_ray.evaluation.scoring import extract_answer
from apollo_ray.storage import Storage

SEED = 1234

# The reference's prompt strings (Apollo-MoE, src/prepare/data_process_test_qwen2.py), verbatim: (shot, query).
REFERENCE_PROMPTS = {
    'en_choice': (
        'User:You are a medical doctor answering real-world medical exam questions. Select one correct answer from A to D.\n'
        'Question: {question}\n'
        'Options:\n'
        '{options}\n'
        'Assistant:The correct answer is {answer}.<|endoftext|>\n',
        'User:You are a medical doctor answering real-world medical exam questions. Select one correct answer from A to D.\n'
        'Question: {question}\n'
        'Options:\n'
        '{options}\n'
        'Assistant:'),
    'en_pubmed': (
        'User:You are a medical doctor answering real-world medical exam questions. \n'
        'Context: {context} \n'
        'Question: {question}\n'
        'Options:\n'
        '{options}\n'
        'Assistant:The correct answer is {answer}.<|endoftext|>\n',
        'User:You are a medical doctor answering real-world medical exam questions.\n'
        'Context: {context} \n'
        'Question: {question}\n'
        'Options:\n'
        '{options}\n'
        'Assistant:'),
    'zh_choice': (
        'User:您是一名医生，正在回答现实世界的医学考试问题。请从A到E中选择一个正确答案。\n'
        '问题: {question}\n'
        '选项:\n'
        '{options}\n'
        'Assistant:正确答案是{answer}.<|endoftext|>\n',
        'User:您是一名医生，正在回答现实世界的医学考试问题。请从A到E中选择一个正确答案。\n'
        '问题: {question}\n'
        '选项:\n'
        '{options}\n'
        'Assistant:'),
    'es_choice': (
        'User:Usted es un médico que responde preguntas de exámenes médicos del mundo real. Elija una respuesta correcta de la A a la D.\n'
        'pregunta: {question}\n'
        'Opciones:\n'
        '{options}\n'
        'Assistant:La respuesta correcta es {answer}.<|endoftext|>\n',
        'User:Usted es un médico que responde preguntas de exámenes médicos del mundo real. Elija una respuesta correcta de la A a la D.\n'
        'pregunta: {question}\n'
        'Opciones:\n'
        '{options}\n'
        'Assistant:'),
    'fr_choice': (
        "User:Vous êtes un médecin et répondez à des questions d'examen médical du monde réel. Veuillez choisir une bonne réponse de A à E.\n"
        'question: {question}\n'
        'Possibilités:\n'
        '{options}\n'
        'Assistant:La bonne réponse est {answer}.<|endoftext|>\n',
        "User:Vous êtes un médecin et répondez à des questions d'examen médical du monde réel. Veuillez choisir une bonne réponse de A à E.\n"
        'question: {question}\n'
        'Possibilités:\n'
        '{options}\n'
        'Assistant:'),
    'hi_choice': (
        'User:आप एक डॉक्टर हैं जो वास्तविक दुनिया की मेडिकल परीक्षा के सवालों का जवाब दे रहे हैं। कृपया A से D तक सही उत्तर चुनें।\n'
        'सवाल: {question}\n'
        'विकल्प:\n'
        '{options}\n'
        'Assistant:सही उत्तर है{answer}.<|endoftext|>\n',
        'User:आप एक डॉक्टर हैं जो वास्तविक दुनिया की मेडिकल परीक्षा के सवालों का जवाब दे रहे हैं। कृपया A से D तक सही उत्तर चुनें।\n'
        'सवाल: {question}\n'
        'विकल्प:\n'
        '{options}\n'
        'Assistant:'),
    'ar_choice': (
        'User:أنت طبيب يجيب على أسئلة الفحص الطبي في العالم الحقيقي. الرجاء اختيار الإجابة الصحيحة من أ إلى د.\n'
        'سؤال: {question}\n'
        'خيارات:\n'
        '{options}\n'
        'Assistant:{answer}الإجابة الصحيحة هي.<|endoftext|>\n',
        'User:أنت طبيب يجيب على أسئلة الفحص الطبي في العالم الحقيقي. الرجاء اختيار الإجابة الصحيحة من أ إلى د.\n'
        'سؤال: {question}\n'
        'خيارات:\n'
        '{options}\n'
        'Assistant:'),
    'ru_choice': (
        'User:Вы врач, отвечающий на реальные вопросы медицинского осмотра. Пожалуйста, выберите правильный ответ от А и B.\n'
        'вопрос: {question}\n'
        'Параметры:\n'
        '{options}\n'
        'Assistant:Правильный ответ{answer}.<|endoftext|>\n',
        'User:Вы врач, отвечающий на реальные вопросы медицинского осмотра. Пожалуйста, выберите правильный ответ от А и B.\n'
        'вопрос: {question}\n'
        'Параметры:\n'
        '{options}\n'
        'Assistant:'),
    'de_choice': (
        'User:Sie sind ein Arzt, der Fragen zu medizinischen Untersuchungen aus der Praxis beantwortet. Bitte wählen Sie eine richtige Antwort von A bis D.\n'
        'Frage: {question}\n'
        'Optionen:\n'
        '{options}\n'
        'Assistant:Die richtige Antwort ist{answer}.<|endoftext|>\n',
        'User:Sie sind ein Arzt, der Fragen zu medizinischen Untersuchungen aus der Praxis beantwortet. Bitte wählen Sie eine richtige Antwort von A bis D.\n'
        'Frage: {question}\n'
        'Optionen:\n'
        '{options}\n'
        'Assistant:'),
    'pt_choice': (
        'User:Você é um médico que responde a perguntas de exames médicos do mundo real. Escolha uma resposta correta de A a D.\n'
        'pergunta: {question}\n'
        'Opções:\n'
        '{options}\n'
        'Assistant:A resposta correta é{answer}.<|endoftext|>\n',
        'User:Você é um médico que responde a perguntas de exames médicos do mundo real. Escolha uma resposta correta de A a D.\n'
        'pergunta: {question}\n'
        'Opções:\n'
        '{options}\n'
        'Assistant:'),
    'it_choice': (
        'User:Sei un medico che risponde a domande sugli esami medici del mondo reale. Scegli una risposta corretta dalla A alla E.\n'
        'domanda: {question}\n'
        'Opzioni:\n'
        '{options}\n'
        'Assistant:La risposta corretta è{answer}.<|endoftext|>\n',
        'User:Sei un medico che risponde a domande sugli esami medici del mondo reale. Scegli una risposta corretta dalla A alla E.\n'
        'domanda: {question}\n'
        'Opzioni:\n'
        '{options}\n'
        'Assistant:'),
    'ko_choice': (
        'User:당신은 실제 건강 검진 문제에 답하는 의사입니다. A부터 E까지 정답을 선택해주세요.\n'
        '질문: {question}\n'
        '옵션:\n'
        '{options}\n'
        'Assistant:정답은{answer}.<|endoftext|>\n',
        'User:당신은 실제 건강 검진 문제에 답하는 의사입니다. A부터 E까지 정답을 선택해주세요.\n'
        '질문: {question}\n'
        '옵션:\n'
        '{options}\n'
        'Assistant:'),
    'ja_choice': (
        'User:あなたは現実世界の健康診断の質問に答える医師です。 正しい答えを A ～ E から選択してください。\n'
        '質問: {question}\n'
        'オプション:\n'
        '{options}\n'
        'Assistant:正しい答えは、{answer}.<|endoftext|>\n',
        'User:あなたは現実世界の健康診断の質問に答える医師です。 正しい答えを A ～ E から選択してください。\n'
        '質問: {question}\n'
        'オプション:\n'
        '{options}\n'
        'Assistant:'),
}


def reference_template(source: str) -> str:
    """The reference's if-chain from a source to its prompt pair; anything unlisted gets the PubMedQA one."""
    if source in ["cmb-single", "cmexam", "cmmlu-medical", "medqa-mcmle"]:
        return "zh_choice"
    if source in ["medmcqa", "medqa-usmle", "mmlu-medical"]:
        return "en_choice"
    if source in ["headqa"]:
        return "es_choice"
    if source in ["frenchmedmcqa", "mmlu-medical-fr"]:
        return "fr_choice"
    if source in ["mmlu-medical-ar"]:
        return "ar_choice"
    if source in ["mmlu-medical-hi"]:
        return "hi_choice"
    if source in ["KorMedMCQA"]:
        return "ko_choice"
    if source.startswith("MMLU_") and source.endswith("_pt"):
        return "pt_choice"
    if source.startswith("MMLU_") and source.endswith("_de"):
        return "de_choice"
    if source in ["IgakuQA"]:
        return "ja_choice"
    if source in ["MedExpQA", "mmlu-medical-it"]:
        return "it_choice"
    if source in ["RuMedDaNet"]:
        return "ru_choice"
    return "en_pubmed"


def seeded(stem: str, index: int) -> random.Random:
    """Our one change to the reference's draw: ``random.sample`` on an RNG keyed by (seed, item id), not the global
    unseeded one (docs/methods.md §13)."""
    digest = hashlib.sha256(f"{SEED}\x00{stem}-{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def reference_prompts(files: dict[str, list[dict]], few_shot: int, max_chars: int) -> tuple[dict[str, str], Counter]:
    """The reference's test preparation over raw records: item id -> prompt (dropped items absent), and how often a
    shot was skipped for the budget while a later one still fitted (the rule is "each shot that fits", not "stop at
    the first that does not")."""
    out: dict[str, str] = {}
    events: Counter = Counter()
    for stem, data in files.items():
        grouped: dict[str, list[tuple[int, dict]]] = {}
        for index, item in enumerate(data):
            grouped.setdefault(item["source"], []).append((index, item))
        for source, members in grouped.items():
            items = [item for _, item in members]
            few_shot_prompt, question_prompt = REFERENCE_PROMPTS[reference_template(source)]
            for index, item in members:
                random_samples = seeded(stem, index).sample(items, few_shot + 1)
                if item in random_samples:
                    random_samples.remove(item)
                else:
                    random_samples = random_samples[:-1]
                real_question = question_prompt.format(**item)
                question = ""
                skipped = False
                for sample in random_samples:
                    sample = few_shot_prompt.format(**sample)
                    if len(question) + len(real_question) + len(sample) < max_chars:
                        question += sample
                        events["skip_then_keep"] += skipped
                    else:
                        skipped = True
                question += real_question
                if len(question) > max_chars:
                    events["dropped"] += 1
                    continue
                events[f"shots={question.count('<|endoftext|>')}"] += 1
                out[f"{stem}-{index}"] = question
    return out, events


@pytest.fixture(scope="module")
def dev(xmedbench_dev):
    files = {f.stem: json.loads(f.read_text(encoding="utf-8")) for f in sorted(xmedbench_dev.glob("*.json"))}
    items, rejects = load_benchmark(BenchmarkConfig(name="dev", path=str(xmedbench_dev)), Storage("/nonexistent-root"))
    assert not rejects and len(items) == sum(map(len, files.values())) == 1114
    return files, items


@pytest.mark.parametrize("max_chars", [4096, 1500])
def test_prompts_are_the_reference_bytes_on_every_dev_item(dev, max_chars):
    """Catches any byte of difference from the reference's prompts (instruction strings, labels, the spaces around
    "(X)", the Arabic answer line, PubMedQA's context line and its shot-only trailing space, <|endoftext|> and the
    newline after each shot, question whitespace the record has), a different draw (self-removal by equality, the
    last draw dropped otherwise, several-answer shots kept), and a different budget rule (characters, strict '<' for
    a shot, '>' for the drop, skipping a shot that does not fit but trying the next)."""
    files, items = dev
    expected, events = reference_prompts(files, 3, max_chars)
    pool = ShotPool(items)
    ours: dict[str, str] = {}
    dropped = []
    for it in items:
        try:
            ours[it.id] = apollo.build_prompt(it, pool, 3, SEED, max_chars=max_chars)
        except PromptTooLong as e:
            assert e.unit == "characters" and e.length > max_chars
            dropped.append(it.id)
    assert sorted(ours) == sorted(expected)
    assert len(dropped) == events["dropped"]
    wrong = [i for i in expected if ours[i] != expected[i]]
    assert not wrong, f"{len(wrong)} prompts differ, e.g. {wrong[0]}:\n{ours[wrong[0]]!r}\n{expected[wrong[0]]!r}"
    # what the comparison covered: every template of the dev split, and the budget's edge cases at the small budget
    used = {reference_template(it.source) for it in items}
    assert used == {"en_choice", "en_pubmed", "zh_choice", "es_choice", "fr_choice", "hi_choice", "ar_choice"}
    assert any("(ACE)<|endoftext|>" in p or "(ACDE)." in p for p in ours.values())  # several-answer shots
    if max_chars == 4096:
        assert events["shots=3"] > 1000
    else:
        assert events["dropped"] > 0 and events["skip_then_keep"] > 0 and events["shots=0"] > 0


def test_pubmedqa_prompt_carries_its_context():
    """Catches the PubMedQA prompt without its context line, and the wrong template for a source the reference does
    not list: with a context, its PubMedQA template; without (the reference would crash), the item language's."""
    it = Item(id="en-0", language="en", source="pubmedqa", question="Does X cause Y?",
              options=(("A", "yes"), ("B", "no"), ("C", "maybe")), answer="A", context="X was given to 10 rats.")
    shot = Item(id="en-1", language="en", source="pubmedqa", question="Q2?", options=it.options, answer="C",
                context="C2")
    text = apollo.build_prompt(it, ShotPool([it, shot]), k=1, seed=SEED)
    shot_fmt, query_fmt = REFERENCE_PROMPTS["en_pubmed"]
    fields = {"options": it.options_text()}
    assert text == (shot_fmt.format(question="Q2?", context="C2", answer="(C)", **fields)
                    + query_fmt.format(question=it.question, context=it.context, **fields))
    assert "Context: X was given to 10 rats. \n" in text
    fr = Item(id="fr-0", language="fr", source="my-french-set", question="Q?", options=it.options, answer="A")
    assert apollo.build_prompt(fr, ShotPool([fr]), k=0) == REFERENCE_PROMPTS["fr_choice"][1].format(
        question="Q?", options=it.options_text())
    sw = Item(id="sw-0", language="sw", source="my-swahili-set", question="Q?", options=it.options, answer="A")
    assert apollo.build_prompt(sw, ShotPool([sw]), k=0) == REFERENCE_PROMPTS["en_choice"][1].format(
        question="Q?", options=it.options_text())


def test_budget_edges_are_the_references():
    """Catches an off-by-one in the character budget: a shot needs the prompt strictly under it, the final prompt may
    be exactly at it (the dev split has no prompt at either edge, so the test above cannot tell)."""
    opts = (("A", "x"), ("B", "y"))
    it = Item(id="en-0", language="en", source="medmcqa", question="Q?", options=opts, answer="A")
    shot = Item(id="en-1", language="en", source="medmcqa", question="S?", options=opts, answer="B")
    pool = ShotPool([it, shot])
    query, turn = apollo.template_for(it).query(it), apollo.template_for(it).shot(shot, apollo.QWEN_EOS)
    assert apollo.build_prompt(it, pool, k=1, max_chars=len(query) + len(turn)) == query
    assert apollo.build_prompt(it, pool, k=1, max_chars=len(query) + len(turn) + 1) == turn + query
    assert apollo.build_prompt(it, pool, k=1, max_chars=len(query)) == query
    with pytest.raises(PromptTooLong):
        apollo.build_prompt(it, pool, k=1, max_chars=len(query) - 1)


# ------------------------------------------------------------------------------------------------------- extraction
# output, what the reference's rules read, what our native extraction reads. The reference column was checked against
# the reference's own function when the table was written; the rows where the two columns differ are the native
# extraction's documented deviations (docs/methods.md §13).
EXTRACTION = [
    ("The correct answer is (C).", "C", "C"),
    ("(b) is right", "B", "B"),  # lower case in brackets counts
    ("（D）", "D", "D"),  # full-width brackets
    ("答案：（Ｄ）", None, "D"),  # full-width letter: not read by the reference
    ("Based on the findings", "B", None),  # loose pass: every capital A-F, "B" of "Based"
    ("Answer: B", "A", "B"),  # ... the "A" of "Answer" first
    ("(B) or maybe (A) (A)", "A", "A"),  # most frequent
    ("(B) (A)", "B", "B"),  # a tie: the first counted
    ("\n\nThe correct answer is (A).\n(B)", "A", "A"),  # first non-empty line
    ("   \n(C)", None, "C"),  # a line of spaces is not empty to the reference
    ("(ب)", "B", "B"),
    ("الإجابة الصحيحة هي (ب) و (ب) أو (د) (د) (د)", "B", "D"),  # Arabic: once per letter, however often written
    ("(ب) (A)", "A", "B"),  # Arabic counted after Latin: the tie goes to A
    ("(ا)", None, "A"),  # alef without hamza: not a reference form
    ("ج)", None, "C"),  # jim: not a reference form (it reads س or ك as C)
    ("ك)", "C", "C"),
    ("د", None, "D"),  # a bare Arabic letter: no reference fallback
    ("(بالتأكيد", "B", None),  # the first letter of a bracketed word counts for the reference
    ("Yes.", "A", "A"),
    ("yes.", None, "A"),  # the reference's Yes/No is case-sensitive and needs the full stop
    ("Yes", None, "A"),
    ("No.", "B", "B"),
    ("No, it is (not) clear", None, None),
    ("", None, None),
    ("\n\n", None, None),
    ("C or B", "C", "C"),
    ("The answer is E, not F", "E", "E"),
    ("(A)\n(B) (B)", "A", "A"),
    ("正确答案是(E).", "E", "E"),
]


@pytest.mark.parametrize("text,reference,native", EXTRACTION)
def test_reference_extraction(text, reference, native):
    """Catches any departure from the reference's extraction in the apollo protocol (Arabic per letter not per match,
    no bare-Arabic or extra Arabic forms, bare capitals anywhere, exact "Yes."/"No."), and pins where the native
    extraction reads differently on purpose."""
    assert apollo.extract_reference(text) == reference
    assert extract_answer(text) == native


# --------------------------------------------------------------------------------------------------------- averages
def _outcomes(spec: dict[tuple[str, str], tuple[int, int]]) -> list[dict]:
    return [{"language": lang, "source": src, "correct": i < ok}
            for (lang, src), (ok, n) in spec.items() for i in range(n)]


def test_apollo_averages_the_papers_sources_only():
    """Catches en/zh averaging PubMedQA, CMB-single or CMExam under the apollo protocol, pooled pt/fr, or excluded
    sources vanishing from the per-source report."""
    outcomes = _outcomes({
        ("en", "medqa-usmle"): (3, 4), ("en", "medmcqa"): (1, 2), ("en", "mmlu-medical"): (1, 4),
        ("en", "pubmedqa"): (0, 10),
        ("zh", "medqa-mcmle"): (2, 2), ("zh", "cmmlu-medical"): (1, 4), ("zh", "cmb-single"): (0, 3),
        ("zh", "cmexam"): (0, 5),
        ("pt", "MMLU_anatomy_pt"): (1, 1), ("pt", "MMLU_college_medicine_pt"): (0, 3),
        ("fr", "frenchmedmcqa"): (1, 2), ("fr", "mmlu-medical-fr"): (3, 3),
    })
    paper = aggregate(outcomes, sources=apollo.language_sources(None, "apollo"))
    native = aggregate(outcomes, sources=apollo.language_sources(None, "native"))
    en, zh = paper["languages"]["en"], paper["languages"]["zh"]
    assert en["accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 1 / 4) / 3) and en["excluded"] == ["pubmedqa"]
    assert native["languages"]["en"]["accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 1 / 4 + 0) / 4)
    assert zh["accuracy"] == pytest.approx((1 + 1 / 4) / 2) and zh["excluded"] == ["cmb-single", "cmexam"]
    assert paper["languages"]["pt"]["accuracy"] == pytest.approx(1 / 4)  # pooled, not (1 + 0) / 2
    assert paper["languages"]["fr"]["accuracy"] == pytest.approx(4 / 5)
    assert paper["sources"]["en"]["pubmedqa"] == {"n": 10, "correct": 0, "accuracy": 0.0}
    assert paper["excluded_n"] == 18 and paper["n"] == len(outcomes) - 18
    table = markdown_table({"m": paper}, protocol=apollo.describe("apollo", config_mod.EvalConfig(protocol="apollo")))
    notes = table.split("\n\n", 1)[1].splitlines()
    assert notes[0].startswith("- protocol apollo: the reference's prompts (3-shot turns, 4096-character budget)")
    assert "- en: scored but not averaged: pubmedqa" in notes


def test_a_language_without_its_listed_sources_averages_what_it_has_and_says_so():
    """Catches a language silently missing (or silently averaged) when none of its listed sources is loaded."""
    r = aggregate(_outcomes({("en", "apollo-sample-en"): (1, 2)}), sources=apollo.PAPER_SOURCES)
    assert r["languages"]["en"]["accuracy"] == 0.5 and r["languages"]["en"]["listed"] is False
    assert "en: none of its listed sources present" in markdown_table({"m": r})


def test_configured_sources_override_the_protocol_list():
    r = aggregate(_outcomes({("en", "pubmedqa"): (1, 1), ("en", "medmcqa"): (0, 1)}),
                  sources=apollo.language_sources({"en": ["pubmedqa"]}, "apollo"))
    assert r["languages"]["en"]["accuracy"] == 1.0 and r["languages"]["en"]["excluded"] == ["medmcqa"]


# ----------------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("preset", ["qwen2-0.5b", "qwen2-1.5b", "qwen2-7b"])
def test_qwen2_presets_evaluate_with_the_apollo_protocol(preset):
    """Catches the paper presets falling back to log-likelihood or a 32-token generation."""
    e = config_mod.resolve({}, [f"preset={preset}"]).eval
    assert (e.protocol, e.scoring, e.max_new_tokens, e.shots, e.max_prompt_chars) == ("apollo", "generate", 256, 3,
                                                                                       4096)


def test_protocol_defaults_and_mistakes():
    assert config_mod.resolve({}).eval.protocol == "native"
    e = config_mod.resolve({}, ["eval.protocol=apollo"]).eval
    assert (e.scoring, e.max_new_tokens) == ("generate", 256)
    assert config_mod.resolve({}, ["eval.protocol=apollo", "eval.max_new_tokens=8"]).eval.max_new_tokens == 8
    with pytest.raises(config_mod.ConfigError, match="eval.scoring = 'loglik': the apollo protocol scores greedy"):
        config_mod.resolve({}, ["eval.protocol=apollo", "eval.scoring=loglik"])
