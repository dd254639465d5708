"""``apollo-ray run`` / ``jobs/pipeline.py``: collect → rewrite → decontaminate → train → evaluate → analyze, linked by
manifests.

Each stage returns the folder of the manifest it wrote (or found: a stage whose inputs and config are unchanged and
whose output exists says so and skips). The parent MLflow run carries the lineage: every stage's output and the hash
of its manifest, in order, so an evaluated model can be traced back to the corpus files it came from.
"""

from __future__ import annotations

import logging
import time

from apollo_ray.config import Config
from apollo_ray.runtime import init_ray
from apollo_ray.storage import Storage
from apollo_ray.tracking import Tracker

log = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    from apollo_ray.data import collect, decontam, rewrite
    from apollo_ray.evaluation import routing, runner
    from apollo_ray.train import trainer

    init_ray()
    storage = Storage.from_config(cfg)
    tracker = Tracker(cfg)
    lineage: list[dict] = []
    t0 = time.time()

    def step(name: str, fn, *args) -> str:
        t = time.time()
        out = fn(*args)
        h = storage.read_manifest(out).hash if storage.has_manifest(out) else None
        lineage.append({"stage": name, "output": out, "manifest": h, "seconds": round(time.time() - t, 1)})
        log.info("pipeline: %s done in %.0fs → %s", name, time.time() - t, out)
        return out

    with tracker.pipeline("pipeline") as parent:
        corpus = step("collect", collect.run, cfg)
        qa = step("rewrite", rewrite.run, cfg, corpus)
        clean = step("decontaminate", decontam.run, cfg, qa)  # the rewrite folder itself when hygiene.decontam is off
        model = step("train", trainer.run, cfg, clean)
        evaluation = step("evaluate", runner.run, cfg, [model])
        analysis = step("analyze", routing.run, cfg, [model]) if cfg.moe.layers else None
        parent.set_tags({f"apollo.lineage.{i}.{s['stage']}": f"{s['manifest']} {s['output']}"
                         for i, s in enumerate(lineage)})
        parent.log_dict({"lineage": lineage}, "lineage.json")
    result = {"corpus": corpus, "qa": qa, "decontaminated": clean, "model": model, "evaluation": evaluation,
              "analysis": analysis, "seconds": round(time.time() - t0, 1)}
    log.info("pipeline finished in %.0fs", time.time() - t0)
    return result  # the front end prints it, once
