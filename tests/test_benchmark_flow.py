"""The ``lnl-benchmark`` flow end to end (issue 12): a real Prefect API, a local store,
real BreastMNIST, tiny cells (64 training images, 2 epochs). What is asserted is read back
from the store, the flow's state and the API's task runs and logs."""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.logging.handlers import APILogHandler
from prefect.states import State

import noisescore.flows.lnl_benchmark as flow_module
from noisescore.flows.lnl_benchmark import lnl_benchmark
from noisescore.ml.benchmark import Cell, run_cell
from noisescore.ml.data import DataError
from noisescore.settings import BenchSettings

pytestmark = pytest.mark.usefixtures("prefect_api")

CE = "breastmnist/symmetric-0.4/ce/seed0"
CO = "breastmnist/symmetric-0.4/coteaching/seed0"
CE1, CO1 = CE.replace("seed0", "seed1"), CO.replace("seed0", "seed1")
AGGREGATE = [
    "failures.json",
    "benchmark/results.csv",
    "benchmark/table.md",
    "benchmark/cells.jsonl",
    "benchmark/accuracy_vs_noise.png",
    "benchmark/rank_heatmap.png",
    "BENCHMARK.md",
    "summary.json",
]


def _settings(data_dir: Path, **overrides: Any) -> BenchSettings:
    base: dict[str, Any] = dict(
        methods="ce,coteaching",
        datasets="breastmnist",
        noise="symmetric:0.4",
        seeds="0",
        epochs=2,
        train_size=64,
        eval_size=32,
        batch_size=32,
        device="cpu",
        data_dir=data_dir,
    )
    return BenchSettings(**{**base, **overrides})


def _use_store(monkeypatch: pytest.MonkeyPatch, store: Path) -> None:
    for key in ("S3_ENDPOINT", "S3_BUCKET", "S3_ACCESS_KEY", "S3_SECRET_KEY"):
        monkeypatch.delenv(f"NOISESCORE_{key}", raising=False)
    monkeypatch.setenv("NOISESCORE_STORE_DIR", str(store))


