"""collect: read the declared sources, clean, filter, deduplicate and chunk them into ``corpus/<fp>/``.

Flow (Ray Data does the per-document work in parallel; only dedup needs a global view):

    input tasks (one per file, or per row range of a HF dataset)
      → read      (tasks)        raw rows; corrupt lines become rows with a reject reason, the job goes on
      → clean     (tasks)        normalise, detect/check language, quality filters, exact hash, MinHash
      → dedup     (driver)       over (order, hash, MinHash) only: exact, then near-duplicates (MinHash LSH)
      → chunk     (tasks)        paragraphs ≤ data.paragraph_tokens on sentence boundaries, with offsets
      → write     (tasks)        parquet shards of PARAGRAPH rows and quarantine shards of REJECT rows
    then stats.json / stats.csv / tokens_by_language.png and, last, manifest.json.

Decisions worth knowing:
- Languages. An explicit ``source.language`` is the declared language. With ``auto`` the declaration is, in this
  order: the record's ``language_field``, the file's stem or parent folder when it is a registry code (``en.jsonl``,
  ``zh/part-1.jsonl``, XMedBench's ``en.json``), else lingua's detection (confidence ≥ data.language_min_confidence,
  otherwise dropped as ``language_unknown``). A declared language that lingua can detect is checked: a confident
  disagreement sets ``language_mismatch`` and is counted, never relabelled. Languages lingua does not know (ceb,
  ilo, ...) are trusted as declared.
- Instruction kinds (exam, dialogue, general, math, code) are items, not prose: text = question + "\\n" + answer,
  the whole source record is kept as JSON in ``fields``, they become exactly one row each (never chunked), skip the
  prose quality filters and near-dup (templated MCQ stems that differ by one word are different items) and are only
  dropped as exact duplicates of the whole record or when empty.
- Tokens are approximated (no tokenizer in the data stage): each CJK/kana/hangul/Thai/Lao character counts 1, the
  remaining whitespace-separated words count 1.3 each, rounded up. It errs on the high side for BPE tokenizers,
  so a paragraph never exceeds the budget of the real model.
- ``where`` of a reject is ``<file uri>:<n>``: n is the line for jsonl, the 1-based item/row index for json lists,
  parquet and HF datasets, 1 for a txt/md file.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import io
import json
import logging
import math
import re
import tempfile
import time
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from apollo_ray import languages as langs
from apollo_ray.config import INSTRUCTION_KINDS, PRETRAIN_KINDS, Config, DataConfig, SourceConfig, fingerprint
from apollo_ray.data import pii as pii_mod
from apollo_ray.data.records import PARAGRAPH, REJECT, record_id
from apollo_ray.errors import UserError
from apollo_ray.storage import Manifest, Shard, Storage, iter_files, join

log = logging.getLogger(__name__)

STAGE = "collect"
# Bump when the output of the same inputs and config would change (cleaning rules, schema, ids): new folder.
SCHEMA_VERSION = 1
PROGRESS_EVERY_S = 10.0
HF_ROWS_PER_TASK = 20_000
MINHASH_SCHEME = "affine32"  # 32-bit values: half the bytes to ship to the dedup step; datasketch's default
SHINGLE = 5  # character n-grams, so that CJK and other unspaced scripts shingle as well as English
REPETITION_NGRAM = 10

SUFFIXES: dict[str, tuple[str, ...]] = {
    "jsonl": (".jsonl", ".ndjson"), "json": (".json",), "parquet": (".parquet",), "txt": (".txt", ".md", ".markdown"),
}
# Compressed text files (`corpus.jsonl.gz`); names match case-insensitively (`NOTES.JSONL`).
COMPRESSION: dict[str, str] = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
CORRUPT_REASONS = ("invalid_utf8", "bad_json", "not_an_object", "missing_text", "wrong_type", "unknown_language",
                   "unreadable")
FILTER_REASONS = ("too_short", "no_letters", "language_unknown", "symbol_ratio", "repetition", "exact_duplicate",
                  "near_duplicate")

# ------------------------------------------------------------------------------------------------- text cleaning
# Boilerplate: whole lines of at most BOILERPLATE_MAX_CHARS chars matching one of these (case-insensitive). The
# length cap keeps a real paragraph that merely mentions cookies or copyright.
BOILERPLATE_MAX_CHARS = 200
BOILERPLATE_PATTERNS: tuple[str, ...] = (
    r"^(©|\(c\)\s|copyright\b)",                                               # "© 2024 Foo Inc."
    r"all rights reserved|tous droits réservés|todos los derechos reservados|alle rechte vorbehalten"
    r"|版权所有|保留所有权利|جميع الحقوق محفوظة|सर्वाधिकार सुरक्षित",
    r"\b(we|this (web)?site) uses? cookies\b|\baccept (all )?cookies\b|\bcookie (policy|settings|preferences)\b",
    r"^click here\b",
    r"^(read more|share (this|on \w+)|back to top|skip to (main )?content|subscribe to our newsletter)\W*$",
    r"^(home|start|main page)\s*(>|»|›|/|\|)\s*\S",                             # crumbs: "Home > Health > Flu"
)
_BOILERPLATE = re.compile("|".join(f"(?:{p})" for p in BOILERPLATE_PATTERNS), re.IGNORECASE)
_SPACES = re.compile(r"[^\S\n]+")  # any whitespace but the newline (tabs, NBSP, ideographic space, ...)
# Control and invisible characters that carry no text; ZWJ/ZWNJ stay, Indic and Persian scripts need them.
_INVISIBLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\u2060\ufeff]")

# Scripts written without spaces between words: every character counts as a token and as a repetition unit.
_UNSPACED = ("\u0e00-\u0eff"            # Thai, Lao
             "\u1100-\u11ff"            # Hangul Jamo
             "\u2e80-\u2fdf\u3000-\u303f"  # CJK radicals, CJK symbols and punctuation (。、「」)
             "\u3040-\u30ff\u31f0-\u31ff"  # kana
             "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs
             "\uac00-\ud7af"            # Hangul syllables
             "\uff00-\uffef"            # full-width forms (！？，)
             "\U00020000-\U0002fa1f")
_UNSPACED_CHAR = re.compile(f"[{_UNSPACED}]")
_UNIT = re.compile(f"[{_UNSPACED}]|[^\\s{_UNSPACED}]+")
WORD_TOKENS = 1.3

# A sentence ends after . ! ? followed by whitespace (closing quotes/brackets stay with it), right after CJK
# 。！？, Devanagari । ॥ and Arabic ؟ ۔ (no space needed), and at every newline.
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’»)\]]*(?=\s|$)|[。！？]+[」』”’）)]*|[।॥؟۔]+|\n+")


def normalise(text: str) -> str:
    """NFC, one space for any run of spaces, at most one blank line between paragraphs, boilerplate lines dropped."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    out: list[str] = []
    blank = False
    for line in text.split("\n"):
        line = _SPACES.sub(" ", _INVISIBLE.sub("", line)).strip()
        if not line:
            blank = bool(out)
            continue
        if len(line) <= BOILERPLATE_MAX_CHARS and _BOILERPLATE.search(line):
            continue
        if blank:
            out.append("")
        out.append(line)
        blank = False
    return "\n".join(out)


