"""Mutation testing of the suite: plant known bugs, one at a time, and check that the tests meant to notice them fail.

Each mutant is a small edit of the papers' algorithms or the pipeline's guarantees (an exact snippet of the current
code and its replacement, one or a few lines) plus the few tests that must catch it. The script copies the repository
(without .venv, .git and run outputs) to a temporary folder, checks that every snippet occurs exactly once (and
stops, naming the mutant, when one does not: the code moved on and the mutant must be updated), runs each selection
once on the unmutated copy (it must pass, else a "kill" would mean nothing), then for each mutant applies it, runs

    <repo>/.venv/bin/pytest <tests> [-k <selection>] -x -q -p no:cacheprovider

in the copy with PYTHONPATH=<copy> (so the copy's ``apollo_ray`` is imported, not the editable install's: checked
before anything runs), and restores the file. Killed = the selection fails; survived = it passes. The score is
killed / mutants; the exit status is 1 below 95 %.

    .venv/bin/python bench/mutants.py            # every mutant (~5 min on 2 cores)
    .venv/bin/python bench/mutants.py --list
    .venv/bin/python bench/mutants.py --only heldout-trained-on --only hf-decodes-prompt
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache", "*.egg-info", "apollo-runs",
                                "mlruns", "mlflow.db", "*.pyc")
TARGET = 0.95


@dataclass(frozen=True)
class Edit:
    file: str          # relative to the repository root
    original: str      # must occur exactly once in the file
    replacement: str


@dataclass(frozen=True)
class Mutant:
    name: str
    why: str                      # the bug, in words
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]        # test files (or node ids) that must catch it
    k: str | None = None          # pytest -k selection inside them
    timeout_s: int = 300

    @property
    def selection(self) -> tuple[tuple[str, ...], str | None]:
        return self.tests, self.k


def mutant(name: str, why: str, file: str, original: str, replacement: str, tests: str | tuple[str, ...],
           k: str | None = None, extra: tuple[Edit, ...] = ()) -> Mutant:
    return Mutant(name, why, (Edit(file, original, replacement), *extra),
                  (tests,) if isinstance(tests, str) else tuple(tests), k)


MIXTURE_TESTS = "tests/test_mixture_build.py"
LOSS_TESTS = "tests/test_loss_oracle.py"

MUTANTS: list[Mutant] = [
    # -- the four the issue found surviving -------------------------------------------------------------------------
    mutant("heldout-trained-on", "held-out items are also packed into the training rows",
           "apollo_ray/train/dataset.py",
           "train_idx = np.flatnonzero(ok & ~heldout)",
           "train_idx = np.flatnonzero(ok)",
           MIXTURE_TESTS),
    mutant("epochs-ignored", "every item drawn once, whatever its kind's or source's epochs",
           "apollo_ray/train/dataset.py",
           "order = train_idx[priority_order(pri, ep, cfg.train.seed)]",
           "order = train_idx[priority_order(pri, np.ones_like(ep), cfg.train.seed)]",
           MIXTURE_TESTS),
    mutant("loss-no-label-shift", "the trainer's loss predicts the current token instead of the next (per-group "
           "sums kept consistent)",
           "apollo_ray/train/loop.py",
           'target = torch.nn.functional.pad(b["labels"][:, 1:], (0, 1), value=-100)',
           'target = b["labels"]',
           LOSS_TESTS,
           extra=(Edit("apollo_ray/train/loop.py",
                       "idx = torch.nn.functional.pad(index[:, 1:], (0, 1), value=-1)[mask].long()",
                       "idx = index[mask].long()"),)),
    mutant("hf-decodes-prompt", "the hf rewrite backend decodes prompt + generation, not only the new tokens",
           "apollo_ray/data/rewrite.py",
           'new = gen[:, enc["input_ids"].shape[1]:].cpu()',
           "new = gen.cpu()",
           "tests/test_rewrite.py", k="hf_backend_returns or hf_rewriter_counts"),
    # -- mixture, sampler, packing, templating ----------------------------------------------------------------------
    mutant("source-override-ignored", "data.sources[].priority / epochs looked up by kind, so never applied",
           "apollo_ray/train/dataset.py",
           "p, e = source_prior.get(sources[i], (None, None))",
           "p, e = source_prior.get(kinds[i], (None, None))",
           MIXTURE_TESTS),
    mutant("sampler-linear-keys", "Efraimidis-Spirakis keys U/π instead of Exp(1)/π: favours high π, wrong law",
           "apollo_ray/data/mixture.py",
           "keys = rng.standard_exponential(len(items)) / pri[items]",
           "keys = rng.random(len(items)) / pri[items]",
           "tests/test_sampler.py", k="law_matches_definition"),
    mutant("pack-first-label-kept", "a packed piece's first label is kept: predicted from the previous document",
           "apollo_ray/train/packing.py",
           "            labels[at] = IGNORE_INDEX\n",
           "",
           "tests/test_packing.py", k="every_token_once"),
    mutant("pack-positions-continue", "position ids continue across the documents of a row (attention crosses them)",
           "apollo_ray/train/packing.py",
           "position_ids[at:at + n] = np.arange(n)",
           "position_ids[at:at + n] = np.arange(at, at + n)",
           "tests/test_packing.py", k="every_token_once"),
    mutant("template-trains-on-prompt", "Apollo's template labels the prompt tokens too",
           "apollo_ray/data/mixture.py",
           "labels += [IGNORE_INDEX] * len(p) + a",
           "labels += p + a",
           "tests/test_templating.py", k="apollo_single_turn"),
    # -- trainer ----------------------------------------------------------------------------------------------------
    mutant("loss-mean-over-positions", "the loss averages over every position, padding and prompts included",
           "apollo_ray/train/loop.py",
           "loss = tok_loss.sum() / mask.sum().clamp(min=1)",
           "loss = tok_loss.mean()",
           LOSS_TESTS, k="packed_batch"),
    mutant("lr-warmup-off-by-one", "warmup starts at lr 0 and reaches the peak one step late",
           "apollo_ray/train/loop.py",
           "return (step + 1) / warmup",
           "return step / warmup",
           "tests/test_dedup_and_schedule.py", k="lr_schedule"),
    # -- Post-MoE routing -------------------------------------------------------------------------------------------
    mutant("hybrid-replaces-top-choice", "hybrid routing puts the language expert in the first slot, dropping the "
           "router's best choice instead of its k-th",
           "apollo_ray/model/post_moe.py",
           "ids_NK = torch.cat([ids_NK[:, :-1], torch.where(missing_N1, lang_N1, ids_NK[:, -1:])], dim=1)",
           "ids_NK = torch.cat([torch.where(missing_N1, lang_N1, ids_NK[:, :1]), ids_NK[:, 1:]], dim=1)",
           "tests/test_post_moe.py", k="hybrid"),
    mutant("renormalise-inverted", "top-k weights renormalised only when norm_topk_prob is False",
           "apollo_ray/model/post_moe.py",
           "return weights_NK / weights_NK.sum(dim=-1, keepdim=True) if self.config.norm_topk_prob else weights_NK",
           "return weights_NK / weights_NK.sum(dim=-1, keepdim=True) if not self.config.norm_topk_prob "
           "else weights_NK",
           "tests/test_post_moe.py", k="dense_function or unnormalised"),
    # -- serving, evaluation ----------------------------------------------------------------------------------------
    mutant("proxy-sign-flipped", "proxy-tuning adds α(z_anti − z_expert): moves away from the tuned expert",
           "apollo_ray/serve/proxy.py",
           "return b + alpha * (e - a)",
           "return b + alpha * (a - e)",
           "tests/test_serve.py", k="zero_padded"),
    mutant("answer-minority-letter", "answer extraction takes the least frequent parenthesised letter",
           "apollo_ray/evaluation/scoring.py",
           "top = max(counts.values())",
           "top = min(counts.values())",
           "tests/test_eval_scoring.py", k="extract"),
    mutant("major-over-all-members", "Major / Minor divide by every member language, present or not",
           "apollo_ray/evaluation/aggregate.py",
           'acc = sum(languages[c]["accuracy"] for c in present) / len(present) if present else None',
           'acc = sum(languages[c]["accuracy"] for c in present) / len(members) if present else None',
           "tests/test_eval_aggregate.py"),
    mutant("en-zh-pooled", "en / zh pooled over items instead of the mean of their sources",
           "apollo_ray/evaluation/aggregate.py",
           "if lang in mean_of_sources:",
           "if lang not in mean_of_sources:",
           "tests/test_eval_aggregate.py"),
    # -- data pipeline guarantees -----------------------------------------------------------------------------------
    mutant("dedup-last-wins", "dedup keeps the last copy of a duplicate instead of the first in input order",
           "apollo_ray/data/collect.py",
           'table = table.filter(pc.is_null(table["reason"])).sort_by("order")',
           'table = table.filter(pc.is_null(table["reason"])).sort_by([("order", "descending")])',
           "tests/test_dedup_and_schedule.py", k="dedup"),
    mutant("write-not-atomic", "local writes go straight to the destination (a reader or a crash sees half a file)",
           "apollo_ray/storage.py",
           'tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"',
           "tmp = path",
           "tests/test_storage.py", k="failed_local_write or (half_written and local)"),
]


# ------------------------------------------------------------------------------------------------------------ running
def copy_repo(dest: Path) -> Path:
    """The working tree without .venv/.git/run outputs at ``dest/<repo name>``; ``dest/shared`` links to the shared
    folder beside the repository (tests find data there through ``REPO.parent / "shared"``)."""
    copy = dest / REPO.name
    shutil.copytree(REPO, copy, ignore=IGNORE, symlinks=True)
    shared = REPO.parent / "shared"
    if shared.exists():
        (dest / "shared").symlink_to(shared)
    return copy


def check_snippets(copy: Path, mutants: list[Mutant]) -> None:
    problems = []
    for m in mutants:
        for e in m.edits:
            path = copy / e.file
            text = path.read_text(encoding="utf-8") if path.exists() else ""
            n = text.count(e.original)
            if n != 1:
                problems.append(f"  {m.name}: {e.file}: the original snippet occurs {n} times (must be exactly once):"
                                f"\n    {e.original!r}")
        for t in m.tests:
            if not (copy / t.split("::")[0]).exists():
                problems.append(f"  {m.name}: test file {t} does not exist")
    if problems:
        raise SystemExit("mutants out of date with the code:\n" + "\n".join(problems))


def env_for(copy: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_imports_copy(copy: Path, python: Path) -> None:
    """The copy's apollo_ray must win over the editable install that points at the repository."""
    code = "import apollo_ray, apollo_ray.train.dataset as d; print(apollo_ray.__file__); print(d.__file__)"
    out = subprocess.run([str(python), "-c", code], cwd=copy, env=env_for(copy), capture_output=True, text=True,
                         check=True).stdout.split()
    for f in out:
        if not Path(f).resolve().is_relative_to(copy.resolve()):
            raise SystemExit(f"the copy at {copy} is not what gets imported: {f}")


