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


class _Redacting(logging.Filter):
    """Credentials inside URLs never reach the log (a tracking.uri or base_url with user:password@)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from apollo_ray.redact import redact_text

        message = record.getMessage()
        if "://" in message:
            record.msg, record.args = redact_text(message), None
        return True


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _Redacting) for f in handler.filters):
            handler.addFilter(_Redacting())
    for noisy in ("urllib3", "botocore", "s3fs", "aiobotocore", "filelock", "fsspec", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
