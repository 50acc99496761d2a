"""``noisescore datasets upload`` and canonical dataset URIs, against a real S3 server
(``rclone serve s3``) and the real BreastMNIST file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import S3Server
from pydantic import SecretStr
from test_uris import assert_same, write_manifest

from noisescore.cli import main
from noisescore.datasets import canonical_dataset_uri, upload_dataset
from noisescore.ml.data import DataError, load_dataset
from noisescore.service.servicer import settings_to_spec
from noisescore.storage import StorageError
from noisescore.uris import load_dataset_uri


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The store settings of the S3 server in the environment, as a user exports them."""
    monkeypatch.setenv("NOISESCORE_S3_ENDPOINT", s3_server.endpoint)
    monkeypatch.setenv("NOISESCORE_S3_ACCESS_KEY", s3_server.ACCESS_KEY)
    monkeypatch.setenv("NOISESCORE_S3_SECRET_KEY", s3_server.SECRET_KEY)
    monkeypatch.setenv("NOISESCORE_S3_BUCKET", "noisescore")
    monkeypatch.delenv("NOISESCORE_DATA_DIR", raising=False)
    return s3_server


def test_upload_npz_then_a_job_reads_it(
    s3_env: S3Server, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = "s3://datasets/breastmnist.npz"  # the bucket does not exist yet
    assert main(["datasets", "upload", str(data_dir / "breastmnist.npz"), uri]) == 0
    out = capsys.readouterr().out
    assert f"{uri}: 546 train, 78 val, 156 test, 2 classes" in out
    stored = s3_env.root / "datasets" / "breastmnist.npz"
    assert stored.read_bytes() == (data_dir / "breastmnist.npz").read_bytes()
    dataset = load_dataset_uri(uri)  # as a job reads it, with the same env
    assert_same(dataset, load_dataset(data_dir / "breastmnist.npz"))


def test_upload_csv_manifest_with_its_images(s3_env: S3Server, tmp_path: Path) -> None:
    local = write_manifest(tmp_path / "local")
    settings = s3_env.settings()
    upload = upload_dataset(local, "s3://datasets/scans/labels.csv", settings)
    keys = [url for url, _ in upload.objects]
    assert keys[-1] == "s3://datasets/scans/labels.csv"  # the manifest last
    assert sorted(keys[:-1]) == [f"s3://datasets/scans/img/{i}.png" for i in range(6)]
    loaded = load_dataset_uri("s3://datasets/scans/labels.csv", store_settings=settings)
    assert_same(loaded, load_dataset(local))


def test_upload_refuses_what_is_not_a_dataset(
    s3_env: S3Server, tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not an archive")
    assert main(["datasets", "upload", str(junk), "s3://datasets/junk.npz"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "junk.npz" in err
    assert not (s3_env.root / "datasets").exists()  # nothing written, not even the bucket

    npz = data_dir / "breastmnist.npz"
    for uri, message in [
        ("s3://datasets/b.csv", "same suffix"),
        ("file:///tmp/b.npz", "give an s3://BUCKET/KEY URI"),
        ("s3://Bad_Bucket/b.npz", "not an S3 bucket name"),
    ]:
        assert main(["datasets", "upload", str(npz), uri]) == 2
        assert message in capsys.readouterr().err

    outside = write_manifest(tmp_path / "m")
    shutil.copy(outside.parent / "img" / "0.png", tmp_path / "up.png")
    text = outside.read_text().replace("img/0.png", "../up.png")
    outside.write_text(text)
    with pytest.raises(DataError, match=r"inside the manifest.s folder"):
        upload_dataset(outside, "s3://datasets/m/labels.csv", s3_env.settings())
    assert not (s3_env.root / "datasets").exists()


def test_upload_needs_an_endpoint(
    monkeypatch: pytest.MonkeyPatch, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("NOISESCORE_S3_ENDPOINT", raising=False)
    npz = str(data_dir / "breastmnist.npz")
    assert main(["datasets", "upload", npz, "s3://datasets/b.npz"]) == 2
    assert "set NOISESCORE_S3_ENDPOINT" in capsys.readouterr().err


def test_upload_with_wrong_credentials_fails(s3_server: S3Server, data_dir: Path) -> None:
    settings = s3_server.settings().model_copy(update={"s3_secret_key": SecretStr("wrong-secret")})
    with pytest.raises(StorageError):
        upload_dataset(data_dir / "breastmnist.npz", "s3://datasets/b.npz", settings)


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("breastmnist", "medmnist://breastmnist"),
        ("BreastMNIST", "medmnist://breastmnist"),
        ("breastmnist_64", "medmnist://breastmnist_64"),
        ("medmnist://BreastMNIST", "medmnist://breastmnist"),
        ("/data/x.npz", "file:///data/x.npz"),
        ("data/x.npz", "data/x.npz"),  # relative to the worker: left as given
        ("s3://datasets/b.npz", "s3://datasets/b.npz"),
        ("file:///data/scans/labels.csv", "file:///data/scans/labels.csv"),
    ],
)
def test_canonical_dataset_uri(given: str, canonical: str) -> None:
    assert canonical_dataset_uri(given) == canonical


def test_getjob_spec_has_the_uri_form() -> None:
    """What GetJob/ListJobs return for a job whose settings name the dataset bare."""
    spec = settings_to_spec({"dataset": "breastmnist", "epochs": 3}, "")
    assert spec.dataset_uri == "medmnist://breastmnist" and spec.epochs == 3
