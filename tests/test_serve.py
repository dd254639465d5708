"""The Serve app end to end: a real local Serve with tiny models, driven by the openai client, httpx and schemathesis.

Models: the tiny base with its weights perturbed (so that greedy text varies instead of repeating one token) is the
served checkpoint and the proxy's base; the expert is another perturbation of it; the anti-expert is a third one,
upcycled to Post-MoE, so the proxy also exercises a sparse model's KV cache. One app serves them all (``apollo`` and
``apollo-proxy``) behind an API key, for every test of the module.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path

import httpx
import pytest
import torch

from apollo_ray import config as config_mod
from apollo_ray.serve.api import MAX_JOB_LIMIT
from apollo_ray.serve.engine import chat_prompt_ids, completion_prompt_ids

KEY_ENV = "APOLLO_TEST_SERVE_KEY"
KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "Deficiency of which vitamin causes scurvy?"
ALPHA = 0.7


# ------------------------------------------------------------------------------------------------------------ models
def _perturbed(src: str, out: Path, seed: int, sigma: float = 0.2) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * sigma)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> dict[str, str]:
    from apollo_ray.model.tiny import ensure_base
    from apollo_ray.model.upcycle import upcycle_checkpoint
    from apollo_ray.storage import Storage

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve-models")
    cfg = config_mod.resolve({}, [f"storage.root={root / 'store'}"])
    tiny = ensure_base(cfg, Storage.from_config(cfg), root / "tiny")
    base = _perturbed(tiny, root / "base", seed=1)
    expert = _perturbed(base, root / "expert", seed=2)
    anti_dense = _perturbed(base, root / "anti-dense", seed=3)
    anti = upcycle_checkpoint(anti_dense, str(root / "anti-moe"), cfg)
    return {"base": base, "expert": expert, "anti_expert": anti, "root": str(root)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trio):
    import ray
    from ray import serve

    from apollo_ray.serve import app

    os.environ[KEY_ENV] = KEY  # before Ray starts: replicas inherit the environment of the local Ray
    cfg = config_mod.resolve({}, [
        f"storage.root={trio['root']}/store", f"serve.model={trio['base']}", f"serve.port={_free_port()}",
        f"serve.api_key_env={KEY_ENV}", "serve.max_tokens=48", "serve.max_prompt_tokens=600",
        "serve.max_concurrent_requests=256", "eval.limit=2", "eval.shots=1", "resources.cpus_per_worker=1",
        "serve.proxy=" + json.dumps({"base": trio["base"], "expert": trio["expert"],
                                     "anti_expert": trio["anti_expert"], "alpha": ALPHA})])
    # 4 logical CPUs on a 2-core machine: two model replicas reserve 1 each, an evaluation may want the rest
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    try:
        url = app.run(cfg, block=False)
        yield url, cfg
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(KEY_ENV, None)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    url, _ = server
    return OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    url, _ = server
    with httpx.Client(base_url=url, headers=AUTH, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def local(trio):
    """The three models loaded here with plain transformers, for reference computations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import apollo_ray  # noqa: F401  (registers Post-MoE)

    models = {k: AutoModelForCausalLM.from_pretrained(trio[k]).eval() for k in ("base", "expert", "anti_expert")}
    return models, AutoTokenizer.from_pretrained(trio["base"])


