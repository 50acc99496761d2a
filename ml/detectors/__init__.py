"""Label-noise detectors: per-sample scores, lower = more likely mislabelled.

Every detector is one file and one :class:`~noisescore.ml.detectors.base.Detector` (a
hook on the one training loop), registered by name in :data:`DETECTORS`; all of them
record their score at every warm-up epoch of the LiNC run, with O(N) floats of state
(``confident_learning``: one (N, C) buffer). ``consensus`` combines them without labels
(:mod:`noisescore.ml.detectors.consensus`).

    linc, small_loss, aum, el2n, grand, datamaps, data_iq, cnlcu, confident_learning
"""

from __future__ import annotations

from collections.abc import Sequence

from noisescore.ml.detector_names import (
    CONSENSUS,
    DETECTOR_NAMES,
    OOF,
    check_flag_by,
    parse_detectors,
)
from noisescore.ml.detectors import (  # noqa: F401  (each module registers itself)
    aum,
    cnlcu,
    confident_learning,
    data_iq,
    datamaps,
    el2n,
    grand,
    linc,
    small_loss,
)
from noisescore.ml.detectors.base import DETECTORS, Detector, DetectorError, register_detector
from noisescore.ml.detectors.consensus import consensus_by_epoch, consensus_score

__all__ = [
    "CONSENSUS",
    "DETECTORS",
    "DETECTOR_NAMES",
    "OOF",
    "Detector",
    "DetectorError",
    "check_flag_by",
    "consensus_by_epoch",
    "consensus_score",
    "create_detectors",
    "parse_detectors",
    "register_detector",
]


def create_detectors(names: Sequence[str], n_classes: int, *, warmup_epochs: int) -> list[Detector]:
    """One fresh detector hook per name (validated with :func:`parse_detectors`)."""
    return [DETECTORS[n](n_classes, warmup_epochs=warmup_epochs) for n in parse_detectors(names)]
