"""The mixture stage: QA and instruction items → the drawn order → packed rows in ``mixture/<fp>/``.

Runs once per (input manifest, priorities, epochs, tokenizer, seq_len, seed); the trainer only reads packed rows, so
every data-parallel rank, every restart and every Tune trial trains on exactly the same bytes. Tokenization runs on
Ray Data (it is the costly part on real corpora); the draw and the packing need the global order and run here.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from apollo_ray import languages as langs
from apollo_ray.config import Config, fingerprint
from apollo_ray.data.mixture import priority_order, render_item
from apollo_ray.data.records import record_id
from apollo_ray.errors import UserError
from apollo_ray.storage import Manifest, Storage
from apollo_ray.train.packing import Doc, PackResult, pack

log = logging.getLogger(__name__)
SCHEMA_VERSION = "mixture-v2"  # v2: documents cut across rows only when it saves rows; 64-row row groups
ROW_SCHEMA = pa.schema([
    ("row", pa.int64()),
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("position_ids", pa.list_(pa.int32())),
    ("language_ids", pa.list_(pa.int16())),  # expert id of the token's language (−1: padding / no expert)
    ("lang_index", pa.list_(pa.int16())),    # index into manifest.extra["languages"] (−1: padding), for metrics
    ("kind_index", pa.list_(pa.int16())),    # index into manifest.extra["kinds"]
    ("items", pa.list_(pa.string())),        # ids of the items (pieces) in the row, in order
])


@dataclass
class Tokenized:
    ids: list[list[int]]
    labels: list[list[int]]


def _tokenize_batch(batch: dict, tokenizer_path: str) -> dict:
    from transformers import AutoTokenizer

    tok = _TOKENIZERS.get(tokenizer_path) or _TOKENIZERS.setdefault(tokenizer_path,
                                                                     AutoTokenizer.from_pretrained(tokenizer_path))
    ids, labels, errors = [], [], []
    for messages in batch["messages"]:
        try:
            i, lab = render_item({"messages": list(messages)}, tok)
            ids.append(np.asarray(i, dtype=np.int32))
            labels.append(np.asarray(lab, dtype=np.int32))
            errors.append("")
        except (ValueError, KeyError, TypeError) as e:
            ids.append(np.zeros(0, dtype=np.int32))
            labels.append(np.zeros(0, dtype=np.int32))
            errors.append(f"{type(e).__name__}: {e}")
    return {"id": batch["id"], "ids": ids, "labels": labels, "error": errors}


_TOKENIZERS: dict = {}


def tokenize(items: pa.Table, tokenizer_path: str, use_ray: bool = True) -> tuple[list, list, list]:
    """Render + tokenize every item (Ray Data map_batches, or inline for small inputs); keep the input order."""
    cols = items.select(["id", "messages"])
    if use_ray and items.num_rows > 2000:
        import ray.data

        ds = ray.data.from_arrow(cols).map_batches(_tokenize_batch, fn_kwargs={"tokenizer_path": tokenizer_path},
                                                    batch_size=256, batch_format="numpy")
        out = {r["id"]: r for r in ds.iter_rows()}
        rows = [out[i] for i in cols.column("id").to_pylist()]
    else:
        b = _tokenize_batch({"id": cols.column("id").to_pylist(), "messages": cols.column("messages").to_pylist()},
                            tokenizer_path)
        rows = [{"ids": b["ids"][k], "labels": b["labels"][k], "error": b["error"][k]} for k in range(len(b["id"]))]
    return [r["ids"] for r in rows], [r["labels"] for r in rows], [r["error"] for r in rows]


def _heldout_mask(ids: list[str], languages: list[str], fraction: float, seed: int) -> np.ndarray:
    """A deterministic per-language held-out split (by id hash), at least one item of a language with ≥ 10 items."""
    mask = np.zeros(len(ids), dtype=bool)
    if fraction <= 0:
        return mask
    by_lang: dict[str, list[int]] = {}
    for i, lang in enumerate(languages):
        by_lang.setdefault(lang, []).append(i)
    for lang, idx in by_lang.items():
        if len(idx) < 10:
            continue
        ranked = sorted(idx, key=lambda i: record_id("heldout", seed, ids[i]))
        mask[ranked[:max(1, int(round(fraction * len(idx))))]] = True
    return mask


def build(cfg: Config, storage: Storage, qa_folder: str, tokenizer_path: str) -> str:
    """Write (or find) ``mixture/<fp>/`` for the items of ``qa_folder``; return its URI."""
    qa = storage.read_manifest(qa_folder)
    d = cfg.data
    expert_map = cfg.expert_map() if cfg.moe.layers else {}
    source_prior = {s.name: (s.priority, s.epochs) for s in d.sources}
    fp = fingerprint(SCHEMA_VERSION, qa.hash, d.priorities, d.epochs, source_prior, d.heldout_fraction,
                     cfg.train.seq_len, cfg.train.pack_min_split, cfg.train.seed, tokenizer_path if cfg.model.base != "tiny" else "tiny",
                     cfg.model.arch.model_dump() if cfg.model.arch else None, expert_map)
    out = cfg.uri("mixture", fp)
    if storage.has_manifest(out):
        log.info("mixture: up to date (%s), skipping", out)
        return out
    t0 = time.time()
    items = pa.concat_tables(list(storage.iter_tables(qa_folder, qa))) if qa.shards else None
    if items is None or items.num_rows == 0:
        raise UserError(f"mixture: {qa_folder} holds no items to train on (every paragraph was rejected by rewrite? see its manifest)")
    ids = items.column("id").to_pylist()
    item_langs = items.column("language").to_pylist()
    kinds = items.column("kind").to_pylist()
    sources = items.column("source").to_pylist()
    tok_ids, tok_labels, errors = tokenize(items, tokenizer_path)
    dropped: dict[str, int] = {}
    ok = np.ones(len(ids), dtype=bool)
    for i, err in enumerate(errors):
        reason = "render_error" if err else ("no_target_tokens" if not (np.asarray(tok_labels[i]) >= 0).any() else "")
        if reason:
            ok[i] = False
            dropped[reason] = dropped.get(reason, 0) + 1
            log.warning("mixture: item %s dropped (%s) %s", ids[i], reason, err)

    def priority(i: int) -> tuple[float, int]:
        p, e = source_prior.get(sources[i], (None, None))
        return (p or d.priorities.get(kinds[i], 2.0), e or d.epochs.get(kinds[i], 1))

    heldout = _heldout_mask(ids, item_langs, d.heldout_fraction, cfg.train.seed) & ok
    train_idx = np.flatnonzero(ok & ~heldout)
    pri = np.array([priority(i)[0] for i in train_idx], dtype=np.float64)
    ep = np.array([priority(i)[1] for i in train_idx], dtype=np.int64)
    order = train_idx[priority_order(pri, ep, cfg.train.seed)]

    lang_list = sorted(set(item_langs))
    kind_list = sorted(set(kinds))
    lang_pos = {c: k for k, c in enumerate(lang_list)}
    kind_pos = {c: k for k, c in enumerate(kind_list)}

    def docs(index: np.ndarray) -> list[Doc]:
        return [Doc(tok_ids[i], tok_labels[i], expert_map.get(langs.canonical(item_langs[i]), -1)
                    if item_langs[i] and langs.is_known(item_langs[i]) else -1, meta=int(i)) for i in index]

    tok = _load_tokenizer(tokenizer_path)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train = pack(docs(order), cfg.train.seq_len, pad_id, min_split=cfg.train.pack_min_split)
    held = pack(docs(np.flatnonzero(heldout)), cfg.train.seq_len, pad_id, min_split=cfg.train.pack_min_split)

    shards = []
    for split, result in (("train", train), ("heldout", held)):
        shards += _write_rows(storage, out, split, result, ids, item_langs, kinds, lang_pos, kind_pos,
                              cfg.storage.shard_rows)
    n_train_tokens = sum(r.n_tokens for r in train.rows)
    manifest = Manifest(
        stage="mixture", fingerprint=fp, shards=shards,
        counts={"in": len(ids), "kept": int(ok.sum()), "dropped": dropped},
        config={"data": d.model_dump(mode="json"), "seq_len": cfg.train.seq_len, "seed": cfg.train.seed},
        inputs={"qa": qa.hash},
        extra={"languages": lang_list, "kinds": kind_list, "expert_map": expert_map,
               "train_rows": len(train.rows), "heldout_rows": len(held.rows), "train_items": int(len(train_idx)),
               "heldout_items": int(heldout.sum()), "drawn": int(len(order)), "fill": train.fill,
               "heldout_fill": held.fill, "train_tokens": n_train_tokens, "split_docs": train.n_split,
               "seq_len": cfg.train.seq_len, "pad_id": int(pad_id)})
    storage.write_manifest(out, manifest)
    log.info("mixture: %d items → %d drawn → %d rows of %d (fill %.4f), %d held-out rows, %.1fs → %s", len(ids),
             len(order), len(train.rows), cfg.train.seq_len, train.fill, len(held.rows), time.time() - t0, out)
    return out


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _write_rows(storage: Storage, out: str, split: str, result: PackResult, ids, item_langs, kinds, lang_pos,
                kind_pos, shard_rows: int) -> list:
    shards = []
    rows = result.rows
    for s in range(0, max(len(rows), 1), shard_rows):
        chunk = rows[s:s + shard_rows]
        if not chunk:
            break
        lang_index, kind_index, row_items = [], [], []
        for r in chunk:
            li = np.full(len(r.input_ids), -1, dtype=np.int16)
            ki = np.full(len(r.input_ids), -1, dtype=np.int16)
            at = 0
            for n, meta in zip(r.seq_lens, r.meta):
                li[at:at + n] = lang_pos[item_langs[meta]]
                ki[at:at + n] = kind_pos[kinds[meta]]
                at += n
            lang_index.append(li)
            kind_index.append(ki)
            row_items.append([ids[m] for m in r.meta])
        table = pa.table({
            "row": pa.array(np.arange(s, s + len(chunk)), pa.int64()),
            "input_ids": [r.input_ids.astype(np.int32) for r in chunk],
            "labels": [r.labels.astype(np.int32) for r in chunk],
            "position_ids": [r.position_ids.astype(np.int32) for r in chunk],
            "language_ids": [r.language_ids.astype(np.int16) for r in chunk],
            "lang_index": lang_index, "kind_index": kind_index, "items": row_items}, schema=ROW_SCHEMA)
        shards.append(storage.write_parquet(f"{out}/{split}-{s // shard_rows:05d}.parquet", table,
                                            row_group_size=ROW_GROUP_ROWS).relative_to(out))
    return shards


COLUMNS = ("input_ids", "labels", "position_ids", "language_ids", "lang_index", "kind_index")
# Rows per parquet row group: the unit a training worker reads. 64 rows of 4,096 tokens are ~7 MB of arrays.
ROW_GROUP_ROWS = 64


class RowStore:
    """One split of a mixture, read by row group as rows are asked for.

    A training rank takes every world-th row of each step's slice, so it touches each row group once, in order; with
    a small cache of decoded row groups a worker's memory for data is O(row group), whatever the corpus size. Row
    groups of mixtures written before ``ROW_GROUP_ROWS`` are whole shards (``storage.shard_rows`` rows at most).
    """

    def __init__(self, storage: Storage, folder: str, split: str, cache_groups: int = 4):
        self.storage, self.folder = storage, folder
        manifest = storage.read_manifest(folder)
        self.shards = sorted((s for s in manifest.shards if s.path.startswith(split + "-")), key=lambda s: s.path)
        self.starts = np.cumsum([0, *(s.rows for s in self.shards)])
        self._files: dict[int, Any] = {}
        self._groups: dict[int, np.ndarray] = {}  # shard -> first row of each of its row groups
        self._cache: OrderedDict[tuple[int, int], dict[str, np.ndarray]] = OrderedDict()
        self.cache_groups = cache_groups

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __bool__(self) -> bool:
        return len(self) > 0

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``idx`` (global row numbers of the split) as stacked int64 arrays, in the order asked."""
        rows = [self._row(int(i)) for i in np.asarray(idx).reshape(-1)]
        return {k: np.stack([r[k] for r in rows]) for k in COLUMNS}

    def language_load(self, num_experts: int) -> np.ndarray:
        """Tokens per language expert over the whole split, one row group at a time (expert placement needs it)."""
        load = np.zeros(num_experts, dtype=np.int64)
        for si in range(len(self.shards)):
            f = self._file(si)
            for g in range(f.num_row_groups):
                lang = np.concatenate(f.read_row_group(g, columns=["language_ids"]).column(0).to_numpy(
                    zero_copy_only=False)).astype(np.int64)
                load += np.bincount(lang[lang >= 0], minlength=num_experts)[:num_experts]
        return load

    def _row(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        si = int(np.searchsorted(self.starts, i, side="right")) - 1
        local = i - int(self.starts[si])
        firsts = self._group_starts(si)
        g = int(np.searchsorted(firsts, local, side="right")) - 1
        group = self._cache.get((si, g))
        if group is None:
            t = self._file(si).read_row_group(g, columns=list(COLUMNS))
            group = {k: t.column(k).to_numpy(zero_copy_only=False) for k in COLUMNS}
            self._cache[(si, g)] = group
            while len(self._cache) > self.cache_groups:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end((si, g))
        j = local - int(firsts[g])
        return {k: np.asarray(group[k][j], dtype=np.int64) for k in COLUMNS}

    def _file(self, si: int):
        import pyarrow.parquet as pq

        if si not in self._files:
            self._files[si] = pq.ParquetFile(self.storage.fs.open(f"{self.folder}/{self.shards[si].path}", "rb"))
        return self._files[si]

    def _group_starts(self, si: int) -> np.ndarray:
        if si not in self._groups:
            meta = self._file(si).metadata
            self._groups[si] = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])[:-1]
        return self._groups[si]


def read_rows(storage: Storage, folder: str, split: str) -> dict[str, np.ndarray]:
    """All rows of a split as stacked arrays: for tests and small tools; training reads through ``RowStore``."""
    store = RowStore(storage, folder, split)
    if not store:
        return {}
    out = store.take(np.arange(len(store)))
    out["items"] = [ids for s in store.shards
                    for ids in storage.read_parquet(f"{folder}/{s.path}").column("items").to_pylist()]
    return out
