"""``apollo-ray analyze``: which experts each language's tokens go to, per MoE layer ("spread out in the end").

Per-language evaluation text — the benchmark items' question and options, or with ``eval.analyze_prompt_tokens``
the full k-shot prompts — runs through each Post-MoE model in eval mode with plain top-k routing (no
``language_ids``: the learned router alone decides). Batches hold one language each, so the language of every
counted token is known without asking the model; padding is excluded by the attention mask (the model counts only
unmasked tokens), so per layer the counts of a language sum to its non-pad tokens × k. Counts → a
language × layer × expert tensor, normalised per layer → ratios.

Specialisation per layer, from the ratios p(e | language, layer) with every language weighing the same:
- mutual information I(language; expert) in bits = H(mean over languages of p(e|·)) − mean over languages of
  H(p(e|language)); 0 when all languages route alike, log2(#languages) at most;
- routing entropy H(p(e | language)) per language, in bits: low = the language concentrates on few experts.
Later layers being more language-specific shows as MI rising over the layers.

Differences from the reference analysis, on purpose: batched (not batch size 1), padding never counted, prompt
boilerplate (instruction, shots) not counted unless asked for.

Output ``analysis/<fp>/<model>/``: routing.npz, routing.json, heatmap-<language>.png (experts × layers),
heatmap-all.png (all languages pooled), overview.png (languages × experts per layer), specialisation.png; then
``analysis/<fp>/manifest.json``, last.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from apollo_ray import languages as langs
from apollo_ray.config import Config, fingerprint
from apollo_ray.errors import UserError
from apollo_ray.evaluation.benchmark import Item
from apollo_ray.evaluation.prompts import ShotPool, encode
from apollo_ray.evaluation.runner import (POST_MOE_TYPE, EvalItem, ItemSet, ModelRef, build_prompts, load_items,
                                          load_model_config, load_tokenizer, metric_key, model_dir, reason_key,
                                          resolve_models)
from apollo_ray.storage import Manifest, Storage
from apollo_ray.tracking import Tracker

log = logging.getLogger(__name__)

STAGE = "analyze"
_FP_VERSION = "analyze-v1"
ALL = "all"  # the name of the pooled "mixture of all languages"


class NotPostMoE(ValueError):
    """Routing analysis needs router statistics, which only a Post-MoE model reports."""


# ------------------------------------------------------------------------------------------------------ the numbers
def ratios(counts_GLE: np.ndarray) -> np.ndarray:
    """Counts [language, layer, expert] → the share of each expert per (language, layer); 0 where nothing counted."""
    c = np.asarray(counts_GLE, dtype=np.float64)
    total = c.sum(axis=-1, keepdims=True)
    return np.divide(c, total, out=np.zeros_like(c), where=total > 0)


def _entropy_bits(p: np.ndarray, axis: int = -1) -> np.ndarray:
    logs = np.log2(p, out=np.zeros_like(p), where=p > 0)
    return -(p * logs).sum(axis=axis)


def routing_entropy(counts_GLE: np.ndarray) -> np.ndarray:
    """H(expert | language, layer) in bits, [language, layer]; NaN for a language with no tokens."""
    c = np.asarray(counts_GLE, dtype=np.float64)
    h = _entropy_bits(ratios(c))
    return np.where(c.sum(axis=-1) > 0, h, np.nan)


def mutual_information(counts_GLE: np.ndarray) -> np.ndarray:
    """I(language; expert) per layer in bits, [layer], languages weighing the same (languages with no tokens left
    out): H(p(e)) − mean_g H(p(e | g)) with p(e) = mean_g p(e | g)."""
    c = np.asarray(counts_GLE, dtype=np.float64)
    present = c.sum(axis=(1, 2)) > 0
    if present.sum() == 0:
        return np.zeros(c.shape[1])
    p_GLE = ratios(c[present])
    p_LE = p_GLE.mean(axis=0)
    return np.maximum(_entropy_bits(p_LE) - _entropy_bits(p_GLE).mean(axis=0), 0.0)


def specialisation(counts_GLE: np.ndarray) -> dict[str, np.ndarray]:
    """The per-layer scores: MI (bits), MI / log2(#languages) in [0, 1], entropy per language and its mean."""
    c = np.asarray(counts_GLE, dtype=np.float64)
    mi = mutual_information(c)
    n = int((c.sum(axis=(1, 2)) > 0).sum())
    h = routing_entropy(c)
    mean_h = np.nanmean(h, axis=0) if n else np.full(c.shape[1], np.nan)
    return {"mutual_information": mi, "normalised_mi": mi / np.log2(n) if n > 1 else np.zeros_like(mi),
            "entropy": h, "mean_entropy": mean_h}


# --------------------------------------------------------------------------------------------------- counting (worker)
def count_routing(model: Any, tokenizer: Any, texts: Mapping[str, Sequence[str]], *, batch_size: int = 8,
                  max_tokens: int = 1024, device: Any = "cpu") -> tuple[np.ndarray, dict[str, int], list[int]]:
    """Route every text through ``model`` (eval mode, plain top-k): counts [language, layer, expert], non-pad tokens
    per language, and the MoE layers' indices. Languages in ``texts`` order."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    cfg = model.config
    layers = list(cfg.moe_layers)
    counts = np.zeros((len(texts), len(layers), cfg.num_experts), dtype=np.int64)
    tokens: dict[str, int] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for g, (lang, lang_texts) in enumerate(texts.items()):
                ids = [encode(tokenizer, t)[:max_tokens] for t in lang_texts]
                ids = [x for x in ids if x]
                tokens[lang] = sum(map(len, ids))
                # Longest first, so a batch holds similar lengths; right padding, masked out of the counts.
                ids.sort(key=len, reverse=True)
                for start in range(0, len(ids), batch_size):
                    chunk = ids[start:start + batch_size]
                    width = len(chunk[0])
                    input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                    mask = torch.zeros((len(chunk), width), dtype=torch.long)
                    for r, x in enumerate(chunk):
                        input_ids[r, :len(x)] = torch.tensor(x, dtype=torch.long)
                        mask[r, :len(x)] = 1
                    out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), logits_to_keep=1)
                    counts[g] += out.router_stats.tokens_per_expert.cpu().numpy()
    finally:
        model.train(was_training)
    return counts, tokens, layers


def _route_worker(ref: ModelRef, endpoint_url: str | None, texts: dict[str, list[str]], batch_size: int,
                  max_tokens: int, dtype: str, tokenizer_fallback: str | None) -> dict[str, Any]:
    """One Ray task per model: load it (on a GPU when there is one) and count."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import apollo_ray.model.post_moe  # noqa: F401  (registers the Post-MoE architecture in this worker)

    hf_logging.disable_progress_bar()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = model_dir(ref, endpoint_url, weights=True)
    tokenizer = load_tokenizer(path, tokenizer_fallback)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype) if device.type == "cuda" else torch.float32).to(device)
    t0 = time.time()
    counts, tokens, layers = count_routing(model, tokenizer, texts, batch_size=batch_size, max_tokens=max_tokens,
                                           device=device)
    return {"counts": counts, "tokens": tokens, "layers": layers, "seconds": time.time() - t0,
            "expert_names": list(model.config.expert_names), "top_k": int(model.config.num_experts_per_tok)}


