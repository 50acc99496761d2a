"""Benchmark of the streamed data path (:mod:`noisescore.ml.streaming`) against the
device-resident one, in one run, on a generated set.

A synthetic set (:func:`noisescore.ml.synthetic.synthetic_images`: class-dependent
gratings, deterministic from the seed) of ``--samples`` images of ``--image-size`` px is
generated in host memory. The same model, seed and batch order then train ``--steps``
timed steps (after ``--warmup-steps`` untimed ones: cuDNN autotuning, graph capture) with
the training images

- ``stream``: in host memory (:class:`~noisescore.ml.streaming.HostImages`), each batch
  gathered into pinned memory and copied on a side CUDA stream while the previous step
  computes;
- ``device``: on the device (:class:`~noisescore.ml.train.DeviceImages`), measured only
  when the set fits ``--device-memory-share`` of the device's memory (always on CPU).

Reported: samples/s of each and their ratio, and for ``stream`` the share of the step time
in which the computation was not waiting for data ("GPU busy" = compute time / step time,
from :class:`~noisescore.ml.streaming.StreamStats`: on CUDA the time the compute stream
sat at each batch's copy event, measured with CUDA events; on CPU the gather time, which
the steps wait for). Ratios against a baseline measured in the same run, never timed
assertions.

Usage::

    python bench/bench_stream.py [--samples 100000] [--image-size 224] [--model resnet18]

Writes ``stream.json`` and ``stream.md`` to ``--out-dir`` (default docs/bench).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noisescore.atomic import atomic_write_bytes
from noisescore.ml.models import create_model
from noisescore.ml.streaming import HostImages, StreamStats, placement
from noisescore.ml.synthetic import synthetic_images
from noisescore.ml.train import DeviceImages, TrainConfig, Trainer, TrainImages, resolve_device

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "docs" / "bench"
#: The issue's aim for the streamed path at 224 px on a GPU (reported, never asserted).
BUSY_TARGET = 0.80


class TimedWindow:
    """``images`` for a Trainer whose epoch is cut to ``warmup + steps`` batches, the last
    ``steps`` of them timed (synchronised before and after); the wrapped images' own
    :class:`StreamStats` cover the timed batches only (the window is a second
    ``iter_batches`` call, so its first copy is not overlapped: that is counted too)."""

    def __init__(self, images: TrainImages, *, warmup: int, steps: int):
        self.inner = images
        self.warmup, self.steps = warmup, steps
        self.seconds = 0.0
        self.samples = 0
        self.stats: StreamStats | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)

    def iter_batches(
        self, batches: Sequence[torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = list(batches)
        timed = batches[self.warmup : self.warmup + self.steps]
        if len(timed) < self.steps:
            raise ValueError(
                f"{len(batches)} batches per epoch: fewer than --warmup-steps + --steps"
            )
        yield from self.inner.iter_batches(batches[: self.warmup])
        _sync(self.inner.device)
        if isinstance(self.inner, HostImages):
            self.inner.reset_stream_stats()
        start = time.perf_counter()
        yield from self.inner.iter_batches(timed)
        _sync(self.inner.device)
        self.seconds = time.perf_counter() - start
        self.samples = sum(len(b) for b in timed)
        if isinstance(self.inner, HostImages):
            self.stats = self.inner.stream_stats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(
    where: str,
    images: np.ndarray,
    labels: np.ndarray,
    args: argparse.Namespace,
    device: torch.device,
    mean: list[float],
    std: list[float],
) -> dict[str, Any]:
    """Train ``args.warmup_steps + args.steps`` steps with the images placed ``where``."""
    source: TrainImages
    if where == "stream":
        source = HostImages(images, device, mean=mean, std=std, resize_to=args.resize_to)
    else:
        source = DeviceImages(images, device, mean=mean, std=std)
    window = TimedWindow(source, warmup=args.warmup_steps, steps=args.steps)
    torch.manual_seed(args.seed)
    size = args.resize_to or args.image_size
    model = create_model(args.model, num_classes=args.classes, in_chans=3, img_size=size)
    config = TrainConfig(epochs=1, batch_size=args.batch_size, seed=args.seed, graph=args.graph)
    trainer = Trainer(model, window, labels, config=config)  # type: ignore[arg-type]
    stats = trainer.train_epoch(1)
    out: dict[str, Any] = {
        "placement": where,
        "steps": args.steps,
        "samples": window.samples,
        "seconds": window.seconds,
        "samples_per_second": window.samples / window.seconds,
        "graph_captured": bool(getattr(trainer, "graph_captured", False)),
        "epoch_loss": stats.loss,
        "epoch_train_accuracy": stats.train_accuracy,
    }
    if window.stats is not None:
        s = window.stats
        out.update(
            stall_seconds=s.stall_seconds,
            host_seconds=s.host_seconds,
            busy_share=s.busy_share(window.seconds),
            host_share=s.host_seconds / window.seconds,
        )
    del trainer, window, source
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeats of one placement's runs (the numeric fields)."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, float):
            out[key] = statistics.median(r[key] for r in runs)
    out["repeats"] = len(runs)
    return out


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "uncommitted"
    commit = out.stdout.strip() or "uncommitted"
    return f"{commit} + uncommitted changes" if dirty else commit


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}"


def render_markdown(result: dict[str, Any]) -> str:
    env, runs = result["environment"], result["runs"]
    stream = runs["stream"]
    device = runs.get("device")
    lines = [
        "# Streamed vs device-resident training data",
        "",
        "Generated by `bench/bench_stream.py`; raw numbers: `stream.json`. Both runs train "
        "the same model from the same initial weights on the same batches (same seed); "
        "only where the uint8 images wait differs. Medians over "
        f"{env['repeats']} interleaved repeats (the ratio: median of the per-repeat ratios).",
        "",
        "| placement | samples/s | ratio to device | busy share (compute / step time) |",
        "|---|---|---|---|",
    ]
    ratio = result.get("stream_to_device")
    busy = stream["busy_share"]
    target = f"{busy:.3f} (aim ≥ {BUSY_TARGET:.2f} at 224 px on a GPU)"
    if device is not None:
        lines.append(
            f"| device | {device['samples_per_second']:.1f} | 1 | — (data on the device) |"
        )
        lines.append(f"| stream | {stream['samples_per_second']:.1f} | {ratio:.3f} | {target} |")
    else:
        lines.append(f"| stream | {stream['samples_per_second']:.1f} | — | {target} |")
    lines += [
        "",
        f"Stream runs, medians over repeats: {stream['stall_seconds']:.3f} s waiting for data "
        f"in {stream['seconds']:.3f} s of timed steps, {stream['host_seconds']:.3f} s in the "
        "host side of `iter_batches` (gathers and copy launches). "
        + (
            "On CPU the gather is part of every step (nothing to overlap with), so the busy "
            "share is the share of the step that is not the gather. A CPU run proves the "
            "script; on a machine shared with other work its throughput ratio is mostly "
            "timing noise, and it says nothing about a GPU (the issue's 224 px / 100k "
            "figure needs a GPU run of the defaults: `python bench/bench_stream.py`)."
            if env["device"].startswith("cpu")
            else "On CUDA the wait is the time the compute stream sat at each batch's copy "
            "event (CUDA events)."
        ),
        "",
    ]
    if "stream_to_device_by_repeat" in result:
        by_repeat = ", ".join(f"{r:.3f}" for r in result["stream_to_device_by_repeat"])
        lines += [f"Per-repeat stream/device ratios: {by_repeat}.", ""]
    if device is None:
        why = (
            "`--resize-to` resizes on the device per batch, which only the stream path does"
            if env["resize_to"] is not None
            else f"{env['images_gib']:.2f} GiB of images do not fit "
            f"{env['device_memory_share']} of the device's memory"
        )
        lines += [f"The device-resident run was skipped: {why}.", ""]
    lines += ["## Environment", "", "```"]
    lines += [f"{k}: {v}" for k, v in env.items()]
    lines += ["```", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300, help="timed steps per placement")
    parser.add_argument("--warmup-steps", type=int, default=20, help="untimed steps first")
    parser.add_argument(
        "--resize-to", type=int, default=None, help="stream only: resize batches on the device"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved runs of each placement (medians)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--graph", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--device-memory-share", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    for name in ("samples", "image_size", "classes", "batch_size", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_steps < 1:
        parser.error("--warmup-steps must be >= 1 (the first steps autotune and capture)")
    if args.samples < args.batch_size * (args.steps + args.warmup_steps):
        parser.error("--samples must cover --batch-size x (--warmup-steps + --steps)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cli = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(cli)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    start = time.perf_counter()
    images, labels = synthetic_images(
        args.samples, n_classes=args.classes, image_size=args.image_size, seed=args.seed
    )
    generate_seconds = time.perf_counter() - start
    # The statistics once, shared: both runs normalise identically (and the stream run's
    # exact integer statistics are what DeviceImages would compute too).
    stats_source = HostImages(images, device)
    mean, std = stats_source.mean_list, stats_source.std_list
    del stats_source
    fits = placement(images.nbytes, device, args.device_memory_share) == "device"
    places = ["stream", "device"] if fits and args.resize_to is None else ["stream"]
    repeats: dict[str, list[dict[str, Any]]] = {where: [] for where in places}
    for rep in range(args.repeats):
        # Alternate which placement goes first, so that drift hits both alike.
        for where in places if rep % 2 == 0 else places[::-1]:
            repeats[where].append(run(where, images, labels, args, device, mean, std))
    runs = {where: summarise(rs) for where, rs in repeats.items()}
    result: dict[str, Any] = {"runs": runs, "repeats": repeats}
    if "device" in runs:
        ratios = [
            s["samples_per_second"] / d["samples_per_second"]
            for s, d in zip(repeats["stream"], repeats["device"], strict=True)
        ]
        result["stream_to_device"] = statistics.median(ratios)
        result["stream_to_device_by_repeat"] = ratios
    result["environment"] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "samples": args.samples,
        "image_size": args.image_size,
        "resize_to": args.resize_to,
        "images_gib": round(images.nbytes / 2**30, 3),
        "classes": args.classes,
        "model": args.model,
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup_steps,
        "steps": args.steps,
        "repeats": args.repeats,
        "graph": args.graph,
        "device_memory_share": args.device_memory_share,
        "seed": args.seed,
        "generate_seconds": round(generate_seconds, 1),
        "git_commit": git_commit(),
        "command": shlex.join(["python", "bench/bench_stream.py", *cli]),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out_dir / "stream.json", (json.dumps(result, indent=2) + "\n").encode())
    atomic_write_bytes(args.out_dir / "stream.md", render_markdown(result).encode())
    return result


if __name__ == "__main__":
    out = main()
    print(json.dumps({k: v for k, v in out.items() if k != "environment"}, indent=2))