def _token_parts(text: str) -> tuple[int, int]:
    """(unspaced-script characters, words of the rest): the two addends of the token estimate."""
    n_cjk = len(_UNSPACED_CHAR.findall(text))
    n_words = len(_UNSPACED_CHAR.sub(" ", text).split()) if n_cjk else len(text.split())
    return n_cjk, n_words


def _tokens(n_cjk: int, n_words: int) -> int:
    return n_cjk + math.ceil(n_words * WORD_TOKENS)


def count_tokens(text: str) -> int:
    """Approximate token count: 1 per CJK/kana/hangul/Thai/Lao character + 1.3 per remaining word, rounded up."""
    return _tokens(*_token_parts(text))


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) of each sentence, whitespace trimmed; splitting only ever happens after an end mark or newline."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        s, e = _trim(text, start, m.end())
        if e > s:
            spans.append((s, e))
        start = m.end()
    s, e = _trim(text, start, len(text))
    if e > s:
        spans.append((s, e))
    return spans


def _pack(text: str, spans: Iterable[tuple[int, int]], max_tokens: int) -> Iterator[tuple[int, int]]:
    """Greedily join consecutive spans while the joined text stays within ``max_tokens``.

    Joining can only merge words, never split them, so counting a joined span by the sums of its parts' addends
    is an upper bound of its own count: the emitted chunks are within budget.
    """
    cur: tuple[int, int] | None = None
    cur_cjk = cur_words = 0
    for s, e in spans:
        c, w = _token_parts(text[s:e])
        if cur is not None and _tokens(cur_cjk + c, cur_words + w) <= max_tokens:
            cur, cur_cjk, cur_words = (cur[0], e), cur_cjk + c, cur_words + w
            continue
        if cur is not None:
            yield cur
        if _tokens(c, w) > max_tokens:  # a run-on sentence: cut it at word (or CJK character) boundaries
            units = [(s + m.start(), s + m.end()) for m in _UNIT.finditer(text[s:e])]
            *head, last = list(_pack(text, units, max_tokens))
            yield from head
            cur = last
            cur_cjk, cur_words = _token_parts(text[last[0]:last[1]])
        else:
            cur, cur_cjk, cur_words = (s, e), c, w
    if cur is not None:
        yield cur


def chunk(text: str, max_tokens: int) -> list[tuple[int, str, int]]:
    """Split a normalised document into (offset, paragraph, n_tokens), each ≤ max_tokens, on sentence boundaries.

    ``text[offset:offset + len(paragraph)] == paragraph``: offsets point into the normalised document.
    """
    return [(s, text[s:e], count_tokens(text[s:e])) for s, e in _pack(text, sentence_spans(text), max_tokens)]


def symbol_ratio(text: str) -> float:
    """Share of visible characters that are punctuation or symbols (letters, marks and digits are text)."""
    visible = symbols = 0
    for ch in text:
        if ch.isspace():
            continue
        visible += 1
        if unicodedata.category(ch)[0] in "PS":
            symbols += 1
    return symbols / visible if visible else 0.0


def repetition_ratio(text: str, n: int = REPETITION_NGRAM) -> float:
    """max(share of characters in lines seen before, share of repeated word/CJK-character n-grams)."""
    lines = [ln for ln in text.split("\n") if ln.strip()]
    seen: set[str] = set()
    dup_chars = total_chars = 0
    for ln in lines:
        total_chars += len(ln)
        if ln in seen:
            dup_chars += len(ln)
        seen.add(ln)
    line_ratio = dup_chars / total_chars if total_chars else 0.0
    units = _UNIT.findall(text)
    if len(units) <= n:
        return line_ratio
    grams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
    return max(line_ratio, 1.0 - len(set(grams)) / len(grams))


def minhash(text: str, num_perm: int) -> bytes:
    """MinHash over lower-cased character shingles, as raw uint32 bytes (what the dedup step needs, compactly)."""
    from datasketch import MinHash

    t = text.lower()
    shingles = {t[i:i + SHINGLE] for i in range(max(1, len(t) - SHINGLE + 1))}
    m = MinHash(num_perm=num_perm, scheme=MINHASH_SCHEME)
    m.update_batch([s.encode("utf-8") for s in shingles])
    return np.asarray(m.hashvalues, dtype=np.uint32).tobytes()


