"""The mixture builder (``train.dataset.build``) end to end on a small QA folder, no Ray: held-out items never trained
on, every item drawn exactly its epochs, per-source priority / epochs overrides, and the written rows holding exactly
the drawn tokens. The draw itself is spied on (``priority_order`` and ``pack`` are wrapped, not replaced)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from apollo_ray import config as config_mod
from apollo_ray.config import SAMPLE_DATA
from apollo_ray.data.records import ITEM, record_id
from apollo_ray.storage import Manifest, Storage
from apollo_ray.train import dataset
from apollo_ray.train.packing import IGNORE_INDEX, document_ids

# Per-source overrides of the kind defaults (data.priorities / data.epochs): a dialogue source drawn 3 times at
# priority 7, an exam source at priority 5 keeping its kind's 2 epochs, a guideline source drawn 2 times at its
# kind's priority.
SOURCES = [
    {"name": "enc", "path": "unused", "kind": "encyclopedia"},
    {"name": "exam-src", "path": "unused", "kind": "exam", "priority": 5.0},
    {"name": "chat-src", "path": "unused", "kind": "dialogue", "priority": 7.0, "epochs": 3},
    {"name": "guide-src", "path": "unused", "kind": "guideline", "epochs": 2},
]


def _qa_rows() -> list[dict]:
    """Items of several kinds, sources and languages from the shipped sample data (every content distinct)."""
    rows = []
    for f in sorted((SAMPLE_DATA / "instruct").glob("*.jsonl"))[:4]:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines()):
            r = json.loads(line)
            rows.append(dict(id=record_id(r["id"], "qa"), parent_id=r["id"], language=f.stem, kind="exam",
                             source="unlisted-src" if n % 3 == 0 else "exam-src",
                             messages=[{"role": "user", "content": r["question"]},
                                       {"role": "assistant", "content": r["answer"]}],
                             prompt_version="t", backend="t", model=""))
    for f in sorted((SAMPLE_DATA / "corpus").glob("*.jsonl"))[:5]:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines()):
            r = json.loads(line)
            for k, para in enumerate(r["text"].split("\n\n")):
                kind, source = r["kind"], "enc" if r["kind"] == "encyclopedia" else "guide-src"
                if (n + k) % 4 == 0:
                    kind, source = "dialogue", "chat-src"
                elif (n + k) % 7 == 0:
                    source = "unlisted-src"  # not in data.sources: the kind defaults apply
                rows.append(dict(id=record_id(r["id"], k, "qa"), parent_id=r["id"], language=f.stem, kind=kind,
                                 source=source, messages=[{"role": "user", "content": r["title"]},
                                                          {"role": "assistant", "content": para}],
                                 prompt_version="t", backend="t", model=""))
    return rows


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    from apollo_ray.model.tiny import sample_texts, train_tokenizer

    path = tmp_path_factory.mktemp("mixture-tok")
    train_tokenizer(sample_texts(), vocab_size=1024, out_dir=path)
    return str(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer_dir):
    """Build the mixture once, recording what the builder handed to the sampler and to the packer."""
    root = tmp_path_factory.mktemp("mixture")
    cfg = config_mod.resolve({"data": {"sources": SOURCES}},
                             [f"storage.root={root}", "data.heldout_fraction=0.1", "train.seq_len=128"])
    storage = Storage.from_config(cfg)
    rows = _qa_rows()
    folder = cfg.uri("qa", "test")
    shard = storage.write_parquet(f"{folder}/part-00000.parquet",
                                  pa.Table.from_pylist(rows, schema=ITEM)).relative_to(folder)
    storage.write_manifest(folder, Manifest(stage="rewrite", fingerprint="test", shards=[shard],
                                            counts={"in": len(rows), "kept": len(rows), "dropped": {}}))
    sampler_calls, pack_calls = [], []
    real_order, real_pack = dataset.priority_order, dataset.pack

    def spy_order(pri, ep, seed):
        out = real_order(pri, ep, seed)
        sampler_calls.append((np.asarray(pri).copy(), np.asarray(ep).copy(), np.asarray(out).copy()))
        return out

    def spy_pack(docs, *args, **kwargs):
        pack_calls.append(list(docs))
        return real_pack(docs, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(dataset, "priority_order", spy_order)
    mp.setattr(dataset, "pack", spy_pack)
    try:
        out = dataset.build(cfg, storage, folder, tokenizer_dir)
    finally:
        mp.undo()
    assert len(sampler_calls) == 1 and len(pack_calls) == 2  # the train order, then the held-out items
    return {"cfg": cfg, "storage": storage, "out": out, "rows": rows, "sampler": sampler_calls[0],
            "train_docs": pack_calls[0], "held_docs": pack_calls[1]}


def _expected(cfg, row: dict) -> tuple[float, int]:
    """(priority, epochs) of an item: its source's override, else its kind's default."""
    src = {s.name: s for s in cfg.data.sources}.get(row["source"])
    pri = src.priority if src and src.priority else cfg.data.priorities[row["kind"]]
    ep = src.epochs if src and src.epochs else cfg.data.epochs[row["kind"]]
    return pri, ep


def _content(row: dict) -> str:
    return json.dumps(row["messages"], ensure_ascii=False, sort_keys=True)


def _row_pieces(split: dict) -> list[tuple[str, int]]:
    """(item id, tokens) of every piece of every written row: pieces are the position blocks before the padding."""
    out = []
    for items, pos in zip(split["items"], split["position_ids"]):
        lens = np.bincount(document_ids(pos))
        out += [(item, int(n)) for item, n in zip(items, lens)]
    return out


def test_fixture_covers_overrides_and_defaults(built):
    """Precondition of the tests below: every override kind and a default-only source are present."""
    rows = built["rows"]
    assert len({_content(r) for r in rows}) == len(rows)
    sources = Counter(r["source"] for r in rows)
    assert all(sources[s] >= 10 for s in ("enc", "exam-src", "chat-src", "guide-src", "unlisted-src")), sources
    assert {_expected(built["cfg"], r)[1] for r in rows} == {1, 2, 3}


def test_heldout_items_never_trained_on(built):
    """Catches held-out items also packed into training rows (the held-out loss measured on training data)."""
    rows, storage, out = built["rows"], built["storage"], built["out"]
    train_meta = {d.meta for d in built["train_docs"]}
    held_meta = [d.meta for d in built["held_docs"]]
    m = storage.read_manifest(out)
    assert len(held_meta) == len(set(held_meta)) == m.extra["heldout_items"] > 0
    assert not train_meta & set(held_meta)
    assert train_meta | set(held_meta) == set(range(len(rows)))  # every item in exactly one split
    # The written rows: by id and by content.
    train = dataset.read_rows(storage, out, "train")
    held = dataset.read_rows(storage, out, "heldout")
    train_ids = {i for items in train["items"] for i in items}
    held_ids = {i for items in held["items"] for i in items}
    assert held_ids == {rows[i]["id"] for i in held_meta}
    assert not train_ids & held_ids
    by_id = {r["id"]: r for r in rows}
    assert not {_content(by_id[i]) for i in train_ids} & {_content(by_id[i]) for i in held_ids}
    held_tokens = {tuple(d.input_ids) for d in built["held_docs"]}
    assert not held_tokens & {tuple(d.input_ids) for d in built["train_docs"]}
    # and every language with >= 10 items gives at least one held-out item
    langs = Counter(r["language"] for r in rows)
    assert {rows[i]["language"] for i in held_meta} == {lang for lang, n in langs.items() if n >= 10}


def test_each_item_drawn_its_epochs(built):
    """Catches per-kind / per-source epochs ignored when drawing (every item once: 'drawn' = items)."""
    rows, cfg = built["rows"], built["cfg"]
    held = {d.meta for d in built["held_docs"]}
    want = {i: _expected(cfg, rows[i])[1] for i in range(len(rows)) if i not in held}
    copies = Counter(d.meta for d in built["train_docs"])
    assert dict(copies) == want
    m = built["storage"].read_manifest(built["out"])
    assert m.extra["drawn"] == len(built["train_docs"]) == sum(want.values())
    assert m.extra["drawn"] > m.extra["train_items"]  # repeats happened
    assert m.extra["train_items"] == len(want)


def test_sampler_gets_each_items_priority_and_epochs(built):
    """Catches per-source priority / epochs overrides dropped (or the kind defaults misapplied) before the draw."""
    rows, cfg = built["rows"], built["cfg"]
    pri, ep, order = built["sampler"]
    held = {d.meta for d in built["held_docs"]}
    train_idx = [i for i in range(len(rows)) if i not in held]  # build keeps the input order
    assert len(pri) == len(ep) == len(train_idx)
    want = [_expected(cfg, rows[i]) for i in train_idx]
    assert pri.tolist() == [p for p, _ in want]
    assert ep.tolist() == [e for _, e in want]
    assert {p for p, _ in want} >= {5.0, 7.0, 16.0, 2.0}
    # the packer receives exactly the sampler's order (mapped back to item indices), nothing reshuffled
    assert [d.meta for d in built["train_docs"]] == [train_idx[k] for k in order]


def test_priority_shapes_the_drawn_order(built):
    """Catches the priorities being lost between sampler and rows: priority-16 items must come early on average."""
    rows, cfg = built["rows"], built["cfg"]
    pos: dict[float, list[int]] = {}
    for t, d in enumerate(built["train_docs"]):
        pos.setdefault(_expected(cfg, rows[d.meta])[0], []).append(t)
    mean = {p: np.mean(v) for p, v in pos.items()}
    assert mean[16.0] < mean[7.0] < mean[2.0], mean


def test_rows_hold_exactly_the_drawn_tokens(built):
    """Catches rows losing, duplicating or mislabelling drawn copies: per item, the tokens in the train rows are its
    epochs x its length; labels are the item's own labels (the first of each piece masked)."""
    rows, cfg, storage, out = built["rows"], built["cfg"], built["storage"], built["out"]
    docs = {d.meta: d for d in built["train_docs"]}
    train = dataset.read_rows(storage, out, "train")
    tokens = Counter()
    for item, n in _row_pieces(train):
        tokens[item] += n
    id_to_meta = {r["id"]: i for i, r in enumerate(rows)}
    assert tokens == Counter({rows[i]["id"]: len(d.input_ids) * _expected(cfg, rows[i])[1]
                              for i, d in docs.items()})
    labelled = int((train["labels"] != IGNORE_INDEX).sum())
    # every label of every drawn copy, minus the first token of each piece (masked by the packer)
    n_pieces = sum(len(items) for items in train["items"])
    want = sum((np.asarray(d.labels) != IGNORE_INDEX).sum() for d in built["train_docs"])
    assert want - n_pieces <= labelled <= want
    m = storage.read_manifest(out)
    assert m.extra["train_tokens"] == sum(tokens.values())
    assert set(id_to_meta[i] for i in tokens) == set(docs)
