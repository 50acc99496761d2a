"""Stored state that survives corruption, crashes and replicas (issue 14, items 7-12).

Real stores (a local folder, ``rclone serve s3``), real gRPC servers, real child processes:
``noisescore clean`` and ``noisescore serve`` where the behaviour depends on them, tiny
Python commands where only a process is needed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import S3Server

from noisescore.client import NoiseScoringClient
from noisescore.jobs import JOB_FILES, LEASE, JobStore, Lease, read_lease
from noisescore.service.app import App, create_app
from noisescore.service.jobs import (
    FAILED,
    RECORD,
    SUCCEEDED,
    IdempotencyConflict,
    JobManager,
    JobRecord,
    public_error,
)
from noisescore.settings import ServiceSettings
from noisescore.storage import (
    ArtifactStore,
    LocalStore,
    S3Store,
    UnsafeArtifact,
    open_store,
)
from noisescore.v1 import noise_scoring_pb2 as pb

SPEC = {"dataset": "medmnist://breastmnist", "epochs": 2}
NOISESCORE = str(Path(sys.executable).parent / "noisescore")


def _python(code: str):  # type: ignore[no-untyped-def]
    return lambda job_id, args: [sys.executable, "-c", code, *args]


def _settings(**overrides: Any) -> ServiceSettings:
    return ServiceSettings(**{"grpc_addr": "127.0.0.1:0", "metrics_addr": None, **overrides})


@contextlib.contextmanager
def _serving(store: ArtifactStore) -> Iterator[tuple[App, NoiseScoringClient]]:
    app = create_app(_settings(), store=store).start()
    try:
        with NoiseScoringClient(f"127.0.0.1:{app.port}") as client:
            yield app, client
    finally:
        app.stop(grace=1)


def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details() or ""


def _child_env(store_dir: Path, data_dir: Path | None = None) -> dict[str, str]:
    """A child's environment: this store, no Prefect API (its own temporary server)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOISESCORE_", "PREFECT_API"))}
    env.update(NOISESCORE_STORE_DIR=str(store_dir), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    if data_dir is not None:
        env["NOISESCORE_DATA_DIR"] = str(data_dir)
    return env


def _process_group(pgid: int) -> list[int]:
    """Live (not zombie) processes whose process group is ``pgid``, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[-1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            found.append(int(entry))
    return found


def _until(predicate: Any, timeout: float, what: str, poll: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(poll)


def _publish_job(store: ArtifactStore, job_id: str, *, record: bool = True) -> JobStore:
    """A complete job's files, as the flow lays them out (tiny contents)."""
    job = JobStore(store, job_id)
    report = {
        "dataset": {"n_train": 3, "n_classes": 2},
        "linc": {"otsu_threshold": 0.5, "n_flagged": 1, "n_changed": 1, "trust_mean": 0.8},
    }
    contents = {name: f"{name} of {job_id}\n".encode() for name in JOB_FILES}
    contents["report.json"] = json.dumps(report).encode()
    contents["trust.csv"] = (
        b"index,sample_id,observed_label,trust,flagged,corrected_label\n"
        b"0,a,0,0.9,0,0\n1,b,1,0.2,1,0\n2,c,1,0.8,0,1\n"
    )
    refs = [job.put(name, data) for name, data in contents.items()]
    job.write_manifest(refs, suspect_cutoff=0.4)
    if record:
        stored = JobRecord(job_id, SUCCEEDED, {"dataset": "medmnist://breastmnist"},
                           "2026-01-01T00:00:00Z", end_time="2026-01-01T00:01:00Z")  # fmt: skip
        job.put(RECORD, stored.to_bytes())
    return job


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- 7: corruption


def test_one_corrupt_job_is_flagged_in_the_list_and_data_loss_on_its_own(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = LocalStore(root)
    _publish_job(store, "healthy")
    _publish_job(store, "bad-report")
    _flip_byte(root / "jobs" / "bad-report" / "report.json")
    _publish_job(store, "other-id")
    manifest = json.loads((root / "jobs" / "other-id" / "manifest.json").read_text())
    manifest["job_id"] = "healthy"
    (root / "jobs" / "other-id" / "manifest.json").write_text(json.dumps(manifest))
    _publish_job(store, "lost-file")
    (root / "jobs" / "lost-file" / "trust.csv").unlink()
    _publish_job(store, "lost-report", record=False)
    (root / "jobs" / "lost-report" / "report.json").unlink()
    (root / "jobs" / "garbled").mkdir(parents=True)
    (root / "jobs" / "garbled" / RECORD).write_bytes(b"\x00{not json")
    data_loss = grpc.StatusCode.DATA_LOSS

    with _serving(store) as (_, client):
        listed = {job.name.removeprefix("jobs/"): job for job in client.list()}
        assert set(listed) == {
            "healthy", "bad-report", "other-id", "lost-file", "lost-report", "garbled",
        }  # fmt: skip
        assert listed["healthy"].state == pb.Job.SUCCEEDED
        assert listed["healthy"].result.n_train == 3
        for broken in ("bad-report", "other-id", "lost-report", "garbled"):
            assert listed[broken].state == pb.Job.FAILED, broken
            assert listed[broken].error.startswith("DATA_LOSS"), listed[broken].error
            assert str(root) not in listed[broken].error
            code, details = _code(lambda b=broken: client.get(b))
            assert code == data_loss, (broken, code, details)
        # trust.csv missing: the job itself reads fine, its corrections are lost.
        assert listed["lost-file"].state == pb.Job.SUCCEEDED
        code, details = _code(lambda: list(client.corrections("lost-file")))
        assert code == data_loss and "trust.csv" in details
        code, _ = _code(
            lambda: client.stub.GetCorrections(pb.GetCorrectionsRequest(job="jobs/lost-file"))
        )
        assert code == data_loss
        assert client.get("healthy").state == pb.Job.SUCCEEDED


def test_malformed_list_states_and_page_tokens_are_invalid_argument(tmp_path: Path) -> None:
    def token(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode()

    tokens = [
        token(t)
        for t in (
            "null", "1", '"o"', "Infinity", "-Infinity", "NaN", "[]", "true", '{"s": ""}',
            '{"o": null, "s": ""}', '{"o": "3", "s": ""}', '{"o": Infinity, "s": ""}',
            '{"o": 1e400, "s": ""}', '{"o": true, "s": ""}', '{"o": 1.5, "s": ""}',
            "[" * 300 + "]" * 300, "[" * 50_000 + "]" * 50_000,
        )
    ] + ["%%%", "x" * 5000, token('{"o": -1, "s": ""}')]  # fmt: skip
    with _serving(LocalStore(tmp_path)) as (_, client):
        for page_token in tokens:
            code, details = _code(
                lambda t=page_token: client.stub.ListJobs(pb.ListJobsRequest(page_token=t))
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (page_token[:40], code, details)
            assert "page_token" in details
        for state in (7, 99, -1, 2**31 - 1):
            request = pb.ListJobsRequest()
            request.state = state  # type: ignore[assignment]  # an open enum on the wire
            code, details = _code(lambda r=request: client.stub.ListJobs(r))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (state, code, details)
            assert "state" in details


# --------------------------------------------------------------------------- local store links


def test_the_local_store_never_follows_links(tmp_path: Path) -> None:
    root = tmp_path / "store"
    secret = tmp_path / "outside.csv"
    secret.write_text("sample_id,label\nsecret,1\n")
    store = LocalStore(root)
    _publish_job(store, "linked")
    trust = root / "jobs" / "linked" / "trust.csv"
    trust.unlink()
    trust.symlink_to(secret)
    with pytest.raises(UnsafeArtifact, match="symbolic link"):
        store.get_bytes("jobs/linked/trust.csv")
    assert not store.exists("jobs/linked/trust.csv")
    with pytest.raises(UnsafeArtifact):
        JobStore(store, "linked").get("trust.csv")
    # A linked folder is refused too, for reads and for writes.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "report.json").write_text("{}")
    (root / "jobs" / "folder").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafeArtifact):
        store.get_bytes("jobs/folder/report.json")
    with pytest.raises(UnsafeArtifact):
        store.put_bytes("jobs/folder/new.bin", b"x")
    assert sorted(p.name for p in outside.iterdir()) == ["report.json"]
    assert "jobs/folder/report.json" not in store.list("jobs/")
    # Writing over a link replaces the link, never its target.
    store.put_bytes("jobs/linked/trust.csv", b"new")
    assert secret.read_text().startswith("sample_id") and not trust.is_symlink()
    # Over the service: DATA_LOSS, not the outside file.
    trust.unlink()
    trust.symlink_to(secret)
    with _serving(store) as (_, client):
        code, details = _code(lambda: list(client.corrections("linked")))
        assert code == grpc.StatusCode.DATA_LOSS and "secret" not in details


# --------------------------------------------------------------------------- 10: claims


def _claim_race(stores: list[ArtifactStore], key: str) -> list[bytes]:
    barrier = threading.Barrier(len(stores))
    results: list[bytes] = [b""] * len(stores)

    def contend(i: int) -> None:
        barrier.wait()
        results[i] = stores[i].claim(key, f"contender-{i}".encode())

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_claims_have_one_winner_locally_and_on_s3(tmp_path: Path, s3_server: S3Server) -> None:
    local = [LocalStore(tmp_path / "local") for _ in range(4)]
    s3: list[ArtifactStore] = [open_store(s3_server.settings()) for _ in range(4)]
    s3[0].check()
    for stores in (local, s3):
        for attempt in range(3):
            results = _claim_race(stores, f"idempotency/k{attempt}")
            assert len(set(results)) == 1, results
            assert results[0].startswith(b"contender-")
            # Later callers get the same winner, without a race.
            assert stores[0].claim(f"idempotency/k{attempt}", b"late") == results[0]


def test_the_test_s3_server_ignores_if_none_match(s3_server: S3Server) -> None:
    """Why S3Store.claim does not use a conditional PUT: ``rclone serve s3`` (the S3 server
    of these tests) answers ``If-None-Match: *`` on an existing key by overwriting it. If
    this starts failing, rclone honours the header now; the claim protocol still holds."""
    store = S3Store.from_settings(s3_server.settings())
    store.check()
    store.put_bytes("probe", b"first")
    store._client._put_object(store.bucket, "probe", b"second", headers={"If-None-Match": "*"})
    assert store.get_bytes("probe") == b"second"


def _replicas(store_factory: Any, n: int = 2) -> list[JobManager]:
    return [
        JobManager(store_factory(), command=_python("import time; time.sleep(1)")) for _ in range(n)
    ]


def _submit_race(replicas: list[JobManager], key: str) -> list[str]:
    barrier = threading.Barrier(len(replicas))
    ids: list[str] = [""] * len(replicas)

    def submit(i: int) -> None:
        barrier.wait()
        ids[i] = replicas[i].submit(SPEC, idempotency_key=key).job_id

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(replicas))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return ids


def _job_of(manager: JobManager, key: str) -> str:
    (record,) = [r for r in manager.records() if r.idempotency_key == key]
    return record.job_id


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_replicas_agree_on_one_job_per_key_and_refuse_a_changed_spec(
    backend: str, tmp_path: Path, s3_server: S3Server
) -> None:
    if backend == "local":
        factory: Any = lambda: LocalStore(tmp_path / "store")  # noqa: E731
    else:
        factory = lambda: S3Store.from_settings(s3_server.settings())  # noqa: E731
        factory().check()
    replicas = _replicas(factory)
    try:
        for attempt in range(5):
            ids = _submit_race(replicas, f"key-{attempt}")
            assert ids[0] and len(set(ids)) == 1, (attempt, ids)
        jobs = {r.job_id for r in replicas[0].records()}
        assert len(jobs) == 5
        with pytest.raises(IdempotencyConflict, match="different spec"):
            replicas[1].submit({**SPEC, "epochs": 3}, idempotency_key="key-0")
        # The jobs end FAILED (no manifest); both replicas rerun key-0 at once: one rerun.
        failed = replicas[0].wait(_job_of(replicas[0], "key-0"), 60)
        assert failed.state == FAILED
        again = _submit_race(replicas, "key-0")
        assert len(set(again)) == 1 and again[0] == failed.job_id
        store = replicas[0].store
        assert store.exists(f"jobs/{failed.job_id}/attempts/1.json")
        assert replicas[0].wait(failed.job_id, 60).attempt == 1
        assert not store.exists(f"jobs/{failed.job_id}/attempts/2.json")
    finally:
        for replica in replicas:
            replica.shutdown()


# --------------------------------------------------------------------------- 11: job logs


def test_job_logs_are_private_and_never_follow_a_planted_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    import noisescore.service.jobs as jobs_module

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    planted = Path(tempfile.gettempdir()) / "noisescore-job-planted-id.log"
    planted.unlink(missing_ok=True)
    planted.symlink_to(victim)
    monkeypatch.setattr(jobs_module, "new_job_id", lambda: "planted-id")
    jobs = JobManager(LocalStore(tmp_path / "store"), command=_python("print('x' * 100)"))
    try:
        log_dir = Path(jobs._log_dir)
        assert stat.S_IMODE(log_dir.stat().st_mode) == 0o700
        record = jobs.wait(jobs.submit(SPEC).job_id, timeout=60)
        assert record.state == FAILED  # no manifest
        assert victim.read_text() == "precious\n"
        assert list(log_dir.iterdir()) == []  # removed once stored
    finally:
        jobs.shutdown()
        planted.unlink(missing_ok=True)
    # A child that cannot start leaves no log behind.
    broken = JobManager(LocalStore(tmp_path / "store2"), command=lambda j, a: ["/no/such/binary"])
    try:
        record = broken.wait(broken.submit(SPEC).job_id, timeout=60)
        assert record.state == FAILED and "could not run the job" in record.error
        assert "/no/such" not in record.error  # no server path
        assert list(Path(broken._log_dir).iterdir()) == []
    finally:
        broken.shutdown()
    assert not log_dir.exists() and not Path(broken._log_dir).exists()


# --------------------------------------------------------------------------- smaller


def test_job_processes_get_no_service_secrets_and_callers_no_server_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOISESCORE_AUTH_TOKENS", "secret-token-123")
    monkeypatch.setenv("noisescore_tls_key", "/srv/tls/server.key")
    monkeypatch.setenv("NOISESCORE_S3_SECRET_KEY", "store-secret")  # the child needs this one
    code = (
        "import json, os, sys; print(json.dumps(dict(os.environ)));"
        "print('noisescore: error: Dataset x: file /srv/data/x.npz not found in data directory "
        "/srv/data (from $NOISESCORE_DATA_DIR); datasets available there: a, b, c. Put x.npz "
        "there, or file:///srv/data/y.npz, interpreter ' + sys.executable); sys.exit(2)"
    )
    jobs = JobManager(LocalStore(tmp_path), command=_python(code))
    try:
        record = jobs.wait(jobs.submit(SPEC).job_id, timeout=60)
        log = JobStore(jobs.store, record.job_id).get("job.log", verify=False).decode()
        env = json.loads(log.splitlines()[0])
        assert "NOISESCORE_AUTH_TOKENS" not in env and "noisescore_tls_key" not in env
        assert env["NOISESCORE_S3_SECRET_KEY"] == "store-secret"
        assert record.state == FAILED and "Dataset x" in record.error
        for leak in ("/srv", sys.executable, "a, b, c", "file://"):
            assert leak not in record.error, record.error
        assert "Put x.npz there" in record.error
    finally:
        jobs.shutdown()
    assert public_error("see medmnist://breastmnist and s3://b/k.npz") == (
        "see medmnist://breastmnist and s3://b/k.npz"
    )
    # A redacted path keeps the quotes around it.
    assert public_error("dataset 'file:///etc/x.npz' is not allowed") == (
        "dataset '<server path>' is not allowed"
    )


# --------------------------------------------------------------------------- 8: outside jobs


def _clean_argv(store_dir: Path, data_dir: Path, job_id: str, *extra: str) -> list[str]:
    return [
        NOISESCORE, "clean", "--dataset", "breastmnist", "--data-dir", str(data_dir),
        "--store-dir", str(store_dir), "--job-id", job_id, "--device", "cpu", "--seed", "0",
        "--quiet", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_a_job_started_outside_the_service_is_running_then_succeeded(
    tmp_path: Path, data_dir: Path
) -> None:
    store_dir = tmp_path / "store"
    with _serving(LocalStore(store_dir)) as (_, client):
        argv = _clean_argv(store_dir, data_dir, "cli-job", "--epochs", "6", "--warmup-epochs", "2")
        child = subprocess.Popen(
            argv, env=_child_env(store_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            states = set()
            while child.poll() is None:
                with contextlib.suppress(grpc.RpcError):  # NOT_FOUND until it starts
                    states.add(client.get("cli-job").state)
                time.sleep(0.2)
            output = child.stdout.read().decode() if child.stdout else ""
            assert child.returncode == 0, output
        finally:
            if child.poll() is None:
                child.kill()
        assert pb.Job.RUNNING in states and pb.Job.FAILED not in states, states
        done = client.get("cli-job")  # the same service process, no restart
        assert done.state == pb.Job.SUCCEEDED, done.error
        assert done.HasField("start_time") and done.HasField("end_time")
        assert done.end_time.ToDatetime() > done.start_time.ToDatetime()
        assert done.result.n_train == 546
        assert read_lease(JobStore(LocalStore(store_dir), "cli-job")) is None  # released


# --------------------------------------------------------------------------- 9: crashes


@contextlib.contextmanager
def _serve_process(store_dir: Path, data_dir: Path) -> Iterator[tuple[subprocess.Popen, int]]:
    env = _child_env(store_dir, data_dir)
    command = [NOISESCORE, "serve", "--grpc-addr", "127.0.0.1:0", "--metrics-addr", ""]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        assert line.startswith("noisescore serving gRPC on 127.0.0.1:"), line
        yield process, int(line.split("127.0.0.1:", 1)[1].split(",")[0])
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_a_restarted_service_adopts_and_cancels_the_job_its_predecessor_left(
    tmp_path: Path, data_dir: Path
) -> None:
    store_dir = tmp_path / "store"
    with _serve_process(store_dir, data_dir) as (server, port):
        with NoiseScoringClient(f"127.0.0.1:{port}") as client:
            job = client.submit(
                "medmnist://breastmnist", epochs=2000, warmup_epochs=2, device="cpu"
            )
            job_id = job.name.removeprefix("jobs/")
            store = JobStore(LocalStore(store_dir), job_id)

            def child_lease() -> Lease | None:
                lease = read_lease(store)
                return lease if lease is not None and lease.pid != server.pid else None

            lease = _until(child_lease, 120, "the job's process to hold its lease")
            _until(lambda: client.get(job.name).state == pb.Job.RUNNING, 60, "RUNNING")
        server.kill()  # kill -9: no shutdown, the child is orphaned
        server.wait()
    assert lease.process_alive(), "the job's process died with the service"
    try:
        with (
            _serve_process(store_dir, data_dir) as (_, port),
            NoiseScoringClient(f"127.0.0.1:{port}") as client,
        ):
            assert client.get(job.name).state == pb.Job.RUNNING
            client.cancel(job.name)
            _until(lambda: client.get(job.name).state == pb.Job.CANCELLED, 60, "CANCELLED")
            assert "cancelled" in client.get(job.name).error
        _until(lambda: not _process_group(lease.pid), 30, "the job's processes to end")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(lease.pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_failed_job_is_rerun_by_its_idempotency_key_and_reuses_its_warmup(
    tmp_path: Path, data_dir: Path
) -> None:
    store = LocalStore(tmp_path / "store")
    spec = {
        "dataset": "medmnist://breastmnist", "epochs": 8, "warmup_epochs": 2, "seed": 0,
        "device": "cpu",
    }  # fmt: skip
    jobs = JobManager(store, env=_child_env(tmp_path / "store", data_dir))
    try:
        first = jobs.submit(spec, idempotency_key="rerun-me")
        job = JobStore(store, first.job_id)
        _until(lambda: job.exists("checkpoints/warmup.pt"), 180, "the warm-up checkpoint", 0.05)
        lease = _until(lambda: read_lease(job), 10, "the lease")
        os.killpg(lease.pid, signal.SIGKILL)  # the job's process dies (OOM kill, node loss)
        failed = jobs.wait(first.job_id, timeout=60)
        assert failed.state == FAILED and not job.is_complete()
        # The same key reruns the same job, once, under the same id.
        again = jobs.submit(spec, idempotency_key="rerun-me")
        assert again.job_id == first.job_id and again.attempt == 1
        assert jobs.submit(spec, idempotency_key="rerun-me").attempt == 1
        done = jobs.wait(first.job_id, timeout=300)
        assert done.state == SUCCEEDED, done.error
        report = json.loads(job.get("report.json"))
        assert report["job"]["warmup_reused"] is True
        with pytest.raises(IdempotencyConflict):
            jobs.submit({**spec, "epochs": 15}, idempotency_key="rerun-me")
    finally:
        jobs.shutdown()
    assert read_lease(job) is None and not store.exists(f"jobs/{first.job_id}/{LEASE}")


def test_leftover_jobs_fail_when_their_process_is_gone_and_are_adopted_while_it_runs(
    tmp_path: Path,
) -> None:
    """What a restarted service makes of jobs a dead service left RUNNING: a dead process
    (pid gone) is FAILED at once; live processes are adopted and settled when they end,
    SUCCEEDED when they published, FAILED when not."""
    store = LocalStore(tmp_path)
    sleepers = {
        name: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        for name in ("live-fails", "live-publishes")
    }
    try:
        for job_id in ("dead-owner", *sleepers):
            job = JobStore(store, job_id)
            pid = sleepers[job_id].pid if job_id in sleepers else os.getpid()
            lease = Lease.of_process(job_id, pid, 60)
            if job_id not in sleepers:  # a pid that no longer exists
                lease = Lease(**{**lease.__dict__, "pid": 999_999_999, "pid_start": "1"})
            job.put(LEASE, lease.to_bytes())
            job.put(RECORD, JobRecord(job_id, "RUNNING", SPEC, "2026-01-01T00:00:00Z").to_bytes())
        jobs = JobManager(store, command=_python("pass"))
        try:
            assert jobs.get("dead-owner").state == FAILED
            assert "no idempotency key" in jobs.get("dead-owner").error
            assert {jobs.get(j).state for j in sleepers} == {"RUNNING"}
            _publish_job(store, "live-publishes", record=False)  # its process publishes
            for sleeper in sleepers.values():
                sleeper.kill()
                sleeper.wait()
            _until(lambda: jobs.get("live-fails").state == FAILED, 10, "the adopted job to fail")
            assert "ended without publishing" in jobs.get("live-fails").error
            _until(lambda: jobs.get("live-publishes").state == SUCCEEDED, 10, "SUCCEEDED")
        finally:
            jobs.shutdown()
    finally:
        for sleeper in sleepers.values():
            if sleeper.poll() is None:
                sleeper.kill()
    restarted = JobManager(store)
    try:
        states = {r.job_id: r.state for r in restarted.records()}
        assert states == {"dead-owner": FAILED, "live-fails": FAILED, "live-publishes": SUCCEEDED}
        assert not any(store.exists(f"jobs/{j}/{LEASE}") for j in sleepers)
    finally:
        restarted.shutdown()


def test_a_live_lease_refuses_a_second_run_and_a_remote_job_is_not_cancelled_here(
    tmp_path: Path,
) -> None:
    from noisescore.jobs import JobAlreadyRunning, JobLease
    from noisescore.service.jobs import NotCancellable

    store = LocalStore(tmp_path)
    job = JobStore(store, "twice")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with JobLease(job, 60, pid=sleeper.pid):
            with pytest.raises(JobAlreadyRunning, match=f"pid {sleeper.pid}"):
                JobLease(job, 60).__enter__()
            assert read_lease(job) is not None and read_lease(job).pid == sleeper.pid
        assert read_lease(job) is None  # released on the way out
    finally:
        sleeper.kill()
        sleeper.wait()
    # A fresh lease of another host: RUNNING, and not this service's to cancel.
    remote = Lease.of_process("remote", os.getpid(), 60)
    remote = Lease(**{**remote.__dict__, "host": "another-host", "boot_id": "x"})
    JobStore(store, "remote").put(LEASE, remote.to_bytes())
    JobStore(store, "remote").put(
        RECORD, JobRecord("remote", "RUNNING", SPEC, "2026-01-01T00:00:00Z").to_bytes()
    )
    jobs = JobManager(store, command=_python("pass"))
    try:
        assert jobs.get("remote").state == "RUNNING"
        with pytest.raises(NotCancellable, match="another-host"):
            jobs.cancel("remote")
    finally:
        jobs.shutdown()
    with _serving(store) as (_, client):
        code, details = _code(lambda: client.cancel("remote"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "cancel it where it runs" in details


# --------------------------------------------------------------------------- 12: SIGTERM


@pytest.mark.slow
def test_sigterm_to_noisescore_clean_leaves_no_process_behind(
    tmp_path: Path, data_dir: Path
) -> None:
    store_dir = tmp_path / "store"
    argv = _clean_argv(store_dir, data_dir, "terminated", "--epochs", "2000")
    output = tmp_path / "clean.log"
    with output.open("wb") as log:
        child = subprocess.Popen(
            argv, env=_child_env(store_dir), start_new_session=True, stdout=log, stderr=log
        )
    try:
        # Prefect's temporary API server is up (a second process) and training has begun.
        _until(lambda: len(_process_group(child.pid)) > 1, 120, "the temporary Prefect server")
        job = JobStore(LocalStore(store_dir), "terminated")
        _until(lambda: job.exists("progress.json"), 180, "training to start")
        child.send_signal(signal.SIGTERM)
        try:
            code = child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 60 s after SIGTERM:\n{output.read_text()[-3000:]}")
        assert code == 128 + signal.SIGTERM, output.read_text()[-3000:]
        _until(lambda: not _process_group(child.pid), 15, "every descendant to end")
        assert read_lease(job) is None  # released on the way out
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
