"""Expert parallelism (ep_size 2) on two Ray Train CPU workers against the same model run without it.

The experts are placed out of order (``PLACEMENT``), so every check also covers the slot <-> expert mapping.
One TorchTrainer run does every distributed check (a Ray start costs more than the checks) and each rank writes its
measured errors to ``rank<r>.json``; the tests below read them. Each rank builds the same tiny Post-MoE from a fixed
seed (4 experts, top-2, hybrid routing, hidden 32, 2 sparse layers, vocab 300) and feeds it its own tokens.

Which quantities are comparable:
- outputs, the loss and the gradients of replicated parameters (attention, norms, embeddings, routers): a rank's
  loss depends only on its own tokens, which pass through its own replica, so these equal the reference's on the
  same tokens exactly as computed, before any reduction;
- expert gradients: the expert on rank p receives the tokens *every* rank routed to it, so its gradient is the sum
  over ranks of the per-rank loss gradients — the reference's expert gradients all-reduced with SUM;
- after one DeepSpeed ZeRO-1 step (both engines): parameters. DeepSpeed sums expert gradients over the
  expert-data-parallel group and divides by the world size, the same data-parallel mean it takes of the reference's
  gradients, and the gradient norm it clips with is global in both. SGD, so that the update is proportional to the
  gradient (Adam's first step is ~lr·sign(g) and would hide a scale error), with clipping active.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

EP, E, K, VOCAB, B, T = 2, 4, 2, 300, 2, 12
LR, CLIP = 0.5, 0.5
PLACEMENT = [2, 0, 3, 1]  # slot -> expert: rank 0 holds experts 2 and 0, rank 1 experts 3 and 1 (not contiguous)
FP32 = dict(rtol=1e-5, atol=1e-6)
_LOCAL = re.compile(r"(?P<block>.+\.experts)\.deepspeed_moe\.experts\.deepspeed_experts\.(?P<local>\d+)\.(?P<rest>.+)")


def _tiny_model():
    from apollo_ray.model.post_moe import PostMoEConfig, PostMoEForCausalLM

    cfg = PostMoEConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, moe_layers=[0, 1], num_experts=E,
                        num_experts_per_tok=K, routing="hybrid", router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
    torch.manual_seed(0)
    model = PostMoEForCausalLM(cfg)
    with torch.no_grad():  # a decisive router (the 0.02 init is near-uniform), so experts get uneven loads
        for layer in model.model.layers:
            layer.mlp.router.weight.normal_(0, 0.5)
    return model.train()


def _tokens(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    return {"input_ids": ids, "labels": ids, "language_ids": torch.randint(-1, E, (B, T), generator=g)}


def _global_name(name: str, rank: int) -> str:
    """A shard parameter's name in the unsharded model (rank r holds the experts of slots [r·E/EP, (r+1)·E/EP))."""
    m = _LOCAL.fullmatch(name)
    return name if m is None else f"{m['block']}.{PLACEMENT[rank * (E // EP) + int(m['local'])]}.{m['rest']}"


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def _engine(model, zero_stage: int = 1):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from apollo_ray.train.loop import param_groups

    groups = param_groups(model, 0.0)
    if getattr(model, "_apollo_ep_size", 1) > 1:  # as the trainer does
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    config = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1, "gradient_clipping": CLIP,
              "zero_optimization": {"stage": zero_stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(groups, lr=LR), config=config)
    return engine


