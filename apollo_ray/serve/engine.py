"""The model side of serving, without Ray: loading a checkpoint, rendering prompts, and continuous batching.

Decoding is manual rather than ``model.generate``: streaming needs the tokens as they come, proxy-tuning needs the
logits of three models combined before each token is chosen, and requests come and go while others decode, which
``generate`` has no place for. One ``Generation`` is one request's sampling and text; one ``Decoder`` runs every
active generation of a replica as one batch, one forward per token for all of them (``Decoder.step``), requests
joining after their (batched) prefill and leaving when done.

Errors a client caused are ``RequestError`` (the server answers 400 and names the field); anything else is a bug.
"""

from __future__ import annotations

import re
import tempfile
from collections import deque
from dataclasses import dataclass
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
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(param: str, *texts: str) -> None:
    """Refuse text with lone surrogates (a client can send them as JSON escapes), which tokenizers fail on."""
    if any(_SURROGATE.search(t) for t in texts):
        raise RequestError(param, "not valid Unicode text: contains a lone surrogate (\\ud800-\\udfff)")


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


def sample(logits_RV: torch.Tensor, temperature_R: torch.Tensor, top_p_R: torch.Tensor | None,
           u_R: torch.Tensor) -> torch.Tensor:
    """One token per row from its temperature-scaled softmax, nucleus-truncated to ``top_p`` (None: no truncation),
    by inverse transform of the row's own uniform draw ``u`` in [0, 1).

    Rows never mix: each row's token depends only on its logits, settings and draw, whatever else is in the batch
    (row-wise softmax, sort and cumsum), so a request samples the same tokens alone or batched. Callers keep rows
    with and without top-p apart, as the two orders of summation differ.
    """
    probs_RV = torch.softmax(logits_RV.float() / temperature_R.unsqueeze(1), dim=-1)
    order_RV = None
    if top_p_R is not None:
        probs_RV, order_RV = torch.sort(probs_RV, dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is still short
        keep_RV = (torch.cumsum(probs_RV, dim=-1) - probs_RV) < top_p_R.unsqueeze(1)
        keep_RV[:, 0] = True
        probs_RV = probs_RV * keep_RV
    cdf_RV = torch.cumsum(probs_RV, dim=-1)
    # The first token whose cumulative mass passes u x the row's total: it has mass, since the target is below the
    # total (u is kept under 1 by more than float32 rounding can add back).
    target_R1 = (u_R.clamp(max=1 - 2 ** -23) * cdf_RV[:, -1]).unsqueeze(1)
    index_R1 = torch.searchsorted(cdf_RV, target_R1, right=True)
    return (index_R1 if order_RV is None else order_RV.gather(1, index_R1)).squeeze(1)


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


class Generation:
    """One request's answer: its sampling state, text stream and stop rules. It runs no forward of its own: a
    ``Decoder`` batches its forwards with every other active generation's and hands it one row of logits per step.

    ``alpha`` is proxy-tuning's per-request α (None: the model's own). ``cancel()`` may be called from any thread; the
    decoder drops the generation at its next step.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int], sampling: Sampling, stop_ids: frozenset[int],
                 alpha: float | None = None):
        self.tokenizer, self.prompt_ids, self.sampling, self.stop_ids = tokenizer, prompt_ids, sampling, stop_ids
        self.alpha = alpha
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.cancelled = False
        self._stream = TextStream(tokenizer, sampling.stop)
        self._generator = None
        if sampling.temperature > 0:
            self._generator = torch.Generator(device="cpu")
            if sampling.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(sampling.seed & 0xFFFF_FFFF_FFFF_FFFF)

    @property
    def text(self) -> str:
        return self._stream.text

    @property
    def greedy(self) -> bool:
        return self.sampling.temperature == 0

    def cancel(self) -> None:
        self.cancelled = True

    def draw(self) -> float:
        """This step's uniform draw, from the request's own generator (seeded: the same draws on any device)."""
        return float(torch.rand((), generator=self._generator, dtype=torch.float64))

    def accept(self, token: int) -> Step:
        """Take the chosen token: the text it adds, and whether it ends the answer."""
        self.completion_tokens += 1
        if token in self.stop_ids:
            return self._finish("stop", "", flush=True)
        delta, stopped = self._stream.push(token)
        if stopped:
            return self._finish("stop", delta, flush=False)
        if self.completion_tokens >= self.sampling.max_tokens:
            return self._finish("length", delta, flush=True)
        return Step(delta)

    def _finish(self, reason: str, delta: str, *, flush: bool) -> Step:
        self.finish_reason = reason
        # held-back text is part of the answer unless a stop sequence cut it off
        return Step(delta + (self._stream.flush() if flush else ""), reason)


class KVCache:
    """Keys and values of the rows that decode together, one [B, H_kv, S, head_dim] pair per layer.

    It is what a transformers attention layer needs of a cache (``update`` appends this forward's keys and values and
    returns the whole, as ``DynamicCache`` does) plus the row and column surgery of continuous batching. Which slot
    holds which row's token is the ``Decoder``'s business (its masks and positions), never the cache's.
    """

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):
            self.keys.append(key_states)
            self.values.append(value_states)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key_states], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if self.keys else 0

    def select(self, dim: int, index: torch.Tensor) -> None:
        """Keep rows (dim 0) or slots (dim 2) ``index``, in that order."""
        self.keys = [k.index_select(dim, index) for k in self.keys]
        self.values = [v.index_select(dim, index) for v in self.values]

    def join(self, other: "KVCache") -> None:
        """Append ``other``'s rows below this cache's, the shorter one padded with empty slots on the right."""
        if not self.keys:
            self.keys, self.values = other.keys, other.values
            return
        slots = max(self.get_seq_length(), other.get_seq_length())
        pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, slots - t.shape[-2]))  # noqa: E731
        self.keys = [torch.cat([pad(a), pad(b)]) for a, b in zip(self.keys, other.keys)]
        self.values = [torch.cat([pad(a), pad(b)]) for a, b in zip(self.values, other.values)]


def new_cache(lm: Any) -> Any:
    """An empty batch cache for ``lm``: a ``KVCache``, or the model's own composite (a ProxyLM's three)."""
    own = getattr(lm, "new_cache", None)
    return own() if callable(own) else KVCache()


def _members(cache: Any) -> list[KVCache]:
    return list(cache.caches) if hasattr(cache, "caches") else [cache]


@dataclass
class DecoderStats:
    steps: int = 0
    prefill_forwards: int = 0
    decode_forwards: int = 0
    max_rows: int = 0  # the most generations one step advanced together


class BatchFailed(RuntimeError):
    """A step raised: every generation that was in the batch (or joining it) is lost; the decoder starts afresh."""

    def __init__(self, generations: list[Generation]):
        super().__init__(f"a decode step failed; {len(generations)} generations lost")
        self.generations = generations


class Decoder:
    """Continuous batching: each ``step()`` advances every active generation by one token.

    A step (1) prefills the generations waiting to join, as one left-padded batch (up to ``max_batch_size`` rows in
    all and ``max_prefill_tokens`` padded prompt tokens per step), and appends them to the batch; (2) picks every
    row's next token from its logits (argmax for greedy rows; the sampled ones in one batched draw, each row with its
    own settings and its own generator's uniform); (3) lets finished and cancelled rows leave; (4) runs one batched
    forward of the chosen tokens, whose logits the next step picks from. No request waits for another's whole answer,
    and a request's tokens do not depend on its batch: each row attends only to its own slots, at its own positions.

    The batch cache (``KVCache``) has one row per generation and one slot per column; a row's prompt occupies the
    first slots of its prefill batch and each step appends one slot to every row. ``valid_BS`` marks the slots that
    hold one of the row's tokens, the rest being padding that the attention masks out; ``pos_BS`` holds each slot's
    position in its row's sequence (rotary embeddings take explicit positions, sliding windows compare them).

    All methods but ``submit`` must be called from one thread (the model's); ``submit`` and ``Generation.cancel`` may
    come from any.
    """

    def __init__(self, lm: Any, device: Any = "cpu", *, max_batch_size: int = 64, max_prefill_tokens: int = 4096):
        self.lm, self.device = lm, device
        self.max_batch_size, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        config = lm.config
        self.window = getattr(config, "sliding_window", None) if "sliding_attention" in (
            getattr(config, "layer_types", None) or ()) else None
        self.dtype = next(lm.parameters()).dtype
        self.per_row_alpha = hasattr(lm, "alpha")  # a ProxyLM: each row brings its own α
        self.waiting: deque[Generation] = deque()
        self.stats = DecoderStats()
        self._reset()

    def _reset(self) -> None:
        self.rows: list[Generation] = []
        self.cache = new_cache(self.lm)
        self.valid_BS = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
        self.pos_BS = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.next_pos_B = torch.zeros(0, dtype=torch.long, device=self.device)
        self.logits_BV: torch.Tensor | None = None

    def submit(self, gen: Generation) -> None:
        self.waiting.append(gen)

    @property
    def idle(self) -> bool:
        return not self.rows and not self.waiting

    @torch.inference_mode()
    def step(self) -> list[tuple[Generation, Step]]:
        """One token for every active generation: [(generation, its new text and finish reason)]."""
        joining = self._admit()
        if not self.rows and not joining:
            return []
        try:
            self._leave([g.cancelled for g in self.rows])
            if joining:
                self._prefill(joining)
            out = self._pick()
            if self.rows:
                self._decode()
        except Exception as e:
            lost = [g for g in self.rows + joining if g.finish_reason is None and not g.cancelled]
            self._reset()
            raise BatchFailed(lost) from e
        self.stats.steps += 1
        return out

    # ------------------------------------------------------------------------------------------------------ phases
    def _admit(self) -> list[Generation]:
        joining: list[Generation] = []
        longest = 0
        while self.waiting and len(self.rows) + len(joining) < self.max_batch_size:
            gen = self.waiting[0]
            if gen.cancelled:
                self.waiting.popleft()
                continue
            longest_then = max(longest, len(gen.prompt_ids))
            # a prompt over the budget is prefilled alone rather than never
            if joining and longest_then * (len(joining) + 1) > self.max_prefill_tokens:
                break
            joining.append(self.waiting.popleft())
            longest = longest_then
        return joining

    def _prefill(self, joining: list[Generation]) -> None:
        """The joining prompts as one batch, left-padded so that every row's last token is in the last column."""
        lengths_B = torch.tensor([len(g.prompt_ids) for g in joining], device=self.device)
        P = int(lengths_B.max())
        ids_BP = torch.zeros(len(joining), P, dtype=torch.long)
        for b, g in enumerate(joining):
            ids_BP[b, P - len(g.prompt_ids):] = torch.tensor(g.prompt_ids)
        start_B1 = (P - lengths_B).unsqueeze(1)
        slot_P = torch.arange(P, device=self.device)
        valid_BP = slot_P >= start_B1
        pos_BP = (slot_P - start_B1).clamp(min=0)
        causal_PP = slot_P.unsqueeze(1) >= slot_P.unsqueeze(0)
        allowed_BPP = causal_PP & valid_BP.unsqueeze(1)
        cache = new_cache(self.lm)
        logits_BV = self._forward(ids_BP.to(self.device), allowed_BPP, pos_BP, pos_BP, cache, joining)
        self.stats.prefill_forwards += 1

        # append the joiners below the batch; the shorter side gets empty slots on the right
        S = max(self.valid_BS.shape[1], P)
        widen = lambda t: torch.nn.functional.pad(t, (0, S - t.shape[1]))  # noqa: E731
        self.valid_BS = torch.cat([widen(self.valid_BS), widen(valid_BP)])
        self.pos_BS = torch.cat([widen(self.pos_BS), widen(pos_BP)])
        self.next_pos_B = torch.cat([self.next_pos_B, lengths_B])
        for mine, theirs in zip(_members(self.cache), _members(cache)):
            mine.join(theirs)
        self.logits_BV = logits_BV if self.logits_BV is None else torch.cat([self.logits_BV, logits_BV])
        self.rows += joining

    def _pick(self) -> list[tuple[Generation, Step]]:
        """Every row's next token, from the logits of its last forward; finished rows leave the batch."""
        self.stats.max_rows = max(self.stats.max_rows, len(self.rows))
        chosen_B = self.logits_BV.argmax(dim=-1)
        # sampled rows in two groups (with and without top-p), each one batched draw
        for nucleus in (False, True):
            rows = [b for b, g in enumerate(self.rows) if not g.greedy and (g.sampling.top_p < 1.0) == nucleus]
            if rows:
                gens = [self.rows[b] for b in rows]
                index = torch.tensor(rows, device=self.device)
                settings = lambda f: torch.tensor([f(g) for g in gens], device=self.device)  # noqa: E731
                chosen_B[index] = sample(self.logits_BV[index], settings(lambda g: g.sampling.temperature),
                                         settings(lambda g: g.sampling.top_p) if nucleus else None,
                                         settings(lambda g: g.draw()))
        tokens, out, done = [], [], []
        for gen, token in zip(self.rows, chosen_B.tolist()):  # one host sync for every row's token
            step = gen.accept(token)
            out.append((gen, step))
            tokens.append(token)
            done.append(step.finish_reason is not None)
        self._next_B = torch.tensor([t for t, d in zip(tokens, done) if not d], dtype=torch.long)
        self._leave(done)
        return out

    def _decode(self) -> None:
        """One forward of every row's chosen token, each at its own next position, attending to its own slots."""
        B = len(self.rows)
        pos_B1 = self.next_pos_B.unsqueeze(1)
        self.valid_BS = torch.cat([self.valid_BS, torch.ones(B, 1, dtype=torch.bool, device=self.device)], dim=1)
        self.pos_BS = torch.cat([self.pos_BS, pos_B1], dim=1)
        self.logits_BV = self._forward(self._next_B.unsqueeze(1).to(self.device), self.valid_BS.unsqueeze(1), pos_B1,
                                       self.pos_BS, self.cache, self.rows)
        self.next_pos_B = self.next_pos_B + 1
        self.stats.decode_forwards += 1

    def _leave(self, gone: list[bool]) -> None:
        if not any(gone):
            return
        keep = [b for b, g in enumerate(gone) if not g]
        self.rows = [self.rows[b] for b in keep]
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, device=self.device)
        for c in _members(self.cache):
            c.select(0, index)
        self.valid_BS, self.pos_BS = self.valid_BS[index], self.pos_BS[index]
        self.next_pos_B, self.logits_BV = self.next_pos_B[index], self.logits_BV[index]
        # Slots no remaining row uses (a long prompt that has left) still cost attention every step: drop them once
        # they are half the cache, so the copy is paid rarely.
        live_S = self.valid_BS.any(dim=0)
        if int((~live_S).sum()) * 2 >= live_S.numel():
            slots = live_S.nonzero().squeeze(1)
            for c in _members(self.cache):
                c.select(2, slots)
            self.valid_BS, self.pos_BS = self.valid_BS[:, slots], self.pos_BS[:, slots]

    # -------------------------------------------------------------------------------------------------------- model
    def _forward(self, ids_BT: torch.Tensor, allowed_BTS: torch.Tensor, pos_BT: torch.Tensor, pos_BS: torch.Tensor,
                 cache: Any, rows: list[Generation]) -> torch.Tensor:
        """Last-position logits [B, V] of ``ids_BT`` at positions ``pos_BT``; ``allowed_BTS``: which of the cache's
        slots (after this forward's are appended) each query may attend to."""
        # A query always sees itself: a padding query would otherwise see nothing, and the NaN of an empty softmax
        # would reach the cache (0 · NaN is NaN for every row that later reads that slot, masked or not).
        T = ids_BT.shape[1]
        S = allowed_BTS.shape[-1]
        self_TS = torch.arange(S - T, S, device=self.device).unsqueeze(1) == torch.arange(S, device=self.device)
        allowed_BTS = allowed_BTS | self_TS
        masks = {"full_attention": self._additive(allowed_BTS)}
        masks["sliding_attention"] = masks["full_attention"] if self.window is None else self._additive(
            allowed_BTS & ((pos_BT.unsqueeze(2) - pos_BS.unsqueeze(1)) < self.window) | self_TS)
        kwargs: dict[str, Any] = {}
        if self.per_row_alpha:
            kwargs["alpha"] = torch.tensor([self.lm.alpha if g.alpha is None else g.alpha for g in rows],
                                           device=self.device)
        out = self.lm(input_ids=ids_BT, attention_mask=masks, position_ids=pos_BT, cache=cache, use_cache=True,
                      logits_to_keep=1, **kwargs)
        return out.logits[:, -1]

    def _additive(self, allowed_BTS: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, S] additive mask (0 or the dtype's minimum): what eager and SDPA attention both accept."""
        mask = torch.zeros(allowed_BTS.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~allowed_BTS, torch.finfo(self.dtype).min).unsqueeze(1)
