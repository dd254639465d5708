"""The Ray Serve app: ``apollo-ray serve``, ``serve run/deploy apollo_ray.serve.app:build_app`` and RayService.

Deployments (Ray's Serve example shape: a FastAPI ingress apart from the models, calls through DeploymentHandles):

- ``Ingress``: the OpenAI-compatible HTTP API of ``api.py`` (validation, auth, admission control); no model.
- one ``ModelServer`` per served model, named after it: ``serve.model_name`` for a checkpoint (dense or Post-MoE,
  default: this run's trained model) and ``<model_name>-proxy`` for the proxy-tuned trio of ``serve.proxy``. A
  replica loads its weights once and decodes its requests as one continuously batched set (see ``engine.Decoder``).
- ``EvalJobs``: one replica holding the table of asynchronous benchmark evaluations.

Sizing comes from the config: ``serve.replicas`` replicas of the ingress and of each model (or an
``autoscaling_config`` given in the app's args), each model replica with ``resources.cpus_per_worker`` CPUs and, with
``resources.use_gpu``, ``resources.gpus_per_worker`` GPUs. ``serve_config(cfg)`` writes the same thing as a Serve
config file for ``serve deploy`` (``apollo-ray serve --write-config serve.yaml``), whose ``deployments:`` entries are
where an operator tunes replicas without touching code.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator

import yaml
from ray import serve
from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from apollo_ray import config as config_mod
from apollo_ray.config import Config, ConfigError
from apollo_ray.evaluation.benchmark import Item, ItemError, load_benchmark, load_shot_pool, parse_item
from apollo_ray.serve.api import ApiSettings, GenerateRequest, ServiceUnavailable, create_api
from apollo_ray.serve.engine import RequestError, Sampling

log = logging.getLogger(__name__)

IMPORT_PATH = "apollo_ray.serve.app:build_app"
INGRESS, EVAL_JOBS = "Ingress", "EvalJobs"
# Requests over the admission limit must reach the ingress to get their 429; with Serve's own limit at exactly the
# admission limit they would wait unseen in the proxy's queue instead.
INGRESS_HEADROOM = 64
MAX_PENDING_JOBS = 64
KEPT_JOBS = 1000


# ------------------------------------------------------------------------------------------------------ model specs
@dataclass(frozen=True)
class ModelSpec:
    """Everything a ModelServer replica needs; built from the config on the driver, pickled into the app."""
    name: str
    checkpoint: str | None = None  # one model ...
    proxy: dict[str, str] | None = None  # ... or base / expert / anti_expert
    alpha: float = 1.0
    dtype: str = "float32"
    use_gpu: bool = False
    threads: int = 1
    endpoint_url: str | None = None
    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    seed: int = 1234  # shot selection of /v1/eval/score
    batch_rows: int = 32  # option rows per scoring forward
    max_batch_size: int = 64  # requests one replica decodes together; more wait for a row
    max_prefill_tokens: int = 4096  # padded prompt tokens one decode step prefills

    @property
    def tokenizer_source(self) -> str:
        return self.checkpoint if self.proxy is None else self.proxy["base"]


def model_specs(cfg: Config) -> dict[str, ModelSpec]:
    """The served models by name: the checkpoint (when set, or when there is no proxy: this run's trained model)
    and the proxy-tuned trio (when ``serve.proxy`` is set)."""
    s, r = cfg.serve, cfg.resources
    common = dict(dtype=cfg.model.dtype, use_gpu=r.use_gpu, threads=max(1, int(r.cpus_per_worker)),
                  endpoint_url=cfg.storage.endpoint_url, max_prompt_tokens=s.max_prompt_tokens,
                  max_tokens=s.max_tokens, seed=cfg.eval.seed, batch_rows=4 * cfg.eval.batch_size,
                  max_batch_size=s.max_batch_size, max_prefill_tokens=s.max_prefill_tokens)
    specs: dict[str, ModelSpec] = {}
    if s.model or not s.proxy:
        path = s.model or cfg.uri("models", cfg.train.run_name)
        _check_exists(path, "serve.model" if s.model else f"serve.model (default: the trained model {path})")
        specs[s.model_name] = ModelSpec(name=s.model_name, checkpoint=path, **common)
    if s.proxy:
        trio = {"base": s.proxy.base, "expert": s.proxy.expert, "anti_expert": s.proxy.anti_expert}
        for k, path in trio.items():
            _check_exists(path, f"serve.proxy.{k}")
        name = f"{s.model_name}-proxy"
        specs[name] = ModelSpec(name=name, proxy=trio, alpha=s.proxy.alpha, **common)
    return specs


def _check_exists(path: str, key: str) -> None:
    """Fail on the driver, naming the key, rather than in a replica that Serve then restarts forever."""
    if "://" in path and not path.startswith("file://"):
        return  # remote: checked by the replica that has the credentials
    local = path.removeprefix("file://")
    # a hub id is "org/name": anything else that does not exist here is a missing local checkpoint
    if not Path(local).expanduser().exists() and (local.startswith((".", "/", "~")) or local.count("/") > 1):
        raise ConfigError(f"{key} = {path!r}: no such checkpoint (train one first, or point it at a checkpoint or "
                          f"hub id)")


# ---------------------------------------------------------------------------------------------------- model server
@serve.deployment
class ModelServer:
    """One served model (a checkpoint, or the proxy-tuned trio as one ``ProxyLM``), loaded once per replica.

    Continuous batching: every active request of the replica is a row of one ``engine.Decoder``, and one decode loop
    advances them all a token per step, one hop to the replica's torch thread per step (not per request and token).
    A request joins the batch at the next step after it arrives and leaves at its last token; its tokens reach its
    ``stream`` through an asyncio queue (``generate`` is woken once, at its end). Torch work stays on that one thread
    so the event loop is free for Serve's control calls; prompts are tokenized on a second thread so that they do not
    queue behind decode steps.
    """

    def __init__(self, spec: ModelSpec):
        import torch

        from apollo_ray.serve.engine import Decoder, context_length, eos_ids, load_checkpoint

        torch.set_num_threads(spec.threads)  # the CPUs this replica reserved, not every core of the node
        self.spec = spec
        self.device = "cuda" if spec.use_gpu and torch.cuda.is_available() else "cpu"
        load = dict(dtype=spec.dtype, device=self.device, endpoint_url=spec.endpoint_url)
        if spec.proxy is None:
            self.lm, self.tokenizer = load_checkpoint(spec.checkpoint, **load)
        else:
            from apollo_ray.serve.proxy import ProxyLM, check_models

            loaded = {k: load_checkpoint(path, **load) for k, path in spec.proxy.items()}
            check_models(spec.proxy, {k: t for k, (_, t) in loaded.items()}, {k: m for k, (m, _) in loaded.items()})
            self.lm = ProxyLM(*(loaded[k][0] for k in ("base", "expert", "anti_expert")), alpha=spec.alpha)
            self.tokenizer = loaded["base"][1]
        self.context = context_length(self.lm)
        self.stop_ids = eos_ids(self.lm, self.tokenizer)
        self.decoder = Decoder(self.lm, self.device, max_batch_size=spec.max_batch_size,
                               max_prefill_tokens=spec.max_prefill_tokens)
        # A full garbage collection walks every object the imports and the load left behind (~0.5 s on a 2-core CPU
        # with transformers loaded), stalling every request of the replica; frozen, they are never walked again.
        gc.collect()
        gc.freeze()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"{spec.name}-torch")
        self._prep = ThreadPoolExecutor(1, thread_name_prefix=f"{spec.name}-tokenize")
        self._sinks: dict[Any, Any] = {}  # generation → what takes its steps (a stream's queue, generate's future)
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.Task | None = None
        log.info("%s ready on %s (context %d)", spec.name, self.device, self.context)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _prompt_ids(self, req: GenerateRequest) -> tuple[list[int], str]:
        from apollo_ray.serve.engine import chat_prompt_ids, check_text, completion_prompt_ids

        if req.messages is not None:
            check_text("messages", *(m["content"] for m in req.messages))
            return chat_prompt_ids(self.tokenizer, req.messages), "messages"
        check_text("prompt", req.prompt or "")
        return completion_prompt_ids(self.tokenizer, req.prompt or ""), "prompt"

    async def _start(self, req: GenerateRequest) -> Any:
        from apollo_ray.serve.engine import Generation

        if req.alpha is not None and self.spec.proxy is None:
            raise RequestError("alpha", f"{self.spec.name!r} is not proxy-tuned; alpha applies to proxy models only")
        ids, field_name = await asyncio.get_running_loop().run_in_executor(self._prep, self._prompt_ids, req)
        if len(ids) > self.spec.max_prompt_tokens:
            raise RequestError(field_name, f"{len(ids)} prompt tokens is over this server's limit of "
                                           f"{self.spec.max_prompt_tokens}")
        room = self.context - len(ids)
        sampling = req.sampling
        if room < 1 or (req.max_tokens_given and sampling.max_tokens > room):
            raise RequestError("max_tokens", f"{len(ids)} prompt tokens + max_tokens={sampling.max_tokens} is over "
                                             f"the model's context of {self.context} tokens")
        sampling = replace(sampling, max_tokens=min(sampling.max_tokens, room))
        return Generation(self.tokenizer, ids, sampling, self.stop_ids, alpha=req.alpha)

    async def stream(self, req: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        """{"prompt_tokens"} (or {"refused"}), then {"text"} pieces, then {"finish_reason", "completion_tokens"}."""
        try:
            gen = await self._start(req)
        except RequestError as e:
            yield e.as_reply()
            return
        yield {"prompt_tokens": len(gen.prompt_ids)}
        queue: asyncio.Queue = asyncio.Queue()
        try:
            self._decode(gen, queue.put_nowait)
            while True:
                step = await queue.get()
                if isinstance(step, BaseException):
                    raise step
                if step.text:
                    yield {"text": step.text}
                if step.finish_reason:
                    yield {"finish_reason": step.finish_reason, "completion_tokens": gen.completion_tokens}
                    return
        finally:
            self._forget(gen)

    async def generate(self, req: GenerateRequest) -> dict[str, Any]:
        """The whole answer at once: {"text", "finish_reason", "prompt_tokens", "completion_tokens"} (or
        {"refused"}). Unlike ``stream`` it is woken once, at the end, not at every token."""
        try:
            gen = await self._start(req)
        except RequestError as e:
            return e.as_reply()
        done: asyncio.Future = asyncio.get_running_loop().create_future()

        def on_step(step: Any) -> None:
            if done.done():
                return
            if isinstance(step, BaseException):
                done.set_exception(step)
            elif step.finish_reason:
                done.set_result(None)

        try:
            self._decode(gen, on_step)
            await done
        finally:
            self._forget(gen)
        return {"text": gen.text, "finish_reason": gen.finish_reason, "prompt_tokens": len(gen.prompt_ids),
                "completion_tokens": gen.completion_tokens}

    def _decode(self, gen: Any, on_step: Any) -> None:
        """Hand ``gen`` to the decoder; ``on_step`` gets each of its steps on this event loop (or the exception that
        lost it)."""
        self._sinks[gen] = on_step
        self.decoder.submit(gen)
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._loop is None or self._loop.done():
            self._loop = asyncio.create_task(self._decode_loop())

    def _forget(self, gen: Any) -> None:
        gen.cancel()  # a no-op when it has finished; else (the client went away) it leaves at the next step
        self._sinks.pop(gen, None)

    async def _decode_loop(self) -> None:
        """Step the decoder while it has work, one torch-thread hop per step; sleep when it has none."""
        from apollo_ray.serve.engine import BatchFailed

        while True:
            if self.decoder.idle:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                steps = await self._run(self.decoder.step)
            except BatchFailed as e:
                log.error("%s: a decode step failed; failing its %d requests", self.spec.name, len(e.generations),
                          exc_info=e.__cause__)
                for gen in e.generations:
                    if gen in self._sinks:
                        self._sinks[gen](RuntimeError(f"decoding failed: {e.__cause__!r}"))
                continue
            for gen, step in steps:
                sink = self._sinks.get(gen)
                if sink is not None:
                    sink(step)

    def in_flight(self) -> int:
        """Requests this replica is decoding or has waiting for a row."""
        return len(self._sinks)

    async def score(self, items: list[Item], shot_pool: list[Item], shots: int) -> list[dict[str, Any]] | dict:
        """Option log-likelihoods of request items, k-shot prompts drawn from ``shot_pool``."""
        from apollo_ray.evaluation.prompts import PromptTooLong, ShotPool, build_prompt

        def prompts() -> list[str]:
            pool = ShotPool(shot_pool)
            out = []
            for i, it in enumerate(items):
                try:
                    out.append(build_prompt(it, pool, shots, self.spec.seed, self.tokenizer,
                                            max_tokens=self.spec.max_prompt_tokens))
                except PromptTooLong as e:
                    raise RequestError(f"items[{i}]", str(e)) from None
            return out

        try:
            texts = await self._run(prompts)
        except RequestError as e:
            return e.as_reply()
        return await self.score_prompts(texts, items)

    async def score_prompts(self, prompts: list[str], items: list[Item]) -> list[dict[str, Any]]:
        from apollo_ray.evaluation.scoring import score_options

        scores = await self._run(lambda: score_options(self.lm, self.tokenizer, prompts, items, self.device,
                                                       batch_rows=self.spec.batch_rows))
        return [{"id": it.id, "predicted": s.predicted, "letters": list(s.letters),
                 "loglik": dict(zip(s.letters, s.sums)), "mean_loglik": dict(zip(s.letters, s.means))}
                for it, s in zip(items, scores)]


# --------------------------------------------------------------------------------------------------------- eval jobs
@dataclass
class _Job:
    id: str
    benchmark: str
    model: str
    limit: int | None
    status: str = "pending"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None

    def view(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("id", "benchmark", "model", "status", "created", "started", "finished",
                                              "result", "error")}


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class EvalJobs:
    """Asynchronous evaluations of ``eval.benchmarks``, one at a time, the others pending.

    A checkpoint is evaluated by ``evaluation.runner.run`` in a Ray task of its own when that module is installed:
    the evaluation then takes its own resources instead of the serving replicas' and writes the usual ``eval/``
    folder. Otherwise, and always for a proxy-tuned model (which only this app can run), the items are scored
    through the model's deployment handle in batches, interleaved with live traffic, and aggregated here.
    """

    def __init__(self, models: dict[str, DeploymentHandle], specs: dict[str, ModelSpec], cfg: dict[str, Any]):
        self.models, self.specs = models, specs
        self.cfg = Config.model_validate(cfg)
        self.jobs: dict[str, _Job] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._one_at_a_time = asyncio.Semaphore(1)
        self._tokenizers: dict[str, Any] = {}

    async def submit(self, model: str, benchmark: str, limit: int | None) -> dict[str, Any]:
        names = [b.name for b in self.cfg.eval.benchmarks]
        if benchmark not in names:
            return RequestError("benchmark", f"no benchmark {benchmark!r} in eval.benchmarks ({', '.join(names)})",
                                404).as_reply()
        if sum(j.status in ("pending", "running") for j in self.jobs.values()) >= MAX_PENDING_JOBS:
            return RequestError("benchmark", f"{MAX_PENDING_JOBS} evaluation jobs are already waiting", 429).as_reply()
        job = _Job(id=f"evaljob-{uuid.uuid4().hex[:16]}", benchmark=benchmark, model=model, limit=limit)
        self.jobs[job.id] = job
        self._tasks[job.id] = asyncio.create_task(self._run(job))
        self._forget_old()
        return job.view()

    async def get(self, job_id: str) -> dict[str, Any] | None:
        job = self.jobs.get(job_id)
        return None if job is None else job.view()

    def _forget_old(self) -> None:
        done = [j for j in self.jobs.values() if j.status in ("succeeded", "failed")]
        for j in sorted(done, key=lambda j: j.created)[:max(0, len(self.jobs) - KEPT_JOBS)]:
            del self.jobs[j.id]

    async def _run(self, job: _Job) -> None:
        async with self._one_at_a_time:
            job.status, job.started = "running", time.time()
            try:
                spec = self.specs[job.model]
                runner = importlib.util.find_spec("apollo_ray.evaluation.runner") is not None
                if spec.proxy is None and runner and job.limit in (None, self.cfg.eval.limit):
                    job.result = await self._with_runner(job, spec)
                else:
                    job.result = await self._in_app(job, spec)
                job.status = "succeeded"
            except Exception as e:  # a failed job is a result to report, not a reason to take the replica down
                log.exception("evaluation job %s failed", job.id)
                job.status, job.error = "failed", f"{type(e).__name__}: {e}"
            finally:
                job.finished = time.time()
                self._tasks.pop(job.id, None)

    def _job_config(self, job: _Job) -> Config:
        bench = next(b for b in self.cfg.eval.benchmarks if b.name == job.benchmark)
        ev = self.cfg.eval.model_copy(update={"benchmarks": [bench], "limit": job.limit or self.cfg.eval.limit})
        return self.cfg.model_copy(update={"eval": ev})

    async def _with_runner(self, job: _Job, spec: ModelSpec) -> dict[str, Any]:
        import ray

        from apollo_ray.storage import Storage

        cfg = self._job_config(job)
        # num_cpus=0: the task only drives the runner, whose own workers reserve what the evaluation needs
        task = ray.remote(num_cpus=0, max_retries=0)(_runner_entry)
        folder = await task.remote(config_mod.to_dict(cfg), spec.checkpoint)
        storage = Storage.from_config(cfg)
        results_uri = f"{folder.rstrip('/')}/results.json"
        summary: dict[str, Any] = {}
        if storage.exists(results_uri):
            results = storage.read_json(results_uri)  # {model name: aggregate results}, one model here
            summary = _summary(results if "languages" in results else next(iter(results.values())))
        return {"folder": str(folder), "backend": "runner", **summary}

    async def _in_app(self, job: _Job, spec: ModelSpec) -> dict[str, Any]:
        from apollo_ray.evaluation import apollo
        from apollo_ray.evaluation.aggregate import Outcome, aggregate
        from apollo_ray.evaluation.prompts import PromptTooLong, ShotPool, build_prompt
        from apollo_ray.evaluation.scoring import extract_answer
        from apollo_ray.storage import Storage

        cfg = self._job_config(job)
        ev, bench = cfg.eval, cfg.eval.benchmarks[0]
        tokenizer = await asyncio.to_thread(self._tokenizer, spec)
        reference = ev.protocol == "apollo"  # the reference's prompts, greedy generation and extraction

        def prepare() -> tuple[list[Item], list[str], int]:
            storage = Storage.from_config(cfg)
            items, rejects = load_benchmark(bench, storage, limit=ev.limit)
            pool, _ = load_shot_pool(bench, storage, items)
            shots = ShotPool(pool)
            kept, prompts = [], []
            for it in items:
                try:
                    if reference:
                        prompts.append(apollo.build_prompt(it, shots, ev.shots, ev.seed,
                                                           eos=apollo.eos_text(tokenizer),
                                                           max_chars=ev.max_prompt_chars))
                    else:
                        prompts.append(build_prompt(it, shots, ev.shots, ev.seed, tokenizer,
                                                    max_tokens=min(ev.max_prompt_tokens, spec.max_prompt_tokens)))
                    kept.append(it)
                except PromptTooLong:
                    rejects.append(it)
            return kept, prompts, len(rejects)

        items, prompts, n_rejects = await asyncio.to_thread(prepare)
        handle = self.models[job.model]
        predicted: list[str | None] = []
        extract = apollo.extract_reference if reference else extract_answer
        for start in range(0, len(items), ev.batch_size):
            batch, texts = items[start:start + ev.batch_size], prompts[start:start + ev.batch_size]
            if ev.scoring == "loglik" and not reference:
                scores = await handle.score_prompts.remote(texts, batch)
                predicted += [s["predicted"] for s in scores]
            else:
                greedy = Sampling(max_tokens=ev.max_new_tokens, temperature=0.0)
                answers = await asyncio.gather(*(handle.generate.remote(GenerateRequest(greedy, prompt=t))
                                                 for t in texts))
                predicted += [extract(a["text"]) for a in answers]
        outcomes = [Outcome(it.language, it.source, p in it.answers) for it, p in zip(items, predicted)]
        results = aggregate(outcomes, sources=apollo.language_sources(ev.sources, ev.protocol))
        return {"backend": "in-app", "protocol": ev.protocol, "scoring": "generate" if reference else ev.scoring,
                "rejects": n_rejects, **_summary(results)}

    def _tokenizer(self, spec: ModelSpec) -> Any:
        if spec.name not in self._tokenizers:
            from transformers import AutoTokenizer

            from apollo_ray.serve.engine import local_checkpoint

            self._tokenizers[spec.name] = AutoTokenizer.from_pretrained(
                local_checkpoint(spec.tokenizer_source, spec.endpoint_url))
        return self._tokenizers[spec.name]


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of an ``aggregate`` results dict."""
    langs = results.get("languages", {})
    n = sum(v.get("n", 0) for v in langs.values())
    correct = sum(v.get("correct", 0) for v in langs.values())
    return {"n": n, "correct": correct, "accuracy": correct / n if n else None,
            "languages": {k: v.get("accuracy") for k, v in langs.items()},
            "major": (results.get("major") or {}).get("accuracy"),
            "minor": (results.get("minor") or {}).get("accuracy")}


def _runner_entry(cfg: dict[str, Any], model: str) -> str:
    from apollo_ray.evaluation import runner

    return str(runner.run(Config.model_validate(cfg), [model]))


# ------------------------------------------------------------------------------------------------------------ ingress
@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The HTTP front: ``api.create_api`` around handles to the model deployments and the job table."""

    def __init__(self, models: dict[str, DeploymentHandle], jobs: DeploymentHandle, limits: dict[str, int],
                 api_key_env: str | None):
        key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not key:
            # fail closed: a configured key that did not reach the replica must not mean an open server
            raise RuntimeError(f"serve.api_key_env={api_key_env!r} but that environment variable is empty here")
        self.models, self.jobs = models, jobs
        self.settings = ApiSettings(api_key=key, **limits)

    def __serve_build_asgi_app__(self) -> Any:
        return create_api(self, self.settings)

    def model_names(self) -> list[str]:
        return list(self.models)

    async def generate(self, model: str, request: GenerateRequest) -> dict[str, Any]:
        return await _unwrapped(self.models[model].generate.remote(request), model)

    async def stream(self, model: str, request: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        gen = self.models[model].options(stream=True).stream.remote(request)
        finished = False
        try:
            while True:
                try:
                    piece = await gen.__anext__()
                except StopAsyncIteration:
                    finished = True
                    return
                except _UNAVAILABLE as e:
                    finished = True
                    raise _unavailable(model, e) from e
                if "refused" in piece:
                    finished = True  # a refusal is the model's last word
                    RequestError.raise_if_refused(piece)
                yield piece
        finally:
            if not finished:
                gen.cancel()  # the client went away: stop decoding for it

    async def score(self, model: str, items: list[dict[str, Any]], language: str, shots: int) -> list[dict[str, Any]]:
        parsed: list[tuple[Item, bool]] = []
        for i, raw in enumerate(items):
            has_answer = raw.get("answer") is not None
            # parse_item needs an answer; an unanswered item gets a placeholder that is never reported or used as a shot
            record = {k: v for k, v in raw.items() if v is not None} | ({} if has_answer else {"answer": 0})
            try:
                parsed.append((parse_item(record, item_id=raw.get("id") or f"item-{i}", language=language,
                                          default_source="request"), has_answer))
            except ItemError as e:
                raise RequestError(f"items[{i}]", str(e)) from None
        request_items = [it for it, _ in parsed]
        pool = [it for it, has in parsed if has]
        scores = await _unwrapped(self.models[model].score.remote(request_items, pool, shots), model)
        for s, (it, has) in zip(scores, parsed):
            s["answer"] = it.answer if has else None
            s["correct"] = (s["predicted"] in it.answers) if has else None
        return scores

    async def submit_eval(self, model: str, benchmark: str, limit: int | None) -> dict[str, Any]:
        return await _unwrapped(self.jobs.submit.remote(model, benchmark, limit), EVAL_JOBS)

    async def eval_status(self, job_id: str) -> dict[str, Any] | None:
        try:
            return await self.jobs.get.remote(job_id)
        except _UNAVAILABLE as e:
            raise _unavailable(EVAL_JOBS, e) from e


# What a handle call raises when the replica serving it died (killed, out of memory, its node lost) or none is ready:
# the request was fine and a retry will reach the replica Serve starts instead. The API answers 503 + Retry-After.
_UNAVAILABLE = (RayActorError, WorkerCrashedError, NodeDiedError, BackPressureError, DeploymentUnavailableError,
                ReplicaUnavailableError)
RETRY_AFTER_S = 5  # about what a replica of a small model takes to restart and load


def _unavailable(what: str, e: BaseException) -> ServiceUnavailable:
    return ServiceUnavailable(f"{what!r} is unavailable ({type(e).__name__}: its replica went away or none is "
                              f"ready); retry shortly", RETRY_AFTER_S)


async def _unwrapped(response: Any, deployment: str) -> Any:
    """Await a handle call; a refusal becomes the RequestError the API answers with, a lost replica the 503."""
    try:
        reply = await response
    except _UNAVAILABLE as e:
        raise _unavailable(deployment, e) from e
    return RequestError.raise_if_refused(reply)


# ------------------------------------------------------------------------------------------------------------- build
def _limits(cfg: Config) -> dict[str, int]:
    s = cfg.serve
    return {"max_prompt_tokens": s.max_prompt_tokens, "max_tokens": s.max_tokens, "max_batch_items": s.max_batch_items,
            "max_concurrent_requests": s.max_concurrent_requests}


def deployment_options(cfg: Config, autoscaling: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Serve options of each deployment by name (the same ones ``serve_config`` writes out)."""
    s, r = cfg.serve, cfg.resources
    scale: dict[str, Any] = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": s.replicas}
    model = {**scale, "max_ongoing_requests": s.max_concurrent_requests,
             "ray_actor_options": {"num_cpus": r.cpus_per_worker, "num_gpus": r.gpus_per_worker if r.use_gpu else 0}}
    out = {INGRESS: {"num_replicas": s.replicas, "max_ongoing_requests": s.max_concurrent_requests + INGRESS_HEADROOM,
                     "ray_actor_options": {"num_cpus": 0}},
           EVAL_JOBS: {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}}
    for name in model_specs(cfg):
        out[name] = dict(model)
    return out


def app_for(cfg: Config, autoscaling: dict[str, Any] | None = None) -> Application:
    if cfg.serve.engine == "vllm":
        from apollo_ray.serve import vllm

        return vllm.app(cfg, autoscaling)
    specs = model_specs(cfg)
    opts = deployment_options(cfg, autoscaling)
    models = {name: ModelServer.options(name=name, **opts[name]).bind(spec) for name, spec in specs.items()}
    jobs = EvalJobs.options(name=EVAL_JOBS, **opts[EVAL_JOBS]).bind(models, specs, config_mod.to_dict(cfg))
    return Ingress.options(name=INGRESS, **opts[INGRESS]).bind(models, jobs, _limits(cfg), cfg.serve.api_key_env)


def config_from_args(args: dict[str, Any] | None) -> Config:
    """The run's config from app args: ``config`` (a file path, or a config mapping as in ray_config.yaml),
    ``overrides`` (``["serve.replicas=2", ...]``, as ``--set``)."""
    args = dict(args or {})
    unknown = set(args) - {"config", "overrides", "autoscaling"}
    if unknown:
        raise ConfigError(f"unknown app args {sorted(unknown)}; expected config, overrides, autoscaling")
    source, overrides = args.get("config"), args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = [overrides]
    if isinstance(source, dict):
        return config_mod.resolve(source, overrides, origin="app args")
    return config_mod.load(source, overrides)


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application (``serve run apollo_ray.serve.app:build_app config=ray_config.yaml``, RayService)."""
    args = args or {}
    return app_for(config_from_args(args), args.get("autoscaling"))


def serve_config(cfg: Config) -> dict[str, Any]:
    """A Serve config file (``serve deploy``) for this config: the app, its args and each deployment's options."""
    from apollo_ray.deploy import config_yaml

    if cfg.serve.engine == "vllm":
        from apollo_ray.serve import vllm

        return vllm.serve_config(cfg)

    opts = deployment_options(cfg)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.serve.host, "port": cfg.serve.port},
        "applications": [{
            "name": cfg.serve.model_name,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            # the config as a diff from its preset, so that defaults come from the code version that runs
            "args": {"config": yaml.safe_load(config_yaml(cfg))},
            "deployments": [{"name": name, **o} for name, o in opts.items()],
        }],
    }


def write_config(cfg: Config, path: str | os.PathLike) -> str:
    """``apollo-ray serve --write-config PATH``: ``serve_config`` as YAML."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(serve_config(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return str(p)


def url(cfg: Config) -> str:
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    return f"http://{host}:{cfg.serve.port}"


def run(cfg: Config, *, block: bool = True) -> str:
    """Deploy on ``RAY_ADDRESS`` (or a local Ray), print the URL, and serve until Ctrl-C unless ``block=False``."""
    from apollo_ray.runtime import init_ray

    app = app_for(cfg)  # before Ray starts: a config error costs no cluster round trip
    init_ray()
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name=cfg.serve.model_name, route_prefix="/")
    base = url(cfg)
    if cfg.serve.engine == "vllm":
        print(f"serving {cfg.serve.model_name} at {base}/v1 (OpenAI-compatible; Ray Serve LLM, vLLM)", flush=True)
    else:
        print(f"serving {', '.join(model_specs(cfg))} at {base}/v1 (OpenAI-compatible; docs at {base}/docs)",
              flush=True)
    if block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete(cfg.serve.model_name)
    return base
