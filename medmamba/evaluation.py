"""Evaluation: predictions, the paper's metrics, and the report files of a model on a split.

``evaluate_model`` is the one place a split's report is made (metrics.json, confusion matrix,
ROC curves): the training run's test pass, ``medmamba evaluate``, a sweep's best trial and a
federation's best round all go through it; ``evaluate_checkpoint`` builds the checkpoint's model
from the config saved in it first.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .config import Config, DataConfig, ModelConfig, config_from_dict
from .data import (MEDMNIST_2D, MEDMNIST_POSITIVE, Datasets, build_datasets, labels_of, make_loader,
                   medmnist_class_names)
from .errors import CheckpointError, DataError
from .metrics import classification_metrics
from .registry import build_model, load_state_dict, read_checkpoint
from .reports import plot_confusion_matrix, plot_roc_curves, plot_training_curves
from .runtime import resolve_device, world

log = logging.getLogger(__name__)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray, float]:
    """(labels, class probabilities, mean cross-entropy) over ``loader``.

    Under torch.distributed each rank passes its shard of the data and all ranks receive the
    predictions of the whole set, so metrics such as AUC are computed over every example.
    """
    model.eval()
    labels, probs, total = [], [], 0.0
    for x, y in loader:
        logits = model(x.to(device)).float()
        total += F.cross_entropy(logits, y.to(device), reduction="sum").item()
        labels.append(y.numpy())
        probs.append(torch.softmax(logits, dim=1).cpu().numpy())
    num_classes = probs[0].shape[1] if probs else 0
    parts = [(np.concatenate(labels) if labels else np.zeros(0, np.int64),
              np.concatenate(probs) if probs else np.zeros((0, num_classes), np.float32), total)]
    if world()[1] > 1:
        gathered: list = [None] * world()[1]
        dist.all_gather_object(gathered, parts[0])
        parts = gathered
    y_all = np.concatenate([p[0] for p in parts])
    probs_all = np.concatenate([p[1] for p in parts if len(p[0])])
    return y_all, probs_all, sum(p[2] for p in parts) / max(len(y_all), 1)


def predict_metrics(model: nn.Module, loader: DataLoader, device: torch.device, class_names: list[str],
                    positive_class: int = 1) -> tuple[dict, np.ndarray, np.ndarray]:
    """(the paper's metrics, labels, class probabilities) of ``model`` on ``loader``."""
    labels, probs, loss = predict(model, loader, device)
    metrics = classification_metrics(labels, probs, loss=loss, class_names=class_names,
                                     positive_class=positive_class)
    return metrics, labels, probs


def shard(dataset: Dataset) -> Dataset:
    """This rank's share of ``dataset`` under torch.distributed (all of it otherwise)."""
    rank, size = world()
    return dataset if size == 1 else Subset(dataset, range(rank, len(dataset), size))


def evaluate_model(model: nn.Module, data: Datasets, split: str, output_dir: str | Path, device: torch.device,
                   batch_size: int, history: list[dict] | None = None,
                   extra: dict | None = None) -> tuple[dict, list[Path]]:
    """The paper's metrics of ``model`` on ``data``'s ``split`` and the report files in
    ``output_dir`` (rank 0 writes them): metrics.json (with ``extra`` entries), confusion_matrix.png,
    roc.png, and with ``history`` history.json and training_curves.png. Returns (metrics, files)."""
    loader = make_loader(shard(getattr(data, split)), batch_size, shuffle=False)
    metrics, labels, probs = predict_metrics(model, loader, device, data.class_names, data.positive_class)
    metrics.update(extra or {})
    if world()[0] != 0:
        return metrics, []
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    files = [out / "metrics.json",
             plot_confusion_matrix(metrics["confusion_matrix"], data.class_names, out / "confusion_matrix.png"),
             plot_roc_curves(labels, probs, data.class_names, out / "roc.png", data.positive_class)]
    if history:
        (out / "history.json").write_text(json.dumps(history, indent=2))
        files += [out / "history.json", plot_training_curves(history, out / "training_curves.png")]
    return metrics, files


@dataclass
class Loaded:
    """A checkpoint's model, ready to run, and the data to run it on."""
    model: nn.Module
    data: Datasets | None  # None when loaded without data (explaining image files)
    class_names: list[str]  # the model's classes
    model_cfg: ModelConfig  # the model that was built
    config: Config | None  # the training config saved in the checkpoint (None: a bare state dict)
    device: torch.device
    size: int  # the image side the data is read at
    source: dict  # the training run's MLflow ids and dataset: source_run_id, source_experiment, trained_on


@dataclass
class Evaluation:
    metrics: dict
    files: list[Path]  # the report files written
    data: Datasets  # what was evaluated
    model: ModelConfig  # the model that was built


def model_classes(state: dict, cfg: Config | None) -> list[str] | None:
    """The class names a checkpoint's model predicts: saved with it, or its MedMNIST set's labels."""
    if state.get("class_names"):
        return list(state["class_names"])
    if cfg is not None and cfg.data.name in MEDMNIST_2D:
        return medmnist_class_names(cfg.data.name)
    return None


def run_checkpoint(output_dir: str | Path) -> Path:
    """The checkpoint a training run's folder stands for: best.pt, or last.pt when no epoch had a
    finite validation metric (e.g. a validation split with one class), as the run's own test does."""
    best, last = Path(output_dir) / "best.pt", Path(output_dir) / "last.pt"
    if not best.is_file() and not last.is_file():
        raise CheckpointError(f"{output_dir} holds no best.pt or last.pt: no training finished an epoch there")
    return best if best.is_file() else last


def load_checkpoint(checkpoint: str | Path | dict, data_overrides: dict | None = None, device: str = "auto",
                    model_name: str = "medmamba_t", class_map: dict[str, str] | None = None,
                    whole: bool = False, with_data: bool = True, data: Datasets | None = None) -> Loaded:
    """A checkpoint (a path, or what ``read_checkpoint`` returned) as a model on ``device`` and its
    data: the dataset of the config saved in it, with ``data_overrides`` applied (another dataset
    for a cross-dataset test) and no augmentation. An image folder is read with the model's
    classes, renamed by ``class_map``; ``whole`` makes every image of it the test set. The model is
    built from the checkpoint's whole ``model`` config; a checkpoint without one (e.g. a published
    state dict) is taken as ``model_name`` with default keys. ``data``: evaluate on these datasets
    instead (built already, e.g. a federation's); ``with_data=False`` reads no data (the model's
    class names must then be in the checkpoint or its config)."""
    state = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    load_state_dict(state)  # one that holds no weights fails here, before any data is read
    cfg = config_from_dict(state["config"]) if "config" in state else None
    overrides = dict(data_overrides or {})
    data_cfg = cfg.data if cfg else DataConfig()
    if cfg and overrides.get("name", data_cfg.name) != data_cfg.name and "positive_class" not in overrides:
        # another dataset: the headline class stays the model's (e.g. pneumonia)
        overrides["positive_class"] = data_cfg.positive_class or MEDMNIST_POSITIVE.get(data_cfg.name)
    data_cfg = replace(data_cfg, **overrides, augment="none")
    classes = model_classes(state, cfg)
    if (class_map or not with_data) and classes is None:
        raise CheckpointError("the checkpoint does not record its class names (and its config names no MedMNIST "
                              "set): " + ("a class map has nothing to map onto" if class_map else "name a dataset"))
    if data is None and with_data:
        target_classes = medmnist_class_names(data_cfg.name) if data_cfg.name in MEDMNIST_2D else None
        if classes is not None and target_classes not in (None, classes):
            raise CheckpointError(f"the model's classes are {classes} and {data_cfg.name}'s are {target_classes}: "
                                  "test a model on a dataset with the same classes (an image folder's class names "
                                  "can be mapped with --class-map)")
        if data_cfg.name == "folder" and data_cfg.root and "root" not in overrides and not Path(data_cfg.root).exists():
            raise DataError(f"the checkpoint's image folder {data_cfg.root} does not exist here: give the images' "
                            "folder with --data-root")
        data = build_datasets(data_cfg, classes if data_cfg.name == "folder" else None, class_map, whole)
    classes = data.class_names if data else classes
    model_cfg = replace(cfg.model if cfg else ModelConfig(name=model_name), num_classes=None)
    target = resolve_device(device, "device")
    # the size it was trained at (fixed-size models such as ViTs are built for one)
    size = cfg.data.size if cfg else overrides.get("size")
    model = build_model(model_cfg, len(classes), size, checkpoint=state,
                        data_name=data.name if data else "the checkpoint").to(target).eval()
    source = {"source_run_id": state.get("run_id"), "source_experiment": state.get("experiment"),
              "trained_on": cfg.data.name if cfg and cfg.data.name != "folder" else
              (f"folder:{Path(cfg.data.root).name}" if cfg and cfg.data.root else None)}
    return Loaded(model, data, classes, model_cfg, cfg, target, data_cfg.size, {k: v for k, v in source.items() if v})


def evaluate_checkpoint(loaded: Loaded, split: str, output_dir: str | Path, batch_size: int = 128) -> Evaluation:
    """Evaluate a loaded checkpoint on ``split`` (train, val, test or all) of its data, writing the
    report files. A class-mapped external set's metrics.json also counts the dropped images and
    names the model classes it has no images of."""
    extra = {}
    if loaded.data.unmapped:
        extra["unmapped_images"] = loaded.data.unmapped
    present = set(labels_of(getattr(loaded.data, split)).tolist())
    absent = [c for i, c in enumerate(loaded.data.class_names) if i not in present]
    if absent:
        log.warning("the %s split has no images of the model's classes %s", split, absent)
        extra["classes_without_images"] = absent
    metrics, files = evaluate_model(loaded.model, loaded.data, split, output_dir, loaded.device, batch_size, extra=extra)
    return Evaluation(metrics, files, loaded.data, loaded.model_cfg)
