"""The learning-with-noisy-labels method interface and its registry.

A method is a :class:`~noisescore.ml.train.Hook` on the one training loop (the shape of
:mod:`noisescore.ml.detectors`). A method that trains two networks (Co-teaching and its
family: Co-teaching+, JoCoR, CoDis, DivideMix) sets ``n_models = 2``; the caller builds
the second network, ``peer``, with the main model's architecture and the next seed, and
the method lists it in ``extra_models`` so that the loop trains it beside the main one.
Such a method overrides :meth:`~noisescore.ml.train.Hook.batch_loss`. A method that
selects a clean set (the Co-teaching family) has ``clean_set(last)``; plain ``ce`` has
none (``hasattr`` tells them apart).

Adding a method is one class decorated with ``@register_method("name")`` and its name in
:data:`~noisescore.ml.method_names.METHOD_NAMES`; :func:`create_method` builds one by name.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from noisescore.ml.method_names import METHOD_NAMES, MethodError
from noisescore.ml.train import DeviceImages, Hook, Trainer

__all__ = [
    "METHODS",
    "METHOD_NAMES",
    "Method",
    "MethodError",
    "create_method",
    "method_params",
    "register_method",
]

#: Constructor arguments every method takes from :func:`create_method` itself.
_COMMON = ("n_samples", "n_classes", "peer")


class Method(Hook):
    """Base class of the learning-with-noisy-labels methods.

    Parameters
    ----------
    n_samples : int
        ``N``, the size of the training set the trainer will see.
    n_classes : int
        ``C >= 2``.
    peer : torch.nn.Module or None
        The second network when ``n_models == 2`` (same architecture, next seed); ``None``
        for one-network methods.
    """

    name: ClassVar[str] = ""
    #: One-line description (docs and ``--help``).
    summary: ClassVar[str] = ""
    #: How many networks the method trains: 1, or 2 (then :func:`create_method` needs
    #: ``peer``).
    n_models: ClassVar[int] = 1

    def __init__(self, *, n_samples: int, n_classes: int, peer: nn.Module | None = None):
        n_samples = _check_int(n_samples, "n_samples", minimum=1)
        n_classes = _check_int(n_classes, "n_classes", minimum=2)
        if self.n_models == 2 and not isinstance(peer, nn.Module):
            raise MethodError(
                f"method {self.name!r} trains two networks: pass peer=, a second model of "
                f"the main model's architecture (built with the next seed)"
            )
        if self.n_models == 1 and peer is not None:
            raise MethodError(f"method {self.name!r} trains one network; peer must be None")
        self.n_samples = n_samples
        self.n_classes = n_classes
        self.peer = peer
        self.extra_models: tuple[nn.Module, ...] = () if peer is None else (peer,)

    def predict_logits(self, trainer: Trainer, images: DeviceImages) -> torch.Tensor:
        """The logits the method predicts with, eval mode, shape (N, C), on the device.

        By default the main network's (``trainer.model``); DivideMix averages its two
        networks. A transition-matrix method (VolMinNet, T-Revision) predicts the clean
        class with the network alone: the matrix models the label noise, not the class.
        """
        return trainer.predict_logits(images)


def _check_int(value: object, what: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise MethodError(f"{what} must be an int >= {minimum}, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------- registry

#: The registry: method name -> class.
METHODS: dict[str, type[Method]] = {}

M = TypeVar("M", bound=type[Method])


def register_method(name: str) -> Callable[[M], M]:
    """Register a :class:`Method` subclass under ``name`` (decorator)."""
    if not name or name != name.strip().lower() or "," in name:
        raise MethodError(f"invalid method name {name!r}: lower case, no ','")

    def decorator(cls: M) -> M:
        if name in METHODS:
            raise MethodError(f"method {name!r} is already registered")
        if cls.n_models not in (1, 2):
            raise MethodError(f"method {name!r}: n_models must be 1 or 2, got {cls.n_models}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorator


def _get(name: str) -> type[Method]:
    key = str(name).strip().lower()
    if key not in METHODS:
        valid = ", ".join(sorted(METHODS)) or "none"
        raise MethodError(f"unknown method {name!r}; valid methods: {valid}")
    return METHODS[key]


def method_params(name: str) -> dict[str, Any]:
    """The method's own parameters and their defaults (``inspect.Parameter.empty`` when
    required), without ``n_samples``, ``n_classes`` and ``peer``."""
    signature = inspect.signature(_get(name).__init__)
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.name != "self"
        and p.name not in _COMMON
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def create_method(
    name: str,
    *,
    n_samples: int,
    n_classes: int,
    peer: nn.Module | None = None,
    **params: Any,
) -> Method:
    """Build the method registered as ``name``.

    Parameters
    ----------
    name : str
        A name of :data:`METHODS` (case-insensitive).
    n_samples, n_classes : int
        Training-set size ``N`` and number of classes ``C``.
    peer : torch.nn.Module, optional
        The second network, required when ``METHODS[name].n_models == 2`` (build it with
        the main model's architecture and the next seed), refused otherwise.
    **params
        The method's own parameters (:func:`method_params` lists them).

    Raises
    ------
    MethodError
        Unknown name (the valid names are listed), unknown parameter (the method's
        accepted parameters are listed), a missing or superfluous ``peer``, or an invalid
        parameter value.
    """
    cls = _get(name)
    accepted = method_params(cls.name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        shown = (
            ", ".join(
                f"{k} (required)" if v is inspect.Parameter.empty else f"{k}={v!r}"
                for k, v in accepted.items()
            )
            or "none"
        )
        raise MethodError(
            f"method {cls.name!r} does not take {', '.join(map(repr, unknown))}; "
            f"its parameters (with defaults): {shown}"
        )
    missing = [k for k, v in accepted.items() if v is inspect.Parameter.empty and k not in params]
    if missing:
        raise MethodError(f"method {cls.name!r} needs {', '.join(map(repr, missing))}")
    return cls(n_samples=n_samples, n_classes=n_classes, peer=peer, **params)
