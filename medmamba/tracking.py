"""MLflow tracking through ``MlflowClient`` (no global active run, no environment changes).

Every entry point receives tracking the same way, as the ``mlflow`` section of its config
(``open_tracker``), and every run has the same lifecycle (``mlflow_run``): started or continued,
then ended FINISHED, FAILED or KILLED (Ctrl-C) on the way out.

Default store: SQLite in the working directory (``sqlite:///mlruns.db``). A tracking server
given by URI is checked before training starts, so an unreachable one fails in seconds.
"""
from __future__ import annotations

import fcntl
import logging
import math
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path


from .config import MlflowConfig
from .errors import TrackingError

DEFAULT_URI = "sqlite:///mlruns.db"
log = logging.getLogger(__name__)


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


# the tracking stores MLflow has (a database URL may name its driver: postgresql+psycopg2://)
STORE_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks", "databricks-uc", "uc")


def check_store(uri: str, existing: bool = False) -> None:
    """Raise TrackingError for a store MLflow cannot use: an unreachable server, a folder path
    (MLflow 3 refuses its file store unless $MLFLOW_ALLOW_FILE_STORE is set) and, with
    ``existing`` (reading runs), a SQLite file that is not there (MLflow would create an empty one)."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if scheme and scheme not in STORE_SCHEMES:
        raise TrackingError(f"tracking URI {uri}: MLflow has no store for {scheme}://; give sqlite:///PATH.db, an "
                            "http(s) server or a database URL (postgresql://, mysql://, mssql://)")
    if scheme in ("postgresql", "mysql", "mssql"):  # MLflow's SQLAlchemy store: its driver must import
        import sqlalchemy

        try:
            sqlalchemy.create_engine(uri)  # loads the driver, connects to nothing
        except ModuleNotFoundError as exc:
            raise TrackingError(f"tracking URI {uri} needs the database driver {exc.name!r}, which is not installed "
                                "here") from None
    check_reachable(uri)
    if "://" not in uri or uri.startswith("file:"):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
            raise TrackingError(f"tracking URI {uri} names a folder, MLflow's file store, which MLflow 3 no longer "
                                "uses by default: give sqlite:///PATH.db or an http(s) server (or set "
                                "MLFLOW_ALLOW_FILE_STORE=true to use the folder)")
    elif existing and uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise TrackingError(f"no MLflow store at {uri[len('sqlite:///'):]} (tracking URI {uri})")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextmanager
def _first_use_lock(uri: str) -> Iterator[None]:
    """An exclusive lock beside a SQLite store (``<db>.lock``) while it is first used: processes
    started together would otherwise race to create its tables (and the experiment) and all but
    one fail. Other stores need none."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = Path(uri[len("sqlite:///"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def finishing(end: Callable[[str], None]) -> Iterator[None]:
    """Call ``end`` with the run status on the way out: FINISHED, KILLED after Ctrl-C, else FAILED."""
    try:
        yield
    except KeyboardInterrupt:
        end("KILLED")
        raise
    except BaseException:
        end("FAILED")
        raise
    end("FINISHED")


def open_tracker(cfg: MlflowConfig) -> Tracker | None:
    """The tracker of a config's ``mlflow`` section (None when ``mlflow.enabled`` is false). The
    resolved URI is written back to ``cfg.tracking_uri``, so that Ray workers and Flower apps
    given this config log to the same store."""
    if not cfg.enabled:
        return None
    tracker = Tracker(cfg.tracking_uri, cfg.experiment)
    cfg.tracking_uri = tracker.uri
    return tracker


@contextmanager
def mlflow_run(tracker: Tracker | None, run_name: str | None = None, params: dict | None = None,
               tags: dict | None = None, run_id: str | None = None) -> Iterator[str | None]:
    """The lifecycle of one MLflow run: start it (or continue ``run_id``), yield its id, end it
    with the status of the way out. Without a tracker, yields None and logs nothing."""
    if tracker is None:
        yield None
        return
    run_id = tracker.start(run_name, params or {}, tags or {}, run_id=run_id)
    with finishing(tracker.end):
        yield run_id


