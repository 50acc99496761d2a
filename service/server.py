"""The gRPC server around a ``NoiseScoringServicer``: TLS, interceptors, health, reflection,
limits, the metrics endpoint and graceful shutdown. No RPC logic lives here.

::

    service = Service(NoiseScoringServicer(...), ServiceSettings()).start()
    serve_forever(service)   # until SIGTERM/SIGINT; then drains in-flight RPCs

What a client sees:

- ``noisescore.v1.NoiseScoring`` on ``grpc_addr`` (TLS when ``tls_cert``/``tls_key`` are
  set, client certificates required when ``tls_client_ca`` is set too);
- ``grpc.health.v1.Health`` with ``""`` and ``"noisescore.v1.NoiseScoring"`` SERVING
  until shutdown begins, NOT_SERVING from then on; never behind auth; also alone on the
  plaintext ``health_addr`` when that is set (for Kubernetes ``grpc:`` probes, which
  cannot use TLS);
- server reflection (``grpc.reflection.v1alpha.ServerReflection``), so ``grpcurl`` works
  without our protos; it needs the bearer token when auth is on;
- ``UNAUTHENTICATED`` without a valid ``authorization: Bearer <token>`` when
  ``auth_tokens`` is set; ``RESOURCE_EXHAUSTED`` for a message over ``max_message_bytes``
  or when more than ``4 * rpc_threads`` calls are in progress; ``INTERNAL`` with a request
  id (and the traceback in the server log) for an unexpected exception in a handler.
"""

from __future__ import annotations

import logging
import signal
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from noisescore.service.interceptors import AuthInterceptor, ErrorInterceptor, MetricsInterceptor
from noisescore.service.metrics import ServiceMetrics, parse_addr
from noisescore.service.servicer import add_servicer
from noisescore.v1 import noise_scoring_pb2 as pb
from noisescore.v1 import noise_scoring_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from noisescore.settings import ServiceSettings

__all__ = [
    "SERVICE_NAME",
    "Service",
    "build_health_server",
    "build_server",
    "serve_forever",
    "server_credentials",
]

_LOG = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name[
    "NoiseScoring"
].full_name  # noisescore.v1.NoiseScoring
# Calls admitted at once (running + waiting for a thread); beyond that RESOURCE_EXHAUSTED
# right away, so an overloaded server sheds load instead of queueing without bound.
CALLS_PER_THREAD = 4


# --------------------------------------------------------------------------- TLS


