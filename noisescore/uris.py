"""Datasets addressed by URI: ``medmnist://NAME``, ``file:///PATH`` and ``s3://BUCKET/KEY``.

A string without ``://`` is passed to :func:`noisescore.ml.data.load_dataset` unchanged,
so dataset names (``"breastmnist"``) and plain paths keep working. An ``s3://`` dataset
is downloaded to a temporary folder (a CSV manifest together with the images it lists,
keeping their paths relative to it; nothing else), loaded, and the folder removed; every
object is capped at ``StoreSettings.s3_max_object_bytes``. The returned dataset's
``source`` is the URI.

Jobs submitted over the API read datasets under a :class:`DatasetPolicy`: dataset names
(looked up in the data directory) and URIs under the roots an administrator lists in
``NOISESCORE_DATASET_ROOTS``; anything else is :class:`DatasetAccessDenied`. The service
checks a submission with it and the job checks again, with the same roots, where it
reads the data (``load_dataset_uri(..., roots=...)``): it loads the path the check
resolved, not the text it was given.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import unquote

from noisescore.ml.data import (
    DataError,
    Dataset,
    _looks_like_path,
    load_dataset,
    read_manifest_paths,
)
from noisescore.storage import ArtifactNotFound, ObjectTooLarge, S3Store, validate_key

if TYPE_CHECKING:
    from noisescore.settings import StoreSettings  # lazily: it imports timm/torch

__all__ = [
    "ROOTS_SETTING",
    "SCHEMES",
    "DatasetAccessDenied",
    "DatasetPolicy",
    "check_dataset_uri",
    "load_dataset_uri",
    "parse_dataset_roots",
]

ROOTS_SETTING = "NOISESCORE_DATASET_ROOTS"
"""The setting that lists the roots of :class:`DatasetPolicy`."""

ECHO_LIMIT = 200
"""Characters of a caller's dataset text that an access error repeats."""

SCHEMES = ("medmnist", "file", "s3")
"""The URI schemes a dataset may be given with."""

_USAGE = "use medmnist://NAME, file:///PATH or s3://BUCKET/KEY"
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_SUFFIXES = (".npz", ".csv")


class _Parsed(NamedTuple):
    """A checked dataset URI: ``scheme`` is ``""`` for a plain name or path."""

    scheme: str
    location: str  # name (medmnist), absolute path (file), key (s3), the text itself ("")
    bucket: str = ""


def check_dataset_uri(uri: str) -> str:
    """Return ``uri`` if its syntax is valid; nothing is read or contacted.

    Used to fail fast, before any work starts.

    Raises
    ------
    DataError
        If the scheme is not one of :data:`SCHEMES` or the rest of the URI does not fit
        it; the message shows the accepted forms.
    """
    _parse(uri)
    return uri


def load_dataset_uri(
    uri: str,
    *,
    data_dir: str | Path | None = None,
    store_settings: StoreSettings | None = None,
    seed: int = 0,
    image_size: int | None = None,
    roots: Iterable[str] | None = None,
) -> Dataset:
    """Load the dataset that ``uri`` names.

    Parameters
    ----------
    uri : str
        ``medmnist://breastmnist`` (looked up in ``data_dir``), ``file:///abs/x.npz`` or
        ``.csv``, ``s3://bucket/key.npz`` or ``s3://bucket/folder/labels.csv`` (a CSV
        manifest whose image paths are relative to its folder), or a plain name or path
        (no ``://``) as :func:`~noisescore.ml.data.load_dataset` accepts.
    data_dir : str or pathlib.Path, optional
        Folder where dataset names are looked up.
    store_settings : StoreSettings, optional
        S3 endpoint and credentials for ``s3://`` (default: read from the environment);
        the URI's bucket overrides ``s3_bucket``.
    seed : int
        Seed of a manifest's stratified split.
    image_size : int, optional
        Resize every image to ``(image_size, image_size)``.
    roots : iterable of str, optional
        Read the dataset under the :class:`DatasetPolicy` of these roots (what jobs
        submitted over the API do); ``None``: any dataset (the operator's CLI).

    Returns
    -------
    Dataset

    Raises
    ------
    DatasetAccessDenied
        With ``roots``, for a dataset the policy does not admit.
    DataError
        For a bad URI, a missing object or file, no S3 endpoint configured, or bad content.
    noisescore.storage.StorageUnavailable
        If the S3 server cannot be reached (retryable; not wrapped).
    noisescore.storage.StorageError
        If the S3 server refuses the request (e.g. wrong credentials).
    """
    parsed = _parse(uri) if roots is None else DatasetPolicy.from_roots(roots).admit(uri)
    if parsed.scheme == "":
        return load_dataset(uri, data_dir=data_dir, seed=seed, image_size=image_size)
    if parsed.scheme == "medmnist":
        return load_dataset(parsed.location, data_dir=data_dir, seed=seed, image_size=image_size)
    if parsed.scheme == "file":
        return load_dataset(Path(parsed.location), seed=seed, image_size=image_size)
    return _load_s3(uri, parsed, store_settings, seed=seed, image_size=image_size)


