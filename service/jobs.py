"""Cleaning jobs behind the service: submit, track, cancel, read back.

A job's record lives in the artifact store next to its artifacts (``jobs/<id>/job.json``),
so a restarted service still answers for finished jobs. Embedded mode (no Prefect API
configured) runs each job as ``noisescore clean --job-id <id>`` in a child process — the
same ``clean-labels`` flow as everywhere — in a bounded pool of ``job_workers``; a child
process can be cancelled (terminated) and cannot take the server down with it.

Jobs that a previous service process left QUEUED or RUNNING are marked FAILED on start,
with the reason; a job whose manifest exists is SUCCEEDED whoever ran it (a job made by
``noisescore clean`` on the same store is readable too).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from noisescore.jobs import IncompleteJob, JobStore, list_jobs, new_job_id
from noisescore.ml.model_names import training_runtime_available
from noisescore.storage import ArtifactNotFound, ArtifactStore, StorageError

logger = logging.getLogger(__name__)

RECORD = "job.json"
LOG = "job.log"
IDEMPOTENCY_PREFIX = "idempotency/"

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED",
)  # fmt: skip
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})


class JobNotFound(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class NoTrainingRuntime(RuntimeError):
    """FAILED_PRECONDITION: jobs would run here, but this install cannot train (the
    service image has no torch); they must go through Prefect workers instead."""


class QueueFull(RuntimeError):
    """More jobs are waiting than the service accepts (``max_queue``)."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class JobRecord:
    """What the service knows of a job; stored as ``jobs/<id>/job.json``."""

    job_id: str
    state: str
    spec: dict[str, Any]
    create_time: str
    start_time: str | None = None
    end_time: str | None = None
    error: str = ""
    idempotency_key: str = ""
    owner: str = ""  # the service process that runs it (restart detection)
    flow_run_id: str = ""  # Prefect mode: the deployment run executing the job

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> JobRecord:
        fields = json.loads(data)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in fields.items() if k in known})


@dataclass
class _Running:
    process: subprocess.Popen[bytes] | None = None
    cancelled: bool = False


