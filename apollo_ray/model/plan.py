"""Parameters, memory per GPU and FLOPs of a run, from the config alone (no weights, no GPU).

Counts follow the Qwen2 architecture of ``model.arch`` (q/k/v biases, SwiGLU MLP, RMSNorm). Post-MoE adds, per sparse
layer, E-1 more copies of the MLP and a router; a token uses K of them (1 with language routing), so

    active = dense + per sparse layer ((K-1) · MLP + router) [+ shared expert and its gate]

which gives docs/methods.md §8's 0.52 B / 1.63 B / 8.02 B for the qwen2 presets (top-2 of 7 experts, last 2 layers).
A ``gated`` shared expert adds one MLP and a gate to both counts. A ``reference`` one replaces an expert and a slot
(top-(K-1) of E-1 routed experts + the shared MLP and its gate), so its counts equal those without a shared expert.

Memory uses the ZeRO paper's accounting (Rajbhandari et al., 2020): per parameter, bf16 weights 2 B + bf16 grads 2 B
+ Adam 12 B (fp32 master, m, v); fp32 training 4 + 4 + 8 B. Stage 1 shards the optimizer states over the
data-parallel ranks, stage 2 also the gradients, stage 3 also the weights. Expert weights are first split over
``moe.ep_size`` ranks and their states sharded over the remaining num_workers / ep_size ranks (DeepSpeed-MoE).
Activations are an estimate for SDPA/flash attention (no T² term); with ``train.activation_checkpointing`` each decoder
layer keeps only its input and one layer at a time is recomputed whole. Expect ±30 %.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from apollo_ray.config import ArchConfig, Config
from apollo_ray.errors import UserError

GIB = 1 << 30
# Usable device memory in GiB, by resources.gpu_type.
GPU_MEMORY_GIB: dict[str, float] = {
    "H200": 141, "H100-80GB": 80, "H100": 80, "A100-80GB": 80, "A100-40GB": 40, "L40S": 48, "A10G": 24, "L4": 24,
}
# Kept free for the CUDA context, NCCL buffers, allocator fragmentation and temporaries the estimate ignores.
HEADROOM = 0.10
# bytes per parameter: (weights, gradients, optimizer states)
BYTES_PER_PARAM: dict[str, tuple[int, int, int]] = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}


@dataclass(frozen=True)
class Memory:
    """GiB per GPU."""

    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


@dataclass(frozen=True)
class Plan:
    preset: str
    base: str
    dense_params: int
    total_params: int  # Post-MoE, all experts (= dense_params when moe.layers = 0)
    active_params: int  # used by one token
    expert_params: int  # in expert MLPs, split over ep_size ranks
    moe_layers: int
    num_experts: int  # routed experts per sparse layer
    experts_per_token: int  # routed experts a token uses
    shared_expert: str
    routing: str
    zero_stage: int
    precision: str
    activation_checkpointing: bool
    data_parallel: int
    grad_accum: int
    ep_size: int
    tokens_per_gpu_micro_step: int
    tokens_per_step: int
    flops_per_token: float  # training (forward + backward)
    memory: Memory  # at train.zero_stage
    total_gib_by_stage: dict[int, float]
    gpu_type: str | None
    gpu_memory_gib: float | None
    fits: bool | None  # None: no GPU, or a gpu_type without a known memory size

    def to_dict(self) -> dict:
        out = asdict(self)
        out["memory"]["total"] = self.memory.total
        return out

    def format(self) -> str:
        def b(n: int) -> str:
            return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"

        m = self.memory
        shared = "" if self.shared_expert == "none" else f" + a shared expert ({self.shared_expert})"
        moe = (f"top-{self.experts_per_token} of {self.num_experts} experts{shared} in the last {self.moe_layers} "
               f"layers, {self.routing} routing" if self.moe_layers else "dense (moe.layers = 0)")
        if self.fits is None:
            verdict = "no GPU memory to compare with" if self.gpu_type is None else f"unknown gpu_type {self.gpu_type}"
        else:
            usable = self.gpu_memory_gib * (1 - HEADROOM)
            verdict = f"{'fits' if self.fits else 'does NOT fit'} in {usable:.0f} GiB usable of {self.gpu_type}"
        rows = [
            f"plan: preset {self.preset} ({self.base}), {moe}",
            f"  parameters       dense {b(self.dense_params)} | Post-MoE total {b(self.total_params)} | "
            f"active {b(self.active_params)} | in experts {b(self.expert_params)}",
            f"  step             {self.data_parallel} workers x {self.tokens_per_gpu_micro_step:,} tokens x "
            f"{self.grad_accum} accumulation "
            f"= {self.tokens_per_step:,} tokens",
            f"  FLOPs / token    {self.flops_per_token / 1e9:.3g} GFLOP (training: 6 x matmul params + attention)",
            f"  memory / GPU     ZeRO-{self.zero_stage}, {self.precision}, ep_size {self.ep_size} (GiB)",
            f"    weights        {m.weights:8.2f}",
            f"    gradients      {m.gradients:8.2f}",
            f"    optimizer      {m.optimizer:8.2f}",
            f"    activations    {m.activations:8.2f}"
            + ("   (checkpointed: layer inputs + one layer)" if self.activation_checkpointing else ""),
            f"    total          {m.total:8.2f}   {verdict}",
            "  total by stage   " + "   ".join(f"ZeRO-{s}: {g:.2f}" for s, g in self.total_gib_by_stage.items()),
        ]
        return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------- parameters
def _head_dim(a: ArchConfig) -> int:
    return a.hidden_size // a.num_attention_heads


def attention_params(a: ArchConfig) -> int:
    q = a.num_attention_heads * _head_dim(a)
    kv = a.num_key_value_heads * _head_dim(a)
    return (a.hidden_size * q + q) + 2 * (a.hidden_size * kv + kv) + q * a.hidden_size  # q/k/v with bias, o without


def mlp_params(a: ArchConfig) -> int:
    return 3 * a.hidden_size * a.intermediate_size  # gate, up, down


def embedding_params(a: ArchConfig) -> int:
    return a.vocab_size * a.hidden_size * (1 if a.tie_word_embeddings else 2)


def dense_params(a: ArchConfig) -> int:
    per_layer = attention_params(a) + mlp_params(a) + 2 * a.hidden_size  # + two RMSNorms
    return a.num_hidden_layers * per_layer + a.hidden_size + embedding_params(a)


def routed_experts(cfg: Config) -> int:
    # The reference's shared expert takes the place of one routed expert (upcycle.py).
    return cfg.num_experts - (cfg.moe.shared_expert == "reference")


def experts_per_token(cfg: Config) -> int:
    """Routed experts per token: language routing sends a (known-language) token to its language expert alone; the
    reference's shared expert takes one of the k slots."""
    if cfg.moe.routing == "language":
        return 1
    return cfg.moe.top_k - (cfg.moe.shared_expert == "reference")