# ------------------------------------------------------------------------------------------------------ languages
def lingua_codes() -> dict[Any, str]:
    """lingua Language → registry code, for the registry's languages lingua can detect (Norwegian: both forms)."""
    from lingua import Language

    out: dict[Any, str] = {}
    for lang in Language.all():
        iso = lang.iso_code_639_1.name.lower()
        iso = "no" if iso in ("nb", "nn") else iso
        if langs.is_known(iso):
            out[lang] = langs.canonical(iso)
    return out


class LanguageDetector:
    """lingua restricted to the registry's languages it knows; built once per worker (models load lazily).

    Two lingua detectors: the low-accuracy one (trigrams, ~5x faster) is asked first whether a text is in its
    declared language, which nearly every text is; only a disagreement, or a text without a declaration, is decided
    by the high-accuracy one, whose confidences are the ones compared with ``language_min_confidence``.
    """

    SAMPLE_CHARS = 1000  # detection cost grows with length; the first thousand characters decide as well

    def __init__(self) -> None:
        from lingua import LanguageDetectorBuilder

        self._codes = lingua_codes()
        self.detectable = frozenset(self._codes.values())
        self._fast = LanguageDetectorBuilder.from_languages(*self._codes).with_low_accuracy_mode().build()
        self._accurate = LanguageDetectorBuilder.from_languages(*self._codes).build()

    def detect(self, text: str) -> tuple[str | None, float]:
        """(registry code, confidence) by the accurate detector; (None, 0) when it cannot tell at all."""
        values = self._accurate.compute_language_confidence_values(text[:self.SAMPLE_CHARS])
        if not values or values[0].value <= 0:
            return None, 0.0
        return self._codes[values[0].language], float(values[0].value)

    def check(self, text: str, declared: str) -> tuple[str | None, float]:
        """Like ``detect``, short-cut when the fast detector already agrees with ``declared``."""
        fast = self._fast.detect_language_of(text[:self.SAMPLE_CHARS])
        if fast is not None and self._codes[fast] == declared:
            return declared, 1.0
        return self.detect(text)


# ---------------------------------------------------------------------------------------------------------- read
# One row per input line / item. ``order`` sorts inputs deterministically (config order of sources, sorted files,
# line) so that "keep the first duplicate" means the same document on every run and cluster size.
RAW = pa.schema([
    ("order", pa.string()), ("source", pa.string()), ("where", pa.string()), ("rel", pa.string()),
    ("line", pa.int64()), ("doc_id", pa.string()), ("kind", pa.string()), ("declared_language", pa.string()),
    ("text", pa.string()), ("fields", pa.string()), ("raw", pa.string()), ("reason", pa.string()),
])
# After cleaning: normalised text, the language decision, and the dedup keys (minhash only for prose).
# ``pii``: JSON {type: replacements} of the scrubbed text (and ``pii_fields`` of the record's other fields), else null.
DOC = pa.schema([*RAW, ("language", pa.string()), ("language_mismatch", pa.bool_()), ("exact", pa.string()),
                 ("minhash", pa.binary()), ("pii", pa.string()), ("pii_fields", pa.string())])
DEDUP_COLUMNS = ["order", "reason", "exact", "minhash", "kind", "language", "language_mismatch", "pii", "pii_fields"]


class _Corrupt(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _declared_from_path(rel: str) -> str | None:
    p = PurePosixPath(rel)
    for name in (p.stem, p.parent.name):
        if name and langs.is_known(name):
            return langs.canonical(name)
    return None


def _as_str(rec: dict, key: str, what: str, numbers: bool = False) -> str | None:
    """The string at ``key``; None when absent or null; numbers accepted (as text) where they make sense."""
    v = rec.get(key)
    if v is None:
        return None
    if isinstance(v, str):
        return v
    if numbers and isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise _Corrupt("wrong_type", f"{what} {key!r} is {type(v).__name__}, expected a string")


def _record_to_raw(rec: Any, src: SourceConfig, where: dict[str, Any], raw: str) -> dict[str, Any]:
    """A parsed record → a RAW row, or raise _Corrupt naming why it cannot be used."""
    if not isinstance(rec, dict):
        raise _Corrupt("not_an_object", type(rec).__name__)
    kind = src.kind
    if src.kind_field and rec.get(src.kind_field) is not None:
        k = _as_str(rec, src.kind_field, "kind")
        if k not in PRETRAIN_KINDS + INSTRUCTION_KINDS:
            raise _Corrupt("wrong_type", f"unknown kind {k!r}")
        kind = k
    declared = src.language
    if declared == "auto" and src.language_field and rec.get(src.language_field) is not None:
        code = _as_str(rec, src.language_field, "language")
        if not langs.is_known(code):
            raise _Corrupt("unknown_language", repr(code))
        declared = langs.canonical(code)
    if declared == "auto":
        declared = _declared_from_path(where["rel"]) or "auto"
    fields = None
    if kind in INSTRUCTION_KINDS:
        key = src.question_field if src.question_field in rec else src.text_field
        question = _as_str(rec, key, "question")
        if question is None:
            raise _Corrupt("missing_text", f"no {src.question_field!r} or {src.text_field!r}")
        answer = _as_str(rec, src.answer_field, "answer", numbers=True)
        text = question if answer is None else f"{question}\n{answer}"
        fields = json.dumps(rec, ensure_ascii=False, sort_keys=True, default=str)
    else:
        text = _as_str(rec, src.text_field, "text")
        if text is None:
            raise _Corrupt("missing_text", f"no {src.text_field!r}")
    doc_id = _as_str(rec, src.id_field, "id", numbers=True) if src.id_field else None
    return {**where, "doc_id": doc_id or f"{where['rel']}:{where['line']}", "kind": kind,
            "declared_language": declared, "text": text, "fields": fields, "raw": raw, "reason": None}


def _reject_row(where: dict[str, Any], reason: str, raw: str) -> dict[str, Any]:
    return {**where, "doc_id": None, "kind": None, "declared_language": None, "text": None, "fields": None,
            "raw": raw, "reason": reason}


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="backslashreplace")


