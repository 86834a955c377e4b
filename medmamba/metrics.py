"""The paper's classification metrics, computed with scikit-learn.

Overall accuracy; precision, sensitivity (recall), specificity and F1 per class and as macro
averages over classes; AUC (binary ROC AUC on the positive class's probability, multi-class
one-vs-rest macro); loss; confusion matrix (rows true, columns predicted).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

METRIC_KEYS = ("accuracy", "precision", "sensitivity", "specificity", "f1", "auc", "loss")


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    loss: float | None = None,
    class_names: Sequence[str] | None = None,
) -> dict:
    """Metrics of predicted class probabilities ``probs`` (n, C) against integer labels.

    AUC is NaN when the labels hold fewer than two classes (ROC AUC is undefined there).
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

    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision.mean()),
        "sensitivity": float(recall.mean()),
        "specificity": float(specificity.mean()),
        "f1": float(f1.mean()),
        "auc": auc,
        "loss": float(loss) if loss is not None else math.nan,
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
