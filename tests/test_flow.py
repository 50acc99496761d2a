"""The clean-labels flow end to end: a real Prefect API, a real S3 server (rclone), real
BreastMNIST. What is asserted is read back through the artifact store."""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import Gateway, S3Server
from prefect.logging.handlers import APILogHandler
from prefect.states import State
from pydantic import SecretStr

import noisescore.flows.clean_labels as flow_module
from noisescore.cli import main
from noisescore.flows.clean_labels import clean_labels
from noisescore.jobs import JOB_FILES, MANIFEST, JobStore
from noisescore.ml.data import DataError
from noisescore.ml.export import load_session, read_metadata
from noisescore.settings import CleanSettings, StoreSettings
from noisescore.storage import ChecksumMismatch, open_store

pytestmark = [pytest.mark.usefixtures("prefect_api"), pytest.mark.slow]

N_TRAIN = 546
PIPELINE = [
    "start-job", "load-dataset", "inject-noise", "reuse-warmup", "linc-warmup", "otsu-correct",
    "train-final", "evaluate", "export-onnx", "publish",
]  # fmt: skip


def _settings(data_dir: Path, **overrides: Any) -> CleanSettings:
    base: dict[str, Any] = dict(
        dataset="medmnist://breastmnist",
        data_dir=data_dir,
        noise="uniform:0.5",
        epochs=3,
        warmup_epochs=2,
        seed=0,
        device="cpu",
    )
    return CleanSettings(**{**base, **overrides})


def _use_store(monkeypatch: pytest.MonkeyPatch, settings: StoreSettings) -> None:
    """Point the flow (which reads its store from the environment) at ``settings``."""
    for key in ("S3_ENDPOINT", "S3_BUCKET", "S3_ACCESS_KEY", "S3_SECRET_KEY", "STORE_DIR"):
        monkeypatch.delenv(f"NOISESCORE_{key}", raising=False)
    for key, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        monkeypatch.setenv(f"NOISESCORE_{key.upper()}", str(value))


