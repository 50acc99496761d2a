"""``jocor``: JoCoR (Wei et al., CVPR 2020), joint training with co-regularisation.

Instead of two networks that select for each other (Co-teaching), JoCoR trains both with
ONE joint loss and selects once. Per sample ``i`` of a mini-batch, with ``p1, p2`` the two
networks' softmax outputs and ``y`` the observed label (:func:`joint_loss`):

    ``l_i = (1 - lambda) (CE(p1_i, y_i) + CE(p2_i, y_i))
           + lambda (KL(p1_i || p2_i) + KL(p2_i || p1_i))``

The supervised part fits the labels; the co-regularisation part (a symmetric KL) pulls the
two networks towards agreement, which is what the paper argues makes the small-loss
samples cleaner. The ``R = floor((1 - tau(e)) B)`` samples with the smallest ``l_i`` are
kept (``tau(e)`` the forget rate of
:func:`~noisescore.ml.methods.schedule.forget_rate_schedule`, as in Co-teaching) and the
batch loss is the mean of ``l_i`` over them; its gradient trains both networks (no
exchange, no stop-gradient). Defaults: ``lambda = 0.9`` (paper), ``tau_max`` the noise
rate, ``T_k = 10``.

Both networks keep the same samples; the fitted results (``selected_by_epoch_``,
``clean_set``) are those of :class:`~noisescore.ml.methods.coteaching.CoTeaching`, with
identical rows for the two networks.

LNMBench's ``JoCoR/algorithm/loss.py`` deviates from the paper in two ways, and we follow
the paper: it calls ``F.cross_entropy(y, t, reduce='none')``, i.e. the deprecated boolean
``reduce`` argument with a truthy string, which gives the *batch-mean* CE, one scalar
added to every sample's KL: the selection then ranks by the KL part alone and the CE is
not per sample; and it detaches the target distribution inside its KL (a stop-gradient the
official code, github hongxin001/JoCoR, does not have).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from noisescore.ml.methods.base import MethodError, register_method
from noisescore.ml.methods.coteaching import CoTeaching
from noisescore.ml.methods.schedule import n_keep, small_loss_indices
from noisescore.ml.train import Batch, Trainer

__all__ = ["JoCoR", "joint_loss", "symmetric_kl"]


def symmetric_kl(logits_0: torch.Tensor, logits_1: torch.Tensor) -> torch.Tensor:
    """``KL(p0 || p1) + KL(p1 || p0)`` per sample, ``p = softmax(logits)``.

    Parameters
    ----------
    logits_0, logits_1 : torch.Tensor, shape (B, C)

    Returns
    -------
    torch.Tensor, shape (B,), with gradients to both inputs
    """
    log_p0 = F.log_softmax(logits_0, dim=1)
    log_p1 = F.log_softmax(logits_1, dim=1)
    kl_01 = (log_p0.exp() * (log_p0 - log_p1)).sum(dim=1)
    kl_10 = (log_p1.exp() * (log_p1 - log_p0)).sum(dim=1)
    return kl_01 + kl_10


def joint_loss(
    logits_0: torch.Tensor,
    logits_1: torch.Tensor,
    labels: torch.Tensor,
    *,
    co_lambda: float = 0.9,
    ce: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """JoCoR's per-sample joint loss ``(1 - lambda)(CE_0 + CE_1) + lambda symKL``.

    Parameters
    ----------
    logits_0, logits_1 : torch.Tensor, shape (B, C)
    labels : torch.Tensor, shape (B,), int64
    co_lambda : float
        ``lambda`` in ``[0, 1]``.
    ce : pair of torch.Tensor, shape (B,), optional
        The two networks' per-sample CE when already computed (the loop's cache).

    Returns
    -------
    torch.Tensor, shape (B,), with gradients to both networks
    """
    if ce is None:
        ce = (
            F.cross_entropy(logits_0, labels, reduction="none"),
            F.cross_entropy(logits_1, labels, reduction="none"),
        )
    supervised = ce[0] + ce[1]
    return (1.0 - co_lambda) * supervised + co_lambda * symmetric_kl(logits_0, logits_1)


@register_method("jocor")
class JoCoR(CoTeaching):
    """JoCoR as a training-loop hook; the second network is ``peer``.

    Parameters
    ----------
    n_samples, n_classes, peer, forget_rate, t_k, exponent
        As for :class:`~noisescore.ml.methods.coteaching.CoTeaching` (the paper: ``tau``
        the noise rate, ``T_k = 10``, ``c = 1``).
    co_lambda : float
        ``lambda`` in ``[0, 1]``, the weight of the co-regularisation (paper: 0.9).
    """

    summary = "one joint CE + symmetric-KL loss, small-loss selection (Wei et al. 2020)"

    def __init__(
        self,
        *,
        n_samples: int,
        n_classes: int,
        peer: nn.Module | None = None,
        forget_rate: float,
        t_k: int = 10,
        exponent: float = 1.0,
        co_lambda: float = 0.9,
    ):
        super().__init__(
            n_samples=n_samples,
            n_classes=n_classes,
            peer=peer,
            forget_rate=forget_rate,
            t_k=t_k,
            exponent=exponent,
        )
        if not 0.0 <= co_lambda <= 1.0:
            raise MethodError(f"co_lambda must lie in [0, 1], got {co_lambda!r}")
        self.co_lambda = float(co_lambda)

    def batch_loss(self, trainer: Trainer, batch: Batch) -> torch.Tensor:
        m0, m1 = self._models
        losses = joint_loss(
            batch.logits[m0],
            batch.logits[m1],
            batch.labels,
            co_lambda=self.co_lambda,
            ce=(batch.per_sample_ce(m0), batch.per_sample_ce(m1)),
        )
        picks = small_loss_indices(losses, n_keep(batch.idx.shape[0], self._rate))
        kept = batch.idx[picks]
        self.record(0, kept)
        self.record(1, kept)
        return losses[picks].mean()
