"""Shared fixtures: the real datasets beside the checkout (../shared/data)."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Triton's interpreter runs Triton kernels on CPU tensors (tests/test_triton_scan.py). Triton reads
# TRITON_INTERPRET when it is first imported, and torch, timm or mlflow import it early, so it is
# chosen here, before any of them, for the whole session on a machine without a GPU.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = SHARED / "data"


def _shared(path: Path) -> Path:
    """``path`` under ../shared/data; a test needing it is skipped when it is missing, except
    under CI=true, where the shared folder must be there and its absence fails the test."""
    if not path.exists():
        message = f"the shared data {path} is missing (../shared beside the checkout)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def medmnist_root() -> Path:
    root = SHARED_DATA / "medmnist"
    _shared(root / "breastmnist.npz")
    _shared(root / "pneumoniamnist.npz")
    return root


@pytest.fixture(scope="session")
def mednist_root() -> Path:
    return _shared(SHARED_DATA / "mednist_sample")


@pytest.fixture(scope="session")
def reference_root() -> Path:
    """../shared/reference: a published checkpoint fixture and the official state-dict layout."""
    return _shared(SHARED / "reference" / "official_mini_fixture.pt").parent


def tracked(cfg, uri: str | None):
    """``cfg`` logging to the MLflow store at ``uri`` (None: no MLflow)."""
    cfg.mlflow.tracking_uri = uri
    cfg.mlflow.enabled = uri is not None
    return cfg


def hospitals(mednist_root: Path, tmp_path: Path, corrupt_site: str | None = None) -> Path:
    """Three hospitals from the MedNIST sample under tmp_path/hospitals: disjoint images (20 per
    class each), hospital_c without HeadCT; ``corrupt_site`` gets an unreadable image."""
    root = tmp_path / "hospitals"
    classes = sorted(p.name for p in mednist_root.iterdir() if p.is_dir())
    for c in classes:
        files = sorted((mednist_root / c).iterdir())
        for i, site in enumerate(("hospital_a", "hospital_b", "hospital_c")):
            if site == "hospital_c" and c == "HeadCT":
                continue
            (root / site / c).mkdir(parents=True, exist_ok=True)
            for f in files[i::3][:20]:
                (root / site / c / f.name).symlink_to(f)
    if corrupt_site:
        (root / corrupt_site / classes[0] / "broken.jpeg").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="session")
def _migrated_store(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store with its schema made (MLflow's migrations take 2-3 s per new store)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlruns.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_uri(tmp_path, _migrated_store) -> str:
    """A new, empty MLflow SQLite store at tmp_path/mlruns.db (a copy of the session's migrated one;
    tests of a store's first use create theirs)."""
    shutil.copy(_migrated_store, tmp_path / "mlruns.db")
    return f"sqlite:///{tmp_path}/mlruns.db"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def ray_tmpdir() -> Iterator[None]:
    """The local Ray clusters that the code under test starts keep their session folders in a temp
    dir of this test session's (RAY_TMPDIR), removed at its end, rather than in /tmp/ray."""
    import tempfile

    if "RAY_TMPDIR" in os.environ:  # the caller chose one
        yield
        return
    os.environ["RAY_TMPDIR"] = temp_dir = tempfile.mkdtemp(prefix="ray")  # short: socket paths
    try:
        yield
    finally:
        del os.environ["RAY_TMPDIR"]
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def ray_head(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """`ray start --head --block ARGS` in its own temp dir and process group, running until the
    block ends. It is stopped by its process group (SIGTERM, then SIGKILL after 60 s), not by
    `ray stop`, which would also stop every other Ray cluster on the machine; its temp dir goes too.
    """
    import signal
    import tempfile
    import time

    temp_dir = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths must fit in 107 characters
    log = Path(temp_dir) / "ray_start.log"
    with open(log, "w") as out:
        head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                                 "--disable-usage-stats", f"--temp-dir={temp_dir}", *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            if head.poll() is not None or time.time() > deadline:
                pytest.fail(f"ray start failed:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield head
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops what it started
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (`ray_head`: 2 CPUs, dashboard and job server on).

    Yields {"address": GCS address, "dashboard": http URL, "env": for subprocesses}; RAY_ADDRESS
    points drivers in this process and in subprocesses at it.
    """
    import ray

    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    port, dash = free_port(), free_port()
    old = os.environ.get("RAY_ADDRESS")
    with ray_head([f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=2", "--num-gpus=0",
                   "--include-dashboard=true"], env):
        os.environ["RAY_ADDRESS"] = env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        try:
            yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
        finally:
            ray.shutdown()
            if old is None:
                os.environ.pop("RAY_ADDRESS", None)
            else:
                os.environ["RAY_ADDRESS"] = old


def pytest_collection_modifyitems(items):
    """A test that starts a Ray cluster or an MLflow server is an integration test (not in make test-fast)."""
    for item in items:
        if {"ray_cluster", "mlflow_server"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def start_medmamba(args: list[str], **popen) -> subprocess.Popen:
    """`python -m medmamba.cli ARGS` in its own process group (to kill it with what it started),
    output discarded unless ``popen`` says otherwise."""
    popen = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True, **popen}
    return subprocess.Popen([sys.executable, "-m", "medmamba.cli", *args], **popen)


def child_runs(client, parent_id: str) -> list:
    """The MLflow runs nested under ``parent_id`` (a sweep's trials, a matrix's cells)."""
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent_id}'")
