"""Active-learning samplers: which noisy samples an expert relabels first.

Every sampler is one file and one :class:`~noisescore.ml.samplers.base.Sampler`,
registered by name in :data:`SAMPLERS`; :func:`create_sampler` builds one by name and
:meth:`Sampler.select` returns a :class:`Selection` (train indices in priority order and
each one's score). Plain numpy arrays in and out, no torch.

    random, entropy, coreset
"""

from __future__ import annotations

from noisescore.ml.samplers import coreset, entropy, random  # noqa: F401  (each registers itself)
from noisescore.ml.samplers.base import (
    SAMPLER_NAMES,
    SAMPLERS,
    Sampler,
    SamplerError,
    Selection,
    create_sampler,
    register_sampler,
)
from noisescore.ml.samplers.coreset import CoresetSampler
from noisescore.ml.samplers.entropy import EntropySampler, prediction_entropy
from noisescore.ml.samplers.random import RandomSampler

__all__ = [
    "SAMPLERS",
    "SAMPLER_NAMES",
    "CoresetSampler",
    "EntropySampler",
    "RandomSampler",
    "Sampler",
    "SamplerError",
    "Selection",
    "create_sampler",
    "prediction_entropy",
    "register_sampler",
]
