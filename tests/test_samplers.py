"""Active-learning samplers (noisescore.ml.samplers) on tiny hand-made fixtures."""

from __future__ import annotations

import numpy as np
import pytest

from noisescore.ml.samplers import (
    SAMPLER_NAMES,
    SAMPLERS,
    CoresetSampler,
    SamplerError,
    Selection,
    create_sampler,
    prediction_entropy,
)


def _empty(d: int) -> np.ndarray:
    return np.empty((0, d), dtype=np.float32)


def test_registry_matches_names() -> None:
    assert tuple(sorted(SAMPLERS)) == SAMPLER_NAMES == ("coreset", "entropy", "random")
    for name in SAMPLER_NAMES:
        assert create_sampler(name).name == name


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(SamplerError, match=r"unknown sampler 'badge'.*coreset, entropy, random"):
        create_sampler("badge")


# --------------------------------------------------------------------------- entropy


def test_entropy_orders_by_entropy_ties_by_index() -> None:
    proba = np.array(
        [
            [1.0, 0.0, 0.0],  # H = 0
            [1 / 3, 1 / 3, 1 / 3],  # H = log 3 (maximum)
            [0.5, 0.5, 0.0],  # H = log 2
            [0.8, 0.1, 0.1],
            [0.0, 0.5, 0.5],  # H = log 2, same as index 32 below
        ]
    )
    candidates = np.array([40, 10, 32, 7, 5])  # not sorted: ties go to the smaller index
    sel = create_sampler("entropy").select(candidates=candidates, budget=5, proba=proba)
    assert sel.indices.tolist() == [10, 5, 32, 7, 40]
    h_08 = -(0.8 * np.log(0.8) + 2 * 0.1 * np.log(0.1))
    np.testing.assert_allclose(sel.scores, [np.log(3), np.log(2), np.log(2), h_08, 0.0])
    np.testing.assert_allclose(prediction_entropy(proba)[[1, 2, 0]], [np.log(3), np.log(2), 0])

    top2 = create_sampler("entropy").select(candidates=candidates, budget=2, proba=proba)
    assert top2.indices.tolist() == [10, 5]


# --------------------------------------------------------------------------- random


def test_random_is_seeded_without_replacement() -> None:
    candidates = np.arange(100, 150)
    sampler = create_sampler("random")
    a = sampler.select(candidates=candidates, budget=30, seed=3)
    b = sampler.select(candidates=candidates, budget=30, seed=3)
    c = sampler.select(candidates=candidates, budget=30, seed=4)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.indices.tolist() != c.indices.tolist()
    assert len(set(a.indices.tolist())) == 30 and set(a.indices) <= set(candidates)
    assert np.all(np.diff(a.scores) <= 0) and np.all((a.scores >= 0) & (a.scores < 1))
    # the same pool in another order: the same selection
    shuffled = np.random.default_rng(0).permutation(candidates)
    np.testing.assert_array_equal(
        sampler.select(candidates=shuffled, budget=30, seed=3).indices, a.indices
    )
    # the whole pool: a permutation of it
    whole = sampler.select(candidates=candidates, budget=50, seed=3)
    assert sorted(whole.indices.tolist()) == candidates.tolist()


def test_random_is_roughly_uniform() -> None:
    hits = np.zeros(10)
    sampler = create_sampler("random")
    for seed in range(2000):
        hits[sampler.select(candidates=np.arange(10), budget=1, seed=seed).indices] += 1
    assert hits.min() > 150 and hits.max() < 250  # expected 200 each


# --------------------------------------------------------------------------- coreset


def test_coreset_picks_farthest_first() -> None:
    features = np.array([[0, 0], [1, 0], [0, 1], [6, 8], [-1, -1]], dtype=np.float32)
    labelled = np.array([[0, 0]], dtype=np.float32)
    sel = create_sampler("coreset").select(
        candidates=np.arange(5), budget=5, features=features, labelled_features=labelled
    )
    # (6, 8) is 10 from the labelled origin; then the others are 1 or sqrt(2) from it;
    # candidate 0 is the labelled point itself: distance 0, last.
    assert sel.indices.tolist() == [3, 4, 1, 2, 0]
    np.testing.assert_allclose(sel.scores, [10, np.sqrt(2), 1, 1, 0], atol=1e-6)


def test_coreset_without_labelled_starts_farthest_from_mean() -> None:
    features = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [4, 4]], dtype=np.float32)
    sel = create_sampler("coreset").select(
        candidates=np.arange(5), budget=2, features=features, labelled_features=_empty(2)
    )
    mean = features.mean(axis=0)
    assert sel.indices.tolist() == [4, 0]  # then the point farthest from (4, 4)
    np.testing.assert_allclose(
        sel.scores, [np.linalg.norm(features[4] - mean), np.sqrt(32)], rtol=1e-6
    )


def test_coreset_covered_points_come_after_farther_ones() -> None:
    # candidates 0-2 and 6 duplicate labelled points (distance 0); 3-5 are far away and
    # close to one another: every uncovered point comes before every covered one
    labelled = np.array([[0, 0], [1, 1], [2, 2]], dtype=np.float32)
    features = np.array(
        [[0, 0], [1, 1], [2, 2], [10, 10], [10, 11], [11, 10], [0, 0]], dtype=np.float32
    )
    sel = create_sampler("coreset").select(
        candidates=np.arange(7), budget=7, features=features, labelled_features=labelled
    )
    assert set(sel.indices[:3].tolist()) == {3, 4, 5}
    assert set(sel.indices[3:].tolist()) == {0, 1, 2, 6}
    assert np.all(sel.scores[:3] >= 1 - 1e-6) and np.allclose(sel.scores[3:], 0, atol=1e-6)
    assert np.all(np.diff(sel.scores) <= 1e-9)


