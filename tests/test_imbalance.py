"""Long-tailed subsets (noisescore.ml.imbalance): the profile, the draw, real BloodMNIST."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from noisescore.ml.data import Dataset, Split, load_dataset
from noisescore.ml.imbalance import (
    ImbalanceError,
    long_tailed,
    long_tailed_counts,
    long_tailed_indices,
)


def test_profile_on_hand_computed_counts() -> None:
    # C = 3, r = 100: f = (1, 0.1, 0.01); the head class binds, N_0 = 500
    counts = long_tailed_counts(np.array([500, 400, 300]), ratio=100)
    assert counts.dtype == np.int64 and counts.tolist() == [500, 50, 5]
    # C = 5, r = 16: f = 16^(-c/4) = (1, 1/2, 1/4, 1/8, 1/16)
    sizes = long_tailed_counts(np.array([160, 100, 100, 100, 100]), ratio=16)
    assert sizes.tolist() == [160, 80, 40, 20, 10]
    # the tail binds: floor(N_0 / 100) <= 3 <=> N_0 < 400, so N_0 = 399 (not 300)
    assert long_tailed_counts(np.array([1000, 1000, 3]), ratio=100).tolist() == [399, 39, 3]
    # a middle class binds: floor(N_0 / 2) <= 10 <=> N_0 <= 21 (C = 3, r = 4)
    assert long_tailed_counts(np.array([1000, 10, 1000]), ratio=4).tolist() == [21, 10, 5]
    # at least 1 per class, even where the profile floors to 0
    assert long_tailed_counts(np.array([50, 50, 50]), ratio=1000).tolist() == [50, 1, 1]


def test_ratio_one_is_balanced() -> None:
    assert long_tailed_counts(np.array([7, 12, 9, 30]), ratio=1).tolist() == [7, 7, 7, 7]


@pytest.mark.parametrize("ratio", [0.5, 0.999, float("nan"), float("inf"), -3, True, "100"])
def test_bad_ratio(ratio: object) -> None:
    with pytest.raises(ImbalanceError, match="imbalance ratio must be"):
        long_tailed_counts(np.array([10, 10]), ratio=ratio)  # type: ignore[arg-type]


def test_bad_counts_and_labels() -> None:
    with pytest.raises(ImbalanceError, match=r"class\(es\) \[1\] have none"):
        long_tailed_counts(np.array([10, 0, 5]), ratio=10)
    with pytest.raises(ImbalanceError, match="C >= 2"):
        long_tailed_counts(np.array([10]), ratio=10)
    with pytest.raises(ImbalanceError, match=r"labels must lie in \[0, 2\)"):
        long_tailed_indices(np.array([0, 1, 2]), ratio=2, n_classes=2, seed=0)
    with pytest.raises(ImbalanceError, match=r"class\(es\) \[2\] have none"):
        long_tailed_indices(np.array([0, 1, 1]), ratio=2, n_classes=3, seed=0)


def test_indices_seeded_and_per_class() -> None:
    labels = np.repeat(np.arange(4), [40, 30, 50, 20])
    np.random.default_rng(0).shuffle(labels)
    a = long_tailed_indices(labels, ratio=8, n_classes=4, seed=5)
    b = long_tailed_indices(labels, ratio=8, n_classes=4, seed=5)
    c = long_tailed_indices(labels, ratio=8, n_classes=4, seed=6)
    np.testing.assert_array_equal(a, b)
    assert a.tolist() != c.tolist()
    assert np.all(np.diff(a) > 0)  # sorted, distinct
    expected = long_tailed_counts(np.bincount(labels), ratio=8)
    assert expected.tolist() == [40, 20, 10, 5]  # 8^(-c/3) = 1, 1/2, 1/4, 1/8
    np.testing.assert_array_equal(np.bincount(labels[a], minlength=4), expected)
    np.testing.assert_array_equal(np.bincount(labels[c], minlength=4), expected)


def _toy_dataset() -> Dataset:
    rng = np.random.default_rng(1)
    n = 60
    true = np.repeat(np.arange(3), [30, 20, 10])
    labels = true.copy()
    labels[::7] = (labels[::7] + 1) % 3  # some noisy labels: the profile follows the truth
    images = np.zeros((n, 1, 2, 2), np.uint8)
    images[:, 0, 0, 0] = np.arange(n)  # each image carries its own index
    ids = np.array([f"train/{i}" for i in range(n)], dtype=object)
    perm = rng.permutation(n)
    train = Split(
        images=images[perm], labels=labels[perm], true_labels=true[perm], sample_ids=ids[perm]
    )
    test = Split(images=images[:5], labels=true[:5], true_labels=None, sample_ids=ids[:5])
    return Dataset(name="toy", source="/toy", n_classes=3, train=train, val=None, test=test)


def test_long_tailed_dataset_keeps_splits_consistent() -> None:
    ds = _toy_dataset()
    sub, report = long_tailed(ds, ratio=4, seed=0)
    assert report == {
        "ratio": 4.0,
        "seed": 0,
        "counts_before": [30, 20, 10],
        "counts_after": [30, 15, 7],  # 4^(-c/2) = 1, 1/2, 1/4 -> 30, 15, 7.5
        "n_before": 60,
        "n_after": 52,
    }
    assert np.bincount(sub.train.true_labels, minlength=3).tolist() == [30, 15, 7]
    # every kept row is the same sample in every array: map back through the image marker
    original = ds.train
    pos = {int(v): i for i, v in enumerate(original.images[:, 0, 0, 0])}
    rows = np.array([pos[int(v)] for v in sub.train.images[:, 0, 0, 0]])
    assert np.all(np.diff(rows) > 0)  # original order kept
    np.testing.assert_array_equal(sub.train.labels, original.labels[rows])
    np.testing.assert_array_equal(sub.train.true_labels, original.true_labels[rows])
    np.testing.assert_array_equal(sub.train.sample_ids, original.sample_ids[rows])
    np.testing.assert_array_equal(sub.train.images, original.images[rows])
    assert sub.test is ds.test and sub.val is None
    assert (sub.name, sub.n_classes, sub.source) == (ds.name, ds.n_classes, ds.source)
    again, _ = long_tailed(ds, ratio=4, seed=0)
    np.testing.assert_array_equal(again.train.sample_ids, sub.train.sample_ids)


def test_bloodmnist_ratio_100(data_dir: Path) -> None:
    ds = load_dataset("bloodmnist", data_dir=data_dir)
    sub, report = long_tailed(ds, ratio=100, seed=0)
    before, after = report["counts_before"], report["counts_after"]
    assert before == np.bincount(ds.train.labels, minlength=8).tolist()
    assert after == np.bincount(sub.train.labels, minlength=8).tolist()
    assert report["n_after"] == len(sub.train) == sum(after)
    assert all(a <= b for a, b in zip(after, before, strict=True))
    # the head has N_0, the tail floor(N_0 / 100): the head/tail ratio is 100 up to that floor
    n0 = after[0]
    assert after[-1] == math.floor(n0 / 100)
    assert n0 / (after[-1] + 1) < 100 <= n0 / after[-1]
    assert max(after) == n0 and min(after) == after[-1]
    assert after == sorted(after, reverse=True)
    assert len(set(sub.train.sample_ids.tolist())) == len(sub.train)
    assert sub.test is ds.test and sub.val is ds.val
