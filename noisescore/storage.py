"""One artifact-store interface with two backends: a local directory and MinIO/S3.

Keys are relative, ``/``-separated names such as ``"jobs/3f2a/report.json"``; they are
validated once, here, so a backend never sees ``..``, an absolute path or a backslash.
:func:`open_store` picks the backend from :class:`~noisescore.settings.StoreSettings`:
an S3 endpoint when one is configured, else the local ``store_dir``.

Errors form one small hierarchy so that callers (flows, the service) can decide what to
retry: :class:`StorageUnavailable` (server unreachable, timeout, 5xx) is worth retrying,
:class:`ArtifactNotFound` and the other :class:`StorageError` s are not;
:class:`CorruptArtifact` (a checksum mismatch, a malformed manifest, a symbolic link in a
local store) is stored data that contradicts itself, which no retry repairs.

:meth:`ArtifactStore.claim` creates a key only if nobody else did (idempotency keys shared
by service replicas): ``O_EXCL`` semantics locally, a claim protocol on S3 (see there).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import secrets
import stat
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

if TYPE_CHECKING:
    # Imported lazily: noisescore.settings pulls in timm/torch (~3.5 s), which a store
    # client (the service, a notebook reading results) does not need.
    from noisescore.settings import StoreSettings

__all__ = [
    "ArtifactNotFound",
    "ArtifactRef",
    "ArtifactStore",
    "ChecksumMismatch",
    "CorruptArtifact",
    "LocalStore",
    "ObjectTooLarge",
    "S3Store",
    "StorageError",
    "StorageUnavailable",
    "UnsafeArtifact",
    "open_store",
    "parse_endpoint",
    "sha256_hex",
    "validate_key",
]

T = TypeVar("T")


class StorageError(RuntimeError):
    """An artifact could not be stored or read; the message says what and where."""


class StorageUnavailable(StorageError):
    """The store cannot be reached (refused, timed out, reset, 5xx): retrying may help."""


class ArtifactNotFound(StorageError):
    """The key does not exist in the store."""


class ObjectTooLarge(StorageError):
    """An object is larger than the caller allows (:meth:`S3Store.download_object`)."""


class CorruptArtifact(StorageError):
    """Stored data is corrupt or inconsistent (DATA_LOSS): a retry cannot repair it."""


class ChecksumMismatch(CorruptArtifact):
    """A stored artifact's size or sha256 differs from the one recorded when it was written."""


class UnsafeArtifact(CorruptArtifact):
    """A local store key is a symbolic link or a special file: it is never followed or read
    (a link could point anywhere outside the store)."""


@dataclass(frozen=True)
class ArtifactRef:
    """What was stored: a name, its size in bytes and its sha256.

    Parameters
    ----------
    name : str
        The key relative to the prefix the caller used: the full key for
        :meth:`ArtifactStore.put_bytes`, the file name inside the job for
        :meth:`noisescore.jobs.JobStore.put` (e.g. ``"report.json"``).
    size : int
        Number of bytes.
    sha256 : str
        Hex digest (64 lower-case characters) of the bytes.
    """

    name: str
    size: int
    sha256: str

    def as_dict(self) -> dict[str, int | str]:
        """Return ``{"size": ..., "sha256": ...}`` as recorded in a manifest."""
        return {"size": self.size, "sha256": self.sha256}


