"""Post-MoE (Apollo-MoE): a dense Qwen2 whose last N decoder layers are sparse mixtures of experts.

Reads top to bottom: config → sparse block (router, routing rules, dropless dispatch, statistics) → decoder layer →
model → causal LM. Everything that is not a sparse block is the stock transformers Qwen2 code, so an upcycled
checkpoint is a Qwen2 checkpoint plus ``mlp.router`` / ``mlp.experts.<e>`` tensors in the sparse layers.

Per-token language ids (expert ids, -1 for padding or an unknown language) travel as an explicit
``forward(..., language_ids=...)`` argument from the causal LM down to every sparse block; there is no global state.
The model is single-device code; expert parallelism is applied elsewhere.

Shapes are named by suffix: B batch, T time, D hidden, N = B·T tokens, E experts, K experts per token, L MoE layers.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel, Qwen2Config
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2DecoderLayer,
    Qwen2ForCausalLM,
    Qwen2MLP,
    Qwen2Model,
    Qwen2PreTrainedModel,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
)
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

ROUTINGS = ("topk", "language", "hybrid")


# ------------------------------------------------------------------------------------------------------------ config
@strict
class PostMoEConfig(Qwen2Config):
    r"""A Qwen2 config plus the Post-MoE knobs (all of them here, as in Qwen2-MoE's config).

    moe_layers: decoder layer indices that are sparse (upcycling makes them the last N).
    num_experts / num_experts_per_tok: E experts per sparse layer, each a full copy of the dense MLP; top-k = K.
    routing: ``"topk"`` (learned router only), ``"language"`` (the token's language expert alone, weight 1) or
        ``"hybrid"`` (training: top-k, the token's language expert replaces the k-th choice when it is missing;
        evaluation: plain top-k, or hybrid too when ``hybrid_in_eval`` and language ids are given).
    norm_topk_prob: True renormalises the chosen weights to sum to 1, so upcycling is function-preserving. False keeps
        the reference code's *unnormalised* softmax weights: at initialisation every MoE output is the dense MLP output
        scaled by the sum of the chosen probabilities.
    shared_expert: add an always-on expert MLP behind a sigmoid gate, beside the routed ones. How it starts is
        upcycling's choice (``moe.shared_expert``): ``gated`` zeroes its down projection beside E routed experts
        (function-preserving); ``reference`` copies the dense MLP whole and routes top-(k-1) of E-1 experts, as the
        reference code does, so ``num_experts`` / ``num_experts_per_tok`` here already count the routed ones only.
    router_aux_loss_coef / router_z_loss_coef: weights of the load-balancing and z losses added to the LM loss.
    expert_names: a display name per expert (language families or languages), for metrics and plots.
    language_to_expert: language code → expert id; the data side uses it to build ``language_ids``. Ids the model
        has no expert for (≥ num_experts: the family the ``reference`` shared expert took the place of) count as -1.
    """

    model_type = "apollo_post_moe"

    moe_layers: list[int] | None = None
    num_experts: int = 7
    num_experts_per_tok: int = 2
    routing: str = "hybrid"
    norm_topk_prob: bool = True
    hybrid_in_eval: bool = False
    shared_expert: bool = False
    router_aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.0
    expert_names: list[str] | None = None
    language_to_expert: dict[str, int] | None = None
    # Llama/Mistral bases may have head_dim != hidden / heads; Qwen2Attention reads it when present.
    head_dim: int | None = None

    def __post_init__(self, **kwargs):
        self.moe_layers = sorted(set(self.moe_layers or []))
        self.expert_names = list(self.expert_names or [f"expert_{e}" for e in range(self.num_experts)])
        self.language_to_expert = dict(self.language_to_expert or {})
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)

    def validate_moe(self) -> None:
        if any(not 0 <= i < self.num_hidden_layers for i in self.moe_layers):
            raise ValueError(f"moe_layers {self.moe_layers} outside 0..{self.num_hidden_layers - 1}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing {self.routing!r}: expected one of {ROUTINGS}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} not in 1..{self.num_experts}")
        if len(self.expert_names) != self.num_experts:
            raise ValueError(f"{len(self.expert_names)} expert_names for {self.num_experts} experts")
        bad = {c: e for c, e in self.language_to_expert.items() if not 0 <= e < self.num_experts}
        if bad:
            raise ValueError(f"language_to_expert maps to experts outside 0..{self.num_experts - 1}: {bad}")

    def expert_of(self, language: str) -> int:
        """The expert id of a language code, -1 when the model has none for it (routed by the learned router)."""
        return self.language_to_expert.get(language, -1)


# ------------------------------------------------------------------------------------------------------ sparse block
class LayerRouting(NamedTuple):
    """What one sparse block reports about a forward pass (padding and unknown-language tokens excluded)."""

    aux_loss: torch.Tensor  # scalar, differentiable
    z_loss: torch.Tensor  # scalar, differentiable
    tokens_per_expert: torch.Tensor  # [E] long: each selection of a token counts once
    language_expert_counts: torch.Tensor  # [E, E] long: row = the token's language expert, column = chosen expert


class PostMoEBlock(nn.Module):
    """Router + E expert MLPs (+ optional gated shared expert), dropless: every token reaches all its experts."""

    def __init__(self, config: PostMoEConfig):
        super().__init__()
        # Routing knobs are read from the config at every forward, so flipping e.g. ``config.hybrid_in_eval`` on a
        # built model takes effect (the reference sets its language-gate flag after building, where it is ignored).
        self.config = config
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(Qwen2MLP(config) for _ in range(config.num_experts))
        self.shared_expert = Qwen2MLP(config) if config.shared_expert else None
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if config.shared_expert else None

    def forward(self, x_BTD: torch.Tensor, language_ids_BT: torch.Tensor | None = None,
                token_mask_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerRouting]:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        lang_N = None if language_ids_BT is None else language_ids_BT.reshape(-1)
        logits_NE, ids_NK, weights_NK = self.route(x_ND, lang_N)
        y_ND = self.dispatch(x_ND, ids_NK, weights_NK)
        if self.shared_expert is not None:
            y_ND = y_ND + torch.sigmoid(self.shared_expert_gate(x_ND)) * self.shared_expert(x_ND)
        mask_N = torch.ones_like(x_ND[:, 0], dtype=torch.bool) if token_mask_BT is None else token_mask_BT.reshape(-1)
        return y_ND.view(B, T, D), self.statistics(logits_NE, ids_NK, lang_N, mask_N)

    def route(self, x_ND: torch.Tensor, lang_N: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits [N, E] (fp32), chosen experts [N, K] (-1 = empty slot) and their fp32 weights [N, K]."""
        cfg = self.config
        # fp32 logits: near-ties are decided the same way whether the model runs in bf16 or fp32.
        logits_NE = F.linear(x_ND.float(), self.router.weight.float())
        probs_NE = logits_NE.softmax(dim=-1)
        top_p_NK, ids_NK = probs_NE.topk(cfg.num_experts_per_tok, dim=-1)
        by_language = lang_N is not None and (
            cfg.routing == "language" or (cfg.routing == "hybrid" and (self.training or cfg.hybrid_in_eval)))
        if not by_language:
            return logits_NE, ids_NK, self._normalise(top_p_NK)

        # Tokens without a language (-1: padding, unknown language) fall back to plain top-k.
        known_N1 = (lang_N >= 0).unsqueeze(1)
        lang_N1 = lang_N.clamp(min=0).unsqueeze(1)
        if cfg.routing == "language":
            # The language expert alone, weight 1. As in the reference, the LM loss then sends no gradient to the
            # router (only the aux / z losses do, when their coefficients are > 0).
            lang_ids_NK = torch.cat([lang_N1, torch.full_like(ids_NK[:, 1:], -1)], dim=1)
            lang_w_NK = torch.cat([torch.ones_like(top_p_NK[:, :1]), torch.zeros_like(top_p_NK[:, 1:])], dim=1)
            return (logits_NE, torch.where(known_N1, lang_ids_NK, ids_NK),
                    torch.where(known_N1, lang_w_NK, self._normalise(top_p_NK)))

        # hybrid: the language expert takes the k-th (lowest) slot when the router did not pick it; weights are the
        # router's probabilities at the chosen experts, so the router keeps learning from the LM loss.
        missing_N1 = known_N1 & (ids_NK != lang_N1).all(dim=1, keepdim=True)
        ids_NK = torch.cat([ids_NK[:, :-1], torch.where(missing_N1, lang_N1, ids_NK[:, -1:])], dim=1)
        return logits_NE, ids_NK, self._normalise(probs_NE.gather(1, ids_NK))

    def _normalise(self, weights_NK: torch.Tensor) -> torch.Tensor:
        return weights_NK / weights_NK.sum(dim=-1, keepdim=True) if self.config.norm_topk_prob else weights_NK

    def dispatch(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
        """Σ_k w_k · expert_k(x): tokens sorted by expert, one matmul per expert on a contiguous slice, no capacity."""
        E, K = len(self.experts), ids_NK.shape[1]
        ids_A = ids_NK.reshape(-1)  # A = N·K assignments
        order_A = ids_A.argsort(stable=True)
        # Empty slots (-1, language routing) sort first and are skipped; one host sync for the slice sizes.
        sizes = torch.bincount(ids_A + 1, minlength=E + 1).tolist()
        order_A = order_A[sizes[0]:]
        token_A = order_A // K
        x_AD = x_ND.index_select(0, token_A)
        # Every expert runs, even on zero tokens, so each parameter gets a (zero) gradient every step and data-parallel
        # gradient reduction never waits for a parameter that was not used.
        y_AD = torch.cat([expert(x) for expert, x in zip(self.experts, x_AD.split(sizes[1:]))])
        y_AD = y_AD * weights_NK.reshape(-1)[order_A].unsqueeze(1).to(y_AD.dtype)
        return torch.zeros_like(x_ND).index_add_(0, token_A, y_AD)

    def statistics(self, logits_NE: torch.Tensor, ids_NK: torch.Tensor, lang_N: torch.Tensor | None,
                   mask_N: torch.Tensor) -> LayerRouting:
        """Counts and losses over the counted tokens: not masked out, and with a language when ids are given."""
        E = self.config.num_experts
        valid_N = mask_N if lang_N is None else mask_N & (lang_N >= 0)
        with torch.no_grad():
            picked_NK = (valid_N.unsqueeze(1) & (ids_NK >= 0)).long()
            expert_NK = ids_NK.clamp(min=0)
            tokens_E = torch.zeros(E, dtype=torch.long, device=ids_NK.device).scatter_add_(
                0, expert_NK.reshape(-1), picked_NK.reshape(-1))
            lang_EE = torch.zeros(E * E, dtype=torch.long, device=ids_NK.device)
            if lang_N is not None:
                cell_NK = lang_N.clamp(min=0).unsqueeze(1) * E + expert_NK
                lang_EE.scatter_add_(0, cell_NK.reshape(-1), picked_NK.reshape(-1))
        # Switch-Transformer balance loss: E · Σ_e (share of selections to e) · (mean router probability of e);
        # equals 1 when both are uniform. The selection share is a count, so only the probabilities carry gradient.
        valid_N1 = valid_N.unsqueeze(1).float()
        n_valid = valid_N1.sum().clamp(min=1)
        share_E = tokens_E.float() / tokens_E.sum().clamp(min=1)
        mean_prob_E = (logits_NE.softmax(dim=-1) * valid_N1).sum(dim=0) / n_valid
        aux_loss = E * (share_E * mean_prob_E).sum()
        # ST-MoE z-loss keeps router logits small, which keeps the fp32 softmax away from saturation.
        z_loss = (logits_NE.logsumexp(dim=-1).square() * valid_N1.squeeze(1)).sum() / n_valid
        return LayerRouting(aux_loss, z_loss, tokens_E, lang_EE.view(E, E))


# ----------------------------------------------------------------------------------------------------- decoder layer
class PostMoEDecoderLayer(Qwen2DecoderLayer):
    """Qwen2's decoder layer; in the sparse layers the MLP is a PostMoEBlock and the layer also returns its routing."""

    def __init__(self, config: PostMoEConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        if layer_idx in config.moe_layers:
            self.mlp = PostMoEBlock(config)  # replaces the dense MLP the parent built

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # callers of the old name keep working
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        language_ids: torch.LongTensor | None = None,
        token_mask: torch.BoolTensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, LayerRouting | None]:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        routing = None
        if isinstance(self.mlp, PostMoEBlock):
            hidden_states, routing = self.mlp(hidden_states, language_ids, token_mask)
        else:
            hidden_states = self.mlp(hidden_states)
        return residual + hidden_states, routing


# ------------------------------------------------------------------------------------------------------------ model
@dataclass
class RouterStats:
    """Routing counts of one forward pass, for metrics and heatmaps; sum them over batches.

    Padding (attention mask 0) and tokens with language id < 0 are excluded, so per layer
    ``tokens_per_expert.sum() == counted tokens × K`` (× 1 for tokens routed to their language expert alone).
    """

    moe_layers: list[int]
    tokens_per_expert: torch.Tensor  # [L, E] long
    language_expert_counts: torch.Tensor  # [L, E, E] long: [layer, token's language expert, chosen expert]


@dataclass
class PostMoEModelOutput(BaseModelOutputWithPast):
    aux_loss: torch.FloatTensor | None = None  # mean over the sparse layers
    z_loss: torch.FloatTensor | None = None  # mean over the sparse layers
    router_stats: RouterStats | None = None


@dataclass
class PostMoECausalLMOutput(CausalLMOutputWithPast):
    """``loss`` = LM loss + router_aux_loss_coef · aux_loss + router_z_loss_coef · z_loss (when labels are given)."""

    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    router_stats: RouterStats | None = None


class PostMoEPreTrainedModel(Qwen2PreTrainedModel):
    config_class = PostMoEConfig
    config: PostMoEConfig
    _no_split_modules = ["PostMoEDecoderLayer"]
    _can_record_outputs = {"hidden_states": PostMoEDecoderLayer, "attentions": Qwen2Attention}


class PostMoEModel(PostMoEPreTrainedModel, Qwen2Model):
    def __init__(self, config: PostMoEConfig):
        # Not Qwen2Model.__init__: it would build (and initialise) dense layers only for them to be replaced.
        PreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(PostMoEDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.has_sliding_layers = "sliding_attention" in config.layer_types
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        language_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> PostMoEModelOutput:
        r"""language_ids: expert id per token [B, T] or per sequence [B] (use [B] with ``generate``); -1 = none."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        B, T = inputs_embeds.shape[:2]
        # A 2-D padding mask also covers cached positions during generation: its last T columns are this step's.
        token_mask = attention_mask[:, -T:].bool() if torch.is_tensor(attention_mask) and attention_mask.dim() == 2 \
            else None
        if language_ids is not None:
            language_ids = language_ids.to(device=inputs_embeds.device, dtype=torch.long)
            if language_ids.dim() == 1:
                language_ids = language_ids.unsqueeze(1).expand(B, T)
            if language_ids.shape != (B, T):
                raise ValueError(f"language_ids has shape {tuple(language_ids.shape)}; expected ({B}, {T}) or ({B},)")
            # The data side numbers experts by the config's assignment; with a `reference` shared expert the model
            # routes one expert fewer, and an id past the last one would index outside the router and the counts.
            language_ids = language_ids.masked_fill(language_ids >= self.config.num_experts, -1)

        if not isinstance(causal_mask_mapping := attention_mask, dict):
            mask_kwargs = {
                "config": self.config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                "cache": cache,
                "position_ids": position_ids,
            }
            causal_mask_mapping = {"full_attention": create_causal_mask(**mask_kwargs)}
            if self.has_sliding_layers:
                causal_mask_mapping["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        routings: list[LayerRouting] = []
        for i, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            hidden_states, routing = decoder_layer(
                hidden_states,
                attention_mask=causal_mask_mapping[self.config.layer_types[i]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                language_ids=language_ids,
                token_mask=token_mask,
                **kwargs,
            )
            if routing is not None:
                routings.append(routing)

        output = PostMoEModelOutput(
            last_hidden_state=self.norm(hidden_states),
            cache=cache if use_cache else None,
        )
        if routings:
            output.aux_loss = torch.stack([r.aux_loss for r in routings]).mean()
            output.z_loss = torch.stack([r.z_loss for r in routings]).mean()
            output.router_stats = RouterStats(
                moe_layers=list(self.config.moe_layers),
                tokens_per_expert=torch.stack([r.tokens_per_expert for r in routings]),
                language_expert_counts=torch.stack([r.language_expert_counts for r in routings]),
            )
        return output


class PostMoEForCausalLM(PostMoEPreTrainedModel, Qwen2ForCausalLM):
    def __init__(self, config: PostMoEConfig):
        PreTrainedModel.__init__(self, config)  # not Qwen2ForCausalLM.__init__: it would build a dense Qwen2Model
        self.model = PostMoEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        language_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> PostMoECausalLMOutput:
        r"""language_ids: expert id per token [B, T] or per sequence [B]; -1 = padding / no language expert."""
        outputs: PostMoEModelOutput = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            language_ids=language_ids,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if outputs.aux_loss is not None:
                if self.config.router_aux_loss_coef:
                    loss = loss + self.config.router_aux_loss_coef * outputs.aux_loss.to(loss.device)
                if self.config.router_z_loss_coef:
                    loss = loss + self.config.router_z_loss_coef * outputs.z_loss.to(loss.device)

        return PostMoECausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aux_loss=outputs.aux_loss,
            z_loss=outputs.z_loss,
            router_stats=outputs.router_stats,
        )


# Importing apollo_ray registers the architecture, so from_pretrained needs no trust_remote_code.
AutoConfig.register(PostMoEConfig.model_type, PostMoEConfig, exist_ok=True)
AutoModel.register(PostMoEConfig, PostMoEModel, exist_ok=True)
AutoModelForCausalLM.register(PostMoEConfig, PostMoEForCausalLM, exist_ok=True)
