"""QA rewriting (Apollo, docs/methods.md §3): corpus paragraphs → chat items, exactly once, resumable.

What each kind becomes:
- pretraining kinds (book, paper, encyclopedia, guideline, web): two calls. (1) a question, in the paragraph's
  language, that the paragraph fully answers, never referring to "the text"; (2) the answer, written as a medical
  assistant with the paragraph as hidden reference. Item: [user question, assistant answer].
- dialogue: one call writing a patient–doctor exchange grounded in the text, parsed into alternating messages;
  inputs over ``rewrite.max_dialogue_chars`` are skipped (reject ``dialogue_too_long``).
- exam, general, math, code: passed through untouched as [user question, assistant answer]. collect keeps such a
  record whole as JSON in ``fields``; the question and answer are read from it under the source's
  ``question_field``/``answer_field`` (a separate ``options`` entry is appended to the question, as an exam item
  without its options cannot be answered); ``question``/``answer`` columns are used when a corpus has them.

Prompts are versioned files, ``prompts/<version>/<lang>.yaml``, one written natively per major language; any other
language uses ``en.yaml`` with its English name in ``{language}`` and an explicit "Reply in <Language>." appended.

Backends (``rewrite.backend``):
- ``extractive``: an offline, deterministic *fallback* so that the pipeline runs with no LLM at all. The question is
  a per-language template around the topic phrase of the paragraph's first sentence ("What should be known about
  <topic>?"); the answer is the paragraph's own sentences. It makes no new knowledge and is not Apollo's method.
- ``openai``: the official ``AsyncOpenAI`` client against any OpenAI-compatible ``base_url`` (OpenAI, vLLM, a Ray
  Serve app). Per actor: at most ``concurrency`` requests in flight (an ``asyncio.Semaphore``), a per-request timeout,
  and our own retries (the client's are disabled so that every retry is counted): 408/409/429/5xx, timeouts and
  connection errors are retried with exponential backoff and jitter, honouring ``Retry-After``. ``qps`` is a *global*
  limit: one small Ray actor hands out send times (virtual scheduling, 1/qps apart) to every rewrite actor, so the
  limit holds whatever ``rewrite.actors`` is.
- ``hf``: a local transformers model, loaded once per actor of a Ray Data actor pool, batched generation with left
  padding, on a GPU when the cluster has one. Sampling: temperature/top_p from ``rewrite.openai`` (transformers has no
  frequency/presence penalty).

Validation of every generated text (rejects keep the raw output and the reason): a response with content; question and
answer non-empty; answer ≥ ``rewrite.min_answer_chars``; no "according to the text"-style leakage (per-language
phrase lists in the prompt files; minors use the English list); answer (and a long enough question) in the
paragraph's language — lingua in low-accuracy (trigram) mode on the first 300 characters, which loads in milliseconds
(high-accuracy mode takes seconds per actor); Latin- and Cyrillic-script texts are checked from 100 characters on
(shorter ones fool the trigram model), other scripts from 20; languages lingua does not know (and Latin, see
``LanguageCheck``) go unchecked, as does everything when lingua is not installed.

Exactly once: a record id is ``record_id(paragraph id, prompt_version, backend, model)``. Actors commit results in
small parts — ``qa/<fp>/parts/<hash of the part's ids>.parquet``, each written atomically and holding accepted items
and rejects alike. A run first lists the parts and skips every paragraph already in one, so a job killed at any point
and rerun redoes only what was never committed. The last step streams the parts, keeps one record per id (a part can
repeat ids only if two runs overlapped), checks that every paragraph has its record, writes ``items/`` (ITEM) and
``rejects/`` (REJECT) shards, then the manifest, then removes ``parts/``. The output folder is
``qa/<fingerprint(semantic rewrite config, corpus manifest hash)>/``; operational knobs (concurrency, qps, timeouts,
retries, actors, batch size, base_url) do not change it. A reject that is a verdict on the text (too short, leakage,
wrong language, control characters, ...) is final like an item. A reject whose cause is the server or the network
(``TRANSIENT_REASONS``: the request failed after its retries, an empty, malformed or cut-off reply — each asked again
up to ``rewrite.openai.max_retries`` times first) is not: the run makes up to ``RETRY_PASSES`` more passes over those
paragraphs, a rerun asks again for them alone, and the manifest is written only when every paragraph has a final
record, so a finished run's counts never hold a server's bad minute.

Ray Data: the driver reads only the corpus ids, turns the rows still to do into work items (shard, row numbers), and
maps them over a pool of ``rewrite.actors`` ``Rewriter`` actors, which read their rows, rewrite them and commit parts;
each returns one small summary row per part, from which the driver logs progress lines with rates.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Protocol

import pyarrow as pa

from apollo_ray import languages as langs
from apollo_ray.config import INSTRUCTION_KINDS, PRETRAIN_KINDS, Config, RewriteConfig, fingerprint
from apollo_ray.data.records import ITEM, PARAGRAPH, REJECT, record_id
from apollo_ray.errors import UserError
from apollo_ray.redact import redact_text
from apollo_ray.storage import Manifest, Storage, join

log = logging.getLogger(__name__)

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
FALLBACK_PROMPTS = "en"
PASSTHROUGH_KINDS: tuple[str, ...] = tuple(k for k in INSTRUCTION_KINDS if k != "dialogue")
Step = Literal["question", "answer", "dialogue"]

# The corpus row as the actors see it: a paragraph, plus question/answer columns when a corpus has them.
INPUT = pa.schema([*PARAGRAPH, *[f for f in (pa.field("question", pa.string()), pa.field("answer", pa.string()))
                                 if f.name not in PARAGRAPH.names]])
# One committed result: the item (messages null for a reject) plus its fate and its cost.
PART = pa.schema([*ITEM, ("status", pa.string()), ("reason", pa.string()), ("step", pa.string()),
                  ("raw", pa.string()), ("retries", pa.int64()), ("retry_reasons", pa.string()),
                  ("tokens_in", pa.int64()), ("tokens_out", pa.int64())])
# What an actor tells the driver per committed part (progress and this run's metrics).
SUMMARY = pa.schema([("part", pa.string()), ("rows", pa.int64()), ("ok", pa.int64()), ("retries", pa.int64()),
                     ("tokens_in", pa.int64()), ("tokens_out", pa.int64()), ("reasons", pa.string())])

# The trigram (low-accuracy) detector is unreliable on short Latin- or Cyrillic-script text (a plain French sentence
# can come out English at 0.999), so those are checked from 100 characters on; a language with a script of its own
# is recognised from a few words.
_MIN_DETECT_CHARS = 100
_MIN_DETECT_CHARS_OWN_SCRIPT = 20
_OWN_SCRIPT = frozenset({"zh", "ja", "ko", "ar", "he", "hi", "th"})
_DETECT_CHARS = 300
_MIN_LANGUAGE_CONFIDENCE = 0.2
_PROGRESS_EVERY_S = 10.0
# Replies worth asking again (a rerun asks again too): the server or the network failed, not the paragraph. Every
# other reject reason is a verdict on the text and final.
TRANSIENT_REASONS = frozenset({"request_failed", "malformed_response", "empty_output", "truncated"})
# Passes over the paragraphs whose record is still a transient reject, after the first, within one run.
RETRY_PASSES = 2
# Chat-template and tokenizer control tokens (<|im_end|>, <|endoftext|>, </s>, [INST], <<SYS>>) in generated text:
# trained on, they would teach the model to end or restart turns mid-answer.
_SPECIAL_TOKEN = re.compile(r"<\|[^<>|\s]{1,64}\|>|</?s>|\[/?INST\]|<</?SYS>>")
# The script each language is written in, for texts too short for the statistical language check: a 15-character
# question in Latin letters is not Chinese whatever the model says. Languages not listed are not script-checked.
_SCRIPTS: dict[str, frozenset[str]] = {
    **{c: frozenset({"CJK"}) for c in ("zh",)},
    "ja": frozenset({"CJK", "HIRAGANA", "KATAKANA"}), "ko": frozenset({"HANGUL", "CJK"}),
    "th": frozenset({"THAI"}), "lo": frozenset({"LAO"}), "mn": frozenset({"CYRILLIC", "MONGOLIAN"}),
    **{c: frozenset({"ARABIC"}) for c in ("ar", "ckb")}, "he": frozenset({"HEBREW"}),
    **{c: frozenset({"DEVANAGARI"}) for c in ("hi", "mai", "sa", "doi")},
    **{c: frozenset({"CYRILLIC"}) for c in ("ru", "uk", "bg")}, "sr": frozenset({"CYRILLIC", "LATIN"}),
    **{c: frozenset({"LATIN"}) for c in ("vi", "mg", "ceb", "su", "ilo", "en", "de", "pt", "es", "fr", "it", "hr",
                                         "gl", "cs", "co", "la", "bs", "eo", "sq", "da", "no", "gn", "sk", "gd", "lb",
                                         "mt", "ln", "bm", "sw", "nso", "ig", "rw", "ha")},
}


# ------------------------------------------------------------------------------------------------------------ prompts
class PromptError(ValueError):
    """A prompt version or file that cannot be used; the message names the folder or file."""


@dataclass(frozen=True)
class PromptSet:
    """The prompts, labels and checks for one paragraph language, from one versioned file."""

    version: str
    language: str                  # the paragraph language served
    file: str                      # the file's language ("en" for the fallback)
    templates: dict[str, str]      # question, answer, dialogue
    labels: dict[str, str]         # question, answer, patient, doctor
    extractive_question: str
    topic_cut: tuple[str, ...]
    topic_lowercase: bool
    leakage: tuple[str, ...]
    reply_in: str | None           # the explicit language constraint of the fallback, formatted

    @property
    def fallback(self) -> bool:
        return self.file != self.language

    @property
    def language_name(self) -> str:
        return langs.get(self.language).name

    def render(self, step: Step, **values: str) -> str:
        text = self.templates[step].format_map({"language": self.language_name, **values}).rstrip()
        return f"{text}\n\n{self.reply_in}" if self.reply_in else text


def prompt_versions() -> list[str]:
    return sorted(p.name for p in PROMPTS_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml")))


@functools.lru_cache(maxsize=None)
def load_prompts(version: str, language: str) -> PromptSet:
    """The prompt set for ``language``: its own file, or the English fallback with a "Reply in …" constraint."""
    import yaml

    folder = PROMPTS_DIR / version
    if not folder.is_dir():
        raise PromptError(f"rewrite.prompt_version={version!r}: no prompt folder {folder}; available versions: "
                          f"{', '.join(prompt_versions()) or 'none'}")
    lang = langs.canonical(language)
    own = folder / f"{lang}.yaml"
    path = own if own.exists() else folder / f"{FALLBACK_PROMPTS}.yaml"
    if not path.exists():
        raise PromptError(f"prompt version {version!r} has neither {own.name} nor the fallback "
                          f"{FALLBACK_PROMPTS}.yaml in {folder}")
    if lang in langs.MAJORS and path != own:
        raise PromptError(f"prompt version {version!r} lacks {own}: every major language needs native prompts")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    required = ("question", "answer", "dialogue", "labels", "extractive_question", "leakage")
    missing = [k for k in required if k not in raw]
    if missing:
        raise PromptError(f"{path}: missing keys {missing}")
    for step, needs in (("question", ["{paragraph}"]), ("answer", ["{paragraph}", "{question}"]),
                        ("dialogue", ["{paragraph}"])):
        if any(n not in raw[step] for n in needs):
            raise PromptError(f"{path}: the {step} template must contain {' and '.join(needs)}")
    fallback = path != own
    name = langs.get(lang).name
    reply_in = None
    if fallback:
        if not raw.get("reply_in"):
            raise PromptError(f"{path}: a fallback prompt file needs `reply_in` (e.g. 'Reply in {{language}}.')")
        reply_in = raw["reply_in"].format(language=name)
    return PromptSet(
        version=version, language=lang, file=path.stem,
        templates={k: raw[k] for k in ("question", "answer", "dialogue")},
        labels=dict(raw["labels"]),
        extractive_question=raw.get("extractive_question_fallback", "{topic}?") if fallback
        else raw["extractive_question"],
        topic_cut=tuple(raw.get("topic_cut", ())),
        topic_lowercase=bool(raw.get("topic_lowercase", False)) and not fallback,
        leakage=tuple(raw["leakage"]),
        reply_in=reply_in,
    )


# --------------------------------------------------------------------------------------------------------- text rules
_SENTENCE_END = re.compile(r"(?<=[.!?؟।])\s+|(?<=[。！？])")
_TRIM = " \t\n\"'“”‘’«»「」『』*`"


def normalize(text: str) -> str:
    return " ".join(text.split())


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(normalize(text)) if s.strip()]


def topic_phrase(text: str, cuts: Iterable[str], lowercase: bool = False) -> str:
    """The key phrase of the first sentence: what precedes its first copula or clause mark, kept short.

    ``lowercase``: lower a capitalised first word (``The heart`` → ``the heart``) but not an acronym (``HIV``).
    """
    first = (sentences(text) or [""])[0]
    hits = [i for i in (first.find(c) for c in cuts) if i > 0]
    topic = first[:min(hits)] if hits else first
    topic = topic.strip().rstrip(".!?。！？؟।:：,，;；").strip(_TRIM)
    if len(topic) > 80:
        # Over-long topics read badly in a template; cut at a word when the script has spaces.
        cut = topic.rfind(" ", 0, 80)
        topic = topic[:cut] if cut > 20 else topic[:40]
    topic = topic or first
    if lowercase and len(topic) > 1 and topic[0].isupper() and not topic[1].isupper():
        topic = topic[0].lower() + topic[1:]
    return topic


def _label_pattern(labels: Iterable[str]) -> str:
    return "|".join(re.escape(lbl) for lbl in sorted(set(labels), key=len, reverse=True))


def clean_output(text: str, labels: Iterable[str]) -> str:
    """Strip what models wrap answers in: whitespace, quotes, markdown emphasis, a leading "Question:" label."""
    text = text.strip().strip(_TRIM).strip()
    lead = re.compile(rf"^\s*(?:#+\s*)?[*_]*(?:{_label_pattern(labels)})[*_]*\s*[:：][*_]*\s*", re.I)
    return lead.sub("", text, count=1).strip().strip(_TRIM).strip()


def parse_dialogue(text: str, prompts: PromptSet) -> list[dict[str, str]] | None:
    """Lines labelled patient/doctor (native or English labels) → alternating user/assistant messages.

    Unlabelled lines continue the current turn, text before the first label is dropped, consecutive turns of one
    role merge, a leading doctor turn and a trailing patient turn are dropped. None when no exchange remains.
    """
    roles = {prompts.labels["patient"].casefold(): "user", "patient": "user",
             prompts.labels["doctor"].casefold(): "assistant", "doctor": "assistant"}
    line_re = re.compile(rf"^\s*[-*_#>\s]*(?P<label>{_label_pattern(roles)})[*_\s]*[:：][*_\s]*(?P<rest>.*)$", re.I)
    turns: list[dict[str, str]] = []
    for line in text.splitlines():
        m = line_re.match(line)
        if m:
            role = roles[m.group("label").casefold()]
            if turns and turns[-1]["role"] == role:
                turns[-1]["content"] += "\n" + m.group("rest").strip()
            else:
                turns.append({"role": role, "content": m.group("rest").strip()})
        elif turns and line.strip():
            turns[-1]["content"] += "\n" + line.strip()
    while turns and turns[0]["role"] != "user":
        turns.pop(0)
    while turns and turns[-1]["role"] != "assistant":
        turns.pop()
    turns = [{"role": t["role"], "content": t["content"].strip()} for t in turns]
    if len(turns) < 2 or any(not t["content"] for t in turns):
        return None
    return turns


def find_leakage(text: str, phrases: Iterable[str]) -> str | None:
    """The phrase revealing a hidden reference, if any. Word boundaries only where the script separates words by
    spaces and letters (Latin, Greek, Cyrillic); CJK and clitic-attaching scripts match as substrings."""
    folded = text.casefold().replace("’", "'")
    # Plain substring search first (fast, and almost always a miss); the boundary regex only for the phrases found.
    for q in (p.casefold() for p in phrases):
        if q in folded and _phrase_regex(q).search(folded):
            return q
    return None


@functools.lru_cache(maxsize=4096)
def _phrase_regex(q: str) -> re.Pattern:
    start = r"(?<!\w)" if q[0].isalpha() and ord(q[0]) < 0x0590 else ""
    end = r"(?!\w)" if q[-1].isalpha() and ord(q[-1]) < 0x0590 else ""
    return re.compile(start + re.escape(q) + end)


class LanguageCheck:
    """Is a text in the expected language? lingua over the registry languages it knows (low-accuracy mode)."""

    def __init__(self) -> None:
        try:
            from lingua import Language, LanguageDetectorBuilder
        except ImportError:
            log.warning("lingua-language-detector is not installed: the rewrite language check is skipped")
            self._detector, self._known = None, {}
            return
        by_iso = {lang.iso_code_639_1.name.lower(): lang for lang in Language.all()}
        by_iso["no"] = by_iso.get("nb")  # the registry's Norwegian is lingua's Bokmål
        # Latin is left out: medical text is full of Latin names (Streptococcus pneumoniae, Mycoplasma…) that the
        # trigram model takes for Latin; Latin paragraphs, rare, go unchecked instead.
        self._known = {c: by_iso[c] for c in langs.all_codes() if by_iso.get(c) is not None and c != "la"}
        self._detector = LanguageDetectorBuilder.from_languages(*set(self._known.values())) \
            .with_low_accuracy_mode().build()

    def mismatch(self, text: str, expected: str) -> str | None:
        """None when the text is (or cannot be shown not to be) in ``expected``; else the detected language."""
        if self._detector is None or expected not in self._known:
            return None
        if len(text.strip()) < (_MIN_DETECT_CHARS_OWN_SCRIPT if expected in _OWN_SCRIPT else _MIN_DETECT_CHARS):
            return None
        # The opening is representative of the language and bounds the cost on long answers.
        values = self._detector.compute_language_confidence_values(text[:_DETECT_CHARS])
        if not values:
            return None
        target = self._known[expected]
        if values[0].language == target:
            return None
        conf = next((v.value for v in values if v.language == target), 0.0)
        if conf >= _MIN_LANGUAGE_CONFIDENCE:
            return None
        top = values[0].language
        return next((c for c, lang in self._known.items() if lang == top), top.name.lower())


# ----------------------------------------------------------------------------------------------------------- backends
@dataclass(frozen=True)
class Request:
    step: Step
    prompt: str
    paragraph: str
    prompts: PromptSet
    question: str | None = None


@dataclass
class Completion:
    text: str | None = None
    error: str | None = None       # a reject reason when there is no usable text
    raw: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    retries: Counter = field(default_factory=Counter)


class Backend(Protocol):
    name: str
    model: str

    async def complete(self, request: Request) -> Completion: ...

    async def aclose(self) -> None: ...


class ExtractiveBackend:
    """Deterministic fallback (no model): template question around the topic phrase; the paragraph as answer."""

    name = "extractive"
    model = ""

    async def complete(self, request: Request) -> Completion:
        p = request.prompts
        question = p.extractive_question.format(topic=topic_phrase(request.paragraph, p.topic_cut,
                                                                   p.topic_lowercase))
        answer = " ".join(sentences(request.paragraph))
        text = {"question": question, "answer": answer,
                "dialogue": f"{p.labels['patient']}: {question}\n{p.labels['doctor']}: {answer}"}[request.step]
        return Completion(text=text, raw=text)

    async def aclose(self) -> None:
        return None


class QpsLimiter:
    """Global request pacing, run as one Ray actor: each call reserves the next send time, 1/qps after the last.

    Returns the delay to wait rather than sleeping itself, so the actor never blocks and callers on any node wait in
    their own event loop.
    """

    def __init__(self, qps: float):
        self.interval = 1.0 / qps
        self.next_free = 0.0

    def reserve(self) -> float:
        now = time.monotonic()
        at = max(now, self.next_free)
        self.next_free = at + self.interval
        return at - now


def _count(value: Any) -> int:
    """A token count from a reply's usage: a non-negative integer, else 0 (a server may send anything there)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return 0
    return int(value)


