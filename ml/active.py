"""Active label cleaning (Khanal et al., MICCAI 2024) as small stages of plain arrays.

    prepare_data (load -> imbalance -> inject noise) -> select_clean -> Learner.fit on the
    clean set -> [rank_suspects -> expert answers -> Learner.fit on the grown set] x M
    -> selection_metrics / active_report

Phase 1 selects a clean set Cl with a learning-with-noisy-labels method of
:mod:`noisescore.ml.methods` (Co-teaching, Co-teaching VOG; ``ce`` = small loss of a
plain model): the samples it keeps as small-loss (small-VOG) in its last epochs. The rest
is the noisy pool. Phase 2 trains a *new* model on Cl with plain cross-entropy and the
labels Cl has (its observed labels: the reference code gave them their true labels for
free, which leaks the answer into the benchmark), ranks the pool with a sampler of
:mod:`noisescore.ml.samplers`, and after each round of expert answers fine-tunes on
Cl plus every relabelled sample. Each fit keeps the weights of its best validation
macro-F1 epoch and reports the test macro-F1 there (Khanal's evaluation).

Nothing here knows about Prefect, the store or the expert's channel: the flow
``active-clean`` (``flows/active_clean.py``) stores what these produce and waits for
answers; benchmarks chain them in memory with :class:`Oracle`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn

from noisescore.ml import clean as stages
from noisescore.ml.clean import PreparedData
from noisescore.ml.imbalance import long_tailed
from noisescore.ml.methods import METHODS, create_method
from noisescore.ml.metrics import classification_metrics
from noisescore.ml.models import create_model
from noisescore.ml.samplers import create_sampler
from noisescore.ml.streaming import images_like, make_images
from noisescore.ml.train import (
    Hook,
    TrainConfig,
    Trainer,
    TrainImages,
    final_linear,
    resolve_device,
)

if TYPE_CHECKING:
    from noisescore.settings import ActiveSettings

SELECTION_FORMAT = "noisescore.selection.v1"
LEARNER_FORMAT = "noisescore.learner.v1"


# ----------------------------------------------------------------------------- data


def prepare_data(settings: ActiveSettings) -> tuple[PreparedData, dict[str, Any] | None]:
    """Load the dataset, draw the long-tailed subset (``settings.imbalance``), inject noise.

    Returns the data and the imbalance report (``None`` without ``imbalance``)."""
    dataset = stages.load_data(settings)
    report = None
    if settings.imbalance is not None:
        dataset, report = long_tailed(dataset, ratio=settings.imbalance, seed=settings.seed)
    return stages.add_noise(dataset, settings), report


def fingerprint(settings: ActiveSettings, data: PreparedData, fields: Sequence[str]) -> str:
    """sha256 of ``fields`` of the settings and the exact training labels: a stored stage
    is reused only by a run that would compute the same thing."""
    values = settings.model_dump(mode="json", include=set(fields))
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(data.train_labels, dtype=np.int64).tobytes())
    digest.update(str(data.dataset.train.images.shape).encode())
    return digest.hexdigest()


SELECTION_FIELDS = (
    "dataset", "image_size", "noise", "seed", "imbalance", "model", "checkpoint", "batch_size",
    "lr", "weight_decay", "lr_milestones", "augment", "epochs", "lnl_method", "forget_rate",
    "t_k", "mix_ratio", "vog_window", "vog_warmup", "vog_mode", "select_last",
)  # fmt: skip
LEARNER_FIELDS = (
    *SELECTION_FIELDS, "clean_epochs", "sampler", "budget", "fine_tune_epochs", "fine_tune_lr",
    "keep_start",
)  # fmt: skip


# ----------------------------------------------------------------------------- phase 1


@dataclass
class CleanSelection:
    """What phase 1 found.

    Attributes
    ----------
    clean : np.ndarray, shape (N,), bool
        The clean set Cl: kept by the method in its last ``select_last`` epochs.
    score : np.ndarray, shape (N,), float32
        How consistently a sample was kept (fraction of post-ramp epochs; for ``ce`` the
        normalised rank of its final loss): a trust score in [0, 1], high = clean.
    vog : np.ndarray or None, shape (N,), float32
        Co-teaching VOG: the main network's VOG at the end (high = unstable gradients).
    history : list of dict
        Per-epoch statistics of the selection training.
    seconds : float
    forget_rate : float
        tau_max used.
    vog_bytes : int
        Memory of the VOG state (both networks), 0 without VOG.
    """

    clean: np.ndarray
    score: np.ndarray
    vog: np.ndarray | None
    method: str
    history: list[dict[str, float]]
    seconds: float
    forget_rate: float
    vog_bytes: int = 0

    def to_bytes(self, *, fingerprint: str) -> bytes:
        meta = {
            "format": SELECTION_FORMAT,
            "fingerprint": fingerprint,
            "method": self.method,
            "history": self.history,
            "seconds": self.seconds,
            "forget_rate": self.forget_rate,
            "vog_bytes": self.vog_bytes,
        }
        arrays = {"clean": self.clean, "score": self.score}
        if self.vog is not None:
            arrays["vog"] = self.vog
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)  # type: ignore[arg-type]
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, fingerprint: str) -> CleanSelection:
        """ValueError when the bytes are not a selection made by these settings."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                meta = json.loads(str(npz["meta"]))
                arrays = {k: npz[k] for k in npz.files if k != "meta"}
        except Exception as err:
            raise ValueError(f"not a noisescore clean selection: {err}") from err
        if meta.get("format") != SELECTION_FORMAT:
            raise ValueError("not a noisescore clean selection")
        if meta.get("fingerprint") != fingerprint:
            raise ValueError("the stored selection was made with different settings")
        return cls(
            clean=arrays["clean"].astype(bool),
            score=arrays["score"],
            vog=arrays.get("vog"),
            method=meta["method"],
            history=meta["history"],
            seconds=float(meta["seconds"]),
            forget_rate=float(meta["forget_rate"]),
            vog_bytes=int(meta.get("vog_bytes", 0)),
        )


