"""Smoke test of bench/bench_train.py: tiny settings, real data, no assertions on speed."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SCRIPT = REPO_ROOT / "bench" / "bench_train.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_train_writes_outputs(tmp_path: Path) -> None:
    if not (SHARED_DATA / "breastmnist.npz").is_file():
        pytest.skip(f"real MedMNIST data not found in {SHARED_DATA}")
    bench = load_script()
    out_dir = tmp_path / "bench"
    bench.main(
        [
            "--dataset", "breastmnist", "--data-dir", str(SHARED_DATA),
            "--epochs", "1", "--repeats", "1", "--device", "cpu",
            "--out-dir", str(out_dir),
        ]
    )  # fmt: skip
    for name in ("train_loop.json", "train_loop.md", "train_loop.png"):
        assert (out_dir / name).is_file(), name
        assert (out_dir / name).stat().st_size > 0, name
    assert not list(out_dir.glob("*.tmp"))  # atomic writes leave no temp files

    result = json.loads((out_dir / "train_loop.json").read_text())
    raw, summary, env = result["raw"], result["summary"], result["environment"]
    for kind in ("ce", "linc", "textbook"):
        assert len(raw[kind]) == 1
        run = raw[kind][0]
        assert len(run["epoch_seconds"]) == 1
        assert all(t > 0 for t in run["epoch_seconds"])
        assert all(v > 0 for v in run["samples_per_second"])
    for key in ("linc_over_ce", "linc_over_ce_loop_only", "ours_over_textbook"):
        assert math.isfinite(summary[key]) and summary[key] > 0, key
    assert env["dataset"] == "breastmnist" and env["n_train"] > 0
    assert env["torch_threads"] == 1
    md = (out_dir / "train_loop.md").read_text()
    assert "| measurement | baseline | ours | ratio | target |" in md
    assert "bench/bench_train.py" in md
