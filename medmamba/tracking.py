"""MLflow tracking through ``MlflowClient`` (no global active run, no environment changes).

Default store: SQLite in the working directory (``sqlite:///mlruns.db``). A tracking server
given by URI is checked before training starts, so an unreachable one fails in seconds.
"""
from __future__ import annotations

import math
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from .errors import TrackingError

DEFAULT_URI = "sqlite:///mlruns.db"


def resolve_uri(uri: str | None) -> str:
    """The URI to use; a relative SQLite path is made absolute (Ray workers run in other directories)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError unless an http(s) tracking server answers its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status != 200:
                raise TrackingError(f"MLflow server {uri} answered {response.status} to /health")
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({exc}); start it or pass "
                            "another --tracking-uri (default: sqlite:///mlruns.db)") from exc


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """One MLflow run: params, per-epoch metrics, artifacts, final status. Resumable by run id."""

    def __init__(self, uri: str | None, experiment: str):
        self.uri = resolve_uri(uri)
        check_reachable(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id: str | None = None

    def start(self, run_name: str | None, params: dict, tags: dict, run_id: str | None = None) -> str:
        """Start a run, or continue ``run_id`` (after --resume, or a run its caller created);
        params are logged once per run, tags every time."""
        if run_id is None:
            run_id = self.client.create_run(self.experiment_id, run_name=run_name).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        if params and not self.client.get_run(run_id).data.params:
            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(run_id, params=items[i:i + 100])
        if tags:
            self.set_tags(tags)
        return run_id

    def log_metrics(self, metrics: dict, step: int | None = None, prefix: str = "") -> None:
        """Log the scalar, finite entries of ``metrics`` (nested dicts and NaNs are skipped)."""
        now = int(time.time() * 1000)
        values = [Metric(prefix + k, float(v), now, step or 0) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        if values:
            self.client.log_batch(self.run_id, metrics=values)

    def logged_steps(self, key: str) -> set[int]:
        """Steps at which this run already holds metric ``key``."""
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def set_tags(self, tags: dict) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model(self, model) -> None:
        """The model as an MLflow PyTorch model under ``model`` in this run."""
        import mlflow
        import mlflow.pytorch

        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=self.run_id):
            mlflow.pytorch.log_model(model, name="model", pip_requirements=["torch", "medmamba"],
                                     serialization_format="pickle")  # pt2 would trace the C++ scan

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