def _new_model(data: PreparedData, settings: ActiveSettings, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    dataset = data.dataset
    return create_model(
        settings.model,
        num_classes=dataset.n_classes,
        in_chans=dataset.in_chans,
        img_size=dataset.image_size[0],
        checkpoint=settings.checkpoint,
    )


def method_params(settings: ActiveSettings) -> dict[str, Any]:
    """The selection method's parameters from the settings (paper names)."""
    if settings.lnl_method == "ce":
        return {}
    params: dict[str, Any] = {"forget_rate": settings.tau_max(), "t_k": settings.t_k}
    if settings.lnl_method == "coteaching_vog":
        params.update(
            mix_ratio=settings.mix_ratio,
            vog_window=settings.vog_window,
            vog_warmup=settings.vog_warmup,
            vog_mode=settings.vog_mode,
        )
    return params


def select_clean(
    data: PreparedData,
    settings: ActiveSettings,
    *,
    hooks: Sequence[Hook] = (),
    progress: bool = False,
) -> CleanSelection:
    """Phase 1: train ``settings.lnl_method`` on the noisy labels for ``settings.epochs``
    and return the clean set it selects."""
    n, n_classes = len(data.train_labels), data.dataset.n_classes
    # The peer first (seed + 1): the main network then starts exactly as plain CE's would.
    two = METHODS[settings.lnl_method].n_models == 2
    peer = _new_model(data, settings, settings.seed + 1) if two else None
    method = create_method(
        settings.lnl_method,
        n_samples=n,
        n_classes=n_classes,
        peer=peer,
        **method_params(settings),
    )
    trainer = stages._trainer(
        data, settings, data.train_labels, hooks=[method, *hooks], progress=progress, desc="select"
    )
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    tau = settings.tau_max()
    vog = None
    vog_bytes = 0
    if hasattr(method, "clean_set"):
        clean = np.asarray(method.clean_set(last=settings.select_last), dtype=bool)
        score = np.asarray(method.selection_frequency_, dtype=np.float32)
        if getattr(method, "vog_", None) is not None:
            vog = np.asarray(method.vog_[0], dtype=np.float32)
            vog_bytes = int(method.vog_nbytes_)
    else:  # plain CE: keep the (1 - tau) share with the smallest final loss
        logits = trainer.predict_logits(trainer.images)
        labels = trainer.labels
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none").cpu().numpy()
        order = np.argsort(loss, kind="stable")
        clean = np.zeros(n, dtype=bool)
        clean[order[: int(np.floor((1 - tau) * n))]] = True
        score = np.empty(n, dtype=np.float32)
        score[order] = 1.0 - np.arange(n, dtype=np.float32) / max(n - 1, 1)
    return CleanSelection(
        clean=clean,
        score=score,
        vog=vog,
        method=settings.lnl_method,
        history=[h.as_dict() for h in trainer.history],
        seconds=seconds,
        forget_rate=tau,
        vog_bytes=vog_bytes,
    )


def selection_metrics(
    clean: np.ndarray, observed: np.ndarray, true: np.ndarray, n_classes: int
) -> dict[str, Any]:
    """How good a clean set is, when the truth is known (Khanal's Table 1).

    ``recall_by_class[c]``: of the samples of true class ``c`` whose observed label is
    right, the share the set kept; ``kept_by_class[c]``: of all samples of true class c,
    the share kept; ``precision``: the share of the set whose label is right.
    """
    right = observed == true
    recall, kept = [], []
    for c in range(n_classes):
        of_c = true == c
        good = of_c & right
        recall.append(float(clean[good].mean()) if good.any() else None)
        kept.append(float(clean[of_c].mean()) if of_c.any() else None)
    present = [r for r in recall if r is not None]
    return {
        "n_clean": int(clean.sum()),
        "n_noisy_pool": int((~clean).sum()),
        "precision": float(right[clean].mean()) if clean.any() else None,
        "recall": float(clean[right].mean()) if right.any() else None,
        "noise_in_pool": float((~right[~clean]).mean()) if (~clean).any() else None,
        "recall_by_class": recall,
        "kept_by_class": kept,
        "worst_class_recall": min(present) if present else None,
    }


# ----------------------------------------------------------------------------- phase 2


class BestValidation(Hook):
    """After every epoch: macro-F1 on val (model selection); at a new best, on test too,
    and the weights are kept. Without a val split the last epoch counts as best.

    With ``include_start`` the weights the fit starts from are a candidate too (epoch 0):
    a fine-tuning round that does not improve validation keeps the model it had."""

    def __init__(
        self,
        val: tuple[TrainImages, np.ndarray] | None,
        test: tuple[TrainImages, np.ndarray],
        *,
        include_start: bool = False,
    ) -> None:
        self.val, self.test = val, test
        self.include_start = include_start
        self.best_epoch_ = 0
        self.best_val_f1_: float | None = None
        self.best_state_: dict[str, torch.Tensor] | None = None
        self.test_f1_at_best_: float | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        if self.include_start and self.val is not None and trainer.epoch == 0:
            self.on_epoch_end(trainer, 0, {})

    @staticmethod
    def _f1(trainer: Trainer, split: tuple[TrainImages, np.ndarray]) -> float:
        images, labels = split
        pred = trainer.predict_logits(images).argmax(1).cpu().numpy()
        return float(f1_score(labels, pred, average="macro", zero_division=0))

    def on_epoch_end(self, trainer: Trainer, epoch: int, stats: dict[str, float]) -> None:
        val = self._f1(trainer, self.val) if self.val is not None else None
        if val is not None:
            stats["val_macro_f1"] = val
        better = val is None or self.best_val_f1_ is None or val > self.best_val_f1_
        if better:  # test is read only where it is reported: at the best val epoch
            test = self._f1(trainer, self.test) if len(self.test[1]) else None
            if test is not None:
                stats["test_macro_f1"] = test
            self.best_epoch_, self.best_val_f1_, self.test_f1_at_best_ = epoch, val, test
            self.best_state_ = {
                k: v.detach().clone() for k, v in trainer.model.state_dict().items()
            }


@dataclass
class Phase:
    """One fit of the learner: the clean-set training (round 0) or a round's fine-tuning."""

    round: int
    n_labelled: int
    n_relabelled: int
    epochs: int
    best_epoch: int
    val_macro_f1: float | None
    test_macro_f1: float | None
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Learner:
    """The model the expert's answers refine (phase 2), with its normalisation and the
    val/test splits it is evaluated on.

    Parameters
    ----------
    data : PreparedData
    settings : ActiveSettings
    """

    def __init__(self, data: PreparedData, settings: ActiveSettings) -> None:
        self.data, self.settings = data, settings
        self.device = resolve_device(settings.device)
        dataset = data.dataset
        self.model = _new_model(data, settings, settings.seed + 2)
        self.train_images = make_images(
            dataset.train.images,
            self.device,
            placement=settings.data_placement,
            share=settings.device_memory_share,
        )
        self.mean, self.std = self.train_images.mean_list, self.train_images.std_list
        self.val = self._split(dataset.val, data.val_labels)
        test = dataset.test if dataset.test is not None else dataset.train
        reference = test.true_labels if test.true_labels is not None else test.labels
        self.test = (self._images(test.images), np.asarray(reference))
        self.phases: list[Phase] = []
        self._optimizer_state: dict[str, Any] | None = None

    def _images(self, images: np.ndarray) -> TrainImages:
        return images_like(self.train_images, images)  # same placement and statistics

    def _split(
        self, split: Any, labels: np.ndarray | None
    ) -> tuple[TrainImages, np.ndarray] | None:
        if split is None or labels is None:
            return None
        return self._images(split.images), np.asarray(labels)

    def fit(
        self,
        indices: np.ndarray,
        labels: np.ndarray,
        *,
        epochs: int,
        round: int,
        n_relabelled: int,
        hooks: Sequence[Hook] = (),
        progress: bool = False,
    ) -> Phase:
        """Train ``epochs`` on the training samples ``indices`` with ``labels`` (plain CE, a
        fresh Adam at ``lr``, or ``fine_tune_lr`` for a round > 0), then keep the best
        validation epoch's weights (in a round, the starting weights are a candidate)."""
        start = time.perf_counter()
        if epochs == 0 or len(indices) < 2:
            phase = Phase(round, len(indices), n_relabelled, 0, 0, None, None, 0.0)
            self.phases.append(phase)
            return phase
        best = BestValidation(self.val, self.test, include_start=self.settings.keep_start)
        config = TrainConfig(
            epochs=epochs,
            batch_size=self.settings.batch_size,
            lr=self.settings.lr if round == 0 else self.settings.fine_tune_lr,
            weight_decay=self.settings.weight_decay,
            # No decay: on a long-tailed set a decayed, converged model drifts to the head
            # classes, and macro-F1 with it (one trial run on long-tailed BloodMNIST).
            lr_milestones=(),
            seed=self.settings.seed + 100 * round,
            augment=self.settings.augment,
            graph=self.settings.graph,
        )
        images = self._images(self.data.dataset.train.images[indices])
        trainer = Trainer(
            self.model,
            images,
            labels,
            config=config,
            hooks=[best, *hooks],
            progress=progress,
            desc=f"round {round}" if round else "clean set",
        )
        if self._optimizer_state is not None:
            # The rounds continue one optimisation: a fresh Adam's first steps (about lr
            # per weight, whatever the gradient) would first undo what the model knows.
            trainer.optimizer.load_state_dict(self._optimizer_state)
            for group in trainer.optimizer.param_groups:
                group["lr"] = group["initial_lr"] = config.lr
        trainer.fit()
        self._optimizer_state = trainer.optimizer.state_dict()
        if best.best_state_ is not None:
            self.model.load_state_dict(best.best_state_)
        phase = Phase(
            round=round,
            n_labelled=len(indices),
            n_relabelled=n_relabelled,
            epochs=epochs,
            best_epoch=best.best_epoch_,
            val_macro_f1=best.best_val_f1_,
            test_macro_f1=best.test_f1_at_best_,
            seconds=time.perf_counter() - start,
            history=[h.as_dict() for h in trainer.history],
        )
        self.phases.append(phase)
        return phase

    @torch.no_grad()
    def _proba(
        self, images: TrainImages, indices: np.ndarray | None = None, *, batch_size: int = 1024
    ) -> np.ndarray:
        """Softmax (M, C) float64 of ``images`` (the rows ``indices``, default all), eval
        mode, ``batch_size`` at a time."""
        rows = torch.arange(len(images)) if indices is None else torch.as_tensor(indices)
        rows = rows.to(device=images.device, dtype=torch.long)
        was_training = self.model.training
        self.model.eval()
        try:
            out = [
                torch.softmax(self.model(images.batch(rows[s : s + batch_size])).float(), dim=1)
                .double()
                .cpu()
                for s in range(0, len(rows), batch_size)
            ]
        finally:
            self.model.train(was_training)
        if not out:
            return np.empty((0, self.data.dataset.n_classes))
        return torch.cat(out).numpy()

    def embed(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Softmax (M, C) float64 and penultimate features (M, D) float32 of training
        samples ``indices`` (eval mode)."""
        captured: list[torch.Tensor] = []
        handle = final_linear(self.model).register_forward_pre_hook(
            lambda module, args: captured.append(args[0].detach().float().flatten(1))
        )
        try:
            proba = self._proba(self.train_images, indices)
        finally:
            handle.remove()
        if not captured:
            dim = final_linear(self.model).in_features
            return proba, np.empty((0, dim), dtype=np.float32)
        return proba, torch.cat(captured).cpu().numpy().astype(np.float32)

    def predict_proba(self, images: TrainImages) -> np.ndarray:
        """Class probabilities (N, C) of ``images`` (eval mode)."""
        return self._proba(images)

    def state_bytes(self, *, fingerprint: str, extra: dict[str, Any]) -> bytes:
        """The learner's weights, optimiser state and phases (a stage checkpoint: tensors,
        numbers and JSON only, loaded with ``weights_only``)."""
        state = {
            "format": LEARNER_FORMAT,
            "fingerprint": fingerprint,
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self._optimizer_state,
            "meta": json.dumps({"phases": [p.as_dict() for p in self.phases], **extra}),
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    def load_state_bytes(self, data: bytes, *, fingerprint: str) -> dict[str, Any]:
        """Restore :meth:`state_bytes`; returns its ``extra``. ValueError when it does not
        belong to these settings."""
        try:
            with torch.serialization.safe_globals([collections.Counter]):
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"not a noisescore learner checkpoint: {err}") from err
        if not isinstance(state, dict) or state.get("format") != LEARNER_FORMAT:
            raise ValueError("not a noisescore learner checkpoint")
        if state.get("fingerprint") != fingerprint:
            raise ValueError("the learner checkpoint was made with different settings")
        self.model.load_state_dict(state["model"])
        self._optimizer_state = state.get("optimizer")
        meta = json.loads(state["meta"])
        self.phases = [Phase(**p) for p in meta.pop("phases")]
        return meta

    def test_metrics(self) -> dict[str, Any]:
        images, labels = self.test
        return classification_metrics(labels, self._proba(images))


# ----------------------------------------------------------------------------- rounds


@dataclass
class Labels:
    """The state of the labels across rounds.

    ``labelled``: in the training set of the learner (Cl plus every answered sample);
    ``labels``: what the learner trains on (observed, or the expert's answer);
    ``relabel_round``: the round a sample was answered in, 0 = never.
    """

    labelled: np.ndarray
    labels: np.ndarray
    relabel_round: np.ndarray

    @classmethod
    def start(cls, clean: np.ndarray, observed: np.ndarray) -> Labels:
        return cls(clean.copy(), observed.copy(), np.zeros(len(observed), dtype=np.int64))

    def pool(self) -> np.ndarray:
        """Train indices an expert may still be asked about."""
        return np.flatnonzero(~self.labelled)

    def answer(self, round: int, answers: dict[int, int]) -> None:
        for index, label in answers.items():
            self.labelled[index] = True
            self.labels[index] = label
            self.relabel_round[index] = round

    @property
    def n_relabelled(self) -> int:
        return int((self.relabel_round > 0).sum())


def rank_suspects(
    learner: Learner, labels: Labels, settings: ActiveSettings, round: int
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The round's queue: the ``budget`` pool samples the sampler ranks first, as rows
    (``index, sample_id, current_label, predicted_label, probabilities, score``) and their
    uint8 images (n, C, H, W) in the same order."""
    pool = labels.pool()
    proba, features = learner.embed(pool)
    _, labelled_features = learner.embed(np.flatnonzero(labels.labelled))
    sampler = create_sampler(settings.sampler)
    chosen = sampler.select(
        candidates=pool,
        budget=settings.budget,
        proba=proba,
        features=features,
        labelled_features=labelled_features,
        seed=settings.seed * 1000 + round,
    )
    where = {int(i): k for k, i in enumerate(pool)}
    ids = learner.data.dataset.train.sample_ids
    rows = []
    for index, score in zip(chosen.indices.tolist(), chosen.scores.tolist(), strict=True):
        p = proba[where[index]]
        rows.append(
            {
                "index": int(index),
                "sample_id": str(ids[index]),
                "current_label": int(labels.labels[index]),
                "predicted_label": int(p.argmax()),
                "probabilities": [round_float(x) for x in p.tolist()],
                "score": round_float(score),
            }
        )
    images = learner.data.dataset.train.images[chosen.indices.astype(np.int64)]
    return rows, images


def round_float(x: float) -> float:
    return float(f"{x:.6g}")


class Oracle:
    """The expert of benchmarks: answers with the true labels (needs them)."""

    name = "oracle"

    def __init__(self, data: PreparedData) -> None:
        if data.train_true is None:
            raise ValueError(
                "expert=oracle answers with the true labels, and this dataset has none: "
                "inject noise (--noise) or use a manifest with a true_label column, or let "
                "a human answer (expert=human)"
            )
        self.true = data.train_true

    def answer(self, indices: Sequence[int]) -> dict[int, int]:
        """The true label of each training index."""
        return {int(i): int(self.true[int(i)]) for i in indices}


def corrections(
    data: PreparedData, selection: CleanSelection, labels: Labels
) -> dict[str, np.ndarray]:
    """Per training sample: ``trust`` (selection score), ``flagged`` (in the noisy pool),
    ``corrected_label`` (the expert's answer, else the observed label), ``source``
    (``expert`` / ``observed``), ``relabel_round``."""
    expert = labels.relabel_round > 0
    corrected = np.where(expert, labels.labels, data.train_labels)
    return {
        "trust": selection.score,
        "flagged": ~selection.clean,
        "corrected_label": corrected,
        "source": np.where(expert, "expert", "observed"),
        "relabel_round": labels.relabel_round,
    }


def active_report(
    settings: ActiveSettings,
    data: PreparedData,
    imbalance: dict[str, Any] | None,
    selection: CleanSelection,
    learner: Learner,
    labels: Labels,
) -> dict[str, Any]:
    """The JSON report of an active-cleaning job (keys documented in docs/USAGE.md)."""
    from noisescore import __version__

    dataset = data.dataset
    observed = data.train_labels
    report: dict[str, Any] = {
        "noisescore_version": __version__,
        "kind": "active",
        "settings": settings.model_dump(mode="json"),
        "dataset": {
            "name": dataset.name,
            "source": dataset.source,
            "n_train": len(dataset.train),
            "n_val": len(dataset.val) if dataset.val is not None else 0,
            "n_test": len(dataset.test) if dataset.test is not None else 0,
            "n_classes": dataset.n_classes,
            "class_counts": np.bincount(observed, minlength=dataset.n_classes).tolist(),
        },
        "imbalance": imbalance,
        "noise": None,
        "selection": {
            "method": selection.method,
            "forget_rate": selection.forget_rate,
            "n_clean": int(selection.clean.sum()),
            "seconds": selection.seconds,
            "vog_bytes": selection.vog_bytes,
            "history": selection.history,
        },
        "rounds": [p.as_dict() for p in learner.phases],
        "relabelled": {
            "n": labels.n_relabelled,
            "n_changed": int(((labels.relabel_round > 0) & (labels.labels != observed)).sum()),
        },
        "test": learner.test_metrics() if dataset.test is not None else None,
    }
    if data.noise is not None:
        report["noise"] = {
            "kind": data.noise.spec.kind,
            "rate": data.noise.spec.rate,
            "realised_rate": data.noise.realised_rate,
            "seed": data.noise.seed,
        }
    if data.train_true is not None:
        true = data.train_true
        report["selection"].update(
            selection_metrics(selection.clean, observed, true, dataset.n_classes)
        )
        train_labels = np.where(labels.labelled, labels.labels, -1)
        report["relabelled"]["n_noisy_fixed"] = int(
            ((labels.relabel_round > 0) & (observed != true) & (labels.labels == true)).sum()
        )
        report["label_accuracy"] = {
            "before": float((observed == true).mean()),
            "labelled_set": float((train_labels[labels.labelled] == true[labels.labelled]).mean()),
        }
    return report
