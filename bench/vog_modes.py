"""How far the ewma approximation of VOG changes Co-teaching VOG's clean selection.

Trains :class:`~noisescore.ml.methods.CoTeachingVOG` twice on the same data, noisy labels,
seed and models, once with the exact VOG window (float16 ring buffer) and once with the
exponentially weighted variance (``--vog-window`` is the span), and reports:

* the memory of each mode's VOG state (both networks' trackers, measured ``nbytes``);
* the overlap (Jaccard) of the two clean sets (union of both networks' picks in the last
  ``--last`` epochs) and the Spearman correlation of their final VOG (network 0);
* per mode: clean-set size, precision (share of the clean set whose label is right),
  recall of the truly clean samples, and that recall per class (of the truly clean
  samples of class ``c``, the share kept: the paper's Table 1), worst class first;
* with ``--coteaching``, plain Co-teaching on the same setting as a reference.

The training set is a seeded random subset of the dataset's train split
(``--n-samples``). Usage::

    nice python bench/vog_modes.py [--dataset bloodmnist] [--n-samples 3000]
        [--noise symmetric:0.4] [--epochs 15] [--t-k 5] [--vog-warmup 5] [--out vog.json]

Prints a markdown table; ``--out`` also writes the numbers as JSON (atomically).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from noisescore.atomic import atomic_write_bytes
from noisescore.ml.data import load_dataset
from noisescore.ml.methods import (
    CoTeaching,
    CoTeachingVOG,
    VOGTracker,
    create_method,
    label_row_gradient,
    mixed_selection,
)
from noisescore.ml.models import DEFAULT_MODEL, create_model
from noisescore.ml.noise import inject_noise, parse_noise_spec
from noisescore.ml.train import Batch, DeviceImages, TrainConfig, Trainer, resolve_device

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="bloodmnist")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--n-samples", type=int, default=3000, help="random train subset")
    parser.add_argument("--noise", default="symmetric:0.4")
    parser.add_argument("--forget-rate", type=float, default=None, help="default: noise rate")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--t-k", type=int, default=5)
    parser.add_argument("--mix-ratio", type=float, default=0.2)
    parser.add_argument("--vog-window", type=int, default=5)
    parser.add_argument("--vog-warmup", type=int, default=5)
    parser.add_argument("--last", type=int, default=1, help="clean set: last epochs' picks")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (0: torch's default); on a shared CPU one thread does "
        "the most work per CPU second",
    )
    parser.add_argument("--coteaching", action="store_true", help="also plain Co-teaching")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON")
    args = parser.parse_args(argv)
    if args.n_samples < 2 or args.epochs < 1 or not 1 <= args.last <= args.epochs:
        parser.error("need --n-samples >= 2, --epochs >= 1 and 1 <= --last <= --epochs")
    return args


def class_recall(clean: np.ndarray, truly_clean: np.ndarray, labels: np.ndarray, n_classes: int):
    """Per class ``c``: of the truly clean samples of class ``c``, the share in ``clean``."""
    out = []
    for c in range(n_classes):
        members = truly_clean & (labels == c)
        out.append(float(clean[members].mean()) if members.any() else float("nan"))
    return out


class ShadowedCoTeachingVOG(CoTeachingVOG):
    """Exact-mode Co-teaching VOG that also feeds an ewma tracker the same snapshots and
    counts, at every VOG-mixing step, how many of the exact ``R2`` picks the ewma would
    have picked too: the approximation's effect on the same training trajectory."""

    def on_train_start(self, trainer: Trainer) -> None:
        super().on_train_start(trainer)
        self.shadows = tuple(
            VOGTracker(t.n_samples, t.dim, window=t.window, mode="ewma", device=t.device)
            for t in self.trackers
        )
        self.r2_same = torch.zeros((), dtype=torch.long, device=trainer.device)
        self.r2_total = 0

    def select(self, k: int, batch: Batch, losses: torch.Tensor, keep: int) -> torch.Tensor:
        picks = super().select(k, batch, losses, keep)
        if self._mixing:
            alt = mixed_selection(
                losses, self.shadows[k].vog(batch.idx), keep=keep, mix_ratio=self.mix_ratio
            )
            r1 = math.floor((1.0 - self.mix_ratio) * keep)
            self.r2_same += torch.isin(picks[r1:], alt[r1:]).sum()
            self.r2_total += keep - r1
        return picks

    def batch_loss(self, trainer: Trainer, batch: Batch) -> torch.Tensor:
        loss = super().batch_loss(trainer, batch)
        for shadow, m in zip(self.shadows, self._models, strict=True):
            features = batch.features[m]
            assert features is not None
            shadow.update(batch.idx, label_row_gradient(batch.logits[m], batch.labels, features))
        return loss


