"""Learning-with-noisy-labels methods: how the one training loop treats noisy labels.

Every method is one file and one :class:`~noisescore.ml.methods.base.Method` (a hook on
the one training loop), registered by name in :data:`METHODS`; :func:`create_method`
builds one by name. Two-network methods (``n_models == 2``) take the second network as
``peer``. Shared pieces: the forget-rate schedule and small-loss selection
(:mod:`~noisescore.ml.methods.schedule`), the VOG tracker (:mod:`~noisescore.ml.methods.vog`).

    cdr, ce, ce_ls, codis, coteaching, coteaching_plus, coteaching_vog, disc, dividemix,
    jocor, linc, sce, t_revision, volminnet
"""

from __future__ import annotations

from noisescore.ml.methods import ce, coteaching, coteaching_vog  # noqa: F401  (registration)
from noisescore.ml.methods.base import (
    METHOD_NAMES,
    METHODS,
    Method,
    MethodError,
    create_method,
    method_params,
    register_method,
)
from noisescore.ml.methods.cdr import CDR
from noisescore.ml.methods.ce import CrossEntropy
from noisescore.ml.methods.ce_ls import LabelSmoothingCE
from noisescore.ml.methods.codis import CoDis
from noisescore.ml.methods.coteaching import CoTeaching
from noisescore.ml.methods.coteaching_plus import CoTeachingPlus
from noisescore.ml.methods.coteaching_vog import CoTeachingVOG, mixed_selection
from noisescore.ml.methods.disc import DISC
from noisescore.ml.methods.dividemix import DivideMix
from noisescore.ml.methods.jocor import JoCoR
from noisescore.ml.methods.linc import LiNCMethod
from noisescore.ml.methods.sce import SymmetricCE
from noisescore.ml.methods.schedule import forget_rate_schedule, n_keep, small_loss_indices
from noisescore.ml.methods.t_revision import TRevision
from noisescore.ml.methods.vog import VOGMode, VOGTracker, label_row_gradient
from noisescore.ml.methods.volminnet import VolMinNet

__all__ = [
    "CDR",
    "DISC",
    "METHODS",
    "METHOD_NAMES",
    "CoDis",
    "CoTeaching",
    "CoTeachingPlus",
    "CoTeachingVOG",
    "CrossEntropy",
    "DivideMix",
    "JoCoR",
    "LabelSmoothingCE",
    "LiNCMethod",
    "Method",
    "MethodError",
    "SymmetricCE",
    "TRevision",
    "VOGMode",
    "VOGTracker",
    "VolMinNet",
    "create_method",
    "forget_rate_schedule",
    "label_row_gradient",
    "method_params",
    "mixed_selection",
    "n_keep",
    "register_method",
    "small_loss_indices",
]
