"""Cleaning jobs behind the service: submit, track, cancel, read back.

A job's record lives in the artifact store next to its artifacts (``jobs/<id>/job.json``),
so a restarted service still answers for finished jobs. Embedded mode (no Prefect API
configured) runs each job as ``noisescore clean --job-id <id>`` in a child process — the
same ``clean-labels`` flow as everywhere — in a bounded pool of ``job_workers``; a child
process can be cancelled (terminated) and cannot take the server down with it.

Whether a job that this process does not run is alive is read from its lease
(``jobs/<id>/lease.json``, :class:`noisescore.jobs.Lease`): the service holds it for its
queued jobs and hands it to the child, whose flow refreshes it until it ends. So

- a job started outside the service (``noisescore clean --job-id X`` on the same store) is
  RUNNING while its lease is alive and SUCCEEDED once its manifest exists;
- on start, a job left RUNNING by a service process that died is adopted when its process
  still runs on this host (watched, and cancellable), left alone while another host's
  lease is fresh, and FAILED once its lease is dead;
- a FAILED job is rerun under the same id when it is resubmitted with its idempotency key
  (the flow reuses its stored warm-up checkpoint when the settings match).

Active cleaning jobs (spec ``kind: active``) run ``noisescore active-clean``. When a relabel
round needs an expert the child writes the round's queue and ``waiting.json``
(:class:`noisescore.relabels.RelabelBook`) and exits with :data:`EXIT_WAITING_FOR_LABELS`:
the job is WAITING_FOR_LABELS and holds no worker. Once the round is closed
(``SubmitRelabels``) :meth:`JobManager.resume` queues the same command again; the flow goes
on from its stored checkpoints. A restarted service keeps waiting jobs waiting and relaunches
those whose round was closed meanwhile.

Idempotency keys are claimed in the store (:meth:`ArtifactStore.claim`), so replicas of
the service sharing one store agree on one job per key; a key reused with a different
spec is refused (:class:`IdempotencyConflict`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

from noisescore.jobs import (
    LEASE,
    MANIFEST,
    IncompleteJob,
    JobStore,
    Lease,
    list_jobs,
    new_job_id,
    read_lease,
    validate_job_id,
)
from noisescore.ml.model_names import training_runtime_available
from noisescore.relabels import RelabelBook
from noisescore.storage import (
    ArtifactNotFound,
    ArtifactStore,
    CorruptArtifact,
    StorageError,
    StorageUnavailable,
)

logger = logging.getLogger(__name__)

RECORD = "job.json"
WAITING_FILE = "waiting.json"  # noisescore.relabels.WAITING
LOG = "job.log"
IDEMPOTENCY_PREFIX = "idempotency/"
DEFAULT_LEASE_TTL_S = 60.0
CLAIM_WAIT_S = 10.0  # how long a loser of a key waits for the winner's job record
ADOPT_POLL_S = 1.0
ERROR_CHARS = 500

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED",
)  # fmt: skip
WAITING_FOR_LABELS = "WAITING_FOR_LABELS"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, WAITING_FOR_LABELS)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE = "active"  # spec["kind"] of an active cleaning job
EXIT_WAITING_FOR_LABELS = 75  # EX_TEMPFAIL: the child stopped to wait for an expert

# Service secrets a job process never needs (it needs the store's credentials, which stay):
# bearer tokens, TLS key material and the client-side equivalents. Matched case-insensitively,
# as pydantic-settings reads them.
CHILD_ENV_DENYLIST = frozenset(
    {
        "NOISESCORE_AUTH_TOKENS",
        "NOISESCORE_TLS_CERT",
        "NOISESCORE_TLS_KEY",
        "NOISESCORE_TLS_CLIENT_CA",
        "NOISESCORE_TOKEN",
        "NOISESCORE_TLS_CA",
        "NOISESCORE_TLS_CLIENT_CERT",
        "NOISESCORE_TLS_CLIENT_KEY",
    }
)


class JobNotFound(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class NoTrainingRuntime(RuntimeError):
    """FAILED_PRECONDITION: jobs would run here, but this install cannot train (the
    service image has no torch); they must go through Prefect workers instead."""


class QueueFull(RuntimeError):
    """More jobs are waiting than the service accepts (``max_queue``)."""


class IdempotencyConflict(RuntimeError):
    """ALREADY_EXISTS: the idempotency key names a job with a different spec."""


class NotCancellable(RuntimeError):
    """FAILED_PRECONDITION: the job runs in a process this service cannot signal."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def is_active(spec: dict[str, Any]) -> bool:
    """Whether ``spec`` is an active cleaning job's (``kind: active``, or the settings of one
    started outside the service, which name an ``lnl_method``)."""
    return spec.get("kind") == ACTIVE or "lnl_method" in spec


