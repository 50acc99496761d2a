"""The artifacts of one cleaning job, under ``jobs/<job_id>/`` of an artifact store.

A finished job holds :data:`JOB_FILES` and, written last, ``manifest.json``, which records
the size and sha256 of every file. The manifest's presence is what "complete" means: a job
that is running, failed or was never published has none, and a reader that finds one can
verify every file against it (:meth:`JobStore.verify`). Other keys (checkpoints, progress,
plots) may live under the same prefix; they are verified only if the manifest lists them.

A manifest that is malformed or names another job, and a listed file that is missing, are
:class:`~noisescore.storage.CorruptArtifact` (like a checksum mismatch): the store holds
data that contradicts itself, which no retry repairs.

While a process runs a job it holds the job's lease, ``lease.json`` (:class:`JobLease`):
host, pid, the process's start time and a heartbeat. A reader tells a job that is running
from one whose process died (:meth:`Lease.alive`) without asking the process that started it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import threading
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from noisescore.storage import (
    ArtifactNotFound,
    ArtifactRef,
    ArtifactStore,
    ChecksumMismatch,
    CorruptArtifact,
    StorageError,
    sha256_hex,
    validate_key,
)

__all__ = [
    "JOBS_PREFIX",
    "JOB_FILES",
    "LEASE",
    "MANIFEST",
    "MANIFEST_FORMAT",
    "IncompleteJob",
    "JobAlreadyRunning",
    "JobLease",
    "JobStore",
    "Lease",
    "MissingArtifact",
    "list_jobs",
    "new_job_id",
    "read_lease",
    "validate_job_id",
]

logger = logging.getLogger(__name__)

JOBS_PREFIX = "jobs/"
MANIFEST = "manifest.json"
LEASE = "lease.json"
MANIFEST_FORMAT = "noisescore.job.v1"
JOB_FILES: tuple[str, ...] = (
    "spec.json",
    "noisy_labels.npy",
    "trust_by_epoch.npy",
    "trust.csv",
    "report.json",
    "model.pt",
    "model.onnx",
)
"""The files every complete job holds, besides the manifest."""

_JOB_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_RESERVED = ("format", "job_id", "created", "files")


class IncompleteJob(StorageError):
    """The job has no ``manifest.json``: it is still running, failed, or was never published."""


class MissingArtifact(ArtifactNotFound, CorruptArtifact):
    """A complete job lacks a file: listed in its manifest but not stored, or one of
    :data:`JOB_FILES` not listed at all."""


def new_job_id() -> str:
    """Return a fresh random job id: 16 lower-case hex characters."""
    return uuid.uuid4().hex[:16]


def validate_job_id(job_id: str) -> str:
    """Return ``job_id`` if it is valid, else raise :class:`ValueError`.

    A job id is 1 to 63 characters of ``a-z``, ``0-9`` and ``-``, starting with a letter
    or digit (AIP-122 style), so that it is safe in keys, URLs and Kubernetes names.
    """
    if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id):
        raise ValueError(
            f"invalid job id {job_id!r}: use 1-63 characters of a-z, 0-9 and '-', "
            f"starting with a letter or digit (regex ^[a-z0-9][a-z0-9-]{{0,62}}$)"
        )
    return job_id


class JobStore:
    """Read and write the artifacts of one job in an :class:`ArtifactStore`.

    Parameters
    ----------
    store : ArtifactStore
        Where the job lives.
    job_id : str
        The job's id; see :func:`validate_job_id`.
    root : str
        Folder of the store holding such jobs (``"benchmarks/"`` for ``lnl-benchmark``
        runs, which the service's job listing does not show).

    Attributes
    ----------
    store : ArtifactStore
    job_id : str
    prefix : str
        ``"<root><job_id>/"`` (``"jobs/<job_id>/"``), the folder of every key of this job.
    """

    def __init__(self, store: ArtifactStore, job_id: str, *, root: str = JOBS_PREFIX) -> None:
        self.store = store
        self.job_id = validate_job_id(job_id)
        self.prefix = f"{validate_key(root, prefix=True)}{self.job_id}/"

    def __repr__(self) -> str:
        return f"JobStore({self.store!r}, {self.job_id!r})"

    def key(self, name: str) -> str:
        """Return the store key of ``name``, e.g. ``"report.json"`` or ``"checkpoints/a.pt"``."""
        return self.prefix + validate_key(name)

    def url(self, name: str = "") -> str:
        """Return the URL of ``name``, or of the job's folder when ``name`` is empty."""
        return self.store.url(self.key(name) if name else self.prefix)

    def put(
        self, name: str, data: bytes, *, content_type: str = "application/octet-stream"
    ) -> ArtifactRef:
        """Store ``data`` as ``name``; the returned ref's ``name`` is ``name``."""
        ref = self.store.put_bytes(self.key(name), data, content_type=content_type)
        return ArtifactRef(name=name, size=ref.size, sha256=ref.sha256)

    def get(self, name: str, *, verify: bool = True) -> bytes:
        """Return the bytes of ``name``.

        Parameters
        ----------
        name : str
            File name inside the job.
        verify : bool
            Check the bytes against the manifest: the job must be complete
            (:class:`IncompleteJob`), list ``name`` (:class:`ArtifactNotFound`) and the
            size and sha256 must match (:class:`ChecksumMismatch`). ``False`` reads what is
            stored, e.g. a checkpoint of a job still running.
        """
        if not verify:
            return self.store.get_bytes(self.key(name))
        files = self.read_manifest()["files"]
        if name not in files:
            # Every complete job has JOB_FILES: one that is not listed is damage.
            kind = MissingArtifact if name in JOB_FILES else ArtifactNotFound
            raise kind(
                f"job {self.job_id}: {name!r} is not listed in {self.url(MANIFEST)}; "
                f"listed: {', '.join(sorted(files)) or 'nothing'}"
            )
        return self._read_verified(name, files[name])

    def exists(self, name: str) -> bool:
        """Return whether ``name`` is stored (whether or not the manifest lists it)."""
        return self.store.exists(self.key(name))

    def ref(self, name: str) -> ArtifactRef:
        """Read ``name`` back and describe what is stored now."""
        data = self.store.get_bytes(self.key(name))
        return ArtifactRef(name=name, size=len(data), sha256=sha256_hex(data))

    def write_manifest(self, refs: Iterable[ArtifactRef], **extra: Any) -> ArtifactRef:
        """Write ``manifest.json`` listing ``refs``: the job is complete from then on.

        Parameters
        ----------
        refs : iterable of ArtifactRef
            What :meth:`put` returned, one per file. Each file's stored size is checked
            first, so a manifest never lists a file that is missing or was overwritten.
        **extra
            JSON-serialisable fields added to the manifest (e.g. ``noisescore_version``);
            ``format``, ``job_id``, ``created`` and ``files`` are reserved.

        Returns
        -------
        ArtifactRef
            The manifest's own ref.

        Raises
        ------
        StorageError
            If a file is missing or its stored size differs from its ref.
        ValueError
            If a name is listed twice with different content, a reserved field is given,
            or ``extra`` is not JSON-serialisable.
        """
        reserved = sorted(set(extra) & set(_RESERVED))
        if reserved:
            raise ValueError(f"manifest fields {reserved} are reserved; rename them")
        files: dict[str, ArtifactRef] = {}
        for ref in refs:
            if ref.name == MANIFEST:
                raise ValueError(f"{MANIFEST} cannot list itself")
            if ref.name in files and files[ref.name] != ref:
                raise ValueError(
                    f"job {self.job_id}: {ref.name!r} listed twice with different content"
                )
            files[ref.name] = ref
        for name, ref in sorted(files.items()):
            try:
                stored = self.store.size(self.key(name))
            except ArtifactNotFound as exc:
                raise StorageError(
                    f"job {self.job_id}: cannot publish, {name} is not stored at {self.url(name)}"
                ) from exc
            if stored != ref.size:
                raise StorageError(
                    f"job {self.job_id}: cannot publish, {name} is {stored} bytes in the store "
                    f"but its ref says {ref.size}; it was overwritten or truncated"
                )
        manifest = {
            "format": MANIFEST_FORMAT,
            "job_id": self.job_id,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": {name: ref.as_dict() for name, ref in sorted(files.items())},
            **extra,
        }
        try:
            text = json.dumps(manifest, indent=2, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"manifest fields must be JSON-serialisable: {exc}") from exc
        return self.put(MANIFEST, (text + "\n").encode(), content_type="application/json")

    def read_manifest(self) -> dict[str, Any]:
        """Return the parsed ``manifest.json``.

        Raises
        ------
        IncompleteJob
            If there is none yet.
        CorruptArtifact
            If it is not a valid ``noisescore.job.v1`` manifest of this job.
        """
        try:
            raw = self.store.get_bytes(self.key(MANIFEST))
        except ArtifactNotFound as exc:
            raise IncompleteJob(
                f"job {self.job_id} has no {MANIFEST}: it is still running, failed, or was "
                f"never published ({self.url()})"
            ) from exc
        try:
            manifest = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CorruptArtifact(f"{self.url(MANIFEST)} is not valid JSON: {exc}") from exc
        problem = _manifest_problem(manifest, self.job_id)
        if problem:
            raise CorruptArtifact(f"{self.url(MANIFEST)} is malformed: {problem}")
        return manifest

    def is_complete(self) -> bool:
        """Return whether the job has a manifest (was published)."""
        return self.store.exists(self.key(MANIFEST))

    def verify(self) -> dict[str, ArtifactRef]:
        """Read every file the manifest lists and check its size and sha256.

        Returns
        -------
        dict of str to ArtifactRef
            The verified files, by name.

        Raises
        ------
        IncompleteJob
            If there is no manifest.
        ArtifactNotFound
            If a listed file is missing.
        ChecksumMismatch
            On the first file whose size or sha256 differs.
        """
        files = self.read_manifest()["files"]
        verified = {}
        for name in sorted(files):
            data = self._read_verified(name, files[name])
            verified[name] = ArtifactRef(name=name, size=len(data), sha256=sha256_hex(data))
        return verified

    def _read_verified(self, name: str, expected: dict[str, Any]) -> bytes:
        """Return the bytes of ``name`` if they match the manifest entry ``expected``."""
        try:
            data = self.store.get_bytes(self.key(name))
        except ArtifactNotFound as exc:
            raise MissingArtifact(
                f"job {self.job_id}: {name} is listed in {MANIFEST} but missing at {self.url(name)}"
            ) from exc
        digest = sha256_hex(data)
        if len(data) != expected["size"] or digest != expected["sha256"]:
            raise ChecksumMismatch(
                f"job {self.job_id}: {name} is corrupt at {self.url(name)}: expected sha256 "
                f"{expected['sha256']} ({expected['size']} bytes), found sha256 {digest} "
                f"({len(data)} bytes)"
            )
        return data


def _manifest_problem(manifest: Any, job_id: str) -> str | None:
    """Return what is wrong with a parsed manifest, or ``None`` if it is valid."""
    if not isinstance(manifest, dict):
        return f"expected a JSON object, found {type(manifest).__name__}"
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}"
    if manifest.get("job_id") != job_id:
        return f"job_id is {manifest.get('job_id')!r}, expected {job_id!r}"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "'files' is not an object of name -> {size, sha256}"
    for name, entry in files.items():
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and not isinstance(entry.get("size"), bool)
            and isinstance(entry.get("sha256"), str)
        )
        if not ok:
            return f"entry {name!r} is not {{'size': int, 'sha256': str}}"
        try:
            validate_key(name)
        except ValueError as exc:
            return str(exc)
    return None


