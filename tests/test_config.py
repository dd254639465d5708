import subprocess
import sys

import pytest
import yaml

from apollo_ray import config as config_mod
from apollo_ray.config import ConfigError

REPO_CONFIG = config_mod.PACKAGE_DIR.parent / "ray_config.yaml"


def write(tmp_path, data: dict) -> str:
    p = tmp_path / "ray_config.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_repo_config_is_valid_and_tiny_by_default():
    cfg = config_mod.load(REPO_CONFIG)
    assert cfg.preset == "tiny"
    assert cfg.model.base == "tiny" and not cfg.resources.use_gpu


@pytest.mark.parametrize("preset,base,layers", [("qwen2-0.5b", "Qwen/Qwen2-0.5B", 24), ("qwen2-1.5b", "Qwen/Qwen2-1.5B", 28),
                                                 ("qwen2-7b", "Qwen/Qwen2-7B", 28)])
def test_gpu_presets(preset, base, layers):
    cfg = config_mod.resolve({"preset": preset})
    assert cfg.model.base == base and cfg.model.arch.num_hidden_layers == layers
    assert cfg.resources.use_gpu and cfg.train.precision == "bf16" and cfg.train.seq_len == 4096
    # the ApolloMoE training script's 8 GPUs x 2 rows x 2 accumulation = 32 x 4096 tokens per step
    assert cfg.resources.num_workers * cfg.train.micro_batch_size * cfg.train.grad_accum == 32


def test_overrides_win_over_file_and_preset(tmp_path):
    path = write(tmp_path, {"train": {"lr": 0.5, "seed": 7}})
    cfg = config_mod.load(path, ["train.lr=1e-4", "moe.routing=topk", "languages.include=[en, zh]"])
    assert cfg.train.lr == 1e-4 and cfg.train.seed == 7 and cfg.moe.routing == "topk"
    assert cfg.languages.include == ["en", "zh"]


def test_unknown_key_names_key_value_and_file(tmp_path):
    path = write(tmp_path, {"train": {"learning_rate": 0.1}})
    with pytest.raises(ConfigError) as e:
        config_mod.load(path)
    msg = str(e.value)
    assert "train.learning_rate" in msg and "0.1" in msg and path in msg and "unknown key" in msg


def test_wrong_type_names_key_value_and_file(tmp_path):
    path = write(tmp_path, {"train": {"micro_batch_size": "many"}})
    with pytest.raises(ConfigError) as e:
        config_mod.load(path)
    assert "train.micro_batch_size" in str(e.value) and "'many'" in str(e.value) and path in str(e.value)


def test_impossible_values(tmp_path):
    path = write(tmp_path, {"moe": {"experts": "family", "ep_size": 2}})
    with pytest.raises(ConfigError) as e:
        config_mod.load(path)
    assert "moe.ep_size = 2" in str(e.value) and "not divisible" in str(e.value) and path in str(e.value)
    with pytest.raises(ConfigError, match="ZeRO-3"):
        config_mod.resolve({"train": {"zero_stage": 3}})
    with pytest.raises(ConfigError, match="moe.top_k"):
        config_mod.resolve({"moe": {"experts": "language", "top_k": 3, "ep_size": 1},
                            "languages": {"include": ["en", "zh"]}})
    with pytest.raises(ConfigError, match="moe.layers"):
        config_mod.resolve({"moe": {"layers": 9}})
    with pytest.raises(ConfigError, match="bf16"):
        config_mod.resolve({"train": {"precision": "bf16"}})
    with pytest.raises(ConfigError, match="unknown language code 'xx'"):
        config_mod.resolve({"languages": {"include": ["en", "xx"]}})
    with pytest.raises(ConfigError, match="preset = 'qwen3'"):
        config_mod.resolve({"preset": "qwen3"})
    # ZeRO-3 is fine for a dense model
    assert config_mod.resolve({"moe": {"layers": 0}, "train": {"zero_stage": 3}}).train.zero_stage == 3


def test_bad_set_syntax():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        config_mod.load(None, ["train.lr"])


def test_alias_ne_is_mongolian():
    cfg = config_mod.resolve({"languages": {"include": ["en", "ne"]}, "moe": {"ep_size": 1}})
    assert cfg.languages.include == ["en", "mn"]


def test_experts_count_follows_assignment():
    assert config_mod.resolve({"moe": {"experts": "family", "ep_size": 1}}).num_experts == 7
    assert config_mod.resolve({"moe": {"experts": "language", "ep_size": 2}}).num_experts == 12


def test_fingerprint_is_stable_and_semantic():
    a = config_mod.fingerprint({"x": 1, "y": [1, 2]}, "h")
    assert a == config_mod.fingerprint({"y": [1, 2], "x": 1}, "h")
    assert a != config_mod.fingerprint({"x": 2, "y": [1, 2]}, "h")


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "apollo_ray.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_validate_misspelled_key_fails_and_names_it(tmp_path):
    path = write(tmp_path, {"moe": {"routng": "hybrid"}})
    r = _cli("config", "validate", "--config", path)
    assert r.returncode == 2
    assert "moe.routng" in r.stderr and path in r.stderr


def test_cli_show_prints_resolved_config(tmp_path):
    r = _cli("config", "show", "--config", str(REPO_CONFIG), "--set", "train.lr=0.25", "--json")
    assert r.returncode == 0, r.stderr
    import json

    shown = json.loads(r.stdout)
    assert shown["train"]["lr"] == 0.25 and shown["preset"] == "tiny"
    # the shown config is itself a valid config file
    cfg = config_mod.resolve(shown)
    assert cfg.train.lr == 0.25
