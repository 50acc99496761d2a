"""The cleaning job as small stages: data -> noise -> LiNC -> evaluate -> outputs.

``noisescore clean`` calls :func:`run_clean`; each stage is a plain function so that the
orchestration layer can run them as separate tasks. Nothing here knows about the CLI.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from noisescore import __version__
from noisescore.ml.data import Dataset, Split, load_dataset
from noisescore.ml.linc import LiNC
from noisescore.ml.metrics import (
    classification_metrics,
    correction_metrics,
    detection_auroc,
    detection_metrics,
)
from noisescore.ml.models import create_model
from noisescore.ml.noise import NoiseResult, inject_noise
from noisescore.ml.train import DeviceImages, EpochStats, Hook, TrainConfig, Trainer, resolve_device

if TYPE_CHECKING:
    from noisescore.settings import CleanSettings


@dataclass(frozen=True)
class PreparedData:
    """The dataset with the labels training will see, and the truth where it is known.

    ``train_true`` is the reference for the training labels: the labels before injection
    when noise was injected, a manifest's ``true_label`` column, else ``None``.
    """

    dataset: Dataset
    train_labels: np.ndarray
    train_true: np.ndarray | None
    noise: NoiseResult | None
    val_labels: np.ndarray | None
    val_noise: NoiseResult | None

    @property
    def flipped(self) -> np.ndarray | None:
        return None if self.train_true is None else self.train_labels != self.train_true


@dataclass
class TrainedRun:
    """A finished training: the model, its per-epoch history and (for LiNC) the hook."""

    model: nn.Module
    images: DeviceImages
    history: list[EpochStats]
    train_seconds: float
    linc: LiNC | None = None
    trainer: Trainer | None = field(default=None, repr=False)


@dataclass
class CleanResult:
    settings: CleanSettings
    data: PreparedData
    linc: TrainedRun
    baseline: TrainedRun | None
    report: dict[str, Any]


def prepare_data(settings: CleanSettings) -> PreparedData:
    """Load the dataset and inject the requested noise into train (and optionally val)."""
    dataset = load_dataset(
        settings.dataset,
        data_dir=settings.data_dir,
        seed=settings.seed,
        image_size=settings.image_size,
    )
    train = dataset.train
    noise = val_noise = None
    train_labels, train_true = train.labels, train.true_labels
    val_labels = dataset.val.labels if dataset.val is not None else None
    if settings.noise is not None:
        noise = inject_noise(
            train.labels,
            settings.noise,
            n_classes=dataset.n_classes,
            seed=settings.seed,
            images=train.images,
        )
        train_labels = noise.noisy_labels
        if train_true is None:
            train_true = train.labels
        if settings.noise_val and dataset.val is not None:
            val_noise = inject_noise(
                dataset.val.labels,
                settings.noise,
                n_classes=dataset.n_classes,
                seed=settings.seed + 1,
                images=dataset.val.images,
            )
            val_labels = val_noise.noisy_labels
    return PreparedData(dataset, train_labels, train_true, noise, val_labels, val_noise)


def train_config(settings: CleanSettings) -> TrainConfig:
    return TrainConfig(
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        lr_milestones=settings.lr_milestones,
        seed=settings.seed,
        augment=settings.augment,
    )


def train(
    data: PreparedData,
    settings: CleanSettings,
    *,
    linc: bool = True,
    progress: bool = False,
    extra_hooks: Sequence[Hook] = (),
) -> TrainedRun:
    """Train a fresh model on ``data.train_labels``; with ``linc=True`` LiNC corrects them.

    The model's initial weights and the batch order depend only on ``settings.seed``,
    so a LiNC run and its baseline differ only by the method.
    """
    device = resolve_device(settings.device)
    dataset = data.dataset
    torch.manual_seed(settings.seed)
    model = create_model(
        settings.model,
        num_classes=dataset.n_classes,
        in_chans=dataset.in_chans,
        img_size=dataset.image_size[0],
        checkpoint=settings.checkpoint,
    )
    images = DeviceImages(dataset.train.images, device)
    hook = (
        LiNC(
            dataset.n_classes,
            warmup_epochs=settings.warmup_epochs,
            alpha_lr=settings.alpha_lr,
            alpha_wd=settings.alpha_wd,
            alpha_grad=settings.alpha_grad,
        )
        if linc
        else None
    )
    trainer = Trainer(
        model,
        images,
        data.train_labels,
        config=train_config(settings),
        hooks=[*([hook] if hook else []), *extra_hooks],
        progress=progress,
        desc="LiNC" if linc else "baseline CE",
    )
    start = time.perf_counter()
    history = trainer.fit()
    seconds = time.perf_counter() - start
    return TrainedRun(trainer.model, images, history, seconds, hook, trainer)


def predict_split(run: TrainedRun, split: Split) -> np.ndarray:
    """Class probabilities (N, C) of ``run``'s model on ``split``, normalised like train."""
    assert run.trainer is not None
    images = DeviceImages(
        split.images, run.images.device, mean=run.images.mean_list, std=run.images.std_list
    )
    return run.trainer.predict_proba(images)


