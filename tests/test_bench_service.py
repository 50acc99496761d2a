"""Smoke test of bench/bench_service.py: tiny settings, real data and a real flow-trained
job, a real server; no assertions on speed."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "bench" / "bench_service.py"

pytestmark = [pytest.mark.usefixtures("prefect_api"), pytest.mark.slow]


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_service", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_service_writes_outputs(tmp_path: Path, data_dir: Path) -> None:
    bench = load_script()
    out_dir = tmp_path / "bench"
    result = bench.main(
        [
            "--data-dir", str(data_dir), "--epochs", "2", "--warmup-epochs", "1",
            "--repeats", "3", "--duration", "0.5", "--clients", "4",
            "--large-rows", "5000", "--large-repeats", "1", "--watches", "20",
            "--out-dir", str(out_dir),
        ]
    )  # fmt: skip
    for name in ("service.json", "service.md", "service.png"):
        assert (out_dir / name).is_file(), name
        assert (out_dir / name).stat().st_size > 0, name
    assert not list(out_dir.glob("*.tmp"))  # atomic writes leave no temp files

    saved = json.loads((out_dir / "service.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    raw, summary, env = saved["raw"], saved["summary"], saved["environment"]

    for batch in ("1", "256", "1_back_to_back"):
        for case in ("torch", "onnxruntime", "predict_rpc"):
            seconds = raw["predict"][batch][case]
            assert len(seconds) == 3 and all(t > 0 for t in seconds), (batch, case)
        row = summary["predict"][f"batch_{batch}"]
        for key in ("torch_over_onnxruntime", "torch_over_predict_rpc"):
            assert math.isfinite(row[key]) and row[key] > 0, key
        assert row["torch"]["p99_ms"] >= row["torch"]["p50_ms"] > 0
    assert all(d <= 1e-4 for d in raw["parity_max_abs_diff"].values())

    for method in ("ScoreLabels", "GetCorrections"):
        t = summary["throughput"][method]
        assert t["clients_1"]["clients"] == 1 and t["clients_4"]["clients"] == 4
        assert t["clients_4"]["requests"] > 0 and t["clients_4"]["samples_per_second"] > 0
        assert len(raw["load"][method]["4"]["requests_per_client"]) == 4
        assert t["clients_4"]["server_cpu_cores"] > 0
        assert t["errors"] == 0, t
        assert math.isfinite(t["scaling"]) and t["scaling"] > 0
    assert summary["throughput"]["GetCorrections"]["clients_1"]["samples_per_request"] == 546
    assert summary["errors"] == 0

    watch = summary["watch_load"]  # ScoreLabels beside open WatchJob streams of a held job
    assert watch["watches"] == 20 and watch["errors"] == 0 and watch["watch_errors"] == 0
    for condition in ("without", "with"):
        assert watch[condition]["requests"] > 0, condition
        assert watch[condition]["latency"]["p99_ms"] > 0, condition
    assert math.isfinite(watch["p99_with_over_without"])

    large = summary["large_job"]
    assert large["synthetic"] is True and large["rows"] == 5000
    for kind in ("stream", "paged"):
        assert large[kind]["cold_median_s"] > 0 and large[kind]["warm_median_s"] > 0
    assert large["stream_full"]["warm_median_s"] > 0
    assert isinstance(large["target_met"], bool)
    assert summary["server_frozen_objects"] > 0  # the server child reported back (gc.freeze)

    assert env["threads"] == 1 and env["n_train"] == 546 and env["model"] == "noisescore_cnn"
    assert env["job_source"].startswith("trained in this run")
    assert env["other_cpu_cores_during_measurements"] >= 0
    assert "bench/bench_service.py" in env["command"] and env["git_commit"]
    md = (out_dir / "service.md").read_text()
    for heading in (
        "## Predict latency",
        "## Concurrency",
        "## Watches under load (20 WatchJob streams)",
        "## Large job read (synthetic",
    ):
        assert heading in md, heading
    assert "| batch | case | p50 (ms) | p99 (ms) | torch p50 / p50 |" in md
    assert "bench/bench_service.py" in md
