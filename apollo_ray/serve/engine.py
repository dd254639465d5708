"""The model side of serving, without Ray: loading a checkpoint, rendering prompts, and a token-by-token decode loop.

The loop is manual (one forward per token on the last position, each request with its own KV cache) rather than
``model.generate``: streaming needs the tokens as they come, and proxy-tuning needs the logits of three models
combined before each token is chosen, which ``generate`` has no place for. One ``Generation`` is one request; its
``advance()`` does one token's work, so a server can interleave many requests at token granularity.

Errors a client caused are ``RequestError`` (the server answers 400 and names the field); anything else is a bug.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

from apollo_ray.data.mixture import ASSISTANT_PREFIX, TURN_SEP, USER_PREFIX
from apollo_ray.evaluation.prompts import encode



class RequestError(ValueError):
    """A request the model cannot serve as asked; ``param`` names the offending field (OpenAI's error.param)."""

    def __init__(self, param: str, message: str, status: int = 400):
        super().__init__(message)
        self.param, self.message, self.status = param, message, status

    def __reduce__(self):
        return RequestError, (self.param, self.message, self.status)

    # Deployments answer a refusal as a value rather than raising it: Serve logs every exception a replica raises
    # with its traceback, and a client's mistake is not an incident.
    def as_reply(self) -> dict[str, Any]:
        return {"refused": {"param": self.param, "message": self.message, "status": self.status}}

    @classmethod
    def raise_if_refused(cls, reply: Any) -> Any:
        if isinstance(reply, dict) and "refused" in reply:
            r = reply["refused"]
            raise cls(r["param"], r["message"], r["status"])
        return reply


# ------------------------------------------------------------------------------------------------------------ loading
def local_checkpoint(path: str, endpoint_url: str | None = None) -> str:
    """Something ``from_pretrained`` reads: a hub id or a local path as given, a remote URI (s3://) copied locally."""
    if "://" not in path or path.startswith("file://"):
        return path.removeprefix("file://")
    from apollo_ray.storage import Storage

    return str(Storage(path, endpoint_url).get_dir(path, tempfile.mkdtemp(prefix="apollo-serve-")))


def load_checkpoint(path: str, *, dtype: str = "float32", device: str = "cpu",
                    endpoint_url: str | None = None) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode on ``device``, tokenizer) of a dense or Post-MoE checkpoint."""
    import apollo_ray  # noqa: F401  (registers the Post-MoE architecture with the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = local_checkpoint(path, endpoint_url)
    tokenizer = AutoTokenizer.from_pretrained(local)
    model = AutoModelForCausalLM.from_pretrained(local, dtype=getattr(torch, dtype)).to(device).eval()
    return model, tokenizer


def context_length(model: Any) -> int:
    own = getattr(model, "context_length", None)  # a ProxyLM knows its trio's
    return int(own if isinstance(own, int) else getattr(model.config, "max_position_embeddings", None) or 1 << 20)


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every id that ends an answer: the tokenizer's EOS and the generation config's (chat models list several)."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


# ------------------------------------------------------------------------------------------------------------ prompts
def completion_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    ids = encode(tokenizer, prompt)
    if not ids:
        # An empty prompt still needs one position to predict from: start as a document would (GPT-2 style).
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [int(start)]
    return ids


def chat_prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The conversation with the assistant turn opened: the model's chat template, else Apollo's format.

    Apollo's format is tokenized segment by segment exactly as training renders it (``data.mixture.render``): each
    past answer followed by EOS, the text between answers as one segment ending in ``Assistant:``. A single string
    tokenized at once would merge tokens across those boundaries and show the model token sequences it never saw.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False, add_generation_prompt=True)
        return encode(tokenizer, text)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
    prompt = ""
    for m in messages:
        sep = TURN_SEP if (ids or prompt) else ""
        if m["role"] == "assistant":
            prompt += sep + ASSISTANT_PREFIX
            ids += _plain(tokenizer, prompt) + _plain(tokenizer, m["content"]) + ([eos] if eos is not None else [])
            prompt = ""
        else:
            prompt += sep + (USER_PREFIX if m["role"] == "user" else "") + m["content"]
    prompt += (TURN_SEP if (ids or prompt) else "") + ASSISTANT_PREFIX
    return ids + _plain(tokenizer, prompt)


def _plain(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


# ----------------------------------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def choose(logits_V: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """The next token: argmax at temperature 0, else a draw from the temperature-scaled, nucleus-truncated softmax."""
    if temperature == 0:
        return int(torch.argmax(logits_V))
    probs_V = torch.softmax(logits_V.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_V, order_V = torch.sort(probs_V, descending=True)
        # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is still short
        keep_V = (torch.cumsum(sorted_V, dim=-1) - sorted_V) < top_p
        keep_V[0] = True
        probs_V = torch.zeros_like(probs_V).scatter_(0, order_V[keep_V], sorted_V[keep_V])
    return int(torch.multinomial(probs_V, 1, generator=generator))


class TextStream:
    """Detokenizes incrementally and applies stop sequences; the deltas it hands out concatenate to the final text.

    Text that could still turn into a stop sequence is held back, as is a trailing U+FFFD (a multi-byte character
    whose bytes have not all arrived): a streamed answer must never show text the complete answer does not contain.
    """

    def __init__(self, tokenizer: Any, stop: Iterable[str]):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text handed out so far
        self.text = ""

    def push(self, token: int) -> tuple[str, bool]:
        """(new text safe to show, whether a stop sequence ended the answer)."""
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        # a stop sequence cannot start inside emitted text: any prefix of one at its end was held back
        hits = [p for p in (full.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stop) if p >= 0]
        if hits:
            return self._emit(full, min(hits)), True
        end = len(full) - 1 if full.endswith("\ufffd") else len(full)
        return self._emit(full, min(end, len(full) - self._stop_prefix(full))), False

    def flush(self) -> str:
        """Whatever was held back, at the end of the answer (no stop sequence can complete any more)."""
        if not self.ids:
            return ""
        return self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=True), None)

    def _emit(self, full: str, end: int | None) -> str:
        end = len(full) if end is None else end
        delta = full[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        self.text += delta
        return delta

    def _stop_prefix(self, full: str) -> int:
        """Length of the longest suffix of ``full`` that is a proper prefix of a stop sequence."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(full)), best, -1):
                if full.endswith(s[:k]):
                    best = k
                    break
        return best


