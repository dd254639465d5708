"""Connecting to Ray: ``RAY_ADDRESS`` when set (a cluster, or inside ``ray job submit``), else a local Ray."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    # The driver's own package must be importable by workers on other nodes; a job submitted with --working-dir
    # already ships it, a local Ray shares this interpreter's environment.
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # With its dashboard, on 127.0.0.1 only: Ray Train V2's placement-group cleaner asks the State API (served by
        # the dashboard) every second whether the train controller is alive; without it every ask fails and logs a
        # warning — one a second in the job log for the whole run — and the cleaner can never clean up. Measured on
        # 2 cores during training, Ray's own processes take no more CPU with the dashboard than without.
        ctx = ray.init(num_cpus=num_cpus, logging_level=logging.WARNING, include_dashboard=True,
                       dashboard_host="127.0.0.1")
        log.info("local Ray dashboard: http://%s", ctx.dashboard_url)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("urllib3", "botocore", "s3fs", "aiobotocore", "filelock", "fsspec", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
