"""``data_iq``: Data-IQ (Seedat et al., NeurIPS 2022).

Confidence ``c = mean_e p_e`` and aleatoric uncertainty ``a = mean_e p_e (1 - p_e)`` of
the observed label's probability over the epochs so far. Data-IQ calls a sample *hard*
(where mislabelled samples go) when ``c`` is low **and** ``a`` is low, *ambiguous* when
``a`` is high. One score that orders hard < ambiguous < easy is ``c + a``: the
aleatoric term lifts the ambiguous samples (``c ~ 0.5``, ``a ~ 0.25``) above the
consistently wrong ones. Aleatoric uncertainty is kept as ``data_iq_aleatoric``.
"""

from __future__ import annotations

import torch

from noisescore.ml.detectors.base import register_detector
from noisescore.ml.detectors.datamaps import _ConfidenceMoments
from noisescore.ml.train import Trainer


@register_detector("data_iq")
class DataIQ(_ConfidenceMoments):
    summary = "confidence + aleatoric uncertainty over epochs (Seedat et al. 2022)"

    def aleatoric(self) -> torch.Tensor:
        return self.confidence() - self.second_moment()

    def score(self, trainer: Trainer, epoch: int) -> torch.Tensor:
        return self.confidence() + self.aleatoric()

    def extras(self) -> dict[str, torch.Tensor]:
        return {"data_iq_aleatoric": self.aleatoric()}
