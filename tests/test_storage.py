"""Atomic writes and manifests, the same code on the local filesystem and on a real S3 server (SeaweedFS)."""

import hashlib
import threading

import pyarrow as pa
import pytest

from apollo_ray.storage import Manifest, Shard, Storage


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    s3 = request.getfixturevalue("s3")
    return Storage(f"s3://{s3.bucket}/{tmp_path.name}", endpoint_url=s3.endpoint)


def test_bytes_json_roundtrip(storage):
    uri = storage.uri("a", "b.json")
    storage.write_json(uri, {"x": "é", "n": 1})
    assert storage.read_json(uri) == {"x": "é", "n": 1}
    assert storage.exists(uri) and not storage.exists(storage.uri("a", "missing.json"))
    assert storage.ls(storage.uri("a")) == [uri]


def test_reader_never_sees_a_half_written_file(storage):
    uri = storage.uri("big.bin")
    versions = [bytes([i]) * (3 << 20) for i in range(4)]
    good = {hashlib.sha256(v).hexdigest() for v in versions}
    storage.write_bytes(uri, versions[0])
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            seen.append(hashlib.sha256(storage.read_bytes(uri)).hexdigest())

    t = threading.Thread(target=reader)
    t.start()
    for v in versions[1:] * 2:
        storage.write_bytes(uri, v)
    stop.set()
    t.join()
    assert seen and set(seen) <= good


def test_failed_local_write_leaves_previous_content(tmp_path, monkeypatch):
    st = Storage(str(tmp_path))
    uri = st.uri("f.txt")
    st.write_text(uri, "old")
    import os

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        st.write_text(uri, "new")
    monkeypatch.undo()
    assert st.read_text(uri) == "old"


def test_manifest_written_last_lists_shards_with_counts_and_hashes(storage):
    folder = storage.uri("corpus", "fp123")
    assert not storage.has_manifest(folder)
    shards = []
    for i in range(2):
        table = pa.table({"id": [f"{i}-{j}" for j in range(5)], "text": ["t"] * 5})
        shards.append(storage.write_parquet(f"{folder}/part-{i:05d}.parquet", table).relative_to(folder))
    m = Manifest(stage="collect", fingerprint="fp123", shards=shards,
                 counts={"in": 12, "kept": 10, "dropped": {"too_short": 2}})
    h = storage.write_manifest(folder, m)
    back = storage.verify(folder)
    assert back.rows == 10 and back.hash == h and back.shards[0].path == "part-00000.parquet"
    tables = list(storage.iter_tables(folder))
    assert sum(t.num_rows for t in tables) == 10


def test_manifest_rejects_counts_that_do_not_add_up(storage):
    m = Manifest(stage="collect", fingerprint="x", counts={"in": 10, "kept": 7, "dropped": {"bad_json": 2}})
    with pytest.raises(ValueError, match="do not add up"):
        storage.write_manifest(storage.uri("x"), m)
    assert not storage.has_manifest(storage.uri("x"))


def test_manifest_refuses_missing_shard_and_verify_detects_corruption(storage):
    folder = storage.uri("qa", "f")
    with pytest.raises(FileNotFoundError, match="never written"):
        storage.write_manifest(folder, Manifest("qa", "f", shards=[Shard("part-0.parquet", 1, "0" * 64)]))
    s = storage.write_parquet(f"{folder}/part-0.parquet", pa.table({"a": [1]})).relative_to(folder)
    storage.write_manifest(folder, Manifest("qa", "f", shards=[s]))
    storage.write_parquet(f"{folder}/part-0.parquet", pa.table({"a": [2]}))
    with pytest.raises(ValueError, match="sha256 differs"):
        storage.verify(folder)


def test_reading_an_unfinished_stage_says_so(storage):
    with pytest.raises(FileNotFoundError, match="has not finished"):
        storage.read_manifest(storage.uri("nothing"))


def test_dir_upload_download(storage, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A")
    (src / "sub" / "b.txt").write_text("B")
    storage.put_dir(src, storage.uri("models", "m"))
    local = storage.get_dir(storage.uri("models", "m"), tmp_path / "dst")
    assert (local / "a.txt").read_text() == "A" and (local / "sub" / "b.txt").read_text() == "B"


def test_storage_pickles_without_its_filesystem(storage):
    import pickle

    storage.exists(storage.uri("x"))  # builds the fs
    clone = pickle.loads(pickle.dumps(storage))
    assert clone._fs is None and clone.root == storage.root
