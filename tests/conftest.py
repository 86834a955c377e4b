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
