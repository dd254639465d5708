"""The evaluate and analyze stages on a tiny dense base and its Post-MoE upcycling, built here (CPU, fp32).

Evaluation runs through Ray Data (2 CPUs) on the shipped sample MCQ set and the real XMedBench dev files; routing
analysis is checked against an independent count of non-pad tokens, and its specialisation scores on a hand-made
count tensor.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from apollo_ray import config as config_mod
from apollo_ray import languages as langs
from apollo_ray.config import SAMPLE_DATA, BenchmarkConfig
from apollo_ray.evaluation import routing, runner
from apollo_ray.evaluation.benchmark import load_benchmark
from apollo_ray.model.tiny import ensure_base
from apollo_ray.model.upcycle import upcycle_checkpoint
from apollo_ray.storage import Manifest, Storage
from apollo_ray.tracking import Tracker

SAMPLE_COUNTS = {p.stem: len(json.loads(p.read_text(encoding="utf-8"))) for p in (SAMPLE_DATA / "mcq").glob("*.json")}
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls are fastest single-threaded


def _cfg(root: Path, *extra: str) -> config_mod.Config:
    return config_mod.resolve({}, [f"storage.root={root}", "moe.ep_size=1", *extra])


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """The tiny dense base and its Post-MoE upcycling."""
    root = tmp_path_factory.mktemp("eval")
    cfg = _cfg(root)
    base = ensure_base(cfg, Storage.from_config(cfg))
    return {"root": root, "base": base, "moe": upcycle_checkpoint(base, cfg.uri("models", "tiny-moe"), cfg)}


@pytest.fixture(scope="module")
def trained(models) -> dict:
    """The upcycled model posing as a trained one: a manifest naming the MLflow run that "trained" it."""
    cfg = _cfg(models["root"])
    with Tracker(cfg).stage("train", output=models["moe"]) as run:
        train_run_id = run.run_id
    Storage.from_config(cfg).write_manifest(models["moe"], Manifest(stage="train", fingerprint="tiny-moe",
                                                                    extra={"mlflow_run_id": train_run_id}))
    return {**models, "train_run_id": train_run_id}


def _distinct_experts(src: str, out: Path, sigma: float = 0.05) -> str:
    """A copy of an upcycled model whose experts differ: upcycled experts are copies, so routing changes nothing and
    a test of where the language ids go could not fail; perturbed, the chosen experts decide the output."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.config.moe_layers:
            for p in model.model.layers[layer].mlp.experts.parameters():
                p.add_(torch.randn(p.shape, generator=g) * sigma)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def distinct(models) -> str:
    return _distinct_experts(models["moe"], models["root"] / "models" / "tiny-moe-distinct")


def _metrics(run_id: str) -> dict[str, float]:
    return mlflow.MlflowClient().get_run(run_id).data.metrics


def _eval_run(cfg: config_mod.Config, out: str) -> str:
    return Storage.from_config(cfg).read_manifest(out).extra["mlflow_run_id"]