def _retryable(err: Exception) -> tuple[str | None, float | None]:
    """(retry reason, server's Retry-After seconds) for a transient error; (None, None) for a final one."""
    import openai

    if isinstance(err, openai.APITimeoutError):
        return "timeout", None
    if isinstance(err, openai.APIConnectionError):
        return "connection", None
    if isinstance(err, openai.APIStatusError):
        code = err.status_code
        if code in (408, 409, 429) or code >= 500:
            after = None
            try:
                after = float(err.response.headers.get("retry-after", ""))
            except (TypeError, ValueError):
                pass
            return str(code), after
    return None, None


class OpenAIBackend:
    """Chat completions through ``AsyncOpenAI``; bounded concurrency, global QPS, counted retries."""

    name = "openai"

    def __init__(self, rcfg: RewriteConfig, limiter: Any = None):
        from openai import AsyncOpenAI

        self.cfg = rcfg.openai
        self.model = self.cfg.model
        # Local servers (vLLM, Ray Serve, tests) accept any key; the client insists on one.
        key = os.environ.get(self.cfg.api_key_env) or "EMPTY"
        self.client = AsyncOpenAI(base_url=self.cfg.base_url, api_key=key, timeout=self.cfg.timeout_s, max_retries=0)
        self.sem = asyncio.Semaphore(self.cfg.concurrency)
        self.limiter = limiter

    async def complete(self, request: Request) -> Completion:
        from openai import APIError  # already imported with the client: a lookup

        c = self.cfg
        retries: Counter = Counter()
        last = ""
        for attempt in range(c.max_retries + 1):
            retry_after = None
            async with self.sem:
                if self.limiter is not None:
                    await asyncio.sleep(await self.limiter.reserve.remote())
                try:
                    # The raw reply, parsed here: every field is validated below anyway, and building the typed
                    # response object is a fifth of the client's CPU per request (the bench is CPU-bound).
                    resp = await self.client.chat.completions.with_raw_response.create(
                        model=c.model, messages=[{"role": "user", "content": request.prompt}],
                        temperature=c.temperature, top_p=c.top_p, frequency_penalty=c.frequency_penalty,
                        presence_penalty=c.presence_penalty, max_tokens=c.max_tokens)
                except APIError as err:
                    reason, retry_after = _retryable(err)
                    last = f"{type(err).__name__}: {err}"
                    if reason is None:
                        return Completion(error="request_error", raw=last, retries=retries)
                else:
                    reply = self._parse(resp, retries)
                    # A malformed, empty or cut-off reply is the server's failure, not the paragraph's: ask again.
                    if reply.error not in TRANSIENT_REASONS or attempt == c.max_retries:
                        return reply
                    reason = reply.error
            if attempt == c.max_retries:
                break
            retries[reason] += 1
            # Sleep outside the semaphore: a backing-off request must not hold a concurrency slot.
            delay = min(c.max_backoff_s, c.backoff_s * 2 ** attempt)
            delay = delay / 2 + random.uniform(0, delay / 2)
            if retry_after is not None:
                delay = max(delay, min(retry_after, c.max_backoff_s))
            await asyncio.sleep(delay)
        return Completion(error="request_failed", raw=last, retries=retries)

    @staticmethod
    def _parse(resp: Any, retries: Counter) -> Completion:
        text = resp.text
        try:
            body = json.loads(text)
        except json.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            return Completion(error="malformed_response", raw=text, retries=retries)
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        tin, tout = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
        choices = body.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
        message = choice.get("message") if choice else None
        if not isinstance(message, dict):
            return Completion(error="malformed_response", raw=text, tokens_in=tin, tokens_out=tout, retries=retries)
        content = message.get("content") or ""
        if not isinstance(content, str):
            return Completion(error="malformed_response", raw=text, tokens_in=tin, tokens_out=tout, retries=retries)
        if not content.strip():
            return Completion(error="empty_output", raw=text, tokens_in=tin, tokens_out=tout, retries=retries)
        if choice.get("finish_reason") == "length":
            return Completion(error="truncated", raw=content, tokens_in=tin, tokens_out=tout, retries=retries)
        return Completion(text=content, raw=content, tokens_in=tin, tokens_out=tout, retries=retries)

    async def aclose(self) -> None:
        await self.client.close()


