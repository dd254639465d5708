"""The trainer's loss against transformers' own: ``train_loop_per_worker`` runs in-process on one CPU "worker" (Ray
Train's context and DeepSpeed replaced by stand-ins that record what the loop hands them, and never change the
weights), on a hand-made mixture of a tiny Qwen2 built from the tiny preset's config with random weights.

The trainer's definition: the mean cross-entropy per label token over every label token of the micro-batch (rows and
documents pooled, not a mean of row means), the label of position t+1 predicted at position t. So an unpacked row's
loss is ``model(input_ids, labels=...).loss``, and a packed row's (several documents, positions restarting at 0) is
the label-token-weighted mean of each document's loss run alone.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from apollo_ray import config as config_mod
from apollo_ray.storage import Manifest, Storage
from apollo_ray.train import dataset, loop
from apollo_ray.train.packing import IGNORE_INDEX, Doc, pack

SEQ = 48
LANGS = ["en", "fr", "zh"]
KINDS = ["encyclopedia", "exam"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """The tiny preset's Qwen2 (random weights, smaller vocabulary), embeddings scaled so predictions are peaked and a
    wrong target or a wrong mean is far off, saved for ``from_pretrained``."""
    from apollo_ray.model.tiny import build_tiny_model

    cfg = config_mod.resolve({}, ["moe.layers=0", "model.arch.num_hidden_layers=2"])
    model = build_tiny_model(cfg, vocab_size=97, eos_id=1, pad_id=0, seed=0)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(40)
    path = tmp_path_factory.mktemp("loss-oracle-model")
    model.save_pretrained(path)
    return str(path)


def _doc(rng: np.random.Generator, n: int, lang: int, kind: int, prompt: int) -> Doc:
    ids = rng.integers(2, 97, n)
    labels = ids.copy()
    labels[:prompt] = IGNORE_INDEX  # an unlabelled prompt, as templated items start
    return Doc(ids.tolist(), labels.tolist(), language_id=-1, meta=(lang, kind))


def _write_mixture(storage: Storage, folder: str, splits: dict[str, list[list[Doc]]]) -> None:
    """Rows in the mixture stage's format: each inner list of documents becomes one packed row."""
    shards = []
    for split, rows in splits.items():
        packed = []
        for docs in rows:
            result = pack(docs, SEQ, pad_id=0, window=len(docs))
            assert len(result.rows) == 1 and result.rows[0].seq_lens == tuple(len(d.input_ids) for d in docs)
            packed.append(result.rows[0])
        metas = [m for r in packed for m in r.meta]
        index = {m: k for k, m in enumerate(dict.fromkeys(metas))}
        ids = [f"item-{k}" for k in range(len(index))]
        item_langs = [LANGS[m[0]] for m in index]
        kinds = [KINDS[m[1]] for m in index]
        rows_ = [r.__class__(**{**r.__dict__, "meta": tuple(index[m] for m in r.meta)}) for r in packed]
        shards += dataset._write_rows(storage, folder, split, types.SimpleNamespace(rows=rows_), ids, item_langs,
                                      kinds, {c: k for k, c in enumerate(LANGS)}, {c: k for k, c in enumerate(KINDS)},
                                      shard_rows=100)
    storage.write_manifest(folder, Manifest(stage="mixture", fingerprint="test", shards=shards))


class _Engine:
    """DeepSpeed's engine, reduced to what the loop calls; records the losses it is asked to backpropagate."""

    def __init__(self, model):
        self.module = model
        self.device = torch.device("cpu")
        self.losses: list[float] = []

    def __call__(self, **kwargs):
        return self.module(**kwargs)

    def backward(self, loss):
        self.losses.append(loss.item())

    def step(self):  # no update: every forward of the run sees the initial weights
        pass

    def train(self):
        self.module.train()

    def eval(self):
        self.module.eval()

    def get_global_grad_norm(self):
        return 0.0

    def save_checkpoint(self, *_args, **_kwargs):
        pass


def run_loop(monkeypatch, tmp_path, model_dir: str, train: list[list[Doc]], heldout: list[list[Doc]],
             micro_batch_size: int, grad_accum: int = 1) -> dict:
    """One in-process worker of ``train_loop_per_worker``; returns the backpropagated losses and the logged and
    reported metrics."""
    import ray.train

    storage = Storage(str(tmp_path / "store"))
    folder = storage.uri("mixture", "t")
    _write_mixture(storage, folder, {"train": train, "heldout": heldout})

    engines: list[_Engine] = []
    reports: list[dict] = []
    logged: list[dict] = []

    def initialize(model, optimizer, lr_scheduler, config):
        engines.append(_Engine(model))
        return engines[-1], optimizer, None, lr_scheduler

    class Tracking:
        def __init__(self, c):
            pass

        def log(self, metrics, step):
            logged.append(dict(metrics))

        def flush(self):
            pass

    ctx = types.SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1)
    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(initialize=initialize))
    monkeypatch.setattr(ray.train, "get_context", lambda: ctx)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: reports.append(dict(metrics)))
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: None)  # one worker: the sum is itself
    monkeypatch.setattr(loop, "_Tracking", Tracking)
    monkeypatch.setattr(loop, "peak_flops", lambda device: 1e12)
    monkeypatch.setattr(loop, "_export_hf", lambda *a, **k: None)
    loop.train_loop_per_worker({
        "init_model": model_dir, "mixture": folder, "storage_root": storage.root, "endpoint_url": None,
        "languages": LANGS, "kinds": KINDS, "micro_batch_size": micro_batch_size, "grad_accum": grad_accum,
        "lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.0, "warmup_ratio": 0.0, "min_lr_ratio": 0.1,
        "grad_clip": 1.0, "zero_stage": 0, "precision": "fp32", "seed": 0, "activation_checkpointing": False,
        "max_steps": None, "checkpoint_every": 1000, "eval_every": 1, "log_every": 1, "ep_size": 1,
        "flops_per_token": 1.0, "tracking_uri": None, "mlflow_run_id": None})
    assert len(engines) == 1
    return {"backward": engines[0].losses, "reports": reports, "logged": logged}


