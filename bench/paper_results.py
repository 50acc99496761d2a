"""Reproduce LiNC's Table 1 and Table 2 on the real MedMNIST data; write docs/RESULTS.md.

Every number in docs/RESULTS.md comes from this script, through the same code path as
``noisescore clean`` (:func:`noisescore.ml.clean.run_clean`). Runs are cached one JSON
line each in ``docs/results/runs.jsonl`` so an interrupted run resumes where it stopped.

    .venv/bin/python bench/paper_results.py --jobs 2          # the committed results
    .venv/bin/python bench/paper_results.py --quick           # a smoke run (minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NOISE_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
MAIN_LR, ABLATION_LR = 1e-4, 1e-3
PAPER_TABLE1 = {"epoch 2": 0.7923, "epoch 10": 0.8012}  # ViT, 224 px, BreastMNIST


@dataclass(frozen=True)
class Run:
    """One cleaning job of the study (a key of the cache)."""

    part: str  # "detection" (Table 1) or "accuracy" (Table 2)
    dataset: str
    noise: str | None
    seed: int
    epochs: int
    warmup_epochs: int
    alpha_grad: str = "mean"
    lr: float = 1e-4
    model: str = "noisescore_cnn"
    baseline: bool = False

    @property
    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def plan(quick: bool) -> list[Run]:
    runs: list[Run] = []
    seeds = (0,) if quick else (0, 1, 2)
    for noise in ("uniform:0.5", "symmetric:0.2"):
        for grad in ("mean", "sample"):
            for seed in seeds:
                runs.append(Run("detection", "breastmnist", noise, seed, 10, 10, grad))
                if not quick:  # ablation: a 10x larger learning rate
                    runs.append(
                        Run("detection", "breastmnist", noise, seed, 10, 10, grad, lr=ABLATION_LR)
                    )
    budgets = {  # dataset: (epochs, seeds), sized for a 2-core CPU machine, see RESULTS.md
        "breastmnist": (50, (0, 1, 2)),
        "pneumoniamnist": (20, (0,)),
        "bloodmnist": (15, (0,)),
    }
    if quick:
        budgets = {d: (11, (0,)) for d in budgets}
    levels = NOISE_LEVELS if not quick else (0.0, 0.5)
    # Every dataset's first seed before the extra seeds, so a cut-short study still covers
    # every dataset and noise level.
    for seed_rank in range(max(len(s) for _, s in budgets.values())):
        for dataset, (epochs, ds_seeds) in budgets.items():
            if seed_rank >= len(ds_seeds):
                continue
            for level in levels:
                noise = None if level == 0 else f"uniform:{level}"
                runs.append(
                    Run("accuracy", dataset, noise, ds_seeds[seed_rank], epochs, 10, baseline=True)
                )
                if not quick and dataset == "breastmnist" and seed_rank == 0:
                    runs.append(
                        Run(
                            "accuracy", dataset, noise, 0, epochs, 10, lr=ABLATION_LR, baseline=True
                        )
                    )
    return runs


def execute(run: Run, data_dir: str) -> dict[str, Any]:
    import torch

    from noisescore.ml.clean import run_clean
    from noisescore.settings import CleanSettings

    torch.set_num_threads(1)
    settings = CleanSettings(
        dataset=run.dataset,
        data_dir=data_dir,
        noise=run.noise,
        seed=run.seed,
        epochs=run.epochs,
        warmup_epochs=run.warmup_epochs,
        alpha_grad=run.alpha_grad,
        lr=run.lr,
        model=run.model,
        baseline=run.baseline,
        device="cpu",
    )
    start = time.perf_counter()
    result = run_clean(settings)
    report = result.report
    for section in (report["linc"], report.get("baseline") or {}):
        section.pop("history", None)
    found = result.linc.linc
    assert found is not None
    out: dict[str, Any] = {
        "key": run.key,
        "run": asdict(run),
        "report": report,
        "seconds": time.perf_counter() - start,
    }
    if run.part == "detection" and run.seed == 0:
        flipped = result.data.flipped
        assert flipped is not None
        out["trust_last"] = found.trust.round(5).tolist()
        out["flipped"] = flipped.astype(int).tolist()
    return out


CL_NOISES = ("uniform:0.5", "symmetric:0.2")
CL_FOLDS = 5


def cl_key(noise: str, seed: int) -> str:
    return f"cl|{noise}|{seed}|lr={MAIN_LR:g}"


def confident_learning(noise: str, seed: int, data_dir: str, epochs: int = 10) -> dict[str, Any]:
    """Reference detector: cleanlab on 5-fold out-of-fold probabilities of the same model.

    Each fold trains ``noisescore_cnn`` for as many epochs as LiNC's warm-up, with the same
    optimiser, so the comparison is "five trainings (CL) vs one (LiNC)".
    """
    import torch
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.model_selection import StratifiedKFold

    from noisescore.ml.data import load_dataset
    from noisescore.ml.metrics import detection_metrics
    from noisescore.ml.models import create_model
    from noisescore.ml.noise import inject_noise
    from noisescore.ml.train import DeviceImages, TrainConfig, Trainer

    torch.set_num_threads(1)
    start = time.perf_counter()
    ds = load_dataset("breastmnist", data_dir=data_dir)
    train = ds.train
    noisy = inject_noise(
        train.labels, noise, n_classes=ds.n_classes, seed=seed, images=train.images
    )
    proba = np.zeros((len(train), ds.n_classes))
    folds = StratifiedKFold(CL_FOLDS, shuffle=True, random_state=seed)
    cpu = torch.device("cpu")
    for fit_idx, held_idx in folds.split(train.images, noisy.noisy_labels):
        torch.manual_seed(seed)
        model = create_model(
            "noisescore_cnn",
            num_classes=ds.n_classes,
            in_chans=ds.in_chans,
            img_size=ds.image_size[0],
        )
        images = DeviceImages(train.images[fit_idx], cpu)
        trainer = Trainer(
            model,
            images,
            noisy.noisy_labels[fit_idx],
            config=TrainConfig(epochs=epochs, lr=MAIN_LR, seed=seed),
        )
        trainer.fit()
        held = DeviceImages(train.images[held_idx], cpu, mean=images.mean_list, std=images.std_list)
        proba[held_idx] = trainer.predict_proba(held)
    quality = get_label_quality_scores(noisy.noisy_labels, proba)  # low = suspicious
    issues = find_label_issues(noisy.noisy_labels, proba)
    det = detection_metrics(quality, noisy.flipped, issues)
    return {
        "key": cl_key(noise, seed),
        "noise": noise,
        "seed": seed,
        "detection": det,
        "n_flagged": int(issues.sum()),
        "realised_rate": noisy.realised_rate,
        "seconds": time.perf_counter() - start,
    }


def cl_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(confident-learning reference not run: `pip install -e .[bench]`)"
    lines = [
        "| noise | seeds | AUROC | AP | flagged precision | flagged recall | trainings |",
        "|---|---|---|---|---|---|---|",
    ]
    for noise in CL_NOISES:
        sel = [
            r["detection"]
            for r in rows
            if r["noise"] == noise and r["key"].endswith(f"lr={MAIN_LR:g}")
        ]
        if sel:
            lines.append(
                f"| `{noise}` | {len(sel)} | {mean_std(d['auroc'] for d in sel)} | "
                f"{mean_std(d['average_precision'] for d in sel)} | "
                f"{mean_std(d['precision'] for d in sel)} | "
                f"{mean_std(d['recall'] for d in sel)} | {CL_FOLDS} × 10 epochs |"
            )
    return "\n".join(lines)


def load_cache(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    cache = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            cache[row["key"]] = row
    return cache


def mean_std(values: Iterable[float | None]) -> str:
    xs = [v for v in values if v is not None]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def table1(rows: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    lines = [
        "| noise (BreastMNIST train) | realised flip rate | alpha gradient | seeds | "
        "AUROC epoch 2 | AUROC epoch 10 | AP epoch 10 | flagged precision | flagged recall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    csv_rows = []
    for noise in ("uniform:0.5", "symmetric:0.2"):
        for grad in ("mean", "sample"):
            sel = [r for r in rows if r["run"]["noise"] == noise and r["run"]["alpha_grad"] == grad]
            if not sel:
                continue
            linc = [r["report"]["linc"] for r in sel]
            e2 = [x["detection_auroc_by_epoch"]["2"] for x in linc]
            e10 = [x["detection_auroc_by_epoch"]["10"] for x in linc]
            rate = [r["report"]["noise"]["realised_rate"] for r in sel]
            lines.append(
                f"| `{noise}` | {mean_std(rate)} | {grad} | {len(sel)} | {mean_std(e2)} | "
                f"{mean_std(e10)} | {mean_std(x['detection']['average_precision'] for x in linc)}"
                f" | {mean_std(x['detection']['precision'] for x in linc)}"
                f" | {mean_std(x['detection']['recall'] for x in linc)} |"
            )
            csv_rows.append(
                {
                    "noise": noise,
                    "alpha_grad": grad,
                    "seeds": len(sel),
                    "auroc_epoch2": e2,
                    "auroc_epoch10": e10,
                }
            )
    return "\n".join(lines), csv_rows


def table2(rows: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    datasets = [
        d
        for d in ("breastmnist", "pneumoniamnist", "bloodmnist")
        if any(r["run"]["dataset"] == d for r in rows)
    ]
    lines = [
        "| dataset | epochs | seeds | method | "
        + " | ".join(f"{int(p * 100)}%" for p in NOISE_LEVELS)
        + " |",
        "|---|---|---|---|" + "---|" * len(NOISE_LEVELS),
    ]
    summary = []
    for d in datasets:
        for method in ("CE (no LiNC)", "LiNC"):
            cells = []
            meta = None
            for level in NOISE_LEVELS:
                noise = None if level == 0 else f"uniform:{level}"
                sel = [r for r in rows if r["run"]["dataset"] == d and r["run"]["noise"] == noise]
                if not sel:
                    cells.append("—")
                    continue
                meta = sel[0]["run"]
                if method == "LiNC":
                    accs = [r["report"]["test"]["accuracy"] for r in sel]
                else:
                    accs = [r["report"]["baseline"]["test"]["accuracy"] for r in sel]
                cells.append(mean_std(accs))
                summary.append(
                    {
                        "dataset": d,
                        "method": method,
                        "noise": level,
                        "accuracy": accs,
                        "seeds": len(sel),
                    }
                )
            assert meta is not None
            seeds = len({r["run"]["seed"] for r in rows if r["run"]["dataset"] == d})
            lines.append(
                f"| {d} | {meta['epochs']} | {seeds} | {method} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines), summary


def label_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| dataset | noise | realised | detection AUROC | flagged | relabelled | "
        "correction accuracy | train label acc. before → after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["run"]["noise"] is None or r["run"]["seed"] != 0:
            continue
        rep, linc = r["report"], r["report"]["linc"]
        ca = linc["correction_accuracy"]
        lines.append(
            f"| {r['run']['dataset']} | `{r['run']['noise']}` | "
            f"{rep['noise']['realised_rate']:.3f} | {linc['detection']['auroc']:.3f} | "
            f"{linc['n_flagged']} | {linc['n_changed']} | "
            f"{'n/a' if ca is None else f'{ca:.3f}'} | "
            f"{linc['label_accuracy_before']:.3f} → {linc['label_accuracy_after']:.3f} |"
        )
    return "\n".join(lines)


def lr_table(rows: list[dict[str, Any]]) -> str:
    """BreastMNIST, seed 0 (and detection over seeds): the paper's lr vs 10x larger."""
    lines = [
        "| Adam lr | noise | detection AUROC (epoch 10, seeds) | relabelled | "
        "train label acc. before → after | test acc. CE | test acc. LiNC |",
        "|---|---|---|---|---|---|---|",
    ]
    for lr in (MAIN_LR, ABLATION_LR):
        for level in (0.3, 0.5):
            noise = f"uniform:{level}"
            acc = [
                r
                for r in rows
                if r["run"]["part"] == "accuracy"
                and r["run"]["lr"] == lr
                and r["run"]["dataset"] == "breastmnist"
                and r["run"]["noise"] == noise
                and r["run"]["seed"] == 0
            ]
            det = [
                r["report"]["linc"]["detection_auroc_by_epoch"]["10"]
                for r in rows
                if r["run"]["part"] == "detection"
                and r["run"]["lr"] == lr
                and r["run"]["noise"] == noise
                and r["run"]["alpha_grad"] == "mean"
            ]
            if not acc:
                continue
            rep = acc[0]["report"]
            linc = rep["linc"]
            lines.append(
                f"| {lr:g} | `{noise}` | {mean_std(det) if det else 'n/a'} | "
                f"{linc['n_changed']} | {linc['label_accuracy_before']:.3f} → "
                f"{linc['label_accuracy_after']:.3f} | {rep['baseline']['test']['accuracy']:.3f}"
                f" | {rep['test']['accuracy']:.3f} |"
            )
    return "\n".join(lines)


