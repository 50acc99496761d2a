"""``consensus``: an unsupervised combination of the detectors' scores (no true labels).

Each detector's score is turned into normalised ranks in ``(0, 1]`` (average ranks for
ties, divided by N), so that scales (alpha in [0, 1], margins, losses) do not matter,
and the consensus is their **median**: ``consensus_i = median_d rank_d(i) / N``. Lower =
more suspect, like every detector.

Why the median: several detectors are near-copies of one another (with two classes
``small_loss``, ``el2n`` and ``confident_learning`` rank identically), so a mean lets such
a block outvote the rest when it is wrong. Measured (docs/RESULTS.md, "Consensus rules
compared"): the mean rank fell 0.035 AUROC below the best detector on PneumoniaMNIST
``symmetric:0.4``, where the latest-epoch block ranks poorly; the median stayed within
0.01 of the best on every setting measured, and within 0.005 of the mean elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.stats import rankdata

CONSENSUS = "consensus"


def normalised_ranks(score: np.ndarray) -> np.ndarray:
    """Average ranks of ``score`` divided by N: the lowest score gets the smallest rank."""
    score = np.asarray(score, dtype=np.float64)
    return (rankdata(score, method="average") / max(len(score), 1)).astype(np.float32)


def consensus_score(scores: Mapping[str, np.ndarray]) -> np.ndarray:
    """Median normalised rank over the given (N,) scores, float32 (N,)."""
    if not scores:
        raise ValueError("consensus needs at least one detector score")
    ranks = np.stack([normalised_ranks(s) for s in scores.values()])
    return np.median(ranks, axis=0).astype(np.float32)


def consensus_by_epoch(scores_by_epoch: Mapping[str, np.ndarray]) -> np.ndarray:
    """:func:`consensus_score` of every epoch's row, (E, N) float32."""
    epochs = {s.shape[0] for s in scores_by_epoch.values()}
    if len(epochs) != 1:
        raise ValueError(f"detectors recorded different numbers of epochs: {sorted(epochs)}")
    (n_epochs,) = epochs
    return np.stack(
        [consensus_score({k: v[e] for k, v in scores_by_epoch.items()}) for e in range(n_epochs)]
    )