# ------------------------------------------------------------------------------------------------------- evaluation
@pytest.mark.slow
def test_evaluate_sample_set_loglik(trained, ray_local, caplog):
    cfg = _cfg(trained["root"])
    out = runner.run(cfg, [trained["moe"]])
    results = json.loads(Path(out, "results.json").read_text(encoding="utf-8"))
    assert list(results) == ["tiny-moe"]
    r = results["tiny-moe"]
    assert {lang: v["n"] for lang, v in r["languages"].items()} == SAMPLE_COUNTS
    assert r["n"] == sum(SAMPLE_COUNTS.values())
    assert r["major"]["present"] == list(langs.MAJORS) and r["major"]["missing"] == []
    assert r["major"]["accuracy"] == pytest.approx(np.mean([r["languages"][c]["accuracy"] for c in langs.MAJORS]))
    assert sorted(r["minor"]["present"]) == ["sw", "vi"] and r["minor"]["accuracy"] is not None
    assert r["sources"]["en"] and r["rejects"] == {}
    table = Path(out, "table.md").read_text(encoding="utf-8").splitlines()
    header = table[0]
    assert all(f" {lang} " in header for lang in SAMPLE_COUNTS) and "Major" in header and "Minor" in header
    # the first note under the table names the protocol
    assert table[table.index("") + 1] == f"- {r['protocol_description']}" and r["protocol"] == "native"
    assert r["protocol_description"].startswith("protocol native: ") and "log-likelihood" in r["protocol_description"]
    assert Path(out, "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    preds = [json.loads(x) for x in Path(out, "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(preds) == r["n"] and all(p["predicted"] in "ABCDEF" for p in preds)
    assert sum(p["correct"] for p in preds) == sum(v["correct"] for v in r["languages"].values())

    m = Storage.from_config(cfg).read_manifest(out)
    assert m.counts == {"in": r["n"], "kept": r["n"], "dropped": {}}
    assert m.inputs == {"tiny-moe": Storage(trained["moe"]).read_manifest(trained["moe"]).hash}

    # MLflow: the evaluation run (nested under the run that trained the model), and the metrics in that run too
    run = mlflow.MlflowClient().get_run(m.extra["mlflow_run_id"])
    assert run.data.metrics["major"] == pytest.approx(r["major"]["accuracy"])
    assert run.data.metrics["accuracy/sw"] == pytest.approx(r["languages"]["sw"]["accuracy"])
    assert run.data.tags["apollo.lineage.tiny-moe.train_run_id"] == trained["train_run_id"]
    assert run.data.tags["mlflow.parentRunId"] == trained["train_run_id"]
    assert run.data.tags["apollo.eval.protocol"] == "native" and run.data.params["evaluate.protocol"] == "native"
    assert m.extra["protocol"] == "native"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"table.md", "accuracy.png", "results.json"} <= artifacts
    train = _metrics(trained["train_run_id"])
    assert train["eval/major"] == pytest.approx(r["major"]["accuracy"])
    assert train["eval/accuracy/en"] == pytest.approx(r["languages"]["en"]["accuracy"])

    # A rerun finds the manifest and skips: same folder, nothing scored, nothing rewritten.
    files = {p: p.stat().st_mtime_ns for p in Path(out).rglob("*")}

    def no_scoring(*args, **kwargs):
        raise AssertionError("the rerun scored items: it should have found the manifest and skipped")

    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.INFO, logger=runner.log.name):
        mp.setattr(runner, "score_on_ray", no_scoring)
        assert runner.run(cfg, [trained["moe"]]) == out
    assert f"evaluate: {out} is up to date (manifest present), skipping" in caplog.messages
    assert {p: p.stat().st_mtime_ns for p in Path(out).rglob("*")} == files
    assert Storage.from_config(cfg).read_manifest(out).created == m.created


