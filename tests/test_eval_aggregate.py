"""Aggregation the papers' way on a hand-computed example: en/zh mean of sources, others pooled, Major and Minor."""

from __future__ import annotations

import json

import pytest

from apollo_ray import languages as langs
from apollo_ray.evaluation.aggregate import Outcome, aggregate, bar_chart_png, markdown_table


def outcomes(lang: str, source: str, correct: int, n: int) -> list[Outcome]:
    return [Outcome(lang, source, i < correct) for i in range(n)]


@pytest.fixture
def results() -> dict:
    rows = [
        *outcomes("en", "medqa-usmle", 3, 4),  # 0.75
        *outcomes("en", "pubmedqa", 1, 2),  # 0.5      en = mean of sources 0.625 (pooled would be 4/6)
        *outcomes("zh", "cmexam", 2, 2),  # zh = 1.0
        *outcomes("fr", "frenchmedmcqa", 1, 1),
        *outcomes("fr", "mmlu-medical-fr", 0, 3),  # fr = pooled 1/4 (mean of sources would be 0.5)
        *outcomes("sw", "kenya", 1, 2),  # 0.5
    ]
    rows.append({"language": "th", "source": "thai-mcq", "correct": True})  # plain mappings work too: 1.0
    return aggregate(rows)


def test_hand_computed_example(results):
    lg = results["languages"]
    assert lg["en"]["accuracy"] == pytest.approx(0.625) and lg["en"]["method"] == "mean_of_sources"
    assert lg["zh"]["accuracy"] == pytest.approx(1.0)
    assert lg["fr"]["accuracy"] == pytest.approx(0.25) and lg["fr"]["method"] == "pooled"
    assert (lg["fr"]["n"], lg["fr"]["correct"]) == (4, 1)
    assert results["sources"]["en"]["medqa-usmle"] == {"n": 4, "correct": 3, "accuracy": 0.75}
    assert results["major"]["accuracy"] == pytest.approx((0.625 + 1.0 + 0.25) / 3)
    assert results["major"]["present"] == ["en", "fr", "zh"]
    assert set(results["major"]["missing"]) == set(langs.MAJORS) - {"en", "fr", "zh"}
    assert results["minor"]["accuracy"] == pytest.approx(0.75)
    assert sorted(results["minor"]["present"]) == ["sw", "th"] and len(results["minor"]["missing"]) == 36
    assert results["n"] == 15
    assert json.loads(json.dumps(results)) == results


def test_groups_with_nothing_present_are_none():
    r = aggregate(outcomes("de", "mmlu-de", 1, 2))
    assert r["major"]["accuracy"] == 0.5 and r["minor"]["accuracy"] is None and r["minor"]["present"] == []


def test_markdown_table(results):
    other = aggregate(outcomes("en", "medqa-usmle", 1, 1) + outcomes("ar", "mmlu-medical-ar", 0, 1))
    table = markdown_table({"tiny": results, "other": other})
    lines = table.splitlines()
    assert lines[0] == "| Model | ar | en | fr | zh | Major | Minor |"
    assert lines[2] == "| tiny | – | 62.5 | 25.0 | 100.0 | 62.5 | 75.0 |"
    assert lines[3] == "| other | 0.0 | 100.0 | – | – | 50.0 | – |"
    assert "- tiny: Major over 3 of 12 (en, fr, zh)" in lines
    wide = markdown_table({"tiny": results}, minor_columns=True).splitlines()
    assert wide[0] == "| Model | en | fr | zh | th | sw | Major | Minor |"  # minors in registry order
    assert wide[2] == "| tiny | 62.5 | 25.0 | 100.0 | 100.0 | 50.0 | 62.5 | 75.0 |"


def test_bar_chart_is_a_png(results):
    png = bar_chart_png({"tiny": results, "other": aggregate(outcomes("en", "s", 1, 2))})
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