def plots(det: list[dict[str, Any]], acc: list[dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    hist = [r for r in det if "trust_last" in r and r["run"]["noise"] == "uniform:0.5"]
    if hist:
        fig, axes = plt.subplots(1, len(hist), figsize=(5.5 * len(hist), 3.6), squeeze=False)
        for ax, r in zip(axes[0], sorted(hist, key=lambda r: r["run"]["alpha_grad"]), strict=True):
            trust, flipped = np.array(r["trust_last"]), np.array(r["flipped"], dtype=bool)
            bins = np.linspace(trust.min(), 1, 41)
            ax.hist(trust[~flipped], bins=bins, alpha=0.6, label="clean label")
            ax.hist(trust[flipped], bins=bins, alpha=0.6, label="flipped label")
            ax.axvline(r["report"]["linc"]["otsu_threshold"], color="k", ls="--", label="Otsu")
            ax.set_yscale("log")
            ax.set_title(
                f"alpha_grad={r['run']['alpha_grad']}: trust after warm-up\n"
                f"BreastMNIST uniform:0.5, seed 0"
            )
            ax.set_xlabel("trust (alpha)")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "alpha_histograms.png", dpi=110)
        plt.close(fig)
        made.append("alpha_histograms.png")
    curves = [r for r in det if r["run"]["noise"] == "uniform:0.5"]
    if curves:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for grad, colour in (("mean", "C0"), ("sample", "C1")):
            sel = [
                r["report"]["linc"]["detection_auroc_by_epoch"]
                for r in curves
                if r["run"]["alpha_grad"] == grad
            ]
            for i, by_epoch in enumerate(sel):
                ep = sorted(int(k) for k in by_epoch)
                ax.plot(
                    ep,
                    [by_epoch[str(e)] for e in ep],
                    color=colour,
                    alpha=0.7,
                    label=f"alpha_grad={grad}" if i == 0 else None,
                )
        ax.axhline(0.5, color="grey", ls=":")
        ax.set_xlabel("warm-up epoch")
        ax.set_ylabel("detection AUROC")
        ax.set_title("BreastMNIST uniform:0.5 (one line per seed)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "auroc_by_epoch.png", dpi=110)
        plt.close(fig)
        made.append("auroc_by_epoch.png")
    if acc:
        datasets = sorted({a["dataset"] for a in acc})
        fig, axes = plt.subplots(
            1, len(datasets), figsize=(4.5 * len(datasets), 3.4), squeeze=False
        )
        for ax, d in zip(axes[0], datasets, strict=True):
            for method in ("CE (no LiNC)", "LiNC"):
                pts = sorted(
                    (a["noise"], statistics.fmean(a["accuracy"]))
                    for a in acc
                    if a["dataset"] == d and a["method"] == method
                )
                ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=method)
            ax.set_title(d)
            ax.set_xlabel("injected uniform noise (%)")
            ax.set_ylabel("test accuracy")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "test_accuracy.png", dpi=110)
        plt.close(fig)
        made.append("test_accuracy.png")
    return made


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"


