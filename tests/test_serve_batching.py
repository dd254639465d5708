"""Continuous batching (``engine.Decoder``) without Ray: a request's answer does not depend on its batch.

Models: the tiny base with perturbed weights (the served checkpoint and the proxy's base), a perturbed expert, and a
Post-MoE anti-expert upcycled from a third perturbation whose experts are then perturbed each on its own, so that
which experts a token is routed to changes its output. Sixteen requests (prompts of different lengths, greedy and
seeded top-p sampling, stop sequences, different max_tokens, for the proxy each its own α) decode one by one and as
one batch that eight of them join late; every answer must be the same, token for token.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from apollo_ray import config as config_mod
from apollo_ray.serve.engine import Decoder, Generation, Sampling, completion_prompt_ids, eos_ids

PROMPTS = [f"Deficiency of which vitamin causes scurvy?{' Explain the mechanism.' * (i % 5)} Case {i}:"
           for i in range(16)]
ALPHAS = [None, 0.0, 0.5, 1.7]


def _perturbed(model: torch.nn.Module, seed: int, sigma: float = 0.2) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * sigma)
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import apollo_ray  # noqa: F401  (registers Post-MoE)
    from apollo_ray.model.tiny import ensure_base
    from apollo_ray.model.upcycle import upcycle_checkpoint
    from apollo_ray.serve.proxy import ProxyLM
    from apollo_ray.storage import Storage

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("batching")
    cfg = config_mod.resolve({}, [f"storage.root={root / 'store'}"])
    tiny = ensure_base(cfg, Storage.from_config(cfg), root / "tiny")
    moe_path = upcycle_checkpoint(tiny, str(root / "moe"), cfg)
    base = _perturbed(AutoModelForCausalLM.from_pretrained(tiny), seed=1)
    expert = _perturbed(AutoModelForCausalLM.from_pretrained(tiny), seed=2)
    moe = _perturbed(AutoModelForCausalLM.from_pretrained(moe_path), seed=3)
    assert type(moe).__name__ == "PostMoEForCausalLM"
    tok = AutoTokenizer.from_pretrained(tiny)
    return {"tokenizer": tok, "moe": moe, "proxy": ProxyLM(base, expert, moe, alpha=0.7), "root": root,
            "paths": {"tiny": tiny, "moe": moe_path}}


def _generation(tok, lm, i: int, *, proxy: bool) -> Generation:
    # stop sequences only for the late joiners: the first eight all run past the step at which the others join
    sampling = Sampling(max_tokens=12 + i, temperature=0.0 if i % 2 == 0 else 0.9, top_p=0.8 if i % 4 == 1 else 1.0,
                        seed=100 + i, stop=("e",) if i % 3 == 0 and i >= 8 else ())
    return Generation(tok, completion_prompt_ids(tok, PROMPTS[i]), sampling, eos_ids(lm, tok),
                      alpha=ALPHAS[i % len(ALPHAS)] if proxy else None)


def _drive(decoder: Decoder, gens: list[Generation], late: list[Generation] = (), join_at: int = 3) -> list[tuple]:
    """Step until every generation is done; ``late`` ones are submitted at step ``join_at``. Returns each
    generation's (streamed text, final text, finish reason, completion tokens)."""
    streamed = {g: "" for g in [*gens, *late]}
    for g in gens:
        decoder.submit(g)
    steps = 0
    while not decoder.idle or steps < join_at:
        if steps == join_at:
            for g in late:
                decoder.submit(g)
        for g, step in decoder.step():
            assert g.finish_reason == step.finish_reason
            streamed[g] += step.text
        steps += 1
        assert steps < 500, "the decoder never finished"
    return [(streamed[g], g.text, g.finish_reason, g.completion_tokens) for g in [*gens, *late]]


@pytest.mark.parametrize("kind", ["moe", "proxy"])
def test_an_answer_is_the_same_alone_and_batched_with_15_others(models, kind):
    tok, lm = models["tokenizer"], models[kind]
    proxy = kind == "proxy"
    alone, alone_forwards = [], 0
    for i in range(16):
        decoder = Decoder(lm)
        alone += _drive(decoder, [_generation(tok, lm, i, proxy=proxy)])
        assert decoder.stats.max_rows == 1
        alone_forwards += decoder.stats.decode_forwards

    decoder = Decoder(lm)
    gens = [_generation(tok, lm, i, proxy=proxy) for i in range(16)]
    batched = _drive(decoder, gens[:8], late=gens[8:])

    assert batched == alone
    assert {a[2] for a in alone} == {"stop", "length"}  # stop sequences and max_tokens both ended answers
    assert len({a[1] for a in alone}) == 16
    for streamed, text, _, _ in alone:
        assert streamed == text
    # they did decode together: 16 rows in one forward, and far fewer forwards than one request at a time
    assert decoder.stats.max_rows == 16
    assert decoder.stats.prefill_forwards == 2
    assert decoder.stats.decode_forwards < alone_forwards / 8


