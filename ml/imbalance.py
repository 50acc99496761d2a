"""Long-tailed subsets of a dataset's train split (``--imbalance r``).

The exponential profile of Cao et al. (LDAM, NeurIPS 2019), used by Khanal et al. (MICCAI
2024) for their long-tailed NCT-CRC-HE-100K: class ``c = 0..C-1``, in class-index order,
keeps

    N_c = floor(N_0 · r^(-c / (C - 1)))        (at least 1)

samples, so class 0 is the head, class ``C - 1`` the tail and ``N_0 / N_{C-1} ≈ r``
(the imbalance ratio, ``r >= 1``; ``r = 1`` keeps ``N_0`` of every class). ``N_0`` is the
largest integer for which every ``N_c`` fits in the samples class ``c`` has, so the
subset is drawn without replacement; in practice ``N_0`` is the head class's count unless
a later class is too small for its share. Which samples of a class are kept is a seeded
uniform draw.

A sample's class is its true label when the split has one (``true_labels``), else its
label: the subset is drawn before any noise is injected.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

from noisescore.ml.data import Dataset, Split

__all__ = [
    "ImbalanceError",
    "check_ratio",
    "long_tailed",
    "long_tailed_counts",
    "long_tailed_indices",
]


class ImbalanceError(ValueError):
    """An invalid imbalance ratio, class-count vector or label vector."""


def check_ratio(ratio: object) -> float:
    """Return ``ratio`` as a float, or raise :class:`ImbalanceError` unless finite and ``>= 1``."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise ImbalanceError(f"imbalance ratio must be a number >= 1, got {ratio!r}")
    value = float(ratio)
    if not math.isfinite(value) or value < 1.0:
        raise ImbalanceError(
            f"imbalance ratio must be finite and >= 1 (1 = balanced, 100 as in Khanal et al.); "
            f"got {ratio!r}"
        )
    return value


def _profile(n_classes: int, ratio: float) -> np.ndarray:
    """``r^(-c / (C - 1))`` for ``c = 0..C-1``, shape (C,) float64."""
    return ratio ** (-np.arange(n_classes, dtype=np.float64) / (n_classes - 1))


def long_tailed_counts(class_counts: np.ndarray, *, ratio: float) -> np.ndarray:
    """Per-class sizes of the long-tailed subset.

    Parameters
    ----------
    class_counts : np.ndarray, shape (C,), int
        Samples available per class, each ``>= 1``; ``C >= 2``.
    ratio : float
        Imbalance ratio ``r >= 1`` (finite).

    Returns
    -------
    np.ndarray, shape (C,), int64
        ``N_c = max(1, floor(N_0 · r^(-c / (C - 1))))`` with ``N_0`` the largest integer
        for which ``N_c <= class_counts[c]`` for every class.

    Raises
    ------
    ImbalanceError
        If ``ratio`` is not finite and ``>= 1``, or ``class_counts`` is not a vector of at
        least two positive integers.
    """
    r = check_ratio(ratio)
    counts = np.asarray(class_counts)
    if counts.ndim != 1 or counts.shape[0] < 2 or not np.issubdtype(counts.dtype, np.integer):
        raise ImbalanceError(
            f"class_counts must be an integer vector of shape (C,), C >= 2; "
            f"got {counts.dtype} {counts.shape}"
        )
    counts = counts.astype(np.int64)
    empty = np.flatnonzero(counts < 1)
    if empty.size:
        raise ImbalanceError(
            f"every class needs at least one sample for a long-tailed subset; "
            f"class(es) {empty.tolist()} have none"
        )
    profile = _profile(counts.shape[0], r)

    def sizes(n0: int) -> np.ndarray:
        return np.maximum(np.floor(n0 * profile).astype(np.int64), 1)

    def fits(n0: int) -> bool:
        return bool((sizes(n0) <= counts).all())

    # floor(N_0 f_c) <= n_c  <=>  N_0 < (n_c + 1) / f_c; the float estimate is then fixed
    # up against the exact test (class 0, f_0 = 1, bounds N_0 <= n_0).
    n0 = int(min(counts[0], np.floor(((counts + 1) / profile).min())))
    while n0 > 1 and not fits(n0):
        n0 -= 1
    while n0 < counts[0] and fits(n0 + 1):
        n0 += 1
    return sizes(n0)


def long_tailed_indices(
    labels: np.ndarray, *, ratio: float, n_classes: int, seed: int
) -> np.ndarray:
    """Indices of a long-tailed subset of ``labels``.

    Parameters
    ----------
    labels : np.ndarray, shape (N,), int
        Class of every sample, in ``[0, n_classes)``.
    ratio : float
        Imbalance ratio ``r >= 1``.
    n_classes : int
        ``C >= 2``; every class needs at least one sample.
    seed : int
        Seed of the within-class draw (same inputs and seed, same subset).

    Returns
    -------
    np.ndarray, shape (sum N_c,), int64
        Sorted indices into ``labels``; class ``c`` contributes ``N_c`` of its samples
        (:func:`long_tailed_counts`), drawn uniformly without replacement.

    Raises
    ------
    ImbalanceError
        On a bad ratio, labels out of range, or a class without samples.
    """
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ImbalanceError(f"labels must be an integer vector (N,); got {y.dtype} {y.shape}")
    if isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral) or n_classes < 2:
        raise ImbalanceError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ImbalanceError(f"seed must be an integer >= 0, got {seed!r}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ImbalanceError(
            f"labels must lie in [0, {n_classes}); found {int(y.min())}..{int(y.max())}"
        )
    counts = np.bincount(y.astype(np.int64), minlength=int(n_classes))
    keep = long_tailed_counts(counts, ratio=ratio)
    rng = np.random.default_rng(int(seed))
    chosen = [
        rng.choice(np.flatnonzero(y == c), size=int(keep[c]), replace=False)
        for c in range(int(n_classes))
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def long_tailed(dataset: Dataset, *, ratio: float, seed: int) -> tuple[Dataset, dict]:
    """The dataset with a long-tailed train split; val and test are unchanged.

    Parameters
    ----------
    dataset : Dataset
    ratio : float
        Imbalance ratio ``r >= 1``.
    seed : int
        Seed of the within-class draw.

    Returns
    -------
    Dataset
        A new dataset whose train split holds the subset: images, labels, true labels and
        sample ids taken with the same indices, in their original order.
    dict
        The report: ``{"ratio", "seed", "counts_before", "counts_after", "n_before",
        "n_after"}``, counts per class in class-index order (lists of int).

    Raises
    ------
    ImbalanceError
        On a bad ratio or seed, or a class without train samples.
    """
    train = dataset.train
    classes = train.true_labels if train.true_labels is not None else train.labels
    idx = long_tailed_indices(classes, ratio=ratio, n_classes=dataset.n_classes, seed=seed)
    subset = Split(
        images=train.images[idx],
        labels=train.labels[idx],
        true_labels=None if train.true_labels is None else train.true_labels[idx],
        sample_ids=train.sample_ids[idx],
    )
    report = {
        "ratio": check_ratio(ratio),
        "seed": int(seed),
        "counts_before": np.bincount(classes, minlength=dataset.n_classes).tolist(),
        "counts_after": np.bincount(classes[idx], minlength=dataset.n_classes).tolist(),
        "n_before": len(train),
        "n_after": len(subset),
    }
    return dataclasses.replace(dataset, train=subset), report
