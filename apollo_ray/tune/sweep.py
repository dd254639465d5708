"""``apollo-ray tune``: the Apollo-MoE ablations (routing, number of Post-MoE layers, expert assignment, k, lr) as
one Ray Tune sweep of Ray Train runs.

Train V2 way: every trial is a plain function that builds the trial's config, runs the same trainer as
``apollo-ray train`` (its TorchTrainer reports through Tune's ``TuneReportCallback``, so ASHA can stop it on held-out
loss), evaluates the exported model on the dev benchmark, and reports the Major / Minor averages — the sweep's
objective. Collect and rewrite run once, before the sweep; the trials share their output.

Storage: ``tune/<name>/`` holds Tune's experiment state (rerunning the same sweep resumes it without re-running
finished trials), ``results.md``/``results.csv``, ``best.yaml`` (a ready-to-use config fragment) and the plots.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import os
from typing import Any

import yaml

from apollo_ray import config as config_mod
from apollo_ray.config import Config, ConfigError
from apollo_ray.runtime import init_ray
from apollo_ray.storage import Storage
from apollo_ray.tracking import PARENT_ENV, Tracker

log = logging.getLogger(__name__)
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
OBJECTIVE = "major"


# ------------------------------------------------------------------------------------------------ search space
def _known_key(path: list[str]) -> bool:
    model: Any = Config
    for p in path:
        fields = getattr(model, "model_fields", None)
        if not fields or p not in fields:
            return False
        ann = fields[p].annotation
        # Unwrap Optional[Section] and plain Section annotations to walk down.
        args = [a for a in getattr(ann, "__args__", ()) if hasattr(a, "model_fields")]
        model = ann if hasattr(ann, "model_fields") else (args[0] if args else None)
    return True


def parse_search_space(cfg: Config, origin: str = "tune.search_space") -> dict[str, tuple[str, list]]:
    """Validate ``tune.search_space``: every key a real config field, every distribution known, every grid/choice
    value valid for its field. Returns key -> (distribution, values)."""
    raw = cfg.tune.search_space
    if not raw:
        raise ConfigError(f"invalid config ({origin}): the search space is empty")
    base = config_mod.to_dict(cfg)
    out: dict[str, tuple[str, list]] = {}
    problems = []
    for key, spec in raw.items():
        if key in ("preset", "tune") or key.startswith("tune.") or not _known_key(key.split(".")):
            problems.append(f"  tune.search_space.{key}: unknown (or unsweepable) config key")
            continue
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            problems.append(f"  tune.search_space.{key} = {spec!r}: expected one of "
                            f"{{{'|'.join(DISTRIBUTIONS)}: [...]}}")
            continue
        dist, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            problems.append(f"  tune.search_space.{key}.{dist} = {values!r}: expected a non-empty list")
            continue
        if dist in ("uniform", "loguniform", "randint") and len(values) != 2:
            problems.append(f"  tune.search_space.{key}.{dist} = {values!r}: expected [low, high]")
            continue
        for v in (values if dist in ("grid", "choice") else values[:2]):
            try:
                config_mod.resolve(base, [f"{key}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"],
                                   origin=f"{origin}.{key}")
            except ConfigError as e:
                problems.append(f"  tune.search_space.{key}: value {v!r} is invalid: "
                                + str(e).split("\n", 1)[-1].strip())
        out[key] = (dist, values)
    if problems:
        raise ConfigError(f"invalid config ({origin}):\n" + "\n".join(problems))
    return out


def param_space(space: dict[str, tuple[str, list]]) -> dict[str, Any]:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {key: make[dist](values) for key, (dist, values) in space.items()}


def trial_config(base: dict, params: dict[str, Any], trial_id: str) -> Config:
    overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for k, v in params.items()]
    return config_mod.resolve(base, [*overrides, f"train.run_name={base['train']['run_name']}-{trial_id}"],
                              origin=f"trial {trial_id}")


# --------------------------------------------------------------------------------------------------- the trial
def run_trial(params: dict[str, Any]) -> None:
    """One trial: train (reporting through Tune), evaluate, report the objective. Everything arrives in ``params``."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from apollo_ray.evaluation import runner
    from apollo_ray.train import trainer

    ctx = params.pop("__apollo__")
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(ctx["base"], params, trial_id)
    os.environ[PARENT_ENV] = ctx["parent_run_id"] or ""
    tracker = Tracker(cfg)
    with tracker.stage(f"trial-{trial_id}", section={k: v for k, v in params.items()}) as trial_run:
        trial_run.set_tags({"apollo.trial_id": trial_id, "apollo.sweep": cfg.tune.name})
        os.environ[PARENT_ENV] = trial_run.run_id or ""
        model = trainer.run(cfg, ctx["qa"], callbacks=[TuneReportCallback()])
        storage = Storage.from_config(cfg)
        train_metrics = storage.read_manifest(model).extra.get("metrics", {})
        results = storage.read_json(f"{runner.run(cfg, [model])}/results.json")
        summary = next(iter(results.values()))  # results.json: {model name: aggregate}
        final = {"major": summary["major"]["accuracy"], "minor": summary["minor"]["accuracy"],
                 "heldout_loss": train_metrics.get("heldout_loss", float("nan")), "model": model}
        trial_run.log_metrics({k: v for k, v in final.items() if isinstance(v, float) and v == v})
    ray.tune.report(final)


