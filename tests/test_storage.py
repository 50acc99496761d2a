"""Tests of noisescore.storage and noisescore.jobs against a local folder and a real S3 server.

The S3 backend runs against ``rclone serve s3`` (see ``S3Server`` in conftest.py): real HTTP,
real signatures, real failures when the server is stopped.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import S3Server

from noisescore.jobs import (
    JOB_FILES,
    MANIFEST,
    MANIFEST_FORMAT,
    IncompleteJob,
    JobStore,
    list_jobs,
    new_job_id,
    validate_job_id,
)
from noisescore.storage import (
    ArtifactNotFound,
    ArtifactRef,
    ArtifactStore,
    ChecksumMismatch,
    LocalStore,
    S3Store,
    StorageError,
    StorageUnavailable,
    open_store,
    sha256_hex,
    validate_key,
)

BUCKET = "noisescore"


def s3_store(server: S3Server, bucket: str = BUCKET, **kwargs: object) -> S3Store:
    return S3Store(
        server.endpoint,
        bucket,
        server.ACCESS_KEY,
        server.SECRET_KEY,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[ArtifactStore, Path]]:
    """Each backend, with the folder where its objects end up as files."""
    if request.param == "local":
        yield LocalStore(tmp_path / "store"), tmp_path / "store"
        return
    server = S3Server(tmp_path / "s3")
    try:
        server.start()
        store = s3_store(server)
        store.check()
        yield store, server.root / BUCKET
    finally:
        server.stop()


@pytest.fixture
def store(backend: tuple[ArtifactStore, Path]) -> ArtifactStore:
    return backend[0]


# --------------------------------------------------------------------------- the contract


def test_round_trip(store: ArtifactStore) -> None:
    data = bytes(range(256)) * 10
    ref = store.put_bytes("jobs/a/blob.bin", data)
    assert ref == ArtifactRef(name="jobs/a/blob.bin", size=len(data), sha256=sha256_hex(data))
    assert ref.as_dict() == {"size": 2560, "sha256": sha256_hex(data)}
    assert store.get_bytes("jobs/a/blob.bin") == data
    assert store.exists("jobs/a/blob.bin")
    assert store.size("jobs/a/blob.bin") == 2560


def test_overwrite_and_empty(store: ArtifactStore) -> None:
    store.put_bytes("x.txt", b"first")
    store.put_bytes("x.txt", b"second, longer")
    assert store.get_bytes("x.txt") == b"second, longer"
    ref = store.put_bytes("empty", b"")
    assert ref.size == 0 and ref.sha256 == sha256_hex(b"")
    assert store.get_bytes("empty") == b""
    assert store.size("empty") == 0


def test_list_is_recursive_sorted_and_prefix_filtered(store: ArtifactStore) -> None:
    for key in ["jobs/b/2.txt", "jobs/a/1.txt", "jobs/a/sub/3.txt", "jobsx/4.txt", "top.txt"]:
        store.put_bytes(key, key.encode())
    assert store.list() == [
        "jobs/a/1.txt", "jobs/a/sub/3.txt", "jobs/b/2.txt", "jobsx/4.txt", "top.txt",
    ]  # fmt: skip
    assert store.list("jobs/") == ["jobs/a/1.txt", "jobs/a/sub/3.txt", "jobs/b/2.txt"]
    assert store.list("jobs/a/") == ["jobs/a/1.txt", "jobs/a/sub/3.txt"]
    assert store.list("jobs") == ["jobs/a/1.txt", "jobs/a/sub/3.txt", "jobs/b/2.txt", "jobsx/4.txt"]
    assert store.list("jobs/a/s") == ["jobs/a/sub/3.txt"]
    assert store.list("nothing/") == []


def test_delete(store: ArtifactStore) -> None:
    store.put_bytes("a/b.txt", b"x")
    store.delete("a/b.txt")
    assert not store.exists("a/b.txt")
    assert store.list("a/") == []
    store.delete("a/b.txt")  # missing is fine
    store.delete("never/was.txt")


def test_missing_key(store: ArtifactStore) -> None:
    assert not store.exists("no/such.bin")
    with pytest.raises(ArtifactNotFound, match=r"no/such\.bin"):
        store.get_bytes("no/such.bin")
    with pytest.raises(ArtifactNotFound, match=r"no/such\.bin"):
        store.size("no/such.bin")


def test_a_folder_is_not_an_artifact(store: ArtifactStore) -> None:
    store.put_bytes("dir/file.txt", b"x")
    assert not store.exists("dir")
    with pytest.raises(ArtifactNotFound):
        store.get_bytes("dir")


@pytest.mark.parametrize(
    "key", ["", "/abs", "a//b", "a/./b", "../up", "a/..", "a\\b", "trailing/", ".", "nul\x00"]
)
def test_bad_keys_are_rejected(store: ArtifactStore, key: str) -> None:
    for call in (
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.exists(key),
        lambda: store.size(key),
        lambda: store.delete(key),
    ):
        with pytest.raises(ValueError, match="invalid artifact key"):
            call()


def test_bad_prefixes_are_rejected(store: ArtifactStore) -> None:
    for prefix in ["/jobs", "../", "a//", "a\\"]:
        with pytest.raises(ValueError, match="invalid artifact prefix"):
            store.list(prefix)


def test_url(backend: tuple[ArtifactStore, Path]) -> None:
    store, folder = backend
    if isinstance(store, LocalStore):
        assert store.url("jobs/a/x.csv") == f"file://{folder.resolve()}/jobs/a/x.csv"
        assert store.url() == f"file://{folder.resolve()}/"
    else:
        assert store.url("jobs/a/x.csv") == "s3://noisescore/jobs/a/x.csv"
        assert store.url() == "s3://noisescore/"
    with pytest.raises(ValueError):
        store.url("../x")


def test_validate_key() -> None:
    assert validate_key("jobs/a/model.onnx") == "jobs/a/model.onnx"
    assert validate_key("", prefix=True) == ""
    assert validate_key("jobs/", prefix=True) == "jobs/"
    with pytest.raises(ValueError, match="no leading '/'"):
        validate_key("/etc/passwd")


# --------------------------------------------------------------------------- local


def test_local_store_leaves_no_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for i in range(5):
        store.put_bytes("jobs/a/x.bin", bytes([i]) * 100)
    assert sorted(p.name for p in (tmp_path / "jobs" / "a").iterdir()) == ["x.bin"]
    assert store.list() == ["jobs/a/x.bin"]


def test_local_store_ignores_in_progress_writes(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("a/x.bin", b"x")
    (tmp_path / "a" / ".x.bin.k2j4h1.tmp").write_bytes(b"half")  # a write in progress
    assert store.list() == ["a/x.bin"]


def test_local_failed_write_keeps_old_content(tmp_path: Path) -> None:
    """A write that fails half-way (file size limit: EFBIG, even as root) changes nothing."""
    store = LocalStore(tmp_path)
    store.put_bytes("a/x.bin", b"old")
    script = (
        "import sys\n"
        "from noisescore.storage import LocalStore, StorageError\n"
        "try:\n"
        "    LocalStore(sys.argv[1]).put_bytes('a/x.bin', b'n' * 100_000)\n"
        "except StorageError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))

    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        preexec_fn=limit_file_size,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done.stderr
    assert "cannot write" in done.stdout and "File too large" in done.stdout
    assert store.get_bytes("a/x.bin") == b"old"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.bin"]


def test_local_interrupted_write_keeps_old_content(tmp_path: Path) -> None:
    """A write that dies half-way (here: not bytes) leaves the old file and no temp file."""
    store = LocalStore(tmp_path)
    store.put_bytes("a/x.bin", b"old")
    with pytest.raises(TypeError):
        store.put_bytes("a/x.bin", "not bytes")  # type: ignore[arg-type]
    assert store.get_bytes("a/x.bin") == b"old"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.bin"]


def test_local_check_creates_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "new" / "root")
    store.check()
    assert (tmp_path / "new" / "root").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageUnavailable, match="cannot be created"):
        LocalStore(blocker / "root").check()


def test_open_store_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from noisescore.settings import StoreSettings

    monkeypatch.delenv("NOISESCORE_S3_ENDPOINT", raising=False)
    monkeypatch.setenv("NOISESCORE_STORE_DIR", str(tmp_path / "env-store"))
    store = open_store()
    assert isinstance(store, LocalStore)
    assert store.root == (tmp_path / "env-store").resolve()
    store = open_store(StoreSettings(store_dir=tmp_path / "x"))  # type: ignore[call-arg]
    assert isinstance(store, LocalStore) and store.root == (tmp_path / "x").resolve()


# --------------------------------------------------------------------------- s3


def test_s3_check_creates_the_bucket(s3_server: S3Server) -> None:
    store = s3_store(s3_server, "fresh-bucket")
    assert store.list() == []  # no bucket yet: nothing stored
    store.check()
    assert (s3_server.root / "fresh-bucket").is_dir()
    store.check()  # idempotent
    store.put_bytes("k/v.txt", b"value")
    assert (s3_server.root / "fresh-bucket" / "k" / "v.txt").read_bytes() == b"value"


def test_s3_put_creates_a_missing_bucket(s3_server: S3Server) -> None:
    store = s3_store(s3_server, "lazy-bucket")
    store.put_bytes("a.txt", b"a")
    assert store.get_bytes("a.txt") == b"a"


def test_s3_missing_bucket_reads_as_not_found(s3_server: S3Server) -> None:
    store = s3_store(s3_server, "no-such-bucket")
    with pytest.raises(ArtifactNotFound, match=r"s3://no-such-bucket/x\.bin"):
        store.get_bytes("x.bin")
    assert not store.exists("x.bin")
    store.delete("x.bin")


def test_s3_any_bucket_access(s3_server: S3Server) -> None:
    store = s3_store(s3_server)
    other = s3_store(s3_server, "datasets")
    other.put_bytes("mnist/a.npz", b"A")
    other.put_bytes("mnist/img/1.png", b"B")
    assert store.get_object("datasets", "mnist/a.npz") == b"A"
    assert store.list_objects("datasets", "mnist/") == ["mnist/a.npz", "mnist/img/1.png"]
    with pytest.raises(ArtifactNotFound, match=r"s3://datasets/mnist/zzz\.npz"):
        store.get_object("datasets", "mnist/zzz.npz")
    with pytest.raises(ValueError, match="bucket name"):
        store.get_object("X", "a")


def test_s3_unreachable_then_back(s3_server: S3Server) -> None:
    store = s3_store(s3_server)
    store.check()
    store.put_bytes("a.txt", b"before")
    s3_server.stop()
    for call in (
        store.check,
        lambda: store.get_bytes("a.txt"),
        lambda: store.put_bytes("b.txt", b"x"),
        lambda: store.list(),
        lambda: store.exists("a.txt"),
    ):
        started = time.monotonic()
        with pytest.raises(StorageUnavailable) as info:
            call()
        elapsed = time.monotonic() - started
        assert elapsed < 15, f"took {elapsed:.1f} s to notice a dead server"
        message = str(info.value)
        assert f"storage at http://{s3_server.endpoint} is unreachable" in message
        assert s3_server.SECRET_KEY not in message
    s3_server.start()
    assert store.get_bytes("a.txt") == b"before"
    store.put_bytes("b.txt", b"after")
    assert store.list() == ["a.txt", "b.txt"]


def test_s3_connection_refused_fails_fast(tmp_path: Path) -> None:
    server = S3Server(tmp_path / "never-started")  # a free port nobody listens on
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match=r"127\.0\.0\.1:\d+ is unreachable"):
        s3_store(server).check()
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("wrong", ["secret", "access"])
def test_s3_wrong_credentials(s3_server: S3Server, wrong: str) -> None:
    s3_store(s3_server).check()
    access = "an-unknown-access-key" if wrong == "access" else s3_server.ACCESS_KEY
    secret = "a-wrong-secret-key-value" if wrong == "secret" else s3_server.SECRET_KEY
    store = S3Store(s3_server.endpoint, BUCKET, access, secret)
    for call in (store.check, lambda: store.get_bytes("a"), lambda: store.put_bytes("a", b"")):
        with pytest.raises(StorageError, match="NOISESCORE_S3_ACCESS_KEY") as info:
            call()
        assert not isinstance(info.value, StorageUnavailable | ArtifactNotFound)
        assert secret not in str(info.value)
    assert secret not in repr(store)


def test_s3_repr_hides_the_secret(s3_server: S3Server) -> None:
    store = s3_store(s3_server)
    assert repr(store) == f"S3Store(endpoint='http://{s3_server.endpoint}', bucket='noisescore')"
    assert s3_server.SECRET_KEY not in repr(store) and s3_server.ACCESS_KEY not in repr(store)


@pytest.mark.parametrize(
    ("endpoint", "secure", "expected"),
    [
        ("127.0.0.1:9000", False, "http://127.0.0.1:9000"),
        ("127.0.0.1:9000", True, "https://127.0.0.1:9000"),
        ("http://minio:9000", True, "http://minio:9000"),
        ("https://minio:9000/", False, "https://minio:9000"),
        ("HTTP://minio", False, "http://minio"),
        ("[::1]:9000", False, "http://[::1]:9000"),
    ],
)
def test_s3_endpoint_forms(endpoint: str, secure: bool, expected: str) -> None:
    assert S3Store(endpoint, BUCKET, None, None, secure=secure).endpoint == expected


@pytest.mark.parametrize(
    "endpoint",
    ["", "ftp://host:21", "s3://bucket", "host:port", "host:99999", "http://h:9000/path",
     "http://user:pw@h:9000", "host:", "http://", "h:9000?x=1"],
)  # fmt: skip
def test_s3_bad_endpoints(endpoint: str) -> None:
    with pytest.raises(ValueError, match="S3 endpoint"):
        S3Store(endpoint, BUCKET, None, None)


def test_s3_bad_bucket() -> None:
    with pytest.raises(ValueError, match="invalid S3 bucket name 'ab'"):
        S3Store("127.0.0.1:9000", "ab", None, None)


def test_open_store_s3(s3_server: S3Server) -> None:
    store = open_store(s3_server.settings(bucket="from-settings"))
    assert isinstance(store, S3Store)
    assert store.bucket == "from-settings"
    assert store.endpoint == f"http://{s3_server.endpoint}"
    store.check()
    store.put_bytes("a", b"a")
    assert (s3_server.root / "from-settings" / "a").read_bytes() == b"a"


# --------------------------------------------------------------------------- jobs


def write_job(job: JobStore) -> dict[str, bytes]:
    """Write every JOB_FILES entry plus a checkpoint, then the manifest."""
    contents = {name: f"{name} of {job.job_id}\n".encode() * 3 for name in JOB_FILES}
    contents["noisy_labels.npy"] = np.arange(10, dtype=np.int64).tobytes()
    refs = [job.put(name, data) for name, data in contents.items()]
    job.put("checkpoints/warmup.pt", b"not in the manifest")
    job.write_manifest(refs, noisescore_version="0.1.0", flow_run_id=None)
    return contents


def test_job_publish_and_verify(backend: tuple[ArtifactStore, Path]) -> None:
    store, _ = backend
    job = JobStore(store, "job-1")
    assert job.prefix == "jobs/job-1/"
    assert job.key("trust.csv") == "jobs/job-1/trust.csv"
    assert job.url("trust.csv") == store.url("jobs/job-1/trust.csv")
    assert job.url() == store.url("jobs/job-1/")
    assert not job.is_complete()
    contents = write_job(job)
    assert job.is_complete()
    verified = job.verify()
    assert sorted(verified) == sorted(JOB_FILES)
    assert verified["trust.csv"] == ArtifactRef(
        "trust.csv", len(contents["trust.csv"]), sha256_hex(contents["trust.csv"])
    )
    for name, data in contents.items():
        assert job.get(name) == data
    manifest = job.read_manifest()
    assert manifest["format"] == MANIFEST_FORMAT
    assert manifest["job_id"] == "job-1"
    assert list(manifest["files"]) == sorted(JOB_FILES)
    assert manifest["noisescore_version"] == "0.1.0" and manifest["flow_run_id"] is None
    assert manifest["created"].endswith("+00:00")
    with pytest.raises(ArtifactNotFound, match="not listed"):
        job.get("checkpoints/warmup.pt")
    assert job.get("checkpoints/warmup.pt", verify=False) == b"not in the manifest"
    assert job.exists("checkpoints/warmup.pt") and not job.exists("model.bin")
    assert job.ref("model.pt") == verified["model.pt"]


def test_job_corrupt_artifact(backend: tuple[ArtifactStore, Path]) -> None:
    store, folder = backend
    job = JobStore(store, "job-2")
    contents = write_job(job)
    # Corrupt the bytes for real, behind the store's back, keeping the size.
    stored = folder / "jobs" / "job-2" / "trust.csv"
    assert stored.read_bytes() == contents["trust.csv"]
    stored.write_bytes(contents["trust.csv"].upper())
    expected = sha256_hex(contents["trust.csv"])
    actual = sha256_hex(contents["trust.csv"].upper())
    with pytest.raises(ChecksumMismatch, match=r"trust\.csv") as info:
        job.verify()
    assert expected in str(info.value) and actual in str(info.value)
    with pytest.raises(ChecksumMismatch, match=r"trust\.csv"):
        job.get("trust.csv")
    assert job.get("trust.csv", verify=False) == contents["trust.csv"].upper()
    assert job.get("report.json") == contents["report.json"]  # the others still verify
    if isinstance(store, LocalStore):
        # A changed size is caught as well. (Not tried on rclone: it caches sizes and
        # serves a file that shrank underneath it as a broken connection.)
        stored.write_bytes(b"short")
        with pytest.raises(ChecksumMismatch, match=r"found sha256 \w+ \(5 bytes\)"):
            job.get("trust.csv")


def test_job_missing_artifact(backend: tuple[ArtifactStore, Path]) -> None:
    store, _ = backend
    job = JobStore(store, "job-3")
    write_job(job)
    store.delete(job.key("model.onnx"))
    with pytest.raises(
        ArtifactNotFound, match=r"model\.onnx is listed in manifest\.json but missing"
    ):
        job.verify()


def test_job_without_manifest_is_incomplete(backend: tuple[ArtifactStore, Path]) -> None:
    store, _ = backend
    job = JobStore(store, "running")
    job.put("spec.json", b"{}")
    assert not job.is_complete()
    message = "job running has no manifest.json: it is still running, failed, or was never"
    with pytest.raises(IncompleteJob, match=message):
        job.read_manifest()
    with pytest.raises(IncompleteJob):
        job.verify()
    with pytest.raises(IncompleteJob):
        job.get("spec.json")
    assert job.get("spec.json", verify=False) == b"{}"
    assert isinstance(IncompleteJob("x"), StorageError)


def test_write_manifest_checks_stored_sizes(backend: tuple[ArtifactStore, Path]) -> None:
    store, _ = backend
    job = JobStore(store, "job-4")
    ref = job.put("report.json", b"{}")
    job.put("report.json", b'{"overwritten": true}')
    with pytest.raises(StorageError, match=r"report\.json is 21 bytes in the store but its ref"):
        job.write_manifest([ref])
    ghost = ArtifactRef("model.pt", 3, sha256_hex(b"abc"))
    with pytest.raises(StorageError, match=r"model\.pt is not stored"):
        job.write_manifest([ghost])
    assert not job.is_complete()
    with pytest.raises(ValueError, match="reserved"):
        job.write_manifest([], files={})
    with pytest.raises(ValueError, match="listed twice"):
        job.write_manifest([job.ref("report.json"), ArtifactRef("report.json", 21, "0" * 64)])
    assert not job.is_complete()


def test_malformed_manifest(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    job = JobStore(store, "job-5")
    store.put_bytes(job.key(MANIFEST), b"{not json")
    with pytest.raises(StorageError, match="not valid JSON"):
        job.read_manifest()
    store.put_bytes(job.key(MANIFEST), json.dumps({"format": "other", "files": {}}).encode())
    with pytest.raises(StorageError, match="format is 'other'"):
        job.read_manifest()
    bad = {"format": MANIFEST_FORMAT, "job_id": "job-5", "files": {"a": {"size": "1"}}}
    store.put_bytes(job.key(MANIFEST), json.dumps(bad).encode())
    with pytest.raises(StorageError, match="entry 'a'"):
        job.read_manifest()
    other = {"format": MANIFEST_FORMAT, "job_id": "job-6", "files": {}}
    store.put_bytes(job.key(MANIFEST), json.dumps(other).encode())
    with pytest.raises(StorageError, match="job_id is 'job-6'"):
        job.read_manifest()


def test_list_jobs(backend: tuple[ArtifactStore, Path]) -> None:
    store, _ = backend
    assert list_jobs(store) == []
    JobStore(store, "b-job").put("spec.json", b"{}")
    JobStore(store, "a-job").put("checkpoints/warmup.pt", b"w")
    store.put_bytes("jobs/Not_A_Job/x", b"stray")
    store.put_bytes("jobs/loose-file", b"stray")
    store.put_bytes("other/c-job/x", b"elsewhere")
    assert list_jobs(store) == ["a-job", "b-job"]


def test_job_ids() -> None:
    for good in ["a", "0", "job-1", "3f2a9c1d00e4b7a2", "a" * 63, "ab--c", "x-"]:
        assert validate_job_id(good) == good
    flow_run_id = "0190b2c4-8d3e-7f1a-9b2c-4d5e6f7a8b9c"  # a Prefect flow-run UUID
    assert validate_job_id(flow_run_id) == flow_run_id
    for bad in ["", "-a", "A", "job_1", "job/1", "a" * 64, "a b", "../x", "é", "a\n", "a.b"]:
        with pytest.raises(ValueError, match=r"a-z, 0-9 and '-'"):
            validate_job_id(bad)
    with pytest.raises(ValueError, match="invalid job id"):
        JobStore(LocalStore("/nonexistent"), "../../etc")
    ids = {new_job_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(validate_job_id(i) == i and len(i) == 16 for i in ids)