def _worker(config: dict) -> None:
    """Runs on each of the two Ray Train workers (torch.distributed already initialised, gloo)."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import apollo_ray  # noqa: F401  registers the architecture in this worker
    from apollo_ray.model.parallel import expert_parallel, gather_full_state_dict, save_gathered

    torch.set_num_threads(1)
    rank = dist.get_rank()
    out = Path(config["out"])
    full = _tiny_model()
    batch = _tokens(rank)
    r: dict = {}

    # -- forward and backward, no DeepSpeed
    ref = copy.deepcopy(full)
    ep = expert_parallel(copy.deepcopy(full), EP, PLACEMENT)
    ref_out, ep_out = ref(**batch), ep(**batch)
    ref_out.loss.backward()
    ep_out.loss.backward()
    r["logits"] = _max_diff(ep_out.logits, ref_out.logits)
    r["loss"] = _max_diff(ep_out.loss, ref_out.loss)
    r["aux_loss"] = _max_diff(ep_out.aux_loss, ref_out.aux_loss)
    r["tokens_per_expert_equal"] = torch.equal(ep_out.router_stats.tokens_per_expert,
                                               ref_out.router_stats.tokens_per_expert)
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    for n in sorted(ref_grads):  # the same order on every rank
        if ".mlp.experts." in n:
            dist.all_reduce(ref_grads[n])  # SUM: what the ranks' tokens contribute to each expert
    r["grad"] = {"replicated": 0.0, "expert": 0.0, "router": 0.0}
    for n, p in ep.named_parameters():
        kind = "expert" if _LOCAL.fullmatch(n) else "router" if n.endswith("mlp.router.weight") else "replicated"
        r["grad"][kind] = max(r["grad"][kind], _max_diff(p.grad, ref_grads[_global_name(n, rank)]))
    r["grad_scale"] = {"expert": max(g.abs().max().item() for n, g in ref_grads.items() if ".experts." in n),
                       "router": max(g.abs().max().item() for n, g in ref_grads.items() if "router" in n)}
    ep_grads = {n: p.grad for n, p in ep.named_parameters()}

    # -- activation checkpointing recomputes the all-to-alls in the backward pass: same gradients
    ckpt = expert_parallel(copy.deepcopy(full), EP, PLACEMENT)
    ckpt.activation_checkpointing_enable()
    ckpt(**batch).loss.backward()
    r["checkpointed_grad"] = max(_max_diff(p.grad, ep_grads[n]) for n, p in ckpt.named_parameters())

    # -- one DeepSpeed ZeRO-1 step each: equal parameters
    ref_engine = _engine(copy.deepcopy(full))
    ep_engine = _engine(expert_parallel(copy.deepcopy(full), EP, PLACEMENT))
    r["has_moe_layers"] = [ref_engine.has_moe_layers, ep_engine.has_moe_layers]
    for engine in (ref_engine, ep_engine):
        engine.backward(engine(**batch).loss)
        engine.step()
    r["grad_norm"] = [float(ref_engine.get_global_grad_norm()), float(ep_engine.get_global_grad_norm())]
    ref_params = dict(ref_engine.module.named_parameters())
    r["step"] = max(_max_diff(p, ref_params[_global_name(n, rank)]) for n, p in ep_engine.module.named_parameters())
    r["step_moved"] = max(_max_diff(p, q) for p, q in zip(ref_engine.module.parameters(), full.parameters()))

    # -- DeepSpeed checkpoint of the sharded engine: per-expert files, restored after the weights were overwritten
    ds_dir = out / "ds"
    ep_engine.save_checkpoint(str(ds_dir), tag="t")
    saved = {n: p.detach().clone() for n, p in ep_engine.module.named_parameters()}
    with torch.no_grad():
        for p in ep_engine.module.parameters():
            p.add_(1.0)
    ep_engine.load_checkpoint(str(ds_dir), tag="t")
    r["ds_reload"] = max(_max_diff(p, saved[n]) for n, p in ep_engine.module.named_parameters())
    r["ds_expert_files"] = len(list((ds_dir / "t").glob("layer_*_expert_*_model_states.pt")))

    # -- gather: a freshly sharded model gives back the unsharded state exactly; the trained one saves and reloads
    fresh = gather_full_state_dict(expert_parallel(copy.deepcopy(full), EP, PLACEMENT))
    trained = gather_full_state_dict(ep_engine.module)
    if rank == 0:
        want = full.state_dict()
        r["gather_keys_equal"] = sorted(fresh) == sorted(want)
        r["gather_exact"] = all(torch.equal(fresh[k], want[k]) for k in want)
        save_gathered(ep_engine.module, trained, out / "hf")
        loaded = AutoModelForCausalLM.from_pretrained(out / "hf").train()
        r["loaded_type"] = type(loaded).__name__
        r["loaded_state"] = max(_max_diff(v, ref_engine.module.state_dict()[k])
                                for k, v in loaded.state_dict().items())
        with torch.no_grad():
            r["loaded_logits"] = _max_diff(loaded(**batch).logits, ref_engine.module(**batch).logits)
    else:
        r["gather_on_other_rank"] = [fresh, trained]

    # -- ZeRO-3 cannot partition expert-parallel layers: DeepSpeed refuses (the config refuses earlier)
    try:
        _engine(expert_parallel(copy.deepcopy(full), EP, PLACEMENT), zero_stage=3)
        r["zero3_error"] = None
    except Exception as e:  # noqa: BLE001  the message is what is checked
        r["zero3_error"] = f"{type(e).__name__}: {e}"

    (out / f"rank{rank}.json").write_text(json.dumps(r, indent=1))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    import ray
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = tmp_path_factory.mktemp("ep")
    # Ray workers cannot import a test module: ship the worker function and its helpers by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        trainer = TorchTrainer(_worker, train_loop_config={"out": str(out)},
                               scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                               run_config=RunConfig(name="ep", storage_path=str(out / "ray")))
        result = trainer.fit()
    finally:
        ray.shutdown()
    if result.error:
        raise result.error
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_outputs_and_gradients_match_the_unsharded_model(results):
    for rank, r in enumerate(results):
        assert r["logits"] <= 1e-5 and r["loss"] <= 1e-6 and r["aux_loss"] <= 1e-6, (rank, r)
        assert r["tokens_per_expert_equal"], rank
        assert r["grad"]["replicated"] <= 1e-6, (rank, r["grad"])
        assert r["grad"]["router"] <= 1e-6, (rank, r["grad"])
        assert r["grad"]["expert"] <= 1e-6, (rank, r["grad"])
        assert r["grad_scale"]["expert"] > 1e-3 and r["grad_scale"]["router"] > 1e-3, r["grad_scale"]  # not vacuous


def test_activation_checkpointing_recomputes_the_exchange(results):
    for r in results:
        assert r["checkpointed_grad"] <= 1e-6, r["checkpointed_grad"]


def test_one_zero1_step_gives_the_same_parameters(results):
    for rank, r in enumerate(results):
        assert r["has_moe_layers"] == [False, True]  # DeepSpeed sees the shards as MoE layers
        ref_norm, ep_norm = r["grad_norm"]
        assert ep_norm == pytest.approx(ref_norm, rel=1e-5)
        assert ref_norm > CLIP, "clipping should be active for the test to cover the norm"
        assert r["step_moved"] > 1e-3  # the step did change the weights
        assert r["step"] <= 1e-6, (rank, r["step"])


def test_deepspeed_checkpoint_of_shards_reloads(results):
    for r in results:
        assert r["ds_reload"] == 0.0
    assert results[0]["ds_expert_files"] == 2 * E  # one file per (sparse layer, global expert)


def test_gathered_checkpoint_is_an_ordinary_post_moe(results):
    r0 = results[0]
    assert r0["gather_keys_equal"] and r0["gather_exact"]
    assert r0["loaded_type"] == "PostMoEForCausalLM"
    assert r0["loaded_state"] <= 1e-6 and r0["loaded_logits"] <= 1e-5
    assert results[1]["gather_on_other_rank"] == [None, None]


def test_deepspeed_refuses_zero3_for_expert_shards(results):
    for r in results:
        assert r["zero3_error"] and "ZeRO Stage 3" in r["zero3_error"], r["zero3_error"]


def test_config_refuses_zero3_with_moe(make_cfg):
    from apollo_ray import config as config_mod

    with pytest.raises(config_mod.ConfigError, match=r"train.zero_stage = 3: ZeRO-3 cannot shard expert-parallel"):
        make_cfg("train.zero_stage=3")


def test_balanced_placement_evens_the_known_loads():
    from apollo_ray.model.parallel import balanced_placement

    load = [900, 800, 50, 40, 30, 20, 10, 5]  # the two busiest experts first: contiguous blocks put both on rank 0
    placement = balanced_placement(load, 2)
    assert sorted(placement) == list(range(8))
    halves = [placement[:4], placement[4:]]
    assert all(len(h) == 4 for h in halves)
    per_rank = [sum(load[e] for e in h) for h in halves]
    assert max(per_rank) / (sum(load) / 2) < 1.07  # contiguous: 1790 / 927.5 = 1.93
    assert {0, 1} & set(halves[0]) and {0, 1} & set(halves[1])  # the two big experts on different ranks
    assert balanced_placement([1.0] * 6, 3) == list(range(6))  # equal loads: the identity
    with pytest.raises(ValueError, match="divide evenly"):
        balanced_placement(load, 3)


def test_ep_imbalance_is_the_busiest_rank_over_the_mean():
    from apollo_ray.model.parallel import ep_imbalance

    counts = torch.tensor([[30.0, 10.0, 0.0, 20.0],   # contiguous ranks: 40 | 20 -> 40 / 30
                           [5.0, 5.0, 5.0, 5.0]])     # even
    assert ep_imbalance(counts, [0, 1, 2, 3], 2).tolist() == pytest.approx([4 / 3, 1.0])
    # the placement decides which experts share a rank: {0, 2} | {1, 3} -> 30 | 30
    assert ep_imbalance(counts, [0, 2, 1, 3], 2).tolist() == pytest.approx([1.0, 1.0])
    assert ep_imbalance(torch.tensor([[8.0, 0.0, 0.0, 0.0]]), [0, 1, 2, 3], 4).item() == pytest.approx(4.0)
