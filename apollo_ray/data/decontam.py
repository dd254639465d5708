"""decontaminate: training items that overlap an evaluation benchmark are quarantined before the mixture sees them.

Between rewrite and the mixture (``trainer.run`` and the pipeline call it): ``qa/<fp>/`` in, ``decontam/<fp>/`` out,
an ITEM folder like rewrite's (``items/`` shards listed in the manifest), which ``train.dataset.build`` reads instead.

Against what: every item of every ``eval.benchmarks`` entry and of ``hygiene.decontam.extra_benchmarks``, test items
(``path``) and dev items (``dev_path``, the k-shot pool) alike, read by the evaluation's own loader.

How an item is compared (both sides normalised the same way: NFKC, case-folded, option labels "(A)" and punctuation
dropped), over *units*: a word in scripts written with spaces, a character in Chinese, Japanese kana, Thai, Lao,
Khmer and Myanmar. A text whose units are mostly characters is read in ``char_ngram``-grams, any other in
``ngram``-grams (13 words; 20 characters, about 13 Chinese words at ~1.6 characters a word: a 13-character run is
a phrase like "どのビタミンの欠乏によって", which two different questions share); a training item is probed at both
sizes.

- ``ngram_overlap``: the item (all its messages, question and answer alike) shares an n-gram with a benchmark item's
  question + options + context. An n-gram found in more than ``max_ngram_items`` benchmark items is a template
  ("which of the following is the most likely ..."), not evidence, and is left out of the index.
- ``near_verbatim``: exact 13-grams miss light edits: one changed word in ten leaves runs of nine. So the item is also
  aligned (difflib, in order, within the stretch around the shared seeds) to each benchmark question, and question
  + options, that shares enough 5-unit seeds with it; reproducing ``near_match`` of one of at least
  ``min_match_units`` units quarantines it. 0.88: "lightly edited" is at most 10 % of the words changed, which leaves
  at least 0.9 reproduced, less a margin for a changed word that splits into two units ("beta-blocker"). A benchmark text shorter than that is never matched this way (its count is in the manifest): a
  six-word question differs from its neighbour in the same template by one word, and that is not contamination.

A quarantined item keeps its reason, the benchmark item it matched best (``<benchmark>/<file stem>-<index>``, its
split and source), the evidence (the shared n-gram, or the share reproduced), how many benchmark items it matched,
and the whole item as JSON. An item whose check raises is quarantined as ``check_error``: an unchecked item is not
trained on, and the stage goes on.

Ray Data, one task per input shard: a shard (≤ storage.shard_rows items) is read, checked and written as one items
shard and one quarantine shard named by its position, so a worker holds one shard at a time whatever the corpus size,
a retried task rewrites the same files, and the items keep rewrite's order. The index is numpy arrays (sorted 64-bit
n-gram hashes and their owners, the benchmark texts' unit hashes, names as one byte blob) put in the object store
once; every worker maps the same copy (zero-copy numpy) instead of receiving it with each task. Its size is in the
manifest and in MLflow.

Output ``decontam/<fingerprint(this config, qa manifest hash, benchmark content hash)>/``; a folder with a manifest is
up to date. Counts: in = kept + quarantined by reason; per source and per benchmark in the manifest and in MLflow.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import regex

from apollo_ray.config import BenchmarkConfig, Config, DecontamConfig, fingerprint
from apollo_ray.errors import UserError
from apollo_ray.storage import Manifest, Shard, Storage, join

log = logging.getLogger(__name__)

STAGE = "decontaminate"
SCHEMA_VERSION = 1
SEED = 5  # units per seed: one changed unit in ten still leaves every other seed of a question intact
SEED_SHARE = 0.3  # a benchmark text becomes a candidate (and is aligned) when this share of its seeds is in the item
MIN_BLOCK = 1  # every aligned unit counts: the window around the shared seeds already keeps stray words out
UNIT_CACHE = 500_000  # unit → hash memo per worker, cleared when full: memory must not grow with the items
REASONS = ("ngram_overlap", "near_verbatim", "check_error")

QUARANTINE = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("language", pa.string()), ("kind", pa.string()),
    ("reason", pa.string()),
    ("benchmark", pa.string()), ("benchmark_item", pa.string()),  # "<benchmark>/<file stem>-<index>"
    ("benchmark_split", pa.string()), ("benchmark_source", pa.string()),
    ("evidence", pa.string()),  # the shared n-gram, or "<share> of question|question+options"
    ("score", pa.float64()),  # share of the benchmark text's n-grams found (ngram_overlap) or reproduced (near)
    ("matches", pa.int64()),  # benchmark items the training item matched
    ("item", pa.string()),  # the ITEM row as JSON
])

# ------------------------------------------------------------------------------------------------------------ units
_UNSPACED = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}"
_UNITS = regex.compile(rf"[{_UNSPACED}]|[[\p{{L}}\p{{M}}\p{{N}}]--[{_UNSPACED}]]+", regex.V1)
_IS_UNSPACED = regex.compile(rf"[{_UNSPACED}]")
# Option labels, "(A)" anywhere and "A." / "A)" at a line start: a benchmark's options are compared without them.
_LABELS = regex.compile(r"[(（]\s*[a-f]\s*[)）]|(?m)^\s*[a-f][.)](?=\s)")


def units(text: str) -> list[str]:
    """The comparison units of a text: words, or characters of unspaced scripts; no punctuation, case or labels."""
    t = _LABELS.sub(" ", unicodedata.normalize("NFKC", text).casefold())
    return _UNITS.findall(t)


def is_unspaced(us: list[str]) -> bool:
    return sum(1 for u in us if len(u) == 1 and _IS_UNSPACED.match(u)) * 2 > len(us)


_unit_hash_cache: dict[str, int] = {}


def unit_hashes(us: list[str]) -> np.ndarray:
    """Stable 64-bit hashes (blake2b: Python's hash() differs from one process to the next)."""
    cache = _unit_hash_cache
    out = np.empty(len(us), dtype=np.uint64)
    for i, u in enumerate(us):
        h = cache.get(u)
        if h is None:
            if len(cache) >= UNIT_CACHE:
                cache.clear()
            h = cache[u] = int.from_bytes(hashlib.blake2b(u.encode("utf-8"), digest_size=8).digest(), "little")
        out[i] = h
    return out


_MUL = np.uint64(0x9E3779B97F4A7C15)
_SALT = 0xC2B2AE3D27D4EB4F


def ngram_hashes(h: np.ndarray, n: int) -> np.ndarray:
    """Hash of every n-gram of a unit-hash sequence (a polynomial mod 2^64, salted by n so sizes never collide)."""
    m = len(h) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    acc = np.full(m, (n * _SALT) % 2**64, dtype=np.uint64)
    for k in range(n):
        acc = acc * _MUL + h[k:k + m]  # uint64 arrays wrap silently: the arithmetic is mod 2^64 on purpose
    return acc ^ (acc >> np.uint64(29))


def item_text(messages: Iterable[dict[str, Any]]) -> str:
    return "\n".join(m.get("content") or "" for m in messages or ())


# ------------------------------------------------------------------------------------------------------ benchmarks
@dataclass(frozen=True)
class BenchItem:
    uid: str  # "<benchmark>/<item id>"
    benchmark: str
    split: str  # test | dev
    source: str
    question: str
    options: tuple[str, ...]
    context: str


def benchmark_configs(cfg: Config) -> list[BenchmarkConfig]:
    benches = [*cfg.eval.benchmarks, *cfg.hygiene.decontam.extra_benchmarks]
    names = [b.name for b in benches]
    if len(set(names)) != len(names):
        raise UserError(f"hygiene.decontam.extra_benchmarks: a benchmark name is used twice in {names} (with "
                        f"eval.benchmarks)")
    return benches


def load_benchmark_items(storage: Storage, benches: list[BenchmarkConfig]) -> tuple[list[BenchItem], list[dict]]:
    """Every test and dev item of ``benches`` (no eval.limit: an item left out of a smoke run is still a test item)."""
    from apollo_ray.evaluation.benchmark import load_benchmark

    out: list[BenchItem] = []
    summary: list[dict] = []
    for b in benches:
        splits = [("test", b)]
        if b.dev_path:
            splits.append(("dev", BenchmarkConfig(name=b.name, path=b.dev_path, language=b.language)))
        for split, bc in splits:
            items, rejects = load_benchmark(bc, storage)
            prefix = f"{b.name}/" + ("dev:" if split == "dev" else "")
            out += [BenchItem(prefix + it.id, b.name, split, it.source, it.question,
                              tuple(text for _, text in it.options), it.context) for it in items]
            summary.append({"benchmark": b.name, "split": split, "path": bc.path, "items": len(items),
                            "unreadable": len(rejects)})
    return out, summary


def content_hash(items: list[BenchItem]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.uid, it.split, it.question, it.options, it.context], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------------ index
class _Strings:
    """Many strings as one UTF-8 blob + offsets: numpy, so workers map it from the object store instead of copying."""

    @staticmethod
    def pack(strings: list[str]) -> dict[str, np.ndarray]:
        data = [s.encode("utf-8") for s in strings]
        offsets = np.zeros(len(data) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(d) for d in data])
        return {"blob": np.frombuffer(b"".join(data), dtype=np.uint8) if data else np.zeros(0, np.uint8),
                "offsets": offsets}

    @staticmethod
    def get(packed: dict[str, np.ndarray], i: int) -> str:
        o = packed["offsets"]
        return packed["blob"][o[i]:o[i + 1]].tobytes().decode("utf-8")


