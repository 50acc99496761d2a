"""``grand``: the GraNd score, per-sample gradient norm (Paul et al., NeurIPS 2021).

**Last-layer closed form**, not the full-network gradient: for cross-entropy on the
final linear layer ``z = W h + b``, ``dL/dW = (p - y) h^T`` and ``dL/db = p - y``, so the
norm of the last layer's gradient is exactly ``||p - y||_2 * ||[h, 1]||_2``. It needs the
layer's input ``h`` (the trainer captures it: ``needs_features``), no backward pass per
sample. Score = minus that norm, from the sample's step in the latest epoch.
"""

from __future__ import annotations

import torch

from noisescore.ml.detectors.base import Detector, DetectorError, register_detector
from noisescore.ml.detectors.el2n import el2n
from noisescore.ml.train import Step, Trainer


def last_layer_grad_norm(
    logits: torch.Tensor, labels: torch.Tensor, features: torch.Tensor
) -> torch.Tensor:
    """``||p - onehot|| * sqrt(||h||^2 + 1)`` per row: the norm of CE's gradient wrt the
    final linear layer's weight and bias, shape (B,)."""
    h2 = features.float().pow(2).sum(dim=1)
    return el2n(logits, labels) * torch.sqrt(h2 + 1)


@register_detector("grand")
class GraNd(Detector):
    summary = "minus the last-layer gradient norm ||p - y|| * ||[h, 1]|| (Paul et al. 2021)"
    needs_features = True

    def reset(self, n_samples: int, device: torch.device) -> None:
        self.norm = torch.zeros(n_samples, device=device)

    def update(self, trainer: Trainer, step: Step) -> None:
        if step.features is None:
            raise DetectorError("grand needs the final layer's input (Trainer did not capture)")
        self.norm.index_copy_(
            0, step.idx, last_layer_grad_norm(step.logits, step.labels, step.features)
        )

    def score(self, trainer: Trainer, epoch: int) -> torch.Tensor:
        return -self.norm