class HFBackend:
    """A local transformers model. Requests arriving in one event-loop turn (every record of a batch reaching the
    same step) are generated together as one left-padded batch."""

    name = "hf"

    def __init__(self, rcfg: RewriteConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not rcfg.hf_model:
            raise ValueError("rewrite.backend=hf needs rewrite.hf_model (a hub id or a local path)")
        self.cfg = rcfg
        self.model = rcfg.hf_model
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tok = AutoTokenizer.from_pretrained(rcfg.hf_model)
        self.tok.padding_side = "left"  # decoder-only batches: pad on the left so every prompt ends at the same column
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.lm = AutoModelForCausalLM.from_pretrained(rcfg.hf_model, dtype=dtype).to(self.device).eval()
        limit = getattr(self.lm.config, "max_position_embeddings", None) or 4096
        self.max_prompt_tokens = max(1, limit - rcfg.hf_max_new_tokens)
        self._pending: list[tuple[str, asyncio.Future]] = []

    async def complete(self, request: Request) -> Completion:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._pending.append((request.prompt, fut))
        if len(self._pending) == 1:
            # Runs after every task already scheduled in this turn has queued its request.
            loop.call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        bs = self.cfg.batch_size
        for i in range(0, len(pending), bs):
            chunk = pending[i:i + bs]
            try:
                results = self._generate([p for p, _ in chunk])
            except Exception as err:  # noqa: BLE001 — handed to the awaiting records, which re-raise it
                for _, f in chunk:
                    f.set_exception(err)
                continue
            for (_, f), r in zip(chunk, results):
                f.set_result(r)

    def _format(self, prompt: str) -> str:
        from apollo_ray.data.mixture import ASSISTANT_PREFIX, USER_PREFIX

        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)
        return f"{USER_PREFIX}{prompt}\n{ASSISTANT_PREFIX}"  # the Apollo training template

    def _generate(self, prompts: list[str]) -> list[Completion]:
        import torch

        texts = [self._format(p) for p in prompts]
        lengths = [len(ids) for ids in self.tok(texts, add_special_tokens=False)["input_ids"]]
        out: list[Completion | None] = [
            Completion(error="prompt_too_long", raw=f"{n} prompt tokens > {self.max_prompt_tokens}", tokens_in=n)
            if n > self.max_prompt_tokens else None for n in lengths]
        todo = [i for i, c in enumerate(out) if c is None]
        if todo:
            enc = self.tok([texts[i] for i in todo], return_tensors="pt", padding=True,
                           add_special_tokens=False).to(self.device)
            # Seeded by the batch's prompts: a rerun of the same batch samples the same text.
            torch.manual_seed(int(hashlib.sha256("\x1f".join(prompts).encode()).hexdigest()[:8], 16))
            with torch.inference_mode():
                gen = self.lm.generate(**enc, do_sample=True, temperature=self.cfg.openai.temperature,
                                       top_p=self.cfg.openai.top_p, max_new_tokens=self.cfg.hf_max_new_tokens,
                                       pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id)
            new = gen[:, enc["input_ids"].shape[1]:].cpu()
            for row, i in enumerate(todo):
                ids = new[row].tolist()
                if self.tok.eos_token_id in ids:
                    ids = ids[:ids.index(self.tok.eos_token_id)]
                text = self.tok.decode(ids, skip_special_tokens=True)
                out[i] = Completion(text=text, raw=text, tokens_in=int(enc["attention_mask"][row].sum()),
                                    tokens_out=len(ids))
        return [c for c in out if c is not None]

    async def aclose(self) -> None:
        return None


