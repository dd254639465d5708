"""Turning model outputs into answer letters: the reference's answer extraction, option log-likelihood, generation.

Log-likelihood scores the *answer label* after the cue: the continuation of option X is `` (X)`` (no space in zh/ja),
exactly the text the k-shot examples put after "The correct answer is". Scoring option texts instead would compare
continuations of different lengths (sum favours short ones, mean is noisy) and measures something else than the
papers, whose numbers come from the letter a model writes. All options of an item share one forward (with other
items when they fit in ``batch_rows``); the prediction is the option with the highest sum log-prob. Sums and
per-token means are both returned; with one label token per letter (the usual case) they rank options the same.
"""

from __future__ import annotations

import inspect
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from apollo_ray.evaluation.benchmark import Item
from apollo_ray.evaluation.prompts import continuations, encode

# ------------------------------------------------------------------------------------------------ answer extraction
# The reference pattern is [（\(]([A-Fa-f])[）\)]: ASCII letters (either case) in ASCII or full-width brackets.
_PAREN = re.compile(r"[（(]([A-Fa-f])[）)]")
# Arabic option labels: the abjad order (أ ب ج د ه و) plus the reference's C forms (س, ك: "سي", "ك" for C).
_ARABIC_LETTERS = {"أ": "A", "ا": "A", "ب": "B", "ج": "C", "س": "C", "ك": "C", "د": "D", "هـ": "E", "ه": "E",
                   "و": "F"}
_AR = "|".join(sorted(_ARABIC_LETTERS, key=len, reverse=True))
# bracketed on at least one side and not the first letter of a word: "(ب)", "ب)", "(ب" but never "(بالتأكيد"
_ARABIC_BRACKETED = re.compile(rf"(?:[（(]({_AR})[）)]?|(?<!\w)({_AR})[）)])(?!\w)")
_ARABIC_BARE = re.compile(rf"(?<!\w)({_AR})(?!\w)")
# a capital A-F standing alone; \b would fail in "答案是B" because CJK characters are word characters
_BARE = re.compile(r"(?<![A-Za-z0-9])([A-F])(?![A-Za-z0-9])")
_YES_NO = re.compile(r"^\s*(yes|no)\s*\.?\s*$", re.I)
_FULLWIDTH = str.maketrans("ＡＢＣＤＥＦａｂｃｄｅｆ", "ABCDEFabcdef")


def first_line(text: str) -> str:
    for line in text.split("\n"):
        if line.strip():
            return line
    return ""


def extract_answer(text: str, *, fullwidth_letters: bool = True) -> str | None:
    """The answer letter of a generated output, or None.

    The reference's rules on the first non-empty line: the most frequent parenthesised letter (ties: the first one
    written), Arabic labels counted with them; then, only when none, a bare Arabic label, a bare capital A-F, and
    "Yes."→A / "No."→B. Deviations, each a strict superset of what the reference reads correctly: full-width
    letters (``（Ｂ）``) count as ASCII unless ``fullwidth_letters=False``; the bare-letter fallback needs the letter
    to stand alone (the reference counts every capital A-F, so "Based on..." reads as B); Yes/No ignores case.
    """
    line = first_line(text)
    if fullwidth_letters:
        line = line.translate(_FULLWIDTH)
    found = [(m.start(), m.group(1).upper()) for m in _PAREN.finditer(line)]
    found += [(m.start(), _ARABIC_LETTERS[m.group(1) or m.group(2)]) for m in _ARABIC_BRACKETED.finditer(line)]
    if not found:
        found = [(m.start(), _ARABIC_LETTERS[m.group(1)]) for m in _ARABIC_BARE.finditer(line)]
    if not found:
        found = [(m.start(), m.group(1)) for m in _BARE.finditer(line)]
    if found:
        return _majority(found)
    m = _YES_NO.match(line)
    if m:
        return "A" if m.group(1).lower() == "yes" else "B"
    return None


