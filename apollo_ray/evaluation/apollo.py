"""The ``apollo`` evaluation protocol: the reference code's prompts, generation and answer extraction, and the papers'
per-language source lists, so that numbers compare with the Apollo / Apollo-MoE tables (docs/methods.md §9).

What the reference does (Apollo-MoE's Qwen2 test preparation and evaluation scripts), and so what this module does:

- **Template by source.** Each benchmark source has its language's instruction and labels; a source the reference
  does not list gets its PubMedQA template (instruction, then a ``Context:`` line). A shot is one whole turn,
  ``User:{instruction}\\n{Question}: {q}\\n{Options}:\\n{options}\\nAssistant:{answer line}<eos>\\n``, and the query
  is the same turn up to ``Assistant:``: nothing is prefilled, the model writes the answer sentence itself. The
  strings are the reference's, typos and spacing included (the Arabic answer line puts "(X)" first; several
  languages have no space before "(X)"; the PubMedQA shot's instruction ends in a space that its query lacks).
- **Shots.** k+1 items of the item's source are drawn; the item itself is removed if drawn (the first record equal
  to it), else the last draw is. Each shot, in draw order, is kept if the prompt stays under ``max_chars``
  characters (strictly); an item whose prompt is still over ``max_chars`` is dropped (here: a counted reject).
- **Generation.** Greedy, at least 2 and at most 256 new tokens, special tokens stripped.
- **Extraction** (``extract_reference``): on the first non-empty line, the most frequent ``(X)`` (ASCII or
  full-width brackets, either case), Arabic labels counted once per letter after them, ties to the first counted;
  if none, the same with every capital A-F; then the line ``Yes.`` → A, ``No.`` → B.
- **Sources per language** (``PAPER_SOURCES``): the Apollo READMEs leave PubMedQA, CMB-single and CMExam out of the
  reported averages; en and zh average their sources, the other languages pool their items.

Where we differ, on purpose and only where the reference has no defined behaviour: its shots are drawn unseeded (ours
from an RNG keyed by (seed, item id)); a source with fewer than k+1 items makes it crash (we draw what there is); an
unlisted source without a context makes it crash (we use the item language's template, the English one for minors,
as its 50-language script does); its end-of-turn token is the model's (``<|endoftext|>`` for Qwen2; here the
tokenizer's EOS).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Any, Sequence

from apollo_ray.evaluation.benchmark import Item
from apollo_ray.evaluation.prompts import PromptTooLong, ShotPool

MAX_CHARS = 4096
MAX_NEW_TOKENS = 256
MIN_NEW_TOKENS = 2
QWEN_EOS = "<|endoftext|>"
PUBMED = "pubmed"


@dataclass(frozen=True)
class RefTemplate:
    """One of the reference's prompt pairs: a shot turn and the query turn."""

    instruction: str
    question: str  # the question line's label
    options: str  # the options line's label
    answer: str  # the shot's answer sentence, "{answer}" where "(X)" goes
    context: bool = False  # PubMedQA's: a "Context: ... " line after the instruction

    def _body(self, instruction: str, question: str, options: str, context: str) -> str:
        ctx = f"Context: {context} \n" if self.context else ""
        return (f"User:{instruction}\n{ctx}{self.question}: {question}\n{self.options}:\n{options}\n"
                f"Assistant:")

    def shot(self, item: Item, eos: str) -> str:
        q, o, c = item.verbatim
        # the PubMedQA shot's instruction line ends in a space, its query's does not (the reference's strings)
        instruction = self.instruction + (" " if self.context else "")
        answer = self.answer.replace("{answer}", f"({''.join(item.answers)})")
        return f"{self._body(instruction, q, o, c)}{answer}{eos}\n"

    def query(self, item: Item) -> str:
        q, o, c = item.verbatim
        return self._body(self.instruction, q, o, c)


_EN = RefTemplate("You are a medical doctor answering real-world medical exam questions. Select one correct answer "
                  "from A to D.", "Question", "Options", "The correct answer is {answer}.")
