"""The record schemas that flow between data stages, defined once, and their deterministic ids.

paragraph (corpus/): one chunk of a cleaned, deduplicated document.
item (qa/): a chat item — rewritten QA pair, dialogue, or passed-through instruction/exam data.
reject (quarantine/, rejects/): anything that could not be used, with where it came from, why, and the raw input.
Ids hash the parent id with what produced the record, so reruns neither duplicate nor lose records.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

PARAGRAPH = pa.schema([
    ("id", pa.string()),
    ("text", pa.string()),
    ("language", pa.string()),          # registry code
    ("declared_language", pa.string()),  # as the source declared it ("auto" when detected)
    ("language_mismatch", pa.bool_()),   # detected != declared: flagged, never relabelled
    ("kind", pa.string()),
    ("source", pa.string()),
    ("doc_id", pa.string()),
    ("offset", pa.int64()),              # character offset of the paragraph in the normalised document
    ("n_tokens", pa.int64()),
    ("fields", pa.string()),             # instruction kinds: the source record as JSON (question, answer, options...)
])

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
ITEM = pa.schema([
    ("id", pa.string()),
    ("parent_id", pa.string()),
    ("language", pa.string()),
    ("kind", pa.string()),
    ("source", pa.string()),
    ("messages", pa.list_(MESSAGE)),
    ("prompt_version", pa.string()),
    ("backend", pa.string()),
    ("model", pa.string()),
])

REJECT = pa.schema([
    ("id", pa.string()),
    ("where", pa.string()),   # file:line, record id, or stage step
    ("reason", pa.string()),
    ("raw", pa.string()),
])


def record_id(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()[:20]
