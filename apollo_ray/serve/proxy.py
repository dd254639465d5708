"""Proxy-tuning (Liu et al., 2024; docs/methods.md §11) served as one more causal LM.

At every decoding step, on the last position,

    z = z_base + α · (z_expert − z_anti)

over the full vocabulary, then the usual greedy / temperature / top-p choice. ``ProxyLM`` is an ``nn.Module`` with
the causal-LM call signature whose logits are that sum, and whose cache is the three models' own KV caches: the
serving decode loop, streaming and option scoring (``evaluation.scoring``) work on it unchanged. α is per call.

Vocabularies: Qwen's large models have 152064 output rows and the small ones 151936, the extra rows being padding no
tokenizer produces. Each model's logits are zero-padded to the largest vocabulary, so where an offset has no row
the base speaks alone. Ids past the *smallest* model's embedding can never be fed back to all three models, so their
combined logit is −inf (they are not tokens of the shared tokenizer anyway: ``check_tokenizers`` makes sure). One
tokenizer, the base's, encodes and decodes; the others must map every token to the same id on the range they share,
which ``check_tokenizers`` verifies at start-up, refusing the trio with the models named.

Co-located, not composed: the three models live in one replica. Measured with ``bench/serve.py`` (CPU, 1 CPU and 1
torch thread per replica, greedy, per-token time = difference of 72- and 8-token answers / 64, fastest of 5):

    per token                               base alone   co-located (one replica)   composed (three deployments)
    tiny base + tiny expert / anti-expert    3.0 ms        6.0 ms (2.0× base)          24.6 ms (8.1× base)
    "large" base (369 MFLOP/token) + tiny   90.9 ms       90.7 ms (1.00×)              99.7 ms (1.10×)

Re-measured once the serving decoder batched the trio (2026-12-02, fastest of 3 with other work loading the machine):
tiny trio 2.36 ms alone, 8.46 ms co-located (3.6×: three tiny forwards, each mostly per-call overhead), 26.7 ms
composed (11.3×); large base 116.3 ms alone, 105.6 ms co-located (0.91×), 153.8 ms composed (1.32×).

A composed step pays three (concurrent) handle round trips every token, ~19 ms a step here against 6 ms of compute
for the tiny trio, and ships three full-vocabulary logit vectors (600 KB each at Qwen's 152k vocabulary); it also
needs each request's KV caches pinned to one replica of each model, which Serve's routing does not provide.
Co-located, a step is three forwards and one fused add: with the base much larger than the others (the intended use:
a 7B-70B base, a 0.5B-7B expert), proxy-tuning costs its FLOPs, (t_proxy / t_base) / (1 + 2·c_small/c_large) =
0.99-1.08 over runs (target ≤ 1.15). The price is memory: one replica holds the base plus two small models
(e.g. 7B + 2 × 0.5B ≈ 17 GB in bf16, one GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn


class IncompatibleTokenizers(ValueError):
    """The models' tokenizers map tokens to ids differently: their logits cannot be added id by id."""


def _id_to_token(tokenizer: Any) -> dict[int, str]:
    return {i: t for t, i in tokenizer.get_vocab().items()}


def check_tokenizers(tokenizers: Mapping[str, Any]) -> None:
    """Raise ``IncompatibleTokenizers`` naming both models unless every tokenizer maps each id of the range it shares
    with the first one (the base's) to the same token."""
    (ref_name, ref), *others = tokenizers.items()
    ref_map = _id_to_token(ref)
    for name, tok in others:
        other = _id_to_token(tok)
        shared = min(max(ref_map, default=-1), max(other, default=-1)) + 1
        diff = [i for i in range(shared) if ref_map.get(i) != other.get(i)]
        if diff:
            i = diff[0]
            raise IncompatibleTokenizers(
                f"proxy-tuning needs one vocabulary, but the tokenizers of {ref_name!r} and {name!r} differ on "
                f"{len(diff)} of the {shared} ids they share (e.g. id {i}: {ref_map.get(i)!r} vs {other.get(i)!r}); "
                f"use an expert and anti-expert of the base's model family")


def pad_vocab(logits: torch.Tensor, size: int) -> torch.Tensor:
    """``logits[..., V]`` zero-padded to ``[..., size]``."""
    extra = size - logits.shape[-1]
    return logits if extra == 0 else torch.nn.functional.pad(logits, (0, extra))