# --------------------------------------------------------------------------- policy


class DatasetAccessDenied(DataError):
    """The dataset lies outside what the :class:`DatasetPolicy` admits (PERMISSION_DENIED).

    The message repeats the caller's text (at most :data:`ECHO_LIMIT` characters) and
    names the setting, never the server's paths, and is the same whether or not the
    dataset exists: it cannot be used to probe the server's files.
    """


def _clip(text: str) -> str:
    return repr(text if len(text) <= ECHO_LIMIT else text[:ECHO_LIMIT] + "…")


def parse_dataset_roots(value: str | Iterable[str]) -> tuple[str, ...]:
    """Check dataset roots and return them in canonical form.

    Parameters
    ----------
    value : str or iterable of str
        A comma-separated list (``"/data/scans,s3://datasets/medmnist"``), a JSON list of
        strings, or the strings themselves. Each root is an absolute folder (or
        ``file:///folder``) or ``s3://BUCKET`` / ``s3://BUCKET/PREFIX``.

    Returns
    -------
    tuple of str
        Absolute, normalised folders and ``s3://BUCKET[/PREFIX]`` without a trailing
        ``/``; empty entries dropped.

    Raises
    ------
    ValueError
        Naming the first root that is not one of those forms.
    """
    return DatasetPolicy.from_roots(_split_roots(value)).roots


def _split_roots(value: str | Iterable[str]) -> list[str]:
    if not isinstance(value, str):
        return [str(v) for v in value]
    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{ROOTS_SETTING} is not a valid JSON list: {exc}") from exc
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"{ROOTS_SETTING} must be a list of strings, got {text[:200]!r}")
        return items
    return text.split(",")


@dataclass(frozen=True)
class DatasetPolicy:
    """Which datasets a job submitted over the API may read.

    Admitted: a dataset name (``breastmnist``, ``medmnist://breastmnist``), looked up in
    the data directory of the job (which a caller cannot set); a ``file://`` URI or an
    absolute path whose real path (symlinks resolved) lies inside one of ``local``; an
    ``s3://`` URI in one of ``s3``'s buckets under its prefix. Everything else raises
    :class:`DatasetAccessDenied`: relative paths, ``..`` out of a root, a symlink inside
    a root that leads out of it, another bucket or prefix.

    Parameters
    ----------
    local : tuple of pathlib.PurePosixPath
        Absolute, normalised folders; resolved (symlinks) when a dataset is checked, on
        the machine that checks.
    s3 : tuple of (str, str)
        ``(bucket, prefix)``; ``prefix`` has no trailing ``/``, ``""`` = the whole bucket.
    """

    local: tuple[PurePosixPath, ...] = ()
    s3: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_roots(cls, roots: Iterable[str]) -> DatasetPolicy:
        """The policy of ``roots`` (see :func:`parse_dataset_roots`); ``ValueError`` for a
        root that is neither an absolute folder nor ``s3://BUCKET[/PREFIX]``."""
        local: list[PurePosixPath] = []
        s3: list[tuple[str, str]] = []
        for raw in roots:
            root = raw.strip()
            if not root:
                continue
            scheme = root.split("://", 1)[0].lower() if "://" in root else ""
            if scheme == "s3":
                s3.append(_s3_root(root))
            elif scheme in ("file", ""):
                local.append(_local_root(root, scheme))
            else:
                raise ValueError(
                    f"{ROOTS_SETTING}: {root!r} is not a root; give absolute folders "
                    f"(/data/scans or file:///data/scans) or s3://BUCKET[/PREFIX]"
                )
        return cls(tuple(dict.fromkeys(local)), tuple(dict.fromkeys(s3)))

    @property
    def roots(self) -> tuple[str, ...]:
        """The canonical root strings (what :meth:`from_roots` reads back)."""
        s3 = (f"s3://{bucket}/{prefix}".rstrip("/") for bucket, prefix in self.s3)
        return (*(str(p) for p in self.local), *s3)

    def admit(self, uri: str) -> _Parsed:
        """Check ``uri``; return it parsed, a local path as the real path to read.

        Raises
        ------
        DatasetAccessDenied
            If the policy does not admit the dataset.
        DataError
            If ``uri`` is not a valid dataset URI or name at all.
        """
        parsed = _parse(uri)
        if parsed.scheme == "":
            text = uri.strip()
            if not _looks_like_path(text):
                return _parse_medmnist(f"medmnist://{text}", text)  # a name: the data dir
            if not text.startswith("/"):  # relative to what? Not the server's cwd.
                raise self._denied(uri)
            parsed = _Parsed("file", text)
        if parsed.scheme == "medmnist":
            return parsed
        if parsed.scheme == "file":
            try:
                real = Path(os.path.realpath(parsed.location))
            except (ValueError, OSError):  # a NUL byte (file:///x%00.npz), a symlink loop
                raise self._denied(uri) from None
            for root in self.local:
                if real.is_relative_to(os.path.realpath(root)):
                    return _Parsed("file", str(real))
            raise self._denied(uri)
        for bucket, prefix in self.s3:
            if parsed.bucket == bucket and (not prefix or parsed.location.startswith(prefix + "/")):
                return parsed  # the key has no '.', '..' or empty parts (validate_key)
        raise self._denied(uri)

    @staticmethod
    def _denied(uri: str) -> DatasetAccessDenied:
        return DatasetAccessDenied(
            f"dataset {_clip(uri)} is not allowed here: jobs submitted to the service may "
            f"read a dataset name from the server's data directory (medmnist://NAME) or a "
            f"URI under a root the administrator lists in {ROOTS_SETTING}"
        )