def _greedy(step_logits, ids: list[int], steps: int, stop_ids: set[int]) -> list[int]:
    """Greedy continuation recomputing full forwards (no KV cache): the reference the served loop must match."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(torch.argmax(step_logits(torch.tensor([ids + out]))))
            out.append(token)
            if token in stop_ids:
                break
    return out


# ------------------------------------------------------------------------------------------------- OpenAI routes

@pytest.mark.slow
def test_models_listed(client):
    assert {m.id for m in client.models.list().data} == {"apollo", "apollo-proxy"}


@pytest.mark.slow
def test_completion_is_the_models_greedy_text(client, local):
    models, tok = local
    out = client.completions.create(model="apollo", prompt=PROMPT, max_tokens=12, temperature=0)
    ids = completion_prompt_ids(tok, PROMPT)
    expected = _greedy(lambda x: models["base"](input_ids=x).logits[0, -1], ids, 12, {tok.eos_token_id})
    assert out.choices[0].text == tok.decode([t for t in expected if t != tok.eos_token_id],
                                             skip_special_tokens=True)
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == len(expected)
    assert out.choices[0].finish_reason == ("stop" if expected[-1] == tok.eos_token_id else "length")


@pytest.mark.slow
def test_chat_uses_apollo_format(client, local):
    _, tok = local
    messages = [{"role": "user", "content": "What causes malaria?"}]
    out = client.chat.completions.create(model="apollo", messages=messages, max_tokens=8, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(chat_prompt_ids(tok, messages))
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


@pytest.mark.slow
@pytest.mark.parametrize("model", ["apollo", "apollo-proxy"])
def test_streaming_concatenates_to_the_full_answer(client, model):
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=30, temperature=0)
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=30, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens

    messages = [{"role": "user", "content": PROMPT}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0)
    streamed = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content


@pytest.mark.slow
def test_stop_sequence_cuts_the_text_in_both_modes(client):
    full = client.completions.create(model="apollo", prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    assert len(full) > 6
    stop = full[3:6]
    cut = full[:full.find(stop)]
    out = client.completions.create(model="apollo", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop])
    assert (out.choices[0].text, out.choices[0].finish_reason) == (cut, "stop")
    streamed = client.completions.create(model="apollo", prompt=PROMPT, max_tokens=30, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(client):
    def sample(seed: int) -> str:
        return client.completions.create(model="apollo", prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.9,
                                         seed=seed).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1


# ---------------------------------------------------------------------------------------------------- proxy-tuning
@pytest.mark.slow
def test_proxy_equals_the_formula(client, local):
    models, tok = local
    ids = completion_prompt_ids(tok, PROMPT)

    def proxy_logits(x: torch.Tensor) -> torch.Tensor:
        zb, ze, za = (models[k](input_ids=x).logits[0, -1] for k in ("base", "expert", "anti_expert"))
        return zb + ALPHA * (ze - za)

    expected = _greedy(proxy_logits, ids, 10, {tok.eos_token_id})
    base_only = _greedy(lambda x: models["base"](input_ids=x).logits[0, -1], ids, 10, {tok.eos_token_id})
    assert expected != base_only  # the expert offset changes the answer: the comparison below means something
    out = client.completions.create(model="apollo-proxy", prompt=PROMPT, max_tokens=10, temperature=0)
    assert out.choices[0].text == tok.decode([t for t in expected if t != tok.eos_token_id],
                                             skip_special_tokens=True)
    assert out.usage.completion_tokens == len(expected)


@pytest.mark.slow
def test_proxy_alpha_zero_is_the_base_model(client):
    for prompt in (PROMPT, "Which insect transmits malaria?"):
        base = client.completions.create(model="apollo", prompt=prompt, max_tokens=20, temperature=0)
        proxy = client.completions.create(model="apollo-proxy", prompt=prompt, max_tokens=20, temperature=0,
                                          extra_body={"alpha": 0.0})
        assert proxy.choices[0].text == base.choices[0].text


@pytest.mark.slow
def test_alpha_is_refused_for_a_plain_model(http):
    r = http.post("/v1/completions", json={"model": "apollo", "prompt": "x", "alpha": 1.0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "alpha"


def test_mismatched_tokenizers_are_refused(tmp_path):
    from apollo_ray.model.tiny import sample_texts, train_tokenizer
    from apollo_ray.serve.proxy import IncompatibleTokenizers, check_tokenizers

    texts = list(sample_texts())
    a = train_tokenizer(texts, 600, tmp_path / "a")
    same = train_tokenizer(texts, 600, tmp_path / "same")
    other = train_tokenizer([t[::-1] for t in texts], 600, tmp_path / "other")
    check_tokenizers({"base-7b": a, "expert-0.5b": same})
    with pytest.raises(IncompatibleTokenizers, match=r"'base-7b' and 'anti-0.5b'"):
        check_tokenizers({"base-7b": a, "expert-0.5b": same, "anti-0.5b": other})


def test_vocabularies_are_zero_padded():
    from apollo_ray.serve.proxy import combine

    zb, ze, za = torch.randn(152064), torch.randn(151936), torch.randn(151936)
    z = combine(zb, ze, za, 0.5)
    assert z.shape == (152064,)
    torch.testing.assert_close(z[:151936], zb[:151936] + 0.5 * (ze - za))
    torch.testing.assert_close(z[151936:], zb[151936:])  # no offset where the small models have no row


# ------------------------------------------------------------------------------------------------------ evaluation
ITEMS = json.loads((config_mod.SAMPLE_DATA / "mcq" / "en.json").read_text(encoding="utf-8"))[:3]


@pytest.mark.slow
def test_eval_score_batch(http):
    r = http.post("/v1/eval/score", json={"model": "apollo", "items": ITEMS, "shots": 1})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(ITEMS)
    for res, item in zip(results, ITEMS):
        assert res["predicted"] == max(res["loglik"], key=res["loglik"].get)
        assert res["letters"] == ["A", "B", "C", "D"][:len(res["letters"])]
        assert res["answer"] == item["answer"].strip("()")
        assert res["correct"] == (res["predicted"] == res["answer"])
    unanswered = http.post("/v1/eval/score", json={"model": "apollo-proxy", "items": [
        {"question": ITEMS[0]["question"], "options": ITEMS[0]["options"]}]}).json()["results"][0]
    assert unanswered["answer"] is None and unanswered["correct"] is None


@pytest.mark.slow
def test_proxy_option_scores_follow_the_formula(http, local):
    from apollo_ray.evaluation.benchmark import parse_item
    from apollo_ray.evaluation.prompts import build_prompt, continuations, encode

    models, tok = local
    r = http.post("/v1/eval/score", json={"model": "apollo-proxy", "items": ITEMS[:2]})
    assert r.status_code == 200, r.text
    for res, raw in zip(r.json()["results"], ITEMS[:2]):
        item = parse_item(raw, item_id="x", language="en", default_source="s")
        prompt = build_prompt(item, [], 0, tokenizer=tok)
        ctx = encode(tok, prompt)
        for letter, option in zip(item.letters, continuations(item)):
            whole = encode(tok, prompt + option)
            x = torch.tensor([whole])
            with torch.no_grad():
                zb, ze, za = (models[k](input_ids=x).logits[0] for k in ("base", "expert", "anti_expert"))
            logprobs = torch.log_softmax(zb + ALPHA * (ze - za), dim=-1)
            expected = sum(float(logprobs[len(ctx) - 1 + k, t]) for k, t in enumerate(whole[len(ctx):]))
            assert res["loglik"][letter] == pytest.approx(expected, abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["apollo", "apollo-proxy"])
def test_eval_job_runs_to_success(http, model):
    def finished(limit: int) -> dict:
        r = http.post("/v1/eval/jobs", json={"benchmark": "apollo-sample", "model": model, "limit": limit})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] in ("pending", "running")
        deadline = time.time() + 300
        while job["status"] in ("pending", "running") and time.time() < deadline:
            time.sleep(1)
            job = http.get(f"/v1/eval/jobs/{job['id']}").json()
        assert job["status"] == "succeeded", job
        assert job["result"]["n"] > 0 and 0 <= job["result"]["accuracy"] <= 1
        return job["result"]

    # the config's own limit (2): a checkpoint goes through the evaluation stage, a proxy trio through the app
    assert finished(2)["backend"] == ("runner" if model == "apollo" else "in-app")
    # a job's own limit is scored in the app under the config's protocol: no eval/ folder per distinct limit
    result = finished(1)
    assert result["backend"] == "in-app" and result["protocol"] == "native" and "folder" not in result
    too_many = {"benchmark": "apollo-sample", "model": model, "limit": MAX_JOB_LIMIT + 1}
    assert http.post("/v1/eval/jobs", json=too_many).status_code == 422
    assert http.get("/v1/eval/jobs/evaljob-nope").status_code == 404
    assert http.post("/v1/eval/jobs", json={"benchmark": "nope"}).status_code == 404


# -------------------------------------------------------------------------------------------- security, robustness
@pytest.mark.slow
def test_api_key_enforced_on_every_route(server):
    url, _ = server
    # With the key each route answers what it answers to anyone allowed in: no such job is a 404, the rest a 200.
    routes = [("GET", "/v1/models", None, 200), ("GET", "/openapi.json", None, 200),
              ("GET", "/v1/eval/jobs/x", None, 404),
              ("POST", "/v1/completions", {"model": "apollo", "prompt": "hi", "max_tokens": 2}, 200)]
    for method, path, body, allowed in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, url + path, json=body, headers=headers, timeout=60)
            assert r.status_code == 401, (path, headers, r.status_code)
            assert r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.request(method, url + path, json=body, headers=AUTH, timeout=60)
        assert r.status_code == allowed, (path, r.status_code, r.text[:300])
    assert httpx.get(url + "/v1/eval/jobs/x", headers=AUTH, timeout=60).json()["error"]["param"] == "job_id"


@pytest.mark.slow
def test_invalid_requests_get_4xx_naming_the_field(http, server):
    _, cfg = server

    def post(path: str, body: dict) -> httpx.Response:
        return http.post(path, json=body)

    r = post("/v1/completions", {"model": "apollo", "prompt": "x", "max_tokens": 0})
    assert r.status_code == 422 and "max_tokens" in r.json()["error"]["message"]
    r = post("/v1/completions", {"model": "apollo", "prompt": "x", "temperatur": 0})
    assert r.status_code == 422 and "temperatur" in r.json()["error"]["message"]
    r = post("/v1/completions", {"model": "apollo", "prompt": "x", "max_tokens": cfg.serve.max_tokens + 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = post("/v1/completions", {"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    long_prompt = " ".join(["vitamin"] * (cfg.serve.max_prompt_tokens + 10))
    for stream in (False, True):  # a refused stream is a 400, not a 200 carrying an error
        r = post("/v1/completions", {"model": "apollo", "prompt": long_prompt, "stream": stream})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    r = post("/v1/chat/completions", {"model": "apollo", "messages": []})
    assert r.status_code == 422 and "messages" in r.json()["error"]["message"]
    r = post("/v1/eval/score", {"items": [{"question": "q", "options": "(A) x\n(C) y"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "items[0]"
    r = post("/v1/eval/score", {"items": [ITEMS[0]] * (cfg.serve.max_batch_items + 1)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "items"
    r = http.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    url, _ = server
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=AUTH, timeout=60)
    ran = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=25, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case) -> None:
            case.call_and_validate(base_url=url, headers=AUTH, checks=[not_a_server_error], timeout=120)

        check()
        ran += 1
    assert ran >= 6


@pytest.mark.slow
def test_200_concurrent_requests_all_succeed(server):
    url, _ = server

    async def main() -> list[int]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=300, limits=limits) as c:
            async def one(i: int) -> int:
                r = await c.post("/v1/completions", json={"model": "apollo", "prompt": f"{PROMPT} {i}",
                                                          "max_tokens": 4, "temperature": 0})
                return r.status_code
            return await asyncio.gather(*(one(i) for i in range(200)))

    codes = asyncio.run(main())
    assert codes == [200] * 200, {c: codes.count(c) for c in set(codes)}


# --------------------------------------------------------------------------- without Ray: admission, config, app args
class _SlowBackend:
    """A backend whose answers wait for a signal, to hold admission slots open; ``entered`` is set once ``expect``
    requests are inside ``generate`` (admitted, holding their slots)."""

    def __init__(self, expect: int = 0) -> None:
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.expect, self.inside, self.calls = expect, 0, 0

    def model_names(self) -> list[str]:
        return ["m"]

    async def generate(self, model, request):
        self.calls += 1
        self.inside += 1
        if self.inside >= self.expect:
            self.entered.set()
        try:
            await self.release.wait()
        finally:
            self.inside -= 1
        return {"text": "ok", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1}


DEADLINE_S = 60  # generous for a loaded machine; a test waiting on an event fails at it instead of hanging


def test_concurrency_limit_answers_429_only_beyond_it():
    from apollo_ray.serve.api import ApiSettings, create_api

    backend = _SlowBackend(expect=3)
    api = create_api(backend, ApiSettings(api_key=None, max_prompt_tokens=10, max_tokens=5, max_batch_items=4,
                                          max_concurrent_requests=3))

    async def main() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://t") as c:
            body = {"model": "m", "prompt": "p", "max_tokens": 1}
            held = [asyncio.create_task(c.post("/v1/completions", json=body)) for _ in range(3)]
            try:
                try:
                    await asyncio.wait_for(backend.entered.wait(), DEADLINE_S)
                except asyncio.TimeoutError:
                    pytest.fail(f"only {backend.inside} of 3 requests were admitted within {DEADLINE_S} s")
                over = await c.post("/v1/completions", json=body)  # all 3 slots held: refused at once
                assert backend.calls == 3  # the refused request never reached the backend
            finally:
                backend.release.set()
            codes = [over.status_code, *[(await asyncio.wait_for(t, DEADLINE_S)).status_code for t in held]]
            after = await c.post("/v1/completions", json=body)  # slots released: admitted again
            return [*codes, after.status_code]

    assert asyncio.run(main()) == [429, 200, 200, 200, 200]


class _EchoBackend:
    """An in-process backend that answers at once (auth is decided before any backend call)."""

    def __init__(self) -> None:
        self.calls = 0

    def model_names(self) -> list[str]:
        return ["m"]

    async def generate(self, model, request):
        self.calls += 1
        return {"text": "ok", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1}

    async def eval_status(self, job_id):
        return None


def test_api_key_is_enforced_in_process():
    """The key check without Ray or Serve: 401 (OpenAI's error body, a WWW-Authenticate challenge) for a missing,
    wrong, prefixed-but-wrong or scheme-less key on every route, and the route's own answer with the right one."""
    from apollo_ray.serve.api import ApiSettings, create_api

    backend = _EchoBackend()
    api = create_api(backend, ApiSettings(api_key=KEY, max_prompt_tokens=10, max_tokens=5, max_batch_items=4,
                                          max_concurrent_requests=8))
    routes = [("GET", "/v1/models", None, 200), ("GET", "/openapi.json", None, 200),
              ("GET", "/v1/eval/jobs/x", None, 404),
              ("POST", "/v1/completions", {"model": "m", "prompt": "p", "max_tokens": 1}, 200),
              ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "p"}]}, 200)]
    refused = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}x"},
               {"Authorization": f"Bearer {KEY[:-1]}"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
               {"X-Api-Key": KEY}]

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://t",
                                     timeout=DEADLINE_S) as c:
            for method, path, body, allowed in routes:
                before = backend.calls
                for headers in refused:
                    r = await c.request(method, path, json=body, headers=headers)
                    assert r.status_code == 401, (path, headers, r.status_code)
                    assert r.headers["www-authenticate"] == "Bearer"
                    assert r.json()["error"]["type"] == "authentication_error", r.text
                assert backend.calls == before  # nothing reached the model without the key
                for auth in (AUTH, {"Authorization": f"bearer {KEY}"}):  # the scheme is case-insensitive
                    r = await c.request(method, path, json=body, headers=auth)
                    assert r.status_code == allowed, (path, r.status_code, r.text[:300])
            assert backend.calls == 2 * 2  # the two generating routes, once per accepted header
            assert (await c.get("/v1/models", headers=AUTH)).json()["data"][0]["id"] == "m"

    asyncio.run(main())


