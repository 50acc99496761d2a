"""Metrics: test performance, detection of flipped labels by a trust score, correction.

Plain arrays in, plain dicts of floats out (JSON-ready). A metric that is undefined for
the inputs (e.g. AUROC with one class present) is ``None``, never a made-up number.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)


def classification_metrics(labels: np.ndarray, proba: np.ndarray) -> dict[str, float | None]:
    """Accuracy, macro-F1, balanced accuracy and one-vs-rest AUROC.

    Parameters
    ----------
    labels : np.ndarray, shape (N,), int
        Reference labels.
    proba : np.ndarray, shape (N, C), float
        Predicted class probabilities (rows sum to 1).
    """
    labels = np.asarray(labels)
    proba = np.asarray(proba, dtype=np.float64)
    pred = proba.argmax(axis=1)
    n_classes = proba.shape[1]
    present = np.unique(labels)
    auroc: float | None
    if len(present) < 2:
        auroc = None
    elif n_classes == 2:
        auroc = float(roc_auc_score(labels, proba[:, 1]))
    else:
        # Renormalise over the classes present so sklearn's OvR accepts a subset.
        sub = proba[:, present] / proba[:, present].sum(axis=1, keepdims=True)
        if len(present) > 2:
            auroc = float(roc_auc_score(labels, sub, multi_class="ovr", labels=present))
        else:
            auroc = float(roc_auc_score(labels == present[1], sub[:, 1]))
    return {
        "accuracy": float((pred == labels).mean()),
        "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
        "auroc": auroc,
    }


def detection_metrics(
    trust: np.ndarray, flipped: np.ndarray, flagged: np.ndarray
) -> dict[str, float | None]:
    """How well a trust score finds the flipped labels.

    Parameters
    ----------
    trust : np.ndarray, shape (N,)
        Trust score, **low = likely mislabelled** (LiNC's alpha).
    flipped : np.ndarray, shape (N,), bool
        Ground truth: the observed label differs from the true label.
    flagged : np.ndarray, shape (N,), bool
        The method's decision (LiNC: ``trust < otsu_threshold``).

    Returns
    -------
    dict
        ``auroc`` and ``average_precision`` of ``-trust`` against ``flipped`` (``None``
        when all or none are flipped) and ``precision``/``recall``/``f1`` of ``flagged``.
    """
    flipped = np.asarray(flipped, dtype=bool)
    flagged = np.asarray(flagged, dtype=bool)
    auroc = detection_auroc(trust, flipped)
    precision, recall, f1, _ = precision_recall_fscore_support(
        flipped, flagged, average="binary", zero_division=0
    )
    return {
        "auroc": auroc,
        "average_precision": None
        if auroc is None
        else float(average_precision_score(flipped, -np.asarray(trust, dtype=np.float64))),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }


def detection_auroc(trust: np.ndarray, flipped: np.ndarray) -> float | None:
    """AUROC of ``-trust`` against ``flipped`` (``None`` if only one class is present)."""
    flipped = np.asarray(flipped, dtype=bool)
    if not 0 < flipped.sum() < len(flipped):
        return None
    return float(roc_auc_score(flipped, -np.asarray(trust, dtype=np.float64)))


def correction_metrics(
    observed: np.ndarray,
    corrected: np.ndarray,
    true: np.ndarray,
) -> dict[str, float | int | None]:
    """Label quality of the training set before and after correction.

    ``correction_accuracy``: of the samples whose label was changed, the fraction that
    now carry the true label (``None`` when nothing was changed).
    """
    observed, corrected, true = (np.asarray(a) for a in (observed, corrected, true))
    changed = corrected != observed
    return {
        "n_changed": int(changed.sum()),
        "correction_accuracy": float((corrected[changed] == true[changed]).mean())
        if changed.any()
        else None,
        "label_accuracy_before": float((observed == true).mean()),
        "label_accuracy_after": float((corrected == true).mean()),
    }