def _local_root(root: str, scheme: str) -> PurePosixPath:
    path = root
    if scheme == "file":
        host, slash, rest = root.split("://", 1)[1].partition("/")
        path = unquote("/" + rest) if slash and host.lower() in ("", "localhost") else ""
    if not path.startswith("/"):
        raise ValueError(
            f"{ROOTS_SETTING}: {root!r} is not an absolute folder; write /data/scans or "
            f"file:///data/scans"
        )
    return PurePosixPath(os.path.normpath(path))


def _s3_root(root: str) -> tuple[str, str]:
    bucket, _slash, prefix = root.split("://", 1)[1].partition("/")
    prefix = prefix.strip("/")
    try:
        if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
            raise ValueError(f"{bucket!r} is not a bucket name")
        if prefix:
            validate_key(prefix)
    except ValueError as exc:
        raise ValueError(
            f"{ROOTS_SETTING}: {root!r} is not an S3 root ({exc}); write s3://BUCKET or "
            f"s3://BUCKET/PREFIX"
        ) from exc
    return bucket, prefix


# --------------------------------------------------------------------------- parsing


def _parse(uri: str) -> _Parsed:
    """Split and check ``uri``; raise :class:`DataError` on a bad one."""
    if not isinstance(uri, str) or not uri.strip():
        raise DataError(f"dataset {uri!r} is empty; give a dataset name, a path or a URI: {_USAGE}")
    if "://" not in uri:
        return _Parsed("", uri)
    match = _SCHEME_RE.fullmatch(uri.strip())
    if match is None:
        raise DataError(f"dataset URI {uri!r} has no scheme before '://'; {_USAGE}")
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme not in SCHEMES:
        raise DataError(f"unsupported dataset URI scheme {scheme!r} in {uri!r}; {_USAGE}")
    if scheme == "medmnist":
        return _parse_medmnist(uri, rest)
    if scheme == "file":
        return _parse_file(uri, rest)
    return _parse_s3(uri, rest)


def _parse_medmnist(uri: str, rest: str) -> _Parsed:
    name = rest.strip().lower()
    if not name:
        raise DataError(
            f"dataset URI {uri!r} names no dataset; write medmnist://NAME, e.g. "
            f"medmnist://breastmnist"
        )
    if not _NAME_RE.fullmatch(name) or name.endswith(_SUFFIXES):
        raise DataError(
            f"dataset URI {uri!r}: {rest!r} is not a MedMNIST name (no '/', '?', file "
            f"extension or other path parts); write medmnist://NAME, e.g. "
            f"medmnist://breastmnist or medmnist://breastmnist_64"
        )
    return _Parsed("medmnist", name)


def _parse_file(uri: str, rest: str) -> _Parsed:
    host, slash, path = rest.partition("/")
    if host.lower() not in ("", "localhost") or not slash:
        raise DataError(
            f"dataset URI {uri!r} is not an absolute file URI: file:// must be followed by an "
            f"absolute path, as in file:///data/x.npz (three slashes); for a relative path, "
            f"give the path without file://"
        )
    location = unquote("/" + path)
    if not location.lower().endswith(_SUFFIXES):
        raise DataError(
            f"dataset URI {uri!r} must point at a MedMNIST .npz archive or a .csv manifest"
        )
    return _Parsed("file", location)


