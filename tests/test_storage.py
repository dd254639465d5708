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


DEADLINE_S = 120  # generous for a loaded machine: a wait fails with its own message instead of hanging


def test_reader_never_sees_a_half_written_file(storage):
    """A reader racing the writer sees only whole versions. The race is made to happen rather than hoped for: the
    writer keeps writing until the reader has completed reads while writes were under way (or fails at a deadline)."""
    import time

    uri = storage.uri("big.bin")
    versions = [bytes([i]) * (3 << 20) for i in range(4)]
    good = {hashlib.sha256(v).hexdigest() for v in versions}
    storage.write_bytes(uri, versions[0])
    seen: list[str] = []
    reading, stop = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def reader():
        try:
            while not stop.is_set():
                seen.append(hashlib.sha256(storage.read_bytes(uri)).hexdigest())
                reading.set()
        except BaseException as e:  # noqa: BLE001 (reported by the test thread)
            errors.append(e)
            reading.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    assert reading.wait(DEADLINE_S), f"the reader did not complete a read within {DEADLINE_S} s"
    writes, start, deadline = 0, len(seen), time.monotonic() + DEADLINE_S
    while writes < 6 or len(seen) - start < 20:  # at least 6 writes, and 20 reads made while they went on
        assert not errors, errors
        assert time.monotonic() < deadline, f"{writes} writes, {len(seen) - start} reads in {DEADLINE_S} s"
        storage.write_bytes(uri, versions[1 + writes % 3])
        writes += 1
    stop.set()
    t.join(DEADLINE_S)
    assert not t.is_alive() and not errors, errors
    assert set(seen) <= good, "a reader saw a version that was never written whole"


def test_a_read_in_the_middle_of_a_local_write_sees_the_old_version(tmp_path, monkeypatch):
    """Deterministic: the write is paused after its bytes are on disk and before they become the file; a read then
    gets the previous version whole."""
    import os

    st = Storage(str(tmp_path / "root"))
    uri = st.uri("d", "f.bin")
    old, new = b"o" * (1 << 20), b"n" * (1 << 20)
    st.write_bytes(uri, old)
    paused, resume = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def fsync(fd):  # the write's last step before os.replace
        real_fsync(fd)
        paused.set()
        assert resume.wait(DEADLINE_S), "the test never let the write finish"

    monkeypatch.setattr(os, "fsync", fsync)
    writer = threading.Thread(target=st.write_bytes, args=(uri, new), daemon=True)
    writer.start()
    assert paused.wait(DEADLINE_S), f"the write did not reach its fsync within {DEADLINE_S} s"
    try:
        (tmp,) = [u for u in st.ls(st.uri("d")) if u != uri]
        assert st.read_bytes(tmp) == new  # really mid-write: the new bytes are on disk, beside the file
        assert st.read_bytes(uri) == old
    finally:
        resume.set()
        writer.join(DEADLINE_S)
    assert not writer.is_alive()
    assert st.read_bytes(uri) == new and st.ls(st.uri("d")) == [uri]  # and the temp file is gone


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


@pytest.mark.parametrize("counts, ok", [
    ({"in": 10, "kept": 10, "dropped": {}}, True),
    ({"in": 10, "kept": 10}, True),  # no dropped reasons at all
    ({"in": 10, "kept": 7, "dropped": {"bad_json": 1, "too_short": 2}}, True),  # summed over every reason
    ({"in": 0, "kept": 0, "dropped": {}}, True),
    ({}, True),  # a stage without counts (e.g. a model export) is not checked
    ({"in": 10, "kept": 8, "dropped": {"bad_json": 1, "too_short": 2}}, False),  # one record too many
    ({"in": 10, "kept": 6, "dropped": {"bad_json": 1, "too_short": 2}}, False),  # one record lost
    ({"in": 10, "dropped": {"bad_json": 10}, "kept": 1}, False),
    ({"in": 5, "dropped": {"bad_json": 2}}, False),  # kept missing counts as 0
])
def test_manifest_counts_must_account_for_every_input(tmp_path, counts, ok):
    """The same check seen from the other side (the test above: one bad case): good counts are accepted and round-
    trip; an input record counted twice or not at all is refused and leaves no manifest."""
    st = Storage(str(tmp_path))
    folder = st.uri("stage")
    m = Manifest(stage="collect", fingerprint="x", counts=counts)
    if ok:
        st.write_manifest(folder, m)
        assert st.read_manifest(folder).counts == counts
    else:
        with pytest.raises(ValueError, match=rf"counts do not add up: in={counts['in']} "):
            st.write_manifest(folder, m)
        assert not st.has_manifest(folder)


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
