"""Ray Tune sweeps: search-space validation (fast) and a real sweep killed and resumed (slow)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from apollo_ray import config as config_mod
from apollo_ray.config import ConfigError
from apollo_ray.tune import sweep


def test_search_space_parsing_names_bad_keys_and_values():
    cfg = config_mod.resolve({"tune": {"search_space": {
        "moe.routng": {"grid": ["topk"]}, "moe.layers": {"grid": [1, 99]}, "train.lr": {"loguniform": [1e-4]},
        "moe.top_k": {"sometimes": [1]}}}})
    with pytest.raises(ConfigError) as e:
        sweep.parse_search_space(cfg)
    msg = str(e.value)
    assert "tune.search_space.moe.routng: unknown" in msg
    assert "moe.layers: value 99 is invalid" in msg and "only 4 decoder layers" in msg
    assert "train.lr.loguniform = [0.0001]: expected [low, high]" in msg
    assert "tune.search_space.moe.top_k = {'sometimes': [1]}" in msg


def test_default_space_is_the_routing_ablation():
    space = sweep.parse_search_space(config_mod.resolve({}))
    assert space == {"moe.routing": ("grid", ["topk", "language", "hybrid"]), "moe.layers": ("grid", [1, 2])}
    ps = sweep.param_space(space)
    assert ps["moe.routing"] == {"grid_search": ["topk", "language", "hybrid"]}


def test_trial_config_applies_params():
    base = config_mod.to_dict(config_mod.resolve({}))
    cfg = sweep.trial_config(base, {"moe.routing": "topk", "moe.layers": 1, "train.lr": 0.01}, "abc")
    assert cfg.moe.routing == "topk" and cfg.moe.layers == 1 and cfg.train.lr == 0.01
    assert cfg.train.run_name.endswith("-abc")


def test_outputs_best_fragment_validates_and_plot(tmp_path):
    from apollo_ray.storage import Storage

    cfg = config_mod.resolve({}, [f"storage.root={tmp_path}"])
    space = sweep.parse_search_space(cfg)
    rows = [{"moe.routing": r, "moe.layers": n, "major": 0.2 + 0.01 * i, "minor": 0.1, "heldout_loss": 3.0 - i,
             "trial": str(i), "error": ""}
            for i, (r, n) in enumerate((r, n) for r in ("topk", "language", "hybrid") for n in (1, 2))]
    st = Storage(str(tmp_path))
    sweep.write_outputs(cfg, st, str(tmp_path / "tune"), space, rows)
    best = yaml.safe_load((tmp_path / "tune" / "best.yaml").read_text())
    assert best == {"preset": "tiny", "moe": {"routing": "hybrid", "layers": 2}}
    assert config_mod.resolve(best).moe.routing == "hybrid"
    table = (tmp_path / "tune" / "results.md").read_text()
    assert table.splitlines()[2].startswith("| hybrid | 2 | 25.0 |")  # sorted by Major
    assert (tmp_path / "tune" / "layers.png").read_bytes()[:4] == b"\x89PNG"


# The default search space (3 routing variants x 2 layer counts) on the tiny preset, trials kept short.
SWEEP = ["train.max_steps=3", "train.checkpoint_every=3", "train.eval_every=3", "tune.scheduler=fifo",
         "eval.limit=4", "eval.shots=0"]
GRID = [(routing, layers) for routing in ("topk", "language", "hybrid") for layers in (1, 2)]


def _script(root: Path) -> str:
    return textwrap.dedent(f"""
        from apollo_ray import config as C
        from apollo_ray.runtime import setup_logging
        from apollo_ray.tune import sweep
        setup_logging()
        cfg = C.resolve({{}}, [f"storage.root={str(root)}", *{SWEEP!r}])
        print("OUT", sweep.run(cfg))
    """)


def _finished_trials(root: Path) -> int:
    return sum(1 for p in (root / "tune" / "routing-sweep").glob("*/result.json")
               if '"major"' in p.read_text())


@pytest.mark.slow
def test_sweep_killed_driver_resumes_without_rerunning_finished_trials(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-c", _script(tmp_path)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    while _finished_trials(tmp_path) < 1 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    # Its own session (process group): the driver and the local Ray it started get the kill, nothing else. Not
    # reaped yet, so its pid (the group id) cannot have been reused.
    running = proc.poll() is None
    if running:
        os.killpg(proc.pid, signal.SIGKILL)
    code = proc.wait(timeout=60)
    assert running and code == -signal.SIGKILL, f"the sweep ended (exit code {code}) before the kill: nothing to resume"
    finished = _finished_trials(tmp_path)
    assert 1 <= finished < len(GRID), f"{finished} trials finished before the kill (of {len(GRID)})"
    r = subprocess.run([sys.executable, "-c", _script(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    out = Path([x.split(" ", 1)[1] for x in r.stdout.splitlines() if x.startswith("OUT ")][0])
    table = (out / "results.md").read_text()
    for routing, layers in GRID:
        assert f"| {routing} | {layers} |" in table, table
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert (best["moe"]["routing"], best["moe"]["layers"]) in GRID
    config_mod.resolve(best)
    assert (out / "layers.png").read_bytes()[:4] == b"\x89PNG"
    # MLflow: one sweep parent; every trial exactly once as a finished child run (finished ones were not re-run).
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("apollo-ray")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    trials = [x for x in runs if x.info.run_name.startswith("trial-") and x.info.status == "FINISHED"]
    ids = [x.data.tags["apollo.trial_id"] for x in trials]
    assert len(ids) == len(GRID) and len(set(ids)) == len(GRID), ids
    swept = [(x.data.params["cfg.moe.routing"], int(x.data.params["cfg.moe.layers"])) for x in trials]
    assert sorted(swept) == sorted(GRID)
    sweeps = {x.info.run_id for x in runs if x.info.run_name == "tune"}
    assert all(x.data.tags.get("mlflow.parentRunId") in sweeps for x in trials)
    assert all("major" in x.data.metrics for x in trials)
