"""The detector interface and its registry (the shape of :mod:`noisescore.ml.noise`).

A detector is a :class:`~noisescore.ml.train.Hook` on the one training loop. During the
warm-up (epochs ``1..warmup_epochs``) it sees every step's detached logits through
:meth:`Hook.on_step` and keeps O(N) floats of state on the device; at the end of each
warm-up epoch it turns that state into one per-sample score, **lower = more likely
mislabelled**, copied to the host once per epoch (never per step).

Adding a detector is one class decorated with ``@register_detector("name")``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from noisescore.ml.detector_names import DetectorError
from noisescore.ml.train import Hook, Step, Trainer

__all__ = [
    "DETECTORS",
    "Detector",
    "DetectorError",
    "observed_margin",
    "observed_probability",
    "register_detector",
]


class Detector(Hook):
    """Base class: per-sample state on the device, one score per warm-up epoch.

    Parameters
    ----------
    n_classes : int
    warmup_epochs : int
        Epochs ``1..warmup_epochs`` are recorded; later epochs are ignored.

    Attributes
    ----------
    scores_by_epoch_ : np.ndarray, shape (warmup_epochs, N), float32
        Row ``e - 1`` is the score at the end of epoch ``e``; lower = more suspect.
    extras_ : dict of str to np.ndarray (N,)
        Secondary per-sample values at the end of warm-up (e.g. DataMaps' variability),
        named ``<detector>_<what>``; empty for most detectors.
    """

    name: ClassVar[str] = ""
    #: One-line description (docs and ``--help``).
    summary: ClassVar[str] = ""

    def __init__(self, n_classes: int, *, warmup_epochs: int):
        if warmup_epochs < 1:
            raise DetectorError(f"warmup_epochs must be >= 1, got {warmup_epochs}")
        self.n_classes = n_classes
        self.warmup_epochs = warmup_epochs
        self._rows: list[np.ndarray] = []
        self.extras_: dict[str, np.ndarray] = {}

    # -- what a detector implements ------------------------------------------------------

    def reset(self, n_samples: int, device: torch.device) -> None:
        """Allocate the per-sample state (called at the start of training)."""

    def update(self, trainer: Trainer, step: Step) -> None:
        """Fold one step into the state (device tensors only: no host sync)."""

    def score(self, trainer: Trainer, epoch: int) -> torch.Tensor:
        """The (N,) score after ``epoch`` from the state; lower = more suspect."""
        raise NotImplementedError

    def extras(self) -> dict[str, torch.Tensor]:
        """Secondary (N,) values after the last warm-up epoch."""
        return {}

    # -- the hook ------------------------------------------------------------------------

    #: In a distributed run each process folds the steps of its own shard into its copy of
    #: the state; at the end of each epoch :meth:`_merge_shards` gives every process the
    #: whole state. Every detector keeps only per-sample state (rows indexed by sample).
    distributed_safe = True

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.epoch == 0:
            self._rows = []
            self.extras_ = {}
            self.reset(trainer.n_samples, trainer.device)
        self._visited: torch.Tensor | None = None

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if trainer.world_size > 1 and epoch <= self.warmup_epochs:
            self._visited = torch.zeros(trainer.n_samples, dtype=torch.bool, device=trainer.device)

    def on_step(self, trainer: Trainer, step: Step) -> None:
        if step.epoch <= self.warmup_epochs:
            self.update(trainer, step)
            if self._visited is not None:
                self._visited[step.idx] = True

    def _merge_shards(self, trainer: Trainer) -> None:
        """Every per-sample state tensor as the process that trained each sample this epoch
        left it. Shards are disjoint, so each row comes from exactly one process (or none:
        the samples an epoch trims), and the merge is exact: a sum of one row and zeros."""
        assert trainer.dist is not None and self._visited is not None
        n = trainer.n_samples
        owners = self._visited.to(torch.int32)
        trainer.dist.all_reduce_sum_(owners)
        for name in sorted(vars(self)):
            state = getattr(self, name)
            if name == "_visited" or not isinstance(state, torch.Tensor) or state.ndim < 1:
                continue
            if state.shape[0] != n:
                continue
            mine = self._visited.view(-1, *([1] * (state.ndim - 1)))
            merged = torch.where(mine, state, torch.zeros_like(state))
            trainer.dist.all_reduce_sum_(merged)
            owned = (owners > 0).view_as(mine)
            state.copy_(torch.where(owned, merged, state))
        self._visited = None

    def on_epoch_end(self, trainer: Trainer, epoch: int, stats: dict[str, float]) -> None:
        if epoch > self.warmup_epochs:
            return
        if self._visited is not None:
            self._merge_shards(trainer)
        row = self.score(trainer, epoch).detach().float().cpu().numpy()
        self._rows.append(np.ascontiguousarray(row, dtype=np.float32))
        if epoch == self.warmup_epochs:
            self.extras_ = {
                k: v.detach().float().cpu().numpy().astype(np.float32)
                for k, v in self.extras().items()
            }

    @property
    def scores_by_epoch_(self) -> np.ndarray:
        if not self._rows:
            raise DetectorError(f"detector {self.name!r} has recorded no epoch yet")
        return np.stack(self._rows)


# ----------------------------------------------------------------------------- helpers


def observed_probability(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``softmax(logits)[i, labels[i]]``, shape (B,)."""
    return F.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)


def observed_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The observed label's logit minus the largest other logit, shape (B,) (AUM's margin)."""
    assigned = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return assigned - others.max(dim=1).values


# ----------------------------------------------------------------------------- registry

#: The registry: detector name -> class.
DETECTORS: dict[str, type[Detector]] = {}

D = TypeVar("D", bound=type[Detector])


def register_detector(name: str) -> Callable[[D], D]:
    """Register a :class:`Detector` subclass under ``name`` (decorator)."""
    if not name or name != name.strip().lower() or "," in name:
        raise DetectorError(f"invalid detector name {name!r}: lower case, no ','")

    def decorator(cls: D) -> D:
        if name in DETECTORS:
            raise DetectorError(f"detector {name!r} is already registered")
        cls.name = name
        DETECTORS[name] = cls
        return cls

    return decorator
