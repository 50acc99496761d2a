"""Benchmark of the one training loop (noisescore.ml.train.Trainer), in one run.

Two measurements on the same real data, seed and model:

1. **LiNC overhead**: the median epoch time of LiNC warm-up epochs against plain
   cross-entropy epochs of the same Trainer (the paper's "minimal overhead"; target
   ratio <= 1.05). Both train on the same noisy labels (``uniform:0.5``, seed 0).
2. **Loop throughput**: samples/s of the Trainer without hooks against the textbook
   ``torch.utils.data.DataLoader`` loop (TensorDataset of normalised float32 CPU tensors,
   per-batch ``.to(device)``, forward, ``F.cross_entropy``, Adam step).

Every run trains ``--epochs`` timed epochs after one untimed warm-up epoch, and the three
runs are interleaved ``--repeats`` times (CE, LiNC, DataLoader, CE, LiNC, ...) so that
drift of the machine affects all of them alike. Speed claims are ratios against a
baseline measured in the same run, never absolute numbers.

LiNC's epoch time is the loop time of the epoch (``EpochStats.seconds``) plus its
end-of-epoch work (alpha snapshot and Otsu's threshold). Its ``warmup_epochs`` covers
every epoch of the run, so every timed epoch is a warm-up epoch; the one-off correction
pass at the end of warm-up (an eval-mode prediction over the training set) is timed
separately and reported, not added to an epoch.

Usage::

    python bench/bench_train.py [--dataset breastmnist] [--epochs 5] [--repeats 3]

Writes ``train_loop.json``, ``train_loop.md`` and ``train_loop.png`` to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from noisescore.atomic import atomic_write, atomic_write_bytes
from noisescore.ml.data import load_dataset
from noisescore.ml.linc import LiNC
from noisescore.ml.models import DEFAULT_MODEL, create_model
from noisescore.ml.noise import inject_noise
from noisescore.ml.train import DeviceImages, TrainConfig, Trainer, resolve_device

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT_DIR = REPO_ROOT / "docs" / "bench"
NOISE_SPEC = "uniform:0.5"
LINC_TARGET_RATIO = 1.05
BATCH_SIZE = 128


# --------------------------------------------------------------------------- timed runs


class TimedLiNC(LiNC):
    """LiNC that times its end-of-epoch work and, separately, the one-off correction."""

    def __init__(self, n_classes: int, *, warmup_epochs: int):
        super().__init__(n_classes, warmup_epochs=warmup_epochs)
        self.end_seconds: list[float] = []
        self.correction_seconds = 0.0

    def on_epoch_end(self, trainer: Trainer, epoch: int, stats: dict[str, float]) -> None:
        correction_before = self.correction_seconds
        start = time.perf_counter()
        super().on_epoch_end(trainer, epoch, stats)
        _sync(trainer.device)
        elapsed = time.perf_counter() - start
        self.end_seconds.append(elapsed - (self.correction_seconds - correction_before))

    def _correct(self, trainer: Trainer, alpha: np.ndarray, threshold: float) -> None:
        start = time.perf_counter()
        super()._correct(trainer, alpha, threshold)
        _sync(trainer.device)
        self.correction_seconds += time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _new_model(
    name: str, *, n_classes: int, in_chans: int, img_size: int, seed: int
) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=n_classes, in_chans=in_chans, img_size=img_size)


def run_trainer(
    model_fn: Callable[[], torch.nn.Module],
    images: DeviceImages,
    labels: np.ndarray,
    *,
    epochs: int,
    seed: int,
    linc_classes: int | None,
    graph: str = "auto",
) -> dict[str, Any]:
    """Train ``epochs + 1`` epochs with the Trainer; drop the first from the timings (it
    includes the warm-up steps and the capture of a CUDA graph in graph mode)."""
    config = TrainConfig(epochs=epochs + 1, batch_size=BATCH_SIZE, seed=seed, graph=graph)
    hook = TimedLiNC(linc_classes, warmup_epochs=epochs + 1) if linc_classes is not None else None
    trainer = Trainer(model_fn(), images, labels, config=config, hooks=[hook] if hook else [])
    history = trainer.fit()[1:]
    loop_seconds = [h.seconds for h in history]
    hook_seconds = hook.end_seconds[1:] if hook else [0.0] * len(history)
    return {
        "epoch_seconds": [a + b for a, b in zip(loop_seconds, hook_seconds, strict=True)],
        "loop_seconds": loop_seconds,
        "hook_end_seconds": hook_seconds,
        "samples_per_second": [h.samples_per_second for h in history],
        "correction_seconds": hook.correction_seconds if hook else None,
        "graph_captured": trainer.graph_captured,
    }


def run_textbook(
    model_fn: Callable[[], torch.nn.Module],
    images: np.ndarray,
    labels: np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    epochs: int,
    seed: int,
) -> dict[str, Any]:
    """The tutorial loop: DataLoader over CPU float tensors, ``.to(device)`` per batch."""
    x = torch.from_numpy(images).float().div_(255)
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    dataset = TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))
    loader = DataLoader(
        dataset,
        batch_size=BATCH_SIZE,
        shuffle=True,
        num_workers=0,
        generator=torch.Generator().manual_seed(seed),
        drop_last=len(dataset) % BATCH_SIZE == 1,  # BatchNorm cannot train on one sample
    )
    model = model_fn().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=TrainConfig.lr)
    seconds: list[float] = []
    samples_per_second: list[float] = []
    model.train()
    for _ in range(epochs + 1):
        start = time.perf_counter()
        seen = 0
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(yb)
        _sync(device)
        elapsed = time.perf_counter() - start
        seconds.append(elapsed)
        samples_per_second.append(seen / elapsed if elapsed > 0 else math.inf)
    return {"epoch_seconds": seconds[1:], "samples_per_second": samples_per_second[1:]}


# --------------------------------------------------------------------------- environment


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
    except (OSError, subprocess.SubprocessError):
        return "uncommitted"
    return out.stdout.strip() or "uncommitted"


def environment(args: argparse.Namespace, device: torch.device, n: int, cmd: str) -> dict[str, Any]:
    if device.type == "cuda":
        device_name = f"cuda: {torch.cuda.get_device_name(device)}"
    else:
        device_name = f"cpu: {platform.processor() or platform.machine()}"
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device_name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dataset": args.dataset,
        "n_train": n,
        "model": args.model,
        "batch_size": BATCH_SIZE,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "seed": args.seed,
        "noise": NOISE_SPEC,
        "git_commit": git_commit(),
        "command": cmd,
    }


# --------------------------------------------------------------------------- outputs


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def summarise(raw: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def pooled(kind: str, key: str) -> list[float]:
        return [v for run in raw[kind] for v in run[key]]

    ce = statistics.median(pooled("ce", "epoch_seconds"))
    linc = statistics.median(pooled("linc", "epoch_seconds"))
    ce_loop = statistics.median(pooled("ce", "loop_seconds"))
    linc_loop = statistics.median(pooled("linc", "loop_seconds"))
    ours = statistics.median(pooled("ce", "samples_per_second"))
    textbook = statistics.median(pooled("textbook", "samples_per_second"))
    paired = [
        statistics.median(lr["epoch_seconds"]) / statistics.median(cr["epoch_seconds"])
        for cr, lr in zip(raw["ce"], raw["linc"], strict=True)
    ]
    return {
        "ce_epoch_seconds_median": ce,
        "linc_epoch_seconds_median": linc,
        "linc_over_ce": linc / ce,
        "linc_over_ce_per_repeat": paired,
        "linc_over_ce_per_repeat_median": statistics.median(paired),
        "linc_over_ce_target": LINC_TARGET_RATIO,
        # Judged on the paired ratio: each repeat's CE and LiNC runs are back to back, so
        # drift of the machine between repeats cancels out.
        "linc_target_met": statistics.median(paired) <= LINC_TARGET_RATIO,
        "ce_loop_seconds_median": ce_loop,
        "linc_loop_seconds_median": linc_loop,
        "linc_over_ce_loop_only": linc_loop / ce_loop,
        "linc_hook_end_seconds_median": statistics.median(pooled("linc", "hook_end_seconds")),
        "linc_correction_seconds_median": statistics.median(
            run["correction_seconds"] for run in raw["linc"]
        ),
        "textbook_samples_per_second_median": textbook,
        "ours_samples_per_second_median": ours,
        "ours_over_textbook": ours / textbook,
        "graph_captured": raw["ce"][0]["graph_captured"],
        **_eager_summary(raw, ours),
    }


def _eager_summary(raw: dict[str, list[dict[str, Any]]], ours: float) -> dict[str, Any]:
    """Captured vs eager Trainer (only when the run captured its step: CUDA)."""
    if not raw.get("ce_eager"):
        return {}
    eager = statistics.median(v for run in raw["ce_eager"] for v in run["samples_per_second"])
    return {"eager_samples_per_second_median": eager, "graph_over_eager": ours / eager}


def render_markdown(result: dict[str, Any]) -> str:
    s, env = result["summary"], result["environment"]
    met = "met" if s["linc_target_met"] else "**not met**"
    lines = [
        "# Training loop benchmark",
        "",
        "Generated by `bench/bench_train.py`; ratios are against a baseline measured in the "
        "same run (interleaved repeats, medians over all timed epochs). Raw timings: "
        "`train_loop.json`; plot: `train_loop.png`.",
        "",
        "| measurement | baseline | ours | ratio | target |",
        "|---|---|---|---|---|",
        f"| epoch time, LiNC warm-up vs plain CE (s); ratio: median of per-repeat ratios "
        f"| CE {s['ce_epoch_seconds_median']:.3f} "
        f"| LiNC {s['linc_epoch_seconds_median']:.3f} | {s['linc_over_ce_per_repeat_median']:.3f} "
        f"| ≤ {s['linc_over_ce_target']:.2f} ({met}) |",
        f"| same, ratio of the pooled medians | | | {s['linc_over_ce']:.3f} | — |",
        f"| same, training loop only (s) | CE {s['ce_loop_seconds_median']:.3f} "
        f"| LiNC {s['linc_loop_seconds_median']:.3f} | {s['linc_over_ce_loop_only']:.3f} | — |",
        f"| throughput, Trainer vs textbook DataLoader loop (samples/s) "
        f"| DataLoader {s['textbook_samples_per_second_median']:.0f} "
        f"| Trainer {s['ours_samples_per_second_median']:.0f} "
        f"| {s['ours_over_textbook']:.3f} | — (reported) |",
        *(
            [
                f"| throughput, captured step (CUDA graph) vs eager Trainer (samples/s) "
                f"| eager {s['eager_samples_per_second_median']:.0f} "
                f"| graph {s['ours_samples_per_second_median']:.0f} "
                f"| {s['graph_over_eager']:.3f} | — (reported) |"
            ]
            if "graph_over_eager" in s
            else []
        ),
        "",
        "Trainer step: "
        + (
            "captured as a CUDA graph and replayed (`--graph`); CE and LiNC both."
            if s["graph_captured"]
            else "eager (no CUDA graph: `--graph off`, or not a CUDA device)."
        ),
        "",
        "LiNC's epoch time includes its end-of-epoch work (alpha snapshot and Otsu: median "
        f"{s['linc_hook_end_seconds_median'] * 1e3:.1f} ms/epoch). The one-off correction pass "
        f"at the end of warm-up took {s['linc_correction_seconds_median']:.3f} s (median) and is "
        "not counted in any epoch. Per-repeat LiNC/CE ratios: "
        + ", ".join(f"{r:.3f}" for r in s["linc_over_ce_per_repeat"])
        + f" (median {s['linc_over_ce_per_repeat_median']:.3f}); their spread shows how much "
        "of the difference is timing noise of the machine.",
        "",
        "Both losses train on the same noisy labels "
        f"(`{env['noise']}`, seed 0), the same model initialisation and batch order. The "
        "textbook loop is fp32; on CUDA the Trainer uses bf16 autocast and channels-last.",
        "",
        "## Environment",
        "",
        "```",
        *(f"{key}: {value}" for key, value in env.items() if key != "command"),
        "```",
        "",
        "## Command",
        "",
        "```",
        env["command"],
        "```",
        "",
    ]
    return "\n".join(lines)


def render_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw, s = result["raw"], result["summary"]
    panels = [
        (
            "Epoch time (s)",
            [
                ("plain CE", s["ce_epoch_seconds_median"], "ce", "epoch_seconds"),
                ("LiNC warm-up", s["linc_epoch_seconds_median"], "linc", "epoch_seconds"),
            ],
            f"LiNC / CE = {s['linc_over_ce']:.3f} (target ≤ {LINC_TARGET_RATIO})",
        ),
        (
            "Throughput (samples/s)",
            [
                (
                    "DataLoader",
                    s["textbook_samples_per_second_median"],
                    "textbook",
                    "samples_per_second",
                ),
                ("Trainer", s["ours_samples_per_second_median"], "ce", "samples_per_second"),
            ],
            f"Trainer / DataLoader = {s['ours_over_textbook']:.3f}",
        ),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, (ylabel, bars, title) in zip(axes, panels, strict=True):
        for i, (label, median, kind, key) in enumerate(bars):
            ax.bar(i, median, width=0.6, color=f"C{i}", alpha=0.6, label=label)
            points = [statistics.median(run[key]) for run in raw[kind]]
            ax.scatter([i] * len(points), points, color="k", s=14, zorder=3)
        ax.set_xticks(range(len(bars)), [b[0] for b in bars])
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
    env = result["environment"]
    fig.suptitle(
        f"{env['dataset']} (N={env['n_train']}), {env['model']}, {env['device']}, "
        f"{env['torch_threads']} thread(s); bars: median, points: per-repeat median",
        fontsize=9,
    )
    fig.tight_layout()

    try:
        atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120))
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="breastmnist")
    parser.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="default: ../shared/data"
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--graph",
        default="auto",
        choices=["auto", "on", "off"],
        help="the Trainer's CUDA-graph mode; when it captures, an eager CE run is added",
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--epochs, --repeats and --threads must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cli = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(cli)
    cmd = shlex.join(["python", "bench/bench_train.py", *cli])
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    dataset = load_dataset(args.dataset, data_dir=args.data_dir)
    train = dataset.train
    n_classes = dataset.n_classes
    labels = inject_noise(train.labels, NOISE_SPEC, n_classes=n_classes, seed=0).noisy_labels
    images = DeviceImages(train.images, device)

    def model_fn() -> torch.nn.Module:
        return _new_model(
            args.model,
            n_classes=n_classes,
            in_chans=dataset.in_chans,
            img_size=dataset.image_size[0],
            seed=args.seed,
        )

    raw: dict[str, list[dict[str, Any]]] = {"ce": [], "linc": [], "textbook": [], "ce_eager": []}
    for rep in range(args.repeats):
        common = {"epochs": args.epochs, "seed": args.seed}
        graph = {"graph": args.graph}
        raw["ce"].append(
            run_trainer(model_fn, images, labels, linc_classes=None, **common, **graph)
        )
        raw["linc"].append(
            run_trainer(model_fn, images, labels, linc_classes=n_classes, **common, **graph)
        )
        if raw["ce"][-1]["graph_captured"]:
            raw["ce_eager"].append(
                run_trainer(model_fn, images, labels, linc_classes=None, graph="off", **common)
            )
        raw["textbook"].append(
            run_textbook(
                model_fn,
                train.images,
                labels,
                mean=images.mean_list,
                std=images.std_list,
                device=device,
                **common,
            )
        )
        ce_s = statistics.median(raw["ce"][-1]["epoch_seconds"])
        linc_s = statistics.median(raw["linc"][-1]["epoch_seconds"])
        tb = statistics.median(raw["textbook"][-1]["samples_per_second"])
        ours = statistics.median(raw["ce"][-1]["samples_per_second"])
        print(
            f"repeat {rep + 1}/{args.repeats}: CE {ce_s:.3f} s/epoch, LiNC {linc_s:.3f} "
            f"s/epoch, DataLoader {tb:.0f} samples/s, Trainer {ours:.0f} samples/s",
            file=sys.stderr,
        )

    result = {
        "environment": environment(args, device, len(train), cmd),
        "summary": summarise(raw),
        "raw": raw,
    }
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(out_dir / "train_loop.json", json.dumps(result, indent=2) + "\n")
    _write_text(out_dir / "train_loop.md", render_markdown(result))
    render_plot(result, out_dir / "train_loop.png")
    return result


if __name__ == "__main__":
    main()
