"""``noisescore bench``: the lnl-benchmark flow from the command line, end to end on real
BreastMNIST (tiny schedule), and the grid checks that stop it before anything runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from noisescore.cli import main

pytestmark = pytest.mark.usefixtures("prefect_api")

TINY = ["--epochs", "2", "--train-size", "64", "--eval-size", "32", "--device", "cpu"]


def bench(data_dir: Path, tmp_path: Path, *flags: str) -> int:
    return main(
        ["bench", "--data-dir", str(data_dir), "--store-dir", str(tmp_path / "store"), *flags]
    )


def test_bench_writes_the_report_and_resumes(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--methods", "ce,sce", "--datasets", "breastmnist", "--noise", "symmetric:0.4"]
    flags += ["--seeds", "0", *TINY, "--bench-id", "b1", "--quiet"]
    report = tmp_path / "report"
    assert bench(data_dir, tmp_path, *flags, "--report-dir", str(report)) == 0
    out = capsys.readouterr().out
    assert "2 of 2 finished" in out and "benchmarks/b1/" in out
    rows = list(csv.DictReader((report / "benchmark" / "results.csv").open()))
    assert [(r["method"], r["noise"], r["seed"]) for r in rows] == [
        ("ce", "symmetric:0.4", "0"),
        ("sce", "symmetric:0.4", "0"),
    ]
    for row in rows:
        assert 0.0 <= float(row["test_acc_last_k"]) <= 1.0 and float(row["samples_per_second"]) > 0
    text = (report / "BENCHMARK.md").read_text()
    assert "| ce | " in text and "| sce | " in text and "breastmnist symmetric:0.4" in text
    assert "--bench-id b1" in text  # the command that reproduces it
    for name in ("accuracy_vs_noise.png", "rank_heatmap.png", "table.md", "cells.jsonl"):
        assert (report / "benchmark" / name).stat().st_size > 0
    cell = tmp_path / "store" / "benchmarks" / "b1" / "cells" / "breastmnist"
    stored = cell / "symmetric-0.4" / "ce" / "seed0.json"
    before = stored.read_bytes()
    # Extending the grid by a method trains only that method's cell.
    assert bench(data_dir, tmp_path, *flags[:1], "ce,sce,ce_ls", *flags[2:]) == 0
    assert "3 of 3 finished" in capsys.readouterr().out
    assert stored.read_bytes() == before
    assert json.loads((cell / "symmetric-0.4" / "ce_ls" / "seed0.json").read_bytes())["epochs"] == 2


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--methods", "ce,mixmatch"], "unknown method 'mixmatch'"),
        (["--noise", "symmetric:1.0"], "noise rate must lie in [0, 1)"),
        (["--noise", "symmetric:0.2,symmetric:0.2"], "listed twice: symmetric:0.2"),
        (["--seeds", "0,-1"], "seeds must be >= 0"),
        (["--datasets", "ftp://host/x.npz"], "--datasets"),
        (["--methods", "ce,t_revision"], "warmup_epochs=1 + reweight_epochs=1 must be < epochs=2"),
        (["--datasets", "breastmnist,medmnist://breastmnist"], "would share the cell"),
    ],
)
def test_bad_grid_is_rejected_before_anything_runs(
    data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    message: str,
) -> None:
    assert bench(data_dir, tmp_path, *flags, *TINY) == 2
    err = capsys.readouterr().err
    assert err.startswith("noisescore: error: ") and message in err
    assert not (tmp_path / "store").exists()


def test_real_noise_without_reference_labels_stops_before_training(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--methods", "ce", "--datasets", "breastmnist", "--noise", "real", *TINY]
    assert bench(data_dir, tmp_path, *flags, "--bench-id", "b2", "--quiet") == 1
    err = capsys.readouterr().err
    assert "'real' needs reference labels" in err and "breastmnist" in err
    assert not (tmp_path / "store" / "benchmarks" / "b2" / "cells").exists()