def _sorted_keys(keys: list[np.ndarray], owners: list[np.ndarray], extra: list[np.ndarray] | None,
                 max_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """Concatenate per-item (unique) keys, drop keys owned by more than ``max_items`` items, sort by key."""
    k = np.concatenate(keys) if keys else np.empty(0, np.uint64)
    o = np.concatenate(owners) if owners else np.empty(0, np.int32)
    e = (np.concatenate(extra) if extra else np.empty(0, np.uint8)) if extra is not None else None
    uniq, inverse, counts = np.unique(k, return_inverse=True, return_counts=True)
    keep = counts[inverse] <= max_items
    dropped = int((counts > max_items).sum())
    k, o = k[keep], o[keep]
    e = e[keep] if e is not None else None
    order = np.argsort(k, kind="stable")
    return k[order], o[order].astype(np.int32), (e[order] if e is not None else None), dropped


def build_index(items: list[BenchItem], dcfg: DecontamConfig) -> dict[str, Any]:
    """The benchmark index as a dict of numpy arrays (plus a few ints): what ``ray.put`` ships once."""
    t0 = time.time()
    exact_k, exact_o, seed_k, seed_o, seed_q = [], [], [], [], []
    n_of = np.zeros(len(items), dtype=np.int16)
    q_len = np.zeros(len(items), dtype=np.int32)
    qo_len = np.zeros(len(items), dtype=np.int32)
    n_exact = np.zeros(len(items), dtype=np.int32)
    seqs: list[np.ndarray] = []
    for i, it in enumerate(items):
        q, o, c = units(it.question), units("\n".join(it.options)), units(it.context)
        n = dcfg.char_ngram if is_unspaced(q + o) else dcfg.ngram
        n_of[i] = n
        hq, ho, hc = unit_hashes(q), unit_hashes(o), unit_hashes(c)
        qo = np.concatenate([hq, ho])
        seqs.append(qo)
        q_len[i], qo_len[i] = len(hq), len(qo)
        g = np.unique(np.concatenate([ngram_hashes(np.concatenate([qo, hc]), n)]))
        n_exact[i] = len(g)
        exact_k.append(g)
        exact_o.append(np.full(len(g), i, np.int32))
        # seeds of question + options; flag 1 when the seed lies inside the question
        s = ngram_hashes(qo, SEED)
        inside = np.zeros(len(s), dtype=np.uint8)
        inside[:max(0, len(hq) - SEED + 1)] = 1
        s, first = np.unique(s, return_index=True)
        seed_k.append(s)
        seed_o.append(np.full(len(s), i, np.int32))
        seed_q.append(inside[first])
    ek, eo, _, e_drop = _sorted_keys(exact_k, exact_o, None, dcfg.max_ngram_items)
    sk, so, sq, s_drop = _sorted_keys(seed_k, seed_o, seed_q, dcfg.max_ngram_items)
    # seeds each benchmark text has left after the template filter: the denominators of the candidate test
    seeds_q = np.bincount(so[sq == 1], minlength=len(items)).astype(np.int32)
    seeds_qo = np.bincount(so, minlength=len(items)).astype(np.int32)
    exact_left = np.bincount(eo, minlength=len(items)).astype(np.int32)
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    names = sorted({it.benchmark for it in items})
    index = {
        "exact_keys": ek, "exact_owner": eo, "seed_keys": sk, "seed_owner": so, "seed_in_q": sq,
        "seeds_q": seeds_q, "seeds_qo": seeds_qo, "n_exact": n_exact, "exact_left": exact_left,
        "n": n_of, "q_len": q_len, "qo_len": qo_len,
        "units": np.concatenate(seqs) if seqs else np.empty(0, np.uint64), "units_offsets": offsets,
        "uid": _Strings.pack([it.uid for it in items]), "source": _Strings.pack([it.source for it in items]),
        "bench": np.array([names.index(it.benchmark) for it in items], dtype=np.int16),
        "split": np.array([it.split == "dev" for it in items], dtype=np.uint8),
        "bench_names": _Strings.pack(names),
        "sizes": np.array(sorted({dcfg.ngram, dcfg.char_ngram}), dtype=np.int32),
        "near_match": np.float64(dcfg.near_match), "min_match_units": np.int32(dcfg.min_match_units),
    }
    index["stats"] = {"items": len(items), "ngrams": int(len(ek)), "seeds": int(len(sk)),
                      "template_ngrams_dropped": e_drop, "template_seeds_dropped": s_drop,
                      "build_seconds": round(time.time() - t0, 3)}
    return index


def index_bytes(index: dict[str, Any]) -> int:
    def size(v: Any) -> int:
        if isinstance(v, np.ndarray):
            return v.nbytes
        if isinstance(v, dict):
            return sum(size(x) for x in v.values())
        return 0
    return size(index)


@dataclass
class Match:
    reason: str
    owner: int  # benchmark item index
    score: float
    evidence: str
    matches: int


class Matcher:
    """Checks one training text against the index (in a worker: the arrays are the object store's)."""

    def __init__(self, index: dict[str, Any]):
        self.x = index
        self.names = [_Strings.get(index["bench_names"], i) for i in range(len(index["bench_names"]["offsets"]) - 1)]

    def describe(self, owner: int) -> dict[str, str]:
        x = self.x
        return {"benchmark": self.names[int(x["bench"][owner])], "benchmark_item": _Strings.get(x["uid"], owner),
                "benchmark_split": "dev" if x["split"][owner] else "test",
                "benchmark_source": _Strings.get(x["source"], owner)}

    @staticmethod
    def _lookup(keys: np.ndarray, grams: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positions in ``grams`` that hit, their [lo, hi) ranges in ``keys``)."""
        if not len(keys) or not len(grams):
            e = np.empty(0, np.int64)
            return e, e, e
        lo = np.searchsorted(keys, grams, side="left")
        hi = np.searchsorted(keys, grams, side="right")
        hit = np.flatnonzero(hi > lo)
        return hit, lo[hit], hi[hit]

    def check(self, text: str) -> Match | None:
        x = self.x
        us = units(text)
        if len(us) < SEED:
            return None
        h = unit_hashes(us)
        shared: Counter = Counter()  # benchmark item → n-grams shared
        first_at: dict[int, tuple[int, int]] = {}
        for n in x["sizes"].tolist():
            grams = ngram_hashes(h, n)
            hit, lo, hi = self._lookup(x["exact_keys"], grams)
            seen: set[tuple[int, int]] = set()
            for p, a, b in zip(hit.tolist(), lo.tolist(), hi.tolist()):
                for owner in x["exact_owner"][a:b].tolist():
                    if x["n"][owner] != n or (owner, int(grams[p])) in seen:
                        continue
                    seen.add((owner, int(grams[p])))
                    shared[owner] += 1
                    first_at.setdefault(owner, (p, n))
        near = self._near(us, h)
        matched = set(shared) | {o for o, _, _ in near}
        if shared:
            owner = max(shared, key=lambda o: (shared[o] / max(1, x["exact_left"][o]), -o))
            p, n = first_at[owner]
            gram = us[p:p + n]
            sep = "" if is_unspaced(gram) else " "
            return Match("ngram_overlap", owner, round(shared[owner] / max(1, int(x["exact_left"][owner])), 4),
                         sep.join(gram), len(matched))
        if near:
            owner, share, what = max(near, key=lambda t: (t[1], -t[0]))
            return Match("near_verbatim", owner, round(share, 4), f"{share:.2f} of {what}", len(matched))
        return None

    def _near(self, us: list[str], h: np.ndarray) -> list[tuple[int, float, str]]:
        x = self.x
        if float(x["near_match"]) <= 0:
            return []
        grams = ngram_hashes(h, SEED)
        hit, lo, hi = self._lookup(x["seed_keys"], grams)
        got_q: dict[int, set] = defaultdict(set)
        got_qo: dict[int, set] = defaultdict(set)
        where: dict[int, list[int]] = defaultdict(list)
        for p, a, b in zip(hit.tolist(), lo.tolist(), hi.tolist()):
            g = int(grams[p])
            for owner, in_q in zip(x["seed_owner"][a:b].tolist(), x["seed_in_q"][a:b].tolist()):
                got_qo[owner].add(g)
                if in_q:
                    got_q[owner].add(g)
                where[owner].append(p)
        out = []
        min_units = int(x["min_match_units"])
        for owner, seeds in got_qo.items():
            q_len, qo_len = int(x["q_len"][owner]), int(x["qo_len"][owner])
            segments = []
            if q_len >= min_units and len(got_q[owner]) >= SEED_SHARE * max(1, int(x["seeds_q"][owner])):
                segments.append(("question", q_len))
            if qo_len >= min_units and qo_len > q_len and len(seeds) >= SEED_SHARE * max(1, int(x["seeds_qo"][owner])):
                segments.append(("question+options", qo_len))
            if not segments:
                continue
            a0 = int(x["units_offsets"][owner])
            ref = x["units"][a0:a0 + qo_len].tolist()
            pos = where[owner]
            for what, length in segments:
                # only the stretch of the item around the seeds it shares: a long answer's stray common words elsewhere
                # must not add up to a "reproduction"
                lo_, hi_ = max(0, min(pos) - length), min(len(h), max(pos) + SEED + length)
                window = h[lo_:hi_].tolist()
                sm = difflib.SequenceMatcher(None, ref[:length], window, autojunk=False)
                share = sum(b.size for b in sm.get_matching_blocks() if b.size >= MIN_BLOCK) / length
                if share >= float(x["near_match"]):
                    out.append((owner, share, what))
                    break
        return out


# -------------------------------------------------------------------------------------------------------- workers
_INDEX: dict[str, Matcher] = {}


def _matcher(holder: list) -> Matcher:
    """The index of this worker process: fetched from the object store once (zero-copy numpy), then reused."""
    import ray

    ref = holder[0]
    key = ref.hex() if hasattr(ref, "hex") else str(id(ref))
    if key not in _INDEX:
        _INDEX.clear()  # one index at a time: a finished run's must not stay mapped
        _INDEX[key] = Matcher(ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref)
    return _INDEX[key]


SUMMARY = pa.schema([("pos", pa.int64()), ("items", pa.string()), ("quarantine", pa.string()),
                     ("counts", pa.string()), ("seconds", pa.float64())])


def check_table(items: pa.Table, matcher: Matcher) -> tuple[list[int], list[dict[str, Any]], dict[str, Any]]:
    """(row numbers of the clean items, quarantine rows, counts) for one table of ITEM rows."""
    clean: list[int] = []
    quarantine: list[dict[str, Any]] = []
    by_source: dict[str, Counter] = defaultdict(Counter)
    by_bench: dict[str, Counter] = defaultdict(Counter)
    bench_items: dict[str, set] = defaultdict(set)
    for i, row in enumerate(items.to_pylist()):
        src = row.get("source") or ""
        by_source[src]["in"] += 1
        try:
            m = matcher.check(item_text(row.get("messages")))
        except Exception as e:  # one item never stops the stage; unchecked, it is not trained on
            log.warning("decontaminate: item %s cannot be checked (%s: %s); quarantined", row.get("id"),
                        type(e).__name__, e)
            m, err = None, f"{type(e).__name__}: {e}"
            quarantine.append({"id": row.get("id"), "source": src, "language": row.get("language"),
                               "kind": row.get("kind"), "reason": "check_error", "benchmark": None,
                               "benchmark_item": None, "benchmark_split": None, "benchmark_source": None,
                               "evidence": err[:500], "score": None, "matches": 0,
                               "item": json.dumps(row, ensure_ascii=False, default=str)})
            by_source[src]["check_error"] += 1
            continue
        if m is None:
            clean.append(i)
            by_source[src]["kept"] += 1
            continue
        d = matcher.describe(m.owner)
        quarantine.append({"id": row.get("id"), "source": src, "language": row.get("language"),
                           "kind": row.get("kind"), "reason": m.reason, **d, "evidence": m.evidence[:500],
                           "score": m.score, "matches": m.matches,
                           "item": json.dumps(row, ensure_ascii=False, default=str)})
        by_source[src][m.reason] += 1
        by_bench[d["benchmark"]][m.reason] += 1
        bench_items[d["benchmark"]].add(d["benchmark_item"])
    counts = {"by_source": {k: dict(v) for k, v in by_source.items()},
              "by_benchmark": {k: dict(v) for k, v in by_bench.items()},
              "benchmark_items": {k: sorted(v) for k, v in bench_items.items()}}
    return clean, quarantine, counts


def _check_shard(batch: pa.Table, storage: Storage, qa: str, out: str, holder: list) -> pa.Table:
    matcher = _matcher(holder)
    rows = []
    for task in batch.to_pylist():
        t0 = time.time()
        items = storage.read_parquet(join(qa, task["path"]))
        clean, quarantine, counts = check_table(items, matcher)
        pos = task["pos"]
        shards: dict[str, str | None] = {"items": None, "quarantine": None}
        if clean:
            s = storage.write_parquet(join(out, f"items/part-{pos:05d}.parquet"), items.take(clean))
            shards["items"] = json.dumps(vars(s.relative_to(out)))
        if quarantine:
            s = storage.write_parquet(join(out, f"quarantine/part-{pos:05d}.parquet"),
                                      pa.Table.from_pylist(quarantine, schema=QUARANTINE))
            shards["quarantine"] = json.dumps(vars(s.relative_to(out)))
        rows.append({"pos": pos, **shards, "counts": json.dumps(counts), "seconds": time.time() - t0})
    return pa.Table.from_pylist(rows, schema=SUMMARY)


# ------------------------------------------------------------------------------------------------------------ stage
def semantic_config(dcfg: DecontamConfig) -> dict[str, Any]:
    """What decides the output besides the inputs; the benchmarks enter through their content hash."""
    d = dcfg.model_dump(mode="json", exclude={"enabled", "extra_benchmarks"})
    d.update(seed=SEED, seed_share=SEED_SHARE, min_block=MIN_BLOCK)
    return d


def run(cfg: Config, qa: str | None = None) -> str:
    """Decontaminate the items of ``qa`` (default: rewrite's output) into ``decontam/<fp>/``; return the folder the
    mixture reads: that one, or ``qa`` itself when the stage is off or ``qa`` is already decontaminated."""
    storage = Storage.from_config(cfg)
    if qa is None:
        from apollo_ray.data import rewrite

        qa = rewrite.run(cfg)
    dcfg = cfg.hygiene.decontam
    qm = storage.read_manifest(qa)
    if qm.stage == STAGE:
        return qa
    if not dcfg.enabled:
        log.info("decontaminate: off (hygiene.decontam.enabled=false); the mixture reads %s", qa)
        return qa
    benches = benchmark_configs(cfg)
    if not benches:
        log.warning("decontaminate: no benchmark configured (eval.benchmarks, hygiene.decontam.extra_benchmarks): "
                    "nothing to decontaminate against; the mixture reads %s", qa)
        return qa
    t0 = time.time()
    bench_items, bench_summary = load_benchmark_items(storage, benches)
    bench_hash = content_hash(bench_items)
    section = semantic_config(dcfg)
    fp = fingerprint(STAGE, SCHEMA_VERSION, section, qm.hash, bench_hash)
    out = cfg.uri("decontam", fp)
    if storage.has_manifest(out):
        log.info("decontaminate: up to date (%s), skipping", out)
        return out
    storage.delete(out)  # leftovers of an interrupted attempt

    import ray

    from apollo_ray.runtime import init_ray
    from apollo_ray.tracking import Tracker

    init_ray()
    index = build_index(bench_items, dcfg)
    nbytes = index_bytes(index)
    stats = index.pop("stats")
    too_short = _too_short(index, bench_items, dcfg)
    log.info("decontaminate: index of %d benchmark items (%s): %d n-grams, %d seeds, %.1f MiB, built in %.2fs; "
             "%d items in %s → %s", len(bench_items), ", ".join(sorted({b.name for b in benches})), stats["ngrams"],
             stats["seeds"], nbytes / 2**20, stats["build_seconds"], qm.rows, qa, out)
    inputs = {"qa": qm.hash, "benchmarks": bench_hash}
    with Tracker(cfg).stage(STAGE, inputs=inputs, output=out, section={**section, "benchmarks": [
            b.model_dump(mode="json") for b in benches]}) as tracked:
        holder = [ray.put(index)]  # once, in the object store; tasks carry the reference only
        del index
        tasks = [{"path": s.path, "pos": k} for k, s in enumerate(qm.shards)]
        t_check = time.time()
        summaries: list[dict[str, Any]] = []
        if tasks:
            ds = ray.data.from_items(tasks, override_num_blocks=len(tasks)).map_batches(
                _check_shard, batch_size=1, batch_format="pyarrow",
                fn_kwargs={"storage": storage, "qa": qa, "out": out, "holder": holder})
            summaries = sorted(ds.take_all(), key=lambda r: r["pos"])
        check_seconds = time.time() - t_check
        manifest = _manifest(fp, section, inputs, qa, qm, summaries, bench_summary, too_short,
                             {**stats, "bytes": nbytes}, check_seconds)
        c, x = manifest.counts, manifest.extra
        tracked.log_metrics({
            "in": c["in"], "kept": c["kept"], **{f"dropped.{r}": n for r, n in c["dropped"].items()},
            **{f"contaminated.source.{s}": v["quarantined"] for s, v in x["by_source"].items()},
            **{f"contaminated.benchmark.{b}": v["training_items"] for b, v in x["by_benchmark"].items()},
            "index_bytes": nbytes, "index_items": len(bench_items), "index_build_seconds": stats["build_seconds"],
            "items_per_s": x["items_per_s"], "seconds": time.time() - t0})
        storage.write_manifest(out, manifest)
        tracked.set_tags({"apollo.output_manifest": manifest.hash})
    log.info("decontaminate: %d in, %d kept, quarantined %s (by benchmark %s) in %.1fs (%.0f items/s) → %s", c["in"],
             c["kept"], c["dropped"], {b: v["training_items"] for b, v in x["by_benchmark"].items()},
             time.time() - t0, x["items_per_s"], out)
    return out


def _too_short(index: dict[str, Any], items: list[BenchItem], dcfg: DecontamConfig) -> dict[str, int]:
    """Per benchmark: items that neither rule can match (no n-gram of their size, and too short to align)."""
    out: Counter = Counter()
    no_ngram = index["n_exact"] == 0
    short = index["qo_len"] < dcfg.min_match_units
    for i in np.flatnonzero(no_ngram & short).tolist():
        out[items[i].benchmark] += 1
    return dict(out)


def _manifest(fp: str, section: dict, inputs: dict, qa: str, qm: Manifest, summaries: list[dict],
              bench_summary: list[dict], too_short: dict[str, int], index: dict, seconds: float) -> Manifest:
    shards, quarantine = [], []
    by_source: dict[str, Counter] = defaultdict(Counter)
    by_bench: dict[str, Counter] = defaultdict(Counter)
    bench_items: dict[str, set] = defaultdict(set)
    for s in summaries:
        if s["items"]:
            shards.append(Shard(**json.loads(s["items"])))
        if s["quarantine"]:
            quarantine.append(json.loads(s["quarantine"]))
        c = json.loads(s["counts"])
        for src, v in c["by_source"].items():
            by_source[src].update(v)
        for b, v in c["by_benchmark"].items():
            by_bench[b].update(v)
        for b, v in c["benchmark_items"].items():
            bench_items[b].update(v)
    n_in = sum(v["in"] for v in by_source.values())
    if n_in != qm.rows:
        raise RuntimeError(f"decontaminate: {n_in} items checked but {qa} lists {qm.rows}")
    dropped = Counter()
    for v in by_source.values():
        dropped.update({r: v[r] for r in REASONS if v[r]})
    kept = sum(v["kept"] for v in by_source.values())
    names = sorted({b["benchmark"] for b in bench_summary})
    return Manifest(
        stage=STAGE, fingerprint=fp, shards=shards,
        counts={"in": n_in, "kept": kept, "dropped": dict(sorted(dropped.items()))},
        config=section, inputs=inputs,
        extra={"qa_uri": qa, "quarantine": quarantine, "benchmarks": bench_summary,
               "benchmark_names": names,
               "by_source": {s: {"in": v["in"], "kept": v["kept"], "quarantined": v["in"] - v["kept"],
                                 **{r: v[r] for r in REASONS if v[r]}} for s, v in sorted(by_source.items())},
               "by_benchmark": {b: {"training_items": sum(by_bench[b].values()),
                                    "benchmark_items": len(bench_items[b]),
                                    **{r: by_bench[b][r] for r in REASONS if by_bench[b][r]},
                                    "too_short_to_match": too_short.get(b, 0)} for b in names},
               "index": index, "items_per_s": round(n_in / max(seconds, 1e-9), 1), "check_seconds": round(seconds, 2)})


def read_quarantine(storage: Storage, folder: str) -> pa.Table:
    m = storage.read_manifest(folder)
    tables = [storage.read_parquet(join(folder, s["path"])) for s in m.extra.get("quarantine", [])]
    return pa.concat_tables(tables) if tables else QUARANTINE.empty_table()


# ------------------------------------------------------------------------------------------------------ eval note
def table_note(cfg: Config, storage: Storage, refs: list) -> str:
    """One line under the evaluation table: which benchmarks each evaluated model's training data was decontaminated
    against, followed through the manifests (model → mixture → decontam); '' when no model has that lineage."""
    lines = []
    for ref in refs:
        names = _decontaminated_against(cfg, storage, ref)
        if names is not None:
            lines.append(f"{ref.name}: " + (", ".join(names) if names else "not decontaminated"))
    return ("\n\nTraining data decontaminated against (n-gram / near-verbatim): " + "; ".join(lines) + "\n") \
        if lines else ""


def _decontaminated_against(cfg: Config, storage: Storage, ref: Any) -> list[str] | None:
    if not getattr(ref, "manifest_hash", None):
        return None  # a hub model or a bare folder: its training data is not ours to tell
    try:
        st = Storage(ref.location, cfg.storage.endpoint_url)
        mix_hash = st.read_manifest(ref.location).inputs.get("mixture")
        mix = _find(storage, cfg.uri("mixture"), mix_hash)
        if mix is None:
            return None
        source = _find(storage, cfg.uri("decontam"), mix.inputs.get("qa"))
        return list(source.extra.get("benchmark_names", [])) if source is not None else []
    except Exception as e:  # a note must never fail an evaluation
        log.warning("decontaminate: cannot trace %s to its training data (%s)", ref.name, e)
        return None


def _find(storage: Storage, parent: str, manifest_hash: str | None) -> Manifest | None:
    """The manifest under ``parent``/* whose hash is ``manifest_hash`` (a handful of folders: a scan is enough)."""
    if not manifest_hash:
        return None
    for folder in storage.ls(parent):
        if storage.has_manifest(folder):
            m = storage.read_manifest(folder)
            if m.hash == manifest_hash:
                return m
    return None
