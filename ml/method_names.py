"""Names of the learning-with-noisy-labels methods and active-learning samplers, checked
without importing torch.

The settings (shared with the torch-free gRPC service) validate ``--lnl-method`` and
``--sampler`` with these; the registries :data:`noisescore.ml.methods.METHODS` and
:data:`noisescore.ml.samplers.SAMPLERS` hold one class per name here (the tests keep
them equal).
"""

from __future__ import annotations

from collections.abc import Sequence

#: The built-in methods' names, sorted.
METHOD_NAMES: tuple[str, ...] = (
    "cdr",
    "ce",
    "ce_ls",
    "codis",
    "coteaching",
    "coteaching_plus",
    "coteaching_vog",
    "disc",
    "dividemix",
    "jocor",
    "linc",
    "sce",
    "t_revision",
    "volminnet",
)
#: The benchmark's default methods: LNMBench's twelve and LiNC (not Co-teaching VOG, the
#: active-cleaning selector).
BENCH_METHODS: tuple[str, ...] = tuple(m for m in METHOD_NAMES if m != "coteaching_vog")
#: Methods that can select a clean set for active label cleaning (``--lnl-method``).
SELECTION_METHODS: tuple[str, ...] = ("ce", "coteaching", "coteaching_vog")
#: Active-learning samplers that rank the suspects for the expert (``--sampler``).
SAMPLER_NAMES: tuple[str, ...] = ("coreset", "entropy", "random")


class MethodError(ValueError):
    """An unknown method name or parameter, or a method used the wrong way."""


def check_method_name(name: str) -> str:
    """``name`` normalised (stripped, lower case) if it is in :data:`METHOD_NAMES`, else
    :class:`MethodError` listing the valid names."""
    key = str(name).strip().lower()
    if key not in METHOD_NAMES:
        raise MethodError(f"unknown method {name!r}; valid methods: {', '.join(METHOD_NAMES)}")
    return key


def check_choice(what: str, value: str, choices: Sequence[str]) -> str:
    """``value`` normalised (stripped, lower case, ``-`` as ``_``) when it is one of
    ``choices``, else a ValueError listing them."""
    name = str(value).strip().lower().replace("-", "_")
    if name not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    return name
