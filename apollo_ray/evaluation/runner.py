"""``apollo-ray evaluate``: one or several models side by side on the configured MCQ benchmarks, on Ray Data.

Driver: read every benchmark (rejects kept with file, index and reason), render each item's seeded k-shot prompt with
each model's tokenizer, then per model stream the prompt rows through an actor pool (``Scorer``: the model is loaded
once per actor, on a GPU when there is one) that scores them by option log-likelihood or greedy generation. Results
are aggregated the papers' way (``aggregate``) and written to ``eval/<fingerprint>/``: results.json, table.md (one
row per model), accuracy.png, predictions.jsonl (every item's prediction and raw output: option log-likelihoods or
the generated text), rejects.json (benchmark, file, index, reason, raw input; a ``prompt_too_long`` reject names its
file by the stem in its item id), then the manifest, last.

Side by side means on the same items: an item whose prompt does not fit one model's tokenizer budget even 0-shot is
a ``prompt_too_long`` reject for every model, so each row of the table is computed over exactly the same questions.

The output folder is a fingerprint of the semantic eval config (operational knobs such as batch size and actors
excluded) and of each model's identity: its manifest hash when it has one (a trained model), else its path or hub id.
A folder whose manifest exists is up to date and the stage skips.

``eval.protocol`` says how items are prompted and scored: ``apollo`` as the reference code does (its prompts, greedy
generation, its answer extraction, the papers' sources per language: ``evaluation/apollo.py``), ``native`` with our
prompts and ``eval.scoring``. Every table, results file, manifest and MLflow run names the protocol.

Post-MoE models route by plain top-k in evaluation (the paper's choice). With ``eval.hybrid_in_eval`` each item's
language expert is passed as ``language_ids`` and hybrid routing applies in evaluation too (a model trained with
``routing=language`` needs it to be evaluated the way it was trained).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from apollo_ray.config import BenchmarkConfig, Config, EvalConfig, fingerprint
from apollo_ray.errors import UserError
from apollo_ray.evaluation import apollo
from apollo_ray.evaluation.aggregate import aggregate, bar_chart_png, markdown_table
from apollo_ray.evaluation.benchmark import MAX_OPTIONS, Item, Reject, load_benchmark, load_shot_pool
from apollo_ray.evaluation.prompts import TEMPLATES, PromptTooLong, ShotPool, build_prompt, prompt_length
from apollo_ray.storage import Manifest, Storage, join
from apollo_ray.tracking import PARENT_ENV, Run, Tracker

log = logging.getLogger(__name__)

STAGE = "evaluate"
_FP_VERSION = "evaluate-v2"  # v2: protocols; results name theirs
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_PROGRESS_EVERY_S = 10.0
POST_MOE_TYPE = "apollo_post_moe"  # PostMoEConfig.model_type, without importing torch in the driver's hot path


# ------------------------------------------------------------------------------------------------------------ models
@dataclass(frozen=True)
class ModelRef:
    """A model to evaluate, as the driver resolved it; picklable, so actors resolve the same thing."""

    spec: str  # as the user named it
    name: str  # table row, metric prefix (unique within a run)
    location: str  # an object-store URI, a local folder or a hub id
    kind: str  # "remote" | "local" | "hub"
    manifest_hash: str | None = None
    training_run_id: str | None = None  # the MLflow run that trained it (its manifest's extra.mlflow_run_id)

    @property
    def identity(self) -> str:
        return self.manifest_hash or self.location


def _no_model(cfg: Config, spec: str, models: list[str] | None) -> str:
    if not models:  # this run's own model: say which stage makes it
        return (f"no trained model at {spec}: `apollo-ray train` writes it (train.run_name={cfg.train.run_name!r}); "
                f"run `apollo-ray train` or the whole `apollo-ray run` first, or pass --model PATH_OR_HUB_ID")
    return f"--model {spec!r}: no such folder (and not a hub id like 'Qwen/Qwen2-0.5B')"


def _check_hub_model(spec: str) -> None:
    """A hub id must be loadable here, where a mistake is one line, not in an actor where it is a traceback."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(spec)
    except OSError as e:  # no such repo, or no hub reachable and nothing cached
        raise UserError(f"--model {spec!r}: not a local folder, and cannot load it as a hub id: "
                        f"{str(e).splitlines()[0]}") from e


