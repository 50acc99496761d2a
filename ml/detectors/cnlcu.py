"""``cnlcu``: CNLCU-S (Xia et al., ICLR 2022, "Sample selection with uncertainty of losses").

The loss history of a sample is summarised robustly: each epoch's cross-entropy ``l``
is soft-truncated, ``psi(l) = log(1 + l + l^2 / 2)`` (Catoni), averaged over the ``n``
epochs seen, and a confidence bound is subtracted,
``lcb = relu(mean psi - s2 (n + s2 log(2n) / n^2) / (n - s2))`` with ``s2 = 0.1`` (the
authors' code, where ``n`` counts the times the sample was selected; during a warm-up
every sample is seen once per epoch). The lower confidence bound of the loss is what
CNLCU-S selects clean samples by; score = minus it (a high loss bound is suspect).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from noisescore.ml.detectors.base import Detector, register_detector
from noisescore.ml.train import Step, Trainer

SIGMA2 = 0.1


def soft_truncate(loss: torch.Tensor) -> torch.Tensor:
    """Catoni's ``psi(l) = log(1 + l + l^2 / 2)``."""
    return torch.log1p(loss + loss * loss / 2)


def loss_lcb(mean_soft: torch.Tensor, n: torch.Tensor, sigma2: float = SIGMA2) -> torch.Tensor:
    """CNLCU-S's lower confidence bound of the loss from the mean soft loss over ``n`` epochs."""
    n = n.clamp_min(1)
    bound = sigma2 * (n + sigma2 * torch.log(2 * n) / (n * n)) / (n - sigma2)
    return F.relu(mean_soft - bound)


@register_detector("cnlcu")
class CNLCU(Detector):
    summary = "minus CNLCU-S's lower confidence bound of the loss history (Xia et al. 2022)"

    def reset(self, n_samples: int, device: torch.device) -> None:
        self.total = torch.zeros(n_samples, device=device)
        self.count = torch.zeros(n_samples, device=device)

    def update(self, trainer: Trainer, step: Step) -> None:
        loss = F.cross_entropy(step.logits, step.labels, reduction="none")
        self.total.index_add_(0, step.idx, soft_truncate(loss))
        self.count.index_add_(0, step.idx, torch.ones_like(loss))

    def score(self, trainer: Trainer, epoch: int) -> torch.Tensor:
        return -loss_lcb(self.total / self.count.clamp_min(1), self.count)
