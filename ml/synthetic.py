"""A generated image classification set of any size, for benchmarks of the data path.

The paper's resolution (224 px) at CheXpert's scale (200k+ images) does not fit a GPU as
uint8; nothing of that size can be downloaded in a test or a benchmark run, so
:func:`synthetic_images` generates one: each class is a sinusoidal grating of its own
orientation, spatial frequency and colour, with a random phase per image and Gaussian
noise, so that a network has something to learn and the loss falls.

Deterministic: sample ``i`` depends only on ``seed`` and ``i`` (samples are generated in
fixed blocks of :data:`BLOCK`, each from its own seeded generator), so a smaller set is a
prefix of a larger one. It is written block by block into a caller's array (a
``np.lib.format.open_memmap`` file works), with float working memory of one block only,
by torch's multi-threaded CPU kernels.
"""

from __future__ import annotations

import numpy as np
import torch

#: Samples per generator block (part of the definition: sample i's pixels depend on it).
BLOCK = 256
#: Pixel noise, in uint8 levels (standard deviation), constant over cells of a
#: ``NOISE_GRID`` x ``NOISE_GRID`` grid (one pixel each up to that size).
NOISE_LEVELS = 24.0
NOISE_GRID = 56
#: Amplitude of the class's grating around mid-grey, in uint8 levels (times its colour).
CONTRAST = 80.0


def synthetic_labels(n: int, *, n_classes: int = 10, seed: int = 0) -> np.ndarray:
    """The labels of the first ``n`` samples, shape (n,), int64 (balanced within blocks)."""
    _check_positive(n=(n, 1), n_classes=(n_classes, 2))
    labels = np.empty(n, dtype=np.int64)
    for start in range(0, n, BLOCK):
        labels[start : start + BLOCK] = _block_labels(start // BLOCK, n_classes, seed)[: n - start]
    return labels


def synthetic_images(
    n: int,
    *,
    n_classes: int = 10,
    image_size: int = 224,
    channels: int = 3,
    seed: int = 0,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` generated images and their labels.

    Parameters
    ----------
    n : int
        Samples (>= 1).
    n_classes : int
        Classes (>= 2); sample labels are balanced within each block of :data:`BLOCK`.
    image_size : int
        Height and width (>= 8).
    channels : int
        1 (grey) or 3 (colour: each class has its own colour too).
    seed : int
    out : np.ndarray, shape (n, channels, image_size, image_size), uint8, optional
        Where to write the images (e.g. a memory-mapped ``.npy``); default a new array.

    Returns
    -------
    images : np.ndarray, shape (n, channels, image_size, image_size), uint8
        ``out`` when given.
    labels : np.ndarray, shape (n,), int64
    """
    _check_positive(n=(n, 1), n_classes=(n_classes, 2), image_size=(image_size, 8))
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    shape = (n, channels, image_size, image_size)
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif out.shape != shape or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 of shape {shape}, got {out.dtype} {out.shape}")
    labels = synthetic_labels(n, n_classes=n_classes, seed=seed)
    # Pixel centres in [-0.5, 0.5): a pattern of f cycles per image whatever the size.
    axis = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size - 0.5
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    angle = torch.pi * torch.arange(n_classes, dtype=torch.float32) / n_classes
    frequency = 2 * torch.pi * (3.0 + torch.arange(n_classes) % 3)  # 3-5 cycles per image
    colour = torch.from_numpy(_class_colours(n_classes, channels, seed))
    cell = max(1, image_size // NOISE_GRID)
    grid = -(-image_size // cell)
    target = torch.from_numpy(out)
    for start in range(0, n, BLOCK):
        count = min(BLOCK, n - start)
        y = torch.from_numpy(labels[start : start + count])
        g = torch.Generator().manual_seed(_block_seed(seed, start // BLOCK))
        # Drawn for a whole block, used for its first ``count``: sample i never depends on n.
        phase = (2 * torch.pi * torch.rand(BLOCK, generator=g))[:count, None, None]
        noise = torch.randn((BLOCK, channels, grid, grid), generator=g)[:count]
        proj = xs * torch.cos(angle[y])[:, None, None] + ys * torch.sin(angle[y])[:, None, None]
        wave = torch.sin(frequency[y][:, None, None] * proj + phase)  # (count, H, W)
        pixels = noise.repeat_interleave(cell, 2).repeat_interleave(cell, 3)
        pixels = pixels[:, :, :image_size, :image_size].mul_(NOISE_LEVELS).add_(128.0)
        pixels.addcmul_(colour[y][:, :, None, None], wave[:, None], value=CONTRAST)
        target[start : start + count] = pixels.round_().clamp_(0, 255).to(torch.uint8)
    return out, labels


def _block_labels(block: int, n_classes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, block, 0])
    return rng.permutation(np.arange(BLOCK) % n_classes).astype(np.int64)


def _block_seed(seed: int, block: int) -> int:
    return int(np.random.SeedSequence([seed, block, 1]).generate_state(1, np.uint64)[0] >> 1)


def _class_colours(n_classes: int, channels: int, seed: int) -> np.ndarray:
    """(K, channels) float32 gains in [0.4, 1]: the grating's contrast per channel."""
    if channels == 1:
        return np.ones((n_classes, 1), dtype=np.float32)
    rng = np.random.default_rng([seed, 2**31])
    return rng.uniform(0.4, 1.0, size=(n_classes, channels)).astype(np.float32)


def _check_positive(**values: tuple[int, int]) -> None:
    """Each ``name=(value, minimum)`` an integer of at least its minimum."""
    for name, (value, low) in values.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def nbytes(n: int, *, image_size: int = 224, channels: int = 3) -> int:
    """Bytes of ``n`` uint8 images (what :func:`noisescore.ml.streaming.placement` weighs)."""
    return n * channels * image_size * image_size