def _api(prefect_api: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST a filter to the Prefect REST API (what the UI reads)."""
    response = httpx.post(f"{prefect_api}/{path}", json={"limit": 200, **body}, timeout=30)
    response.raise_for_status()
    return list(response.json())


def _task_runs(prefect_api: str, flow_run_id: Any) -> list[dict[str, Any]]:
    body = {"flow_runs": {"id": {"any_": [str(flow_run_id)]}}}
    return _api(prefect_api, "task_runs/filter", body)


def _names(task_runs: list[dict[str, Any]]) -> set[str]:
    return {r["name"].rsplit("-", 1)[0] for r in task_runs}


def _artifacts(prefect_api: str, flow_run_id: Any) -> list[dict[str, Any]]:
    body = {"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}}}
    return _api(prefect_api, "artifacts/filter", body)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = S3Server(tmp_path_factory.mktemp("s3") / "data")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_job(s3: S3Server, data_dir: Path, prefect_api: str) -> tuple[State, JobStore]:
    """One complete job on BreastMNIST with artifacts in the S3 server."""
    with pytest.MonkeyPatch.context() as mp:
        _use_store(mp, s3.settings())
        state = clean_labels(settings=_settings(data_dir), job_id="flow-e2e", return_state=True)
    return state, JobStore(open_store(s3.settings()), "flow-e2e")


def _logs(prefect_api: str, flow_run_id: Any) -> list[dict[str, Any]]:
    # The flow ran in this process: its logs go to the API in background batches, so
    # send what is queued before reading them back.
    APILogHandler().flush()
    body = {"logs": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "sort": "TIMESTAMP_ASC"}
    return _api(prefect_api, "logs/filter", body)


def test_flow_completes_and_every_artifact_verifies(
    s3: S3Server, s3_job: tuple[State, JobStore]
) -> None:
    state, job = s3_job
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["job_id"] == "flow-e2e"
    assert summary["url"] == "s3://noisescore/jobs/flow-e2e/"
    assert summary["warmup_reused"] is False

    manifest = job.read_manifest()
    assert set(JOB_FILES) <= set(manifest["files"])
    refs = job.verify()  # reads every file back, checks size and sha256
    assert set(refs) == set(manifest["files"])
    # The manifest lists every file the job keeps, progress and checkpoint included.
    job_dir = s3.root / "noisescore" / "jobs" / "flow-e2e"
    stored = {p.relative_to(job_dir).as_posix() for p in job_dir.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == stored - {MANIFEST}
    assert {"trust_histogram.png", "progress.json", "checkpoints/warmup.pt"} <= stored
    parity = manifest["onnx_parity"]
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-4 and parity["batch_size"] > 0

    report = json.loads(job.get("report.json"))
    assert report["job"] == {"id": "flow-e2e", "url": job.url(), "warmup_reused": False}
    assert report["dataset"]["n_train"] == N_TRAIN
    assert report["linc"]["detection"]["auroc"] > 0.6
    spec = json.loads(job.get("spec.json"))
    assert spec["settings"]["epochs"] == 3 and spec["job_id"] == "flow-e2e"

    noisy = np.load(io.BytesIO(job.get("noisy_labels.npy")))
    rows = list(csv.DictReader(io.StringIO(job.get("trust.csv").decode())))
    assert len(rows) == len(noisy) == N_TRAIN
    assert [int(r["observed_label"]) for r in rows] == noisy.tolist()
    by_epoch = np.load(io.BytesIO(job.get("trust_by_epoch.npy")))
    assert by_epoch.shape == (2, N_TRAIN)

    session = load_session(job.get("model.onnx"))
    meta = read_metadata(session)
    assert (meta["num_classes"], meta["in_chans"], meta["img_size"]) == ("2", "1", "28")
    probs = session.run(["probabilities"], {"images": np.zeros((5, 1, 28, 28), np.float32)})[0]
    assert probs.shape == (5, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)

    progress = json.loads(job.get("progress.json", verify=False))
    assert progress["final"]["epoch"] == 3 and progress["warmup"]["trust_mean"] < 1.0


def test_first_log_line_names_the_store(s3_job: tuple[State, JobStore], prefect_api: str) -> None:
    state, _ = s3_job
    logs = _logs(prefect_api, state.state_details.flow_run_id)
    ours = [i for i, log in enumerate(logs) if "artifacts go to" in log["message"]]
    assert ours, [log["message"] for log in logs]
    first = logs[ours[0]]
    assert first["message"] == "job flow-e2e: artifacts go to s3://noisescore/jobs/flow-e2e/"
    # Before it only Prefect's own start lines ("Beginning flow run …", "View at …").
    assert all(log["task_run_id"] is None for log in logs[: ours[0]])
    assert not any("Beginning" not in m and "View at" not in m for m in
                   (log["message"] for log in logs[: ours[0]]))  # fmt: skip
    # Not a deployment run: no warning about a worker's default store.
    assert not any(log["level"] >= 30 for log in logs), [log["message"] for log in logs]


def test_invalid_parameters_fail_in_the_first_step_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_api: str,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """As the UI's Custom run sends them: JSON settings, epochs 3 with the default warm-up."""
    _use_store(monkeypatch, StoreSettings(store_dir=tmp_path / "store"))
    state = clean_labels(
        settings={"dataset": "medmnist://breastmnist", "epochs": 3, "warmup_epochs": 10},
        job_id="bad-params",
        return_state=True,
    )
    assert state.is_failed()
    message = "warmup_epochs (10) must not exceed epochs (3)"
    assert state.message == f"invalid parameters: {message}"
    run_id = state.state_details.flow_run_id
    assert _task_runs(prefect_api, run_id) == []  # nothing ran
    errors = [log["message"] for log in _logs(prefect_api, run_id) if log["level"] >= 40]
    assert errors == [f"invalid parameters: {message}"]
    assert not (tmp_path / "store").exists()
    # The CLI says the same for the same values.
    assert main(["clean", "--epochs", "3", "--warmup-epochs", "10"]) == 2
    assert capsys.readouterr().err == f"noisescore: error: {message}\n"
    bad = clean_labels(settings={"epochs": 0}, return_state=True)
    assert bad.message == "invalid parameters: --epochs: Input should be greater than or equal to 1"
    bad = clean_labels(
        settings={"epochs": 3, "warmup_epochs": 2}, job_id="Not_An_Id", return_state=True
    )
    assert bad.is_failed() and "invalid job id 'Not_An_Id'" in (bad.message or "")


def test_flow_is_visible_in_prefect(s3_job: tuple[State, JobStore], prefect_api: str) -> None:
    state, _ = s3_job
    runs = _task_runs(prefect_api, state.state_details.flow_run_id)
    assert set(PIPELINE) <= _names(runs)
    assert {r["state"]["type"] for r in runs} == {"COMPLETED"}
    artifacts = _artifacts(prefect_api, state.state_details.flow_run_id)
    keys = {a["key"] for a in artifacts if a["key"]}
    assert {"trust-flow-e2e", "job-flow-e2e"} <= keys
    trust = next(a for a in artifacts if a["key"] == "trust-flow-e2e")
    assert "Otsu threshold" in trust["data"] and "data:image/png;base64," in trust["data"]
    progress = [a for a in artifacts if a["type"] == "progress"]
    assert progress and progress[0]["data"] == pytest.approx(100.0)


def test_corrupted_artifact_is_detected(
    s3: S3Server, s3_job: tuple[State, JobStore], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    _, job = s3_job
    stored = s3.root / "noisescore" / "jobs" / "flow-e2e" / "trust.csv"
    original = stored.read_bytes()
    try:
        stored.write_bytes(original.replace(b",1,", b",0,", 1))
        with pytest.raises(ChecksumMismatch, match=r"trust\.csv"):
            job.get("trust.csv")
        _use_store(monkeypatch, s3.settings())
        assert main(["verify", "flow-e2e"]) == 1
        assert "trust.csv" in capsys.readouterr().err
    finally:
        stored.write_bytes(original)
    assert main(["verify", "flow-e2e"]) == 0
    assert "verified" in capsys.readouterr().out


def test_corrupted_histogram_fails_verify(
    s3: S3Server, s3_job: tuple[State, JobStore], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    stored = s3.root / "noisescore" / "jobs" / "flow-e2e" / "trust_histogram.png"
    original = stored.read_bytes()
    middle = len(original) // 2
    _use_store(monkeypatch, s3.settings())
    try:  # same size (see S3Server), one byte changed
        stored.write_bytes(
            original[:middle] + bytes([original[middle] ^ 0xFF]) + original[middle + 1 :]
        )
        assert main(["verify", "flow-e2e"]) == 1
        assert "trust_histogram.png is corrupt" in capsys.readouterr().err
    finally:
        stored.write_bytes(original)
    assert main(["verify", "flow-e2e"]) == 0
    out = capsys.readouterr().out
    assert "trust_histogram.png" in out and "checkpoints/warmup.pt" in out


def test_verify_names_the_store_it_searched(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """An S3 job verified without NOISESCORE_S3_*: the message says where it looked."""
    _use_store(monkeypatch, StoreSettings(store_dir=tmp_path / "local"))
    assert main(["verify", "flow-e2e"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"the local store {(tmp_path / 'local').resolve().as_uri()}/" in err
    assert "NOISESCORE_S3_ENDPOINT is not set" in err and "set NOISESCORE_S3_ENDPOINT" in err
    _use_store(monkeypatch, s3.settings())
    assert main(["verify", "no-such-job"]) == 1
    err = capsys.readouterr().err
    assert f"the S3 store s3://noisescore/ (NOISESCORE_S3_ENDPOINT={s3.endpoint})" in err
    assert "--store-dir" in err


def test_storage_down_at_publish_then_retry_reuses_warmup(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, prefect_api: str
) -> None:
    server = S3Server(tmp_path / "s3")
    try:
        server.start()
        _use_store(monkeypatch, server.settings())
        export = flow_module.export_onnx

        def export_then_storage_dies(*args: Any, **kwargs: Any) -> Any:
            result = export(*args, **kwargs)
            server.stop()  # the store goes down before the results are published
            return result

        monkeypatch.setattr(flow_module, "export_onnx", export_then_storage_dies)
        settings = _settings(data_dir, epochs=2, warmup_epochs=1)
        start = time.monotonic()
        failed = clean_labels(settings=settings, job_id="flaky", return_state=True)
        assert failed.is_failed()
        assert "unreachable" in (failed.message or "") or "unreachable" in str(
            failed.result(raise_on_failure=False)
        )
        runs = _task_runs(prefect_api, failed.state_details.flow_run_id)
        failed_save = [r for r in runs if r["state"]["type"] == "FAILED"]
        assert [r["name"].rsplit("-", 1)[0] for r in failed_save] == ["save"]
        assert failed_save[0]["run_count"] == 4  # 1 try + 3 retries
        assert time.monotonic() - start < 180

        server.start()
        job = JobStore(open_store(server.settings()), "flaky")
        assert not job.is_complete()  # no manifest after the failed run
        assert job.exists("checkpoints/warmup.pt")

        monkeypatch.setattr(flow_module, "export_onnx", export)
        retried = clean_labels(settings=settings, job_id="flaky", return_state=True)
        assert retried.is_completed(), retried.message
        assert retried.result()["warmup_reused"] is True
        names = _names(_task_runs(prefect_api, retried.state_details.flow_run_id))
        assert "linc-warmup" not in names and "reuse-warmup" in names
        job.verify()
    finally:
        server.stop()


def test_published_job_is_immutable(
    s3: S3Server, s3_job: tuple[State, JobStore], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use_store(monkeypatch, s3.settings())
    state = clean_labels(settings=_settings(data_dir), job_id="flow-e2e", return_state=True)
    assert state.is_failed()
    assert "already complete" in str(state.result(raise_on_failure=False))
    s3_job[1].verify()


def test_bad_dataset_uri_fails_fast(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(ValueError, match="unsupported dataset URI scheme 'http'"):
        _settings(data_dir, dataset="http://example.org/x.npz")


def _pushed_state(gateway: Gateway, job_id: str) -> str:
    """The job state in the last push of ``job_id``'s group."""
    path = f"/metrics/job/noisescore_clean/job_id/{job_id}"
    pushes = [r for r in gateway.requests if r.path == path]
    assert pushes, [r.path for r in gateway.requests]
    index = gateway.requests.index(pushes[-1])
    states = {
        dict(labels)["state"]: value
        for (name, labels), value in gateway.samples(index).items()
        if name == "noisescore_job_state"
    }
    (state,) = [k for k, v in states.items() if v == 1.0]
    return state


def test_missing_dataset_fails_without_retries(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, prefect_api: str,
    gateway: Gateway,
) -> None:  # fmt: skip
    _use_store(monkeypatch, StoreSettings(store_dir=tmp_path / "store"))
    monkeypatch.setenv("NOISESCORE_PUSHGATEWAY", gateway.address)
    start = time.monotonic()
    state = clean_labels(
        settings=_settings(data_dir, dataset="medmnist://nosuchmnist"),
        job_id="missing-data",
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(DataError, match="nosuchmnist"):
        state.result()
    runs = _task_runs(prefect_api, state.state_details.flow_run_id)
    load = [r for r in runs if r["name"].startswith("load-dataset")]
    assert len(load) == 1 and load[0]["run_count"] == 1  # a bad dataset is not retried
    assert time.monotonic() - start < 60
    assert not JobStore(
        open_store(StoreSettings(store_dir=tmp_path / "store")), "missing-data"
    ).is_complete()
    assert _pushed_state(gateway, "missing-data") == "failed"


def test_local_store_through_the_cli(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, gateway: Gateway,
) -> None:  # fmt: skip
    monkeypatch.delenv("NOISESCORE_S3_ENDPOINT", raising=False)
    monkeypatch.setenv("NOISESCORE_PUSHGATEWAY", gateway.address)
    store = tmp_path / "artifacts"
    argv = [
        "clean", "--dataset", "medmnist://breastmnist", "--data-dir", str(data_dir),
        "--noise", "uniform:0.5", "--epochs", "2", "--warmup-epochs", "1", "--seed", "0",
        "--device", "cpu", "--quiet", "--store-dir", str(store), "--job-id", "local-cli",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    job_dir = store / "jobs" / "local-cli"
    assert f"artifacts {job_dir.resolve().as_uri()}/" in out
    assert {p.name for p in job_dir.iterdir()} >= {*JOB_FILES, MANIFEST}
    assert not list(job_dir.rglob(".*.tmp"))
    assert main(["verify", "local-cli", "--store-dir", str(store)]) == 0
    shutil.rmtree(store)
    # Progress went to the Pushgateway: one push per epoch, then the final state.
    assert _pushed_state(gateway, "local-cli") == "succeeded"
    samples = gateway.samples()
    epoch = {
        dict(labels)["stage"]: v
        for (n, labels), v in samples.items()
        if n == "noisescore_job_epoch"
    }
    assert epoch == {"warmup": 1.0, "final": 2.0}
    trust = [v for (n, _), v in samples.items() if n == "noisescore_job_trust_mean"]
    assert trust and 0.0 < trust[0] < 1.0
