"""The tiny recipe: a byte-level BPE tokenizer trained on the shipped sample corpus and a Qwen2-architecture model
built from ``model.arch`` with random weights. It lets every stage run offline, on CPU, in minutes; real runs name a
hub id or a path in ``model.base`` instead and none of this is used.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from apollo_ray.config import SAMPLE_DATA, Config, fingerprint
from apollo_ray.storage import Storage

log = logging.getLogger(__name__)
EOS = "<|endoftext|>"
PAD = "<|pad|>"


def sample_texts(root: Path = SAMPLE_DATA) -> Iterator[str]:
    """Every piece of text the project ships: corpus documents, instruction items and MCQ items."""
    for f in sorted((root / "corpus").glob("*.jsonl")) + sorted((root / "instruct").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                yield from (rec[k] for k in ("text", "question", "answer") if rec.get(k))
    for f in sorted((root / "mcq").glob("*.json")):
        for rec in json.loads(f.read_text(encoding="utf-8")):
            yield rec["question"] + "\n" + rec["options"]


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path):
    """Byte-level BPE (as Qwen2's) so that any script of the 50 languages is representable without unknown tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, model_max_length=1 << 20)
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_model(cfg: Config, vocab_size: int, eos_id: int, pad_id: int, seed: int = 0):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    a = cfg.model.arch
    if a is None:
        raise ValueError("model.base='tiny' needs model.arch (set by the tiny preset)")
    qcfg = Qwen2Config(
        vocab_size=vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_hidden_layers, num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads, max_position_embeddings=a.max_position_embeddings,
        tie_word_embeddings=a.tie_word_embeddings, eos_token_id=eos_id, bos_token_id=eos_id, pad_token_id=pad_id,
        rms_norm_eps=1e-6, rope_theta=10000.0)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(qcfg)


def tiny_base_uri(cfg: Config, storage: Storage) -> str:
    a = cfg.model.arch.model_dump() if cfg.model.arch else {}
    return storage.uri("models", f"tiny-base-{fingerprint('tiny-base-v1', a, cfg.train.seed)}")


def ensure_base(cfg: Config, storage: Storage, local_cache: str | Path | None = None) -> str:
    """The dense base as something ``from_pretrained`` accepts: a hub id, a local path, or the tiny base (built once
    under ``models/tiny-base-<fp>/`` in storage and reused by every stage)."""
    if cfg.model.base != "tiny":
        return cfg.model.base
    uri = tiny_base_uri(cfg, storage)
    if not storage.exists(f"{uri}/config.json"):
        with tempfile.TemporaryDirectory() as tmp:
            log.info("building the tiny base model and tokenizer at %s", uri)
            tok = train_tokenizer(sample_texts(), cfg.model.arch.vocab_size, tmp)
            model = build_tiny_model(cfg, len(tok), tok.eos_token_id, tok.pad_token_id, seed=cfg.train.seed)
            model.save_pretrained(tmp)
            # config.json last: its presence marks the folder complete.
            cfg_bytes = (Path(tmp) / "config.json").read_bytes()
            (Path(tmp) / "config.json").unlink()
            storage.put_dir(tmp, uri)
            storage.write_bytes(f"{uri}/config.json", cfg_bytes)
    return str(storage.get_dir(uri, local_cache or tempfile.mkdtemp(prefix="apollo-base-")))
