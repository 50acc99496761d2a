"""JobManager with real child processes (tiny Python commands instead of a training run)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from noisescore.jobs import JobStore
from noisescore.service.jobs import (
    CANCELLED,
    FAILED,
    QUEUED,
    RECORD,
    JobManager,
    JobNotFound,
    JobRecord,
    QueueFull,
)
from noisescore.storage import LocalStore

SPEC = {"dataset": "medmnist://breastmnist", "epochs": 2}


def _python(code: str):  # type: ignore[no-untyped-def]
    return lambda job_id, args: [sys.executable, "-c", code, *args]


def test_a_child_that_fails_says_why(tmp_path: Path) -> None:
    code = "import sys; print('noisescore: error: the dataset is broken'); sys.exit(2)"
    jobs = JobManager(LocalStore(tmp_path), command=_python(code))
    try:
        record = jobs.wait(jobs.submit(SPEC).job_id, timeout=60)
        assert record.state == FAILED and record.error == "error: the dataset is broken"
        log = JobStore(jobs.store, record.job_id).get("job.log", verify=False).decode()
        assert "the dataset is broken" in log
        # A zero exit without a manifest is not success either.
        ok = JobManager(LocalStore(tmp_path), command=_python("pass"))
        record = ok.wait(ok.submit(SPEC).job_id, timeout=60)
        assert record.state == FAILED and "exited with code 0" in record.error
        ok.shutdown()
    finally:
        jobs.shutdown()


def test_a_child_that_cannot_start(tmp_path: Path) -> None:
    jobs = JobManager(LocalStore(tmp_path), command=lambda job_id, args: ["/no/such/binary"])
    try:
        record = jobs.wait(jobs.submit(SPEC).job_id, timeout=60)
        assert record.state == FAILED and "could not run the job" in record.error
    finally:
        jobs.shutdown()


def test_queue_limit_cancel_and_idempotency(tmp_path: Path) -> None:
    jobs = JobManager(
        LocalStore(tmp_path), workers=1, max_queue=1, command=_python("import time; time.sleep(30)")
    )
    try:
        running = jobs.submit(SPEC)
        while jobs.get(running.job_id).state == QUEUED:
            time.sleep(0.02)
        queued = jobs.submit(SPEC, idempotency_key="k-1")
        assert jobs.submit(SPEC, idempotency_key="k-1").job_id == queued.job_id
        with pytest.raises(QueueFull, match="already queued"):
            jobs.submit(SPEC)
        assert jobs.cancel(queued.job_id).state == CANCELLED
        cancelled = jobs.cancel(running.job_id)
        record = jobs.wait(cancelled.job_id, timeout=30)
        assert record.state == CANCELLED and "cancelled" in record.error
        assert jobs.counts()[CANCELLED] == 2
        with pytest.raises(JobNotFound):
            jobs.get("no-such-job")
    finally:
        jobs.shutdown()


def test_restart_fails_orphans_and_keeps_the_rest(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for job_id, state in (("orphan", "RUNNING"), ("waiting", "QUEUED"), ("done", "CANCELLED")):
        record = JobRecord(job_id, state, SPEC, "2026-01-01T00:00:00Z", owner="dead")
        JobStore(store, job_id).put(RECORD, record.to_bytes())
    jobs = JobManager(store)
    try:
        assert jobs.get("orphan").state == FAILED
        assert "stopped while the job was running" in jobs.get("orphan").error
        assert "stopped while the job was queued" in jobs.get("waiting").error
        assert jobs.get("done").state == CANCELLED
        assert {r.job_id for r in jobs.records(FAILED)} == {"waiting", "orphan"}
    finally:
        jobs.shutdown()
