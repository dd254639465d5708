"""``apollo-ray``: parse, resolve the config, call one stage's ``run(cfg)``. No logic of its own."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Callable

from apollo_ray import config as config_mod
from apollo_ray import preflight
from apollo_ray.errors import user_error_in
from apollo_ray.runtime import setup_logging

log = logging.getLogger("apollo_ray")

# sub-command -> (module with `run(cfg, **kwargs)`, help). A stage that is not built yet is simply not listed.
STAGES: dict[str, tuple[str, str]] = {
    "collect": ("apollo_ray.data.collect", "collect, clean, dedup and chunk corpora into corpus/<fp>/"),
    "rewrite": ("apollo_ray.data.rewrite", "rewrite paragraphs into QA pairs into qa/<fp>/"),
    "train": ("apollo_ray.train.trainer", "mix training (Ray Train + DeepSpeed) of a dense or Post-MoE model"),
    "tune": ("apollo_ray.tune.sweep", "Ray Tune sweep of routing variants"),
    "evaluate": ("apollo_ray.evaluation.runner", "multilingual medical MCQ evaluation"),
    "analyze": ("apollo_ray.evaluation.routing", "routing analysis of a Post-MoE model"),
    "serve": ("apollo_ray.serve.app", "OpenAI-compatible Ray Serve app (and proxy-tuning)"),
    "run": ("apollo_ray.pipeline", "the whole pipeline: collect → rewrite → train → evaluate → analyze"),
}


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _config_args(p: argparse.ArgumentParser) -> None:
    default = "ray_config.yaml" if Path("ray_config.yaml").exists() else None
    p.add_argument("--config", "-c", default=default,
                   help="the run's config file (default: ./ray_config.yaml if present, else the preset defaults)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apollo-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="show or validate the resolved config")
    p.add_argument("action", choices=["show", "validate"])
    p.add_argument("--json", action="store_true")
    _config_args(p)

    p = sub.add_parser("plan", help="parameters, memory and FLOPs of a preset, from the config alone")
    p.add_argument("--preset", default=None, help="tiny | qwen2-0.5b | qwen2-1.5b | qwen2-7b")
    p.add_argument("--json", action="store_true")
    _config_args(p)

    p = sub.add_parser("upcycle", help="upcycle a dense checkpoint into a Post-MoE one")
    p.add_argument("--base", required=True, help="hub id or local path of the dense model ('tiny' for the tiny base)")
    p.add_argument("--out", required=True, help="output folder (local path or storage URI)")
    p.add_argument("--layers", type=int)
    p.add_argument("--experts", choices=["family", "language"])
    p.add_argument("--top-k", type=int)
    p.add_argument("--routing", choices=["topk", "language", "hybrid"])
    _config_args(p)

    p = sub.add_parser("export", help="write a Post-MoE checkpoint as a standard Qwen2MoeForCausalLM that vLLM, SGLang, "
                                      "lm-eval and plain transformers open")
    p.add_argument("--model", default=None, help="checkpoint path or URI (default: this run's trained model)")
    p.add_argument("--out", default=None, help="output folder or URI (default: <model>-qwen2_moe)")
    p.add_argument("--format", default="qwen2_moe", choices=["qwen2_moe"])
    _config_args(p)

    p = sub.add_parser("manifests", help="write the KubeRay manifests (RayCluster, RayJobs, RayService, MLflow)")
    p.add_argument("--out", default="cluster/kuberay", help="output folder (default: cluster/kuberay)")
    p.add_argument("--deploy", default=None, help="deployment knobs (default: <out>/deploy.yaml if present)")
    _config_args(p)

    for name, (module, help_) in STAGES.items():
        if _available(module):
            p = sub.add_parser(name, help=help_)
            _config_args(p)
            if name in ("evaluate", "analyze"):
                p.add_argument("--model", action="append", default=[],
                               help="model(s) to evaluate: path/URI/hub id (repeatable); default: this run's model")
            if name == "evaluate":
                p.add_argument("--export-lm-eval", metavar="DIR", default=None,
                               help="write lm-evaluation-harness task files for eval.benchmarks (prompts rendered "
                                    "for the model's tokenizer) to DIR instead of evaluating")
            if name == "serve":
                p.add_argument("--write-config", metavar="PATH", default=None,
                               help="write a Serve config file for `serve deploy` instead of serving")
    return parser


def load_config(args: argparse.Namespace, extra: list[str] | None = None) -> config_mod.Config:
    return config_mod.load(args.config, [*(extra or []), *args.overrides])


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except Exception as e:  # a user's mistake is one line and status 2; anything else is a bug: keep its traceback
        mistake = user_error_in(e)
        if mistake is None:
            raise
        print(f"apollo-ray {args.command}: {one_line(str(mistake))}", file=sys.stderr)
        return 2


def one_line(message: str) -> str:
    """A multi-problem message (e.g. several bad config keys) joined onto one line."""
    parts = [p.strip() for p in message.splitlines() if p.strip()]
    if len(parts) > 1 and parts[0].endswith(":"):
        return parts[0] + " " + "; ".join(parts[1:])
    return "; ".join(parts)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "config":
        cfg = load_config(args)
        if args.action == "validate":
            print(f"ok: {args.config or 'defaults'} (preset {cfg.preset})")
        elif args.json:
            print(json.dumps(config_mod.to_dict(cfg), indent=2, ensure_ascii=False))
        else:
            print(config_mod.to_yaml(cfg), end="")
        return 0
    if args.command == "plan":
        from apollo_ray.model import plan

        cfg = load_config(args, [f"preset={args.preset}"] if args.preset else [])
        result = plan.plan(cfg)
        print(json.dumps(result.to_dict(), indent=2) if args.json else result.format())
        return 0
    if args.command == "upcycle":
        from apollo_ray.model import upcycle

        flags = {"moe.layers": args.layers, "moe.experts": args.experts, "moe.top_k": args.top_k,
                 "moe.routing": args.routing}
        cfg = load_config(args, [f"{k}={v}" for k, v in flags.items() if v is not None])
        out = upcycle.run(cfg, base=args.base, out=args.out)
        print(out)
        return 0
    if args.command == "export":
        from apollo_ray.model import export

        print(export.run(load_config(args), model=args.model, out=args.out, fmt=args.format))
        return 0
    if args.command == "manifests":
        from apollo_ray import deploy

        opts = deploy.load_options(args.deploy or Path(args.out) / "deploy.yaml")
        for path in deploy.write_manifests(load_config(args), args.out, opts):
            print(path)
        return 0
    if args.command == "serve" and args.write_config:
        from apollo_ray.serve import app

        print(app.write_config(load_config(args), args.write_config))
        return 0
    if args.command == "evaluate" and args.export_lm_eval:
        from apollo_ray.evaluation import lmeval

        print(json.dumps(lmeval.export(load_config(args), args.model or None, args.export_lm_eval), indent=1,
                         ensure_ascii=False))
        return 0
    module, _ = STAGES[args.command]
    stage: Callable = importlib.import_module(module).run
    cfg = load_config(args)
    preflight.check(cfg, args.command)
    kwargs = {"models": args.model} if getattr(args, "model", None) else {}
    result = stage(cfg, **kwargs)
    if result is not None:
        print(result if isinstance(result, str) else json.dumps(result, indent=1, default=str, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
