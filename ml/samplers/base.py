"""The sampler interface and its registry (the shape of :mod:`noisescore.ml.detectors`).

An active-learning sampler ranks the noisy pool for an expert: given the candidates (train
indices of the samples whose labels are suspect), the model's softmax on them, their
penultimate features and the features of the samples already labelled, it returns the
``budget`` candidates to relabel first, in priority order, as a :class:`Selection`.

:meth:`Sampler.select` validates its inputs once, sorts the candidates by train index (so
a selection does not depend on the order in which the pool is given, and ties always go to
the smaller train index) and calls the member's :meth:`Sampler.rank`, which sees plain,
trusted arrays.

Adding a sampler is one class decorated with ``@register_sampler("name")``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np

__all__ = [
    "SAMPLERS",
    "SAMPLER_NAMES",
    "Sampler",
    "SamplerError",
    "Selection",
    "create_sampler",
    "register_sampler",
]


class SamplerError(ValueError):
    """An unknown sampler name or invalid input to :meth:`Sampler.select`."""


@dataclass(frozen=True, eq=False)
class Selection:
    """The candidates chosen for relabelling, highest priority first.

    Parameters
    ----------
    indices : np.ndarray, shape (K,), int64
        Train indices of the chosen candidates in priority order, ``K = min(budget, M)``.
    scores : np.ndarray, shape (K,), float64
        Each chosen candidate's priority value, as the sampler defines it (``random``: its
        uniform draw; ``entropy``: the entropy of its prediction in nats; ``coreset``: its
        Euclidean distance to the labelled and already picked points at pick time).
    """

    indices: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        indices = np.asarray(self.indices, dtype=np.int64)
        scores = np.asarray(self.scores, dtype=np.float64)
        if indices.ndim != 1 or scores.shape != indices.shape:
            raise SamplerError(
                f"Selection needs indices and scores of the same shape (K,); "
                f"got {indices.shape} and {scores.shape}"
            )
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "scores", scores)

    def __len__(self) -> int:
        return int(self.indices.shape[0])


class Sampler:
    """Base class: rank a pool of candidates, return the top ``budget`` of them.

    A member sets which inputs it reads (:attr:`needs_proba`, :attr:`needs_features`) and
    implements :meth:`rank`; :meth:`select` is the public entry point.
    """

    name: ClassVar[str] = ""
    #: One-line description (docs and ``--help``).
    summary: ClassVar[str] = ""
    #: Whether :meth:`rank` reads ``proba`` (then :meth:`select` requires it).
    needs_proba: ClassVar[bool] = False
    #: Whether :meth:`rank` reads ``features`` and ``labelled_features``.
    needs_features: ClassVar[bool] = False

    # -- what a sampler implements -------------------------------------------------------

    def rank(
        self,
        *,
        n_candidates: int,
        budget: int,
        proba: np.ndarray | None,
        features: np.ndarray | None,
        labelled_features: np.ndarray | None,
        seed: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Choose ``min(budget, M)`` candidates; called with validated inputs only.

        Parameters
        ----------
        n_candidates : int
            ``M >= 1``, the pool size.
        budget : int
            ``1 <= budget <= M``.
        proba : np.ndarray, shape (M, C), float64, or None
            Rows are probability vectors, in the candidates' train-index order.
        features : np.ndarray, shape (M, D), float32, or None
        labelled_features : np.ndarray, shape (L, D), float32, or None
            ``L`` may be 0.
        seed : int
            ``>= 0``.

        Returns
        -------
        positions : np.ndarray, shape (budget,), int64
            Rows of the (index-sorted) candidates chosen, in priority order, distinct.
        scores : np.ndarray, shape (budget,), float64
        """
        raise NotImplementedError

    # -- the entry point -----------------------------------------------------------------

    def select(
        self,
        *,
        candidates: np.ndarray,
        budget: int,
        proba: np.ndarray | None = None,
        features: np.ndarray | None = None,
        labelled_features: np.ndarray | None = None,
        seed: int = 0,
    ) -> Selection:
        """Choose up to ``budget`` candidates to relabel, highest priority first.

        Parameters
        ----------
        candidates : np.ndarray, shape (M,), int
            Distinct, non-negative train indices of the pool (the noisy set).
        budget : int
            How many to choose (``>= 0``); ``min(budget, M)`` are returned.
        proba : np.ndarray, shape (M, C), float, optional
            The model's softmax on the candidates, rows in the order of ``candidates``.
            Required by samplers with :attr:`needs_proba`.
        features : np.ndarray, shape (M, D), float, optional
            Penultimate features of the candidates, same order. Required by samplers with
            :attr:`needs_features`.
        labelled_features : np.ndarray, shape (L, D), float, optional
            Features of the samples already in the clean/labelled set; ``L`` may be 0.
            Required (possibly empty) by samplers with :attr:`needs_features`.
        seed : int
            Seed of any random choice (``>= 0``); same inputs and seed, same selection.

        Returns
        -------
        Selection

        Raises
        ------
        SamplerError
            If an input has the wrong shape or type, holds non-finite values, a ``proba``
            row is not a probability vector, or a required input is missing.
        """
        cand = _check_candidates(candidates)
        m = cand.shape[0]
        budget = _check_int(budget, "budget")
        seed = _check_int(seed, "seed")
        if self.needs_proba and proba is None:
            raise SamplerError(f"sampler {self.name!r} needs proba, shape (M, C) = ({m}, C)")
        if self.needs_features and (features is None or labelled_features is None):
            raise SamplerError(
                f"sampler {self.name!r} needs features, shape (M, D) = ({m}, D), and "
                f"labelled_features, shape (L, D) (L may be 0: np.empty((0, D), np.float32))"
            )
        p = None if proba is None else _check_proba(proba, m)
        x = None if features is None else _check_matrix(features, "features", rows=m)
        lab = None
        if labelled_features is not None:
            d = None if x is None else x.shape[1]
            lab = _check_matrix(labelled_features, "labelled_features", cols=d)

        k = min(budget, m)
        if k == 0:
            return Selection(np.empty(0, np.int64), np.empty(0, np.float64))
        order = np.argsort(cand, kind="stable")
        cand = cand[order]
        p = None if p is None else p[order]
        x = None if x is None else x[order]
        positions, scores = self.rank(
            n_candidates=m, budget=k, proba=p, features=x, labelled_features=lab, seed=seed
        )
        return Selection(cand[np.asarray(positions, dtype=np.int64)], scores)


