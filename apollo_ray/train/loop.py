"""The Ray Train worker loop: DeepSpeed over packed rows, resumable at any checkpointed step.

A pure function of its config dict (Ray's DeepSpeed example, minus its module-global wart): every input — model
path, mixture folder, hyper-parameters, tracking run — arrives in ``config``. The global row order is fixed by the
mixture stage; step ``s`` consumes rows ``[s·G, (s+1)·G)`` with G = world × micro batch × accumulation, rank ``r``
taking every ``world``-th row of them, so the position *is* the step and a resumed run continues the same order with
nothing repeated or skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

log = logging.getLogger("apollo_ray.train")
DS_TAG = "ds"
STATE_FILE = "trainer_state.json"
HF_DIR = "hf"


def lr_lambda(step: int, total: int, warmup_ratio: float, min_ratio: float) -> float:
    """Linear warmup over ``warmup_ratio`` of the steps, then cosine decay to ``min_ratio`` of the peak."""
    warmup = max(1, int(math.ceil(warmup_ratio * total)))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only; none on biases and norms (Apollo), nor on embeddings' norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def deepspeed_config(c: dict) -> dict:
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": c["micro_batch_size"],
        "gradient_accumulation_steps": c["grad_accum"],
        "gradient_clipping": c["grad_clip"],
        "zero_optimization": {"stage": c["zero_stage"]},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if c["precision"] == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds


def peak_flops(device, seconds: float = 0.3) -> float:
    """Peak dense matmul FLOP/s of this worker: the datasheet for known GPUs, a measured fp32 matmul on CPU."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12)):
            if key in name:
                return peak
        return 100e12
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import apollo_ray  # noqa: F401  registers the Post-MoE architecture in this worker process
    from apollo_ray.storage import Storage
    from apollo_ray.train.dataset import RowStore

    c = config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(c["seed"] + rank)
    storage = Storage(c["storage_root"], c.get("endpoint_url"))
    # Each rank reads only the rows it trains on, a row group at a time: memory for data does not grow with the corpus.
    train = RowStore(storage, c["mixture"], "train")
    heldout = RowStore(storage, c["mixture"], "heldout")
    languages, kinds = c["languages"], c["kinds"]

    per_step = world * c["micro_batch_size"] * c["grad_accum"]
    total_steps = len(train) // per_step
    if c.get("max_steps"):
        total_steps = min(total_steps, c["max_steps"])
    if total_steps < 1:
        raise ValueError(f"the mixture has {len(train)} rows: fewer than one step needs ({per_step} = "
                         f"{world} workers x {c['micro_batch_size']} rows x {c['grad_accum']} accumulation)")

    dtype = torch.bfloat16 if c["precision"] == "bf16" else torch.float32
    init = c["init_model"]
    if "://" in init:  # object storage: every worker (possibly on another node) fetches the weights itself
        init = str(storage.get_dir(init, tempfile.mkdtemp(prefix="apollo-init-")))
    model = AutoModelForCausalLM.from_pretrained(init, dtype=dtype)
    model.config.use_cache = False  # a cache turns transformers' packed-sequence detection off (see packing.py)
    model_cfg = model.config
    is_moe = getattr(model_cfg, "model_type", "") == "apollo_post_moe"
    groups = param_groups(model, c["weight_decay"])
    placement: list[int] | None = None  # slot -> expert, under expert parallelism
    if is_moe and c["ep_size"] > 1:
        from apollo_ray.model.parallel import balanced_placement, expert_parallel

        placement = list(range(model_cfg.num_experts))
        if model_cfg.routing in ("language", "hybrid"):
            # Every token visits its language's expert: balance those known loads over the ranks (from all the
            # training rows, so every rank — and a resumed run — computes the same placement).
            load = train.language_load(model_cfg.num_experts)
            placement = balanced_placement(load.tolist(), c["ep_size"])
            if rank == 0:
                per_rank = np.asarray(load)[placement].reshape(c["ep_size"], -1).sum(1)
                log.info("expert placement (slot -> expert) %s: language-expert tokens per rank %s", placement,
                         per_rank.tolist())
        expert_parallel(model, c["ep_size"], placement)
        groups = param_groups(model, c["weight_decay"])
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    if c.get("activation_checkpointing"):
        # After parallelism, as torchtitan orders it. Non-reentrant (transformers' default), so the sparse layers'
        # routing outputs keep their gradient; under expert parallelism the recompute repeats the all-to-alls, in
        # the same layer order on every rank.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(groups, lr=c["lr"], betas=tuple(c["betas"]), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total_steps, c["warmup_ratio"], c["min_lr_ratio"]))
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                          config=deepspeed_config(c))
    device = engine.device

    start_step, tokens_seen = 0, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d, weights_only_checkpoints():
            engine.load_checkpoint(d, tag=DS_TAG)
            state = json.loads((Path(d) / STATE_FILE).read_text())
        start_step, tokens_seen = state["step"], state["tokens_seen"]
        if rank == 0:
            log.info("resumed at step %d/%d from %s", start_step, total_steps, ckpt.path)

    tracker = _Tracking(c) if rank == 0 else None
    flops_per_token = c["flops_per_token"]
    peak = peak_flops(device)

    def batch(store: RowStore, idx: np.ndarray) -> dict:
        return {k: torch.as_tensor(v, device=device) for k, v in store.take(idx).items()}

    def forward(b: dict):
        kwargs = {"language_ids": b["language_ids"]} if is_moe else {}
        out = engine(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=None, use_cache=False,
                     **kwargs)
        # Shift the labels, not the logits: position t predicts label t+1, the last position predicts nothing
        # (-100). Slicing the logits instead would copy the largest activation of the step.
        target = torch.nn.functional.pad(b["labels"][:, 1:], (0, 1), value=-100)
        logits = out.logits.float()
        tok_loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), target.reshape(-1),
                                                     ignore_index=-100, reduction="none").view_as(target)
        mask = target != -100
        loss = tok_loss.sum() / mask.sum().clamp(min=1)
        if is_moe and out.aux_loss is not None:
            # The model reports raw router losses; their weights are the config's (default 0, as the reference).
            loss = loss + model_cfg.router_aux_loss_coef * out.aux_loss + model_cfg.router_z_loss_coef * out.z_loss
        return loss, tok_loss.detach(), mask, out

    def grouped(tok_loss, mask, index, n) -> torch.Tensor:
        """[n, 2] (loss sum, token count) per group of the shifted targets."""
        idx = torch.nn.functional.pad(index[:, 1:], (0, 1), value=-1)[mask].long()
        sums = torch.zeros(n, 2, device=device, dtype=torch.float64)
        sums[:, 0].index_add_(0, idx, tok_loss[mask].double())
        sums[:, 1].index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
        return sums

    def evaluate_heldout() -> dict[str, float]:
        if not heldout:
            return {}
        engine.eval()
        sums = torch.zeros(len(languages), 2, device=device, dtype=torch.float64)
        n = len(heldout)
        with torch.no_grad():
            # Every rank runs the same number of forwards (the last row again, uncounted, where its share runs out):
            # expert-parallel layers exchange tokens with all-to-all, which a rank that stopped early would hang.
            for i in range(rank, math.ceil(n / world) * world, world):
                b = batch(heldout, np.array([min(i, n - 1)]))
                _, tl, m, _ = forward(b)
                if i < n:
                    sums += grouped(tl, m, b["lang_index"], len(languages))
        dist.all_reduce(sums)
        engine.train()
        out = {f"heldout_loss/{languages[k]}": s / n for k, (s, n) in enumerate(sums.tolist()) if n}
        tot = sums.sum(0)
        out["heldout_loss"] = (tot[0] / tot[1]).item() if tot[1] else float("nan")
        return out

    engine.train()
    last_heldout: float | None = None
    for step in range(start_step, total_steps):
        # A step's time is its training work: held-out evaluations and checkpoints after it are not counted.
        t_start = time.perf_counter()
        lang_sums = torch.zeros(len(languages), 2, device=device, dtype=torch.float64)
        kind_sums = torch.zeros(len(kinds), 2, device=device, dtype=torch.float64)
        expert_counts: torch.Tensor | None = None  # [moe layers, experts]
        moe_layers: list[int] = []
        aux_total, step_tokens = 0.0, 0
        for micro in range(c["grad_accum"]):
            first = step * per_step + micro * world * c["micro_batch_size"]
            idx = np.arange(first + rank, first + world * c["micro_batch_size"], world)
            b = batch(train, idx)
            loss, tl, m, out = forward(b)
            engine.backward(loss)
            engine.step()
            lang_sums += grouped(tl, m, b["lang_index"], len(languages))
            kind_sums += grouped(tl, m, b["kind_index"], len(kinds))
            step_tokens += int((b["lang_index"] >= 0).sum())
            if is_moe and out.router_stats is not None:
                aux_total += out.aux_loss.item() / c["grad_accum"]
                counts = out.router_stats.tokens_per_expert.detach().double()
                expert_counts = counts if expert_counts is None else expert_counts + counts
                moe_layers = out.router_stats.moe_layers
        # Every sum of the step in one all-reduce: per language, per kind, totals, and tokens per expert.
        totals = torch.cat([lang_sums.sum(0), torch.tensor([step_tokens], device=device, dtype=torch.float64)])
        parts = [lang_sums, kind_sums, totals] + ([expert_counts] if expert_counts is not None else [])
        flat = torch.cat([t.reshape(-1) for t in parts])
        dist.all_reduce(flat)
        lang_sums, kind_sums, totals, *rest = (v.view_as(t) for v, t in zip(flat.split([t.numel() for t in parts]),
                                                                             parts))
        expert_counts = rest[0] if rest else None
        tokens_seen += int(totals[2].item())
        tps = totals[2].item() / (time.perf_counter() - t_start)
        metrics: dict[str, float] = {
            "step": step + 1, "loss": (totals[0] / totals[1]).item(), "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(engine.get_global_grad_norm() or 0.0), "tokens_per_s": tps,
            "mfu": tps * flops_per_token / (peak * world), "tokens_seen": tokens_seen, "router_aux_loss": aux_total,
            "data/row_start": step * per_step}
        metrics.update({f"loss/{languages[k]}": s / n for k, (s, n) in enumerate(lang_sums.tolist()) if n})
        metrics.update({f"loss_kind/{kinds[k]}": s / n for k, (s, n) in enumerate(kind_sums.tolist()) if n})
        if expert_counts is not None:
            frac = expert_counts / expert_counts.sum(-1, keepdim=True).clamp(min=1)
            for layer, row in zip(moe_layers, frac.tolist()):
                metrics.update({f"moe/layer{layer}/expert_{e}": v for e, v in enumerate(row)})
            if placement is not None:
                from apollo_ray.model.parallel import ep_imbalance

                for layer, v in zip(moe_layers, ep_imbalance(expert_counts, placement, c["ep_size"]).tolist()):
                    metrics[f"moe/layer{layer}/ep_imbalance"] = v
        last = step + 1 == total_steps
        # Also on a run's (or a resumed run's) first step, so every report carries a held-out loss.
        evaluated = (step + 1) % c["eval_every"] == 0 or last or step == start_step
        if evaluated:
            held_metrics = evaluate_heldout()
            metrics.update(held_metrics)
            last_heldout = held_metrics.get("heldout_loss")
        else:
            metrics["heldout_loss"] = last_heldout
        if tracker:
            tracker.log(metrics, step + 1)
            if (step + 1) % c["log_every"] == 0 or last:
                log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s mfu %.3f", step + 1, total_steps, metrics["loss"],
                         metrics["lr"], tps, metrics["mfu"])
        # Ray Train hears of the run only where something new happened: a held-out evaluation (what a Tune scheduler
        # acts on) or a checkpoint. Its controller takes one report per worker every health-check interval (2 s),
        # and a report made before the previous one was taken blocks the loop, so a report per step would cap
        # training at one step per 2 s; per-step metrics go straight to MLflow above.
        if (step + 1) % c["checkpoint_every"] == 0 or last:
            if tracker:
                tracker.flush()  # a checkpoint's metrics are in MLflow before the checkpoint exists
            _report_with_checkpoint(engine, metrics, step + 1, tokens_seen, rank, last, is_moe)
        elif evaluated:
            ray.train.report({k: v for k, v in metrics.items() if "/" not in k})