def resolve_models(cfg: Config, storage: Storage, models: list[str] | None) -> list[ModelRef]:
    """``--model`` values → ``ModelRef``; default: this run's trained model ``models/<train.run_name>``.

    ``tiny`` names the tiny dense base (built on first use). A model folder with a manifest (what ``train`` writes)
    is identified by the manifest's hash, anything else by its path or hub id.
    """
    specs = list(models) if models else [cfg.uri("models", cfg.train.run_name)]
    if not specs:
        raise ValueError("no model to evaluate")
    refs: list[ModelRef] = []
    used: Counter = Counter()
    for spec in specs:
        location = spec
        if spec == "tiny":
            from apollo_ray.model.tiny import ensure_base, tiny_base_uri

            ensure_base(cfg, storage)
            location = tiny_base_uri(cfg, storage)
        if "://" in location and not location.startswith("file://"):
            kind = "remote"
        elif Path(location.removeprefix("file://")).exists():
            kind, location = "local", str(Path(location.removeprefix("file://")).resolve())
        elif location.startswith(("/", "./", "../", "file://")) or location.count("/") > 1:
            raise UserError(_no_model(cfg, spec, models))
        else:
            kind = "hub"
            _check_hub_model(spec)
        manifest_hash = run_id = None
        if kind != "hub":
            st = Storage(location, cfg.storage.endpoint_url)
            if not st.exists(join(location, "config.json")):
                raise UserError(f"model {spec!r}: {location} has no config.json (not a model folder, or the stage "
                                f"that writes it has not finished)")
            if st.has_manifest(location):
                m = st.read_manifest(location)
                manifest_hash, run_id = m.hash, m.extra.get("mlflow_run_id")
        base = re.sub(r"[^\w\-.]", "_", location.rstrip("/").rsplit("/", 1)[-1]) or "model"
        used[base] += 1
        name = base if used[base] == 1 else f"{base}-{used[base]}"
        refs.append(ModelRef(spec, name, location, kind, manifest_hash, run_id))
    return refs


def model_dir(ref: ModelRef, endpoint_url: str | None, *, weights: bool = True) -> str:
    """Something ``from_pretrained`` reads: the folder itself, the hub id, or a local copy of a remote folder (without
    the weights when only the tokenizer and config are needed: the driver never downloads a 7B to count tokens)."""
    if ref.kind != "remote":
        return ref.location
    st = Storage(ref.location, endpoint_url)
    dest = Path(tempfile.mkdtemp(prefix="apollo-eval-model-"))
    if weights:
        return str(st.get_dir(ref.location, dest))
    for uri in st.ls(ref.location):
        fname = uri.rstrip("/").rsplit("/", 1)[-1]
        if not fname.endswith(_WEIGHT_SUFFIXES) and st.fs.isfile(uri):
            (dest / fname).write_bytes(st.read_bytes(uri))
    return str(dest)


def load_tokenizer(path: str, fallback: str | None = None) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        if fallback is None:
            raise
        return AutoTokenizer.from_pretrained(fallback)


def load_model_config(path: str) -> Any:
    import apollo_ray.model.post_moe  # noqa: F401  (registers the Post-MoE architecture)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


# ------------------------------------------------------------------------------------------------------------- items
@dataclass(frozen=True)
class EvalItem:
    uid: str  # "<benchmark>/<item id>": unique across benchmarks that share file names
    benchmark: str
    item: Item


@dataclass
class ItemSet:
    items: list[EvalItem]
    pools: dict[str, ShotPool]  # benchmark name → where its shots come from
    rejects: list[dict[str, Any]]  # benchmark items that are not items, with file, index and reason
    n_read: int  # items read (kept + rejected)
    pool_rejects: int = 0  # unreadable records of separate dev (shot) files; not benchmark items


