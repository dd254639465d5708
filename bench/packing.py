"""Packing: what cutting documents across rows (``train.pack_min_split``) buys in fill, and what it costs in documents
whose tail trains without its beginning.

Two document sets, each packed three ways by ``pack`` (best-fit decreasing per window of 4,096) and once by the
reference's greedy packer:
* ``lognormal``: 20,000 Apollo-like lengths (lognormal, mean ~400 tokens, sigma 0.8, clipped to [16, 4096]) in rows
  of 4,096 — the qwen2 presets' case;
* ``sample``: the shipped sample mixture (sample instruct items and corpus paragraphs, ×8 as bench/train.py uses it),
  rendered and tokenized with the tiny preset's tokenizer, drawn in the sampler's priority order, in rows of 256 —
  the tiny preset's case, where documents are long relative to a row.

Settings: ``whole`` (pack_min_split 0), ``cut always`` (cut into any row with ≥ 16 tokens free, what the packer did
before), ``cut if >=1% fewer rows`` (pack_min_split 16 as ``pack`` applies it now: a window keeps the cut layout only
when it needs at least ``packing.MIN_ROW_SAVING`` = 1 % fewer rows, at the price of a second packing pass). Prints
fill (real tokens / row tokens), rows, % of documents cut across rows (those longer than a row included) and seconds.

    .venv/bin/python bench/packing.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from apollo_ray.train import packing  # noqa: E402
from apollo_ray.train.packing import Doc, greedy_pack, pack  # noqa: E402

MIN_SPLIT = 16


def lognormal_docs(n: int = 20_000, seed: int = 0) -> list[Doc]:
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.lognormal(np.log(400) - 0.8 ** 2 / 2, 0.8, n), 16, 4096).astype(int)
    return [Doc(rng.integers(1, 300, k), None, language_id=0) for k in lens]


def sample_docs(root: Path) -> tuple[list[Doc], int]:
    """The sample mixture's training order as the mixture stage builds it, and the tiny preset's seq_len."""
    from helpers import write_sample_qa

    from apollo_ray import config as config_mod
    from apollo_ray.data.mixture import priority_order
    from apollo_ray.model import tiny
    from apollo_ray.storage import Storage
    from apollo_ray.train import dataset

    cfg = config_mod.resolve({}, [f"storage.root={root}"])
    storage = Storage.from_config(cfg)
    qa = write_sample_qa(storage, cfg.uri("qa", "bench"), repeat=8)
    tokenizer = tiny.ensure_base(cfg, storage)
    import pyarrow as pa

    items = pa.concat_tables(list(storage.iter_tables(qa, storage.read_manifest(qa))))
    tok_ids, tok_labels, _ = dataset.tokenize(items, tokenizer, use_ray=False)
    kinds = items.column("kind").to_pylist()
    pri = np.array([cfg.data.priorities[k] for k in kinds], dtype=np.float64)
    ep = np.array([cfg.data.epochs[k] for k in kinds], dtype=np.int64)
    order = priority_order(pri, ep, cfg.train.seed)
    return [Doc(tok_ids[i], tok_labels[i], language_id=0) for i in order], cfg.train.seq_len


def cut_always(docs: list[Doc], seq_len: int) -> packing.PackResult:
    """The packer before the rule: every window takes the cut layout."""
    per_doc, n_split, n_empty = packing._pieces(docs, seq_len)
    layout = []
    for w in range(0, len(per_doc), 4096):
        layout += packing._bfd([p for ps in per_doc[w:w + 4096] for p in ps], seq_len, MIN_SPLIT)
    return packing._materialize(docs, layout, seq_len, 0, n_split, n_empty, stats={})


def report(name: str, docs: list[Doc], seq_len: int) -> None:
    lens = np.array([len(d.input_ids) for d in docs])
    print(f"\n{name}: {len(docs):,} documents, seq_len {seq_len}, length median {int(np.median(lens))} / "
          f"mean {lens.mean():.0f} / max {lens.max()}, {int((lens > seq_len).sum())} longer than a row")
    print(f"  {'setting':<24}{'fill':>8}{'rows':>9}{'docs cut':>10}{'seconds':>9}")
    runs = [("greedy (reference)", lambda: greedy_pack(docs, seq_len, 0)),
            ("whole", lambda: pack(docs, seq_len, 0)),
            (f"cut always ({MIN_SPLIT})", lambda: cut_always(docs, seq_len)),
            (f"cut if >=1% fewer rows", lambda: pack(docs, seq_len, 0, min_split=MIN_SPLIT))]
    for label, run in runs:
        t0 = time.perf_counter()
        r = run()
        dt = time.perf_counter() - t0
        print(f"  {label:<24}{r.fill:>8.4f}{len(r.rows):>9,}{100 * r.n_cut / r.n_docs:>9.2f}%{dt:>9.2f}")


def main() -> None:
    report("lognormal", lognormal_docs(), 4096)
    with tempfile.TemporaryDirectory(prefix="apollo-bench-packing-") as tmp:
        docs, seq_len = sample_docs(Path(tmp))
    report("sample mixture (tiny preset)", docs, seq_len)


if __name__ == "__main__":
    main()