def make_backend(rcfg: RewriteConfig, limiter: Any = None) -> Backend:
    if rcfg.backend == "extractive":
        return ExtractiveBackend()
    if rcfg.backend == "openai":
        return OpenAIBackend(rcfg, limiter)
    if rcfg.backend == "hf":
        return HFBackend(rcfg)
    raise ValueError(f"rewrite.backend={rcfg.backend!r}: expected extractive, openai or hf")


def backend_model(rcfg: RewriteConfig) -> str:
    return {"openai": rcfg.openai.model, "hf": rcfg.hf_model or ""}.get(rcfg.backend, "")


# ------------------------------------------------------------------------------------------------------------ records
@dataclass
class _Record:
    """One paragraph's way through the calls; becomes exactly one PART row."""

    row: dict[str, Any]
    id: str
    prompt_version: str
    backend: str
    model: str
    retries: Counter = field(default_factory=Counter)
    tokens_in: int = 0
    tokens_out: int = 0

    def add(self, c: Completion) -> Completion:
        self.retries.update(c.retries)
        self.tokens_in += c.tokens_in
        self.tokens_out += c.tokens_out
        return c

    def _base(self) -> dict[str, Any]:
        r = self.row
        return {"id": self.id, "parent_id": r["id"], "language": r["language"], "kind": r["kind"],
                "source": r["source"], "prompt_version": self.prompt_version, "backend": self.backend,
                "model": self.model, "retries": sum(self.retries.values()),
                "retry_reasons": json.dumps(dict(self.retries), sort_keys=True), "tokens_in": self.tokens_in,
                "tokens_out": self.tokens_out}

    def ok(self, messages: list[dict[str, str]], step: str) -> dict[str, Any]:
        return {**self._base(), "messages": messages, "status": "ok", "reason": None, "step": step, "raw": None}

    def reject(self, reason: str, step: str, raw: str | None) -> dict[str, Any]:
        return {**self._base(), "messages": None, "status": "reject", "reason": reason, "step": step,
                "raw": raw or ""}


