"""Tests of noisescore.uris: medmnist://, file:// and s3:// datasets (real files, real S3)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import S3Server
from PIL import Image

from noisescore.ml.data import DataError, Dataset, load_dataset
from noisescore.storage import S3Store, StorageUnavailable
from noisescore.uris import SCHEMES, check_dataset_uri, load_dataset_uri

USAGE = "use medmnist://NAME, file:///PATH or s3://BUCKET/KEY"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the caller's NOISESCORE_* settings from leaking into the tests."""
    for name in ("NOISESCORE_DATA_DIR", "NOISESCORE_S3_ENDPOINT", "NOISESCORE_S3_BUCKET"):
        monkeypatch.delenv(name, raising=False)


def assert_same(a: Dataset, b: Dataset) -> None:
    assert a.n_classes == b.n_classes
    assert a.splits().keys() == b.splits().keys()
    for key, split in a.splits().items():
        other = b.splits()[key]
        np.testing.assert_array_equal(split.images, other.images)
        np.testing.assert_array_equal(split.labels, other.labels)
        np.testing.assert_array_equal(split.sample_ids, other.sample_ids)


def uploader(server: S3Server, bucket: str = "datasets") -> S3Store:
    store = S3Store(server.endpoint, bucket, server.ACCESS_KEY, server.SECRET_KEY)
    store.check()
    return store


