"""``cdr``: robust early-learning (Xia et al., ICLR 2021), critical-parameter updates.

Early in training a network fits the clean labels first; only a part of its parameters is
needed for that. CDR ("critical ... drop", the official code's name) splits the weights
anew at every step: with ``g = dL/dw`` the mini-batch gradient of the cross-entropy,

    ``importance_j = |w_j * g_j|``  (first-order estimate of the loss change if ``w_j`` were
    set to 0),

the ``K = max(1, floor(tau * n))`` weights of largest importance are *critical*, ``tau``
the critical share (``clip_rate``, the paper's ``1 - noise rate``), ``n`` the number of
weight entries. Critical weights are updated by the data gradient; the other ones get no
data gradient, only the weight decay that pulls them towards 0:

    ``grad_j <- g_j``              if ``j`` critical,
    ``grad_j <- lambda * w_j``     otherwise  (:func:`clip_gradients`).

The split is *global* over the network's weights (one threshold, the ``K``-th largest
importance over every weight tensor concatenated, as in the official code: github
xiaoboxia/CDR, ``train_one_step``), not per tensor. Every entry whose importance equals
the threshold is critical (``>=``, as the official code): ties may keep more than ``K``
(notably when over ``1 - tau`` of the entries have importance 0, e.g. dead units: the
threshold is then 0 and every entry is critical for that step).
Only weight matrices and kernels are split (``ndim >= 2``: the official code's
``param.dim() in [2, 4]``, linear and conv weights); biases and BatchNorm's scales and
shifts (1-D) keep their full gradient. :func:`critical_mask` is the split of one tensor,
:func:`clip_gradients` the global one.

Defaults: ``clip_rate = 0.6`` (the official code's default ``1 - noise_rate`` with
``noise_rate = 0.4``; the paper sets ``tau = 1 - noise rate``, which the benchmark passes
when it knows the rate), ``weight_decay = 1e-3`` (the official code's SGD weight decay),
``t_k = 0`` (a constant ``tau``, see below).

How it maps onto one loop: the official loop is SGD with momentum 0.9 and
``weight_decay = lambda``: it zeroes the non-critical gradients and lets SGD add
``lambda w`` to *every* weight. Our loop has one Adam over all parameters, and the split
runs in :meth:`CDR.before_step` (after ``loss.backward()``, before ``optimizer.step()``):
the non-critical gradients are *replaced* by ``lambda w``, so Adam's moments see the
decay as the gradient of those entries. Under Adam the decay step is
``lr * m / (sqrt(v) + eps)``: normalised by the entry's gradient history rather than
``lr * lambda * w`` as in SGD; an entry that stays non-critical for long has ``v`` shrink
to ``(lambda w)^2`` and moves towards 0 by about ``lr`` per step. ``TrainConfig.
weight_decay`` (Adam's L2, added to every gradient inside the optimizer after this hook)
still applies on top: leave it at 0 to get the paper's update, in which the critical
weights get the data gradient alone here. (The official code also decays the critical
weights, through SGD's weight decay; set ``TrainConfig.weight_decay`` for that, and the
non-critical ones then get ``(lambda + weight_decay) w``.)

Deviations, both from code that the paper does not describe:

* the official code multiplies the critical gradients by ``tau`` (``mask * clip``); the
  paper's update rule does not, and we keep them unchanged;
* LNMBench (github myyy777/LNMBench, ``CDR/main.py``) ramps ``tau`` linearly from 1 in
  the first epoch to ``1 - noise_rate`` over ``num_gradual = 10`` epochs. The official
  code computes that ramp and then overwrites it with the constant (no ``else``), and the
  paper uses a constant ``tau``: ``t_k = 0`` (default) is the constant; ``t_k >= 1``
  gives LNMBench's ramp, ``tau(e) = 1 - (1 - clip_rate) (e - 1) / (t_k - 1)`` for
  ``e <= t_k`` (``clip_rate`` from ``e = t_k`` on).

No host sync per step: the threshold is a device tensor (:func:`torch.kthvalue`), the
masks are applied with :func:`torch.where`, and the count of critical entries is summed on
the device and read once per epoch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from noisescore.ml.methods.base import Method, MethodError, register_method
from noisescore.ml.train import Batch, Trainer

__all__ = [
    "CDR",
    "clip_gradients",
    "clip_rate_schedule",
    "clipped_parameters",
    "critical_mask",
    "n_critical",
]


def n_critical(n: int, keep: float) -> int:
    """``K = max(1, floor(keep * n))``, the number of critical entries out of ``n``.

    The official code takes ``int(keep * n)``; at least one is kept so that the threshold
    exists.
    """
    return max(1, min(n, int(keep * n)))


def _check_keep(keep: object) -> float:
    if (
        isinstance(keep, bool)
        or not isinstance(keep, numbers.Real)
        or not math.isfinite(keep)
        or not 0 < float(keep) <= 1
    ):
        raise MethodError(f"clip_rate (the critical share) must be in (0, 1], got {keep!r}")
    return float(keep)


def _check_decay(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or float(value) < 0
    ):
        raise MethodError(f"weight_decay must be a finite float >= 0, got {value!r}")
    return float(value)


def _threshold(importance: torch.Tensor, keep: float) -> torch.Tensor:
    """The ``K``-th largest value of the flat ``importance`` (0-dim device tensor)."""
    n = importance.numel()
    k = n_critical(n, keep)
    return torch.kthvalue(importance, n - k + 1).values


def critical_mask(weight: torch.Tensor, grad: torch.Tensor, keep: float) -> torch.Tensor:
    """Which entries of one tensor are critical: the top ``keep`` share of ``|w * g|``.

    Parameters
    ----------
    weight, grad : torch.Tensor, same shape (any)
        The weights and their gradient.
    keep : float
        The critical share in ``(0, 1]``.

    Returns
    -------
    torch.Tensor, the shape of ``weight``, bool
        ``|w * g| >= t``, ``t`` the ``K``-th largest importance,
        ``K = max(1, floor(keep * n))`` (:func:`n_critical`); every entry tied with ``t``
        is critical, so ties may keep more than ``K``.
    """
    keep = _check_keep(keep)
    if weight.shape != grad.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and grad {tuple(grad.shape)} differ")
    if weight.numel() == 0:
        return torch.zeros_like(weight, dtype=torch.bool)
    importance = (weight.detach() * grad.detach()).abs()
    return importance >= _threshold(importance.flatten(), keep)


def clip_gradients(
    params: Sequence[torch.Tensor], keep: float, weight_decay: float
) -> torch.Tensor:
    """CDR's update of the gradients of ``params`` (each ``p.grad`` is replaced), with one
    global threshold.

    The importance ``|w * g|`` of every entry of every tensor is ranked together; the
    critical ones (top ``keep`` share, ties at the threshold included, see
    :func:`critical_mask`) keep their gradient, the others' gradient becomes
    ``weight_decay * w``.

    Parameters
    ----------
    params : sequence of torch.Tensor
        Tensors with a ``.grad`` of their shape (the weights to split; CDR passes
        :func:`clipped_parameters`).
    keep : float
        The critical share in ``(0, 1]``.
    weight_decay : float
        ``lambda >= 0``.

    Returns
    -------
    torch.Tensor, 0-dim, int64, on the params' device
        How many entries were critical (no host sync; read it when convenient).
    """
    keep = _check_keep(keep)
    weight_decay = _check_decay(weight_decay)
    missing = [i for i, p in enumerate(params) if p.grad is None]
    if missing:
        raise ValueError(f"params {missing} have no gradient; run loss.backward() first")
    params = [p for p in params if p.numel() > 0]
    if not params:
        raise ValueError("clip_gradients needs at least one non-empty tensor")
    with torch.no_grad():
        importance = [(p * p.grad).abs() for p in params]  # type: ignore[operator]
        threshold = _threshold(torch.cat([i.flatten() for i in importance]), keep)
        kept = torch.zeros((), dtype=torch.long, device=params[0].device)
        for p, imp in zip(params, importance, strict=True):
            mask = imp >= threshold
            p.grad = torch.where(mask, p.grad, weight_decay * p)  # type: ignore[arg-type]
            kept += mask.sum()
    return kept


def clipped_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The parameters CDR splits: weight matrices and kernels (``ndim >= 2``) that require
    gradients. Biases and normalisation scales/shifts (1-D) are left alone."""
    return [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]