def write_atomic(path: Path, text: str) -> None:
    from noisescore.atomic import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


def _detectors_section(out: Path) -> str:
    """The detector section that bench/detectors_table.py wrote (kept across reruns)."""
    path = out / "detectors_section.md"
    if path.exists():
        return path.read_text().rstrip("\n")
    return "<!-- detectors:begin -->\n(run bench/detectors_table.py)\n<!-- detectors:end -->"


def render(
    cache: dict[str, dict[str, Any]],
    runs: list[Run],
    out: Path,
    results_md: Path,
    command: str,
    cl_rows: list[dict[str, Any]] | None = None,
) -> None:
    all_rows = [cache[r.key] for r in runs if r.key in cache]
    rows = [r for r in all_rows if r["run"]["lr"] == MAIN_LR]
    det = [r for r in rows if r["run"]["part"] == "detection"]
    accr = [r for r in rows if r["run"]["part"] == "accuracy"]
    t1, t1_rows = table1(det)
    t2, t2_rows = table2(accr) if accr else ("(not run)", [])
    made = plots(det, t2_rows, out)
    write_atomic(out / "summary.json", json.dumps({"table1": t1_rows, "table2": t2_rows}, indent=1))
    import torch

    template = (ROOT / "bench" / "RESULTS.template.md").read_text()
    text = template.format(
        command=command,
        commit=git_commit(),
        torch=torch.__version__,
        n_runs=len(all_rows),
        n_planned=len(runs),
        total_minutes=sum(r["seconds"] for r in all_rows) / 60,
        table1=t1,
        table2=t2,
        labels=label_table(accr),
        lr_table=lr_table(all_rows),
        cl_table=cl_table(cl_rows or []),
        paper_e2=PAPER_TABLE1["epoch 2"],
        paper_e10=PAPER_TABLE1["epoch 10"],
        plots="\n".join(f"![{m}](results/{m})" for m in made),
        detectors=_detectors_section(out),
    )
    write_atomic(results_md, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("NOISESCORE_DATA_DIR", str(ROOT.parent / "shared" / "data")),
    )
    parser.add_argument("--jobs", type=int, default=2, help="parallel single-thread workers")
    parser.add_argument("--quick", action="store_true", help="tiny plan for a smoke test")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results"))
    parser.add_argument("--results-md", default=str(ROOT / "docs" / "RESULTS.md"))
    parser.add_argument("--only", choices=["detection", "accuracy", "reference"], default=None)
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite RESULTS.md from the cache, run nothing"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / ("runs_quick.jsonl" if args.quick else "runs.jsonl")
    cache = load_cache(cache_path)
    runs = plan(args.quick)
    todo = [r for r in runs if r.key not in cache and args.only in (None, r.part)]
    cl_path = out / ("reference_cl_quick.jsonl" if args.quick else "reference_cl.jsonl")
    cl_cache = load_cache(cl_path)
    cl_todo = (
        []
        if args.only not in (None, "reference")
        else [
            (noise, seed)
            for noise in CL_NOISES
            for seed in ((0,) if args.quick else (0, 1, 2))
            if cl_key(noise, seed) not in cl_cache
        ]
    )
    if args.render_only:
        todo, cl_todo = [], []
    try:
        import cleanlab  # noqa: F401
    except ImportError:
        print("cleanlab not installed: skipping the confident-learning reference", flush=True)
        cl_todo = []
    print(
        f"{len(runs)} runs planned, {len(todo)} to do; {len(cl_todo)} CL references to do",
        flush=True,
    )
    shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--render-only"]
    command = " ".join(["python bench/paper_results.py", *shown])
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        cl_futures = [pool.submit(confident_learning, n, s, args.data_dir) for n, s in cl_todo]
        futures = {pool.submit(execute, r, args.data_dir): r for r in todo}
        for fut in as_completed([*cl_futures, *futures]):
            row = fut.result()
            if fut in futures:
                cache[row["key"]] = row
                path = cache_path
                r = futures[fut]
                what = f"{r.part} {r.dataset} {r.noise} seed={r.seed} grad={r.alpha_grad}"
            else:
                cl_cache[row["key"]] = row
                path, what = cl_path, f"confident learning {row['noise']} seed={row['seed']}"
            with path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(f"done {what} in {row['seconds']:.0f}s", flush=True)
            render(cache, runs, out, Path(args.results_md), command, list(cl_cache.values()))
    render(cache, runs, out, Path(args.results_md), command, list(cl_cache.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