def _iter_task_rows(task: dict[str, Any], src: SourceConfig, endpoint: str | None) -> Iterator[dict[str, Any]]:
    uri, fmt = task["uri"], task["format"]

    def where(n: int) -> dict[str, Any]:
        return {"order": f"{task['source_idx']:04d}:{task['file_idx']:06d}:{n:012d}", "source": src.name,
                "where": f"{uri}:{n}", "rel": task["rel"], "line": n}

    def row(rec: Any, n: int, raw: str) -> dict[str, Any]:
        try:
            out = _record_to_raw(rec, src, where(n), raw)
        except _Corrupt as e:
            return _reject_row(where(n), e.reason, raw)
        if not _encodable(out):  # valid JSON can still carry a lone surrogate ("\ud800") that no UTF-8 file holds
            return _reject_row(where(n), "invalid_utf8", _printable(raw))
        return out

    if fmt == "hf":
        ds = _load_hf(src)
        for i in range(task["start"], task["stop"]):
            rec = ds[i]
            yield row(rec, i + 1, json.dumps(rec, ensure_ascii=False, default=str))
        return
    fs = Storage(uri, endpoint).fs
    compression = _compression(uri)
    if fmt == "jsonl":
        n = 0
        try:
            with fs.open(uri, "rb", compression=compression) as f:
                for n, line in enumerate(_lines(f), start=1):
                    if n == 1:
                        line = line.removeprefix(codecs.BOM_UTF8)  # a BOM is an encoding mark, not part of record 1
                    if not line.strip():
                        continue  # blank lines are layout, not records
                    try:
                        text = line.decode("utf-8")
                    except UnicodeDecodeError:
                        yield _reject_row(where(n), "invalid_utf8", _decode(line))
                        continue
                    try:
                        rec = json.loads(text)
                    except (ValueError, RecursionError):  # bad JSON, or nesting deeper than the parser's stack
                        yield _reject_row(where(n), "bad_json", text)
                        continue
                    yield row(rec, n, text.rstrip("\n"))
        except Exception as e:  # corrupt compression, a truncated or vanished file: the lines after n are lost
            yield _reject_row(where(n + 1), "unreadable", f"{type(e).__name__}: {e}")
    elif fmt == "json":
        try:
            data = _read_all(fs, uri, compression)
        except Exception as e:
            yield _reject_row(where(1), "unreadable", f"{type(e).__name__}: {e}")
            return
        try:
            items = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield _reject_row(where(data[:e.start].count(b"\n") + 1), "invalid_utf8", _decode(data))
            return
        except (ValueError, RecursionError) as e:
            yield _reject_row(where(getattr(e, "lineno", 1)), "bad_json", _decode(data))
            return
        for n, rec in enumerate(items if isinstance(items, list) else [items], start=1):
            yield row(rec, n, json.dumps(rec, ensure_ascii=False, default=str))
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        n = 0
        with fs.open(uri, "rb") as f:
            try:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=1000):
                    for rec in batch.to_pylist():
                        n += 1
                        yield row(rec, n, json.dumps(rec, ensure_ascii=False, default=str))
            except (pa.ArrowException, OSError) as e:  # not parquet, or truncated: the rows after n are lost
                yield _reject_row(where(n + 1), "unreadable", f"{type(e).__name__}: {e}")
    elif fmt == "txt":
        try:
            data = _read_all(fs, uri, compression)
        except Exception as e:
            yield _reject_row(where(1), "unreadable", f"{type(e).__name__}: {e}")
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            yield _reject_row(where(data[:e.start].count(b"\n") + 1), "invalid_utf8", _decode(data))
            return
        rec = {src.text_field: text, "id": task["rel"]}
        yield row(rec, 1, text)
    else:
        raise ValueError(f"{uri}: unknown format {fmt!r}")


def _read_all(fs: Any, uri: str, compression: str | None) -> bytes:
    with fs.open(uri, "rb", compression=compression) as f:
        return f.read().removeprefix(codecs.BOM_UTF8)  # a BOM is an encoding mark, not text


