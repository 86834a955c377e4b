"""Shared fixtures: the real datasets beside the checkout (../shared/data)."""
from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def medmnist_root() -> Path:
    root = SHARED_DATA / "medmnist"
    if not (root / "breastmnist.npz").is_file():
        pytest.fail(f"the shared MedMNIST files are missing from {root}")
    return root


@pytest.fixture(scope="session")
def mednist_root() -> Path:
    return SHARED_DATA / "mednist_sample"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (`ray start --head`, 2 CPUs, dashboard and job server on).

    Yields {"address": GCS address, "dashboard": http URL}; RAY_ADDRESS points drivers in this
    process and in subprocesses at it. Stopped with `ray stop` at the end of the session.
    """
    import os
    import subprocess
    import sys

    import ray

    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    port, dash = free_port(), free_port()
    subprocess.run([f"{bin_dir}/ray", "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
                    "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=120)
    old = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    try:
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        ray.shutdown()
        subprocess.run([f"{bin_dir}/ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
        if old is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = old