@contextlib.contextmanager
def weights_only_checkpoints() -> Iterator[None]:
    """DeepSpeed unpickles its checkpoint files with ``torch.load(weights_only=False)``: whoever can write the run's
    ``checkpoints/`` (a shared bucket) could run code on every training worker at the next resume. Inside this block
    they load with torch's weights-only unpickler instead, which builds tensors, containers and the few plain-state
    DeepSpeed classes its optimizer states hold, and refuses any other global (an UnpicklingError naming it)."""
    import torch
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=True)

    unsafe = TorchCheckpointEngine.load
    TorchCheckpointEngine.load = load  # the class, so engines DeepSpeed builds internally use it too
    try:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            yield
    finally:
        TorchCheckpointEngine.load = unsafe


def _report_with_checkpoint(engine, metrics: dict, step: int, tokens_seen: int, rank: int, last: bool,
                            is_moe: bool) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="apollo-ckpt-") as d:
        engine.save_checkpoint(d, tag=DS_TAG)
        if last:
            _export_hf(engine, Path(d) / HF_DIR, rank, is_moe)
        if rank == 0:
            (Path(d) / STATE_FILE).write_text(json.dumps({"step": step, "tokens_seen": tokens_seen}))
        ray.train.report({k: v for k, v in metrics.items() if "/" not in k},
                         checkpoint=ray.train.Checkpoint.from_directory(d))


