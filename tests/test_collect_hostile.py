"""collect against hostile-but-fair input: no single record stops the stage, every file under a source is read or
reported, and every input record is kept or dropped for exactly one named reason.

Each case was a defect: a line of 100,000 "[" (RecursionError in the JSON parser) and a valid-JSON lone surrogate
(the Arrow write failed) aborted the whole stage; .JSONL, .ndjson and compressed files were skipped without a word; a
UTF-8 BOM cost each file its first record; empty, control-only and symbol-only texts were called language_unknown."""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import pytest
import zstandard

from apollo_ray import config as config_mod
from apollo_ray.data import collect
from apollo_ray.storage import Storage

GOOD = [
    "Asthma is a chronic inflammatory disease of the airways that causes wheezing, breathlessness and cough. "
    "Inhaled corticosteroids control the inflammation and reduce attacks in most patients.",
    "Tuberculosis is a bacterial infection that mainly affects the lungs and spreads through the air. Treatment "
    "lasts six months and combines several antibiotics taken every day.",
    "Hypothyroidism means the thyroid gland makes too little hormone, which slows the metabolism. Symptoms include "
    "tiredness, weight gain and feeling cold; daily levothyroxine replaces the missing hormone.",
    "Gout is a form of arthritis caused by uric acid crystals in a joint, often the big toe. Attacks are treated "
    "with anti-inflammatory drugs and prevented by lowering uric acid.",
    "Sepsis is the body's extreme response to an infection and a medical emergency. Early antibiotics and fluids "
    "given within the first hour save lives.",
    "Glaucoma damages the optic nerve, usually because of raised pressure inside the eye. Eye drops that lower the "
    "pressure prevent further loss of vision.",
]


def _line(text: str, i: str) -> bytes:
    return json.dumps({"id": i, "text": text}).encode()


@pytest.fixture(scope="module")
def hostile(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    src = tmp / "in"
    src.mkdir()
    (src / "UPPER.JSONL").write_bytes(b"\xef\xbb\xbf" + _line(GOOD[0], "bom-first") + b"\n")  # BOM, upper-case name
    (src / "notes.ndjson").write_bytes(_line(GOOD[1], "ndjson") + b"\n")
    (src / "part.jsonl.gz").write_bytes(gzip.compress(_line(GOOD[2], "gz") + b"\n" + b"[" * 100_000 + b"\n"))
    (src / "part.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_line(GOOD[3], "zst") + b"\n"))
    (src / "part.jsonl.bz2").write_bytes(bz2.compress(_line(GOOD[4], "bz2") + b"\n"))
    (src / "odd.jsonl").write_bytes(b"\n".join([
        b'{"id": "surrogate", "text": "a \\ud800 b ' + GOOD[5].encode() + b'"}',  # valid JSON, not encodable
        _line("", "empty"),
        _line("\u0001\u0002\u0003 \u0007", "controls"),
        _line("#### $$$$ %%%% 1234 5678 ++++ ==== //// ---- ;;;; " * 3, "symbols"),
        _line(GOOD[5], "last"),
    ]) + b"\n")
    (src / "scan.pdf").write_bytes(b"%PDF-1.4 not a corpus file")
    (src / "old.parquet.gz").write_bytes(gzip.compress(b"PAR1"))
    cfg = config_mod.resolve({"storage": {"root": str(tmp / "store")}, "tracking": {"enabled": False},
                              "data": {"sources": [{"name": "web", "path": str(src), "kind": "web",
                                                    "language": "en"}]}})
    out = collect.run(cfg)
    return Storage.from_config(cfg), out, src


def test_every_record_is_kept_or_dropped_for_one_reason(hostile):
    storage, out, _ = hostile
    m = storage.read_manifest(out)
    c = m.counts
    # control characters are removed by normalisation, so a control-only text is empty: too_short
    assert c["dropped"] == {"bad_json": 1, "invalid_utf8": 1, "too_short": 2, "no_letters": 1}
    assert c["kept"] == 6 and c["in"] == c["kept"] + sum(c["dropped"].values()) == 11
    kept_ids = {d.split(":")[0] for d in collect.read_paragraphs(storage, out)["doc_id"].to_pylist()}
    assert kept_ids == {"bom-first", "ndjson", "gz", "zst", "bz2", "last"}  # the BOM no longer costs record 1


def test_quarantine_names_file_line_and_reason(hostile):
    storage, out, src = hostile
    rejects = collect.read_quarantine(storage, out)
    where = dict(zip(rejects["where"].to_pylist(), rejects["reason"].to_pylist()))
    assert where[f"{src / 'part.jsonl.gz'}:2"] == "bad_json"  # 100,000 "[": the parser's recursion limit
    assert where[f"{src / 'odd.jsonl'}:1"] == "invalid_utf8"  # a lone surrogate
    assert [where[f"{src / 'odd.jsonl'}:{n}"] for n in (2, 3, 4)] == ["too_short", "too_short", "no_letters"]
    raw = dict(zip(rejects["where"].to_pylist(), rejects["raw"].to_pylist()))
    assert "\\ud800" in raw[f"{src / 'odd.jsonl'}:1"]  # kept as written, so it can be inspected


def test_files_not_of_the_format_are_reported_not_silently_skipped(hostile):
    storage, out, _ = hostile
    assert storage.read_manifest(out).extra["skipped_files"] == {"web": ["old.parquet.gz", "scan.pdf"]}


@pytest.mark.parametrize("name, fmt", [
    ("a.JSONL", "jsonl"), ("a.ndjson", "jsonl"), ("a.jsonl.gz", "jsonl"), ("a.Json.ZST", "json"),
    ("a.txt.bz2", "txt"), ("a.MD", "txt"), ("a.parquet", "parquet"), ("a.parquet.gz", None), ("a.pdf", None),
    ("a.gz", None),
])
def test_file_format_from_name(name, fmt):
    assert collect._file_format(name) == fmt