def load_items(cfg: Config, storage: Storage) -> ItemSet:
    names = [b.name for b in cfg.eval.benchmarks]
    if len(set(names)) != len(names):
        raise UserError(f"eval.benchmarks: duplicate benchmark names {names}")
    out = ItemSet([], {}, [], 0)
    for bench in cfg.eval.benchmarks:
        items, rejects = load_benchmark(bench, storage, limit=cfg.eval.limit)
        pool, pool_rejects = load_shot_pool(bench, storage, items)
        out.items += [EvalItem(f"{bench.name}/{it.id}", bench.name, it) for it in items]
        out.rejects += [_reject_row(bench, r) for r in rejects]
        out.pools[bench.name] = ShotPool(pool)
        out.pool_rejects += len(pool_rejects)
        out.n_read += len(items) + len(rejects)
        log.info("benchmark %s: %d items, %d rejects%s", bench.name, len(items), len(rejects),
                 f", shot pool {len(pool)} ({len(pool_rejects)} rejects)" if bench.dev_path else "")
    return out


def _reject_row(bench: BenchmarkConfig, r: Reject) -> dict[str, Any]:
    return {"benchmark": bench.name, "file": r.file, "index": r.index, "reason": r.reason, "raw": r.raw}


def reason_key(reason: str) -> str:
    """The count key of a reject reason: its text up to the first colon ("bad JSON: <message>" → "bad JSON")."""
    return reason.split(":", 1)[0].strip()


def answer_room(ecfg: EvalConfig, tokenizer: Any) -> int:
    """Tokens kept free after the prompt: the generated answer, or the longest scored option label."""
    if ecfg.scoring == "generate":
        return ecfg.max_new_tokens
    return max(len(tokenizer(tpl.continuation(letter), add_special_tokens=False)["input_ids"])
               for tpl in TEMPLATES.values() for letter in "ABCDEF")


def build_prompts(ecfg: EvalConfig, items: ItemSet, tokenizer: Any) -> tuple[dict[str, str], dict[str, str]]:
    """uid → rendered k-shot prompt within the budget, and uid → why it cannot be (0-shot still too long).

    Protocol ``apollo``: the reference's prompt within ``max_prompt_chars`` characters; the token budget is then only
    a guard for the model's context (an item over it is a reject, never a truncated prompt).
    """
    budget = ecfg.max_prompt_tokens - answer_room(ecfg, tokenizer)
    if budget <= 0:
        raise UserError(f"eval.max_prompt_tokens={ecfg.max_prompt_tokens} leaves no room for a prompt after "
                         f"{answer_room(ecfg, tokenizer)} answer tokens")
    prompts: dict[str, str] = {}
    too_long: dict[str, str] = {}
    eos = apollo.eos_text(tokenizer)
    for e in items.items:
        pool = items.pools[e.benchmark]
        try:
            if ecfg.protocol == "apollo":
                text = apollo.build_prompt(e.item, pool, ecfg.shots, ecfg.seed, eos=eos,
                                           max_chars=ecfg.max_prompt_chars)
                n = prompt_length(text, tokenizer)
                if n > budget:
                    raise PromptTooLong(e.item.id, n, budget, "tokens")
                prompts[e.uid] = text
            else:
                prompts[e.uid] = build_prompt(e.item, pool, ecfg.shots, ecfg.seed, tokenizer, budget)
        except PromptTooLong as err:
            too_long[e.uid] = str(err)
    return prompts, too_long