def run(
    args: argparse.Namespace,
    name: str,
    *,
    images: DeviceImages,
    noisy: np.ndarray,
    n_classes: int,
    in_chans: int,
    img_size: int,
    forget_rate: float,
    shadow: bool = False,
    **params: Any,
) -> tuple[CoTeaching, float]:
    def model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return create_model(args.model, num_classes=n_classes, in_chans=in_chans, img_size=img_size)

    build: Any = ShadowedCoTeachingVOG if shadow else partial(create_method, name)
    method = build(
        n_samples=len(noisy),
        n_classes=n_classes,
        peer=model(args.seed + 1),
        forget_rate=forget_rate,
        t_k=args.t_k,
        **params,
    )
    assert isinstance(method, CoTeaching)
    trainer = Trainer(
        model(args.seed),
        images,
        noisy,
        config=TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed
        ),
        hooks=[method],
    )
    start = time.perf_counter()
    trainer.fit()
    return method, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cli = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(cli)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dataset = load_dataset(args.dataset, data_dir=args.data_dir)
    train, n_classes = dataset.train, dataset.n_classes
    rng = np.random.default_rng(args.seed)
    n = min(args.n_samples, len(train))
    subset = np.sort(rng.choice(len(train), size=n, replace=False))
    true_labels = train.labels[subset]
    noise = inject_noise(true_labels, args.noise, n_classes=n_classes, seed=args.seed)
    truly_clean = ~noise.flipped
    spec = parse_noise_spec(args.noise)
    if args.forget_rate is not None:
        forget_rate = args.forget_rate
    else:  # the paper's tau_max = the noise rate (realised, for a transition-matrix file)
        forget_rate = float(spec.rate) if spec.rate is not None else noise.realised_rate
    images = DeviceImages(train.images[subset], device)
    common = {
        "images": images,
        "noisy": noise.noisy_labels,
        "n_classes": n_classes,
        "in_chans": dataset.in_chans,
        "img_size": dataset.image_size[0],
        "forget_rate": forget_rate,
    }
    vog_params = {
        "mix_ratio": args.mix_ratio,
        "vog_window": args.vog_window,
        "vog_warmup": args.vog_warmup,
    }
    runs: dict[str, tuple[CoTeaching, float]] = {}
    for mode in ("exact", "ewma"):
        runs[mode] = run(
            args,
            "coteaching_vog",
            vog_mode=mode,
            shadow=mode == "exact",
            **vog_params,
            **common,
        )
        print(f"{mode}: {runs[mode][1]:.1f} s", file=sys.stderr)
    if args.coteaching:
        runs["coteaching"] = run(args, "coteaching", **common)
        print(f"coteaching: {runs['coteaching'][1]:.1f} s", file=sys.stderr)

    rows: dict[str, dict[str, Any]] = {}
    for key, (method, seconds) in runs.items():
        clean = method.clean_set(last=args.last)
        recall = class_recall(clean, truly_clean, true_labels, n_classes)
        rows[key] = {
            "method": method.name,
            "vog_mode": getattr(method, "vog_mode", None),
            "vog_nbytes": method.vog_nbytes_ if isinstance(method, CoTeachingVOG) else 0,
            "clean_size": int(clean.sum()),
            "precision": float(truly_clean[clean].mean()) if clean.any() else float("nan"),
            "recall": float(clean[truly_clean].mean()),
            "class_recall": recall,
            "worst_class_recall": float(np.nanmin(recall)),
            "seconds": seconds,
        }
    exact_clean = runs["exact"][0].clean_set(last=args.last)
    ewma_clean = runs["ewma"][0].clean_set(last=args.last)
    union = exact_clean | ewma_clean
    jaccard = float((exact_clean & ewma_clean).sum() / union.sum()) if union.any() else 1.0
    vog_exact = runs["exact"][0].vog_[0]  # type: ignore[attr-defined]
    vog_ewma = runs["ewma"][0].vog_[0]  # type: ignore[attr-defined]
    finite = np.isfinite(vog_exact) & np.isfinite(vog_ewma)
    rho = float(spearmanr(vog_exact[finite], vog_ewma[finite]).statistic)
    result = {
        "command": shlex.join(["python", "bench/vog_modes.py", *cli]),
        "settings": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "forget_rate": forget_rate,
            "n_train": n,
            "realised_noise_rate": noise.realised_rate,
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
        },
        "class_counts": np.bincount(true_labels, minlength=n_classes).tolist(),
        "truly_clean_counts": np.bincount(true_labels[truly_clean], minlength=n_classes).tolist(),
        "jaccard_exact_ewma": jaccard,
        "spearman_vog_exact_ewma": rho,
        "same_trajectory": same_trajectory(runs["exact"][0]),
        "runs": rows,
    }
    print(render_markdown(result))
    if args.out is not None:
        atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    return result


