"""``ce``: plain cross-entropy on the observed labels, the baseline.

A no-op hook: the loop's default loss is the mean cross-entropy of ``trainer.model``.
Registered so that every comparison (CE vs Co-teaching vs Co-teaching VOG) names its
method the same way.
"""

from __future__ import annotations

from noisescore.ml.methods.base import Method, register_method


@register_method("ce")
class CrossEntropy(Method):
    summary = "plain cross-entropy on the observed labels (the loop's default loss)"
    n_models = 1
