"""Overhead of the label-noise detectors on the warm-up, in one run (a ratio, not a timing).

Three warm-ups of the same data, seed, model and trainer, interleaved ``--repeats`` times
so that drift of the machine affects them alike:

* ``ce``: plain cross-entropy (no hook);
* ``linc``: LiNC's warm-up as before the detectors (the LiNC hook only);
* ``detectors``: LiNC plus every detector of ``--detectors`` (default ``all``, the default
  of ``noisescore clean``).

Each run trains ``--epochs`` warm-up epochs after one untimed epoch (the warm-up is set
one epoch longer, so LiNC's one-off correction pass is never timed); the time of a run is
its wall time (the loop plus every hook's end-of-epoch work: the detectors' one host copy
per epoch and cleanlab's ranking). The ratio detectors / ce is the issue's target
(<= 1.10). Memory: each detector's device state after ``on_train_start`` (bytes per
sample) and its host record (4 bytes per sample and epoch).

    nice -n 15 .venv/bin/python bench/bench_detectors.py [--dataset pneumoniamnist]

Writes ``detectors.json`` and ``detectors.md`` to ``--out-dir`` (docs/bench).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from noisescore.atomic import atomic_write_bytes
from noisescore.ml import clean
from noisescore.ml.detectors import create_detectors
from noisescore.ml.linc import LiNC
from noisescore.settings import CleanSettings

ROOT = Path(__file__).resolve().parents[1]


def _hooks(kind: str, settings: CleanSettings, n_classes: int) -> list[Any]:
    if kind == "ce":
        return []
    linc = LiNC(n_classes, warmup_epochs=settings.warmup_epochs)
    if kind == "linc":
        return [linc]
    names = settings.detector_names()
    return [linc, *create_detectors(names, n_classes, warmup_epochs=settings.warmup_epochs)]


def _state_bytes(detector: Any) -> int:
    return sum(
        v.numel() * v.element_size() for v in vars(detector).values() if isinstance(v, torch.Tensor)
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    settings = CleanSettings(
        dataset=args.dataset,
        data_dir=args.data_dir,
        noise="uniform:0.5",
        seed=0,
        warmup_epochs=args.epochs + 2,  # no correction pass inside the timed epochs
        detectors=args.detectors,
        device=args.device,
    )
    data = clean.prepare_data(settings)
    n_classes = data.dataset.n_classes
    seconds: dict[str, list[float]] = {"ce": [], "linc": [], "detectors": []}
    memory: dict[str, dict[str, float]] = {}
    for _ in range(args.repeats):
        for kind in seconds:
            hooks = _hooks(kind, settings, n_classes)
            trainer = clean._trainer(
                data, settings, data.train_labels, hooks=hooks, progress=False, desc=kind
            )
            trainer.fit(stop_epoch=1)  # untimed: allocation, first-touch
            start = time.perf_counter()
            trainer.fit(stop_epoch=1 + args.epochs)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            seconds[kind].append((time.perf_counter() - start) / args.epochs)
            for hook in hooks[1:]:
                n = trainer.n_samples
                memory[hook.name] = {
                    "device_bytes_per_sample": _state_bytes(hook) / n,
                    "host_bytes_per_sample_per_epoch": 4.0,
                }
    median = {k: statistics.median(v) for k, v in seconds.items()}
    fastest = {k: min(v) for k, v in seconds.items()}
    return {
        "dataset": args.dataset,
        "n_train": len(data.train_labels),
        "device": settings.device,
        "threads": args.threads,
        "epochs_timed": args.epochs,
        "repeats": args.repeats,
        "detectors": list(settings.detector_names()),
        "epoch_seconds": seconds,
        "epoch_seconds_median": median,
        "epoch_seconds_min": fastest,
        # On a shared machine the fastest repeat is the least disturbed: the ratios use it.
        "ratio_detectors_vs_ce": fastest["detectors"] / fastest["ce"],
        "ratio_detectors_vs_linc": fastest["detectors"] / fastest["linc"],
        "ratio_linc_vs_ce": fastest["linc"] / fastest["ce"],
        "ratio_detectors_vs_ce_median": median["detectors"] / median["ce"],
        "memory": memory,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "command": " ".join(["python bench/bench_detectors.py", *sys.argv[1:]]),
    }


def markdown(r: dict[str, Any]) -> str:
    med, low = r["epoch_seconds_median"], r["epoch_seconds_min"]
    lines = [
        "# Detector overhead on the warm-up",
        "",
        f"`{r['command']}`: {r['dataset']} ({r['n_train']} train images), device "
        f"{r['device']}, {r['threads']} thread(s), {r['epochs_timed']} timed warm-up epochs "
        f"per run, {r['repeats']} interleaved repeats; torch {r['torch']}. Ratios use the "
        "fastest repeat of each (the least disturbed on a shared machine); medians beside.",
        "",
        "| warm-up | s / epoch (fastest) | s / epoch (median) | ratio vs plain CE (fastest) |",
        "|---|---|---|---|",
        f"| plain cross-entropy | {low['ce']:.3f} | {med['ce']:.3f} | 1.000 |",
        f"| LiNC only (before detectors) | {low['linc']:.3f} | {med['linc']:.3f} | "
        f"{r['ratio_linc_vs_ce']:.3f} |",
        f"| LiNC + {len(r['detectors']) - 1} detectors | {low['detectors']:.3f} | "
        f"{med['detectors']:.3f} | {r['ratio_detectors_vs_ce']:.3f} |",
        "",
        f"LiNC + detectors vs LiNC alone: **{r['ratio_detectors_vs_linc']:.3f}×**; vs plain "
        f"CE {r['ratio_detectors_vs_ce']:.3f}× (target ≤ 1.10×; medians: "
        f"{r['ratio_detectors_vs_ce_median']:.3f}×). Every run's epoch times are in "
        "`detectors.json`.",
        "",
        "| detector | device state, bytes / sample | host record, bytes / sample / epoch |",
        "|---|---|---|",
    ]
    for name, m in r["memory"].items():
        lines.append(
            f"| `{name}` | {m['device_bytes_per_sample']:.0f} | "
            f"{m['host_bytes_per_sample_per_epoch']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="pneumoniamnist")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--detectors", default="all")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--out-dir", default=str(ROOT / "docs" / "bench"))
    args = parser.parse_args(argv)
    result = run(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "detectors.json", json.dumps(result, indent=1).encode())
    atomic_write_bytes(out / "detectors.md", markdown(result).encode())
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
