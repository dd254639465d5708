"""k-shot prompts for XMedBench items: native instructions for the 12 majors, seeded shots, a length budget.

The prompt is one user message: the instruction, k solved examples of the same source (each ending "The correct
answer is (X)." in the item's language), then the item's context, question and options. It is rendered with the
tokenizer's chat template when it has one, else in Apollo's ``User:{prompt}\\nAssistant:`` format, and the assistant
turn is opened with the answer cue ("The correct answer is"), so greedy generation and option log-likelihood read
the same text: the model's next tokens are `` (X)``.

Differences from the reference (Apollo ``data_process_test``), on purpose:
- shots come from a RNG keyed by (seed, item id), so two runs give the same prompts (the reference draws unseeded);
- over budget, shots are shed one by one from the last; an item that does not fit even 0-shot raises
  ``PromptTooLong`` for the caller to count as a reject (the reference drops it silently at 4096 characters);
- shots are in one user turn instead of one fake User/Assistant turn each, which chat templates cannot express;
- items with several correct letters are never used as shots (they would teach "(ACE)" to a one-answer prompt).
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

from apollo_ray.evaluation.benchmark import Item

DEFAULT_SHOTS = 3


@dataclass(frozen=True)
class Template:
    instruction: str  # "{last}" is the item's last option letter
    question: str
    options: str
    context: str
    cue: str  # opens the answer: "The correct answer is"
    sep: str = " "  # between the cue and "(X)"; none where the script does not space words
    end: str = "."

    def answer_line(self, letter: str) -> str:
        return f"{self.cue}{self.sep}({letter}){self.end}"

    def continuation(self, letter: str) -> str:
        """What follows the cue for option ``letter``: the text whose log-likelihood is scored."""
        return f"{self.sep}({letter})"


TEMPLATES: dict[str, Template] = {
    "en": Template("You are a medical doctor answering real-world medical exam questions. "
                   "Select one correct answer from A to {last}.",
                   "Question", "Options", "Context", "The correct answer is"),
    "zh": Template("你是一名医生，正在回答真实世界的医学考试题目。请从A到{last}中选择一个正确答案。",
                   "问题", "选项", "背景", "正确答案是", sep="", end="。"),
    "es": Template("Usted es un médico que responde preguntas reales de exámenes de medicina. "
                   "Elija una respuesta correcta de la A a la {last}.",
                   "Pregunta", "Opciones", "Contexto", "La respuesta correcta es"),
    "fr": Template("Vous êtes un médecin qui répond à de vraies questions d'examen de médecine. "
                   "Choisissez une seule bonne réponse, de A à {last}.",
                   "Question", "Propositions", "Contexte", "La bonne réponse est"),
    "de": Template("Sie sind Arzt und beantworten echte medizinische Prüfungsfragen. "
                   "Wählen Sie die eine richtige Antwort von A bis {last}.",
                   "Frage", "Antwortmöglichkeiten", "Kontext", "Die richtige Antwort ist"),
    "it": Template("Sei un medico che risponde a domande reali di esami di medicina. "
                   "Scegli l'unica risposta corretta dalla A alla {last}.",
                   "Domanda", "Opzioni", "Contesto", "La risposta corretta è"),
    "pt": Template("Você é um médico respondendo a questões reais de provas de medicina. "
                   "Escolha a única resposta correta de A a {last}.",
                   "Pergunta", "Alternativas", "Contexto", "A resposta correta é"),
    "ru": Template("Вы врач, отвечающий на вопросы реальных медицинских экзаменов. "
                   "Выберите один правильный ответ от A до {last}.",
                   "Вопрос", "Варианты ответа", "Контекст", "Правильный ответ:"),
    "ja": Template("あなたは実際の医学試験の問題に答える医師です。Aから{last}の中から正しい答えを1つ選んでください。",
                   "質問", "選択肢", "文脈", "正解は", sep="", end="です。"),
    "ko": Template("당신은 실제 의학 시험 문제에 답하는 의사입니다. A부터 {last}까지 중에서 정답을 하나 고르십시오.",
                   "질문", "선택지", "지문", "정답은", end="입니다."),
    "hi": Template("आप एक चिकित्सक हैं जो वास्तविक चिकित्सा परीक्षाओं के प्रश्नों के उत्तर दे रहे हैं। "
                   "A से {last} तक के विकल्पों में से एक सही उत्तर चुनें।",
                   "प्रश्न", "विकल्प", "संदर्भ", "सही उत्तर है", end="।"),
    "ar": Template("أنت طبيب تجيب عن أسئلة امتحانات طبية حقيقية. اختر إجابة صحيحة واحدة من A إلى {last}.",
                   "السؤال", "الخيارات", "السياق", "الإجابة الصحيحة هي"),
}


class PromptTooLong(ValueError):
    """Even the 0-shot prompt of an item exceeds the budget; the caller counts it as a reject."""

    reason = "prompt_too_long"

    def __init__(self, item_id: str, length: int, limit: int, unit: str):
        super().__init__(f"{item_id}: 0-shot prompt is {length} {unit}, over the limit of {limit}")
        self.item_id, self.length, self.limit, self.unit = item_id, length, limit, unit


def template_for(language: str) -> Template:
    """The native template of a major language; the English one for the 38 minors."""
    return TEMPLATES.get(language, TEMPLATES["en"])


def continuations(item: Item) -> list[str]:
    """The scored continuation of each option, in option order: ``[" (A)", " (B)", ...]``."""
    tpl = template_for(item.language)
    return [tpl.continuation(letter) for letter in item.letters]


# ------------------------------------------------------------------------------------------------------------ shots
class ShotPool:
    """Candidate examples indexed by source, each source in id order so the pool's input order does not matter.

    Build it once per benchmark: ``build_prompt`` also accepts a plain list but then indexes it on every call.
    """

    def __init__(self, items: Sequence[Item]):
        in_order: dict[str, list[Item]] = defaultdict(list)
        for it in items:
            in_order[it.source].append(it)
        # the apollo protocol draws as the reference does: from every item of the source, in file order
        self._in_order = dict(in_order)
        self._by_source = {s: sorted((it for it in v if len(it.answers) == 1), key=lambda it: it.id)
                           for s, v in in_order.items()}

    @classmethod
    def of(cls, pool: "ShotPool | Sequence[Item]") -> "ShotPool":
        return pool if isinstance(pool, ShotPool) else cls(pool)

    def in_order(self, source: str) -> list[Item]:
        """Every item of ``source`` (several-answer ones too) in the order the pool was given."""
        return self._in_order.get(source, [])

    def candidates(self, item: Item) -> list[Item]:
        # compare content, not ids: a separate dev file reuses the ids ("en-0") of the test file
        key = _content(item)
        return [c for c in self._by_source.get(item.source, []) if _content(c) != key]


def select_shots(item: Item, pool: "ShotPool | Sequence[Item]", k: int, seed: int) -> list[Item]:
    """k examples of the item's source (never the item itself), the same for the same (seed, item id)."""
    candidates = ShotPool.of(pool).candidates(item)
    digest = hashlib.sha256(f"{seed}\x00{item.id}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return rng.sample(candidates, min(k, len(candidates)))


def _content(item: Item) -> tuple[str, tuple[tuple[str, str], ...], str]:
    return item.question, item.options, item.context


# ---------------------------------------------------------------------------------------------------------- prompts
def format_question(item: Item, tpl: Template) -> str:
    parts = [f"{tpl.context}: {item.context}"] if item.context else []
    parts += [f"{tpl.question}: {item.question}", f"{tpl.options}:", item.options_text()]
    return "\n".join(parts)


def user_message(item: Item, shots: Sequence[Item]) -> str:
    tpl = template_for(item.language)
    blocks = [tpl.instruction.format(last=item.letters[-1])]
    blocks += [f"{format_question(s, tpl)}\n{tpl.answer_line(s.answer)}" for s in shots]
    blocks.append(format_question(item, tpl))
    return "\n\n".join(blocks)


def render(message: str, cue: str, tokenizer: Any = None) -> str:
    """The user message as the model sees it, with the assistant turn opened by ``cue``."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
        return f"{head}{cue}"
    return f"User:{message}\nAssistant:{cue}"


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt; special tokens are added only when the text does not already carry BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    add = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add)["input_ids"])


def prompt_length(text: str, tokenizer: Any = None) -> int:
    """Tokens with a tokenizer, characters without."""
    return len(encode(tokenizer, text)) if tokenizer is not None else len(text)


def build_prompt(item: Item, shots_pool: "ShotPool | Sequence[Item]", k: int = DEFAULT_SHOTS, seed: int = 0,
                 tokenizer: Any = None, max_tokens: int | None = None) -> str:
    """The rendered k-shot prompt of ``item``, ending with the answer cue.

    ``max_tokens`` bounds the rendered prompt (tokens via ``tokenizer``, else characters): shots are shed from the
    last until it fits; ``PromptTooLong`` when even the 0-shot prompt does not.
    """
    cue = template_for(item.language).cue
    shots = select_shots(item, shots_pool, k, seed) if k > 0 else []
    while True:
        text = render(user_message(item, shots), cue, tokenizer)
        if max_tokens is None:
            return text
        n = prompt_length(text, tokenizer)
        if n <= max_tokens:
            return text
        if not shots:
            raise PromptTooLong(item.id, n, max_tokens, "tokens" if tokenizer is not None else "characters")
        shots.pop()
