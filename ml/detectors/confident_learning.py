"""``confident_learning``: Confident Learning (Northcutt et al., JAIR 2021) through cleanlab.

cleanlab is the maintained implementation; nothing of it is rewritten here. Two sources
of predicted probabilities:

* **in-sample, at no extra cost** (the hook): the softmax of each sample's training step
  in the epoch (the warm-up model's own probabilities, train mode). Every warm-up epoch,
  ``cleanlab.rank.get_label_quality_scores`` gives the score (self-confidence, low =
  suspect) and, after the last one, ``cleanlab.filter.find_label_issues`` the issues
  (``confident_learning_issue``, 1 = issue). State: one (N, C) buffer of the current
  epoch's probabilities, copied to the host once per epoch.
* **K-fold out-of-fold** (:func:`out_of_fold_probabilities`, ``--cl-folds K``): K extra
  trainings of the warm-up's length on K-1 folds each, predicting the held-out fold: what
  cleanlab recommends, at K times the warm-up's cost. Reported as
  ``confident_learning_oof``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from noisescore.ml.detectors.base import Detector, DetectorError, register_detector
from noisescore.ml.train import Step, Trainer


def _cleanlab() -> tuple[Callable[..., np.ndarray], Callable[..., np.ndarray]]:
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError as err:  # pragma: no cover - cleanlab is in the train extra
        raise DetectorError(
            "the confident_learning detector needs cleanlab: pip install 'cleanlab>=2.6'"
        ) from err
    return get_label_quality_scores, find_label_issues


def label_quality(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """cleanlab's ``get_label_quality_scores`` (self-confidence), float32 (N,)."""
    get_label_quality_scores, _ = _cleanlab()
    return np.asarray(get_label_quality_scores(labels, probabilities), dtype=np.float32)


def label_issues(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """cleanlab's ``find_label_issues`` mask, bool (N,)."""
    _, find_label_issues = _cleanlab()
    # n_jobs=1: cleanlab's default forks a multiprocessing.Pool, which deadlocks in a
    # process that already runs threads (Prefect's, torch's): seen as hung jobs.
    return np.asarray(find_label_issues(labels, probabilities, n_jobs=1), dtype=bool)


def _normalised(probabilities: np.ndarray) -> np.ndarray:
    p = np.asarray(probabilities, dtype=np.float64)
    return p / p.sum(axis=1, keepdims=True)


@register_detector("confident_learning")
class ConfidentLearning(Detector):
    summary = "cleanlab label quality on the warm-up model's own (in-sample) probabilities"

    def __init__(self, n_classes: int, *, warmup_epochs: int):
        super().__init__(n_classes, warmup_epochs=warmup_epochs)
        _cleanlab()  # fail before training when cleanlab is missing

    def reset(self, n_samples: int, device: torch.device) -> None:
        self.proba = torch.full((n_samples, self.n_classes), 1.0 / self.n_classes, device=device)
        self.labels = torch.zeros(n_samples, dtype=torch.long, device=device)

    def update(self, trainer: Trainer, step: Step) -> None:
        self.proba.index_copy_(0, step.idx, torch.softmax(step.logits, dim=1))
        self.labels.index_copy_(0, step.idx, step.labels)

    def _host(self) -> tuple[np.ndarray, np.ndarray]:
        return self.labels.cpu().numpy(), _normalised(self.proba.double().cpu().numpy())

    def score(self, trainer: Trainer, epoch: int) -> torch.Tensor:
        labels, proba = self._host()
        return torch.from_numpy(label_quality(labels, proba))

    def extras(self) -> dict[str, torch.Tensor]:
        labels, proba = self._host()
        issues = label_issues(labels, proba)
        return {"confident_learning_issue": torch.from_numpy(issues.astype(np.float32))}


def out_of_fold_probabilities(
    train_fold: Callable[[np.ndarray, np.ndarray], np.ndarray],
    labels: np.ndarray,
    *,
    folds: int,
    seed: int,
) -> np.ndarray:
    """Out-of-fold class probabilities, (N, C) float64, from ``folds`` trainings.

    ``train_fold(fit_idx, held_idx)`` trains on ``fit_idx`` and returns the probabilities
    of ``held_idx``. Folds are stratified by the observed label (scikit-learn).
    """
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    if folds < 2:
        raise DetectorError(f"cl_folds must be >= 2 for out-of-fold probabilities, got {folds}")
    smallest = int(np.unique(labels, return_counts=True)[1].min()) if labels.size else 0
    if smallest < folds:
        raise DetectorError(
            f"cl_folds={folds} needs at least {folds} samples of every observed class; "
            f"the rarest present class has {smallest}"
        )
    proba: np.ndarray | None = None
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for fit_idx, held_idx in splitter.split(np.zeros(len(labels)), labels):
        held = train_fold(fit_idx, held_idx)
        if proba is None:
            proba = np.zeros((len(labels), held.shape[1]))
        proba[held_idx] = held
    assert proba is not None
    return _normalised(proba)
