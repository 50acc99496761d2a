"""Is there anything to correct? A bimodality test on the histogram of LiNC's trust alpha.

Otsu's method always splits a histogram in two, even a unimodal one, so on nearly clean
data it flags (and would relabel) clean samples. The statistic here is Otsu's own
criterion normalised: the **between-class variance ratio**

    eta = w0 * w1 * (mu0 - mu1)^2 / var

of the two classes Otsu's threshold makes (``w`` the class fractions, ``mu`` the class
means, ``var`` the total variance). It is scale-free, lies in [0, 1], is 2/pi = 0.64
for a normal distribution, 0.75 for a uniform one and tends to 1 for two separated
modes. Ashman's D of the two classes is reported alongside. The threshold
(:data:`ETA_MIN`) was chosen on measured warm-ups (docs/RESULTS.md).
"""

from __future__ import annotations

import math

import numpy as np

from noisescore.ml.detector_names import ETA_MIN
from noisescore.ml.otsu import otsu_threshold

__all__ = ["ETA_MIN", "bimodality"]


#: Added to the distrust ``1 - alpha`` before its logarithm (``log_distrust``).
DISTRUST_FLOOR: float = 1e-3


def _eta(x: np.ndarray) -> tuple[float, float, float]:
    """(eta, Ashman's D, low-class fraction) of Otsu's split of ``x``."""
    t = otsu_threshold(x)
    low, high = x[x < t], x[x >= t]
    var = float(x.var())
    if var == 0.0 or low.size == 0 or high.size == 0:
        return 0.0, 0.0, float(low.size / x.size)
    w0, w1 = low.size / x.size, high.size / x.size
    gap = float(high.mean() - low.mean())
    spread = float(low.var() + high.var())
    d = math.sqrt(2.0) * abs(gap) / math.sqrt(spread) if spread > 0 else 1e6
    return w0 * w1 * gap * gap / var, min(d, 1e6), w0


def bimodality(
    values: np.ndarray, *, eta_min: float = ETA_MIN, log_distrust: bool = False
) -> dict[str, float | bool | str]:
    """The between-class variance ratio at Otsu's threshold and whether it passes ``eta_min``.

    ``log_distrust=True`` (LiNC's trust alpha in [0, 1]) also computes it on
    ``log(1 - alpha + 1e-3)`` and keeps the larger of the two. alpha's weight decay gives
    every sample a floor of distrust, so the clean samples form a narrow spike just below
    1; when the flipped samples' alpha stays close to it (hard data: BreastMNIST) only the
    log scale resolves the two modes, when it falls far (PneumoniaMNIST) the linear scale
    does and the log scale smears the clean spike. docs/RESULTS.md has both per run.

    Returns ``{"statistic": eta, "threshold": eta_min, "bimodal": eta >= eta_min,
    "ashman_d": D, "low_fraction": w0, "scale": "score" | "log_distrust",
    "statistic_score": ..., "statistic_log_distrust": ...}`` (JSON-ready; ``scale`` says
    which gave ``statistic``, ``low_fraction`` is the suspect side's share there). A
    constant score is not bimodal.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError("bimodality needs finite values")
    if not 0.0 <= eta_min <= 1.0:
        raise ValueError(f"eta_min must lie in [0, 1], got {eta_min}")
    eta, d, w0 = _eta(x)
    result: dict[str, float | bool | str] = {"statistic_score": float(eta)}
    scale = "score"
    if log_distrust:
        # -log(distrust) is increasing in alpha: low stays suspect.
        log_eta, log_d, log_w0 = _eta(-np.log(np.clip(1.0 - x, 0.0, None) + DISTRUST_FLOOR))
        result["statistic_log_distrust"] = float(log_eta)
        if log_eta > eta:
            eta, d, w0, scale = log_eta, log_d, log_w0, "log_distrust"
    return {
        "statistic": float(eta),
        "threshold": float(eta_min),
        "bimodal": bool(eta >= eta_min),
        "ashman_d": float(d),
        "low_fraction": float(w0),
        "scale": scale,
        **result,
    }