def _test_metrics(run: TrainedRun, dataset: Dataset) -> dict[str, Any] | None:
    if dataset.test is None:
        return None
    test = dataset.test
    reference = test.true_labels if test.true_labels is not None else test.labels
    return classification_metrics(reference, predict_split(run, test))


def _timing(run: TrainedRun, warmup_epochs: int | None = None) -> dict[str, float]:
    seconds = [h.seconds for h in run.history]
    timing = {
        "train_seconds": run.train_seconds,
        "epoch_seconds_mean": statistics.fmean(seconds),
        "samples_per_second_mean": statistics.fmean(h.samples_per_second for h in run.history),
    }
    if warmup_epochs is not None:
        timing["warmup_epoch_seconds_mean"] = statistics.fmean(seconds[:warmup_epochs])
        if len(seconds) > warmup_epochs:
            timing["final_epoch_seconds_mean"] = statistics.fmean(seconds[warmup_epochs:])
    return timing


def build_report(
    settings: CleanSettings, data: PreparedData, run: TrainedRun, baseline: TrainedRun | None
) -> dict[str, Any]:
    """The JSON report of a cleaning job (keys documented in docs/USAGE.md)."""
    dataset, hook = data.dataset, run.linc
    assert hook is not None
    linc: dict[str, Any] = {
        "warmup_epochs": settings.warmup_epochs,
        "alpha_lr": settings.alpha_lr,
        "alpha_wd": settings.alpha_wd,
        "alpha_grad": settings.alpha_grad,
        "otsu_threshold": hook.otsu_threshold_,
        "n_flagged": int(hook.flagged_.sum()),
        "n_changed": int((hook.corrected_labels_ != hook.observed_labels_).sum()),
        "trust_mean": float(hook.trust_.mean()),
        "history": [h.as_dict() for h in run.history],
    }
    flipped = data.flipped
    if flipped is not None and data.train_true is not None:
        correction = correction_metrics(
            hook.observed_labels_, hook.corrected_labels_, data.train_true
        )
        linc.update(
            correction_accuracy=correction["correction_accuracy"],
            label_accuracy_before=correction["label_accuracy_before"],
            label_accuracy_after=correction["label_accuracy_after"],
            detection=detection_metrics(hook.trust_, flipped, hook.flagged_),
            detection_auroc_by_epoch={
                str(epoch): detection_auroc(alpha, flipped)
                for epoch, alpha in enumerate(hook.trust_by_epoch_, start=1)
            },
        )
    noise: dict[str, Any] | None = None
    if data.noise is not None:
        spec = data.noise.spec
        noise = {
            "kind": spec.kind,
            "rate": spec.rate,
            "path": spec.path,
            "realised_rate": data.noise.realised_rate,
            "seed": data.noise.seed,
            "transition": data.noise.transition.tolist(),
            "val_realised_rate": data.val_noise.realised_rate if data.val_noise else None,
        }
    elif flipped is not None:
        noise = {"kind": "reference", "rate": None, "realised_rate": float(flipped.mean())}
    report: dict[str, Any] = {
        "noisescore_version": __version__,
        "settings": settings.model_dump(mode="json"),
        "dataset": {
            "name": dataset.name,
            "source": dataset.source,
            "n_train": len(dataset.train),
            "n_val": len(dataset.val) if dataset.val is not None else 0,
            "n_test": len(dataset.test) if dataset.test is not None else 0,
            "n_classes": dataset.n_classes,
            "in_chans": dataset.in_chans,
            "image_size": list(dataset.image_size),
        },
        "noise": noise,
        "model": {"name": settings.model, "device": str(run.images.device)},
        "linc": linc,
        "test": _test_metrics(run, dataset),
        "timing": _timing(run, settings.warmup_epochs),
    }
    if baseline is not None:
        report["baseline"] = {
            "test": _test_metrics(baseline, dataset),
            "timing": _timing(baseline, settings.warmup_epochs),
            "history": [h.as_dict() for h in baseline.history],
        }
    return report


def run_clean(settings: CleanSettings, *, progress: bool = False) -> CleanResult:
    """Run a whole cleaning job in memory; :func:`noisescore.ml.outputs.write_outputs` saves it."""
    data = prepare_data(settings)
    run = train(data, settings, linc=True, progress=progress)
    baseline = train(data, settings, linc=False, progress=progress) if settings.baseline else None
    report = build_report(settings, data, run, baseline)
    return CleanResult(settings, data, run, baseline, report)