def _read_pem(path: Path, setting: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ValueError(
            f"cannot read {setting} {path}: {error.strerror or error} "
            f"(NOISESCORE_{setting.upper()} must name a readable PEM file)"
        ) from error
    if b"-----BEGIN " not in data:
        raise ValueError(f"{setting} {path} is not a PEM file (no '-----BEGIN ...' line)")
    return data


def _no_password() -> bytes:
    raise ValueError("the key is encrypted")


def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from ``tls_cert``/``tls_key`` (PEM), requiring client certificates
    signed by ``tls_client_ca`` (mTLS) when that is set; None when TLS is off.

    Raises ``ValueError`` naming the setting and file when one cannot be read, is not PEM,
    or the key does not belong to the certificate (or is encrypted: gRPC cannot use it).
    """
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    cert = _read_pem(settings.tls_cert, "tls_cert")
    key = _read_pem(settings.tls_key, "tls_key")
    try:  # fail here, not at the first handshake, for a mismatched or encrypted key
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
            settings.tls_cert, settings.tls_key, password=_no_password
        )
    except (ssl.SSLError, ValueError) as error:
        raise ValueError(
            f"tls_key {settings.tls_key} does not go with tls_cert {settings.tls_cert} "
            f"or is encrypted (gRPC needs an unencrypted PEM key): {error}"
        ) from error
    if settings.tls_client_ca is None:
        return grpc.ssl_server_credentials([(key, cert)])
    client_ca = _read_pem(settings.tls_client_ca, "tls_client_ca")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=True
    )


# --------------------------------------------------------------------------- server


def build_server(
    servicer: pb_grpc.NoiseScoringServicer,
    settings: ServiceSettings,
    *,
    metrics: ServiceMetrics,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A bound, not yet started server: the servicer behind the interceptors, health
    checking (SERVING), reflection, message limits. Returns ``(server, port, health)``;
    ``port`` is the bound port (the one picked when ``grpc_addr`` ends in ``:0``).

    Raises ``ValueError`` when TLS files are unusable or ``grpc_addr`` cannot be bound.
    """
    credentials = server_credentials(settings)  # before any port is taken
    parse_addr(settings.grpc_addr)  # a clear error for a malformed address
    interceptors: list[grpc.ServerInterceptor] = [MetricsInterceptor(metrics)]
    tokens = settings.tokens()
    if tokens:
        interceptors.append(AuthInterceptor(tokens))
    interceptors.append(ErrorInterceptor())
    server = grpc.server(
        ThreadPoolExecutor(max_workers=settings.rpc_threads, thread_name_prefix="noisescore-rpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            # Without this a second server could bind the same port and steal calls.
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=settings.rpc_threads * CALLS_PER_THREAD,
    )
    # Registered like the generated add_NoiseScoringServicer_to_server, except that a
    # request that does not parse is INVALID_ARGUMENT (with why), not gRPC's INTERNAL.
    add_servicer(servicer, server)

    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )

    port = _bind(server, settings.grpc_addr, credentials, what="gRPC", setting="GRPC_ADDR")
    return server, port, health_servicer


def _bind(
    server: grpc.Server,
    addr: str,
    credentials: grpc.ServerCredentials | None,
    *,
    what: str,
    setting: str,
) -> int:
    """Bind ``server`` to ``addr`` (TLS when ``credentials``); the bound port. On failure
    the server is stopped and ``ValueError`` names the address and the setting to change."""
    port = 0
    try:
        if credentials is None:
            port = server.add_insecure_port(addr)
        else:
            port = server.add_secure_port(addr, credentials)
    except RuntimeError as error:
        _LOG.debug("binding %s failed: %s", addr, error)
    if not port:
        server.stop(None)
        raise ValueError(
            f"cannot bind the {what} server to {addr!r}: the port is in use or the host is "
            f"not an address of this machine (set NOISESCORE_{setting} to a free host:port; "
            "port 0 picks one)"
        )
    return port


def build_health_server(
    health_servicer: health.HealthServicer, addr: str
) -> tuple[grpc.Server, int]:
    """A bound, not yet started plaintext server with only ``grpc.health.v1.Health``.

    It shares ``health_servicer`` with the main server, so both report the same status
    (NOT_SERVING from the start of a shutdown). It exists because Kubernetes' native
    ``grpc:`` probes and most load balancers' health checks cannot speak TLS or send a
    bearer token: the main port may need both, this one carries no data.
    """
    parse_addr(addr)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=2, thread_name_prefix="noisescore-health"),
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4096)],
        maximum_concurrent_rpcs=16,
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, _bind(server, addr, None, what="health", setting="HEALTH_ADDR")