class Rewriter:
    """The Ray Data actor: rewrites corpus rows and commits the results as parts (see the module doc).

    A work item names a corpus shard and the row numbers still to do in it; the actor reads the shard itself (the
    last one is cached: consecutive items usually share it), so the corpus never passes through the object store and
    no separate read stage is needed. ``__init__`` builds the backend once (loads the model for ``hf``); a persistent
    event loop runs the records of an item concurrently, a part being written every ``rewrite.batch_size`` records.
    """

    def __init__(self, rcfg: RewriteConfig, storage: Storage, out: str, corpus: str = "", limiter: Any = None,
                 qa_fields: dict[str, tuple[str, str, str]] | None = None):
        self.rcfg = rcfg
        # source name -> (question_field, answer_field, text_field) of its records, for pass-through items
        self.qa_fields = qa_fields or {}
        self.storage = storage
        self.corpus = corpus
        self.parts = join(out, "parts")
        self.loop = asyncio.new_event_loop()
        self.backend = make_backend(rcfg, limiter)
        self.language = LanguageCheck()
        self._shard: tuple[str, pa.Table] | None = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = [self.rewrite_rows(self._rows(path, rows))
               for path, rows in zip(batch["path"].to_pylist(), batch["rows"].to_pylist())]
        return pa.concat_tables(out) if out else SUMMARY.empty_table()

    def _rows(self, path: str, rows: list[int]) -> list[dict[str, Any]]:
        if self._shard is None or self._shard[0] != path:
            self._shard = (path, read_shard(self.storage, join(self.corpus, path)))
        return self._shard[1].take(rows).to_pylist()

    def rewrite_rows(self, rows: list[dict[str, Any]]) -> pa.Table:
        """INPUT rows → committed parts; returns one SUMMARY row per part."""
        return self.loop.run_until_complete(self.process(rows))

    def close(self) -> None:
        self.loop.run_until_complete(self.backend.aclose())
        self.loop.close()

    async def process(self, rows: list[dict[str, Any]]) -> pa.Table:
        tasks = [asyncio.ensure_future(self.rewrite(r)) for r in rows]
        done: list[dict[str, Any]] = []
        summaries: list[dict[str, Any]] = []
        for fut in asyncio.as_completed(tasks):
            done.append(await fut)
            if len(done) >= self.rcfg.batch_size:
                # A thread, so that in-flight requests keep going while the part is written.
                summaries.append(await asyncio.to_thread(self.commit, done))
                done = []
        if done:
            summaries.append(await asyncio.to_thread(self.commit, done))
        return pa.Table.from_pylist(summaries, schema=SUMMARY)

    def commit(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        ids = sorted(r["id"] for r in records)
        name = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:24] + ".parquet"
        self.storage.write_parquet(join(self.parts, name), pa.Table.from_pylist(records, schema=PART))
        reasons = Counter(r["reason"] for r in records if r["status"] != "ok")
        return {"part": name, "rows": len(records), "ok": sum(r["status"] == "ok" for r in records),
                "retries": sum(r["retries"] for r in records), "tokens_in": sum(r["tokens_in"] for r in records),
                "tokens_out": sum(r["tokens_out"] for r in records), "reasons": json.dumps(dict(reasons))}

    # -- one record --------------------------------------------------------------------------------------------
    async def rewrite(self, row: dict[str, Any]) -> dict[str, Any]:
        kind = row["kind"]
        if kind in PASSTHROUGH_KINDS:
            return self.passthrough(row)
        rc = self.rcfg
        rec = _Record(row, record_id(row["id"], rc.prompt_version, self.backend.name, self.backend.model),
                      rc.prompt_version, self.backend.name, self.backend.model)
        if kind not in PRETRAIN_KINDS and kind != "dialogue":
            return rec.reject("unsupported_kind", "input", kind)
        if not langs.is_known(row["language"] or ""):
            return rec.reject("unknown_language", "input", row["language"])
        prompts = load_prompts(rc.prompt_version, row["language"])
        text = row["text"] or ""
        if kind == "dialogue":
            return await self._dialogue(rec, prompts, text)
        return await self._qa(rec, prompts, text)

    def passthrough(self, row: dict[str, Any]) -> dict[str, Any]:
        # Ids independent of the rewrite config: the same exam item is the same record whatever the backend.
        rec = _Record(row, record_id(row["id"], "", "passthrough", ""), "", "passthrough", "")
        q, a = self._question_answer(row)
        if not (q and q.strip() and a and a.strip()):
            return rec.reject("missing_question_answer", "input", row.get("fields") or row.get("text"))
        return rec.ok([{"role": "user", "content": q}, {"role": "assistant", "content": a}], "passthrough")

    def _question_answer(self, row: dict[str, Any]) -> tuple[str | None, str | None]:
        if row.get("question") and row.get("answer"):
            return row["question"], row["answer"]
        try:
            rec = json.loads(row.get("fields") or "{}")
        except json.JSONDecodeError:
            return None, None
        if not isinstance(rec, dict):
            return None, None
        qf, af, tf = self.qa_fields.get(row["source"], ("question", "answer", "text"))
        q, a = rec.get(qf if qf in rec else tf), rec.get(af)
        options = rec.get("options")
        if isinstance(options, dict):
            options = "\n".join(f"({k}) {v}" for k, v in options.items())
        elif isinstance(options, list):
            options = "\n".join(str(o) for o in options)
        if isinstance(q, str) and options:
            q = f"{q}\n{options}"
        return (q if isinstance(q, str) else None), (None if a is None else str(a))

    async def _qa(self, rec: _Record, prompts: PromptSet, text: str) -> dict[str, Any]:
        lbl = prompts.labels
        c = rec.add(await self.backend.complete(
            Request("question", prompts.render("question", paragraph=text), text, prompts)))
        if c.error:
            return rec.reject(c.error, "question", c.raw)
        question = clean_output(c.text or "", [lbl["question"], "Question", "Q"])
        bad = self._check(question, prompts, is_answer=False)
        if bad:
            return rec.reject(bad, "question", c.raw)
        c = rec.add(await self.backend.complete(
            Request("answer", prompts.render("answer", paragraph=text, question=question), text, prompts, question)))
        if c.error:
            return rec.reject(c.error, "answer", c.raw)
        answer = clean_output(c.text or "", [lbl["answer"], "Answer", "A"])
        bad = self._check(answer, prompts, is_answer=True)
        if bad:
            return rec.reject(bad, "answer", c.raw)
        return rec.ok([{"role": "user", "content": question}, {"role": "assistant", "content": answer}], "answer")

    async def _dialogue(self, rec: _Record, prompts: PromptSet, text: str) -> dict[str, Any]:
        if len(text) > self.rcfg.max_dialogue_chars:
            return rec.reject("dialogue_too_long", "input", f"{len(text)} chars > {self.rcfg.max_dialogue_chars}")
        c = rec.add(await self.backend.complete(
            Request("dialogue", prompts.render("dialogue", paragraph=text), text, prompts)))
        if c.error:
            return rec.reject(c.error, "dialogue", c.raw)
        messages = parse_dialogue(c.text or "", prompts)
        if messages is None:
            return rec.reject("dialogue_unparseable" if (c.text or "").strip() else "empty_output", "dialogue", c.raw)
        said = "\n".join(m["content"] for m in messages if m["role"] == "assistant")
        asked = "\n".join(m["content"] for m in messages if m["role"] == "user")
        bad = self._check(asked, prompts, is_answer=False) or \
            self._check(said, prompts, is_answer=True)
        if bad:
            return rec.reject(bad, "dialogue", c.raw)
        return rec.ok(messages, "dialogue")

    def _check(self, text: str, prompts: PromptSet, is_answer: bool) -> str | None:
        return check_text(text, prompts, self.language, self.rcfg.min_answer_chars if is_answer else None)


