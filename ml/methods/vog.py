"""Variance of gradients (VOG, Agarwal et al. CVPR 2022) at the feature level, per sample.

Khanal et al. (MICCAI 2024) score sample ``i`` at epoch ``j`` by the gradient of its loss
with respect to the last linear layer's weight row of its *observed* label ``y`` plus that
row's bias. For cross-entropy on ``z = W h + b`` that gradient has a closed form,
``dCE/dW_y = (p_y - 1) h`` and ``dCE/db_y = p_y - 1``, so the snapshot is

    ``S_ij = (p_y - 1) [h, 1]`` in ``R^D``, ``D = dim(h) + 1``

with ``h`` the layer's input and ``p = softmax(z)`` from the training forward pass (no
backward pass per sample: :func:`label_row_gradient`). ``VOG_i`` is the mean over the
``D`` dimensions of the standard deviation of ``S_i`` over the last ``t`` epochs.

The snapshot is taken at the sample's own training step, from the forward pass the loop
already ran, so each sample's snapshot sees the weights of its step. The reference code
runs a second pass over the whole training set after each epoch (per-sample gradients
with BackPACK) at the end-of-epoch weights; that costs one more forward and backward
pass per epoch and would not change what is measured (the gradient's spread across
epochs).

:class:`VOGTracker` keeps that window in one of two ways:

``exact``
    A ring buffer of the last ``window`` snapshots per sample, (window, N, D) float16 on
    the device, and a per-sample uint8 counter (which slot is next, how many are filled):
    ``window * N * D * 2 + N`` bytes. VOG is the population standard deviation (ddof 0)
    over the filled slots, computed in float32.
``ewma``
    The exponentially weighted mean and variance (span ``window``,
    ``alpha = 2 / (window + 1)``) in float32, (N, D) each, and a uint8 counter:
    ``2 * N * D * 4 + N`` bytes. The first snapshot sets ``mean = x, var = 0``; each later
    one updates, with ``delta = x - mean``::

        mean <- mean + alpha * delta
        var  <- (1 - alpha) * (var + alpha * delta**2)

    (the incremental exponentially weighted variance, Finch 2009). VOG = mean over the D
    dims of ``sqrt(var)``. It weighs all past snapshots with geometrically decaying
    weights instead of exactly the last ``window`` ones.

The reference code keeps every epoch's float32 gradients (t * D * N * 4 bytes and more);
at ``window = 5`` the exact float16 ring costs 10 bytes per sample and dimension, the
ewma 8: memory does not decide between them, the selection does (``bench/vog_modes.py``).

Samples with fewer than 2 snapshots have no variance yet: their VOG is ``+inf``, so a
"smallest VOG" selection never prefers them (they sort last; ties keep their order).
The window is per sample: a sample skipped in an epoch keeps its last ``window``
snapshots.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from noisescore.ml.method_names import MethodError

__all__ = ["VOGMode", "VOGTracker", "label_row_gradient"]

VOGMode = Literal["exact", "ewma"]
#: Values of the (window, chunk, D) float32 block materialised at once by ``vog()``.
_CHUNK_VALUES = 1 << 24


def label_row_gradient(
    logits: torch.Tensor, labels: torch.Tensor, features: torch.Tensor
) -> torch.Tensor:
    """Gradient of each sample's cross-entropy wrt its label's final-layer weight row and
    bias: ``(p_y - 1) [h, 1]``.

    Parameters
    ----------
    logits : torch.Tensor, shape (B, C)
    labels : torch.Tensor, shape (B,), int64
        The observed labels ``y``.
    features : torch.Tensor, shape (B, F)
        ``h``, the final linear layer's input.

    Returns
    -------
    torch.Tensor, shape (B, F + 1), float32 (float64 for float64 inputs), detached
        Columns ``:F`` are ``dCE/dW[y]``, the last one ``dCE/db[y]``.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    p_y = F.softmax(logits.detach().to(dtype), dim=1).gather(1, labels[:, None])
    h = features.detach().to(dtype)
    return (p_y - 1) * torch.cat([h, torch.ones_like(h[:, :1])], dim=1)