@dataclass
class JobManager:
    """Submit and track cleaning jobs whose state and results live in ``store``.

    Parameters
    ----------
    store : ArtifactStore
    workers : int
        Jobs run at once.
    max_queue : int
        Jobs that may wait; one more is :class:`QueueFull`.
    command : callable, optional
        ``command(job_id, args) -> argv`` of the child process; default ``noisescore
        clean`` with this interpreter.
    env : dict, optional
        Extra environment of the child processes (the store settings are inherited).
    """

    store: ArtifactStore
    workers: int = 1
    max_queue: int = 16
    command: Callable[[str, list[str]], list[str]] | None = None
    env: dict[str, str] = field(default_factory=dict)
    on_change: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        self.instance = uuid.uuid4().hex
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="job")
        self._running: dict[str, _Running] = {}
        self._records: dict[str, JobRecord] = {}
        self._closed = False
        self._recover()

    def _check_can_run(self) -> None:
        """Jobs are child processes that train: refuse them up front without torch."""
        if self.command is None and not training_runtime_available():
            raise NoTrainingRuntime(
                "this service cannot run cleaning jobs itself: torch/timm are not installed "
                "(the service image serves scores, corrections and predictions only). Run "
                "jobs on Prefect workers: set PREFECT_API_URL and NOISESCORE_JOB_RUNNER=prefect "
                "(NOISESCORE_PREFECT_DEPLOYMENT names the deployment), or install "
                "noisescore[train,cpu]"
            )

    # ------------------------------------------------------------------- records

    def _job(self, job_id: str) -> JobStore:
        return JobStore(self.store, job_id)

    def _save(self, record: JobRecord) -> None:
        self._job(record.job_id).put(RECORD, record.to_bytes(), content_type="application/json")
        with self._lock:
            self._records[record.job_id] = record
        if self.on_change is not None:
            self.on_change()

    def _load(self, job_id: str) -> JobRecord | None:
        job = self._job(job_id)
        try:
            record = JobRecord.from_bytes(job.get(RECORD, verify=False))
        except ArtifactNotFound:
            record = None
        except (ValueError, TypeError) as err:
            logger.warning("job %s: unreadable %s (%s)", job_id, RECORD, err)
            record = None
        complete = job.is_complete()  # one manifest read per load
        if record is None:
            if not complete and not job.exists("spec.json"):
                return None
            # A job made outside the service (noisescore clean, a deployment) on this store.
            spec = self._spec_of(job)
            record = JobRecord(
                job_id, SUCCEEDED if complete else FAILED, spec.get("settings", {}),
                create_time=spec.get("created") or _now(),
            )  # fmt: skip
            if not complete:
                record.error = "not started by this service and not published (yet)"
            return record
        if not record.terminal and complete:
            record.state, record.end_time = SUCCEEDED, record.end_time or _now()
        if record.state == SUCCEEDED and not complete:
            record.state, record.error = FAILED, "job.json says SUCCEEDED but there is no manifest"
        return record

    def _spec_of(self, job: JobStore) -> dict[str, Any]:
        """``spec.json`` of a job (``settings``, ``created``…), empty if unreadable."""
        try:
            return dict(json.loads(job.get("spec.json", verify=False)))
        except (StorageError, ValueError):
            return {}

    def _recover(self) -> None:
        """Fail what a previous service process left unfinished."""
        for job_id in list_jobs(self.store):
            record = self._load(job_id)
            if record is None:
                continue
            if not record.terminal:  # _load made a published job SUCCEEDED already
                was = record.state.lower()
                record.state, record.end_time = FAILED, _now()
                record.error = (
                    f"the service stopped while the job was {was}; resubmit it "
                    "(a resubmission reuses the stored warm-up when the settings match)"
                )
                self._save(record)
            else:
                with self._lock:
                    self._records[job_id] = record

    # ------------------------------------------------------------------- API

    def get(self, job_id: str) -> JobRecord:
        record = self._get(job_id)
        return record if record.terminal else self._refresh(record)

    def _refresh(self, record: JobRecord) -> JobRecord:
        """Where another system owns the job's state (Prefect mode), read it from there."""
        return record

    def _get(self, job_id: str) -> JobRecord:
        with self._lock:
            record = self._records.get(job_id)
            ours = job_id in self._running  # this process's runner owns its state
        if record is None or not (record.terminal or ours):
            loaded = self._load(job_id)
            if loaded is not None and (record is None or loaded.terminal):
                record = loaded
                with self._lock:
                    self._records[job_id] = record
        if record is None:
            raise JobNotFound(f"job {job_id} not found")
        return record

    def records(self, state: str | None = None) -> list[JobRecord]:
        """All jobs, newest first (by creation time, then id)."""
        ids = set(list_jobs(self.store))
        with self._lock:
            ids |= set(self._records)
        records = []
        for job_id in ids:
            try:
                records.append(self.get(job_id))
            except JobNotFound:
                continue
        if state is not None:
            records = [r for r in records if r.state == state]
        return sorted(records, key=lambda r: (r.create_time, r.job_id), reverse=True)

    def counts(self) -> dict[str, int]:
        with self._lock:
            records = list(self._records.values())
        return {s: sum(r.state == s for r in records) for s in STATES}

    def queue_depth(self) -> int:
        with self._lock:
            return sum(r.state == QUEUED for r in self._records.values())

    def submit(self, spec: dict[str, Any], *, idempotency_key: str = "") -> JobRecord:
        """Queue a job for ``spec`` (CleanSettings fields); the same key gives the same job."""
        self._check_can_run()
        with self._lock:
            if self._closed:
                raise QueueFull("the service is shutting down")
            if idempotency_key:
                existing = self._by_key(idempotency_key)
                if existing is not None:
                    return self.get(existing)
            if self.queue_depth() >= self.max_queue:
                raise QueueFull(
                    f"{self.max_queue} jobs are already queued (NOISESCORE_MAX_QUEUE); "
                    "retry later or cancel some"
                )
            record = JobRecord(
                new_job_id(), QUEUED, spec, create_time=_now(),
                idempotency_key=idempotency_key, owner=self.instance,
            )  # fmt: skip
            self._save(record)
            if idempotency_key:
                key = IDEMPOTENCY_PREFIX + hashlib.sha256(idempotency_key.encode()).hexdigest()
                self.store.put_bytes(key, record.job_id.encode(), content_type="text/plain")
            self._running[record.job_id] = _Running()
        self._launch(record)
        return record

    def _launch(self, record: JobRecord) -> None:
        self._pool.submit(self._run, record.job_id)

    def _by_key(self, key: str) -> str | None:
        name = IDEMPOTENCY_PREFIX + hashlib.sha256(key.encode()).hexdigest()
        try:
            return self.store.get_bytes(name).decode()
        except ArtifactNotFound:
            return None

    def cancel(self, job_id: str) -> JobRecord:
        record = self.get(job_id)
        if record.terminal:
            return record
        with self._lock:
            running = self._running.get(job_id)
            if running is not None:
                running.cancelled = True
                process = running.process
            else:
                process = None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # the child and its own children
        if record.state == QUEUED or running is None:
            record.state, record.end_time = CANCELLED, _now()
            record.error = "cancelled before it started"
            self._save(record)
        return self.get(job_id)

    def wait(self, job_id: str, timeout: float | None = None) -> JobRecord:
        """Block until the job is terminal (tests, CLI ``--wait``)."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            record = self.get(job_id)
            if record.terminal:
                return record
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {record.state}")
            time.sleep(0.2)

    def shutdown(self, *, cancel: bool = True) -> None:
        """Stop taking jobs; with ``cancel`` stop the running ones (they end FAILED on the
        next start if this process dies first)."""
        with self._lock:
            self._closed = True
            ids = [j for j, r in self._running.items() if r.process is not None]
        if cancel:
            for job_id in ids:
                self.cancel(job_id)
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------- running

    def _argv(self, job_id: str, record: JobRecord) -> list[str]:
        args = ["--job-id", job_id, "--quiet"]
        for name, value in record.spec.items():
            if value is None or value is False:
                continue
            flag = "--" + name.replace("_", "-")
            args += [flag] if value is True else [flag, str(value)]
        if self.command is not None:
            return self.command(job_id, args)
        return [sys.executable, "-m", "noisescore.cli", "clean", *args]

    def _run(self, job_id: str) -> None:
        """Run one job to its end; whatever happens, the job ends in a terminal state."""
        try:
            self._run_process(job_id)
        except Exception as err:  # the store went away, the child could not start, ...
            logger.exception("job %s: the runner failed", job_id)
            with self._lock:
                self._running.pop(job_id, None)
            record = self._get(job_id)
            if not record.terminal:
                record.state, record.end_time = FAILED, _now()
                record.error = f"the service could not run the job: {err}"
                try:
                    self._save(record)
                except StorageError:
                    with self._lock:  # at least this process answers correctly
                        self._records[job_id] = record

    def _run_process(self, job_id: str) -> None:
        record = self.get(job_id)
        with self._lock:
            running = self._running.setdefault(job_id, _Running())
            if running.cancelled or record.terminal:
                self._running.pop(job_id, None)
                return
            record.state, record.start_time = RUNNING, _now()
            self._save(record)
            log_path = self._log_path(job_id)
            with open(log_path, "wb") as log:
                running.process = subprocess.Popen(
                    self._argv(job_id, record),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, **self.env},
                    start_new_session=True,  # a process group: cancel reaches its children
                )
        code = running.process.wait()
        with self._lock:
            self._running.pop(job_id, None)
        record = self.get(job_id)
        record.end_time = _now()
        tail = _tail(log_path)
        if running.cancelled:
            record.state, record.error = CANCELLED, "cancelled while running"
        elif code == 0 and self._job(job_id).is_complete():
            record.state, record.error = SUCCEEDED, ""
        else:
            record.state = FAILED
            record.error = _error_line(tail) or f"the cleaning process exited with code {code}"
        try:
            self._job(job_id).put(LOG, tail.encode(), content_type="text/plain")
        except StorageError as err:
            logger.warning("job %s: could not store its log: %s", job_id, err)
        self._save(record)
        os.unlink(log_path)

    def _log_path(self, job_id: str) -> str:
        import tempfile

        return os.path.join(tempfile.gettempdir(), f"noisescore-job-{job_id}.log")

    # ------------------------------------------------------------------- results

    def report(self, job_id: str) -> dict[str, Any]:
        return dict(json.loads(self._job(job_id).get("report.json")))

    def manifest(self, job_id: str) -> dict[str, Any]:
        return self._job(job_id).read_manifest()

    def progress(self, job_id: str) -> dict[str, Any]:
        try:
            return dict(json.loads(self._job(job_id).get("progress.json", verify=False)))
        except (ArtifactNotFound, IncompleteJob, ValueError):
            return {}


def _tail(path: str, limit: int = 64 * 1024) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def _error_line(log: str) -> str:
    """The child's ``noisescore: error: …`` line (what a user must fix), if any."""
    for line in reversed(log.splitlines()):
        if line.startswith("noisescore: "):
            return line.removeprefix("noisescore: ").strip()
    return ""