@pytest.mark.slow
def test_two_models_side_by_side(trained, ray_local):
    cfg = _cfg(trained["root"], "eval.limit=3")
    out = runner.run(cfg, [trained["base"], trained["moe"]])
    table = Path(out, "table.md").read_text(encoding="utf-8").splitlines()
    base_name = Path(trained["base"]).name
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| Model")]
    assert [row.split(" | ")[0][2:] for row in rows] == [base_name, "tiny-moe"]
    results = json.loads(Path(out, "results.json").read_text(encoding="utf-8"))
    assert all(results[name]["n"] == 3 * len(SAMPLE_COUNTS) for name in (base_name, "tiny-moe"))
    # Upcycling with renormalised top-k is function-preserving: both rows score every option alike.
    preds = [json.loads(x) for x in Path(out, "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    by_model: dict[str, dict] = {}
    for p in preds:
        by_model.setdefault(p["model"], {})[p["uid"]] = json.loads(p["output"])
    for uid, scores in by_model[base_name].items():
        assert scores == pytest.approx(by_model["tiny-moe"][uid], abs=1e-3)
    metrics = _metrics(_eval_run(cfg, out))
    assert {f"{base_name}/major", "tiny-moe/major", "tiny-moe/accuracy/vi"} <= set(metrics)


@pytest.mark.slow
def test_generate_with_language_ids_and_a_tight_budget(trained, distinct, ray_local):
    """Greedy generation, hybrid routing in evaluation (language ids through Ray), prompts over budget rejected."""
    cfg = _cfg(trained["root"], "eval.scoring=generate", "eval.limit=2", "eval.max_new_tokens=4",
               "eval.hybrid_in_eval=true", "eval.max_prompt_tokens=130", "eval.shots=0")
    out = runner.run(cfg, [distinct])
    r = json.loads(Path(out, "results.json").read_text(encoding="utf-8"))["tiny-moe-distinct"]
    assert r["language_ids"] is True
    rejects = json.loads(Path(out, "rejects.json").read_text(encoding="utf-8"))
    assert rejects and all(x["reason"] == "prompt_too_long" for x in rejects)
    assert all(isinstance(x["index"], int) and x["file"] in SAMPLE_COUNTS for x in rejects)
    m = Storage.from_config(cfg).read_manifest(out)
    assert m.counts == {"in": 2 * len(SAMPLE_COUNTS), "kept": r["n"], "dropped": {"prompt_too_long": len(rejects)}}
    assert r["rejects"] == {"prompt_too_long": len(rejects)} and r["n"] > 0
    preds = [json.loads(x) for x in Path(out, "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(preds) == r["n"]

    # Each output is the model's own greedy text for the item's prompt with the item's language expert forced (here,
    # one prompt at a time, no Ray); the same generation without the ids differs for some item, so the equality
    # shows that the ids reached the router through Ray.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from apollo_ray.evaluation.scoring import extract_answer, generate_answers

    model = AutoModelForCausalLM.from_pretrained(distinct).eval()
    model.config.hybrid_in_eval = True
    tok = AutoTokenizer.from_pretrained(distinct)
    prompts, too_long = runner.build_prompts(cfg.eval, runner.load_items(cfg, Storage.from_config(cfg)), tok)
    assert len(too_long) == len(rejects)
    experts = model.config.language_to_expert
    changed = 0
    for p in preds:
        expert = experts.get(p["language"], -1)
        with runner.language_ids(model, expert):
            expected = generate_answers(model, tok, [prompts[p["uid"]]], max_new_tokens=4)[0]
        assert p["output"] == expected, p
        assert p["predicted"] == (extract_answer(expected) or None) and p["correct"] == (p["predicted"] == p["answer"])
        changed += generate_answers(model, tok, [prompts[p["uid"]]], max_new_tokens=4)[0] != expected
    assert changed > 0, "no output depends on the language ids: the comparison above would pass without them"


@pytest.mark.slow
def test_apollo_protocol(trained, ray_local):
    """The apollo protocol through Ray: catches the Scorer generating without the reference's 2-token minimum, reading
    answers with the native extraction, prompting with anything but the reference's prompt, or a run that does not
    name its protocol in results, table and MLflow."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from apollo_ray.evaluation import apollo
    from apollo_ray.evaluation.scoring import generate_answers

    cfg = _cfg(trained["root"], "eval.protocol=apollo", "eval.limit=2", "eval.max_new_tokens=4",
               "eval.max_prompt_tokens=2048")
    out = runner.run(cfg, [trained["base"]])
    name = Path(trained["base"]).name
    r = json.loads(Path(out, "results.json").read_text(encoding="utf-8"))[name]
    assert r["protocol"] == "apollo" and "\n- protocol apollo: the reference's prompts" in Path(
        out, "table.md").read_text(encoding="utf-8")
    run = mlflow.MlflowClient().get_run(_eval_run(cfg, out))
    assert run.data.tags["apollo.eval.protocol"] == "apollo" and run.data.params["evaluate.protocol"] == "apollo"
    # the sample set's sources are in no paper list: each language averages what it has, and says so
    assert all(v["listed"] is False for lang, v in r["languages"].items() if lang in apollo.PAPER_SOURCES)

    model = AutoModelForCausalLM.from_pretrained(trained["base"]).eval()
    tok = AutoTokenizer.from_pretrained(trained["base"])
    items = runner.load_items(cfg, Storage.from_config(cfg))
    prompts, too_long = runner.build_prompts(cfg.eval, items, tok)
    assert not too_long and len(prompts) == r["n"] == 2 * len(SAMPLE_COUNTS)
    by_uid = {e.uid: e for e in items.items}
    preds = [json.loads(x) for x in Path(out, "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(preds) == r["n"]
    for p in preds:
        e = by_uid[p["uid"]]
        prompt = apollo.build_prompt(e.item, items.pools[e.benchmark], cfg.eval.shots, cfg.eval.seed,
                                     eos=tok.eos_token)
        assert prompts[p["uid"]] == prompt and prompt.endswith("Assistant:")
        (expected,) = generate_answers(model, tok, [prompt], 4, min_new_tokens=2)
        assert p["output"] == expected and len(tok(expected, add_special_tokens=False)["input_ids"]) >= 1, p
        assert p["predicted"] == (apollo.extract_reference(expected) or None), p


@pytest.mark.slow
def test_xmedbench_dev_files(xmedbench_dev, trained, ray_local):
    limit = 4
    bench = json.dumps([{"name": "xmedbench-dev", "path": str(xmedbench_dev)}])
    cfg = _cfg(trained["root"], f"eval.benchmarks={bench}", f"eval.limit={limit}", "eval.max_prompt_tokens=1536")
    out = runner.run(cfg, [trained["moe"]])
    r = json.loads(Path(out, "results.json").read_text(encoding="utf-8"))["tiny-moe"]
    files = sorted(p.stem for p in xmedbench_dev.glob("*.json"))
    rejects = Counter(x["file"] for x in json.loads(Path(out, "rejects.json").read_text(encoding="utf-8")))
    for lang in files:
        assert r["languages"].get(lang, {}).get("n", 0) + rejects[lang] == limit, lang
    m = Storage.from_config(cfg).read_manifest(out)
    assert m.counts["in"] == limit * len(files) and m.counts["kept"] == r["n"]
    assert r["major"]["present"] == [c for c in langs.MAJORS if c in r["languages"]]


# ---------------------------------------------------------------------------------------------------------- routing
def test_specialisation_scores_on_a_hand_made_tensor():
    # 2 languages × 2 layers × 2 experts. Layer 0: each language has its own expert → 1 bit of MI, 0 entropy.
    # Layer 1: both spread evenly → 0 MI, 1 bit of entropy each.
    counts = np.array([[[10, 0], [5, 5]],
                       [[0, 30], [7, 7]]])
    s = routing.specialisation(counts)
    np.testing.assert_allclose(s["mutual_information"], [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(s["normalised_mi"], [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(s["entropy"], [[0.0, 1.0], [0.0, 1.0]], atol=1e-12)
    np.testing.assert_allclose(s["mean_entropy"], [0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(routing.ratios(counts)[1, 0], [0.0, 1.0])

    # Languages weigh the same whatever their token counts: p(e|A) = (3/4, 1/4), p(e|B) = (1/4, 3/4), p(e) = (1/2, 1/2)
    # → I = 1 − H(3/4, 1/4); a third language with no tokens changes nothing.
    h = -(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25))
    skew = np.array([[[3, 1]], [[100, 300]], [[0, 0]]])
    np.testing.assert_allclose(routing.mutual_information(skew), [1.0 - h])
    assert np.isnan(routing.routing_entropy(skew)[2, 0])


def _sample_texts(per_language: int, languages: tuple[str, ...]) -> dict[str, list[str]]:
    items, _ = load_benchmark(BenchmarkConfig(name="s", path=str(SAMPLE_DATA / "mcq")), Storage("/tmp"))
    out: dict[str, list[str]] = {lang: [] for lang in languages}
    for it in items:
        if it.language in out and len(out[it.language]) < per_language:
            out[it.language].append(routing.item_text(it))
    return out


def test_routing_counts_exclude_padding(models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(models["moe"]).eval()
    tok = AutoTokenizer.from_pretrained(models["moe"])
    texts = _sample_texts(6, ("en", "zh", "sw"))
    counts, tokens, layers = routing.count_routing(model, tok, texts, batch_size=4)
    k = model.config.num_experts_per_tok
    independent = {lang: sum(len(tok(t)["input_ids"]) for t in ts) for lang, ts in texts.items()}
    assert tokens == independent
    assert layers == model.config.moe_layers
    for g, lang in enumerate(texts):
        assert counts[g].sum(axis=-1).tolist() == [independent[lang] * k] * len(layers), lang
    # One text at a time (no padding at all) routes the same tokens the same way.
    alone, _, _ = routing.count_routing(model, tok, texts, batch_size=1)
    assert np.abs(alone - counts).sum() <= 4  # float near-ties between batch shapes may flip a selection or two


def test_language_ids_reach_the_router(models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models["moe"]).eval()
    model.config.hybrid_in_eval = True
    ids = torch.randint(0, 100, (2, 7))
    with torch.inference_mode():
        plain = model(input_ids=ids).router_stats.language_expert_counts
        with runner.language_ids(model, 3):
            tagged = model(input_ids=ids).router_stats.language_expert_counts
    assert plain.sum() == 0  # no language ids: no token has a language row
    k = model.config.num_experts_per_tok
    assert tagged[:, 3, :].sum(-1).tolist() == [2 * 7 * k] * len(model.config.moe_layers)
    assert (tagged[:, 3, 3] == 2 * 7).all()  # hybrid: the language expert is always among the chosen


def test_language_ids_decide_the_routing_only_when_configured(distinct):
    """Eval-time routing seen in the outputs (the test above counts router selections): under ``language_ids`` a
    model with hybrid_in_eval computes exactly what a forward given those ids per token computes, a different
    expert gives different logits, and without hybrid_in_eval (or with no expert, -1) nothing changes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(distinct).eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        model.config.hybrid_in_eval = True
        explicit = {e: model(input_ids=ids, language_ids=torch.full_like(ids, e)).logits for e in (1, 4)}
        for e in (1, 4):
            with runner.language_ids(model, e):
                torch.testing.assert_close(model(input_ids=ids).logits, explicit[e], atol=0, rtol=0)
        assert not torch.allclose(explicit[1], explicit[4], atol=1e-4)
        assert not torch.allclose(explicit[1], plain, atol=1e-4)
        with runner.language_ids(model, -1):
            torch.testing.assert_close(model(input_ids=ids).logits, plain, atol=0, rtol=0)
        torch.testing.assert_close(model(input_ids=ids).logits, plain, atol=0, rtol=0)  # the hook is gone
        model.config.hybrid_in_eval = False
        with runner.language_ids(model, 4):
            torch.testing.assert_close(model(input_ids=ids).logits, plain, atol=0, rtol=0)


def test_actors_default_to_the_free_cpus_or_gpus(tmp_path, monkeypatch):
    """Catches eval.actors defaulting to 1 (one model copy on an 8-CPU node), to more actors than batches, or to CPUs
    when the evaluation runs on GPUs."""
    import ray

    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 6.0, "GPU": 2.0})
    assert runner.actor_count(_cfg(tmp_path), n_batches=20) == 6
    assert runner.actor_count(_cfg(tmp_path), n_batches=4) == 4
    assert runner.actor_count(_cfg(tmp_path, "resources.use_gpu=true", "resources.gpus_per_worker=1"), 20) == 2
    assert runner.actor_count(_cfg(tmp_path, "eval.actors=3"), n_batches=20) == 3
    monkeypatch.setattr(ray, "available_resources", lambda: {})
    assert runner.actor_count(_cfg(tmp_path), n_batches=20) == 1


def test_analyze_refuses_a_dense_model(models):
    with pytest.raises(routing.NotPostMoE, match="analyze needs a Post-MoE model"):
        routing.run(_cfg(models["root"]), [models["base"]])


@pytest.mark.slow
def test_analyze_stage(trained, ray_local):
    per_language = 5
    cfg = _cfg(trained["root"], f"eval.analyze_items_per_language={per_language}")
    out = routing.run(cfg, [trained["moe"]])
    folder = Path(out, "tiny-moe")
    doc = json.loads((folder / "routing.json").read_text(encoding="utf-8"))
    assert doc["languages"] == [c for c in (*langs.MAJORS, *langs.minors()) if c in SAMPLE_COUNTS]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained["moe"])
    texts = _sample_texts(per_language, tuple(doc["languages"]))
    counts = np.array(doc["counts"])
    assert counts.shape == (len(doc["languages"]), len(doc["layers"]), len(doc["experts"]))
    for g, lang in enumerate(doc["languages"]):
        non_pad = sum(len(tok(t)["input_ids"]) for t in texts[lang])
        assert counts[g].sum(axis=-1).tolist() == [non_pad * doc["top_k"]] * len(doc["layers"]), lang
    np.testing.assert_allclose(np.array(doc["ratios"]).sum(axis=-1), 1.0)
    for name in [*(f"heatmap-{lang}.png" for lang in doc["languages"]), "heatmap-all.png", "overview.png",
                 "specialisation.png", "routing.npz"]:
        assert (folder / name).stat().st_size > 0, name
    with np.load(folder / "routing.npz") as npz:
        np.testing.assert_array_equal(npz["counts"], counts)
    assert len(doc["mutual_information"]) == len(doc["layers"])
    np.testing.assert_allclose(doc["mutual_information"], routing.mutual_information(counts))

    m = Storage.from_config(cfg).read_manifest(out)
    n = sum(SAMPLE_COUNTS.values())
    assert m.counts["in"] == n and m.counts["kept"] == per_language * len(SAMPLE_COUNTS)
    metrics = _metrics(m.extra["mlflow_run_id"])
    assert metrics[f"mi/layer_{doc['layers'][-1]}"] == pytest.approx(doc["mutual_information"][-1])
    assert routing.run(cfg, [trained["moe"]]) == out  # rerun skips
