"""The installed stack is the intended one, and the package layout shadows nothing."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _major_minor(v: str) -> tuple[int, int]:
    return tuple(int(p) for p in v.split(".")[:2])


def test_pinned_ray_and_flower_are_installed():
    # flwr[simulation] 1.42.0 pins ray 2.55.1; an unpinned install silently backtracks to flwr 1.4.
    assert version("flwr") == "1.42.0"
    assert version("ray") == "2.55.1"


@pytest.mark.parametrize(
    "dist,minimum",
    [("torch", (2, 4)), ("torchvision", (0, 19)), ("mlflow", (3, 0)), ("optuna", (4, 0)),
     ("medmnist", (3, 0)), ("scikit-learn", (1, 4)), ("numpy", (1, 26)), ("flwr-datasets", (0, 6))],
)
def test_current_versions(dist, minimum):
    assert _major_minor(version(dist)) >= minimum


@pytest.mark.parametrize(
    "module", ["ray.train.torch", "ray.tune", "ray.tune.search.optuna", "flwr.simulation", "flwr_datasets",
               "mlflow", "optuna", "medmnist", "torchvision", "sklearn.metrics", "yaml", "rich", "tqdm"],
)
def test_stack_imports(module):
    assert importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("sub", ["kernels", "orchestrator", "federated"])
def test_top_level_folders_install_as_medmamba_subpackages(sub, tmp_path):
    # Run outside the checkout, so only what is installed (editable or not) is importable.
    probe = (
        "import importlib.util as u\n"
        f"print(u.find_spec('medmamba.{sub}').origin)\n"
        f"print(u.find_spec('{sub}') is None or u.find_spec('{sub}').origin)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # Ray/Flower runs earlier may have set it
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env=env)
    ours, top = out.stdout.splitlines()
    assert Path(ours).resolve() == ROOT / sub / "__init__.py"
    # We install no top-level module of that name: an unrelated PyPI package keeps it.
    assert top == "True" or ROOT not in Path(top).resolve().parents