def clip_rate_schedule(epoch: int, *, clip_rate: float, t_k: int = 0) -> float:
    """``tau(e)``: ``clip_rate`` when ``t_k == 0`` (paper); else a linear ramp from 1 at
    epoch 1 to ``clip_rate`` at epoch ``t_k`` (LNMBench), ``clip_rate`` afterwards.

    Parameters
    ----------
    epoch : int
        1-based.
    clip_rate : float
        In ``(0, 1]``.
    t_k : int
        Ramp length in epochs, ``>= 0``.
    """
    clip_rate = _check_keep(clip_rate)
    if isinstance(t_k, bool) or not isinstance(t_k, numbers.Integral) or t_k < 0:
        raise MethodError(f"t_k (epochs of the clip-rate ramp) must be an int >= 0, got {t_k!r}")
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 1:
        raise MethodError(f"epoch must be an int >= 1 (1-based), got {epoch!r}")
    if t_k <= 1 or epoch >= t_k:
        return clip_rate
    return 1.0 - (1.0 - clip_rate) * (epoch - 1) / (t_k - 1)


@register_method("cdr")
class CDR(Method):
    """Robust early-learning as a training-loop hook (one network).

    Parameters
    ----------
    n_samples, n_classes : int
    peer : None
        One network.
    clip_rate : float
        ``tau``, the critical share of the weights in ``(0, 1]``; the paper sets
        ``1 - noise rate``. Default 0.6 (the official code's default noise rate 0.4).
        ``1`` keeps every gradient (plain cross-entropy training).
    weight_decay : float
        ``lambda >= 0``, the decay that replaces the non-critical gradients (official
        code: 1e-3).
    t_k : int
        ``0`` (default, paper): constant ``tau``; ``>= 1``: LNMBench's linear ramp from 1
        to ``clip_rate`` over ``t_k`` epochs (:func:`clip_rate_schedule`); must not exceed
        the trainer's epochs.

    Attributes
    ----------
    clip_rate_by_epoch_ : np.ndarray, shape (E,), float64
        ``tau`` of each trained epoch.
    critical_fraction_by_epoch_ : np.ndarray, shape (E,), float64
        Share of the split weight entries that were critical, over the epoch's steps
        (``>= tau`` up to rounding; more when importances tie, e.g. at 0).
    """

    summary = "update only the top-|w*grad| weights by the loss, decay the rest (Xia et al. 2021)"
    n_models = 1

    def __init__(
        self,
        *,
        n_samples: int,
        n_classes: int,
        peer: nn.Module | None = None,
        clip_rate: float = 0.6,
        weight_decay: float = 1e-3,
        t_k: int = 0,
    ):
        super().__init__(n_samples=n_samples, n_classes=n_classes, peer=peer)
        clip_rate_schedule(1, clip_rate=clip_rate, t_k=t_k)  # checks clip_rate and t_k
        self.clip_rate = float(clip_rate)
        self.weight_decay = _check_decay(weight_decay)
        self.t_k = int(t_k)
        self._rate = self.clip_rate
        self._params: list[torch.Tensor] = []
        self._kept: torch.Tensor | None = None
        self._total = 0
        self._rates: list[float] = []
        self._fractions: list[float] = []

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.n_samples != self.n_samples:
            raise MethodError(
                f"method {self.name!r} was built for n_samples={self.n_samples}, "
                f"the trainer has {trainer.n_samples}"
            )
        if self.t_k > trainer.config.epochs:
            raise MethodError(
                f"method {self.name!r}: t_k={self.t_k} (ramp epochs) exceeds the "
                f"{trainer.config.epochs} training epochs"
            )
        self._params = clipped_parameters(trainer.model)
        if not self._params:
            raise MethodError(
                f"method {self.name!r}: the model has no weight matrix or kernel (ndim >= 2) "
                f"to split"
            )
        if trainer.epoch == 0:
            self._rates, self._fractions = [], []

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self._rate = clip_rate_schedule(epoch, clip_rate=self.clip_rate, t_k=self.t_k)
        self._kept = torch.zeros((), dtype=torch.long, device=trainer.device)
        self._total = 0

    def before_step(self, trainer: Trainer, batch: Batch) -> None:
        params = [p for p in self._params if p.grad is not None]
        if not params:
            return
        kept = clip_gradients(params, self._rate, self.weight_decay)
        if self._kept is not None:
            self._kept += kept
            self._total += sum(p.numel() for p in params)

    def on_epoch_end(self, trainer: Trainer, epoch: int, stats: dict[str, float]) -> None:
        fraction = 0.0
        if self._kept is not None and self._total:
            fraction = float(self._kept) / self._total  # the epoch's one host sync
        self._rates.append(self._rate)
        self._fractions.append(fraction)
        stats["clip_rate"] = self._rate
        stats["critical_fraction"] = fraction

    def _check_fitted(self) -> None:
        if not self._rates:
            raise MethodError(f"method {self.name!r} has recorded no epoch yet; train first")

    @property
    def clip_rate_by_epoch_(self) -> np.ndarray:
        self._check_fitted()
        return np.asarray(self._rates, dtype=np.float64)

    @property
    def critical_fraction_by_epoch_(self) -> np.ndarray:
        self._check_fitted()
        return np.asarray(self._fractions, dtype=np.float64)