def hf_loss(model, doc: Doc) -> tuple[float, int]:
    """transformers' own loss of a document alone, and the number of label tokens it averages over."""
    ids = torch.tensor([doc.input_ids])
    labels = torch.tensor([doc.labels])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss.item()
    return loss, int((labels[0, 1:] != IGNORE_INDEX).sum())


def weighted(model, docs: list[Doc]) -> float:
    pairs = [hf_loss(model, d) for d in docs]
    return sum(loss * n for loss, n in pairs) / sum(n for _, n in pairs)


@pytest.fixture(scope="module")
def oracle(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval()


def _rows():
    rng = np.random.default_rng(0)
    whole = [_doc(rng, SEQ, 0, 0, prompt=5)]  # one document filling the row: no packing, no padding
    packed = [_doc(rng, 9, 0, 1, prompt=3), _doc(rng, 17, 1, 0, prompt=6), _doc(rng, 12, 2, 1, prompt=0)]
    other = [_doc(rng, 20, 1, 1, prompt=15), _doc(rng, 21, 2, 0, prompt=2)]  # 5 label tokens vs 19: unequal weights
    return whole, packed, other


def test_unpacked_row_loss_equals_transformers_loss(monkeypatch, tmp_path, tiny_model, oracle):
    """Catches a trainer loss without the label shift (or any other target) on a plain row: it must be
    ``model(input_ids, labels=...).loss``, both the backpropagated loss and the logged one."""
    whole, packed, _ = _rows()
    got = run_loop(monkeypatch, tmp_path, tiny_model, train=[whole], heldout=[whole], micro_batch_size=1)
    want, _ = hf_loss(oracle, whole[0])
    assert got["backward"] == pytest.approx([want], rel=1e-4)
    assert [r["loss"] for r in got["reports"]] == pytest.approx([want], rel=1e-4)
    assert got["reports"][0]["heldout_loss"] == pytest.approx(want, rel=1e-4)
    assert got["logged"][0]["loss/en"] == pytest.approx(want, rel=1e-4)
    # the oracle itself can tell: predicting the current token instead of the next gives another value
    ids = torch.tensor([whole[0].input_ids])
    with torch.no_grad():
        logits = oracle(input_ids=ids).logits[0]
    labels = torch.tensor(whole[0].labels)
    unshifted = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX).item()
    assert abs(unshifted - want) > 0.1


def test_packed_batch_loss_is_the_label_token_mean_over_documents_alone(monkeypatch, tmp_path, tiny_model, oracle):
    """Catches attention or loss crossing documents in a packed row, and a mean of row means (or a mean over all
    positions) instead of the per-label-token mean over the micro-batch; per language and kind sums likewise."""
    whole, packed, other = _rows()
    got = run_loop(monkeypatch, tmp_path, tiny_model, train=[packed, other], heldout=[packed, other],
                   micro_batch_size=2)
    docs = packed + other
    want = weighted(oracle, docs)
    assert got["backward"] == pytest.approx([want], rel=1e-4)
    (report,) = got["reports"]
    assert report["loss"] == pytest.approx(want, rel=1e-4)
    assert report["heldout_loss"] == pytest.approx(want, rel=1e-4)
    # a mean of the two rows' means is a different number here
    row_means = (weighted(oracle, packed) + weighted(oracle, other)) / 2
    assert abs(row_means - want) > 1e-2
    logged = got["logged"][0]
    for k, lang in enumerate(LANGS):
        assert logged[f"loss/{lang}"] == pytest.approx(weighted(oracle, [d for d in docs if d.meta[0] == k]),
                                                       rel=1e-4), lang
        assert logged[f"heldout_loss/{lang}"] == pytest.approx(logged[f"loss/{lang}"], rel=1e-4), lang
    for k, kind in enumerate(KINDS):
        assert logged[f"loss_kind/{kind}"] == pytest.approx(weighted(oracle, [d for d in docs if d.meta[1] == k]),
                                                            rel=1e-4), kind
    label_tokens = sum(hf_loss(oracle, d)[1] for d in docs)
    assert logged["tokens_seen"] == sum(len(d.input_ids) for d in docs) and label_tokens < logged["tokens_seen"]


def test_accumulated_micro_batches_backpropagate_each_and_log_the_pooled_mean(monkeypatch, tmp_path, tiny_model,
                                                                              oracle):
    """Catches the step's logged loss not pooling the accumulated micro-batches by label tokens."""
    whole, packed, other = _rows()
    got = run_loop(monkeypatch, tmp_path, tiny_model, train=[packed, other], heldout=[other], micro_batch_size=1,
                   grad_accum=2)
    assert got["backward"] == pytest.approx([weighted(oracle, packed), weighted(oracle, other)], rel=1e-4)
    (report,) = got["reports"]
    assert report["loss"] == pytest.approx(weighted(oracle, packed + other), rel=1e-4)
    assert report["heldout_loss"] == pytest.approx(weighted(oracle, other), rel=1e-4)
