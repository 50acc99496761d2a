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


def detection_ranking(score: np.ndarray, flipped: np.ndarray) -> dict[str, float | None]:
    """``auroc`` and ``average_precision`` of ``-score`` against ``flipped`` (low score =
    suspect); both ``None`` when all or none are flipped."""
    auroc = detection_auroc(score, flipped)
    if auroc is None:
        return {"auroc": None, "average_precision": None}
    flipped = np.asarray(flipped, dtype=bool)
    ap = float(average_precision_score(flipped, -np.asarray(score, dtype=np.float64)))
    return {"auroc": auroc, "average_precision": ap}


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


def suspect_cutoff(probabilities: np.ndarray, labels: np.ndarray, flagged: np.ndarray) -> float:
    """A job's calibrated cut-off on label quality, learned from LiNC's flags.

    LiNC flags training labels with its trust scores, which need the training run; at
    serving time only the model's probabilities are left. This finds the threshold ``c``
    on ``label_quality = p(given label)`` such that ``label_quality < c`` best reproduces
    LiNC's flags on the training set: the maximum F1 score of ``(label_quality < c)``
    against ``flagged`` over the candidates ``0``, ``1`` and the midpoints between
    consecutive distinct label qualities. Ties go to the smallest ``c`` (fewest flags).
    When the flags are exactly a set of lowest-quality labels the result reproduces
    them exactly. Deterministic: no randomness, no dependence on input order.

    Parameters
    ----------
    probabilities : numpy.ndarray
        float ``(N, K)`` probabilities of the job's exported model on its training images.
    labels : numpy.ndarray
        ``(N,)`` the given (noisy) training labels in ``[0, K)``.
    flagged : numpy.ndarray
        bool ``(N,)``, ``True`` where LiNC flagged the label as noisy.

    Returns
    -------
    float
        The cut-off ``c`` in ``[0, 1]`` to pass to :func:`score_labels`; ``0.0`` (nothing
        is ever suspect) when nothing is flagged.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probabilities must have shape (N, K), got {probs.shape}")
    n, k = probs.shape
    given = np.asarray(labels)
    if given.shape != (n,) or (given.size and not (given.min() >= 0 and given.max() < k)):
        raise ValueError(f"labels must be (N,) = ({n},) integers in [0, {k})")
    given = given.astype(np.int64)
    flags = np.asarray(flagged)
    if flags.shape != (n,):
        raise ValueError(f"flagged must have shape ({n},), got {flags.shape}")
    flags = flags.astype(bool)
    positives = int(flags.sum())
    if positives == 0:
        return 0.0
    quality = probs[np.arange(n), given]
    order = np.argsort(quality, kind="stable")
    sorted_quality = quality[order]
    distinct = np.unique(sorted_quality)
    candidates = np.unique(np.concatenate([[0.0, 1.0], (distinct[:-1] + distinct[1:]) / 2]))
    # For each c: predicted = #(q < c); true positives = flagged among those.
    predicted = np.searchsorted(sorted_quality, candidates, side="left")
    flagged_prefix = np.concatenate([[0], np.cumsum(flags[order])])
    true_pos = flagged_prefix[predicted]
    f1 = 2.0 * true_pos / (predicted + positives)
    return float(candidates[int(np.argmax(f1))])  # argmax: first = smallest c on ties