def sha256_hex(data: bytes) -> str:
    """Return the hex sha256 digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- keys

_KEY_RULE = (
    "keys are relative, '/'-separated paths like 'jobs/abc/report.json': no leading '/', "
    "no backslashes, no empty, '.' or '..' parts"
)


def validate_key(key: str, *, prefix: bool = False) -> str:
    """Return ``key`` if it is a valid artifact key, else raise :class:`ValueError`.

    Parameters
    ----------
    key : str
        The key, e.g. ``"jobs/abc/report.json"``.
    prefix : bool
        Validate a listing prefix instead: ``""`` and a trailing ``/`` are allowed
        (``"jobs/"``), and the last part may be a partial name (``"jobs/ab"``).

    Raises
    ------
    ValueError
        If the key is empty (unless ``prefix``), absolute, contains a backslash, or has
        an empty, ``.`` or ``..`` part.
    """
    if not isinstance(key, str):
        raise ValueError(f"artifact key must be a string, got {type(key).__name__}; {_KEY_RULE}")
    if key == "" and prefix:
        return key
    parts = key.split("/")
    if prefix and parts[-1] == "":
        parts = parts[:-1]
    bad = (
        key == ""
        or key.startswith("/")
        or "\\" in key
        or "\x00" in key
        or any(part in ("", ".", "..") for part in parts)
    )
    if bad:
        what = "prefix" if prefix else "key"
        raise ValueError(f"invalid artifact {what} {key!r}: {_KEY_RULE}")
    return key


# --------------------------------------------------------------------------- interface


class ArtifactStore(ABC):
    """Bytes under keys, with the same behaviour whatever the backend.

    Every method validates its key (:func:`validate_key`) and raises :class:`ValueError`
    for a bad one, :class:`ArtifactNotFound` for a missing one where a value is needed,
    :class:`StorageUnavailable` when the backend cannot be reached and
    :class:`StorageError` for anything else.
    """

    @abstractmethod
    def put_bytes(
        self, key: str, data: bytes, *, content_type: str = "application/octet-stream"
    ) -> ArtifactRef:
        """Store ``data`` under ``key`` (replacing any old value, atomically) and describe it.

        Returns
        -------
        ArtifactRef
            ``name`` is ``key``; ``size`` and ``sha256`` are computed from ``data``.
        """

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Return the bytes stored under ``key``; :class:`ArtifactNotFound` if missing."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Return whether an artifact is stored under ``key``."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Return the size in bytes of ``key``; :class:`ArtifactNotFound` if missing."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Return every key that starts with ``prefix`` (recursively), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""

    @abstractmethod
    def url(self, key: str = "") -> str:
        """Return a URL for ``key`` (or a prefix): ``file:///...`` or ``s3://bucket/...``."""

    @abstractmethod
    def check(self) -> None:
        """Make sure the store is usable; :class:`StorageUnavailable` if it is not."""

    @abstractmethod
    def claim(self, key: str, data: bytes) -> bytes:
        """Store ``data`` under ``key`` unless a value is there or being claimed; return the
        value that holds the key afterwards (``data`` itself when this call won).

        Concurrent callers, in any process or on any host sharing the store, all get the
        same winner's bytes. Used for idempotency keys and job attempts.
        """


# --------------------------------------------------------------------------- local