def check_text(text: str, prompts: PromptSet, language: "LanguageCheck", min_answer_chars: int | None) -> str | None:
    """Why a generated question (``min_answer_chars`` None) or answer cannot be a training item; None when it can."""
    is_answer = min_answer_chars is not None
    if not text.strip():
        return "empty_answer" if is_answer else "empty_question"
    if any(unicodedata.category(ch) in ("Cc", "Cs", "Co") and ch not in "\n\t\r" for ch in text):
        return "control_characters"
    if _SPECIAL_TOKEN.search(text):
        return "special_tokens"
    if not any(ch.isalpha() for ch in text):
        return "no_letters"
    if is_answer and len(text) < min_answer_chars:
        return "answer_too_short"
    if find_leakage(text, prompts.leakage):
        return "leakage"
    if _wrong_script(text, prompts.language) or language.mismatch(text, prompts.language):
        return "wrong_language"
    return None


def _wrong_script(text: str, language: str) -> bool:
    """Most letters are outside the scripts ``language`` is written in (Latin names and drug names inside a Chinese
    text are fine: they are a minority)."""
    scripts = _SCRIPTS.get(language)
    if scripts is None:
        return False
    letters = [ch for ch in text if ch.isalpha()]
    outside = sum(1 for ch in letters if unicodedata.name(ch, "?").split(" ", 1)[0] not in scripts)
    return outside > len(letters) / 2


# ------------------------------------------------------------------------------------------------------------- driver
def semantic_config(rcfg: RewriteConfig) -> dict[str, Any]:
    """What decides the output (and so the folder name); operational knobs are left out on purpose."""
    d: dict[str, Any] = {"backend": rcfg.backend, "prompt_version": rcfg.prompt_version,
                         "min_answer_chars": rcfg.min_answer_chars, "max_dialogue_chars": rcfg.max_dialogue_chars,
                         "model": backend_model(rcfg)}
    o = rcfg.openai
    if rcfg.backend == "openai":
        d.update(temperature=o.temperature, top_p=o.top_p, frequency_penalty=o.frequency_penalty,
                 presence_penalty=o.presence_penalty, max_tokens=o.max_tokens)
    elif rcfg.backend == "hf":
        d.update(temperature=o.temperature, top_p=o.top_p, max_new_tokens=rcfg.hf_max_new_tokens)
    return d


def output_folder(cfg: Config, corpus_manifest: Manifest) -> str:
    return cfg.uri("qa", fingerprint("rewrite", semantic_config(cfg.rewrite), corpus_manifest.hash))


