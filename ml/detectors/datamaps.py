"""``datamaps``: Dataset Cartography (Swayamdipta et al., EMNLP 2020).

Confidence = mean over the epochs so far of the probability the model gives the
observed label (at the sample's training step); variability = its standard deviation
over epochs. "Hard-to-learn" samples (low confidence, low variability) hold most of the
mislabelled ones. Score = confidence; variability is kept as ``datamaps_variability``.
"""

from __future__ import annotations

import torch

from noisescore.ml.detectors.base import Detector, observed_probability, register_detector
from noisescore.ml.train import Step, Trainer


class _ConfidenceMoments(Detector):
    """Running sums of p(observed) and its square over epochs: O(N) state."""

    def reset(self, n_samples: int, device: torch.device) -> None:
        self.sum = torch.zeros(n_samples, device=device)
        self.sum_sq = torch.zeros(n_samples, device=device)
        self.count = torch.zeros(n_samples, device=device)

    def update(self, trainer: Trainer, step: Step) -> None:
        p = observed_probability(step.logits, step.labels)
        self.sum.index_add_(0, step.idx, p)
        self.sum_sq.index_add_(0, step.idx, p * p)
        self.count.index_add_(0, step.idx, torch.ones_like(p))

    def confidence(self) -> torch.Tensor:
        return self.sum / self.count.clamp_min(1)

    def second_moment(self) -> torch.Tensor:
        return self.sum_sq / self.count.clamp_min(1)


@register_detector("datamaps")
class DataMaps(_ConfidenceMoments):
    summary = "mean confidence in the observed label over epochs (Swayamdipta et al. 2020)"

    def score(self, trainer: Trainer, epoch: int) -> torch.Tensor:
        return self.confidence()

    def extras(self) -> dict[str, torch.Tensor]:
        mean = self.confidence()
        return {"datamaps_variability": (self.second_moment() - mean * mean).clamp_min(0).sqrt()}