# ------------------------------------------------------------------------------------------------------------ plots
def _figure(width: float, height: float):
    # Figure + the Agg canvas directly: no pyplot, so no global backend state in a worker process
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # constrained layout, not tight_layout: it also makes room for colorbars spanning several panels
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def heatmap_png(ratio_LE: np.ndarray, layers: Sequence[int], experts: Sequence[str], title: str,
                vmax: float = 1.0) -> bytes:
    """Experts (rows) × MoE layers (columns), the share of the language's token selections in each cell.

    ``vmax``: the top of the colour scale; give every heatmap of a model the same one so colours compare."""
    E, L = len(experts), len(layers)
    fig = _figure(1.6 + 0.9 * L, 1.2 + 0.35 * E)
    ax = fig.add_subplot()
    im = ax.imshow(np.asarray(ratio_LE).T, vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
    ax.set_xticks(range(L), [f"layer {i}" for i in layers])
    ax.set_yticks(range(E), list(experts))
    for e in range(E):
        for i in range(L):
            v = float(ratio_LE[i, e])
            ax.text(i, e, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 0.6 * vmax else "black")
    ax.set_ylabel("expert")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.08)
    return _png(fig)


def overview_png(ratio_GLE: np.ndarray, languages: Sequence[str], layers: Sequence[int],
                 experts: Sequence[str], vmax: float = 1.0) -> bytes:
    """One panel per MoE layer: languages (rows) × experts (columns), as the Apollo-MoE slides show routing."""
    G, L, E = ratio_GLE.shape
    fig = _figure(2.0 + L * (0.45 * E + 1.0), 1.4 + 0.3 * G)
    im = None
    for i in range(L):
        ax = fig.add_subplot(1, L, i + 1)
        im = ax.imshow(ratio_GLE[:, i, :], vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_xticks(range(E), list(experts), rotation=90, fontsize=7)
        ax.set_yticks(range(G), list(languages), fontsize=7)
        ax.set_xlabel("expert")
        ax.set_title(f"layer {layers[i]}")
    if im is not None:
        fig.colorbar(im, ax=fig.axes, fraction=0.03)
    return _png(fig)


def specialisation_png(scores: Mapping[str, np.ndarray], languages: Sequence[str], layers: Sequence[int]) -> bytes:
    """MI over the layers (left) and routing entropy per language, with the mean (right)."""
    fig = _figure(9.0, 3.5)
    x = list(range(len(layers)))
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(x, scores["mutual_information"], marker="o")
    ax.set_ylim(bottom=0.0)
    ax.set_xticks(x, [str(i) for i in layers])
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("I(language; expert), bits")
    ax.set_title("language specialisation")
    ax = fig.add_subplot(1, 2, 2)
    for g, lang in enumerate(languages):
        ax.plot(x, scores["entropy"][g], color="0.75", linewidth=0.8)
    ax.plot(x, scores["mean_entropy"], marker="o", color="C1", label="mean over languages")
    ax.set_xticks(x, [str(i) for i in layers])
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("H(expert | language), bits")
    ax.set_title("routing entropy per language")
    ax.legend(fontsize=7)
    return _png(fig)


# --------------------------------------------------------------------------------------------------------- the stage
def semantic_config(cfg: Config) -> dict[str, Any]:
    e = cfg.eval
    out: dict[str, Any] = {"benchmarks": [b.model_dump(mode="json") for b in e.benchmarks], "limit": e.limit,
                           "items_per_language": e.analyze_items_per_language,
                           "prompt_tokens": e.analyze_prompt_tokens, "max_tokens": e.max_prompt_tokens}
    if e.analyze_prompt_tokens:  # the prompts' own knobs only matter when prompts are what is routed
        out.update(shots=e.shots, seed=e.seed, scoring=e.scoring, max_new_tokens=e.max_new_tokens)
    return out


def output_folder(cfg: Config, refs: list[ModelRef]) -> str:
    return cfg.uri("analysis", fingerprint(_FP_VERSION, semantic_config(cfg), [r.identity for r in refs]))


def _require_post_moe(cfg: Config, refs: list[ModelRef]) -> dict[str, Any]:
    configs = {}
    for ref in refs:
        mcfg = load_model_config(model_dir(ref, cfg.storage.endpoint_url, weights=False))
        if getattr(mcfg, "model_type", None) != POST_MOE_TYPE:
            raise NotPostMoE(f"analyze needs a Post-MoE model: {ref.spec} is a dense {mcfg.model_type!r} model "
                             f"without routers (upcycle it with `apollo-ray upcycle`, or train with moe.layers > 0)")
        configs[ref.name] = mcfg
    return configs


def run(cfg: Config, models: list[str] | None = None) -> str:
    """Routing analysis of ``models`` (Post-MoE; default: this run's model) into ``analysis/<fp>/``."""
    import ray

    from apollo_ray.runtime import init_ray

    storage = Storage.from_config(cfg)
    refs = resolve_models(cfg, storage, models)
    _require_post_moe(cfg, refs)
    out = output_folder(cfg, refs)
    if storage.has_manifest(out):
        log.info("%s: %s is up to date (manifest present), skipping", STAGE, out)
        return out
    t0 = time.time()
    ecfg = cfg.eval
    items = load_items(cfg, storage)
    # The first N items of each language, in benchmark/file order (deterministic).
    by_language: dict[str, list[EvalItem]] = defaultdict(list)
    beyond = 0
    for e in items.items:
        if len(by_language[e.item.language]) < ecfg.analyze_items_per_language:
            by_language[e.item.language].append(e)
        else:
            beyond += 1
    languages = [c for c in (*langs.MAJORS, *langs.minors()) if c in by_language]  # the tables' order
    dropped = Counter(reason_key(r["reason"]) for r in items.rejects)
    if beyond:
        dropped["beyond_items_per_language"] += beyond
    kept = sum(len(v) for v in by_language.values())
    if not kept:
        raise UserError(f"{STAGE}: no benchmark item to route ({items.n_read} read, rejects {dict(dropped)})")
    log.info("%s: %d languages, %d items (at most %d per language), %s text → %s", STAGE, len(languages), kept,
             ecfg.analyze_items_per_language, "prompt" if ecfg.analyze_prompt_tokens else "question + options", out)

    with Tracker(cfg).stage(STAGE, inputs={r.name: r.identity for r in refs}, output=out,
                            section=semantic_config(cfg)) as tracked:
        init_ray()
        remote = ray.remote(num_cpus=1, num_gpus=1 if cfg.resources.use_gpu else 0)(_route_worker)
        files: dict[str, str] = {}
        summary: dict[str, Any] = {}
        for ref in refs:
            texts = _texts(cfg, ref, by_language, languages, items.pools)
            res = ray.get(remote.remote(ref, cfg.storage.endpoint_url, texts, ecfg.batch_size,
                                        ecfg.max_prompt_tokens, cfg.model.dtype, cfg.model.tokenizer))
            written, scores, metrics = _write_model(storage, out, ref, languages, res, tracked)
            # One model: plain metric keys, comparable across runs; several: prefixed by the model's name.
            tracked.log_metrics(metrics if len(refs) == 1 else {metric_key(ref.name, k): v for k, v in metrics.items()})
            files.update(written)
            summary[ref.name] = scores
            log.info("%s: %s: %d tokens routed in %.1fs; MI per layer %s bits, mean entropy %s bits", STAGE,
                     ref.name, sum(res["tokens"].values()), res["seconds"],
                     _fmt(scores["mutual_information"]), _fmt(scores["mean_entropy"]))
        seconds = time.time() - t0
        manifest = Manifest(
            stage=STAGE, fingerprint=out.rstrip("/").rsplit("/", 1)[-1],
            counts={"in": items.n_read, "kept": kept, "dropped": dict(sorted(dropped.items()))},
            config=semantic_config(cfg), inputs={r.name: r.identity for r in refs}, files=files,
            extra={"models": {r.name: {"spec": r.spec, "location": r.location, "manifest": r.manifest_hash}
                              for r in refs},
                   "languages": languages, "specialisation": summary, "seconds": seconds,
                   "mlflow_run_id": tracked.run_id})
        storage.write_manifest(out, manifest)
        tracked.set_tags({"apollo.output_manifest": manifest.hash})
    log.info("%s: done in %.0fs → %s", STAGE, seconds, out)
    return out


def item_text(item: Item) -> str:
    return f"{item.question}\n{item.options_text()}"


def _texts(cfg: Config, ref: ModelRef, by_language: Mapping[str, list[EvalItem]], languages: list[str],
           pools: dict[str, ShotPool]) -> dict[str, list[str]]:
    if not cfg.eval.analyze_prompt_tokens:
        return {lang: [item_text(e.item) for e in by_language[lang]] for lang in languages}
    # Prompts depend on the tokenizer (the budget, the chat template): rendered per model.
    tokenizer = load_tokenizer(model_dir(ref, cfg.storage.endpoint_url, weights=False), cfg.model.tokenizer)
    chosen = [e for lang in languages for e in by_language[lang]]
    prompts, too_long = build_prompts(cfg.eval, ItemSet(chosen, pools, [], len(chosen)), tokenizer)
    if too_long:
        log.warning("%s: %d prompts over eval.max_prompt_tokens even 0-shot: routed as question + options", STAGE,
                    len(too_long))
    return {lang: [prompts.get(e.uid) or item_text(e.item) for e in by_language[lang]] for lang in languages}


def _write_model(storage: Storage, out: str, ref: ModelRef, languages: list[str], res: dict[str, Any],
                 tracked: Any) -> tuple[dict[str, str], dict[str, Any], dict[str, float]]:
    counts: np.ndarray = res["counts"]
    layers, experts = res["layers"], res["expert_names"]
    r = ratios(counts)
    pooled = counts.sum(axis=0, keepdims=True)
    scores = specialisation(counts)
    summary = {"layers": layers, "mutual_information": scores["mutual_information"].tolist(),
               "normalised_mi": scores["normalised_mi"].tolist(), "mean_entropy": scores["mean_entropy"].tolist()}
    doc = {
        "model": ref.spec, "location": ref.location, "manifest": ref.manifest_hash, "languages": languages,
        "layers": layers, "experts": experts, "top_k": res["top_k"], "tokens": res["tokens"],
        "counts": counts.tolist(), "ratios": r.tolist(), "ratios_all": ratios(pooled)[0].tolist(),
        "entropy": {lang: scores["entropy"][g].tolist() for g, lang in enumerate(languages)}, **summary,
    }
    vmax = max(float(r.max()), 1e-6)
    pngs = {f"heatmap-{lang}.png": heatmap_png(r[g], layers, experts, f"{ref.name}: {lang}", vmax)
            for g, lang in enumerate(languages)}
    pngs[f"heatmap-{ALL}.png"] = heatmap_png(ratios(pooled)[0], layers, experts, f"{ref.name}: all languages", vmax)
    pngs["overview.png"] = overview_png(r, languages, layers, experts, vmax)
    pngs["specialisation.png"] = specialisation_png(scores, languages, layers)
    files: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="apollo-analyze-") as tmp:
        local = Path(tmp)
        buf = io.BytesIO()
        np.savez_compressed(buf, counts=counts, ratios=r, languages=np.array(languages), layers=np.array(layers),
                            experts=np.array(experts), mutual_information=scores["mutual_information"],
                            entropy=scores["entropy"])
        (local / "routing.npz").write_bytes(buf.getvalue())
        (local / "routing.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False), "utf-8")
        for name, data in pngs.items():
            (local / name).write_bytes(data)
        storage.put_dir(local, f"{out}/{ref.name}")
        tracked.log_artifacts(local, ref.name)
        for f in sorted(local.iterdir()):
            files[f"{ref.name}/{f.stem}"] = f"{ref.name}/{f.name}"
    metrics = {f"mi/layer_{layer}": v for layer, v in zip(layers, summary["mutual_information"])}
    metrics.update({f"mean_entropy/layer_{layer}": v for layer, v in zip(layers, summary["mean_entropy"])
                    if np.isfinite(v)})
    metrics.update({f"entropy/{lang}/layer_{layer}": float(scores["entropy"][g, i])
                    for g, lang in enumerate(languages) for i, layer in enumerate(layers)
                    if np.isfinite(scores["entropy"][g, i])})
    return files, summary, metrics


def _fmt(xs: Sequence[float]) -> str:
    return "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"
