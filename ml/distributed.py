"""Data-parallel training across processes: PyTorch's own engine (``torch.distributed``).

``torchrun`` (or ``noisescore clean --nproc N``, which runs it) starts one process per
device and sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_from_env` joins the process group they describe (NCCL on
CUDA, gloo on CPU) and :func:`current` hands the result to whoever needs it. The
:class:`~noisescore.ml.train.Trainer` then wraps its models in
:class:`torch.nn.parallel.DistributedDataParallel` and each rank trains on a disjoint
shard of every epoch's batches (:func:`shard_batches`).

Every rank runs the same program on the same data: the epoch's permutation comes from
the same seeded generator everywhere, so sharding needs no communication.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

#: Environment variable: seconds a collective may wait for the other ranks (default 600).
TIMEOUT_ENV = "NOISESCORE_DDP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Dist:
    """This process's place in the initialised default process group.

    Attributes
    ----------
    rank : int
        Global rank, ``0 .. world_size - 1``; rank 0 is the one that writes and prints.
    world_size : int
        Number of processes training together.
    local_rank : int
        Rank on this node (the CUDA device index on a GPU node).
    device : torch.device
        The device the collectives run on: ``cuda:<local_rank>`` under NCCL, else CPU.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0."""
        return self.rank == 0

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (others pass nothing). Pickled: peers are trusted
        (they are this same program, started together)."""
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self._collective_device())
        return box[0]

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over all ranks, in place (every rank ends with the sum); returns ``t``."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    def _collective_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None


_cached: tuple[Any, Dist] | None = None  # (the default group it describes, its Dist)


def current() -> Dist | None:
    """The :class:`Dist` of the initialised default process group, else ``None``."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD
    if _cached is not None and _cached[0] is group:
        return _cached[1]
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    nccl = "nccl" in str(dist.get_backend())
    device = torch.device("cuda", local_rank) if nccl else torch.device("cpu")
    return _remember(Dist(rank, dist.get_world_size(), local_rank, device))


def _remember(d: Dist) -> Dist:
    global _cached
    _cached = (dist.group.WORLD, d)
    return d


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"{name} is not set (torchrun sets it)")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def timeout_s() -> float:
    """Seconds a collective waits for the other ranks: ``NOISESCORE_DDP_TIMEOUT_S``, 600
    by default. A rank that dies leaves the others waiting this long at most."""
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {value!r}")
    return seconds


def init_from_env(device: str = "auto") -> Dist | None:
    """Join the process group that ``torchrun`` describes in the environment.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"}
        As ``--device``: CUDA gives NCCL with one device per process (``LOCAL_RANK``),
        CPU gives gloo.

    Returns
    -------
    Dist or None
        ``None`` when ``WORLD_SIZE`` is unset or 1 (one process: nothing to join). When
        the group is already initialised, its :func:`current` description.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world}")
    if world == 1:
        return None
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    if dist.is_initialized():
        existing = current()
        assert existing is not None
        if existing.world_size != world:
            raise ValueError(
                f"WORLD_SIZE={world} but the initialised process group has "
                f"{existing.world_size} processes"
            )
        return existing
    rank = _env_int("RANK")
    if not 0 <= rank < world:
        raise ValueError(f"RANK must lie in [0, {world}), got {rank}")
    local_rank = _env_int("LOCAL_RANK", rank)
    from noisescore.ml.train import resolve_device  # train imports this module

    resolved = resolve_device(device)
    timeout = datetime.timedelta(seconds=timeout_s())
    if resolved.type == "cuda":
        visible = torch.cuda.device_count()
        if not 0 <= local_rank < visible:
            raise ValueError(f"LOCAL_RANK={local_rank} but {visible} CUDA devices are visible")
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
        dist.init_process_group("nccl", timeout=timeout, device_id=resolved)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return _remember(Dist(dist.get_rank(), dist.get_world_size(), local_rank, resolved))


def shard_batches(perm: torch.Tensor, batch_size: int, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's index batches of one epoch.

    Parameters
    ----------
    perm : torch.Tensor, shape (N,), int64
        The epoch's global permutation, the same on every rank (same seeded generator).
    batch_size : int
        The GLOBAL batch size: each rank takes ``batch_size // world`` per step, so that
        the ranks' batches of step ``k`` together are samples of one process's batch ``k``
        and the gradient DDP averages is one process's gradient.
    rank, world : int
        This process's rank and the number of processes.

    Returns
    -------
    list of torch.Tensor
        ``perm`` trimmed to a multiple of ``world`` (DistributedSampler's ``drop_last``),
        rank ``r`` taking ``perm[r::world]``, split in per-rank batches; a last batch of
        fewer than 2 samples is dropped (BatchNorm cannot train on one). Every rank gets
        the same number of batches of the same sizes (a rank with one more step would
        wait forever in DDP's all-reduce).
    """
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must lie in [0, {world}), got {rank}")
    if perm.ndim != 1:
        raise ValueError(f"perm must be 1-D, got shape {tuple(perm.shape)}")
    per_rank = batch_size // world
    if per_rank < 2:
        raise ValueError(
            f"batch_size {batch_size} gives {per_rank} sample(s) per process with {world} "
            f"processes; it must be at least {2 * world}"
        )
    n = len(perm) - len(perm) % world
    if n // world < 2:
        raise ValueError(
            f"{len(perm)} samples cannot be shared by {world} processes with at least 2 each"
        )
    batches = list(torch.split(perm[:n][rank::world], per_rank))
    if len(batches[-1]) < 2:
        batches.pop()
    return batches
