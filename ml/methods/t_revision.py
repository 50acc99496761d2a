"""``t_revision``: T-Revision (Xia, Liu, Wang, Han, Gong, Niu, Sugiyama, NeurIPS 2019),
"Are Anchor Points Really Indispensable in Label-Noise Learning?".

The stages, in one loop (epochs are 1-based):

1. **Warm-up** (epochs ``1 .. warmup_epochs``): plain CE on the noisy labels, so that
   ``softmax(f(x))`` estimates the *noisy* posterior ``P(noisy | x)``.
2. **Estimate** (start of epoch ``warmup_epochs + 1``): one eval pass over the training
   set; for each class ``i`` the anchor is the sample with the highest ``P(noisy = i | x)``
   below its ``percentile``-th percentile (97, an outlier filter), and ``T[i, :]`` is that
   sample's predicted row (:func:`~noisescore.ml.methods.transition.estimate_transition`),
   the fitted ``transition_estimate_``.
3. **Reweight** (the next ``reweight_epochs`` epochs), ``T`` fixed: importance
   reweighting, with ``p = softmax(f(x))`` now read as the *clean* posterior and
   ``q = p @ T`` the noisy one (:func:`importance_weights`),

       ``beta_i = p_{y_i}(x_i) / q_{y_i}(x_i)``,  ``L = mean_i beta_i CE(f(x_i), y_i)``,

   ``beta`` a constant weight (no gradient, as the official ``reweight_loss``).
4. **Revision** (the remaining epochs): a slack ``dT`` (C, C), initialised to zeros, is
   learned jointly with ``f`` by minimising the same risk with ``T + dT`` in ``q``; the
   gradient of ``dT`` comes *only* through ``beta`` (CE does not depend on it), so here
   ``beta`` keeps its gradient (the paper's ``R(f, dT)`` is minimised over both; the
   official ``reweighting_revision_loss`` does not detach it either). ``dT`` has its own
   Adam, ``lr = 5e-7``, weight decay 1e-4 (paper / official ``lr_revision``). The fitted
   ``transition_`` is ``T + dT``. Neither the paper nor the official code projects
   ``T + dT`` back onto row-stochastic matrices; we do not either (at the paper's rate
   ``dT`` stays tiny; the history's ``revision_norm`` is ``sum |dT|``).

Prediction is the network alone (``Method.predict_logits``), as the official test pass.

Defaults: ``warmup_epochs = 20`` (official ``n_epoch_estimate``, MNIST / CIFAR-10),
``percentile = 97``. The official schedule is 20 + 200 + 200 epochs (CIFAR); the
default ``reweight_epochs = 40`` splits the benchmark's 100-epoch runs 20 / 40 / 40
(LNMBench runs its MedMNIST sets 5 / 50 / 50).
All three are parameters (the benchmark scales them for short runs);
``warmup_epochs + reweight_epochs`` must leave at least one revision epoch.

How it maps onto one loop, and deviations from the official code (we follow the paper):
the official code trains the estimation network with SGD, picks the warm-up epoch of
best noisy-validation accuracy, reloads it, reweights with SGD (momentum 0.9), reloads
the best reweighting epoch and revises with Adam at 5e-7 for network and ``dT`` alike.
Here the network keeps the loop's optimizer and rate throughout, ``T`` comes from the
network at the end of warm-up and each stage continues from the last epoch (no
validation-based reloads; the loop has no validation split). The official
``tools.norm`` divides ``T`` by ``row_sums`` broadcast along columns (``T / T.sum(1)``);
we divide each row by its own sum (the anchor rows are softmax rows, so this only
removes rounding). LNMBench's ``reweighting_revision_loss`` does ``T = T + correction``
inside its per-sample loop, so sample ``k`` of a batch sees ``T + (k + 1) dT``; we use
``T + dT`` for every sample, as the paper. (LNMBench also saves reweighting epoch ``e``
as ``epoch_r{e}`` but reloads ``epoch_r{best + 1}``, one epoch late; we reload nothing.)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from noisescore.ml.methods.base import Method, MethodError, _check_int, register_method
from noisescore.ml.methods.transition import estimate_transition, noisy_posterior
from noisescore.ml.train import Trainer

__all__ = ["TRevision", "estimate_transition", "importance_weights", "reweighted_loss"]


def importance_weights(
    clean_probs: torch.Tensor, transition: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """``beta_i = p_{y_i} / (p @ T)_{y_i}``: the importance weight of each noisy label.

    Parameters
    ----------
    clean_probs : torch.Tensor, shape (B, C)
        ``p``, the network's softmax output read as the clean posterior.
    transition : torch.Tensor, shape (C, C)
        ``T`` (or ``T + dT``), ``T[i, j] = P(noisy = j | clean = i)``.
    labels : torch.Tensor, shape (B,), int64
        The observed (noisy) labels ``y``.

    Returns
    -------
    torch.Tensor, shape (B,), with gradients to ``clean_probs`` and ``transition``
    """
    column = labels[:, None]
    clean = clean_probs.gather(1, column).squeeze(1)
    noisy = noisy_posterior(clean_probs, transition).gather(1, column).squeeze(1)
    return clean / noisy


def reweighted_loss(
    logits: torch.Tensor,
    transition: torch.Tensor,
    labels: torch.Tensor,
    *,
    weight_gradient: bool = False,
) -> torch.Tensor:
    """``mean_i beta_i CE(logits_i, y_i)`` with ``beta`` of :func:`importance_weights`.

    Parameters
    ----------
    logits : torch.Tensor, shape (B, C)
    transition : torch.Tensor, shape (C, C)
    labels : torch.Tensor, shape (B,), int64
    weight_gradient : bool
        ``False`` (reweight stage): ``beta`` is a constant. ``True`` (revision stage):
        ``beta`` keeps its gradient, the only one ``dT`` in ``transition`` gets.

    Returns
    -------
    torch.Tensor, shape ()
    """
    beta = importance_weights(F.softmax(logits, dim=1), transition, labels)
    if not weight_gradient:
        beta = beta.detach()
    return (beta * F.cross_entropy(logits, labels, reduction="none")).mean()


@register_method("t_revision")
class TRevision(Method):
    """T-Revision as a training-loop hook.

    Parameters
    ----------
    n_samples, n_classes : int
    peer : None
        One network.
    warmup_epochs : int
        ``>= 1`` epochs of plain CE before ``T`` is estimated (official: 20).
    reweight_epochs : int
        ``>= 1`` epochs of importance reweighting with ``T`` fixed; the epochs after them
        revise ``T`` (at least one must remain).
    percentile : float
        In (0, 100], the anchor's outlier filter (paper: 97; 100: plain maximum).
    revision_lr : float
        ``> 0``, Adam rate of ``dT`` (paper: 5e-7).
    revision_weight_decay : float
        ``>= 0``, Adam weight decay of ``dT`` (official: 1e-4).

    Attributes
    ----------
    transition_estimate_ : np.ndarray, shape (C, C), float64, or None
        The anchor-point ``T``, set when warm-up ends.
    transition_ : np.ndarray, shape (C, C), float64, or None
        ``T + dT``, updated at the end of every epoch after warm-up.
    """

    summary = "anchor-point T, importance reweighting, then learned revision dT (Xia et al. 2019)"
    n_models = 1

    def __init__(
        self,
        *,
        n_samples: int,
        n_classes: int,
        peer: nn.Module | None = None,
        warmup_epochs: int = 20,
        reweight_epochs: int = 40,
        percentile: float = 97.0,
        revision_lr: float = 5e-7,
        revision_weight_decay: float = 1e-4,
    ):
        super().__init__(n_samples=n_samples, n_classes=n_classes, peer=peer)
        self.warmup_epochs = _check_int(warmup_epochs, "warmup_epochs", minimum=1)
        self.reweight_epochs = _check_int(reweight_epochs, "reweight_epochs", minimum=1)
        if not 0.0 < percentile <= 100.0:
            raise MethodError(f"percentile must lie in (0, 100], got {percentile!r}")
        if not (np.isfinite(revision_lr) and revision_lr > 0):
            raise MethodError(f"revision_lr must be > 0, got {revision_lr!r}")
        if not (np.isfinite(revision_weight_decay) and revision_weight_decay >= 0):
            raise MethodError(f"revision_weight_decay must be >= 0, got {revision_weight_decay!r}")
        self.percentile = float(percentile)
        self.revision_lr = float(revision_lr)
        self.revision_weight_decay = float(revision_weight_decay)
        #: ``dT``, the learned slack of the revision stage.
        self.revision = nn.Parameter(torch.zeros(n_classes, n_classes))
        self.revision_optimizer: torch.optim.Adam | None = None
        self._transition: torch.Tensor | None = None  # the anchor T, on the device
        self.transition_estimate_: np.ndarray | None = None
        self.transition_: np.ndarray | None = None

    def stage(self, epoch: int) -> str:
        """``"warmup"``, ``"reweight"`` or ``"revision"``: what epoch ``epoch`` trains."""
        if epoch <= self.warmup_epochs:
            return "warmup"
        if epoch <= self.warmup_epochs + self.reweight_epochs:
            return "reweight"
        return "revision"

    def on_train_start(self, trainer: Trainer) -> None:
        epochs = trainer.config.epochs
        if self.warmup_epochs + self.reweight_epochs >= epochs:
            raise MethodError(
                f"t_revision: warmup_epochs={self.warmup_epochs} + "
                f"reweight_epochs={self.reweight_epochs} must be < epochs={epochs}, "
                f"leaving at least one revision epoch"
            )
        self.revision.data = self.revision.data.to(trainer.device)
        if self.revision_optimizer is None:
            self.revision_optimizer = torch.optim.Adam(
                [self.revision], lr=self.revision_lr, weight_decay=self.revision_weight_decay
            )
        if self._transition is not None:
            self._transition = self._transition.to(trainer.device)

    def estimate(self, trainer: Trainer) -> np.ndarray:
        """Estimate ``T`` from the network's noisy posteriors on the training set (one eval
        pass) and keep it; returns ``transition_estimate_``."""
        probs = torch.softmax(trainer.predict_logits(trainer.images), dim=1)
        estimate = estimate_transition(probs.double().cpu().numpy(), self.percentile)
        self.transition_estimate_ = estimate
        self._transition = torch.as_tensor(estimate, dtype=torch.float32, device=trainer.device)
        return estimate

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        # Also covers a run resumed after warm-up in a fresh method (no estimate kept).
        if epoch > self.warmup_epochs and self._transition is None:
            self.estimate(trainer)

    def loss(
        self, trainer: Trainer, logits: torch.Tensor, idx: torch.Tensor, epoch: int
    ) -> torch.Tensor:
        labels = trainer.labels[idx]
        stage = self.stage(epoch)
        if stage == "warmup":
            return F.cross_entropy(logits, labels)
        if self._transition is None:
            raise MethodError("t_revision: T was not estimated; on_epoch_start was skipped")
        if stage == "reweight":
            return reweighted_loss(logits, self._transition, labels)
        return reweighted_loss(
            logits, self._transition + self.revision, labels, weight_gradient=True
        )

    def after_step(self, trainer: Trainer, idx: torch.Tensor, epoch: int) -> None:
        if self.stage(epoch) != "revision":
            return
        if self.revision_optimizer is None:
            raise MethodError("t_revision: on_train_start was not called before training")
        self.revision_optimizer.step()
        self.revision_optimizer.zero_grad(set_to_none=True)

    def on_epoch_end(self, trainer: Trainer, epoch: int, stats: dict[str, float]) -> None:
        stats["stage"] = float(("warmup", "reweight", "revision").index(self.stage(epoch)))
        if self._transition is None:
            return
        slack = self.revision.detach().double().cpu().numpy()
        self.transition_ = self.transition_estimate_ + slack
        stats["revision_norm"] = float(np.abs(slack).sum())