# --------------------------------------------------------------------------------------------------- the sweep
def run(cfg: Config, qa: str | None = None) -> str:
    """Run (or resume) the sweep; return its folder ``tune/<name>/``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from apollo_ray.train.trainer import _ray_storage

    space = parse_search_space(cfg)
    init_ray()
    storage = Storage.from_config(cfg)
    if qa is None:
        from apollo_ray.data import rewrite

        qa = rewrite.run(cfg)
    from apollo_ray.data import decontam

    qa = decontam.run(cfg, qa)  # once, here: parallel trials would each build the benchmark index otherwise
    out = cfg.uri("tune", cfg.tune.name)
    tracker = Tracker(cfg)
    base = config_mod.to_dict(cfg)
    r = cfg.resources
    # The trial function only drives: its TorchTrainer asks for the workers' resources itself. Ray refuses an empty
    # request, and any CPU here would be missing for those workers, so the driver reserves a token of memory.
    trainable = tune.with_resources(run_trial, {"CPU": 0, "memory": 64 * 1024 ** 2})
    name = cfg.tune.name
    ray_storage = _ray_storage(cfg, "tune")
    storage_path, fs = ray_storage["storage_path"], ray_storage.get("storage_filesystem")
    with tracker.stage("tune", output=out, section=cfg.tune.model_dump(mode="json")) as sweep_run:
        experiment = f"{storage_path}/{name}"
        if tune.Tuner.can_restore(experiment, storage_filesystem=fs) if fs else tune.Tuner.can_restore(experiment):
            log.info("tune: resuming sweep %s (finished trials are not re-run)", experiment)
            tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True,
                                       **({"storage_filesystem": fs} if fs else {}))
        else:
            total_steps = cfg.train.max_steps or 10 ** 6
            scheduler = (ASHAScheduler(time_attr="step", max_t=total_steps,
                                       grace_period=min(cfg.tune.grace_period, total_steps))
                         if cfg.tune.scheduler == "asha" else FIFOScheduler())
            space_with_ctx = {**param_space(space),
                              "__apollo__": {"base": base, "qa": qa, "parent_run_id": sweep_run.run_id}}
            tuner = tune.Tuner(
                trainable, param_space=space_with_ctx,
                tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode="min", scheduler=scheduler,
                                            num_samples=cfg.tune.num_samples,
                                            max_concurrent_trials=cfg.tune.max_concurrent_trials),
                run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=fs,
                                          verbose=1))
        grid = tuner.fit()
        rows = []
        for res in grid:
            params = {k: v for k, v in (res.config or {}).items() if k != "__apollo__"}
            m = res.metrics or {}
            rows.append({**params, "trial": m.get("trial_id", ""), "major": m.get("major"), "minor": m.get("minor"),
                         "heldout_loss": m.get("heldout_loss"), "error": str(res.error)[:200] if res.error else ""})
        write_outputs(cfg, storage, out, space, rows)
        done = [x for x in rows if isinstance(x["major"], float)]
        if done:
            best = max(done, key=lambda x: x["major"])
            sweep_run.log_metrics({"best_major": best["major"], "best_minor": best["minor"] or 0.0})
            sweep_run.log_dict({"best": best, "trials": rows}, "sweep.json")
        for f in ("results.md", "best.yaml", "layers.png"):
            if storage.exists(f"{out}/{f}") and "://" not in out:
                sweep_run.log_artifact(f"{out}/{f}")
    return out


def best_fragment(space: dict, best: dict, preset: str) -> dict:
    frag: dict[str, Any] = {"preset": preset}
    for key in space:
        cur = frag
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = best[key]
    return frag


def write_outputs(cfg: Config, storage: Storage, out: str, space: dict, rows: list[dict]) -> None:
    keys = list(space)
    cols = [*keys, "major", "minor", "heldout_loss", "trial", "error"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    storage.write_text(f"{out}/results.csv", buf.getvalue())

    def fmt(v: Any) -> str:
        return f"{100 * v:.1f}" if isinstance(v, float) and v <= 1.0 and v >= 0 else str(v if v is not None else "—")

    lines = ["| " + " | ".join([*keys, "Major", "Minor", "held-out loss"]) + " |",
             "|" + "---|" * (len(keys) + 3)]
    for r in sorted(rows, key=lambda x: -(x["major"] if isinstance(x["major"], float) else -1)):
        hl = r["heldout_loss"]
        lines.append("| " + " | ".join([*(str(r.get(k)) for k in keys), fmt(r["major"]), fmt(r["minor"]),
                                         f"{hl:.4f}" if isinstance(hl, float) else "—"]) + " |")
    table = "\n".join(lines) + "\n"
    storage.write_text(f"{out}/results.md", table)
    log.info("tune results:\n%s", table)
    done = [x for x in rows if isinstance(x["major"], float)]
    if done:
        best = max(done, key=lambda x: x["major"])
        frag = best_fragment(space, best, cfg.preset)
        config_mod.resolve(copy.deepcopy(frag), origin="best.yaml")  # the fragment must itself be a valid config
        storage.write_text(f"{out}/best.yaml", "# best trial of sweep %s: Major %.1f, Minor %.1f\n" % (
            cfg.tune.name, 100 * best["major"], 100 * (best["minor"] or 0)) + yaml.safe_dump(frag, sort_keys=False))
    if "moe.layers" in space and done:
        storage.write_bytes(f"{out}/layers.png", layers_plot(done))


def layers_plot(rows: list[dict]) -> bytes:
    """Accuracy against the number of Post-MoE layers, one line per routing variant, Major solid and Minor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    variants = sorted({str(r.get("moe.routing", "config")) for r in rows})
    for i, v in enumerate(variants):
        pts = sorted((r["moe.layers"], r["major"], r["minor"]) for r in rows if str(r.get("moe.routing", "config")) == v)
        xs = [p[0] for p in pts]
        color = f"C{i}"
        ax.plot(xs, [100 * p[1] for p in pts], "-o", color=color, label=f"{v} Major")
        if any(p[2] is not None for p in pts):
            ax.plot(xs, [100 * (p[2] or 0) for p in pts], "--s", color=color, label=f"{v} Minor")
    ax.set_xticks(sorted({r["moe.layers"] for r in rows}))  # layer counts are integers
    ax.set_xlabel("Post-MoE layers (last N)")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
