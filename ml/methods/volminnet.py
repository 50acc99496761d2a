"""``volminnet``: VolMinNet (Li, Liu, Han, Lin, Wang, ICML 2021), label-noise learning
end to end without anchor points.

One network ``f`` models the clean posterior ``p = softmax(f(x))``; a trainable
row-stochastic transition matrix ``T`` (C, C) maps it to the noisy one, ``q = p @ T``.
Among all ``T`` that explain the noisy labels, the true one has the smallest volume
(the simplex its rows span), so the batch loss is (:func:`volminnet_loss`)

    ``L = mean_i -log (p_i @ T)_{y_i} + lambda * log det T``

(:func:`~noisescore.ml.methods.transition.forward_corrected_ce` and
:func:`volume_loss`; ``log |det T|`` as the official code's ``slogdet``), minimised
jointly over ``f`` and ``T``. Defaults: ``lambda = 1e-4`` (paper and official code).

``T`` is the official parametrisation (:class:`~noisescore.ml.methods.transition.
TransitionMatrix`): ``rownorm_L1(I + sigmoid(W) * (1 - I))``, ``W`` initialised to
``-init`` (``init = 2``, CIFAR-10 / MNIST; 4.5 for CIFAR-100), which keeps ``T``
row-stochastic with positive entries by construction and starts it near the identity.
``T`` has its own optimizer, SGD with ``lr = 0.01``, momentum 0.9, no weight decay (the
official CIFAR-10 setting; MNIST and CIFAR-100 use Adam at the same rate), whose rate is
divided by ``lr_gamma`` at the trainer's LR milestones (the official code steps one
``MultiStepLR`` per optimizer with the same milestones).

How it maps onto the one loop: the loss above is :meth:`VolMinNet.loss`; the one backward
fills the gradients of the network and of ``W``; the loop's Adam steps the network, and
:meth:`VolMinNet.after_step` steps ``W`` and zeroes its gradient. Prediction is the
network alone (``Method.predict_logits``): the official test pass uses ``f`` without
``T``. The fitted result is ``transition_``, ``T`` at the end of each epoch, and each
epoch's history gets ``volume`` (``log det T``).

Deviations: the network is trained with the loop's optimizer (Adam, the benchmark's
rate) instead of the official SGD, lr 0.01, momentum 0.9, weight decay 1e-4; the official
code keeps the epoch of best noisy-validation loss, the loop keeps the last epoch.
LNMBench has no VolMinNet folder, so there is nothing of it to deviate from.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from noisescore.ml.methods.base import Method, MethodError, register_method
from noisescore.ml.methods.transition import TransitionMatrix, forward_corrected_ce
from noisescore.ml.train import Trainer

__all__ = ["VolMinNet", "volminnet_loss", "volume_loss"]


def volume_loss(transition: torch.Tensor) -> torch.Tensor:
    """``log |det T|``, the volume term VolMinNet minimises.

    Parameters
    ----------
    transition : torch.Tensor, shape (C, C)

    Returns
    -------
    torch.Tensor, shape (), with gradients to ``transition``
    """
    return torch.linalg.slogdet(transition).logabsdet


def volminnet_loss(
    logits: torch.Tensor,
    transition: torch.Tensor,
    labels: torch.Tensor,
    *,
    lam: float = 1e-4,
) -> torch.Tensor:
    """The batch loss ``mean_i -log (p_i @ T)_{y_i} + lam * log |det T|``.

    Parameters
    ----------
    logits : torch.Tensor, shape (B, C)
    transition : torch.Tensor, shape (C, C)
    labels : torch.Tensor, shape (B,), int64
        The observed (noisy) labels.
    lam : float
        ``lambda >= 0``, the weight of the volume.

    Returns
    -------
    torch.Tensor, shape (), with gradients to ``logits`` and ``transition``
    """
    return forward_corrected_ce(logits, transition, labels).mean() + lam * volume_loss(transition)


@register_method("volminnet")
class VolMinNet(Method):
    """VolMinNet as a training-loop hook.

    Parameters
    ----------
    n_samples, n_classes : int
    peer : None
        One network.
    lam : float
        ``lambda >= 0``, the weight of ``log det T`` (paper: 1e-4).
    init : float
        ``T``'s free matrix starts at ``-init`` (official: 2; 4.5 for CIFAR-100).
    transition_lr : float
        ``> 0``, SGD rate of ``T`` (official CIFAR-10: 0.01).
    transition_momentum : float
        In [0, 1), SGD momentum of ``T`` (official: 0.9).

    Attributes
    ----------
    transition_ : np.ndarray, shape (C, C), float64
        The learned ``T`` (row-stochastic), updated at the end of every epoch; the
        initial ``T`` before training.
    """

    summary = "forward-corrected CE + lambda log det T, learned T, lambda 1e-4 (Li et al. 2021)"
    n_models = 1

    def __init__(
        self,
        *,
        n_samples: int,
        n_classes: int,
        peer: nn.Module | None = None,
        lam: float = 1e-4,
        init: float = 2.0,
        transition_lr: float = 0.01,
        transition_momentum: float = 0.9,
    ):
        super().__init__(n_samples=n_samples, n_classes=n_classes, peer=peer)
        if not (np.isfinite(lam) and lam >= 0):
            raise MethodError(f"lam (the volume weight lambda) must be >= 0, got {lam!r}")
        if not np.isfinite(init):
            raise MethodError(f"init must be a finite float, got {init!r}")
        if not (np.isfinite(transition_lr) and transition_lr > 0):
            raise MethodError(f"transition_lr must be > 0, got {transition_lr!r}")
        if not 0.0 <= transition_momentum < 1.0:
            raise MethodError(
                f"transition_momentum must lie in [0, 1), got {transition_momentum!r}"
            )
        self.lam = float(lam)
        self.init = float(init)
        self.transition_lr = float(transition_lr)
        self.transition_momentum = float(transition_momentum)
        self.transition = TransitionMatrix(n_classes, init=self.init)
        self.transition_optimizer: torch.optim.SGD | None = None
        self.transition_scheduler: torch.optim.lr_scheduler.MultiStepLR | None = None
        self.transition_ = self._current()

    def _current(self) -> np.ndarray:
        with torch.no_grad():
            return self.transition().double().cpu().numpy()

    def on_train_start(self, trainer: Trainer) -> None:
        self.transition.to(trainer.device)
        if self.transition_optimizer is None:  # a later phase of the same run keeps its state
            self.transition_optimizer = torch.optim.SGD(
                self.transition.parameters(),
                lr=self.transition_lr,
                momentum=self.transition_momentum,
                weight_decay=0.0,
            )
            self.transition_scheduler = torch.optim.lr_scheduler.MultiStepLR(
                self.transition_optimizer,
                milestones=trainer.config.milestones(),
                gamma=trainer.config.lr_gamma,
            )

    def loss(
        self, trainer: Trainer, logits: torch.Tensor, idx: torch.Tensor, epoch: int
    ) -> torch.Tensor:
        return volminnet_loss(logits, self.transition(), trainer.labels[idx], lam=self.lam)

    def after_step(self, trainer: Trainer, idx: torch.Tensor, epoch: int) -> None:
        if self.transition_optimizer is None:
            raise MethodError("volminnet: on_train_start was not called before training")
        self.transition_optimizer.step()
        self.transition_optimizer.zero_grad(set_to_none=True)

    def on_epoch_end(self, trainer: Trainer, epoch: int, stats: dict[str, float]) -> None:
        if self.transition_scheduler is not None:
            self.transition_scheduler.step()
        self.transition_ = self._current()
        stats["volume"] = float(np.linalg.slogdet(self.transition_)[1])