def _majority(found: list[tuple[int, str]]) -> str:
    counts = Counter(letter for _, letter in found)
    top = max(counts.values())
    return next(letter for _, letter in sorted(found) if counts[letter] == top)


# --------------------------------------------------------------------------------------------- option log-likelihood
@dataclass(frozen=True)
class OptionScores:
    letters: tuple[str, ...]
    sums: tuple[float, ...]  # sum log-prob of each option's continuation tokens
    means: tuple[float, ...]  # the same per continuation token

    @property
    def predicted(self) -> str:
        return self.letters[max(range(len(self.sums)), key=self.sums.__getitem__)]


def loglik_scores(model: Any, tokenizer: Any, prompts: list[str], options: list[list[str]], device: Any = "cpu", *,
                  mean: bool = False, batch_rows: int = 32) -> list[list[float]]:
    """Log-likelihood of each continuation ``options[i][j]`` after ``prompts[i]``: sums (or per-token means)."""
    sums, means = _loglik(model, tokenizer, prompts, options, device, batch_rows)
    return means if mean else sums


def score_options(model: Any, tokenizer: Any, prompts: list[str], items: Sequence[Item], device: Any = "cpu", *,
                  batch_rows: int = 32) -> list[OptionScores]:
    """The predicted letter and per-option log-likelihoods of each item after its rendered prompt."""
    sums, means = _loglik(model, tokenizer, prompts, [continuations(it) for it in items], device, batch_rows)
    return [OptionScores(it.letters, tuple(s), tuple(m)) for it, s, m in zip(items, sums, means)]


