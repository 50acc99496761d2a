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


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_ddp_summarises_and_reports(tmp_path: Path) -> None:
    """bench_ddp's comparison and outputs, from two seeds' runs (the jobs themselves are
    the real ``noisescore clean --nproc 2`` of tests/test_ddp_clean.py)."""
    bench = _load("bench_ddp")
    args = bench.parse_args(["--seeds", "0,1", "--out-dir", str(tmp_path)])
    assert args.seed_list == [0, 1] and args.nproc == 2
    with pytest.raises(SystemExit):
        bench.parse_args(["--nproc", "1"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--seeds", "0,x"])

    def run(nproc: int, seed: int, auroc: float) -> dict[str, object]:
        return {
            "nproc": nproc, "seed": seed, "processes_reported": nproc, "auroc": auroc,
            "otsu_threshold": 0.9, "n_flagged": 10, "n_changed": 9,
            "label_accuracy_after": 0.8, "test_accuracy": 0.7,
            "trust_histogram": [1] * bench.BINS, "samples_per_second": 100.0 * nproc,
            "wall_seconds": 10.0,
        }  # fmt: skip

    runs = [run(1, 0, 0.80), run(2, 0, 0.805), run(1, 1, 0.90), run(2, 1, 0.88)]
    summary = bench.summarise(runs, 2)
    assert summary["auroc_gap_per_seed"] == pytest.approx([0.005, -0.02])
    assert summary["auroc_gap_max_abs"] == pytest.approx(0.02)
    assert summary["auroc_target_met"] is False  # 0.02 > 0.01: a miss is reported as one
    assert summary["throughput_ratio"] == pytest.approx(2.0)
    env = {
        "dataset": "breastmnist", "noise": "uniform:0.5", "epochs": 11, "warmup_epochs": 10,
        "nproc": 2, "device": "cpu", "command": "python bench/bench_ddp.py",
    }  # fmt: skip
    result = {"environment": env, "summary": summary, "runs": runs}
    md = bench.render_markdown(result)
    assert "**not met**" in md and "+0.0050, -0.0200" in md
    bench.render_plot(result, tmp_path / "ddp.png")
    assert (tmp_path / "ddp.png").stat().st_size > 0
