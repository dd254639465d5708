"""XMedBench-format benchmarks: multiple-choice items in, typed ``Item`` records and explicit rejects out.

A benchmark is a JSON list (or JSON lines) of ``{question, options, answer, source, context?, language?}``, one file
per language (``en.json``) or mixed, on a local path or any fsspec URI (``s3://``); or a Hugging Face dataset
(``hf://<id or local path>[:split]``, or any path that is neither a local file nor a URI).

``options`` is the XMedBench string ``"(A) ...\\n(B) ..."`` (lines without a label continue the previous option: two
real en dev items end with a stray ``"."`` line), a list of texts, or a ``{"A": text}`` dict; 2 to 6 options, lettered
from A without gaps. ``answer`` is ``"(B)"``, ``"B"``, a 0-based int, or several letters (``"(ACE)"``: four cmexam
items of the zh dev split). The reference scores a multi-letter item against its first letter (``answer[1]``), so
``Item.answer`` is that letter and ``Item.answers`` keeps all of them.

The language of an item is, first to last: its own ``language`` field, ``BenchmarkConfig.language``, the file name
stem when it is one of the 50 codes. An item nothing names a language for is a reject, as is any item that cannot be
parsed; every input item ends up either in ``items`` or in ``rejects`` (file, index, reason, raw input).
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping

from apollo_ray import languages as langs
from apollo_ray.config import BenchmarkConfig
from apollo_ray.errors import UserError
from apollo_ray.storage import Storage, filesystem, iter_files

LETTERS = "ABCDEF"
MIN_OPTIONS, MAX_OPTIONS = 2, 6
SUFFIXES = (".json", ".jsonl")
HF_PREFIX = "hf://"
DEFAULT_HF_SPLIT = "test"

_LABEL = re.compile(r"^\s*[（(]([A-Za-z])[）)]\s?(.*)$", re.S)
_ANSWER = re.compile(r"^\s*[（(]?\s*([A-Fa-f]+)\s*[）)]?\s*\.?\s*$")


@dataclass(frozen=True)
class Item:
    id: str  # "<file stem>-<index>", stable across runs
    language: str
    source: str
    question: str
    options: tuple[tuple[str, str], ...]  # ((letter, text), ...), letters A.. without gaps
    answer: str  # the letter the reference scores against (the first one of a multi-letter answer)
    context: str = ""
    answers: tuple[str, ...] = ()  # every correct letter; () means (answer,)
    # The record's own strings where they differ from the parsed ones (None: the same). The apollo protocol renders
    # prompts from these, byte for byte as the reference formats the record (12 en dev questions end in whitespace).
    raw_question: str | None = None
    raw_options: str | None = None
    raw_context: str | None = None

    def __post_init__(self) -> None:
        if not self.answers:
            object.__setattr__(self, "answers", (self.answer,))

    @property
    def letters(self) -> tuple[str, ...]:
        return tuple(letter for letter, _ in self.options)

    def options_text(self) -> str:
        """The XMedBench rendering; reproduces the source string for every dev item."""
        return "\n".join(f"({letter}) {text}" for letter, text in self.options)

    @property
    def verbatim(self) -> tuple[str, str, str]:
        """(question, options, context) as the record spelled them: what the reference's ``str.format`` inserts."""
        return (self.question if self.raw_question is None else self.raw_question,
                self.options_text() if self.raw_options is None else self.raw_options,
                self.context if self.raw_context is None else self.raw_context)

    def to_dict(self) -> dict[str, Any]:
        """A plain row (lists, no tuples) for Ray Data and JSON; ``from_dict`` inverts it."""
        d = asdict(self)
        d["options"] = [list(o) for o in self.options]
        d["answers"] = list(self.answers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Item":
        return cls(**{**d, "options": tuple((str(a), str(b)) for a, b in d["options"]),
                      "answers": tuple(d.get("answers") or ())})


@dataclass(frozen=True)
class Reject:
    file: str
    index: int | None  # None when the whole file is unreadable
    reason: str
    raw: str = ""  # the input as read, truncated, so a reject can be inspected without the file


class ItemError(ValueError):
    """An item that cannot become an ``Item``; the message is the reject reason."""


# ---------------------------------------------------------------------------------------------------------- parsing
def parse_options(options: Any) -> tuple[tuple[str, str], ...]:
    """``"(A) x\\n(B) y"``, ``["x", "y"]`` or ``{"A": "x", "B": "y"}`` → ``(("A", "x"), ("B", "y"))``."""
    if isinstance(options, str):
        pairs = _parse_options_text(options)
    elif isinstance(options, (list, tuple)):
        pairs = []
        for i, text in enumerate(options):
            if not isinstance(text, str):
                raise ItemError(f"option {i} is {type(text).__name__}, not text")
            m = _LABEL.match(text)
            # a list entry may carry its own label; keep it only when it is the expected one
            pairs.append((LETTERS[i] if i < len(LETTERS) else "?",
                          m.group(2) if m and m.group(1).upper() == LETTERS[i:i + 1] else text))
    elif isinstance(options, Mapping):
        pairs = []
        for key, text in options.items():
            letter = str(key).strip().strip("()（）").upper()
            if len(letter) != 1 or not isinstance(text, str):
                raise ItemError(f"bad option entry {key!r}: {text!r}")
            pairs.append((letter, text))
        pairs.sort()
    else:
        raise ItemError(f"options is {type(options).__name__}, expected text, list or dict")
    if not MIN_OPTIONS <= len(pairs) <= MAX_OPTIONS:
        raise ItemError(f"{len(pairs)} options, expected {MIN_OPTIONS} to {MAX_OPTIONS}")
    letters = "".join(letter for letter, _ in pairs)
    if letters != LETTERS[:len(pairs)]:
        raise ItemError(f"option letters {letters!r} are not {LETTERS[:len(pairs)]!r}")
    out = tuple(pairs)
    empty = [letter for letter, text in out if not text.strip()]
    if empty:
        raise ItemError(f"option {empty[0]} is empty")
    return out


def _parse_options_text(text: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for line in text.strip().split("\n"):
        m = _LABEL.match(line)
        if m:
            pairs.append((m.group(1).upper(), m.group(2)))
        elif pairs:
            pairs[-1] = (pairs[-1][0], pairs[-1][1] + "\n" + line)
        elif line.strip():
            raise ItemError(f"options text does not start with a label like '(A)': {line[:40]!r}")
    return pairs


def parse_answer(answer: Any, letters: tuple[str, ...]) -> tuple[str, ...]:
    """``"(B)"``, ``"B"``, ``"(ACE)"`` or a 0-based int → the correct letters, each one of ``letters``."""
    if isinstance(answer, bool):
        raise ItemError(f"answer {answer!r} is not a letter")
    if isinstance(answer, int):
        if not 0 <= answer < len(letters):
            raise ItemError(f"answer index {answer} not among options {''.join(letters)}")
        return (letters[answer],)
    if not isinstance(answer, str):
        raise ItemError(f"answer is {type(answer).__name__}, expected text like '(B)'")
    m = _ANSWER.match(answer)
    if not m:
        raise ItemError(f"answer {answer!r} is not a letter like '(B)'")
    found = tuple(dict.fromkeys(m.group(1).upper()))
    missing = [a for a in found if a not in letters]
    if missing:
        raise ItemError(f"answer letter {missing[0]} not among options {''.join(letters)}")
    return found


def parse_item(raw: Any, *, item_id: str, language: str | None, default_source: str) -> Item:
    """One raw record → ``Item``; raises ``ItemError`` with the reason when it cannot."""
    if not isinstance(raw, Mapping):
        raise ItemError(f"item is {type(raw).__name__}, expected an object")
    question = raw.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ItemError("missing question")
    if "options" in raw:
        options = parse_options(raw["options"])
    elif "choices" in raw:
        options = parse_options(raw["choices"])
    else:
        raise ItemError("missing options")
    if raw.get("answer") is None:
        raise ItemError("missing answer")
    answers = parse_answer(raw["answer"], tuple(letter for letter, _ in options))
    lang = raw.get("language") or language
    if not lang:
        raise ItemError("no language: not in the item, the benchmark config or the file name")
    try:
        lang = langs.canonical(str(lang))
    except langs.UnknownLanguage as e:
        raise ItemError(f"unknown language {lang!r}") from e
    source = raw.get("source") or default_source
    context = raw.get("context") or ""
    if not isinstance(source, str) or not isinstance(context, str):
        raise ItemError("source and context must be text")
    raw_options = raw.get("options", raw.get("choices"))
    item = Item(id=item_id, language=lang, source=source, question=question.strip(), options=options,
                answer=answers[0], context=context.strip(), answers=answers)
    return replace(item, raw_question=None if question == item.question else question,
                   raw_options=raw_options if isinstance(raw_options, str) and raw_options != item.options_text()
                   else None,
                   raw_context=None if context == item.context else context)


# ---------------------------------------------------------------------------------------------------------- loading
@dataclass
class _Collector:
    language: str | None
    default_source: str
    items: list[Item] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)

    def add(self, records: Iterable[tuple[int, Any]], *, file: str, stem: str, language: str | None) -> None:
        for index, raw in records:
            if isinstance(raw, _BadLine):
                self.rejects.append(Reject(file, index, f"bad JSON: {raw.error}", raw.line[:2000]))
                continue
            try:
                self.items.append(parse_item(raw, item_id=f"{stem}-{index}", language=language,
                                             default_source=self.default_source))
            except ItemError as e:
                self.rejects.append(Reject(file, index, str(e), _raw(raw)))


def load_benchmark(cfg_bench: BenchmarkConfig, storage: Storage, *,
                   limit: int | None = None) -> tuple[list[Item], list[Reject]]:
    """Every item of the benchmark, and every input record that could not become one (never dropped silently).

    ``limit`` keeps the first N records of each file (smoke runs); records past it are neither items nor rejects.
    """
    cfg_lang = langs.canonical(cfg_bench.language) if cfg_bench.language else None
    out = _Collector(cfg_lang, cfg_bench.name)
    path = cfg_bench.path
    if path.startswith(HF_PREFIX):
        try:
            _load_hf(path[len(HF_PREFIX):], out, limit)
        except (FileNotFoundError, ConnectionError) as e:
            raise UserError(f"eval.benchmarks {cfg_bench.name!r}: cannot load {path!r}: {e}") from e
        return out.items, out.rejects
    files = _json_files(path, storage)
    if files is None:
        if path.startswith(("/", "./", "../", "~", "file://")) and not Path(path.removeprefix("file://")).exists():
            raise UserError(f"eval.benchmarks {cfg_bench.name!r}: path {path} does not exist")
        try:
            _load_hf(path, out, limit)
        except (FileNotFoundError, ConnectionError) as e:  # a wrong id (DatasetNotFoundError is one), or no hub
            raise UserError(f"eval.benchmarks {cfg_bench.name!r}: cannot load {path!r} as a dataset: {e}") from e
        return out.items, out.rejects
    for uri, rel in zip(files, _stems(files)):
        stem = str(rel.with_suffix(""))
        lang = cfg_lang or _language_from_stem(rel.stem)
        try:
            records = _read_records(uri, storage)
        except ValueError as e:
            out.rejects.append(Reject(uri, None, f"bad JSON: {e}"))
            continue
        out.add(records[:limit] if limit else records, file=uri, stem=stem, language=lang)
    return out.items, out.rejects


def load_shot_pool(cfg_bench: BenchmarkConfig, storage: Storage,
                   items: list[Item]) -> tuple[list[Item], list[Reject]]:
    """Where k-shot examples come from: ``dev_path`` when set (with the benchmark's language), else the items."""
    if not cfg_bench.dev_path:
        return items, []
    dev = BenchmarkConfig(name=cfg_bench.name, path=cfg_bench.dev_path, language=cfg_bench.language)
    return load_benchmark(dev, storage)


def _json_files(path: str, storage: Storage) -> list[str] | None:
    """JSON files under ``path``; None when ``path`` is a Hugging Face dataset rather than JSON files."""
    remote = "://" in path and not path.startswith("file://")
    try:
        files = iter_files(storage, path, SUFFIXES)
    except FileNotFoundError:
        if remote:
            raise
        return None  # not a local path: a hub id
    if files:
        return files
    if remote:
        raise UserError(f"no {' or '.join(SUFFIXES)} files under {path}")
    return None  # a local folder of parquet/csv: let `datasets` read it


def _stems(files: list[str]) -> list[PurePosixPath]:
    """Each file relative to the deepest folder they share, e.g. ``en.json`` or ``test/en.json``."""
    paths = [PurePosixPath(f.split("://", 1)[-1]) for f in files]
    common = posixpath.commonpath([str(p.parent) for p in paths])
    return [p.relative_to(common) for p in paths]


def _read_records(uri: str, storage: Storage) -> list[tuple[int, Any]]:
    data = _read_bytes(uri, storage).decode("utf-8-sig")
    if uri.endswith(".jsonl"):
        records: list[tuple[int, Any]] = []
        for i, line in enumerate(data.splitlines()):
            if line.strip():
                try:
                    records.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    records.append((i, _BadLine(line, str(e))))
        return records
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(str(e)) from e
    if not isinstance(obj, list):
        raise ValueError(f"top level is {type(obj).__name__}, expected a list of items")
    return list(enumerate(obj))


def _read_bytes(uri: str, storage: Storage) -> bytes:
    root_proto = storage.root.split("://", 1)[0] if "://" in storage.root else "file"
    proto = uri.split("://", 1)[0] if "://" in uri else "file"
    fs = storage.fs if proto == root_proto else filesystem(uri, storage.endpoint_url)
    return fs.cat_file(uri)


def _load_hf(spec: str, out: _Collector, limit: int | None) -> None:
    import datasets

    path, split = _hf_split(spec)
    ds = datasets.load_dataset(path, split=split)
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    stem = split
    out.add(enumerate(ds), file=f"{HF_PREFIX}{path}:{split}", stem=stem, language=out.language)


def _hf_split(spec: str) -> tuple[str, str]:
    head, sep, tail = spec.rpartition(":")
    if sep and tail and "/" not in tail and not tail.startswith("\\"):
        return head, tail
    return spec, DEFAULT_HF_SPLIT


def _language_from_stem(stem: str) -> str | None:
    return langs.canonical(stem) if langs.is_known(stem) else None


@dataclass(frozen=True)
class _BadLine:
    line: str
    error: str


def _raw(raw: Any, limit: int = 2000) -> str:
    try:
        text = json.dumps(raw, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(raw)
    return text[:limit]
