"""``small_loss``: the per-sample cross-entropy on the observed label (small-loss trick).

Score = minus the loss of the sample's training step in the latest epoch (the forward
pass the optimiser used, train mode): a high loss, i.e. a low score, is suspect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from noisescore.ml.detectors.base import Detector, register_detector
from noisescore.ml.train import Step, Trainer


@register_detector("small_loss")
class SmallLoss(Detector):
    summary = "minus the cross-entropy on the observed label, latest epoch"

    def reset(self, n_samples: int, device: torch.device) -> None:
        self.last_loss = torch.zeros(n_samples, device=device)

    def update(self, trainer: Trainer, step: Step) -> None:
        loss = F.cross_entropy(step.logits, step.labels, reduction="none")
        self.last_loss.index_copy_(0, step.idx, loss)

    def score(self, trainer: Trainer, epoch: int) -> torch.Tensor:
        return -self.last_loss