def run(cfg: Config, corpus: str | None = None) -> str:
    """Rewrite the corpus at ``corpus`` (default: collect's output, collected first if needed) into ``qa/<fp>/``."""
    storage = Storage.from_config(cfg)
    if corpus is None:
        from apollo_ray.data import collect

        corpus = collect.run(cfg)
    cm = storage.read_manifest(corpus)
    out = output_folder(cfg, cm)
    if storage.has_manifest(out):
        log.info("rewrite: %s is up to date (manifest present), skipping", out)
        return out
    rcfg = cfg.rewrite
    load_prompts(rcfg.prompt_version, FALLBACK_PROMPTS)  # a missing prompt version fails before any work

    from apollo_ray.tracking import Tracker

    with Tracker(cfg).stage("rewrite", inputs={"corpus": cm.hash}, output=out,
                            section=rcfg.model_dump(mode="json")) as tracked:
        t0 = time.time()
        shard_ids = _corpus_ids(storage, corpus, cm)
        corpus_ids = [i for _, ids in shard_ids for i in ids]
        this_run: Counter = Counter()
        for attempt in range(1 + RETRY_PASSES):
            done = _done_ids(storage, join(out, "parts"))
            work = _work(shard_ids, done, _rows_per_item(rcfg))
            todo = sum(len(w["rows"]) for w in work)
            if attempt == 0:
                log.info("rewrite: %d paragraphs in %s, %d already done, %d to do (backend %s) → %s",
                         len(corpus_ids), corpus, len(done), todo, rcfg.backend, out)
            elif work:
                log.info("rewrite: asking again for %d paragraphs whose replies failed transiently (pass %d of %d)",
                         todo, attempt, RETRY_PASSES)
            if not work:
                break
            this_run += _map(cfg, storage, corpus, out, work, tracked)
        else:
            if left := len(set(corpus_ids) - _done_ids(storage, join(out, "parts"))):
                raise UserError(f"rewrite: {left} paragraphs still have only transient failures (the request or "
                                f"the reply failed) after {RETRY_PASSES + 1} passes: is the LLM server at "
                                f"{redact_text(rcfg.openai.base_url)} healthy? Rerun to ask again for those alone")
        manifest = _consolidate(cfg, storage, corpus, cm, out, corpus_ids)
        seconds = time.time() - t0
        c, x = manifest.counts, manifest.extra
        metrics = {"paragraphs_in": c["in"], "qa_out": c["kept"], "rejected": sum(c["dropped"].values()),
                   "retries": x["retries"], "tokens_in": x["tokens_in"], "tokens_out": x["tokens_out"],
                   "paragraphs_this_run": this_run["rows"], "seconds": seconds,
                   "throughput_paragraphs_per_s": this_run["rows"] / max(this_run["seconds"], 1e-9),
                   **{f"rejected.{k}": v for k, v in c["dropped"].items()},
                   **{f"retries.{k}": v for k, v in x["retry_reasons"].items()}}
        tracked.log_metrics(metrics)
        tracked.set_tags({"apollo.output_manifest": manifest.hash})
        log.info("rewrite: done in %.0fs: %d in, %d QA items, dropped %s, %d retries, tokens %d in / %d out",
                 seconds, c["in"], c["kept"], dict(c["dropped"]), x["retries"], x["tokens_in"], x["tokens_out"])
    return out


def _read_columns(storage: Storage, uri: str, columns: list[str] | None = None) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns)


def _corpus_ids(storage: Storage, corpus: str, cm: Manifest) -> list[tuple[str, list[str]]]:
    return [(s.path, _read_columns(storage, join(corpus, s.path), ["id"])["id"].to_pylist()) for s in cm.shards]


def _rows_per_item(rcfg: RewriteConfig) -> int:
    # An openai actor needs enough rows per call to keep `concurrency` requests in flight (a call's tail leaves
    # slots idle); hf generates one batch per step. Parts are committed every `batch_size` records either way.
    if rcfg.backend == "openai":
        return max(rcfg.batch_size, 4 * rcfg.openai.concurrency)
    return rcfg.batch_size


def _part_uris(storage: Storage, parts: str) -> list[str]:
    # Only finished files: an interrupted atomic write leaves "<name>.parquet.tmp-xxxx", never "<name>.parquet".
    return sorted(u for u in storage.ls(parts) if u.endswith(".parquet"))


def _done_ids(storage: Storage, parts: str) -> set[str]:
    """Paragraphs with a final record: an item, or a reject that is a verdict on the text. A transient reject (the
    server failed) does not count, so the next pass or run asks again."""
    done: set[str] = set()
    for u in _part_uris(storage, parts):
        t = _read_columns(storage, u, ["parent_id", "status", "reason"])
        for pid, status, reason in zip(*(t[c].to_pylist() for c in ("parent_id", "status", "reason"))):
            if status == "ok" or reason not in TRANSIENT_REASONS:
                done.add(pid)
    return done


def _rank(status: str, reason: str | None) -> int:
    """Which of a paragraph's records is its one record: an item, else a final reject, else a transient one."""
    return 0 if status == "ok" else 2 if reason in TRANSIENT_REASONS else 1


def read_shard(storage: Storage, uri: str) -> pa.Table:
    """A corpus shard as INPUT rows; a column the shard lacks (question, answer, an older `fields`) is null."""
    t = storage.read_parquet(uri)
    cols = [t[f.name].cast(f.type) if f.name in t.column_names else pa.nulls(t.num_rows, f.type) for f in INPUT]
    return pa.Table.from_arrays(cols, schema=INPUT)


def _work(shard_ids: list[tuple[str, list[str]]], done: set[str], rows_per_item: int) -> list[dict[str, Any]]:
    """Work items {path, rows}: the row numbers of each shard not yet committed, ``rows_per_item`` at most."""
    items = []
    for path, ids in shard_ids:
        todo = [i for i, pid in enumerate(ids) if pid not in done]
        items += [{"path": path, "rows": todo[j:j + rows_per_item]} for j in range(0, len(todo), rows_per_item)]
    return items


