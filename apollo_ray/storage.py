"""One storage root for every stage: fsspec URIs, atomic writes, manifests written last.

A local path by default, ``s3://bucket/prefix`` on a cluster. The S3 endpoint and credentials come from the
environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or ``storage.endpoint_url``; nothing here logs
them. Atomicity: a local file is written to a temporary name in the same folder and renamed; an S3 object only becomes
visible when its PUT (or multipart upload) completes. A stage is done when its ``manifest.json`` exists, and the
manifest is always the last thing a stage writes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import fsspec

from apollo_ray.errors import UserError
from apollo_ray.redact import redact

MANIFEST = "manifest.json"


class MissingManifest(UserError, FileNotFoundError):
    """A stage's input folder has no manifest: the stage that writes it has not run or not finished."""


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


@dataclass
class Storage:
    """Picklable handle on the storage root; the filesystem is built lazily in each process that uses it."""

    root: str
    endpoint_url: str | None = None
    _fs: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {"root": self.root, "endpoint_url": self.endpoint_url, "_fs": None}

    @classmethod
    def from_config(cls, cfg) -> "Storage":
        return cls(cfg.storage.root, cfg.storage.endpoint_url)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            self._fs = filesystem(self.root, self.endpoint_url)
        return self._fs

    def uri(self, *parts: str) -> str:
        return join(self.root, *parts)

    # -- reads -------------------------------------------------------------------------------------------------
    def exists(self, uri: str) -> bool:
        return self.fs.exists(_path(uri))

    def read_bytes(self, uri: str) -> bytes:
        return self.fs.cat_file(_path(uri))

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_bytes(uri))

    def ls(self, uri: str) -> list[str]:
        if not self.fs.exists(_path(uri)):
            return []
        return sorted(_unpath(uri, p) for p in self.fs.ls(_path(uri), detail=False))

    def glob(self, pattern: str) -> list[str]:
        return sorted(_unpath(pattern, p) for p in self.fs.glob(_path(pattern)))

    # -- writes ------------------------------------------------------------------------------------------------
    def write_bytes(self, uri: str, data: bytes) -> str:
        """Write atomically and return the sha256 of ``data``."""
        path = _path(uri)
        if _is_remote(uri):
            self.fs.pipe_file(path, data)
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        return hashlib.sha256(data).hexdigest()

    def write_text(self, uri: str, text: str) -> str:
        return self.write_bytes(uri, text.encode("utf-8"))

    def write_json(self, uri: str, obj: Any) -> str:
        return self.write_text(uri, json.dumps(obj, indent=1, ensure_ascii=False, default=str))

    def write_parquet(self, uri: str, table, row_group_size: int | None = None) -> "Shard":
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
        data = buf.getvalue()
        sha = self.write_bytes(uri, data)
        return Shard(path=uri, rows=table.num_rows, sha256=sha, bytes=len(data))

    def read_parquet(self, uri: str):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(self.read_bytes(uri)))

    def delete(self, uri: str) -> None:
        if self.fs.exists(_path(uri)):
            self.fs.rm(_path(uri), recursive=True)

    def put_dir(self, local_dir: str | os.PathLike, uri: str) -> None:
        """Upload a folder file by file (each file atomically)."""
        local_dir = Path(local_dir)
        for f in sorted(local_dir.rglob("*")):
            if f.is_file():
                self.write_bytes(join(uri, f.relative_to(local_dir).as_posix()), f.read_bytes())

    def get_dir(self, uri: str, local_dir: str | os.PathLike) -> Path:
        """A local copy of a folder (the folder itself when the root is local)."""
        if not _is_remote(uri):
            return Path(_path(uri))
        local_dir = Path(local_dir)
        base = _path(uri).rstrip("/")
        for p in self.fs.find(base):
            rel = p[len(base):].lstrip("/")
            dst = local_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(self.fs.cat_file(p))
        return local_dir

    # -- manifests ---------------------------------------------------------------------------------------------
    def write_manifest(self, folder: str, manifest: "Manifest") -> str:
        manifest.check_counts()
        for s in manifest.shards:
            if not self.exists(join(folder, s.path)):
                raise FileNotFoundError(f"manifest of {folder} lists shard {s.path} which was never written")
        self.write_json(join(folder, MANIFEST), manifest.to_dict())
        return manifest.hash

    def read_manifest(self, folder: str) -> "Manifest":
        uri = join(folder, MANIFEST)
        if not self.exists(uri):
            raise MissingManifest(f"no {MANIFEST} in {folder}: the stage that writes it has not finished")
        return Manifest.from_dict(self.read_json(uri))

    def has_manifest(self, folder: str) -> bool:
        return self.exists(join(folder, MANIFEST))

    def verify(self, folder: str) -> "Manifest":
        """Re-hash every shard; raise naming the first one that differs from the manifest."""
        m = self.read_manifest(folder)
        for s in m.shards:
            data = self.read_bytes(join(folder, s.path))
            if hashlib.sha256(data).hexdigest() != s.sha256:
                raise ValueError(f"{join(folder, s.path)}: sha256 differs from {MANIFEST}")
        return m

    def iter_tables(self, folder: str, manifest: "Manifest | None" = None) -> Iterator:
        m = manifest or self.read_manifest(folder)
        for s in m.shards:
            yield self.read_parquet(join(folder, s.path))


