"""Synthetic label-noise injection, as a registry of noise kinds.

A noise kind is one function registered with :func:`register_noise`; the public entry point
is :func:`inject_noise`, which takes a :class:`NoiseSpec` (or its text form, e.g.
``"symmetric:0.2"`` or ``"asymmetric:/data/T.npy"``) and returns a :class:`NoiseResult`.

Kinds
-----
``symmetric:p``
    With probability ``p`` move to a *different* class chosen uniformly.
    ``T = (1 - p) I + p / (C - 1) (1 - I)``; expected flip rate ``p``.
``uniform:p``
    With probability ``p`` resample uniformly over all classes (own class included).
    ``T = (1 - p) I + p / C``; expected flip rate ``p (C - 1) / C``.
``pairflip:p``
    Class ``i`` becomes ``(i + 1) mod C`` with probability ``p``.
``instance:p``
    Instance-dependent noise of Xia et al. 2020 ("Part-dependent label noise", NeurIPS 2020):
    per-sample flip rates ``q_i ~ TruncNormal(p, 0.1, [0, 1])`` and a random linear map of the
    (unit-norm, flattened) image decides where a flipped label goes. Needs ``images``.
    Expected flip rate is the truncated-normal mean: ``p`` away from the ends, pulled towards
    0.5 near 0 and 1 (about 0.129 for ``p = 0.1``).
``asymmetric:FILE``
    A user-supplied ``C x C`` row-stochastic transition matrix in a ``.npy``, ``.csv`` or
    ``.json`` file.

Adding a kind is one function decorated with ``@register_noise("name")``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

__all__ = [
    "NOISE_KINDS",
    "NoiseFn",
    "NoiseKind",
    "NoiseResult",
    "NoiseSpec",
    "NoiseSpecError",
    "inject_noise",
    "load_transition_matrix",
    "parse_noise_spec",
    "register_noise",
]

#: Tolerance on the row sums of a user-supplied transition matrix.
ROW_SUM_TOL: float = 1e-6
#: File types accepted for ``asymmetric:FILE``.
MATRIX_SUFFIXES: tuple[str, ...] = (".npy", ".csv", ".json")
#: Standard deviation of the per-sample flip rate in instance-dependent noise (Xia et al.).
INSTANCE_RATE_STD: float = 0.1
#: Approximate number of float64 feature values materialised at once for instance noise.
_INSTANCE_CHUNK_VALUES: int = 1 << 22


class NoiseSpecError(ValueError):
    """An invalid noise specification, transition matrix, or input to :func:`inject_noise`."""


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


class NoiseFn(Protocol):
    """Signature of a noise kind.

    Parameters
    ----------
    labels : np.ndarray of int64, shape (N,)
        Validated true labels in ``[0, n_classes)``.
    spec : NoiseSpec
        The validated spec (``spec.rate`` is set for rate kinds, ``spec.path`` for path kinds).
    n_classes : int
        Number of classes ``C >= 2``.
    rng : np.random.Generator
        The only source of randomness.
    images : np.ndarray or None
        Shape (N, ...); not ``None`` when the kind was registered with ``needs_images=True``.

    Returns
    -------
    noisy_labels : np.ndarray of int64, shape (N,)
    transition : np.ndarray of float64, shape (C, C)
        Row ``i`` is ``P(noisy = j | true = i)``.
    """

    def __call__(
        self,
        labels: np.ndarray,
        spec: NoiseSpec,
        *,
        n_classes: int,
        rng: np.random.Generator,
        images: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class NoiseKind:
    """A registered noise kind: the function plus what its spec argument is.

    Calling a ``NoiseKind`` calls its function, so it satisfies :class:`NoiseFn`.
    """

    name: str
    fn: NoiseFn
    argument: Literal["rate", "path"] = "rate"
    needs_images: bool = False

    def __call__(
        self,
        labels: np.ndarray,
        spec: NoiseSpec,
        *,
        n_classes: int,
        rng: np.random.Generator,
        images: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.fn(labels, spec, n_classes=n_classes, rng=rng, images=images)


#: The registry: kind name -> noise kind (callable with the :class:`NoiseFn` signature).
NOISE_KINDS: dict[str, NoiseKind] = {}


def register_noise(
    name: str,
    *,
    argument: Literal["rate", "path"] = "rate",
    needs_images: bool = False,
) -> Callable[[NoiseFn], NoiseFn]:
    """Register a noise function under ``name`` (decorator).

    Parameters
    ----------
    name : str
        Registry key, as written before the ``:`` in a spec. Lower case, no ``:``.
    argument : {"rate", "path"}, default "rate"
        What follows the ``:``: a probability in ``[0, 1]`` or a file path.
    needs_images : bool, default False
        Whether :func:`inject_noise` must be given ``images`` for this kind.

    Returns
    -------
    decorator : callable
        Registers the function and returns it unchanged.
    """
    if not name or ":" in name or name != name.strip().lower():
        raise NoiseSpecError(f"invalid noise kind name {name!r}: lower case, no ':'")
    if argument not in ("rate", "path"):
        raise NoiseSpecError(f"argument must be 'rate' or 'path', got {argument!r}")

    def decorator(fn: NoiseFn) -> NoiseFn:
        if name in NOISE_KINDS:
            raise NoiseSpecError(f"noise kind {name!r} is already registered")
        NOISE_KINDS[name] = NoiseKind(
            name=name, fn=fn, argument=argument, needs_images=needs_images
        )
        return fn

    return decorator


def _valid_kinds() -> str:
    return ", ".join(sorted(NOISE_KINDS))


def _get_kind(name: str) -> NoiseKind:
    try:
        return NOISE_KINDS[name]
    except KeyError:
        raise NoiseSpecError(
            f"unknown noise kind {name!r}; valid kinds: {_valid_kinds()}"
        ) from None


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseSpec:
    """Which noise to inject.

    Attributes
    ----------
    kind : str
        Registry key in :data:`NOISE_KINDS`.
    rate : float or None
        Noise probability in ``[0, 1]`` for rate kinds; ``None`` for ``asymmetric``.
    path : str or None
        Transition-matrix file for ``asymmetric``; ``None`` otherwise.
    """

    kind: str
    rate: float | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        kind = _get_kind(self.kind)
        if kind.argument == "rate":
            if self.path is not None:
                raise NoiseSpecError(f"noise kind {self.kind!r} takes a rate, not a path")
            object.__setattr__(self, "rate", _check_rate(self.rate, self.kind))
        else:
            if self.rate is not None:
                raise NoiseSpecError(f"noise kind {self.kind!r} takes a file path, not a rate")
            if not isinstance(self.path, str) or not self.path.strip():
                raise NoiseSpecError(
                    f"noise kind {self.kind!r} needs a file path: '{self.kind}:FILE'"
                )

    def __str__(self) -> str:
        if self.rate is not None:
            return f"{self.kind}:{self.rate!r}"
        return f"{self.kind}:{self.path}"


def _check_rate(rate: object, kind: str) -> float:
    if isinstance(rate, bool) or not isinstance(rate, int | float | np.integer | np.floating):
        raise NoiseSpecError(f"noise kind {kind!r} needs a rate: a float in [0, 1], got {rate!r}")
    value = float(rate)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise NoiseSpecError(f"noise rate must be a float in [0, 1], got {rate!r}")
    return value


def parse_noise_spec(text: str) -> NoiseSpec:
    """Parse ``"KIND:RATE"`` (e.g. ``"symmetric:0.2"``) or ``"asymmetric:FILE"``.

    Parameters
    ----------
    text : str
        The spec. The kind is case-insensitive; everything after the first ``:`` is the
        argument, so file paths may contain ``:``.

    Returns
    -------
    NoiseSpec
        ``str(result)`` gives back the canonical text (``parse_noise_spec(str(s)) == s``).

    Raises
    ------
    NoiseSpecError
        Missing ``:``, unknown kind (the message lists the valid kinds), missing argument, or a
        rate that is not a float in ``[0, 1]``.
    """
    if not isinstance(text, str):
        raise NoiseSpecError(f"noise spec must be a string, got {type(text).__name__}")
    kind_text, sep, arg = text.partition(":")
    kind_name = kind_text.strip().lower()
    if not sep:
        raise NoiseSpecError(
            f"noise spec {text!r} must look like KIND:RATE (e.g. 'symmetric:0.2') or "
            f"asymmetric:FILE; valid kinds: {_valid_kinds()}"
        )
    kind = _get_kind(kind_name)
    arg = arg.strip()
    if kind.argument == "path":
        if not arg:
            raise NoiseSpecError(f"noise spec {text!r} is missing the file: '{kind_name}:FILE'")
        return NoiseSpec(kind=kind_name, path=arg)
    if not arg:
        raise NoiseSpecError(
            f"noise spec {text!r} is missing the rate: '{kind_name}:RATE' with RATE in [0, 1]"
        )
    try:
        rate = float(arg)
    except ValueError:
        raise NoiseSpecError(
            f"noise rate must be a float in [0, 1], got {arg!r} in spec {text!r}"
        ) from None
    return NoiseSpec(kind=kind_name, rate=rate)


# --------------------------------------------------------------------------------------------
# Result and entry point
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseResult:
    """Output of :func:`inject_noise`.

    Attributes
    ----------
    noisy_labels : np.ndarray of int64, shape (N,)
    flipped : np.ndarray of bool, shape (N,)
        ``noisy_labels != labels``.
    transition : np.ndarray of float64, shape (C, C)
        Row ``i`` is ``P(noisy = j | true = i)``. The specified matrix for class-level kinds;
        for ``instance`` the mean of the per-sample rows over the samples of each true class
        (the identity row for a class with no samples).
    realised_rate : float
        ``flipped.mean()`` (0.0 for no samples).
    spec : NoiseSpec
    seed : int
    """

    noisy_labels: np.ndarray
    flipped: np.ndarray
    transition: np.ndarray
    realised_rate: float
    spec: NoiseSpec
    seed: int


def inject_noise(
    labels: np.ndarray,
    spec: NoiseSpec | str,
    *,
    n_classes: int,
    seed: int,
    images: np.ndarray | None = None,
) -> NoiseResult:
    """Corrupt ``labels`` with synthetic label noise.

    Parameters
    ----------
    labels : array-like of int, shape (N,)
        True labels in ``[0, n_classes)``.
    spec : NoiseSpec or str
        What noise to inject, e.g. ``"symmetric:0.2"``.
    n_classes : int
        Number of classes ``C >= 2``.
    seed : int
        Seed for ``np.random.default_rng``; same seed and inputs give identical output.
    images : np.ndarray, shape (N, ...), optional
        Any numeric dtype. Required only by kinds that need them (``instance``).

    Returns
    -------
    NoiseResult

    Raises
    ------
    NoiseSpecError
        Invalid spec, labels, ``n_classes``, ``images`` or transition matrix.
    """
    if isinstance(spec, str):
        spec = parse_noise_spec(spec)
    elif not isinstance(spec, NoiseSpec):
        raise NoiseSpecError(f"spec must be a NoiseSpec or str, got {type(spec).__name__}")
    kind = _get_kind(spec.kind)
    if isinstance(n_classes, bool) or not isinstance(n_classes, int | np.integer):
        raise NoiseSpecError(f"n_classes must be an int, got {n_classes!r}")
    n_classes = int(n_classes)
    if n_classes < 2:
        raise NoiseSpecError(f"n_classes must be >= 2, got {n_classes}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise NoiseSpecError(f"seed must be a non-negative int, got {seed!r}")
    seed = int(seed)
    y = _validate_labels(labels, n_classes)
    if images is not None:
        images = np.asarray(images)
        if images.ndim < 1 or images.shape[0] != y.shape[0]:
            raise NoiseSpecError(
                f"images must have shape (N, ...) with N = len(labels) = {y.shape[0]}, "
                f"got shape {images.shape}"
            )
    if kind.needs_images and images is None:
        raise NoiseSpecError(f"noise kind {spec.kind!r} needs images; pass images=")

    if spec.rate == 0.0:
        noisy, transition = y.copy(), np.eye(n_classes)
    else:
        rng = np.random.default_rng(seed)
        noisy, transition = kind(y, spec, n_classes=n_classes, rng=rng, images=images)
        noisy = np.asarray(noisy, dtype=np.int64)
        transition = np.asarray(transition, dtype=np.float64)
    flipped = noisy != y
    realised = float(flipped.mean()) if flipped.size else 0.0
    return NoiseResult(
        noisy_labels=noisy,
        flipped=flipped,
        transition=transition,
        realised_rate=realised,
        spec=spec,
        seed=seed,
    )


def _validate_labels(labels: np.ndarray, n_classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise NoiseSpecError(f"labels must be 1-D, got shape {y.shape}")
    if y.dtype.kind not in "iu":
        raise NoiseSpecError(f"labels must be integers, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        bad = y[(y < 0) | (y >= n_classes)]
        raise NoiseSpecError(
            f"labels must be in [0, {n_classes}); found {bad.size} out of range "
            f"(e.g. {int(bad[0])})"
        )
    return y.astype(np.int64, copy=True)


# --------------------------------------------------------------------------------------------
# Sampling helpers
# --------------------------------------------------------------------------------------------


def _sample_from_rows(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one class per row from row-wise categorical distributions.

    Parameters
    ----------
    rows : np.ndarray of float, shape (N, C)
        Non-negative probabilities; each row sums to (approximately) 1.
    rng : np.random.Generator

    Returns
    -------
    np.ndarray of int64, shape (N,)
        ``out[i] = j`` with probability ``rows[i, j] / rows[i].sum()``. Zero-probability
        classes are never drawn.
    """
    cum = np.cumsum(rows, axis=1)
    u = rng.random((rows.shape[0], 1)) * cum[:, -1:]
    out = (cum <= u).sum(axis=1)
    return np.minimum(out, rows.shape[1] - 1).astype(np.int64)


