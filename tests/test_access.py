"""What a remote caller may make the service read (issue 14): the dataset access policy
(``NOISESCORE_DATASET_ROOTS``) at submission and again where the job reads, CSV manifests
confined to their folder, s3:// datasets fetched object by object under a size cap, the
refusal to serve a non-loopback address unauthenticated, npz members read only when
needed, single-class datasets refused.

Real parts throughout: a gRPC server with the real servicer and job manager (jobs are
child processes running the clean-labels flow), real files and symlinks, a real S3
server (rclone) behind a TCP relay that records every request it forwards.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import S3Server
from PIL import Image
from pydantic import SecretStr

from noisescore.client import NoiseScoringClient
from noisescore.ml.clean import load_data
from noisescore.ml.data import DataError, load_dataset, load_manifest, load_npz
from noisescore.service.app import App, create_app
from noisescore.service.jobs import RECORD, JobRecord
from noisescore.service.server import Service, check_exposure
from noisescore.settings import CleanSettings, ServiceSettings, StoreSettings
from noisescore.storage import LocalStore, S3Store
from noisescore.uris import (
    ROOTS_SETTING,
    DatasetAccessDenied,
    DatasetPolicy,
    load_dataset_uri,
    parse_dataset_roots,
)
from noisescore.v1 import noise_scoring_pb2 as pb
from noisescore.v1 import noise_scoring_pb2_grpc as pb_grpc

DENIED = grpc.StatusCode.PERMISSION_DENIED
UNUSABLE = "cannot be used: each path must name a readable PNG or JPEG file inside the manifest"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's NOISESCORE_* settings must not change what these tests see."""
    for name in list(os.environ):
        if name.startswith("NOISESCORE_"):
            monkeypatch.delenv(name)


# --------------------------------------------------------------------------- helpers


