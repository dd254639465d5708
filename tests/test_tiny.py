"""The tiny recipe: a tokenizer trained on the shipped corpus and a Qwen2-architecture model built from config."""

import json

import pytest

from apollo_ray.config import SAMPLE_DATA
from apollo_ray.model.tiny import EOS, PAD, ensure_base, sample_texts, tiny_base_uri
from apollo_ray.storage import Storage


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from apollo_ray import config as config_mod

    root = tmp_path_factory.mktemp("tiny")
    cfg = config_mod.resolve({}, [f"storage.root={root}"])
    storage = Storage.from_config(cfg)
    return cfg, storage, ensure_base(cfg, storage)


def test_sample_data_covers_the_apollo_languages_and_all_families():
    from apollo_ray import languages as L

    corpus = {p.stem for p in (SAMPLE_DATA / "corpus").glob("*.jsonl")}
    assert set(L.APOLLO_LANGUAGES) <= corpus and len(corpus) >= 12
    assert {L.get(c).family for c in corpus} == set(L.FAMILIES)
    for lang in L.APOLLO_LANGUAGES:
        docs = [json.loads(x) for x in (SAMPLE_DATA / "corpus" / f"{lang}.jsonl").read_text().splitlines()]
        assert sum(len(d["text"].split("\n\n")) for d in docs) >= 30, lang
    assert {p.stem for p in (SAMPLE_DATA / "instruct").glob("*.jsonl")} >= set(L.MAJORS)
    assert (SAMPLE_DATA / "README.md").read_text().startswith("# apollo-ray sample data")


def test_tokenizer_is_trained_locally_and_round_trips_every_script(base):
    from transformers import AutoTokenizer

    cfg, _, path = base
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == EOS and tok.pad_token == PAD and len(tok) <= cfg.model.arch.vocab_size
    for text in ("Hypertension is common.", "高血压是常见病。", "उच्च रक्तचाप आम है।", "ارتفاع ضغط الدم شائع.",
                 "La hipertensión es frecuente.", "고혈압은 흔하다."):
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
    # trained on the project's own text: a common medical word is a few tokens, not bytes
    assert len(tok("hypertension", add_special_tokens=False).input_ids) <= 4
    assert sum(1 for _ in sample_texts()) > 300


def test_tiny_model_is_built_from_config_and_reused(base):
    import torch
    from transformers import AutoModelForCausalLM

    cfg, storage, path = base
    model = AutoModelForCausalLM.from_pretrained(path)
    a = cfg.model.arch
    assert model.config.model_type == "qwen2"
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (a.hidden_size, a.num_hidden_layers)
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, model.config.vocab_size)
    stamp = f"{tiny_base_uri(cfg, storage)}/config.json"
    before = open(stamp, "rb").read()
    assert ensure_base(cfg, storage) == path  # built once, then found
    assert open(stamp, "rb").read() == before