def _reference(step_logits, ids: list[int], steps: int, stop_ids: frozenset[int]) -> list[int]:
    """Greedy continuation by full forwards without any cache: what the decoder must reproduce."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(torch.argmax(step_logits(torch.tensor([ids + out]))))
            out.append(token)
            if token in stop_ids:
                break
    return out


@pytest.mark.parametrize("kind", ["moe", "proxy"])
def test_batched_greedy_answers_are_the_models_own(models, kind):
    """Checked against full forwards: a mistake shared by the alone and batched paths (positions, masks, the α of a
    row) would pass the comparison above."""
    tok, lm = models["tokenizer"], models[kind]
    proxy = kind == "proxy"
    gens = [Generation(tok, completion_prompt_ids(tok, PROMPTS[i]), Sampling(max_tokens=10, temperature=0.0),
                       eos_ids(lm, tok), alpha=ALPHAS[i % 4] if proxy else None) for i in range(6)]
    _drive(Decoder(lm), gens[:3], late=gens[3:], join_at=2)
    for i, g in enumerate(gens):
        if proxy:
            alpha = lm.alpha if g.alpha is None else g.alpha
            models_ = (lm.base, lm.expert, lm.anti_expert)

            def logits(x, a=alpha):
                zb, ze, za = (m(input_ids=x).logits[0, -1] for m in models_)
                return zb + a * (ze - za)
        else:
            def logits(x):
                return lm(input_ids=x).logits[0, -1]
        expected = _reference(logits, g.prompt_ids, 10, g.stop_ids)
        assert g.text == tok.decode([t for t in expected if t not in g.stop_ids], skip_special_tokens=True), i
        assert g.completion_tokens == len(expected)
    if proxy:  # the α of each row mattered: the answers at α = 0 and α = 1.7 differ from the default's
        assert len({gens[i].text for i in (0, 1, 3)}) == 3


def test_cancelled_generations_leave_and_the_others_are_unchanged(models):
    tok, lm = models["tokenizer"], models["moe"]
    expected = _drive(Decoder(lm), [_generation(tok, lm, i, proxy=False) for i in range(4)])
    decoder = Decoder(lm)
    gens = [_generation(tok, lm, i, proxy=False) for i in range(4)]
    for g in gens:
        decoder.submit(g)
    seen = {g: 0 for g in gens}
    for _ in range(3):
        for g, _ in decoder.step():
            seen[g] += 1
    gens[1].cancel()
    waiting = _generation(tok, lm, 5, proxy=False)
    waiting.cancel()  # cancelled before it ever joined: never prefilled
    decoder.submit(waiting)
    prefills = decoder.stats.prefill_forwards
    while not decoder.idle:
        for g, _ in decoder.step():
            seen[g] += 1
    assert seen[gens[1]] == 3 and waiting not in seen
    assert decoder.stats.prefill_forwards == prefills
    for i in (0, 2, 3):
        assert (gens[i].text, gens[i].finish_reason) == expected[i][1:3]
    assert decoder.rows == [] and decoder.logits_BV is None  # the batch cache is freed with its last row


def test_prefill_budget_splits_joiners_and_a_long_prompt_still_runs(models):
    tok, lm = models["tokenizer"], models["moe"]
    longest = max(len(completion_prompt_ids(tok, p)) for p in PROMPTS[:6])
    decoder = Decoder(lm, max_prefill_tokens=longest * 2, max_batch_size=5)
    gens = [_generation(tok, lm, i, proxy=False) for i in range(6)]
    out = _drive(decoder, gens)
    assert decoder.stats.max_rows <= 5
    assert decoder.stats.prefill_forwards >= 3  # at most two prompts of the longest length per prefill
    assert out == [_drive(Decoder(lm), [_generation(tok, lm, i, proxy=False)])[0] for i in range(6)]
    alone = Decoder(lm, max_prefill_tokens=1)  # every prompt is over this budget: each is prefilled alone, never stuck
    assert _drive(alone, [_generation(tok, lm, i, proxy=False) for i in range(3)])[0][2] is not None


def test_sliding_window_layers_attend_within_the_window(models):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = models["tokenizer"]
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=5,
                      max_window_layers=2, layer_types=["sliding_attention", "full_attention"],
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(cfg).eval()
    gens = [Generation(tok, completion_prompt_ids(tok, PROMPTS[i]), Sampling(max_tokens=8, temperature=0.0),
                       eos_ids(lm, tok)) for i in range(4)]
    _drive(Decoder(lm), gens[:2], late=gens[2:], join_at=1)
    for g in gens:
        expected = _reference(lambda x: lm(input_ids=x).logits[0, -1], g.prompt_ids, 8, g.stop_ids)
        assert g.completion_tokens == len(expected)
        assert g.text == tok.decode([t for t in expected if t not in g.stop_ids], skip_special_tokens=True)
    # the window did change the answer: the same weights without it answer otherwise
    full = Qwen2ForCausalLM(Qwen2Config(**{**cfg.to_dict(), "use_sliding_window": False,
                                           "layer_types": ["full_attention"] * 2})).eval()
    full.load_state_dict(lm.state_dict())
    assert _reference(lambda x: full(input_ids=x).logits[0, -1], gens[0].prompt_ids, 8, gens[0].stop_ids) != \
        _reference(lambda x: lm(input_ids=x).logits[0, -1], gens[0].prompt_ids, 8, gens[0].stop_ids)


def test_replica_hops_to_the_torch_thread_once_per_step_not_per_request_token(models, tmp_path):
    """The Serve replica class in-process (no Ray): 16 concurrent requests, each step one hop for all of them."""
    from apollo_ray.serve.api import GenerateRequest
    from apollo_ray.serve.app import ModelServer, ModelSpec

    path = tmp_path / "moe"
    models["moe"].save_pretrained(path)
    models["tokenizer"].save_pretrained(path)
    server = ModelServer.func_or_class(ModelSpec(name="m", checkpoint=str(path)))
    hops = []
    run = server._run

    async def counted(fn, *args):
        hops.append(fn)
        return await run(fn, *args)

    server._run = counted
    max_tokens = 16
    requests = [GenerateRequest(Sampling(max_tokens=max_tokens, temperature=0.0 if i % 2 else 0.8, seed=i),
                                prompt=PROMPTS[i]) for i in range(16)]

    async def main() -> list[dict]:
        return list(await asyncio.gather(*(server.generate(r) for r in requests)))

    answers = asyncio.run(main())
    steps = [f for f in hops if getattr(f, "__self__", None) is server.decoder]
    assert len(steps) == len(hops)  # nothing else went to the torch thread
    # one request at a time would take 16 × 16 hops; batched, a step serves every active request, and requests
    # that arrive while a step runs join at the next one
    assert server.decoder.stats.max_rows > 1
    assert len(steps) <= max_tokens + len(requests)
    assert sum(a["completion_tokens"] for a in answers) > 2 * len(steps)
    for r, a in zip(requests, answers):
        lm = models["moe"]
        alone = Decoder(lm)
        g = Generation(models["tokenizer"], completion_prompt_ids(models["tokenizer"], r.prompt), r.sampling,
                       eos_ids(lm, models["tokenizer"]))
        _drive(alone, [g])
        assert (a["text"], a["finish_reason"], a["completion_tokens"]) == (g.text, g.finish_reason,
                                                                            g.completion_tokens)


def test_sampling_follows_the_truncated_distribution_and_never_picks_a_token_without_mass():
    """``engine.sample`` by inverse transform: over an even grid of draws each token's share is its probability
    (after temperature and top-p), and draws at the very top of [0, 1) still land on a kept token."""
    from apollo_ray.serve.engine import sample

    logits_V = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625]))
    n = 4000
    u_N = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    rows = logits_V.expand(n, -1)
    for temperature, top_p, expected in ((1.0, None, [0.5, 0.25, 0.125, 0.0625, 0.0625]),
                                         (1.0, 0.7, [2 / 3, 1 / 3, 0, 0, 0]),  # 0.5 + 0.25 reach 0.7
                                         (0.5, None, None)):
        tokens = sample(rows, torch.full((n,), temperature), None if top_p is None else torch.full((n,), top_p),
                        u_N.float())
        share = torch.bincount(tokens, minlength=5).double() / n
        if expected is None:  # temperature 0.5 squares the probabilities before renormalising
            p = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625]) ** 2
            expected = (p / p.sum()).tolist()
        assert torch.allclose(share, torch.tensor(expected, dtype=torch.float64), atol=2 / n), (temperature, top_p)
    top = sample(logits_V.expand(3, -1), torch.ones(3), torch.full((3,), 0.7),
                 torch.tensor([1 - 1e-9, 0.999999, 0.9999999]))
    assert top.tolist() == [1, 1, 1]  # the last kept token, never a truncated one
