"""Models by timm name, adapted to small medical images.

Every model is built with :func:`timm.create_model`; noisescore adds one small CNN to
timm's registry (``noisescore_cnn``: fast enough for CPU-only CI and laptops) and
adapts two well-known architectures to 28 px inputs:

- ``resnet18`` (and the other timm ResNets): the 7x7/stride-2 stem and the max-pool
  would shrink a 28 px image to 7 px before the first block, so the stem becomes a
  3x3/stride-1 convolution and the max-pool is removed (the usual CIFAR adaptation);
- ViTs such as ``vit_tiny_patch16_224``: built for the data's image size with a patch
  size that gives a 7x7 token grid (4 px patches at 28 px).

A local pretrained checkpoint is loaded through timm's ``pretrained_cfg_overlay``
(``file=...``), which adapts the first convolution to ``in_chans`` and drops a
classifier of the wrong size. Nothing is downloaded at run time.
"""

from __future__ import annotations

import difflib
import inspect
import os
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import register_model
from torch import nn

from noisescore.ml.model_names import DEFAULT_MODEL, ModelError, check_model_name

__all__ = [
    "DEFAULT_MODEL",
    "ModelError",
    "SmallCNN",
    "check_model_name",
    "check_registered_model",
    "create_model",
]


class SmallCNN(nn.Module):
    """Three conv blocks (32-64-128 channels) and a linear head: ~0.29 M parameters.

    Parameters
    ----------
    num_classes : int
        Output logits.
    in_chans : int
        Image channels (1 grey, 3 RGB).
    width : int
        Channels of the first block; later blocks double it.
    """

    def __init__(self, num_classes: int = 2, in_chans: int = 1, width: int = 32, **_: object):
        super().__init__()
        self.num_classes = num_classes

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(
            block(in_chans, width), block(width, 2 * width), block(2 * width, 4 * width)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


@register_model
def noisescore_cnn(pretrained: bool = False, **kwargs: object) -> SmallCNN:
    """timm entry point for :class:`SmallCNN` (no pretrained weights exist)."""
    if pretrained:
        raise ValueError("noisescore_cnn has no pretrained weights; pass checkpoint=None")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    return SmallCNN(**kwargs)  # type: ignore[arg-type]


def check_registered_model(name: str) -> str:
    """``name`` if timm can build it, else :class:`ModelError` with close names."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.6)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ModelError(f"unknown model {name!r}: not in timm's registry.{hint}")
    return name


def _adapt_resnet_stem(model: nn.Module, in_chans: int) -> None:
    conv1 = model.conv1  # type: ignore[attr-defined]
    if not isinstance(conv1, nn.Conv2d):  # deep-stem variants (resnet18d...) keep theirs
        return
    model.conv1 = nn.Conv2d(  # type: ignore[attr-defined]
        in_chans, conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False
    )
    model.maxpool = nn.Identity()  # type: ignore[attr-defined]


def _accepts(name: str, arg: str) -> bool:
    entry = timm.models.model_entrypoint(name)
    params = inspect.signature(entry).parameters
    # ViT-style entry points forward **kwargs to the constructor, which takes img_size.
    return arg in params or name.startswith(("vit_", "deit", "eva", "beit"))


def create_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int,
    img_size: int,
    checkpoint: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Build a classifier by timm name for ``(in_chans, img_size, img_size)`` inputs.

    Parameters
    ----------
    name : str
        A timm model name (``timm.list_models()``), e.g. ``noisescore_cnn``,
        ``resnet18``, ``vit_tiny_patch16_224``.
    num_classes : int, keyword-only
        Number of classes of the head.
    in_chans : int, keyword-only
        Image channels.
    img_size : int, keyword-only
        Square input side in pixels (28 for MedMNIST).
    checkpoint : path, optional, keyword-only
        Local pretrained weights (``.pth``/``.safetensors``/``.bin`` in timm's format).

    Returns
    -------
    torch.nn.Module
        The model, in training mode, on the CPU.
    """
    check_registered_model(name)
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
    is_vit = name.startswith("vit_")
    if is_vit or _accepts(name, "img_size"):
        kwargs["img_size"] = img_size
    if is_vit:
        # A 7x7 token grid at 28 px (4 px patches); larger images keep a 16 px patch.
        kwargs["patch_size"] = max(1, img_size // 7) if img_size < 112 else 16
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise ModelError(f"checkpoint {str(path)!r} does not exist or is not a file")
        kwargs["pretrained"] = True
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    try:
        model = timm.create_model(name, **kwargs)
    except (RuntimeError, ValueError, KeyError, TypeError, OSError) as err:
        raise ModelError(f"cannot build model {name!r} with {kwargs}: {err}") from err
    if name.startswith(("resnet", "resnext", "seresnet")) and img_size <= 64:
        _adapt_resnet_stem(model, in_chans)
    return model
