"""Datasets addressed by URI: ``medmnist://NAME``, ``file:///PATH`` and ``s3://BUCKET/KEY``.

A string without ``://`` is passed to :func:`noisescore.ml.data.load_dataset` unchanged,
so dataset names (``"breastmnist"``) and plain paths keep working. An ``s3://`` dataset
is downloaded to a temporary folder (a CSV manifest together with every object under its
folder, keeping relative paths), loaded, and the folder removed; the returned dataset's
``source`` is the URI.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import unquote

from noisescore.ml.data import DataError, Dataset, load_dataset
from noisescore.storage import ArtifactNotFound, S3Store, validate_key

if TYPE_CHECKING:
    from noisescore.settings import StoreSettings  # lazily: it imports timm/torch

__all__ = ["SCHEMES", "check_dataset_uri", "load_dataset_uri"]

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

    Returns
    -------
    Dataset

    Raises
    ------
    DataError
        For a bad URI, a missing object or file, no S3 endpoint configured, or bad content.
    noisescore.storage.StorageUnavailable
        If the S3 server cannot be reached (retryable; not wrapped).
    noisescore.storage.StorageError
        If the S3 server refuses the request (e.g. wrong credentials).
    """
    parsed = _parse(uri)
    if parsed.scheme == "":
        return load_dataset(uri, data_dir=data_dir, seed=seed, image_size=image_size)
    if parsed.scheme == "medmnist":
        return load_dataset(parsed.location, data_dir=data_dir, seed=seed, image_size=image_size)
    if parsed.scheme == "file":
        return load_dataset(Path(parsed.location), seed=seed, image_size=image_size)
    return _load_s3(uri, parsed, store_settings, seed=seed, image_size=image_size)


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
    with tempfile.TemporaryDirectory(prefix="noisescore-s3-") as tmp:
        root = Path(tmp).resolve()
        try:
            # A manifest's image paths are relative to it: bring its whole folder along.
            is_csv = key.lower().endswith(".csv")
            keys = store.list_objects(bucket, folder) if is_csv else [key]
            if key not in keys:
                keys.append(key)
            for name in keys:
                local = root.joinpath(*name[len(folder) :].split("/"))
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(store.get_object(bucket, name))
        except ArtifactNotFound as exc:
            raise DataError(f"dataset {uri!r} not found: {exc}") from exc
        local_file = root.joinpath(*key[len(folder) :].split("/"))
        try:
            dataset = load_dataset(local_file, seed=seed, image_size=image_size)
        except DataError as exc:
            # Name the object, not the temporary folder that is about to vanish.
            message = str(exc).replace(str(root), f"s3://{bucket}/{folder}".rstrip("/"))
            raise DataError(message) from exc
    return dataclasses.replace(dataset, source=uri)