@dataclass
class Shard:
    path: str  # relative to the stage folder once recorded in a manifest
    rows: int
    sha256: str
    bytes: int = 0

    def relative_to(self, folder: str) -> "Shard":
        rel = self.path[len(folder.rstrip("/")) + 1:] if self.path.startswith(folder.rstrip("/") + "/") else self.path
        return Shard(rel, self.rows, self.sha256, self.bytes)


@dataclass
class Manifest:
    """What a stage wrote, from what, with which config, and where every input record went."""

    stage: str
    fingerprint: str
    shards: list[Shard] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)  # {"in": n, "kept": n, "dropped": {reason: n}}
    config: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)  # name -> input manifest hash
    files: dict[str, str] = field(default_factory=dict)  # other artefacts: name -> relative path
    extra: dict[str, Any] = field(default_factory=dict)
    code_version: str = field(default_factory=lambda: code_version())
    created: float = field(default_factory=time.time)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def check_counts(self) -> None:
        c = self.counts
        if not c or "in" not in c:
            return
        dropped = sum(c.get("dropped", {}).values())
        if c["in"] != c.get("kept", 0) + dropped:
            raise ValueError(f"{self.stage}: counts do not add up: in={c['in']} != kept={c.get('kept', 0)} + "
                             f"dropped={dropped} {c.get('dropped', {})}")

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("stage", "fingerprint", "counts", "config", "inputs", "files", "extra",
                                           "code_version", "created")}
        d["config"], d["extra"] = redact(d["config"]), redact(d["extra"])  # a URL value may carry a credential
        d["shards"] = [vars(s) for s in self.shards]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        d = dict(d)
        d["shards"] = [Shard(**s) for s in d.get("shards", [])]
        return cls(**d)

    @property
    def hash(self) -> str:
        """Content hash (excluding the creation time) that downstream stages record as their input."""
        d = self.to_dict()
        d.pop("created")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def filesystem(root: str, endpoint_url: str | None = None) -> fsspec.AbstractFileSystem:
    protocol = root.split("://", 1)[0] if "://" in root else "file"
    if protocol in ("s3", "s3a"):
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, Any] = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
        return fsspec.filesystem("s3", **kwargs)
    return fsspec.filesystem(protocol)


def join(root: str, *parts: str) -> str:
    out = root.rstrip("/")
    for p in parts:
        if p:
            out = f"{out}/{p.strip('/')}"
    return out


def _path(uri: str) -> str:
    """fsspec path inside its filesystem (strip the protocol)."""
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if "://" in uri:
        return uri.split("://", 1)[1]
    return os.path.abspath(uri)


def _unpath(like: str, path: str) -> str:
    if "://" in like and not like.startswith("file://"):
        return like.split("://", 1)[0] + "://" + path.lstrip("/")
    return path


_CODE_VERSION: str | None = None


def code_version() -> str:
    """git sha of the checkout the code runs from (APOLLO_CODE_VERSION wins, e.g. in a container image)."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        env = os.environ.get("APOLLO_CODE_VERSION")
        if env:
            _CODE_VERSION = env
        else:
            try:
                _CODE_VERSION = subprocess.run(
                    ["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                    text=True, timeout=5).stdout.strip() or "unknown"
            except (OSError, subprocess.SubprocessError):
                _CODE_VERSION = "unknown"
    return _CODE_VERSION


def iter_files(storage: Storage, path: str, suffixes: Iterable[str]) -> list[str]:
    """Files under ``path`` (a file, a folder or a glob) whose name ends with one of ``suffixes``, sorted."""
    suffixes = tuple(suffixes)
    p = _path(path)
    fs = filesystem(path, storage.endpoint_url) if _is_remote(path) else fsspec.filesystem("file")
    if any(ch in p for ch in "*?["):
        found = fs.glob(p)
    elif fs.isdir(p):
        found = [f for f in fs.find(p)]
    elif fs.exists(p):
        found = [p]
    else:
        raise FileNotFoundError(f"no such file or folder: {path}")
    return sorted(_unpath(path, f) for f in found if f.endswith(suffixes))
