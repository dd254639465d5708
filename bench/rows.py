"""A training rank's memory for data: ``RowStore`` (row groups, as the trainer reads) against loading the whole split
(the reader before it), on one synthetic mixture, each in a fresh process, alternated and repeated.

Prints the peak RSS growth of each reader while a rank walks its rows as the loop does, and their ratio last.
Usage: .venv/bin/python bench/rows.py [--rows 20000] [--seq 1024] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa

READ = """
import resource, sys, time, numpy as np
from apollo_ray.storage import Storage
from apollo_ray.train.dataset import RowStore, read_rows
storage, folder, how = Storage(sys.argv[1]), sys.argv[2], sys.argv[3]
t0 = time.perf_counter()
if how == "none":  # imports only: the baseline both readers are measured against
    n, take = 0, None
elif how == "rowstore":
    store = RowStore(storage, folder, "train")
    n = len(store)
    take = store.take
else:
    rows = read_rows(storage, folder, "train")
    n = len(rows["input_ids"])
    take = lambda idx: {k: rows[k][idx] for k in ("input_ids", "labels")}
world, micro, rank = 8, 2, 3
for first in range(0, n - world * micro + 1, world * micro):
    b = take(np.arange(first + rank, first + world * micro, world))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(peak / 1024, time.perf_counter() - t0)
"""


def write_mixture(root: str, rows: int, seq: int) -> str:
    from apollo_ray.storage import Manifest, Storage
    from apollo_ray.train.dataset import ROW_GROUP_ROWS, ROW_SCHEMA

    storage = Storage(root)
    folder = storage.uri("mixture", "bench")
    rng = np.random.default_rng(0)
    shards = []
    for k, start in enumerate(range(0, rows, 5000)):
        n = min(5000, rows - start)
        ids = rng.integers(0, 150_000, (n, seq), dtype=np.int32)
        lang = np.zeros((n, seq), np.int16)
        t = pa.table({"row": pa.array(np.arange(start, start + n), pa.int64()), "input_ids": list(ids),
                      "labels": list(ids), "position_ids": [np.arange(seq, dtype=np.int32)] * n,
                      "language_ids": list(lang), "lang_index": list(lang), "kind_index": list(lang),
                      "items": [[f"i{start + i}"] for i in range(n)]}, schema=ROW_SCHEMA)
        shards.append(storage.write_parquet(f"{folder}/train-{k:05d}.parquet", t,
                                            row_group_size=ROW_GROUP_ROWS).relative_to(folder))
    storage.write_manifest(folder, Manifest(stage="mixture", fingerprint="bench", shards=shards))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        folder = write_mixture(root, a.rows, a.seq)
        print(f"mixture: {a.rows} rows x {a.seq} tokens ({a.rows * a.seq / 1e6:.1f} M tokens)")
        mem: dict[str, list[float]] = {"none": [], "rowstore": [], "whole": []}
        secs: dict[str, list[float]] = {"none": [], "rowstore": [], "whole": []}
        for _ in range(a.repeats):
            for how in ("none", "rowstore", "whole"):  # alternated: A B C A B C
                out = subprocess.run([sys.executable, "-c", READ, root, folder, how], capture_output=True, text=True,
                                     check=True).stdout.split()
                mem[how].append(float(out[0]))
                secs[how].append(float(out[1]))
        base = statistics.median(mem["none"])
        for how in mem:
            m, s = [x - base for x in mem[how]], secs[how]
            print(f"{how:9s} peak RSS over the imports-only process, MB min/median/max "
                  f"{min(m):.0f}/{statistics.median(m):.0f}/{max(m):.0f}; walk s "
                  f"{min(s):.1f}/{statistics.median(s):.1f}/{max(s):.1f}")
        ratio = [(w - base) / max(r - base, 1.0) for w, r in zip(mem["whole"], mem["rowstore"])]
        print(f"memory ratio whole / rowstore min/median/max {min(ratio):.1f}/{statistics.median(ratio):.1f}/"
              f"{max(ratio):.1f}")


if __name__ == "__main__":
    main()
