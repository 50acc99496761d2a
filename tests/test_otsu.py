from __future__ import annotations

import numpy as np
import pytest

from noisescore.ml.otsu import otsu_threshold


def brute_force_split(values: np.ndarray, bins: int) -> float:
    """Try every histogram cut; return the upper edge of the best lower class."""
    counts, edges = np.histogram(values, bins=bins, range=(values.min(), values.max()))
    centres = (edges[:-1] + edges[1:]) / 2
    best, best_k = -1.0, 0
    for k in range(1, bins):
        w0, w1 = counts[:k].sum(), counts[k:].sum()
        if w0 == 0 or w1 == 0:
            continue
        m0 = (counts[:k] * centres[:k]).sum() / w0
        m1 = (counts[k:] * centres[k:]).sum() / w1
        between = w0 * w1 * (m0 - m1) ** 2
        if between > best:
            best, best_k = between, k
    return float(edges[best_k])


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_on_bimodal_data(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = np.clip(
        np.concatenate([rng.normal(0.15, 0.08, 300), rng.normal(0.85, 0.05, 900)]), 0, 1
    )
    threshold = otsu_threshold(values)
    assert threshold == pytest.approx(brute_force_split(values, 256))
    assert 0.3 < threshold < 0.75
    low = values < threshold
    assert abs(low.sum() - 300) < 15


def test_agrees_with_two_point_mass() -> None:
    values = np.array([0.0] * 30 + [1.0] * 70)
    threshold = otsu_threshold(values)
    assert 0.0 < threshold <= 1.0
    assert (values < threshold).sum() == 30


def test_constant_values_flag_nobody() -> None:
    values = np.full(10, 0.7)
    assert not (values < otsu_threshold(values)).any()


@pytest.mark.parametrize("bad", [np.array([]), np.array([0.1, np.nan])])
def test_rejects_bad_input(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        otsu_threshold(bad)
