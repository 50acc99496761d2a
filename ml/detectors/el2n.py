"""``el2n``: the Error L2-Norm ``||softmax - onehot(observed)||_2`` (Paul et al., NeurIPS 2021).

From the sample's training step in the latest epoch, one network (the paper averages
a few independent initialisations early in training). Score = minus EL2N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from noisescore.ml.detectors.base import Detector, register_detector
from noisescore.ml.train import Step, Trainer


def el2n(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``||softmax(logits) - onehot(labels)||_2`` per row, shape (B,)."""
    error = F.softmax(logits, dim=1) - F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return torch.linalg.vector_norm(error, dim=1)


@register_detector("el2n")
class EL2N(Detector):
    summary = "minus ||softmax - onehot||_2, latest epoch (Paul et al. 2021)"

    def reset(self, n_samples: int, device: torch.device) -> None:
        self.error = torch.zeros(n_samples, device=device)

    def update(self, trainer: Trainer, step: Step) -> None:
        self.error.index_copy_(0, step.idx, el2n(step.logits, step.labels))

    def score(self, trainer: Trainer, epoch: int) -> torch.Tensor:
        return -self.error
