"""Test data builders shared by several test files (no fixtures: plain functions)."""

from __future__ import annotations

import json

import pyarrow as pa

from apollo_ray.config import SAMPLE_DATA
from apollo_ray.data.records import ITEM, record_id
from apollo_ray.storage import Manifest, Storage


def write_sample_qa(storage: Storage, folder: str, repeat: int = 1) -> str:
    """A qa/ folder (ITEM rows + manifest) from the shipped instruct items and corpus paragraphs, as rewrite would."""
    rows = []
    for f in sorted((SAMPLE_DATA / "instruct").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            lang = f.stem
            rows.append(dict(id=record_id(r["id"], "qa"), parent_id=r["id"], language=lang, kind="exam",
                             source="sample-exam", messages=[{"role": "user", "content": r["question"]},
                                                             {"role": "assistant", "content": r["answer"]}],
                             prompt_version="passthrough", backend="passthrough", model=""))
    for f in sorted((SAMPLE_DATA / "corpus").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            for k, para in enumerate(r["text"].split("\n\n")):
                rows.append(dict(id=record_id(r["id"], k, "qa"), parent_id=r["id"], language=f.stem,
                                 kind=r["kind"], source="sample-encyclopedia",
                                 messages=[{"role": "user", "content": r["title"]},
                                           {"role": "assistant", "content": para}],
                                 prompt_version="test", backend="test", model=""))
    rows = [dict(r, id=f"{r['id']}-{i}") for i in range(repeat) for r in rows]
    table = pa.Table.from_pylist(rows, schema=ITEM)
    shard = storage.write_parquet(f"{folder}/part-00000.parquet", table).relative_to(folder)
    storage.write_manifest(folder, Manifest(stage="rewrite", fingerprint="test", shards=[shard],
                                            counts={"in": len(rows), "kept": len(rows), "dropped": {}}))
    return folder
