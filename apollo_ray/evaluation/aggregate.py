"""Accuracy per source, per language, Major and Minor, the papers' way; a Markdown table and a bar chart of it.

A language's accuracy is the mean over its sources for en and zh (each source weighs the same, as in the papers'
tables), and pooled over its items (count-weighted) for every other language. Major is the mean over the majors
present, Minor over the minors present; the results say which ones were present and which were missing, since a
"Major" over 6 of 12 languages is not the papers' Major.

Which sources a language averages is ``sources`` (language → source names; the apollo protocol passes the papers'
lists): the others present are still scored and reported per source, and listed as the language's ``excluded``. A
language none of whose listed sources is present averages every source it has, and says so (``listed: False``).
"""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from apollo_ray import languages as langs

MEAN_OF_SOURCES: tuple[str, ...] = ("en", "zh")


@dataclass(frozen=True)
class Outcome:
    language: str
    source: str
    correct: bool


def _outcome(o: Outcome | Mapping[str, Any]) -> Outcome:
    if isinstance(o, Outcome):
        return o
    return Outcome(str(o["language"]), str(o["source"]), bool(o["correct"]))


def aggregate(outcomes: Iterable[Outcome | Mapping[str, Any]], *,
              mean_of_sources: tuple[str, ...] = MEAN_OF_SOURCES,
              sources: Mapping[str, Iterable[str]] | None = None) -> dict[str, Any]:
    """The results dict (JSON-able) of scored items: ``{"sources", "languages", "major", "minor", "n"}``."""
    wanted = {langs.canonical(lang): set(srcs) for lang, srcs in (sources or {}).items()}
    counts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))  # lang→src→[ok, n]
    for o in map(_outcome, outcomes):
        c = counts[langs.canonical(o.language)][o.source]
        c[0] += int(o.correct)
        c[1] += 1
    per_source = {lang: {src: {"n": n, "correct": ok, "accuracy": ok / n} for src, (ok, n) in sorted(per.items())}
                  for lang, per in counts.items()}
    languages: dict[str, dict[str, Any]] = {}
    for lang in _ordered(per_source):
        present = per_source[lang]
        listed = lang in wanted and bool(wanted[lang] & set(present))
        per = {s: v for s, v in present.items() if s in wanted[lang]} if listed else present
        n, ok = sum(s["n"] for s in per.values()), sum(s["correct"] for s in per.values())
        if lang in mean_of_sources:
            acc, method = sum(s["accuracy"] for s in per.values()) / len(per), "mean_of_sources"
        else:
            acc, method = ok / n, "pooled"
        languages[lang] = {"accuracy": acc, "n": n, "correct": ok, "method": method, "sources": sorted(per),
                           "excluded": sorted(set(present) - set(per))}
        if lang in wanted:
            languages[lang]["listed"] = listed
    return {
        "sources": {lang: per_source[lang] for lang in languages},
        "languages": languages,
        "major": _group(languages, langs.MAJORS),
        "minor": _group(languages, langs.minors()),
        "n": sum(v["n"] for v in languages.values()),
        "excluded_n": sum(per_source[lang][s]["n"] for lang, v in languages.items() for s in v["excluded"]),
    }


def _group(languages: Mapping[str, Mapping[str, Any]], members: tuple[str, ...]) -> dict[str, Any]:
    present = [c for c in members if c in languages]
    acc = sum(languages[c]["accuracy"] for c in present) / len(present) if present else None
    return {"accuracy": acc, "present": present, "missing": [c for c in members if c not in languages]}


def _ordered(codes: Iterable[str]) -> list[str]:
    """Majors first in registry order, then minors in registry order."""
    codes = set(codes)
    return [c for c in (*langs.MAJORS, *langs.minors()) if c in codes]


# ----------------------------------------------------------------------------------------------------------- report
def markdown_table(rows: Mapping[str, Mapping[str, Any]], *, minor_columns: bool = False,
                   protocol: str | None = None) -> str:
    """One row per model (``{name: results}``), languages as columns, then Major and Minor; accuracy in %.

    Notes under the table: ``protocol`` first (a line saying how the numbers were made), then the sources left out
    of a language's average, the languages that average sources no list names, and partial Major / Minor.
    """
    present = {c for r in rows.values() for c in r["languages"]}
    cols = [c for c in _ordered(present) if minor_columns or c in langs.MAJORS]
    header = ["Model", *cols, "Major", "Minor"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, r in rows.items():
        cells = [_pct(r["languages"].get(c, {}).get("accuracy")) for c in cols]
        cells += [_pct(r["major"]["accuracy"]), _pct(r["minor"]["accuracy"])]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    notes = []
    first = next(iter(rows.values()), None)
    if first is not None:
        for lang, v in first["languages"].items():
            if v.get("excluded"):
                notes.append(f"{lang}: scored but not averaged: {', '.join(v['excluded'])}")
            if v.get("listed") is False:
                notes.append(f"{lang}: none of its listed sources present; averages {', '.join(v['sources'])}")
    for name, r in rows.items():
        for group in ("major", "minor"):
            g = r[group]
            if g["present"] and g["missing"]:
                notes.append(f"{name}: {group.capitalize()} over {len(g['present'])} of "
                             f"{len(g['present']) + len(g['missing'])} ({', '.join(g['present'])})")
    if protocol:
        notes.insert(0, protocol)
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def bar_chart_png(rows: Mapping[str, Mapping[str, Any]], *, title: str = "XMedBench accuracy") -> bytes:
    """A PNG with one group of bars per language (one bar per model) and the Major / Minor averages at the end."""
    # Figure + the Agg canvas directly: no pyplot, so no global backend state in a worker process
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    present = {c for r in rows.values() for c in r["languages"]}
    cols = _ordered(present) + ["Major", "Minor"]
    fig = Figure(figsize=(max(6.0, 0.6 * len(cols) * max(1, len(rows)) + 2), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(rows))
    for m, (name, r) in enumerate(rows.items()):
        values = [r["languages"].get(c, {}).get("accuracy") for c in cols[:-2]]
        values += [r["major"]["accuracy"], r["minor"]["accuracy"]]
        xs = [i + (m - (len(rows) - 1) / 2) * width for i in range(len(cols))]
        ax.bar(xs, [100 * (v or 0.0) for v in values], width=width, label=name)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    if len(rows) > 1:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