def _lines(f: Any, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a binary stream, for streams that do not iterate by line (zstandard's reader)."""
    rest = b""
    while data := f.read(chunk):
        *lines, rest = (rest + data).split(b"\n")
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest


def _encodable(row: dict[str, Any]) -> bool:
    try:
        for v in row.values():
            if isinstance(v, str):
                v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(text: str) -> str:
    return text.encode("utf-8", errors="backslashreplace").decode("utf-8")


def _read_batch(batch: pa.Table, sources: list[SourceConfig], endpoint: str | None,
                rows_per_block: int = 2000) -> Iterator[pa.Table]:
    for task in batch.to_pylist():
        rows: list[dict[str, Any]] = []
        for r in _iter_task_rows(task, sources[task["source_idx"]], endpoint):
            rows.append(r)
            if len(rows) >= rows_per_block:
                yield pa.Table.from_pylist(rows, schema=RAW)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=RAW)


# ------------------------------------------------------------------------------------------------------ clean
@functools.lru_cache(maxsize=1)
def worker_detector() -> LanguageDetector:
    """The detector of this worker process, built on first use and reused by every later batch and run.

    Plain Ray tasks with a per-process detector rather than an actor pool: the same once-per-worker cost, read and
    clean fuse into one task, and warm workers keep their loaded models from one run to the next.
    """
    return LanguageDetector()


class _Progress:
    """Periodic per-worker log line: documents cleaned, rate, dropped so far."""

    def __init__(self) -> None:
        from apollo_ray.runtime import setup_logging

        setup_logging()  # a Ray worker's root logger has no handler: INFO lines would be dropped silently
        self.n = self.dropped = 0
        self.t0 = self.last = time.time()

    def add(self, n: int, dropped: int) -> None:
        self.n += n
        self.dropped += dropped
        now = time.time()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            log.info("collect: worker cleaned %d documents (%.0f/s), %d dropped so far", self.n,
                     self.n / max(now - self.t0, 1e-9), self.dropped)


_progress = functools.lru_cache(maxsize=1)(_Progress)


def _clean_batch(batch: pa.Table, data: DataConfig, pii: Any = None) -> pa.Table:
    cleaner = Cleaner(data, worker_detector(), pii)
    out = [cleaner.clean(r) for r in batch.to_pylist()]
    _progress().add(len(out), sum(r["reason"] is not None for r in out))
    return pa.Table.from_pylist(out, schema=DOC)


class Cleaner:
    """Per-document work: normalise, language, quality filters, dedup keys."""

    def __init__(self, data: DataConfig, detector: LanguageDetector, pii: Any = None):
        self.data = data
        self.detector = detector
        self.pii_kinds = frozenset(pii.kinds) if pii is not None and pii.enabled else frozenset()
        self.scrubber = pii_mod.scrubber_for(pii) if self.pii_kinds else None

    def clean(self, r: dict[str, Any]) -> dict[str, Any]:
        r = {**r, "language": None, "language_mismatch": False, "exact": None, "minhash": None, "pii": None,
             "pii_fields": None}
        if r["reason"] is not None:
            return r
        try:
            return self._clean(r)
        except Exception as e:  # one record must never stop a stage: it is quarantined, with what went wrong
            log.warning("collect: %s: cannot clean (%s: %s); quarantined as unreadable", r["where"],
                        type(e).__name__, e)
            return {**r, "reason": "unreadable", "exact": None, "minhash": None}

    def _clean(self, r: dict[str, Any]) -> dict[str, Any]:
        d = self.data
        text = r["text"] = normalise(r["text"])
        instruction = r["kind"] in INSTRUCTION_KINDS
        if r["kind"] in self.pii_kinds:  # before the dedup keys and chunking: nothing downstream sees the originals
            self._scrub(r)
            text = r["text"]
        if not text.strip():
            r["reason"] = "too_short"
            return r
        if r["kind"] not in ("math", "code") and not any(ch.isalpha() for ch in text):  # symbols, digits, controls
            r["reason"] = "no_letters"
            return r
        language, mismatch = self._language(text, r["declared_language"])
        r["language"], r["language_mismatch"] = language, mismatch
        if language is None:
            r["reason"] = "language_unknown"
        elif not instruction and len(text) < d.min_chars:
            r["reason"] = "too_short"
        elif not instruction and symbol_ratio(text) > d.max_symbol_ratio:
            r["reason"] = "symbol_ratio"
        elif not instruction and repetition_ratio(text) > d.max_repetition:
            r["reason"] = "repetition"
        if r["reason"] is None:
            # An instruction item is the whole record (options, answer key...), not just its visible text.
            key = text if not instruction else text + "\x1f" + (r["fields"] or "")
            r["exact"] = hashlib.sha256(key.encode("utf-8")).hexdigest()
            if not instruction:
                r["minhash"] = minhash(text, d.minhash_perm)
        return r

    def _scrub(self, r: dict[str, Any]) -> None:
        lang = r["declared_language"] if r["declared_language"] != "auto" else None
        r["text"], counts = self.scrubber.scrub(r["text"], lang)
        r["pii"] = json.dumps(counts, sort_keys=True) if counts else None
        if r["fields"]:  # rewrite reads pass-through items from the record itself
            r["fields"], counts = self.scrubber.scrub_json(r["fields"], lang)
            r["pii_fields"] = json.dumps(counts, sort_keys=True) if counts else None

    def _language(self, text: str, declared: str) -> tuple[str | None, bool]:
        if declared != "auto" and declared not in self.detector.detectable:
            return declared, False  # lingua cannot judge this language: trust the declaration
        if not text.strip():
            detected, confidence = None, 0.0
        elif declared == "auto":
            detected, confidence = self.detector.detect(text)
        else:
            detected, confidence = self.detector.check(text, declared)
        confident = detected is not None and confidence >= self.data.language_min_confidence
        if declared == "auto":
            return (detected if confident else None), False
        return declared, confident and detected != declared


# ------------------------------------------------------------------------------------------------------ dedup
def dedup(table: pa.Table, threshold: float, num_perm: int) -> dict[str, str]:
    """order → exact_duplicate / near_duplicate for the surviving documents of ``table`` (DEDUP_COLUMNS).

    The first document in ``order`` wins. Near-duplicates are LSH candidates whose estimated Jaccard with a kept
    document reaches ``threshold`` (the LSH bands alone would also admit some pairs below it).
    """
    from datasketch import MinHash, MinHashLSH

    table = table.filter(pc.is_null(table["reason"])).sort_by("order")
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept: dict[str, Any] = {}
    seen: set[str] = set()
    dropped: dict[str, str] = {}
    t0 = last = time.time()
    for i, (order, exact, sig) in enumerate(zip(table["order"].to_pylist(), table["exact"].to_pylist(),
                                               table["minhash"].to_pylist())):
        if time.time() - last >= PROGRESS_EVERY_S:
            last = time.time()
            log.info("collect: dedup %d/%d documents (%.0f/s), %d duplicates", i, table.num_rows,
                     i / (last - t0), len(dropped))
        if exact in seen:
            dropped[order] = "exact_duplicate"
            continue
        seen.add(exact)
        if sig is None:
            continue
        m = MinHash(num_perm=num_perm, hashvalues=np.frombuffer(sig, dtype=np.uint32), scheme=MINHASH_SCHEME)
        if any(m.jaccard(kept[c]) >= threshold for c in lsh.query(m)):
            dropped[order] = "near_duplicate"
            continue
        lsh.insert(order, m)
        kept[order] = m
    return dropped


# ------------------------------------------------------------------------------------------------ chunk, write
def _paragraph_batch(batch: pa.Table, dropped: dict[str, str], max_tokens: int) -> pa.Table:
    rows = []
    for d in batch.to_pylist():
        if d["reason"] is not None or d["order"] in dropped:
            continue
        pieces = [(0, d["text"], count_tokens(d["text"]))] if d["kind"] in INSTRUCTION_KINDS else \
            chunk(d["text"], max_tokens)
        for offset, text, n_tokens in pieces:
            rows.append({"id": record_id(d["source"], d["rel"], d["line"], d["doc_id"], offset), "text": text,
                         "language": d["language"], "declared_language": d["declared_language"],
                         "language_mismatch": d["language_mismatch"], "kind": d["kind"], "source": d["source"],
                         "doc_id": d["doc_id"], "offset": offset, "n_tokens": n_tokens, "fields": d["fields"]})
    return pa.Table.from_pylist(rows, schema=PARAGRAPH)


def _reject_batch(batch: pa.Table, dropped: dict[str, str]) -> pa.Table:
    rows = []
    for d in batch.to_pylist():
        reason = d["reason"] or dropped.get(d["order"])
        if reason is not None:
            rows.append({"id": record_id(d["where"], reason), "where": d["where"], "reason": reason, "raw": d["raw"]})
    return pa.Table.from_pylist(rows, schema=REJECT)


SHARD = pa.schema([("path", pa.string()), ("rows", pa.int64()), ("sha256", pa.string()), ("bytes", pa.int64()),
                   ("stats", pa.string())])


def _write_batch(batch: pa.Table, storage: Storage, folder: str, prefix: str) -> pa.Table:
    """Write one shard (≤ shard_rows rows: the batch size); return its Shard and, for paragraphs, its stats."""
    if batch.num_rows == 0:
        return SHARD.empty_table()
    ids = batch["id"]
    # Named by content, so a retried task rewrites the same file instead of adding a second one.
    name = f"{prefix}/part-{record_id(ids[0].as_py(), ids[-1].as_py(), batch.num_rows)}.parquet"
    shard = storage.write_parquet(join(folder, name), batch)
    stats: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    if "n_tokens" in batch.column_names:
        for lang, kind, n in zip(batch["language"].to_pylist(), batch["kind"].to_pylist(),
                                 batch["n_tokens"].to_pylist()):
            s = stats[f"{lang}\t{kind}"]
            s[0] += 1
            s[1] += n
    return pa.Table.from_pylist([{"path": name, "rows": shard.rows, "sha256": shard.sha256, "bytes": shard.bytes,
                                  "stats": json.dumps(stats)}], schema=SHARD)


def _write(ds, storage: Storage, folder: str, prefix: str, shard_rows: int) -> tuple[list[Shard], dict]:
    out = ds.map_batches(_write_batch, batch_size=shard_rows, batch_format="pyarrow",
                         fn_kwargs={"storage": storage, "folder": folder, "prefix": prefix})
    shards, stats = [], defaultdict(lambda: [0, 0])
    for r in out.take_all():
        shards.append(Shard(r["path"], r["rows"], r["sha256"], r["bytes"]))
        for key, (n, t) in json.loads(r["stats"]).items():
            stats[key][0] += n
            stats[key][1] += t
    return sorted(shards, key=lambda s: s.path), stats


# --------------------------------------------------------------------------------------------------- planning
def _compression(path: str) -> str | None:
    return next((c for suffix, c in COMPRESSION.items() if path.lower().endswith(suffix)), None)


def _file_format(path: str) -> str | None:
    """The format a file's name says (case-insensitive, through a compression suffix); None: not a corpus file."""
    name = path.lower()
    if (c := _compression(name)) is not None:
        name = name[: name.rindex(".")]
        if name.endswith(".parquet"):
            return None  # parquet compresses inside; a .parquet.gz is not readable as parquet
    return next((f for f, suffixes in SUFFIXES.items() if name.endswith(suffixes)), None)


def _format(path: str, fmt: str) -> str | None:
    """The format to read ``path`` with under a source of format ``fmt``; None: skip it (and say so)."""
    found = _file_format(path)
    if fmt == "auto" or found is None:
        return found
    return fmt if found == fmt else None


def _rel(uri: str, base: str) -> str:
    base = re.split(r"[*?\[]", base, maxsplit=1)[0].rstrip("/")
    for b in (base, base.removeprefix("file://")):
        if uri.startswith(b + "/"):
            return uri[len(b) + 1:]
    return PurePosixPath(uri).name


def _is_hf(src: SourceConfig) -> bool:
    return src.format == "hf"


def _load_hf(src: SourceConfig):
    """A ``datasets.Dataset``: a folder saved with ``save_to_disk``, or anything ``load_dataset`` takes."""
    import datasets

    p = Path(src.path)
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()
                       or (p / "state.json").exists()):
        ds = datasets.load_from_disk(str(p))
        return ds[src.hf_split] if isinstance(ds, datasets.DatasetDict) else ds
    return datasets.load_dataset(src.path, data_files=src.hf_data_files, split=src.hf_split)


