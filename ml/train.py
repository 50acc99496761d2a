"""The one training loop. Methods plug in through :class:`Hook`; they never copy the loop.

The dataset lives on the device as uint8 and batches are sliced out of it by index
(every MedMNIST 28 px set fits easily: BloodMNIST's train split is 28 MB). There is no
per-sample Python in the hot path, no DataLoader and no host-to-device copy per batch.
A set too large for the device stays in host memory instead and each batch is copied
ahead of its step, overlapped with compute (:mod:`noisescore.ml.streaming`).
On CUDA the forward pass runs under bf16 autocast with channels-last memory layout, and
each full batch's whole step replays one captured CUDA graph (:mod:`noisescore.ml.step_graph`).
With a process group (:mod:`noisescore.ml.distributed`) every process trains its shard of
each batch under DDP.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from noisescore.ml.distributed import Dist, shard_batches
from noisescore.ml.step_graph import GraphMode, StepGraphs, graph_plan


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of auto, cpu, cuda; got {device!r}")
    return torch.device(device)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one training run (paper defaults for LiNC).

    ``lr_milestones`` are epochs (1-based, after which the LR is multiplied by
    ``lr_gamma``); ``None`` means half and three quarters of ``epochs`` (50 and 75 of 100).
    """

    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_milestones: tuple[int, ...] | None = None
    lr_gamma: float = 0.1
    seed: int = 0
    augment: bool = False
    #: Capture the training step as a CUDA graph: ``auto`` (on for CUDA), ``on``, ``off``.
    graph: GraphMode = "auto"

    def milestones(self) -> list[int]:
        if self.lr_milestones is not None:
            return sorted(self.lr_milestones)
        return [m for m in (self.epochs // 2, (3 * self.epochs) // 4) if m > 0]


def channel_stats(
    data: torch.Tensor,
    *,
    chunk_elements: int = 1 << 24,
    compute_device: torch.device | None = None,
) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation (unbiased, floored at 1e-3) of uint8 images
    scaled to [0, 1], the normalisation statistics of a training set.

    Parameters
    ----------
    data : torch.Tensor, shape (N, C, H, W), uint8
        On any device (or host memory); never copied whole.
    chunk_elements : int
        Elements converted at a time (the only working memory: 4 bytes each).
    compute_device : torch.device, optional
        Where the sums run (default: ``data``'s device); chunks are copied there.

    Returns
    -------
    mean, std : list of float, length C

    Notes
    -----
    The sums are exact integers, so the numbers are the same whatever the device, the
    chunking, or whether the images live on the device or in host memory: both
    placements of :func:`noisescore.ml.streaming.make_images` normalise alike.
    """
    if data.ndim != 4 or data.dtype != torch.uint8:
        raise ValueError(
            f"images must be uint8 of shape (N, C, H, W), got {data.dtype} {tuple(data.shape)}"
        )
    n, c, h, w = data.shape
    count = n * h * w
    if count == 0:
        raise ValueError("cannot compute normalisation statistics of zero images")
    per_chunk = max(1, chunk_elements // max(c * h * w, 1))
    where = data.device if compute_device is None else compute_device
    sums = torch.zeros(c, dtype=torch.int64, device=where)
    squares = torch.zeros(c, dtype=torch.int64, device=where)
    for start in range(0, n, per_chunk):
        chunk = data[start : start + per_chunk].to(where).to(torch.int32)
        sums += chunk.sum(dim=(0, 2, 3), dtype=torch.int64)
        squares += chunk.square_().sum(dim=(0, 2, 3), dtype=torch.int64)  # 255**2 fits int32
    mean, std = [], []
    for s, q in zip(sums.tolist(), squares.tolist(), strict=True):
        mean.append(s / (count * 255))  # Python ints: one rounding, exact otherwise
        var = (count * q - s * s) / (count * max(count - 1, 1) * 255**2)
        std.append(max(math.sqrt(max(var, 0.0)), 1e-3))
    return mean, std


class TrainImages(Protocol):
    """What the training loop reads images through: :class:`DeviceImages` (the whole set
    on the device) or :class:`noisescore.ml.streaming.HostImages` (host memory, batches
    copied to the device as they are needed)."""

    device: torch.device
    mean_list: list[float]
    std_list: list[float]
    channels_last: bool

    def __len__(self) -> int: ...

    def batch(self, idx: torch.Tensor | slice) -> torch.Tensor: ...

    def iter_batches(
        self, batches: Sequence[torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def check_images(images: np.ndarray) -> None:
    """Training images are uint8 of shape (N, C, H, W); ValueError naming what they are."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 of shape (N, C, H, W), got {images.dtype} {images.shape}"
        )


class NormalisedImages:
    """What every placement of the training images shares: the train-set statistics and
    the one batch transform, so that both placements give the same batches bit for bit."""

    device: torch.device
    mean_list: list[float]
    std_list: list[float]
    mean: torch.Tensor
    std: torch.Tensor
    channels_last: bool

    def _set_normalisation(
        self,
        data: torch.Tensor,
        device: torch.device,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        *,
        compute_device: torch.device | None = None,
    ) -> None:
        """``mean``/``std`` as given, else ``data``'s exact per-channel statistics."""
        if mean is None or std is None:
            mean, std = channel_stats(data, compute_device=compute_device)
        self.device = device
        self.mean_list, self.std_list = list(mean), list(std)
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(self.mean_list, device=device).view(shape)
        self.std = torch.tensor(self.std_list, device=device).view(shape)
        self.channels_last = device.type == "cuda"

    def _normalise(self, raw: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """uint8 rows on the device -> the model's input; resized to ``size`` first (bilinear,
        antialiased when shrinking) when given and different."""
        x = raw.float().div_(255)
        if size is not None and tuple(x.shape[2:]) != size:
            shrink = size[0] < min(x.shape[2], x.shape[3])
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
        x = x.sub_(self.mean).div_(self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


class DeviceImages(NormalisedImages):
    """Images held on the device as uint8, normalised per batch with train-set statistics."""

    def __init__(
        self,
        images: np.ndarray,
        device: torch.device,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        check_images(images)
        self.data = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        # Exact integer sums, without a float copy of the set.
        self._set_normalisation(self.data, device, mean, std)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def batch(self, idx: torch.Tensor | slice) -> torch.Tensor:
        return self._normalise(self.data[idx])

    def iter_batches(
        self, batches: Sequence[torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(idx, images)`` for each index batch, in order (what the training loop reads)."""
        for idx in batches:
            yield idx, self.batch(idx)


@dataclass(frozen=True)
class Step:
    """What one optimisation step saw, handed to :meth:`Hook.on_step` (all on the device).

    Attributes
    ----------
    idx : torch.Tensor, shape (B,), int64
        Indices of the batch's samples in the training set.
    logits : torch.Tensor, shape (B, C), float32
        The training forward pass's logits, detached (train mode, as the loss saw them).
    labels : torch.Tensor, shape (B,), int64
        ``trainer.labels[idx]`` for this step (the observed labels during warm-up).
    epoch : int
    features : torch.Tensor or None, shape (B, D), float32
        Input of the final linear layer, detached; only when a hook sets ``needs_features``.
    peer_logits : tuple of torch.Tensor
        The other models' logits (``trainer.models[1:]``), detached; empty with one model.
    """

    idx: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    epoch: int
    features: torch.Tensor | None = None
    peer_logits: tuple[torch.Tensor, ...] = ()


def final_linear(model: nn.Module) -> nn.Linear:
    """The model's classifier layer: timm's ``get_classifier()``, else its last ``nn.Linear``."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier layer")
    return linears[-1]


@dataclass
class Batch:
    """One mini-batch's forward pass through every model, handed to :meth:`Hook.batch_loss`.

    Attributes
    ----------
    idx : torch.Tensor, shape (B,), int64
        Indices of the batch's samples in the training set.
    labels : torch.Tensor, shape (B,), int64
        ``trainer.labels[idx]``.
    epoch : int
    logits : tuple of torch.Tensor, each (B, C), float32
        One per model of ``trainer.models`` (index 0 is ``trainer.model``), with gradients.
    features : tuple of (torch.Tensor or None), each (B, D), float32
        Each model's final-layer input, detached; ``None`` unless a hook ``needs_features``.
    """

    idx: torch.Tensor
    labels: torch.Tensor
    epoch: int
    logits: tuple[torch.Tensor, ...]
    features: tuple[torch.Tensor | None, ...]
    _ce: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def per_sample_ce(self, model: int = 0) -> torch.Tensor:
        """Cross-entropy of model ``model`` per sample against ``labels``, shape (B,), with
        gradients (computed once per batch and model)."""
        if model not in self._ce:
            self._ce[model] = F.cross_entropy(self.logits[model], self.labels, reduction="none")
        return self._ce[model]


class Hook:
    """What a method adds to the loop. Every method is a no-op by default.

    ``loss`` may return a batch loss to replace plain cross-entropy on
    ``trainer.labels``; the first hook that returns one wins. ``on_step`` sees every
    step's detached logits (and, when ``needs_features`` is true, the final layer's
    input): what per-sample detectors record, without a second forward pass.

    A method that trains several networks (Co-teaching, JoCoR, DivideMix) lists the
    extra ones in ``extra_models``: the loop moves them to the device, runs every batch
    through all of them, optimises all of them (one Adam over every parameter, which is
    one Adam per model: its state is per parameter) and saves them with the trainer. Such
    a method overrides :meth:`batch_loss`, which sees every model's logits; the sum it
    returns gives each model the gradient of its own term (the models share no
    parameter).
    """

    #: Ask the trainer to capture the input of the model's final linear layer.
    needs_features: bool = False
    #: The hook's per-step work may be captured in a CUDA graph and replayed: it only
    #: launches device work on tensors that keep their storage, with no host sync, no
    #: data-dependent shape and no Python state that must change per step (see
    #: :mod:`noisescore.ml.step_graph`). Hooks without per-step work need not say.
    graph_safe: bool = False
    #: Networks this hook owns, trained by the loop beside ``trainer.model``.
    extra_models: Sequence[nn.Module] = ()
    #: The hook's per-step work is right when each process of a distributed run sees
    #: only its shard of every batch (and the hook merges across ranks what it must, in
    #: its epoch methods). A hook that overrides a per-step method (``loss``,
    #: ``batch_loss``, ``before_step``, ``after_step``, ``on_step``) without saying so
    #: is refused by a distributed :class:`Trainer`; epoch-level hooks need not say.
    distributed_safe: bool = False

    def on_train_start(self, trainer: Trainer) -> None: ...

    def graph_key(self, trainer: Trainer, epoch: int) -> Hashable:
        """What the hook's per-step work depends on in ``epoch`` beyond tensors (a captured
        step is replayed only within the same key): e.g. LiNC's warm-up or not."""
        return None

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None: ...

    def loss(
        self, trainer: Trainer, logits: torch.Tensor, idx: torch.Tensor, epoch: int
    ) -> torch.Tensor | None:
        return None

    def batch_loss(self, trainer: Trainer, batch: Batch) -> torch.Tensor | None:
        """The loss of every model at once; by default :meth:`loss` of ``trainer.model``
        (a one-model method need not know about this)."""
        if len(batch.logits) != 1:
            return None
        return self.loss(trainer, batch.logits[0], batch.idx, batch.epoch)

    def before_step(self, trainer: Trainer, batch: Batch) -> None:
        """After ``loss.backward()``, before the optimizer step: the gradients of every
        model's parameters are in ``.grad`` (CDR clips some of them here)."""

    def after_step(self, trainer: Trainer, idx: torch.Tensor, epoch: int) -> None: ...

    def on_step(self, trainer: Trainer, step: Step) -> None: ...

    def on_epoch_end(self, trainer: Trainer, epoch: int, stats: dict[str, float]) -> None: ...


@dataclass
class EpochStats:
    epoch: int
    seconds: float
    loss: float
    train_accuracy: float
    samples_per_second: float
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        return {
            "epoch": self.epoch,
            "seconds": self.seconds,
            "loss": self.loss,
            "train_accuracy": self.train_accuracy,
            "samples_per_second": self.samples_per_second,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> EpochStats:
        base = ("epoch", "seconds", "loss", "train_accuracy", "samples_per_second")
        extra = {k: float(v) for k, v in d.items() if k not in base}
        return cls(
            int(d["epoch"]),
            float(d["seconds"]),
            float(d["loss"]),
            float(d["train_accuracy"]),
            float(d["samples_per_second"]),
            extra,
        )


class Trainer:
    """Mini-batch training of ``model`` on device-resident images and labels.

    Parameters
    ----------
    model : torch.nn.Module
        Any classifier returning logits of shape (B, C).
    images : TrainImages
        Training images: :class:`DeviceImages`, or streamed from host memory
        (:class:`noisescore.ml.streaming.HostImages`).
    labels : np.ndarray, shape (N,), int
        Training labels; hooks may replace ``trainer.labels`` (a device tensor) mid-run.
    config : TrainConfig
    hooks : sequence of Hook
    progress : bool
        Show a progress bar (only when stderr is a terminal; on rank 0 only).
    dist : Dist or None
        The process group of a distributed run (:func:`noisescore.ml.distributed.current`),
        or ``None`` for one process. With more than one process the models train as
        DistributedDataParallel wrappers (rank 0's initial weights on every rank), each
        rank on its shard of every batch (``config.batch_size`` stays the global batch),
        and the epoch's loss and accuracy are those of all ranks. Every rank must build
        the same trainer (same data, labels, config and hooks).
    """

    def __init__(
        self,
        model: nn.Module,
        images: TrainImages,
        labels: np.ndarray,
        *,
        config: TrainConfig,
        hooks: Sequence[Hook] = (),
        progress: bool = False,
        desc: str = "train",
        dist: Dist | None = None,
    ):
        self.device = images.device
        self.dist = dist
        self.hooks = list(hooks)
        if self.world_size > 1:
            _check_distributed(self.hooks, self.device, dist)
        self.model = model.to(self.device)
        extra = [m.to(self.device) for h in self.hooks for m in h.extra_models]
        #: Every network the loop trains: ``model`` first, then the hooks' extra ones.
        self.models: list[nn.Module] = [self.model, *extra]
        if images.channels_last:
            for m in self.models:
                m.to(memory_format=torch.channels_last)
        self.images = images
        # A copy: the labels change in place (LiNC's correction), never the caller's array.
        self._labels = torch.tensor(np.asarray(labels), dtype=torch.long, device=self.device)
        if len(self._labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(self._labels)} labels")
        #: The modules the training forward pass calls (``models``, or their DDP wrappers).
        self._forward_models: list[nn.Module] = (
            [self._ddp(m) for m in self.models] if self.world_size > 1 else list(self.models)
        )
        self._loss_sum = torch.zeros((), device=self.device)
        self._correct = torch.zeros((), device=self.device, dtype=torch.long)
        self.config = config
        self.progress = progress and (dist is None or dist.is_main)
        self.desc = desc
        use_graph = graph_plan(
            config.graph, self.device, self.hooks, distributed=self.world_size > 1
        )
        # One Adam over every model's parameters is one Adam per model (state per parameter).
        self.optimizer = torch.optim.Adam(
            [p for m in self.models for p in m.parameters()],
            lr=config.lr,
            weight_decay=config.weight_decay,
            # A captured step needs Adam's step counter and LR on the device.
            capturable=use_graph,
        )
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=config.milestones(), gamma=config.lr_gamma
        )
        self._graphs = StepGraphs(self._eager_step, self._graph_phase) if use_graph else None
        if self._graphs is not None:
            self._tensor_lr()
        self.history: list[EpochStats] = []
        self.epoch = 0  # epochs completed; fit() resumes after it
        self.last_epoch_stats: EpochStats | None = None  # set before hooks' on_epoch_end
        self._generator = torch.Generator().manual_seed(config.seed)
        # Augmentation has its own stream, so that it is saved and restored with the
        # trainer (never the global RNG): phases resume exactly.
        self._augment_generator = torch.Generator().manual_seed(config.seed + 1)
        self._autocast = self.device.type == "cuda"
        overridden = [h for h in self.hooks if type(h).on_step is not Hook.on_step]
        self._step_hooks = overridden
        self._grad_hooks = [h for h in self.hooks if type(h).before_step is not Hook.before_step]
        self._features: dict[int, torch.Tensor] = {}
        self._wants_features = any(h.needs_features for h in self.hooks)
        if self._wants_features:
            for k, m in enumerate(self.models):
                final_linear(m).register_forward_pre_hook(self._feature_capture(k))

    def _feature_capture(self, k: int) -> Any:
        def capture(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if module.training:  # the training pass only, not predict_logits
                self._features[k] = args[0].detach()

        return capture

    def _take_features(self) -> tuple[torch.Tensor | None, ...]:
        features, self._features = self._features, {}
        return tuple(
            None if (f := features.get(k)) is None else f.float().flatten(1)
            for k in range(len(self.models))
        )

    @property
    def labels(self) -> torch.Tensor:
        """The training labels, shape (N,), int64, on the device."""
        return self._labels

    @labels.setter
    def labels(self, value: torch.Tensor | np.ndarray) -> None:
        """Replace the labels in place: the tensor keeps its storage, so that a captured
        step (which read it at capture time) sees the new labels."""
        new = torch.as_tensor(np.asarray(value) if isinstance(value, np.ndarray) else value)
        if new.shape != self._labels.shape:
            raise ValueError(
                f"labels must have shape {tuple(self._labels.shape)}, got {tuple(new.shape)}"
            )
        self._labels.copy_(new.to(self._labels.device, torch.long))

    @property
    def n_samples(self) -> int:
        return len(self.images)

    @property
    def world_size(self) -> int:
        """Processes training together: 1 without ``dist``."""
        return 1 if self.dist is None else self.dist.world_size

    def _ddp(self, model: nn.Module) -> nn.Module:
        """``model`` wrapped for data-parallel training; constructing it broadcasts rank 0's
        parameters and buffers to every rank (a collective: every rank builds the same
        wrappers in the same order)."""
        assert self.dist is not None
        device_ids = [self.dist.local_rank] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def autocast(self) -> torch.autocast:
        # Autocast's weight-cast cache must be off where a step is captured (PyTorch docs).
        return torch.autocast(
            device_type=self.device.type,
            dtype=torch.bfloat16,
            enabled=self._autocast,
            cache_enabled=self._graphs is None,
        )

    @property
    def graph_captured(self) -> bool:
        """Whether full batches run as a replayed CUDA graph in this run."""
        return self._graphs is not None

    def _graph_phase(self, epoch: int) -> Hashable:
        return tuple(h.graph_key(self, epoch) for h in self.hooks)

    def _match_optimizer_mode(self) -> None:
        """After loading an optimizer state saved by a run in the other mode (a warm-up
        captured on a GPU, resumed eagerly, or the reverse): Adam's ``capturable`` flag and
        step counters as this run needs them."""
        capturable = self._graphs is not None
        for group in self.optimizer.param_groups:
            group["capturable"] = capturable
            for p in group["params"]:
                step = self.optimizer.state.get(p, {}).get("step")
                if isinstance(step, torch.Tensor):
                    device = p.device if capturable else torch.device("cpu")
                    self.optimizer.state[p]["step"] = step.to(device, torch.float32)
        if capturable:
            self._tensor_lr()

    def _tensor_lr(self) -> None:
        """Each group's LR as a device tensor: a captured Adam step reads it at replay, and
        the LR schedule fills it in place."""
        for group in self.optimizer.param_groups:
            if not isinstance(group["lr"], torch.Tensor):
                group["lr"] = torch.tensor(float(group["lr"]), device=self.device)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        flip = (torch.rand(x.shape[0], 1, 1, 1, generator=self._augment_generator) < 0.5).to(
            x.device, non_blocking=True
        )
        return torch.where(flip, x.flip(3), x)

    def _batches(self) -> list[torch.Tensor]:
        perm = torch.randperm(self.n_samples, generator=self._generator).to(self.device)
        if self.dist is not None and self.world_size > 1:  # the same perm on every rank
            return shard_batches(perm, self.config.batch_size, self.dist.rank, self.world_size)
        batches = list(torch.split(perm, self.config.batch_size))
        if len(batches) > 1 and len(batches[-1]) < 2:  # BatchNorm cannot train on one sample
            batches.pop()
        return batches

    def train_epoch(self, epoch: int) -> EpochStats:
        for m in self.models:
            m.train()
        for hook in self.hooks:
            hook.on_epoch_start(self, epoch)
        start = time.perf_counter()
        self._loss_sum.zero_()
        self._correct.zero_()
        seen = 0
        for idx, x in self.images.iter_batches(self._batches()):
            if self.config.augment:
                x = self._augment(x)
            self._step(idx, x, epoch)
            seen += len(idx)
        self.scheduler.step()
        loss_sum, correct, seen = self._epoch_totals(seen)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        return EpochStats(
            epoch=epoch,
            seconds=seconds,
            loss=loss_sum / max(seen, 1),
            train_accuracy=correct / max(seen, 1),
            samples_per_second=seen / seconds if seconds > 0 else math.inf,
        )

    def _epoch_totals(self, seen: int) -> tuple[float, int, int]:
        """Loss sum, correct count and samples of the epoch (one host sync per epoch), over
        all ranks of a distributed run (one all-reduce: float64 counts are exact)."""
        if self.dist is None or self.world_size == 1:
            return float(self._loss_sum), int(self._correct), seen
        totals = torch.stack(
            [
                self._loss_sum.double(),
                self._correct.double(),
                torch.tensor(float(seen), dtype=torch.float64, device=self.device),
            ]
        )
        loss_sum, correct, seen_all = self.dist.all_reduce_sum_(totals).tolist()
        return loss_sum, round(correct), round(seen_all)

    def _step(self, idx: torch.Tensor, x: torch.Tensor, epoch: int) -> None:
        """One optimisation step on the batch ``idx`` (images ``x``, normalised): replayed
        from a CUDA graph for full batches in graph mode, else eager."""
        if self._graphs is not None and len(idx) == self.config.batch_size:
            self._graphs.step(idx, x, epoch)
        else:
            self._eager_step(idx, x, epoch)

    def _eager_step(self, idx: torch.Tensor, x: torch.Tensor, epoch: int) -> None:
        """Forward every model, the hooks' loss, backward, the hooks' gradient and step work,
        then the per-step records. No host sync: the epoch's loss and accuracy accumulate
        on the device."""
        with self.autocast():
            outputs = [m(x) for m in self._forward_models]
        logits_all = tuple(o.float() for o in outputs)
        logits = logits_all[0]
        features = self._take_features()
        batch = Batch(idx, self.labels[idx], epoch, logits_all, features)
        loss = None
        for hook in self.hooks:
            loss = hook.batch_loss(self, batch)
            if loss is not None:
                break
        if loss is None:
            if len(logits_all) == 1:
                loss = F.cross_entropy(logits, batch.labels)
            else:
                loss = torch.stack([F.cross_entropy(z, batch.labels) for z in logits_all]).sum()
        # In graph mode gradients keep their storage (a captured step accumulates into it).
        self.optimizer.zero_grad(set_to_none=self._graphs is None)
        loss.backward()
        for hook in self._grad_hooks:
            hook.before_step(self, batch)
        self.optimizer.step()
        for hook in self.hooks:
            hook.after_step(self, idx, epoch)
        if self._step_hooks:
            peers = tuple(z.detach() for z in logits_all[1:])
            step = Step(idx, logits.detach(), batch.labels, epoch, features[0], peers)
            for hook in self._step_hooks:
                hook.on_step(self, step)
        self._loss_sum += loss.detach() * len(idx)
        self._correct += (logits.detach().argmax(1) == batch.labels).sum()

    def fit(self, *, stop_epoch: int | None = None) -> list[EpochStats]:
        """Train epochs ``self.epoch + 1 .. stop_epoch`` (default: ``config.epochs``).

        A run may be split in phases (LiNC's warm-up, then the final training) with
        :meth:`state_dict` / :meth:`load_state_dict` in between; the phases give exactly
        the weights of one uninterrupted run.
        """
        stop = self.config.epochs if stop_epoch is None else stop_epoch
        if not self.epoch < stop <= self.config.epochs:
            raise ValueError(
                f"stop_epoch must lie in ({self.epoch}, {self.config.epochs}], got {stop}"
            )
        for hook in self.hooks:
            hook.on_train_start(self)
        if self._graphs is not None:
            # Hooks and callers may have replaced tensors a graph captured (alpha, the
            # optimizer's LR): capture afresh.
            self._graphs.reset()
            self._tensor_lr()
        bar = tqdm(
            range(self.epoch + 1, stop + 1),
            desc=self.desc,
            unit="epoch",
            disable=not self.progress or None,  # None: tqdm shows it only on a terminal
            leave=True,
        )
        for epoch in bar:
            stats = self.train_epoch(epoch)
            self.last_epoch_stats = stats
            extra: dict[str, float] = {}
            for hook in self.hooks:
                hook.on_epoch_end(self, epoch, extra)
            stats.extra = extra
            self.history.append(stats)
            self.epoch = epoch
            bar.set_postfix(
                loss=f"{stats.loss:.3f}",
                acc=f"{stats.train_accuracy:.3f}",
                **{k: f"{v:.3f}" for k, v in extra.items()},
            )
        return self.history

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: weights, optimizer, LR schedule, batch order."""
        return {
            "epoch": self.epoch,
            "model": _cpu_state(self.model),
            "extra_models": [_cpu_state(m) for m in self.models[1:]],
            "optimizer": _portable_optimizer_state(self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "generator": self._generator.get_state(),
            "augment_generator": self._augment_generator.get_state(),
            "history": [h.as_dict() for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        extra = state.get("extra_models", [])
        if len(extra) != len(self.models) - 1:
            raise ValueError(
                f"the state holds {1 + len(extra)} models, this trainer trains {len(self.models)}"
            )
        self.model.load_state_dict(state["model"])
        for m, m_state in zip(self.models[1:], extra, strict=True):
            m.load_state_dict(m_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self._match_optimizer_mode()
        self.scheduler.load_state_dict(state["scheduler"])
        self._generator.set_state(state["generator"])
        self._augment_generator.set_state(state["augment_generator"])
        self.epoch = int(state["epoch"])
        self.history = [EpochStats.from_dict(h) for h in state["history"]]

    @torch.no_grad()
    def predict_logits(
        self, images: TrainImages, *, batch_size: int = 1024, model: int = 0
    ) -> torch.Tensor:
        """Logits (float32, on the device) of ``images`` in eval mode, from
        ``self.models[model]``."""
        net = self.models[model]
        was_training = net.training
        net.eval()
        outputs = []
        for start in range(0, len(images), batch_size):
            with self.autocast():
                outputs.append(net(images.batch(slice(start, start + batch_size))).float())
        net.train(was_training)
        return torch.cat(outputs) if outputs else torch.empty(0, device=self.device)

    def predict_proba(self, images: TrainImages, *, model: int = 0) -> np.ndarray:
        """Class probabilities, shape (N, C), float64 numpy."""
        logits = self.predict_logits(images, model=model)
        return torch.softmax(logits, dim=1).double().cpu().numpy()


def _portable_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state with plain-float LRs and ``capturable`` off, loadable by an
    eager run (a captured run turns it back on when it loads it)."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        group["capturable"] = False
        for key in ("lr", "initial_lr"):
            if isinstance(group.get(key), torch.Tensor):
                group[key] = float(group[key])
    return state


#: The hook methods that run on every step: what a distributed trainer shards.
_PER_STEP_METHODS = ("loss", "batch_loss", "before_step", "after_step", "on_step")


def _check_distributed(hooks: Sequence[Hook], device: torch.device, dist: Dist | None) -> None:
    """Refuse what a distributed run cannot do: a hook with per-step work that does not
    declare ``distributed_safe``, or a trainer on another kind of device than the group's."""
    assert dist is not None
    if device.type != dist.device.type:
        raise ValueError(
            f"the trainer's device is {device.type} but the process group runs on "
            f"{dist.device.type} (start it with the same --device)"
        )
    for hook in hooks:
        kind = type(hook)
        per_step = any(getattr(kind, m) is not getattr(Hook, m) for m in _PER_STEP_METHODS)
        if per_step and not hook.distributed_safe:
            raise ValueError(f"{kind.__name__} does not support distributed training (--nproc > 1)")


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