def write_manifest(folder: Path, n: int = 6) -> Path:
    """A CSV manifest with ``n`` small grey PNGs in ``img/``, two classes, fixed splits."""
    (folder / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("L", (8, 8), 40 * i).save(folder / "img" / f"{i}.png")
        rows.append([f"img/{i}.png", i % 2, "train" if i < n - 2 else "test"])
    path = folder / "labels.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return path


# --------------------------------------------------------------------------- local


def test_medmnist_uri(data_dir: Path) -> None:
    dataset = load_dataset_uri("medmnist://breastmnist", data_dir=data_dir)
    assert dataset.name == "breastmnist"
    assert len(dataset.train) == 546
    assert dataset.n_classes == 2
    assert_same(dataset, load_dataset("breastmnist", data_dir=data_dir))


def test_medmnist_uri_resizes(data_dir: Path) -> None:
    dataset = load_dataset_uri("MEDMNIST://BreastMNIST", data_dir=data_dir, image_size=16)
    assert dataset.image_size == (16, 16)


def test_file_uri(data_dir: Path) -> None:
    path = (data_dir / "breastmnist.npz").resolve()
    dataset = load_dataset_uri(f"file://{path}")
    assert len(dataset.train) == 546 and dataset.n_classes == 2
    assert dataset.source == str(path)
    assert_same(dataset, load_dataset(path))


def test_file_uri_csv_with_escaped_space(tmp_path: Path) -> None:
    folder = tmp_path / "my data"
    csv_path = write_manifest(folder)
    uri = "file://" + str(csv_path).replace(" ", "%20")
    dataset = load_dataset_uri(uri)
    assert len(dataset.train) == 4 and len(dataset.test or []) == 2
    assert_same(dataset, load_dataset(csv_path))


def test_bare_names_and_paths_pass_through(data_dir: Path) -> None:
    assert len(load_dataset_uri("breastmnist", data_dir=data_dir).train) == 546
    path = str(data_dir / "breastmnist.npz")
    assert len(load_dataset_uri(path).train) == 546
    assert check_dataset_uri("breastmnist") == "breastmnist"
    with pytest.raises(DataError, match=r"file .*nosuchdata\.npz not found"):
        load_dataset_uri("nosuchdata", data_dir=data_dir)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("http://example.com/x.npz", "unsupported dataset URI scheme 'http' in "
         "'http://example.com/x.npz'; " + USAGE),
        ("gs://bucket/x.npz", "unsupported dataset URI scheme 'gs'"),
        ("://x", "has no scheme"),
        ("", "is empty"),
        ("medmnist://", "names no dataset"),
        ("medmnist://breast/mnist", "not a MedMNIST name"),
        ("medmnist://breastmnist.npz", "not a MedMNIST name"),
        ("medmnist://../x", "not a MedMNIST name"),
        ("file://data/x.npz", "not an absolute file URI"),
        ("file://relative.npz", "not an absolute file URI"),
        ("file:///data/x.txt", r"must point at a MedMNIST \.npz archive or a \.csv manifest"),
        ("s3://", "is not an S3 bucket name"),
        ("s3://ab/x.npz", "'ab' is not an S3 bucket name"),
        ("s3://bucket", "no valid object key"),
        ("s3://bucket/", "no valid object key"),
        ("s3://bucket/../x.npz", "no valid object key"),
        ("s3://bucket/x.zip", r"must name a MedMNIST \.npz archive"),
    ],
)  # fmt: skip
def test_bad_uris(uri: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        check_dataset_uri(uri)
    with pytest.raises(DataError, match=message):
        load_dataset_uri(uri)


def test_good_uris_pass_the_syntax_check() -> None:
    assert SCHEMES == ("medmnist", "file", "s3")
    for uri in [
        "medmnist://breastmnist",
        "medmnist://breastmnist_64",
        "file:///data/x.npz",
        "file://localhost/data/x.csv",
        "s3://datasets/breastmnist.npz",
        "s3://my.bucket-1/scans/2024/labels.csv",
        "breastmnist",
        "data/x.npz",
    ]:
        assert check_dataset_uri(uri) == uri


def test_missing_file_uri(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset_uri(f"file://{tmp_path}/missing.npz")


# --------------------------------------------------------------------------- s3


def test_s3_npz(s3_server: S3Server, data_dir: Path) -> None:
    uploader(s3_server).put_bytes(
        "medmnist/breastmnist.npz", (data_dir / "breastmnist.npz").read_bytes()
    )
    uri = "s3://datasets/medmnist/breastmnist.npz"
    # The URI's bucket wins over the settings' bucket.
    dataset = load_dataset_uri(uri, store_settings=s3_server.settings(bucket="noisescore"))
    assert dataset.name == "breastmnist" and dataset.source == uri
    assert len(dataset.train) == 546 and dataset.n_classes == 2
    assert_same(dataset, load_dataset(data_dir / "breastmnist.npz"))
    resized = load_dataset_uri(uri, store_settings=s3_server.settings(), image_size=8)
    assert resized.image_size == (8, 8)


def test_s3_csv_manifest(s3_server: S3Server, tmp_path: Path) -> None:
    local = write_manifest(tmp_path / "local")
    store = uploader(s3_server)
    for path in sorted(local.parent.rglob("*")):
        if path.is_file():
            store.put_bytes(f"scans/{path.relative_to(local.parent).as_posix()}", path.read_bytes())
    store.put_bytes("elsewhere/unrelated.bin", b"not downloaded")
    uri = "s3://datasets/scans/labels.csv"
    dataset = load_dataset_uri(uri, store_settings=s3_server.settings())
    assert dataset.source == uri
    assert len(dataset.train) == 4 and len(dataset.test or []) == 2
    assert_same(dataset, load_dataset(local))


def test_s3_csv_manifest_names_the_object_on_bad_content(s3_server: S3Server) -> None:
    store = uploader(s3_server)
    store.put_bytes("scans/labels.csv", b"path,label\nimg/0.png,0\n")  # the image is missing
    with pytest.raises(DataError, match=r"s3://datasets/scans/labels\.csv: line 2") as info:
        load_dataset_uri("s3://datasets/scans/labels.csv", store_settings=s3_server.settings())
    assert "noisescore-s3-" not in str(info.value)  # not the vanished temporary folder


def test_s3_missing_object(s3_server: S3Server) -> None:
    uploader(s3_server)
    for uri in ["s3://datasets/nothing.npz", "s3://no-such-bucket/x.npz", "s3://datasets/a/x.csv"]:
        with pytest.raises(DataError, match=f"dataset '{uri}' not found"):
            load_dataset_uri(uri, store_settings=s3_server.settings())


def test_s3_without_endpoint() -> None:
    from noisescore.settings import StoreSettings

    with pytest.raises(DataError, match="needs an S3 endpoint: set NOISESCORE_S3_ENDPOINT"):
        load_dataset_uri("s3://datasets/x.npz")
    with pytest.raises(DataError, match="set NOISESCORE_S3_ENDPOINT"):
        load_dataset_uri("s3://datasets/x.npz", store_settings=StoreSettings(s3_endpoint=None))  # type: ignore[call-arg]


def test_s3_server_down_is_retryable(s3_server: S3Server) -> None:
    settings = s3_server.settings()
    s3_server.stop()
    with pytest.raises(StorageUnavailable, match=f"storage at http://{s3_server.endpoint}"):
        load_dataset_uri("s3://datasets/x.npz", store_settings=settings)


def test_s3_endpoint_from_the_environment(
    s3_server: S3Server, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uploader(s3_server).put_bytes("b.npz", (data_dir / "breastmnist.npz").read_bytes())
    monkeypatch.setenv("NOISESCORE_S3_ENDPOINT", f"http://{s3_server.endpoint}")
    monkeypatch.setenv("NOISESCORE_S3_ACCESS_KEY", s3_server.ACCESS_KEY)
    monkeypatch.setenv("NOISESCORE_S3_SECRET_KEY", s3_server.SECRET_KEY)
    dataset = load_dataset_uri("s3://datasets/b.npz")
    assert len(dataset.train) == 546
    assert dataset.n_classes == 2  # the stem 'b' is unknown: inferred from the labels
