"""Datasets as the service and the S3 store see them: the canonical URI of a dataset
setting, and uploading a local dataset to an ``s3://`` URI that jobs can read.

``noisescore datasets upload FILE s3://BUCKET/KEY`` checks that ``FILE`` loads as a dataset
(the same loader the jobs use) before anything is written, then puts it into the bucket
with the store settings' endpoint and credentials (``NOISESCORE_S3_*``). A CSV manifest
goes up with every image it names, at the same paths relative to the manifest, and the
manifest object is written last: a job reading ``s3://…/labels.csv`` never finds it
before its images. An object appears whole on PUT, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from noisescore.ml.data import DataError, Dataset, load_dataset
from noisescore.storage import ArtifactRef, S3Store
from noisescore.uris import check_dataset_uri

if TYPE_CHECKING:
    from noisescore.settings import StoreSettings

__all__ = ["Upload", "canonical_dataset_uri", "upload_dataset"]

_SUFFIXES = (".npz", ".csv")


def canonical_dataset_uri(dataset: str) -> str:
    """Return the URI form of a dataset setting, as the API documents it.

    A bare MedMNIST name (``"BreastMNIST"``) becomes ``medmnist://breastmnist``; an
    absolute path becomes a ``file://`` URI; a ``medmnist://`` URI is lower-cased (names
    are case-insensitive). Other URIs, and relative paths (relative to the worker that
    reads them, so no absolute URI can be given for them), are returned as they are.
    """
    text = dataset.strip()
    scheme, sep, rest = text.partition("://")
    if sep:
        if scheme.lower() == "medmnist":
            return f"medmnist://{rest.strip().lower()}"
        return text
    if any(s in text for s in ("/", "\\")) or text.lower().endswith(_SUFFIXES):
        path = Path(text).expanduser()
        return path.as_uri() if path.is_absolute() else text
    return f"medmnist://{text.lower()}" if text else text


@dataclass(frozen=True)
class Upload:
    """What :func:`upload_dataset` stored: the dataset, and every object with its ref."""

    uri: str
    dataset: Dataset
    objects: list[tuple[str, ArtifactRef]]  # (s3://bucket/key, ref), manifest last


def upload_dataset(
    path: str | Path,
    uri: str,
    settings: StoreSettings,
    *,
    image_size: int | None = None,
) -> Upload:
    """Check that ``path`` is a loadable dataset, then store it at the ``s3://`` ``uri``.

    Parameters
    ----------
    path : str or pathlib.Path
        A MedMNIST-format ``.npz`` archive or a ``.csv`` manifest whose image paths are
        relative to its folder.
    uri : str
        ``s3://BUCKET/KEY`` with the same suffix as ``path``; the bucket is created when
        missing.
    settings : StoreSettings
        The S3 endpoint and credentials (``s3_bucket`` is not used: the URI names it).
    image_size : int, optional
        Resize while checking a manifest whose images differ in size (as ``--image-size``
        will when the dataset is used).

    Returns
    -------
    Upload

    Raises
    ------
    DataError
        If ``uri`` is not an ``s3://`` dataset URI, the suffixes differ, the file does not
        load as a dataset, or a manifest names an image outside its folder. Nothing is
        written then.
    ValueError
        If no S3 endpoint is configured.
    noisescore.storage.StorageError
        If the store refuses or cannot be reached (``StorageUnavailable``).
    """
    check_dataset_uri(uri)
    scheme, _, rest = uri.strip().partition("://")
    if scheme.lower() != "s3":
        raise DataError(f"upload to {uri!r}: give an s3://BUCKET/KEY URI, e.g. s3://datasets/x.npz")
    bucket, _, key = rest.partition("/")
    source = Path(path).expanduser()
    if not source.is_file():
        raise DataError(f"{source}: no such file")
    if source.suffix.lower() != PurePosixPath(key).suffix.lower():
        raise DataError(
            f"{source} is a {source.suffix or 'suffix-less'} file but {uri} names a "
            f"{PurePosixPath(key).suffix} object; use the same suffix (.npz or .csv)"
        )
    dataset = load_dataset(source, image_size=image_size)  # DataError says what is wrong
    files: list[tuple[str, Path]] = []
    if source.suffix.lower() == ".csv":
        folder = PurePosixPath(key).parent
        for relative in _manifest_images(source):
            files.append((str(folder / relative), source.parent / relative))
    files.append((key, source))  # last: the dataset is readable once this exists

    if not settings.s3_endpoint:
        raise ValueError(
            f"uploading to {uri} needs an S3 endpoint: set NOISESCORE_S3_ENDPOINT (e.g. "
            f"127.0.0.1:9000) and NOISESCORE_S3_ACCESS_KEY / NOISESCORE_S3_SECRET_KEY"
        )
    store = S3Store.from_settings(settings, bucket=bucket)
    store.check()  # reachable, credentials accepted, bucket created when missing
    objects = []
    for object_key, local in files:
        is_csv = object_key.lower().endswith(".csv")
        content_type = "text/csv" if is_csv else "application/octet-stream"
        ref = store.put_bytes(object_key, local.read_bytes(), content_type=content_type)
        stored = store.size(object_key)
        if stored != ref.size:
            raise DataError(
                f"s3://{bucket}/{object_key} is {stored} bytes after the upload, expected "
                f"{ref.size}"
            )
        objects.append((f"s3://{bucket}/{object_key}", ref))
    return Upload(uri=f"s3://{bucket}/{key}", dataset=dataset, objects=objects)


def _manifest_images(manifest: Path) -> list[str]:
    """The image paths of a manifest, as POSIX paths relative to its folder (checked)."""
    with manifest.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        rows = [row[columns["path"]].strip() for row in reader]  # load_dataset checked it
    folder = manifest.parent.resolve()
    images: list[str] = []
    for row, text in enumerate(rows, start=2):
        try:  # the loader already refused paths that lead out; an absolute one inside is fine
            relative = (folder / text).resolve().relative_to(folder)
        except ValueError:
            raise DataError(
                f"{manifest}, row {row}: image path {text!r} is not inside the manifest's "
                f"folder; an uploaded manifest keeps its image paths relative to it, so "
                f"write them relative (e.g. images/0001.png)"
            ) from None
        if Path(text).is_absolute():
            raise DataError(
                f"{manifest}, row {row}: image path {text!r} is absolute; the uploaded "
                f"manifest is read from S3 next to its images, so write it relative to the "
                f"manifest's folder ({relative.as_posix()})"
            )
        images.append(relative.as_posix())
    return sorted(set(images))