def list_jobs(store: ArtifactStore) -> list[str]:
    """Return the ids of the jobs with any object under ``jobs/``, sorted.

    Folders whose name is not a valid job id (see :func:`validate_job_id`) are skipped.
    """
    ids = set()
    for key in store.list(JOBS_PREFIX):
        parts = key[len(JOBS_PREFIX) :].split("/")
        if len(parts) > 1 and _JOB_ID_RE.fullmatch(parts[0]):
            ids.add(parts[0])
    return sorted(ids)


# ----------------------------------------------------------------------------- leases


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat``), or ``""``
    when it does not exist or this is not Linux: with the boot id, a pid that was reused by
    another process is not taken for the one that held a lease."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    fields = text.rsplit(")", 1)[-1].split()  # the command name may hold spaces
    return fields[19] if len(fields) > 19 else ""


def _command_line(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return [a.decode(errors="replace") for a in handle.read().split(b"\0") if a]
    except OSError:
        return []


def _stamp(when: datetime | None = None) -> str:
    when = when or datetime.now(UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Lease:
    """Who runs a job: ``jobs/<id>/lease.json``.

    Attributes
    ----------
    job_id : str
    host : str
        ``socket.gethostname()`` of the process.
    boot_id : str
        The host's boot id (Linux), so a rebooted host's old pids mean nothing.
    pid : int
    pid_start : str
        :func:`process_start` of ``pid``.
    started, heartbeat : str
        ISO-8601 UTC: when the lease was first taken and last refreshed.
    ttl_s : float
        Seconds the lease stays valid after ``heartbeat`` (the writer refreshes it every
        third of that).
    """

    job_id: str
    host: str
    boot_id: str
    pid: int
    pid_start: str
    started: str
    heartbeat: str
    ttl_s: float

    @classmethod
    def of_process(cls, job_id: str, pid: int, ttl_s: float, started: str = "") -> Lease:
        now = _stamp()
        return cls(
            job_id, socket.gethostname(), _boot_id(), pid, process_start(pid),
            started or now, now, float(ttl_s),
        )  # fmt: skip

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> Lease:
        """Parse a lease; :class:`ValueError` if it is not one."""
        try:
            fields = json.loads(data)
            lease = cls(
                job_id=str(fields["job_id"]), host=str(fields["host"]),
                boot_id=str(fields["boot_id"]), pid=int(fields["pid"]),
                pid_start=str(fields["pid_start"]), started=str(fields["started"]),
                heartbeat=str(fields["heartbeat"]), ttl_s=float(fields["ttl_s"]),
            )  # fmt: skip
            datetime.fromisoformat(lease.heartbeat.replace("Z", "+00:00"))
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            raise ValueError(f"not a job lease: {exc}") from exc
        return lease

    @property
    def on_this_host(self) -> bool:
        """The lease was taken on this host, since its last boot."""
        return self.host == socket.gethostname() and self.boot_id == _boot_id() != ""

    def process_alive(self) -> bool:
        """On this host: the process still exists and is the one that took the lease."""
        return self.pid > 0 and self.pid_start != "" and process_start(self.pid) == self.pid_start

    def alive(self, now: datetime | None = None) -> bool:
        """Whether the job's process is still running.

        On the host that holds the lease the process table decides (a killed process is
        dead at once, a live one is alive even if its heartbeat thread stalls); elsewhere
        the heartbeat must be younger than ``ttl_s``, by this host's clock.
        """
        if self.on_this_host:
            return self.process_alive()
        beat = datetime.fromisoformat(self.heartbeat.replace("Z", "+00:00"))
        return ((now or datetime.now(UTC)) - beat).total_seconds() <= self.ttl_s

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, last heartbeat {self.heartbeat}"

    def signal(self, signum: int = signal.SIGTERM) -> bool:
        """Send ``signum`` to the job's process (its process group when it leads one).

        Only on the host that holds the lease, only while the pid is still the process
        that took it, and only when that process's command line names the job (``--job-id
        <id>``): a lease is data in the store, and whoever can write the store must not be
        able to make the service signal arbitrary processes. Returns whether it was sent.
        """
        if not (self.on_this_host and self.process_alive()):
            return False
        if self.job_id not in _command_line(self.pid):
            logger.warning(
                "job %s: not signalling pid %d: its command line does not name the job",
                self.job_id, self.pid,
            )  # fmt: skip
            return False
        try:
            if os.getpgid(self.pid) == self.pid:
                os.killpg(self.pid, signum)
            else:
                os.kill(self.pid, signum)
        except ProcessLookupError:
            return False
        return True


def read_lease(job: JobStore) -> Lease | None:
    """The job's lease, or None when there is none or it is unreadable (a dead lease)."""
    try:
        data = job.store.get_bytes(job.key(LEASE))
    except ArtifactNotFound:
        return None
    except CorruptArtifact as exc:
        logger.warning("job %s: %s", job.job_id, exc)
        return None
    try:
        lease = Lease.from_bytes(data)
    except ValueError as exc:
        logger.warning("job %s: unreadable %s (%s)", job.job_id, LEASE, exc)
        return None
    return lease if lease.job_id == job.job_id else None


class JobAlreadyRunning(ValueError):
    """A live process holds the job's lease: the same job id cannot run twice at once."""


class JobLease:
    """Hold a job's lease while the block runs: write it, refresh it every ``ttl_s / 3``
    seconds from a daemon thread, delete it on the way out (when it is still ours).

    A failed refresh is logged and retried at the next beat: a flaky store must not stop
    the job, and a lease that then expires only makes readers think the job died.
    """

    def __init__(self, job: JobStore, ttl_s: float, *, pid: int | None = None) -> None:
        self.job = job
        self.ttl_s = ttl_s
        self.pid = os.getpid() if pid is None else pid
        self._started = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        lease = Lease.of_process(self.job.job_id, self.pid, self.ttl_s, self._started)
        self._started = lease.started
        self.job.put(LEASE, lease.to_bytes(), content_type="application/json")

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.beat()
            except Exception as exc:  # best effort, see the class docstring
                logger.warning("job %s: could not refresh its lease: %s", self.job.job_id, exc)

    def __enter__(self) -> JobLease:
        held = read_lease(self.job)
        # The service writes the lease of a job it starts, naming itself until the child
        # runs, then the child: both may be the holder here.
        if held is not None and held.pid not in (self.pid, os.getppid()) and held.alive():
            raise JobAlreadyRunning(
                f"job {self.job.job_id} is already running ({held.describe()}); use another "
                "job id, or cancel that run first"
            )
        try:
            self.beat()
        except StorageError as exc:  # the job's first step reports an unusable store
            logger.warning("job %s: could not take its lease: %s", self.job.job_id, exc)
        self._thread = threading.Thread(
            target=self._run, name=f"lease-{self.job.job_id}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        release_lease(self.job, self.pid)


def release_lease(job: JobStore, pid: int) -> None:
    """Delete the job's lease if ``pid`` holds it (best effort: it expires anyway)."""
    with contextlib.suppress(StorageError):
        lease = read_lease(job)
        if lease is not None and lease.pid == pid and lease.on_this_host:
            job.store.delete(job.key(LEASE))
