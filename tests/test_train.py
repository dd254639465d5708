"""Mix training on Ray Train + DeepSpeed (2 CPU workers): learning, export, MLflow, and fault tolerance.

The fault-tolerance tests compare final weights with an uninterrupted run of the same config: training is
deterministic on CPU (fixed rows per step, no dropout), so equal weights mean the resumed run trained on exactly the
same items in the same order — nothing repeated, nothing skipped.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from apollo_ray import config as config_mod
from apollo_ray.storage import Storage
from helpers import write_sample_qa

pytestmark = pytest.mark.slow
# The kills below follow the first checkpoint (step 4) at once and each test asserts that its run resumed from a
# checkpoint before the end; 36 more steps leave the run far from done whatever the machine's speed.
STEPS = 40
DEADLINE_S = 900  # for a wait on the run: generous on a loaded machine, then a failure that says what it waited for


def _cfg(root: Path, run_name: str, *extra: str) -> config_mod.Config:
    return config_mod.resolve({}, [f"storage.root={root}", f"train.run_name={run_name}", f"train.max_steps={STEPS}",
                                   "train.checkpoint_every=4", "train.eval_every=4", "train.max_failures=3", *extra])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    cfg = _cfg(root, "x")
    storage = Storage.from_config(cfg)
    qa = write_sample_qa(storage, cfg.uri("qa", "sample"))
    return root, qa


@pytest.fixture(scope="module")
def baseline(store, ray_local):
    from apollo_ray.train import trainer

    root, qa = store
    cfg = _cfg(root, "baseline")
    return cfg, trainer.run(cfg, qa)


def _weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    assert files, f"no safetensors in {path}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def _assert_same_weights(a: str, b: str) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_trains_post_moe_exports_and_tracks(baseline):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, out = baseline
    storage = Storage.from_config(cfg)
    manifest = storage.read_manifest(out)
    assert manifest.stage == "train"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "apollo_post_moe" and model.config.routing == "hybrid"
    assert len(model.config.moe_layers) == 2 and model.config.num_experts == 12
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Hypertension is", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == model.config.vocab_size
    assert not list(Path(out).glob("*.bin")) and not list(Path(out).glob("*.pt"))

    client = mlflow.MlflowClient(cfg.tracking_uri())
    run = client.get_run(manifest.extra["mlflow_run_id"])
    loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(loss) == STEPS
    assert sum(loss[-2:]) / 2 < sum(loss[:2]) / 2 - 0.05, loss  # it learns
    keys = run.data.metrics.keys()
    for k in ("lr", "grad_norm", "tokens_per_s", "mfu", "router_aux_loss", "heldout_loss", "loss/en", "loss/zh",
              "loss_kind/exam", "loss_kind/encyclopedia", "moe/layer2/expert_0", "mixture/fill"):
        assert k in keys, k
    assert run.data.metrics["mixture/fill"] >= 0.99
    # ep_size 2: the busiest rank's expert tokens over the mean rank's, recomputed from the logged per-expert shares
    # and the placement the trainer derives from the training rows' languages (max/mean is scale-free).
    from apollo_ray.model.parallel import balanced_placement, ep_imbalance
    from apollo_ray.train.dataset import read_rows

    # The mixture this run trained on (other runs of the module may have built theirs beside it).
    mixture = [p for p in storage.ls(cfg.uri("mixture"))
               if storage.read_manifest(p).hash == manifest.extra["identity"]["mixture"]]
    assert len(mixture) == 1, mixture
    lang = read_rows(storage, mixture[0], "train")["language_ids"]
    placement = balanced_placement(np.bincount(lang[lang >= 0].astype(np.int64), minlength=12).tolist(), 2)
    assert placement != list(range(12))  # the sample's language loads are uneven in contiguous blocks
    for layer in (2, 3):
        def history(key: str) -> list[float]:
            return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]

        logged = history(f"moe/layer{layer}/ep_imbalance")
        shares = torch.tensor([history(f"moe/layer{layer}/expert_{e}") for e in range(12)]).T  # [steps, experts]
        assert len(logged) == STEPS
        assert logged == pytest.approx(ep_imbalance(shares, placement, 2).tolist(), rel=1e-6)
    lr = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "lr"), key=lambda m: m.step)]
    # Warmup then cosine decay, as lr_lambda defines it; the logged lr is the one after the step's optimizer step.
    from apollo_ray.train.loop import lr_lambda

    t = cfg.train
    expected = [t.lr * lr_lambda(s, STEPS, t.warmup_ratio, t.min_lr_ratio) for s in range(1, STEPS + 1)]
    assert lr == pytest.approx(expected)
    assert lr[-1] < max(lr)


def _train_script(root: Path, qa: str, run_name: str) -> str:
    return textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_train import _cfg
        from apollo_ray.train import trainer
        from pathlib import Path
        print("OUT", trainer.run(_cfg(Path({str(root)!r}), {run_name!r}), {qa!r}))
    """)


