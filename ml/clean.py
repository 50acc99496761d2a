"""The cleaning job as small stages, each a plain function of arrays and settings.

    load_data -> add_noise -> linc_warmup -> otsu_correct -> train_final -> build_report

The Prefect flow ``clean_labels`` (``flows/clean_labels.py``, what ``noisescore clean``
runs) calls these stages as tasks and stores what each produces; :func:`run_clean` chains
them in memory for benchmarks. Nothing here knows about the CLI, Prefect or storage.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import nn

from noisescore import __version__
from noisescore.ml import distributed
from noisescore.ml.data import Dataset, Split
from noisescore.ml.detectors import (
    CONSENSUS,
    OOF,
    consensus_by_epoch,
    consensus_score,
    create_detectors,
)
from noisescore.ml.detectors.bimodality import bimodality
from noisescore.ml.detectors.confident_learning import (
    label_issues,
    label_quality,
    out_of_fold_probabilities,
)
from noisescore.ml.linc import Correction, LiNC, otsu_correct
from noisescore.ml.metrics import (
    classification_metrics,
    correction_metrics,
    detection_auroc,
    detection_metrics,
    detection_ranking,
    suspect_cutoff,
)
from noisescore.ml.models import create_model
from noisescore.ml.noise import NoiseResult, inject_noise
from noisescore.ml.streaming import images_like, make_images
from noisescore.ml.train import EpochStats, Hook, TrainConfig, Trainer, TrainImages, resolve_device

if TYPE_CHECKING:
    from noisescore.ml.distributed import Dist
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
class Warmup:
    """LiNC's warm-up (epochs ``1..w``): trust per sample and the state to resume from.

    Attributes
    ----------
    trust_by_epoch : np.ndarray, shape (w, N), float32
        alpha at the end of each warm-up epoch; the last row is the trust score.
    predicted_labels : np.ndarray, shape (N,), int64
        The model's argmax on the training set at the end of warm-up.
    observed_labels : np.ndarray, shape (N,), int64
        The labels training saw (after any injected noise).
    trainer_state : dict
        :meth:`Trainer.state_dict` after epoch ``w`` (weights, optimizer, schedule, RNG).
    mean, std : list of float
        Per-channel normalisation of the training images.
    seconds : float
        Wall time of the warm-up (with the out-of-fold trainings of ``--cl-folds``).
    detector_scores : dict of str to np.ndarray, shape (w, N), float32
        Every detector's score at the end of each warm-up epoch (low = suspect);
        ``confident_learning_oof`` (``--cl-folds``) has one row, the end of warm-up.
    detector_extras : dict of str to np.ndarray, shape (N,), float32
        Secondary per-sample values (``datamaps_variability``, ``data_iq_aleatoric``,
        ``confident_learning_issue``).
    """

    trust_by_epoch: np.ndarray
    predicted_labels: np.ndarray
    observed_labels: np.ndarray
    trainer_state: dict[str, Any] = field(repr=False)
    mean: list[float]
    std: list[float]
    seconds: float
    detector_scores: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    detector_extras: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def trust(self) -> np.ndarray:
        return self.trust_by_epoch[-1]

    @property
    def history(self) -> list[EpochStats]:
        return [EpochStats.from_dict(h) for h in self.trainer_state["history"]]

    def scores(self) -> dict[str, np.ndarray]:
        """Every score at the end of warm-up, ``consensus`` included: name -> (N,)."""
        final = {name: rows[-1] for name, rows in self.detector_scores.items()}
        if not final:
            final = {"linc": self.trust}
        per_epoch = {k: v for k, v in final.items() if k != OOF}
        return {**final, CONSENSUS: consensus_score(per_epoch)}

    def scores_by_epoch(self) -> dict[str, np.ndarray]:
        """Every per-epoch score, ``consensus`` included: name -> (w, N) (OOF: (1, N))."""
        rows = dict(self.detector_scores) or {"linc": self.trust_by_epoch}
        per_epoch = {k: v for k, v in rows.items() if k != OOF}
        return {**rows, CONSENSUS: consensus_by_epoch(per_epoch)}

    _ARRAYS = ("trust_by_epoch", "predicted_labels", "observed_labels")
    _ARRAY_DICTS = ("detector_scores", "detector_extras")

    def to_bytes(self, *, fingerprint: str) -> bytes:
        """Serialise as a checkpoint; ``fingerprint`` ties it to the settings that made it.

        Only tensors, numbers, strings and containers: it loads with ``weights_only=True``,
        so a tampered checkpoint in a shared bucket cannot run code in a worker.
        """
        state: dict[str, Any] = {"format": WARMUP_FORMAT, "fingerprint": fingerprint, **vars(self)}
        for name in self._ARRAYS:
            state[name] = torch.from_numpy(np.ascontiguousarray(state[name]))
        for name in self._ARRAY_DICTS:
            state[name] = {
                k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state[name].items()
            }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, fingerprint: str) -> Warmup:
        """Load a checkpoint; ValueError when it was made by different settings."""
        try:  # MultiStepLR keeps its milestones in a Counter: the one non-tensor type
            with torch.serialization.safe_globals([collections.Counter]):
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"not a noisescore warm-up checkpoint: {err}") from err
        if not isinstance(state, dict) or state.get("format") != WARMUP_FORMAT:
            raise ValueError("not a noisescore warm-up checkpoint")
        if state.get("fingerprint") != fingerprint:
            raise ValueError("the warm-up checkpoint was made with different settings")
        del state["format"], state["fingerprint"]
        for name in cls._ARRAYS:
            state[name] = state[name].numpy()
        for name in cls._ARRAY_DICTS:
            state[name] = {k: v.numpy() for k, v in state.get(name, {}).items()}
        return cls(**state)


WARMUP_FORMAT = "noisescore.warmup.v2"  # v2: detector scores

# Settings that change what the warm-up computes; anything else (device, baseline, the
# final epochs' count only through the LR schedule) may differ between a run and its retry.
_WARMUP_FIELDS = (
    "dataset", "image_size", "noise", "noise_val", "seed", "epochs", "warmup_epochs", "model",
    "checkpoint", "batch_size", "lr", "weight_decay", "lr_milestones", "augment", "alpha_lr",
    "alpha_wd", "alpha_grad", "detectors", "cl_folds",
)  # fmt: skip


def warmup_fingerprint(settings: CleanSettings, data: PreparedData) -> str:
    """sha256 of what determines the warm-up: its settings and the exact training labels."""
    fields = settings.model_dump(mode="json", include=set(_WARMUP_FIELDS))
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(data.train_labels, dtype=np.int64).tobytes())
    digest.update(str(data.dataset.train.images.shape).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class LincResult:
    """What LiNC found: the warm-up's trust and the Otsu correction built on it."""

    warmup: Warmup
    correction: Correction

    @property
    def trust(self) -> np.ndarray:
        return self.warmup.trust

    @property
    def trust_by_epoch(self) -> np.ndarray:
        return self.warmup.trust_by_epoch

    @property
    def observed_labels(self) -> np.ndarray:
        return self.warmup.observed_labels

    @property
    def predicted_labels(self) -> np.ndarray:
        return self.warmup.predicted_labels

    @property
    def otsu_threshold(self) -> float:
        return self.correction.otsu_threshold

    @property
    def flagged(self) -> np.ndarray:
        return self.correction.flagged

    @property
    def corrected_labels(self) -> np.ndarray:
        return self.correction.corrected_labels

    @property
    def scores(self) -> dict[str, np.ndarray]:
        """Every detector's score and ``consensus`` at the end of warm-up (low = suspect)."""
        return self.warmup.scores()

    @property
    def extras(self) -> dict[str, np.ndarray]:
        return self.warmup.detector_extras


