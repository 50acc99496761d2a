"""The training step captured as a CUDA graph: one replay per batch instead of hundreds of
kernel launches.

At the paper's batch size (128 images of 28 px) a step's kernels take less time than
Python takes to launch them, so the GPU idles between steps (docs/RESULTS.md, issue 13's
H100 measurements: 17-21 k samples/s eager, 137 k captured). :class:`StepGraphs` records
the whole of :meth:`Trainer._eager_step` once per batch shape and phase (forward, loss,
backward, optimizer step and the hooks' per-step work: LiNC's alpha gather, targets,
closed-form gradient and clipped scatter) and replays it for every full batch, with the
batch's indices and images copied into static buffers first.

What makes a replay equal to the eager step:

- *Static inputs.* The graph reads the batch from ``static_idx``/``static_x`` and the
  labels, alpha, weights, gradients and optimizer state from tensors that never move:
  ``trainer.labels`` is replaced in place, gradients are zeroed in place (never set to
  ``None``), Adam is ``capturable`` and its learning rate is a device tensor that the LR
  schedule fills in place.
- *Phases.* Python branches inside the step (LiNC's warm-up loss vs plain cross-entropy
  after it) are frozen at capture; hooks name their phase with :meth:`Hook.graph_key`, and a
  new phase captures a new graph (the previous phase's graphs are released).
- *Outside the graph.* The last partial batch of an epoch, the first
  :data:`WARMUP_STEPS` steps of each phase (eager, on a side stream, as PyTorch requires
  before capture), and everything at epoch boundaries run eagerly.

A hook whose per-step work is not capture-safe (host syncs, data-dependent shapes,
CPU-side random numbers) does not set ``graph_safe``; the trainer then runs eagerly for
the whole run and says so in its log (:func:`graph_plan`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from noisescore.ml.train import Hook

GraphMode = Literal["auto", "on", "off"]
GRAPH_MODES: tuple[GraphMode, ...] = ("auto", "on", "off")
#: Eager steps of a new phase before its capture (PyTorch's whole-network capture recipe).
WARMUP_STEPS = 3
#: The hook methods that run inside a step (and so inside a captured graph).
PER_STEP_METHODS = ("loss", "batch_loss", "before_step", "after_step", "on_step")

log = logging.getLogger("noisescore.train")


def per_step_hooks(hooks: Sequence[Hook]) -> list[Hook]:
    """The hooks that override a method running inside each step."""
    from noisescore.ml.train import Hook

    return [
        h
        for h in hooks
        if any(getattr(type(h), name) is not getattr(Hook, name) for name in PER_STEP_METHODS)
    ]


def graph_plan(
    mode: str, device: torch.device, hooks: Sequence[Hook], *, distributed: bool = False
) -> bool:
    """Whether a run captures its step: ``on`` needs CUDA; ``auto`` is on for CUDA. Either
    falls back to eager, with a log line, when a hook's per-step work is not graph-safe or
    the run is distributed (DDP's gradient all-reduce is not captured here)."""
    if mode not in GRAPH_MODES:
        raise ValueError(f"graph must be one of {', '.join(GRAPH_MODES)}; got {mode!r}")
    if mode == "off":
        return False
    if device.type != "cuda":
        if mode == "on":
            raise ValueError(
                f"graph mode 'on' captures CUDA graphs and needs a CUDA device; the run is on "
                f"{device.type} (use --graph auto or off)"
            )
        return False
    unsafe = [type(h).__name__ for h in per_step_hooks(hooks) if not h.graph_safe]
    if unsafe:
        log.info(
            "CUDA graph off for this run: the per-step work of %s is not graph-safe; "
            "training eagerly",
            ", ".join(sorted(set(unsafe))),
        )
        return False
    if distributed:
        log.info("CUDA graph off for this run: distributed (DDP) steps run eagerly")
        return False
    return True


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_idx: torch.Tensor
    static_x: torch.Tensor


class StepGraphs:
    """Captured steps of one trainer, keyed by batch shape and the hooks' phase.

    Parameters
    ----------
    eager_step : callable ``(idx, x, epoch) -> None``
        The trainer's eager step; it is what gets captured.
    phase : callable ``(epoch) -> Hashable``
        The hooks' phase of ``epoch`` (their :meth:`Hook.graph_key` values).
    """

    def __init__(
        self,
        eager_step: Callable[[torch.Tensor, torch.Tensor, int], None],
        phase: Callable[[int], Hashable],
    ):
        self.eager_step = eager_step
        self.phase = phase
        # Keys: (index shape, image shape, image dtype, phase).
        self._graphs: dict[tuple[Hashable, ...], _Captured] = {}
        self._warm: dict[tuple[Hashable, ...], int] = {}
        self._side: torch.cuda.Stream | None = None
        #: Steps replayed from a graph, and graphs captured (for logs and benchmarks).
        self.replays = 0
        self.captures = 0

    def reset(self) -> None:
        """Release every graph (the optimizer or the phase layout changed)."""
        self._graphs.clear()
        self._warm.clear()

    def step(self, idx: torch.Tensor, x: torch.Tensor, epoch: int) -> None:
        """Run one full batch: eagerly while the phase warms up, then from its graph."""
        phase = self.phase(epoch)
        key = (tuple(idx.shape), tuple(x.shape), x.dtype, phase)
        captured = self._graphs.get(key)
        if captured is None:
            done = self._warm.get(key, 0)
            if done < WARMUP_STEPS:
                self._warm[key] = done + 1
                self._side_stream_step(idx, x, epoch)
                return
            captured = self._capture(key, phase, idx, x, epoch)
        captured.static_idx.copy_(idx)
        captured.static_x.copy_(x)
        captured.graph.replay()
        self.replays += 1

    def _side_stream_step(self, idx: torch.Tensor, x: torch.Tensor, epoch: int) -> None:
        if self._side is None:
            self._side = torch.cuda.Stream(device=x.device)
        current = torch.cuda.current_stream(x.device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            self.eager_step(idx, x, epoch)
        current.wait_stream(self._side)

    def _capture(
        self,
        key: tuple[Hashable, ...],
        phase: Hashable,
        idx: torch.Tensor,
        x: torch.Tensor,
        epoch: int,
    ) -> _Captured:
        # One phase at a time: the previous phase's graphs (and their memory) go.
        for old in [k for k in self._graphs if k[-1] != phase]:
            del self._graphs[old]
        static_idx, static_x = idx.clone(), x.clone()
        torch.cuda.synchronize(x.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.eager_step(static_idx, static_x, epoch)
        captured = _Captured(graph, static_idx, static_x)
        self._graphs[key] = captured
        self.captures += 1
        log.debug("captured the training step for batch shape %s, phase %r", key[:2], phase)
        return captured
