"""Checking that a request fits the Ray cluster and its data loads before anything
starts, and a failed trial's error."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import ray
from ray.train import Checkpoint

from medmamba.config import DataConfig
from medmamba.data import build_datasets
from medmamba.errors import ConfigError


def check_resources(cpus: float, gpus: float, what: str, autoscaling: bool = False) -> None:
    """ConfigError unless one unit of work (``what``) asking for ``cpus`` and ``gpus`` fits on
    the cluster's total resources (skipped on an autoscaling cluster, which grows on demand)."""
    if autoscaling:
        return
    total = ray.cluster_resources()
    have_cpu, have_gpu = total.get("CPU", 0), total.get("GPU", 0)
    if cpus > have_cpu or gpus > have_gpu:
        raise ConfigError(f"{what} asks for {cpus:g} CPUs and {gpus:g} GPUs but the Ray cluster has "
                          f"{have_cpu:g} CPUs and {have_gpu:g} GPUs in all (on an autoscaling cluster set ray.autoscaling=true)")


def check_data(*configs: DataConfig) -> None:
    """DataError now, once, for data that trials, cells or workers would fail on (a MedMNIST file
    that is missing and cannot be downloaded, a size it does not come in, a missing folder,
    unreadable images): the driver loads each distinct one when the cluster is this one machine.
    On a cluster of several nodes the data may be on the workers only, and is not checked here."""
    if sum(node["Alive"] for node in ray.nodes()) > 1:
        return
    # configs that differ only in how they split the images (a k-fold matrix) load alike: one check
    same_images = lambda c: json.dumps({k: v for k, v in dataclasses.asdict(c).items()  # noqa: E731
                                        if k not in ("fold", "seed")}, sort_keys=True)
    for data in {same_images(c): c for c in configs}.values():
        build_datasets(data)


def restore_into(checkpoint: Checkpoint | None, out: Path) -> bool:
    """Copy a Ray Train/Tune checkpoint's files into ``out``; False when there is none."""
    if checkpoint is None:
        return False
    with checkpoint.as_directory() as saved:
        shutil.copytree(saved, out, dirs_exist_ok=True)
    return True


def error_line(error: BaseException) -> str:
    """The last line of a failed trial's error (a RayTaskError's text ends with the worker's own
    exception, e.g. ``medmamba.errors.DataError: ...``)."""
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__
