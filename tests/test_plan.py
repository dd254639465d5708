"""The config-only planner: parameter counts against docs/methods.md §8, memory ordering under ZeRO, fit verdicts."""

from __future__ import annotations

import json

import pytest

from apollo_ray import config as config_mod
from apollo_ray.model.plan import plan


def cfg(preset: str, *overrides: str) -> config_mod.Config:
    return config_mod.resolve({"preset": preset}, list(overrides))


@pytest.mark.parametrize("preset, dense_b, active_b", [
    ("qwen2-0.5b", 0.49, 0.52), ("qwen2-1.5b", 1.54, 1.63), ("qwen2-7b", 7.62, 8.02)])
def test_parameters_match_the_paper(preset, dense_b, active_b):
    p = plan(cfg(preset))
    assert p.num_experts == 7 and p.experts_per_token == 2 and p.moe_layers == 2
    assert p.dense_params == pytest.approx(dense_b * 1e9, rel=0.015)
    assert p.active_params == pytest.approx(active_b * 1e9, rel=0.01)
    assert p.dense_params < p.active_params < p.total_params


def test_qwen2_0_5b_dense_count_is_exact():
    assert plan(cfg("qwen2-0.5b", "moe.layers=0")).dense_params == 494_032_768  # Qwen2-0.5B's published size


def test_language_routing_activates_one_expert():
    p = plan(cfg("qwen2-0.5b", "moe.routing=language"))
    assert p.experts_per_token == 1
    assert p.active_params - p.dense_params == 2 * 7 * 896  # the two routers only


def test_zero_stages_shard_more_and_more():
    by_stage = {s: plan(cfg("qwen2-1.5b", f"train.zero_stage={s}")).memory for s in (0, 1, 2)}
    assert by_stage[0].total > by_stage[1].total > by_stage[2].total
    assert by_stage[0].weights == by_stage[1].weights == by_stage[2].weights
    assert by_stage[1].optimizer == pytest.approx(by_stage[0].optimizer / 8)
    assert by_stage[0].gradients == by_stage[1].gradients > by_stage[2].gradients
    p = plan(cfg("qwen2-1.5b"))
    assert list(p.total_gib_by_stage) == [0, 1, 2]  # ZeRO-3 is refused with MoE layers
    assert p.total_gib_by_stage[1] == pytest.approx(p.memory.total, abs=1e-3)


def test_dense_runs_may_use_zero3():
    p = plan(cfg("qwen2-1.5b", "moe.layers=0", "train.zero_stage=3"))
    assert p.total_params == p.active_params == p.dense_params and p.expert_params == 0
    assert list(p.total_gib_by_stage) == [0, 1, 2, 3]
    assert p.total_gib_by_stage[3] < p.total_gib_by_stage[2]


def test_expert_parallelism_splits_expert_weights():
    base = ("moe.experts=language",)  # 12 experts: divisible by ep_size 2 and 4
    one, four = (plan(cfg("qwen2-0.5b", *base, f"moe.ep_size={ep}")).memory for ep in (1, 4))
    assert four.weights < one.weights
    assert four.activations == one.activations


def test_bf16_needs_fewer_bytes_than_fp32_per_parameter():
    bf16 = plan(cfg("qwen2-0.5b")).memory
    fp32 = plan(cfg("qwen2-0.5b", "train.precision=fp32")).memory
    assert fp32.weights == pytest.approx(2 * bf16.weights)
    assert fp32.activations > bf16.activations


def test_fit_verdicts():
    assert plan(cfg("qwen2-0.5b")).fits is True
    seven = plan(cfg("qwen2-7b"))
    assert seven.gpu_memory_gib == 80 and seven.fits is (seven.memory.total <= 72) and seven.fits
    assert plan(cfg("tiny")).fits is None  # CPU run
    assert plan(cfg("qwen2-0.5b", "resources.gpu_type=MysteryGPU")).fits is None


def test_activation_checkpointing_makes_qwen2_7b_fit_an_h100():
    on = plan(cfg("qwen2-7b"))  # the preset turns it on
    off = plan(cfg("qwen2-7b", "train.activation_checkpointing=false"))
    assert on.activation_checkpointing and not off.activation_checkpointing
    assert on.fits is True and off.fits is False
    assert on.memory.activations < off.memory.activations / 3
    assert (on.memory.weights, on.memory.gradients, on.memory.optimizer) == \
        (off.memory.weights, off.memory.gradients, off.memory.optimizer)
    assert on.flops_per_token == off.flops_per_token  # model FLOPs (MFU convention): the recompute is not counted
    assert "checkpointed" in on.format() and "fits in 72 GiB" in on.format()


