"""Expert parallelism for Post-MoE, applied to a built single-device model (torchtitan style: the model file knows
nothing of it).

``expert_parallel(model, ep_size)`` rewrites every sparse block in place: the router (and the shared expert) stay
replicated, each rank keeps E/ep_size of the experts, and dispatch becomes a dropless all-to-all among the ep_size
ranks of an expert-parallel group:

    route locally → sort assignments by expert (= by destination rank) → all-to-all the per-expert counts →
    all-to-all the token rows → local experts on contiguous slices → reverse all-to-all → weight and sum.

There is no capacity: every token reaches its experts whatever the load, so results do not depend on ep_size.

Placement: rank r holds the experts of *slots* [r·L, (r+1)·L) (L = E/ep_size), and a permutation ``placement`` says
which expert sits in each slot (default: the identity, contiguous blocks). The rank holding the busiest experts sets
the pace of every all-to-all, so the trainer balances the known part of the load — under language and hybrid routing
each token's own language expert — with :func:`balanced_placement`. DeepSpeed's checkpoint files number experts by
slot; the placement is a function of the training rows, so a resumed run finds the same one, and
``gather_full_state_dict`` puts each expert back under its own id.

The exchange is ``all_to_all_single`` with uneven split sizes, wrapped in an autograd function whose backward is the
reverse all-to-all. gloo implements uneven (and empty) splits on CPU, NCCL on GPU, so no padded all-gather is needed.
Only per-expert counts travel ahead of the rows, not a per-row expert id: each source sends its rows sorted by
expert, so the counts say which local expert every received row belongs to.

Process groups are DeepSpeed's (``deepspeed.utils.groups``, named ``ep_size_<n>``): expert-parallel groups of ep_size
consecutive ranks exchange tokens; expert-data-parallel groups (ranks holding the same experts, stride ep_size) reduce
expert gradients. DeepSpeed's engine treats parameters as expert parameters — gradients reduced over the
expert-data-parallel group only, ZeRO-1/2 partitions over that group, per-expert checkpoint files — only when the
model contains a ``deepspeed.moe.layer.MoE``. The local experts therefore sit in an :class:`ExpertShard`, a MoE in
type, holding them in DeepSpeed's own layout (``deepspeed_moe.experts.deepspeed_experts.<local id>``), which its
checkpoint code relies on to translate local and global expert ids. ZeRO-3 is refused, by the config and by
DeepSpeed itself ("Native DeepSpeed MoE is not supported with ZeRO Stage 3").

Gradient scale: an expert's gradient on its rank sums the contributions of the tokens every rank of the group sent
it; DeepSpeed sums it over the expert-data-parallel group and divides by the whole data-parallel world size, which is
exactly the data-parallel mean a non-parallel run computes.

``gather_full_state_dict`` + ``save_gathered`` turn the sharded model back into one ordinary Post-MoE checkpoint.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from torch import nn

from apollo_ray.model.post_moe import PostMoEBlock, PostMoEForCausalLM

# A shard's tensors as DeepSpeed lays them out: <block>.experts.deepspeed_moe.experts.deepspeed_experts.<local id>.<rest>
_SHARD_PARAM = re.compile(
    r"(?P<block>.+)\.experts\.deepspeed_moe\.experts\.deepspeed_experts\.(?P<local>\d+)\.(?P<rest>.+)")


def balanced_placement(load: list[float], ep_size: int) -> list[int]:
    """A placement (slot -> expert) giving every rank E/ep_size experts and loads as even as greedy can: experts by
    decreasing load, each to the least-loaded rank with a free slot (LPT). Each rank's experts in ascending order;
    the identity (contiguous blocks) when it is already as even."""
    E = len(load)
    if ep_size < 1 or E % ep_size:
        raise ValueError(f"ep_size {ep_size}: the {E} experts must divide evenly")
    per_rank = E // ep_size
    ranks: list[list[int]] = [[] for _ in range(ep_size)]
    totals = [0.0] * ep_size
    for e in sorted(range(E), key=lambda e: (-load[e], e)):
        r = min((r for r in range(ep_size) if len(ranks[r]) < per_rank), key=lambda r: (totals[r], r))
        ranks[r].append(e)
        totals[r] += load[e]
    contiguous = max(sum(load[r * per_rank:(r + 1) * per_rank]) for r in range(ep_size))
    if contiguous <= max(totals):
        return list(range(E))
    return [e for experts in ranks for e in sorted(experts)]


def ep_imbalance(tokens_per_expert: torch.Tensor, placement: list[int], ep_size: int) -> torch.Tensor:
    """Per sparse layer, the busiest expert-parallel rank's expert tokens over the mean rank's (1 = even; ep_size =
    every token on one rank). ``tokens_per_expert``: [layers, E] counts by expert id; ``placement``: slot -> expert.
    Every all-to-all waits for its busiest rank, so this is the factor by which expert compute stretches a step."""
    per_rank = tokens_per_expert[:, placement].reshape(tokens_per_expert.shape[0], ep_size, -1).sum(-1)
    return per_rank.max(-1).values / per_rank.mean(-1).clamp(min=1e-12)


def group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel and expert-data-parallel groups of this size (its MoE layer's too)."""
    return f"ep_size_{ep_size}"


