"""``coteaching``: Co-teaching (Han et al., NeurIPS 2018), two networks teach each other.

Per mini-batch of ``B`` samples at epoch ``e``:

1. both networks compute the per-sample cross-entropy on the observed labels;
2. each network keeps its ``R = floor((1 - tau(e)) B)`` smallest-loss samples, ``tau(e)``
   the forget rate of :func:`~noisescore.ml.methods.schedule.forget_rate_schedule` (a
   linear ramp from 0 to ``tau_max`` over ``T_k`` epochs);
3. each network is updated on the samples the *other* one kept (the loss is
   ``mean CE_0[picks of net 1] + mean CE_1[picks of net 0]``; the networks share no
   parameter, so each gets the gradient of its own term).

Small-loss samples are likely clean (networks fit clean labels before they memorise noisy
ones); exchanging them keeps one network's selection errors from reinforcing themselves.

Every epoch the hook records who each network kept, as a (2, N) bool mask on the device
(set by index per step, copied to the host once per epoch: no host sync per step). The
*clean set* is the union over both networks of the samples kept in the last epochs
(:meth:`CoTeaching.clean_set`). Not over all epochs: ``tau(1) = 0`` keeps every sample,
and the ramp keeps nearly every sample, so a union from epoch 1 is the whole training set.
(Khanal et al.'s reference code takes network 1's picks of the last epoch alone; the
union of both networks' picks contains them.)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from noisescore.ml.methods.base import Method, MethodError, register_method
from noisescore.ml.methods.schedule import forget_rate_schedule, n_keep, small_loss_indices
from noisescore.ml.train import Batch, Trainer


@register_method("coteaching")
class CoTeaching(Method):
    """Co-teaching as a training-loop hook; the second network is ``peer``.

    Parameters
    ----------
    n_samples, n_classes : int
    peer : torch.nn.Module
        The second network (``extra_models``), same architecture as ``trainer.model``.
    forget_rate : float
        ``tau_max`` in ``[0, 1)``; the paper sets it to the noise rate.
    t_k : int
        ``T_k``, epochs of the forget-rate ramp (paper: 10).
    exponent : float
        ``c`` of the ramp (paper: 1).

    Attributes
    ----------
    selected_by_epoch_ : np.ndarray, shape (E, 2, N), bool
        Row ``[e, k, i]``: network ``k`` (0 = ``trainer.model``, 1 = ``peer``) kept sample
        ``i`` in the ``e``-th recorded epoch (``epochs_[e]``).
    forget_rate_by_epoch_ : np.ndarray, shape (E,), float64
        ``tau`` of each recorded epoch.
    epochs_ : np.ndarray, shape (E,), int64
        The recorded (1-based) epochs.
    selection_frequency_ : np.ndarray, shape (N,), float64
        Share of the epochs after the ramp (``e >= t_k``) in which either network kept the
        sample: a trust-like score in ``[0, 1]`` (high = clean).
    """

    summary = "two networks exchange their small-loss samples (Han et al. 2018)"
    n_models = 2

    def __init__(
        self,
        *,
        n_samples: int,
        n_classes: int,
        peer: nn.Module | None = None,
        forget_rate: float,
        t_k: int = 10,
        exponent: float = 1.0,
    ):
        super().__init__(n_samples=n_samples, n_classes=n_classes, peer=peer)
        forget_rate_schedule(1, forget_rate=forget_rate, t_k=t_k, exponent=exponent)  # checks
        self.forget_rate = float(forget_rate)
        self.t_k = t_k
        self.exponent = float(exponent)
        self._models: tuple[int, int] = (0, 1)
        self._rate = 0.0
        self._mask: torch.Tensor | None = None
        self._rows: list[np.ndarray] = []
        self._rates: list[float] = []
        self._epochs: list[int] = []

    # -- selection (what a variant overrides) --------------------------------------------

    def select(self, k: int, batch: Batch, losses: torch.Tensor, keep: int) -> torch.Tensor:
        """Positions (into the batch) of the ``keep`` samples network ``k`` keeps.

        Parameters
        ----------
        k : int
            0 (``trainer.model``) or 1 (``peer``).
        batch : Batch
        losses : torch.Tensor, shape (B,)
            Network ``k``'s per-sample cross-entropy (detached here).
        keep : int
            ``R``.

        Returns
        -------
        torch.Tensor, shape (keep,), int64
        """
        return small_loss_indices(losses, keep)

    def record(self, k: int, idx: torch.Tensor) -> None:
        """Mark the samples ``idx`` (train indices, on the device) as kept by network ``k``
        in this epoch; a variant that selects its own way (Co-teaching+, JoCoR) calls it
        from its :meth:`batch_loss` and inherits the fitted results."""
        assert self._mask is not None
        self._mask[k, idx] = True

    # -- the hook ------------------------------------------------------------------------

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.n_samples != self.n_samples:
            raise MethodError(
                f"method {self.name!r} was built for n_samples={self.n_samples}, "
                f"the trainer has {trainer.n_samples}"
            )
        peer = [k for k, m in enumerate(trainer.models) if m is self.peer]
        if len(peer) != 1:
            raise MethodError(
                f"method {self.name!r}: its peer is not among trainer.models; pass the "
                f"method as a hook when building the Trainer"
            )
        self._models = (0, peer[0])
        if trainer.epoch == 0 or self._mask is None:
            self._rows, self._rates, self._epochs = [], [], []
            self._mask = torch.zeros(2, self.n_samples, dtype=torch.bool, device=trainer.device)

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self._rate = forget_rate_schedule(
            epoch, forget_rate=self.forget_rate, t_k=self.t_k, exponent=self.exponent
        )
        assert self._mask is not None
        self._mask.zero_()

    def batch_loss(self, trainer: Trainer, batch: Batch) -> torch.Tensor:
        assert self._mask is not None
        losses = tuple(batch.per_sample_ce(m) for m in self._models)
        keep = n_keep(batch.idx.shape[0], self._rate)
        picks = tuple(self.select(k, batch, losses[k], keep) for k in (0, 1))
        for k in (0, 1):
            self.record(k, batch.idx[picks[k]])
        # Each network learns from what the other one kept.
        return losses[0][picks[1]].mean() + losses[1][picks[0]].mean()

    def on_epoch_end(self, trainer: Trainer, epoch: int, stats: dict[str, float]) -> None:
        assert self._mask is not None
        mask = self._mask.cpu().numpy().copy()
        self._rows.append(mask)
        self._rates.append(self._rate)
        self._epochs.append(epoch)
        stats["forget_rate"] = self._rate
        stats["kept_fraction"] = float(mask.any(axis=0).mean())
        stats["kept_by_both"] = float(mask.all(axis=0).mean())

    # -- fitted results ------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not self._rows:
            raise MethodError(f"method {self.name!r} has recorded no epoch yet; train first")

    @property
    def selected_by_epoch_(self) -> np.ndarray:
        self._check_fitted()
        return np.stack(self._rows)

    @property
    def forget_rate_by_epoch_(self) -> np.ndarray:
        self._check_fitted()
        return np.asarray(self._rates, dtype=np.float64)

    @property
    def epochs_(self) -> np.ndarray:
        self._check_fitted()
        return np.asarray(self._epochs, dtype=np.int64)

    @property
    def selection_frequency_(self) -> np.ndarray:
        """Over the recorded epochs ``e >= t_k``; the last recorded epoch alone when the
        training ended inside the ramp."""
        # (E, N): kept by either network
        selected = np.asarray(self.selected_by_epoch_.any(axis=1), dtype=bool)
        after = np.asarray(self.epochs_ >= self.t_k, dtype=bool)
        if not after.any():
            after[-1] = True
        return selected[after].mean(axis=0, dtype=np.float64)

    def clean_set(self, last: int = 1) -> np.ndarray:
        """Samples kept by either network in the last ``last`` recorded epochs, (N,) bool.

        The union over *all* epochs would be the whole set: ``tau(1) = 0`` keeps everyone.
        """
        self._check_fitted()
        if isinstance(last, bool) or not isinstance(last, int) or not 1 <= last <= len(self._rows):
            raise MethodError(
                f"last must be an int in [1, {len(self._rows)}] (recorded epochs), got {last!r}"
            )
        return np.asarray(np.stack(self._rows[-last:]).any(axis=(0, 1)), dtype=bool)