# ---------------------------------------------------------------------------------------------------------- decoding
@dataclass
class Step:
    text: str  # new text (may be empty)
    finish_reason: str | None = None  # "stop" | "length" when the answer is over


@dataclass
class Generation:
    """One request's decoding: prefill, then ``advance()`` once per token until it returns a finish reason.

    ``forward_kwargs`` go to every forward (proxy-tuning's per-request α); the language model is anything with the
    causal-LM call signature (``input_ids``, ``cache``, ``use_cache``, ``logits_to_keep`` → ``.logits``).
    """

    lm: Any
    tokenizer: Any
    prompt_ids: list[int]
    sampling: Sampling
    stop_ids: frozenset[int]
    device: Any = "cpu"
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    completion_tokens: int = 0
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        self._stream = TextStream(self.tokenizer, self.sampling.stop)
        self._generator = None
        if self.sampling.temperature > 0:
            self._generator = torch.Generator(device="cpu")
            if self.sampling.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self.sampling.seed & 0xFFFF_FFFF_FFFF_FFFF)
        self._cache = None
        self._logits_V: torch.Tensor | None = None

    @property
    def text(self) -> str:
        return self._stream.text

    @torch.inference_mode()
    def prefill(self) -> None:
        self._forward(torch.tensor([self.prompt_ids], dtype=torch.long, device=self.device))

    @torch.inference_mode()
    def advance(self) -> Step:
        if self.finish_reason is not None:
            return Step("", self.finish_reason)
        if self._logits_V is None:
            raise RuntimeError("prefill() first")
        if self.sampling.temperature == 0:
            token = int(torch.argmax(self._logits_V))  # on the device: one integer crosses to the host, not V floats
        else:  # on the CPU with a CPU generator: a seed gives the same answer on any device
            token = choose(self._logits_V.float().cpu(), self.sampling.temperature, self.sampling.top_p,
                           self._generator)
        self.completion_tokens += 1
        if token in self.stop_ids:
            return self._finish("stop", "", flush=True)
        delta, stopped = self._stream.push(token)
        if stopped:
            return self._finish("stop", delta, flush=False)
        if self.completion_tokens >= self.sampling.max_tokens:
            return self._finish("length", delta, flush=True)
        self._forward(torch.tensor([[token]], dtype=torch.long, device=self.device))
        return Step(delta)

    def _finish(self, reason: str, delta: str, *, flush: bool) -> Step:
        self.finish_reason = reason
        self._cache = self._logits_V = None  # the KV cache is the bulk of a request's memory: free it now
        # held-back text is part of the answer unless a stop sequence cut it off
        return Step(delta + (self._stream.flush() if flush else ""), reason)

    def _forward(self, input_ids: torch.Tensor) -> None:
        out = self.lm(input_ids=input_ids, cache=self._cache, use_cache=True, logits_to_keep=1,
                      **self.forward_kwargs)
        self._cache = out.cache
        self._logits_V = out.logits[0, -1]
