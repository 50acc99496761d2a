"""The benchmark's outputs from its cell records: ``results.csv``, the results table
(methods x settings, mean +- std over seeds), ranks as LNMBench ranks, the plots, and
``BENCHMARK.md``.

Every function takes the list of cell records that :func:`noisescore.ml.benchmark.run_cell`
returns (plain dicts, as stored); nothing here trains or reads the store. A cell that is
missing (failed, or not run) leaves its table entry as ``—`` and is listed.

Ranking (LNMBench's): in each setting (dataset x noise) the methods are ranked by the
mean over seeds of the last-5-epoch test accuracy (1 = best, ties share the mean rank);
a method's rank over a group of settings is the mean of its ranks there.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "CSV_COLUMNS",
    "LNMBENCH_BEST",
    "accuracy_vs_noise_png",
    "benchmark_markdown",
    "gpu_estimate",
    "mean_ranks",
    "rank_heatmap_png",
    "results_csv",
    "results_table",
    "summarise",
]

METRIC = "test_acc_last_k"
CSV_COLUMNS = (
    "method",
    "dataset",
    "noise",
    "seed",
    "n_train",
    "n_val",
    "n_test",
    "noise_rate",
    "realised_noise_rate",
    "epochs",
    "test_acc_last_k",
    "test_acc_best_val",
    "best_val_epoch",
    "test_acc_final",
    "macro_f1",
    "balanced_accuracy",
    "wall_seconds",
    "train_seconds",
    "samples_per_second",
)
#: LNMBench's findings (Table 3 of the paper, as its abstract and discussion state them):
#: the best methods per noise pattern. Our ranking is compared with these.
LNMBENCH_BEST: dict[str, tuple[str, ...]] = {
    "overall": ("coteaching", "disc"),
    "symmetric": ("coteaching_plus", "dividemix"),
    "instance": ("coteaching", "codis"),
    "real": ("sce", "cdr"),
}
#: Samples/s of plain CE with ``noisescore_cnn`` (28 px, batch 128) through this Trainer on
#: one NVIDIA H100 (torch 2.11, bf16, batch 128), the low end of the 17-21 k measured with
#: ``bench/bench_train.py`` by an earlier session (issue 13; the staging notes of the GPU
#: machine list it). Used only for the labelled GPU estimate.
H100_CE_SAMPLES_PER_SECOND = 17_000.0


def results_csv(records: Iterable[dict[str, Any]]) -> bytes:
    """One row per cell, :data:`CSV_COLUMNS`."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    return out.getvalue().encode()


def summarise(
    records: Iterable[dict[str, Any]], metric: str = METRIC
) -> dict[tuple[str, str], tuple[float, float, int]]:
    """``(method, setting) -> (mean, std, n seeds)`` of ``metric`` (std with ``ddof=1``;
    0 for one seed). Records whose metric is ``None`` are left out."""
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in records:
        if r.get(metric) is not None:
            values[(r["method"], r["setting"])].append(float(r[metric]))
    return {
        key: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
        for key, v in values.items()
    }


