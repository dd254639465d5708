"""MLflow tracking: one run per stage, nested under a pipeline run, with the lineage as tags.

The default store is ``sqlite:///<storage root>/mlflow.db`` (MLflow 3 rejects a bare ``./mlruns``); on a cluster set
``tracking.uri`` to the MLflow server. Params are the resolved config, flattened; the config names the env vars that
hold secrets, never the secrets, and any credential inside a URL value is redacted (``redact.py``) before it is
logged. Artifacts live under ``<storage root>/mlflow-artifacts`` unless an MLflow server decides.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from apollo_ray import config as config_mod
from apollo_ray.redact import redact, redact_text
from apollo_ray.storage import code_version

log = logging.getLogger(__name__)
PARENT_ENV = "APOLLO_PARENT_RUN_ID"
_MAX_PARAM_LEN = 6000


class Tracker:
    """Thin, explicit wrapper: ``with tracker.stage("collect", inputs=..., output=...) as run: run.log_metrics(...)``."""

    def __init__(self, cfg: config_mod.Config):
        self.cfg = cfg
        self.enabled = cfg.tracking.enabled
        self.uri = cfg.tracking_uri()
        if self.enabled:
            import mlflow

            if self.uri.startswith("sqlite:///"):
                Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            mlflow.set_tracking_uri(self.uri)
            if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
                # Artifacts (models, plots) under the storage root, not in whatever ./mlruns the driver starts in. An
                # MLflow server (http) decides itself: its --artifacts-destination (set by the KubeRay manifests).
                location = None if self.uri.startswith(("http://", "https://")) else self.artifact_root()
                try:
                    mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location)
                except mlflow.exceptions.MlflowException:
                    pass  # created meanwhile by another process of this run
            mlflow.set_experiment(cfg.tracking.experiment)

    def artifact_root(self) -> str:
        root = self.cfg.uri("mlflow-artifacts")
        return root if "://" in root else Path(root).as_uri()

    @contextlib.contextmanager
    def pipeline(self, name: str = "pipeline") -> Iterator["Run"]:
        """The parent run; stages started inside (in this process or, through the env var, in Ray jobs) nest."""
        with self._run(name, nested=False, parent_id=None) as run:
            os.environ[PARENT_ENV] = run.run_id or ""
            try:
                yield run
            finally:
                os.environ.pop(PARENT_ENV, None)

    @contextlib.contextmanager
    def stage(self, stage: str, *, inputs: dict[str, str] | None = None, output: str | None = None,
              section: dict[str, Any] | None = None) -> Iterator["Run"]:
        parent = os.environ.get(PARENT_ENV) or None
        with self._run(stage, nested=parent is not None, parent_id=parent) as run:
            run.set_tags({"apollo.stage": stage, **({"apollo.output_uri": output} if output else {}),
                          **{f"apollo.input.{k}": v for k, v in (inputs or {}).items()}})
            if section is not None:
                run.log_params(config_mod.flatten(section, prefix=f"{stage}."))
            yield run

    @contextlib.contextmanager
    def _run(self, name: str, nested: bool, parent_id: str | None) -> Iterator["Run"]:
        if not self.enabled:
            yield Run(None)
            return
        import mlflow

        tags = {"apollo.git_sha": code_version(), "apollo.preset": self.cfg.preset}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        # Not mlflow.start_run(nested=True): the parent may live in another process (a Ray job), so link by tag.
        client = mlflow.MlflowClient()
        exp = mlflow.get_experiment_by_name(self.cfg.tracking.experiment)
        r = client.create_run(exp.experiment_id, run_name=name, tags=tags)
        run = Run(r.info.run_id, client)
        run.log_params(config_mod.flatten(config_mod.to_dict(self.cfg), prefix="cfg."))
        status = "FAILED"
        try:
            yield run
            status = "FINISHED"
        finally:
            client.set_terminated(r.info.run_id, status=status)


class Run:
    """A handle that works the same with tracking on or off (off: every call is a no-op)."""

    def __init__(self, run_id: str | None, client: Any = None):
        self.run_id = run_id
        self.client = client

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.run_id:
            return
        from mlflow.entities import Param

        items = [Param(k[:250], redact_text(str(v))[:_MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.run_id:
            return
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, redact_text(str(v))) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.run_id or not metrics:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.run_id:
            self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.run_id:
            self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        if self.run_id:
            self.client.log_dict(self.run_id, redact(obj), name)
