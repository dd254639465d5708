"""Portable export: a Post-MoE checkpoint re-expressed as a stock transformers ``Qwen2MoeForCausalLM``.

A Post-MoE checkpoint (``model_type: apollo_post_moe``) opens only after ``import apollo_ray``, so vLLM, SGLang,
lm-eval and plain transformers cannot load it. At inference without language ids Post-MoE is a special case of
Qwen2-MoE, whose config and weights every one of them reads:

    Post-MoE                                   Qwen2-MoE
    dense layers (not in moe_layers)           mlp_only_layers (decoder_sparse_step 1: every other layer is sparse)
    mlp.router                                 mlp.gate (fp32 softmax, top-k, renormalised when norm_topk_prob)
    mlp.experts.<e> (full-size dense MLPs)     mlp.experts (moe_intermediate_size = intermediate_size)
    shared_expert + sigmoid gate               shared_expert + shared_expert_gate, same sizes
    no shared expert                           a shared expert whose down projection is zero: it adds exactly 0
    num_experts, num_experts_per_tok, norm_topk_prob: as trained

transformers 5 holds the experts fused (``gate_up_proj`` [E, 2·I, D], ``down_proj`` [E, D, I]); the folder is written
by ``save_pretrained``, which stores them in the hub's per-expert layout (``mlp.experts.<e>.gate_proj.weight``, as
Qwen1.5-MoE-A2.7B ships) that transformers 4 and 5, vLLM and SGLang all load.

What does not carry over: routing by language. ``language`` and ``hybrid`` routing need per-token language ids at
inference, which only our model class takes; the export routes every token by its learned router (top-k), which is
what our model does when it is called without language ids (serving, ``generate``). The shared expert stand-in
costs ``ZERO_SHARED_SIZE`` channels of compute per token in each sparse layer.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from apollo_ray.errors import UserError

log = logging.getLogger(__name__)

FORMATS = ("qwen2_moe",)
SUFFIX = "-qwen2_moe"  # models/<run>/ → models/<run>-qwen2_moe/
# The stand-in shared expert of a model without one: its down projection is zero, so its size changes nothing but
# cost. 128 channels divide evenly over tensor-parallel ranks (up to 8 × 16) in the engines that shard it.
ZERO_SHARED_SIZE = 128
_TOKENIZER_FILES = ("tokenizer", "special_tokens", "vocab", "merges", "chat_template", "added_tokens")


def portable_uri(model_uri: str) -> str:
    """Where the portable copy of the checkpoint at ``model_uri`` goes: a sibling folder."""
    return model_uri.rstrip("/") + SUFFIX


def to_qwen2_moe(model: torch.nn.Module) -> torch.nn.Module:
    """The Post-MoE ``model`` as a ``Qwen2MoeForCausalLM`` computing the same logits (without language ids)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    from transformers.initialization import no_init_weights

    c = model.config
    if c.model_type != "apollo_post_moe":
        raise UserError(f"a {c.model_type!r} checkpoint is not Post-MoE; a dense Qwen2 checkpoint is already portable "
                        f"(every engine opens it as it is)")
    if c.head_dim != c.hidden_size // c.num_attention_heads:
        raise UserError(f"head_dim {c.head_dim} != hidden_size / num_attention_heads: Qwen2-MoE engines (vLLM, "
                        f"SGLang) derive the head size from those two, so this model has no faithful Qwen2-MoE form")
    n = c.num_hidden_layers
    config = Qwen2MoeConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=n, num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range, rms_norm_eps=c.rms_norm_eps, use_cache=True,
        tie_word_embeddings=c.tie_word_embeddings, rope_parameters=c.rope_parameters,
        use_sliding_window=c.use_sliding_window, sliding_window=c.sliding_window,
        max_window_layers=c.max_window_layers, layer_types=list(c.layer_types), attention_dropout=c.attention_dropout,
        decoder_sparse_step=1, mlp_only_layers=[i for i in range(n) if i not in c.moe_layers],
        num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok, norm_topk_prob=c.norm_topk_prob,
        moe_intermediate_size=c.intermediate_size,
        shared_expert_intermediate_size=c.intermediate_size if c.shared_expert else ZERO_SHARED_SIZE,
        router_aux_loss_coef=c.router_aux_loss_coef, qkv_bias=True,
        pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
    )
    param = next(model.parameters())
    with no_init_weights(), torch.device(param.device):
        out = Qwen2MoeForCausalLM._from_config(config, dtype=param.dtype)
    out.load_state_dict(_qwen2_moe_state(model.state_dict(), out.state_dict(), c), strict=True)
    out.generation_config = model.generation_config
    return out.eval()