def _settings_order(records: Sequence[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        seen.setdefault(r["setting"], None)
    return list(seen)


def _kind(setting: str) -> str:
    noise = setting.split(" ", 1)[1]
    return noise.split(":", 1)[0]


def setting_ranks(
    summary: dict[tuple[str, str], tuple[float, float, int]],
    methods: Sequence[str],
    settings: Sequence[str],
) -> dict[str, dict[str, float]]:
    """``setting -> method -> rank`` (1 = best mean; ties share the mean rank); methods
    without a result in a setting are not ranked there."""
    out: dict[str, dict[str, float]] = {}
    for s in settings:
        scored = [(summary[(m, s)][0], m) for m in methods if (m, s) in summary]
        ranks: dict[str, float] = {}
        for value, m in scored:
            better = sum(1 for v, _ in scored if v > value)
            ties = sum(1 for v, _ in scored if v == value)
            ranks[m] = better + (ties + 1) / 2
        out[s] = ranks
    return out


def mean_ranks(
    ranks: dict[str, dict[str, float]], methods: Sequence[str], settings: Sequence[str]
) -> dict[str, float | None]:
    """Each method's mean rank over ``settings`` (``None`` if ranked in none)."""
    out: dict[str, float | None] = {}
    for m in methods:
        r = [ranks[s][m] for s in settings if m in ranks.get(s, {})]
        out[m] = float(np.mean(r)) if r else None
    return out


def results_table(records: Sequence[dict[str, Any]], methods: Sequence[str]) -> str:
    """Markdown: rows methods, columns settings, ``mean ± std`` of the last-k test accuracy
    in percent (best of each column in bold), then the mean rank."""
    settings = _settings_order(records)
    summary = summarise(records)
    ranks = setting_ranks(summary, methods, settings)
    overall = mean_ranks(ranks, methods, settings)
    head = "| method | " + " | ".join(settings) + " | mean rank |"
    rule = "|---|" + "---:|" * len(settings) + "---:|"
    best = {
        s: max((summary[(m, s)][0] for m in methods if (m, s) in summary), default=None)
        for s in settings
    }
    lines = [head, rule]
    for m in methods:
        cells = []
        for s in settings:
            if (m, s) not in summary:
                cells.append("—")
                continue
            mean, std, n = summary[(m, s)]
            text = f"{100 * mean:.1f} ± {100 * std:.1f}" + ("" if n > 1 else " (1 seed)")
            cells.append(f"**{text}**" if mean == best[s] else text)
        rank = overall[m]
        lines.append(
            f"| {m} | " + " | ".join(cells) + f" | {'—' if rank is None else f'{rank:.2f}'} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def _figure_png(fig: Any, *, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> bytes:
    """The figure as PNG bytes, laid out within ``rect`` (figure fractions); closes it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout(rect=rect)
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_vs_noise_png(records: Sequence[dict[str, Any]], methods: Sequence[str]) -> bytes:
    """One panel per dataset and noise kind: mean last-k test accuracy (± std over seeds)
    against the noise rate, one line per method."""
    plt = _pyplot()
    summary = summarise(records)
    panels: dict[tuple[str, str], set[float]] = defaultdict(set)
    for r in records:
        panels[(r["setting"].split(" ", 1)[0], _kind(r["setting"]))].add(float(r["noise_rate"]))
    keys = sorted(panels)
    cols = min(3, max(len(keys), 1))
    rows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), dpi=100, squeeze=False)
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(methods), 1)))
    for ax, (dataset, kind) in zip(axes.flat, keys, strict=False):
        for color, m in zip(colors, methods, strict=False):
            points = sorted(
                (float(r["noise_rate"]), summary[(m, r["setting"])])
                for r in records
                if r["method"] == m
                and r["setting"].startswith(dataset + " ")
                and _kind(r["setting"]) == kind
                and (m, r["setting"]) in summary
            )
            unique = dict(points)
            if not unique:
                continue
            x = list(unique)
            y = [100 * unique[k][0] for k in x]
            e = [100 * unique[k][1] for k in x]
            ax.errorbar(x, y, yerr=e, marker="o", ms=3, lw=1.2, capsize=2, color=color, label=m)
        ax.set_title(f"{dataset}, {kind} noise", fontsize=10)
        ax.set_xlabel("noise rate")
        ax.set_ylabel("test accuracy, last epochs (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(7, max(len(labels), 1)), fontsize=8)
    return _figure_png(fig, rect=(0, 0.12, 1, 1))  # the legend below the panels


def rank_heatmap_png(records: Sequence[dict[str, Any]], methods: Sequence[str]) -> bytes:
    """Methods x settings, coloured by rank (1 = best), with the mean rank column."""
    plt = _pyplot()
    settings = _settings_order(records)
    ranks = setting_ranks(summarise(records), methods, settings)
    overall = mean_ranks(ranks, methods, settings)
    columns = [*settings, "mean"]
    grid = np.full((len(methods), len(columns)), np.nan)
    for i, m in enumerate(methods):
        for j, s in enumerate(settings):
            grid[i, j] = ranks[s].get(m, np.nan)
        grid[i, -1] = np.nan if overall[m] is None else overall[m]
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(columns), 0.9 + 0.38 * len(methods)), dpi=100)
    image = ax.imshow(grid, cmap="RdYlGn_r", aspect="auto", vmin=1, vmax=max(len(methods), 2))
    for i in range(len(methods)):
        for j in range(len(columns)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(columns)), [c.replace(" ", "\n") for c in columns], fontsize=7)
    ax.set_yticks(range(len(methods)), methods, fontsize=8)
    ax.set_title("rank by last-epochs test accuracy (1 = best)", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.03)
    return _figure_png(fig)


# ----------------------------------------------------------------------------- estimate


def gpu_estimate(
    records: Sequence[dict[str, Any]], methods: Sequence[str], *, epochs: int = 100
) -> dict[str, Any] | None:
    """Hours for this grid at ``epochs`` epochs on the full train sets on one H100.

    Each method's cost per training sample relative to plain CE is measured in this run
    (CE's samples/s over the method's, same machine and cells); the H100's CE throughput is
    :data:`H100_CE_SAMPLES_PER_SECOND`. ``None`` without a CE cell to compare with."""
    sps: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r.get("samples_per_second"):
            sps[r["method"]].append(float(r["samples_per_second"]))
    if not sps.get("ce"):
        return None
    ce = float(np.median(sps["ce"]))
    cost = {m: ce / float(np.median(v)) for m, v in sps.items()}
    cells: dict[tuple[str, str, str, int], int] = {}
    for r in records:
        cells[(r["method"], r["dataset"], r["noise"], r["seed"])] = int(
            r.get("n_train_full", r["n_train"])
        )
    seconds = 0.0
    for (m, *_), n in cells.items():
        seconds += n * epochs * cost.get(m, max(cost.values())) / H100_CE_SAMPLES_PER_SECOND
    return {
        "hours": seconds / 3600,
        "epochs": epochs,
        "cells": len(cells),
        "cost_vs_ce": {m: cost[m] for m in methods if m in cost},
        "h100_ce_samples_per_second": H100_CE_SAMPLES_PER_SECOND,
    }


# ----------------------------------------------------------------------------- the document


def _top(ranks: dict[str, float | None], k: int) -> list[str]:
    ranked = sorted((r, m) for m, r in ranks.items() if r is not None)
    return [m for _, m in ranked[:k]]


def _place(ranks: dict[str, float | None], method: str) -> int:
    """1 + the number of methods with a strictly better mean rank (ties share a place)."""
    mine = ranks[method]
    assert mine is not None
    return 1 + sum(1 for r in ranks.values() if r is not None and r < mine)


def benchmark_markdown(
    records: Sequence[dict[str, Any]],
    methods: Sequence[str],
    *,
    schedule: dict[str, Any],
    command: str,
    device: str,
    failures: Sequence[dict[str, Any]] = (),
    missing: Sequence[str] = (),
    plots: dict[str, str] | None = None,
) -> str:
    """``BENCHMARK.md``: setup, table, ranking against LNMBench's, where LiNC lands, the
    goal check, the GPU estimate and the failures. ``plots`` maps a caption to a relative
    image path."""
    settings = _settings_order(records)
    summary = summarise(records)
    ranks = setting_ranks(summary, methods, settings)
    groups = {"overall": settings}
    for kind in sorted({_kind(s) for s in settings}):
        groups[kind] = [s for s in settings if _kind(s) == kind]
    group_ranks = {g: mean_ranks(ranks, methods, ss) for g, ss in groups.items()}
    n_seeds = sorted({r["seed"] for r in records})
    lines = [
        "# Learning with noisy labels: the benchmark",
        "",
        "Generated by the `lnl-benchmark` flow (`noisescore bench`); every number below comes",
        "from the cell records in `benchmark/cells.jsonl` (one JSON line per cell, also in",
        "the store), and `benchmark/results.csv` has one row per cell.",
        "",
        "## Setup",
        "",
        f"- Command: `{command}`",
        f"- Device: {device}",
        f"- Methods: {', '.join(methods)}; seeds: {', '.join(map(str, n_seeds))}.",
        "- Schedule (every method, every cell): "
        + ", ".join(f"{k} {v}" for k, v in schedule.items())
        + ". Adam, no learning-rate decay; each method's epoch-length parameters are scaled "
        "from its paper's setting on a 100-epoch schedule (`EPOCH_PARAMS` in "
        "`ml/benchmark.py`); Co-teaching-family forget rates and CDR's clip rate come from "
        "the noise rate, as LNMBench passes them.",
        "- Score: LNMBench's, the mean test accuracy of the last "
        f"{schedule.get('last_k', 5)} epochs (clean test labels); also test accuracy at the "
        "best clean-validation epoch, macro-F1 and balanced accuracy of the final model "
        "(in `results.csv`).",
        "",
        "## Last-epochs test accuracy (%), mean ± std over seeds",
        "",
        results_table(records, methods),
        "",
    ]
    for caption, path in (plots or {}).items():
        lines += [f"![{caption}]({path})", ""]
    stds = [100 * std for (_, _), (_, std, n) in summary.items() if n > 1]
    if stds:
        lines += [
            f"Seed spread: the median standard deviation over seeds of a method's score in a "
            f"setting is {np.median(stds):.1f} points (largest {max(stds):.1f}); methods whose "
            "means differ by less than that are not told apart by this grid.",
            "",
        ]
    beyond = sorted(
        {
            r["setting"]
            for r in records
            if _kind(r["setting"]) == "symmetric"
            and r.get("n_classes")
            and float(r["noise_rate"]) >= (int(r["n_classes"]) - 1) / int(r["n_classes"])
        }
    )
    if beyond:
        lines += [
            "Beyond recovery: in "
            + ", ".join(beyond)
            + " the symmetric rate is at least (C − 1) / C, so a wrong class is at least as "
            "frequent as the true one in every class's labels; no method can recover the "
            "classes without a prior, and a low score there measures how fully a method "
            "learned the flipped labels.",
            "",
        ]
    collapsed = sorted(
        (r["method"], r["setting"], r["seed"])
        for r in records
        if r.get("balanced_accuracy") is not None
        and r.get("n_classes")
        and float(r["balanced_accuracy"]) <= 1 / int(r["n_classes"]) + 0.01
    )
    if collapsed:
        by_method: dict[str, list[str]] = defaultdict(list)
        for method, setting, seed in collapsed:
            by_method[method].append(f"{setting} s{seed}")
        total = Counter(r["method"] for r in records)
        lines += [
            "Collapsed cells: the final model's balanced accuracy is within 0.01 of 1 / C, "
            "i.e. it predicts one class for almost every test image and its accuracy is that "
            "class's share of the test set.",
            "",
            "| method | collapsed cells | where |",
            "|---|---:|---|",
            *(
                f"| {m} | {len(v)} of {total[m]} | {', '.join(v)} |"
                for m, v in sorted(by_method.items(), key=lambda kv: (-len(kv[1]), kv[0]))
            ),
            "",
        ]
    lines += [
        "Noise kinds, the methods and their deviations from LNMBench's code: "
        "[METHODS.md](METHODS.md).",
        "",
    ]
    lines += ["## Ranking, and LNMBench's", ""]
    lines += ["| group | our top 3 (mean rank) | LNMBench's best | their rank here |"]
    lines += ["|---|---|---|---|"]
    for group, g_ranks in group_ranks.items():
        ours = ", ".join(f"{m} ({g_ranks[m]:.2f})" for m in _top(g_ranks, 3))
        theirs = LNMBENCH_BEST.get(group, ())
        order = _top(g_ranks, len(methods))
        place = ", ".join(
            f"{m}: {_place(g_ranks, m)} of {len(order)}" if m in order else f"{m}: not run"
            for m in theirs
        )
        lines.append(f"| {group} | {ours} | {', '.join(theirs) or '—'} | {place or '—'} |")
    lines.append("")
    overall = _top(group_ranks["overall"], len(methods))
    if "linc" in overall:
        where = _place(group_ranks["overall"], "linc")
        lines += [
            f"**LiNC** ranks {where} of {len(overall)} overall (mean rank "
            f"{group_ranks['overall']['linc']:.2f}); "
            + "; ".join(
                f"{g} {_place(r, 'linc')} of {len(_top(r, len(methods)))}"
                for g, r in group_ranks.items()
                if g != "overall" and "linc" in _top(r, len(methods))
            )
            + ".",
            "",
        ]
    lines += ["## Goal: the best method ≥ plain CE + 5 points at 40 % symmetric noise", ""]
    goal_settings = [s for s in settings if s.endswith(" symmetric:0.4")]
    if not goal_settings or not any(("ce", s) in summary for s in goal_settings):
        lines += ["Not measured: the grid has no `symmetric:0.4` setting with `ce`.", ""]
    for s in goal_settings:
        if ("ce", s) not in summary:
            continue
        ce = summary[("ce", s)][0]
        best_m = max((m for m in methods if (m, s) in summary), key=lambda m: summary[(m, s)][0])
        gain = 100 * (summary[(best_m, s)][0] - ce)
        verdict = "met" if gain >= 5 else "missed"
        lines.append(
            f"- {s}: best {best_m} {100 * summary[(best_m, s)][0]:.1f} vs CE {100 * ce:.1f} "
            f"(+{gain:.1f} points): **{verdict}**."
        )
    lines.append("")
    estimate = gpu_estimate(records, methods)
    lines += ["## Time", ""]
    walls = [float(r["wall_seconds"]) for r in records]
    lines.append(
        f"This grid: {len(records)} cells, {sum(walls) / 3600:.2f} h of cell time "
        f"(median cell {np.median(walls):.0f} s) on {device}."
    )
    if estimate is not None:
        costs = ", ".join(f"{m} {c:.1f}x" for m, c in estimate["cost_vs_ce"].items())
        lines += [
            "",
            f"Estimate, not a measurement: the same grid at {estimate['epochs']} epochs on the "
            f"full train sets would take **{estimate['hours']:.2f} h** on one H100, from each "
            f"method's training cost relative to CE measured in this run ({costs}) and CE's "
            f"{estimate['h100_ce_samples_per_second']:.0f} samples/s through this Trainer on an "
            "H100 (measured earlier with `bench/bench_train.py`, batch 128, for issue 13); "
            "scoring passes and start-up are not included, and the cost ratios were measured "
            "on this machine's CPU at this run's batch size.",
            "",
            f"Goal, the whole grid on one GPU in under an hour at {estimate['epochs']} epochs: "
            + (
                "**met** by this estimate."
                if estimate["hours"] < 1
                else f"**missed** by this estimate ({estimate['hours']:.1f} h), one cell at a "
                "time. The small CNN leaves an H100 mostly idle between kernel launches "
                "(issue 13), so `--concurrency` several cells on one GPU should shorten it; "
                "by how much is not measured."
            ),
        ]
    lines.append("")
    if failures or missing:
        lines += ["## Cells without a result", ""]
        lines += [f"- `{f['key']}`: {f['error']}" for f in failures]
        lines += [f"- `{k}`: not run" for k in missing]
        lines.append("")
    return "\n".join(lines)
