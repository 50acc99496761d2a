"""The Prefect flow ``lnl-benchmark``: learning-with-noisy-labels methods x datasets x
noise settings x seeds, one task run per cell, results in the store.

    check parameters -> load-datasets (and check them) -> finished cells read back -> run-cell (each
    missing cell, ``concurrency`` at a time) -> aggregate (results.csv, table, plots,
    BENCHMARK.md)

Layout of the benchmark's folder ``benchmarks/<bench_id>/`` in the store:

- ``bench.json``: the schedule and the grid of the first run. A rerun with the same id
  must have the same schedule (epochs, lr, train_size, ...): it resumes, and may extend
  the grid (more methods, datasets, noise settings or seeds).
- ``cells/<dataset>/<noise>/<method>/seed<k>.json``: one record per finished cell, written
  by the cell's task as it finishes (atomically). A rerun reads these back instead of
  training again; that is what makes the benchmark resumable after a crash or a failure.
- ``failures.json``, ``benchmark/results.csv``, ``benchmark/table.md``,
  ``benchmark/cells.jsonl``, ``benchmark/*.png``, ``BENCHMARK.md`` and ``summary.json``
  (written last): the aggregate of the cells of this run's grid.

A cell that fails (diverges, bad data) fails alone: its error is logged and listed, the
other cells go on, the aggregate is written without it, and the flow run ends *Failed*
naming the failed cells, so that a retry (same id) runs only those.

Concurrency: ``settings.concurrency`` cells train at once in this process (threads;
torch's intra-op threads are split between them). Across flow runs, give the task tag
``noisescore-bench-cell`` a Prefect concurrency limit
(``prefect concurrency-limit create noisescore-bench-cell 4``), e.g. one per GPU of the
pool.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from typing import Any, cast

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from noisescore import __version__
from noisescore.flows.clean_labels import (
    InvalidParameters,
    announce_store,
    check_parameters,
    compute_task,
    default_job_id,
    save,
    storage_task,
)
from noisescore.jobs import JobStore
from noisescore.ml import bench_report as report
from noisescore.ml.benchmark import Cell, check_schedule, grid, run_cell
from noisescore.ml.data import Dataset
from noisescore.ml.outputs import json_bytes
from noisescore.settings import REAL_NOISE, BenchSettings, StoreSettings
from noisescore.storage import ArtifactNotFound, open_store

SPEC = "bench.json"
#: Where benchmarks live in the store (not ``jobs/``: a benchmark is not a cleaning job).
BENCH_ROOT = "benchmarks/"
CELL_TAG = "noisescore-bench-cell"
REPORT_DIR = "benchmark"
#: What ``noisescore bench --report-dir`` copies out of the store (relative paths kept).
REPORT_FILES = (
    "BENCHMARK.md",
    f"{REPORT_DIR}/results.csv",
    f"{REPORT_DIR}/table.md",
    f"{REPORT_DIR}/cells.jsonl",
    f"{REPORT_DIR}/accuracy_vs_noise.png",
    f"{REPORT_DIR}/rank_heatmap.png",
)
PLOTS = {
    "accuracy against noise rate": f"{REPORT_DIR}/accuracy_vs_noise.png",
    "rank heat-map": f"{REPORT_DIR}/rank_heatmap.png",
}


def cell_path(cell: Cell) -> str:
    return f"cells/{cell.key}.json"


def fingerprint(settings: BenchSettings, cell: Cell) -> str:
    """What a cell's result depends on: the schedule and the cell."""
    text = json.dumps({"schedule": settings.schedule(), "cell": cell.as_dict()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- tasks


@storage_task("check-spec")
def check_spec(job: JobStore, settings: BenchSettings) -> None:
    """Store ``bench.json`` on the first run; on a rerun, refuse another schedule."""
    try:
        stored = json.loads(job.get(SPEC, verify=False))
    except ArtifactNotFound:
        job.put(
            SPEC,
            json_bytes(
                {
                    "bench_id": job.job_id,
                    "noisescore_version": __version__,
                    "schedule": settings.schedule(),
                    "grid": settings.model_dump(mode="json", include=_GRID),
                }
            ),
        )
        return
    if stored.get("schedule") != settings.schedule():
        changed = {
            k: (stored.get("schedule", {}).get(k), v)
            for k, v in settings.schedule().items()
            if stored.get("schedule", {}).get(k) != v
        }
        shown = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise InvalidParameters(
            f"benchmark {job.job_id} was run with another schedule ({shown}); its cells would "
            f"not compare: pass a new --bench-id, or the stored schedule"
        )


_GRID = {"methods", "datasets", "noise", "seeds"}


@compute_task("load-dataset")
def load_dataset(name: str, settings: BenchSettings) -> Dataset:
    from noisescore.uris import load_dataset_uri

    dataset = load_dataset_uri(name, data_dir=settings.data_dir)
    get_run_logger().info(
        "dataset %s: %d train, %s val, %s test, %d classes",
        name,
        len(dataset.train),
        len(dataset.val) if dataset.val is not None else "no",
        len(dataset.test) if dataset.test is not None else "no",
        dataset.n_classes,
    )
    return dataset


@storage_task("read-finished-cells")
def finished_cells(
    job: JobStore, cells: list[Cell], settings: BenchSettings
) -> dict[str, dict[str, Any]]:
    """Records of the cells already stored with this schedule (others are run again)."""
    done: dict[str, dict[str, Any]] = {}
    logger = get_run_logger()
    for cell in cells:
        try:
            record = json.loads(job.get(cell_path(cell), verify=False))
        except ArtifactNotFound:
            continue
        if record.get("fingerprint") != fingerprint(settings, cell):
            logger.warning("cell %s was stored with other settings: it runs again", cell.key)
            continue
        done[cell.key] = record
    return done


def _artifact_key(text: str) -> str:
    """A Prefect artifact key (lower-case letters, digits and dashes) made of ``text``."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100]


@task(
    name="run-cell",
    tags=[CELL_TAG],
    cache_policy=NO_CACHE,
    task_run_name="{cell.method} {cell.dataset} {cell.noise} seed {cell.seed}",
)
def train_cell(
    job: JobStore, cell: Cell, dataset: Dataset, settings: BenchSettings
) -> dict[str, Any]:
    """Train and score one cell; store its record (then it counts as finished)."""
    record = run_cell(cell, dataset, settings)
    record["fingerprint"] = fingerprint(settings, cell)
    job.put(cell_path(cell), json_bytes(record))
    scalars = {k: record[k] for k in report.CSV_COLUMNS if k in record}
    create_table_artifact(
        key=_artifact_key(f"cell-{cell.key}"),
        table=[scalars],
        description=f"benchmark {job.job_id}: {cell.key}",
    )
    get_run_logger().info(
        "%s: last-%d test accuracy %.4f, best-val test accuracy %s, %.0f samples/s, %.0f s",
        cell.key,
        settings.last_k,
        record["test_acc_last_k"],
        "-" if record["test_acc_best_val"] is None else f"{record['test_acc_best_val']:.4f}",
        record["samples_per_second"] or 0.0,
        record["wall_seconds"],
    )
    return record


@compute_task("aggregate")
def aggregate(
    job: JobStore,
    settings: BenchSettings,
    records: list[dict[str, Any]],
    failures: list[dict[str, Any]],
    device: str,
) -> dict[str, Any]:
    """Write the table, CSV, plots and BENCHMARK.md (store and Prefect artifacts)."""
    methods = list(settings.methods)
    files: dict[str, bytes] = {
        f"{REPORT_DIR}/results.csv": report.results_csv(records),
        f"{REPORT_DIR}/table.md": (report.results_table(records, methods) + "\n").encode(),
        f"{REPORT_DIR}/cells.jsonl": "".join(
            json.dumps(r, sort_keys=True) + "\n" for r in records
        ).encode(),
        "failures.json": json_bytes(failures),
    }
    if records:
        files[PLOTS["accuracy against noise rate"]] = report.accuracy_vs_noise_png(records, methods)
        files[PLOTS["rank heat-map"]] = report.rank_heatmap_png(records, methods)
    document = report.benchmark_markdown(
        records,
        methods,
        schedule=settings.schedule(),
        command=bench_command(settings, job.job_id),
        device=device,
        failures=failures,
        plots={k: v for k, v in PLOTS.items() if v in files},
    )
    files["BENCHMARK.md"] = document.encode()
    for name, data in files.items():
        save(job, name, data)
    images = "\n\n".join(
        f"![{caption}](data:image/png;base64,{base64.b64encode(files[path]).decode()})"
        for caption, path in PLOTS.items()
        if path in files
    )
    create_markdown_artifact(
        key=_artifact_key(f"bench-{job.job_id}"),
        markdown=f"## Benchmark {job.job_id}\n\n{report.results_table(records, methods)}\n\n"
        f"{images}",
        description=f"lnl-benchmark {job.job_id}: {len(records)} cells, {len(failures)} failed",
    )
    summary = {
        "bench_id": job.job_id,
        "url": job.url(),
        "cells": len(records) + len(failures),
        "finished": len(records),
        "failed": [f["key"] for f in failures],
        "report": job.url("BENCHMARK.md"),
    }
    save(job, "summary.json", json_bytes(summary))
    return summary


def check_datasets(datasets: dict[str, Dataset], settings: BenchSettings) -> None:
    """What needs the data to check, before any cell trains: a test split in every
    dataset, and reference labels wherever the grid asks for ``real`` noise."""
    for name, dataset in datasets.items():
        if dataset.test is None:
            raise InvalidParameters(
                f"dataset {name!r} has no test split: the benchmark scores on test (give the "
                f"manifest a split column with test rows)"
            )
        if REAL_NOISE in settings.noise and dataset.train.true_labels is None:
            raise InvalidParameters(
                f"noise {REAL_NOISE!r} needs reference labels, and dataset {name!r} has none: "
                f"use a CSV manifest with a true_label column, or leave {REAL_NOISE!r} out"
            )


def bench_command(settings: BenchSettings, bench_id: str) -> str:
    """The ``noisescore bench`` command line that reproduces this benchmark."""
    fields = settings.model_dump(mode="json", exclude_defaults=True)
    parts = ["noisescore bench"]
    for k, v in fields.items():
        if k in ("data_dir", "device", "concurrency"):
            continue
        value = ",".join(map(str, v)) if isinstance(v, list) else v
        parts.append(f"--{k.replace('_', '-')} {value}" if not isinstance(v, bool) else f"--{k}")
    parts.append(f"--bench-id {bench_id}")
    return " ".join(parts)


def _device_text(settings: BenchSettings) -> str:
    from noisescore.ml.train import resolve_device

    device = resolve_device(settings.device)
    cells = f"{settings.concurrency} cell{'s' if settings.concurrency != 1 else ''} at a time"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{name} (CUDA; {cells}), torch {torch.__version__}"
    threads = torch.get_num_threads()
    each = f"{threads} torch thread{'s' if threads != 1 else ''} each"
    return f"CPU ({os.cpu_count()} cores; {cells}, {each}), torch {torch.__version__}"


# ----------------------------------------------------------------------------- the flow


@flow(name="lnl-benchmark", log_prints=True, validate_parameters=False)
def lnl_benchmark(
    settings: BenchSettings | None = None,
    bench_id: str | None = None,
) -> dict[str, Any]:
    """Run the benchmark grid of ``settings``; store every cell and the aggregate.

    Parameters
    ----------
    settings : BenchSettings
        The grid and the schedule (``noisescore bench``'s flags, ``NOISESCORE_BENCH_*``).
    bench_id : str, optional
        Folder ``benchmarks/<bench_id>/`` of the store; default this flow run's id. Reuse an id
        to resume (finished cells are read back) or to extend the grid.

    Returns
    -------
    dict
        The summary (also ``summary.json``). The run ends *Failed* when a cell failed,
        after the aggregate of the others is stored.
    """
    try:
        settings, bench_id = check_parameters(settings, bench_id, BenchSettings)
        cells = grid(settings)  # refuses two datasets whose cells would share a key
        check_schedule(settings)  # every method fits its phases in the epochs
    except ValueError as err:  # InvalidParameters included
        get_run_logger().error("invalid parameters: %s", err)
        return cast(dict[str, Any], Failed(message=f"invalid parameters: {err}"))
    logger = get_run_logger()
    job = JobStore(open_store(StoreSettings()), bench_id or default_job_id(), root=BENCH_ROOT)
    announce_store(job, StoreSettings())
    try:
        check_spec(job, settings)
    except InvalidParameters as err:
        logger.error("invalid parameters: %s", err)
        return cast(dict[str, Any], Failed(message=f"invalid parameters: {err}"))
    # Every dataset loads before any cell trains: a missing one fails the run up front.
    datasets = {name: load_dataset(name, settings) for name in settings.datasets}
    try:
        check_datasets(datasets, settings)
    except InvalidParameters as err:
        logger.error("invalid parameters: %s", err)
        return cast(dict[str, Any], Failed(message=f"invalid parameters: {err}"))
    done = finished_cells(job, cells, settings)
    todo = [c for c in cells if c.key not in done]
    logger.info(
        "%d cells: %d finished before (read back), %d to run, %d at a time",
        len(cells),
        len(done),
        len(todo),
        settings.concurrency,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.concurrency))
    device = _device_text(settings)
    failures: list[dict[str, Any]] = []
    try:
        with ThreadPoolTaskRunner[Any](max_workers=settings.concurrency) as runner:
            futures = [
                (
                    c,
                    runner.submit(
                        train_cell,
                        {
                            "job": job,
                            "cell": c,
                            "dataset": datasets[c.dataset],
                            "settings": settings,
                        },
                    ),
                )
                for c in todo
            ]
            for cell, future in futures:
                future.wait()
                state = future.state
                if state.is_completed():
                    done[cell.key] = future.result()
                    continue
                try:
                    future.result(raise_on_failure=True)
                    error = f"ended {state.type.value}"
                except BaseException as err:  # the cell's own error, reported, not raised
                    error = f"{type(err).__name__}: {err}"
                logger.error("cell %s failed: %s", cell.key, error)
                failures.append({**cell.as_dict(), "key": cell.key, "error": error})
    finally:
        torch.set_num_threads(threads)
    records = [done[c.key] for c in cells if c.key in done]
    summary = aggregate(job, settings, records, failures, device)
    if failures:
        message = (
            f"{len(failures)} of {len(cells)} cells failed "
            f"({', '.join(f['key'] for f in failures[:5])}{', ...' if len(failures) > 5 else ''});"
            f" the others are in {job.url('BENCHMARK.md')}; rerun with --bench-id {job.job_id} "
            f"to retry only those"
        )
        return cast(dict[str, Any], Failed(message=message, data=summary))
    return summary