def _moe_extra(cfg: Config, experts_used: int) -> int:
    a, m = cfg.model.arch, cfg.moe
    router = routed_experts(cfg) * a.hidden_size
    shared = (mlp_params(a) + a.hidden_size) if m.shared_expert != "none" else 0  # the MLP and its 1-output gate
    return m.layers * ((experts_used - 1) * mlp_params(a) + router + shared)


# ---------------------------------------------------------------------------------------------------------- memory
def _state_gib(params: float, stage: int, precision: str, shards: int) -> tuple[float, float, float]:
    w, g, o = BYTES_PER_PARAM[precision]
    return (params * w / (shards if stage >= 3 else 1) / GIB,
            params * g / (shards if stage >= 2 else 1) / GIB,
            params * o / (shards if stage >= 1 else 1) / GIB)


def activation_gib(cfg: Config) -> float:
    """Saved-for-backward tensors of one micro step on one GPU (peak, in the backward pass)."""
    a, m, t = cfg.model.arch, cfg.moe, cfg.train
    act = 2 if t.precision == "bf16" else 4  # bytes per activation element
    H, I, hd = a.hidden_size, a.intermediate_size, _head_dim(a)
    attn = 4 * H + (a.num_attention_heads + 2 * a.num_key_value_heads) * hd + 2 * a.num_attention_heads * hd
    mlp = 4 * I  # gate, up, act(gate), act(gate)·up
    dense_layer = act * (attn + mlp)  # bytes per token
    # A sparse layer keeps, per chosen expert, the gathered input, the expert's MLP tensors and its weighted output,
    # and the fp32 router logits and probabilities.
    sparse_layer = act * (attn + experts_per_token(cfg) * (2 * H + mlp) + (mlp if m.shared_expert != "none" else 0)) \
        + 2 * routed_experts(cfg) * 4
    n_sparse = m.layers
    if t.activation_checkpointing:
        # Every layer's input stays; in the backward pass one layer at a time is recomputed with all its tensors.
        per_token = a.num_hidden_layers * act * H + max(dense_layer, sparse_layer if n_sparse else 0)
    else:
        per_token = (a.num_hidden_layers - n_sparse) * dense_layer + n_sparse * sparse_layer
    per_token += a.vocab_size * (act + 4 + 4)  # logits, their fp32 upcast in the loss, and its gradient
    return per_token * t.micro_batch_size * t.seq_len / GIB


