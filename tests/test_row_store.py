"""Training workers read their rows through ``RowStore``: the same rows as reading the whole split, in the order
asked, while holding at most a few row groups — never the split."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from apollo_ray.storage import Manifest, Storage
from apollo_ray.train import dataset
from apollo_ray.train.dataset import ROW_SCHEMA, RowStore

SEQ = 16


def _rows(start: int, n: int, rng: np.random.Generator) -> pa.Table:
    ids = [rng.integers(0, 1000, SEQ, dtype=np.int32) for _ in range(n)]
    lang = [np.full(SEQ, (start + i) % 5 - 1, dtype=np.int16) for i in range(n)]  # -1 (padding) .. 3
    return pa.table({"row": pa.array(np.arange(start, start + n), pa.int64()), "input_ids": ids,
                     "labels": [x[::-1].copy() for x in ids], "position_ids": [np.arange(SEQ, dtype=np.int32)] * n,
                     "language_ids": lang, "lang_index": lang, "kind_index": [np.zeros(SEQ, np.int16)] * n,
                     "items": [[f"item-{start + i}"] for i in range(n)]}, schema=ROW_SCHEMA)


@pytest.fixture
def mixture(tmp_path):
    """Three train shards of 50, 50 and 23 rows in row groups of 8 (the last group of each shard shorter)."""
    storage = Storage(str(tmp_path))
    folder = storage.uri("mixture", "m")
    rng = np.random.default_rng(0)
    shards, start = [], 0
    for k, n in enumerate((50, 50, 23)):
        shards.append(storage.write_parquet(f"{folder}/train-{k:05d}.parquet", _rows(start, n, rng),
                                            row_group_size=8).relative_to(folder))
        start += n
    storage.write_manifest(folder, Manifest(stage="mixture", fingerprint="m", shards=shards))
    return storage, folder


def _whole(storage: Storage, folder: str) -> dict[str, np.ndarray]:
    tables = [storage.read_parquet(f"{folder}/train-{k:05d}.parquet") for k in range(3)]
    t = pa.concat_tables(tables)
    return {k: np.stack(t.column(k).to_numpy(zero_copy_only=False)).astype(np.int64) for k in dataset.COLUMNS}


def test_rows_asked_are_the_rows_of_the_split(mixture):
    """Catches an off-by-one across shard or row-group boundaries, or rows returned out of the asked order."""
    storage, folder = mixture
    store, whole = RowStore(storage, folder, "train"), _whole(storage, folder)
    assert len(store) == 123
    for idx in (np.array([0, 7, 8, 49, 50, 99, 100, 122]), np.array([122, 3, 64, 3]), np.arange(123)):
        got = store.take(idx)
        for k in dataset.COLUMNS:
            assert np.array_equal(got[k], whole[k][idx]), k
    with pytest.raises(IndexError):
        store.take(np.array([123]))


def test_a_rank_reads_each_row_group_once_and_holds_a_few(mixture, monkeypatch):
    """Catches a reader that loads whole shards or the split, or re-reads a row group for every row."""
    storage, folder = mixture
    store = RowStore(storage, folder, "train", cache_groups=2)
    reads: list[tuple[int, int]] = []
    real = store._file

    wrapped: dict[int, object] = {}

    def counting(si):
        if si not in wrapped:
            f = wrapped[si] = real(si)
            orig = f.read_row_group

            def read_row_group(g, columns=None):
                reads.append((si, g))
                return orig(g, columns=columns)

            f.read_row_group = read_row_group
        return wrapped[si]

    monkeypatch.setattr(store, "_file", counting)
    world, micro, rank = 2, 4, 1
    per_step = world * micro
    for step in range(len(store) // per_step):  # the loop's access pattern: rank r takes every world-th row
        first = step * per_step
        store.take(np.arange(first + rank, first + per_step, world))
        assert len(store._cache) <= 2
    assert len(reads) == len(set(reads))  # sequential: every row group decoded once
    assert len(reads) == 7 + 7 + 3  # every group holding rows 0..119, the rows the 15 steps cover


def test_language_load_counts_every_token_of_the_split(mixture):
    """Expert placement needs the split's language-expert loads; streamed, they must equal the whole-split count."""
    storage, folder = mixture
    lang = _whole(storage, folder)["language_ids"]
    expected = np.bincount(lang[lang >= 0], minlength=6)
    assert np.array_equal(RowStore(storage, folder, "train").language_load(6), expected)