@dataclass
class TrainedRun:
    """A finished training: the model, its per-epoch history and (for LiNC) what it found."""

    model: nn.Module
    images: TrainImages
    history: list[EpochStats]
    train_seconds: float
    linc: LincResult | None = None
    trainer: Trainer | None = field(default=None, repr=False)


@dataclass
class CleanResult:
    settings: CleanSettings
    data: PreparedData
    linc: TrainedRun
    baseline: TrainedRun | None
    report: dict[str, Any]


def load_data(settings: CleanSettings) -> Dataset:
    """Load ``settings.dataset``: a name, a path, or a ``medmnist://``/``file://``/``s3://`` URI."""
    from noisescore.uris import load_dataset_uri

    return load_dataset_uri(
        settings.dataset,
        data_dir=settings.data_dir,
        seed=settings.seed,
        image_size=settings.image_size,
        roots=settings.dataset_roots,  # jobs submitted over the API: checked where read
    )


def add_noise(dataset: Dataset, settings: CleanSettings) -> PreparedData:
    """Inject ``settings.noise`` into train (and val with ``noise_val``), keeping the truth."""
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


def prepare_data(settings: CleanSettings) -> PreparedData:
    """:func:`load_data` then :func:`add_noise`."""
    return add_noise(load_data(settings), settings)


