"""Active label cleaning on long-tailed BloodMNIST (Khanal et al., MICCAI 2024, Table 1 and
Figs. 2-3 in our setting); writes docs/RESULTS.md's active-cleaning section and
``docs/results/active_relabels.png``.

Per noise rate and seed:

- **selection** runs (phase 1 of ``noisescore active-clean``,
  :func:`noisescore.ml.active.select_clean`) for CE (small loss of a plain model),
  Co-teaching and Co-teaching VOG at a few mix ratios m: the clean set's per-class recall
  (of the samples of true class c whose label is right, the share kept) and precision;
- **rounds** runs for each sampler from the Co-teaching VOG (``ROUNDS_METHOD``) selection:
  a new model on the clean set, then 8 rounds of the oracle relabelling
  ``budget = ceil(pool / 16)`` suspects each (8 rounds = half of the noisy pool), fine-tuned
  after each; test macro-F1 at the best-validation epoch after every round;
- the reference **all clean**: every sample with its true label, as many epochs as the
  clean-set training and all rounds together.

Runs are cached one JSON line each in ``docs/results/active.jsonl`` (resumable).

    nice -n 15 .venv/bin/python bench/active_table.py --jobs 2         # the plan
    .venv/bin/python bench/active_table.py --render-only               # page only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- active:begin -->", "<!-- active:end -->"
ROUNDS_METHOD = "coteaching_vog:0.2"
SAMPLERS = ("random", "entropy", "coreset")


def base_settings(args: argparse.Namespace, rate: float, seed: int) -> dict[str, Any]:
    return {
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "imbalance": args.imbalance,
        "noise": f"symmetric:{rate}",
        "seed": seed,
        "epochs": args.epochs,
        "t_k": args.t_k,
        "vog_warmup": args.vog_warmup,
        "clean_epochs": args.clean_epochs,
        "fine_tune_epochs": args.fine_tune_epochs,
        "rounds": args.rounds,
        "expert": "oracle",
        "device": "cpu",
    }


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """In priority order: seed 0 of everything first."""
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        for rate in args.rates:
            runs.append({"kind": "reference", "rate": rate, "seed": seed})
            for method in args.methods:  # the rounds run records its own selection
                kind = "rounds" if method == ROUNDS_METHOD else "selection"
                runs.append({"kind": kind, "rate": rate, "seed": seed, "method": method})
    return runs


def key(run: dict[str, Any]) -> str:
    return json.dumps(run, sort_keys=True)


def _settings(args: argparse.Namespace, run: dict[str, Any]) -> Any:
    from noisescore.settings import ActiveSettings

    fields = base_settings(args, run["rate"], run["seed"])
    method = run.get("method", "ce")
    name, _, mix = method.partition(":")
    fields["lnl_method"] = name
    if mix:
        fields["mix_ratio"] = float(mix)
    return ActiveSettings(**fields)


def execute(args: argparse.Namespace, run: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from noisescore.ml import active as A

    settings = _settings(args, run)
    data, _ = A.prepare_data(settings)
    true, observed = data.train_true, data.train_labels
    n_classes = data.dataset.n_classes
    out: dict[str, Any] = {
        **run,
        "n_train": len(observed),
        "class_counts": np.bincount(true, minlength=n_classes).tolist(),
        "realised_rate": float((true != observed).mean()),
    }
    start = time.perf_counter()
    if run["kind"] == "reference":
        every = np.arange(len(observed))
        epochs = settings.clean_epochs + settings.rounds * settings.fine_tune_epochs
        for name, labels in (("all_clean", true),):
            learner = A.Learner(data, settings)
            phase = learner.fit(every, labels[every], epochs=epochs, round=0, n_relabelled=0)
            out[name] = {"test_macro_f1": phase.test_macro_f1, "val_macro_f1": phase.val_macro_f1}
    else:
        selection = A.select_clean(data, settings)
        out["selection"] = A.selection_metrics(selection.clean, observed, true, n_classes)
        out["selection"]["vog_bytes"] = selection.vog_bytes
        out["selection"]["seconds"] = selection.seconds
        if run["kind"] == "rounds":
            pool = int((~selection.clean).sum())
            budget = max(1, math.ceil(pool / 16))
            out["budget"] = budget
            out["samplers"] = {}
            for sampler in SAMPLERS:
                s = settings.model_copy(update={"sampler": sampler, "budget": budget})
                learner = A.Learner(data, s)
                labels = A.Labels.start(selection.clean, observed)
                idx = np.flatnonzero(labels.labelled)
                learner.fit(idx, labels.labels[idx], epochs=s.clean_epochs, round=0, n_relabelled=0)
                oracle = A.Oracle(data)
                for r in range(1, s.rounds + 1):
                    rows, _ = A.rank_suspects(learner, labels, s, r)
                    labels.answer(r, oracle.answer([row["index"] for row in rows]))
                    idx = np.flatnonzero(labels.labelled)
                    learner.fit(
                        idx,
                        labels.labels[idx],
                        epochs=s.fine_tune_epochs,
                        round=r,
                        n_relabelled=labels.n_relabelled,
                    )
                fixed = (labels.relabel_round > 0) & (observed != true)
                out["samplers"][sampler] = {
                    "phases": [
                        {k: p.as_dict()[k] for k in ("round", "n_relabelled", "test_macro_f1")}
                        for p in learner.phases
                    ],
                    "n_noisy_fixed": int(fixed.sum()),
                }
    out["seconds"] = time.perf_counter() - start
    return out


# ----------------------------------------------------------------------------- render


def _ms(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def render(records: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines: list[str] = []
    rates = sorted({r["rate"] for r in records})
    seeds = sorted({r["seed"] for r in records})
    counts = next((r["class_counts"] for r in records), [])
    lines += [
        f"Long-tailed BloodMNIST (`--imbalance {args.imbalance:g}`: {sum(counts)} train samples, "
        f"per class {counts}), `symmetric` noise on train (val and test untouched), seeds "
        f"{', '.join(map(str, seeds))}, CPU. Schedule: selection {args.epochs} epochs "
        f"(forget rate = noise rate, reached at epoch {args.t_k}; VOG from epoch "
        f"{args.vog_warmup + 1}, window 5, exact); clean-set training {args.clean_epochs} "
        f"epochs; {args.rounds} rounds of {args.fine_tune_epochs} fine-tuning epochs; "
        "macro-F1 on test at the best-validation epoch of each phase. Mean ± std over seeds.",
        "",
    ]
    sel = [r for r in records if "selection" in r]
    methods = [m for m in args.methods if any(r["method"] == m for r in sel)]
    for rate in rates:
        lines += [
            f"**Clean-set recall per class, symmetric {rate}** (of the samples of class c "
            "whose label is right, the share kept as clean; classes from largest to "
            "smallest):",
            "",
            "| method | "
            + " | ".join(f"c{c}" for c in range(len(counts)))
            + " | worst | precision | kept |",
            "|---|" + "---:|" * (len(counts) + 3),
        ]
        for m in methods:
            rs = [r["selection"] for r in sel if r["rate"] == rate and r["method"] == m]
            if not rs:
                continue
            cells = [_ms([x["recall_by_class"][c] for x in rs]) for c in range(len(counts))]
            lines.append(
                f"| {m} ({len(rs)} seeds) | "
                + " | ".join(cells)
                + f" | {_ms([x['worst_class_recall'] for x in rs])}"
                + f" | {_ms([x['precision'] for x in rs])}"
                + f" | {_ms([float(x['n_clean']) for x in rs], digits=0)} |"
            )
        lines.append("")
    lines += [
        "**Macro-F1 on test vs relabelled samples** (oracle answers; `budget` = pool/16 per "
        "round, so round 8 = half of the noisy pool):",
        "",
        "| noise | reference / sampler | round 0 | round 2 | round 4 | round 6 | round 8 "
        "| relabelled at round 8 | first round ≥ all-clean − 0.02 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for rate in rates:
        refs = [r for r in records if r["kind"] == "reference" and r["rate"] == rate]
        clean = [r["all_clean"]["test_macro_f1"] for r in refs]
        lines.append(
            f"| {rate} | all clean (true labels, {len(clean)} seeds) | {_ms(clean)} | | | | | | |"
        )
        target = statistics.fmean(clean) - 0.02 if clean else None
        rounds = [r for r in records if r["kind"] == "rounds" and r["rate"] == rate]
        for sampler in SAMPLERS:
            per_seed = [
                r["samplers"][sampler]["phases"] for r in rounds if sampler in r["samplers"]
            ]
            if not per_seed:
                continue
            cells = []
            for k in (0, 2, 4, 6, 8):
                cells.append(_ms([p[k]["test_macro_f1"] for p in per_seed if len(p) > k]))
            n_rel = _ms([float(p[-1]["n_relabelled"]) for p in per_seed], digits=0)
            mean_curve = [
                statistics.fmean(p[k]["test_macro_f1"] for p in per_seed)
                for k in range(min(len(p) for p in per_seed))
            ]
            reached = next(
                (k for k, v in enumerate(mean_curve) if target is not None and v >= target), None
            )
            where = "never" if reached is None else f"round {reached}"
            if reached is not None:
                rel = statistics.fmean(p[reached]["n_relabelled"] for p in per_seed)
                pool = statistics.fmean(r["selection"]["n_noisy_pool"] for r in rounds)
                where += f" ({rel:.0f} relabelled = {rel / pool:.0%} of the pool)"
            lines.append(
                f"| {rate} | {ROUNDS_METHOD} + {sampler} ({len(per_seed)} seeds) | "
                + " | ".join(cells)
                + f" | {n_rel} | {where} |"
            )
    lines.append("")
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({r["rate"] for r in records if r["kind"] == "rounds"})
    if not rates:
        return
    fig, axes = plt.subplots(1, len(rates), figsize=(5.2 * len(rates), 3.6), squeeze=False)
    for ax, rate in zip(axes[0], rates, strict=True):
        rounds = [r for r in records if r["kind"] == "rounds" and r["rate"] == rate]
        for sampler in SAMPLERS:
            curves = [r["samplers"][sampler]["phases"] for r in rounds if sampler in r["samplers"]]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            x = [statistics.fmean(c[k]["n_relabelled"] for c in curves) for k in range(n)]
            y = [statistics.fmean(c[k]["test_macro_f1"] for c in curves) for k in range(n)]
            ax.plot(x, y, marker="o", markersize=3, label=sampler)
        refs = [r for r in records if r["kind"] == "reference" and r["rate"] == rate]
        if refs:
            clean = statistics.fmean(r["all_clean"]["test_macro_f1"] for r in refs)
            ax.axhline(clean, color="black", linestyle="--", linewidth=1, label="all clean")
            ax.axhline(clean - 0.02, color="grey", linestyle=":", linewidth=1, label="− 0.02")
        ax.set_title(f"symmetric {rate}, {ROUNDS_METHOD}")
        ax.set_xlabel("samples relabelled (oracle)")
        ax.set_ylabel("test macro-F1")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_section(section: str, results: Path) -> None:
    page = ROOT / "docs" / "RESULTS.md"
    text = page.read_text()
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    page.write_text(text)
    (results / "active_section.md").write_text(section + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="bloodmnist")
    p.add_argument("--data-dir", default=os.environ.get("NOISESCORE_DATA_DIR"))
    p.add_argument("--imbalance", type=float, default=100.0)
    p.add_argument("--rates", type=float, nargs="+", default=[0.4, 0.6])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--methods",
        nargs="+",
        default=["ce", "coteaching", "coteaching_vog:0.2", "coteaching_vog:1.0"],
    )
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--t-k", type=int, default=5)
    p.add_argument("--vog-warmup", type=int, default=5)
    p.add_argument("--clean-epochs", type=int, default=15)
    p.add_argument("--fine-tune-epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--no-page", action="store_true", help="do not touch docs/RESULTS.md")
    args = p.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    cache = args.results / "active.jsonl"
    records = (
        [json.loads(line) for line in cache.read_text().splitlines()] if cache.exists() else []
    )
    done = {key({k: r[k] for k in ("kind", "rate", "seed", "method") if k in r}) for r in records}
    todo = [run for run in plan(args) if key(run) not in done]
    if not args.render_only and todo:
        print(f"{len(todo)} runs to do ({len(done)} cached)", file=sys.stderr)
        with ProcessPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(execute, args, run): run for run in todo}
            for future in as_completed(futures):
                record = future.result()
                records.append(record)
                with cache.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                print(f"done {futures[future]} in {record['seconds']:.0f} s", file=sys.stderr)
    wanted = {key(run) for run in plan(args)}
    records = [
        r
        for r in records
        if key({k: r[k] for k in ("kind", "rate", "seed", "method") if k in r}) in wanted
    ]
    section = render(records, args)
    plot(records, args.results / "active_relabels.png")
    if not args.no_page:
        write_section(section, args.results)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
