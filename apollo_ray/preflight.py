"""Checks that take seconds before a stage starts, instead of minutes of retries inside it.

Each one turns a fault the user can fix into a one-line ``UserError`` naming the key: object storage that cannot be
reached or read (no credentials, a dead endpoint, no such bucket), an MLflow server that does not answer, GPUs asked
for on a machine that has none, a Serve API key variable that is empty. Without them the same mistakes surface after
11–17 s of S3 retries, 266 s of MLflow retries, minutes of Ray Train waiting for GPU workers, or ~50 s of Serve
restarting a replica that cannot start.
"""

from __future__ import annotations

import os

from apollo_ray.config import Config
from apollo_ray.errors import UserError
from apollo_ray.redact import redact_text

TIMEOUT_S = 5.0
# stages that place work on resources.* (GPUs when use_gpu)
GPU_STAGES = frozenset({"train", "tune", "evaluate", "analyze", "serve", "run"})


def check(cfg: Config, command: str) -> None:
    storage(cfg)
    tracking(cfg)
    if command in GPU_STAGES:
        gpus(cfg)
    if command == "serve":
        serve_key(cfg)


def storage(cfg: Config) -> None:
    root = cfg.storage.root
    if not root.startswith(("s3://", "s3a://")):
        return
    import fsspec

    endpoint = cfg.storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    fs = fsspec.filesystem("s3", skip_instance_cache=True, client_kwargs={"endpoint_url": endpoint} if endpoint else {},
                           config_kwargs={"connect_timeout": TIMEOUT_S, "read_timeout": TIMEOUT_S,
                                          "retries": {"max_attempts": 1, "mode": "standard"}})
    bucket = root.split("://", 1)[1].split("/", 1)[0]
    where = f"storage.root={root}" + (f" (endpoint {redact_text(endpoint)})" if endpoint else "")
    try:
        fs.ls(bucket, refresh=True)
    except FileNotFoundError:
        raise UserError(f"{where}: no bucket {bucket!r} there") from None
    except PermissionError as e:
        raise UserError(f"{where}: access denied ({_first_line(e)}); check AWS_ACCESS_KEY_ID / "
                        f"AWS_SECRET_ACCESS_KEY") from None
    except Exception as e:  # botocore's NoCredentialsError, EndpointConnectionError, ... : all "cannot use it"
        raise UserError(f"{where}: cannot reach it ({type(e).__name__}: {_first_line(e)})") from None


def tracking(cfg: Config) -> None:
    if not cfg.tracking.enabled:
        return
    uri = cfg.tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    import httpx

    try:
        httpx.get(uri.rstrip("/") + "/health", timeout=TIMEOUT_S)  # any answer, even 401/404, is a live server
    except httpx.HTTPError as e:
        raise UserError(f"tracking.uri={redact_text(uri)}: no MLflow server answers there ({type(e).__name__}); "
                        f"start it, fix the URI, or set tracking.enabled=false") from None


def gpus(cfg: Config) -> None:
    if not cfg.resources.use_gpu or os.environ.get("RAY_ADDRESS"):
        return  # a cluster may bring GPU nodes up on demand; a local Ray has what this machine has
    import torch

    if torch.cuda.device_count() == 0:
        raise UserError("resources.use_gpu=true, but this machine has no GPU and no Ray cluster is set (RAY_ADDRESS); "
                        "set resources.use_gpu=false (and train.precision=fp32) to run on CPUs")


def serve_key(cfg: Config) -> None:
    name = cfg.serve.api_key_env
    if name and not os.environ.get(name):
        raise UserError(f"serve.api_key_env={name!r}, but the environment variable {name} is empty here: export it "
                        f"(the server refuses to start open when a key is configured)")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]
