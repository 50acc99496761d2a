"""``disc``: DISC (Li, Han, Shan & Chen, CVPR 2023), dynamic instance-specific selection
and correction.

One network sees two views of every sample, a weak one ``w`` (flip and shift) and a strong
one ``s`` (:func:`~noisescore.ml.augment.strong`). Its softmax outputs ``p^w_i, p^s_i``
(recorded per sample during the epoch, train mode, as the loss saw them) measure how
strongly it has memorised sample ``i``. Each sample has its own threshold per view, the
exponential moving average over epochs of that memorisation strength
(:func:`update_thresholds`):

    ``tau^v_i(t) = lambda tau^v_i(t-1) + (1 - lambda) max_k p^v_ik(t)``, ``v in {w, s}``,

started at ``tau_i(0) = 1 / N`` (as the official code). At the end of epoch ``t`` the
training set is split with the thresholds of epoch ``t - 1`` (:func:`disc_select`), for
use during epoch ``t + 1``; ``y_i`` is the observed label:

- clean ``C``: ``p^w_i[y_i] > tau^w_i`` and ``p^s_i[y_i] > tau^s_i`` (both views);
- hard ``H``: exactly one of the two (the views disagree);
- purified ``P``: neither, but the two-view mean ``q_i = (p^w_i + p^s_i) / 2`` is confident,
  ``max_k q_ik > min((tau^w_i + tau^s_i) / 2 + sigma, cap)``; its corrected label is
  ``argmax_k q_ik``. With ``sigma >= 0`` and the cap not binding, that class differs from
  ``y_i`` (else ``p[y_i]`` would exceed its threshold); a binding cap may keep ``y_i``.

The loss of a batch ``B`` after warm-up (:func:`subset_loss`, :func:`mixup_loss`):

    ``L = lambda_ce / |B| sum_{i in C} (CE(w_i, y_i) + CE(s_i, y_i))
        + lambda_h  / |B| sum_{i in H} (GCE(w_i, y_i) + GCE(s_i, y_i))
        + lambda_mix (Mix_w + Mix_s)``,

``GCE = (1 - p_y^q) / q`` (generalised cross-entropy, ``q = 0.7``, noise-robust for the
hard set), and ``Mix_v`` mixup (``alpha = 5``, one ``lambda ~ Beta(alpha, alpha)`` per
batch and view, ``lambda := max(lambda, 1 - lambda)``) of view ``v`` over
``C u H u P``, with the observed labels on ``C u H`` and the corrected ones on ``P``
(soft-target CE of the mixed image against the mixed one-hot labels, mean over the mixed
samples). The purified set is trained through mixup only, as the official code does.
During warm-up (epochs ``1 .. start_epoch``) the loss is ``CE(w, y) + CE(s, y)``;
thresholds and the split are updated at the end of every epoch, warm-up included.

Defaults, those of the official code (github JackYFL/DISC) for CIFAR with symmetric noise:
``momentum (lambda) = 0.99``, ``sigma = 0.5``, ``start_epoch = 20``, ``lambda_ce =
lambda_h = 1`` (0.2 for ``lambda_h`` and 0.95 for the momentum at 60-80 % noise), GCE
``q = 0.7``, mixup ``alpha = 5``. The cap of the correction threshold is 0.99 in the
current official code and in LNMBench (an older official version used 0.9): parameter
``correction_cap``. LNMBench runs MedMNIST with ``start_epoch = 5`` of 50 epochs; the
benchmark passes its own scaled value. LNMBench's DISC code is the official one with
dataset branches and a ResNet-50; we found no change of the algorithm to correct.

Mapping onto the one loop (what changed against the official two-loop code):

- the two views are built here from ``trainer.images.batch(idx)`` with
  :func:`~noisescore.ml.augment.weak` / :func:`~noisescore.ml.augment.strong` and this
  method's own generator, and run through ``trainer.model`` in one forward pass (as the
  official code concatenates them, so BatchNorm sees both). The loop's own forward pass
  (``batch.logits[0]``, un-augmented unless ``config.augment``) is not used: DISC's weak
  view is augmented, and reusing an un-augmented pass as the "weak" view would change
  the memorisation signal. It costs one forward pass per step (no backward);
- the official code gathers the subsets with boolean indexing and skips empty ones with
  ``if n:`` (a host sync per step); here the subsets are masks (sums over a mask divided
  by ``|B|``), and mixup pairs each mixed sample with another one of the batch's
  ``C u H u P`` by a random cyclic shift within it (:func:`mixup_partners`), on the whole
  batch, so that nothing leaves the device per step. The official code pairs by a
  ``randperm`` of the subset (which may pair a sample with itself). The mixup forward
  passes therefore run over the whole batch: rows outside ``C u H u P`` are their own
  partners (the unmixed image), weigh nothing in the loss, but are seen by BatchNorm;
- a batch with empty sets gives a zero loss; the official code then skips the optimizer
  step, the loop still takes it (Adam's moments move the weights a little);
- the split and the thresholds are device tensors of shape ``(N,)`` / ``(N, C)``, updated
  once per epoch in ``on_epoch_end``.

Sources: the formulas and defaults above were read from the official code (both of its
stored versions) and LNMBench's copy; the paper's own text was not at hand to check them
against, so where the paper might differ from the official code this module follows the
code. Only the confidence is averaged (the official code keeps no per-sample loss
average). Not implemented: the official repository's "knowledge" variant (class-pair
noise sources given in advance).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from noisescore.ml.augment import strong, weak
from noisescore.ml.methods.base import Method, MethodError, register_method
from noisescore.ml.train import Batch, Trainer

__all__ = [
    "DISC",
    "DiscSelection",
    "disc_select",
    "generalized_cross_entropy",
    "mixup_loss",
    "mixup_partners",
    "subset_loss",
    "update_thresholds",
]


# ----------------------------------------------------------------------------- formulas


def update_thresholds(
    threshold: torch.Tensor, probs: torch.Tensor, *, momentum: float
) -> torch.Tensor:
    """One epoch of the instance thresholds' moving average.

    Parameters
    ----------
    threshold : torch.Tensor, shape (N,), float
        ``tau(t - 1)``.
    probs : torch.Tensor, shape (N, C), float
        The epoch's softmax outputs of one view.
    momentum : float
        ``lambda`` in ``[0, 1)``.

    Returns
    -------
    torch.Tensor, shape (N,)
        ``lambda tau(t - 1) + (1 - lambda) max_k probs[:, k]`` (a new tensor).
    """
    return momentum * threshold + (1.0 - momentum) * probs.max(dim=1).values


@dataclass(frozen=True)
class DiscSelection:
    """DISC's split of the training set (all on the device, shape (N,)).

    Attributes
    ----------
    clean : torch.Tensor, bool
        ``C``: the observed label's confidence exceeds its threshold on both views.
    hard : torch.Tensor, bool
        ``H``: on exactly one view.
    purified : torch.Tensor, bool
        ``P``: on neither, and the two-view mean prediction is confident.
    corrected_labels : torch.Tensor, int64
        The two-view prediction on ``P``, the observed label elsewhere.
    """

    clean: torch.Tensor
    hard: torch.Tensor
    purified: torch.Tensor
    corrected_labels: torch.Tensor

    @property
    def mixed(self) -> torch.Tensor:
        """``C u H u P``, the samples mixup trains on, (N,) bool."""
        return self.clean | self.hard | self.purified


def disc_select(
    weak_probs: torch.Tensor,
    strong_probs: torch.Tensor,
    labels: torch.Tensor,
    weak_threshold: torch.Tensor,
    strong_threshold: torch.Tensor,
    *,
    sigma: float = 0.5,
    correction_cap: float = 0.99,
) -> DiscSelection:
    """Split samples into clean, hard and purified sets (see the module docstring).

    Parameters
    ----------
    weak_probs, strong_probs : torch.Tensor, shape (N, C), float
        Softmax outputs of the weak and the strong view.
    labels : torch.Tensor, shape (N,), int64
        Observed labels ``y``.
    weak_threshold, strong_threshold : torch.Tensor, shape (N,), float
        The instance thresholds ``tau^w, tau^s`` (of the previous epoch).
    sigma : float
        ``>= 0``, the margin of the correction threshold above the mean threshold.
    correction_cap : float
        In ``(0, 1]``, the largest correction threshold.

    Returns
    -------
    DiscSelection
    """
    y = labels[:, None]
    weak_ok = weak_probs.gather(1, y).squeeze(1) > weak_threshold
    strong_ok = strong_probs.gather(1, y).squeeze(1) > strong_threshold
    clean = weak_ok & strong_ok
    hard = weak_ok ^ strong_ok
    confidence, prediction = ((weak_probs + strong_probs) / 2).max(dim=1)
    bar = ((weak_threshold + strong_threshold) / 2 + sigma).clamp(max=correction_cap)
    purified = (confidence > bar) & ~(weak_ok | strong_ok)
    corrected = torch.where(purified, prediction, labels)
    return DiscSelection(clean, hard, purified, corrected)


def generalized_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, q: float = 0.7
) -> torch.Tensor:
    """``(1 - p_y^q) / q`` per sample, shape (B,) (Zhang & Sabuncu 2018; ``p`` clamped at
    ``1e-7`` as the official code)."""
    p_y = F.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1).clamp_min(1e-7)
    return (1.0 - p_y.pow(q)) / q


def subset_loss(
    weak_logits: torch.Tensor,
    strong_logits: torch.Tensor,
    labels: torch.Tensor,
    clean: torch.Tensor,
    hard: torch.Tensor,
    *,
    lambda_ce: float = 1.0,
    lambda_h: float = 1.0,
    q: float = 0.7,
) -> torch.Tensor:
    """The clean-set CE and hard-set GCE of a batch, both views, summed over each set and
    divided by the batch size ``B``.

    Parameters
    ----------
    weak_logits, strong_logits : torch.Tensor, shape (B, C)
    labels : torch.Tensor, shape (B,), int64
        Observed labels.
    clean, hard : torch.Tensor, shape (B,), bool
        The batch's rows of ``C`` and ``H``.
    lambda_ce, lambda_h : float
        Weights of the two terms.
    q : float
        GCE exponent.

    Returns
    -------
    torch.Tensor, scalar, with gradients
    """
    b = labels.shape[0]
    ce = F.cross_entropy(weak_logits, labels, reduction="none") + F.cross_entropy(
        strong_logits, labels, reduction="none"
    )
    gce = generalized_cross_entropy(weak_logits, labels, q=q) + generalized_cross_entropy(
        strong_logits, labels, q=q
    )
    return (lambda_ce * (ce * clean).sum() + lambda_h * (gce * hard).sum()) / b


def mixup_partners(mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each masked row's mixup partner, another masked row; unmasked rows pair with
    themselves.

    The masked rows are put in a random order and each is paired with the next one
    (cyclically), without leaving the device.

    Parameters
    ----------
    mask : torch.Tensor, shape (B,), bool
    generator : torch.Generator
        A CPU generator.

    Returns
    -------
    torch.Tensor, shape (B,), int64
        ``partner[i]``; a permutation of ``0 .. B-1`` that maps the masked rows onto the
        masked rows.
    """
    b = mask.shape[0]
    keys = torch.rand(b, generator=generator).to(mask.device) + 2.0 * (~mask).float()
    order = torch.argsort(keys)  # masked rows first, in random order
    k = mask.sum().clamp_min(1)
    position = torch.arange(b, device=mask.device)
    next_position = torch.where(position < k, (position + 1) % k, position)
    partner = torch.empty_like(order)
    partner[order] = order[next_position]
    return partner