def _parse_s3(uri: str, rest: str) -> _Parsed:
    bucket, _slash, key = rest.partition("/")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise DataError(
            f"dataset URI {uri!r}: {bucket!r} is not an S3 bucket name (3-63 characters of "
            f"a-z, 0-9, '.' and '-'); write s3://BUCKET/KEY, e.g. s3://datasets/breastmnist.npz"
        )
    try:
        validate_key(key)
    except ValueError as exc:
        raise DataError(
            f"dataset URI {uri!r} has no valid object key after the bucket ({exc}); write "
            f"s3://BUCKET/KEY, e.g. s3://datasets/breastmnist.npz"
        ) from exc
    if not key.lower().endswith(_SUFFIXES):
        raise DataError(
            f"dataset URI {uri!r} must name a MedMNIST .npz archive or a .csv manifest, "
            f"e.g. s3://{bucket}/breastmnist.npz or s3://{bucket}/scans/labels.csv"
        )
    return _Parsed("s3", key, bucket)


# --------------------------------------------------------------------------- s3


def _load_s3(
    uri: str,
    parsed: _Parsed,
    settings: StoreSettings | None,
    *,
    seed: int,
    image_size: int | None,
) -> Dataset:
    if settings is None:
        from noisescore.settings import StoreSettings

        settings = StoreSettings()  # type: ignore[call-arg]
    if not settings.s3_endpoint:
        raise DataError(
            f"dataset URI {uri!r} needs an S3 endpoint: set NOISESCORE_S3_ENDPOINT (e.g. "
            f"127.0.0.1:9000) and NOISESCORE_S3_ACCESS_KEY / NOISESCORE_S3_SECRET_KEY"
        )
    store = S3Store.from_settings(settings, bucket=parsed.bucket)
    bucket, key = parsed.bucket, parsed.location
    folder = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
    fetch = _Fetcher(store, bucket, folder, settings.s3_max_object_bytes, uri)
    with tempfile.TemporaryDirectory(prefix="noisescore-s3-") as tmp:
        root = Path(tmp).resolve()
        local_file = root / key[len(folder) :]
        fetch(key, local_file, missing=True)
        if key.lower().endswith(".csv"):
            # A manifest's image paths are relative to it: fetch what it lists, nothing else.
            for image in read_manifest_paths(local_file):
                fetch.image(image, root)
        try:
            dataset = load_dataset(local_file, seed=seed, image_size=image_size)
        except DataError as exc:
            # Name the object, not the temporary folder that is about to vanish.
            message = str(exc).replace(str(root), f"s3://{bucket}/{folder}".rstrip("/"))
            raise DataError(message) from exc
    return dataclasses.replace(dataset, source=uri)


@dataclass(frozen=True)
class _Fetcher:
    """Downloads objects of one s3:// dataset, each under the size cap."""

    store: S3Store
    bucket: str
    folder: str  # the manifest's folder: "" or "a/b/"
    max_bytes: int
    uri: str

    def __call__(self, key: str, local: Path, *, missing: bool) -> bool:
        """Download ``key`` to ``local``; False if it does not exist and ``missing`` is
        False (the loader then reports it), DataError if ``missing``."""
        try:
            self.store.download_object(self.bucket, key, local, max_bytes=self.max_bytes)
        except ArtifactNotFound as exc:
            if missing:
                raise DataError(f"dataset {self.uri!r} not found: {exc}") from exc
            return False
        except ObjectTooLarge as exc:
            raise DataError(
                f"dataset {self.uri!r}: {exc} (NOISESCORE_S3_MAX_OBJECT_BYTES); a bigger "
                f"limit is the administrator's choice"
            ) from exc
        return True

    def image(self, path: str, root: Path) -> None:
        """Download a manifest's image ``path`` (relative to the manifest) under ``root``.

        A path that is not a plain relative key (absolute, ``..``, ``.``, empty parts, a
        backslash) is not fetched: the manifest loader then refuses it like every image
        outside the manifest's folder, with one message.
        """
        key = self.folder + path
        try:
            validate_key(key)
        except ValueError:
            return
        local = root.joinpath(*path.split("/"))
        if not local.resolve().is_relative_to(root):  # validate_key already rules it out
            return
        local.parent.mkdir(parents=True, exist_ok=True)
        self(key, local, missing=False)
