"""Batched image augmentation on the device, driven by an explicit generator.

Methods that compare two views of a sample (DivideMix's MixMatch, DISC's weak and strong
views) augment whole normalised batches here, without a per-sample Python loop and
without the global RNG (a method owns its :class:`torch.Generator`, so a run is
reproducible from its seed):

- :func:`weak`: random horizontal flip and a random translation of up to ``shift``
  pixels (zero padding, as the usual pad-and-crop on CIFAR);
- :func:`strong`: :func:`weak`, then a random brightness/contrast change per image and a
  Cutout square (DeVries & Taylor 2017), the 28 px analogue of RandAugment's photometric
  operations plus Cutout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["strong", "weak"]


def _uniform(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator).to(device, non_blocking=True)


def weak(x: torch.Tensor, generator: torch.Generator, *, shift: int = 2) -> torch.Tensor:
    """Flip (p = 0.5) and translate by up to ``shift`` pixels each way.

    Parameters
    ----------
    x : torch.Tensor, shape (B, C, H, W), float
        A normalised batch (any device).
    generator : torch.Generator
        A CPU generator; the draws are moved to ``x``'s device.
    shift : int
        Largest translation in pixels (``>= 0``).

    Returns
    -------
    torch.Tensor, shape (B, C, H, W)
        A new tensor; ``x`` is not modified.
    """
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    b, _, h, w = x.shape
    flip = (_uniform(b, generator, x.device) < 0.5).view(b, 1, 1, 1)
    out = torch.where(flip, x.flip(3), x)
    if shift == 0 or b == 0:
        return out.contiguous()
    padded = F.pad(out, (shift, shift, shift, shift))
    offsets = torch.randint(0, 2 * shift + 1, (2, b), generator=generator).to(x.device)
    rows = (offsets[0].view(b, 1) + torch.arange(h, device=x.device).view(1, h)).view(b, 1, h, 1)
    cols = (offsets[1].view(b, 1) + torch.arange(w, device=x.device).view(1, w)).view(b, 1, 1, w)
    c = x.shape[1]
    batch_index = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    channel_index = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch_index, channel_index, rows, cols]


def strong(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    shift: int = 2,
    jitter: float = 0.4,
    cutout: float = 0.5,
) -> torch.Tensor:
    """:func:`weak`, then brightness/contrast jitter and Cutout.

    Parameters
    ----------
    x : torch.Tensor, shape (B, C, H, W), float
        A normalised batch.
    generator : torch.Generator
    shift : int
        Translation of the weak part.
    jitter : float
        In ``[0, 1)``: contrast factor in ``[1 - jitter, 1 + jitter]`` about each image's
        mean, and a brightness offset in ``[-jitter, jitter]`` (normalised units).
    cutout : float
        In ``[0, 1)``: side of the zeroed square as a share of the image side (0 = none).

    Returns
    -------
    torch.Tensor, shape (B, C, H, W)
    """
    if not 0.0 <= jitter < 1.0 or not 0.0 <= cutout < 1.0:
        raise ValueError(f"jitter and cutout must lie in [0, 1), got {jitter}, {cutout}")
    out = weak(x, generator, shift=shift)
    b, _, h, w = out.shape
    if b == 0:
        return out
    contrast = 1.0 + jitter * (2.0 * _uniform(b, generator, x.device) - 1.0)
    brightness = jitter * (2.0 * _uniform(b, generator, x.device) - 1.0)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contrast.view(b, 1, 1, 1) + mean + brightness.view(b, 1, 1, 1)
    side = round(cutout * min(h, w))
    if side > 0:
        cy = torch.randint(0, h, (b,), generator=generator).to(x.device).view(b, 1, 1)
        cx = torch.randint(0, w, (b,), generator=generator).to(x.device).view(b, 1, 1)
        ys = torch.arange(h, device=x.device).view(1, h, 1)
        xs = torch.arange(w, device=x.device).view(1, 1, w)
        half = side // 2
        inside = ((ys - cy).abs() <= half) & ((xs - cx).abs() <= half)
        out = out.masked_fill(inside.unsqueeze(1), 0.0)
    return out
