"""The HTTP face of the Serve app: OpenAI-compatible routes plus evaluation routes, as a FastAPI app.

``create_api(backend, settings)`` builds the app around a ``Backend`` (the Serve ingress deployment adapts its
DeploymentHandles to it), so routes, validation, auth and admission control are plain FastAPI and testable without Ray.

- ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` answers with
  server-sent events, ``data: {...}\\n\\n`` and a final ``data: [DONE]``); ``alpha`` is an extension field for
  proxy-tuned models.
- ``POST /v1/eval/score``: XMedBench items → predicted letter and per-option log-likelihoods.
- ``POST /v1/eval/jobs`` / ``GET /v1/eval/jobs/{id}``: a benchmark of the config evaluated asynchronously.

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 422 for schema violations (every
offending field named; non-finite numbers such as ``1e999``, ``NaN`` or ``Infinity`` and text with lone surrogates
included), 400 for limits and values the model cannot serve, 401 without the bearer key (when one is configured), 404
for unknown models, benchmarks and jobs, 429 past the concurrency limit, 503 with ``Retry-After`` when the model's
replica went away under a request (Serve starts another), 500 for anything else — always as that JSON body.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Literal, Protocol, Union

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from apollo_ray.serve.engine import RequestError, Sampling

log = logging.getLogger(__name__)

INT64 = 2 ** 63
# A token of a byte-level BPE is rarely over a few dozen characters: a prompt this many times longer than the token
# limit cannot fit, and is refused before it costs a tokenization.
MAX_CHARS_PER_TOKEN = 64


# ------------------------------------------------------------------------------------------------- request models
_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode_text(value: Any) -> Any:
    """Refuse strings with lone surrogates (JSON's ``"\\ud800"``): they are not text, no tokenizer can encode them,
    and no response can echo them."""
    strings = [value] if isinstance(value, str) else (
        [*value.keys(), *value.values()] if isinstance(value, dict) else value if isinstance(value, list) else [])
    for v in strings:
        if isinstance(v, str) and _SURROGATE.search(v):
            raise ValueError("not valid Unicode text: contains a lone surrogate (\\ud800-\\udfff)")
        if isinstance(v, (list, dict)):
            _unicode_text(v)
    return value


class _Request(BaseModel):
    # Unknown parameters are refused (naming them) rather than ignored: a client asking for, say, a presence penalty
    # must not silently get answers without one. Numbers must be finite: JSON's 1e999 parses to inf, and Python's
    # parser takes NaN / Infinity too.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    _text = field_validator("*")(_unicode_text)


class StreamOptions(_Request):
    include_usage: bool = False


Stop = Union[str, list[str], None]
_STOP = Field(None, description="up to 4 sequences; the text stops before the first one generated")


class _Sampled(_Request):
    model: str = Field(description="a name listed by /v1/models")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = _STOP
    seed: int | None = Field(None, ge=-INT64, lt=INT64, description="makes sampling (temperature > 0) reproducible")
    user: str | None = Field(None, max_length=256)
    alpha: float | None = Field(None, ge=-100, le=100,
                                description="proxy-tuned models only: the weight of (expert − anti-expert)")


class CompletionRequest(_Sampled):
    prompt: Union[str, list[str]]
    max_tokens: int | None = Field(16, ge=1, description="null: as many as the limit and the context allow")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="default: as many as the limit and the context allow")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")


class MCQItem(BaseModel):
    """An XMedBench item; fields other than these (ids, metadata) are ignored."""
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    _text = field_validator("*")(_unicode_text)
    question: str
    options: Union[str, list[str], dict[str, str]] = Field(description='"(A) ...\\n(B) ...", a list or a dict')
    answer: Union[str, int, None] = Field(None, description='"(B)", "B" or a 0-based index; optional')
    source: str | None = None
    context: str | None = None
    language: str | None = None
    id: str | None = Field(None, max_length=256)


class ScoreRequest(_Request):
    model: str | None = Field(None, description="default: the first model listed by /v1/models")
    items: list[MCQItem] = Field(min_length=1)
    language: str = Field("en", description="language of items that do not name one")
    shots: int = Field(0, ge=0, le=5, description="solved examples per prompt, drawn from this request's items")


MAX_JOB_LIMIT = 10_000  # items per benchmark file an evaluation job may ask for


class EvalJobRequest(_Request):
    benchmark: str = Field(description="a name in the config's eval.benchmarks")
    model: str | None = Field(None, description="default: the first model listed by /v1/models")
    # Bounded, and a job with its own limit is scored in the app, never written to a new eval/ folder: otherwise every
    # distinct value a client sends would leave a folder behind.
    limit: int | None = Field(None, ge=1, le=MAX_JOB_LIMIT,
                              description="items per benchmark file (default: eval.limit)")


# ------------------------------------------------------------------------------------------------ response models
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "apollo-ray"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ItemScore(BaseModel):
    id: str
    predicted: str
    letters: list[str]
    loglik: dict[str, float] = Field(description="sum log-probability of each option's answer label")
    mean_loglik: dict[str, float] = Field(description="the same per label token")
    answer: str | None = None
    correct: bool | None = None


class ScoreResponse(BaseModel):
    model: str
    results: list[ItemScore]
    accuracy: float | None = Field(None, description="over the items that carry an answer")


class EvalJob(BaseModel):
    id: str
    object: Literal["eval.job"] = "eval.job"
    benchmark: str
    model: str
    status: Literal["pending", "running", "succeeded", "failed"]
    created: float
    started: float | None = None
    finished: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# --------------------------------------------------------------------------------------------------------- backend
@dataclass(frozen=True)
class GenerateRequest:
    """What a model deployment needs for one answer (one choice of one prompt)."""
    sampling: Sampling
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    max_tokens_given: bool = True  # False: fill the room the context leaves, up to sampling.max_tokens
    alpha: float | None = None


class Backend(Protocol):
    def model_names(self) -> list[str]: ...

    async def generate(self, model: str, request: GenerateRequest) -> dict[str, Any]:
        """{"text", "finish_reason", "prompt_tokens", "completion_tokens"}; RequestError for a bad request."""

    def stream(self, model: str, request: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        """{"prompt_tokens"} first (so that a bad request fails before any byte is sent), then {"text"} pieces, then
        {"finish_reason", "completion_tokens"}."""

    async def score(self, model: str, items: list[dict[str, Any]], language: str, shots: int) -> list[dict[str, Any]]:
        """One ItemScore dict per item."""

    async def submit_eval(self, model: str, benchmark: str, limit: int | None) -> dict[str, Any]: ...

    async def eval_status(self, job_id: str) -> dict[str, Any] | None: ...


class ServiceUnavailable(Exception):
    """The model could not answer for now (its replica died under the request, or Serve has none ready): 503 with
    ``Retry-After``. The backend raises it; the client should retry."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.message, self.retry_after_s = message, retry_after_s


@dataclass(frozen=True)
class ApiSettings:
    api_key: str | None
    max_prompt_tokens: int
    max_tokens: int
    max_batch_items: int
    max_concurrent_requests: int


# ------------------------------------------------------------------------------------------------------ middleware
class Guard:
    """Bearer-key auth and admission control for every route, as plain ASGI so that a streamed answer holds its
    admission slot until its last byte (an HTTP middleware would release it when the headers go out)."""

    def __init__(self, app: Any, api_key: str | None, max_concurrent: int):
        self.app, self.max_concurrent = app, max_concurrent
        self.key = api_key.encode() if api_key else None
        self.in_flight = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.key is not None and not self._authorized(scope):
            return await _error(401, "missing or wrong API key (Authorization: Bearer <key>)", "authentication_error",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if self.in_flight >= self.max_concurrent:
            return await _error(429, f"more than {self.max_concurrent} concurrent requests; retry shortly",
                                "rate_limit_error", headers={"Retry-After": "1"})(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _authorized(self, scope: dict) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                # constant-time comparison: response timing must not reveal how much of a guessed key was right
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False


def _error(status: int, message: str, kind: str = "invalid_request_error", *, param: str | None = None,
           code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(_encodable(body), status_code=status, headers=headers)


def _encodable(obj: Any) -> Any:
    """``obj`` with what JSON cannot carry made printable: non-finite floats as "NaN" / "Infinity" / "-Infinity",
    lone surrogates as ``\\udXXX`` escapes. An error that echoes the client's input must not fail to encode it."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, str):
        return obj.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(obj, dict):
        return {_encodable(k): _encodable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encodable(v) for v in obj]
    return obj


_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 422, 429, 500, 503)}


# ------------------------------------------------------------------------------------------------------------ app
def create_api(backend: Backend, settings: ApiSettings) -> FastAPI:
    app = FastAPI(title="apollo-ray", version="1", description=__doc__, responses=_ERRORS)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        fields = [".".join(str(x) for x in e["loc"] if x != "body") or "body" for e in errors]
        message = "; ".join(f"{f}: {e['msg']}" for f, e in zip(fields, errors))
        return JSONResponse(_encodable({"error": {"message": message, "type": "invalid_request_error",
                                                  "param": fields[0] if fields else None, "code": None},
                                        "detail": jsonable_encoder(errors)}), status_code=422)

    @app.exception_handler(RequestError)
    async def _bad(_: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, f"{exc.param}: {exc.message}", param=exc.param,
                      code="model_not_found" if exc.status == 404 and exc.param == "model" else None)

    @app.exception_handler(ServiceUnavailable)
    async def _unavailable(_: Request, exc: ServiceUnavailable) -> JSONResponse:
        return _error(503, exc.message, "server_error", code="model_unavailable",
                      headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        # Starlette would answer a bare "Internal Server Error" in text/plain; clients parse OpenAI's body
        log.error("request failed", exc_info=exc)
        return _error(500, "internal server error", "server_error")

    def check_model(name: str | None) -> str:
        names = backend.model_names()
        if name is None:
            return names[0]
        if name not in names:
            raise RequestError("model", f"the model {name!r} does not exist; served: {', '.join(names)}", 404)
        return name

    def check_sampling(req: _Sampled, n_prompts: int, max_tokens: int | None, prompt_chars: int) -> Sampling:
        if max_tokens is not None and max_tokens > settings.max_tokens:
            raise RequestError("max_tokens", f"{max_tokens} is over this server's limit of {settings.max_tokens}")
        if n_prompts * req.n > settings.max_batch_items:
            raise RequestError("n", f"{n_prompts} prompts × n={req.n} choices is over this server's limit of "
                                    f"{settings.max_batch_items} per request")
        if prompt_chars > settings.max_prompt_tokens * MAX_CHARS_PER_TOKEN:
            raise RequestError("prompt", f"{prompt_chars} characters cannot fit the limit of "
                                         f"{settings.max_prompt_tokens} prompt tokens")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s or len(s) > 256 for s in stop):
            raise RequestError("stop", "up to 4 stop sequences of 1 to 256 characters")
        return Sampling(max_tokens=max_tokens or settings.max_tokens, temperature=req.temperature, top_p=req.top_p,
                        seed=req.seed, stop=tuple(stop))

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=n, created=_STARTED) for n in backend.model_names()])

    @app.post("/v1/completions", response_model=CompletionResponse,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def completions(req: CompletionRequest):
        model = check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise RequestError("prompt", "no prompt given")
        sampling = check_sampling(req, len(prompts), req.max_tokens, max(map(len, prompts)))
        jobs = [GenerateRequest(sampling=_seeded(sampling, k), prompt=p, alpha=req.alpha,
                                max_tokens_given=req.max_tokens is not None) for p in prompts for k in range(req.n)]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return await _sse(backend, model, jobs, req.n, lambda i, text, finish: {
                "id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}]},
                rid, created, "text_completion", req.stream_options)
        results = await _gather(backend, model, jobs)
        return CompletionResponse(id=rid, created=created, model=model, usage=_usage(results, req.n), choices=[
            CompletionChoice(index=i, text=r["text"], finish_reason=r["finish_reason"]) for i, r in enumerate(results)])

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(req: ChatCompletionRequest):
        model = check_model(req.model)
        messages = tuple({"role": m.role, "content": m.text()} for m in req.messages)
        max_tokens = req.max_completion_tokens or req.max_tokens
        sampling = check_sampling(req, 1, max_tokens, sum(len(m["content"]) for m in messages))
        jobs = [GenerateRequest(sampling=_seeded(sampling, k), messages=messages, alpha=req.alpha,
                                max_tokens_given=max_tokens is not None) for k in range(req.n)]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            def chunk(i: int, text: str | None, finish: str | None) -> dict:
                # the first chunk of a choice announces the role, later ones carry content, the last an empty delta
                delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return await _sse(backend, model, jobs, req.n, chunk, rid, created, "chat.completion.chunk",
                              req.stream_options, announce=True)
        results = await _gather(backend, model, jobs)
        return ChatCompletionResponse(id=rid, created=created, model=model, usage=_usage(results, req.n), choices=[
            ChatChoice(index=i, message=AssistantMessage(content=r["text"]), finish_reason=r["finish_reason"])
            for i, r in enumerate(results)])

    @app.post("/v1/eval/score", response_model=ScoreResponse)
    async def eval_score(req: ScoreRequest) -> ScoreResponse:
        model = check_model(req.model)
        if len(req.items) > settings.max_batch_items:
            raise RequestError("items", f"{len(req.items)} items is over this server's limit of "
                                        f"{settings.max_batch_items} per request")
        chars = max(len(it.question) + len(json.dumps(it.options)) + len(it.context or "") for it in req.items)
        if chars * (req.shots + 1) > settings.max_prompt_tokens * MAX_CHARS_PER_TOKEN:
            raise RequestError("items", f"an item of {chars} characters cannot fit the limit of "
                                        f"{settings.max_prompt_tokens} prompt tokens")
        scored = await backend.score(model, [it.model_dump() for it in req.items], req.language, req.shots)
        results = [ItemScore(**s) for s in scored]
        judged = [r.correct for r in results if r.correct is not None]
        return ScoreResponse(model=model, results=results, accuracy=sum(judged) / len(judged) if judged else None)

    @app.post("/v1/eval/jobs", response_model=EvalJob, status_code=202)
    async def eval_submit(req: EvalJobRequest) -> EvalJob:
        return EvalJob(**await backend.submit_eval(check_model(req.model), req.benchmark, req.limit))

    @app.get("/v1/eval/jobs/{job_id}", response_model=EvalJob)
    async def eval_get(job_id: str) -> EvalJob:
        job = await backend.eval_status(job_id)
        if job is None:
            raise RequestError("job_id", f"no evaluation job {job_id!r}", 404)
        return EvalJob(**job)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _with_limits(FastAPI.openapi(app), backend.model_names(), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(Guard, api_key=settings.api_key, max_concurrent=settings.max_concurrent_requests)
    return app


def _with_limits(schema: dict[str, Any], models: list[str], settings: ApiSettings) -> dict[str, Any]:
    """The schema with this server's model names and limits: clients (and schemathesis) see what will be accepted
    instead of learning it from 400s."""
    comps = schema["components"]["schemas"]

    def constrain(prop: dict[str, Any], **keywords: Any) -> None:
        for branch in prop.get("anyOf", [prop]):
            if branch.get("type") != "null":
                branch.update(keywords)

    for name in ("CompletionRequest", "ChatCompletionRequest", "ScoreRequest", "EvalJobRequest"):
        constrain(comps[name]["properties"]["model"], enum=list(models))
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        for key in ("max_tokens", "max_completion_tokens"):
            if key in comps[name]["properties"]:
                constrain(comps[name]["properties"][key], maximum=settings.max_tokens)
    for branch in comps["CompletionRequest"]["properties"]["prompt"].get("anyOf", []):
        if branch.get("type") == "array":
            branch["maxItems"] = settings.max_batch_items
    comps["ScoreRequest"]["properties"]["items"]["maxItems"] = settings.max_batch_items
    return schema


_STARTED = int(time.time())


def _seeded(sampling: Sampling, k: int) -> Sampling:
    """Choice k of n: its own seed, so that n seeded choices differ from each other but not between calls."""
    if k == 0 or sampling.seed is None:
        return sampling
    return Sampling(sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.seed + k, sampling.stop)


def _usage(results: list[dict], n: int) -> Usage:
    # the prompt is processed once per choice, but billed (as by OpenAI) once per prompt
    prompt = sum(r["prompt_tokens"] for r in results[::n])
    completion = sum(r["completion_tokens"] for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _gather(backend: Backend, model: str, jobs: list[GenerateRequest]) -> list[dict]:
    import asyncio

    return list(await asyncio.gather(*(backend.generate(model, j) for j in jobs)))


async def _sse(backend: Backend, model: str, jobs: list[GenerateRequest], n: int, chunk: Any, rid: str, created: int,
               obj: str, options: StreamOptions | None, *, announce: bool = False) -> StreamingResponse:
    """Stream the choices one after the other. The first choice is started before the response is: a request the
    model refuses (prompt too long, ...) gets its 400 instead of a 200 stream that carries an error."""
    first = backend.stream(model, jobs[0])
    try:
        head = await first.__anext__()
    except BaseException:
        await _close(first)
        raise

    async def events() -> AsyncIterator[str]:
        prompt_tokens = completion_tokens = 0
        try:
            for i, job in enumerate(jobs):
                stream = first if i == 0 else backend.stream(model, job)
                try:
                    info = head if i == 0 else await stream.__anext__()
                    if i % n == 0:  # billed once per prompt, as in _usage
                        prompt_tokens += info["prompt_tokens"]
                    if announce:
                        yield _data(chunk(i, None, None))
                    async for piece in stream:
                        if "text" in piece:
                            yield _data(chunk(i, piece["text"], None))
                        else:
                            completion_tokens += piece["completion_tokens"]
                            yield _data(chunk(i, "", piece["finish_reason"]))
                finally:
                    await _close(stream)
            if options is not None and options.include_usage:
                yield _data({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                       "total_tokens": prompt_tokens + completion_tokens}})
        except RequestError as e:  # a later choice refused: the stream has started, so say it in the stream
            yield _data({"error": {"message": f"{e.param}: {e.message}", "type": "invalid_request_error",
                                   "param": e.param, "code": None}})
        except ServiceUnavailable as e:
            yield _data({"error": {"message": e.message, "type": "server_error", "param": None,
                                   "code": "model_unavailable"}})
        except Exception:
            log.exception("stream failed")
            yield _data({"error": {"message": "internal error while streaming", "type": "server_error",
                                   "param": None, "code": None}})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _data(obj: dict) -> str:
    return f"data: {json.dumps(_encodable(obj), ensure_ascii=False)}\n\n"


async def _close(stream: Any) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
