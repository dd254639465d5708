"""The embedded default end to end: `apollo-ray run` on the tiny preset, local storage, sqlite MLflow — what
`make demo` does — then a rerun that skips every stage."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _run(workdir: Path) -> subprocess.CompletedProcess:
    """The README's main command (`make demo` = `apollo-ray run --config ray_config.yaml`) from a fresh working
    directory, with the config's own relative root `./apollo-runs`; shorter training only."""
    shutil.copy(REPO / "ray_config.yaml", workdir / "ray_config.yaml")
    return subprocess.run(
        [str(Path(sys.executable).parent / "apollo-ray"), "run", "--config", "ray_config.yaml",
         "--set", "train.max_steps=6", "--set", "train.checkpoint_every=6", "--set", "train.eval_every=3"],
        cwd=workdir, capture_output=True, text=True, timeout=1500,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})


def _result(stdout: str) -> dict:
    """The pipeline's result: the JSON object the CLI prints (log lines may follow it)."""
    return json.JSONDecoder().raw_decode(stdout[stdout.index('{\n "corpus"'):])[0]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline")
    r = _run(workdir)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    return workdir / "apollo-runs", _result(r.stdout), r


def test_relative_root_resolves_once_and_the_summary_prints_once(pipeline):
    root, result, run = pipeline
    for key in ("corpus", "qa", "decontaminated", "model", "evaluation", "analysis"):
        assert Path(result[key]).is_absolute() and Path(result[key]).is_relative_to(root.resolve()), result[key]
    assert list((root / "checkpoints").iterdir())  # Ray Train's storage_path: the same root, not a relative one
    assert (root / "mlflow.db").is_file()
    assert run.stdout.count('"corpus":') == 1  # the CLI prints the summary; the pipeline only logs that it finished


def test_no_deprecation_warning_from_our_code(pipeline):
    *_, run = pipeline
    ours = [line for line in (run.stdout + run.stderr).splitlines()
            if "Warning" in line and ("apollo_ray/" in line or "past_key_values" in line)]
    assert not ours, ours


def test_every_stage_wrote_its_manifest_and_the_model_loads(pipeline):
    from transformers import AutoModelForCausalLM

    import apollo_ray  # noqa: F401
    from apollo_ray.storage import Storage

    root, result, _ = pipeline
    st = Storage(str(root))
    for key in ("corpus", "qa", "decontaminated", "model", "evaluation", "analysis"):
        m = st.verify(result[key])
        assert m.code_version
    corpus = st.read_manifest(result["corpus"])
    c = corpus.counts
    assert c["in"] == c["kept"] + sum(c["dropped"].values())
    qa = st.read_manifest(result["qa"])
    assert qa.inputs and list(qa.inputs.values())[0] == corpus.hash
    model = AutoModelForCausalLM.from_pretrained(result["model"])
    assert model.config.model_type == "apollo_post_moe"


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a whole, valid PNG (PIL's verify reads every chunk and checks the CRCs)."""
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG", path
        im.verify()
    with Image.open(path) as im:
        im.load()  # decodes the pixel data too
        return im.size


def test_evaluation_table_and_routing_outputs(pipeline):
    from apollo_ray import languages as langs
    from apollo_ray.config import SAMPLE_DATA

    root, result, run = pipeline
    ev = Path(result["evaluation"])
    results = json.loads((ev / "results.json").read_text())
    ((name, only),) = results.items()  # one model: the pipeline's
    sample = {p.stem for p in (SAMPLE_DATA / "mcq").glob("*.json")}  # the default benchmark: the shipped sample set
    assert set(only["languages"]) == sample
    order = [c for c in (*langs.MAJORS, *langs.minors()) if c in sample]
    assert only["major"]["present"] == [c for c in langs.MAJORS if c in sample] and len(only["major"]["present"]) == 12
    # The table: a column per language in registry order, then Major and Minor; the model's row is results.json's
    # accuracies in percent.
    lines = (ev / "table.md").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("| Model |"))  # notes may come before or after

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    assert cells(lines[at]) == ["Model", *order, "Major", "Minor"]
    pct = [only["languages"][c]["accuracy"] for c in order] + [only["major"]["accuracy"], only["minor"]["accuracy"]]
    assert cells(lines[at + 2]) == [name, *("–" if x is None else f"{100 * x:.1f}" for x in pct)]
    assert lines[at] in (run.stdout + run.stderr)  # the table is printed to the job log
    w, h = _png_size(ev / "accuracy.png")
    assert w > 100 and h > 100
    # Routing analysis: the model's folder has a heatmap per analysed language, the pooled one, the overview and the
    # specialisation plot, each a valid image.
    (doc,) = list(Path(result["analysis"]).rglob("routing.json"))
    analysed = json.loads(doc.read_text())["languages"]
    assert set(analysed) == sample
    pngs = {p.name for p in doc.parent.glob("*.png")}
    assert pngs == {*(f"heatmap-{lang}.png" for lang in analysed), "heatmap-all.png", "overview.png",
                    "specialisation.png"}
    for png in pngs:
        w, h = _png_size(doc.parent / png)
        assert w > 100 and h > 100, png


def test_mlflow_holds_the_lineage(pipeline):
    root, result, _ = pipeline
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("apollo-ray")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    parent = [r for r in runs if r.info.run_name == "pipeline"][0]
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"collect", "rewrite", "train", "evaluate", "analyze"} <= children
    lineage = [v for k, v in parent.data.tags.items() if k.startswith("apollo.lineage.")]
    assert len(lineage) == 6  # collect, rewrite, decontaminate, train, evaluate, analyze


def test_rerun_skips_finished_stages(pipeline):
    root, result, _ = pipeline
    r = _run(root.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    again = _result(r.stdout)
    for key in ("corpus", "qa", "decontaminated", "model", "evaluation", "analysis"):
        assert again[key] == result[key]
    log = r.stdout + r.stderr
    for stage in ("collect", "rewrite", "train", "evaluate", "analyze"):
        assert re.search(rf"{stage}: .*up to date", log), stage


def test_job_log_shows_training_progress_and_no_ray_warning_spam(pipeline):
    _, _, run = pipeline
    log = run.stdout + run.stderr
    assert re.search(r"step 6/6 loss \d+\.\d+ lr \S+ \d+ tok/s mfu", log)
    # Ray Train's placement-group cleaner warns once a second when the State API is down (a local Ray without its
    # dashboard); the embedded default starts the dashboard, so the job log carries no such line.
    assert "Failed to query Ray Train Controller" not in log
    assert "local Ray dashboard: http://127.0.0.1:" in log
