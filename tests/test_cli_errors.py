"""Every user mistake at the command line is one line on stderr and exit status 2, naming what is wrong (the key, the
file, the stage that makes a missing input) — never a traceback. Each case runs `apollo-ray` in-process on a fresh
root; none of them reaches the point where a stage starts Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from apollo_ray import cli

REPO = Path(__file__).resolve().parents[1]


def _mistake(capsys, argv: list[str]) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    # logging may print INFO lines first; the mistake itself is exactly one line, the last one
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(f"apollo-ray {argv[0]}: "), err
    assert "Traceback" not in err, err
    return lines[-1]


@pytest.fixture
def root(tmp_path):
    return f"storage.root={tmp_path / 'runs'}"


@pytest.mark.parametrize("stage", ["evaluate", "analyze"])
def test_a_stage_without_its_input_names_the_stage_that_makes_it(capsys, root, stage):
    line = _mistake(capsys, [stage, "--set", root])
    assert "no trained model" in line and "`apollo-ray train`" in line and "train.run_name='apollo-tiny'" in line


def test_a_missing_model_path(capsys, root, tmp_path):
    line = _mistake(capsys, ["evaluate", "--set", root, "--model", str(tmp_path / "nothing")])
    assert "--model" in line and "nothing" in line


def test_a_model_folder_without_config(capsys, root, tmp_path):
    (tmp_path / "half").mkdir()
    line = _mistake(capsys, ["evaluate", "--set", root, "--model", str(tmp_path / "half")])
    assert "has no config.json" in line


def test_unknown_key_names_key_and_file(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("preset: tiny\ntrain:\n  lrr: 0.1\n")
    line = _mistake(capsys, ["config", "validate", "--config", str(cfg)])
    assert "train.lrr" in line and str(cfg) in line and "unknown key" in line


def test_several_bad_keys_stay_on_one_line(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  lr: fast\n  seq_len: 2\n")
    line = _mistake(capsys, ["train", "--config", str(cfg)])
    assert "train.lr" in line and "train.seq_len" in line


@pytest.mark.parametrize("argv, names", [
    (["config", "validate", "--config", "/no/such/file.yaml"], "/no/such/file.yaml"),
    (["config", "show", "--set", "train.lr"], "KEY=VALUE"),
    (["config", "show", "--set", "moe.ep_size=5"], "moe.ep_size"),
    (["plan", "--preset", "qwen2-9b"], "preset"),
    (["train", "--set", "rewrite.backend=hf"], "rewrite.hf_model"),
    (["train", "--set", "train.precision=bf16"], "train.precision"),
    (["collect", "--set", "model.arch=null"], "model.arch"),
])
def test_config_mistakes(capsys, root, argv, names):
    line = _mistake(capsys, [*argv, "--set", root] if argv[0] != "plan" else argv)
    assert names in line


def test_bad_yaml_names_the_file(capsys, tmp_path):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("train: [unclosed\n")
    line = _mistake(capsys, ["config", "validate", "--config", str(cfg)])
    assert str(cfg) in line and "not valid YAML" in line


def test_a_source_without_files_names_the_source(capsys, root, tmp_path):
    (tmp_path / "empty").mkdir()
    src = f"data.sources=[{{name: clinic, path: {tmp_path / 'empty'}, kind: web, format: jsonl}}]"
    line = _mistake(capsys, ["collect", "--set", root, "--set", src])
    assert "'clinic'" in line and "no .jsonl" in line and str(tmp_path / "empty") in line


def test_serve_without_a_checkpoint(capsys, root, tmp_path):
    line = _mistake(capsys, ["serve", "--set", root, "--set", f"serve.model={tmp_path / 'none'}"])
    assert "serve.model" in line and "no such checkpoint" in line


def test_the_job_entrypoint_exits_2_with_one_line(tmp_path):
    """What `ray job submit -- python jobs/evaluate.py` shows: the same one line, status 2, no traceback."""
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "evaluate.py"), "--set", f"storage.root={tmp_path}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("apollo-ray evaluate: no trained model at ")


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only user mistakes are shortened: an internal error must not be disguised as one."""
    def broken(cfg):
        raise KeyError("internal")

    monkeypatch.setattr(cli.importlib, "import_module", lambda name: type("M", (), {"run": staticmethod(broken)}))
    with pytest.raises(KeyError):
        cli.main(["collect"])


def test_a_missing_benchmark_path_names_the_benchmark(capsys, root, tmp_path):
    bench = f"eval.benchmarks=[{{name: board-exam, path: {tmp_path / 'nope'}, language: en}}]"
    line = _mistake(capsys, ["evaluate", "--set", root, "--set", bench, "--model", "tiny"])
    assert "'board-exam'" in line and "does not exist" in line


@pytest.mark.parametrize("argv, names", [
    (["evaluate", "--model", "someorg/no-such-model"], "--model 'someorg/no-such-model'"),
    (["train", "--set", "model.base=someorg/no-such-model", "--set", "preset=qwen2-0.5b",
      "--set", "resources.use_gpu=false", "--set", "train.precision=fp32", "--set", "rewrite.backend=extractive"],
     "model.base='someorg/no-such-model'"),
])
def test_a_hub_id_that_cannot_load_is_one_line(tmp_path, argv, names):
    """Offline (as on this machine's tests) a hub id cannot load: said by the driver in one line, not by an actor."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HF_HUB_OFFLINE": "1"}
    r = subprocess.run([str(Path(sys.executable).parent / "apollo-ray"), *argv, "--set", f"storage.root={tmp_path}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"apollo-ray {argv[0]}: ") and names in last, last
