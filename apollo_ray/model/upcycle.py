"""Upcycling: a dense Qwen2 (or Llama / Mistral) checkpoint → a Post-MoE one.

Every weight is copied; in each of the last N decoder layers the dense MLP is copied into E full-size experts and a
bias-free router Linear(hidden → E) is drawn from N(0, router_init_std). With renormalised top-k weights the result
computes exactly the dense function at step 0 (the reference's unnormalised weights do not).

Shared expert (``shared_expert``, docs/methods.md §6 and §13):
* ``gated`` (ours): a dense-MLP copy with a zero down projection beside the E routed experts, behind a sigmoid gate
  drawn like the router; it adds exactly 0 at step 0, so upcycling stays function-preserving.
* ``reference`` (ApolloMoE's ``share_flag``): the shared expert is the whole dense MLP, and the routed part shrinks to
  E-1 experts with top-(k-1), so a token still runs k MLPs and the total stays E MLPs. Not function-preserving, as in
  the reference: at step 0 a sparse layer computes (Σ routed weights + sigmoid(gate·h)) · MLP(h), ≈ 1.5 · MLP(h) with
  renormalised weights. The family with the last expert id loses its expert (the reference crashes on it under
  language routing), which is why the typed config allows this variant with ``topk`` routing only.

Llama and Mistral bases become the same Qwen2-shaped model: their attention has no q/k/v bias, which Qwen2's has, so
those biases are zero (a function-preserving rewrite; 3 small vectors per layer) and Mistral's sliding window, which
applies to every layer, becomes ``layer_types = sliding_attention`` everywhere.
"""

from __future__ import annotations

import copy
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights

from apollo_ray import languages as langs
from apollo_ray.config import Config, fingerprint
from apollo_ray.errors import UserError
from apollo_ray.model.post_moe import PostMoEConfig, PostMoEForCausalLM
from apollo_ray.storage import Storage

log = logging.getLogger(__name__)

_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "tie_word_embeddings", "rope_parameters", "attention_dropout", "use_cache", "pad_token_id", "bos_token_id",
    "eos_token_id",
)
SHARED_EXPERTS = ("none", "gated", "reference")
_DENSE_MLP = re.compile(r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight")


def upcycle(
    dense_model: PreTrainedModel,
    *,
    layers: int,
    num_experts: int,
    top_k: int,
    routing: str,
    norm_topk_prob: bool = True,
    shared_expert: str | bool = "none",
    router_init_std: float = 0.02,
    expert_names: list[str],
    language_to_expert: dict[str, int],
    aux_loss_coef: float = 0.0,
    z_loss_coef: float = 0.0,
    seed: int = 0,
) -> PreTrainedModel:
    """The Post-MoE model whose last ``layers`` decoder layers are sparse; ``layers=0`` returns ``dense_model``."""
    if layers == 0:
        return dense_model
    dense_cfg = dense_model.config
    n = dense_cfg.num_hidden_layers
    if not 0 < layers <= n:
        raise UserError(f"moe.layers={layers}: the dense model has {n} decoder layers")
    moe_layers = list(range(n - layers, n))
    if isinstance(shared_expert, bool):  # the flag before the variants existed: True was the gated expert
        shared_expert = "gated" if shared_expert else "none"
    if shared_expert not in SHARED_EXPERTS:
        raise UserError(f"shared_expert={shared_expert!r}: expected one of {SHARED_EXPERTS}")
    if shared_expert == "reference":
        if top_k < 2:
            raise UserError(f"shared_expert=reference routes top-(k-1): top_k={top_k} leaves no routed expert")
        # The shared expert takes one of the E experts and one of the k slots (the reference's convert step).
        num_experts, top_k = num_experts - 1, top_k - 1
        expert_names = list(expert_names)[:num_experts]
        language_to_expert = {c: e for c, e in language_to_expert.items() if e < num_experts}
    config = PostMoEConfig(
        **_qwen2_fields(dense_cfg),
        moe_layers=moe_layers,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        routing=routing,
        norm_topk_prob=norm_topk_prob,
        shared_expert=shared_expert != "none",
        router_aux_loss_coef=aux_loss_coef,
        router_z_loss_coef=z_loss_coef,
        expert_names=list(expert_names),
        language_to_expert=dict(language_to_expert),
    )
    param = next(dense_model.parameters())
    # Every tensor is overwritten below, so random initialisation would only cost time (minutes for a 7B).
    with no_init_weights(), torch.device(param.device):
        model = PostMoEForCausalLM._from_config(config, dtype=param.dtype)

    state = _upcycled_state(dense_model.state_dict(), model.state_dict(), moe_layers, num_experts, shared_expert,
                            router_init_std, seed)
    model.load_state_dict(state, strict=True)
    # Built under no_init_weights the LM head is a tensor of its own; untied, it would drift from the embedding in
    # training, and a checkpoint saved with tie_word_embeddings=True would reload with the embedding in its place.
    model.tie_weights()
    model.generation_config = copy.deepcopy(dense_model.generation_config)
    model.train(dense_model.training)
    return model


def _qwen2_fields(cfg: Any) -> dict[str, Any]:
    """The dense config as Qwen2 fields (the Post-MoE model is Qwen2-shaped whatever the base family)."""
    if cfg.model_type not in ("qwen2", "llama", "mistral"):
        raise UserError(f"cannot upcycle model_type {cfg.model_type!r}: supported are qwen2, llama and mistral")
    fields = {k: getattr(cfg, k) for k in _SHARED_FIELDS}
    fields["head_dim"] = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if cfg.model_type == "qwen2":
        fields.update(use_sliding_window=cfg.use_sliding_window, sliding_window=cfg.sliding_window,
                      max_window_layers=cfg.max_window_layers, layer_types=list(cfg.layer_types))
        return fields
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise UserError(f"{cfg.model_type} with attention_bias/mlp_bias has biases Qwen2 layers cannot hold")
    if cfg.hidden_act != "silu":
        raise UserError(f"{cfg.model_type} with hidden_act={cfg.hidden_act!r}: only silu MLPs are supported")
    window = getattr(cfg, "sliding_window", None)
    fields.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=0,
                  layer_types=["sliding_attention" if window is not None else "full_attention"] * cfg.num_hidden_layers)
    return fields


