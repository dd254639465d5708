"""``apollo-ray train``: the driver. Builds the inputs (base → Post-MoE init, mixture rows), then a TorchTrainer whose
workers run ``loop.train_loop_per_worker``; exports the final model to ``models/<run>/`` and MLflow, and a Post-MoE
one also as a stock ``Qwen2MoeForCausalLM`` to ``models/<run>-qwen2_moe/`` (``model.export``).

Fault tolerance: checkpoints go to ``<root>/checkpoints/<run_name>/`` through ``ray.train.report``; a dead worker
restarts the group from the latest one (FailureConfig), and rerunning the same command (same ``train.run_name``)
resumes the run from its latest checkpoint — Ray Train V2 keeps the checkpoint manager's state there.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from apollo_ray import config as config_mod
from apollo_ray.config import Config, fingerprint
from apollo_ray.errors import UserError
from apollo_ray.model import plan as plan_mod
from apollo_ray.model.tiny import ensure_base
from apollo_ray.runtime import init_ray
from apollo_ray.storage import Manifest, Storage
from apollo_ray.tracking import Tracker
from apollo_ray.train import dataset
from apollo_ray.train.loop import HF_DIR, train_loop_per_worker

log = logging.getLogger(__name__)


def initial_model(cfg: Config, storage: Storage) -> str:
    """The weights training starts from, in storage: the dense base upcycled into Post-MoE (or kept dense)."""
    from apollo_ray.model.upcycle import upcycle_checkpoint

    base = ensure_base(cfg, storage)
    moe = cfg.moe.model_dump(exclude={"ep_size"})
    uri = cfg.uri("models", f"init-{fingerprint(cfg.model.base, cfg.model.arch and cfg.model.arch.model_dump(), moe, cfg.languages.include, cfg.train.seed)}")
    if not storage.exists(f"{uri}/config.json"):
        with tempfile.TemporaryDirectory() as tmp:
            upcycle_checkpoint(base, tmp, cfg)
            cfg_bytes = (Path(tmp) / "config.json").read_bytes()
            (Path(tmp) / "config.json").unlink()
            storage.put_dir(tmp, uri)
            storage.write_bytes(f"{uri}/config.json", cfg_bytes)  # last: marks the folder complete
    return uri


def _local(storage: Storage, uri: str) -> str:
    return str(storage.get_dir(uri, tempfile.mkdtemp(prefix="apollo-model-")))


def run(cfg: Config, qa: str | None = None, callbacks: list | None = None) -> str:
    """Train; return the exported model's URI (``models/<run_name>/``). ``callbacks``: Ray Train user callbacks
    (Tune passes its ``TuneReportCallback`` so a trial reports through the trainer)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    init_ray()
    storage = Storage.from_config(cfg)
    if qa is None:
        from apollo_ray.data import rewrite

        qa = rewrite.run(cfg)
    from apollo_ray.data import decontam

    qa = decontam.run(cfg, qa)  # benchmark overlap out before the mixture (the same folder when off or done already)
    init_uri = initial_model(cfg, storage)
    init_local = _local(storage, init_uri)
    positions = json.loads((Path(init_local) / "config.json").read_text()).get("max_position_embeddings")
    if positions and cfg.train.seq_len > positions:
        raise UserError(f"train.seq_len={cfg.train.seq_len}: longer than the {positions} positions of model.base="
                        f"{cfg.model.base!r}")
    mixture = dataset.build(cfg, storage, qa, init_local)
    mix = storage.read_manifest(mixture)
    out_uri = cfg.uri("models", cfg.train.run_name)
    identity = {"mixture": mix.hash, "init": init_uri,
                "fingerprint": fingerprint(cfg.train.model_dump(mode="json", exclude={"checkpoint_every", "log_every",
                                                                                      "keep_checkpoints",
                                                                                      "max_failures"}),
                                           cfg.moe.model_dump(mode="json"), cfg.resources.num_workers)}
    if storage.has_manifest(out_uri) and storage.read_manifest(out_uri).extra.get("identity") == identity:
        log.info("train: up to date (%s), skipping", out_uri)
        return out_uri
    # A run name is one training run: resuming it with other inputs or hyper-parameters would silently mix two runs.
    marker = cfg.uri("checkpoints", cfg.train.run_name, "apollo_run.json")
    if storage.exists(marker) and storage.read_json(marker) != identity:
        raise UserError(f"train.run_name={cfg.train.run_name!r} already has checkpoints at "
                         f"{cfg.uri('checkpoints', cfg.train.run_name)} from different inputs or hyper-parameters; "
                         f"choose another train.run_name (or delete that folder to start over)")
    per_step = cfg.resources.num_workers * cfg.train.micro_batch_size * cfg.train.grad_accum
    if mix.extra["train_rows"] < per_step:
        raise UserError(f"the mixture {mixture} has {mix.extra['train_rows']} training rows: fewer than one step "
                        f"needs ({per_step} = resources.num_workers {cfg.resources.num_workers} x "
                        f"train.micro_batch_size {cfg.train.micro_batch_size} x train.grad_accum "
                        f"{cfg.train.grad_accum}); add data or lower them")
    storage.write_json(marker, identity)
    p = plan_mod.plan(cfg)
    tracker = Tracker(cfg)
    with tracker.stage("train", inputs={"mixture": mix.hash, "qa": storage.read_manifest(qa).hash},
                       output=out_uri, section={"train": cfg.train.model_dump(mode="json"),
                                                "moe": cfg.moe.model_dump(mode="json")}) as run_:
        run_.log_metrics({"mixture/fill": mix.extra["fill"], "mixture/train_rows": mix.extra["train_rows"],
                          "mixture/train_tokens": mix.extra["train_tokens"]})
        t = cfg.train
        loop_config = {
            "init_model": init_local if "://" not in cfg.storage.root else init_uri, "mixture": mixture,
            "storage_root": cfg.storage.root, "endpoint_url": cfg.storage.endpoint_url,
            "languages": mix.extra["languages"], "kinds": mix.extra["kinds"],
            "micro_batch_size": t.micro_batch_size, "grad_accum": t.grad_accum, "lr": t.lr, "betas": list(t.betas),
            "weight_decay": t.weight_decay, "warmup_ratio": t.warmup_ratio, "min_lr_ratio": t.min_lr_ratio,
            "grad_clip": t.grad_clip, "zero_stage": t.zero_stage, "precision": t.precision, "seed": t.seed,
            "activation_checkpointing": t.activation_checkpointing,
            "max_steps": t.max_steps, "checkpoint_every": t.checkpoint_every, "eval_every": t.eval_every,
            "log_every": t.log_every, "ep_size": cfg.moe.ep_size if cfg.moe.layers else 1,
            "flops_per_token": p.flops_per_token,
            "tracking_uri": tracker.uri if tracker.enabled else None, "mlflow_run_id": run_.run_id,
        }
        r = cfg.resources
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                         resources_per_worker={"CPU": r.cpus_per_worker,
                                                               **({"GPU": r.gpus_per_worker} if r.use_gpu else {})}),
            run_config=RunConfig(
                name=t.run_name, **_ray_storage(cfg, "checkpoints"),
                checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                failure_config=FailureConfig(max_failures=t.max_failures), callbacks=callbacks or None),
        )
        result = trainer.fit()
        if result.error:
            raise result.error
        ckpt = result.checkpoint
        with ckpt.as_directory() as d:
            hf = Path(d) / HF_DIR
            if not hf.exists():
                raise RuntimeError(f"the final checkpoint {ckpt.path} holds no exported model ({HF_DIR}/)")
            tok_src = Path(init_local)
            for f in tok_src.iterdir():
                if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
                    (hf / f.name).write_bytes(f.read_bytes())
            storage.put_dir(hf, out_uri)
            run_.log_artifacts(hf, "model")
            if cfg.moe.layers:  # also as a stock Qwen2MoeForCausalLM, for engines that cannot import apollo_ray
                from apollo_ray.model import export

                export.export(str(hf), export.portable_uri(out_uri), endpoint_url=cfg.storage.endpoint_url,
                              source=out_uri)
        metrics = result.metrics or {}
        run_.log_metrics({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        storage.write_manifest(out_uri, Manifest(
            stage="train", fingerprint=cfg.train.run_name, inputs={"mixture": mix.hash},
            config={"train": cfg.train.model_dump(mode="json"), "moe": cfg.moe.model_dump(mode="json"),
                    "model": cfg.model.model_dump(mode="json")},
            extra={"identity": identity, "checkpoint": ckpt.path, "metrics": {k: v for k, v in metrics.items()
                                                        if isinstance(v, (int, float, str))},
                   "mlflow_run_id": run_.run_id}))
    log.info("train: model exported to %s", out_uri)
    return out_uri


def _ray_storage(cfg: Config, folder: str) -> dict:
    """``storage_path`` (+ ``storage_filesystem`` for S3 with a custom endpoint) for Ray Train / Tune run configs:
    given an explicit pyarrow filesystem, Ray wants the path inside it, without the ``s3://`` scheme."""
    fs = _pyarrow_fs(cfg)
    uri = cfg.uri(folder)
    return {"storage_path": uri.split("://", 1)[1], "storage_filesystem": fs} if fs else {"storage_path": uri}


def _pyarrow_fs(cfg: Config):
    """Ray Train persists through pyarrow; give it the S3 endpoint of our storage (None = infer from the URI)."""
    if not cfg.storage.root.startswith("s3://"):
        return None
    import os

    import pyarrow.fs as pafs

    endpoint = cfg.storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return None
    scheme, host = endpoint.split("://", 1)
    return pafs.S3FileSystem(endpoint_override=host, scheme=scheme,
                             access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
                             secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
                             region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