def _rate(spec: NoiseSpec) -> float:
    if spec.rate is None:
        raise NoiseSpecError(f"noise kind {spec.kind!r} needs a rate")
    return spec.rate


def _sample_class_level(
    transition: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    return _sample_from_rows(transition[labels], rng), transition


# --------------------------------------------------------------------------------------------
# Noise kinds
# --------------------------------------------------------------------------------------------


@register_noise("symmetric")
def symmetric_noise(
    labels: np.ndarray,
    spec: NoiseSpec,
    *,
    n_classes: int,
    rng: np.random.Generator,
    images: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """With probability ``p`` move to a different class, chosen uniformly."""
    p = _rate(spec)
    c = n_classes
    transition = np.full((c, c), p / (c - 1))
    np.fill_diagonal(transition, 1.0 - p)
    return _sample_class_level(transition, labels, rng)


@register_noise("uniform")
def uniform_noise(
    labels: np.ndarray,
    spec: NoiseSpec,
    *,
    n_classes: int,
    rng: np.random.Generator,
    images: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """With probability ``p`` resample uniformly over all classes (flip rate p (C-1)/C)."""
    p = _rate(spec)
    c = n_classes
    transition = (1.0 - p) * np.eye(c) + p / c
    return _sample_class_level(transition, labels, rng)


@register_noise("pairflip")
def pairflip_noise(
    labels: np.ndarray,
    spec: NoiseSpec,
    *,
    n_classes: int,
    rng: np.random.Generator,
    images: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Class ``i`` becomes ``(i + 1) mod C`` with probability ``p``."""
    p = _rate(spec)
    c = n_classes
    transition = (1.0 - p) * np.eye(c) + p * np.roll(np.eye(c), 1, axis=1)
    return _sample_class_level(transition, labels, rng)


@register_noise("asymmetric", argument="path")
def asymmetric_noise(
    labels: np.ndarray,
    spec: NoiseSpec,
    *,
    n_classes: int,
    rng: np.random.Generator,
    images: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample each noisy label from row ``y_i`` of a user-supplied transition matrix."""
    if spec.path is None:
        raise NoiseSpecError(f"noise kind {spec.kind!r} needs a file path")
    transition = load_transition_matrix(spec.path, n_classes=n_classes)
    return _sample_class_level(transition, labels, rng)


@register_noise("instance", needs_images=True)
def instance_noise(
    labels: np.ndarray,
    spec: NoiseSpec,
    *,
    n_classes: int,
    rng: np.random.Generator,
    images: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Instance-dependent noise of Xia et al. 2020 (``get_instance_noisy_label``).

    Per-sample flip rate ``q_i ~ TruncNormal(p, 0.1)`` on ``[0, 1]``; ``W ~ N(0, 1)`` of shape
    (C, D, C); for the unit-norm flattened image ``x_i``, ``a = x_i @ W[y_i]``, ``a[y_i] = -inf``,
    ``P_i = q_i softmax(a)`` and ``P_i[y_i] = 1 - q_i``; the noisy label is drawn from ``P_i``.
    """
    if images is None:
        raise NoiseSpecError(f"noise kind {spec.kind!r} needs images")
    p = _rate(spec)
    c = n_classes
    n = labels.shape[0]
    flat = images.reshape(n, -1)
    d = flat.shape[1]
    if d == 0:
        raise NoiseSpecError("images must have at least one feature per sample")
    if not (np.issubdtype(flat.dtype, np.number) or flat.dtype == np.bool_):
        raise NoiseSpecError(f"images must be numeric, got dtype {images.dtype}")

    from scipy import stats  # training-only dependency; the service parses specs without it

    s = INSTANCE_RATE_STD
    dist = stats.truncnorm((0.0 - p) / s, (1.0 - p) / s, loc=p, scale=s)
    q = np.asarray(dist.rvs(size=n, random_state=rng), dtype=np.float64).reshape(n)
    weights = rng.standard_normal((c, d, c))

    # Scores a_i = x_i @ W[y_i], in chunks of rows (bounded memory), one matmul per class.
    scores = np.empty((n, c), dtype=np.float64)
    chunk = max(1, _INSTANCE_CHUNK_VALUES // d)
    for start in range(0, n, chunk):
        x = flat[start : start + chunk].astype(np.float64)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x /= np.where(norms > 0, norms, 1.0)
        y = labels[start : start + chunk]
        for k in np.unique(y):
            mask = y == k
            scores[start : start + chunk][mask] = x[mask] @ weights[k]

    rows_idx = np.arange(n)
    scores[rows_idx, labels] = -np.inf
    scores -= scores.max(axis=1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=1, keepdims=True)
    probs *= q[:, None]
    probs[rows_idx, labels] = 1.0 - q

    noisy = _sample_from_rows(probs, rng)
    counts = np.bincount(labels, minlength=c).astype(np.float64)
    sums = np.zeros((c, c))
    np.add.at(sums, labels, probs)
    transition = np.eye(c)
    present = counts > 0
    transition[present] = sums[present] / counts[present, None]
    return noisy, transition


# --------------------------------------------------------------------------------------------
# Transition-matrix files
# --------------------------------------------------------------------------------------------


def load_transition_matrix(path: str | Path, *, n_classes: int) -> np.ndarray:
    """Load and validate a row-stochastic transition matrix.

    Parameters
    ----------
    path : str or Path
        ``.npy``, ``.csv`` (comma-separated, no header) or ``.json`` (list of lists).
    n_classes : int
        Expected size ``C``.

    Returns
    -------
    np.ndarray of float64, shape (C, C)
        Row ``i`` is ``P(noisy = j | true = i)``.

    Raises
    ------
    NoiseSpecError
        Missing or unreadable file, unsupported suffix, wrong shape, non-finite or negative
        entries, or a row whose sum differs from 1 by more than ``ROW_SUM_TOL``.
    """
    file = Path(path)
    if not file.is_file():
        raise NoiseSpecError(f"transition matrix file not found: {str(file)!r}")
    suffix = file.suffix.lower()
    if suffix not in MATRIX_SUFFIXES:
        raise NoiseSpecError(
            f"transition matrix file {str(file)!r} must end in one of {', '.join(MATRIX_SUFFIXES)}"
        )
    try:
        if suffix == ".npy":
            raw = np.load(file, allow_pickle=False)
        elif suffix == ".csv":
            raw = np.loadtxt(file, delimiter=",", dtype=np.float64, ndmin=2)
        else:
            raw = json.loads(file.read_text())
        matrix = np.asarray(raw, dtype=np.float64)
    except (OSError, ValueError, TypeError) as exc:
        raise NoiseSpecError(f"could not read transition matrix from {str(file)!r}: {exc}") from exc

    c = n_classes
    if matrix.shape != (c, c):
        raise NoiseSpecError(
            f"transition matrix in {str(file)!r} must have shape ({c}, {c}) for "
            f"n_classes={c}, got {matrix.shape}"
        )
    if not np.isfinite(matrix).all():
        i, j = np.argwhere(~np.isfinite(matrix))[0]
        raise NoiseSpecError(f"transition matrix has a non-finite entry at [{i}, {j}]")
    if (matrix < 0).any():
        i, j = np.argwhere(matrix < 0)[0]
        raise NoiseSpecError(
            f"transition matrix must be non-negative; entry [{i}, {j}] = {float(matrix[i, j])!r}"
        )
    row_sums = matrix.sum(axis=1)
    bad = np.flatnonzero(np.abs(row_sums - 1.0) > ROW_SUM_TOL)
    if bad.size:
        i = int(bad[0])
        raise NoiseSpecError(
            f"transition matrix row {i} sums to {float(row_sums[i])!r}, not 1 "
            f"(tolerance {ROW_SUM_TOL:g})"
        )
    return matrix
