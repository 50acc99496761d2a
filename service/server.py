"""The gRPC server around a ``NoiseScoringServicer``: TLS, interceptors, health, reflection,
limits, the metrics endpoint and graceful shutdown. No RPC logic lives here.

::

    service = Service(NoiseScoringServicer(...), ServiceSettings()).start()
    serve_forever(service)   # until SIGTERM/SIGINT; then drains in-flight RPCs

The server is ``grpc.aio`` on an event loop in its own thread (``noisescore-aio``). Streams
that mostly wait (``WatchJob``, health ``Watch``) are coroutines there and hold no thread;
the servicer's blocking methods run in a pool of ``rpc_threads`` threads
(:mod:`noisescore.service.executor`).

What a client sees:

- ``noisescore.v1.NoiseScoring`` on ``grpc_addr`` (TLS when ``tls_cert``/``tls_key`` are
  set, client certificates required when ``tls_client_ca`` is set too);
- ``grpc.health.v1.Health``, never behind auth; also alone on the plaintext
  ``health_addr`` when that is set (for Kubernetes ``grpc:`` probes, which cannot use
  TLS). Service ``""`` is *liveness*: SERVING while the process and its event loop answer.
  Service ``"noisescore.v1.NoiseScoring"`` is *readiness*: NOT_SERVING while the API is
  saturated (a call admitted to the RPC pool has waited more than
  ``saturation_grace`` seconds for a thread), SERVING again once it drains. Both are
  NOT_SERVING from the start of a shutdown;
- server reflection (``grpc.reflection.v1alpha.ServerReflection``), so ``grpcurl`` works
  without our protos; it needs the bearer token when auth is on;
- ``UNAUTHENTICATED`` without a valid ``authorization: Bearer <token>`` when
  ``auth_tokens`` is set; ``RESOURCE_EXHAUSTED`` for a message over ``max_message_bytes``,
  when more than ``4 * rpc_threads`` blocking calls are in progress, or past
  ``max_watches`` open ``WatchJob`` streams; ``INTERNAL`` with a request id (and the
  traceback in the server log) for an unexpected exception in a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import ssl
import threading
from collections.abc import Coroutine
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from noisescore.service.executor import RpcExecutor
from noisescore.service.interceptors import AuthInterceptor, ErrorInterceptor, MetricsInterceptor
from noisescore.service.metrics import ServiceMetrics, parse_addr
from noisescore.service.servicer import add_servicer
from noisescore.v1 import noise_scoring_pb2 as pb
from noisescore.v1 import noise_scoring_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from noisescore.settings import ServiceSettings

__all__ = [
    "SERVICE_NAME",
    "EventLoopThread",
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
# Blocking calls admitted at once (running + waiting for a thread); beyond that
# RESOURCE_EXHAUSTED right away, so an overloaded server sheds load instead of queueing
# without bound.
CALLS_PER_THREAD = 4
SATURATION_CHECK_S = 0.25
T = TypeVar("T")
HealthServicer = health_aio.HealthServicer


class EventLoopThread:
    """An asyncio event loop running in a daemon thread; :meth:`call` runs a coroutine
    there from any other thread and returns its result."""

    def __init__(self, name: str = "noisescore-aio") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        """Cancel what still runs on the loop, stop it and join its thread. Idempotent."""
        if self.loop.is_closed():
            return

        async def cancel_rest() -> None:
            current = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not current]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        if self.loop.is_running():
            self.call(cancel_rest(), timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self.loop.close()


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


# --------------------------------------------------------------------------- exposure


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (of a bind address) is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "" or a wildcard gRPC reads as every interface, or a host name
        return False


def check_exposure(settings: ServiceSettings) -> None:
    """Refuse to serve a non-loopback ``grpc_addr`` without authentication.

    Authentication (bearer tokens, client certificates) stays optional on a loopback
    address; anywhere else it is required unless ``settings.insecure`` says the operator
    means it (``noisescore serve --insecure``, ``NOISESCORE_INSECURE=true``).

    Raises
    ------
    ValueError
        One line naming the address and the settings that fix it.
    """
    host, _ = parse_addr(settings.grpc_addr, default_host="")
    if settings.insecure or settings.authenticated() or is_loopback_host(host):
        return
    raise ValueError(
        f"refusing to serve {settings.grpc_addr!r} without authentication: anyone who reaches "
        "a non-loopback address could submit jobs and read results. Set NOISESCORE_AUTH_TOKENS "
        "(bearer tokens) or NOISESCORE_TLS_CLIENT_CA (mTLS), bind 127.0.0.1, or pass --insecure "
        "(NOISESCORE_INSECURE=true) if the network in front of it does the access control"
    )


# --------------------------------------------------------------------------- server


def build_server(
    servicer: pb_grpc.NoiseScoringServicer,
    settings: ServiceSettings,
    *,
    metrics: ServiceMetrics,
    executor: RpcExecutor | None = None,
    loop: EventLoopThread | None = None,
) -> tuple[grpc.aio.Server, int, HealthServicer]:
    """A bound, not yet started asyncio server on ``loop`` (a new one when None): the
    servicer behind the interceptors, its blocking methods in ``executor`` (a new pool of
    ``rpc_threads`` when None), health checking (SERVING), reflection, message limits.
    Returns ``(server, port, health)``; ``port`` is the bound port (the one picked when
    ``grpc_addr`` ends in ``:0``).

    Raises ``ValueError`` when TLS files are unusable, ``grpc_addr`` cannot be bound, or
    is not loopback while nothing authenticates callers (:func:`check_exposure`).
    """
    check_exposure(settings)
    credentials = server_credentials(settings)  # before any port is taken
    parse_addr(settings.grpc_addr)  # a clear error for a malformed address
    owner = loop or EventLoopThread()
    if executor is None:
        executor = RpcExecutor(settings.rpc_threads, settings.rpc_threads * CALLS_PER_THREAD)
    try:
        return owner.call(_build_server(servicer, settings, metrics, executor, credentials))
    except Exception:
        if loop is None:
            owner.close()
        raise


async def _build_server(
    servicer: pb_grpc.NoiseScoringServicer,
    settings: ServiceSettings,
    metrics: ServiceMetrics,
    executor: RpcExecutor,
    credentials: grpc.ServerCredentials | None,
) -> tuple[grpc.aio.Server, int, HealthServicer]:
    interceptors: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor(metrics)]
    tokens = settings.tokens()
    if tokens:
        interceptors.append(AuthInterceptor(tokens))
    interceptors.append(ErrorInterceptor())
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            # Without this a second server could bind the same port and steal calls.
            ("grpc.so_reuseport", 0),
        ],
    )
    # Registered like the generated add_NoiseScoringServicer_to_server, except that a
    # request that does not parse is INVALID_ARGUMENT (with why), not gRPC's INTERNAL, and
    # blocking methods run in the executor's pool behind its admission limit.
    add_servicer(servicer, server, executor)

    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )  # fmt: skip

    port = _bind(server, settings.grpc_addr, credentials)
    if not port:
        await server.stop(None)
        raise _bind_error("gRPC", settings.grpc_addr, "GRPC_ADDR")
    return server, port, health_servicer


def _bind(server: grpc.aio.Server, addr: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind ``server`` to ``addr`` (TLS when ``credentials``); the bound port, 0 on failure."""
    try:
        if credentials is None:
            return int(server.add_insecure_port(addr))
        return int(server.add_secure_port(addr, credentials))
    except RuntimeError as error:
        _LOG.debug("binding %s failed: %s", addr, error)
        return 0


