"""The one typed config of a run.

``ray_config.yaml`` names a preset (``tiny`` by default) and overrides any of its fields; ``--set a.b=v`` overrides
on the command line win over both. Presets are functions deriving from the defaults (torchtitan style), never copied
files. Every section forbids unknown keys, so a misspelled key fails with its dotted path, its value and the file.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from apollo_ray import languages as langs
from apollo_ray.errors import UserError

Kind = Literal["book", "paper", "encyclopedia", "guideline", "web", "dialogue", "exam", "general", "math", "code"]
PRETRAIN_KINDS: tuple[str, ...] = ("book", "paper", "encyclopedia", "guideline", "web")
INSTRUCTION_KINDS: tuple[str, ...] = ("dialogue", "exam", "general", "math", "code")
PACKAGE_DIR = Path(__file__).resolve().parent
SAMPLE_DATA = PACKAGE_DIR / "sample_data"


class Section(BaseModel):
    # inf / nan validate as floats by default: train.lr=.inf would train on NaNs
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------------- shared services
class StorageConfig(Section):
    root: str = Field("./apollo-runs", validate_default=True,
                      description="fsspec URI every stage writes under: a local path or s3://bucket/prefix")
    endpoint_url: str | None = Field(None, description="S3 endpoint (else AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3)")
    shard_rows: int = Field(5000, gt=0, description="rows per parquet shard")

    @field_validator("root")
    @classmethod
    def _absolute(cls, v: str) -> str:
        # Resolved once, here, so every consumer sees one path: Ray Train/Tune reject a relative storage_path, and a
        # job, a worker or MLflow started from another working directory would otherwise write somewhere else.
        if "://" in v and not v.startswith("file://"):
            return v.rstrip("/") or v
        if not v.strip():
            raise ValueError("empty storage root")
        return str(Path(v.removeprefix("file://")).expanduser().resolve())


class TrackingConfig(Section):
    enabled: bool = True
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///<root>/mlflow.db for a local root")
    experiment: str = "apollo-ray"


class LanguagesConfig(Section):
    include: list[str] = Field(default_factory=lambda: list(langs.MAJORS),
                               description="languages of the run (order = expert order when moe.experts=language)")

    @field_validator("include")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        out = [langs.canonical(c) for c in v]
        if len(set(out)) != len(out):
            raise ValueError(f"duplicate language codes in {v}")
        return out


# ------------------------------------------------------------------------------------------------------------- data
class SourceConfig(Section):
    name: str
    path: str = Field(description="file, glob or folder (local or s3://), or a Hugging Face dataset id / local path")
    format: Literal["auto", "jsonl", "json", "parquet", "txt", "hf"] = "auto"
    kind: Kind
    language: str = Field("auto", description="a registry code, or 'auto' to detect per document")
    text_field: str = "text"
    id_field: str | None = "id"
    question_field: str = Field("question", description="instruction kinds: the question (else text_field)")
    answer_field: str = Field("answer", description="instruction kinds: the answer, appended to the question")
    kind_field: str | None = Field("kind", description="a record's own kind (one of the kinds) overrides `kind`")
    language_field: str | None = Field("language", description="with language=auto: a record's declared language")
    hf_split: str = "train"
    hf_data_files: list[str] | None = Field(None, description="data_files for load_dataset (e.g. path='json')")
    priority: float | None = Field(None, gt=0, description="sampler priority; default from data.priorities by kind")
    epochs: int | None = Field(None, ge=1)

    @field_validator("language")
    @classmethod
    def _lang(cls, v: str) -> str:
        return v if v == "auto" else langs.canonical(v)


def _sample_sources() -> list[SourceConfig]:
    return [
        SourceConfig(name="sample-encyclopedia", path=str(SAMPLE_DATA / "corpus"), format="jsonl",
                     kind="encyclopedia", language="auto"),
        SourceConfig(name="sample-exam", path=str(SAMPLE_DATA / "instruct"), format="jsonl", kind="exam",
                     language="auto"),
    ]


class DataConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=_sample_sources)
    min_chars: int = Field(40, ge=0, description="documents shorter than this are dropped (too_short)")
    max_symbol_ratio: float = Field(0.3, gt=0, le=1,
                                    description="share of punctuation/symbol characters among non-space ones")
    max_repetition: float = Field(0.3, gt=0, le=1, description="share of duplicated lines / 10-grams")
    near_dup_threshold: float = Field(0.8, gt=0, le=1, description="MinHash Jaccard above which a doc is a near-dup")
    minhash_perm: int = Field(128, ge=16)
    paragraph_tokens: int = Field(512, ge=16, description="max tokens of a chunked paragraph")
    language_min_confidence: float = Field(0.5, ge=0, le=1)
    priorities: dict[str, float] = Field(default_factory=lambda: {
        **{k: 16.0 for k in PRETRAIN_KINDS}, "dialogue": 2.0, "exam": 2.0, "general": 2.0, "math": 16.0, "code": 16.0})
    epochs: dict[str, int] = Field(default_factory=lambda: {
        **{k: 1 for k in PRETRAIN_KINDS}, "dialogue": 2, "exam": 2, "general": 2, "math": 1, "code": 1})
    heldout_fraction: float = Field(0.02, ge=0, lt=1)


class OpenAIBackendConfig(Section):
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "gpt-3.5-turbo"
    api_key_env: str = Field("OPENAI_API_KEY", description="name of the env var holding the key (never the key)")
    concurrency: int = Field(32, ge=1, description="in-flight requests per actor")
    qps: float | None = Field(None, gt=0, description="global request rate limit")
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(6, ge=0)
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles per attempt, with jitter")
    max_backoff_s: float = Field(60.0, ge=0, description="cap on one retry delay (also on a server's Retry-After)")
    temperature: float = 0.6
    top_p: float = 0.8
    frequency_penalty: float = 0.6
    presence_penalty: float = 0.8
    max_tokens: int = 1024


class RewriteConfig(Section):
    backend: Literal["extractive", "openai", "hf"] = "extractive"
    prompt_version: str = "v1"
    min_answer_chars: int = Field(32, ge=0)
    max_dialogue_chars: int = Field(4000, gt=0)
    actors: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    openai: OpenAIBackendConfig = Field(default_factory=OpenAIBackendConfig)
    hf_model: str | None = Field(None, description="hub id or path for the hf backend")
    hf_max_new_tokens: int = Field(512, ge=1, description="generation length of the hf backend")


# ------------------------------------------------------------------------------------------------------------ model
class ArchConfig(Section):
    """Qwen2-architecture dimensions: build a model from scratch (tiny) or plan a real one without its weights."""
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768

    @model_validator(mode="after")
    def _heads(self) -> "ArchConfig":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} not divisible by num_key_value_heads "
                             f"{self.num_key_value_heads}")
        return self


class ModelConfig(Section):
    base: str = Field("tiny", description="'tiny' (built from model.arch + a locally trained tokenizer), a hub id or a path")
    arch: ArchConfig | None = None
    tokenizer: str | None = Field(None, description="tokenizer id/path; default: the base's, or the trained tiny one")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class MoEConfig(Section):
    layers: int = Field(2, ge=0, description="the last N decoder layers become Post-MoE blocks (0 = dense)")
    experts: Literal["family", "language"] = "family"
    top_k: int = Field(2, ge=1)
    routing: Literal["topk", "language", "hybrid"] = "hybrid"
    renormalize: bool = Field(True, description="renormalise top-k weights (function-preserving upcycling); False "
                                                 "reproduces the reference code's unnormalised weights")
    shared_expert: Literal["none", "gated", "reference"] = Field(
        "none", description="gated: an always-on expert beside the E routed ones, zero at step 0 (function-preserving); "
                            "reference: the whole dense MLP, with top-(k-1) of E-1 routed experts (ApolloMoE)")
    router_init_std: float = Field(0.02, gt=0)
    aux_loss_coef: float = Field(0.0, ge=0)
    z_loss_coef: float = Field(0.0, ge=0)
    ep_size: int = Field(1, ge=1, description="expert-parallel ranks (DeepSpeed)")

    @field_validator("shared_expert", mode="before")
    @classmethod
    def _shared_flag(cls, v: Any) -> Any:
        # Config files from before the variants hold a bool; True was the gated expert.
        return ("gated" if v else "none") if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _reference_shared(self) -> "MoEConfig":
        if self.shared_expert == "reference" and self.top_k < 2:
            raise _Impossible("moe.shared_expert", "reference", f"routes top-(k-1); moe.top_k={self.top_k} leaves none")
        if self.shared_expert == "reference" and self.routing != "topk":
            # E-1 routed experts cannot give every language family its own; the reference crashes on the last one.
            raise _Impossible("moe.shared_expert", "reference", f"leaves E-1 routed experts, one family short of an "
                                                                f"expert for moe.routing={self.routing}; use topk")
        return self


# ------------------------------------------------------------------------------------------------------------ train
class TrainConfig(Section):
    run_name: str = "apollo-tiny"
    seq_len: int = Field(512, ge=16)
    pack_min_split: int = Field(16, ge=0, description="cut a document into a row with at least this much room rather "
                                                      "than open a new row, where that saves >= 1 % of a packing "
                                                      "window's rows (0: whole documents only)")
    micro_batch_size: int = Field(2, ge=1, description="packed rows per worker per micro step")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    max_steps: int | None = Field(None, ge=1, description="stop early (default: one pass over the drawn order)")
    zero_stage: Literal[0, 1, 2, 3] = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = Field(False, description="recompute each decoder layer in the backward pass: "
                                           "activations shrink to the layer inputs plus one layer, for ~1/3 more "
                                           "compute")
    seed: int = 42
    checkpoint_every: int = Field(20, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    eval_every: int = Field(20, ge=1, description="held-out loss every N steps; also when the workers report to Ray "
                                                  "Train (and so to a Tune scheduler), besides checkpoints")
    log_every: int = Field(1, ge=1)
    max_failures: int = Field(2, ge=0)


# ------------------------------------------------------------------------------------------------------------- tune
class TuneConfig(Section):
    name: str = Field("routing-sweep", description="sweep name: tune/<name>/ in storage; rerun the same name to resume")
    search_space: dict[str, Any] = Field(default_factory=lambda: {
        "moe.routing": {"grid": ["topk", "language", "hybrid"]}, "moe.layers": {"grid": [1, 2]}},
        description="dotted config key -> {grid|choice: [...]} or {uniform|loguniform|randint: [low, high]}")
    num_samples: int = Field(1, ge=1)
    scheduler: Literal["fifo", "asha"] = "asha"
    metric: str = Field("heldout_loss", description="what the scheduler stops trials on (minimised)")
    max_concurrent_trials: int = Field(1, ge=1)
    grace_period: int = Field(5, ge=1)


# ------------------------------------------------------------------------------------------------------------- eval
class BenchmarkConfig(Section):
    name: str
    path: str = Field(description="file/folder of XMedBench JSON (local or s3://) or a HF dataset id")
    language: str | None = Field(None, description="default: from the file name (en.json) or a per-item field")
    dev_path: str | None = Field(None, description="where k-shot examples come from (default: the same items)")


def _sample_benchmarks() -> list[BenchmarkConfig]:
    return [BenchmarkConfig(name="apollo-sample", path=str(SAMPLE_DATA / "mcq"))]


class EvalConfig(Section):
    benchmarks: list[BenchmarkConfig] = Field(default_factory=_sample_benchmarks)
    protocol: Literal["native", "apollo"] = Field(
        "native", description="apollo: the reference code's prompts (one User/Assistant turn per shot), character "
                              "budget, greedy generation and answer extraction, and the papers' per-language source "
                              "lists (docs/methods.md §9); native: our prompts (chat template, answer cue) scored by "
                              "eval.scoring")
    scoring: Literal["loglik", "generate"] = Field(
        "loglik", description="native protocol: option log-likelihood after the answer cue, or greedy generation; "
                              "the apollo protocol always generates")
    shots: int = Field(3, ge=0)
    seed: int = 1234
    max_prompt_tokens: int = Field(1024, ge=16, description="native: the prompt budget; apollo: only a guard for the "
                                                            "model's context (the budget is max_prompt_chars)")
    max_prompt_chars: int = Field(4096, ge=16, description="apollo protocol: the reference's budget in characters")
    max_new_tokens: int = Field(32, ge=1, description="generation; apollo protocol default 256, the reference's")
    sources: dict[str, list[str]] | None = Field(
        None, description="language -> the sources its accuracy averages (others are scored and reported, not "
                          "averaged); default: apollo = the papers' lists, native = every source loaded")
    batch_size: int = Field(8, ge=1)
    actors: int | None = Field(None, ge=1, description="scoring actors; default one per GPU (resources.use_gpu) or "
                                                       "per CPU that Ray has free")
    limit: int | None = Field(None, ge=1, description="items per benchmark file, for smoke runs")
    hybrid_in_eval: bool = Field(False, description="Post-MoE: pass each item's language expert as language_ids so "
                                                    "hybrid (or language) routing applies in evaluation; default "
                                                    "plain top-k, the paper's choice")
    analyze_prompt_tokens: bool = Field(False, description="routing analysis: feed the full k-shot prompts instead "
                                                           "of the items' question + options")
    analyze_items_per_language: int = Field(64, ge=1, description="routing analysis: items per language")

    @model_validator(mode="before")
    @classmethod
    def _protocol_defaults(cls, data: Any) -> Any:
        # the apollo protocol generates up to 256 tokens, as the reference does, unless told otherwise
        if isinstance(data, dict) and data.get("protocol") == "apollo":
            data = {"scoring": "generate", "max_new_tokens": 256, **data}
        return data

    @model_validator(mode="after")
    def _protocol_scoring(self) -> "EvalConfig":
        if self.protocol == "apollo" and self.scoring != "generate":
            raise _Impossible("eval.scoring", self.scoring, "the apollo protocol scores greedy generation, as the "
                                                            "reference does; use eval.protocol=native for "
                                                            "log-likelihood")
        return self


# --------------------------------------------------------------------------------------------------------- hygiene
PII_TYPES: tuple[str, ...] = ("EMAIL", "PHONE", "URL", "IP", "ID", "MRN", "DOB", "NAME")


class PIIConfig(Section):
    """collect: personal data in the text of the kinds where people write about themselves, replaced by <TYPE>."""
    enabled: bool = True
    kinds: list[Kind] = Field(default_factory=lambda: ["dialogue", "web"],
                              description="kinds whose documents are scrubbed (the rest are passed as they are)")
    types: list[Literal["EMAIL", "PHONE", "URL", "IP", "ID", "MRN", "DOB", "NAME"]] = Field(
        default_factory=lambda: list(PII_TYPES), description="what to replace; URL = URLs with personal paths only, "
                                                             "ID = national ids, DOB = dates after a birth keyword")
    ner_model: str | None = Field(None, description="spaCy pipeline (name or path) whose PER/PERSON entities become "
                                                    "<NAME>; needs the `ner` extra; without it names stay")


class DecontamConfig(Section):
    """Between rewrite and the mixture: training items that overlap an evaluation benchmark are quarantined."""
    enabled: bool = True
    ngram: int = Field(13, ge=4, description="word n-grams, for scripts written with spaces")
    char_ngram: int = Field(20, ge=4, description="character n-grams, for scripts without spaces (CJK, Thai, ...): "
                                                  "20 characters are about 13 Chinese words")
    near_match: float = Field(0.88, ge=0, le=1, description="also quarantine an item that reproduces this share of a "
                                                            "benchmark question (or question + options) in order; "
                                                            "0 = exact n-grams only")
    min_match_units: int = Field(10, ge=1, description="near_match ignores benchmark texts shorter than this "
                                                       "(words, or characters in unspaced scripts)")
    max_ngram_items: int = Field(10, ge=1, description="an n-gram in more benchmark items than this is boilerplate "
                                                      "('which of the following is ...'), not evidence")
    extra_benchmarks: list[BenchmarkConfig] = Field(default_factory=list,
                                                    description="benchmarks to decontaminate against besides "
                                                                "eval.benchmarks (whose dev_path items count too)")


class HygieneConfig(Section):
    pii: PIIConfig = Field(default_factory=PIIConfig)
    decontam: DecontamConfig = Field(default_factory=DecontamConfig)


# ------------------------------------------------------------------------------------------------------------ serve
class ProxyConfig(Section):
    base: str = Field(description="large untuned model (id/path)")
    expert: str = Field(description="small tuned model")
    anti_expert: str = Field(description="small model before tuning")
    alpha: float = 1.0


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    model: str | None = Field(None, description="checkpoint to serve (default: the trained model of this run)")
    model_name: str = "apollo"
    api_key_env: str | None = Field(None, description="env var holding the bearer key; unset = no auth")
    replicas: int = Field(1, ge=1)
    max_prompt_tokens: int = Field(2048, ge=1)
    max_tokens: int = Field(512, ge=1)
    max_batch_items: int = Field(64, ge=1)
    max_concurrent_requests: int = Field(256, ge=1)
    max_batch_size: int = Field(64, ge=1, description="requests one model replica decodes as one batch; more wait "
                                                       "for a row (engine apollo)")
    max_prefill_tokens: int = Field(4096, ge=1, description="padded prompt tokens one decode step prefills; a longer "
                                                            "prompt is prefilled alone (engine apollo)")
    proxy: ProxyConfig | None = None
    engine: Literal["apollo", "vllm"] = Field(
        "apollo", description="apollo: this project's continuously batched engine (CPU or GPU; Post-MoE with language "
                              "routing, proxy-tuning, eval routes); vllm: a Ray Serve LLM app (ray.serve.llm, vLLM; "
                              "GPU images with ray[llm]) for plain and exported checkpoints")
    vllm: dict[str, Any] = Field(default_factory=dict, description="engine vllm: LLMConfig fields merged over the "
                                                                  "generated ones (engine_kwargs, accelerator_type, ...)")

    @model_validator(mode="after")
    def _engine(self) -> "ServeConfig":
        if self.engine == "vllm" and self.proxy is not None:
            raise _Impossible("serve.engine", self.engine, "vLLM cannot proxy-tune; serve.proxy needs serve.engine=apollo")
        if self.engine == "vllm" and self.api_key_env:
            raise _Impossible("serve.engine", self.engine, "Ray Serve LLM's OpenAI ingress checks no API key; unset "
                                                           "serve.api_key_env (and put a gateway in front) or use "
                                                           "serve.engine=apollo")
        return self


class ResourcesConfig(Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    gpu_type: str | None = Field(None, description="accelerator type for memory planning, e.g. H100-80GB")


# ------------------------------------------------------------------------------------------------------------- root
class Config(Section):
    preset: str = "tiny"
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    languages: LanguagesConfig = Field(default_factory=LanguagesConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rewrite: RewriteConfig = Field(default_factory=RewriteConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    moe: MoEConfig = Field(default_factory=MoEConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    hygiene: HygieneConfig = Field(default_factory=HygieneConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @property
    def num_experts(self) -> int:
        return langs.num_experts(self.moe.experts, self.languages.include)

    def expert_map(self) -> dict[str, int]:
        return langs.expert_map(self.moe.experts, self.languages.include)

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        m = self.moe
        if m.layers:
            e = self.num_experts
            if m.top_k > e:
                raise _Impossible("moe.top_k", m.top_k, f"greater than the number of experts ({e})")
            routed = e - 1 if m.shared_expert == "reference" else e  # the reference's shared expert replaces one
            if routed % m.ep_size:
                raise _Impossible("moe.ep_size", m.ep_size,
                                  f"the {routed} routed experts ({m.experts}) are not divisible by the "
                                  f"expert-parallel size")
            if self.resources.num_workers % m.ep_size:
                raise _Impossible("moe.ep_size", m.ep_size,
                                  f"resources.num_workers={self.resources.num_workers} is not a multiple of it")
            if self.train.zero_stage == 3:
                raise _Impossible("train.zero_stage", 3, "ZeRO-3 cannot shard expert-parallel Post-MoE layers; "
                                                          "use ZeRO-1 or 2 (or moe.layers=0 for a dense model)")
            if self.model.arch and m.layers > self.model.arch.num_hidden_layers:
                raise _Impossible("moe.layers", m.layers,
                                  f"the model has only {self.model.arch.num_hidden_layers} decoder layers")
        a = self.model.arch
        if a and self.train.seq_len > a.max_position_embeddings:
            raise _Impossible("train.seq_len", self.train.seq_len,
                              f"longer than the model's {a.max_position_embeddings} positions "
                              f"(model.arch.max_position_embeddings)")
        if not (PACKAGE_DIR / "data" / "prompts" / self.rewrite.prompt_version).is_dir():
            known = sorted(p.name for p in (PACKAGE_DIR / "data" / "prompts").iterdir() if p.is_dir())
            raise _Impossible("rewrite.prompt_version", self.rewrite.prompt_version,
                              f"no such prompt set (known: {', '.join(known)})")
        if self.rewrite.backend == "hf" and not self.rewrite.hf_model:
            raise _Impossible("rewrite.hf_model", None, "rewrite.backend=hf needs it (a hub id or a local path)")
        if self.model.base == "tiny" and self.model.arch is None:
            raise _Impossible("model.arch", None, "model.base=tiny builds the model from it")
        if self.train.precision == "bf16" and not self.resources.use_gpu:
            raise _Impossible("train.precision", "bf16", "bf16 training needs resources.use_gpu=true (CPU trains fp32)")
        if self.resources.use_gpu and self.resources.gpus_per_worker <= 0:
            raise _Impossible("resources.gpus_per_worker", self.resources.gpus_per_worker,
                              "must be > 0 when resources.use_gpu is true")
        return self

    # -- paths under the storage root -------------------------------------------------------------------------
    def uri(self, *parts: str) -> str:
        return "/".join([self.storage.root.rstrip("/"), *[p.strip("/") for p in parts]])

    def tracking_uri(self) -> str:
        if self.tracking.uri:
            return self.tracking.uri
        root = self.storage.root
        if "://" in root:
            # sqlite cannot live on object storage: keep the DB beside the driver and say so in the README.
            return "sqlite:///" + str(Path("mlflow.db").resolve())
        return "sqlite:///" + str(Path(root) / "mlflow.db")


class _Impossible(ValueError):
    def __init__(self, key: str, value: Any, why: str):
        super().__init__(f"{key}={value!r}: {why}")
        self.key, self.value, self.why = key, value, why


class ConfigError(UserError):
    """A config that cannot be used; the message names the key, the value and the file."""


# ---------------------------------------------------------------------------------------------------------- presets
def _tiny() -> dict:
    return {
        "model": {"base": "tiny", "arch": {
            "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 2048, "tie_word_embeddings": True,
            "max_position_embeddings": 2048}},
        # 12 language experts (the Apollo-MoE 12-language variant) so that experts shard over 2 CPU workers: 7 family
        # experts would not divide by ep_size 2.
        "moe": {"layers": 2, "experts": "language", "top_k": 2, "routing": "hybrid", "ep_size": 2},
        "train": {"seq_len": 256, "micro_batch_size": 4, "grad_accum": 1, "lr": 3e-3, "zero_stage": 1,
                  "precision": "fp32", "checkpoint_every": 10, "eval_every": 10},
        "resources": {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 1},
        "eval": {"shots": 1, "max_prompt_tokens": 512},
    }


def _qwen2(base: str, arch: dict, activation_checkpointing: bool = False) -> Callable[[], dict]:
    _INSTRUCT = ("dialogue", "exam", "general", "math", "code")

    def preset() -> dict:
        return {
            "model": {"base": base, "arch": arch, "dtype": "bfloat16"},
            "moe": {"layers": 2, "experts": "family", "top_k": 2, "routing": "hybrid", "ep_size": 1},
            # Sources: ApolloMoE 3.single_node_train.sh (Apollo-MoE-0.5B run), its train_qwen2_resume_val_upcycling.py
            # and training_config/zero.yaml.
            "train": {"seq_len": 4096,  # --max_seq_len 4096 (data preparation)
                      # 8 GPUs x --train_bsz_per_gpu 2 x --gradient_accumulation_steps 2 = 32 rows of 4096 tokens
                      "micro_batch_size": 2, "grad_accum": 2,
                      "lr": 1e-4, "warmup_ratio": 0.03,  # --learning_rate 1e-4, --warmup_rates 0.03
                      "betas": (0.9, 0.999),  # torch.optim.AdamW's defaults, which the script leaves as they are
                      "weight_decay": 0.1, "grad_clip": 1.0, "zero_stage": 1,  # --weight_decay; zero.yaml
                      # The script plans its cosine (to 0) over 1.35x the steps it runs, so the last step is at
                      # 0.166 of the peak. Our cosine ends at the same floor; its shape is a full half-cosine, lower
                      # mid-run (0.60 vs 0.73 of the peak halfway): reproducing that shape needs a schedule option.
                      "min_lr_ratio": 0.166,
                      "precision": "bf16", "activation_checkpointing": activation_checkpointing,
                      "checkpoint_every": 500, "eval_every": 250},
            # ApolloMoE data_process_train_prodata_qwen_language_family.py: medical QA from books, guidelines, papers,
            # web and wikis π=16, 1 epoch; exams, patient dialogues, general instructions, code and math π=2,
            # 2 epochs (Apollo, the DataConfig default, had code and math at π=16, 1 epoch). --n_epochs 1: one pass.
            "data": {"priorities": {**{k: 16.0 for k in PRETRAIN_KINDS}, **{k: 2.0 for k in _INSTRUCT}},
                     "epochs": {**{k: 1 for k in PRETRAIN_KINDS}, **{k: 2 for k in _INSTRUCT}}},
            "resources": {"num_workers": 8, "use_gpu": True, "cpus_per_worker": 8, "gpus_per_worker": 1,
                          "gpu_type": "H100-80GB"},
            "rewrite": {"backend": "openai"},
            # Apollo-MoE's evaluation: the reference's prompts, 3 shots, greedy generation to 256 tokens (eval.protocol)
            "eval": {"protocol": "apollo", "scoring": "generate", "shots": 3, "max_new_tokens": 256,
                     "max_prompt_tokens": 4096, "batch_size": 16},
        }
    return preset


PRESETS: dict[str, Callable[[], dict]] = {
    "tiny": _tiny,
    "qwen2-0.5b": _qwen2("Qwen/Qwen2-0.5B", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        vocab_size=151936, tie_word_embeddings=True)),
    "qwen2-1.5b": _qwen2("Qwen/Qwen2-1.5B", dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        vocab_size=151936, tie_word_embeddings=True)),
    "qwen2-7b": _qwen2("Qwen/Qwen2-7B", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        vocab_size=152064, tie_word_embeddings=False),
        # Without it the activations (~58 GiB of 2 x 4096 tokens) plus ZeRO-1 states exceed an H100-80GB (`plan`).
        activation_checkpointing=True),
}


# ---------------------------------------------------------------------------------------------------------- loading
def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.lr=1e-4`` → (["train", "lr"], 1e-4); the value is parsed as YAML (numbers, lists, booleans, null)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(d: dict, path: list[str], value: Any) -> None:
    for p in path[:-1]:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {p!r} is not a section")
        d = nxt
    d[path[-1]] = value


def _get_path(d: dict, path: tuple) -> Any:
    cur: Any = d
    for p in path:
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and isinstance(p, int) and p < len(cur):
            cur = cur[p]
        else:
            return None
    return cur


def _describe(err: ValidationError, raw: dict, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        key = ".".join(str(x) for x in loc) or "<root>"
        ctx_err = (e.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _Impossible):
            lines.append(f"  {ctx_err.key} = {ctx_err.value!r}: {ctx_err.why}")
            continue
        value = e.get("input") if e["type"] != "missing" else None
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key} = {value!r}: unknown key (misspelled? see `apollo-ray config show`)")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            shown = _get_path(raw, loc) if value is None else value
            lines.append(f"  {key} = {shown!r}: {e['msg']}")
    return f"invalid config ({origin}):\n" + "\n".join(lines)


def resolve(raw: dict | None = None, overrides: list[str] | tuple[str, ...] = (), origin: str = "<dict>") -> Config:
    """Preset (named in ``raw['preset']`` or an override) ← ``raw`` ← ``overrides``, validated."""
    raw = copy.deepcopy(raw or {})
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config ({origin}): the top level must be a mapping, got {type(raw).__name__}")
    for item in overrides:
        path, value = parse_override(item)
        _set_path(raw, path, value)
    preset = raw.get("preset", "tiny")
    if preset not in PRESETS:
        raise ConfigError(f"invalid config ({origin}):\n  preset = {preset!r}: unknown preset; expected one of "
                          f"{', '.join(PRESETS)}")
    merged = deep_merge(PRESETS[preset](), raw)
    merged["preset"] = preset
    try:
        return Config.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_describe(err, merged, origin)) from None


def load(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read ``ray_config.yaml`` (or another file; None = preset defaults only) and apply ``--set`` overrides."""
    if path is None:
        return resolve({}, overrides, origin="defaults + --set")
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    if not p.is_file():
        raise ConfigError(f"--config {p}: not a file")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"invalid config ({p}): not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid config ({p}): not valid YAML: {' '.join(str(e).split())}") from None
    origin = str(p) + (" + --set " + " ".join(overrides) if overrides else "")
    return resolve(raw, overrides, origin=origin)


def to_dict(cfg: Config) -> dict:
    return cfg.model_dump(mode="json")


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys → values, lists as JSON; used for MLflow params and Tune search spaces."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, ensure_ascii=False) if isinstance(v, (list, tuple)) else v
    return out


def fingerprint(*parts: Any) -> str:
    """Stable short hash of the semantic config parts and input hashes: the output folder name of a stage."""
    import hashlib

    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
