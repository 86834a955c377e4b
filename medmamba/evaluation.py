"""Evaluation: predictions, the paper's metrics, and the report files of a model on a split.

``evaluate_model`` is the one place a split's report is made (metrics.json, confusion matrix,
ROC curves): the training run's test pass, ``medmamba evaluate``, a sweep's best trial and a
federation's best round all go through it; ``evaluate_checkpoint`` builds the checkpoint's model
from the config saved in it first.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .config import DataConfig, ModelConfig, config_from_dict
from .data import Datasets, build_datasets, make_loader
from .metrics import classification_metrics
from .registry import build_model, load_state_dict, read_checkpoint
from .reports import plot_confusion_matrix, plot_roc_curves, plot_training_curves
from .runtime import resolve_device, world


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
class Evaluation:
    metrics: dict
    files: list[Path]  # the report files written
    data: Datasets  # what was evaluated
    model: ModelConfig  # the model that was built


def evaluate_checkpoint(checkpoint: str | Path | dict, split: str, output_dir: str | Path,
                        data: Datasets | None = None, data_overrides: dict | None = None, device: str = "auto",
                        batch_size: int = 128, model_name: str = "medmamba_t") -> Evaluation:
    """Evaluate a checkpoint (a path, or what ``read_checkpoint`` returned) on ``split`` of
    ``data`` (default: the dataset of the config saved in it, with ``data_overrides`` applied and
    no augmentation), writing the report files. The model is built from the checkpoint's whole
    ``model`` config; a checkpoint without one (e.g. a published state dict) is taken as
    ``model_name`` with default keys."""
    state = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    load_state_dict(state)  # one that holds no weights fails here, before any data is read
    cfg = config_from_dict(state["config"]) if "config" in state else None
    if data is None:
        data_cfg = replace(cfg.data if cfg else DataConfig(), **(data_overrides or {}), augment="none")
        data = build_datasets(data_cfg)
    model_cfg = replace(cfg.model if cfg else ModelConfig(name=model_name), num_classes=None)
    target = resolve_device(device)
    # the size it was trained at (fixed-size models such as ViTs are built for one)
    size = cfg.data.size if cfg else (data_overrides or {}).get("size")
    model = build_model(model_cfg, data.num_classes, size, checkpoint=state).to(target)
    return Evaluation(*evaluate_model(model, data, split, output_dir, target, batch_size), data, model_cfg)
