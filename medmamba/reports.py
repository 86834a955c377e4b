"""Report files: figures as PNG (confusion matrix, ROC curves, training curves) and tables
(CSV, and printed to the terminal)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve

MISSING = "–"  # a table cell without a value (NaN, no runs)


def pyplot():
    """matplotlib's pyplot on its file-only backend, imported when a figure is drawn (training
    itself needs no matplotlib: the GPU check carries only what the training loop imports)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(cm: list[list[int]], class_names: list[str], path: Path) -> Path:
    cm = np.asarray(cm)
    fig, ax = pyplot().subplots(figsize=(1.2 * len(class_names) + 2, 1.2 * len(class_names) + 1.5))
    ax.imshow(cm, cmap="Blues")
    ax.set(xticks=range(len(class_names)), yticks=range(len(class_names)), xlabel="predicted", ylabel="true",
           title="confusion matrix")
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    return save_figure(fig, path)


def plot_roc_curves(labels: np.ndarray, probs: np.ndarray, class_names: list[str], path: Path,
                    positive_class: int = 1) -> Path:
    """One-vs-rest ROC curve per class (the positive class only for binary tasks)."""
    fig, ax = pyplot().subplots(figsize=(5, 5))
    classes = [positive_class] if probs.shape[1] == 2 else range(probs.shape[1])
    for k in classes:
        if 0 < (labels == k).sum() < len(labels):
            fpr, tpr, _ = roc_curve(labels == k, probs[:, k])
            ax.plot(fpr, tpr, label=class_names[k])
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax.legend(loc="lower right", fontsize="small")
    return save_figure(fig, path)


def plot_training_curves(history: list[dict], path: Path) -> Path:
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, metric_ax) = pyplot().subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "val_loss"):
        loss_ax.plot(epochs, [row.get(key, np.nan) for row in history], label=key)
    for key in ("val_accuracy", "val_auc", "val_f1"):
        metric_ax.plot(epochs, [row.get(key, np.nan) for row in history], label=key)
    loss_ax.set(xlabel="epoch", title="loss")
    metric_ax.set(xlabel="epoch", title="validation")
    loss_ax.legend()
    metric_ax.legend()
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


def plot_federated_curves(rounds: list[dict], sites: list[str], centralized: dict | None, path: Path) -> Path:
    """Test AUC and accuracy per round: the global model on the global test set, each site's
    model on its own test split, and the pooled (centralised) training as a reference line."""
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    x = [row["round"] for row in rounds]
    for ax, key in zip(axes, ("auc", "accuracy")):
        ax.plot(x, [row["global"][key] for row in rounds], "k-o", linewidth=2, label="global (global test)")
        for name in sites:
            points = [(row["round"], row["sites"][name][f"test_{key}"]) for row in rounds
                      if f"test_{key}" in row["sites"].get(name, {})]
            if points:
                ax.plot(*zip(*points), "--.", label=f"{name} (site test)")
        if centralized and key in centralized:
            ax.axhline(centralized[key], color="tab:red", linestyle=":", label="centralised (pooled)")
        ax.set(xlabel="round", ylabel=f"test {key}", title=f"test {key} per round")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_csv(rows: list[dict], path: Path) -> Path:
    """``rows`` (dicts with the same keys) as a CSV file with a header."""
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def _cell_text(value: object) -> str:
    if isinstance(value, float):
        return MISSING if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def print_table(rows: list[dict], title: str, columns: list[str] | None = None) -> None:
    """``rows`` as a table on the terminal (floats to 4 significant digits; NaN, a value that does
    not exist such as an unfinished cell's metric, as a dash)."""
    from rich.console import Console
    from rich.table import Table

    columns = columns or list(rows[0])
    table = Table(title=title)
    for key in columns:
        table.add_column(key)
    for row in rows:
        table.add_row(*(_cell_text(row.get(k)) for k in columns))
    Console().print(table)