# ------------------------------------------------------------------------------------------------------ all-to-all
class _AllToAll(torch.autograd.Function):
    """Rows to ranks with uneven split sizes; the gradient goes back by the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.splits, ctx.group = (input_splits, output_splits), group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        input_splits, output_splits = ctx.splits
        return _AllToAll.apply(grad, input_splits, output_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int],
               group: dist.ProcessGroup) -> torch.Tensor:
    """Send ``input_splits[p]`` consecutive rows of ``x`` to rank p of ``group``; receive ``output_splits[p]``."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


# ------------------------------------------------------------------------------------------------------ the shard
class ExpertShard(MoE):
    """This rank's experts of one sparse block, registered with DeepSpeed as a MoE layer.

    A MoE in type only: ``MoE.__init__`` (which builds DeepSpeed's own gate and capacity-bound dispatcher) is not run.
    The attributes DeepSpeed's engine and checkpointing read are set here, and the parameters are marked as its
    ``Experts`` marks them (``allreduce = False``, ``group_name``), so ``split_params_into_different_moe_groups_for_
    optimizer`` groups them and ZeRO-1/2 reduce them over the expert-data-parallel group.
    """

    def __init__(self, experts: list[nn.Module], num_experts: int, ep_size: int, ep_rank: int):
        nn.Module.__init__(self)
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = len(experts)
        self.ep_rank = ep_rank  # local expert i sits in slot ep_rank · num_local_experts + i (DeepSpeed's global id)
        self.expert_group_name = group_name(ep_size)
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False
        self.deepspeed_moe = nn.Module()
        self.deepspeed_moe.experts = nn.Module()
        self.deepspeed_moe.experts.deepspeed_experts = nn.ModuleList(experts)
        for p in self.parameters():
            p.allreduce = False
            p.group_name = self.expert_group_name

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        # The engine calls this on every MoE layer; the groups already exist (expert_parallel made them, in DeepSpeed's
        # default E + D layout, before any engine), and the shard was cut for that layout.
        if use_data_before_expert_parallel_:
            raise ValueError("expert_parallel shards experts for DeepSpeed's default E + D group layout; "
                             "use_data_before_expert_parallel_ is not supported")

    def forward(self, x_RD: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Rows sorted by local expert, ``sizes[i]`` of them for local expert i."""
        # Every expert runs, even on zero rows, so each parameter gets a (zero) gradient every step.
        return torch.cat([expert(x) for expert, x in zip(self.local_experts, x_RD.split(sizes))])


class ExpertParallelMoEBlock(PostMoEBlock):
    """A PostMoEBlock whose experts are spread over an expert-parallel group; routing is unchanged (replicated)."""

    def __init__(self, block: PostMoEBlock, group: dist.ProcessGroup, ep_size: int, ep_rank: int,
                 placement: list[int]):
        nn.Module.__init__(self)
        self.config = block.config
        self.router = block.router
        E = block.config.num_experts
        per_rank = E // ep_size
        self.placement = list(placement)  # slot -> expert
        self.experts = ExpertShard([block.experts[e] for e in placement[ep_rank * per_rank:(ep_rank + 1) * per_rank]],
                                   E, ep_size, ep_rank)
        # expert -> slot, prefixed for the empty assignment (-1 -> -1); not part of the state dict
        self.register_buffer("_slot", torch.tensor([-1] + _inverse(torch.tensor(placement)).tolist()),
                             persistent=False)
        self.shared_expert = block.shared_expert
        self.shared_expert_gate = block.shared_expert_gate
        self.ep_group = group
        self.ep_size = ep_size

    def dispatch(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
        """Σ_k w_k · expert_k(x) with the experts on other ranks: dropless all-to-all there and back."""
        E, K, P = self.config.num_experts, ids_NK.shape[1], self.ep_size
        L = self.experts.num_local_experts  # experts per rank
        ids_A = self._slot[ids_NK.reshape(-1) + 1]  # A = N·K assignments, as slots (-1 stays -1)
        # Sorted by slot is also sorted by destination rank: rank p holds slots [p·L, (p+1)·L).
        order_A = ids_A.argsort(stable=True)
        counts = torch.bincount(ids_A + 1, minlength=E + 1)  # [0] = empty slots (-1, language routing)
        sent_E = counts[1:]
        received_PL = torch.empty_like(sent_E)
        dist.all_to_all_single(received_PL, sent_E, group=self.ep_group)  # L counts to every rank
        received_PL = received_PL.view(P, L)  # [source rank, local expert]
        # One host sync for all split sizes: the all-to-alls take them as Python ints.
        sizes = torch.cat([counts[:1], sent_E.view(P, L).sum(1), received_PL.sum(1), received_PL.sum(0)]).tolist()
        n_empty, send, recv, per_expert = sizes[0], sizes[1:P + 1], sizes[P + 1:2 * P + 1], sizes[2 * P + 1:]

        order_A = order_A[n_empty:]
        token_A = order_A // K
        x_RD = all_to_all(x_ND.index_select(0, token_A), recv, send, self.ep_group)  # R = rows received
        if L > 1:
            # Each source's rows arrive sorted by local expert; regroup them so each expert reads one contiguous slice.
            local_R = torch.arange(L, device=x_RD.device).repeat(P).repeat_interleave(
                received_PL.reshape(-1), output_size=x_RD.shape[0])
            by_expert_R = local_R.argsort(stable=True)
            y_RD = self.experts(x_RD.index_select(0, by_expert_R), per_expert).index_select(0, _inverse(by_expert_R))
        else:
            y_RD = self.experts(x_RD, per_expert)
        y_AD = all_to_all(y_RD, send, recv, self.ep_group)
        y_AD = y_AD * weights_NK.reshape(-1)[order_A].unsqueeze(1).to(y_AD.dtype)
        return torch.zeros_like(x_ND).index_add_(0, token_A, y_AD)


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


# ------------------------------------------------------------------------------------------------------------ apply
def expert_parallel(model: PostMoEForCausalLM, ep_size: int,
                    placement: list[int] | None = None) -> PostMoEForCausalLM:
    """Shard the experts of every sparse block over ``ep_size`` ranks (in place; returns ``model``).

    Collective: every rank calls it, after ``torch.distributed`` is initialised and before ``deepspeed.initialize``,
    on identical weights (every rank loaded the same checkpoint) and with the same ``placement``. Rank r of an
    expert-parallel group keeps the experts ``placement[r·E/ep_size : (r+1)·E/ep_size]`` (default: the identity).
    """
    import deepspeed
    from deepspeed.utils import groups

    if getattr(model, "_apollo_ep_size", 1) > 1:
        raise ValueError(f"the model is already expert-parallel (ep_size {model._apollo_ep_size})")
    E = model.config.num_experts
    if ep_size < 1 or E % ep_size:
        raise ValueError(f"ep_size {ep_size}: the {E} experts per sparse layer must divide evenly")
    placement = list(range(E)) if placement is None else [int(e) for e in placement]
    if sorted(placement) != list(range(E)):
        raise ValueError(f"placement {placement} is not a permutation of the {E} experts")
    if ep_size == 1:
        model._apollo_ep_size = 1
        return model
    if not dist.is_initialized():
        raise RuntimeError("expert_parallel needs torch.distributed initialised (Ray Train's TorchTrainer does it)")
    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"ep_size {ep_size} does not divide the world size {world}")

    deepspeed.init_distributed()  # wraps the existing process group; a no-op when DeepSpeed already did it
    name = group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    group = groups._get_expert_parallel_group(name)
    ep_rank = groups._get_expert_parallel_rank(name)

    for layer in model.model.layers:
        if isinstance(layer.mlp, PostMoEBlock):
            layer.mlp = ExpertParallelMoEBlock(layer.mlp, group, ep_size, ep_rank, placement)  # others are freed
    model._apollo_ep_size = ep_size
    return model


# ------------------------------------------------------------------------------------------------------- gathering
def gather_full_state_dict(model: PostMoEForCausalLM) -> dict[str, torch.Tensor] | None:
    """The full (non-parallel) state dict on world rank 0, ``None`` elsewhere. Collective: every rank calls it.

    Each expert tensor is gathered to rank 0 within rank 0's expert-parallel group; other groups hold replicas of the
    same experts and take no part. Parameters must be whole on every rank (ZeRO-1/2, which EP is limited to).
    """
    from deepspeed.utils import groups

    rank = dist.get_rank()
    state: dict[str, torch.Tensor] = {}
    if rank == 0:
        state = {k: v.detach() for k, v in model.state_dict().items() if not _SHARD_PARAM.fullmatch(k)}
    for prefix, module in model.named_modules():
        if not isinstance(module, ExpertParallelMoEBlock):
            continue
        shard = module.experts
        if 0 not in groups._get_expert_parallel_group_ranks(shard.expert_group_name):
            continue
        P, L = shard.ep_size, shard.num_local_experts
        local_states = [expert.state_dict() for expert in shard.local_experts]
        for key in local_states[0]:
            stacked = torch.stack([s[key].detach() for s in local_states])  # [L, ...]
            parts = [torch.empty_like(stacked) for _ in range(P)] if rank == 0 else None
            dist.gather(stacked, parts, dst=0, group=module.ep_group)
            if rank == 0:
                for p, part in enumerate(parts):
                    for i in range(L):
                        state[f"{prefix}.experts.{module.placement[p * L + i]}.{key}"] = part[i]
    return state if rank == 0 else None


def save_gathered(model: PostMoEForCausalLM, state: dict[str, torch.Tensor], out: str | Path) -> None:
    """Write ``state`` (from :func:`gather_full_state_dict`) as an ordinary Post-MoE checkpoint: safetensors and the
    full config, loadable by ``AutoModelForCausalLM.from_pretrained`` with no parallelism."""
    from transformers.initialization import no_init_weights

    config = copy.deepcopy(model.config)
    # A skeleton on the meta device costs no memory; strict loading proves the gathered state is complete.
    with no_init_weights(), torch.device("meta"):
        full = PostMoEForCausalLM(config)
    full.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        full.lm_head.weight = full.model.embed_tokens.weight
    full.generation_config = copy.deepcopy(model.generation_config)
    full.save_pretrained(out, safe_serialization=True)
