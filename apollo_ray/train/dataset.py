"""The mixture stage: QA and instruction items → the drawn order → packed rows in ``mixture/<fp>/``.

Runs once per (input manifest, priorities, epochs, tokenizer, seq_len, seed); the trainer only reads packed rows, so
every data-parallel rank, every restart and every Tune trial trains on exactly the same bytes. Tokenization runs on
Ray Data (it is the costly part on real corpora); the draw and the packing need the global order and run here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

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
SCHEMA_VERSION = "mixture-v1"
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
        shards.append(storage.write_parquet(f"{out}/{split}-{s // shard_rows:05d}.parquet", table).relative_to(out))
    return shards


def read_rows(storage: Storage, folder: str, split: str) -> dict[str, np.ndarray]:
    """All rows of a split as stacked arrays (the tiny and mid-size case: a few GB at most per worker)."""
    m = storage.read_manifest(folder)
    tables = [storage.read_parquet(f"{folder}/{s.path}") for s in m.shards if s.path.startswith(split + "-")]
    if not tables:
        return {}
    t = pa.concat_tables(tables)
    out = {k: np.stack(t.column(k).to_numpy(zero_copy_only=False)).astype(np.int64)
           for k in ("input_ids", "labels", "position_ids", "language_ids", "lang_index", "kind_index")}
    out["items"] = t.column("items").to_pylist()
    return out