def _spec_digest(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


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
    attempt: int = 0  # reruns of a FAILED job under the same id
    # Not stored: the record was made from the job's artifacts (no job.json: a job started
    # outside the service), or the stored state is corrupt (GetJob answers DATA_LOSS).
    external: bool = field(default=False, compare=False)
    damage: str = field(default="", compare=False)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def to_bytes(self) -> bytes:
        stored = asdict(self)
        stored.pop("external")
        stored.pop("damage")
        return json.dumps(stored, indent=2).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> JobRecord:
        """Parse a stored record; :class:`ValueError` when it is not a valid one."""
        try:
            stored = json.loads(data)
        except (ValueError, RecursionError) as err:
            raise ValueError(f"not JSON: {err}") from err
        if not isinstance(stored, dict):
            raise ValueError(f"expected an object, found {type(stored).__name__}")
        known = {f.name for f in fields(cls)} - {"external", "damage"}
        values = {k: v for k, v in stored.items() if k in known}
        for name in ("job_id", "state", "create_time"):
            if not isinstance(values.get(name), str):
                raise ValueError(f"{name!r} is missing or not a string")
        validate_job_id(values["job_id"])
        if values["state"] not in STATES:
            raise ValueError(f"state {values['state']!r} is not one of {', '.join(STATES)}")
        if not isinstance(values.get("spec"), dict):
            raise ValueError("'spec' is missing or not an object")
        for name in ("start_time", "end_time"):
            if values.get(name) is not None and not isinstance(values[name], str):
                raise ValueError(f"{name!r} is not a string")
        for name in ("error", "idempotency_key", "owner", "flow_run_id"):
            if not isinstance(values.get(name, ""), str):
                raise ValueError(f"{name!r} is not a string")
        if type(values.get("attempt", 0)) is not int:
            raise ValueError("'attempt' is not an integer")
        return cls(**values)


@dataclass
class _Running:
    process: subprocess.Popen[bytes] | None = None
    cancelled: bool = False
    lease_started: str = ""


@dataclass
class _Adopted:
    lease: Lease
    cancelled: bool = False


_FILE_URI = re.compile(r"file://[^\s'\",;()\[\]]*")
_ABS_PATH = re.compile(r"(?<![\w:/.~-])/[^\s'\",;()\[\]]+")
_LISTING = re.compile(r";? *datasets available there: [^.]*\.?")


def public_error(message: str) -> str:
    """What a caller may read of a job's error: no server paths (``file://`` URIs and
    absolute paths become ``<server path>``), no listing of the data dir, at most
    :data:`ERROR_CHARS` characters. The full message stays in the server's log."""
    text = _LISTING.sub("", message)
    text = _FILE_URI.sub("<server path>", text)
    text = _ABS_PATH.sub("<server path>", text)
    if len(text) > ERROR_CHARS:
        text = text[: ERROR_CHARS - 3] + "..."
    return text


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without the service's secrets, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in CHILD_ENV_DENYLIST}
    env.update(extra or {})
    return env


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
        Extra environment of the child processes (the store settings are inherited; the
        service's tokens and TLS settings are not, see :data:`CHILD_ENV_DENYLIST`).
    lease_ttl : float
        Seconds a job's lease is valid without a heartbeat (``NOISESCORE_JOB_LEASE_TTL``).
    """

    store: ArtifactStore
    workers: int = 1
    max_queue: int = 16
    command: Callable[[str, list[str]], list[str]] | None = None
    env: dict[str, str] = field(default_factory=dict)
    on_change: Callable[[], None] | None = None
    lease_ttl: float = DEFAULT_LEASE_TTL_S

    def __post_init__(self) -> None:
        self.instance = uuid.uuid4().hex
        self._lock = threading.RLock()
        self._lease_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="job")
        self._running: dict[str, _Running] = {}
        self._adopted: dict[str, _Adopted] = {}
        self._records: dict[str, JobRecord] = {}
        self._resumed: dict[str, int] = {}  # job -> the closed round it was relaunched for
        self._closed = False
        self._stop = threading.Event()
        # Child logs: a private folder (0700) of this process, files opened O_EXCL|O_NOFOLLOW.
        self._log_dir = tempfile.mkdtemp(prefix="noisescore-jobs-")
        self._recover()
        self._heartbeat = threading.Thread(
            target=self._beat_forever, name="job-leases", daemon=True
        )
        self._heartbeat.start()

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

    def _read_record(self, job: JobStore) -> tuple[JobRecord | None, str]:
        """The stored record and, when ``job.json`` exists but is not one, why."""
        try:
            return JobRecord.from_bytes(job.get(RECORD, verify=False)), ""
        except ArtifactNotFound:
            return None, ""
        except StorageUnavailable:
            raise
        except (ValueError, TypeError, CorruptArtifact) as err:
            logger.warning("job %s: unreadable %s (%s)", job.job_id, RECORD, err)
            return None, f"{RECORD} is corrupt"

    def _load(self, job_id: str, names: set[str] | None = None) -> JobRecord | None:
        """The job as the store tells it now; ``names`` (the job's files, from a listing)
        saves the existence checks."""
        job = self._job(job_id)
        record, damage = self._read_record(job)
        if record is None:
            return self._external(job, damage, names)
        return self._settle(record, names)

    def _complete(self, job: JobStore, names: set[str] | None) -> bool:
        return MANIFEST in names if names is not None else job.is_complete()

    def _external(self, job: JobStore, damage: str, names: set[str] | None) -> JobRecord | None:
        """A job without a (readable) ``job.json``: one made outside the service
        (``noisescore clean``, a deployment) on this store, judged by its files."""
        has = (lambda n: n in names) if names is not None else job.exists
        lease = read_lease(job) if names is None or LEASE in names else None
        complete = self._complete(job, names)
        if not (complete or damage or lease is not None or has("spec.json")):
            return None
        spec = self._spec_of(job)
        created = spec.get("created") if isinstance(spec.get("created"), str) else None
        settings: dict[str, Any] = (
            spec["settings"] if isinstance(spec.get("settings"), dict) else {}
        )
        started = created or (lease.started if lease is not None else None)
        record = JobRecord(
            job.job_id, FAILED, settings, create_time=started or _now(), start_time=started,
            external=True,
        )  # fmt: skip
        if complete:
            record.state = SUCCEEDED
            record.end_time = self._published_at(job)
        elif lease is not None and lease.alive():
            record.state = RUNNING
        elif not damage and has(WAITING_FILE):  # `noisescore active-clean` waits for an expert
            record.state = WAITING_FOR_LABELS
        elif damage:
            record.error = f"the job's stored state is corrupt ({damage})"
        else:
            record.error = "started outside this service and not published: " + self._dead_reason(
                lease
            )
        record.damage = damage if record.state != SUCCEEDED else ""
        return record

    @staticmethod
    def _dead_reason(lease: Lease | None) -> str:
        if lease is None:
            return "no process holds its lease"
        return f"its process ({lease.describe()}) is gone"

    def _published_at(self, job: JobStore) -> str | None:
        """When the manifest says the job was published (None if it cannot say)."""
        try:
            created = job.read_manifest().get("created")
        except (IncompleteJob, CorruptArtifact):
            return None
        return created if isinstance(created, str) else None

    def _settle(self, record: JobRecord, names: set[str] | None = None) -> JobRecord:
        """Bring a stored record that this process does not run up to date with the store:
        a manifest makes it SUCCEEDED (whoever ran it), a dead lease makes a queued or
        running job FAILED. Prefect-mode records are Prefect's to settle."""
        with self._lock:
            watched = record.job_id in self._running or record.job_id in self._adopted
        if watched or record.flow_run_id:
            return record
        job = self._job(record.job_id)
        if record.state == FAILED and self._complete(job, names):
            return self._succeeded_elsewhere(record, job)
        if record.terminal:
            return record
        if record.state == WAITING_FOR_LABELS:
            return record  # no process while it waits: the lease is gone on purpose
        lease = read_lease(job)
        if lease is not None and lease.alive():
            return record
        # The owner saves the final record before it releases the lease: read again.
        fresh, _ = self._read_record(job)
        if fresh is not None and (fresh.terminal or fresh.attempt != record.attempt):
            return fresh
        if job.is_complete():
            return self._succeeded_elsewhere(record, job)
        was = record.state.lower()
        record.state, record.end_time = FAILED, _now()
        if record.idempotency_key:
            retry = (
                "resubmit it with the same idempotency key to rerun it under this id (the "
                "rerun reuses the stored warm-up when the warm-up had finished)"
            )
        else:
            retry = "submit it again (it had no idempotency key, so it cannot be rerun)"
        record.error = (
            f"the job's process or its service stopped while the job was {was} "
            f"({self._dead_reason(lease)}); {retry}"
        )
        with contextlib.suppress(StorageError):
            self._save(record)
        return record

    def _succeeded_elsewhere(self, record: JobRecord, job: JobStore) -> JobRecord:
        record.state, record.error = SUCCEEDED, ""
        record.end_time = self._published_at(job) or record.end_time or _now()
        with contextlib.suppress(StorageError):
            self._save(record)
        return record

    def _spec_of(self, job: JobStore) -> dict[str, Any]:
        """``spec.json`` of a job (``settings``, ``created``…), empty if unreadable."""
        try:
            spec = json.loads(job.get("spec.json", verify=False))
        except (StorageError, ValueError, RecursionError):
            return {}
        return spec if isinstance(spec, dict) else {}

    def _recover(self) -> None:
        """Settle what previous service processes left: FAILED where the job's process is
        gone, adopted where it still runs on this host."""
        for job_id in list_jobs(self.store):
            record = self._load(job_id)
            if record is None:
                continue
            if not record.external or record.state == SUCCEEDED:
                with self._lock:
                    self._records[job_id] = record
            if record.state == RUNNING:
                self._maybe_adopt(record)
            elif record.state == WAITING_FOR_LABELS and not record.external:
                self._resume_if_answered(record)

    # ------------------------------------------------------------------- adoption

    def _maybe_adopt(self, record: JobRecord) -> None:
        """Watch a job whose live process runs on this host but not under this service
        (a previous service process died): it can then be cancelled, and ends settled."""
        with self._lock:
            if record.job_id in self._running or record.job_id in self._adopted:
                return
        lease = read_lease(self._job(record.job_id))
        if lease is None or not lease.on_this_host or not lease.alive():
            return
        with self._lock:
            self._adopted[record.job_id] = _Adopted(lease)
        logger.info("job %s: adopted its running process (%s)", record.job_id, lease.describe())
        threading.Thread(
            target=self._watch_adopted, args=(record.job_id,), name=f"adopt-{record.job_id}",
            daemon=True,
        ).start()  # fmt: skip

    def _watch_adopted(self, job_id: str) -> None:
        while not self._stop.wait(ADOPT_POLL_S):
            with self._lock:
                adopted = self._adopted.get(job_id)
            if adopted is None:
                return
            if adopted.lease.process_alive():
                continue
            try:  # still adopted while settling: readers do not judge it meanwhile
                self._finish_adopted(job_id, adopted)
            except StorageError as err:
                logger.warning("job %s: could not settle the adopted job: %s", job_id, err)
            finally:
                with self._lock:
                    self._adopted.pop(job_id, None)
            return

    def _finish_adopted(self, job_id: str, adopted: _Adopted) -> None:
        job = self._job(job_id)
        record, _ = self._read_record(job)
        if record is None or record.terminal:
            with self._lock:
                self._records.pop(job_id, None)  # an external job: judged on each read
            return
        record.end_time = _now()
        if job.is_complete():
            record.state, record.error = SUCCEEDED, ""
            record.end_time = self._published_at(job) or record.end_time
        elif adopted.cancelled:
            record.state, record.error = CANCELLED, "cancelled while running"
        else:
            record.state = FAILED
            record.error = (
                f"the job's process ({adopted.lease.describe()}) ended without publishing "
                "after the service that started it stopped"
            )
        self._save(record)
        with contextlib.suppress(StorageError):
            job.store.delete(job.key(LEASE))

    # ------------------------------------------------------------------- API

    def get(self, job_id: str) -> JobRecord:
        record = self._get(job_id)
        return record if record.terminal else self._refresh(record)

    def _refresh(self, record: JobRecord) -> JobRecord:
        """Where another system owns the job's state (Prefect mode), read it from there."""
        return record

    def _get(self, job_id: str, names: set[str] | None = None) -> JobRecord:
        with self._lock:
            record = self._records.get(job_id)
            ours = job_id in self._running  # this process's runner owns its state
        stale = record is None or not (record.terminal or ours)
        if record is not None and record.state == FAILED and not ours:
            # A FAILED job becomes SUCCEEDED when its process publishes after all, or
            # QUEUED again when a replica reruns it.
            stale = True
        if stale:
            loaded = self._load(job_id, names)
            if loaded is not None:
                record = loaded
                with self._lock:
                    if not loaded.external or loaded.state == SUCCEEDED:
                        self._records[job_id] = loaded
        if record is None:
            raise JobNotFound(f"job {job_id} not found")
        return record

    def records(self, state: str | None = None) -> list[JobRecord]:
        """All jobs, newest first (by creation time, then id)."""
        names: dict[str, set[str]] = {}
        for key in self.store.list("jobs/"):
            parts = key.split("/", 2)
            if len(parts) == 3:
                names.setdefault(parts[1], set()).add(parts[2])
        ids = set(names)  # one listing tells every job's files (no stat per job)
        with self._lock:
            ids |= set(self._records)
        records = []
        for job_id in ids:
            try:
                validate_job_id(job_id)
                record = self._get(job_id, names.get(job_id, set()))
            except (JobNotFound, ValueError):
                continue
            records.append(record if record.terminal else self._refresh(record))
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

    def _check_open(self) -> None:
        if self._closed:
            raise QueueFull("the service is shutting down")
        if self.queue_depth() >= self.max_queue:
            raise QueueFull(
                f"{self.max_queue} jobs are already queued (NOISESCORE_MAX_QUEUE); "
                "retry later or cancel some"
            )

    def submit(self, spec: dict[str, Any], *, idempotency_key: str = "") -> JobRecord:
        """Queue a job for ``spec`` (CleanSettings fields).

        The same idempotency key gives the same job, across restarts and replicas (the key
        is claimed in the store); with a different spec it is :class:`IdempotencyConflict`;
        when that job FAILED, it is rerun under its id.
        """
        self._check_can_run()
        if self._closed:
            raise QueueFull("the service is shutting down")
        if not idempotency_key:
            return self._enqueue(
                JobRecord(new_job_id(), QUEUED, spec, create_time=_now(), owner=self.instance)
            )
        digest = _spec_digest(spec)
        job_id = new_job_id()
        claim = {"job_id": job_id, "spec_sha256": digest, "claimed": _now()}
        won = self.store.claim(self._key_name(idempotency_key), json.dumps(claim).encode())
        winner, winner_digest = _parse_claim(won)
        if winner == job_id:
            return self._enqueue(
                JobRecord(
                    job_id,
                    QUEUED,
                    spec,
                    create_time=_now(),
                    idempotency_key=idempotency_key,
                    owner=self.instance,
                )
            )
        existing = self._await_record(winner)
        stored_digest = _spec_digest(existing.spec) if existing is not None else winner_digest
        if existing is not None and existing.external:
            stored_digest = winner_digest  # an external record's spec is the full settings
        if stored_digest is not None and stored_digest != digest:
            raise IdempotencyConflict(
                f"idempotency key {idempotency_key[:64]!r} already names job jobs/{winner} "
                "with a different spec; send the same spec to get that job, or use a new key "
                "for a new job"
            )
        if existing is None:  # the replica that won the key died before queueing the job
            existing = JobRecord(
                winner, FAILED, spec, create_time=_now(), idempotency_key=idempotency_key,
                error="the service that claimed this key stopped before queueing the job",
            )  # fmt: skip
        if existing.state == FAILED:
            return self._retry(existing)
        return existing

    def _key_name(self, key: str) -> str:
        return IDEMPOTENCY_PREFIX + hashlib.sha256(key.encode()).hexdigest()

    def _await_record(self, job_id: str) -> JobRecord | None:
        """The job another submission of the same key created (it writes the record right
        after winning the key)."""
        deadline = time.monotonic() + CLAIM_WAIT_S
        while True:
            try:
                return self._get(job_id)
            except JobNotFound:
                if time.monotonic() > deadline:
                    return None
            time.sleep(0.1)

    def _retry(self, record: JobRecord) -> JobRecord:
        """Rerun a FAILED job under its id; one replica wins each attempt."""
        attempt = record.attempt + 1
        mine = json.dumps({"instance": self.instance, "claimed": _now()}).encode()
        job = self._job(record.job_id)
        if self.store.claim(job.key(f"attempts/{attempt}.json"), mine) != mine:
            time.sleep(0.2)
            return self._await_record(record.job_id) or record
        lease = read_lease(job)
        if lease is not None and lease.alive():
            return record  # its process still runs after all: nothing to rerun
        logger.info("job %s: rerun (attempt %d) after: %s", record.job_id, attempt, record.error)
        return self._enqueue(
            replace(
                record,
                state=QUEUED,
                attempt=attempt,
                error="",
                start_time=None,
                end_time=None,
                owner=self.instance,
                external=False,
                damage="",
            )
        )

    def _enqueue(self, record: JobRecord) -> JobRecord:
        with self._lock:
            self._check_open()
            self._running[record.job_id] = _Running()
            try:
                self._write_lease(record.job_id)  # before the record: readers never see a
                self._save(record)  # queued job without a live lease
            except BaseException:
                self._running.pop(record.job_id, None)
                raise
        self._launch(record)
        return record

    def _launch(self, record: JobRecord) -> None:
        self._pool.submit(self._run, record.job_id)

    def _by_key(self, key: str) -> str | None:
        try:
            return _parse_claim(self.store.get_bytes(self._key_name(key)))[0]
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
            adopted = self._adopted.get(job_id)
        if running is None and adopted is None:
            if record.state == RUNNING and not record.flow_run_id:
                self._maybe_adopt(record)  # e.g. a noisescore clean on this host
                with self._lock:
                    adopted = self._adopted.get(job_id)
            if adopted is None and record.state == RUNNING:
                lease = read_lease(self._job(job_id))
                where = lease.describe() if lease is not None else "no lease"
                raise NotCancellable(
                    f"job {job_id} runs in a process this service cannot stop ({where}); "
                    "cancel it where it runs"
                )
        if adopted is not None:
            if adopted.lease.signal(signal.SIGTERM):
                adopted.cancelled = True
            elif adopted.lease.process_alive():
                raise NotCancellable(
                    f"job {job_id}: its process ({adopted.lease.describe()}) cannot be "
                    "signalled from this service"
                )
            return record
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # the child and its own children
        if record.state == QUEUED or running is None:
            record = replace(
                record, state=CANCELLED, end_time=_now(), error="cancelled before it started"
            )
            self._save(record)
            self._drop_lease(job_id)
        return self.get(job_id)

    def wait(self, job_id: str, timeout: float | None = None) -> JobRecord:
        """Block until the job is terminal (tests, CLI ``--wait``)."""
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
        self._stop.set()
        for job_id in list(self._running):  # queued jobs that never started
            self._drop_lease(job_id)
        shutil.rmtree(self._log_dir, ignore_errors=True)

    # ------------------------------------------------------------------- leases

    def _write_lease(self, job_id: str) -> None:
        """The lease of a job this process holds: its child once started, else itself."""
        with self._lock:
            running = self._running.get(job_id)
        if running is None:
            return
        process = running.process
        pid = process.pid if process is not None and process.poll() is None else os.getpid()
        if process is not None and process.poll() is not None:
            return  # the child ended: _run_process releases the lease
        lease = Lease.of_process(job_id, pid, self.lease_ttl, running.lease_started)
        running.lease_started = lease.started
        with self._lease_lock:
            # A plain membership test (atomic under the GIL), not under self._lock: _enqueue
            # takes self._lock and then this lock, so taking them the other way round here
            # deadlocked a heartbeat against a submission.
            if job_id not in self._running:
                return
            self._job(job_id).put(LEASE, lease.to_bytes(), content_type="application/json")

    def _drop_lease(self, job_id: str) -> None:
        with self._lease_lock, contextlib.suppress(StorageError):
            self.store.delete(self._job(job_id).key(LEASE))

    def _beat_forever(self) -> None:
        while not self._stop.wait(self.lease_ttl / 3):
            with self._lock:
                ids = list(self._running)
            for job_id in ids:
                try:
                    self._write_lease(job_id)
                except Exception as err:  # best effort: a lease that lapses is re-judged
                    logger.warning("job %s: could not refresh its lease: %s", job_id, err)

    # ------------------------------------------------------------------- running

    def _argv(self, job_id: str, record: JobRecord) -> list[str]:
        args = ["--job-id", job_id, "--quiet"]
        for name, value in record.spec.items():
            if value is None or value is False or name == "kind":
                continue
            flag = "--" + name.replace("_", "-")
            if isinstance(value, list | tuple):  # dataset_roots: --dataset-roots takes JSON
                value = json.dumps(list(value))
            args += [flag] if value is True else [flag, str(value)]
        if self.command is not None:
            return self.command(job_id, args)
        verb = "active-clean" if is_active(record.spec) else "clean"
        return [sys.executable, "-m", "noisescore.cli", verb, *args]

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
                record = replace(record, state=FAILED, end_time=_now())
                record.error = public_error(f"the service could not run the job: {err}")
                try:
                    self._save(record)
                except StorageError:
                    with self._lock:  # at least this process answers correctly
                        self._records[job_id] = record
            self._drop_lease(job_id)

    def _open_log(self, job_id: str) -> tuple[str, int]:
        path = os.path.join(self._log_dir, f"{job_id}.{uuid.uuid4().hex[:8]}.log")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return path, os.open(path, flags, 0o600)

    def _run_process(self, job_id: str) -> None:
        record = self.get(job_id)
        with self._lock:
            running = self._running.setdefault(job_id, _Running())
            if running.cancelled or record.terminal:
                self._running.pop(job_id, None)
                return
            record = replace(record, state=RUNNING, start_time=_now())
            self._save(record)
            log_path, log = self._open_log(job_id)
            try:
                running.process = subprocess.Popen(
                    self._argv(job_id, record),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=child_environment(self.env),
                    start_new_session=True,  # a process group: cancel reaches its children
                )
            except BaseException:
                os.unlink(log_path)  # the job never started: no log is left behind
                raise
            finally:
                os.close(log)
        try:
            self._write_lease(job_id)  # now the child's: it outlives this process
        except StorageError as err:
            logger.warning("job %s: could not hand its lease to the child: %s", job_id, err)
        try:
            code = running.process.wait()
            # Still ours until the outcome is saved: readers keep the cached RUNNING record
            # instead of judging the job by its (now dead) process.
            record = replace(self._get(job_id))
            record.end_time = _now()
            tail = _tail(log_path)
            waiting = again = None
            with self._lock:
                resumed_for = self._resumed.pop(job_id, None)
            if code == EXIT_WAITING_FOR_LABELS and not running.cancelled:
                waiting = self._waiting_round(job_id)
                if waiting is not None and waiting == resumed_for:
                    waiting, again = None, resumed_for  # a loop: relaunched for it, waits again
            if running.cancelled:
                record.state, record.error = CANCELLED, "cancelled while running"
            elif waiting is not None:
                record.state, record.error, record.end_time = WAITING_FOR_LABELS, "", None
                logger.info("job %s: waits for the labels of round %d", job_id, waiting)
            elif code == 0 and self._job(job_id).is_complete():
                record.state, record.error = SUCCEEDED, ""
            elif again is not None:
                record.state = FAILED
                record.error = (
                    f"the job was resumed with the answers of relabel round {again} and stopped "
                    "again to wait for that round"
                )
            elif code == EXIT_WAITING_FOR_LABELS:
                record.state = FAILED
                record.error = (
                    f"the job's process exited with code {code} (waiting for labels) but the "
                    f"job waits for no relabel round (no readable {WAITING_FILE})"
                )
            else:
                record.state = FAILED
                reason = _error_line(tail) or f"the cleaning process exited with code {code}"
                logger.warning("job %s failed: %s", job_id, reason)  # paths stay in the log
                record.error = public_error(reason)
            try:
                self._job(job_id).put(LOG, tail.encode(), content_type="text/plain")
            except StorageError as err:
                logger.warning("job %s: could not store its log: %s", job_id, err)
            self._save(record)  # the outcome first, then the lease goes (see _settle)
            with self._lock:
                self._running.pop(job_id, None)
            self._drop_lease(job_id)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(log_path)
        if record.state == WAITING_FOR_LABELS:
            # The round may have been closed while the child was still on its way out:
            # resume() found it RUNNING then and left it to us.
            self._resume_if_answered(record)

    # ------------------------------------------------------------------- waiting for labels

    def _waiting_round(self, job_id: str) -> int | None:
        """The round the job's ``waiting.json`` names, None when none (or unreadable)."""
        try:
            return RelabelBook(self._job(job_id)).waiting()
        except CorruptArtifact as err:
            logger.warning("job %s: %s", job_id, err)
            return None

    def _round_closed(self, job_id: str) -> bool:
        """Whether the round the job waits for is closed."""
        waiting = self._waiting_round(job_id)
        return waiting is not None and RelabelBook(self._job(job_id)).is_closed(waiting)

    def _resume_if_answered(self, record: JobRecord) -> None:
        try:
            self.resume(record.job_id)
        except StorageError as err:
            logger.warning("job %s: cannot tell whether its round closed: %s", record.job_id, err)

    def resume(self, job_id: str) -> JobRecord:
        """Go on with a job WAITING_FOR_LABELS whose round is closed: queue the same command
        again (the flow resumes from its stored checkpoints). Any other job is returned
        unchanged (a child about to wait is resumed when it has exited).
        """
        record = self._get(job_id)
        if record.state != WAITING_FOR_LABELS or record.external or not self._round_closed(job_id):
            return record
        with self._lock:
            record = self._get(job_id)  # again under the lock: one relaunch
            if record.state != WAITING_FOR_LABELS or job_id in self._running or self._closed:
                return record  # closed: the next service process relaunches it (_recover)
            logger.info("job %s: its relabel round closed; resuming it", job_id)
            record = replace(record, state=QUEUED, error="", end_time=None)
            self._running[job_id] = _Running()
            waiting = self._waiting_round(job_id)
            if waiting is not None:
                self._resumed[job_id] = waiting
            try:
                self._write_lease(job_id)  # before the record, as in _enqueue
                self._save(record)
            except BaseException:
                self._running.pop(job_id, None)
                raise
        self._launch(record)
        return record

    # ------------------------------------------------------------------- results

    def report(self, job_id: str) -> dict[str, Any]:
        report = json.loads(self._job(job_id).get("report.json"))
        if not isinstance(report, dict):
            raise CorruptArtifact(f"job {job_id}: report.json is not a JSON object")
        return report

    def manifest(self, job_id: str) -> dict[str, Any]:
        return self._job(job_id).read_manifest()

    def progress(self, job_id: str) -> dict[str, Any]:
        try:
            progress = json.loads(self._job(job_id).get("progress.json", verify=False))
        except (ArtifactNotFound, IncompleteJob, CorruptArtifact, ValueError, RecursionError):
            return {}
        return progress if isinstance(progress, dict) else {}


def _parse_claim(data: bytes) -> tuple[str, str | None]:
    """(job id, spec digest) of an idempotency claim; older services stored the bare id."""
    try:
        claim = json.loads(data)
    except (ValueError, RecursionError):
        claim = None
    if isinstance(claim, dict) and isinstance(claim.get("job_id"), str):
        digest = claim.get("spec_sha256")
        return claim["job_id"], digest if isinstance(digest, str) else None
    text = data.decode(errors="replace").strip()
    try:
        return validate_job_id(text), None
    except ValueError as err:
        raise CorruptArtifact(f"idempotency claim {text[:80]!r} names no job") from err


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
    # PAUSED covers Prefect's Paused and Suspended: the active-clean flow waiting for input.
    "SCHEDULED": QUEUED, "PENDING": QUEUED, "PAUSED": WAITING_FOR_LABELS,
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
    active_deployment: str = "active-clean/local"

    def _check_can_run(self) -> None:
        """Prefect workers train, not this process."""

    def _settle(self, record: JobRecord, names: set[str] | None = None) -> JobRecord:
        """A stored record here is a Prefect run's: :meth:`_refresh` reads its state."""
        return record

    def _enqueue(self, record: JobRecord) -> JobRecord:
        """No lease from this process: the flow on the worker takes it when it runs."""
        with self._lock:
            self._check_open()
        self._save(record)
        self._launch(record)
        return record

    def _recover(self) -> None:
        for job_id in list_jobs(self.store):
            record = self._load(job_id)
            if record is not None:
                with self._lock:
                    self._records[job_id] = record

    def _launch(self, record: JobRecord) -> None:
        from prefect.deployments import run_deployment

        deployment = self.active_deployment if is_active(record.spec) else self.deployment
        settings = {k: v for k, v in record.spec.items() if k != "kind"}
        try:
            run = run_deployment(
                deployment,
                parameters={"settings": settings, "job_id": record.job_id},
                timeout=0,
            )
        except Exception as err:
            record.state, record.end_time = FAILED, _now()
            record.error = f"could not create a run of deployment {deployment}: {err}"
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
        if state == WAITING_FOR_LABELS and not is_active(record.spec):
            return record  # a clean-labels run paused by hand: not waiting for labels
        if state == WAITING_FOR_LABELS and record.state == WAITING_FOR_LABELS:
            # Still suspended though its round is closed: resuming it failed before; retry.
            self._retry_resume(record)
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

    def resume(self, job_id: str) -> JobRecord:
        """Resume the job's suspended flow run; the flow reads the answers from the store
        (the input it is resumed with stays empty)."""
        from prefect.flow_runs import NotPausedError, resume_flow_run

        record = self.get(job_id)
        if not record.flow_run_id or record.terminal or not self._round_closed(job_id):
            return record
        try:
            resume_flow_run(uuid.UUID(record.flow_run_id), run_input={"rows": []})
        except NotPausedError:
            # Not suspended (yet): the flow checks whether its round is closed before it
            # suspends, and reads the answers from the store either way.
            logger.info("job %s: its flow run is not paused; nothing to resume", job_id)
        except Exception as err:
            raise OrchestratorUnavailable(
                f"job {job_id}: the round is closed but its flow run could not be resumed "
                f"({err}); the service retries when the job is read next (GetJob)"
            ) from err
        return self.get(job_id)

    def _retry_resume(self, record: JobRecord) -> None:
        try:
            if not self._round_closed(record.job_id):
                return
            from prefect.flow_runs import NotPausedError, resume_flow_run

            with contextlib.suppress(NotPausedError):
                resume_flow_run(uuid.UUID(record.flow_run_id), run_input={"rows": []})
        except Exception as err:  # best effort: the next read tries again
            logger.warning("job %s: could not resume its flow run: %s", record.job_id, err)

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
        self._stop.set()
        shutil.rmtree(self._log_dir, ignore_errors=True)
