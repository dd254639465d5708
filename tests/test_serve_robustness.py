"""Inputs and faults that must never become a 5xx-without-a-reason: non-finite numbers, lone surrogates, a replica
that dies under its requests.

Every JSON field of every route's request is fuzzed with ``1e999``, ``-1e999``, ``NaN``, ``Infinity``,
``-Infinity`` (Python's JSON parser takes all of them; the first two overflow to ±inf) where it holds a number, and
with lone-surrogate escapes where it holds text: first in-process against the FastAPI app (no Ray), then against a
live Serve app with the real tokenizer behind it. A replica killed while requests are on it must answer them with a
503, ``Retry-After`` and OpenAI's error body, and Serve's replacement must answer the next ones.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import time

import httpx
import pytest
import torch

from apollo_ray import config as config_mod

NUMBERS = ["1e999", "-1e999", "NaN", "Infinity", "-Infinity"]
SURROGATES = ["\\ud800", "x\\udfffy", "\\udc80\\ud83d"]  # JSON escapes: a lone high, a lone low, a reversed pair
DEADLINE_S = 120

# A valid request per route with every field set, so that each of its leaves can be spoiled in turn.
BODIES = {
    "/v1/completions": {"model": "m", "prompt": "p", "max_tokens": 2, "temperature": 0.5, "top_p": 0.9, "n": 1,
                        "seed": 3, "alpha": 0.5, "stop": ["zz"], "user": "u", "stream": False,
                        "stream_options": {"include_usage": True}},
    "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hi", "name": "n"},
                                                        {"role": "user", "content": [{"type": "text", "text": "t"}]}],
                             "max_completion_tokens": 2, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": "zz"},
    "/v1/eval/score": {"model": "m", "language": "en", "shots": 0,
                       "items": [{"question": "q", "options": {"A": "x", "B": "y"}, "answer": "A", "context": "c",
                                  "source": "s", "id": "i", "language": "en"}]},
    "/v1/eval/jobs": {"benchmark": "b", "model": "m", "limit": 1},
}


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))
    else:
        yield path, obj


def _spoiled(body: dict, path: tuple, raw: str) -> str:
    """The body as JSON text with the leaf at ``path`` replaced by the raw JSON token ``raw``."""
    marker = "@@SPOILED@@"
    copy = json.loads(json.dumps(body))
    node = copy
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = marker
    return json.dumps(copy).replace(f'"{marker}"', raw)


def cases(model: str = "m"):
    """(route, spoiled path, JSON body text): every numeric leaf × NUMBERS, every text leaf × SURROGATES."""
    for route, body in BODIES.items():
        body = json.loads(json.dumps(body).replace('"m"', json.dumps(model)))
        for path, value in _leaves(body):
            if isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                yield from ((route, path, _spoiled(body, path, raw)) for raw in NUMBERS)
            elif isinstance(value, str):
                yield from ((route, path, _spoiled(body, path, json.dumps(value)[:-1] + s + '"'))
                            for s in SURROGATES)


def _strict_json(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token} in a response")
    return json.loads(text, parse_constant=refuse)


def _check_refused(route: str, path: tuple, r: httpx.Response) -> None:
    assert r.status_code == 422, (route, path, r.status_code, r.text[:300])
    body = _strict_json(r.text)  # encodable: the echoed input is made printable, never NaN or a raw surrogate
    r.content.decode("utf-8")
    error = body["error"]
    assert error["type"] == "invalid_request_error"
    # the offending field is named: the leaf itself, or the field that holds it (a list or dict checked whole);
    # pydantic names the branch of a union field it tried (``content.str``), which is no field of ours
    leaf = ".".join(str(p) for p in path)
    param = ".".join(s for s in error["param"].split(".") if not re.fullmatch(r"str|int|[a-z]+\[.*\]", s))
    assert leaf.startswith(param) or param.startswith(leaf), (leaf, error["param"])


# ------------------------------------------------------------------------------------------- in-process, no Ray
class _CountingBackend:
    """Answers at once; with ``fail``, raises it instead (a stream: after ``fail_at`` pieces)."""

    def __init__(self, fail: BaseException | None = None, fail_at: int = 0) -> None:
        self.calls, self.fail, self.fail_at = 0, fail, fail_at

    def model_names(self) -> list[str]:
        return ["m"]

    async def generate(self, model, request):
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return {"text": "ok", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1}

    async def stream(self, model, request):
        self.calls += 1
        pieces = [{"prompt_tokens": 1}, {"text": "ok"}, {"text": "ok"}, {"finish_reason": "stop",
                                                                          "completion_tokens": 2}]
        for i, piece in enumerate(pieces):
            if self.fail is not None and i == self.fail_at:
                raise self.fail
            yield piece

    async def score(self, model, items, language, shots):
        self.calls += 1
        return []

    async def submit_eval(self, model, benchmark, limit):
        self.calls += 1
        return {"id": "j", "benchmark": benchmark, "model": model, "status": "pending", "created": 0.0}

    async def eval_status(self, job_id):
        return None


def _api(backend):
    from apollo_ray.serve.api import ApiSettings, create_api

    return create_api(backend, ApiSettings(api_key=None, max_prompt_tokens=100, max_tokens=8, max_batch_items=8,
                                           max_concurrent_requests=8))


def test_non_finite_numbers_and_lone_surrogates_are_422s_naming_the_field():
    backend = _CountingBackend()
    todo = list(cases())
    assert len(todo) > 100

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_api(backend)), base_url="http://t",
                                     timeout=DEADLINE_S) as c:
            for route, path, text in todo:
                r = await c.post(route, content=text.encode(), headers={"Content-Type": "application/json"})
                _check_refused(route, path, r)
            assert backend.calls == 0  # nothing spoiled reached the model
            for route, body in BODIES.items():  # the unspoiled bodies get past validation
                r = await c.post(route, json=body)
                assert r.status_code in (200, 202), (route, r.text[:300])

    asyncio.run(main())
    assert backend.calls == len(BODIES)


def test_a_lost_replica_is_a_503_with_retry_after_and_a_bug_a_500_in_openai_form():
    from apollo_ray.serve.api import ServiceUnavailable

    body = {"model": "m", "prompt": "p", "max_tokens": 2}

    async def post(backend, **extra) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_api(backend), raise_app_exceptions=False),
                                     base_url="http://t", timeout=DEADLINE_S) as c:
            return await c.post("/v1/completions", json={**body, **extra})

    lost = ServiceUnavailable("'m' is unavailable; retry shortly", retry_after_s=5)
    for stream in (False, True):  # a stream that fails before its first byte is answered like any request
        r = asyncio.run(post(_CountingBackend(fail=lost), stream=stream))
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        assert _strict_json(r.text)["error"] == {"message": "'m' is unavailable; retry shortly",
                                                 "type": "server_error", "param": None, "code": "model_unavailable"}
    r = asyncio.run(post(_CountingBackend(fail=lost, fail_at=2), stream=True))  # after the first bytes: in the stream
    events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert _strict_json(events[-2])["error"]["code"] == "model_unavailable"

    r = asyncio.run(post(_CountingBackend(fail=RuntimeError("bug"))))
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert _strict_json(r.text)["error"]["type"] == "server_error"


def test_the_ingress_turns_a_dead_replica_into_service_unavailable():
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    from apollo_ray.serve.api import ServiceUnavailable
    from apollo_ray.serve.app import RETRY_AFTER_S, _unwrapped

    async def died():
        raise ActorDiedError()

    async def full():
        raise BackPressureError(num_queued_requests=3, max_queued_requests=3)

    async def refused():
        return {"refused": {"param": "prompt", "message": "too long", "status": 400}}

    for call in (died, full):
        with pytest.raises(ServiceUnavailable) as info:
            asyncio.run(_unwrapped(call(), "apollo"))
        assert info.value.retry_after_s == RETRY_AFTER_S and "'apollo'" in info.value.message
    from apollo_ray.serve.engine import RequestError
    with pytest.raises(RequestError):
        asyncio.run(_unwrapped(refused(), "apollo"))


# ------------------------------------------------------------------------------------------------------ live Serve
KEY_ENV = "APOLLO_TEST_ROBUST_KEY"
KEY = "robust-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = 1500  # tokens: a request this long is still decoding when the test kills its replica


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import ray
    from ray import serve
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from apollo_ray.model.tiny import ensure_base
    from apollo_ray.serve import app
    from apollo_ray.storage import Storage

    root = tmp_path_factory.mktemp("robust")
    cfg0 = config_mod.resolve({}, [f"storage.root={root / 'store'}"])
    tiny = ensure_base(cfg0, Storage.from_config(cfg0), root / "tiny")
    model = AutoModelForCausalLM.from_pretrained(tiny)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # perturbed, so that greedy text varies rather than repeating one token
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(tiny).save_pretrained(root / "model")

    os.environ[KEY_ENV] = KEY
    cfg = config_mod.resolve({}, [
        f"storage.root={root / 'store'}", f"serve.model={root / 'model'}", f"serve.port={_free_port()}",
        f"serve.api_key_env={KEY_ENV}", f"serve.max_tokens={LONG}", "serve.max_prompt_tokens=200",
        "resources.cpus_per_worker=1"])
    ray.init(num_cpus=3, include_dashboard=False, logging_level="WARNING")
    try:
        yield app.run(cfg, block=False), cfg
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(KEY_ENV, None)


@pytest.mark.slow
def test_live_server_answers_non_finite_numbers_and_lone_surrogates_without_5xx(server):
    from ray import serve

    from apollo_ray.serve.api import GenerateRequest
    from apollo_ray.serve.engine import Sampling

    url, cfg = server
    todo = list(cases(cfg.serve.model_name))
    codes = []
    with httpx.Client(base_url=url, headers=AUTH, timeout=DEADLINE_S) as c:
        for route, path, text in todo:
            r = c.post(route, content=text.encode(), headers={"Content-Type": "application/json"})
            codes.append(r.status_code)
            _check_refused(route, path, r)
    assert [c for c in codes if c >= 500] == []
    # Past the API (a client of the deployment handle): the replica refuses the text instead of failing on it
    handle = serve.get_deployment_handle(cfg.serve.model_name, app_name=cfg.serve.model_name)
    for text in ("\ud800", "ok \udfff"):
        reply = handle.generate.remote(GenerateRequest(Sampling(max_tokens=2), prompt=text)).result()
        assert reply["refused"]["param"] == "prompt" and reply["refused"]["status"] == 400
        reply = handle.generate.remote(GenerateRequest(Sampling(max_tokens=2),
                                                       messages=({"role": "user", "content": text},))).result()
        assert reply["refused"]["param"] == "messages"


@pytest.mark.slow
def test_requests_on_a_killed_replica_get_503_with_retry_after_and_the_next_ones_succeed(server):
    import ray
    from ray import serve

    url, cfg = server
    name = cfg.serve.model_name
    handle = serve.get_deployment_handle(name, app_name=name)
    body = {"model": name, "prompt": "Deficiency of which vitamin causes scurvy?", "max_tokens": LONG,
            "temperature": 0}

    async def main() -> tuple[list[httpx.Response], list[str]]:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=DEADLINE_S) as c:
            plain = [asyncio.create_task(c.post("/v1/completions", json=body)) for _ in range(3)]
            events: list[str] = []
            async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
                lines = s.aiter_lines()
                while not (line := await anext(lines)).startswith("data: "):
                    pass
                events.append(line)  # the stream is on the replica: it has sent a token
                deadline = time.time() + DEADLINE_S
                while await handle.in_flight.remote() < 4:  # the three others are on it too
                    assert time.time() < deadline, "the requests never all reached the replica"
                    await asyncio.sleep(0.05)
                replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                            if a["name"].startswith(f"SERVE_REPLICA::{name}#{name}#")]
                assert len(replicas) == 1, replicas
                ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
                async for line in lines:
                    if line.startswith("data: "):
                        events.append(line)
            return list(await asyncio.gather(*plain)), events

    responses, events = asyncio.run(main())
    for r in responses:
        assert r.status_code == 503, (r.status_code, r.text[:300])
        assert r.headers["retry-after"].isdigit() and r.headers["content-type"] == "application/json"
        error = _strict_json(r.text)["error"]
        assert (error["type"], error["code"]) == ("server_error", "model_unavailable")
    assert events[-1] == "data: [DONE]"
    assert _strict_json(events[-2].removeprefix("data: "))["error"]["code"] == "model_unavailable"

    deadline = time.time() + DEADLINE_S  # Serve starts a replacement replica; it answers once loaded
    with httpx.Client(base_url=url, headers=AUTH, timeout=DEADLINE_S) as c:
        while True:
            r = c.post("/v1/completions", json={**body, "max_tokens": 2})
            if r.status_code == 200:
                break
            assert r.status_code == 503 and time.time() < deadline, (r.status_code, r.text[:300])
            time.sleep(1)
    assert r.json()["usage"]["completion_tokens"] == 2