def write_npz(path: Path, n: int = 40, *, labels: np.ndarray | None = None, seed: int = 0) -> Path:
    """A small two-class MedMNIST-format archive (28x28 grey, train + test)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        train_images=rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        train_labels=np.arange(n) % 2 if labels is None else labels,
        test_images=rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        test_labels=np.arange(10) % 2,
    )
    return path


def write_png(path: Path, value: int = 0, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, size), value).save(path)


def write_manifest(path: Path, rows: list[tuple[str, int]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return path


def image_rows(folder: Path, n: int = 8, sub: str = "img") -> list[tuple[str, int]]:
    """``n`` PNGs in ``folder/sub``, two classes; their manifest rows."""
    rows = []
    for i in range(n):
        write_png(folder / sub / f"{i}.png", 30 * i)
        rows.append((f"{sub}/{i}.png", i % 2))
    return rows


# --------------------------------------------------------------------------- the policy


def test_roots_setting_parses_lists_and_refuses_bad_roots(tmp_path: Path) -> None:
    text = f"{tmp_path}/a/, s3://datasets/scans/ ,file://{tmp_path}/b,s3://whole-bucket"
    roots = ServiceSettings(dataset_roots=text).dataset_roots
    assert roots == (f"{tmp_path}/a", f"{tmp_path}/b", "s3://datasets/scans", "s3://whole-bucket")
    assert parse_dataset_roots(json.dumps(["/x,y", "s3://b-1/p"])) == ("/x,y", "s3://b-1/p")
    assert ServiceSettings().dataset_roots == ()  # default: dataset names only
    for bad in ("relative/dir", "s3://Bad_Bucket/x", "s3://bucket/../up", "gs://b/p", "~/data"):
        with pytest.raises(ValueError, match=ROOTS_SETTING):
            ServiceSettings(dataset_roots=bad)


def test_policy_admits_names_and_uris_under_roots_only(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)  # leads out
    (root / "inner").symlink_to(root / "sub", target_is_directory=True)  # stays in
    linked_root = tmp_path / "linked-root"
    linked_root.symlink_to(root, target_is_directory=True)
    policy = DatasetPolicy.from_roots([str(linked_root), "s3://datasets/scans"])
    admitted = {
        "breastmnist": "breastmnist",
        "medmnist://BreastMNIST": "breastmnist",
        f"file://{linked_root}/sub/x.npz": f"{root}/sub/x.npz",  # read at its real path
        f"{root}/inner/x.csv": f"{root}/sub/x.csv",
        f"file://{root}/sub/../x.npz": f"{root}/x.npz",
        "s3://datasets/scans/x.npz": "scans/x.npz",
        "s3://datasets/scans/deep/er/labels.csv": "scans/deep/er/labels.csv",
    }
    for uri, location in admitted.items():
        assert policy.admit(uri).location == location, uri
    refused = [
        f"file://{outside}/x.npz",
        f"file://{root}/../outside/x.npz",
        f"file://{root}/escape/x.npz",  # a symlink out of the root
        f"{outside}/x.npz",  # a bare absolute path
        "sub/x.npz",  # a bare relative path: relative to the server's cwd
        "../x.npz",
        "x.npz",
        "file:///etc/passwd.csv",
        f"file://{root}/sub/x%00.npz",
        "s3://other-bucket/scans/x.npz",
        "s3://datasets/scansX/x.npz",  # a prefix is a folder, not a string prefix
        "s3://datasets/x.npz",
    ]
    for uri in refused:
        with pytest.raises(DatasetAccessDenied) as info:
            policy.admit(uri)
        message = str(info.value)
        assert ROOTS_SETTING in message, uri
        assert str(tmp_path) not in message.replace(uri, ""), message  # only the caller's text
    # No roots at all: names only.
    with pytest.raises(DatasetAccessDenied):
        DatasetPolicy.from_roots([]).admit(f"file://{root}/sub/x.npz")
    # A long URI is echoed clipped.
    with pytest.raises(DatasetAccessDenied) as info:
        policy.admit("s3://other-bucket/" + "k" * 5000 + ".npz")
    assert len(str(info.value)) < 600


def test_the_job_checks_where_it_reads(tmp_path: Path) -> None:
    """ml.clean.load_data (what the flow's load-dataset step runs) applies the roots the
    service put in the job's settings; NOISESCORE_DATASET_ROOTS never restricts the CLI."""
    root = tmp_path / "root"
    inside = write_npz(root / "x.npz")
    secret = write_npz(tmp_path / "secret.npz")
    roots = json.dumps([str(root)])
    dataset = load_data(CleanSettings(dataset=f"file://{inside}", dataset_roots=roots))
    assert len(dataset.train) == 40
    for uri in (f"file://{secret}", str(secret), f"file://{root}/../secret.npz"):
        with pytest.raises(DatasetAccessDenied, match=ROOTS_SETTING):
            load_data(CleanSettings(dataset=uri, dataset_roots=roots))
    os.environ[ROOTS_SETTING] = str(root)
    try:
        settings = CleanSettings(dataset=f"file://{secret}")  # the operator's freedom
    finally:
        del os.environ[ROOTS_SETTING]
    assert settings.dataset_roots is None
    assert len(load_data(settings).train) == 40


# --------------------------------------------------------------------------- the service


@pytest.fixture(scope="module")
def access_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("access")
    dirs = {name: base / name for name in ("store", "root", "outside", "data")}
    for folder in dirs.values():
        folder.mkdir()
    write_npz(dirs["data"] / "tinymnist.npz")
    write_npz(dirs["outside"] / "secret.npz", seed=7)
    write_npz(dirs["root"] / "allowed.npz")
    (dirs["root"] / "escape.npz").symlink_to(dirs["outside"] / "secret.npz")
    # A manifest in the root whose rows climb out of it, to the secret images.
    rows = image_rows(dirs["root"] / "scans", 6)
    write_png(dirs["outside"] / "private.png", 99)
    write_manifest(dirs["root"] / "scans" / "labels.csv", [*rows, ("../../outside/private.png", 1)])
    return dirs


@pytest.fixture(scope="module")
def access_app(
    access_dirs: dict[str, Path], prefect_api: str
) -> Iterator[tuple[App, NoiseScoringClient]]:
    settings = ServiceSettings(
        grpc_addr="127.0.0.1:0",
        metrics_addr=None,
        job_workers=3,
        dataset_roots=f"{access_dirs['root']},s3://datasets/scans",
    )
    app = create_app(
        settings,
        store=LocalStore(access_dirs["store"]),
        job_env={"NOISESCORE_DATA_DIR": str(access_dirs["data"]), "PREFECT_API_URL": prefect_api},
    ).start()
    try:
        with NoiseScoringClient(f"127.0.0.1:{app.port}") as client:
            yield app, client
    finally:
        app.stop(grace=1)


def _rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_remote_submissions_outside_the_roots_are_permission_denied(
    access_app: tuple[App, NoiseScoringClient], access_dirs: dict[str, Path]
) -> None:
    _, client = access_app
    outside, root = access_dirs["outside"], access_dirs["root"]
    refused = [
        f"file://{outside}/secret.npz",
        f"file://{root}/../outside/secret.npz",
        f"file://{root}/escape.npz",
        f"{outside}/secret.npz",
        "../outside/secret.npz",
        "secret.npz",
        "s3://other-bucket/scans/x.npz",
        "s3://noisescore/jobs/x/data.npz",
        "s3://datasets/elsewhere/x.npz",
    ]
    jobs = access_dirs["store"] / "jobs"
    before = len(list(jobs.glob("*"))) if jobs.is_dir() else 0
    for uri in refused:
        err = _rpc_error(lambda uri=uri: client.submit(uri, epochs=1, warmup_epochs=1))
        assert err.code() == DENIED, (uri, err.code(), err.details())
        details = err.details() or ""
        assert ROOTS_SETTING in details
        assert str(access_dirs["root"]) not in details.replace(uri, ""), details
    assert (len(list(jobs.glob("*"))) if jobs.is_dir() else 0) == before  # nothing queued
    # A syntax error stays INVALID_ARGUMENT, checked before the policy.
    assert _rpc_error(lambda: client.submit("http://x/y.npz")).code() == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def _wait(client: NoiseScoringClient, name: str, timeout: float = 300) -> pb.Job:
    deadline = time.monotonic() + timeout
    while (job := client.get(name)).state not in (
        pb.Job.SUCCEEDED, pb.Job.FAILED, pb.Job.CANCELLED,
    ):  # fmt: skip
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    return job


@pytest.mark.slow
def test_jobs_read_only_what_the_policy_admits(
    access_app: tuple[App, NoiseScoringClient], access_dirs: dict[str, Path]
) -> None:
    """Three real jobs (child processes, the clean-labels flow), run at once:

    - a file under a root trains, and its corrections come back (dataset names: the
      service tests);
    - a symlink that pointed inside the root when submitted and out of it when the job
      starts: the job's own check refuses it (the service's check alone would not);
    - a manifest inside the root whose row climbs out of its folder fails with the one
      message for unusable images, and no sample id of the outside file is published.
    """
    _, client = access_app
    root, outside = access_dirs["root"], access_dirs["outside"]
    swap = root / "swap.npz"
    swap.symlink_to(root / "allowed.npz")
    small = {"epochs": 1, "warmup_epochs": 1, "device": "cpu"}
    allowed = client.submit(f"file://{root}/allowed.npz", **small)
    swapped = client.submit(f"file://{swap}", **small)
    swap.unlink()  # the child is still importing torch: long before it reads the data
    swap.symlink_to(outside / "secret.npz")
    climbing = client.submit(f"file://{root}/scans/labels.csv", **small)

    done = _wait(client, allowed.name)
    assert done.state == pb.Job.SUCCEEDED, done.error
    assert done.spec.dataset_uri == f"file://{root}/allowed.npz"  # as the caller wrote it
    assert sum(1 for _ in client.corrections(done.name)) == 40

    failed = _wait(client, swapped.name)
    assert failed.state == pb.Job.FAILED
    assert ROOTS_SETTING in failed.error and "not allowed" in failed.error

    failed = _wait(client, climbing.name)
    assert failed.state == pb.Job.FAILED
    assert UNUSABLE in failed.error and "private.png" not in failed.error.replace(
        "'../../outside/private.png'", ""
    )
    # The roots travelled with the job: its stored settings carry them.
    record = JobRecord.from_bytes(
        (access_dirs["store"] / "jobs" / swapped.name.split("/")[1] / RECORD).read_bytes()
    )
    assert record.spec["dataset_roots"] == [str(root), "s3://datasets/scans"]


# --------------------------------------------------------------------------- manifests


@pytest.fixture
def manifest_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "hospital" / "export"
    write_manifest(folder / "labels.csv", image_rows(folder, 6))
    return folder


def test_manifest_images_must_stay_in_the_manifests_folder(
    manifest_dir: Path, tmp_path: Path
) -> None:
    """Every way out of the folder, and every way an image cannot be read, gives the same
    message: a manifest cannot tell what exists elsewhere on the machine."""
    write_png(tmp_path / "secret" / "scan.png", 200)
    (tmp_path / "secret" / "unreadable.png").write_bytes(b"not an image at all")
    (manifest_dir / "link-out.png").symlink_to(tmp_path / "secret" / "scan.png")
    (manifest_dir / "dir-out").symlink_to(tmp_path / "secret", target_is_directory=True)
    (manifest_dir / "loop.png").symlink_to(manifest_dir / "loop.png")
    (manifest_dir / "garbage.png").write_bytes(b"not an image at all")
    (manifest_dir / "folder.png").mkdir()
    rows = image_rows(manifest_dir, 6)
    bad = [
        str(tmp_path / "secret" / "scan.png"),  # absolute, exists
        str(tmp_path / "secret" / "nope.png"),  # absolute, missing
        str(tmp_path / "secret" / "unreadable.png"),  # absolute, not an image
        "../../secret/scan.png",  # climbs out, exists
        "../../secret/nope.png",  # climbs out, missing
        "link-out.png",  # a symlink out
        "dir-out/scan.png",  # through a symlinked folder out
        "loop.png",  # a symlink loop
        "garbage.png",  # inside, not an image
        "missing.png",  # inside, missing
        "folder.png",  # inside, a directory
        "img/../../../secret/scan.png",
        "bad\x00name.png",
    ]
    messages = set()
    for path in bad:
        manifest = write_manifest(manifest_dir / "probe.csv", [*rows, (path, 1)])
        with pytest.raises(DataError) as info:
            load_manifest(manifest)
        message = str(info.value)
        assert UNUSABLE in message, (path, message)
        messages.add(message.replace(repr(path), "PATH"))
    assert len(messages) == 1, messages
    # Symlinks and '..' that stay inside the folder are fine.
    (manifest_dir / "alias.png").symlink_to(manifest_dir / "img" / "0.png")
    manifest = write_manifest(
        manifest_dir / "ok.csv", [*rows, ("alias.png", 1), ("img/../img/1.png", 0)][2:]
    )
    assert len(load_manifest(manifest).train) > 0


# --------------------------------------------------------------------------- s3 datasets


class RecordingRelay:
    """A TCP relay in front of the S3 server that records the request line of every HTTP
    request it forwards (``"GET /datasets/scans/labels.csv"``)."""

    _REQUEST = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/1\.[01]\r\n")

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        pending = b""  # bytes after the last complete request line
        try:
            while data := source.recv(65536):
                if record:
                    pending += data
                    end = 0
                    for match in self._REQUEST.finditer(pending):
                        with self._lock:
                            self.requests.append(f"{match[1].decode()} {match[2].decode()}")
                        end = match.end()
                    pending = pending[end:][-4096:]
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def gets(self) -> list[str]:
        """The object paths of the GET requests (``/bucket/key``), listings excluded."""
        with self._lock:
            targets = [r.split(" ", 1)[1] for r in self.requests if r.startswith("GET ")]
        return [t.split("?")[0] for t in targets if "list-type" not in t and "prefix=" not in t]

    def listings(self) -> list[str]:
        with self._lock:
            return [r for r in self.requests if "list-type" in r or "prefix=" in r]

    def close(self) -> None:
        self._closed = True
        self._listener.close()


@pytest.fixture
def s3_data(s3_server: S3Server) -> Iterator[tuple[S3Store, RecordingRelay, StoreSettings]]:
    """Bucket ``datasets`` on a real S3 server, reached through a recording relay."""
    store = S3Store(s3_server.endpoint, "datasets", s3_server.ACCESS_KEY, s3_server.SECRET_KEY)
    store.check()
    relay = RecordingRelay(s3_server.port)
    settings = StoreSettings(  # type: ignore[call-arg]
        s3_endpoint=f"127.0.0.1:{relay.port}",
        s3_access_key=SecretStr(s3_server.ACCESS_KEY),
        s3_secret_key=SecretStr(s3_server.SECRET_KEY),
    )
    try:
        yield store, relay, settings
    finally:
        relay.close()


def _upload_manifest(store: S3Store, folder: str, rows: list[tuple[str, int]]) -> None:
    lines = ["path,label"] + [f"{p},{label}" for p, label in rows]
    store.put_bytes(f"{folder}/labels.csv", ("\n".join(lines) + "\n").encode())


def _png(value: int) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("L", (8, 8), value).save(buffer, format="PNG")
    return buffer.getvalue()


def test_s3_manifest_fetches_only_what_it_lists(
    s3_data: tuple[S3Store, RecordingRelay, StoreSettings],
) -> None:
    store, relay, settings = s3_data
    rows = [(f"img/{i}.png", i % 2) for i in range(6)]
    for i in range(6):
        store.put_bytes(f"scans/img/{i}.png", _png(30 * i))
    store.put_bytes("scans/unlisted/big.bin", os.urandom(3 * 1024 * 1024))
    store.put_bytes("scans/img/unlisted.png", _png(1))
    store.put_bytes("secret.png", _png(250))
    _upload_manifest(store, "scans", [*rows, ("../secret.png", 1), ("/secret.png", 0)])
    _upload_manifest(store, "clean", [(f"../scans/{p}", label) for p, label in rows])
    store.put_bytes(
        "ok/labels.csv",
        ("path,label\n" + "".join(f"img/{i}.png,{i % 2}\n" for i in range(6))).encode(),
    )
    for i in range(6):
        store.put_bytes(f"ok/img/{i}.png", _png(30 * i))
    store.put_bytes("ok/unlisted/big.bin", os.urandom(3 * 1024 * 1024))

    relay.requests.clear()
    dataset = load_dataset_uri("s3://datasets/ok/labels.csv", store_settings=settings)
    assert len(dataset.train) + len(dataset.test or []) == 6
    assert sorted(relay.gets()) == sorted(
        ["/datasets/ok/labels.csv", *(f"/datasets/ok/img/{i}.png" for i in range(6))]
    )
    assert not relay.listings()

    # Rows that leave the manifest's folder are never fetched; the job fails with the one
    # message for unusable images.
    relay.requests.clear()
    with pytest.raises(DataError, match=UNUSABLE):
        load_dataset_uri("s3://datasets/scans/labels.csv", store_settings=settings)
    assert "/datasets/secret.png" not in relay.gets()
    assert not any("unlisted" in key for key in relay.gets())
    with pytest.raises(DataError, match=UNUSABLE):
        load_dataset_uri("s3://datasets/clean/labels.csv", store_settings=settings)

    # A missing manifest: one request for it, no listing, nothing downloaded.
    relay.requests.clear()
    with pytest.raises(DataError, match="not found"):
        load_dataset_uri("s3://datasets/scans/nope.csv", store_settings=settings)
    assert relay.requests == ["HEAD /datasets/scans/nope.csv"]
    with pytest.raises(DataError, match="not found"):
        load_dataset_uri("s3://datasets/nope.csv", store_settings=settings)  # bucket root
    assert not relay.listings()


def test_s3_objects_over_the_size_cap_are_refused(
    s3_data: tuple[S3Store, RecordingRelay, StoreSettings],
) -> None:
    store, _, settings = s3_data
    rows = [(f"img/{i}.png", i % 2) for i in range(4)]
    for i in range(4):
        store.put_bytes(f"scans/img/{i}.png", _png(30 * i))
    store.put_bytes("scans/img/big.png", os.urandom(200_000))
    _upload_manifest(store, "scans", rows)
    small = settings.model_copy(update={"s3_max_object_bytes": 100_000})
    assert load_dataset_uri("s3://datasets/scans/labels.csv", store_settings=small)
    _upload_manifest(store, "scans", [*rows, ("img/big.png", 1)])
    with pytest.raises(DataError, match="NOISESCORE_S3_MAX_OBJECT_BYTES") as info:
        load_dataset_uri("s3://datasets/scans/labels.csv", store_settings=small)
    assert "200,000 bytes" in str(info.value)
    with pytest.raises(DataError, match="NOISESCORE_S3_MAX_OBJECT_BYTES"):
        tiny = settings.model_copy(update={"s3_max_object_bytes": 10})
        load_dataset_uri("s3://datasets/scans/labels.csv", store_settings=tiny)  # the csv


def test_s3_roots_are_checked_before_any_request(
    s3_data: tuple[S3Store, RecordingRelay, StoreSettings], tmp_path: Path
) -> None:
    store, relay, settings = s3_data
    buffer = write_npz(tmp_path / "x.npz").read_bytes()
    store.put_bytes("scans/x.npz", buffer)
    store.put_bytes("private/x.npz", buffer)
    roots = ["s3://datasets/scans"]
    relay.requests.clear()
    for uri in ("s3://datasets/private/x.npz", "s3://noisescore/x.npz", "s3://datasets/x.npz"):
        with pytest.raises(DatasetAccessDenied):
            load_dataset_uri(uri, store_settings=settings, roots=roots)
    assert relay.requests == []
    assert len(load_dataset_uri("s3://datasets/scans/x.npz", store_settings=settings,
                                roots=roots).train) == 40  # fmt: skip


# --------------------------------------------------------------------------- who may call


TOKENS = {"auth_tokens": SecretStr("t0ken-0123456789")}


@pytest.mark.parametrize(
    ("addr", "extra", "allowed"),
    [
        ("127.0.0.1:0", {}, True),
        ("127.0.0.2:50051", {}, True),
        ("[::1]:0", {}, True),
        ("localhost:0", {}, True),
        ("0.0.0.0:0", {}, False),
        (":0", {}, False),  # gRPC reads an empty host as every interface
        ("[::]:0", {}, False),
        ("10.1.2.3:50051", {}, False),
        ("myhost.example:50051", {}, False),
        ("0.0.0.0:0", TOKENS, True),
        ("0.0.0.0:0", {"insecure": True}, True),
    ],
)
def test_non_loopback_bind_needs_auth_or_insecure(
    addr: str, extra: dict[str, Any], allowed: bool
) -> None:
    settings = ServiceSettings(grpc_addr=addr, metrics_addr=None, **extra)
    if allowed:
        check_exposure(settings)
    else:
        with pytest.raises(ValueError, match=r"refusing to serve .* without authentication"):
            check_exposure(settings)


def test_mtls_counts_as_authentication(tmp_path: Path) -> None:
    settings = ServiceSettings.model_construct(
        grpc_addr="0.0.0.0:0", insecure=False, auth_tokens=None, tls_client_ca=tmp_path / "ca"
    )
    check_exposure(settings)  # no error: client certificates authenticate


def test_service_start_refuses_before_binding() -> None:
    """A real server: refused on a wildcard address without auth (nothing bound), started
    on loopback without it. (Tests bind loopback only: the accepted non-loopback cases
    are checked above without binding.)"""
    unimplemented = pb_grpc.NoiseScoringServicer()  # the bind check comes before any call
    refused = Service(unimplemented, ServiceSettings(grpc_addr="0.0.0.0:0", metrics_addr=None))
    with pytest.raises(ValueError, match="NOISESCORE_INSECURE"):
        refused.start()
    assert not refused.started
    service = Service(unimplemented, ServiceSettings(grpc_addr="127.0.0.1:0", metrics_addr=None))
    try:
        service.start()
        assert service.port
    finally:
        service.stop(0)


def _noisescore(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "noisescore"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_serve_refuses_an_exposed_unauthenticated_bind(tmp_path: Path) -> None:
    env = {**os.environ, "NOISESCORE_STORE_DIR": str(tmp_path / "store")}
    args = ["serve", "--grpc-addr", "0.0.0.0:0", "--metrics-addr", "127.0.0.1:0"]
    done = _noisescore(*args, env=env)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("noisescore: error: refusing to serve '0.0.0.0:0'")
    assert "--insecure" in lines[0] and "NOISESCORE_AUTH_TOKENS" in lines[0]
    assert not (tmp_path / "store").exists()  # refused before the store was touched
    # --insecure gets past the check (to the bind, which fails here on purpose: 192.0.2.1
    # is a documentation address, not one of this machine, so nothing is exposed).
    args = ["serve", "--grpc-addr", "192.0.2.1:0", "--metrics-addr", "127.0.0.1:0"]
    assert "refusing to serve" in _noisescore(*args, env=env).stderr
    done = _noisescore(*args, "--insecure", env=env)
    assert done.returncode == 2 and "cannot bind the gRPC server" in done.stderr, done.stderr
    done = _noisescore(*args, env={**env, "NOISESCORE_INSECURE": "true"})
    assert "cannot bind the gRPC server" in done.stderr, done.stderr


# --------------------------------------------------------------------------- npz, classes


def test_npz_reads_only_the_split_members(tmp_path: Path) -> None:
    """A 64 MiB member that no split uses is never decompressed (memory stays small), and
    a corrupt unused member does not stop the load."""
    path = write_npz(tmp_path / "x.npz")
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("extra.npy", "w") as member:
            np.lib.format.write_array(member, np.zeros(64 * 1024 * 1024, np.uint8))
        archive.writestr("corrupt.npy", b"\x93NUMPY this is not an array")
    assert path.stat().st_size < 2 * 1024 * 1024
    tracemalloc.start()
    try:
        dataset = load_npz(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(dataset.train) == 40
    assert peak < 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"
    # Missing keys are still named, with what the archive holds.
    other = tmp_path / "y.npz"
    np.savez(other, images=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"missing key.*train_images.*the archive has images"):
        load_npz(other)


def test_single_class_datasets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="single class"):
        load_npz(write_npz(tmp_path / "one.npz", labels=np.zeros(40, np.int64)))
    write_npz(tmp_path / "d" / "breastmnist.npz", labels=np.ones(40, np.int64))
    with pytest.raises(DataError, match="single class"):  # n_classes 2 known, one present
        load_dataset("breastmnist", data_dir=tmp_path / "d")
    folder = tmp_path / "m"
    rows = [(p, 0) for p, _ in image_rows(folder, 6)]
    with pytest.raises(DataError, match="single class"):
        load_manifest(write_manifest(folder / "labels.csv", rows))