def _tokenizer_key(tokenizer: Any) -> str:
    """Two tokenizers with the same key render and count prompts the same (e.g. a base and its upcycled copy)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return fingerprint(type(tokenizer).__name__, vocab, getattr(tokenizer, "chat_template", None),
                       getattr(tokenizer, "bos_token", None))


# ------------------------------------------------------------------------------------------------------------ scorer
@contextlib.contextmanager
def language_ids(model: Any, expert: int | None) -> Iterator[None]:
    """Every forward of ``model`` inside gets ``language_ids=expert`` per sequence, so ``score_options`` and
    ``generate`` (which do not know about languages) route by the item's language expert."""
    if expert is None or expert < 0:
        yield
        return
    import torch

    def inject(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ref = kwargs.get("input_ids")
        ref = ref if ref is not None else (args[0] if args else kwargs["inputs_embeds"])
        return args, {**kwargs, "language_ids": torch.full((ref.shape[0],), expert, dtype=torch.long,
                                                           device=ref.device)}

    handle = model.register_forward_pre_hook(inject, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class Scorer:
    """Ray Data actor: loads the model once, then scores batches of prompt rows (``uid``, ``item`` JSON, ``prompt``,
    ``expert``) into outcome rows (``uid``, ``predicted``, ``correct``, ``output``)."""

    def __init__(self, model: ModelRef, endpoint_url: str | None, scoring: str, max_new_tokens: int,
                 batch_size: int, hybrid_in_eval: bool, dtype: str, tokenizer_fallback: str | None = None,
                 protocol: str = "native"):
        import torch
        from transformers import AutoModelForCausalLM

        from transformers.utils import logging as hf_logging

        import apollo_ray.model.post_moe  # noqa: F401  (registers the Post-MoE architecture in this worker)

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per actor adds nothing to Ray Data's own
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # bf16 on CPU is emulated and slow; the CPU path (tests, tiny models) always runs fp32.
        torch_dtype = getattr(torch, dtype) if self.device.type == "cuda" else torch.float32
        path = model_dir(model, endpoint_url, weights=True)
        self.tokenizer = load_tokenizer(path, tokenizer_fallback)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(self.device).eval()
        if getattr(self.model.config, "model_type", None) == POST_MOE_TYPE:
            self.model.config.hybrid_in_eval = hybrid_in_eval  # read by the sparse blocks at every forward
        self.scoring, self.max_new_tokens, self.batch_size = scoring, max_new_tokens, batch_size
        self.protocol = protocol

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from apollo_ray.evaluation.scoring import extract_answer, generate_answers, score_options

        started = time.time()
        apollo_protocol = self.protocol == "apollo"
        extract = apollo.extract_reference if apollo_protocol else extract_answer
        items = [Item.from_dict(json.loads(s)) for s in batch["item"]]
        prompts = [str(p) for p in batch["prompt"]]
        experts = [int(x) for x in batch["expert"]]
        predicted: list[str | None] = [None] * len(items)
        output: list[str] = [""] * len(items)
        for expert in sorted(set(experts)):
            idx = [i for i, x in enumerate(experts) if x == expert]
            with language_ids(self.model, expert):
                if self.scoring == "loglik":
                    scores = score_options(self.model, self.tokenizer, [prompts[i] for i in idx],
                                           [items[i] for i in idx], self.device,
                                           batch_rows=self.batch_size * MAX_OPTIONS)
                    for i, s in zip(idx, scores):
                        predicted[i] = s.predicted
                        output[i] = json.dumps(dict(zip(s.letters, (round(x, 4) for x in s.sums))))
                else:
                    texts = generate_answers(self.model, self.tokenizer, [prompts[i] for i in idx],
                                             self.max_new_tokens, batch_size=self.batch_size, device=self.device,
                                             min_new_tokens=apollo.MIN_NEW_TOKENS if apollo_protocol else 0)
                    for i, text in zip(idx, texts):
                        predicted[i], output[i] = extract(text), text
        return {
            "uid": np.asarray(batch["uid"], dtype=object),
            "predicted": np.asarray([p or "" for p in predicted], dtype=object),
            "correct": np.asarray([p == it.answer for p, it in zip(predicted, items)], dtype=bool),
            "output": np.asarray(output, dtype=object),
            # when this batch was scored: the rate's clock runs from the first batch, after the model is loaded
            "started": np.full(len(items), started), "finished": np.full(len(items), time.time()),
        }


def actor_count(cfg: Config, n_batches: int) -> int:
    """``eval.actors``, else one per GPU (use_gpu) or per CPU that Ray has free; never more than there are batches."""
    import ray

    if cfg.eval.actors is not None:
        return cfg.eval.actors
    free = ray.available_resources().get("GPU" if cfg.resources.use_gpu else "CPU", 1)
    return max(1, min(int(free), n_batches))


def score_on_ray(cfg: Config, ref: ModelRef, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], float]:
    """Stream ``rows`` through a pool of scoring actors; the outcome rows and the seconds spent scoring them, from
    the first batch's start to the last one's end (model loading excluded)."""
    import ray

    ecfg = cfg.eval
    actors = actor_count(cfg, math.ceil(len(rows) / ecfg.batch_size))
    # Longest prompts first and together: batches of similar lengths pad little, and the slowest work starts first.
    rows = sorted(rows, key=lambda r: -len(r["prompt"]))
    blocks = max(1, min(math.ceil(len(rows) / ecfg.batch_size), 2000))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(
        Scorer, batch_size=ecfg.batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1, num_gpus=1 if cfg.resources.use_gpu else 0,
        fn_constructor_kwargs=dict(model=ref, endpoint_url=cfg.storage.endpoint_url, scoring=ecfg.scoring,
                                   max_new_tokens=ecfg.max_new_tokens, batch_size=ecfg.batch_size,
                                   hybrid_in_eval=ecfg.hybrid_in_eval, dtype=cfg.model.dtype,
                                   tokenizer_fallback=cfg.model.tokenizer, protocol=ecfg.protocol))
    out: list[dict[str, Any]] = []
    first = float("inf")
    end = 0.0
    last = time.time()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        out += [{"uid": str(u), "predicted": str(p) or None, "correct": bool(c), "output": str(o)}
                for u, p, c, o in zip(batch["uid"], batch["predicted"], batch["correct"], batch["output"])]
        if len(batch["uid"]):
            first, end = min(first, float(batch["started"].min())), max(end, float(batch["finished"].max()))
        if time.time() - last >= _PROGRESS_EVERY_S:
            last = time.time()
            log.info("%s: %s: %d/%d items (%.1f items/s)", STAGE, ref.name, len(out), len(rows),
                     len(out) / max(end - first, 1e-9))
    seconds = max(end - first, 0.0)
    log.info("%s: %s: %d items in %.1fs of scoring (%.1f items/s, protocol %s, %s, %d actor(s))", STAGE, ref.name,
             len(out), seconds, len(out) / max(seconds, 1e-9), ecfg.protocol, ecfg.scoring, actors)
    missing = {r["uid"] for r in rows} - {o["uid"] for o in out}
    if missing:
        raise RuntimeError(f"{STAGE}: {ref.name}: {len(missing)} items came back unscored, e.g. {sorted(missing)[:3]}")
    return out, seconds


# --------------------------------------------------------------------------------------------------------- the stage
def semantic_config(cfg: Config) -> dict[str, Any]:
    """What changes the numbers (the fingerprint): not batch size, actors, or the routing-analysis knobs."""
    e = cfg.eval.model_dump(mode="json", exclude={"batch_size", "actors", "analyze_prompt_tokens",
                                                   "analyze_items_per_language"})
    e["dtype"] = cfg.model.dtype if cfg.resources.use_gpu else "float32"
    return e


def output_folder(cfg: Config, refs: list[ModelRef]) -> str:
    return cfg.uri("eval", fingerprint(_FP_VERSION, semantic_config(cfg), [r.identity for r in refs]))


@dataclass
class _ModelPrompts:
    ref: ModelRef
    post_moe: bool
    language_to_expert: dict[str, int]
    prompts: dict[str, str] = field(default_factory=dict)


def run(cfg: Config, models: list[str] | None = None) -> str:
    """Evaluate ``models`` (paths, storage URIs, hub ids; default: this run's model) into ``eval/<fp>/``."""
    from apollo_ray.runtime import init_ray

    storage = Storage.from_config(cfg)
    refs = resolve_models(cfg, storage, models)
    out = output_folder(cfg, refs)
    if storage.has_manifest(out):
        log.info("%s: %s is up to date (manifest present), skipping", STAGE, out)
        return out
    t0 = time.time()
    ecfg = cfg.eval
    items = load_items(cfg, storage)
    by_uid = {e.uid: e for e in items.items}

    # Prompts per distinct tokenizer; an item too long for any model is dropped for all (same items in every row).
    per_model: list[_ModelPrompts] = []
    rendered: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
    too_long: dict[str, str] = {}
    for ref in refs:
        path = model_dir(ref, cfg.storage.endpoint_url, weights=False)
        tokenizer = load_tokenizer(path, cfg.model.tokenizer)
        mcfg = load_model_config(path)
        key = _tokenizer_key(tokenizer)
        if key not in rendered:
            rendered[key] = build_prompts(ecfg, items, tokenizer)
        prompts, long_ = rendered[key]
        too_long.update(long_)
        post_moe = getattr(mcfg, "model_type", None) == POST_MOE_TYPE
        per_model.append(_ModelPrompts(ref, post_moe, dict(getattr(mcfg, "language_to_expert", None) or {}),
                                       prompts))
        if post_moe and mcfg.routing == "language" and not ecfg.hybrid_in_eval:
            log.warning("%s: %s was trained with routing=language but is evaluated by its learned top-k router "
                        "(set eval.hybrid_in_eval=true to route by language)", STAGE, ref.name)
    rejects = list(items.rejects)
    for uid, why in sorted(too_long.items()):
        e = by_uid[uid]
        stem, _, index = e.item.id.rpartition("-")  # ids are "<file stem>-<index>"
        rejects.append({"benchmark": e.benchmark, "file": stem, "index": int(index) if index.isdigit() else None,
                        "reason": PromptTooLong.reason, "detail": why,
                        "raw": json.dumps(e.item.to_dict(), ensure_ascii=False)[:2000]})
    scored = [e for e in items.items if e.uid not in too_long]
    dropped = Counter(reason_key(r["reason"]) for r in rejects)
    log.info("%s: %d items read, %d to score per model, %d rejected %s; %d model(s) → %s", STAGE, items.n_read,
             len(scored), len(rejects), dict(dropped), len(refs), out)
    if not scored:
        raise UserError(f"{STAGE}: no item left to score ({items.n_read} read, rejects: {dict(dropped)})")

    tracker = Tracker(cfg)
    with _nested_under(tracker, refs), tracker.stage(
            STAGE, inputs={r.name: r.identity for r in refs}, output=out, section=semantic_config(cfg)) as tracked:
        init_ray()
        tracked.set_tags({"apollo.eval.protocol": ecfg.protocol})
        protocol_line = apollo.describe(ecfg.protocol, ecfg)
        sources = apollo.language_sources(ecfg.sources, ecfg.protocol)
        results: dict[str, dict[str, Any]] = {}
        predictions: list[dict[str, Any]] = []
        rates: dict[str, float] = {}
        for mp in per_model:
            pass_ids = mp.post_moe and ecfg.hybrid_in_eval
            rows = [{"uid": e.uid, "item": json.dumps(e.item.to_dict(), ensure_ascii=False),
                     "prompt": mp.prompts[e.uid],
                     "expert": mp.language_to_expert.get(e.item.language, -1) if pass_ids else -1}
                    for e in scored]
            outcomes, seconds = score_on_ray(cfg, mp.ref, rows)
            rates[mp.ref.name] = len(outcomes) / max(seconds, 1e-9)
            outcome_of = {o["uid"]: o for o in outcomes}
            res = aggregate(({"language": e.item.language, "source": e.item.source,
                              "correct": outcome_of[e.uid]["correct"]} for e in scored), sources=sources)
            results[mp.ref.name] = {**res, "protocol": ecfg.protocol, "protocol_description": protocol_line,
                                    "rejects": dict(sorted(dropped.items())), "model": mp.ref.spec,
                                    "location": mp.ref.location, "manifest": mp.ref.manifest_hash,
                                    "post_moe": mp.post_moe, "language_ids": pass_ids,
                                    "items_per_s": rates[mp.ref.name]}
            predictions += [{"model": mp.ref.name, "uid": e.uid, "language": e.item.language,
                             "source": e.item.source, "answer": e.item.answer, **outcome_of[e.uid]} for e in scored]

        table = markdown_table(results, minor_columns=True, protocol=protocol_line)
        from apollo_ray.data.decontam import table_note  # hygiene: the benchmarks the training data was checked against
        table += table_note(cfg, storage, refs)
        log.info("%s: accuracy (%%):\n%s", STAGE, table)
        files = {"results": "results.json", "table": "table.md", "plot": "accuracy.png",
                 "predictions": "predictions.jsonl", "rejects": "rejects.json"}
        with tempfile.TemporaryDirectory(prefix="apollo-eval-") as tmp:
            local = Path(tmp)
            (local / files["results"]).write_text(json.dumps(results, indent=1, ensure_ascii=False), "utf-8")
            (local / files["table"]).write_text(table, "utf-8")
            (local / files["plot"]).write_bytes(bar_chart_png(
                results, title=f"accuracy (protocol {ecfg.protocol}, {ecfg.scoring}, {ecfg.shots}-shot)"))
            (local / files["predictions"]).write_text(
                "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions), "utf-8")
            (local / files["rejects"]).write_text(json.dumps(rejects, indent=1, ensure_ascii=False), "utf-8")
            storage.put_dir(local, out)
            for name in ("results", "table", "plot"):
                tracked.log_artifact(local / files[name])
        _log_metrics(tracked, results)
        _log_lineage(tracked, refs, results, out)

        seconds = time.time() - t0
        manifest = Manifest(
            stage=STAGE, fingerprint=out.rstrip("/").rsplit("/", 1)[-1],
            counts={"in": items.n_read, "kept": len(scored), "dropped": dict(sorted(dropped.items()))},
            config=semantic_config(cfg), inputs={r.name: r.identity for r in refs}, files=files,
            extra={"models": {r.name: {"spec": r.spec, "location": r.location, "manifest": r.manifest_hash,
                                       "mlflow_run_id": r.training_run_id} for r in refs},
                   "major": {n: r["major"]["accuracy"] for n, r in results.items()},
                   "minor": {n: r["minor"]["accuracy"] for n, r in results.items()},
                   "protocol": ecfg.protocol, "protocol_description": protocol_line,
                   "items_per_s": rates, "seconds": seconds, "shot_pool_rejects": items.pool_rejects,
                   "benchmarks": [b.model_dump(mode="json") for b in ecfg.benchmarks],
                   "mlflow_run_id": tracked.run_id})
        storage.write_manifest(out, manifest)
        tracked.set_tags({"apollo.output_manifest": manifest.hash})
    log.info("%s: done in %.0fs → %s", STAGE, seconds, out)
    return out


def metric_key(*parts: str) -> str:
    return "/".join(re.sub(r"[^\w\-. /]", "_", p) for p in parts)


def main_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Per-language accuracy, Major, Minor and n of one model's results (None values left out)."""
    m = {metric_key("accuracy", lang): v["accuracy"] for lang, v in result["languages"].items()}
    m.update({k: result[k]["accuracy"] for k in ("major", "minor") if result[k]["accuracy"] is not None})
    m["n"] = result["n"]
    return m


def _log_metrics(tracked: Any, results: dict[str, dict[str, Any]]) -> None:
    # One model (the pipeline's case): plain keys, comparable across runs; several: prefixed by the model's name.
    if len(results) == 1:
        tracked.log_metrics(main_metrics(next(iter(results.values()))))
        return
    for name, r in results.items():
        tracked.log_metrics({metric_key(name, k): v for k, v in main_metrics(r).items()})


@contextlib.contextmanager
def _nested_under(tracker: Tracker, refs: list[ModelRef]) -> Iterator[None]:
    """Outside a pipeline, a single trained model's evaluation run nests under the run that trained it."""
    run_ids = {r.training_run_id for r in refs if r.training_run_id}
    if not tracker.enabled or os.environ.get(PARENT_ENV) or len(refs) != 1 or len(run_ids) != 1:
        yield
        return
    (run_id,) = run_ids
    if not _run_exists(run_id):
        yield
        return
    os.environ[PARENT_ENV] = run_id
    try:
        yield
    finally:
        os.environ.pop(PARENT_ENV, None)


def _run_exists(run_id: str) -> bool:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient().get_run(run_id)
        return True
    except MlflowException:
        return False


def _log_lineage(tracked: Any, refs: list[ModelRef], results: dict[str, dict[str, Any]], out: str) -> None:
    """Tag each model's training run on the evaluation run, and log the main metrics into that training run."""
    if tracked.run_id is None:
        return
    for ref in refs:
        if not ref.training_run_id:
            continue
        tracked.set_tags({f"apollo.lineage.{metric_key(ref.name)}.train_run_id": ref.training_run_id})
        if not _run_exists(ref.training_run_id):
            log.warning("%s: %s was trained in MLflow run %s, which this tracking store does not hold; its "
                        "metrics stay on the evaluation run only", STAGE, ref.name, ref.training_run_id)
            continue
        train_run = Run(ref.training_run_id, tracked.client)
        train_run.log_metrics({metric_key("eval", k): v for k, v in main_metrics(results[ref.name]).items()})
        train_run.set_tags({"apollo.eval.output_uri": out, "apollo.eval.run_id": tracked.run_id})