def mixup_loss(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    partner: torch.Tensor,
    lam: float,
    *,
    n_classes: int,
) -> torch.Tensor:
    """Mixup on the masked rows: ``lam x_i + (1 - lam) x_partner(i)`` against the mixed
    one-hot targets, soft-target CE, mean over the masked rows (0 when none).

    Parameters
    ----------
    model : torch.nn.Module
    x : torch.Tensor, shape (B, ...)
        One view of the batch.
    targets : torch.Tensor, shape (B,), int64
    mask : torch.Tensor, shape (B,), bool
    partner : torch.Tensor, shape (B,), int64
        From :func:`mixup_partners`.
    lam : float
        The mixing weight in ``[0.5, 1]``.
    n_classes : int

    Returns
    -------
    torch.Tensor, scalar, with gradients
    """
    one_hot = F.one_hot(targets, n_classes).float()
    mixed_x = lam * x + (1.0 - lam) * x[partner]
    mixed_y = lam * one_hot + (1.0 - lam) * one_hot[partner]
    log_p = F.log_softmax(model(mixed_x).float(), dim=1)
    per_sample = -(mixed_y * log_p).sum(dim=1)
    return (per_sample * mask).sum() / mask.sum().clamp_min(1)


# ----------------------------------------------------------------------------- method