# ----------------------------------------------------------------------------- validation


def _check_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 0:
        raise SamplerError(f"{what} must be an integer >= 0, got {value!r}")
    return int(value)


def _check_candidates(candidates: object) -> np.ndarray:
    arr = np.asarray(candidates)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise SamplerError(
            f"candidates must be an integer array of train indices, shape (M,); "
            f"got {arr.dtype} {arr.shape}"
        )
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise SamplerError(f"candidates must be train indices >= 0; found {int(arr.min())}")
    if np.unique(arr).size != arr.size:
        raise SamplerError("candidates must be distinct train indices; found duplicates")
    return arr


def _check_matrix(
    values: object, what: str, *, rows: int | None = None, cols: int | None = None
) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.number) and arr.dtype.kind != "c"):
        raise SamplerError(f"{what} must be a real 2-D array; got {arr.dtype} {arr.shape}")
    if rows is not None and arr.shape[0] != rows:
        raise SamplerError(
            f"{what} must have one row per candidate: shape ({rows}, D); got {arr.shape}"
        )
    if cols is not None and arr.shape[1] != cols:
        raise SamplerError(
            f"{what} must have the feature dimension of features, D = {cols}; got {arr.shape}"
        )
    if arr.shape[1] < 1:
        raise SamplerError(f"{what} must have at least one column; got {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise SamplerError(f"{what} holds non-finite values (nan or inf)")
    return arr


#: Tolerance on the row sums of ``proba``.
PROBA_SUM_TOL: float = 1e-3


def _check_proba(values: object, m: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 2 or arr.shape[0] != m or arr.shape[1] < 1 or arr.dtype.kind not in "fiu":
        raise SamplerError(
            f"proba must be a real array of shape (M, C) = ({m}, C), C >= 1; "
            f"got {arr.dtype} {arr.shape}"
        )
    arr = np.asarray(arr, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise SamplerError("proba holds non-finite values (nan or inf)")
    if arr.size and arr.min() < 0:
        raise SamplerError(f"proba must be softmax probabilities; found {arr.min():.3g} < 0")
    sums = arr.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > PROBA_SUM_TOL)
    if bad.size:
        raise SamplerError(
            f"proba rows must sum to 1 (softmax, not logits); row {int(bad[0])} sums to "
            f"{sums[bad[0]]:.6g} ({bad.size} rows off by more than {PROBA_SUM_TOL})"
        )
    return arr


# ----------------------------------------------------------------------------- registry

#: The registry: sampler name -> class.
SAMPLERS: dict[str, type[Sampler]] = {}

S = TypeVar("S", bound=type[Sampler])


def register_sampler(name: str) -> Callable[[S], S]:
    """Register a :class:`Sampler` subclass under ``name`` (decorator)."""
    if not name or name != name.strip().lower() or "," in name:
        raise SamplerError(f"invalid sampler name {name!r}: lower case, no ','")

    def decorator(cls: S) -> S:
        if name in SAMPLERS:
            raise SamplerError(f"sampler {name!r} is already registered")
        cls.name = name
        SAMPLERS[name] = cls
        return cls

    return decorator


#: The built-in samplers' names, sorted (for settings and ``--help`` without importing the
#: members; ``tests/test_samplers.py`` checks it against :data:`SAMPLERS`).
SAMPLER_NAMES: tuple[str, ...] = ("coreset", "entropy", "random")


def create_sampler(name: str, **kwargs: Any) -> Sampler:
    """Build the sampler registered as ``name`` with its keyword options.

    Raises
    ------
    SamplerError
        If no sampler is registered under ``name`` (the message lists the valid names).
    """
    key = str(name).strip().lower()
    if key not in SAMPLERS:
        raise SamplerError(
            f"unknown sampler {name!r}; valid names: {', '.join(sorted(SAMPLERS)) or 'none'}"
        )
    return SAMPLERS[key](**kwargs)