TEMPLATES: dict[str, RefTemplate] = {
    "en": _EN,
    PUBMED: RefTemplate("You are a medical doctor answering real-world medical exam questions.", "Question", "Options",
                        "The correct answer is {answer}.", context=True),
    "zh": RefTemplate("您是一名医生，正在回答现实世界的医学考试问题。请从A到E中选择一个正确答案。", "问题", "选项",
                      "正确答案是{answer}."),
    "es": RefTemplate("Usted es un médico que responde preguntas de exámenes médicos del mundo real. Elija una "
                      "respuesta correcta de la A a la D.", "pregunta", "Opciones", "La respuesta correcta es {answer}."),
    "fr": RefTemplate("Vous êtes un médecin et répondez à des questions d'examen médical du monde réel. Veuillez "
                      "choisir une bonne réponse de A à E.", "question", "Possibilités", "La bonne réponse est {answer}."),
    "hi": RefTemplate("आप एक डॉक्टर हैं जो वास्तविक दुनिया की मेडिकल परीक्षा के सवालों का जवाब दे रहे हैं। कृपया A से D "
                      "तक सही उत्तर चुनें।", "सवाल", "विकल्प", "सही उत्तर है{answer}."),
    "ar": RefTemplate("أنت طبيب يجيب على أسئلة الفحص الطبي في العالم الحقيقي. الرجاء اختيار الإجابة الصحيحة من أ إلى د.",
                      "سؤال", "خيارات", "{answer}الإجابة الصحيحة هي."),
    "ru": RefTemplate("Вы врач, отвечающий на реальные вопросы медицинского осмотра. Пожалуйста, выберите правильный "
                      "ответ от А и B.", "вопрос", "Параметры", "Правильный ответ{answer}."),
    "de": RefTemplate("Sie sind ein Arzt, der Fragen zu medizinischen Untersuchungen aus der Praxis beantwortet. Bitte "
                      "wählen Sie eine richtige Antwort von A bis D.", "Frage", "Optionen",
                      "Die richtige Antwort ist{answer}."),
    "pt": RefTemplate("Você é um médico que responde a perguntas de exames médicos do mundo real. Escolha uma resposta "
                      "correta de A a D.", "pergunta", "Opções", "A resposta correta é{answer}."),
    "it": RefTemplate("Sei un medico che risponde a domande sugli esami medici del mondo reale. Scegli una risposta "
                      "corretta dalla A alla E.", "domanda", "Opzioni", "La risposta corretta è{answer}."),
    "ko": RefTemplate("당신은 실제 건강 검진 문제에 답하는 의사입니다. A부터 E까지 정답을 선택해주세요.", "질문", "옵션",
                      "정답은{answer}."),
    "ja": RefTemplate("あなたは現実世界の健康診断の質問に答える医師です。 正しい答えを A ～ E から選択してください。", "質問",
                      "オプション", "正しい答えは、{answer}."),
}

_MMLU = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
         "professional_medicine")
# source -> template, as the reference's test preparation assigns them
SOURCE_TEMPLATE: dict[str, str] = {
    **dict.fromkeys(("cmb-single", "cmexam", "cmmlu-medical", "medqa-mcmle"), "zh"),
    **dict.fromkeys(("medmcqa", "medqa-usmle", "mmlu-medical"), "en"),
    "headqa": "es",
    **dict.fromkeys(("frenchmedmcqa", "mmlu-medical-fr"), "fr"),
    "mmlu-medical-ar": "ar",
    "mmlu-medical-hi": "hi",
    "KorMedMCQA": "ko",
    **{f"MMLU_{s}_pt": "pt" for s in _MMLU},
    **{f"MMLU_{s}_de": "de" for s in _MMLU},
    "IgakuQA": "ja",
    **dict.fromkeys(("MedExpQA", "mmlu-medical-it"), "it"),
    "RuMedDaNet": "ru",
}

# language -> the sources the papers' per-language accuracy averages (the READMEs: PubMedQA, CMB-single and CMExam
# "not used in the paper")
PAPER_SOURCES: dict[str, tuple[str, ...]] = {
    "en": ("medqa-usmle", "medmcqa", "mmlu-medical"),
    "zh": ("medqa-mcmle", "cmmlu-medical"),
    "es": ("headqa",),
    "fr": ("frenchmedmcqa", "mmlu-medical-fr"),
    "ar": ("mmlu-medical-ar",),
    "hi": ("mmlu-medical-hi",),
    "ja": ("IgakuQA",),
    "ko": ("KorMedMCQA",),
    "it": ("MedExpQA", "mmlu-medical-it"),
    "ru": ("RuMedDaNet",),
    "de": tuple(f"MMLU_{s}_de" for s in _MMLU),
    "pt": tuple(f"MMLU_{s}_pt" for s in _MMLU),
}


def template_for(item: Item) -> RefTemplate:
    """The reference's template for the item's source; for a source it does not list, its PubMedQA template when the
    item has a context (what the reference does), else the item language's (English for minors)."""
    name = SOURCE_TEMPLATE.get(item.source)
    if name is None:
        name = PUBMED if item.verbatim[2] else (item.language if item.language in TEMPLATES else "en")
    return TEMPLATES[name]


def _record(item: Item) -> tuple:
    # the reference tests `item in random_samples`: equality of the whole record, not identity
    return item.verbatim, item.answers, item.source


