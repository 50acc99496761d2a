"""``sce``: symmetric cross-entropy (Wang et al., ICCV 2019).

Cross-entropy ``H(q, p) = -sum_k q_k log p_k`` (``q`` the one-hot observed label, ``p`` the
prediction) fits noisy labels as eagerly as clean ones. Wang et al. add its reverse,
``H(p, q) = -sum_k p_k log q_k``, which is robust to label noise (a bounded, symmetric
loss): per sample

    ``l_SCE = alpha * CE + beta * RCE``, ``RCE = -sum_k p_k log q_k``,

with ``log 0`` clamped to a constant ``A < 0`` (the paper's ``A = -4``). For a one-hot
label ``y`` only the ``k != y`` terms survive, so ``RCE = -A (1 - p_y)``: a scaled
mean absolute error (:func:`reverse_cross_entropy`). The batch loss is the mean of
``l_SCE``.

Defaults: ``alpha = 0.1, beta = 1.0``, the paper's CIFAR-10 setting. The paper tunes them
per dataset (MNIST ``alpha = 0.01, beta = 1``; CIFAR-100 ``alpha = 6, beta = 0.1``);
medical sets have no published setting, so the CIFAR-10 one is the default and both are
parameters.

Deviation from common code: the widely used PyTorch SCE implementations clamp the one-hot
label at ``1e-4`` before the log, i.e. ``A = ln 1e-4 = -9.21`` (an RCE 2.3x the paper's),
and clamp ``p`` at ``1e-7``; we use the paper's ``A = -4`` (parameter ``log_zero``) and
the exact ``p``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from noisescore.ml.methods.base import Method, MethodError, register_method
from noisescore.ml.train import Trainer

__all__ = ["SymmetricCE", "reverse_cross_entropy", "symmetric_cross_entropy"]


def reverse_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, log_zero: float = -4.0
) -> torch.Tensor:
    """``RCE = -sum_k p_k log q_k`` with ``log 0 := A``, i.e. ``-A (1 - p_y)``.

    Parameters
    ----------
    logits : torch.Tensor, shape (B, C)
    labels : torch.Tensor, shape (B,), int64
        The observed labels ``y`` (one-hot ``q``).
    log_zero : float
        ``A < 0``, the value of ``log 0``.

    Returns
    -------
    torch.Tensor, shape (B,)
        Per-sample RCE in ``[0, -A]``, with gradients.
    """
    p_y = F.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    return -log_zero * (1.0 - p_y)


def symmetric_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.1,
    beta: float = 1.0,
    log_zero: float = -4.0,
) -> torch.Tensor:
    """``alpha * CE + beta * RCE`` per sample, shape (B,) (see :func:`reverse_cross_entropy`)."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    return alpha * ce + beta * reverse_cross_entropy(logits, labels, log_zero=log_zero)


@register_method("sce")
class SymmetricCE(Method):
    """Symmetric cross-entropy as the loop's loss.

    Parameters
    ----------
    n_samples, n_classes : int
    peer : None
        One network.
    alpha : float
        Weight of CE, ``>= 0`` (paper, CIFAR-10: 0.1).
    beta : float
        Weight of RCE, ``>= 0`` (paper, CIFAR-10: 1.0).
    log_zero : float
        ``A < 0``, the clamp of ``log 0`` in RCE (paper: -4).
    """

    summary = "alpha CE + beta reverse CE, alpha 0.1, beta 1, A -4 (Wang et al. 2019)"
    n_models = 1

    def __init__(
        self,
        *,
        n_samples: int,
        n_classes: int,
        peer: nn.Module | None = None,
        alpha: float = 0.1,
        beta: float = 1.0,
        log_zero: float = -4.0,
    ):
        super().__init__(n_samples=n_samples, n_classes=n_classes, peer=peer)
        if not (alpha >= 0 and beta >= 0 and alpha + beta > 0):
            raise MethodError(
                f"alpha and beta must be >= 0 and not both 0, got alpha={alpha!r}, beta={beta!r}"
            )
        if not log_zero < 0:
            raise MethodError(f"log_zero (the paper's A) must be < 0, got {log_zero!r}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.log_zero = float(log_zero)

    def loss(
        self, trainer: Trainer, logits: torch.Tensor, idx: torch.Tensor, epoch: int
    ) -> torch.Tensor:
        return symmetric_cross_entropy(
            logits, trainer.labels[idx], alpha=self.alpha, beta=self.beta, log_zero=self.log_zero
        ).mean()
