"""Training sets larger than the device: uint8 images in host memory, each batch copied to
the device while the previous one computes.

:class:`~noisescore.ml.train.DeviceImages` keeps the whole training split on the device
and slices batches out of it; that is the fastest loop, but a 224 px set of 200k images
is 30 GB as uint8. :class:`HostImages` has the same interface and keeps the images where
they already are (a numpy array, or a memory-mapped one): for each batch it gathers the
rows on the host into a pinned staging buffer and copies them to the device on a side
CUDA stream while the previous batch computes, then normalises on the device with the
same operations as ``DeviceImages``. The batches are the same, bit for bit, as the
device-resident ones; only where the bytes wait differs.

:func:`placement` decides between the two (``auto``: the device when the split's uint8
bytes fit ``share`` of the device's memory, host memory otherwise; a CPU device always
holds the data itself), :func:`make_images` builds the chosen one and
:func:`images_like` puts an evaluation split where its training split is.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from noisescore.ml.train import DeviceImages, NormalisedImages, TrainImages, check_images

Placement = Literal["device", "stream"]
#: Accepted by :func:`choose_placement`, the ``data_placement`` setting and
#: ``--data-placement``.
PLACEMENTS: tuple[str, ...] = ("auto", "device", "stream")
#: Share of the device's total memory the training split may take as uint8 (``auto``).
DEFAULT_DEVICE_MEMORY_SHARE = 0.5

log = logging.getLogger("noisescore.train")


def check_share(share: float) -> float:
    """``share`` as a float in (0, 1]; ValueError naming the setting otherwise."""
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
        raise ValueError(f"device_memory_share must lie in (0, 1], got {share!r}")
    return float(share)


def placement(
    images_nbytes: int,
    device: torch.device,
    share: float = DEFAULT_DEVICE_MEMORY_SHARE,
    *,
    total_memory: int | None = None,
) -> Placement:
    """Where ``auto`` puts a training split of ``images_nbytes`` uint8 bytes.

    Parameters
    ----------
    images_nbytes : int
        Bytes of the split's uint8 images (``array.nbytes``).
    device : torch.device
        The training device; anything but CUDA gives ``"device"`` (the data is already
        in the memory the model computes in).
    share : float in (0, 1]
        Share of the device's total memory the images may take; the rest is left to the
        model, its activations and the evaluation splits.
    total_memory : int, optional
        The device's memory in bytes (default: what CUDA reports for ``device``).

    Returns
    -------
    ``"device"`` or ``"stream"``
    """
    share = check_share(share)
    if images_nbytes < 0:
        raise ValueError(f"images_nbytes must be >= 0, got {images_nbytes}")
    if device.type != "cuda":
        return "device"
    if total_memory is None:
        total_memory = torch.cuda.get_device_properties(device).total_memory
    return "device" if images_nbytes <= share * total_memory else "stream"


def choose_placement(
    requested: str,
    images_nbytes: int,
    device: torch.device,
    share: float = DEFAULT_DEVICE_MEMORY_SHARE,
    *,
    total_memory: int | None = None,
) -> Placement:
    """``requested`` (``auto``, ``device`` or ``stream``) resolved for this split and device."""
    if requested not in PLACEMENTS:
        raise ValueError(
            f"data_placement must be one of {', '.join(PLACEMENTS)}; got {requested!r}"
        )
    share = check_share(share)
    if requested == "device":
        return "device"
    if requested == "stream":
        return "stream"
    chosen = placement(images_nbytes, device, share, total_memory=total_memory)
    if chosen == "stream":
        log.info(
            "training images (%.1f GiB) exceed %.0f%% of the device's memory: streaming "
            "batches from host memory",
            images_nbytes / 2**30,
            100 * share,
        )
    return chosen


def make_images(
    images: np.ndarray,
    device: torch.device,
    *,
    placement: str = "auto",
    share: float = DEFAULT_DEVICE_MEMORY_SHARE,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> TrainImages:
    """:class:`DeviceImages` or :class:`HostImages` of ``images``, as ``placement`` and
    ``share`` decide (:func:`choose_placement`); both give the same batches."""
    where = choose_placement(placement, int(images.nbytes), device, share)
    if where == "device":
        return DeviceImages(images, device, mean=mean, std=std)
    return HostImages(images, device, mean=mean, std=std)


def images_like(reference: TrainImages, images: np.ndarray) -> TrainImages:
    """``images`` (an evaluation split) placed like ``reference`` (its training split), on
    the same device, normalised with its statistics (and resized like it)."""
    if isinstance(reference, HostImages):
        return HostImages(
            images,
            reference.device,
            mean=reference.mean_list,
            std=reference.std_list,
            resize_to=reference.resize_to,
        )
    return DeviceImages(images, reference.device, mean=reference.mean_list, std=reference.std_list)


@dataclass
class StreamStats:
    """What feeding batches cost, summed over :meth:`HostImages.iter_batches` calls.

    Attributes
    ----------
    batches, samples : int
        Batches and samples handed to the consumer.
    host_seconds : float
        Wall time spent inside ``iter_batches`` producing batches (host gathers, copy
        launches, the normalisation's launches; on CPU the normalisation itself).
    stall_seconds : float
        Time the computation waited for a batch's data. On CUDA: the time the compute
        stream sat at each batch's copy event (CUDA events: a batch whose copy finished
        while the previous step ran costs nothing); on CPU, where the gather is the
        consumer's own work, ``host_seconds``.
    """

    batches: int = 0
    samples: int = 0
    host_seconds: float = 0.0
    stall_seconds: float = 0.0

    def busy_share(self, step_seconds: float) -> float:
        """Share of ``step_seconds`` (the wall time of the steps these batches fed) in which
        the computation was not waiting for data: compute time / step time."""
        if step_seconds <= 0:
            raise ValueError(f"step_seconds must be > 0, got {step_seconds}")
        return max(0.0, 1.0 - self.stall_seconds / step_seconds)


class HostImages(NormalisedImages):
    """Images kept as uint8 in host memory, copied to the device a batch at a time.

    The interface of :class:`~noisescore.ml.train.DeviceImages`: ``device``,
    ``mean_list``/``std_list``, ``mean``/``std`` (device tensors), ``channels_last``,
    ``len()``, :meth:`batch` and :meth:`iter_batches`, with the same batches for the same
    indices (same values, same dtype, same memory format).

    Parameters
    ----------
    images : np.ndarray, shape (N, C, H, W), uint8
        Used in place, never copied whole (a read-only memory map works).
    device : torch.device
    mean, std : sequence of float, optional
        Normalisation; by default the images' per-channel statistics
        (:func:`~noisescore.ml.train.channel_stats`, exact integer sums over chunks, on
        the device when it is CUDA).
    resize_to : int, optional
        Resize each batch on the device to ``(resize_to, resize_to)`` (bilinear, with
        antialiasing when shrinking) before normalising. The statistics stay those of
        the stored images. Not what ``--image-size`` does: that resizes once, at load,
        for every placement (docs/USAGE.md, "Big datasets").

    Notes
    -----
    Only the two staging buffers are pinned (two batches' bytes), not the set: pinning a
    30 GB array would copy it and lock that much memory, while every batch is gathered
    into a staging buffer anyway (a gather cannot be copied from the source directly).
    """

    def __init__(
        self,
        images: np.ndarray,
        device: torch.device,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        resize_to: int | None = None,
    ):
        check_images(images)
        if resize_to is not None and (
            isinstance(resize_to, bool) or not isinstance(resize_to, int) or resize_to < 1
        ):
            raise ValueError(f"resize_to must be a positive integer, got {resize_to!r}")
        self.resize_to = resize_to
        with warnings.catch_warnings():  # a read-only memory map: never written through
            warnings.filterwarnings("ignore", message=".*not writable.*")
            self.data = torch.from_numpy(np.ascontiguousarray(images))
        self._set_normalisation(
            self.data,
            device,
            mean,
            std,
            compute_device=device if device.type == "cuda" else None,
        )
        self.stream_stats = StreamStats()
        self._copy_stream: torch.cuda.Stream | None = None

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the batches (after ``resize_to``)."""
        if self.resize_to is not None:
            return (self.resize_to, self.resize_to)
        return (int(self.data.shape[2]), int(self.data.shape[3]))

    def reset_stream_stats(self) -> None:
        """Start :attr:`stream_stats` afresh (an iteration already running keeps counting
        into the object it started with)."""
        self.stream_stats = StreamStats()

    def _prepare(self, raw: torch.Tensor) -> torch.Tensor:
        """uint8 rows on the device -> the model's input: DeviceImages.batch's transform,
        after the ``resize_to`` resize."""
        return self._normalise(raw, self.image_size if self.resize_to is not None else None)

    def batch(self, idx: torch.Tensor | slice) -> torch.Tensor:
        """The normalised images ``idx`` (indices anywhere, or a slice), on the device; a
        plain synchronous copy (prediction). Training reads :meth:`iter_batches`."""
        rows = self.data[idx] if isinstance(idx, slice) else self.data[idx.cpu()]
        return self._prepare(rows.to(self.device))

    def iter_batches(
        self, batches: Sequence[torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(idx, images)`` for each index batch, in order; on CUDA batch k+1's copy runs
        on a side stream while the consumer computes batch k. Costs go to
        :attr:`stream_stats`."""
        batches = list(batches)
        if not batches:
            return
        if all(b.device.type == "cpu" for b in batches):
            host_idx = batches
        else:  # one host sync per epoch, not one per batch
            host_idx = list(torch.cat(batches).cpu().split([len(b) for b in batches]))
        if self.device.type == "cuda":
            yield from self._iter_cuda(batches, host_idx)
            return
        stats = self.stream_stats
        for idx, rows in zip(batches, host_idx, strict=True):
            start = time.perf_counter()
            x = self._prepare(self.data[rows])
            elapsed = time.perf_counter() - start
            stats.host_seconds += elapsed
            stats.stall_seconds += elapsed
            stats.batches += 1
            stats.samples += len(idx)
            yield idx, x

    def _iter_cuda(
        self, batches: list[torch.Tensor], host_idx: list[torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Double-buffered: two pinned staging buffers on the host, two uint8 buffers on
        the device. Events order the reuse: a staging buffer is refilled once its copy is
        done, a device buffer once the compute stream has normalised what it held."""
        compute = torch.cuda.current_stream(self.device)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        copier = self._copy_stream
        shape = (max(len(b) for b in batches), *self.data.shape[1:])
        staging = [torch.empty(shape, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        buffers = [torch.empty(shape, dtype=torch.uint8, device=self.device) for _ in range(2)]
        copied: list[torch.cuda.Event | None] = [None, None]
        consumed: list[torch.cuda.Event | None] = [None, None]
        waits: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        stats = self.stream_stats

        def enqueue(k: int) -> None:
            slot, n = k % 2, len(host_idx[k])
            done = copied[slot]
            if done is not None:
                done.synchronize()  # the staging buffer's previous copy has landed
            torch.index_select(self.data, 0, host_idx[k], out=staging[slot][:n])
            with torch.cuda.stream(copier):
                used = consumed[slot]
                if used is not None:
                    copier.wait_event(used)  # the device buffer's previous batch is read
                buffers[slot][:n].copy_(staging[slot][:n], non_blocking=True)
                event = torch.cuda.Event()
                event.record(copier)
            copied[slot] = event

        try:
            start = time.perf_counter()
            enqueue(0)
            for k, idx in enumerate(batches):
                if k + 1 < len(batches):
                    enqueue(k + 1)
                slot, n = k % 2, len(idx)
                before = torch.cuda.Event(enable_timing=True)
                after = torch.cuda.Event(enable_timing=True)
                before.record(compute)
                ready = copied[slot]
                assert ready is not None
                compute.wait_event(ready)
                after.record(compute)
                waits.append((before, after))
                x = self._prepare(buffers[slot][:n])
                event = torch.cuda.Event()
                event.record(compute)
                consumed[slot] = event
                stats.host_seconds += time.perf_counter() - start
                stats.batches += 1
                stats.samples += n
                yield idx, x
                start = time.perf_counter()
        finally:
            # A consumer that stops early leaves a copy in flight: later work on the
            # compute stream (which may reuse the buffers' memory) waits for it.
            compute.wait_stream(copier)
            for before, after in waits:
                after.synchronize()
                stats.stall_seconds += before.elapsed_time(after) / 1000
