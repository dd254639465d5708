"""Portable export: a Post-MoE checkpoint written as a stock ``Qwen2MoeForCausalLM`` opens in a Python process that
never imports apollo_ray (no trust_remote_code) and computes our model's logits.

Variants, each upcycled from the tiny base and then perturbed (so that experts, router and shared expert all differ
from each other and from zero): top-2 of 12 language experts renormalised (the tiny preset), dense routing (every
token to all 12 experts), top-1 unnormalised with our gated shared expert, and the reference's shared expert (the
dense MLP beside top-1 of 11 routed experts).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apollo_ray import config as config_mod

VARIANTS = {
    "top2": [],
    "dense-routed": ["moe.top_k=12"],
    "top1-shared-unnormalised": ["moe.top_k=1", "moe.shared_expert=gated", "moe.renormalize=false",
                                 "moe.routing=topk"],
    # ApolloMoE's shared expert: the dense MLP beside top-1 of 11 routed experts
    "reference-shared": ["moe.shared_expert=reference", "moe.routing=topk", "moe.ep_size=1"],
}
IDS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1100, 1200]]

# Runs in a fresh interpreter: plain transformers only. It fails if anything imported apollo_ray.
PLAIN = """
import json, sys, torch
from transformers import AutoModelForCausalLM
paths, ids, out = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2])), sys.argv[3]
logits = {}
for name, path in paths.items():
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(model).__name__ == "Qwen2MoeForCausalLM", type(model)
    with torch.no_grad():
        logits[name] = model(input_ids=ids).logits
assert not [m for m in sys.modules if m.split(".")[0] == "apollo_ray"], "apollo_ray was imported"
torch.save(logits, out)
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from apollo_ray.model.export import export
    from apollo_ray.model.tiny import ensure_base
    from apollo_ray.model.upcycle import upcycle_checkpoint
    from apollo_ray.storage import Storage

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export")
    base_cfg = config_mod.resolve({}, [f"storage.root={root / 'store'}"])
    tiny = ensure_base(base_cfg, Storage.from_config(base_cfg), root / "tiny")
    out = {}
    for seed, (name, overrides) in enumerate(VARIANTS.items()):
        cfg = config_mod.resolve({}, [f"storage.root={root / 'store'}", *overrides])
        init = upcycle_checkpoint(tiny, str(root / f"{name}-init"), cfg)
        model = AutoModelForCausalLM.from_pretrained(init)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        src = root / name
        model.save_pretrained(src)
        AutoTokenizer.from_pretrained(tiny).save_pretrained(src)
        out[name] = {"src": str(src), "portable": export(str(src), str(root / f"{name}-qwen2_moe")),
                     "model": model.eval(), "config": model.config, "dense": tiny}
    return out


def test_export_opens_with_plain_transformers_and_matches_our_logits(exported, tmp_path):
    paths = {name: e["portable"] for name, e in exported.items()}
    result = tmp_path / "logits.pt"
    proc = subprocess.run([sys.executable, "-c", PLAIN, json.dumps(paths), json.dumps(IDS), str(result)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(result)
    for name, e in exported.items():
        with torch.no_grad():
            ours = e["model"](input_ids=torch.tensor(IDS)).logits
        diff = float((theirs[name] - ours).abs().max())
        assert diff <= 1e-5, (name, diff)
        assert float(ours.abs().max()) > 1.0  # logits large enough that a wrong mapping could not pass for noise


def test_exported_config_is_qwen2_moe_as_trained(exported):
    for name, e in exported.items():
        ours, cfg = e["config"], json.loads((Path(e["portable"]) / "config.json").read_text())
        assert cfg["model_type"] == "qwen2_moe" and cfg["architectures"] == ["Qwen2MoeForCausalLM"], name
        assert "auto_map" not in cfg
        assert cfg["mlp_only_layers"] == [i for i in range(ours.num_hidden_layers) if i not in ours.moe_layers]
        assert cfg["decoder_sparse_step"] == 1
        assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["norm_topk_prob"]) == (
            ours.num_experts, ours.num_experts_per_tok, ours.norm_topk_prob)
        assert cfg["moe_intermediate_size"] == ours.intermediate_size == cfg["intermediate_size"]
        assert cfg["tie_word_embeddings"] == ours.tie_word_embeddings
        # transformers 4's keys too (vLLM / SGLang releases pinned to it): the same rope base, not its default
        assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == ours.rope_parameters["rope_theta"]
        assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    assert exported["dense-routed"]["config"].num_experts_per_tok == 12
    assert exported["top1-shared-unnormalised"]["config"].norm_topk_prob is False


def test_export_is_in_the_hub_layout_with_a_zero_shared_expert_when_there_is_none(exported):
    """Per-expert tensors (``mlp.experts.<e>.gate_proj.weight``), as Qwen1.5-MoE ships: the layout vLLM and SGLang
    load, and transformers 4 and 5 too. Without a shared expert the stand-in's down projection is zero."""
    from safetensors.torch import load_file

    for name, e in exported.items():
        state = load_file(Path(e["portable"]) / "model.safetensors")
        ours = e["model"].state_dict()
        for i in e["config"].moe_layers:
            p = f"model.layers.{i}.mlp"
            assert torch.equal(state[f"{p}.gate.weight"], ours[f"{p}.router.weight"])
            for k in range(e["config"].num_experts):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    assert torch.equal(state[f"{p}.experts.{k}.{proj}.weight"], ours[f"{p}.experts.{k}.{proj}.weight"])
            shared = state[f"{p}.shared_expert.down_proj.weight"]
            if e["config"].shared_expert:
                assert torch.equal(shared, ours[f"{p}.shared_expert.down_proj.weight"]) and shared.abs().sum() > 0
            else:
                assert not shared.any()
        assert not any(".router." in k or "gate_up_proj" in k for k in state)


def test_cli_exports_and_refuses_a_dense_model_in_one_line(exported, tmp_path, capsys):
    from apollo_ray.cli import main

    src = exported["top2"]["src"]
    out = tmp_path / "cli-export"
    assert main(["export", "--model", src, "--out", str(out), "--format", "qwen2_moe"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_moe"
    assert json.loads((out / "manifest.json").read_text())["stage"] == "export"
    assert main(["export", "--model", exported["top2"]["dense"], "--out", str(tmp_path / "dense")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("apollo-ray export:")] == [
        err.strip().splitlines()[-1]] and "already portable" in err
    assert main(["export", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "train one first" in capsys.readouterr().err
