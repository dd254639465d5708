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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls are fastest single-threaded; a second intra-op thread on a busy 2-core box costs ~100x."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


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


def test_generate_with_a_language_per_sequence(dense):
    ids, mask, _ = batch()
    model = make(dense, "hybrid").eval()
    model.config.hybrid_in_eval = True
    out = model.generate(ids, attention_mask=mask, language_ids=torch.tensor([0, 1, 3]), max_new_tokens=3,
                         do_sample=False)
    assert out.shape == (B, T + 3)


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
