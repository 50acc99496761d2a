"""``entropy``: uncertainty sampling, the candidates whose prediction is least certain first.

The priority of candidate ``i`` is the Shannon entropy of the model's softmax,
``H_i = -sum_c p_ic log p_ic`` in nats (``0 log 0 = 0``), between 0 (one-hot) and
``log C`` (uniform). Highest entropy first; equal entropies go to the smaller train
index. Khanal et al. (2024) rank the noisy set with it after training on the clean set.
"""

from __future__ import annotations

import numpy as np

from noisescore.ml.samplers.base import Sampler, register_sampler

__all__ = ["EntropySampler", "prediction_entropy"]


def prediction_entropy(proba: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of ``proba``, shape (M, C) -> (M,) float64."""
    p = np.asarray(proba, dtype=np.float64)
    logp = np.zeros_like(p)
    np.log(p, out=logp, where=p > 0)
    return np.maximum(-(p * logp).sum(axis=1), 0.0)


@register_sampler("entropy")
class EntropySampler(Sampler):
    """Highest prediction entropy first; score = the entropy in nats."""

    summary = "highest entropy of the model's prediction first"
    needs_proba = True

    def rank(
        self,
        *,
        n_candidates: int,
        budget: int,
        proba: np.ndarray | None,
        features: np.ndarray | None,
        labelled_features: np.ndarray | None,
        seed: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        assert proba is not None  # select() requires it (needs_proba)
        entropy = prediction_entropy(proba)
        order = np.argsort(-entropy, kind="stable")[:budget]
        return order, entropy[order]