def _brute_force_k_center(
    features: np.ndarray, labelled: np.ndarray, budget: int
) -> tuple[list[int], list[float]]:
    """O(n^3) k-center greedy in float64, straight from the definition."""
    x = features.astype(np.float64)
    covered = [row for row in labelled.astype(np.float64)]
    picked: list[int] = []
    scores: list[float] = []
    for _ in range(budget):
        best, best_d = -1, -1.0
        for i in range(len(x)):
            if i in picked:
                continue
            if covered:
                d = min(float(np.linalg.norm(x[i] - c)) for c in covered)
            else:
                d = float(np.linalg.norm(x[i] - x.mean(axis=0)))
            if d > best_d:
                best, best_d = i, d
        picked.append(best)
        scores.append(best_d)
        covered.append(x[best])
    return picked, scores


@pytest.mark.parametrize("n_labelled", [0, 1, 37])
def test_coreset_matches_brute_force(n_labelled: int) -> None:
    rng = np.random.default_rng(n_labelled)
    features = rng.normal(size=(60, 5)).astype(np.float32) + 3.0  # off-centre, like ReLU features
    labelled = rng.normal(size=(n_labelled, 5)).astype(np.float32) + 3.0
    expected, expected_scores = _brute_force_k_center(features, labelled, 25)
    for sampler in (CoresetSampler(), CoresetSampler(chunk_values=7)):  # 1-row chunks too
        sel = sampler.select(
            candidates=np.arange(60), budget=25, features=features, labelled_features=labelled
        )
        assert sel.indices.tolist() == expected
        np.testing.assert_allclose(sel.scores, expected_scores, rtol=1e-4, atol=1e-4)


def test_coreset_rejects_bad_chunk() -> None:
    with pytest.raises(SamplerError, match="chunk_values"):
        create_sampler("coreset", chunk_values=0)


# --------------------------------------------------------------------------- boundary


@pytest.mark.parametrize("name", ["random", "entropy", "coreset"])
def test_budget_larger_than_pool_and_zero(name: str) -> None:
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(4), size=6)
    features = rng.normal(size=(6, 3)).astype(np.float32)
    kw = dict(proba=proba, features=features, labelled_features=_empty(3), seed=1)
    sampler = create_sampler(name)
    sel = sampler.select(candidates=np.arange(20, 26), budget=100, **kw)
    assert isinstance(sel, Selection) and len(sel) == 6
    assert sorted(sel.indices.tolist()) == list(range(20, 26))
    assert sel.indices.dtype == np.int64 and sel.scores.dtype == np.float64
    assert len(sampler.select(candidates=np.arange(20, 26), budget=0, **kw)) == 0
    empty_pool = sampler.select(
        candidates=np.empty(0, np.int64),
        budget=5,
        proba=np.empty((0, 4)),
        features=_empty(3),
        labelled_features=_empty(3),
    )
    assert len(empty_pool) == 0


def test_bad_inputs_give_clear_errors() -> None:
    cand = np.arange(4)
    proba = np.full((4, 2), 0.5)
    feats = np.zeros((4, 3), np.float32)
    entropy, coreset = create_sampler("entropy"), create_sampler("coreset")
    with pytest.raises(SamplerError, match=r"budget must be an integer >= 0"):
        entropy.select(candidates=cand, budget=-1, proba=proba)
    with pytest.raises(SamplerError, match=r"candidates must be an integer array"):
        entropy.select(candidates=cand.astype(float), budget=1, proba=proba)
    with pytest.raises(SamplerError, match=r"candidates must be distinct"):
        entropy.select(candidates=np.array([1, 1, 2, 3]), budget=1, proba=proba)
    with pytest.raises(SamplerError, match=r"proba must be a real array of shape \(M, C\) = \(4"):
        entropy.select(candidates=cand, budget=1, proba=proba[:3])
    with pytest.raises(SamplerError, match=r"needs proba"):
        entropy.select(candidates=cand, budget=1)
    with pytest.raises(SamplerError, match=r"rows must sum to 1"):
        entropy.select(candidates=cand, budget=1, proba=proba * 3)
    bad = proba.copy()
    bad[2, 0] = np.nan
    with pytest.raises(SamplerError, match=r"proba holds non-finite"):
        entropy.select(candidates=cand, budget=1, proba=bad)
    with pytest.raises(SamplerError, match=r"needs features"):
        coreset.select(candidates=cand, budget=1, features=feats)
    with pytest.raises(SamplerError, match=r"features must have one row per candidate"):
        coreset.select(candidates=cand, budget=1, features=feats[:2], labelled_features=_empty(3))
    with pytest.raises(SamplerError, match=r"labelled_features must have the feature dimension"):
        coreset.select(candidates=cand, budget=1, features=feats, labelled_features=_empty(2))
    inf = feats.copy()
    inf[0, 0] = np.inf
    with pytest.raises(SamplerError, match=r"features holds non-finite"):
        coreset.select(candidates=cand, budget=1, features=inf, labelled_features=_empty(3))
    with pytest.raises(SamplerError, match=r"seed must be an integer >= 0"):
        create_sampler("random").select(candidates=cand, budget=1, seed=-2)