def _map(cfg: Config, storage: Storage, corpus: str, out: str, work: list[dict[str, Any]], tracked: Any) -> Counter:
    import ray

    from apollo_ray.runtime import init_ray

    init_ray()
    rcfg = cfg.rewrite
    qa_fields = {s.name: (s.question_field, s.answer_field, s.text_field) for s in cfg.data.sources}
    limiter = None
    if rcfg.backend == "openai" and rcfg.openai.qps:
        limiter = ray.remote(num_cpus=0)(QpsLimiter).remote(rcfg.openai.qps)
    gpu = rcfg.backend == "hf" and ray.cluster_resources().get("GPU", 0) >= 1
    # An openai actor mostly waits on the network: a fraction of a CPU lets several share a node.
    cpus = 0.5 if rcfg.backend == "openai" else 1.0
    # One block per work item (capped): a block is the unit an actor takes and reports back, so this balances the
    # pool and keeps the progress lines current.
    ds = ray.data.from_items(work, override_num_blocks=min(len(work), 10_000))
    ds = ds.map_batches(Rewriter, batch_size=1, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=rcfg.actors), num_cpus=cpus,
                        num_gpus=1 if gpu else 0,
                        fn_constructor_kwargs={"rcfg": rcfg, "storage": storage, "out": out, "corpus": corpus,
                                               "limiter": limiter, "qa_fields": qa_fields})
    stats: Counter = Counter()
    reasons: Counter = Counter()
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # progress lines with rates instead
    t0 = last = time.time()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for s in batch.to_pylist():
                stats.update({k: s[k] for k in ("rows", "ok", "retries", "tokens_in", "tokens_out")})
                reasons.update(json.loads(s["reasons"]))
            now = time.time()
            if now - last >= _PROGRESS_EVERY_S:
                last = now
                _progress(stats, reasons, now - t0)
                tracked.log_metrics({"progress.paragraphs": stats["rows"], "progress.qa": stats["ok"]},
                                    step=stats["rows"])
    finally:
        ctx.enable_progress_bars = bars
    stats["seconds"] = time.time() - t0
    _progress(stats, reasons, stats["seconds"])
    return stats


def _progress(stats: Counter, reasons: Counter, seconds: float) -> None:
    rate = stats["rows"] / max(seconds, 1e-9)
    log.info("rewrite: %d paragraphs this run (%.1f/s, %.0f tokens out/s), %d QA, %d rejected %s, %d retries",
             stats["rows"], rate, stats["tokens_out"] / max(seconds, 1e-9), stats["ok"],
             stats["rows"] - stats["ok"], dict(reasons), stats["retries"])


def _consolidate(cfg: Config, storage: Storage, corpus: str, cm: Manifest, out: str,
                 corpus_ids: list[str]) -> Manifest:
    """Parts → one record per id in ITEM/REJECT shards → manifest (last) → parts removed."""
    parts = join(out, "parts")
    seen: set[str] = set()
    covered: set[str] = set()
    dropped: Counter = Counter()
    retry_reasons: Counter = Counter()
    by_language: Counter = Counter()
    by_kind: Counter = Counter()
    totals: Counter = Counter()
    items, rejects = _ShardWriter(storage, out, "items", ITEM, cfg.storage.shard_rows), \
        _ShardWriter(storage, out, "rejects", REJECT, cfg.storage.shard_rows)
    # A paragraph can have several records: one per pass that asked again after a transient failure, or two from
    # overlapping runs. Its record is the best-ranked one, the first in part-name order among equals.
    best: dict[str, tuple[int, int, int]] = {}
    uris = _part_uris(storage, parts)
    for u, uri in enumerate(uris):
        t = _read_columns(storage, uri, ["id", "status", "reason"])
        for i, (rid, status, reason) in enumerate(zip(*(t[c].to_pylist() for c in ("id", "status", "reason")))):
            key = (_rank(status, reason), u, i)
            if rid not in best or key < best[rid]:
                best[rid] = key
    for u, uri in enumerate(uris):
        for i, r in enumerate(_read_columns(storage, uri).to_pylist()):
            # every request was made and paid for, whichever record stands
            totals.update(retries=r["retries"], tokens_in=r["tokens_in"], tokens_out=r["tokens_out"])
            retry_reasons.update(json.loads(r["retry_reasons"] or "{}"))
            if r["status"] != "ok" and r["reason"] in TRANSIENT_REASONS and best[r["id"]][1:] != (u, i):
                retry_reasons[f"pass:{r['reason']}"] += 1  # a later pass asked again: one more retry
                totals["retries"] += 1
            if best[r["id"]][1:] != (u, i) or r["id"] in seen:
                continue
            seen.add(r["id"])
            covered.add(r["parent_id"])
            if r["status"] == "ok":
                by_language[r["language"]] += 1
                by_kind[r["kind"]] += 1
                items.add({k: r[k] for k in ITEM.names})
            else:
                dropped[r["reason"]] += 1
                rejects.add({"id": r["id"], "where": f"paragraph {r['parent_id']} ({r['source']}), {r['step']}",
                             "reason": r["reason"], "raw": r["raw"]})
    unique = set(corpus_ids)
    missing = unique - covered
    if missing:
        raise RuntimeError(f"rewrite: {len(missing)} paragraphs of {corpus} have no committed record (e.g. "
                           f"{sorted(missing)[:3]}); rerun to resume")
    if len(corpus_ids) > len(unique):
        dropped["duplicate_paragraph_id"] += len(corpus_ids) - len(unique)
    item_shards, reject_shards = items.close(), rejects.close()
    rcfg = cfg.rewrite
    manifest = Manifest(
        stage="rewrite", fingerprint=out.rstrip("/").rsplit("/", 1)[-1], shards=item_shards,
        counts={"in": len(corpus_ids), "kept": items.rows, "dropped": dict(sorted(dropped.items()))},
        config=rcfg.model_dump(mode="json"), inputs={"corpus": cm.hash},
        files={s.path: s.path for s in reject_shards},
        extra={"corpus_uri": corpus, "semantic": semantic_config(rcfg), "rejects": [vars(s) for s in reject_shards],
               "by_language": dict(sorted(by_language.items())), "by_kind": dict(sorted(by_kind.items())),
               "retries": totals["retries"], "retry_reasons": dict(sorted(retry_reasons.items())),
               "tokens_in": totals["tokens_in"], "tokens_out": totals["tokens_out"]})
    storage.write_manifest(out, manifest)
    storage.delete(parts)  # the manifest now holds everything; keeping the ledger would double the output
    return manifest


class _ShardWriter:
    """Rows → parquet shards of ``shard_rows`` under ``<out>/<name>/``, recorded relative to ``out``."""

    def __init__(self, storage: Storage, out: str, name: str, schema: pa.Schema, shard_rows: int):
        self.storage, self.out, self.name, self.schema, self.shard_rows = storage, out, name, schema, shard_rows
        self.buffer: list[dict[str, Any]] = []
        self.shards: list = []
        self.rows = 0

    def add(self, row: dict[str, Any]) -> None:
        self.buffer.append(row)
        self.rows += 1
        if len(self.buffer) >= self.shard_rows:
            self._flush()

    def _flush(self) -> None:
        rel = f"{self.name}/part-{len(self.shards):05d}.parquet"
        shard = self.storage.write_parquet(join(self.out, rel), pa.Table.from_pylist(self.buffer, schema=self.schema))
        self.shards.append(shard.relative_to(self.out))
        self.buffer = []

    def close(self) -> list:
        if self.buffer:
            self._flush()
        return self.shards