class CellRuns:
    """Stands in for ``run_cell`` in the flow: records which cells train, calls the real
    one, except for ``fail`` (raises) or for every cell when ``forbid``."""

    def __init__(self, *, fail: str | None = None, forbid: bool = False) -> None:
        self.fail, self.forbid = fail, forbid
        self.keys: list[str] = []

    def __call__(self, cell: Cell, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.keys.append(cell.key)
        if self.forbid:
            raise AssertionError(f"cell {cell.key} trained again")
        if cell.key == self.fail:
            raise RuntimeError(f"injected fault in {cell.key}")
        return run_cell(cell, *args, **kwargs)


def _run(monkeypatch: pytest.MonkeyPatch, runs: CellRuns, settings: Any, bench_id: str) -> State:
    monkeypatch.setattr(flow_module, "run_cell", runs)
    return lnl_benchmark(settings=settings, bench_id=bench_id, return_state=True)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file under ``folder``."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _api(prefect_api: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = httpx.post(f"{prefect_api}/{path}", json={"limit": 200, **body}, timeout=30)
    response.raise_for_status()
    return list(response.json())


def _task_runs(prefect_api: str, state: State) -> list[dict[str, Any]]:
    body = {"flow_runs": {"id": {"any_": [str(state.state_details.flow_run_id)]}}}
    return _api(prefect_api, "task_runs/filter", body)


def _cell_runs(prefect_api: str, state: State) -> list[dict[str, Any]]:
    return [r for r in _task_runs(prefect_api, state) if r["name"].startswith("ce ")
            or r["name"].startswith("coteaching ")]  # fmt: skip


def _logs(prefect_api: str, state: State) -> list[str]:
    APILogHandler().flush()  # the flow ran here: send its queued logs first
    body = {
        "logs": {"flow_run_id": {"any_": [str(state.state_details.flow_run_id)]}},
        "sort": "TIMESTAMP_ASC",
    }
    return [log["message"] for log in _api(prefect_api, "logs/filter", body)]


def _csv_keys(folder: Path) -> list[tuple[str, str]]:
    rows = csv.DictReader(io.StringIO((folder / "benchmark/results.csv").read_text()))
    return [(r["method"], r["seed"]) for r in rows]


@pytest.fixture(scope="module")
def first_run(
    tmp_path_factory: pytest.TempPathFactory, data_dir: Path, prefect_api: str
) -> Iterator[tuple[State, Path, CellRuns]]:
    """``bench-a``: ce and co-teaching on BreastMNIST symmetric 0.4, seed 0."""
    store = tmp_path_factory.mktemp("bench-store")
    runs = CellRuns()
    with pytest.MonkeyPatch.context() as mp:
        _use_store(mp, store)
        state = _run(mp, runs, _settings(data_dir), "bench-a")
    yield state, store / "benchmarks" / "bench-a", runs


def _copy(first_run: tuple[State, Path, CellRuns], tmp_path: Path) -> Path:
    """A copy of ``bench-a``'s store for a test that changes it (mtimes kept)."""
    store = tmp_path / "store"
    shutil.copytree(first_run[1].parents[1], store)
    return store


# ----------------------------------------------------------------------------- (a)


def test_a_run_stores_every_cell_and_the_aggregate(
    first_run: tuple[State, Path, CellRuns], prefect_api: str
) -> None:
    state, folder, runs = first_run
    assert state.is_completed(), state.message
    assert runs.keys == [CE, CO]
    summary = state.result()
    assert summary["bench_id"] == "bench-a" and summary["cells"] == summary["finished"] == 2
    assert summary["failed"] == []
    assert summary["url"] == folder.resolve().as_uri() + "/"
    assert json.loads((folder / "summary.json").read_text()) == summary

    for key in (CE, CO):
        record = json.loads((folder / "cells" / f"{key}.json").read_text())
        assert record["key"] == key and record["fingerprint"]
        assert (record["n_train"], record["n_val"], record["n_test"]) == (64, 32, 32)
        assert record["epochs"] == 2 and len(record["test_acc_by_epoch"]) == 2
        assert 0.0 <= record["test_acc_last_k"] <= 1.0
    co = json.loads((folder / "cells" / f"{CO}.json").read_text())
    assert co["params"] == {"t_k": 1, "forget_rate": 0.4}
    for name in AGGREGATE:
        assert (folder / name).is_file(), name
    assert not list(folder.rglob("*.tmp"))
    assert _csv_keys(folder) == [("ce", "0"), ("coteaching", "0")]
    assert json.loads((folder / "failures.json").read_text()) == []
    assert len((folder / "benchmark/cells.jsonl").read_text().splitlines()) == 2
    table = (folder / "benchmark/table.md").read_text()
    assert table.startswith("| method | breastmnist symmetric:0.4 | mean rank |")
    document = (folder / "BENCHMARK.md").read_text()
    assert table.strip() in document
    assert "- breastmnist symmetric:0.4: best " in document  # the goal's verdict
    assert "![rank heat-map](benchmark/rank_heatmap.png)" in document
    assert "`noisescore bench --methods ce,coteaching --datasets breastmnist" in document
    assert (folder / "benchmark/rank_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    spec = json.loads((folder / "bench.json").read_text())
    assert spec["schedule"]["epochs"] == 2 and spec["grid"]["seeds"] == [0]

    cells = _cell_runs(prefect_api, state)
    assert sorted(r["name"] for r in cells) == [
        "ce breastmnist symmetric:0.4 seed 0",
        "coteaching breastmnist symmetric:0.4 seed 0",
    ]
    assert {r["state"]["type"] for r in cells} == {"COMPLETED"}


# ----------------------------------------------------------------------------- (b)


def test_b_rerun_reads_the_cells_back(
    first_run: tuple[State, Path, CellRuns], tmp_path: Path, data_dir: Path,
    monkeypatch: pytest.MonkeyPatch, prefect_api: str,
) -> None:  # fmt: skip
    store = _copy(first_run, tmp_path)
    folder = store / "benchmarks" / "bench-a"
    before = _snapshot(folder / "cells")
    _use_store(monkeypatch, store)
    state = _run(monkeypatch, CellRuns(forbid=True), _settings(data_dir), "bench-a")
    assert state.is_completed(), state.message
    assert _snapshot(folder / "cells") == before
    assert state.result()["finished"] == 2
    assert "2 cells: 2 finished before (read back), 0 to run, 1 at a time" in _logs(
        prefect_api, state
    )
    assert _cell_runs(prefect_api, state) == []
    assert _csv_keys(folder) == [("ce", "0"), ("coteaching", "0")]


# ----------------------------------------------------------------------------- (c)


def test_c_extended_grid_runs_only_the_new_cells(
    first_run: tuple[State, Path, CellRuns], tmp_path: Path, data_dir: Path,
    monkeypatch: pytest.MonkeyPatch, prefect_api: str,
) -> None:  # fmt: skip
    store = _copy(first_run, tmp_path)
    folder = store / "benchmarks" / "bench-a"
    before = _snapshot(folder / "cells")
    _use_store(monkeypatch, store)
    runs = CellRuns()
    state = _run(monkeypatch, runs, _settings(data_dir, seeds="0,1"), "bench-a")
    assert state.is_completed(), state.message
    assert runs.keys == [CE1, CO1]
    after = _snapshot(folder / "cells")
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {f"{CE1}.json", f"{CO1}.json"}
    assert "4 cells: 2 finished before (read back), 2 to run, 1 at a time" in _logs(
        prefect_api, state
    )
    assert _csv_keys(folder) == [("ce", "0"), ("coteaching", "0"), ("ce", "1"), ("coteaching", "1")]
    assert "± " in (folder / "benchmark/table.md").read_text()
    assert state.result()["finished"] == 4


# ----------------------------------------------------------------------------- (d)


def test_d_a_failing_cell_fails_alone_and_a_rerun_runs_only_it(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, prefect_api: str
) -> None:
    _use_store(monkeypatch, tmp_path / "store")
    folder = tmp_path / "store" / "benchmarks" / "bench-d"
    faulty = CellRuns(fail=CO)
    state = _run(monkeypatch, faulty, _settings(data_dir), "bench-d")
    assert state.is_failed()
    assert faulty.keys == [CE, CO]
    assert state.message is not None
    assert state.message.startswith(f"1 of 2 cells failed ({CO}); the others are in ")
    assert "rerun with --bench-id bench-d to retry only those" in state.message
    assert (folder / "cells" / f"{CE}.json").is_file()
    assert not (folder / "cells" / f"{CO}.json").exists()
    failures = json.loads((folder / "failures.json").read_text())
    assert failures == [
        {
            "method": "coteaching",
            "dataset": "breastmnist",
            "noise": "symmetric:0.4",
            "seed": 0,
            "key": CO,
            "error": f"RuntimeError: injected fault in {CO}",
        }
    ]
    document = (folder / "BENCHMARK.md").read_text()
    assert f"- `{CO}`: RuntimeError: injected fault in {CO}" in document
    assert json.loads((folder / "summary.json").read_text())["failed"] == [CO]
    assert _csv_keys(folder) == [("ce", "0")]
    states = {r["name"]: r["state"]["type"] for r in _cell_runs(prefect_api, state)}
    assert states == {
        "ce breastmnist symmetric:0.4 seed 0": "COMPLETED",
        "coteaching breastmnist symmetric:0.4 seed 0": "FAILED",
    }

    before = _snapshot(folder / "cells")
    runs = CellRuns()
    retried = _run(monkeypatch, runs, _settings(data_dir), "bench-d")
    assert retried.is_completed(), retried.message
    assert runs.keys == [CO]
    after = _snapshot(folder / "cells")
    assert after[f"{CE}.json"] == before[f"{CE}.json"]
    assert json.loads((folder / "failures.json").read_text()) == []
    assert "Cells without a result" not in (folder / "BENCHMARK.md").read_text()
    assert _csv_keys(folder) == [("ce", "0"), ("coteaching", "0")]


# ----------------------------------------------------------------------------- (e)


def test_e_rerun_with_another_schedule_is_rejected(
    first_run: tuple[State, Path, CellRuns], tmp_path: Path, data_dir: Path,
    monkeypatch: pytest.MonkeyPatch, prefect_api: str,
) -> None:  # fmt: skip
    store = _copy(first_run, tmp_path)
    folder = store / "benchmarks" / "bench-a"
    before = _snapshot(folder)
    _use_store(monkeypatch, store)
    runs = CellRuns(forbid=True)
    state = _run(monkeypatch, runs, _settings(data_dir, epochs=3), "bench-a")
    assert state.is_failed()
    assert state.message == (
        "invalid parameters: benchmark bench-a was run with another schedule (epochs 2 -> 3); "
        "its cells would not compare: pass a new --bench-id, or the stored schedule"
    )
    assert runs.keys == []
    assert _snapshot(folder) == before  # nothing trained, nothing rewritten
    names = {r["name"].rsplit("-", 1)[0] for r in _task_runs(prefect_api, state)}
    assert names == {"check-spec"}


# ----------------------------------------------------------------------------- (f)


def test_f_missing_dataset_fails_before_any_cell(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, prefect_api: str
) -> None:
    _use_store(monkeypatch, tmp_path / "store")
    runs = CellRuns(forbid=True)
    settings = _settings(data_dir, datasets="breastmnist,medmnist://nosuchmnist")
    state = _run(monkeypatch, runs, settings, "bench-f")
    assert state.is_failed()
    with pytest.raises(DataError, match="nosuchmnist"):
        state.result()
    assert runs.keys == []
    assert not (tmp_path / "store" / "benchmarks" / "bench-f" / "cells").exists()
    loads = [r for r in _task_runs(prefect_api, state) if r["name"].startswith("load-dataset")]
    assert sorted(r["state"]["type"] for r in loads) == ["COMPLETED", "FAILED"]
    assert all(r["run_count"] == 1 for r in loads)  # a missing dataset is not retried


def test_bad_grid_fails_the_run_before_any_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_api: str
) -> None:
    """As a deployment's Custom run sends them: JSON settings."""
    _use_store(monkeypatch, tmp_path / "store")
    runs = CellRuns(forbid=True)
    state = _run(monkeypatch, runs, {"noise": "symmetric:1.0", "epochs": 2}, "bench-bad")
    assert state.is_failed()
    assert state.message == (
        "invalid parameters: --noise: noise rate must lie in [0, 1), got 'symmetric:1.0'"
    )
    assert _task_runs(prefect_api, state) == [] and runs.keys == []
    assert not (tmp_path / "store").exists()
    # Two names of one dataset would overwrite each other's cells: refused as well.
    settings = {"datasets": "breastmnist,medmnist://breastmnist", "epochs": 2}
    state = _run(monkeypatch, runs, settings, "bench-bad")
    assert state.is_failed()
    assert (state.message or "").startswith(
        "invalid parameters: datasets 'breastmnist' and 'medmnist://breastmnist' would share "
    )
    assert _task_runs(prefect_api, state) == [] and runs.keys == []
    assert not (tmp_path / "store").exists()