def _export_hf(engine, out: Path, rank: int, is_moe: bool) -> None:
    """The final model as one Hugging Face checkpoint (safetensors), experts gathered from their ranks."""
    module = engine.module
    if is_moe and getattr(module, "_apollo_ep_size", 1) > 1:
        from apollo_ray.model.parallel import gather_full_state_dict

        state = gather_full_state_dict(module)
    else:
        state = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if state is None:
            module.save_pretrained(out, safe_serialization=True)
        else:
            from apollo_ray.model.parallel import save_gathered

            save_gathered(module, state, out)


class _Tracking:
    """Rank 0 logs step metrics straight to MLflow (the driver only sees what ``ray.train.report`` forwards).

    From a background thread: a remote tracking server's round trip (or a sqlite commit) would otherwise stall
    rank 0 every step, and with it every rank at the next collective. ``flush`` waits for what was queued.
    """

    def __init__(self, c: dict):
        import queue
        import threading

        self.run_id = c.get("mlflow_run_id")
        self.client = None
        if self.run_id:
            import mlflow

            self.client = mlflow.MlflowClient(c["tracking_uri"])
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        if self.client:
            threading.Thread(target=self._drain, name="apollo-mlflow", daemon=True).start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.error:
            raise RuntimeError("logging metrics to MLflow failed") from self.error
        if self.client:
            self.queue.put((dict(metrics), step, int(time.time() * 1000)))

    def flush(self) -> None:
        self.queue.join()
        if self.error:
            raise RuntimeError("logging metrics to MLflow failed") from self.error

    def _drain(self) -> None:
        from mlflow.entities import Metric

        while True:
            metrics, step, ts = self.queue.get()
            try:
                items = [Metric(k, float(v), ts, step) for k, v in metrics.items()
                         if v is not None and math.isfinite(v)]
                for i in range(0, len(items), 1000):
                    self.client.log_batch(self.run_id, metrics=items[i:i + 1000])
            except BaseException as e:  # surfaced on the training thread by the next log/flush
                self.error = e
            finally:
                self.queue.task_done()


if os.environ.get("APOLLO_TRAIN_DEBUG"):
    logging.basicConfig(level=logging.DEBUG)