# ----------------------------------------------------------------------------- Prefect mode

_PREFECT_STATES = {
    "SCHEDULED": QUEUED, "PENDING": QUEUED, "PAUSED": QUEUED,
    "RUNNING": RUNNING, "COMPLETED": SUCCEEDED, "FAILED": FAILED, "CRASHED": FAILED,
    "CANCELLING": RUNNING, "CANCELLED": CANCELLED,
}  # fmt: skip


class OrchestratorUnavailable(RuntimeError):
    """The Prefect API cannot be reached (UNAVAILABLE)."""


@dataclass
class PrefectJobManager(JobManager):
    """Jobs as runs of a ``clean-labels`` deployment on a Prefect API (``PREFECT_API_URL``):
    workers of the deployment's pool run them; state is read back from Prefect, results
    from the shared artifact store. Jobs survive a restart of the service."""

    deployment: str = "clean-labels/local"

    def _check_can_run(self) -> None:
        """Prefect workers train, not this process."""

    def _recover(self) -> None:
        for job_id in list_jobs(self.store):
            record = self._load(job_id)
            if record is not None:
                with self._lock:
                    self._records[job_id] = record

    def _launch(self, record: JobRecord) -> None:
        from prefect.deployments import run_deployment

        try:
            run = run_deployment(
                self.deployment,
                parameters={"settings": record.spec, "job_id": record.job_id},
                timeout=0,
            )
        except Exception as err:
            record.state, record.end_time = FAILED, _now()
            record.error = f"could not create a run of deployment {self.deployment}: {err}"
            self._save(record)
            raise OrchestratorUnavailable(record.error) from err
        record.flow_run_id = str(run.id)  # type: ignore[union-attr]
        self._save(record)

    def _flow_run(self, record: JobRecord) -> Any:
        from prefect import get_client

        with get_client(sync_client=True) as client:
            return client.read_flow_run(uuid.UUID(record.flow_run_id))

    def _refresh(self, record: JobRecord) -> JobRecord:
        if not record.flow_run_id:
            return record
        try:
            run = self._flow_run(record)
        except Exception as err:
            logger.warning("job %s: cannot read its flow run: %s", record.job_id, err)
            return record
        prefect_state = run.state.type.value if run.state is not None else "PENDING"
        state = _PREFECT_STATES.get(prefect_state, record.state)
        if state == SUCCEEDED and not self._job(record.job_id).is_complete():
            state = FAILED
            record.error = "the flow run completed but the job has no manifest"
        if state == record.state:
            return record
        record.state = state
        if state == RUNNING and record.start_time is None:
            record.start_time = _now()
        if state in TERMINAL:
            record.end_time = _now()
            if state != SUCCEEDED and not record.error:
                record.error = (run.state.message or prefect_state.lower()) if run.state else ""
        self._save(record)
        return record

    def cancel(self, job_id: str) -> JobRecord:
        from prefect import get_client
        from prefect.states import Cancelling

        record = self.get(job_id)
        if record.terminal or not record.flow_run_id:
            return record
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(uuid.UUID(record.flow_run_id), Cancelling(), force=True)
        record.error = "cancelled"
        self._save(record)
        return self.get(job_id)

    def shutdown(self, *, cancel: bool = True) -> None:
        with self._lock:
            self._closed = True  # runs belong to Prefect: they go on without this service
