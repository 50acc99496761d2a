"""Tests for noisescore.ml.noise: label-noise injection kinds, specs and validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from noisescore.ml.noise import (
    NOISE_KINDS,
    NoiseResult,
    NoiseSpec,
    NoiseSpecError,
    _sample_from_rows,
    inject_noise,
    load_transition_matrix,
    parse_noise_spec,
    register_noise,
)

N = 20_000
TOL = 0.02


def _labels(n: int, n_classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_classes, size=n)


def _images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 6, 6, 3), dtype=np.uint8)


def _truncnorm_mean(p: float, std: float = 0.1) -> float:
    """Expected flip rate of instance noise: mean of N(p, std) truncated to [0, 1]."""
    return float(stats.truncnorm((0 - p) / std, (1 - p) / std, loc=p, scale=std).mean())


def _empirical_transition(labels: np.ndarray, noisy: np.ndarray, n_classes: int) -> np.ndarray:
    counts = np.bincount(labels * n_classes + noisy, minlength=n_classes**2).astype(float)
    counts = counts.reshape(n_classes, n_classes)
    return counts / counts.sum(axis=1, keepdims=True)


def _check_result(result: NoiseResult, labels: np.ndarray, n_classes: int) -> None:
    assert isinstance(result, NoiseResult)
    assert result.noisy_labels.dtype == np.int64
    assert result.noisy_labels.shape == labels.shape
    assert result.flipped.dtype == np.bool_
    np.testing.assert_array_equal(result.flipped, result.noisy_labels != labels)
    assert result.realised_rate == pytest.approx(result.flipped.mean())
    assert result.noisy_labels.min() >= 0
    assert result.noisy_labels.max() < n_classes
    assert result.transition.dtype == np.float64
    assert result.transition.shape == (n_classes, n_classes)
    assert (result.transition >= 0).all()
    np.testing.assert_allclose(result.transition.sum(axis=1), 1.0, atol=1e-9)


@pytest.fixture
def matrix_file(tmp_path: Path) -> Path:
    path = tmp_path / "T.npy"
    np.save(path, np.array([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]))
    return path


# ---------------------------------------------------------------------------- flip rates


@pytest.mark.parametrize("n_classes", [2, 8])
@pytest.mark.parametrize("p", [0.1, 0.4])
@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("symmetric", lambda p, c: p),
        ("uniform", lambda p, c: p * (c - 1) / c),
        ("pairflip", lambda p, c: p),
        ("instance", lambda p, c: _truncnorm_mean(p)),
    ],
)
def test_flip_rate_matches_expected(kind, expected, p: float, n_classes: int) -> None:
    labels = _labels(N, n_classes)
    result = inject_noise(labels, f"{kind}:{p}", n_classes=n_classes, seed=3, images=_images(N))
    _check_result(result, labels, n_classes)
    assert abs(result.realised_rate - expected(p, n_classes)) < TOL


@pytest.mark.parametrize("kind", ["symmetric", "uniform", "pairflip", "instance"])
def test_rate_zero_leaves_labels_unchanged(kind: str) -> None:
    labels = _labels(1000, 5)
    result = inject_noise(labels, f"{kind}:0", n_classes=5, seed=1, images=_images(1000))
    np.testing.assert_array_equal(result.noisy_labels, labels)
    assert not result.flipped.any()
    assert result.realised_rate == 0.0
    np.testing.assert_array_equal(result.transition, np.eye(5))


def test_symmetric_flips_go_uniformly_to_other_classes() -> None:
    c, p = 8, 0.4
    labels = _labels(N, c)
    result = inject_noise(labels, NoiseSpec("symmetric", p, None), n_classes=c, seed=5)
    flipped = result.flipped
    assert (result.noisy_labels[flipped] != labels[flipped]).all()
    # Offset of the new class from the old one, 1..C-1: uniform over the other classes.
    offsets = (result.noisy_labels[flipped] - labels[flipped]) % c
    shares = np.bincount(offsets, minlength=c)[1:] / flipped.sum()
    np.testing.assert_allclose(shares, 1 / (c - 1), atol=TOL)
    emp = _empirical_transition(labels, result.noisy_labels, c)
    assert np.abs(emp - emp * np.eye(c) - (1 - np.eye(c)) * p / (c - 1)).max() < TOL


def test_symmetric_full_rate_always_flips() -> None:
    labels = _labels(5000, 3)
    result = inject_noise(labels, "symmetric:1", n_classes=3, seed=0)
    assert result.flipped.all()


def test_pairflip_only_goes_to_next_class() -> None:
    c = 8
    labels = _labels(N, c)
    result = inject_noise(labels, "pairflip:0.3", n_classes=c, seed=2)
    flipped = result.flipped
    np.testing.assert_array_equal(result.noisy_labels[flipped], (labels[flipped] + 1) % c)


def test_uniform_may_keep_own_class() -> None:
    c = 4
    labels = _labels(N, c)
    result = inject_noise(labels, "uniform:1.0", n_classes=c, seed=2)
    assert abs(result.realised_rate - 0.75) < TOL
    np.testing.assert_allclose(result.transition, np.full((c, c), 0.25))


@pytest.mark.parametrize("kind", ["symmetric", "uniform", "pairflip"])
@pytest.mark.parametrize("n_classes", [2, 8])
def test_empirical_transition_matches_class_level_matrix(kind: str, n_classes: int) -> None:
    labels = _labels(40_000, n_classes)
    result = inject_noise(labels, f"{kind}:0.35", n_classes=n_classes, seed=11)
    _check_result(result, labels, n_classes)
    emp = _empirical_transition(labels, result.noisy_labels, n_classes)
    np.testing.assert_allclose(emp, result.transition, atol=0.03)


def test_closed_form_transitions() -> None:
    p, c = 0.3, 4
    labels = _labels(100, c)
    sym = inject_noise(labels, "symmetric:0.3", n_classes=c, seed=0).transition
    np.testing.assert_allclose(np.diag(sym), 1 - p)
    np.testing.assert_allclose(sym[0, 1:], p / (c - 1))
    uni = inject_noise(labels, "uniform:0.3", n_classes=c, seed=0).transition
    np.testing.assert_allclose(uni, (1 - p) * np.eye(c) + p / c)
    pair = inject_noise(labels, "pairflip:0.3", n_classes=c, seed=0).transition
    expected = (1 - p) * np.eye(c)
    expected[np.arange(c), (np.arange(c) + 1) % c] = p
    np.testing.assert_allclose(pair, expected)


# ---------------------------------------------------------------------------- instance noise


def test_instance_noise_rate_and_transition() -> None:
    c = 5
    labels = _labels(N, c)
    result = inject_noise(labels, "instance:0.3", n_classes=c, seed=4, images=_images(N))
    _check_result(result, labels, c)
    assert abs(result.realised_rate - 0.3) < TOL
    # Flips always leave the true class; the expected matrix matches the empirical one.
    np.testing.assert_allclose(np.diag(result.transition), 0.7, atol=TOL)
    emp = _empirical_transition(labels, result.noisy_labels, c)
    np.testing.assert_allclose(emp, result.transition, atol=0.03)


def test_instance_noise_is_reproducible_and_seed_dependent() -> None:
    labels = _labels(4000, 6)
    images = _images(4000)
    a = inject_noise(labels, "instance:0.4", n_classes=6, seed=1, images=images)
    b = inject_noise(labels, "instance:0.4", n_classes=6, seed=1, images=images)
    other = inject_noise(labels, "instance:0.4", n_classes=6, seed=2, images=images)
    np.testing.assert_array_equal(a.noisy_labels, b.noisy_labels)
    np.testing.assert_array_equal(a.transition, b.transition)
    assert (a.flipped != other.flipped).any()


def test_instance_noise_depends_on_the_image() -> None:
    # All samples are class 0; half show pattern u, half pattern v. Where flipped labels go
    # is decided by the image, so the two halves get different noisy-label distributions.
    c, n = 4, 8000
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal(48), rng.standard_normal(48)
    images = np.where(np.arange(n)[:, None] < n // 2, u, v) + 0.01 * rng.standard_normal((n, 48))
    labels = np.zeros(n, dtype=np.int64)
    result = inject_noise(labels, "instance:0.5", n_classes=c, seed=7, images=images)
    halves = result.noisy_labels[: n // 2], result.noisy_labels[n // 2 :]
    dist = [np.bincount(h[h != 0], minlength=c)[1:] / (h != 0).sum() for h in halves]
    assert 0.5 * np.abs(dist[0] - dist[1]).sum() > 0.1


def test_instance_noise_handles_zero_images_and_one_class_missing() -> None:
    labels = np.array([0, 1, 1, 0, 1], dtype=np.int64)
    images = np.zeros((5, 2, 2))
    result = inject_noise(labels, "instance:0.9", n_classes=3, seed=0, images=images)
    _check_result(result, labels, 3)
    np.testing.assert_array_equal(result.transition[2], [0.0, 0.0, 1.0])


# ---------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("spec", ["symmetric:0.3", "uniform:0.3", "pairflip:0.3", "instance:0.3"])
def test_reproducible_by_seed(spec: str) -> None:
    labels = _labels(3000, 4)
    images = _images(3000)
    a = inject_noise(labels, spec, n_classes=4, seed=123, images=images)
    b = inject_noise(labels, spec, n_classes=4, seed=123, images=images)
    c = inject_noise(labels, spec, n_classes=4, seed=124, images=images)
    np.testing.assert_array_equal(a.noisy_labels, b.noisy_labels)
    assert (a.noisy_labels != c.noisy_labels).any()
    assert a.seed == 123
    assert a.spec == parse_noise_spec(spec)


def test_input_labels_are_not_modified() -> None:
    labels = _labels(1000, 3).astype(np.int32)
    before = labels.copy()
    result = inject_noise(labels, "symmetric:0.5", n_classes=3, seed=0)
    np.testing.assert_array_equal(labels, before)
    assert result.noisy_labels.dtype == np.int64


def test_sample_from_rows_never_draws_zero_probability() -> None:
    rows = np.array([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]] * 5000)
    draws = _sample_from_rows(rows, np.random.default_rng(0))
    assert (draws[0::2] == 1).all()
    assert set(np.unique(draws[1::2])) == {0, 2}


# ---------------------------------------------------------------------------- asymmetric


def _write_matrix(path: Path, matrix: np.ndarray) -> Path:
    if path.suffix == ".npy":
        np.save(path, matrix)
    elif path.suffix == ".csv":
        np.savetxt(path, matrix, delimiter=",")
    else:
        path.write_text(json.dumps(np.asarray(matrix).tolist()))
    return path


@pytest.mark.parametrize("suffix", [".npy", ".csv", ".json"])
def test_asymmetric_from_file(tmp_path: Path, suffix: str) -> None:
    matrix = np.array([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    path = _write_matrix(tmp_path / f"T{suffix}", matrix)
    labels = _labels(30_000, 3)
    result = inject_noise(labels, f"asymmetric:{path}", n_classes=3, seed=0)
    _check_result(result, labels, 3)
    np.testing.assert_allclose(result.transition, matrix)
    emp = _empirical_transition(labels, result.noisy_labels, 3)
    np.testing.assert_allclose(emp, matrix, atol=TOL)
    assert (result.noisy_labels[labels == 1] == 1).all()
    expected_rate = np.mean(1 - np.diag(matrix)[labels])
    assert abs(result.realised_rate - expected_rate) < TOL


def test_asymmetric_spec_object(matrix_file: Path) -> None:
    spec = NoiseSpec("asymmetric", None, str(matrix_file))
    result = inject_noise(np.array([0, 1, 2]), spec, n_classes=3, seed=0)
    assert result.spec == spec


@pytest.mark.parametrize(
    ("matrix", "match"),
    [
        (np.eye(2), r"shape \(3, 3\)"),
        (np.array([[1.2, -0.2, 0.0], [0, 1, 0], [0, 0, 1]]), "non-negative"),
        (np.array([[1.0, 0, 0], [0.5, 0.6, 0], [0, 0, 1]]), r"row 1 sums to 1\.1"),
        (np.array([[np.nan, 1, 0], [0, 1, 0], [0, 0, 1]]), "non-finite"),
    ],
)
def test_asymmetric_invalid_matrix(tmp_path: Path, matrix: np.ndarray, match: str) -> None:
    path = _write_matrix(tmp_path / "T.npy", matrix)
    with pytest.raises(NoiseSpecError, match=match):
        inject_noise(np.array([0, 1, 2]), f"asymmetric:{path}", n_classes=3, seed=0)


def test_asymmetric_row_sum_within_tolerance_is_accepted(tmp_path: Path) -> None:
    path = _write_matrix(tmp_path / "T.csv", np.array([[0.5, 0.5 + 1e-9], [0.25, 0.75]]))
    assert load_transition_matrix(path, n_classes=2).shape == (2, 2)


def test_asymmetric_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NoiseSpecError, match="not found"):
        inject_noise(np.array([0, 1]), f"asymmetric:{tmp_path / 'nope.npy'}", n_classes=2, seed=0)


def test_asymmetric_bad_suffix_and_unreadable(tmp_path: Path) -> None:
    txt = tmp_path / "T.txt"
    txt.write_text("1,0\n0,1\n")
    with pytest.raises(NoiseSpecError, match=r"\.npy, \.csv, \.json"):
        load_transition_matrix(txt, n_classes=2)
    bad = tmp_path / "T.json"
    bad.write_text("{not json")
    with pytest.raises(NoiseSpecError, match="could not read"):
        load_transition_matrix(bad, n_classes=2)


# ---------------------------------------------------------------------------- spec parsing


@pytest.mark.parametrize(
    "text",
    ["symmetric:0.2", "uniform:0.5", "pairflip:0.1", "instance:0.3", "asymmetric:/x/T.npy"],
)
def test_spec_str_round_trips(text: str) -> None:
    spec = parse_noise_spec(text)
    assert str(spec) == text
    assert parse_noise_spec(str(spec)) == spec


def test_parse_fields_and_normalisation() -> None:
    assert parse_noise_spec("symmetric:0.2") == NoiseSpec("symmetric", 0.2, None)
    assert parse_noise_spec(" Pairflip : 1 ") == NoiseSpec("pairflip", 1.0, None)
    assert parse_noise_spec("asymmetric:C:/data/T.csv").path == "C:/data/T.csv"
    spec = parse_noise_spec("uniform:0")
    assert parse_noise_spec(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("gaussian:0.2", "valid kinds: asymmetric, instance, pairflip, symmetric, uniform"),
        ("symmetric", "KIND:RATE"),
        ("symmetric:", "missing the rate"),
        ("symmetric:abc", r"float in \[0, 1\].*'abc'"),
        ("symmetric:1.5", r"float in \[0, 1\]"),
        ("symmetric:-0.1", r"float in \[0, 1\]"),
        ("symmetric:nan", r"float in \[0, 1\]"),
        ("asymmetric:", "missing the file"),
    ],
)
def test_parse_errors(text: str, match: str) -> None:
    with pytest.raises(NoiseSpecError, match=match):
        parse_noise_spec(text)


def test_noise_spec_error_is_value_error() -> None:
    assert issubclass(NoiseSpecError, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "nope", "rate": 0.1}, "valid kinds"),
        ({"kind": "symmetric"}, "needs a rate"),
        ({"kind": "symmetric", "rate": 2.0}, r"\[0, 1\]"),
        ({"kind": "symmetric", "rate": 0.1, "path": "x.npy"}, "not a path"),
        ({"kind": "asymmetric", "rate": 0.1, "path": "x.npy"}, "not a rate"),
        ({"kind": "asymmetric"}, "file path"),
    ],
)
def test_noise_spec_validates_on_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(NoiseSpecError, match=match):
        NoiseSpec(**kwargs)


# ---------------------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.array([0, 1, 3]), r"\[0, 3\)"),
        (np.array([0, -1, 2]), r"\[0, 3\)"),
        (np.array([[0, 1], [1, 0]]), "1-D"),
        (np.array([0.0, 1.0]), "integers"),
    ],
)
def test_invalid_labels(labels: np.ndarray, match: str) -> None:
    with pytest.raises(NoiseSpecError, match=match):
        inject_noise(labels, "symmetric:0.1", n_classes=3, seed=0)


def test_invalid_n_classes_and_seed() -> None:
    with pytest.raises(NoiseSpecError, match="n_classes must be >= 2"):
        inject_noise(np.array([0, 0]), "symmetric:0.1", n_classes=1, seed=0)
    with pytest.raises(NoiseSpecError, match="seed"):
        inject_noise(np.array([0, 1]), "symmetric:0.1", n_classes=2, seed=-1)


def test_instance_requires_images() -> None:
    with pytest.raises(NoiseSpecError, match="needs images"):
        inject_noise(np.array([0, 1]), "instance:0.2", n_classes=2, seed=0)


def test_images_length_mismatch() -> None:
    with pytest.raises(NoiseSpecError, match="N = len"):
        inject_noise(np.array([0, 1, 0]), "instance:0.2", n_classes=2, seed=0, images=_images(2))


def test_empty_labels() -> None:
    empty = np.array([], dtype=np.int64)
    result = inject_noise(empty, "symmetric:0.3", n_classes=3, seed=0)
    assert result.noisy_labels.shape == (0,)
    assert result.realised_rate == 0.0


# ---------------------------------------------------------------------------- registry


def test_registry_lists_kinds_and_can_be_extended() -> None:
    assert {"symmetric", "uniform", "pairflip", "instance", "asymmetric"} <= set(NOISE_KINDS)

    @register_noise("test-reverse")
    def _reverse(labels, spec, *, n_classes, rng, images):
        transition = np.eye(n_classes)[::-1].copy()
        return n_classes - 1 - labels, transition

    try:
        result = inject_noise(np.array([0, 1, 2]), "test-reverse:0.5", n_classes=3, seed=0)
        np.testing.assert_array_equal(result.noisy_labels, [2, 1, 0])
        with pytest.raises(NoiseSpecError, match="already registered"):
            register_noise("test-reverse")(_reverse)
    finally:
        NOISE_KINDS.pop("test-reverse", None)
    with pytest.raises(NoiseSpecError, match="unknown noise kind"):
        parse_noise_spec("test-reverse:0.5")
