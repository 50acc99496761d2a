"""``aum``: Area Under the Margin (Pleiss et al., NeurIPS 2020).

The margin of a step is the observed label's logit minus the largest other logit; AUM is
its mean over the epochs so far (one training step per sample and epoch). Mislabelled
samples have negative margins for long: low AUM is suspect. Pleiss et al. also train
with extra "threshold samples" to pick a cut-off; only the ranking is computed here.
"""

from __future__ import annotations

import torch

from noisescore.ml.detectors.base import Detector, observed_margin, register_detector
from noisescore.ml.train import Step, Trainer


@register_detector("aum")
class AUM(Detector):
    summary = "mean logit margin of the observed label over the epochs (Pleiss et al. 2020)"

    def reset(self, n_samples: int, device: torch.device) -> None:
        self.total = torch.zeros(n_samples, device=device)
        self.count = torch.zeros(n_samples, device=device)

    def update(self, trainer: Trainer, step: Step) -> None:
        self.total.index_add_(0, step.idx, observed_margin(step.logits, step.labels))
        self.count.index_add_(0, step.idx, torch.ones_like(step.idx, dtype=torch.float32))

    def score(self, trainer: Trainer, epoch: int) -> torch.Tensor:
        return self.total / self.count.clamp_min(1)
