"""``ce_ls``: cross-entropy with label smoothing (Szegedy et al., CVPR 2016).

The one-hot target of the observed label ``y`` is mixed with the uniform distribution over
the ``C`` classes,

    ``q_k = (1 - eps) [k = y] + eps / C``,

and the loss is the cross-entropy ``-sum_k q_k log p_k`` against it
(:func:`smoothed_targets`; the loop computes it with ``F.cross_entropy(...,
label_smoothing=eps)``, which is the same target). ``eps = 0.1``, the paper's value and
LNMBench's setting. Under label noise the smoothed target bounds how confident the network
is pushed to be on any label, a wrong one included (Lukasik et al., ICML 2020).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from noisescore.ml.methods.base import Method, MethodError, register_method
from noisescore.ml.train import Trainer

__all__ = ["LabelSmoothingCE", "smoothed_targets"]


def smoothed_targets(labels: torch.Tensor, n_classes: int, smoothing: float) -> torch.Tensor:
    """The smoothed target distribution ``(1 - eps) onehot(y) + eps / C``.

    Parameters
    ----------
    labels : torch.Tensor, shape (B,), int64
    n_classes : int
        ``C``.
    smoothing : float
        ``eps`` in ``[0, 1]``.

    Returns
    -------
    torch.Tensor, shape (B, C), float32
        Rows sum to 1.
    """
    onehot = F.one_hot(labels, n_classes).float()
    return (1.0 - smoothing) * onehot + smoothing / n_classes


@register_method("ce_ls")
class LabelSmoothingCE(Method):
    """Cross-entropy against the label-smoothed target.

    Parameters
    ----------
    n_samples, n_classes : int
    peer : None
        One network.
    smoothing : float
        ``eps`` in ``[0, 1)`` (paper and LNMBench: 0.1).
    """

    summary = "cross-entropy with label smoothing 0.1 (Szegedy et al. 2016)"
    n_models = 1

    def __init__(
        self,
        *,
        n_samples: int,
        n_classes: int,
        peer: nn.Module | None = None,
        smoothing: float = 0.1,
    ):
        super().__init__(n_samples=n_samples, n_classes=n_classes, peer=peer)
        if not 0.0 <= smoothing < 1.0:
            raise MethodError(f"smoothing must lie in [0, 1), got {smoothing!r}")
        self.smoothing = float(smoothing)

    def loss(
        self, trainer: Trainer, logits: torch.Tensor, idx: torch.Tensor, epoch: int
    ) -> torch.Tensor:
        return F.cross_entropy(logits, trainer.labels[idx], label_smoothing=self.smoothing)
