"""One cell of the learning-with-noisy-labels benchmark: a method trained on one dataset
with one noise setting and one seed, through the one training loop, scored as LNMBench
scores it.

A cell (:class:`Cell`) is ``(method, dataset, noise, seed)``; :func:`run_cell` prepares its
data (:func:`cell_data`: an optional random train subset, the injected noise with the
truth kept, clean val and test), builds the method from the registry with the schedule's
parameters (:func:`method_kwargs`), trains it with :class:`EpochScores` recording val and
test accuracy after every epoch, and returns the cell's metrics (:func:`cell_metrics`):

- ``test_acc_last_k``: mean test accuracy of the last ``k`` epochs (LNMBench's score, k = 5);
- ``test_acc_best_val``: test accuracy at the epoch of the best (clean) val accuracy;
- ``macro_f1`` and ``balanced_accuracy`` of the final model on test;
- ``wall_seconds`` (the cell) and ``samples_per_second`` (training samples per second of
  training time, the method's own extra passes included, the scoring passes excluded).

The ``real`` noise setting trains on a manifest's ``label`` column and scores against its
``true_label`` column (:func:`noisescore.ml.data.load_manifest`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score
from torch import nn

from noisescore.ml.data import DataError, Dataset, Split
from noisescore.ml.method_names import MethodError
from noisescore.ml.methods import METHODS, create_method, method_params
from noisescore.ml.models import create_model
from noisescore.ml.noise import inject_noise, parse_noise_spec
from noisescore.ml.train import DeviceImages, Hook, TrainConfig, Trainer, resolve_device
from noisescore.settings import REAL_NOISE, BenchSettings

__all__ = [
    "EPOCH_PARAMS",
    "Cell",
    "CellData",
    "EpochScores",
    "cell_data",
    "cell_metrics",
    "check_schedule",
    "grid",
    "method_kwargs",
    "run_cell",
]

#: Epoch-length parameters of the methods, with their value on a 100-epoch schedule
#: (each paper's setting, mapped to 100 epochs). :func:`method_kwargs` scales them to the
#: benchmark's ``epochs`` (``round(value * epochs / 100)``, at least 1), so that a short
#: CPU schedule keeps each method's phases in proportion.
EPOCH_PARAMS: dict[str, dict[str, int]] = {
    "coteaching": {"t_k": 10},
    "coteaching_vog": {"t_k": 10, "vog_warmup": 10},
    "coteaching_plus": {"t_k": 10, "init_epoch": 20},
    "jocor": {"t_k": 10},
    "codis": {"t_k": 10},
    "linc": {"warmup_epochs": 10},
    "disc": {"start_epoch": 20},
    "dividemix": {"warmup_epochs": 10, "rampup_epochs": 16},
    "t_revision": {"warmup_epochs": 20, "reweight_epochs": 40},
}
#: Per-epoch moving-average momenta, also given on a 100-epoch schedule: scaled as
#: ``m ** (100 / epochs)`` so that the average forgets as much over the run.
MOMENTUM_PARAMS: dict[str, dict[str, float]] = {"disc": {"momentum": 0.99}}
#: Parameters set from the noise rate ``r`` of the cell (the rate LNMBench passes to the
#: methods: the injected one, or the manifest's measured one for ``real``).
_RATE_PARAMS: dict[str, Callable[[float], float]] = {
    "forget_rate": lambda r: min(r, 0.95),
    "noise_rate": lambda r: r,
    "clip_rate": lambda r: max(1.0 - r, 0.05),
}

# torch.manual_seed is process-wide: cells trained on threads take turns building models.
_INIT_LOCK = threading.Lock()


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    method: str
    dataset: str
    noise: str
    seed: int

    @property
    def key(self) -> str:
        """``DATASET/NOISE/METHOD/seedK``, safe as an artifact path."""
        return f"{_slug(self.dataset)}/{_slug(self.noise)}/{self.method}/seed{self.seed}"

    @property
    def setting(self) -> str:
        """``DATASET NOISE``: a column of the results table."""
        return f"{_slug(self.dataset)} {self.noise}"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _slug(text: str) -> str:
    name = text.rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"\.(npz|csv)$", "", name)
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower().replace(":", "-")).strip("-") or "x"


def grid(settings: BenchSettings) -> list[Cell]:
    """Every cell, dataset-major then noise, seed, method (the table's reading order).

    Raises
    ------
    ValueError
        Two datasets or noise settings whose cells would share a key, and so a stored
        record and a table column (``breastmnist`` and ``medmnist://breastmnist``;
        ``file:///a/x.npz`` and ``file:///b/x.npz``).
    """
    cells = [
        Cell(method, dataset, noise, seed)
        for dataset in settings.datasets
        for noise in settings.noise
        for seed in settings.seeds
        for method in settings.methods
    ]
    first: dict[str, Cell] = {}
    for cell in cells:
        other = first.setdefault(cell.key, cell)
        if other is not cell:
            field = "dataset" if other.dataset != cell.dataset else "noise"
            what = {"dataset": "datasets", "noise": "noise settings"}[field]
            raise ValueError(
                f"{what} {getattr(other, field)!r} and {getattr(cell, field)!r} would share "
                f"the cell {cell.key!r} (its record and table column): give them different "
                f"file names"
            )
    return cells


def check_schedule(settings: BenchSettings) -> None:
    """Refuse a schedule in which a method of the grid cannot fit its phases (T-Revision's
    warm-up + reweighting, DivideMix's or DISC's warm-up, ...), before anything trains.

    Each method is built with the parameters its cells would get and attached to a
    4-sample trainer of ``settings.epochs`` epochs; its own ``on_train_start`` check
    speaks (nothing trains).

    Raises
    ------
    MethodError
        Naming the method, the epochs and the method's own reason.
    """
    images = np.zeros((4, 1, 2, 2), dtype=np.uint8)

    def tiny() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(4, 2))

    for method in settings.methods:
        params = method_kwargs(method, epochs=settings.epochs, noise_rate=0.2)
        peer = tiny() if METHODS[method].n_models == 2 else None
        try:
            hook = create_method(method, n_samples=4, n_classes=2, peer=peer, **params)
            trainer = Trainer(
                tiny(),
                DeviceImages(images, torch.device("cpu")),
                np.array([0, 1, 0, 1]),
                config=TrainConfig(epochs=settings.epochs, lr_milestones=()),
                hooks=[hook],
            )
            hook.on_train_start(trainer)
        except (MethodError, ValueError) as err:
            raise MethodError(
                f"method {method!r} cannot run in {settings.epochs} epochs with the scaled "
                f"parameters {params}: {err}"
            ) from None


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class CellData:
    """A cell's arrays. ``train_labels`` are the observed (noisy) labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    train_true: np.ndarray
    val: tuple[np.ndarray, np.ndarray] | None
    test: tuple[np.ndarray, np.ndarray]
    n_classes: int
    noise_rate: float
    n_train_full: int

    @property
    def realised_rate(self) -> float:
        return float((self.train_labels != self.train_true).mean())


def _subset(n: int, size: int | None, seed: int, salt: int) -> np.ndarray:
    if size is None or size >= n:
        return np.arange(n)
    rng = np.random.default_rng([seed, salt])
    return np.sort(rng.choice(n, size=size, replace=False))


def _clean_split(
    split: Split, size: int | None, seed: int, salt: int
) -> tuple[np.ndarray, np.ndarray]:
    labels = split.true_labels if split.true_labels is not None else split.labels
    keep = _subset(len(split), size, seed, salt)
    return split.images[keep], labels[keep]


def cell_data(dataset: Dataset, cell: Cell, settings: BenchSettings) -> CellData:
    """The cell's train subset with its noise, and the clean val/test subsets.

    The subsets depend on the seed only (every method of a setting sees the same data);
    noise is injected with the cell's seed into the subset's true labels.

    Raises
    ------
    DataError
        No test split; ``real`` noise without a ``true_label`` column.
    """
    if dataset.test is None:
        raise DataError(f"dataset {dataset.name!r} has no test split; the benchmark scores on test")
    train = dataset.train
    keep = _subset(len(train), settings.train_size, cell.seed, 0)
    images = train.images[keep]
    if cell.noise == REAL_NOISE:
        if train.true_labels is None:
            raise DataError(
                f"noise {REAL_NOISE!r} needs reference labels: dataset {dataset.name!r} has no "
                f"true_label column (a CSV manifest with path,label,true_label)"
            )
        observed, true = train.labels[keep], train.true_labels[keep]
        rate = float((observed != true).mean())
    else:
        true = (train.true_labels if train.true_labels is not None else train.labels)[keep]
        spec = parse_noise_spec(cell.noise)
        noise = inject_noise(true, spec, n_classes=dataset.n_classes, seed=cell.seed, images=images)
        observed = noise.noisy_labels
        rate = spec.rate if spec.rate is not None else noise.realised_rate
    size = settings.eval_size
    val = None if dataset.val is None else _clean_split(dataset.val, size, cell.seed, 1)
    test = _clean_split(dataset.test, size, cell.seed, 2)
    return CellData(images, observed, true, val, test, dataset.n_classes, float(rate), len(train))


# ----------------------------------------------------------------------------- method


def method_kwargs(method: str, *, epochs: int, noise_rate: float) -> dict[str, Any]:
    """The method's parameters for a cell: its paper defaults, epoch-length parameters
    scaled to ``epochs`` (:data:`EPOCH_PARAMS`), rate parameters from the noise rate."""
    accepted = method_params(method)
    kwargs: dict[str, Any] = {}
    for name, at_100 in EPOCH_PARAMS.get(method, {}).items():
        if name in accepted:
            kwargs[name] = max(1, round(at_100 * epochs / 100))
    for name, momentum_100 in MOMENTUM_PARAMS.get(method, {}).items():
        if name in accepted:
            kwargs[name] = float(momentum_100 ** (100 / epochs))
    for name, rule in _RATE_PARAMS.items():
        if name in accepted:
            kwargs[name] = float(rule(noise_rate))
    return kwargs


def _model(settings: BenchSettings, data: CellData, seed: int) -> nn.Module:
    with _INIT_LOCK:
        torch.manual_seed(seed)
        return create_model(
            settings.model,
            num_classes=data.n_classes,
            in_chans=int(data.train_images.shape[1]),
            img_size=int(data.train_images.shape[2]),
        )


class EpochScores(Hook):
    """After every epoch: accuracy on val and test with the method's own prediction
    (:meth:`~noisescore.ml.methods.base.Method.predict_logits`). Its time is counted apart,
    so that samples/s measure training only."""

    def __init__(
        self,
        predict: Callable[[DeviceImages], torch.Tensor],
        val: tuple[DeviceImages, np.ndarray] | None,
        test: tuple[DeviceImages, np.ndarray],
    ) -> None:
        self.predict, self.val, self.test = predict, val, test
        self.val_acc_: list[float] = []
        self.test_acc_: list[float] = []
        self.seconds_ = 0.0

    def _accuracy(self, split: tuple[DeviceImages, np.ndarray]) -> float:
        images, labels = split
        pred = self.predict(images).argmax(1).cpu().numpy()
        return float((pred == labels).mean())

    def on_epoch_end(self, trainer: Trainer, epoch: int, stats: dict[str, float]) -> None:
        start = time.perf_counter()
        if self.val is not None:
            self.val_acc_.append(self._accuracy(self.val))
            stats["val_accuracy"] = self.val_acc_[-1]
        self.test_acc_.append(self._accuracy(self.test))
        stats["test_accuracy"] = self.test_acc_[-1]
        self.seconds_ += time.perf_counter() - start


def run_cell(
    cell: Cell, dataset: Dataset, settings: BenchSettings, *, hooks: tuple[Hook, ...] = ()
) -> dict[str, Any]:
    """Train ``cell.method`` on the cell's data and score it (:func:`cell_metrics`).

    Raises
    ------
    MethodError, DataError, ValueError
        Bad method parameters for this schedule, unusable data.
    """
    start = time.perf_counter()
    data = cell_data(dataset, cell, settings)
    device = resolve_device(settings.device)
    params = method_kwargs(cell.method, epochs=settings.epochs, noise_rate=data.noise_rate)
    two = METHODS[cell.method].n_models == 2
    # The peer first (seed + 1), then the main network, as every two-network run does.
    peer = _model(settings, data, cell.seed + 1) if two else None
    model = _model(settings, data, cell.seed)
    method = create_method(
        cell.method,
        n_samples=len(data.train_labels),
        n_classes=data.n_classes,
        peer=peer,
        **params,
    )
    images = DeviceImages(data.train_images, device)
    stats = (images.mean_list, images.std_list)

    def on_device(split: tuple[np.ndarray, np.ndarray]) -> tuple[DeviceImages, np.ndarray]:
        return DeviceImages(split[0], device, mean=stats[0], std=stats[1]), split[1]

    val = None if data.val is None else on_device(data.val)
    test = on_device(data.test)
    config = TrainConfig(
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        lr_milestones=(),
        seed=cell.seed,
        augment=settings.augment,
    )
    trainer = Trainer(model, images, data.train_labels, config=config, hooks=[method, *hooks])
    scores = EpochScores(lambda x: method.predict_logits(trainer, x), val, test)
    trainer.hooks.append(scores)
    fit_start = time.perf_counter()
    trainer.fit()
    fit_seconds = time.perf_counter() - fit_start
    pred = method.predict_logits(trainer, test[0]).argmax(1).cpu().numpy()
    return cell_metrics(
        cell,
        data,
        settings,
        scores,
        final_pred=pred,
        train_seconds=fit_seconds - scores.seconds_,
        wall_seconds=time.perf_counter() - start,
        params=params,
        final_loss=trainer.history[-1].loss,
    )


def cell_metrics(
    cell: Cell,
    data: CellData,
    settings: BenchSettings,
    scores: EpochScores,
    *,
    final_pred: np.ndarray,
    train_seconds: float,
    wall_seconds: float,
    params: dict[str, Any],
    final_loss: float,
) -> dict[str, Any]:
    """The cell's JSON record (see the module docstring for the metrics)."""
    test_labels = data.test[1]
    k = min(settings.last_k, len(scores.test_acc_))
    best = int(np.argmax(scores.val_acc_)) if scores.val_acc_ else None
    n_seen = len(data.train_labels) * settings.epochs
    if not math.isfinite(final_loss):
        raise MethodError(f"method {cell.method!r} diverged: final training loss {final_loss}")
    return {
        **cell.as_dict(),
        "key": cell.key,
        "setting": cell.setting,
        "n_train": len(data.train_labels),
        "n_train_full": data.n_train_full,
        "n_val": 0 if data.val is None else len(data.val[1]),
        "n_test": len(test_labels),
        "n_classes": data.n_classes,
        "noise_rate": data.noise_rate,
        "realised_noise_rate": data.realised_rate,
        "epochs": settings.epochs,
        "params": params,
        "test_acc_last_k": float(np.mean(scores.test_acc_[-k:])),
        "test_acc_best_val": None if best is None else scores.test_acc_[best],
        "best_val_epoch": None if best is None else best + 1,
        "test_acc_final": scores.test_acc_[-1],
        "macro_f1": float(f1_score(test_labels, final_pred, average="macro", zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(test_labels, final_pred)),
        "final_loss": float(final_loss),
        "wall_seconds": wall_seconds,
        "train_seconds": train_seconds,
        "samples_per_second": n_seen / train_seconds if train_seconds > 0 else None,
        "test_acc_by_epoch": scores.test_acc_,
        "val_acc_by_epoch": scores.val_acc_,
    }
