"""Otsu's threshold on a 1-D sample of scores (LiNC splits the trust histogram with it)."""

from __future__ import annotations

import numpy as np


def otsu_threshold(values: np.ndarray, *, bins: int = 256) -> float:
    """Otsu's threshold: the cut that maximises the between-class variance of a histogram.

    Parameters
    ----------
    values : np.ndarray, shape (N,)
        Finite scores, e.g. LiNC trust values in [0, 1].
    bins : int, keyword-only
        Number of equal-width histogram bins over ``[values.min(), values.max()]``.

    Returns
    -------
    float
        The threshold ``t``: samples with ``values < t`` form the low class. When every
        value is the same there is nothing to split and the common value is returned,
        so ``values < t`` flags nobody.

    Notes
    -----
    The histogram split is the one of ``skimage.filters.threshold_otsu``; we return the
    upper edge of the last bin of the lower class (skimage returns its centre), so that
    ``values < t`` is exactly the lower class of the histogram split.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("otsu_threshold needs at least one value")
    if not np.all(np.isfinite(values)):
        raise ValueError("otsu_threshold got NaN or infinite values")
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return lo
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)[:-1].astype(np.float64)
    weight_high = np.cumsum(counts[::-1])[::-1][1:].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_low = np.cumsum(counts * centres)[:-1] / weight_low
        mean_high = (np.cumsum((counts * centres)[::-1]) / np.cumsum(counts[::-1]))[::-1][1:]
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    between = np.nan_to_num(between, nan=-1.0)
    return float(edges[1:-1][int(np.argmax(between))])