def _qwen2_moe_state(ours: dict[str, torch.Tensor], target: dict[str, torch.Tensor], c: Any) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in ours.items() if ".mlp." not in k or int(k.split(".")[2]) not in c.moe_layers}
    for i in c.moe_layers:
        p = f"model.layers.{i}.mlp"
        state[f"{p}.gate.weight"] = ours[f"{p}.router.weight"]
        experts = range(c.num_experts)
        # fused as Qwen2MoeExperts computes it: gate and up projections stacked along the output dim, gate first
        state[f"{p}.experts.gate_up_proj"] = torch.stack([torch.cat([ours[f"{p}.experts.{e}.gate_proj.weight"],
                                                                     ours[f"{p}.experts.{e}.up_proj.weight"]])
                                                          for e in experts])
        state[f"{p}.experts.down_proj"] = torch.stack([ours[f"{p}.experts.{e}.down_proj.weight"] for e in experts])
        shared = [f"{p}.shared_expert.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")]
        shared.append(f"{p}.shared_expert_gate.weight")
        for key in shared:
            # no shared expert: every weight zero, so down_proj(...) = 0 exactly whatever the gate says
            state[key] = ours[key] if c.shared_expert else torch.zeros_like(target[key])
    unexpected = sorted(set(state) - set(target))
    if unexpected:
        raise ValueError(f"tensors with no place in Qwen2-MoE: {unexpected[:5]}")
    return state


def export(src: str, out: str, *, fmt: str = "qwen2_moe", endpoint_url: str | None = None,
           source: str | None = None) -> str:
    """Write the portable copy of the checkpoint ``src`` (a path or storage URI) to ``out`` (the same): weights,
    config, generation config, tokenizer, then a manifest naming ``source`` (default ``src``). Returns ``out``."""
    from transformers import AutoModelForCausalLM

    import apollo_ray  # noqa: F401  (registers Post-MoE with the Auto classes)
    from apollo_ray.serve.engine import local_checkpoint
    from apollo_ray.storage import Manifest, Storage

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: supported are {', '.join(FORMATS)}")
    local = Path(local_checkpoint(src, endpoint_url))
    if not (local / "config.json").exists():
        raise UserError(f"{src} holds no checkpoint (no config.json); train one first (apollo-ray train)")
    model = AutoModelForCausalLM.from_pretrained(local, dtype="auto").eval()
    portable = to_qwen2_moe(model)
    routing = model.config.routing
    storage = Storage(out, endpoint_url)
    with tempfile.TemporaryDirectory(prefix="apollo-export-") as tmp:
        portable.save_pretrained(tmp)
        _add_legacy_keys(Path(tmp) / "config.json")
        for f in local.iterdir():
            if f.is_file() and f.name.startswith(_TOKENIZER_FILES):
                (Path(tmp) / f.name).write_bytes(f.read_bytes())
        storage.put_dir(tmp, out)
    storage.write_manifest(out, Manifest(
        stage="export", fingerprint=fmt, config={"format": fmt, "source": source or src},
        extra={"routing": routing, "model_type": "qwen2_moe", "architecture": "Qwen2MoeForCausalLM",
               "note": "routes by the learned router (top-k); language / hybrid routing needs apollo_ray's class"}))
    if routing != "topk":
        log.info("export: %s routes by %s with language ids; the Qwen2-MoE copy routes by its learned router alone, "
                 "as our model does without language ids", source or src, routing)
    log.info("export: %s → %s (Qwen2MoeForCausalLM)", source or src, out)
    return out


def _add_legacy_keys(path: Path) -> None:
    """Also write the config keys transformers 4 reads (engines pinned to it: vLLM and SGLang releases, lm-eval
    setups): ``rope_theta`` / ``rope_scaling`` beside transformers 5's ``rope_parameters``, ``torch_dtype`` beside
    ``dtype``. Without them a transformers-4 reader falls back to its default rope_theta and silently computes
    another model (Qwen2's is 1e6, the default 1e4)."""
    config = json.loads(path.read_text())
    rope = dict(config.get("rope_parameters") or {})
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope.pop("rope_theta"))
    if rope.get("rope_type", "default") != "default":
        config.setdefault("rope_scaling", {"type": rope["rope_type"], **rope})
    if "dtype" in config:
        config.setdefault("torch_dtype", config["dtype"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def run(cfg: Any, model: str | None = None, out: str | None = None, fmt: str = "qwen2_moe") -> str:
    """``apollo-ray export``: ``model`` defaults to this run's trained model, ``out`` to its ``-qwen2_moe`` sibling."""
    src = model or cfg.uri("models", cfg.train.run_name)
    return export(src, out or portable_uri(src), fmt=fmt, endpoint_url=cfg.storage.endpoint_url)