def _file_identity(storage: Storage, uri: str) -> list[Any]:
    info = Storage(uri, storage.endpoint_url).fs.info(uri)
    return [uri, info.get("size"), info.get("ETag") or info.get("mtime") or str(info.get("LastModified"))]


class InputPlan(NamedTuple):
    tasks: list[dict[str, Any]]  # one read task per file (or per slice of a Hugging Face dataset)
    identity: dict[str, Any]  # source → identity of every input; feeds the output fingerprint
    skipped: dict[str, list[str]]  # source → files under its path that are not of its format: reported, not read


def plan_inputs(storage: Storage, sources: list[SourceConfig]) -> InputPlan:
    tasks: list[dict[str, Any]] = []
    identity: dict[str, Any] = {}
    skipped: dict[str, list[str]] = {}
    for si, src in enumerate(sources):
        if _is_hf(src):
            ds = _load_hf(src)
            local = [src.path] if Path(src.path).exists() else [f for f in src.hf_data_files or [] if Path(f).exists()]
            ident: Any = [_file_identity(storage, f) for p in local for f in iter_files(storage, p, ("",))] or \
                [src.path, src.hf_split, getattr(ds, "_fingerprint", None)]
            identity[src.name] = ident
            tasks += [{"source_idx": si, "file_idx": 0, "uri": src.path, "rel": src.hf_split, "format": "hf",
                       "start": a, "stop": min(a + HF_ROWS_PER_TASK, len(ds))}
                      for a in range(0, len(ds), HF_ROWS_PER_TASK)]
            continue
        suffixes = SUFFIXES[src.format] if src.format != "auto" else tuple(s for v in SUFFIXES.values() for s in v)
        try:
            found = iter_files(storage, src.path, ("",))
        except FileNotFoundError:
            raise UserError(f"data.sources {src.name!r}: path {src.path} does not exist") from None
        files = [f for f in found if _format(f, src.format)]
        if len(files) < len(found):
            others = [_rel(f, src.path) for f in found if f not in set(files)]
            skipped[src.name] = others
            log.warning("collect: source %r: %d file(s) not read, not of format %s (e.g. %s)", src.name, len(others),
                        src.format, ", ".join(others[:3]))
        if not files:
            raise UserError(f"data.sources {src.name!r}: no {'/'.join(suffixes)} files under {src.path} (also "
                            f"compressed: {'/'.join(COMPRESSION)})")
        identity[src.name] = [_file_identity(storage, f) for f in files]
        tasks += [{"source_idx": si, "file_idx": fi, "uri": f, "rel": _rel(f, src.path),
                   "format": _format(f, src.format), "start": 0, "stop": 0} for fi, f in enumerate(files)]
    return InputPlan(tasks, identity, skipped)