def memory_gib(cfg: Config, stage: int) -> Memory:
    m, dp = cfg.moe, cfg.resources.num_workers
    experts = _expert_params(cfg)
    non_expert = _total_params(cfg) - experts
    ep = m.ep_size if m.layers else 1
    parts_ne = _state_gib(non_expert, stage, cfg.train.precision, dp)
    parts_ex = _state_gib(experts / ep, stage, cfg.train.precision, dp // ep)
    w, g, o = (x + y for x, y in zip(parts_ne, parts_ex))
    return Memory(weights=w, gradients=g, optimizer=o, activations=activation_gib(cfg))


def _expert_params(cfg: Config) -> int:
    return cfg.moe.layers * routed_experts(cfg) * mlp_params(cfg.model.arch) if cfg.moe.layers else 0


def _total_params(cfg: Config) -> int:
    dense = dense_params(cfg.model.arch)
    return dense + _moe_extra(cfg, routed_experts(cfg)) if cfg.moe.layers else dense


# ------------------------------------------------------------------------------------------------------------ plan
def plan(cfg: Config) -> Plan:
    a = cfg.model.arch
    if a is None:
        raise UserError(f"preset {cfg.preset!r} has no model.arch: planning needs the architecture dimensions")
    moe_on = cfg.moe.layers > 0
    dense = dense_params(a)
    active = dense + _moe_extra(cfg, experts_per_token(cfg)) if moe_on else dense
    # The input embedding is a lookup, not a matmul; a tied table is counted once and serves as the LM head.
    matmul_params = active - (0 if a.tie_word_embeddings else a.vocab_size * a.hidden_size)
    # PaLM (appendix B) convention: 6 FLOPs per matmul parameter per token, + 12·layers·heads·head_dim·seq_len for
    # attention scores and values, without discounting the causal mask.
    attention = 12 * a.num_hidden_layers * a.num_attention_heads * _head_dim(a) * cfg.train.seq_len
    stages = [0, 1, 2] if moe_on else [0, 1, 2, 3]  # ZeRO-3 cannot shard expert-parallel layers
    mem = memory_gib(cfg, cfg.train.zero_stage)
    gpu = cfg.resources.gpu_type if cfg.resources.use_gpu else None
    capacity = GPU_MEMORY_GIB.get(gpu) if gpu else None
    micro = cfg.train.micro_batch_size * cfg.train.seq_len
    return Plan(
        preset=cfg.preset,
        base=cfg.model.base,
        dense_params=dense,
        total_params=_total_params(cfg),
        active_params=active,
        expert_params=_expert_params(cfg),
        moe_layers=cfg.moe.layers,
        num_experts=routed_experts(cfg) if moe_on else 0,
        experts_per_token=experts_per_token(cfg) if moe_on else 0,
        shared_expert=cfg.moe.shared_expert if moe_on else "none",
        routing=cfg.moe.routing,
        zero_stage=cfg.train.zero_stage,
        precision=cfg.train.precision,
        activation_checkpointing=cfg.train.activation_checkpointing,
        data_parallel=cfg.resources.num_workers,
        grad_accum=cfg.train.grad_accum,
        ep_size=cfg.moe.ep_size,
        tokens_per_gpu_micro_step=micro,
        tokens_per_step=micro * cfg.resources.num_workers * cfg.train.grad_accum,
        flops_per_token=float(6 * matmul_params + attention),
        memory=mem,
        total_gib_by_stage={s: round(memory_gib(cfg, s).total, 3) for s in stages},
        gpu_type=gpu,
        gpu_memory_gib=capacity,
        fits=None if capacity is None else mem.total <= capacity * (1 - HEADROOM),
    )