def _checkpoints(root: Path, run_name: str) -> list[Path]:
    """Checkpoints whose upload is complete (the trainer state is written by rank 0 with the DeepSpeed files)."""
    return sorted(p.parent for p in (root / "checkpoints" / run_name).glob("checkpoint_*/trainer_state.json"))


def _registered_step(root: Path, run_name: str) -> int:
    """The step of the latest checkpoint that Ray Train's controller has registered (and saved in its run state), 0
    before any. A restart resumes from this one: a checkpoint already on disk but not yet registered does not count."""
    snapshot = root / "checkpoints" / run_name / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
    except (FileNotFoundError, ValueError, KeyError):  # not written yet, or being written
        return 0
    return int(latest["metrics"]["step"]) if latest else 0


def test_restarted_job_with_same_name_resumes(store, baseline):
    root, qa = store
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Its own session (process group): the driver and the local Ray it starts, and nothing else, get the kill.
    proc = subprocess.Popen([sys.executable, "-c", _train_script(root, qa, "restart")], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill the job as soon as Ray Train's run state (which the rerun restores) records a checkpoint.
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline and proc.poll() is None and not _registered_step(root, "restart"):
        time.sleep(0.05)
    at_kill = _registered_step(root, "restart")
    running = proc.poll() is None  # not reaped: its pid (= its group id) cannot have been reused
    if running:
        os.killpg(proc.pid, signal.SIGKILL)
    code = proc.wait(timeout=60)
    assert running, f"the first attempt ended (exit code {code}) before it recorded a checkpoint: nothing to kill"
    assert code == -signal.SIGKILL
    assert _checkpoints(root, "restart"), f"no checkpoint within {DEADLINE_S} s"
    r = subprocess.run([sys.executable, "-c", _train_script(root, qa, "restart")], env=env, capture_output=True,
                       text=True, timeout=DEADLINE_S)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = re.search(rf"resumed at step (\d+)/{STEPS}", r.stdout + r.stderr)
    assert resumed and at_kill <= int(resumed[1]) < STEPS and int(resumed[1]) % 4 == 0, (r.stdout + r.stderr)[-3000:]
    out = [line.split(" ", 1)[1] for line in r.stdout.splitlines() if line.startswith("OUT ")][0]
    _assert_same_weights(out, baseline[1])


def _train_workers(**where: str) -> list:
    """Ray Train's worker actors in this test's own Ray (the module's ``ray_local``: the State API of the Ray this
    process started, its node), never a process of another job on the host; extra ``where`` filters by field."""
    import ray
    from ray.util.state import list_actors

    node = ray.get_runtime_context().get_node_id()
    filters = [("class_name", "=", "RayTrainWorker"), ("node_id", "=", node), *((k, "=", v) for k, v in where.items())]
    return list_actors(filters=filters, limit=10_000)


def _train_log(run_name: str) -> list[str]:
    """The messages of one run in Ray Train's worker logs (``logs/train/ray-train-app-worker-*.log`` of this test's
    Ray session, JSON lines tagged with the run name), read from that session's own log folder: the State API's log
    route answered 500 under load, and the files are this test's cluster's alone."""
    from ray._private.worker import global_worker

    logs = Path(global_worker.node.get_logs_dir_path()) / "train"
    messages = []
    for f in sorted(logs.glob("ray-train-app-worker-*")):
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written right now
            if record.get("run_name") == run_name:
                messages.append(record["message"])
    return messages


def test_killed_worker_is_replaced_and_run_continues(store, baseline, ray_local):
    from apollo_ray.train import trainer

    root, qa = store
    cfg = _cfg(root, "workerkill")
    earlier = {a.actor_id for a in _train_workers()}  # the workers of the module's earlier runs
    killed: dict = {}
    errors: list[BaseException] = []
    done = threading.Event()

    def killer():
        try:
            deadline = time.monotonic() + DEADLINE_S
            workers: list = []
            while not done.is_set() and time.monotonic() < deadline:
                if len(workers) < 2:  # this run's two, found before its checkpoint so that the kill follows it at once
                    workers = [a for a in _train_workers(state="ALIVE") if a.actor_id not in earlier]
                elif step := _registered_step(root, "workerkill"):
                    victim = workers[-1]
                    cmdline = Path(f"/proc/{victim.pid}/cmdline").read_bytes()
                    assert b"RayTrainWorker" in cmdline, (victim, cmdline)  # still that actor's process
                    os.kill(victim.pid, signal.SIGKILL)
                    killed.update(actor_id=victim.actor_id, pid=victim.pid, step=step)
                    return
                time.sleep(0.05)
        except BaseException as e:  # noqa: BLE001 (reported by the test thread)
            errors.append(e)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        out = trainer.run(cfg, qa)
    finally:
        done.set()
        t.join(timeout=60)
    assert not errors, errors
    assert killed, "no worker was killed: the run finished before its first checkpoint (or its workers never showed)"
    # The kill happened in this run, and the run went on in a new worker group that resumed from a checkpoint.
    mine = {a.actor_id: a for a in _train_workers() if a.actor_id not in earlier}
    assert len(mine) == 4, [(a.actor_id, a.pid, a.state) for a in mine.values()]  # the first group of 2, a new one
    assert mine[killed["actor_id"]].state == "DEAD"
    log = _train_log("workerkill")
    resumed = [m for m in log if re.fullmatch(rf"resumed at step \d+/{STEPS} from .*", m)]
    assert len(resumed) == 1, log[-40:]  # rank 0 of the new group, once
    step = int(re.search(r"step (\d+)/", resumed[0])[1])
    # from the latest checkpoint registered at the kill (or a later one), well before the end
    assert killed["step"] <= step < STEPS and step % 4 == 0, (killed, resumed)
    assert f"step {STEPS}/{STEPS} " in " ".join(log)  # and trained to the end
    _assert_same_weights(out, baseline[1])


def test_metric_logging_failure_reaches_the_training_thread(tmp_path):
    """Rank 0 logs to MLflow from a background thread; a failure there must not vanish with the thread."""
    from apollo_ray.train.loop import _Tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("t"))
    ok = _Tracking({"mlflow_run_id": run.info.run_id, "tracking_uri": uri})
    for step in (1, 2):
        ok.log({"loss": 1.0 / step, "nan": float("nan"), "none": None}, step)
    ok.flush()
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.0, 0.5]
    assert not client.get_metric_history(run.info.run_id, "nan")  # non-finite values are left out, not an error
    bad = _Tracking({"mlflow_run_id": "no-such-run", "tracking_uri": uri})
    bad.log({"loss": 1.0}, 1)
    with pytest.raises(RuntimeError, match="logging metrics to MLflow failed"):
        bad.flush()
