"""Detector names and the flagging choices, checked without importing torch.

The settings (shared with the torch-free gRPC service) validate ``--detectors`` and
``--flag-by`` with these; the registry :data:`noisescore.ml.detectors.DETECTORS` holds
one class per name here (a test keeps the two equal).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

#: Every detector, ``linc`` first (the order of report sections and trust.csv columns).
DETECTOR_NAMES: tuple[str, ...] = (
    "linc",
    "aum",
    "cnlcu",
    "confident_learning",
    "data_iq",
    "datamaps",
    "el2n",
    "grand",
    "small_loss",
)
#: The unsupervised combination of the detectors (median normalised rank).
CONSENSUS = "consensus"
#: The K-fold out-of-fold confident-learning score (``--cl-folds K``), not a hook.
OOF = "confident_learning_oof"
#: Default minimum between-class variance ratio for the correction to run.
ETA_MIN: float = 0.83


class DetectorError(ValueError):
    """An unknown detector name, or a flagging score the job does not compute."""


def parse_detectors(value: str | Iterable[str]) -> tuple[str, ...]:
    """``"all"`` or comma-separated names -> known names in :data:`DETECTOR_NAMES` order.

    ``linc`` is always included (it is the training's own trust). Unknown names raise
    :class:`DetectorError` listing the valid ones.
    """
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [n.strip().lower() for n in names if n.strip()]
    valid = ", ".join(DETECTOR_NAMES)
    if not names:
        raise DetectorError(f"no detector named; use 'all' or some of: {valid}")
    if "all" in names:
        if names != ["all"]:
            raise DetectorError("'all' cannot be combined with detector names")
        return DETECTOR_NAMES
    unknown = [n for n in names if n not in DETECTOR_NAMES]
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise DetectorError(
            f"unknown detector{plural} {', '.join(map(repr, unknown))}; "
            f"valid detectors: {valid} (or 'all')"
        )
    chosen = {"linc", *names}
    return tuple(n for n in DETECTOR_NAMES if n in chosen)


def flag_choices(detectors: Sequence[str], cl_folds: int) -> list[str]:
    """The scores a job with these detectors can flag by."""
    return [*detectors, CONSENSUS, *([OOF] if cl_folds else [])]


def check_flag_by(flag_by: str, detectors: Sequence[str], cl_folds: int) -> str:
    """``flag_by`` normalised; DetectorError unless the job computes that score."""
    name = flag_by.strip().lower()
    choices = flag_choices(detectors, cl_folds)
    if name not in choices:
        raise DetectorError(
            f"flag_by {flag_by!r} is not a score this job computes; choose one of: "
            f"{', '.join(choices)}"
        )
    return name