class Service:
    """The running service: the gRPC server plus the ``/metrics`` HTTP endpoint.

    ``start()`` binds and starts both; ``stop()`` turns health NOT_SERVING, stops taking
    calls, lets in-flight calls finish for ``grace`` seconds, then closes the metrics
    endpoint. ``port`` and ``metrics_port`` are the bound ports once started.
    """

    def __init__(
        self,
        servicer: pb_grpc.NoiseScoringServicer,
        settings: ServiceSettings,
        *,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.servicer = servicer
        self.settings = settings
        self.metrics = metrics if metrics is not None else ServiceMetrics()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self.health: health.HealthServicer | None = None
        self._server: grpc.Server | None = None
        self._health_server: grpc.Server | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._stopped = threading.Event()

    @property
    def started(self) -> bool:
        return self._server is not None

    @property
    def target(self) -> str:
        """``host:port`` a client on this machine dials (the bound port, not ``:0``)."""
        if self.port is None:
            raise RuntimeError("the service is not started")
        host, _ = parse_addr(self.settings.grpc_addr)
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def start(self) -> Service:
        """Bind and start the gRPC server and (when ``metrics_addr`` is set) the metrics
        endpoint. Raises ``ValueError`` when an address cannot be bound or TLS is unusable."""
        with self._lock:
            if self._server is not None or self._stopped.is_set():
                raise RuntimeError("a Service starts once; create a new one to serve again")
            server, port, health_servicer = build_server(
                self.servicer, self.settings, metrics=self.metrics
            )
            health_server: grpc.Server | None = None
            try:
                if self.settings.health_addr:
                    health_server, self.health_port = build_health_server(
                        health_servicer, self.settings.health_addr
                    )
                if self.settings.metrics_addr:
                    _, self.metrics_port = self.metrics.start_http(self.settings.metrics_addr)
            except Exception:
                server.stop(None)
                if health_server is not None:
                    health_server.stop(None)
                raise
            server.start()
            if health_server is not None:
                health_server.start()
            self._server, self.port, self.health = server, port, health_servicer
            self._health_server = health_server
        s = self.settings
        _LOG.info(
            "serving %s on %s (port %d; %s, auth %s)%s",
            SERVICE_NAME,
            s.grpc_addr,
            port,
            "mTLS" if s.tls_client_ca else "TLS" if s.tls_cert else "plaintext",
            "on" if s.tokens() else "off",
            (f"; metrics on port {self.metrics_port}" if self.metrics_port else "")
            + (f"; health on port {self.health_port}" if self.health_port else ""),
        )
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop serving: health NOT_SERVING first, then refuse new calls and wait up to
        ``grace`` seconds (default ``settings.shutdown_grace``; 0 = cancel at once) for
        in-flight calls, then close the metrics endpoint. Idempotent and thread-safe; a
        second call with a smaller grace shortens the wait of the first."""
        grace = self.settings.shutdown_grace if grace is None else max(0.0, float(grace))
        with self._lock:
            server = self._server
            if server is None:  # never started: nothing to drain
                self._stopped.set()
                return
            first = not self._stopping
            self._stopping = True
            if first:
                _LOG.info("shutting down: draining in-flight RPCs for up to %.1f s", grace)
                if self.health is not None:
                    self.health.enter_graceful_shutdown()  # all services NOT_SERVING
            drained = server.stop(grace)
        drained.wait()
        if not first:
            self._stopped.wait()
            return
        if self._health_server is not None:  # last: probes see NOT_SERVING while draining
            self._health_server.stop(None).wait()
        self.metrics.stop_http()
        self._stopped.set()
        _LOG.info("stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the service has stopped (or ``timeout`` passed); True if stopped."""
        if timeout is not None:
            return self._stopped.wait(timeout)
        while not self._stopped.wait(0.5):  # short waits: signal handlers run in between
            pass
        return True


def serve_forever(service: Service) -> None:
    """Start ``service`` if needed and serve until SIGTERM or SIGINT, then stop it with
    ``settings.shutdown_grace``; a second signal cancels in-flight calls at once. Call from
    the main thread (Python delivers signals there). Previous handlers are restored."""
    grace = service.settings.shutdown_grace
    received = 0

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal received
        received += 1
        name = signal.Signals(signum).name
        if received == 1:
            _LOG.info("%s: stopping (grace %.1f s); send it again to stop at once", name, grace)
            when = grace
        else:
            _LOG.warning("%s again: cancelling in-flight RPCs", name)
            when = 0.0
        # Not in the handler itself: stop() blocks, and a second signal must get through.
        threading.Thread(
            target=service.stop, args=(when,), name="noisescore-shutdown", daemon=True
        ).start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if not service.started:
            service.start()
        service.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