class VOGTracker:
    """Per-sample gradient snapshots over a window of epochs, and their VOG.

    Parameters
    ----------
    n_samples : int
        ``N``.
    dim : int
        ``D``, the snapshot size (feature dim + 1).
    window : int
        ``t`` in ``[2, 127]``: epochs in the exact window, the span of the ewma.
    mode : {"exact", "ewma"}
    device : torch.device or str
    dtype : torch.dtype, optional
        Storage type: float16 (exact) and float32 (ewma) by default.

    Attributes
    ----------
    epochs_ : int
        Epochs closed with :meth:`end_epoch`.
    """

    def __init__(
        self,
        n_samples: int,
        dim: int,
        *,
        window: int = 5,
        mode: VOGMode = "exact",
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ):
        if n_samples < 1 or dim < 1:
            raise MethodError(f"n_samples and dim must be >= 1, got {n_samples} and {dim}")
        if isinstance(window, bool) or not isinstance(window, int) or not 2 <= window <= 127:
            raise MethodError(f"vog window must be an int in [2, 127], got {window!r}")
        if mode not in ("exact", "ewma"):
            raise MethodError(f"vog mode must be 'exact' or 'ewma', got {mode!r}")
        self.n_samples, self.dim, self.window, self.mode = n_samples, dim, window, mode
        self.alpha = 2.0 / (window + 1)
        self.device = torch.device(device)
        self.epochs_ = 0
        # exact: next slot = count % window, filled = min(count, window), count < 2 window.
        # ewma: filled snapshots, saturating at 255 (only 0, 1, >= 2 matter).
        self.count = torch.zeros(n_samples, dtype=torch.uint8, device=self.device)
        if mode == "exact":
            self.dtype = dtype or torch.float16
            self.snapshots = torch.zeros(
                window, n_samples, dim, dtype=self.dtype, device=self.device
            )
        else:
            self.dtype = dtype or torch.float32
            self.mean = torch.zeros(n_samples, dim, dtype=self.dtype, device=self.device)
            self.var = torch.zeros(n_samples, dim, dtype=self.dtype, device=self.device)

    @property
    def nbytes(self) -> int:
        """Bytes of the state on the device (snapshots or mean and variance, and counter)."""
        state = [self.snapshots] if self.mode == "exact" else [self.mean, self.var]
        return sum(t.numel() * t.element_size() for t in [*state, self.count])

    def update(self, idx: torch.Tensor, grads: torch.Tensor) -> None:
        """Record one snapshot per sample.

        Parameters
        ----------
        idx : torch.Tensor, shape (B,), int64
            Distinct sample indices (on the tracker's device).
        grads : torch.Tensor, shape (B, D)
            Their snapshots, e.g. :func:`label_row_gradient`.
        """
        count = self.count[idx].long()
        if self.mode == "exact":
            self.snapshots[count % self.window, idx] = grads.to(self.dtype)
            nxt = torch.where(count + 1 < 2 * self.window, count + 1, self.window)
            self.count[idx] = nxt.to(torch.uint8)
            return
        x = grads.to(self.dtype)
        mean, var = self.mean[idx], self.var[idx]
        first = (count == 0)[:, None]
        delta = x - mean
        a = self.alpha
        self.mean[idx] = torch.where(first, x, mean + a * delta)
        self.var[idx] = torch.where(first, torch.zeros_like(var), (1 - a) * (var + a * delta**2))
        self.count[idx] = count.add(1).clamp_(max=255).to(torch.uint8)

    def end_epoch(self) -> None:
        """Mark an epoch boundary (a counter: the window is kept per sample)."""
        self.epochs_ += 1

    def filled(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Snapshots in each sample's window (exact: at most ``window``), shape (B,) or (N,)."""
        count = (self.count if idx is None else self.count[idx]).long()
        return count.clamp(max=self.window) if self.mode == "exact" else count

    @torch.no_grad()
    def vog(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """VOG of the samples ``idx`` (all when ``None``), float32, shape (B,) or (N,).

        ``+inf`` for samples with fewer than 2 snapshots.
        """
        if idx is None:
            idx = torch.arange(self.n_samples, device=self.device)
        if self.mode == "ewma":
            vog = self.var[idx].float().clamp_min(0).sqrt().mean(dim=1)
        else:
            step = max(1, _CHUNK_VALUES // (self.window * self.dim))
            vog = torch.cat([self._exact(idx[s : s + step]) for s in range(0, len(idx), step)])
        inf = torch.full_like(vog, float("inf"))
        return torch.where(self.filled(idx) >= 2, vog, inf)

    def _exact(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.snapshots[:, idx].float()  # (window, B, D)
        filled = self.filled(idx)
        valid = torch.arange(self.window, device=self.device)[:, None] < filled[None, :]
        w = valid.unsqueeze(2).float()
        n = filled.clamp(min=1).float()[:, None]
        mean = (x * w).sum(dim=0) / n
        var = ((x - mean) ** 2 * w).sum(dim=0) / n
        return var.sqrt().mean(dim=1)
