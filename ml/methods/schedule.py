"""Small-loss selection and its forget-rate schedule (Han et al., NeurIPS 2018).

Co-teaching keeps, in each mini-batch of ``B`` samples, the ``R = floor((1 - tau(e)) B)``
samples with the smallest loss. ``tau(e)`` ramps linearly from 0 to ``tau_max`` over the
first ``T_k`` epochs; this is the authors' code (``rate_schedule``), which Co-teaching+,
JoCoR and CoDis reuse:

.. code-block:: python

    rate_schedule = np.ones(n_epoch) * forget_rate
    rate_schedule[:num_gradual] = np.linspace(0, forget_rate**exponent, num_gradual)

Epochs are 1-based here: epoch ``e`` uses ``rate_schedule[e - 1]``, so the first epoch
keeps everything, epoch ``T_k`` forgets ``forget_rate**exponent`` and every later epoch
``forget_rate``. (The authors' loop runs ``for epoch in range(1, n_epoch)`` and reads
``rate_schedule[epoch]``, which skips the 0 entry; we keep the schedule as defined.)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from noisescore.ml.method_names import MethodError

__all__ = ["forget_rate_schedule", "n_keep", "small_loss_indices"]


def forget_rate_schedule(
    epoch: int, *, forget_rate: float, t_k: int, exponent: float = 1.0
) -> float:
    """``tau(epoch)``: the share of each batch that small-loss selection drops.

    Parameters
    ----------
    epoch : int
        1-based epoch.
    forget_rate : float
        ``tau_max`` in ``[0, 1)`` (the paper sets it to the noise rate).
    t_k : int
        ``T_k >= 1``: epochs of the linear ramp.
    exponent : float
        ``c > 0``: the ramp ends at ``forget_rate**exponent`` (the paper's c = 1).

    Returns
    -------
    float
        ``linspace(0, forget_rate**exponent, t_k)[epoch - 1]`` for ``epoch <= t_k``,
        else ``forget_rate``.
    """
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise MethodError(f"epoch must be an int >= 1 (1-based), got {epoch!r}")
    if not 0.0 <= forget_rate < 1.0:
        raise MethodError(f"forget_rate must lie in [0, 1), got {forget_rate!r}")
    if isinstance(t_k, bool) or not isinstance(t_k, int) or t_k < 1:
        raise MethodError(f"t_k must be an int >= 1, got {t_k!r}")
    if not exponent > 0:
        raise MethodError(f"exponent must be > 0, got {exponent!r}")
    if epoch <= t_k:
        return float(np.linspace(0.0, forget_rate**exponent, t_k)[epoch - 1])
    return float(forget_rate)


def n_keep(batch_size: int, rate: float) -> int:
    """``R = floor((1 - rate) * batch_size)``, the authors' ``int(remember_rate * B)``;
    at least 1 for a non-empty batch (an empty selection has no mean loss)."""
    keep = math.floor((1.0 - rate) * batch_size)
    return max(keep, 1) if batch_size > 0 else 0


def small_loss_indices(losses: torch.Tensor, keep: int) -> torch.Tensor:
    """Positions of the ``keep`` smallest values of ``losses``, smallest first.

    Parameters
    ----------
    losses : torch.Tensor, shape (B,)
        Per-sample losses (any device; no host sync).
    keep : int
        ``0 <= keep <= B``.

    Returns
    -------
    torch.Tensor, shape (keep,), int64
        Positions into ``losses``; ties go to the smaller position (stable sort).
    """
    return torch.argsort(losses.detach(), stable=True)[:keep]
