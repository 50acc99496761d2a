"""The artifacts of one cleaning job, under ``jobs/<job_id>/`` of an artifact store.

A finished job holds :data:`JOB_FILES` and, written last, ``manifest.json``, which records
the size and sha256 of every file. The manifest's presence is what "complete" means: a job
that is running, failed or was never published has none, and a reader that finds one can
verify every file against it (:meth:`JobStore.verify`). Other keys (checkpoints, progress,
plots) may live under the same prefix; they are verified only if the manifest lists them.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from noisescore.storage import (
    ArtifactNotFound,
    ArtifactRef,
    ArtifactStore,
    ChecksumMismatch,
    StorageError,
    sha256_hex,
    validate_key,
)

__all__ = [
    "JOBS_PREFIX",
    "JOB_FILES",
    "MANIFEST",
    "MANIFEST_FORMAT",
    "IncompleteJob",
    "JobStore",
    "list_jobs",
    "new_job_id",
    "validate_job_id",
]

JOBS_PREFIX = "jobs/"
MANIFEST = "manifest.json"
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

    Attributes
    ----------
    store : ArtifactStore
    job_id : str
    prefix : str
        ``"jobs/<job_id>/"``, the folder of every key of this job.
    """

    def __init__(self, store: ArtifactStore, job_id: str) -> None:
        self.store = store
        self.job_id = validate_job_id(job_id)
        self.prefix = f"{JOBS_PREFIX}{self.job_id}/"

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
            raise ArtifactNotFound(
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
        StorageError
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
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StorageError(f"{self.url(MANIFEST)} is not valid JSON: {exc}") from exc
        problem = _manifest_problem(manifest, self.job_id)
        if problem:
            raise StorageError(f"{self.url(MANIFEST)} is malformed: {problem}")
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
            raise ArtifactNotFound(
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