def test_smaller_presets_do_not_need_activation_checkpointing():
    for preset in ("qwen2-0.5b", "qwen2-1.5b"):
        p = plan(cfg(preset))
        assert not p.activation_checkpointing and p.fits is True


def test_checkpointed_activations_are_layer_inputs_plus_one_layer():
    a, b = (plan(cfg("qwen2-1.5b", "train.activation_checkpointing=true", f"train.seq_len={s}")).memory.activations
            for s in (4096, 8192))
    assert b == pytest.approx(2 * a)  # still linear in tokens
    deeper = plan(cfg("qwen2-1.5b", "train.activation_checkpointing=true", "model.arch.num_hidden_layers=56"))
    off = (plan(cfg("qwen2-1.5b", "model.arch.num_hidden_layers=56")).memory.activations
           - plan(cfg("qwen2-1.5b")).memory.activations)
    # 28 more layers add 28 layer inputs when checkpointed, 28 whole layers when not
    assert deeper.memory.activations - a < off / 10


def test_flops_per_token_is_six_times_active_plus_attention():
    p = plan(cfg("qwen2-1.5b"))
    assert 6 * p.active_params < p.flops_per_token < 6 * p.active_params * 1.3
    longer = plan(cfg("qwen2-1.5b", "train.seq_len=8192"))
    assert longer.flops_per_token > p.flops_per_token


def test_to_dict_and_format():
    p = plan(cfg("qwen2-7b"))
    d = json.loads(json.dumps(p.to_dict()))
    assert d["memory"]["total"] == pytest.approx(p.memory.total)
    assert d["active_params"] == p.active_params
    text = p.format()
    assert "qwen2-7b" in text and "ZeRO-1" in text and "8.023 B" in text


@pytest.mark.parametrize("shared, active, total, experts, routed, per_token", [
    # Qwen2-0.5B: dense 494,032,768; MLP 3·896·4864 = 13,074,432; router row / gate 896; 2 sparse layers, E 7, k 2.
    ("none", 494_032_768 + 2 * (13_074_432 + 7 * 896), 494_032_768 + 2 * (6 * 13_074_432 + 7 * 896),
     2 * 7 * 13_074_432, 7, 2),
    ("gated", 494_032_768 + 2 * (2 * 13_074_432 + 8 * 896), 494_032_768 + 2 * (7 * 13_074_432 + 8 * 896),
     2 * 7 * 13_074_432, 7, 2),
    # top-1 of 6 routed + the shared MLP, 6 router rows + the gate: the same totals as without a shared expert
    ("reference", 494_032_768 + 2 * (13_074_432 + 7 * 896), 494_032_768 + 2 * (6 * 13_074_432 + 7 * 896),
     2 * 6 * 13_074_432, 6, 1),
])
def test_shared_expert_variants_against_hand_counts(shared, active, total, experts, routed, per_token):
    """Catches the reference variant counted with E routed experts and top-k (one MLP too many in both counts and in
    the expert-parallel share) and a gated expert missing from the active count."""
    p = plan(cfg("qwen2-0.5b", "moe.routing=topk", f"moe.shared_expert={shared}"))
    assert (p.active_params, p.total_params, p.expert_params) == (active, total, experts)
    assert (p.num_experts, p.experts_per_token, p.shared_expert) == (routed, per_token, shared)
    assert (f"shared expert ({shared})" in p.format()) == (shared != "none")


@pytest.mark.parametrize("preset", ["qwen2-0.5b", "qwen2-1.5b", "qwen2-7b"])
def test_qwen2_presets_follow_the_apollo_moe_scripts(preset):
    """ApolloMoE's training script: 8 GPUs × 2 rows × 2 accumulation of 4096 tokens, AdamW betas left at torch's
    (0.9, 0.999), code and math drawn at π=2 for 2 epochs like the other instruction kinds. Catches the presets
    drifting back to Apollo's 128-row step, β2 0.95 or π=16 code/math."""
    c = cfg(preset)
    assert plan(c).tokens_per_step == 8 * 2 * 2 * 4096
    assert c.train.betas == (0.9, 0.999) and c.train.lr == 1e-4 and c.train.warmup_ratio == 0.03
    assert {k: (c.data.priorities[k], c.data.epochs[k]) for k in ("exam", "dialogue", "general", "math", "code")} \
        == dict.fromkeys(("exam", "dialogue", "general", "math", "code"), (2.0, 2))
    assert {(c.data.priorities[k], c.data.epochs[k]) for k in config_mod.PRETRAIN_KINDS} == {(16.0, 1)}
