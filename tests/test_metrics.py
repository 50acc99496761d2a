"""Tests of noisescore.ml.metrics on small hand-computable examples."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from noisescore.ml.metrics import (
    classification_metrics,
    correction_metrics,
    detection_auroc,
    detection_metrics,
)


def _binary_proba(p1: list[float]) -> np.ndarray:
    p = np.asarray(p1, dtype=np.float64)
    return np.stack([1.0 - p, p], axis=1)


def _json_ready(metrics: dict[str, object]) -> None:
    """Plain Python floats / ints / None, so json.dumps(allow_nan=False) accepts them."""
    for key, value in metrics.items():
        assert value is None or type(value) in (float, int), (key, type(value))
    json.dumps(metrics, allow_nan=False)


# --------------------------------------------------------------------------- classification


def test_classification_binary_hand_example() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    proba = _binary_proba([0.1, 0.2, 0.7, 0.8, 0.4])  # predictions 0 0 1 1 0
    m = classification_metrics(labels, proba)
    _json_ready(m)
    assert m["accuracy"] == pytest.approx(3 / 5)
    # class 0: P = R = 2/3 -> F1 2/3; class 1: P = R = 1/2 -> F1 1/2.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # Recall 2/3 and 1/2.
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # Positives 0.8, 0.4 vs negatives 0.1, 0.2, 0.7: 5 of 6 pairs ordered correctly.
    assert m["auroc"] == pytest.approx(5 / 6)


def test_classification_multiclass_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 1, 0])
    logits = rng.normal(size=(len(labels), 3)) + 1.5 * np.eye(3)[labels]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    pred = proba.argmax(axis=1)
    m = classification_metrics(labels, proba)
    _json_ready(m)
    assert m["accuracy"] == pytest.approx(float((pred == labels).mean()))
    assert m["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, pred))
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, proba, multi_class="ovr"))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_auroc_none_with_one_class() -> None:
    labels = np.array([1, 1, 1])
    m = classification_metrics(labels, _binary_proba([0.9, 0.2, 0.6]))
    _json_ready(m)
    assert m["auroc"] is None
    assert m["accuracy"] == pytest.approx(2 / 3)

    m3 = classification_metrics(np.array([2, 2]), np.array([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]]))
    assert m3["auroc"] is None


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_multiclass_test_set_lacking_a_class() -> None:
    # Three columns, only classes 0 and 1 present: AUROC of class 1 vs 0 after renormalising.
    labels = np.array([0, 0, 1, 1])
    proba = np.array(
        [[0.6, 0.2, 0.2], [0.3, 0.3, 0.4], [0.2, 0.6, 0.2], [0.5, 0.4, 0.1]]
    )  # P(1 | {0,1}) = 0.25, 0.5, 0.75, 0.444...
    m = classification_metrics(labels, proba)
    _json_ready(m)
    # Positives 0.75, 0.444 vs negatives 0.25, 0.5: 3 of 4 pairs.
    assert m["auroc"] == pytest.approx(3 / 4)

    # Four columns, three classes present: still a number in [0, 1].
    rng = np.random.default_rng(1)
    labels4 = np.array([0, 1, 3, 0, 1, 3, 3, 1])
    proba4 = rng.dirichlet(np.ones(4), size=len(labels4))
    m4 = classification_metrics(labels4, proba4)
    _json_ready(m4)
    assert m4["auroc"] is not None
    assert 0.0 <= m4["auroc"] <= 1.0
    sub = proba4[:, [0, 1, 3]] / proba4[:, [0, 1, 3]].sum(axis=1, keepdims=True)
    assert m4["auroc"] == pytest.approx(roc_auc_score(labels4, sub, multi_class="ovr"))


# --------------------------------------------------------------------------- detection


def test_detection_perfect_and_reversed() -> None:
    flipped = np.array([True, True, False, False, False])
    flagged = np.array([True, True, False, False, False])
    perfect = detection_metrics(np.array([0.1, 0.2, 0.8, 0.9, 1.0]), flipped, flagged)
    _json_ready(perfect)
    assert perfect["auroc"] == pytest.approx(1.0)
    assert perfect["average_precision"] == pytest.approx(1.0)
    assert perfect["precision"] == perfect["recall"] == perfect["f1"] == pytest.approx(1.0)

    reversed_ = detection_metrics(np.array([0.9, 1.0, 0.1, 0.2, 0.3]), flipped, ~flagged)
    assert reversed_["auroc"] == pytest.approx(0.0)
    assert reversed_["precision"] == reversed_["recall"] == reversed_["f1"] == 0.0


def test_detection_precision_recall_f1_hand_example() -> None:
    flipped = np.array([True, False, False, False, False, True])
    flagged = np.array([True, True, True, False, False, False])
    m = detection_metrics(np.linspace(0.1, 0.6, 6), flipped, flagged)
    # tp = 1, fp = 2, fn = 1.
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))


@pytest.mark.parametrize("all_flipped", [False, True])
def test_detection_ranking_none_when_one_class(all_flipped: bool) -> None:
    flipped = np.full(4, all_flipped)
    m = detection_metrics(np.array([0.1, 0.5, 0.7, 0.9]), flipped, np.array([1, 0, 0, 0], bool))
    _json_ready(m)
    assert m["auroc"] is None
    assert m["average_precision"] is None
    assert detection_auroc(np.array([0.1, 0.5, 0.7, 0.9]), flipped) is None


def test_detection_auroc_hand_example_and_consistency() -> None:
    trust = np.array([0.2, 0.6, 0.5, 0.9])
    flipped = np.array([True, True, False, False])
    # Suspicion -trust: flipped {-0.2, -0.6} vs clean {-0.5, -0.9}: 3 of 4 pairs.
    auroc = detection_auroc(trust, flipped)
    assert isinstance(auroc, float)
    assert auroc == pytest.approx(3 / 4)
    assert detection_metrics(trust, flipped, trust < 0.55)["auroc"] == pytest.approx(auroc)
    # Integer 0/1 ground truth is accepted as well as bool.
    assert detection_auroc(trust, flipped.astype(int)) == pytest.approx(3 / 4)


# --------------------------------------------------------------------------- correction


def test_correction_hand_example() -> None:
    observed = np.array([0, 1, 1, 2, 0])
    corrected = np.array([0, 2, 1, 0, 1])
    true = np.array([0, 2, 1, 2, 0])
    m = correction_metrics(observed, corrected, true)
    _json_ready(m)
    assert m["n_changed"] == 3
    assert isinstance(m["n_changed"], int)
    assert m["correction_accuracy"] == pytest.approx(1 / 3)  # only index 1 fixed
    assert m["label_accuracy_before"] == pytest.approx(4 / 5)
    assert m["label_accuracy_after"] == pytest.approx(3 / 5)


def test_correction_nothing_changed() -> None:
    observed = np.array([0, 1, 1, 0])
    true = np.array([0, 1, 0, 0])
    m = correction_metrics(observed, observed.copy(), true)
    _json_ready(m)
    assert m["n_changed"] == 0
    assert m["correction_accuracy"] is None
    assert m["label_accuracy_before"] == m["label_accuracy_after"] == pytest.approx(3 / 4)