def _bind_error(what: str, addr: str, setting: str) -> ValueError:
    return ValueError(
        f"cannot bind the {what} server to {addr!r}: the port is in use or the host is "
        f"not an address of this machine (set NOISESCORE_{setting} to a free host:port; "
        "port 0 picks one)"
    )


def build_health_server(
    health_servicer: HealthServicer, addr: str, *, loop: EventLoopThread
) -> tuple[grpc.aio.Server, int]:
    """A bound, not yet started plaintext server with only ``grpc.health.v1.Health``, on
    ``loop`` (the main server's: the health servicer lives there).

    It shares ``health_servicer`` with the main server, so both report the same status
    (readiness NOT_SERVING while saturated, all NOT_SERVING from the start of a shutdown).
    It exists because Kubernetes' native ``grpc:`` probes and most load balancers' health
    checks cannot speak TLS or send a bearer token: the main port may need both, this one
    carries no data.
    """
    parse_addr(addr)

    async def build() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4096)],
            maximum_concurrent_rpcs=64,
        )
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = _bind(server, addr, None)
        if not port:
            await server.stop(None)
            raise _bind_error("health", addr, "HEALTH_ADDR")
        return server, port

    return loop.call(build())


class Service:
    """The running service: the gRPC server plus the ``/metrics`` HTTP endpoint.

    ``start()`` binds and starts both; ``stop()`` turns health NOT_SERVING, ends open
    ``WatchJob`` streams (UNAVAILABLE: watch again), stops taking calls, lets in-flight
    calls finish for ``grace`` seconds, then closes the metrics endpoint. ``port`` and
    ``metrics_port`` are the bound ports once started.
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
        self.health: HealthServicer | None = None
        self.executor = RpcExecutor(settings.rpc_threads, settings.rpc_threads * CALLS_PER_THREAD)
        self.saturated = False
        watches = getattr(servicer, "watches", None)
        pixels = getattr(servicer, "pixels", None)
        self.metrics.track_budgets(
            rpc_calls_in_progress=lambda: self.executor.in_progress,
            rpc_calls_waiting=lambda: self.executor.waiting,
            rpc_saturated=lambda: float(self.saturated),
            watches_open=lambda: watches.open if watches is not None else 0,
            inflight_pixels=lambda: pixels.in_flight if pixels is not None else 0,
        )
        self._loop: EventLoopThread | None = None
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._monitor: asyncio.Future[None] | None = None
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
            loop = EventLoopThread()
            try:
                server, port, health_servicer = build_server(
                    self.servicer,
                    self.settings,
                    metrics=self.metrics,
                    executor=self.executor,
                    loop=loop,
                )
                health_server: grpc.aio.Server | None = None
                try:
                    if self.settings.health_addr:
                        health_server, self.health_port = build_health_server(
                            health_servicer, self.settings.health_addr, loop=loop
                        )
                    if self.settings.metrics_addr:
                        _, self.metrics_port = self.metrics.start_http(self.settings.metrics_addr)
                except Exception:
                    loop.call(server.stop(None))
                    if health_server is not None:
                        loop.call(health_server.stop(None))
                    raise
                loop.call(server.start())
                if health_server is not None:
                    loop.call(health_server.start())
            except Exception:
                loop.close()
                raise
            self._loop, self._server, self.port, self.health = loop, server, port, health_servicer
            self._health_server = health_server
            self._monitor = asyncio.run_coroutine_threadsafe(self._watch_saturation(), loop.loop)
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

    async def _watch_saturation(self) -> None:
        """Readiness: NOT_SERVING while a call waits longer than ``saturation_grace`` for
        an RPC thread; liveness (service ``""``) is left SERVING."""
        grace = self.settings.saturation_grace
        while True:
            await asyncio.sleep(SATURATION_CHECK_S)
            waited = self.executor.oldest_wait()
            saturated = waited > grace
            if saturated == self.saturated or self.health is None:
                continue
            self.saturated = saturated
            if saturated:
                _LOG.warning(
                    "API saturated: a call has waited %.1f s for one of %d RPC threads "
                    "(%d calls in progress); readiness NOT_SERVING until it drains",
                    waited,
                    self.executor.threads,
                    self.executor.in_progress,
                )
            else:
                _LOG.info("API drained; readiness SERVING again")
            status = health_pb2.HealthCheckResponse
            await self.health.set(SERVICE_NAME, status.NOT_SERVING if saturated else status.SERVING)

    async def _shutdown(self, grace: float, first: bool) -> None:
        assert self._server is not None
        if first:
            if self._monitor is not None:
                self._monitor.cancel()
            if self.health is not None:
                await self.health.enter_graceful_shutdown()  # all services NOT_SERVING
            close_watches = getattr(self.servicer, "close_watches", None)
            if close_watches is not None:
                await close_watches()
        await self._server.stop(grace)

    def stop(self, grace: float | None = None) -> None:
        """Stop serving: health NOT_SERVING first, then refuse new calls and wait up to
        ``grace`` seconds (default ``settings.shutdown_grace``; 0 = cancel at once) for
        in-flight calls, then close the metrics endpoint. Idempotent and thread-safe; a
        second call with a smaller grace shortens the wait of the first."""
        grace = self.settings.shutdown_grace if grace is None else max(0.0, float(grace))
        with self._lock:
            loop = self._loop
            if self._stopped.is_set():
                return
            if loop is None:  # never started: nothing to drain
                self._stopped.set()
                return
            first = not self._stopping
            self._stopping = True
            if first:
                _LOG.info("shutting down: draining in-flight RPCs for up to %.1f s", grace)
            shutdown = self._shutdown(grace, first)
            try:
                drained = asyncio.run_coroutine_threadsafe(shutdown, loop.loop)
            except RuntimeError:  # the first stop() has just closed the loop
                shutdown.close()
                drained = None
        if not first:
            # The first stop() finishes the job (and may cancel this wait as it closes).
            with contextlib.suppress(Exception):
                if drained is not None:
                    drained.result()
            self._stopped.wait()
            return
        assert drained is not None
        drained.result()
        if self._health_server is not None:  # last: probes see NOT_SERVING while draining
            loop.call(self._health_server.stop(None))
        self.executor.shutdown()
        loop.close()
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