def same_trajectory(method: CoTeaching, *, low_share: float = 0.2) -> dict[str, float]:
    """How the ewma would have chosen on the exact run's own batches and snapshots."""
    assert isinstance(method, ShadowedCoTeachingVOG)
    exact = method.trackers[0].vog().cpu().numpy()
    ewma = method.shadows[0].vog().cpu().numpy()
    finite = np.isfinite(exact) & np.isfinite(ewma)
    k = max(1, int(low_share * finite.sum()))
    low_exact = set(np.flatnonzero(finite)[np.argsort(exact[finite])[:k]].tolist())
    low_ewma = set(np.flatnonzero(finite)[np.argsort(ewma[finite])[:k]].tolist())
    return {
        "r2_agreement": float(method.r2_same) / max(method.r2_total, 1),
        "r2_total": method.r2_total,
        "spearman_vog": float(spearmanr(exact[finite], ewma[finite]).statistic),
        "low_share": low_share,
        "low_vog_jaccard": len(low_exact & low_ewma) / len(low_exact | low_ewma),
    }


def render_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    same = result["same_trajectory"]
    n_classes = len(result["class_counts"])
    head = (
        f"{s['dataset']} train subset n={s['n_train']}, {s['noise']} "
        f"(realised {s['realised_noise_rate']:.3f}), {s['epochs']} epochs, t_k={s['t_k']}, "
        f"forget_rate={s['forget_rate']}, m={s['mix_ratio']}, window={s['vog_window']}, "
        f"vog_warmup={s['vog_warmup']}, clean set = last {s['last']} epoch(s), "
        f"seed {s['seed']}, {s['device']}"
    )
    cols = [f"c{c}" for c in range(n_classes)]
    lines = [
        head,
        "",
        "| run | VOG state (bytes) | clean set | precision | recall | worst class | "
        + " | ".join(cols)
        + " | seconds |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * n_classes + "---:|",
    ]
    for key, r in result["runs"].items():
        per_class = " | ".join(f"{v:.3f}" for v in r["class_recall"])
        lines.append(
            f"| {key} | {r['vog_nbytes']:,} | {r['clean_size']} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} | {r['worst_class_recall']:.3f} | {per_class} | "
            f"{r['seconds']:.0f} |"
        )
    lines += [
        "",
        f"truly clean per class: {result['truly_clean_counts']}",
        f"Jaccard(clean exact, clean ewma) = {result['jaccard_exact_ewma']:.3f}; "
        f"Spearman(VOG exact, VOG ewma; network 0) = {result['spearman_vog_exact_ewma']:.3f}",
        "",
        "Same trajectory (ewma fed the exact run's snapshots): "
        f"{same['r2_agreement']:.3f} of the exact R2 picks would be the ewma's too "
        f"({same['r2_total']} picks); Spearman(final VOG, network 0) = "
        f"{same['spearman_vog']:.3f}; overlap of the {same['low_share']:.0%} lowest-VOG "
        f"samples = {same['low_vog_jaccard']:.3f} (Jaccard)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
