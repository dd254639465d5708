"""A real multi-node Ray cluster on one machine, with the services a cluster run uses: two ``ray start`` nodes (a head
and a worker, each with its own CPUs, custom resources and temp dir), a SeaweedFS S3 server and an MLflow server
(from :mod:`apollo_ray.services`), all on 127.0.0.1 and free ports.

``cluster/local/start.sh`` / ``stop.sh`` call ``python -m apollo_ray.localcluster start|stop``; tests use
:class:`LocalCluster` directly. ``start`` writes an env file to ``source``: ``RAY_ADDRESS`` (the dashboard / job API,
for ``ray job submit``), the Ray token settings, ``AWS_*`` for S3 and ``MLFLOW_TRACKING_URI``.

Token authentication (Ray >= 2.52). The head turns it on when ``RAY_AUTH_MODE=token`` is set (or, with the mode
unset, when it finds a token), but a node or client joining with the mode unset sends no token and the GCS
refuses it ("RAY_AUTH_MODE is currently 'disabled'"), even when the token file is in reach. So every process gets
``RAY_AUTH_MODE=token`` explicitly, and ``RAY_AUTH_TOKEN_PATH`` pointing to a token generated for this cluster in
its own temp dir: ``~/.ray/auth_token``, which other local Rays use, is neither read nor written.

Nothing leaks: every file (Ray temp dirs, token, S3 data, MLflow db, logs, the pid record) lives under one temp dir,
removed by ``stop``; ``stop`` ends exactly the processes ``start`` recorded, checking each still belongs to this
cluster (its command line names the temp dir) before signalling it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from apollo_ray.services import MLflowServer, SeaweedS3, free_port, wait_for

STATE_FILE = "state.json"
ENV_DIR_KEY = "APOLLO_LOCAL_CLUSTER_DIR"


@dataclass
class LocalCluster:
    """Head + one worker node + S3 + MLflow; ``start()`` returns once both nodes are alive and the services answer."""

    workdir: Path | None = None  # None: a fresh short temp dir; stop() removes it either way
    num_cpus: int = 1
    head_resources: dict[str, float] = field(default_factory=lambda: {"head": 1})
    worker_resources: dict[str, float] = field(default_factory=lambda: {"worker": 1})
    # Small object stores: this is a development cluster on a shared machine, and /dev/shm is finite.
    object_store_bytes: int = 256 * 1024**2
    with_services: bool = True
    pids: dict[str, int] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    s3: SeaweedS3 | None = field(default=None, repr=False)
    mlflow: MLflowServer | None = field(default=None, repr=False)

    # -- paths and endpoints ------------------------------------------------------------------------------------
    @property
    def token_path(self) -> Path:
        return self._dir / "auth_token"

    @property
    def _dir(self) -> Path:
        if self.workdir is None:
            raise RuntimeError("the cluster is not started")
        return self.workdir

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['gcs']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    def auth_env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def env(self) -> dict[str, str]:
        """What a client needs: the env file's content."""
        out = {"RAY_ADDRESS": self.dashboard_url, "RAY_API_SERVER_ADDRESS": self.dashboard_url,
               # ray.init() and drivers run outside `ray job submit` need the GCS address, not the dashboard's.
               "APOLLO_RAY_GCS_ADDRESS": self.gcs_address, **self.auth_env(), ENV_DIR_KEY: str(self._dir)}
        if self.s3 is not None:
            out.update(self.s3.env)
        if self.mlflow is not None:
            out["MLFLOW_TRACKING_URI"] = self.mlflow.uri
        return out

    # -- start ---------------------------------------------------------------------------------------------------
    def start(self, timeout: float = 240) -> "LocalCluster":
        # A short path: Ray's Unix sockets live under the temp dir, and socket paths are limited to ~107 bytes.
        self.workdir = Path(tempfile.mkdtemp(prefix="ar-", dir="/tmp")) if self.workdir is None else self.workdir
        self._dir.mkdir(parents=True, exist_ok=True)
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        # Job entrypoints say `python ...`: it must be this interpreter, the one with the project and Ray.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        node_env = {**os.environ, **self.auth_env(), "PATH": path, "RAY_USAGE_STATS_ENABLED": "0"}
        pool = ThreadPoolExecutor(max_workers=1)
        mlflow_ready: Future | None = None
        try:
            if self.with_services:
                self.s3 = SeaweedS3(self._dir / "s3").start()
                self.pids["s3"] = self.s3.proc.pid
                self._save()
                # Ray workers inherit their node's environment: stages on either node reach S3.
                node_env.update(self.s3.env)
                # Artifacts next to the runs on S3, as on a real cluster, when the server can write there (boto3).
                artifacts = f"s3://{self.s3.bucket}/mlflow-artifacts" if importlib.util.find_spec("boto3") else None
                self.mlflow = MLflowServer(self._dir / "mlflow", artifacts=artifacts, env=self.s3.env)
                # MLflow takes the better part of a minute to import on a small machine: overlap it with Ray's start.
                mlflow_ready = pool.submit(self.mlflow.start)
            self._start_node("ray-head", node_env, self.head_resources, self._head_args, 1, timeout)
            self._start_node("ray-worker", node_env, self.worker_resources, lambda: ["--address", self.gcs_address],
                             2, timeout)
            if mlflow_ready is not None:
                mlflow_ready.result()
        except BaseException:
            if mlflow_ready is not None:
                wait([mlflow_ready])  # its process must be known before everything is stopped
            self.stop()
            raise
        finally:
            pool.shutdown()
            self._record_mlflow()
        return self

    def _record_mlflow(self) -> None:
        if self.mlflow is not None and self.mlflow.proc is not None and "mlflow" not in self.pids:
            self.pids["mlflow"] = self.mlflow.proc.pid
            self._save()

    def _head_args(self) -> list[str]:
        self.ports = {"gcs": free_port(), "dashboard": free_port(), "client": free_port()}
        return ["--head", "--port", str(self.ports["gcs"]), "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(self.ports["dashboard"]), "--ray-client-server-port", str(self.ports["client"])]

    def _start_node(self, name: str, env: dict[str, str], resources: dict[str, float],
                    args: Callable[[], list[str]], alive: int, timeout: float, attempts: int = 3) -> None:
        """Start one node and wait until ``alive`` nodes are; a node that exits during startup is retried: Ray
        gives a raylet a fixed 30 s to register, which a heavily loaded machine can miss."""
        log = self._dir / f"{name}.log"
        for attempt in range(1, attempts + 1):
            proc = self._spawn_node(name, env, resources, args())
            try:
                wait_for(lambda: len(self.alive_nodes()) >= alive, timeout, name, proc, log)
                return
            except RuntimeError:
                if attempt == attempts:
                    raise
                stop_recorded(self._dir / name, {name: proc.pid})  # whatever the failed start left behind

    def _spawn_node(self, name: str, env: dict[str, str], resources: dict[str, float],
                    args: list[str]) -> subprocess.Popen:
        ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray") or "ray"
        # Two raylets on one host: every per-node port is picked here, the defaults (52365, ...) would collide.
        cmd = [ray_bin, "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(self.num_cpus),
               "--resources", json.dumps(resources), "--temp-dir", str(self._dir / name),
               "--object-store-memory", str(self.object_store_bytes),
               "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
               "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
               "--disable-usage-stats", *args]
        # --block keeps `ray start` alive as the parent of its node's processes (one process group), and it tears
        # them down on SIGTERM: one pid to record and signal per node. The log appends: a retry keeps the failure.
        with open(self._dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.pids[name] = proc.pid
        self._save()
        return proc

    def alive_nodes(self) -> list[dict]:
        """Alive nodes per the dashboard's state API (which itself wants the token)."""
        import httpx

        headers = {"Authorization": f"Bearer {self.token_path.read_text().strip()}"}
        r = httpx.get(f"{self.dashboard_url}/api/v0/nodes", headers=headers, timeout=5)
        r.raise_for_status()
        nodes = r.json()["data"]["result"]["result"]
        return [n for n in nodes if n.get("state") == "ALIVE"]

    # -- record, stop --------------------------------------------------------------------------------------------
    def _save(self) -> None:
        state = {"workdir": str(self._dir), "pids": self.pids, "ports": self.ports}
        (self._dir / STATE_FILE).write_text(json.dumps(state, indent=1))

    def write_env(self, path: Path) -> None:
        lines = ["# Written by cluster/local/start.sh: `source` it; cluster/local/stop.sh ends the cluster.",
                 "# Stages run on the cluster through the job API, e.g.",
                 "#   ray job submit --working-dir . -- python jobs/collect.py --config ray_config.yaml \\",
                 "#       --set storage.root=s3://apollo/runs --set tracking.uri=$MLFLOW_TRACKING_URI",
                 *[f"export {k}={shlex.quote(v)}" for k, v in self.env().items()]]
        path.write_text("\n".join(lines) + "\n")

    def stop(self) -> None:
        if self.workdir is None:
            return
        self._record_mlflow()
        stop_recorded(self._dir, self.pids)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ours(pid: int, workdir: Path) -> bool:
    # A recorded pid may have been reused by an unrelated process since: only signal one that names our temp dir.
    return str(workdir) in _cmdline(pid)


def cluster_processes(workdir: Path) -> list[int]:
    """Every live process whose command line names ``workdir`` (Ray's daemons and workers carry their temp dir)."""
    me = os.getpid()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me and _ours(int(entry.name), workdir):
            pids.append(int(entry.name))
    return pids


def _wait_gone(pids: list[int], timeout: float, workdir: Path) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        pids = [p for p in pids if _ours(p, workdir)]
        if not pids:
            return []
        time.sleep(0.2)
    return pids


def stop_recorded(workdir: Path, pids: dict[str, int], timeout: float = 30) -> None:
    """SIGTERM each recorded process (the worker node first, so that it does not outlive its head), SIGKILL what is
    left of its process group, then of anything else naming this cluster's temp dir."""
    order = ["ray-worker", "ray-head", "mlflow", "s3"]
    for name in sorted(pids, key=lambda n: order.index(n) if n in order else len(order)):
        pid = pids[name]
        if not _ours(pid, workdir):
            continue
        try:
            if name.startswith("ray-"):
                # The leader only: `ray start --block` stops its node's processes in order within seconds, while a
                # SIGTERM to the whole group at once leaves it waiting on half-dead children for half a minute.
                os.kill(pid, signal.SIGTERM)
            else:
                # The servers the other way round: `mlflow server` waits on its uvicorn child for ~45 s.
                os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        _wait_gone([pid], timeout, workdir)
        try:
            # Each was started as the leader of its own session; its group id is not reused while members live.
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    leftovers = cluster_processes(workdir)
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _wait_gone(leftovers, 10, workdir)


# ------------------------------------------------------------------------------------------------------------ CLI
def _read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            out[key] = shlex.split(value)[0] if value else ""
    return out


def stop_from_env_file(env_file: Path) -> bool:
    """Stop the cluster an env file describes; False when there is none."""
    if not env_file.exists():
        return False
    workdir = Path(_read_env_file(env_file).get(ENV_DIR_KEY, ""))
    state_file = workdir / STATE_FILE
    if workdir.is_absolute() and state_file.exists():
        state = json.loads(state_file.read_text())
        stop_recorded(workdir, {k: int(v) for k, v in state["pids"].items()})
        shutil.rmtree(workdir, ignore_errors=True)
    env_file.unlink()
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apollo_ray.localcluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--env-file", type=Path, default=Path("cluster/local/.env"))
    parser.add_argument("--num-cpus", type=int, default=1, help="CPUs of each node")
    parser.add_argument("--no-services", action="store_true", help="Ray only, no S3 and MLflow")
    args = parser.parse_args(argv)
    if args.action == "stop":
        print("stopped" if stop_from_env_file(args.env_file) else f"nothing to stop ({args.env_file} missing)")
        return 0
    if args.env_file.exists():
        # A previous cluster: refuse while it lives, clean up after it when it is gone.
        state = Path(_read_env_file(args.env_file).get(ENV_DIR_KEY, "/nonexistent")) / STATE_FILE
        if state.exists() and any(_ours(int(p), state.parent) for p in json.loads(state.read_text())["pids"].values()):
            print(f"a local cluster is already running ({args.env_file}); stop it first", file=sys.stderr)
            return 1
        stop_from_env_file(args.env_file)
    cluster = LocalCluster(num_cpus=args.num_cpus, with_services=not args.no_services).start()
    args.env_file.parent.mkdir(parents=True, exist_ok=True)
    cluster.write_env(args.env_file)
    env = cluster.env()
    for key in ("RAY_ADDRESS", "APOLLO_RAY_GCS_ADDRESS", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
        if key in env:
            print(f"{key}={env[key]}")
    print(f"source {args.env_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