def _is_temp_name(name: str) -> bool:
    """Return whether ``name`` is an in-progress atomic write (``.name.XXXX.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp")


_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC


class LocalStore(ArtifactStore):
    """Artifacts as files under a root directory.

    Writes go to a hidden temporary name in the key's folder, are flushed to disk and
    renamed into place, so a reader sees the old file or the new one, never half of one;
    the hidden temporary files are not listed.

    Symbolic links inside the store are never followed: every folder of a key is opened
    with ``O_NOFOLLOW`` relative to its parent (``openat``), the file itself too, so a link
    planted in the store (``jobs/x/trust.csv -> /etc/passwd``, or a linked ``jobs/x``)
    cannot make the store read or write outside its root. Reading such a key raises
    :class:`UnsafeArtifact`; writing replaces the link itself. The root may be a link (an
    operator's choice); it is resolved once, here.

    Parameters
    ----------
    root : str or pathlib.Path
        The directory; created on the first write or by :meth:`check`.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    # -- link-safe access: every component opened relative to its parent, no links

    def _open_folder(self, key: str, *, create: bool = False) -> tuple[int, str]:
        """Open the folder of ``key`` (never through a link); return its fd and the name."""
        parts = validate_key(key).split("/")
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
        try:
            for part in parts[:-1]:
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except NotADirectoryError:
                    # O_DIRECTORY|O_NOFOLLOW on a link is ENOTDIR on Linux: say ELOOP.
                    if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                        raise OSError(errno.ELOOP, "a symbolic link", part) from None
                    raise
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):  # a concurrent writer's
                        os.mkdir(part, 0o777, dir_fd=fd)
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd, parts[-1]

    def _lstat(self, key: str) -> os.stat_result | None:
        """``lstat`` of ``key`` without following links; None when it does not exist."""
        try:
            folder, name = self._open_folder(key)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            self._raise_os(exc, "read", key)
        try:
            return os.stat(name, dir_fd=folder, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            self._raise_os(exc, "read", key)
        finally:
            os.close(folder)

    def _raise_os(self, exc: OSError, action: str, key: str) -> NoReturn:
        if exc.errno == errno.ELOOP:
            raise UnsafeArtifact(
                f"cannot {action} {self.url(key)}: a symbolic link is in the way; the local "
                "store never follows links inside its root"
            ) from exc
        raise StorageError(f"cannot {action} {self.url(key)}: {exc}") from exc

    def put_bytes(
        self, key: str, data: bytes, *, content_type: str = "application/octet-stream"
    ) -> ArtifactRef:
        self._write(key, data, replace=True)
        return ArtifactRef(name=key, size=len(data), sha256=sha256_hex(data))

    def _write(self, key: str, data: bytes, *, replace: bool) -> bool:
        """Write ``data`` to a temporary file and rename (``replace``) or link (not
        ``replace``: ``False`` when ``key`` exists) it into place."""
        try:
            folder, name = self._open_folder(key, create=True)
        except OSError as exc:
            self._raise_os(exc, "write", key)
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC
            fd = os.open(tmp, flags, 0o666, dir_fd=folder)  # the umask applies
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                if replace:
                    os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
                    return True
                try:
                    os.link(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
                except FileExistsError:
                    return False
                return True
            finally:
                with contextlib.suppress(FileNotFoundError):  # renamed away, or linked
                    os.unlink(tmp, dir_fd=folder)
        except OSError as exc:
            self._raise_os(exc, "write", key)
        finally:
            os.close(folder)

    def get_bytes(self, key: str) -> bytes:
        try:
            folder, name = self._open_folder(key)
            try:
                # O_NONBLOCK: a FIFO planted in the store must not block the reader.
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC
                fd = os.open(name, flags, dir_fd=folder)
            finally:
                os.close(folder)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ArtifactNotFound(f"{self.url(key)} does not exist") from exc
        except OSError as exc:
            self._raise_os(exc, "read", key)
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            if stat.S_ISDIR(mode):
                raise ArtifactNotFound(f"{self.url(key)} does not exist (it is a folder)")
            raise UnsafeArtifact(f"{self.url(key)} is not a regular file; it is not read")
        with os.fdopen(fd, "rb") as handle:
            try:
                return handle.read()
            except OSError as exc:
                raise StorageError(f"cannot read {self.url(key)}: {exc}") from exc

    def exists(self, key: str) -> bool:
        found = self._lstat(key)
        return found is not None and stat.S_ISREG(found.st_mode)

    def size(self, key: str) -> int:
        found = self._lstat(key)
        if found is None or stat.S_ISDIR(found.st_mode):
            raise ArtifactNotFound(f"{self.url(key)} does not exist")
        if not stat.S_ISREG(found.st_mode):
            raise UnsafeArtifact(f"{self.url(key)} is a link or special file; it is not read")
        return found.st_size

    def list(self, prefix: str = "") -> list[str]:
        validate_key(prefix, prefix=True)
        # Walk only the deepest folder the prefix names; the rest is a string match.
        # Links are neither followed nor listed (os.scandir's is_dir/is_file without them).
        parts = prefix.split("/")[:-1]
        if parts and self._lstat("/".join(parts)) is None:
            return []
        folder = self.root.joinpath(*parts)
        keys: list[str] = []

        def walk(path: Path, base: str) -> None:
            try:
                entries = list(os.scandir(path))
            except (FileNotFoundError, NotADirectoryError):
                return
            except OSError as exc:
                raise StorageError(f"cannot list {self.url(base)}: {exc}") from exc
            for entry in entries:
                key = f"{base}{entry.name}"
                if entry.is_dir(follow_symlinks=False):
                    if key.startswith(prefix) or prefix.startswith(key + "/"):
                        walk(Path(entry.path), key + "/")
                elif (
                    entry.is_file(follow_symlinks=False)
                    and not _is_temp_name(entry.name)
                    and key.startswith(prefix)
                ):
                    keys.append(key)

        if folder.is_dir() and not (parts and folder.is_symlink()):
            walk(folder, "".join(f"{p}/" for p in parts))
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            folder, name = self._open_folder(key)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            self._raise_os(exc, "delete", key)
        try:
            found = os.stat(name, dir_fd=folder, follow_symlinks=False)
            if stat.S_ISDIR(found.st_mode):
                return
            os.unlink(name, dir_fd=folder)  # a link itself, never its target
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise StorageError(f"cannot delete {self.url(key)}: {exc}") from exc
        finally:
            os.close(folder)

    def claim(self, key: str, data: bytes) -> bytes:
        """``O_EXCL`` semantics: the full value is written to a temporary file and hard-linked
        to ``key``; the link fails when ``key`` exists, atomically."""
        if self._write(key, data, replace=False):
            return data
        return self.get_bytes(key)

    def url(self, key: str = "") -> str:
        validate_key(key, prefix=True)
        return f"{self.root.as_uri().rstrip('/')}/{key}"

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"local store {self.root} cannot be created: {exc}") from exc
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageUnavailable(f"local store {self.root} is not writable")


# --------------------------------------------------------------------------- s3

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_RETRY_STATUS = (500, 502, 503, 504)
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "NotFound"}
_AUTH_CODES = {
    "AccessDenied",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
}
_UNAVAILABLE_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"}
_CODE_IN_XML = re.compile(r"<Code>\s*([^<\s]+)\s*</Code>")
# urllib3.exceptions.HTTPError covers MaxRetryError, NewConnectionError, ProtocolError,
# (Read/Connect)TimeoutError; the builtins cover a reset socket that escapes urllib3.
_NETWORK_ERRORS = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


