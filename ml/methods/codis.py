"""``codis``: CoDis (Xia et al., ICCV 2023), small-loss and high-discrepancy selection.

Co-teaching's networks come to agree, and then each selects what the other would have
selected. CoDis keeps them apart by preferring, among the small-loss samples, those on
which the two networks' predictions *differ*. Per mini-batch of ``B`` samples at epoch
``e``, with ``p1, p2`` the networks' softmax outputs and ``y`` the observed labels:

1. the discrepancy of sample ``i`` is the Jensen-Shannon divergence
   ``JS_i = (KL(p1_i || m_i) + KL(p2_i || m_i)) / 2``, ``m_i = (p1_i + p2_i) / 2``
   (:func:`js_divergence`, in ``[0, ln 2]``);
2. each network ``k`` scores the samples by ``s_k = CE(p_k, y) - lambda JS``
   (:func:`discrepancy_scores`) and keeps its ``R = floor((1 - tau(e)) B)`` smallest
   (``tau(e)`` the forget rate of
   :func:`~noisescore.ml.methods.schedule.forget_rate_schedule`, as in Co-teaching): small
   loss *and* high discrepancy;
3. each network is updated on the samples the *other* one kept, with the same objective
   ``s_k`` as its loss (the official code's ``loss_1[ind_2_update]``): the ``- lambda JS``
   term also rewards the network for keeping its predictions apart on those samples. Each
   network's term differentiates only its own prediction (the official code steps each
   network's optimiser on its own loss; here the other network's output is detached in
   that term, which gives the same gradients).

Defaults: ``lambda = 0.15`` (``--co_lam`` of the official code and of LNMBench),
``tau_max`` the noise rate, ``T_k = 10`` (``--num_gradual``). The fitted results
(``selected_by_epoch_``, ``clean_set``) are those of
:class:`~noisescore.ml.methods.coteaching.CoTeaching`.

Deviation from the official code, which LNMBench copies: its ``js_loss_compute`` calls
``F.kl_div(log_softmax(z), m)``, which is ``KL(m || p)``, so the quantity it names JS is
``(KL(m || p1) + KL(m || p2)) / 2``. That also vanishes exactly when ``p1 = p2`` and grows
with the disagreement, but it is not the Jensen-Shannon divergence the method is
described with, and it is unbounded; we compute the JS divergence itself. (LNMBench also
clamps ``m`` at ``1e-8`` and renormalises; we work in log space, where no clamp is needed.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from noisescore.ml.methods.base import MethodError, register_method
from noisescore.ml.methods.coteaching import CoTeaching
from noisescore.ml.methods.schedule import n_keep, small_loss_indices
from noisescore.ml.train import Batch, Trainer

__all__ = ["CoDis", "discrepancy_scores", "js_divergence"]


def js_divergence(logits_0: torch.Tensor, logits_1: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence of ``softmax(logits_0)`` and ``softmax(logits_1)``.

    Parameters
    ----------
    logits_0, logits_1 : torch.Tensor, shape (B, C)

    Returns
    -------
    torch.Tensor, shape (B,)
        ``(KL(p0 || m) + KL(p1 || m)) / 2`` with ``m = (p0 + p1) / 2``, in nats, in
        ``[0, ln 2]``; gradients flow to both inputs (detach one to stop them).
    """
    log_p0 = F.log_softmax(logits_0, dim=1)
    log_p1 = F.log_softmax(logits_1, dim=1)
    log_m = torch.logaddexp(log_p0, log_p1) - math.log(2.0)
    kl_0 = (log_p0.exp() * (log_p0 - log_m)).sum(dim=1)
    kl_1 = (log_p1.exp() * (log_p1 - log_m)).sum(dim=1)
    return 0.5 * (kl_0 + kl_1)


def discrepancy_scores(
    ce: torch.Tensor, logits_0: torch.Tensor, logits_1: torch.Tensor, *, co_lambda: float
) -> torch.Tensor:
    """CoDis's selection score ``CE - lambda JS`` (detached; smaller = keep first).

    Parameters
    ----------
    ce : torch.Tensor, shape (B,)
        One network's per-sample cross-entropy.
    logits_0, logits_1 : torch.Tensor, shape (B, C)
        Both networks' logits.
    co_lambda : float
        ``lambda >= 0``.

    Returns
    -------
    torch.Tensor, shape (B,), detached
    """
    with torch.no_grad():
        return ce.detach() - co_lambda * js_divergence(logits_0, logits_1)


@register_method("codis")
class CoDis(CoTeaching):
    """CoDis as a training-loop hook; the second network is ``peer``.

    Parameters
    ----------
    n_samples, n_classes, peer, forget_rate, t_k, exponent
        As for :class:`~noisescore.ml.methods.coteaching.CoTeaching`.
    co_lambda : float
        ``lambda >= 0``, the weight of the discrepancy (official code: 0.15).
    """

    summary = "each network keeps small-loss, high-JS-discrepancy samples for the other (Xia 2023)"

    def __init__(
        self,
        *,
        n_samples: int,
        n_classes: int,
        peer: nn.Module | None = None,
        forget_rate: float,
        t_k: int = 10,
        exponent: float = 1.0,
        co_lambda: float = 0.15,
    ):
        super().__init__(
            n_samples=n_samples,
            n_classes=n_classes,
            peer=peer,
            forget_rate=forget_rate,
            t_k=t_k,
            exponent=exponent,
        )
        if not co_lambda >= 0:
            raise MethodError(f"co_lambda must be >= 0, got {co_lambda!r}")
        self.co_lambda = float(co_lambda)

    def select(self, k: int, batch: Batch, losses: torch.Tensor, keep: int) -> torch.Tensor:
        m0, m1 = self._models
        scores = discrepancy_scores(
            losses, batch.logits[m0], batch.logits[m1], co_lambda=self.co_lambda
        )
        return small_loss_indices(scores, keep)

    def batch_loss(self, trainer: Trainer, batch: Batch) -> torch.Tensor:
        m0, m1 = self._models
        z0, z1 = batch.logits[m0], batch.logits[m1]
        ce = (batch.per_sample_ce(m0), batch.per_sample_ce(m1))
        keep = n_keep(batch.idx.shape[0], self._rate)
        picks = tuple(self.select(k, batch, ce[k], keep) for k in (0, 1))
        for k in (0, 1):
            self.record(k, batch.idx[picks[k]])
        # Each network's objective, differentiated through its own prediction only.
        objective_0 = ce[0] - self.co_lambda * js_divergence(z0, z1.detach())
        objective_1 = ce[1] - self.co_lambda * js_divergence(z0.detach(), z1)
        # Each network learns from what the other one kept.
        return objective_0[picks[1]].mean() + objective_1[picks[0]].mean()