def train_config(settings: CleanSettings) -> TrainConfig:
    return TrainConfig(
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        lr_milestones=settings.lr_milestones,
        seed=settings.seed,
        augment=settings.augment,
        graph=settings.graph,
    )


def _train_images(
    images: np.ndarray,
    device: torch.device,
    settings: CleanSettings,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> TrainImages:
    """The training images where ``data_placement`` puts them (the same batches either way,
    so the placement is not part of the warm-up fingerprint)."""
    return make_images(
        images,
        device,
        placement=settings.data_placement,
        share=settings.device_memory_share,
        mean=mean,
        std=std,
    )


def _trainer(
    data: PreparedData,
    settings: CleanSettings,
    labels: np.ndarray,
    *,
    hooks: Sequence[Hook],
    progress: bool,
    desc: str,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Trainer:
    """A fresh model and trainer. Initial weights and batch order depend only on the seed,
    so a LiNC run and its baseline differ only by the method."""
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
    images = _train_images(dataset.train.images, device, settings, mean=mean, std=std)
    return Trainer(
        model,
        images,
        labels,
        config=train_config(settings),
        hooks=hooks,
        progress=progress,
        desc=desc,
        dist=distributed.current(),
    )


def linc_warmup(
    data: PreparedData,
    settings: CleanSettings,
    *,
    progress: bool = False,
    hooks: Sequence[Hook] = (),
) -> Warmup:
    """Epochs ``1..warmup_epochs`` with trainable trust and ``settings.detectors`` recording
    their scores; ``hooks`` run after those. With ``settings.cl_folds = K``, then K
    out-of-fold trainings of the same length for confident learning."""
    _announce("linc_warmup", data, settings)
    n_classes = data.dataset.n_classes
    linc = LiNC(
        n_classes,
        warmup_epochs=settings.warmup_epochs,
        alpha_lr=settings.alpha_lr,
        alpha_wd=settings.alpha_wd,
        alpha_grad=settings.alpha_grad,
    )
    detectors = create_detectors(
        settings.detector_names(), n_classes, warmup_epochs=settings.warmup_epochs
    )
    trainer = _trainer(
        data,
        settings,
        data.train_labels,
        hooks=[linc, *detectors, *hooks],
        progress=progress,
        desc="warm-up",
    )
    start = time.perf_counter()
    trainer.fit(stop_epoch=settings.warmup_epochs)
    _finished()
    scores = {d.name: d.scores_by_epoch_ for d in detectors}
    extras = {k: v for d in detectors for k, v in d.extras_.items()}
    trainer_state = trainer.state_dict()
    mean, std = trainer.images.mean_list, trainer.images.std_list
    del trainer
    if settings.cl_folds:
        proba = out_of_fold_proba(data, settings, progress=progress)
        scores[OOF] = label_quality(data.train_labels, proba)[None, :]
        extras[f"{OOF}_issue"] = label_issues(data.train_labels, proba).astype(np.float32)
    return Warmup(
        trust_by_epoch=linc.trust_by_epoch_,
        predicted_labels=linc.predicted_labels_,
        observed_labels=linc.observed_labels_,
        trainer_state=trainer_state,
        mean=mean,
        std=std,
        seconds=time.perf_counter() - start,
        detector_scores=scores,
        detector_extras=extras,
    )


def out_of_fold_proba(
    data: PreparedData, settings: CleanSettings, *, progress: bool = False
) -> np.ndarray:
    """K-fold out-of-fold probabilities (N, C) for confident learning: each fold is a fresh
    model trained like the warm-up (same seed, optimiser and length) on the other folds."""
    images = data.dataset.train.images
    config = dataclasses.replace(train_config(settings), epochs=settings.warmup_epochs)

    def train_fold(fit_idx: np.ndarray, held_idx: np.ndarray) -> np.ndarray:
        device = resolve_device(settings.device)
        torch.manual_seed(settings.seed)
        model = create_model(
            settings.model,
            num_classes=data.dataset.n_classes,
            in_chans=data.dataset.in_chans,
            img_size=data.dataset.image_size[0],
            checkpoint=settings.checkpoint,
        )
        fit = _train_images(images[fit_idx], device, settings)
        trainer = Trainer(
            model,
            fit,
            data.train_labels[fit_idx],
            config=config,
            progress=progress,
            desc="cl fold",
        )
        trainer.fit()
        held = images_like(fit, images[held_idx])
        return trainer.predict_proba(held)

    return out_of_fold_probabilities(
        train_fold, data.train_labels, folds=settings.cl_folds, seed=settings.seed
    )


def correct(warmup: Warmup, settings: CleanSettings | None = None) -> Correction:
    """Otsu's split of the flagging score (``settings.flag_by``, default LiNC's trust);
    flagged samples take the model's prediction, unless LiNC's trust histogram fails the
    bimodality test (``settings.bimodality_min``): then the flags stay and no label
    changes.

    The test is always on alpha, whichever score flags: it answers "is there a noisy
    mode at all", and it is calibrated on alpha (docs/RESULTS.md). The consensus (a
    median of ranks) is never bimodal, at any noise level measured, so testing it would
    switch the correction off for good."""
    flag_by = settings.flag_by if settings is not None else "linc"
    eta_min = settings.bimodality_min if settings is not None else 0.0
    score = warmup.trust if flag_by == "linc" else warmup.scores()[flag_by]
    test = bimodality(warmup.trust, eta_min=eta_min, log_distrust=True)
    return otsu_correct(
        score,
        warmup.predicted_labels,
        warmup.observed_labels,
        relabel=bool(test["bimodal"]),
        flag_by=flag_by,
        bimodality=test,
    )


def train_final(
    data: PreparedData,
    settings: CleanSettings,
    warmup: Warmup,
    correction: Correction,
    *,
    progress: bool = False,
    hooks: Sequence[Hook] = (),
) -> TrainedRun:
    """Resume from the warm-up and train epochs ``w+1..E`` on the corrected labels."""
    _announce(
        "train_final",
        data,
        settings,
        lambda: (warmup.to_bytes(fingerprint=warmup_fingerprint(settings, data)), correction),
    )
    trainer = _trainer(
        data,
        settings,
        correction.corrected_labels,
        hooks=hooks,
        progress=progress,
        desc="final",
        mean=warmup.mean,
        std=warmup.std,
    )
    trainer.load_state_dict(warmup.trainer_state)
    start = time.perf_counter()
    if trainer.epoch < settings.epochs:
        trainer.fit()
    _finished()
    seconds = warmup.seconds + time.perf_counter() - start
    linc = LincResult(warmup, correction)
    return TrainedRun(trainer.model, trainer.images, trainer.history, seconds, linc, trainer)


def train_baseline(
    data: PreparedData,
    settings: CleanSettings,
    *,
    progress: bool = False,
    hooks: Sequence[Hook] = (),
) -> TrainedRun:
    """Plain cross-entropy on the observed labels, same seed, same loop."""
    _announce("train_baseline", data, settings)
    trainer = _trainer(
        data, settings, data.train_labels, hooks=hooks, progress=progress, desc="baseline CE"
    )
    start = time.perf_counter()
    history = trainer.fit()
    _finished()
    seconds = time.perf_counter() - start
    return TrainedRun(trainer.model, trainer.images, history, seconds, None, trainer)


def predict_split(run: TrainedRun, split: Split) -> np.ndarray:
    """Class probabilities (N, C) of ``run``'s model on ``split``, normalised (and placed:
    device or streamed) like train."""
    assert run.trainer is not None
    return run.trainer.predict_proba(images_like(run.images, split.images))


def calibrate_suspect_cutoff(data: PreparedData, run: TrainedRun) -> float:
    """The label-quality cut-off that reproduces LiNC's flags with the final model.

    Label quality of a sample is the final model's probability of its observed label;
    the cut-off is the threshold where "quality < cut-off" best matches (F1) the samples
    LiNC flagged on the training set. New labelled data scored below it by the service's
    ``ScoreLabels`` is suspect for the same reason LiNC would have flagged it.
    """
    assert run.linc is not None
    probabilities = predict_split(run, data.dataset.train)
    return suspect_cutoff(probabilities, run.linc.observed_labels, run.linc.flagged)


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


DETECTOR_SOURCES = {
    "confident_learning": "cleanlab on the warm-up model's own (in-sample) probabilities",
    OOF: "cleanlab on K-fold out-of-fold probabilities (K extra warm-up trainings)",
    CONSENSUS: "median normalised rank of the per-epoch detectors",
    "grand": "last-layer closed form ||p - y|| * ||[h, 1]||",
}


def detectors_report(
    warmup: Warmup, flag_by: str, flipped: np.ndarray | None
) -> dict[str, dict[str, Any]]:
    """Per score: what it is, whether it flagged and, when the truth is known, its
    AUROC / average precision at the end of warm-up and AUROC at every warm-up epoch."""
    out: dict[str, dict[str, Any]] = {}
    extras = warmup.detector_extras
    for name, rows in warmup.scores_by_epoch().items():
        entry: dict[str, Any] = {"flagged_by": name == flag_by, "epochs": int(rows.shape[0])}
        if name in DETECTOR_SOURCES:
            entry["source"] = DETECTOR_SOURCES[name]
        if f"{name}_issue" in extras:
            entry["n_issues"] = int(extras[f"{name}_issue"].sum())
        if flipped is not None:
            entry.update(detection_ranking(rows[-1], flipped))
            first = warmup.trust_by_epoch.shape[0] - rows.shape[0] + 1
            entry["auroc_by_epoch"] = {
                str(epoch): detection_auroc(row, flipped)
                for epoch, row in enumerate(rows, start=first)
            }
        out[name] = entry
    return out


def build_report(
    settings: CleanSettings, data: PreparedData, run: TrainedRun, baseline: TrainedRun | None
) -> dict[str, Any]:
    """The JSON report of a cleaning job (keys documented in docs/USAGE.md)."""
    dataset, linc_result = data.dataset, run.linc
    assert linc_result is not None
    linc: dict[str, Any] = {
        "warmup_epochs": settings.warmup_epochs,
        "alpha_lr": settings.alpha_lr,
        "alpha_wd": settings.alpha_wd,
        "alpha_grad": settings.alpha_grad,
        "otsu_threshold": linc_result.otsu_threshold,
        "n_flagged": int(linc_result.flagged.sum()),
        "n_changed": int((linc_result.corrected_labels != linc_result.observed_labels).sum()),
        "trust_mean": float(linc_result.trust.mean()),
        "history": [h.as_dict() for h in run.history],
    }
    fix = linc_result.correction
    linc.update(flag_by=fix.flag_by, relabelled=fix.relabelled, bimodality=fix.bimodality)
    flipped = data.flipped
    flag_score = linc_result.scores[fix.flag_by]
    if flipped is not None and data.train_true is not None:
        correction = correction_metrics(
            linc_result.observed_labels, linc_result.corrected_labels, data.train_true
        )
        linc.update(
            correction_accuracy=correction["correction_accuracy"],
            label_accuracy_before=correction["label_accuracy_before"],
            label_accuracy_after=correction["label_accuracy_after"],
            detection=detection_metrics(flag_score, flipped, linc_result.flagged),
            detection_auroc_by_epoch={
                str(epoch): detection_auroc(alpha, flipped)
                for epoch, alpha in enumerate(linc_result.trust_by_epoch, start=1)
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
        "model": {
            "name": settings.model,
            "device": str(run.images.device),
            "processes": run.trainer.world_size if run.trainer is not None else 1,
        },
        "linc": linc,
        "detectors": detectors_report(linc_result.warmup, fix.flag_by, flipped),
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
    """Run every stage in memory (no storage, no orchestration): for benchmarks."""
    data = prepare_data(settings)
    warmup = linc_warmup(data, settings, progress=progress)
    run = train_final(data, settings, warmup, correct(warmup, settings), progress=progress)
    baseline = train_baseline(data, settings, progress=progress) if settings.baseline else None
    report = build_report(settings, data, run, baseline)
    return CleanResult(settings, data, run, baseline, report)


# ----------------------------------------------------------------------------- distributed
# Under torchrun, rank 0 runs the job (the Prefect flow) as in one process; the other ranks
# run serve_stages: before each training stage rank 0 sends them a StageCommand, and they
# run the same stage function on data they prepare themselves, so that every rank enters
# the stage's collectives (DDP's all-reduces, LiNC's epoch-end sums) together.

STOP = "stop"
#: The stages every rank runs together; everything else runs on rank 0 alone.
DISTRIBUTED_STAGES = ("linc_warmup", "train_final", "train_baseline")
# Settings that determine the prepared data (a rank reads it once per job).
_DATA_FIELDS = {"dataset", "data_dir", "image_size", "noise", "noise_val", "seed", "dataset_roots"}


class StageCommand(NamedTuple):
    """What rank 0 broadcasts to the other ranks before a training stage, or to stop.

    Attributes
    ----------
    stage : str
        One of :data:`DISTRIBUTED_STAGES`, or :data:`STOP`.
    settings_json : str
        The job's :class:`CleanSettings` as JSON; the other ranks prepare their data from it.
    payload : Any
        What the stage needs besides the data: for ``train_final`` the warm-up checkpoint
        (:meth:`Warmup.to_bytes`) and the :class:`Correction`; else ``None``.
    labels_fingerprint : str
        :func:`labels_fingerprint` of rank 0's training data.
    """

    stage: str
    settings_json: str
    payload: Any
    labels_fingerprint: str


@dataclass
class _Dispatch:
    """Rank 0's view of the other ranks: the stage they are in, and whether they stopped."""

    in_flight: str | None = None
    stopped: bool = False


_dispatch = _Dispatch()


def distributed_group() -> Dist | None:
    """This process's :class:`Dist` when the job trains in several processes, else None."""
    dist = distributed.current()
    return dist if dist is not None and dist.world_size > 1 else None


def world_size() -> int:
    """Processes this job trains in (1 without a process group)."""
    dist = distributed_group()
    return 1 if dist is None else dist.world_size


def check_distributed(settings: CleanSettings, world: int) -> None:
    """Refuse, in one line, what cannot train in ``world`` > 1 processes.

    ``cl_folds``' out-of-fold trainings run in one process, and ``batch_size`` is the
    global batch: each process needs at least 2. (Detectors merge their per-sample state
    over the processes at each epoch end: they train distributed.)

    Raises
    ------
    ValueError
        Naming the setting and what to set instead.
    """
    if world <= 1:
        return
    if settings.cl_folds:
        raise ValueError(
            f"cl_folds {settings.cl_folds} cannot train in {world} processes (nproc {world}): "
            f"its out-of-fold trainings run in one process; set --cl-folds 0"
        )
    if settings.batch_size // world < 2:
        raise ValueError(
            f"batch_size {settings.batch_size} is the global batch: with {world} processes "
            f"each gets fewer than 2 samples; use at least {2 * world}"
        )


def labels_fingerprint(data: PreparedData) -> str:
    """sha256 of the training labels and the train images' shape: equal on every rank
    that prepared the same data."""
    digest = hashlib.sha256(np.ascontiguousarray(data.train_labels, dtype=np.int64).tobytes())
    digest.update(str(data.dataset.train.images.shape).encode())
    return digest.hexdigest()


def _announce(
    stage: str,
    data: PreparedData,
    settings: CleanSettings,
    payload: Callable[[], Any] | None = None,
) -> None:
    """On rank 0 of a distributed job: send ``stage`` to the other ranks (a no-op anywhere
    else). Called first thing by each of :data:`DISTRIBUTED_STAGES`; :func:`_finished`
    marks the stage's collectives done."""
    dist = distributed_group()
    if dist is None or not dist.is_main:
        return
    if _dispatch.stopped:
        raise RuntimeError(f"{stage}: the other ranks were already sent {STOP!r}")
    if _dispatch.in_flight is not None:
        raise RuntimeError(
            f"{stage}: the other ranks are still in {_dispatch.in_flight}, which failed here"
        )
    check_distributed(settings, dist.world_size)
    command = StageCommand(
        stage,
        settings.model_dump_json(),
        payload() if payload is not None else None,
        labels_fingerprint(data),
    )
    dist.broadcast_object(command)
    _dispatch.in_flight = stage


def _finished() -> None:
    """The announced stage's collectives are done (every rank left them)."""
    _dispatch.in_flight = None


def stage_failed() -> str | None:
    """On rank 0: the stage that failed while the other ranks were in it, else None."""
    return _dispatch.in_flight


def stop_peers() -> bool:
    """On rank 0 of a distributed job: send :data:`STOP` to the other ranks, once.

    Returns False when nothing was sent: one process, not rank 0, already stopped, or a
    stage failed midway (the other ranks are inside its collectives and cannot receive a
    command: they end when this process exits non-zero and the launcher stops the job).
    """
    dist = distributed_group()
    if dist is None or not dist.is_main or _dispatch.stopped or _dispatch.in_flight:
        return False
    dist.broadcast_object(StageCommand(STOP, "", None, ""))
    _dispatch.stopped = True
    return True


def serve_stages(dist: Dist) -> int:
    """Ranks > 0: run the stages rank 0 announces until it sends :data:`STOP`.

    Each command's settings say which data to prepare (read once, kept for the next
    stage); the training labels must match rank 0's fingerprint. Returns the number of
    stages run.

    Raises
    ------
    ValueError
        When this rank's data differ from rank 0's, or for a command it does not know.
    """
    from noisescore.settings import CleanSettings

    prepared: tuple[str, PreparedData] | None = None
    served = 0
    while True:
        command = dist.broadcast_object(None)
        if not isinstance(command, tuple) or len(command) != 4:
            raise ValueError(f"rank {dist.rank}: unexpected message from rank 0: {command!r:.80}")
        stage, settings_json, payload, fingerprint = command
        if stage == STOP:
            return served
        if stage not in DISTRIBUTED_STAGES:
            raise ValueError(f"rank {dist.rank}: unknown stage {stage!r} from rank 0")
        settings = CleanSettings(**json.loads(settings_json))
        key = json.dumps(settings.model_dump(mode="json", include=_DATA_FIELDS), sort_keys=True)
        if prepared is None or prepared[0] != key:
            prepared = None  # free the previous job's data first
            prepared = (key, prepare_data(settings))
        data = prepared[1]
        if labels_fingerprint(data) != fingerprint:
            raise ValueError(
                f"rank {dist.rank}: its training labels of {settings.dataset} differ from "
                f"rank 0's: every process must read the same dataset (same file, data dir "
                f"and version on every node)"
            )
        if stage == "linc_warmup":
            linc_warmup(data, settings)
        elif stage == "train_final":
            checkpoint, correction = payload
            warmup = Warmup.from_bytes(checkpoint, fingerprint=warmup_fingerprint(settings, data))
            train_final(data, settings, warmup, correction)
        else:
            train_baseline(data, settings)
        served += 1
