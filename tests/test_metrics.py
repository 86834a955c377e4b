"""The paper's metrics against values computed by hand on small fixed examples."""
from __future__ import annotations

import math

import numpy as np
import pytest

from medmamba.metrics import classification_metrics


def test_three_class_example_by_hand():
    y = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    pred = [0, 0, 1, 1, 2, 2, 2, 2, 0, 2]
    probs = np.full((10, 3), 0.1)
    probs[np.arange(10), pred] = 0.8
    m = classification_metrics(y, probs, loss=0.5, class_names=["a", "b", "c"])
    # Confusion matrix (rows true): a: [2,1,0], b: [0,1,1], c: [1,0,4].
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 4]]
    assert m["accuracy"] == pytest.approx(7 / 10)
    prec = [2 / 3, 1 / 2, 4 / 5]   # tp / predicted
    sens = [2 / 3, 1 / 2, 4 / 5]   # tp / true
    spec = [6 / 7, 7 / 8, 4 / 5]   # tn / (tn + fp): a: fp 1, tn 6; b: fp 1, tn 7; c: fp 1, tn 4
    f1 = [2 * p * r / (p + r) for p, r in zip(prec, sens)]
    assert m["precision"] == pytest.approx(np.mean(prec))
    assert m["sensitivity"] == pytest.approx(np.mean(sens))
    assert m["specificity"] == pytest.approx(np.mean(spec))
    assert m["f1"] == pytest.approx(np.mean(f1))
    assert m["per_class"]["c"] == pytest.approx({"precision": 0.8, "sensitivity": 0.8, "specificity": 0.8, "f1": 0.8, "support": 5})
    assert m["loss"] == 0.5
    assert 0 <= m["auc"] <= 1


def test_binary_auc_is_the_roc_auc_of_the_positive_probability():
    y = [0, 0, 1, 1]
    p1 = np.array([0.1, 0.4, 0.35, 0.8])  # pairs (pos > neg): (0.35>0.1), (0.8>0.1), (0.8>0.4); 0.35<0.4
    m = classification_metrics(y, np.stack([1 - p1, p1], axis=1))
    assert m["auc"] == pytest.approx(3 / 4)
    # Predictions at 0.5: [0, 0, 0, 1] -> tp 1, fn 1, tn 2, fp 0.
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["per_class"]["1"]["sensitivity"] == pytest.approx(1 / 2)
    assert m["per_class"]["1"]["specificity"] == pytest.approx(1.0)
    # the paper's macro average (class 0's specificity is class 1's sensitivity); the headline is class 1's
    assert m["specificity_macro"] == pytest.approx((1.0 + 0.5) / 2)


def test_binary_headline_metrics_are_the_positive_class_and_macro_ones_are_kept():
    """Macro Se and macro Sp are both the balanced accuracy: the headline is the disease class's."""
    y = np.array([0] * 6 + [1] * 4)
    pred = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 0])  # class 0: 5 of 6 right, class 1: 3 of 4
    probs = np.stack([1 - pred * 0.8 - 0.1, pred * 0.8 + 0.1], axis=1)
    m = classification_metrics(y, probs, positive_class=1, class_names=["normal", "pneumonia"])
    assert (m["sensitivity"], m["specificity"]) == (pytest.approx(3 / 4), pytest.approx(5 / 6))
    assert m["precision"] == pytest.approx(3 / 4) and m["f1"] == pytest.approx(3 / 4)
    assert m["sensitivity_macro"] == m["specificity_macro"] == pytest.approx((5 / 6 + 3 / 4) / 2)
    assert m["positive_class"] == "pneumonia"
    malignant = classification_metrics(y, probs, positive_class=0, class_names=["malignant", "benign"])
    assert (malignant["sensitivity"], malignant["specificity"]) == (pytest.approx(5 / 6), pytest.approx(3 / 4))
    assert malignant["precision"] == pytest.approx(5 / 6) and malignant["auc"] == pytest.approx(m["auc"])
    three = classification_metrics([0, 1, 2], np.eye(3), positive_class=0)
    assert "positive_class" not in three and three["sensitivity"] == three["sensitivity_macro"] == 1.0
    with pytest.raises(ValueError, match="positive_class is 2"):
        classification_metrics(y, probs, positive_class=2)


def test_single_class_labels_give_nan_auc_and_bad_shapes_fail():
    m = classification_metrics([1, 1], np.array([[0.2, 0.8], [0.6, 0.4]]))
    assert math.isnan(m["auc"]) and m["accuracy"] == 0.5
    with pytest.raises(ValueError, match=r"probs has shape \(2,\), expected \(3, num_classes\)"):
        classification_metrics([0, 1, 1], np.array([0.2, 0.8]))


def test_class_names_must_match_the_probabilities():
    with pytest.raises(ValueError, match="3 class names for 2 classes"):
        classification_metrics([0, 1], np.array([[0.9, 0.1], [0.2, 0.8]]), class_names=["a", "b", "c"])