def _loglik(model: Any, tokenizer: Any, prompts: list[str], options: list[list[str]], device: Any,
            batch_rows: int) -> tuple[list[list[float]], list[list[float]]]:
    import torch

    if len(prompts) != len(options):
        raise ValueError(f"{len(prompts)} prompts but {len(options)} option lists")
    if any(not opts for opts in options):
        raise ValueError("every prompt needs at least one option")
    rows = []
    for prompt, opts in zip(prompts, options):
        ctx = encode(tokenizer, prompt)
        rows.append([(ctx, _continuation_ids(tokenizer, prompt, ctx, c)) for c in opts])
    empty = [(i, j) for i, r in enumerate(rows) for j, (_, cont) in enumerate(r) if not cont]
    if empty:
        raise ValueError(f"option {empty[0][1]} of prompt {empty[0][0]} encodes to no tokens")
    sums: list[list[float]] = [[] for _ in prompts]
    means: list[list[float]] = [[] for _ in prompts]
    # longest first, so one forward holds prompts of similar length and padding stays small
    order = sorted(range(len(prompts)), key=lambda i: -max(len(c) + len(x) for c, x in rows[i]))
    pad_id = _pad_id(tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for group in _groups(order, [len(r) for r in rows], batch_rows):
                logprobs = iter(_forward_shared_prompt(model, [rows[i] for i in group], pad_id, device))
                for i in group:
                    for lp in (next(logprobs) for _ in rows[i]):
                        sums[i].append(float(lp.sum()))
                        means[i].append(float(lp.mean()))
    finally:
        model.train(was_training)
    return sums, means


def _continuation_ids(tokenizer: Any, prompt: str, ctx: list[int], continuation: str) -> list[int]:
    """The tokens of prompt+continuation past the prompt's own tokens ``ctx``, so sentencepiece tokenizers see the
    continuation in context; the continuation encoded alone when the boundary merges into one token."""
    whole = encode(tokenizer, prompt + continuation)
    if whole[:len(ctx)] == ctx:
        return whole[len(ctx):]
    return list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


def _groups(order: list[int], sizes: list[int], batch_rows: int) -> list[list[int]]:
    """Consecutive items whose option rows fit in ``batch_rows``; an item is never split across forwards."""
    groups: list[list[int]] = []
    rows = 0
    for i in order:
        if groups and rows + sizes[i] <= batch_rows:
            groups[-1].append(i)
            rows += sizes[i]
        else:
            groups.append([i])
            rows = sizes[i]
    return groups


def _forward_shared_prompt(model: Any, items: list[list[tuple[list[int], list[int]]]], pad_id: int,
                           device: Any) -> list:
    """Log-probs of each option's continuation tokens, the prompt computed once per item.

    Pass 1 runs the left-padded prompts and keeps their KV cache and last-position logits (which score every
    option's first token). Pass 2 repeats each item's cache once per option slot and runs the right-padded
    continuations on top of it. Options of one item share the whole prompt, so this does the prompt's work once
    instead of once per option (~4x less compute on 4-option items); right padding sits after the real tokens and,
    being causal, cannot change their logits.
    """
    import torch

    ctxs = [rows[0][0] for rows in items]
    conts = [[cont for _, cont in rows] for rows in items]
    slots = max(map(len, conts))
    width = max(map(len, ctxs))
    n = len(items)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for r, c in enumerate(ctxs):
        input_ids[r, width - len(c):] = torch.tensor(c, dtype=torch.long)
        mask[r, width - len(c):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs: dict[str, Any] = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device),
                use_cache=True, **kwargs)
    first_lp = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)  # [n, V]
    cache = out.cache
    cache.batch_repeat_interleave(slots)
    # Unused option slots of items with fewer options repeat their first option and are dropped below.
    flat = [cs[j] if j < len(cs) else cs[0] for cs in conts for j in range(slots)]
    clen = max(map(len, flat))
    cont_ids = torch.full((n * slots, clen), pad_id, dtype=torch.long)
    cont_mask = torch.zeros((n * slots, clen), dtype=torch.long)
    for r, c in enumerate(flat):
        cont_ids[r, :len(c)] = torch.tensor(c, dtype=torch.long)
        cont_mask[r, :len(c)] = 1
    starts = torch.tensor([len(c) for c in ctxs], dtype=torch.long).repeat_interleave(slots)
    cont_pos = starts[:, None] + torch.arange(clen)[None, :]
    full_mask = torch.cat([mask.repeat_interleave(slots, 0), cont_mask], dim=-1)
    out2 = model(input_ids=cont_ids.to(device), attention_mask=full_mask.to(device),
                 position_ids=cont_pos.to(device), cache=cache, use_cache=True)
    lp2 = torch.log_softmax(out2.logits.float(), dim=-1)  # [n*slots, clen, V]
    result = []
    for i, cs in enumerate(conts):
        for j, c in enumerate(cs):
            row = i * slots + j
            t = torch.tensor(c, dtype=torch.long, device=lp2.device)
            rest = lp2[row, :len(c) - 1].gather(-1, t[1:, None]).squeeze(-1)
            result.append(torch.cat([first_lp[i, c[0]].reshape(1).to(rest.device), rest]).cpu())
    return result


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


# -------------------------------------------------------------------------------------------------------- generation
def generate_answers(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 256, *,
                     batch_size: int = 8, device: Any = None, min_new_tokens: int = 0) -> list[str]:
    """Greedy continuations of ``prompts`` (special tokens stripped), batched with left padding.

    ``min_new_tokens`` keeps EOS from ending an answer sooner (the reference's generation sets 2).
    """
    import torch

    device = device if device is not None else next(model.parameters()).device
    pad_id = _pad_id(tokenizer)
    encoded = [encode(tokenizer, p) for p in prompts]
    extra = {"min_new_tokens": min(min_new_tokens, max_new_tokens)} if min_new_tokens > 0 else {}
    outputs: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                width = max(len(encoded[i]) for i in idx)
                input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    input_ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i], dtype=torch.long)
                    mask[r, width - len(encoded[i]):] = 1
                out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     pad_token_id=pad_id, **extra)
                for r, i in enumerate(idx):
                    outputs[i] = tokenizer.decode(out[r, width:].tolist(), skip_special_tokens=True)
    finally:
        model.train(was_training)
    return outputs