def select_shots(item: Item, pool: ShotPool, k: int, seed: int) -> list[Item]:
    """The reference's draw, seeded: k+1 of the source's items, minus the item itself if drawn, else minus the last."""
    if k <= 0:
        return []
    group = pool.in_order(item.source)
    digest = hashlib.sha256(f"{seed}\x00{item.id}".encode()).digest()
    picks = random.Random(int.from_bytes(digest[:8], "big")).sample(group, min(k + 1, len(group)))
    me = _record(item)
    same = next((i for i, s in enumerate(picks) if _record(s) == me), None)
    if same is not None:
        del picks[same]
    else:
        picks = picks[:-1]
    return picks


def build_prompt(item: Item, pool: ShotPool, k: int = 3, seed: int = 0, *, eos: str = QWEN_EOS,
                 max_chars: int = MAX_CHARS) -> str:
    """The reference's k-shot prompt for ``item``, ending in ``Assistant:``; ``PromptTooLong`` over ``max_chars``."""
    tpl = template_for(item)
    query = tpl.query(item)
    text = ""
    for shot in select_shots(item, pool, k, seed):
        turn = tpl.shot(shot, eos)
        if len(text) + len(query) + len(turn) < max_chars:
            text += turn
    text += query
    if len(text) > max_chars:
        raise PromptTooLong(item.id, len(text), max_chars, "characters")
    return text


def eos_text(tokenizer: Any) -> str:
    """The end-of-turn text the reference writes after each shot: the model's EOS (Qwen2's ``<|endoftext|>``)."""
    return getattr(tokenizer, "eos_token", None) or QWEN_EOS


# ------------------------------------------------------------------------------------------------ answer extraction
_STRICT = re.compile(r"[（(]([A-Fa-f])[）)]")
_LOOSE = re.compile(r"[A-F]")
# Arabic option labels the reference reads, each counted once per output however often it occurs: bracketed on at
# least one side (it also matches the first letter of a bracketed word)
_ARABIC = tuple((letter, re.compile(rf"[（(]?({forms})[）)]+|[（(]+({forms})[）)]?"))
                for letter, forms in (("A", "أ"), ("B", "ب"), ("C", "س|ك"), ("D", "د")))
_YES_NO = {"Yes.": "A", "No.": "B"}


def reference_first_line(text: str) -> str:
    """The first line with any character (whitespace counts); the text itself when it has no newline or no such
    line."""
    if "\n" in text:
        for line in text.split("\n"):
            if line:
                return line
    return text


def extract_reference(text: str) -> str | None:
    """The answer letter the reference reads from a generated output, or None (docs/methods.md §9)."""
    line = reference_first_line(text)
    for pattern in (_STRICT, _LOOSE):
        counts: dict[str, int] = {}
        for letter in pattern.findall(line):
            counts[letter.upper()] = counts.get(letter.upper(), 0) + 1
        for letter, arabic in _ARABIC:
            if arabic.search(line):
                counts[letter] = counts.get(letter, 0) + 1
        if counts:
            top = max(counts.values())
            return next(letter for letter, n in counts.items() if n == top)
    return _YES_NO.get(line)


def language_sources(configured: dict[str, list[str]] | None, protocol: str) -> dict[str, tuple[str, ...]] | None:
    """language -> sources its accuracy averages: ``eval.sources`` when set, else the protocol's (None = all)."""
    if configured is not None:
        return {lang: tuple(srcs) for lang, srcs in configured.items()}
    return dict(PAPER_SOURCES) if protocol == "apollo" else None


def describe(protocol: str, ecfg: Any) -> str:
    """One line naming how the numbers were made, for tables and logs."""
    if protocol == "apollo":
        return (f"protocol apollo: the reference's prompts ({ecfg.shots}-shot turns, {ecfg.max_prompt_chars}-character "
                f"budget), greedy generation (≤{ecfg.max_new_tokens} new tokens), the reference's answer extraction, "
                f"the papers' sources per language")
    how = "option log-likelihood after the answer cue" if ecfg.scoring == "loglik" else (
        f"greedy generation (≤{ecfg.max_new_tokens} new tokens) and answer extraction")
    return (f"protocol native: our prompts ({ecfg.shots}-shot, one user turn, {ecfg.max_prompt_tokens}-token budget), "
            f"{how}")


def sources_of(items: Sequence[Item]) -> dict[str, list[str]]:
    """language -> its sources present, for reports."""
    out: dict[str, set[str]] = {}
    for it in items:
        out.setdefault(it.language, set()).add(it.source)
    return {lang: sorted(s) for lang, s in out.items()}