def _number(value: object, what: str, ok: bool, rule: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok:
        raise MethodError(f"{what} must be {rule}, got {value!r}")
    return float(value)


@register_method("disc")
class DISC(Method):
    """DISC as a hook of the one loop (one network, two augmented views per sample).

    Parameters
    ----------
    n_samples, n_classes : int
    peer : None
        One network.
    momentum : float
        ``lambda`` in ``[0, 1)``, the thresholds' moving-average momentum (official: 0.99;
        0.95 for asymmetric or 60-80 % noise).
    sigma : float
        ``>= 0``, margin of the correction threshold (official: 0.5).
    start_epoch : int
        ``>= 1``, warm-up epochs of plain two-view CE; must be below the run's epochs
        (official CIFAR: 20; LNMBench MedMNIST: 5).
    lambda_ce : float
        ``>= 0``, weight of the clean-set CE (official: 1).
    lambda_h : float
        ``>= 0``, weight of the hard-set GCE (official: 1; 0.2 at high noise).
    lambda_mix : float
        ``>= 0``, weight of the mixup term (official: 1).
    gce_q : float
        In ``(0, 1]``, the GCE exponent (official: 0.7).
    mixup_alpha : float
        ``>= 0``, the Beta parameter of mixup (official: 5; 0 = no mixing).
    correction_cap : float
        In ``(0, 1]``, cap of the correction threshold (official and LNMBench: 0.99).
    seed : int or None
        Seed of the augmentation and mixup draws; ``None``: ``trainer.config.seed``.

    Attributes
    ----------
    clean_mask_, hard_mask_, purified_mask_ : np.ndarray, shape (N,), bool
        The split computed at the end of the last epoch.
    corrected_labels_ : np.ndarray, shape (N,), int64
        Its labels: the correction on ``purified_mask_``, the observed label elsewhere.
    weak_threshold_, strong_threshold_ : np.ndarray, shape (N,), float32
        The instance thresholds after the last epoch.
    set_fractions_ : np.ndarray, shape (epochs, 3), float64
        Per epoch, the fractions of ``C``, ``H`` and ``P`` (also in the history as
        ``disc_clean``, ``disc_hard``, ``disc_purified``).
    """

    summary = "two-view instance thresholds: clean CE, hard GCE, corrected mixup (Li et al. 2023)"
    n_models = 1

    def __init__(
        self,
        *,
        n_samples: int,
        n_classes: int,
        peer: nn.Module | None = None,
        momentum: float = 0.99,
        sigma: float = 0.5,
        start_epoch: int = 20,
        lambda_ce: float = 1.0,
        lambda_h: float = 1.0,
        lambda_mix: float = 1.0,
        gce_q: float = 0.7,
        mixup_alpha: float = 5.0,
        correction_cap: float = 0.99,
        seed: int | None = None,
    ):
        super().__init__(n_samples=n_samples, n_classes=n_classes, peer=peer)
        self.momentum: float = _number(momentum, "momentum", 0 <= momentum < 1, "in [0, 1)")
        self.sigma: float = _number(sigma, "sigma", sigma >= 0, ">= 0")
        if (
            isinstance(start_epoch, bool)
            or not isinstance(start_epoch, numbers.Integral)
            or start_epoch < 1
        ):
            raise MethodError(
                f"start_epoch (warm-up epochs) must be an int >= 1, got {start_epoch!r}"
            )
        self.start_epoch: int = int(start_epoch)
        self.lambda_ce: float = _number(lambda_ce, "lambda_ce", lambda_ce >= 0, ">= 0")
        self.lambda_h: float = _number(lambda_h, "lambda_h", lambda_h >= 0, ">= 0")
        self.lambda_mix: float = _number(lambda_mix, "lambda_mix", lambda_mix >= 0, ">= 0")
        self.gce_q: float = _number(gce_q, "gce_q", 0 < gce_q <= 1, "in (0, 1]")
        self.mixup_alpha: float = _number(mixup_alpha, "mixup_alpha", mixup_alpha >= 0, ">= 0")
        self.correction_cap: float = _number(
            correction_cap, "correction_cap", 0 < correction_cap <= 1, "in (0, 1]"
        )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise MethodError(f"seed must be an int or None, got {seed!r}")
        self.seed: int | None = None if seed is None else int(seed)
        self._state: dict[str, torch.Tensor] = {}
        self._fractions: list[tuple[float, float, float]] = []
        self._clean_rows: list[np.ndarray] = []

    # ------------------------------------------------------------------ loop hooks

    def on_train_start(self, trainer: Trainer) -> None:
        epochs = trainer.config.epochs
        if self.start_epoch >= epochs:
            raise MethodError(
                f"start_epoch={self.start_epoch} warm-up epochs leave no DISC epoch in a "
                f"{epochs}-epoch run; pass start_epoch < {epochs}"
            )
        if trainer.n_samples != self.n_samples:
            raise MethodError(
                f"the method was built for n_samples={self.n_samples}, the trainer has "
                f"{trainer.n_samples}"
            )
        if self._state and self._state["labels"].device == trainer.device:
            return  # a later phase of the same run keeps its state
        n, c, dev = self.n_samples, self.n_classes, trainer.device
        selection = disc_select(
            torch.zeros(n, c, device=dev),
            torch.zeros(n, c, device=dev),
            trainer.labels,
            torch.ones(n, device=dev),
            torch.ones(n, device=dev),
        )  # empty sets until the first epoch ends
        self._state = {
            "weak_probs": torch.zeros(n, c, device=dev),
            "strong_probs": torch.zeros(n, c, device=dev),
            "weak_threshold": torch.full((n,), 1.0 / n, device=dev),
            "strong_threshold": torch.full((n,), 1.0 / n, device=dev),
            "labels": trainer.labels.clone(),
            "clean": selection.clean,
            "hard": selection.hard,
            "mixed": selection.mixed,
            "targets": selection.corrected_labels,
        }
        seed = trainer.config.seed if self.seed is None else self.seed
        self._generator = torch.Generator().manual_seed(seed)
        self._rng = np.random.default_rng(seed)

    def _lam(self) -> float:
        if self.mixup_alpha == 0:
            return 1.0
        lam = float(self._rng.beta(self.mixup_alpha, self.mixup_alpha))
        return max(lam, 1.0 - lam)

    def batch_loss(self, trainer: Trainer, batch: Batch) -> torch.Tensor:
        idx, labels = batch.idx, self._state["labels"][batch.idx]
        x = trainer.images.batch(idx)
        views = torch.cat([weak(x, self._generator), strong(x, self._generator)])
        model = trainer.model
        with trainer.autocast():
            weak_logits, strong_logits = model(views).float().chunk(2)
        with torch.no_grad():
            self._state["weak_probs"][idx] = F.softmax(weak_logits, dim=1)
            self._state["strong_probs"][idx] = F.softmax(strong_logits, dim=1)
        if batch.epoch <= self.start_epoch:
            return F.cross_entropy(weak_logits, labels) + F.cross_entropy(strong_logits, labels)
        loss = subset_loss(
            weak_logits,
            strong_logits,
            labels,
            self._state["clean"][idx],
            self._state["hard"][idx],
            lambda_ce=self.lambda_ce,
            lambda_h=self.lambda_h,
            q=self.gce_q,
        )
        if self.lambda_mix > 0:
            mixed, targets = self._state["mixed"][idx], self._state["targets"][idx]
            b = idx.shape[0]
            with trainer.autocast():
                for view in (views[:b], views[b:]):
                    partner = mixup_partners(mixed, self._generator)
                    loss = loss + self.lambda_mix * mixup_loss(
                        model, view, targets, mixed, partner, self._lam(), n_classes=self.n_classes
                    )
        return loss

    @torch.no_grad()
    def on_epoch_end(self, trainer: Trainer, epoch: int, stats: dict[str, float]) -> None:
        s = self._state
        selection = disc_select(
            s["weak_probs"],
            s["strong_probs"],
            s["labels"],
            s["weak_threshold"],
            s["strong_threshold"],
            sigma=self.sigma,
            correction_cap=self.correction_cap,
        )
        s["clean"], s["hard"] = selection.clean, selection.hard
        s["mixed"], s["targets"] = selection.mixed, selection.corrected_labels
        s["weak_threshold"] = update_thresholds(
            s["weak_threshold"], s["weak_probs"], momentum=self.momentum
        )
        s["strong_threshold"] = update_thresholds(
            s["strong_threshold"], s["strong_probs"], momentum=self.momentum
        )
        # once per epoch: the fitted results on the host
        self.clean_mask_ = selection.clean.cpu().numpy()
        self.hard_mask_ = selection.hard.cpu().numpy()
        self.purified_mask_ = selection.purified.cpu().numpy()
        self.corrected_labels_ = selection.corrected_labels.cpu().numpy()
        self.weak_threshold_ = s["weak_threshold"].float().cpu().numpy()
        self.strong_threshold_ = s["strong_threshold"].float().cpu().numpy()
        n = self.n_samples
        fractions = (
            float(self.clean_mask_.sum()) / n,
            float(self.hard_mask_.sum()) / n,
            float(self.purified_mask_.sum()) / n,
        )
        self._fractions.append(fractions)
        self._clean_rows.append(self.clean_mask_)
        stats["disc_clean"], stats["disc_hard"], stats["disc_purified"] = fractions

    # ------------------------------------------------------------------ results

    @property
    def set_fractions_(self) -> np.ndarray:
        if not self._fractions:
            raise MethodError("DISC has not finished an epoch yet: call trainer.fit() first")
        return np.asarray(self._fractions, dtype=np.float64)

    def clean_set(self, last: int = 1) -> np.ndarray:
        """Samples in the clean set ``C`` in any of the last ``last`` epochs, (N,) bool."""
        if not self._clean_rows:
            raise MethodError("DISC has not finished an epoch yet: call trainer.fit() first")
        n = len(self._clean_rows)
        if isinstance(last, bool) or not isinstance(last, int) or not 1 <= last <= n:
            raise MethodError(f"last must be an int in [1, {n}] (recorded epochs), got {last!r}")
        return np.asarray(np.stack(self._clean_rows[-last:]).any(axis=0), dtype=bool)
