"""``dividemix``: DivideMix (Li, Socher & Hoi, ICLR 2020), noisy labels as semi-supervised
learning with two networks.

**Warm-up** (epochs ``1 .. W``, ``W = warmup_epochs``, paper 10 on CIFAR-10): both networks
train with plain cross-entropy on the observed labels; with ``penalty=True`` (the paper's
choice for asymmetric noise) a confidence penalty, the negative entropy
``sum_c p_c log p_c`` averaged over the batch, is added to each network's loss.

**Co-divide** (start of every later epoch, :meth:`DivideMix.on_epoch_start`): each network
``k`` computes, in eval mode, the cross-entropy ``l_i`` of every training sample against
its observed label, min-max normalises it to ``[0, 1]`` and fits a two-component 1-D
Gaussian mixture (scikit-learn, ``max_iter=10, tol=1e-2, reg_covar=5e-4`` as the official
code); the clean probability ``w_i`` is the posterior of the component with the smaller
mean (:func:`gmm_clean_probability`) and network ``k``'s labeled set is
``L_k = {i : w_i > tau}`` (``tau = p_threshold``, 0.5). Network ``k`` is then trained on the
OTHER network's division (``L_{1-k}`` with its ``w``), so that the errors of one network's
division do not confirm themselves.

**MixMatch with co-refinement and co-guessing** (every step after warm-up, network ``k``,
two weak augmentations ``v = 1, 2`` of the batch, :func:`mixmatch_targets`):

- a labeled sample's target is refined with network ``k``'s own predictions,
  ``p = w y + (1 - w) mean_v p_k(x_v)``, then sharpened, ``Sharpen(p, T)_c = p_c^(1/T) /
  sum_c' p_c'^(1/T)`` (:func:`co_refinement`, :func:`sharpen`; ``T = 0.5``);
- an unlabeled sample's target is guessed by both networks,
  ``q = Sharpen(mean_v (p_k(x_v) + p_{1-k}(x_v)) / 2, T)`` (:func:`co_guessing`);
- every view and its target is mixed with a random partner of the same pool:
  ``lambda ~ Beta(alpha, alpha)`` (``alpha = 4``), ``lambda' = max(lambda, 1 - lambda)``,
  ``x' = lambda' x_a + (1 - lambda') x_b``, ``t' = lambda' t_a + (1 - lambda') t_b``;
- the loss (:func:`semi_loss`) is ``L_x + lambda_u(t) L_u + L_reg``: ``L_x`` the
  cross-entropy with ``t'`` over the mixed rows whose ``a`` is labeled, ``L_u`` the mean
  squared error between ``softmax`` and ``t'`` over the rows whose ``a`` is unlabeled, and
  ``L_reg = sum_c pi_c log(pi_c / mean_rows p_c)`` with the uniform prior ``pi_c = 1/C``.
  ``lambda_u(t) = lambda_u * clip((t - W) / R, 0, 1)`` (:func:`linear_rampup`), ``t`` the
  0-based epoch plus the share of the epoch's batches done, ``R = rampup_epochs`` (16 in
  the official code).

The two networks' losses are summed (they share no parameter, each gets the gradient of
its own term). The prediction (:meth:`DivideMix.predict_logits`) is the average of the two
networks' softmax outputs, returned as its log so that the arg-max is the prediction.

Defaults: ``warmup_epochs = 10``, ``p_threshold = 0.5``, ``temperature = 0.5``,
``alpha = 4``, ``lambda_u = 25``, ``rampup_epochs = 16``, ``loss_window = 1``,
``prior_weight = 1`` (the weight of ``L_reg``; its uniform prior assumes balanced classes,
as CIFAR's: a class-imbalanced medical set may want 0). The paper and
the official README choose ``lambda_u`` by the noise: on CIFAR-10 0 for 20 % symmetric
noise, 25 for 50 % and 80 %, 50 for 90 %; on CIFAR-100 25 for 20 %, 150 from 50 %. 25 is
the default for moderate noise; pass the paper's value for the noise at hand. The official
code averages the normalised losses of the last 5 epochs before the GMM at 90 % noise
(``loss_window = 5``).

**One loop instead of two loaders.** The official code (and LNMBench's copy) trains the
networks one after the other per epoch, each on a labeled loader (``L``, one pass) and an
unlabeled loader (the rest, re-drawn as needed) with equally many labeled and unlabeled
samples per step. Here both networks train in the same step on the same mini-batch of the
one loop: the batch's samples in ``L_{1-k}`` are network ``k``'s labeled part (with their
``w``), the rest its unlabeled part, so the labeled/unlabeled ratio of a step follows the
division rather than being 1:1, every sample is seen once per epoch, and ``L_x`` / ``L_u``
are masked means over the rows of each kind (0 when a batch has no row of that kind: no
host sync, no special case). Both networks see the same two augmented views per step (the
mixing ``lambda`` and permutation are drawn per network). The guessing passes run without
gradient in train mode for both networks (the official code guesses with the peer in eval
mode, as it trains one network at a time). The loop's own forward pass on the plain batch
is used during warm-up only. Augmentation: :func:`noisescore.ml.augment.weak` with the
method's own generator (``seed``, default ``trainer.config.seed + 2``); ``lambda`` comes
from a NumPy generator of the same seed.

Deviations of LNMBench's ``DivideMix/Train_*.py`` from the paper, where we follow the
paper: when a division has no clean sample it falls back to the top 1 % of ``w``
(here an empty ``L`` simply makes every sample unlabeled); it adds the confidence penalty
for instance-dependent noise and not for asymmetric noise (here the ``penalty`` flag); and
its ensemble adds the two networks' logits (as the official test code), while the paper
averages the networks' predictions, which is what we do.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections import deque

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from torch import nn

from noisescore.ml.augment import weak
from noisescore.ml.methods.base import Method, MethodError, register_method
from noisescore.ml.train import Batch, DeviceImages, Trainer

__all__ = [
    "DivideMix",
    "co_guessing",
    "co_refinement",
    "gmm_clean_probability",
    "linear_rampup",
    "min_max_normalise",
    "mixmatch_targets",
    "semi_loss",
    "sharpen",
]

# ----------------------------------------------------------------------------- co-divide


def min_max_normalise(losses: np.ndarray) -> np.ndarray:
    """``(l - min l) / (max l - min l)``; all zeros when every loss is the same.

    Parameters
    ----------
    losses : np.ndarray, shape (N,), float

    Returns
    -------
    np.ndarray, shape (N,), float64, in ``[0, 1]``
    """
    losses = np.asarray(losses, dtype=np.float64)
    low, high = losses.min(), losses.max()
    if high <= low:
        return np.zeros_like(losses)
    return (losses - low) / (high - low)


def gmm_clean_probability(
    losses: np.ndarray,
    *,
    normalise: bool = True,
    max_iter: int = 10,
    tol: float = 1e-2,
    reg_covar: float = 5e-4,
    random_state: int = 0,
) -> np.ndarray:
    """DivideMix's co-divide: the posterior of the small-loss component of a 2-GMM.

    Parameters
    ----------
    losses : np.ndarray, shape (N,), float, N >= 2
        Per-sample losses (cross-entropy against the observed labels), finite.
    normalise : bool
        Min-max normalise ``losses`` first (:func:`min_max_normalise`), as the official
        code; ``False`` for losses already normalised (an average over epochs).
    max_iter, tol, reg_covar : int, float, float
        Of :class:`sklearn.mixture.GaussianMixture` (the official code's 10, 1e-2, 5e-4).
    random_state : int
        Seed of the GMM's k-means initialisation.

    Returns
    -------
    np.ndarray, shape (N,), float64, in ``[0, 1]``
        ``w_i``, the probability that sample ``i`` is clean (high = clean). When every
        loss is the same nothing tells the samples apart and every ``w_i`` is 1 (all
        kept: training then reduces to the observed labels).

    Raises
    ------
    MethodError
        ``losses`` not one-dimensional, shorter than 2, or not finite.
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 1 or losses.shape[0] < 2:
        raise MethodError(f"losses must have shape (N,) with N >= 2, got {losses.shape}")
    if not np.isfinite(losses).all():
        bad = int((~np.isfinite(losses)).sum())
        raise MethodError(f"losses must be finite; {bad} of {losses.shape[0]} are not")
    x = min_max_normalise(losses) if normalise else losses
    if x.max() <= x.min():
        return np.ones_like(x)
    gmm = GaussianMixture(
        n_components=2, max_iter=max_iter, tol=tol, reg_covar=reg_covar, random_state=random_state
    )
    with warnings.catch_warnings():
        # max_iter=10 is the paper's choice; it often stops before sklearn's tolerance.
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(x[:, None])
    return gmm.predict_proba(x[:, None])[:, int(gmm.means_.argmin())].astype(np.float64)


# ----------------------------------------------------------------------------- MixMatch


def sharpen(p: torch.Tensor, *, temperature: float = 0.5) -> torch.Tensor:
    """``p_c^(1/T) / sum_c' p_c'^(1/T)`` per row.

    Parameters
    ----------
    p : torch.Tensor, shape (B, C)
        Rows of probabilities.
    temperature : float
        ``T > 0``; ``T < 1`` sharpens, ``T = 1`` only renormalises.

    Returns
    -------
    torch.Tensor, shape (B, C)
    """
    powered = p.pow(1.0 / temperature)
    return powered / powered.sum(dim=1, keepdim=True)


def co_refinement(
    own_probs: torch.Tensor,
    labels: torch.Tensor,
    clean_probability: torch.Tensor,
    *,
    temperature: float = 0.5,
) -> torch.Tensor:
    """Labeled targets: ``Sharpen(w y + (1 - w) mean_v p(x_v), T)``.

    Parameters
    ----------
    own_probs : torch.Tensor, shape (V, B, C)
        The trained network's softmax outputs on ``V`` augmented views.
    labels : torch.Tensor, shape (B,), int64
        Observed labels ``y`` (one-hot in the formula).
    clean_probability : torch.Tensor, shape (B,)
        ``w``, from the other network's division.
    temperature : float

    Returns
    -------
    torch.Tensor, shape (B, C)
    """
    one_hot = F.one_hot(labels, own_probs.shape[-1]).to(own_probs.dtype)
    w = clean_probability.to(own_probs.dtype)[:, None]
    return sharpen(w * one_hot + (1.0 - w) * own_probs.mean(dim=0), temperature=temperature)


def co_guessing(
    own_probs: torch.Tensor, peer_probs: torch.Tensor, *, temperature: float = 0.5
) -> torch.Tensor:
    """Unlabeled targets: ``Sharpen(mean over views and both networks of p, T)``.

    Parameters
    ----------
    own_probs, peer_probs : torch.Tensor, shape (V, B, C)
        Both networks' softmax outputs on the same ``V`` views.
    temperature : float

    Returns
    -------
    torch.Tensor, shape (B, C)
    """
    return sharpen((own_probs.mean(dim=0) + peer_probs.mean(dim=0)) / 2, temperature=temperature)


def mixmatch_targets(
    own_probs: torch.Tensor,
    peer_probs: torch.Tensor,
    labels: torch.Tensor,
    clean_probability: torch.Tensor,
    labeled: torch.Tensor,
    *,
    temperature: float = 0.5,
) -> torch.Tensor:
    """Each sample's MixMatch target: :func:`co_refinement` where ``labeled``, else
    :func:`co_guessing`.

    Parameters
    ----------
    own_probs, peer_probs : torch.Tensor, shape (V, B, C)
    labels : torch.Tensor, shape (B,), int64
    clean_probability : torch.Tensor, shape (B,)
    labeled : torch.Tensor, shape (B,), bool
        Membership in the other network's labeled set.
    temperature : float

    Returns
    -------
    torch.Tensor, shape (B, C), rows sum to 1 (no gradient needed: pass detached inputs)
    """
    refined = co_refinement(own_probs, labels, clean_probability, temperature=temperature)
    guessed = co_guessing(own_probs, peer_probs, temperature=temperature)
    return torch.where(labeled[:, None], refined, guessed)


def semi_loss(
    logits: torch.Tensor, targets: torch.Tensor, labeled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L_x, L_u, L_reg)`` of the mixed rows.

    Parameters
    ----------
    logits : torch.Tensor, shape (M, C)
        The network's output on the mixed inputs (with gradients).
    targets : torch.Tensor, shape (M, C)
        The mixed targets.
    labeled : torch.Tensor, shape (M,), bool
        Whether row ``m``'s first mixing partner is labeled.

    Returns
    -------
    L_x : torch.Tensor, scalar
        ``-mean over labeled rows of sum_c t_c log softmax_c``; 0 without labeled row.
    L_u : torch.Tensor, scalar
        ``mean over unlabeled rows and classes of (softmax_c - t_c)^2``; 0 without one.
    L_reg : torch.Tensor, scalar
        ``sum_c pi_c log(pi_c / mean_rows softmax_c)``, ``pi_c = 1 / C``.
    """
    log_p = F.log_softmax(logits, dim=1)
    p = log_p.exp()
    mask = labeled.to(logits.dtype)
    n_x = mask.sum()
    n_u = mask.numel() - n_x
    ce = -(targets * log_p).sum(dim=1)
    l_x = (mask * ce).sum() / n_x.clamp_min(1.0)
    sq = (p - targets).pow(2).sum(dim=1)
    l_u = ((1.0 - mask) * sq).sum() / (n_u.clamp_min(1.0) * logits.shape[1])
    n_classes = logits.shape[1]
    prior = torch.full((n_classes,), 1.0 / n_classes, device=logits.device, dtype=logits.dtype)
    l_reg = (prior * (prior.log() - p.mean(dim=0).log())).sum()
    return l_x, l_u, l_reg


def linear_rampup(
    progress: float, *, lambda_u: float, warmup_epochs: int, rampup_epochs: int = 16
) -> float:
    """``lambda_u * clip((progress - W) / R, 0, 1)`` (``1`` past ``W`` when ``R = 0``).

    Parameters
    ----------
    progress : float
        0-based epochs done: ``epoch - 1 + batches done / batches per epoch``.
    lambda_u : float
    warmup_epochs : int
        ``W``.
    rampup_epochs : int
        ``R >= 0``.
    """
    if rampup_epochs == 0:
        return float(lambda_u) if progress >= warmup_epochs else 0.0
    return float(lambda_u) * float(np.clip((progress - warmup_epochs) / rampup_epochs, 0.0, 1.0))


# ----------------------------------------------------------------------------- the method


def _int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise MethodError(f"{what} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _float(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise MethodError(f"{what} must be a finite number, got {value!r}")
    return float(value)


@register_method("dividemix")
class DivideMix(Method):
    """DivideMix as a training-loop hook; the second network is ``peer``.

    Parameters
    ----------
    n_samples, n_classes : int
    peer : torch.nn.Module
        The second network (``extra_models``), same architecture as ``trainer.model``.
    warmup_epochs : int
        ``W >= 1``, epochs of plain cross-entropy before the first division (paper: 10 on
        CIFAR-10, 30 on CIFAR-100); must be below ``trainer.config.epochs``.
    p_threshold : float
        ``tau`` in ``(0, 1)``: a sample is labeled when its clean probability exceeds it
        (paper: 0.5).
    temperature : float
        ``T > 0`` of the sharpening (paper: 0.5).
    alpha : float
        ``> 0``, of ``Beta(alpha, alpha)`` for mixup (paper: 4).
    lambda_u : float
        ``>= 0``, weight of the unlabeled loss after the ramp (paper: 0, 25, 50 or 150 by
        noise level; see the module docstring).
    rampup_epochs : int
        ``R >= 0``, epochs of the linear ramp of ``lambda_u`` after warm-up (official: 16).
    penalty : bool
        Add the confidence penalty during warm-up (paper: for asymmetric noise).
    prior_weight : float
        ``>= 0``, weight of ``L_reg`` (paper: 1). The uniform prior pulls the mean
        prediction to ``1/C``, which suits balanced sets (CIFAR); 0 removes it.
    loss_window : int
        ``>= 1``: the GMM fits the mean normalised loss of the last ``loss_window``
        divisions (official: 5 at 90 % noise, else 1).
    seed : int or None
        Seed of the augmentation, mixup and GMM draws; ``None``: ``trainer.config.seed + 2``.

    Attributes
    ----------
    clean_probability_ : np.ndarray, shape (2, N), float64
        ``w`` of the last division; row ``k`` from network ``k`` (0 = ``trainer.model``,
        1 = ``peer``), which trains the other network.
    labeled_by_epoch_ : np.ndarray, shape (E, 2, N), bool
        ``L_k`` of each division (``w > p_threshold``).
    labeled_fraction_by_epoch_ : np.ndarray, shape (E, 2), float64
        ``|L_k| / N`` of each division.
    epochs_ : np.ndarray, shape (E,), int64
        The (1-based) epochs that started with a division (``W + 1, ...``).
    """

    summary = "co-divide by a loss GMM, then MixMatch on both networks (Li et al. 2020)"
    n_models = 2

    def __init__(
        self,
        *,
        n_samples: int,
        n_classes: int,
        peer: nn.Module | None = None,
        warmup_epochs: int = 10,
        p_threshold: float = 0.5,
        temperature: float = 0.5,
        alpha: float = 4.0,
        lambda_u: float = 25.0,
        rampup_epochs: int = 16,
        penalty: bool = False,
        prior_weight: float = 1.0,
        loss_window: int = 1,
        seed: int | None = None,
    ):
        super().__init__(n_samples=n_samples, n_classes=n_classes, peer=peer)
        self.warmup_epochs = _int(warmup_epochs, "warmup_epochs", 1)
        self.p_threshold = _float(p_threshold, "p_threshold")
        if not 0.0 < self.p_threshold < 1.0:
            raise MethodError(f"p_threshold must lie in (0, 1), got {p_threshold!r}")
        self.temperature = _float(temperature, "temperature")
        if self.temperature <= 0:
            raise MethodError(f"temperature must be > 0, got {temperature!r}")
        self.alpha = _float(alpha, "alpha")
        if self.alpha <= 0:
            raise MethodError(f"alpha must be > 0, got {alpha!r}")
        self.lambda_u = _float(lambda_u, "lambda_u")
        if self.lambda_u < 0:
            raise MethodError(f"lambda_u must be >= 0, got {lambda_u!r}")
        self.rampup_epochs = _int(rampup_epochs, "rampup_epochs", 0)
        if not isinstance(penalty, bool):
            raise MethodError(f"penalty must be a bool, got {penalty!r}")
        self.penalty = penalty
        self.prior_weight = _float(prior_weight, "prior_weight")
        if self.prior_weight < 0:
            raise MethodError(f"prior_weight must be >= 0, got {prior_weight!r}")
        self.loss_window = _int(loss_window, "loss_window", 1)
        self.seed = None if seed is None else _int(seed, "seed", 0)
        self._models: tuple[int, int] = (0, 1)
        self._generator: torch.Generator | None = None
        self._rng: np.random.Generator | None = None
        self._history: tuple[deque[np.ndarray], deque[np.ndarray]] = (deque(), deque())
        self._w: torch.Tensor | None = None  # (2, N) on the device
        self._labeled: torch.Tensor | None = None  # (2, N) bool on the device
        self._batches_per_epoch = 1
        self._batch_in_epoch = 0
        self._rows: list[np.ndarray] = []
        self._epochs: list[int] = []
        self._last_w: np.ndarray | None = None
        self._last_lambda_u = 0.0

    # -- the hook ------------------------------------------------------------------------

    def _resolve(self, trainer: Trainer) -> tuple[int, int]:
        peer = [k for k, m in enumerate(trainer.models) if m is self.peer]
        if len(peer) != 1:
            raise MethodError(
                f"method {self.name!r}: its peer is not among trainer.models; pass the "
                f"method as a hook when building the Trainer"
            )
        self._models = (0, peer[0])
        return self._models

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.n_samples != self.n_samples:
            raise MethodError(
                f"method {self.name!r} was built for n_samples={self.n_samples}, "
                f"the trainer has {trainer.n_samples}"
            )
        if self.warmup_epochs >= trainer.config.epochs:
            raise MethodError(
                f"warmup_epochs={self.warmup_epochs} leaves no DivideMix epoch in a run of "
                f"epochs={trainer.config.epochs}; pass warmup_epochs < epochs"
            )
        self._resolve(trainer)
        if self._generator is None or trainer.epoch == 0:
            seed = trainer.config.seed + 2 if self.seed is None else self.seed
            self._generator = torch.Generator().manual_seed(seed)
            self._rng = np.random.default_rng(seed)
            self._history = (deque(maxlen=self.loss_window), deque(maxlen=self.loss_window))
            self._rows, self._epochs, self._last_w = [], [], None
            self._w = self._labeled = None
        n, size = trainer.n_samples, trainer.config.batch_size
        self._batches_per_epoch = max(math.ceil(n / size) - (n > size and n % size == 1), 1)

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self._batch_in_epoch = 0
        if epoch <= self.warmup_epochs:
            return
        assert self._rng is not None
        ws = []
        for j, m in enumerate(self._models):
            logits = trainer.predict_logits(trainer.images, model=m)
            losses = F.cross_entropy(logits, trainer.labels, reduction="none")
            normalised = min_max_normalise(losses.double().cpu().numpy())
            self._history[j].append(normalised)
            mean_loss = np.mean(np.stack(self._history[j]), axis=0)
            seed = int(self._rng.integers(2**31 - 1))
            ws.append(gmm_clean_probability(mean_loss, normalise=False, random_state=seed))
        w = np.stack(ws)
        labeled = w > self.p_threshold
        self._last_w = w
        self._rows.append(labeled)
        self._epochs.append(epoch)
        self._w = torch.as_tensor(w, dtype=torch.float32, device=trainer.device)
        self._labeled = torch.as_tensor(labeled, device=trainer.device)

    def batch_loss(self, trainer: Trainer, batch: Batch) -> torch.Tensor:
        if batch.epoch <= self.warmup_epochs:
            return self._warmup_loss(batch)
        assert self._generator is not None and self._rng is not None
        assert self._w is not None and self._labeled is not None
        progress = batch.epoch - 1 + self._batch_in_epoch / self._batches_per_epoch
        self._batch_in_epoch += 1
        weight_u = linear_rampup(
            progress,
            lambda_u=self.lambda_u,
            warmup_epochs=self.warmup_epochs,
            rampup_epochs=self.rampup_epochs,
        )
        self._last_lambda_u = weight_u
        x = trainer.images.batch(batch.idx)
        views = torch.cat([weak(x, self._generator), weak(x, self._generator)])  # (2B, ...)
        b = x.shape[0]
        nets = [trainer.models[m] for m in self._models]
        with torch.no_grad(), trainer.autocast():
            probs = [torch.softmax(net(views).float(), dim=1).view(2, b, -1) for net in nets]
        total = torch.zeros((), device=trainer.device)
        for k in (0, 1):
            other = 1 - k
            labeled = self._labeled[other, batch.idx]
            targets = mixmatch_targets(
                probs[k],
                probs[other],
                batch.labels,
                self._w[other, batch.idx],
                labeled,
                temperature=self.temperature,
            )
            lam = float(self._rng.beta(self.alpha, self.alpha))
            lam = max(lam, 1.0 - lam)
            perm = torch.randperm(2 * b, generator=self._generator).to(trainer.device)
            all_targets = torch.cat([targets, targets])
            mixed_x = lam * views + (1.0 - lam) * views[perm]
            mixed_t = lam * all_targets + (1.0 - lam) * all_targets[perm]
            with trainer.autocast():
                logits = nets[k](mixed_x).float()
            l_x, l_u, l_reg = semi_loss(logits, mixed_t, torch.cat([labeled, labeled]))
            total = total + l_x + weight_u * l_u + self.prior_weight * l_reg
        return total

    def _warmup_loss(self, batch: Batch) -> torch.Tensor:
        total = torch.zeros((), device=batch.labels.device)
        for m in self._models:
            total = total + batch.per_sample_ce(m).mean()
            if self.penalty:
                log_p = F.log_softmax(batch.logits[m], dim=1)
                total = total + (log_p.exp() * log_p).sum(dim=1).mean()
        return total

    def on_epoch_end(self, trainer: Trainer, epoch: int, stats: dict[str, float]) -> None:
        if epoch <= self.warmup_epochs or not self._rows:
            return
        fraction = self._rows[-1].mean(axis=1)
        stats["labeled_fraction_0"] = float(fraction[0])
        stats["labeled_fraction_1"] = float(fraction[1])
        stats["lambda_u"] = self._last_lambda_u

    def predict_logits(self, trainer: Trainer, images: DeviceImages) -> torch.Tensor:
        """``log((softmax(z_0) + softmax(z_1)) / 2)``, shape (N, C): the log of the two
        networks' mean prediction (eval mode, on the device)."""
        log_p = [
            F.log_softmax(trainer.predict_logits(images, model=m), dim=1)
            for m in self._resolve(trainer)
        ]
        return torch.logsumexp(torch.stack(log_p), dim=0) - math.log(2.0)

    # -- fitted results ------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not self._rows:
            raise MethodError(
                f"method {self.name!r} has made no division yet; train past "
                f"warmup_epochs={self.warmup_epochs}"
            )

    @property
    def clean_probability_(self) -> np.ndarray:
        self._check_fitted()
        assert self._last_w is not None
        return self._last_w.copy()

    @property
    def labeled_by_epoch_(self) -> np.ndarray:
        self._check_fitted()
        return np.stack(self._rows)

    @property
    def labeled_fraction_by_epoch_(self) -> np.ndarray:
        return self.labeled_by_epoch_.mean(axis=2, dtype=np.float64)

    @property
    def epochs_(self) -> np.ndarray:
        self._check_fitted()
        return np.asarray(self._epochs, dtype=np.int64)

    def clean_set(self, last: int = 1) -> np.ndarray:
        """Samples in either network's labeled set in the last ``last`` divisions, (N,)
        bool."""
        self._check_fitted()
        if isinstance(last, bool) or not isinstance(last, int) or not 1 <= last <= len(self._rows):
            raise MethodError(
                f"last must be an int in [1, {len(self._rows)}] (divisions), got {last!r}"
            )
        return np.asarray(np.stack(self._rows[-last:]).any(axis=(0, 1)), dtype=bool)