def _upcycled_state(dense: dict[str, torch.Tensor], target: dict[str, torch.Tensor], moe_layers: list[int],
                    num_experts: int, shared_expert: str, router_init_std: float, seed: int
                    ) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in dense.items():
        m = _DENSE_MLP.fullmatch(key)
        if not (m and int(m[1]) in moe_layers):
            out[key] = tensor
            continue
        prefix, proj = f"model.layers.{m[1]}.mlp", m[2]
        for e in range(num_experts):
            out[f"{prefix}.experts.{e}.{proj}.weight"] = tensor  # load_state_dict copies: experts stay independent
        if shared_expert == "gated":
            # A zero down projection makes the shared expert start as a no-op, keeping upcycling function-preserving.
            out[f"{prefix}.shared_expert.{proj}.weight"] = torch.zeros_like(tensor) if proj == "down_proj" else tensor
        elif shared_expert == "reference":
            out[f"{prefix}.shared_expert.{proj}.weight"] = tensor  # the whole dense MLP, as the reference converts it
    # Drawn in fp32 on the CPU from one seed, so the router is the same whatever the device and dtype.
    generator = torch.Generator().manual_seed(seed)
    for key in sorted(k for k in target if k not in out):
        if key.endswith((".mlp.router.weight", ".mlp.shared_expert_gate.weight")):
            out[key] = torch.randn(target[key].shape, generator=generator) * router_init_std
        elif re.search(r"self_attn\.[qkv]_proj\.bias$", key):  # Llama / Mistral: no q/k/v bias
            out[key] = torch.zeros_like(target[key])
        elif key == "lm_head.weight" and "model.embed_tokens.weight" in dense:  # tied, listed once by the base
            out[key] = dense["model.embed_tokens.weight"]
    return out


# ------------------------------------------------------------------------------------------------- from the config
def moe_config_from(cfg: Config) -> dict[str, Any]:
    """``upcycle`` keyword arguments from the typed config: ``upcycle(dense, **moe_config_from(cfg))``."""
    m = cfg.moe
    return dict(
        layers=m.layers,
        num_experts=cfg.num_experts,
        top_k=m.top_k,
        routing=m.routing,
        norm_topk_prob=m.renormalize,
        shared_expert=m.shared_expert,
        router_init_std=m.router_init_std,
        expert_names=langs.expert_names(m.experts, cfg.languages.include),
        language_to_expert=langs.expert_map(m.experts, cfg.languages.include),
        aux_loss_coef=m.aux_loss_coef,
        z_loss_coef=m.z_loss_coef,
        seed=cfg.train.seed,
    )


def upcycle_checkpoint(base: str, out: str, cfg: Config) -> str:
    """Load the dense ``base`` (hub id or local path), upcycle it as ``cfg.moe`` says, save model + tokenizer to
    ``out`` (local folder or storage URI; safetensors). A finished ``out`` (config.json present) is reused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    storage = Storage(out, cfg.storage.endpoint_url)
    if storage.exists(f"{out.rstrip('/')}/config.json"):
        log.info("upcycled checkpoint already at %s", out)
        return out
    try:
        dense = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, cfg.model.dtype))
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or base)
    except OSError as e:  # not a folder, not on the hub, or no hub reachable: transformers says which
        raise UserError(f"model.base={base!r} (or model.tokenizer): cannot load it: {str(e).splitlines()[0]}") from e
    model = upcycle(dense, **moe_config_from(cfg))
    with tempfile.TemporaryDirectory(prefix="apollo-upcycle-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # config.json last: its presence marks the folder complete (and lets a rerun skip the work).
        config_bytes = (Path(tmp) / "config.json").read_bytes()
        (Path(tmp) / "config.json").unlink()
        storage.put_dir(tmp, out)
        storage.write_bytes(f"{out.rstrip('/')}/config.json", config_bytes)
    log.info("upcycled %s → %s (%s)", base, out, "dense: moe.layers=0" if not cfg.moe.layers else
             f"{cfg.num_experts} experts, top-{cfg.moe.top_k}, last {cfg.moe.layers} layers, {cfg.moe.routing}")
    return out


def run(cfg: Config, base: str | None = None, out: str | None = None) -> str:
    """Stage entry (``apollo-ray upcycle``): base defaults to ``model.base`` ('tiny' is built on first use), out to
    ``<root>/models/post-moe-<fingerprint of base and moe config>``."""
    from apollo_ray.model import tiny

    base = base or cfg.model.base
    if base == "tiny" and cfg.model.base != "tiny":
        raise UserError(f"base 'tiny' needs model.base=tiny (it is {cfg.model.base!r})")
    arch = cfg.model.arch.model_dump() if base == "tiny" and cfg.model.arch else None
    moe = cfg.moe.model_dump(exclude={"ep_size"})  # expert parallelism does not change the weights
    out = out or cfg.uri("models", "post-moe-" + fingerprint(base, arch, moe, cfg.languages.include, cfg.train.seed))
    if base == "tiny":
        base = tiny.ensure_base(cfg, Storage.from_config(cfg))
    return upcycle_checkpoint(base, out, cfg)
