"""``coteaching_plus``: Co-teaching+ (Yu et al., ICML 2019), update by disagreement.

Co-teaching's two networks converge to the same predictions as training goes on, and then
exchanging small-loss samples is no better than self-training. Co-teaching+ (the "update
by disagreement" of Decoupling, Malach & Shalev-Shwartz 2017, plus Co-teaching's exchange)
keeps them apart. Per mini-batch of ``B`` samples at epoch ``e``:

1. both networks predict (argmax): the *disagreement set* ``D'`` holds the samples on which
   the two predictions differ (:func:`disagreement_set`);
2. within ``D'``, each network keeps its ``R = floor((1 - tau(e)) |D'|)`` (at least 1)
   smallest-loss samples, ``tau(e)`` the forget rate of
   :func:`~noisescore.ml.methods.schedule.forget_rate_schedule` (the official code's
   ``rate_schedule``, as in Co-teaching) (:func:`small_loss_within`);
3. each network is updated on the samples the *other* one kept: the loss is
   ``mean CE_0[kept by net 1] + mean CE_1[kept by net 0]``.

During the first ``init_epoch`` epochs the method is plain Co-teaching
(:class:`~noisescore.ml.methods.coteaching.CoTeaching`, whose loop, schedule and fitted
results it inherits). The official code sets ``init_epoch`` per dataset: 0 on MNIST and
NEWS, 5 on CIFAR-100, 20 on CIFAR-10 (the default here), 100 on Tiny-ImageNet.

A batch whose ``D'`` is empty gives no update (loss 0: nothing disagrees, so nothing is
selected). The selection runs on the device with a data-dependent ``R`` (a rank mask, no
host sync). Each epoch also reports ``disagreement``, the share of the epoch's samples in
``D'``; the recorded selection (``selected_by_epoch_``, ``clean_set``) after
``init_epoch`` holds the small-loss samples *of the disagreement set* only, which is what
the method trains on, not an estimate of the clean set.

Deviations from the official code (github xingruiyu/coteaching_plus), following the paper:

* the official ``loss_coteaching_plus`` passes *softmax outputs* to ``F.cross_entropy``
  (a second softmax inside) and divides the mean loss by ``R`` once more; we use the
  cross-entropy of the logits and its mean over the kept samples, as Algorithm 1 states;
* when ``D'`` is empty the official code falls back to the full batch's CE while
  ``epoch * i < 5000`` (``i`` the batch index): a side effect of its step counter that
  the paper does not have; we give no update;
* its loop counts epochs from 1 and runs Co-teaching while ``epoch < init_epoch``
  (``init_epoch - 1`` epochs); here exactly ``init_epoch`` epochs (as
  ``coteaching_vog``'s ``vog_warmup``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from noisescore.ml.methods.base import MethodError, register_method
from noisescore.ml.methods.coteaching import CoTeaching
from noisescore.ml.train import Batch, Trainer

__all__ = ["CoTeachingPlus", "disagreement_set", "small_loss_within"]


def disagreement_set(logits_0: torch.Tensor, logits_1: torch.Tensor) -> torch.Tensor:
    """Samples whose predicted classes differ between the two networks.

    Parameters
    ----------
    logits_0, logits_1 : torch.Tensor, shape (B, C)

    Returns
    -------
    torch.Tensor, shape (B,), bool
    """
    return logits_0.detach().argmax(dim=1) != logits_1.detach().argmax(dim=1)


def small_loss_within(losses: torch.Tensor, among: torch.Tensor, rate: float) -> torch.Tensor:
    """The ``R = max(1, floor((1 - rate) n))`` smallest-loss samples among the ``n`` marked.

    Parameters
    ----------
    losses : torch.Tensor, shape (B,)
        Per-sample losses (detached here).
    among : torch.Tensor, shape (B,), bool
        The candidates (e.g. the disagreement set), ``n = among.sum()``.
    rate : float
        The forget rate ``tau`` in ``[0, 1)``.

    Returns
    -------
    torch.Tensor, shape (B,), bool
        The kept samples (none when ``n = 0``); ties go to the smaller position. ``R`` is
        computed on the device in float64, as :func:`~noisescore.ml.methods.schedule.n_keep`
        computes it on the host: no host sync.
    """
    n = among.sum()
    keep = torch.floor(n.double() * (1.0 - rate)).clamp_min(1).long()
    masked = torch.where(among, losses.detach(), torch.full_like(losses, float("inf")))
    order = torch.argsort(masked, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0], device=order.device)
    return among & (rank < keep)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values[mask]``; 0 (with a zero gradient) for an empty mask."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp_min(1)


@register_method("coteaching_plus")
class CoTeachingPlus(CoTeaching):
    """Co-teaching+ as a training-loop hook; the second network is ``peer``.

    Parameters
    ----------
    n_samples, n_classes, peer, forget_rate, t_k, exponent
        As for :class:`~noisescore.ml.methods.coteaching.CoTeaching` (``forget_rate`` is
        the noise rate in the paper, ``t_k`` its ``E_k``, 10 by default in the official
        code).
    init_epoch : int
        Epochs of plain Co-teaching before the disagreement update starts (paper, CIFAR-10:
        20).

    Attributes
    ----------
    disagreement_by_epoch_ : np.ndarray, shape (E,), float64
        Share of each recorded epoch's samples in the disagreement set.
    (and the fitted results of :class:`~noisescore.ml.methods.coteaching.CoTeaching`)
    """

    summary = "Co-teaching on the samples the two networks disagree on (Yu et al. 2019)"

    def __init__(
        self,
        *,
        n_samples: int,
        n_classes: int,
        peer: nn.Module | None = None,
        forget_rate: float,
        t_k: int = 10,
        exponent: float = 1.0,
        init_epoch: int = 20,
    ):
        super().__init__(
            n_samples=n_samples,
            n_classes=n_classes,
            peer=peer,
            forget_rate=forget_rate,
            t_k=t_k,
            exponent=exponent,
        )
        if isinstance(init_epoch, bool) or not isinstance(init_epoch, int) or init_epoch < 0:
            raise MethodError(f"init_epoch must be an int >= 0, got {init_epoch!r}")
        self.init_epoch = init_epoch
        self._disagreeing = False
        self._n_disagree: torch.Tensor | None = None
        self._n_seen = 0
        self._disagreement: list[float] = []

    def on_train_start(self, trainer: Trainer) -> None:
        fresh = trainer.epoch == 0 or self._mask is None
        super().on_train_start(trainer)
        if fresh:
            self._disagreement = []

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        super().on_epoch_start(trainer, epoch)
        self._disagreeing = epoch > self.init_epoch
        self._n_disagree = torch.zeros((), dtype=torch.long, device=trainer.device)
        self._n_seen = 0

    def batch_loss(self, trainer: Trainer, batch: Batch) -> torch.Tensor:
        m0, m1 = self._models
        disagree = disagreement_set(batch.logits[m0], batch.logits[m1])
        assert self._n_disagree is not None
        self._n_disagree += disagree.sum()
        self._n_seen += disagree.shape[0]
        if not self._disagreeing:
            return super().batch_loss(trainer, batch)
        assert self._mask is not None
        losses = (batch.per_sample_ce(m0), batch.per_sample_ce(m1))
        kept = tuple(small_loss_within(losses[k], disagree, self._rate) for k in (0, 1))
        for k in (0, 1):
            self._mask[k, batch.idx] |= kept[k]
        # Each network learns from what the other one kept.
        return _masked_mean(losses[0], kept[1]) + _masked_mean(losses[1], kept[0])

    def on_epoch_end(self, trainer: Trainer, epoch: int, stats: dict[str, float]) -> None:
        super().on_epoch_end(trainer, epoch, stats)
        assert self._n_disagree is not None
        share = float(self._n_disagree) / max(self._n_seen, 1)
        self._disagreement.append(share)
        stats["disagreement"] = share

    @property
    def disagreement_by_epoch_(self) -> np.ndarray:
        self._check_fitted()
        return np.asarray(self._disagreement, dtype=np.float64)