def combine(z_base: torch.Tensor, z_expert: torch.Tensor, z_anti: torch.Tensor,
            alpha: float | torch.Tensor) -> torch.Tensor:
    """z_base + α · (z_expert − z_anti) in fp32, each zero-padded to the largest vocabulary. ``alpha``: one number, or
    one per row ([B], for logits [B, ..., V]) when a batch holds requests with their own α."""
    size = max(z.shape[-1] for z in (z_base, z_expert, z_anti))
    b, e, a = (pad_vocab(z.float(), size) for z in (z_base, z_expert, z_anti))
    if torch.is_tensor(alpha):
        alpha = alpha.to(device=b.device, dtype=b.dtype).reshape(-1, *([1] * (b.dim() - 1)))
    return b + alpha * (e - a)


class ProxyCache:
    """The three models' KV caches as one: a cache operation (``batch_repeat_interleave`` when option scoring reuses
    a prompt's cache, ``crop``, ...) applies to each of them; what it returns is the base's answer."""

    def __init__(self, base: Any, expert: Any, anti_expert: Any):
        self.caches = (base, expert, anti_expert)

    def __iter__(self):
        return iter(self.caches)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "caches":
            raise AttributeError(name)
        members = [getattr(c, name) for c in self.caches]
        if not all(callable(m) for m in members):
            return members[0]

        def each(*args: Any, **kwargs: Any) -> Any:
            return [m(*args, **kwargs) for m in members][0]

        return each


@dataclass
class ProxyOutput:
    logits: torch.Tensor
    cache: ProxyCache | None = None


class ProxyLM(nn.Module):
    """Three causal LMs behaving as one whose logits are the proxy-tuned sum."""

    def __init__(self, base: nn.Module, expert: nn.Module, anti_expert: nn.Module, alpha: float = 1.0):
        super().__init__()
        self.base, self.expert, self.anti_expert = base, expert, anti_expert
        self.alpha = alpha
        models = (base, expert, anti_expert)
        # Ids every model can embed: the only tokens that may be chosen, since each is fed back to all three.
        self.usable_vocab = min(m.get_input_embeddings().num_embeddings for m in models)
        self.config = base.config  # eos ids: the base's (its tokenizer is the one used)
        self.generation_config = getattr(base, "generation_config", None)
        # every position is fed to all three models: the shortest context bounds the trio's
        self.context_length = min(int(getattr(m.config, "max_position_embeddings", None) or 1 << 20) for m in models)

    def new_cache(self) -> ProxyCache:
        """An empty batch cache for the serving decoder: one per model."""
        from apollo_ray.serve.engine import KVCache

        return ProxyCache(KVCache(), KVCache(), KVCache())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | dict | None = None,
                position_ids: torch.Tensor | None = None, cache: ProxyCache | None = None,
                use_cache: bool = False, logits_to_keep: int = 0,
                alpha: float | torch.Tensor | None = None) -> ProxyOutput:
        """``alpha``: this call's α, one number or one per row; ``attention_mask`` may be a mask per attention type
        (a dict, as the serving decoder builds them): the three models see the same tokens at the same positions."""
        caches = ProxyCache(None, None, None) if cache is None else cache

        def on(model: nn.Module, t: Any) -> Any:
            if isinstance(t, dict):
                return {k: v.to(model.device) for k, v in t.items()}
            return None if t is None else t.to(model.device)

        outs = [m(input_ids=on(m, input_ids), attention_mask=on(m, attention_mask), position_ids=on(m, position_ids),
                  cache=c, use_cache=use_cache, logits_to_keep=logits_to_keep)
                for m, c in zip((self.base, self.expert, self.anti_expert), caches)]
        device = outs[0].logits.device
        logits = combine(*(o.logits.to(device) for o in outs), self.alpha if alpha is None else alpha)
        if logits.shape[-1] > self.usable_vocab:
            logits[..., self.usable_vocab:] = float("-inf")
        return ProxyOutput(logits, ProxyCache(*(o.cache for o in outs)) if use_cache else None)


def check_models(names: Mapping[str, str], tokenizers: Mapping[str, Any], models: Mapping[str, nn.Module]) -> None:
    """Start-up checks of a trio (keys: base, expert, anti_expert): one vocabulary, and every token of the base's
    tokenizer embeddable by all three models."""
    check_tokenizers({names[k]: tokenizers[k] for k in ("base", "expert", "anti_expert")})
    n_tokens = len(tokenizers["base"])
    for k in ("base", "expert", "anti_expert"):
        rows = models[k].get_input_embeddings().num_embeddings
        if rows < n_tokens:
            raise IncompatibleTokenizers(f"{names[k]!r} embeds {rows} ids but the base tokenizer ({names['base']!r}) "
                                         f"has {n_tokens} tokens")