def parse_endpoint(endpoint: str, *, secure: bool = False) -> tuple[str, bool]:
    """Split ``endpoint`` into the ``host[:port]`` that minio wants and the TLS flag.

    Parameters
    ----------
    endpoint : str
        ``"host:port"``, ``"http://host:port"`` or ``"https://host:port"``; a scheme
        decides TLS, overriding ``secure``.
    secure : bool
        TLS when the endpoint has no scheme.

    Raises
    ------
    ValueError
        If the endpoint has another scheme, a path, credentials, or a bad port.
    """
    text = endpoint.strip() if isinstance(endpoint, str) else ""
    how = "give host:port, http://host:port or https://host:port (e.g. 127.0.0.1:9000)"
    if not text:
        raise ValueError(f"S3 endpoint is empty; {how}")
    scheme = None
    rest = text
    if "://" in text:
        scheme, rest = text.split("://", 1)
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"S3 endpoint {endpoint!r} has scheme {scheme!r}; {how}")
    rest = rest.removesuffix("/")
    try:
        parts = urlsplit(f"//{rest}")
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"S3 endpoint {endpoint!r} is not host:port ({exc}); {how}") from exc
    if not parts.hostname or parts.path or parts.query or parts.fragment or "@" in rest:
        raise ValueError(f"S3 endpoint {endpoint!r} is not host:port; {how}")
    if rest.endswith(":"):
        raise ValueError(f"S3 endpoint {endpoint!r} has an empty port; {how}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    hostport = f"{host}:{port}" if port is not None else host
    return hostport, (scheme == "https") if scheme else secure


def _validate_bucket(bucket: str) -> str:
    if not isinstance(bucket, str) or not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise ValueError(
            f"invalid S3 bucket name {bucket!r}: use 3-63 characters of a-z, 0-9, '.' and '-', "
            f"starting and ending with a letter or digit"
        )
    return bucket


def _error_code(exc: MinioException) -> tuple[int | None, str | None]:
    """Return ``(HTTP status, S3 error code)`` of a minio exception, where known.

    Some S3 servers (``rclone serve s3``, measured) answer errors as ``text/xml``; minio
    7.2 accepts only ``application/xml`` and raises :class:`InvalidResponseError`, whose
    status and body are private attributes, instead of :class:`S3Error`.
    """
    if isinstance(exc, S3Error):
        status = getattr(exc.response, "status", None)
        return status, exc.code
    if isinstance(exc, ServerError):
        return exc.status_code, None
    if isinstance(exc, InvalidResponseError):
        status = getattr(exc, "_code", None)
        match = _CODE_IN_XML.search(getattr(exc, "_body", None) or "")
        return status if isinstance(status, int) else None, match.group(1) if match else None
    return None, None


class S3Store(ArtifactStore):
    """Artifacts as objects in one MinIO/S3 bucket.

    Parameters
    ----------
    endpoint : str
        ``"host:port"``, ``"http://host:port"`` or ``"https://host:port"``.
    bucket : str
        Bucket for the artifacts; :meth:`check` creates it when missing.
    access_key, secret_key : str or None
        Credentials; ``None`` for anonymous access. Never shown in messages or ``repr``.
    secure : bool
        TLS when ``endpoint`` has no scheme.
    region : str
        Region used for request signing (MinIO and rclone accept ``"us-east-1"``).
    timeout : float
        Seconds to wait for a connection (reads wait three times as long). Failed
        connections and 5xx answers are retried twice with a 0.2 s backoff, so a dead
        server fails in about a second rather than minio's default minutes.
    """

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        access_key: str | None,
        secret_key: str | None,
        *,
        secure: bool = False,
        region: str = "us-east-1",
        timeout: float = 10.0,
    ) -> None:
        hostport, secure = parse_endpoint(endpoint, secure=secure)
        self.bucket = _validate_bucket(bucket)
        self.endpoint = f"{'https' if secure else 'http'}://{hostport}"
        retries = urllib3.Retry(
            total=2, backoff_factor=0.2, status_forcelist=_RETRY_STATUS, raise_on_status=True
        )
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout, read=3 * timeout), retries=retries
        )
        self._client = Minio(
            hostport,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http,
        )

    @classmethod
    def from_settings(cls, settings: StoreSettings, *, bucket: str | None = None) -> S3Store:
        """Build the store of ``settings`` (``bucket`` overrides ``settings.s3_bucket``)."""
        if not settings.s3_endpoint:
            raise ValueError("no S3 endpoint configured: set NOISESCORE_S3_ENDPOINT")
        access = settings.s3_access_key
        secret = settings.s3_secret_key
        return cls(
            settings.s3_endpoint,
            bucket or settings.s3_bucket,
            access.get_secret_value() if access is not None else None,
            secret.get_secret_value() if secret is not None else None,
            secure=settings.s3_secure,
            region=settings.s3_region,
        )

    def __repr__(self) -> str:
        return f"S3Store(endpoint={self.endpoint!r}, bucket={self.bucket!r})"

    # -- error translation

    def _raise_s3(self, exc: MinioException, action: str, bucket: str, key: str) -> NoReturn:
        status, code = _error_code(exc)
        where = f"s3://{bucket}/{key}"
        if code == "NoSuchBucket":
            raise ArtifactNotFound(
                f"{where} does not exist: bucket {bucket!r} not found at {self.endpoint}"
            ) from exc
        if code in _NOT_FOUND_CODES or status == 404:
            raise ArtifactNotFound(f"{where} does not exist at {self.endpoint}") from exc
        if code in _AUTH_CODES or status in (401, 403):
            raise StorageError(
                f"storage at {self.endpoint} refused to {action} {where} ({code or status}); "
                f"check NOISESCORE_S3_ACCESS_KEY and NOISESCORE_S3_SECRET_KEY"
            ) from exc
        if code in _UNAVAILABLE_CODES or (status is not None and status >= 500):
            raise StorageUnavailable(
                f"storage at {self.endpoint} is unavailable: {action} {where} failed "
                f"with HTTP {status} ({code or 'no error code'})"
            ) from exc
        raise StorageError(
            f"storage at {self.endpoint} failed to {action} {where}: "
            f"HTTP {status}, {code or type(exc).__name__}"
        ) from exc

    def _call(self, action: str, bucket: str, key: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` and turn minio/urllib3 exceptions into this module's errors."""
        try:
            return fn()
        except _NETWORK_ERRORS as exc:
            raise StorageUnavailable(
                f"storage at {self.endpoint} is unreachable: {action} s3://{bucket}/{key} "
                f"failed ({type(exc).__name__}: {exc})"
            ) from exc
        except MinioException as exc:
            self._raise_s3(exc, action, bucket, key)

    # -- any bucket (dataset URIs)

    def get_object(self, bucket: str, key: str) -> bytes:
        """Return the object ``key`` of ``bucket`` (any bucket, same credentials)."""
        _validate_bucket(bucket)
        validate_key(key)

        def read() -> bytes:
            response = self._client.get_object(bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._call("read", bucket, key, read)

    def download_object(self, bucket: str, key: str, dest: Path, *, max_bytes: int) -> int:
        """Write the object ``key`` of ``bucket`` to the file ``dest``; return its size.

        Objects over ``max_bytes`` raise :class:`ObjectTooLarge`: checked from the object's
        size before the transfer and again while streaming (a size that lies does not get
        further). A partly written ``dest`` is left for the caller's temporary folder.
        """
        _validate_bucket(bucket)
        validate_key(key)
        where = f"s3://{bucket}/{key}"

        def too_large(size: int) -> ObjectTooLarge:
            return ObjectTooLarge(f"{where} is {size:,d} bytes, over the limit of {max_bytes:,d}")

        def fetch() -> int:
            size = self._client.stat_object(bucket, key).size
            if size is not None and size > max_bytes:
                raise too_large(size)
            response = self._client.get_object(bucket, key)
            written = 0
            try:
                with open(dest, "wb") as out:
                    for chunk in response.stream(1024 * 1024):
                        written += len(chunk)
                        if written > max_bytes:
                            raise too_large(written)
                        out.write(chunk)
            finally:
                response.close()
                response.release_conn()
            return written

        return self._call("read", bucket, key, fetch)

    def list_objects(self, bucket: str, prefix: str = "") -> list[str]:
        """Return the keys of ``bucket`` that start with ``prefix``, recursively, sorted."""
        _validate_bucket(bucket)
        validate_key(prefix, prefix=True)

        def names() -> list[str]:
            objects = self._client.list_objects(bucket, prefix=prefix or None, recursive=True)
            return sorted(o.object_name for o in objects if o.object_name and not o.is_dir)

        return self._call("list", bucket, prefix, names)

    # -- the artifact bucket

    def put_bytes(
        self, key: str, data: bytes, *, content_type: str = "application/octet-stream"
    ) -> ArtifactRef:
        validate_key(key)

        def put() -> None:
            self._client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type=content_type
            )

        try:
            self._call("write", self.bucket, key, put)
        except ArtifactNotFound:
            # Only the bucket can be missing on a write: create it, then write once more.
            self._ensure_bucket()
            self._call("write", self.bucket, key, put)
        return ArtifactRef(name=key, size=len(data), sha256=sha256_hex(data))

    def get_bytes(self, key: str) -> bytes:
        return self.get_object(self.bucket, key)

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ArtifactNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        validate_key(key)

        def stat() -> int:
            return int(self._client.stat_object(self.bucket, key).size or 0)

        return self._call("stat", self.bucket, key, stat)

    def list(self, prefix: str = "") -> list[str]:
        try:
            return self.list_objects(self.bucket, prefix)
        except ArtifactNotFound:
            return []  # no bucket yet: nothing stored

    def delete(self, key: str) -> None:
        validate_key(key)
        try:
            self._call(
                "delete", self.bucket, key, lambda: self._client.remove_object(self.bucket, key)
            )
        except ArtifactNotFound:
            return

    def _remove(self, key: str) -> None:
        self._client.remove_object(self.bucket, key)

    CLAIM_SETTLE_S = 1.2
    """Seconds between writing a claim and reading the claims back: more than the 1 s
    resolution of S3's ``LastModified``, so a claim written after a contender looked is
    stamped later than that contender's own and cannot win."""

    def claim(self, key: str, data: bytes) -> bytes:
        """Claim ``key`` without a conditional write.

        S3 offers ``If-None-Match: *`` on PUT, but not every server honours it: ``rclone
        serve s3`` (measured, 1.75.2) overwrites silently. So each contender writes its own
        claim object ``<key>.claims/<unique>``, waits :attr:`CLAIM_SETTLE_S`, lists the
        claims and takes the earliest by the server's ``LastModified``, then the name, as
        the winner; it then stores the winner's value under ``key`` for later readers (all
        contenders write the same bytes). Every contender sees every claim stamped no later
        than its own (it was written before the contender listed), so all pick the same
        winner. Assumes read-after-write listing (S3 since 2020, MinIO, rclone) and one
        clock behind ``LastModified`` (one server or a synchronised cluster).
        """
        validate_key(key)
        try:
            return self.get_bytes(key)
        except ArtifactNotFound:
            pass
        folder = f"{key}.claims/"
        mine = f"{folder}{secrets.token_hex(16)}"
        self.put_bytes(mine, data)
        time.sleep(self.CLAIM_SETTLE_S)

        def claims() -> list[tuple[Any, str]]:
            objects = self._client.list_objects(self.bucket, prefix=folder, recursive=True)
            return sorted(
                (o.last_modified, o.object_name)
                for o in objects
                if o.object_name and not o.is_dir and o.last_modified is not None
            )

        seen = self._call("list", self.bucket, folder, claims)
        if mine not in {name for _, name in seen}:
            raise StorageUnavailable(
                f"storage at {self.endpoint} does not list {self.url(mine)} just after it was "
                "written (no read-after-write consistency); retry"
            )
        value = self.get_bytes(seen[0][1])
        self.put_bytes(key, value)
        return value

    def url(self, key: str = "") -> str:
        validate_key(key, prefix=True)
        return f"s3://{self.bucket}/{key}"

    def check(self) -> None:
        self._ensure_bucket()

    def _ensure_bucket(self) -> None:
        """Create the bucket unless it exists (a concurrent creation is fine)."""
        if self._call("check", self.bucket, "", lambda: self._client.bucket_exists(self.bucket)):
            return
        try:
            self._call("create", self.bucket, "", lambda: self._client.make_bucket(self.bucket))
        except StorageError as exc:
            cause = exc.__cause__
            code = _error_code(cause)[1] if isinstance(cause, MinioException) else None
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise


# --------------------------------------------------------------------------- factory


def open_store(settings: StoreSettings | None = None) -> ArtifactStore:
    """Return the store that ``settings`` describe.

    Parameters
    ----------
    settings : StoreSettings, optional
        Default ``StoreSettings()``, which reads ``NOISESCORE_S3_*`` and
        ``NOISESCORE_STORE_DIR`` from the environment.

    Returns
    -------
    ArtifactStore
        :class:`S3Store` when ``settings.s3_endpoint`` is set, else
        :class:`LocalStore` at ``settings.store_dir``. Nothing is contacted yet; call
        :meth:`ArtifactStore.check` to fail fast.
    """
    if settings is None:
        from noisescore.settings import StoreSettings

        settings = StoreSettings()  # type: ignore[call-arg]
    if settings.s3_endpoint:
        return S3Store.from_settings(settings)
    return LocalStore(settings.store_dir)
