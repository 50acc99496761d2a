"""``linc``: LiNC's trust alpha (Algorithm 1 of the paper), read from the LiNC hook.

Alpha is trained by :class:`noisescore.ml.linc.LiNC` itself; this detector records it
every warm-up epoch like the others (it adds no state and no compute: a view of alpha).
"""

from __future__ import annotations

import torch

from noisescore.ml.detectors.base import Detector, DetectorError, register_detector
from noisescore.ml.linc import LiNC
from noisescore.ml.train import Trainer


@register_detector("linc")
class LincTrust(Detector):
    summary = "LiNC's trust alpha (the training's own trust parameter)"
    # No state of its own: at epoch end it reads alpha, which the LiNC hook (before it in
    # the hooks) has already merged over the processes of a distributed run.

    def score(self, trainer: Trainer, epoch: int) -> torch.Tensor:
        for hook in trainer.hooks:
            if isinstance(hook, LiNC) and hook.alpha is not None:
                return hook.alpha.clone()
        raise DetectorError("the 'linc' detector needs the LiNC hook on the same trainer")