def semantic_config(data: DataConfig) -> dict[str, Any]:
    """What decides the corpus: everything in ``data`` but the mixture's sampling knobs (priorities, epochs)."""
    d = data.model_dump(mode="json", exclude={"priorities", "epochs", "heldout_fraction"})
    for s in d["sources"]:
        s.pop("priority", None)
        s.pop("epochs", None)
    return d


# ------------------------------------------------------------------------------------------------------ stats
def _stats_rows(doc_counts: Counter, para_stats: dict) -> list[dict[str, Any]]:
    keys = sorted(set(doc_counts) | {tuple(k.split("\t")) for k in para_stats})
    rows = []
    for lang, kind in keys:
        n_par, n_tok = para_stats.get(f"{lang}\t{kind}", (0, 0))
        rows.append({"language": lang, "kind": kind, "documents": doc_counts.get((lang, kind), 0),
                     "paragraphs": n_par, "tokens": n_tok})
    return rows


def _stats_csv(rows: list[dict[str, Any]]) -> str:
    head = ["language", "kind", "documents", "paragraphs", "tokens"]
    return "\n".join([",".join(head), *[",".join(str(r[h]) for h in head) for r in rows]]) + "\n"


def plot_tokens(rows: list[dict[str, Any]]) -> bytes:
    """Tokens per language stacked by kind (the Apollo paper's Figure 1), as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    totals: Counter = Counter()
    for r in rows:
        totals[r["language"]] += r["tokens"]
    languages = [lang for lang, _ in totals.most_common()]
    kinds = sorted({r["kind"] for r in rows})
    by = {(r["language"], r["kind"]): r["tokens"] for r in rows}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(languages) + 2), 4.5))
    bottom = np.zeros(len(languages))
    cmap = plt.get_cmap("tab10")
    for i, kind in enumerate(kinds):
        vals = np.array([by.get((lang, kind), 0) for lang in languages], dtype=float)
        ax.bar(languages, vals, bottom=bottom, label=kind, color=cmap(i % 10))
        bottom += vals
    ax.set_ylabel("tokens (approx.)")
    ax.set_xlabel("language")
    ax.set_title("Corpus tokens per language, by kind")
    if kinds:
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


# -------------------------------------------------------------------------------------------------------- run
def output_uri(cfg: Config, identity: dict[str, Any]) -> tuple[str, str]:
    pii = pii_mod.semantic_config(cfg.hygiene.pii)  # None (scrubbing off) leaves the folder of before
    fp = fingerprint(STAGE, SCHEMA_VERSION, semantic_config(cfg.data), identity, *([pii] if pii else []))
    return cfg.uri("corpus", fp), fp


def run(cfg: Config) -> str:
    """Collect ``cfg.data.sources`` into ``corpus/<fp>/`` and return that folder's URI (skipped when done)."""
    import ray

    from apollo_ray.runtime import init_ray
    from apollo_ray.tracking import Tracker

    storage = Storage.from_config(cfg)
    sources = list(cfg.data.sources)
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise UserError(f"data.sources: duplicate source names in {names}")
    tasks, identity, skipped = plan_inputs(storage, sources)
    out, fp = output_uri(cfg, identity)
    if storage.has_manifest(out):
        log.info("collect: up to date (%s), skipping", out)
        return out
    storage.delete(out)  # leftovers of an interrupted attempt: this attempt rewrites the folder from scratch
    inputs = {name: fingerprint(ident) for name, ident in identity.items()}
    section = {**semantic_config(cfg.data), "pii": pii_mod.semantic_config(cfg.hygiene.pii)}

    init_ray()
    log.info("collect: %d sources, %d read tasks → %s", len(sources), len(tasks), out)
    with Tracker(cfg).stage(STAGE, inputs=inputs, output=out, section=section) as tracking:
        t0 = time.time()
        raw = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks))).map_batches(
            _read_batch, batch_size=1, batch_format="pyarrow",
            fn_kwargs={"sources": sources, "endpoint": storage.endpoint_url})
        docs = raw.map_batches(_clean_batch, batch_size=256, batch_format="pyarrow",
                               fn_kwargs={"data": cfg.data, "pii": cfg.hygiene.pii}).materialize()
        keys = pa.concat_tables(list(docs.select_columns(DEDUP_COLUMNS).iter_batches(batch_format="pyarrow")),
                                promote_options="default") if docs.count() else \
            pa.schema([DOC.field(c) for c in DEDUP_COLUMNS]).empty_table()
        t_clean = time.time() - t0
        log.info("collect: read and cleaned %d inputs in %.1fs (%.0f/s)", keys.num_rows, t_clean,
                 keys.num_rows / max(t_clean, 1e-9))
        dropped = dedup(keys, cfg.data.near_dup_threshold, cfg.data.minhash_perm)

        # counts: every input row is kept or dropped for exactly one reason
        reasons = Counter(r for r in keys["reason"].to_pylist() if r is not None)
        reasons.update(dropped.values())
        kept_mask = [r is None and o not in dropped for r, o in zip(keys["reason"].to_pylist(),
                                                                    keys["order"].to_pylist())]
        doc_counts: Counter = Counter()
        mismatches = 0
        pii_counts: Counter = Counter()  # replacements per type in the kept documents' text (what is trained on)
        pii_fields: Counter = Counter()
        for k, lang, kind, mm, p, pf in zip(kept_mask, keys["language"].to_pylist(), keys["kind"].to_pylist(),
                                            keys["language_mismatch"].to_pylist(), keys["pii"].to_pylist(),
                                            keys["pii_fields"].to_pylist()):
            if k:
                doc_counts[(lang, kind)] += 1
                mismatches += bool(mm)
                pii_counts.update(json.loads(p or "{}"))
                pii_fields.update(json.loads(pf or "{}"))
        counts = {"in": keys.num_rows, "kept": sum(kept_mask),
                  "dropped": {r: reasons[r] for r in (*CORRUPT_REASONS, *FILTER_REASONS) if reasons[r]}}

        paragraphs = docs.map_batches(_paragraph_batch, batch_format="pyarrow",
                                      fn_kwargs={"dropped": dropped, "max_tokens": cfg.data.paragraph_tokens})
        shards, para_stats = _write(paragraphs, storage, out, "paragraphs", cfg.storage.shard_rows)
        rejects = docs.map_batches(_reject_batch, batch_format="pyarrow", fn_kwargs={"dropped": dropped})
        quarantine, _ = _write(rejects, storage, out, "quarantine", cfg.storage.shard_rows)

        stats = _stats_rows(doc_counts, para_stats)
        n_par = sum(s.rows for s in shards)
        n_tok = sum(r["tokens"] for r in stats)
        elapsed = time.time() - t0
        summary = {"counts": counts, "paragraphs": n_par, "tokens": n_tok, "language_mismatch": mismatches,
                   "seconds": round(elapsed, 2), "by_language_kind": stats}
        files = {"stats": "stats.json", "stats_table": "stats.csv", "plot": "tokens_by_language.png"}
        png = plot_tokens(stats)
        storage.write_json(join(out, files["stats"]), summary)
        storage.write_text(join(out, files["stats_table"]), _stats_csv(stats))
        storage.write_bytes(join(out, files["plot"]), png)

        tracking.log_metrics({"in": counts["in"], "kept": counts["kept"], "paragraphs": n_par, "tokens": n_tok,
                              "language_mismatch": mismatches, "seconds": elapsed,
                              **{f"dropped.{r}": n for r, n in counts["dropped"].items()},
                              **{f"pii.{t}": n for t, n in pii_counts.items()}})
        with tempfile.TemporaryDirectory() as tmp:
            for name in files.values():
                Path(tmp, name).write_bytes(storage.read_bytes(join(out, name)))
                tracking.log_artifact(Path(tmp, name), STAGE)

        manifest = Manifest(
            stage=STAGE, fingerprint=fp, shards=shards, counts=counts, config=section, inputs=inputs, files=files,
            extra={"paragraphs": n_par, "tokens": n_tok, "language_mismatch": mismatches, "stats": stats,
                   "schema_version": SCHEMA_VERSION, "quarantine": [vars(s) for s in quarantine],
                   "skipped_files": skipped, "pii": dict(sorted(pii_counts.items())),
                   "pii_fields": dict(sorted(pii_fields.items()))})
        storage.write_manifest(out, manifest)
    log.info("collect: %d in, %d kept, dropped %s; %d paragraphs, %d tokens in %.1fs (%.0f docs/s) → %s",
             counts["in"], counts["kept"], counts["dropped"], n_par, n_tok, elapsed,
             counts["in"] / max(elapsed, 1e-9), out)
    return out


def read_paragraphs(storage: Storage, folder: str) -> pa.Table:
    """All PARAGRAPH rows of a collect output (through its manifest: an unfinished folder raises)."""
    tables = list(storage.iter_tables(folder))
    return pa.concat_tables(tables) if tables else PARAGRAPH.empty_table()


def read_quarantine(storage: Storage, folder: str) -> pa.Table:
    """All REJECT rows (corrupt inputs and filtered documents, each with where and reason)."""
    m = storage.read_manifest(folder)
    tables = [storage.read_parquet(join(folder, s["path"])) for s in m.extra.get("quarantine", [])]
    return pa.concat_tables(tables) if tables else REJECT.empty_table()
