"""Post-MoE model and upcycling on a tiny Qwen2 (hidden 64, 4 layers, vocab 512), CPU, fp32, no downloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import apollo_ray  # noqa: F401  (registers the architecture)
from apollo_ray.model.post_moe import PostMoEBlock, PostMoEConfig, PostMoEForCausalLM
from apollo_ray.model.upcycle import moe_config_from, upcycle, upcycle_checkpoint

E, K, VOCAB, B, T = 4, 2, 512, 3, 11
DIMS = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls are fastest single-threaded


@pytest.fixture(scope="module")
def dense() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**DIMS, tie_word_embeddings=True)).eval()


def make(dense_model, routing: str = "hybrid", norm: bool = True, **kw) -> PostMoEForCausalLM:
    args = dict(layers=2, num_experts=E, top_k=K, routing=routing, norm_topk_prob=norm,
                expert_names=[f"family{e}" for e in range(E)], language_to_expert={"zh": 0, "ja": 1, "en": 2, "ar": 3})
    return upcycle(dense_model, **{**args, **kw})


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input ids, attention mask (row 1 left-padded by 3) and per-token language expert ids (-1 on padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0
    lang = torch.tensor([[0] * T, [1] * T, [3] * T])
    lang[1, :3] = -1
    return ids, mask, lang


def random_block(routing: str, norm: bool = False, **kw) -> PostMoEBlock:
    """A sparse block whose experts differ (random init), for routing and dispatch tests."""
    torch.manual_seed(3)
    cfg = PostMoEConfig(**DIMS, moe_layers=[3], num_experts=E, num_experts_per_tok=K, routing=routing,
                        norm_topk_prob=norm, **kw)
    block = PostMoEBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return block


# ------------------------------------------------------------------------------------------------ function preserving
@pytest.mark.parametrize("routing", ["topk", "hybrid", "language"])
@pytest.mark.parametrize("training", [False, True])
def test_upcycled_model_computes_the_dense_function(dense, routing, training):
    ids, mask, lang = batch()
    model = make(dense, routing).train(training)
    with torch.no_grad():
        want = dense(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask, language_ids=lang).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_unnormalised_weights_scale_the_dense_mlp_by_the_topk_mass(dense):
    ids, mask, lang = batch()
    model = make(dense, "topk", norm=False)
    with torch.no_grad():
        assert not torch.allclose(model(ids, attention_mask=mask).logits, dense(ids, attention_mask=mask).logits,
                                  atol=1e-3)
        block, mlp = model.model.layers[3].mlp, dense.model.layers[3].mlp
        x = torch.randn(2, 5, 64)
        probs = block.router(x).float().softmax(-1)
        mass = probs.topk(K, dim=-1).values.sum(-1, keepdim=True)
        out, _ = block(x)
        torch.testing.assert_close(out, mlp(x) * mass, atol=1e-6, rtol=1e-5)
        assert (mass < 1).all()


def test_upcycle_copies_weights_and_draws_the_router(dense):
    model = make(dense, shared_expert=True, router_init_std=0.02, seed=7)
    dense_mlp = dense.model.layers[2].mlp
    block = model.model.layers[2].mlp
    for expert in block.experts:
        assert torch.equal(expert.gate_proj.weight, dense_mlp.gate_proj.weight)
        assert expert.gate_proj.weight.data_ptr() != dense_mlp.gate_proj.weight.data_ptr()
    assert torch.count_nonzero(block.shared_expert.down_proj.weight) == 0
    assert 0.01 < block.router.weight.std().item() < 0.03
    assert torch.equal(make(dense, seed=7).model.layers[2].mlp.router.weight, block.router.weight)
    assert not torch.equal(make(dense, seed=8).model.layers[2].mlp.router.weight, block.router.weight)
    assert model.config.moe_layers == [2, 3] and isinstance(model.model.layers[1].mlp, type(dense_mlp))


def test_reference_shared_expert_is_the_dense_mlp_beside_e_minus_1_routed(dense):
    """The reference's shared-expert variant (ApolloMoE share_flag): the shared expert is the whole dense MLP and the
    router picks top-(k-1) of E-1 experts. Catches a zeroed shared expert (ours), E or k not reduced, or a gate not
    applied: at step 0 the block must compute (Σ routed weights + sigmoid(gate·h)) · MLP(h) exactly."""
    dense_mlp = dense.model.layers[3].mlp
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(4))
    for norm in (True, False):
        model = make(dense, "topk", norm=norm, shared_expert="reference")
        c, block = model.config, model.model.layers[3].mlp
        assert (c.num_experts, c.num_experts_per_tok, len(block.experts)) == (E - 1, K - 1, E - 1)
        assert c.expert_names == [f"family{e}" for e in range(E - 1)] and "ar" not in c.language_to_expert  # id 3
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(block.shared_expert, proj).weight, getattr(dense_mlp, proj).weight)
        with torch.no_grad():
            probs = block.router(x).float().softmax(-1)
            routed = probs.topk(K - 1, dim=-1).values.sum(-1, keepdim=True)
            routed = torch.ones_like(routed) if norm else routed
            gate = torch.sigmoid(block.shared_expert_gate(x))
            out, _ = block(x)
            torch.testing.assert_close(out, (routed + gate) * dense_mlp(x), atol=1e-6, rtol=1e-5)
            assert (gate > 0.25).all()  # a small gate logit: ≈ 1.5 × the dense MLP, not function-preserving


def test_upcycled_model_keeps_tied_embeddings(dense):
    """A base with tie_word_embeddings must upcycle to a model whose LM head *is* the embedding: an untied copy trains
    apart from it and is silently replaced by the embedding when the checkpoint (tie_word_embeddings=True) reloads."""
    model = make(dense)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_shared_expert_variants_parameter_counts(dense):
    """Counted on real upcycled models (hand formula: MLP = 3·64·128, gate = 64, router row = 64, 2 sparse layers).
    Catches the reference variant keeping E experts (its total must equal the variant without a shared expert) and a
    gated expert missing its MLP or gate."""
    def n(model):
        return sum(p.numel() for p in model.parameters())

    mlp, h, layers = 3 * 64 * 128, 64, 2
    none = n(make(dense, "topk"))
    assert n(make(dense, "topk", shared_expert="gated")) - none == layers * (mlp + h)
    assert n(make(dense, "topk", shared_expert="reference")) == none  # (E-1) experts + shared, (E-1) router rows + gate
    assert none - n(dense) == layers * ((E - 1) * mlp + E * h)
    assert n(make(dense, "topk", shared_expert=True)) == n(make(dense, "topk", shared_expert="gated"))  # old flag
    with pytest.raises(Exception, match="top_k=1"):
        make(dense, "topk", top_k=1, shared_expert="reference")


def test_language_ids_past_the_last_expert_count_as_none(dense):
    """With a reference shared expert the data side still numbers E families; the model has E-1. Catches an id = E-1
    reaching the router / statistics (index out of range) instead of being routed top-k and left uncounted."""
    ids, mask, lang = batch()  # row 2 is language 3 = the expert the shared one replaced
    model = make(dense, "topk", shared_expert="reference")
    with torch.no_grad():
        out = model(ids, attention_mask=mask, language_ids=lang)
        plain = model(ids, attention_mask=mask, language_ids=torch.where(lang == 3, -1, lang))
    torch.testing.assert_close(out.logits, plain.logits, atol=0, rtol=0)
    assert torch.equal(out.router_stats.tokens_per_expert, plain.router_stats.tokens_per_expert)
    assert out.router_stats.language_expert_counts.shape == (2, E - 1, E - 1)


def test_typed_config_shared_expert_values(make_cfg):
    """Old config files say shared_expert: true/false; they must keep meaning the gated expert / none. The reference
    variant needs top_k ≥ 2 and topk routing (E-1 experts leave a family without its language expert)."""
    assert make_cfg("moe.shared_expert=true").moe.shared_expert == "gated"
    assert make_cfg("moe.shared_expert=false").moe.shared_expert == "none"
    cfg = make_cfg("moe.experts=family", "moe.ep_size=1", "moe.routing=topk", "moe.shared_expert=reference")
    assert moe_config_from(cfg)["shared_expert"] == "reference"
    for bad in (["moe.routing=hybrid"], ["moe.routing=topk", "moe.top_k=1"]):
        with pytest.raises(Exception, match="shared_expert"):
            make_cfg("moe.experts=family", "moe.ep_size=1", "moe.shared_expert=reference", *bad)


def test_zero_moe_layers_returns_the_dense_model(dense):
    assert make(dense, layers=0) is dense


def test_llama_base_upcycles_function_preserving():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**DIMS, head_dim=32, tie_word_embeddings=False)).eval()
    ids, mask, lang = batch()
    model = make(llama, "hybrid").train()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask, language_ids=lang).logits,
                                   llama(ids, attention_mask=mask).logits, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------------ routing
def test_hybrid_in_training_always_includes_the_language_expert():
    block = random_block("hybrid").train()
    x = torch.randn(400, 64)
    lang = torch.randint(0, E, (400,))
    with torch.no_grad():
        logits, ids, w = block.route(x, lang)
    probs = logits.softmax(-1)
    plain = probs.topk(K, dim=-1).indices
    assert (ids == lang[:, None]).any(1).all()
    assert all(len(set(row.tolist())) == K for row in ids)
    torch.testing.assert_close(w, probs.gather(1, ids))
    replaced = ~(plain == lang[:, None]).any(1)
    assert 50 < replaced.sum() < 350  # the rule actually fires, and not always
    assert torch.equal(ids[~replaced], plain[~replaced])
    assert torch.equal(ids[replaced, : K - 1], plain[replaced, : K - 1])
    assert torch.equal(ids[replaced, K - 1], lang[replaced])


def test_hybrid_slot_placement_on_hand_made_router_logits():
    """The same rule as above, on logits set by hand (a one-hot input picks a row of the router's weight): the
    language expert replaces the k-th (lowest) pick, never a higher one, and only when the router did not pick it."""
    block = PostMoEBlock(PostMoEConfig(**DIMS, moe_layers=[3], num_experts=E, num_experts_per_tok=3,
                                       routing="hybrid", norm_topk_prob=True)).train()
    # token t's router logits are row t: expert order by preference, highest first
    prefs = [[2, 0, 1, 3], [3, 1, 0, 2], [1, 3, 2, 0], [0, 2, 3, 1], [0, 1, 2, 3]]
    logits = torch.zeros(len(prefs), E)
    for t, order in enumerate(prefs):
        for rank, e in enumerate(order):
            logits[t, e] = 4.0 - rank
    with torch.no_grad():
        block.router.weight.zero_()
        block.router.weight[:, :len(prefs)] = logits.T
    x = torch.eye(len(prefs), 64)
    lang = torch.tensor([3, 1, 3, 1, -1])
    with torch.no_grad():
        got_logits, ids, w = block.route(x, lang)
    torch.testing.assert_close(got_logits, logits)
    assert ids.tolist() == [
        [2, 0, 3],  # language 3 not picked: it takes the last slot (1 is dropped), the router's picks keep theirs
        [3, 1, 0],  # language 1 already picked (2nd): unchanged
        [1, 3, 2],  # language 3 already picked (2nd): unchanged
        [0, 2, 1],  # language 1 is the router's last choice overall: it replaces 3 in the last slot
        [0, 1, 2],  # no language: plain top-3
    ]
    probs = logits.softmax(-1)
    expected_w = probs.gather(1, ids)
    torch.testing.assert_close(w, expected_w / expected_w.sum(-1, keepdim=True))
    # in evaluation without hybrid_in_eval the same block ignores the languages: plain top-3 for every token
    with torch.no_grad():
        _, plain, _ = block.eval().route(x, lang)
    assert plain.tolist() == [order[:3] for order in prefs]


def test_hybrid_in_eval_is_plain_topk_unless_configured():
    block = random_block("hybrid").eval()
    x, lang = torch.randn(200, 64), torch.randint(0, E, (200,))
    with torch.no_grad():
        logits, ids, w = block.route(x, lang)
        plain_w, plain = logits.softmax(-1).topk(K, dim=-1)
        assert torch.equal(ids, plain) and torch.equal(w, plain_w)
        block.config.hybrid_in_eval = True  # read at forward time
        _, ids, _ = block.route(x, lang)
    assert (ids == lang[:, None]).any(1).all()


def test_normalised_hybrid_weights_sum_to_one():
    block = random_block("hybrid", norm=True).train()
    with torch.no_grad():
        _, _, w = block.route(torch.randn(64, 64), torch.randint(0, E, (64,)))
    torch.testing.assert_close(w.sum(-1), torch.ones(64))


def test_language_routing_uses_the_language_expert_alone_and_unknown_falls_back_to_topk():
    block = random_block("language").train()
    x = torch.randn(50, 64)
    lang = torch.randint(0, E, (50,))
    lang[:10] = -1
    with torch.no_grad():
        logits, ids, w = block.route(x, lang)
    plain_w, plain = logits.softmax(-1).topk(K, dim=-1)
    assert torch.equal(ids[10:, 0], lang[10:]) and (ids[10:, 1:] == -1).all()
    assert torch.equal(w[10:], torch.tensor([[1.0] + [0.0] * (K - 1)]).expand(40, K))
    assert torch.equal(ids[:10], plain[:10]) and torch.equal(w[:10], plain_w[:10])


def test_tokens_without_language_fall_back_to_topk_in_hybrid():
    block = random_block("hybrid").train()
    x = torch.randn(30, 64)
    with torch.no_grad():
        logits, ids, _ = block.route(x, torch.full((30,), -1))
    assert torch.equal(ids, logits.softmax(-1).topk(K, dim=-1).indices)


@pytest.mark.parametrize("routing", ["topk", "hybrid", "language"])
def test_dropless_dispatch_equals_a_per_token_loop(routing):
    block = random_block(routing).train().double()  # float64: the comparison is about indices, not rounding
    x = torch.randn(37, 64, dtype=torch.float64)
    lang = torch.randint(-1, E, (37,))
    with torch.no_grad():
        _, ids, w = block.route(x, lang)
        got = block.dispatch(x, ids, w)
        want = torch.zeros_like(x)
        for n in range(x.shape[0]):
            for j in range(K):
                if ids[n, j] >= 0:
                    want[n] += w[n, j] * block.experts[int(ids[n, j])](x[n : n + 1])[0]
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_dispatch_handles_experts_that_receive_no_tokens():
    block = random_block("topk")
    x = torch.randn(5, 64)
    ids = torch.tensor([[0, 1]] * 5)
    w = torch.full((5, 2), 0.5)
    with torch.no_grad():
        want = 0.5 * (block.experts[0](x) + block.experts[1](x))
        torch.testing.assert_close(block.dispatch(x, ids, w), want, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- stats and losses
@pytest.mark.parametrize("routing", ["topk", "hybrid"])
def test_router_stats_exclude_padding_and_count_k_per_token(dense, routing):
    ids, mask, lang = batch()
    lang[2, -2:] = -1  # unknown language on real tokens: routed, but not counted
    model = make(dense, routing).train()
    out = model(ids, attention_mask=mask, language_ids=lang)
    stats = out.router_stats
    counted = int(((mask == 1) & (lang >= 0)).sum())
    assert stats.moe_layers == [2, 3]
    assert stats.tokens_per_expert.shape == (2, E) and stats.language_expert_counts.shape == (2, E, E)
    assert stats.tokens_per_expert.sum(1).tolist() == [counted * K] * 2
    assert torch.equal(stats.language_expert_counts.sum(2), torch.stack([
        torch.bincount(lang[(mask == 1) & (lang >= 0)], minlength=E) * K] * 2))
    assert torch.equal(stats.language_expert_counts.sum(1), stats.tokens_per_expert)
    if routing == "hybrid":  # in training every counted token reaches its language expert
        rows = torch.bincount(lang[(mask == 1) & (lang >= 0)], minlength=E)
        assert torch.equal(stats.language_expert_counts.diagonal(dim1=1, dim2=2), torch.stack([rows] * 2))


def test_stats_without_language_ids_use_the_attention_mask(dense):
    ids, mask, _ = batch()
    stats = make(dense, "topk")(ids, attention_mask=mask).router_stats
    assert stats.tokens_per_expert.sum(1).tolist() == [int(mask.sum()) * K] * 2
    assert stats.language_expert_counts.sum() == 0


def test_language_routing_counts_one_expert_per_token(dense):
    ids, mask, lang = batch()
    stats = make(dense, "language").train()(ids, attention_mask=mask, language_ids=lang).router_stats
    assert stats.tokens_per_expert.sum(1).tolist() == [int((mask == 1).sum())] * 2


def test_padding_does_not_change_the_aux_loss():
    block = random_block("hybrid").train()
    x = torch.randn(1, 8, 64)
    lang = torch.tensor([[1, 2, 0, 3, 1, 2, -1, -1]])
    _, r = block(x, lang)
    x2 = x.clone()
    x2[0, 6:] = 100 * torch.randn(2, 64)  # the padded positions' content must not matter
    _, r2 = block(x2, lang)
    torch.testing.assert_close(r.aux_loss, r2.aux_loss)
    torch.testing.assert_close(r.z_loss, r2.z_loss)
    assert r.aux_loss > 0.5 and r.z_loss > 0


def test_loss_adds_the_weighted_aux_and_z_losses(dense):
    ids, mask, lang = batch()
    plain = make(dense, "hybrid").train()
    weighted = make(dense, "hybrid", aux_loss_coef=0.01, z_loss_coef=0.001).train()
    a = plain(ids, attention_mask=mask, language_ids=lang, labels=ids)
    b = weighted(ids, attention_mask=mask, language_ids=lang, labels=ids)
    torch.testing.assert_close(b.loss, a.loss + 0.01 * b.aux_loss + 0.001 * b.z_loss)


# ---------------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("routing", ["topk", "hybrid"])
def test_router_gets_gradient(dense, routing):
    ids, mask, lang = batch()
    model = make(dense, routing).train()
    model(ids, attention_mask=mask, language_ids=lang, labels=ids).loss.backward()
    for i in (2, 3):
        block = model.model.layers[i].mlp
        assert block.router.weight.grad.abs().sum() > 0
        assert all(e.down_proj.weight.grad is not None for e in block.experts)


def test_language_routing_router_learns_only_from_the_aux_loss(dense):
    ids, mask, lang = batch()
    lang = lang.clamp(min=0)  # every token has a language expert: none falls back to the (differentiable) top-k
    for coef, has_grad in ((0.0, False), (0.1, True)):
        model = make(dense, "language", aux_loss_coef=coef).train()
        model(ids, attention_mask=mask, language_ids=lang, labels=ids).loss.backward()
        grad = model.model.layers[3].mlp.router.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == has_grad


def test_activation_checkpointing_gives_the_same_loss_and_gradients(dense):
    ids, mask, lang = batch()
    runs = []
    for checkpointing in (False, True):
        model = make(dense, "hybrid", aux_loss_coef=0.01).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        out = model(ids, attention_mask=mask, language_ids=lang, labels=ids)
        out.loss.backward()
        runs.append((out.loss.detach(), model.model.layers[3].mlp.router.weight.grad.clone()))
    torch.testing.assert_close(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[0][1], runs[1][1])


# ------------------------------------------------------------------------------------------------------ checkpoints
def test_save_and_auto_load_round_trip(dense, tmp_path):
    ids, mask, lang = batch()
    model = make(dense, "hybrid", shared_expert=True).eval()
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert AutoConfig.from_pretrained(tmp_path).model_type == "apollo_post_moe"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, PostMoEForCausalLM)
    assert loaded.config.language_to_expert == model.config.language_to_expert
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask, language_ids=lang).logits,
                                   model(ids, attention_mask=mask, language_ids=lang).logits, atol=0, rtol=0)


def _distinct_experts(model: PostMoEForCausalLM, sigma: float = 0.05) -> PostMoEForCausalLM:
    """Upcycled experts are copies (routing changes nothing); perturbed, each expert computes its own function."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.config.moe_layers:
            for p in model.model.layers[layer].mlp.experts.parameters():
                p.add_(torch.randn(p.shape, generator=g) * sigma)
    return model


def _greedy_by_full_forwards(model, ids, mask, language_ids, steps: int):
    """Greedy tokens recomputing every position each step (no KV cache), with per-token language ids of each row's
    language and position ids that skip the left padding, as generate computes them: the reference for generate."""
    out, m = ids, mask
    scores = []
    with torch.no_grad():
        for _ in range(steps):
            lang = None if language_ids is None else language_ids[:, None].expand_as(out)
            position_ids = (m.cumsum(-1) - 1).clamp(min=0)
            logits = model(out, attention_mask=m, position_ids=position_ids, language_ids=lang).logits[:, -1]
            scores.append(logits)
            nxt = logits.argmax(-1, keepdim=True)
            out, m = torch.cat([out, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    return out, torch.stack(scores, 1)


@pytest.mark.parametrize("routing", ["hybrid", "language"])
def test_generate_with_a_language_per_sequence(dense, routing):
    ids, mask, _ = batch()
    steps = 4
    model = _distinct_experts(make(dense, routing)).eval()
    model.config.hybrid_in_eval = True

    def generate(language_ids):
        kw = {} if language_ids is None else {"language_ids": language_ids}
        out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kw)
        return out.sequences, torch.stack(out.logits, 1)

    langs = torch.tensor([0, 1, 3])
    seq, logits = generate(langs)
    ref_seq, ref_logits = _greedy_by_full_forwards(model, ids, mask, langs, steps)
    assert torch.equal(seq, ref_seq)  # the ids reach every cached decoding step, routed as a full forward routes
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    # The ids decide the routing: other languages for the same rows change every row's next-token scores.
    _, other = generate(torch.tensor([3, 0, 1]))
    assert all(not torch.allclose(other[b, 0], logits[b, 0], atol=1e-3) for b in range(B))
    # Routing off in evaluation: the ids are ignored, generation is the plain top-k model's.
    model.config.hybrid_in_eval = False
    if routing == "hybrid":
        plain_seq, plain_logits = generate(None)
        ignored_seq, ignored_logits = generate(langs)
        assert torch.equal(ignored_seq, plain_seq)
        torch.testing.assert_close(ignored_logits, plain_logits, atol=0, rtol=0)
        assert not torch.allclose(plain_logits[:, 0], logits[:, 0], atol=1e-3)


def test_upcycle_checkpoint_from_the_typed_config(dense, tmp_path, make_cfg):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = tmp_path / "dense"
    dense.save_pretrained(base)
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(base)

    cfg = make_cfg("moe.experts=family", "moe.ep_size=1", "moe.layers=1", "moe.routing=topk", "moe.top_k=2")
    kwargs = moe_config_from(cfg)
    assert kwargs["num_experts"] == 7 and kwargs["language_to_expert"]["en"] == 4 and kwargs["layers"] == 1
    out = upcycle_checkpoint(str(base), str(tmp_path / "moe"), cfg)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.moe_layers == [3] and loaded.config.expert_names[4] == "Indo-European"
    assert (Path(out) / "tokenizer.json").exists()
    stamp = (Path(out) / "config.json").stat().st_mtime_ns
    assert upcycle_checkpoint(str(base), out, cfg) == out  # finished output is reused
    assert (Path(out) / "config.json").stat().st_mtime_ns == stamp
