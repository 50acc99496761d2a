"""``random``: a uniform draw without replacement, the baseline of every active-learning
comparison (Khanal et al. 2024, Figs. 2–3).

Each candidate gets one ``U(0, 1)`` draw from a generator seeded with ``seed``; the
candidates with the largest draws come first, and the score is the draw. Draws are made
in train-index order, so the same pool and seed give the same selection whatever order
the pool is given in.
"""

from __future__ import annotations

import numpy as np

from noisescore.ml.samplers.base import Sampler, register_sampler

__all__ = ["RandomSampler"]


@register_sampler("random")
class RandomSampler(Sampler):
    """Uniformly at random, without replacement (seeded); score = the uniform draw."""

    summary = "uniformly at random, without replacement (seeded)"

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
        draws = np.random.default_rng(seed).random(n_candidates)
        order = np.argsort(-draws, kind="stable")[:budget]
        return order, draws[order]
