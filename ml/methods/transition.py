"""Shared pieces of the transition-matrix methods (VolMinNet, T-Revision).

Class-conditional label noise is a row-stochastic matrix ``T`` (C, C),
``T[i, j] = P(noisy = j | clean = i)``; a network ``f`` that models the clean posterior
``p = softmax(f(x))`` then models the noisy one as ``q = p @ T``
(:func:`noisy_posterior`), i.e. ``q_j = sum_i p_i T[i, j]``.

- :class:`TransitionMatrix`: a trainable row-stochastic ``T``, VolMinNet's
  parametrisation (diagonal 1, off-diagonal ``sigmoid(w)``, rows L1-normalised).
- :func:`forward_corrected_ce`: ``-log (p @ T)_y`` per sample (forward correction,
  Patrini et al. 2017), VolMinNet's data term.
- :func:`estimate_transition`: T-Revision's anchor-point estimate of ``T`` from the
  noisy posteriors of a network trained with plain CE.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from noisescore.ml.method_names import MethodError

__all__ = [
    "TransitionMatrix",
    "estimate_transition",
    "forward_corrected_ce",
    "noisy_posterior",
]

#: Floor of a noisy probability before its log: only reached when softmax underflows.
_TINY = 1e-12


class TransitionMatrix(nn.Module):
    """A trainable row-stochastic transition matrix (VolMinNet's ``sig_t``).

    ``T = rownorm_L1(I + sigmoid(W) * (1 - I))``: the unnormalised diagonal is 1 and each
    off-diagonal entry ``sigmoid(W_ij)`` lies in (0, 1), so every entry of ``T`` is
    positive, every row sums to 1, and ``T`` is diagonally dominant while
    ``sigmoid(W_ij) < 1 / (C - 1)``. ``W`` starts at ``-init`` everywhere (official code:
    ``init = 2``, i.e. off-diagonal ``sigmoid(-2) = 0.119`` before normalisation; 4.5
    for CIFAR-100), so ``T`` starts near the identity. ``W``'s diagonal is unused.

    Parameters
    ----------
    n_classes : int
        ``C >= 2``.
    init : float
        ``W``'s initial value is ``-init``.
    """

    identity: torch.Tensor
    off_diagonal: torch.Tensor

    def __init__(self, n_classes: int, *, init: float = 2.0):
        super().__init__()
        self.w = nn.Parameter(torch.full((n_classes, n_classes), -float(init)))
        self.register_buffer("off_diagonal", 1.0 - torch.eye(n_classes))
        self.register_buffer("identity", torch.eye(n_classes))

    def forward(self) -> torch.Tensor:
        """``T``, shape (C, C), float32, rows summing to 1, with gradients to ``w``."""
        unnormalised = self.identity + torch.sigmoid(self.w) * self.off_diagonal
        return unnormalised / unnormalised.sum(dim=1, keepdim=True)


def noisy_posterior(clean_probs: torch.Tensor, transition: torch.Tensor) -> torch.Tensor:
    """``q = p @ T``: the noisy-label posterior of each sample.

    Parameters
    ----------
    clean_probs : torch.Tensor, shape (B, C)
        ``p``, rows of clean-class probabilities.
    transition : torch.Tensor, shape (C, C)
        ``T[i, j] = P(noisy = j | clean = i)``.

    Returns
    -------
    torch.Tensor, shape (B, C), with gradients to both inputs
    """
    return clean_probs @ transition


def forward_corrected_ce(
    logits: torch.Tensor, transition: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Forward-corrected cross-entropy ``-log (softmax(logits) @ T)_y`` per sample.

    Parameters
    ----------
    logits : torch.Tensor, shape (B, C)
        The network's (clean-class) logits.
    transition : torch.Tensor, shape (C, C)
        ``T``, row-stochastic.
    labels : torch.Tensor, shape (B,), int64
        The observed (noisy) labels.

    Returns
    -------
    torch.Tensor, shape (B,), with gradients to ``logits`` and ``transition``
    """
    noisy = noisy_posterior(F.softmax(logits, dim=1), transition)
    return -noisy.gather(1, labels[:, None]).squeeze(1).clamp_min(_TINY).log()


def estimate_transition(probs: np.ndarray, percentile: float = 97.0) -> np.ndarray:
    """T-Revision's anchor-point estimate of ``T`` from noisy posteriors.

    For each class ``i`` the anchor is the training sample that most surely belongs to
    ``i``: the one with the highest ``probs[:, i]``. Because the maximum of a deep
    network's output is often an outlier, the paper (and its official code, ``tools.fit``
    with ``filter_outlier``) takes instead the highest value strictly below the
    ``percentile``-th percentile of ``probs[:, i]`` (numpy's ``method="higher"``: an
    observed value); ``percentile = 100`` takes the plain maximum (the official
    CIFAR-100 setting, no filter). ``T[i, :]`` is that sample's row of ``probs``, and
    rows are renormalised to sum to 1.

    Parameters
    ----------
    probs : np.ndarray, shape (N, C), float
        Predicted noisy-class probabilities of the training set (eval mode), rows in the
        simplex.
    percentile : float
        In (0, 100]; paper: 97.

    Returns
    -------
    np.ndarray, shape (C, C), float64
        Row-stochastic estimate; row ``i`` is class ``i``'s anchor's prediction.

    Raises
    ------
    MethodError
        ``probs`` not a finite (N, C) array with ``N >= 1``, ``C >= 2``, or
        ``percentile`` outside (0, 100].
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] < 1 or probs.shape[1] < 2:
        raise MethodError(f"probs must have shape (N >= 1, C >= 2), got {probs.shape}")
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise MethodError("probs must be finite and non-negative")
    if not 0.0 < percentile <= 100.0:
        raise MethodError(f"percentile must lie in (0, 100], got {percentile!r}")
    n_classes = probs.shape[1]
    transition = np.empty((n_classes, n_classes))
    for i in range(n_classes):
        column = probs[:, i]
        anchor = int(np.argmax(column))
        if percentile < 100.0:
            threshold = np.percentile(column, percentile, method="higher")
            below = column < threshold
            if below.any():  # else every value is >= the threshold (constant column)
                anchor = int(np.argmax(np.where(below, column, -np.inf)))
        transition[i] = probs[anchor]
    row_sums = transition.sum(axis=1, keepdims=True)
    if (row_sums <= 0).any():
        raise MethodError("an anchor's probability row sums to 0; probs must be in the simplex")
    return transition / row_sums
