"""Hygiene bench: decontamination throughput and the benchmark index's memory; PII scrubbing rate; the demo's cost.

Decontamination: the index of an XMedBench-format benchmark folder (``--xmedbench``; the dev split has 1,114 items)
plus the sample benchmark (156) is
built as the stage builds it; its size (what every worker maps from the object store) and build time are printed.
Then ``decontam.run`` — the stage itself, Ray Data on a local Ray of the machine's CPUs — checks N training items (the
sample instruct items and corpus paragraphs, repeated under new ids, in shards of storage.shard_rows) and the stage's
own items/s (tasks' wall time, Ray start-up excluded) is printed, with the wall time of the whole call.

PII: documents per second of ``Scrubber.scrub`` in this process, on dialogues with planted PII and on clean ones.

``--demo K``: ``apollo-ray run`` on the shipped config (fresh storage root each time, so nothing is skipped), K times
with hygiene on and K times off, interleaved (on, off, off, on, ...), min / median / max of each and the growth.

    python bench/hygiene.py [--items 20000] [--xmedbench DIR_OF_XMEDBENCH_JSON] [--demo 2]

The last line is the decontamination rate (items/s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _qa_folder(storage, cfg, n_items: int) -> str:
    import pyarrow as pa

    from apollo_ray.data.records import ITEM, record_id
    from apollo_ray.storage import Manifest
    from tests.test_decontam import _sample_rows

    base = _sample_rows()
    rows = [{**base[i % len(base)], "id": record_id("bench", i)} for i in range(n_items)]
    folder = cfg.uri("qa", f"bench-{n_items}")
    step = cfg.storage.shard_rows
    shards = [storage.write_parquet(f"{folder}/items/part-{s // step:05d}.parquet",
                                    pa.Table.from_pylist(rows[s:s + step], schema=ITEM)).relative_to(folder)
              for s in range(0, n_items, step)]
    storage.write_manifest(folder, Manifest(stage="rewrite", fingerprint="bench", shards=shards,
                                            counts={"in": n_items, "kept": n_items, "dropped": {}}))
    return folder


def decontamination(n_items: int, xmedbench: Path | None) -> float:
    from apollo_ray import config as config_mod
    from apollo_ray.config import SAMPLE_DATA
    from apollo_ray.data import decontam
    from apollo_ray.storage import Storage

    root = tempfile.mkdtemp(prefix="apollo-bench-hygiene-")
    benches = [{"name": "apollo-sample", "path": str(SAMPLE_DATA / "mcq")}]
    if xmedbench is not None and xmedbench.is_dir():
        benches.append({"name": "xmedbench-dev", "path": str(xmedbench)})
    else:
        print(f"(no XMedBench folder{f' at {xmedbench}' if xmedbench else ''}: the sample benchmark only)")
    cfg = config_mod.resolve({"eval": {"benchmarks": benches}}, [f"storage.root={root}", "tracking.enabled=false"])
    storage = Storage.from_config(cfg)
    items, _ = decontam.load_benchmark_items(storage, decontam.benchmark_configs(cfg))
    t = time.time()
    index = decontam.build_index(items, cfg.hygiene.decontam)
    build = time.time() - t
    stats = index["stats"]
    print(f"index: {len(items)} benchmark items ({', '.join(b['name'] for b in benches)}), {stats['ngrams']} n-grams, "
          f"{stats['seeds']} seeds, {decontam.index_bytes(index) / 2**20:.2f} MiB, built in {build:.2f}s")
    qa = _qa_folder(storage, cfg, n_items)
    t = time.time()
    out = decontam.run(cfg, qa)
    wall = time.time() - t
    m = storage.read_manifest(out)
    print(f"decontaminate: {m.counts['in']} items, {m.counts['kept']} kept, quarantined {m.counts['dropped']}; "
          f"tasks {m.extra['check_seconds']:.1f}s, call {wall:.1f}s (Ray start and index build included)")
    return m.extra["items_per_s"]


def scrubbing() -> None:
    from apollo_ray.data.pii import Scrubber
    from tests.test_pii import CLEAN, PLANTS, _dialogue

    s = Scrubber()
    for name, docs in (("with PII", [(lang, _dialogue(t, p)) for lang, t, p in PLANTS]),
                       ("clean", [(lang, t) for lang, t in CLEAN])):
        n, t0 = 0, time.time()
        while time.time() - t0 < 2.0:
            for lang, text in docs:
                s.scrub(text, lang)
                n += 1
        print(f"pii: {n / (time.time() - t0):.0f} documents/s ({name}, {sum(len(t) for _, t in docs) / len(docs):.0f} "
              f"characters each)")


def demo(pairs: int) -> None:
    exe = str(REPO / ".venv" / "bin" / "apollo-ray")
    times: dict[str, list[float]] = {"on": [], "off": []}
    off = ["--set", "hygiene.decontam.enabled=false", "--set", "hygiene.pii.enabled=false"]
    for k in range(pairs):
        for mode in (("on", "off") if k % 2 == 0 else ("off", "on")):  # A B B A: the order's own effect cancels
            root = tempfile.mkdtemp(prefix=f"apollo-demo-{mode}-")
            cmd = [exe, "run", "--config", "ray_config.yaml", "--set", f"storage.root={root}", *(off if mode == "off"
                                                                                                 else [])]
            t = time.time()
            subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "RAY_ADDRESS": ""})
            times[mode].append(time.time() - t)
            print(f"demo {k + 1} hygiene {mode}: {times[mode][-1]:.1f}s", flush=True)
    for mode, ts in times.items():
        print(f"demo hygiene {mode}: min {min(ts):.1f}s, median {statistics.median(ts):.1f}s, max {max(ts):.1f}s")
    print(f"demo growth (median on / median off): {statistics.median(times['on']) / statistics.median(times['off']):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--xmedbench", type=Path, default=None,
                    help="a folder of XMedBench-format JSON files (e.g. its dev split); default: the sample only")
    ap.add_argument("--demo", type=int, default=0, help="pairs of demo runs (hygiene on, off), interleaved")
    args = ap.parse_args()
    if args.demo:
        demo(args.demo)
    scrubbing()
    rate = decontamination(args.items, args.xmedbench)
    print(json.dumps({"decontamination_items_per_s": rate}))


if __name__ == "__main__":
    main()
