"""``coteaching_vog``: Co-teaching with VOG selection (Khanal et al., MICCAI 2024).

Small-loss selection under class imbalance keeps mostly majority-class samples: a
minority-class sample's loss stays high for longer whether its label is right or not.
Khanal et al. let a share of each network's kept samples be chosen by the variance of
their gradients instead, which is low for samples whose gradient is stable, clean
minority samples included. Per mini-batch, after a VOG warm-up of ``vog_warmup`` epochs
(plain Co-teaching before), each network keeps ``R = floor((1 - tau(e)) B)`` samples:

* ``R1 = floor((1 - m) R)`` with the smallest loss, ``m`` the mix ratio, and
* ``R2 = R - R1`` with the smallest VOG among the rest (:func:`mixed_selection`),

and, as in Co-teaching, the other network is updated on them. ``m = 0`` is Co-teaching;
``m = 1`` selects by VOG alone. (The paper writes ``R2 = floor(m R)``; ``R - R1`` keeps
exactly ``R`` samples, as Co-teaching does; the reference code's ``int(R m)`` can keep
``R - 1``.)

Each network has its own :class:`~noisescore.ml.methods.vog.VOGTracker`, fed every step
with the closed-form snapshot ``(p_y - 1) [h, 1]`` of that network (``h`` = the input of
its final linear layer, captured by the trainer: ``needs_features``). A step selects with
the VOG of the previous epochs' snapshots, then records its own.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from noisescore.ml.methods.base import MethodError, register_method
from noisescore.ml.methods.coteaching import CoTeaching
from noisescore.ml.methods.schedule import small_loss_indices
from noisescore.ml.methods.vog import VOGMode, VOGTracker, label_row_gradient
from noisescore.ml.train import Batch, Trainer, final_linear


def mixed_selection(
    losses: torch.Tensor, vog: torch.Tensor, *, keep: int, mix_ratio: float
) -> torch.Tensor:
    """``R1`` smallest-loss samples, then ``R2 = keep - R1`` smallest-VOG ones of the rest.

    Parameters
    ----------
    losses, vog : torch.Tensor, shape (B,)
        Per-sample loss and VOG (``+inf`` = no VOG yet: picked last).
    keep : int
        ``R``, ``0 <= R <= B``.
    mix_ratio : float
        ``m`` in ``[0, 1]``; ``R1 = floor((1 - m) R)``.

    Returns
    -------
    torch.Tensor, shape (keep,), int64
        Positions into the batch: the ``R1`` small-loss ones (smallest first), then the
        ``R2`` small-VOG ones (smallest first; ties by loss, then position).
    """
    r1 = math.floor((1.0 - mix_ratio) * keep)
    by_loss = small_loss_indices(losses, losses.shape[0])
    rest = by_loss[r1:]
    by_vog = rest[torch.argsort(vog.detach()[rest], stable=True)[: keep - r1]]
    return torch.cat([by_loss[:r1], by_vog])


@register_method("coteaching_vog")
class CoTeachingVOG(CoTeaching):
    """Co-teaching whose kept samples are part small-loss, part small-VOG.

    Parameters
    ----------
    n_samples, n_classes, peer, forget_rate, t_k, exponent
        As for :class:`~noisescore.ml.methods.coteaching.CoTeaching`.
    mix_ratio : float
        ``m`` in ``[0, 1]`` (paper: 0.2 / 0 on ISIC-2019, 1 on long-tailed NCT-CRC).
    vog_window : int
        ``t``, epochs in the VOG window (paper: 5).
    vog_warmup : int
        Epochs of plain Co-teaching before VOG selection starts (paper: 10).
    vog_mode : {"exact", "ewma"}
        How the window is kept (:mod:`noisescore.ml.methods.vog`).

    Attributes
    ----------
    trackers : tuple of VOGTracker
        One per network (0 = ``trainer.model``, 1 = ``peer``).
    vog_ : np.ndarray, shape (2, N), float32
        Each network's VOG at the end of the last epoch (``+inf``: fewer than 2 snapshots).
    vog_nbytes_ : int
        Device bytes of both trackers' state.
    """

    summary = "Co-teaching keeping part small-loss, part small-VOG samples (Khanal et al. 2024)"
    needs_features = True

    def __init__(
        self,
        *,
        n_samples: int,
        n_classes: int,
        peer: nn.Module | None = None,
        forget_rate: float,
        t_k: int = 10,
        exponent: float = 1.0,
        mix_ratio: float = 0.2,
        vog_window: int = 5,
        vog_warmup: int = 10,
        vog_mode: VOGMode = "exact",
    ):
        super().__init__(
            n_samples=n_samples,
            n_classes=n_classes,
            peer=peer,
            forget_rate=forget_rate,
            t_k=t_k,
            exponent=exponent,
        )
        if not 0.0 <= mix_ratio <= 1.0:
            raise MethodError(f"mix_ratio must lie in [0, 1], got {mix_ratio!r}")
        if isinstance(vog_warmup, bool) or not isinstance(vog_warmup, int) or vog_warmup < 0:
            raise MethodError(f"vog_warmup must be an int >= 0, got {vog_warmup!r}")
        if vog_mode not in ("exact", "ewma"):
            raise MethodError(f"vog_mode must be 'exact' or 'ewma', got {vog_mode!r}")
        if isinstance(vog_window, bool) or not isinstance(vog_window, int):
            raise MethodError(f"vog_window must be an int, got {vog_window!r}")
        if not 2 <= vog_window <= 127:
            raise MethodError(f"vog_window must lie in [2, 127], got {vog_window!r}")
        self.mix_ratio = float(mix_ratio)
        self.vog_window = vog_window
        self.vog_warmup = vog_warmup
        self.vog_mode: VOGMode = vog_mode
        self.trackers: tuple[VOGTracker, ...] = ()
        self._mixing = False

    def on_train_start(self, trainer: Trainer) -> None:
        fresh = trainer.epoch == 0 or not self.trackers
        super().on_train_start(trainer)
        if fresh:
            self.trackers = tuple(
                VOGTracker(
                    self.n_samples,
                    final_linear(trainer.models[m]).in_features + 1,
                    window=self.vog_window,
                    mode=self.vog_mode,
                    device=trainer.device,
                )
                for m in self._models
            )

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        super().on_epoch_start(trainer, epoch)
        self._mixing = epoch > self.vog_warmup

    def select(self, k: int, batch: Batch, losses: torch.Tensor, keep: int) -> torch.Tensor:
        if not self._mixing:
            return super().select(k, batch, losses, keep)
        vog = self.trackers[k].vog(batch.idx)
        return mixed_selection(losses, vog, keep=keep, mix_ratio=self.mix_ratio)

    def batch_loss(self, trainer: Trainer, batch: Batch) -> torch.Tensor:
        loss = super().batch_loss(trainer, batch)  # selects with the previous epochs' VOG
        for tracker, m in zip(self.trackers, self._models, strict=True):
            features = batch.features[m]
            if features is None:
                raise MethodError(
                    f"method {self.name!r} needs the final layer's input; the trainer did "
                    f"not capture it (was the method passed as a hook to the Trainer?)"
                )
            tracker.update(batch.idx, label_row_gradient(batch.logits[m], batch.labels, features))
        return loss

    def on_epoch_end(self, trainer: Trainer, epoch: int, stats: dict[str, float]) -> None:
        super().on_epoch_end(trainer, epoch, stats)
        for tracker in self.trackers:
            tracker.end_epoch()
        if epoch == trainer.config.epochs:
            self.vog_ = np.stack([t.vog().cpu().numpy() for t in self.trackers])

    @property
    def vog_nbytes_(self) -> int:
        if not self.trackers:
            raise MethodError(f"method {self.name!r} has no VOG state yet; train first")
        return sum(t.nbytes for t in self.trackers)