def test_serve_config_round_trips(make_cfg, tmp_path):
    import yaml

    from apollo_ray.cli import main
    from apollo_ray.serve import app

    model = tmp_path / "model"
    model.mkdir()
    cfg = make_cfg(f"serve.model={model}", "serve.replicas=2", "resources.use_gpu=true", "resources.gpus_per_worker=1")
    out = app.serve_config(cfg)
    (application,) = out["applications"]
    assert application["import_path"] == "apollo_ray.serve.app:build_app"
    assert app.config_from_args(application["args"]) == cfg
    deployments = {d["name"]: d for d in application["deployments"]}
    assert set(deployments) == {"Ingress", "EvalJobs", "apollo"}
    assert deployments["apollo"]["num_replicas"] == 2
    assert deployments["apollo"]["ray_actor_options"]["num_gpus"] == 1
    assert app.build_app(application["args"]) is not None

    path = tmp_path / "serve.yaml"
    assert main(["serve", "--write-config", str(path), "--set", f"serve.model={model}"]) == 0
    assert yaml.safe_load(path.read_text())["applications"][0]["name"] == "apollo"
    with pytest.raises(config_mod.ConfigError, match="no such checkpoint"):
        app.model_specs(make_cfg(f"serve.model={tmp_path / 'missing'}"))
    with pytest.raises(config_mod.ConfigError, match="unknown app args"):
        app.config_from_args({"config": None, "replicas": 3})
