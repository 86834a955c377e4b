"""The paper's classification metrics, computed with scikit-learn.

Overall accuracy; precision, sensitivity (recall), specificity and F1 per class; AUC (binary:
ROC AUC of the positive class's probability, multi-class: one-vs-rest macro); loss; confusion
matrix (rows true, columns predicted).

The headline precision, sensitivity, specificity and F1 are those of the positive (disease)
class for a binary task, as a clinical report gives them, and macro averages over classes for a
multi-class one. Their macro averages, the paper's convention, are always there too as
``*_macro`` (for a binary task macro sensitivity and macro specificity are both the balanced
accuracy, so they cannot stand in for a clinical Se/Sp).
"""
from __future__ import annotations

import math
import typing
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

from .config import MetricName

METRIC_KEYS: tuple[str, ...] = typing.get_args(typing.get_args(MetricName)[0])
PER_CLASS_KEYS = ("precision", "sensitivity", "specificity", "f1")
MACRO_KEYS = tuple(f"{k}_macro" for k in PER_CLASS_KEYS)


def is_better(metric: str, new: float, best: float | None) -> bool:
    """Whether ``new`` improves on ``best`` for ``metric`` (lower loss, higher anything else); a
    NaN never improves, and anything finite improves on no value or a NaN."""
    if best is None or math.isnan(best):
        return not math.isnan(new)
    return new < best if metric == "loss" else new > best


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    loss: float | None = None,
    class_names: Sequence[str] | None = None,
    positive_class: int = 1,
) -> dict:
    """Metrics of predicted class probabilities ``probs`` (n, C) against integer labels.

    ``positive_class``: for a binary task, the index of the disease class whose precision,
    sensitivity, specificity and F1 are the headline values. AUC is NaN when the labels hold
    fewer than two classes (ROC AUC is undefined there).
    """
    y_true = np.asarray(y_true).astype(int).ravel()
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(y_true):
        raise ValueError(f"probs has shape {probs.shape}, expected ({len(y_true)}, num_classes)")
    n_classes = probs.shape[1]
    labels = list(range(n_classes))
    names = list(class_names) if class_names is not None else [str(i) for i in labels]
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} class names for {n_classes} classes")
    y_pred = probs.argmax(axis=1)

    cm = confusion_matrix(y_true, y_pred, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    tn = cm.sum() - cm.sum(axis=1) - fp
    with np.errstate(divide="ignore", invalid="ignore"):
        specificity = np.where(tn + fp > 0, tn / np.maximum(tn + fp, 1), 0.0)

    auc = math.nan
    if len(np.unique(y_true)) >= 2:
        if n_classes == 2:
            auc = float(roc_auc_score(y_true, probs[:, 1]))
        else:
            p = probs / probs.sum(axis=1, keepdims=True)
            auc = float(roc_auc_score(y_true, p, multi_class="ovr", average="macro", labels=labels))

    per_class = {"precision": precision, "sensitivity": recall, "specificity": specificity, "f1": f1}
    if n_classes == 2 and positive_class not in (0, 1):
        raise ValueError(f"positive_class is {positive_class}; a binary task has classes 0 and 1")
    headline = {k: float(v[positive_class] if n_classes == 2 else v.mean()) for k, v in per_class.items()}
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        **headline,
        "auc": auc,
        "loss": float(loss) if loss is not None else math.nan,
        **{f"{k}_macro": float(v.mean()) for k, v in per_class.items()},
        **({"positive_class": names[positive_class]} if n_classes == 2 else {}),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "sensitivity": float(recall[i]),
                "specificity": float(specificity[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(names)
        },
        "confusion_matrix": cm.tolist(),
    }
