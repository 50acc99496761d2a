"""LiNC: Lightweight Noise Correction (one trust parameter per training sample).

Algorithm 1 of the paper, as a :class:`~noisescore.ml.train.Hook` on the shared loop:

1. ``alpha_i = 1`` for every training sample (trust the label).
2. Warm-up epochs ``1..w``: the target of sample ``i`` is
   ``t_i = (1 - alpha_i) * s_i + alpha_i * onehot(y_i)`` where ``s_i`` is the model's
   (detached) softmax, and the loss is the cross-entropy ``-sum_k t_ik log p_ik``.
   After each optimizer step, ``alpha`` of the batch takes a manual gradient step
   ``alpha <- clip(alpha - lr_a * dL/dalpha - lr_a * wd_a * alpha, 0, 1)`` with
   ``dL/dalpha_i = sum_k (s_ik - onehot(y_i)_k) * log p_ik``.
3. End of epoch ``w``: Otsu's threshold on the alpha histogram; samples below it are
   *flagged* and take the model's predicted class (argmax of an eval-mode pass).
4. Epochs ``w+1..E``: plain cross-entropy on the corrected labels; alpha is frozen.

``alpha_grad`` settles the one ambiguity of Algorithm 1. With the batch-mean loss that
the optimizer minimises, ``dL/dalpha_i`` carries a ``1/B`` factor, so a step of
``lr_a = 1`` moves alpha by about ``1/B`` per visit. ``"mean"`` (the default) is exactly
that: autograd's gradient of the training loss. ``"sample"`` drops the ``1/B`` (the
gradient of sample ``i``'s own loss term), which pushes the alpha of any sample the
still-untrained model disagrees with to 0 within an epoch or two. Measured on real
data (docs/RESULTS.md, alpha histograms and AUROC by epoch), ``"sample"`` saturates a
third of all alphas at 0 early and ranks flipped labels worse than ``"mean"``; Otsu's
split works on either histogram because it is scale-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from noisescore.ml.otsu import otsu_threshold
from noisescore.ml.train import Hook, Trainer

AlphaGrad = Literal["sample", "mean"]


@dataclass(frozen=True)
class Correction:
    """Step 3 of LiNC: who is flagged and what their labels become.

    Attributes
    ----------
    otsu_threshold : float
        Otsu's threshold on the trust histogram.
    flagged : np.ndarray, shape (N,), bool
        ``trust < otsu_threshold``: likely mislabelled.
    corrected_labels : np.ndarray, shape (N,), int64
        Observed labels with flagged samples replaced by the model's prediction (the
        observed labels unchanged when ``relabelled`` is false).
    flag_by : str
        The score that was split (``linc`` = alpha, or a detector / ``consensus``).
    relabelled : bool
        False when the correction was skipped (the score's histogram is not bimodal).
    bimodality : dict or None
        The bimodality test of the score (:func:`noisescore.ml.detectors.bimodality.test`).
    """

    otsu_threshold: float
    flagged: np.ndarray
    corrected_labels: np.ndarray
    flag_by: str = "linc"
    relabelled: bool = True
    bimodality: dict[str, float | bool | str] | None = None


def otsu_correct(
    trust: np.ndarray,
    predicted_labels: np.ndarray,
    observed_labels: np.ndarray,
    *,
    relabel: bool = True,
    flag_by: str = "linc",
    bimodality: dict[str, float | bool | str] | None = None,
) -> Correction:
    """Flag ``trust`` below Otsu's threshold and relabel those samples with the prediction.

    Shapes: all (N,); ``trust`` any real score (low = suspect), labels int. With
    ``relabel=False`` the flags are kept for review and no label changes.
    """
    threshold = otsu_threshold(trust)
    flagged = np.asarray(trust) < threshold
    if relabel:
        corrected = np.where(flagged, predicted_labels, observed_labels).astype(np.int64)
    else:
        corrected = np.asarray(observed_labels, dtype=np.int64).copy()
    return Correction(threshold, flagged, corrected, flag_by, relabel, bimodality)


def linc_targets(
    log_probs: torch.Tensor, onehot: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """Soft targets ``(1 - alpha) * s + alpha * onehot`` with ``s`` detached.

    Shapes: ``log_probs`` (B, C) float, ``onehot`` (B, C), ``alpha`` (B,).
    """
    s = log_probs.detach().exp()
    a = alpha.unsqueeze(1)
    return (1 - a) * s + a * onehot


def alpha_gradient(
    log_probs: torch.Tensor,
    onehot: torch.Tensor,
    *,
    reduction: AlphaGrad = "sample",
    batch_size: int | None = None,
) -> torch.Tensor:
    """``dL/dalpha`` for the batch, shape (B,), computed in closed form (no autograd).

    ``dL/dalpha_i = sum_k (s_ik - onehot_ik) * log p_ik`` for ``L = sum_i loss_i``
    (``reduction="sample"``); divided by ``B`` for ``L = mean_i loss_i`` (``"mean"``).
    Positive when the model disagrees with the label (alpha goes down). ``batch_size``
    is the ``B`` of the mean (default: the rows given); a distributed run passes the
    global batch, of which each rank holds a shard.
    """
    log_probs = log_probs.detach()
    grad = ((log_probs.exp() - onehot) * log_probs).sum(dim=1)
    if reduction == "mean":
        grad = grad / (log_probs.shape[0] if batch_size is None else batch_size)
    elif reduction != "sample":
        raise ValueError(f"alpha_grad must be 'sample' or 'mean', got {reduction!r}")
    return grad


class LiNC(Hook):
    """LiNC as a training-loop hook. Fitted results carry a trailing underscore.

    Parameters
    ----------
    n_classes : int
    warmup_epochs : int
        ``w``: epochs with trainable alpha; correction happens at the end of epoch ``w``.
    alpha_lr, alpha_wd : float
        Learning rate and weight decay of the manual alpha update (paper: 1 and 1e-3).
    alpha_grad : {"sample", "mean"}
        Which gradient the alpha step follows (see module docstring).

    Attributes
    ----------
    trust_ : np.ndarray, shape (N,), float32
        alpha at the end of warm-up: the per-sample trust score (low = likely mislabelled).
    trust_by_epoch_ : np.ndarray, shape (w, N), float32
        alpha at the end of each warm-up epoch (row ``e - 1`` is epoch ``e``).
    otsu_threshold_ : float
    flagged_ : np.ndarray, shape (N,), bool
        ``trust_ < otsu_threshold_``.
    predicted_labels_ : np.ndarray, shape (N,), int64
        The model's argmax on the training set at the end of warm-up.
    corrected_labels_ : np.ndarray, shape (N,), int64
        Observed labels, with flagged samples replaced by ``predicted_labels_``.
    """

    #: The per-step work (alpha gather, targets, closed-form gradient, clipped scatter) is
    #: device work on tensors that keep their storage: a captured step replays it.
    graph_safe = True
    #: Each rank updates the alpha of its own shard's samples; the shards are disjoint, so
    #: merging the changes at epoch end gives every rank one process's alpha.
    distributed_safe = True

    def __init__(
        self,
        n_classes: int,
        *,
        warmup_epochs: int = 10,
        alpha_lr: float = 1.0,
        alpha_wd: float = 1e-3,
        alpha_grad: AlphaGrad = "mean",
    ):
        if warmup_epochs < 1:
            raise ValueError(f"warmup_epochs must be >= 1, got {warmup_epochs}")
        if alpha_grad not in ("sample", "mean"):
            raise ValueError(f"alpha_grad must be 'sample' or 'mean', got {alpha_grad!r}")
        self.n_classes = n_classes
        self.warmup_epochs = warmup_epochs
        self.alpha_lr = alpha_lr
        self.alpha_wd = alpha_wd
        self.alpha_grad = alpha_grad
        self.alpha: torch.Tensor | None = None
        self._saved: tuple[torch.Tensor, torch.Tensor] | None = None
        self._by_epoch: list[np.ndarray] = []
        self._epoch_start_alpha: torch.Tensor | None = None  # distributed runs only

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.config.epochs < self.warmup_epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must not exceed epochs "
                f"({trainer.config.epochs})"
            )
        self.alpha = torch.ones(trainer.n_samples, device=trainer.device)
        self.observed_labels_ = trainer.labels.cpu().numpy().copy()
        self._by_epoch = []

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if trainer.world_size > 1 and epoch <= self.warmup_epochs:
            assert self.alpha is not None
            self._epoch_start_alpha = self.alpha.clone()

    def graph_key(self, trainer: Trainer, epoch: int) -> bool:
        return epoch <= self.warmup_epochs  # the warm-up's step differs from plain CE

    def loss(
        self, trainer: Trainer, logits: torch.Tensor, idx: torch.Tensor, epoch: int
    ) -> torch.Tensor | None:
        if epoch > self.warmup_epochs:
            return None  # plain cross-entropy on the corrected labels
        assert self.alpha is not None
        labels = trainer.labels[idx]
        # scatter_, not F.one_hot: no range check, so no host sync inside a captured step.
        onehot = torch.zeros(len(labels), self.n_classes, device=logits.device)
        onehot.scatter_(1, labels.unsqueeze(1), 1.0)
        log_probs = F.log_softmax(logits.float(), dim=1)
        targets = linc_targets(log_probs, onehot, self.alpha[idx])
        self._saved = (log_probs.detach(), onehot)
        return -(targets * log_probs).sum(dim=1).mean()

    def after_step(self, trainer: Trainer, idx: torch.Tensor, epoch: int) -> None:
        if epoch > self.warmup_epochs or self._saved is None:
            return
        assert self.alpha is not None
        log_probs, onehot = self._saved
        grad = alpha_gradient(
            log_probs, onehot, reduction=self.alpha_grad, batch_size=len(idx) * trainer.world_size
        )
        a = self.alpha[idx]
        self.alpha[idx] = (a - self.alpha_lr * grad - self.alpha_lr * self.alpha_wd * a).clamp_(
            0.0, 1.0
        )
        self._saved = None

    def on_epoch_end(self, trainer: Trainer, epoch: int, stats: dict[str, float]) -> None:
        if epoch > self.warmup_epochs:
            return
        assert self.alpha is not None
        self._reduce_alpha(trainer)
        alpha = self._snapshot()
        self._by_epoch.append(alpha)
        threshold = otsu_threshold(alpha)
        stats["trust_mean"] = float(alpha.mean())
        stats["flagged_fraction"] = float((alpha < threshold).mean())
        if epoch == self.warmup_epochs:
            self._correct(trainer, alpha, threshold)

    def _snapshot(self) -> np.ndarray:
        """alpha copied to the host once per epoch: on CUDA a non-blocking copy into pinned
        memory (the step itself never syncs; this copy waits only for the epoch's queue)."""
        assert self.alpha is not None
        if self.alpha.device.type != "cuda":
            return self.alpha.float().cpu().numpy().copy()
        host = torch.empty(self.alpha.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(self.alpha, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        return host.numpy()

    def _reduce_alpha(self, trainer: Trainer) -> None:
        """Distributed runs: every rank's alpha becomes the merge of all ranks' epochs.

        A sample's alpha changes on the one rank whose shard holds it, so each rank sends
        the alphas it changed (and a 1 where it did) and takes the sum where any rank
        changed the sample: exactly the owner's value, with no rounding. Samples no rank
        saw (the trimmed remainder, a dropped last batch) keep their start-of-epoch alpha.
        """
        dist = trainer.dist
        if dist is None or trainer.world_size == 1:
            return
        assert self.alpha is not None and self._epoch_start_alpha is not None
        start = self._epoch_start_alpha
        changed = self.alpha != start
        merged = torch.stack([torch.where(changed, self.alpha, 0.0), changed.float()])
        dist.all_reduce_sum_(merged)
        self.alpha.copy_(torch.where(merged[1] > 0, merged[0], start))  # in place: captured
        self._epoch_start_alpha = None

    def _correct(self, trainer: Trainer, alpha: np.ndarray, threshold: float) -> None:
        self.trust_ = alpha
        self.trust_by_epoch_ = np.stack(self._by_epoch)
        # Distributed: rank 0 predicts and splits, every rank takes its result (the same
        # labels everywhere, whatever a device's nondeterminism would make of N forwards).
        dist = trainer.dist if trainer.world_size > 1 else None
        found: tuple[np.ndarray, Correction] | None = None
        if dist is None or dist.is_main:
            logits = trainer.predict_logits(trainer.images)
            predicted = logits.argmax(dim=1).cpu().numpy().astype(np.int64)
            found = (predicted, otsu_correct(alpha, predicted, self.observed_labels_))
        if dist is not None:
            found = dist.broadcast_object(found)
        assert found is not None
        self.predicted_labels_, correction = found
        assert correction.otsu_threshold == threshold
        self.otsu_threshold_ = correction.otsu_threshold
        self.flagged_ = correction.flagged
        self.corrected_labels_ = correction.corrected_labels
        trainer.labels = torch.as_tensor(self.corrected_labels_, device=trainer.device)