class Tracker:
    """One MLflow run: params, per-epoch metrics, artifacts, final status. Resumable by run id.

    A tracking server that goes away after the run started does not stop the work: records are
    kept in order and sent when it answers again (checked at most every ``RETRY_SECONDS``),
    with one warning each way; what is still unsent when the run ends is reported, and a
    ``--resume`` sends the run's epochs and test results again.
    """

    RETRY_SECONDS = 30.0

    def __init__(self, uri: str | None, experiment: str):
        self.uri = resolve_uri(uri)
        check_store(self.uri)
        with _first_use_lock(self.uri):  # the store's schema and the experiment are created once
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient  # (mlflow is imported when a run is tracked)

            self.client = MlflowClient(tracking_uri=self.uri)
            try:
                found = self.client.get_experiment_by_name(experiment)
            except MlflowException as exc:
                if "401" not in str(exc) and "403" not in str(exc):
                    raise
                raise TrackingError(f"MLflow tracking server {self.uri} refused the request ({str(exc).split(':')[0]}"
                                    "): it needs a login; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                                    "for a user with access to the experiment") from exc
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id: str | None = None
        self.pending: list[Callable[[], object]] = []  # records not yet delivered, in order
        self._down_since: float | None = None
        self._last_try = 0.0

    def _send(self, record: Callable[[], object]) -> None:
        """Deliver ``record`` (a client call), after any kept ones; keep it while the server is down."""
        self.pending.append(record)
        if self._down_since is None or time.time() - self._last_try >= self.RETRY_SECONDS:
            self.flush()

    def flush(self) -> bool:
        """Send the kept records if the server answers; True when none is left."""
        self._last_try = time.time()
        while self.pending:
            try:
                check_reachable(self.uri, timeout=2.0)  # a dead server fails here in ms, not after MLflow's retries
                try:
                    self.pending[0]()
                except Exception:
                    check_reachable(self.uri, timeout=2.0)  # it went away during the call: keep the record
                    raise  # it answers: a real error
            except TrackingError as exc:
                if self._down_since is None:
                    self._down_since = time.time()
                    log.warning("%s; the run goes on and its MLflow records are kept until the server answers", exc)
                return False
            self.pending.pop(0)
        if self._down_since is not None:
            log.warning("MLflow server %s answers again: the kept records were sent", self.uri)
            self._down_since = None
        return True

    def start(self, run_name: str | None, params: dict, tags: dict, run_id: str | None = None) -> str:
        """Start a run, or continue ``run_id`` (after --resume, or a run its caller created);
        params are logged once per run, tags every time."""
        if run_id is None:
            # MLflow draws default names from Python's random module, which runs seed: use the OS's randomness
            run_name = run_name or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
            run_id = self.client.create_run(self.experiment_id, run_name=run_name).info.run_id
        else:
            try:
                self.client.get_run(run_id)
            except Exception as exc:
                raise TrackingError(f"MLflow run {run_id} (recorded with the run being resumed) is not in {self.uri}; "
                                    "resume from the directory the run started in, or pass its --tracking-uri") from exc
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        if params and not self.client.get_run(run_id).data.params:
            from mlflow.entities import Param

            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(run_id, params=items[i:i + 100])
        if tags:
            self.set_tags(tags)
        return run_id

    def log_metrics(self, metrics: dict, step: int | None = None, prefix: str = "") -> None:
        """Log the scalar, finite entries of ``metrics`` (nested dicts and NaNs are skipped)."""
        now = int(time.time() * 1000)
        from mlflow.entities import Metric

        values = [Metric(prefix + k, float(v), now, step or 0) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        if values:
            self._send(partial(self.client.log_batch, self.run_id, metrics=values))

    def logged_steps(self, key: str) -> set[int]:
        """Steps at which this run already holds metric ``key``."""
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self._send(partial(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._send(partial(self.client.log_artifact, self.run_id, str(path), artifact_path))

    def log_evaluation(self, split: str, metrics: dict, files: list[Path]) -> None:
        """An evaluation's metrics as ``<split>_*`` and its report files as artifacts."""
        self.log_metrics(metrics, prefix=f"{split}_")
        for path in files:
            if Path(path).is_file():
                self.log_artifact(path)

    def log_model(self, model) -> None:
        """The model as an MLflow PyTorch model under ``model`` in this run."""
        self._send(partial(self._log_model, model))

    def _log_model(self, model) -> None:
        """MLflow's model logging reads the global tracking URI: it is set for the call only, and
        no run is made active."""
        import mlflow.pytorch
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        # the logged model is created here, in this run's experiment (MLflow would take the global one)
        logged = self.client.create_logged_model(self.experiment_id, name="model", source_run_id=self.run_id)
        with _use_tracking_uri(self.uri):
            mlflow.pytorch.log_model(model, name="model", run_id=self.run_id, model_id=logged.model_id,
                                     pip_requirements=["torch", "medmamba"],
                                     serialization_format="pickle")  # pt2 would trace the C++ scan

    def children(self, where: str = "") -> list:
        """The runs nested under this one (a sweep's trials, a matrix's cells), those matching the
        MLflow filter ``where`` if given."""
        query = f"tags.`mlflow.parentRunId` = '{self.run_id}'" + (f" and {where}" if where else "")
        return self.client.search_runs([self.experiment_id], query)

    def end_running_children(self, status: str = "KILLED") -> None:
        """End the nested runs still RUNNING with ``status``: after Ctrl-C or SIGTERM, Ray ends the
        workers that opened them, and they cannot (a --resume sets those it continues RUNNING again)."""
        for run in self.children("attributes.status = 'RUNNING'"):
            self.client.set_terminated(run.info.run_id, status)

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is None:
            return
        self._send(partial(self.client.set_terminated, self.run_id, status=status))
        if self.pending and not self.flush():
            log.warning("MLflow server %s is still unreachable: %d records of run %s were not sent; run the same "
                        "command with --resume once it answers to send the run's epochs and results", self.uri,
                        len(self.pending), self.run_id)
