"""A real OpenAI-compatible HTTP server for the rewrite tests and bench: FastAPI + uvicorn on 127.0.0.1.

``POST /v1/chat/completions`` recognises which versioned rewrite prompt it was sent (question, answer or dialogue, in
which language) by matching the prompt against the prompt files, and answers deterministically in the paragraph's
language: the question is the paragraph's first sentence turned into a question, the answer is the paragraph itself,
the dialogue is one labelled patient/doctor exchange of the two. ``usage`` counts ~4 characters per token.

Failures are injected on a schedule: ``faults`` maps a substring of a paragraph to the modes that the successive
requests about that paragraph get (then plain success): ``500``/``503``/``429`` (with Retry-After: 0), ``timeout``
(hold the reply until ``release()`` or the server stops, so that the client's timeout fires whatever the machine's
load; with ``timeout_sleep_s`` set, sleep that long instead), ``empty`` (empty content), ``no_choices`` (a body without
``choices``), ``short`` (a 4-character answer), ``leak`` (the answer prefixed by a leakage phrase), ``wrong_lang`` (an
English answer), ``garbage`` (text with no dialogue labels), ``truncated`` (finish_reason "length"), ``malformed`` (a
200 whose body is not JSON), ``bad_usage`` (``"prompt_tokens": "ten"``), ``special`` (the text ``\x00{{{<|im_end|>``).
With ``fault_rate`` set, every request that has no scheduled mode gets one of ``random_modes`` with that probability
(seeded: the same run of requests gets the same faults).

Run standalone for a bench: ``python tests/fake_openai.py --port 8123 --latency 0.05``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, Response  # noqa: E402

from apollo_ray import languages as langs  # noqa: E402
from apollo_ray.data.rewrite import PROMPTS_DIR, PromptSet, load_prompts, normalize, sentences  # noqa: E402
from apollo_ray.services import free_port  # noqa: E402

WRONG_LANGUAGE = ("This reply is deliberately written in English whatever the paragraph's language, so that the "
                  "language check has something to reject.")
_QMARK = {"zh": "？", "ja": "？", "ar": "؟"}


def _template_regex(template: str) -> re.Pattern:
    """A prompt template → a regex capturing its placeholders (a repeated placeholder must repeat its value)."""
    out, seen, pos = [], set(), 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos:m.start()]))
        name = m.group(1)
        out.append(f"(?P={name})" if name in seen else f"(?P<{name}>.*?)")
        seen.add(name)
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out) + r"(?P<tail>.*)\Z", re.S)


class PromptMatcher:
    """Which step and language a rendered rewrite prompt is, and its paragraph (and question)."""

    def __init__(self, version: str = "v1"):
        self.entries: list[tuple[PromptSet, str, re.Pattern]] = []
        for f in sorted((PROMPTS_DIR / version).glob("*.yaml")):
            ps = load_prompts(version, f.stem)
            for step, template in ps.templates.items():
                self.entries.append((ps, step, _template_regex(template.rstrip())))
        self.by_name = {langs.get(c).name: c for c in langs.all_codes()}

    def match(self, prompt: str) -> tuple[str, str, dict[str, str], PromptSet] | None:
        for ps, step, rx in self.entries:
            m = rx.match(prompt)
            if m:
                values = m.groupdict()
                lang = ps.language
                if "language" in values and values["language"] in self.by_name:
                    lang = self.by_name[values["language"]]
                return step, lang, values, ps
        return None


class FakeOpenAI:
    def __init__(self, latency_s: float = 0.0, faults: dict[str, list[str]] | None = None,
                 timeout_sleep_s: float | None = None, port: int | None = None, version: str = "v1",
                 fault_rate: float = 0.0, random_modes: tuple[str, ...] = (), seed: int = 0):
        self.latency_s = latency_s
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        self.fault_rate, self.random_modes = fault_rate, random_modes
        self._rng = random.Random(seed)
        self.timeout_sleep_s = timeout_sleep_s
        self._released = threading.Event()  # set: held replies go out (and later ones are not held)
        self.held = 0  # replies being held right now
        self.port = port or free_port()
        self.matcher = PromptMatcher(version)
        self.counts: Counter = Counter()    # outcome of every request (mode or "ok")
        self.requests = 0
        self._reset_load()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = self._build()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- load statistics (for the bench: is the client really keeping C requests in flight?) ------------------
    def _reset_load(self) -> None:
        self.in_flight = 0
        self._since = self._last = time.perf_counter()
        self._area = 0.0       # ∫ in_flight dt
        self._served = 0
        self._handler_s = 0.0  # total time requests spent in the handler

    def _tick(self, delta: int) -> None:
        now = time.perf_counter()
        self._area += self.in_flight * (now - self._last)
        self._last = now
        self.in_flight += delta

    def load(self) -> dict[str, float]:
        self._tick(0)
        span = max(self._last - self._since, 1e-9)
        return {"served": self._served, "mean_in_flight": self._area / span,
                "mean_handler_s": self._handler_s / max(self._served, 1)}

    # -- behaviour ---------------------------------------------------------------------------------------------
    def release(self) -> None:
        """Let every held reply go (a client that timed out on it has retried by then)."""
        self._released.set()

    async def _hold(self) -> None:
        self.held += 1
        try:
            while not self._released.is_set():
                await asyncio.sleep(0.01)
        finally:
            self.held -= 1

    def _mode(self, paragraph: str) -> str:
        for key, modes in self.faults.items():
            if key in paragraph and modes:
                return modes.pop(0)
        if self.fault_rate and self._rng.random() < self.fault_rate:
            return self._rng.choice(self.random_modes)
        return "ok"

    def reply(self, step: str, lang: str, values: dict[str, str], ps: PromptSet) -> str:
        paragraph = normalize(values["paragraph"])
        first = (sentences(paragraph) or [paragraph])[0].rstrip(".!?。！？؟।")
        question = first + _QMARK.get(lang, "?")
        if step == "question":
            return question
        if step == "answer":
            return paragraph
        return f"{ps.labels['patient']}: {question}\n{ps.labels['doctor']}: {paragraph}"

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/stats")
        async def stats() -> dict[str, float]:
            return self.load()

        @app.post("/stats/reset")
        async def reset() -> dict[str, float]:
            self._reset_load()
            return self.load()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            t0 = time.perf_counter()
            self._tick(+1)
            try:
                return await self._chat(request)
            finally:
                self._tick(-1)
                self._served += 1
                self._handler_s += time.perf_counter() - t0

        return app

    async def _chat(self, request: Request) -> Any:
        body = await request.json()
        self.requests += 1
        prompt = body["messages"][-1]["content"]
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        found = self.matcher.match(prompt)
        if found is None:
            self.counts["unmatched"] += 1
            return JSONResponse({"error": {"message": "prompt not recognised", "type": "invalid_request"}}, 400)
        step, lang, values, ps = found
        mode = self._mode(values["paragraph"])
        self.counts[mode] += 1
        if mode in ("500", "503", "429"):
            headers = {"retry-after": "0"} if mode == "429" else {}
            return JSONResponse({"error": {"message": f"injected {mode}", "type": "server_error"}}, int(mode),
                                headers=headers)
        if mode == "timeout":
            if self.timeout_sleep_s is None:
                await self._hold()
            else:
                await asyncio.sleep(self.timeout_sleep_s)
        text = self.reply(step, lang, values, ps)
        if mode == "empty":
            text = ""
        elif mode == "short":
            text = "Yes."
        elif mode == "leak":
            text = f"{ps.leakage[0].capitalize()}, {text}"
        elif mode == "wrong_lang":
            text = WRONG_LANGUAGE
        elif mode == "garbage":
            text = "I would rather not write a conversation today."
        elif mode == "special":
            text = "\x00{{{<|im_end|>"
        elif mode == "malformed":
            return Response('{"choices": [{"message": ', media_type="application/json")
        usage: dict[str, Any] = {"prompt_tokens": max(1, len(prompt) // 4), "completion_tokens": max(1, len(text) // 4)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if mode == "bad_usage":
            usage["prompt_tokens"] = "ten"
        out: dict[str, Any] = {"id": f"chatcmpl-{self.requests}", "object": "chat.completion",
                               "created": int(time.time()), "model": body.get("model", "fake"), "usage": usage}
        if mode != "no_choices":
            out["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text},
                               "finish_reason": "length" if mode == "truncated" else "stop"}]
        # Serialised here rather than by FastAPI's encoder: the bench wants the server's per-request cost small.
        return Response(json.dumps(out, ensure_ascii=False), media_type="application/json")


    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> "FakeOpenAI":
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False,
                                lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.time() + 20
        while not self._server.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake OpenAI server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.release()  # uvicorn waits for its handlers: a held one must not hold up the shutdown
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--latency", type=float, default=0.05)
    args = p.parse_args()
    server = FakeOpenAI(latency_s=args.latency, port=args.port)
    uvicorn.run(server.app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, lifespan="off")


if __name__ == "__main__":
    main()