def run_selection(copy: Path, pytest_bin: Path, tests: tuple[str, ...], k: str | None, timeout_s: int
                  ) -> tuple[int, float, str]:
    cmd = [str(pytest_bin), *tests, "-x", "-q", "-p", "no:cacheprovider"] + (["-k", k] if k else [])
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=copy, env=env_for(copy), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return 124, time.time() - t0, "timeout"
    lines = (r.stdout + r.stderr).strip().splitlines()
    # what failed (the short summary names the test), else pytest's last line
    failed = [x for x in lines if x.startswith(("FAILED ", "ERROR "))]
    return r.returncode, time.time() - t0, (failed or lines or [""])[0 if failed else -1][:160]


def apply(copy: Path, m: Mutant) -> dict[Path, str]:
    """Apply the mutant's edits; return the original text of every file touched (for ``restore``)."""
    saved: dict[Path, str] = {}
    for e in m.edits:
        path = copy / e.file
        text = path.read_text(encoding="utf-8")
        saved.setdefault(path, text)
        if text.count(e.original) != 1:
            restore(saved)
            raise SystemExit(f"{m.name}: snippet not found exactly once in {e.file} (after its earlier edits)")
        path.write_text(text.replace(e.original, e.replacement), encoding="utf-8")
    return saved


def restore(saved: dict[Path, str]) -> None:
    for path, text in saved.items():
        path.write_text(text, encoding="utf-8")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", metavar="NAME", help="run only this mutant (repeatable)")
    p.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    p.add_argument("--skip-baseline", action="store_true", help="do not run the selections on the unmutated copy")
    p.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    args = p.parse_args()

    names = [m.name for m in MUTANTS]
    assert len(set(names)) == len(names), "duplicate mutant names"
    chosen = MUTANTS
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            p.error(f"unknown mutant(s) {', '.join(unknown)}; --list shows them")
        chosen = [m for m in MUTANTS if m.name in args.only]
    if args.list:
        for m in chosen:
            sel = " ".join(m.tests) + (f" -k {m.k!r}" if m.k else "")
            files = ", ".join(sorted({e.file for e in m.edits}))
            print(f"{m.name:28s} {files}\n{'':28s} {m.why}\n{'':28s} caught by: {sel}")
        return 0

    python = REPO / ".venv" / "bin" / "python"
    pytest_bin = REPO / ".venv" / "bin" / "pytest"
    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="apollo-mutants-"))
    try:
        copy = copy_repo(tmp)
        check_snippets(copy, chosen)
        check_imports_copy(copy, python)
        print(f"copy: {copy} (imports checked: apollo_ray comes from the copy)", flush=True)
        if not args.skip_baseline:
            for sel in dict.fromkeys(m.selection for m in chosen):
                rc, secs, last = run_selection(copy, pytest_bin, *sel, timeout_s=600)
                label = " ".join(sel[0]) + (f" -k {sel[1]!r}" if sel[1] else "")
                if rc != 0:
                    raise SystemExit(f"baseline fails (rc {rc}) on the unmutated code, fix it first: {label}\n  {last}")
                print(f"baseline ok  {secs:5.1f}s  {label}  ({last})", flush=True)
        results = []
        for m in chosen:
            saved = apply(copy, m)
            try:
                rc, secs, last = run_selection(copy, pytest_bin, m.tests, m.k, m.timeout_s)
            finally:
                restore(saved)
            if rc == 5:
                raise SystemExit(f"{m.name}: its selection collects no test: {m.tests} -k {m.k!r}")
            results.append((m, rc != 0))
            status = "KILLED  " if rc == 1 else "SURVIVED" if rc == 0 else f"KILLED (rc {rc})"
            print(f"{status} {secs:5.1f}s  {m.name:28s} {last}", flush=True)
    finally:
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    killed = sum(k for _, k in results)
    score = killed / len(results) if results else 1.0
    survivors = [m.name for m, k in results if not k]
    print(f"\nscore: {killed}/{len(results)} killed = {100 * score:.1f} % (target {100 * TARGET:.0f} %)"
          f"{'; survived: ' + ', '.join(survivors) if survivors else ''}; {time.time() - t_start:.0f}s")
    return 0 if score >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
