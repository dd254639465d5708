"""Mix training, the pure parts: the priority sampler that orders the whole run, and the chat templating.

Apollo trains pretraining-style QA and instruction data in one run. Every item has a priority π and a number of epochs;
items are repeated ``epochs`` times and the whole order is drawn without replacement with

    P_t(x) = π(x) / Σ_{y ∈ D∖S_t} π(y)

so high-priority items tend to come early and low-priority ones late: a smooth move from "pretraining" to
"instruction tuning". Drawing that sequentially costs O(N²); Efraimidis–Spirakis keys give exactly the same law in one
sort. Nothing here does I/O or needs Ray: the mixture stage and the trainer call these functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
USER_PREFIX = "User:"
ASSISTANT_PREFIX = "Assistant:"
TURN_SEP = "\n"


# ------------------------------------------------------------------------------------------------------------ sampler
def priority_order(priorities: np.ndarray, epochs: np.ndarray, seed: int) -> np.ndarray:
    """The global training order: item indices, item ``i`` appearing ``epochs[i]`` times.

    Each copy gets the key E/π with E ~ Exp(1) (= −log U, the log form of Efraimidis–Spirakis' U^(1/π): no underflow
    for large π), and the copies are sorted by ascending key. The smallest of independent Exp(π_j) variables is copy j
    with probability π_j / Σπ, and by memorylessness the same holds for the rest after removing it — so the sorted
    order has exactly the sequential without-replacement law above, in O(N log N).

    The order depends only on (priorities, epochs, seed) and numpy's PCG64 stream; a trainer that must resume across
    numpy upgrades should persist the order rather than the seed.
    """
    pri = np.asarray(priorities, dtype=np.float64)
    ep = np.asarray(epochs)
    if pri.ndim != 1 or ep.shape != pri.shape:
        raise ValueError(f"priorities and epochs must be 1-D of the same length, got {pri.shape} and {ep.shape}")
    if not np.all(np.isfinite(pri) & (pri > 0)):
        raise ValueError("priorities must be finite and > 0")
    if not np.issubdtype(ep.dtype, np.integer) and not np.all(ep == np.floor(ep)):
        raise ValueError("epochs must be integers")
    ep = ep.astype(np.int64)
    if np.any(ep < 0):
        raise ValueError("epochs must be >= 0")
    items = np.repeat(np.arange(len(pri), dtype=np.int64), ep)
    rng = np.random.default_rng(seed)
    keys = rng.standard_exponential(len(items)) / pri[items]
    # Stable sort: ties have probability 0, but a stable sort keeps the result platform independent if they happen.
    return items[np.argsort(keys, kind="stable")]


def rank_slice(order: np.ndarray, rank: int, world_size: int, start: int = 0) -> np.ndarray:
    """The part of the global ``order`` that data-parallel ``rank`` trains on, from global position ``start`` on.

    Round-robin by position: rank r takes positions start + r, start + r + W, ... Contiguous blocks would hand rank 0
    all the early (high-priority) items and the last rank all the late ones, breaking the curriculum; round-robin keeps
    every rank at the same point of it. The ranks' slices are disjoint and their union is ``order[start:]``. Resuming:
    after every rank has consumed k items (global position k·W), ``rank_slice(order, r, W, start=k*W)`` equals
    ``rank_slice(order, r, W)[k:]``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    return np.asarray(order)[start + rank::world_size]


# --------------------------------------------------------------------------------------------------------- templating
def render(messages: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Tokenize a conversation for training: (input_ids, labels), labels −100 except on what the model must say.

    With a chat template, the template is used (see ``_render_chat_template``). Without one, Apollo's format:
    ``User:{q}\\nAssistant:{a}`` turns joined by ``\\n``, with EOS after *every* assistant turn — the reference only
    appends it at the very end but labels an EOS after each answer (one token off), so its intent is "stop after each
    answer", which is also the stop condition at serving time. Labels cover each answer's tokens and the EOS that ends
    it; prompts, role prefixes and separators stay −100.

    Segments (prompt, answer, EOS) are tokenized separately and concatenated, so the mask is exact by construction
    and the prompt tokens are the ones ``User:{q}\\nAssistant:`` gets at inference.
    """
    _check_messages(messages)
    # Turns after the last answer are context nobody answers: training on them only spends tokens.
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[: last + 1]
    if getattr(tokenizer, "chat_template", None):
        return _render_chat_template(messages, tokenizer)
    return _render_apollo(messages, tokenizer)


def render_item(item: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """``render`` for a mixture item (a record with ``messages``)."""
    return render(item["messages"], tokenizer)


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    if not messages:
        raise ValueError("empty conversation")
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: role must be system, user or assistant, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("conversation has no assistant turn: nothing to learn from")


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _render_apollo(messages: Sequence[Mapping[str, Any]],
                   tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token: Apollo's format ends every answer with EOS")
    ids: list[int] = []
    labels: list[int] = []
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    prompt = ""  # unlabelled text waiting to be tokenized, up to and including "Assistant:"
    for m in messages:
        sep = TURN_SEP if (ids or prompt) else ""
        if m["role"] == "system":
            prompt += sep + m["content"]
        elif m["role"] == "user":
            prompt += sep + USER_PREFIX + m["content"]
        else:
            prompt += sep + ASSISTANT_PREFIX
            p = _encode(tokenizer, prompt)
            a = _encode(tokenizer, m["content"]) + [eos]
            ids += p + a
            labels += [IGNORE_INDEX] * len(p) + a
            prompt = ""
    return ids, labels


def _render_chat_template(messages: Sequence[Mapping[str, Any]],
                          tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Label the assistant spans of a chat-templated conversation by rendering prefixes.

    For assistant turn i, the span is what ``messages[:i+1]`` adds to ``messages[:i]`` rendered with the generation
    prompt — the generation prompt itself stays unlabelled. This works for any template (no ``{% generation %}`` tags
    needed). Inside the span, tokens after its last special token (ChatML's ``<|im_end|>``) are unlabelled: they are
    the separator before the next turn, which the model never generates. Templates that re-render earlier turns
    differently once later turns exist (e.g. dropping past reasoning) are not prefix-stable and are refused.
    """
    def tok(msgs: Sequence[Mapping[str, Any]], gen: bool) -> list[int]:
        text = tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=gen)
        return _encode(tokenizer, text)

    ids = tok(messages, False)
    labels = [IGNORE_INDEX] * len(ids)
    special = set(tokenizer.all_special_ids)
    special.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, full = tok(messages[:i], True), tok(messages[: i + 1], False)
        if full[: len(prompt)] != prompt or ids[: len(full)] != full:
            raise ValueError("chat template is not prefix-stable (a later turn changes how an earlier one renders); "
                             "cannot locate the assistant tokens")
        span = range(len(prompt), len(full))
        ends = [j for j in span if full[j] in special]
        stop = ends[-1] + 1 if ends else len(full)
        for j in range(len(prompt), stop):
            labels[j] = ids[j]
    return ids, labels
