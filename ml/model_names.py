"""Model names, checked without importing torch when the training runtime is absent.

The gRPC service image has no torch/timm (``pip install noisescore[cpu]``), yet it
validates the model name of a submitted job. With timm installed the name must be in
timm's registry (plus ``noisescore_cnn``); without it only the syntax of a timm name is
checked here, and the worker that runs the job checks the registry before any work.
"""

from __future__ import annotations

import importlib.util
import re

DEFAULT_MODEL = "noisescore_cnn"

# timm names: ``resnet18``, ``vit_tiny_patch16_224``, optionally a pretrained tag
# (``resnet18.a1_in1k``). Hub references (``hf-hub:...``) are refused: nothing is
# downloaded at run time.
_TIMM_NAME = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)?")


class ModelError(ValueError):
    """A model name, checkpoint or configuration that cannot be built."""


def training_runtime_available() -> bool:
    """Whether torch and timm are importable (the ``train`` extra is installed)."""
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "timm"))


def check_model_name(name: str) -> str:
    """``name`` if it names a model noisescore can build, else :class:`ModelError`.

    Against timm's registry when the training runtime is installed (close names are
    suggested), else by syntax only.
    """
    if training_runtime_available():
        from noisescore.ml.models import check_registered_model

        return check_registered_model(name)
    if not _TIMM_NAME.fullmatch(name):
        raise ModelError(
            f"invalid model name {name!r}: a timm model name such as 'resnet18' or "
            f"{DEFAULT_MODEL!r} (lowercase letters, digits, '_', an optional '.tag')"
        )
    return name
