"""Prometheus metrics of the gRPC service, served on ``/metrics`` (``NOISESCORE_METRICS_ADDR``).

The service is long-lived, so Prometheus *scrapes* it (unlike a cleaning job, which pushes:
see :mod:`noisescore.jobmetrics`). Every :class:`ServiceMetrics` has its own
:class:`~prometheus_client.CollectorRegistry`, never the process-global one, so two
services (or two tests) in one process do not share or collide on series.

| name | type | meaning |
| --- | --- | --- |
| `noisescore_rpc_requests_total{method,code}` | counter | finished RPCs |
| `noisescore_rpc_duration_seconds{method}` | histogram | arrival to status (streams: to the end) |
| `noisescore_jobs{state}` | gauge | cleaning jobs the service knows, by state |
| `noisescore_job_queue_depth` | gauge | jobs waiting for a worker |
| `noisescore_onnx_inference_seconds` | histogram | one ONNX Runtime call (Predict/ScoreLabels) |
| `noisescore_onnx_batch_size` | histogram | images in one ONNX Runtime call (1..4096) |
| `noisescore_rpc_calls_in_progress` | gauge | blocking calls in the RPC pool (running + waiting) |
| `noisescore_rpc_calls_waiting` | gauge | of those, calls waiting for a thread |
| `noisescore_rpc_saturated` | gauge | 1 while readiness is NOT_SERVING for saturation |
| `noisescore_watches_open` | gauge | open WatchJob streams |
| `noisescore_inflight_pixels` | gauge | decoded pixels Predict/ScoreLabels requests hold now |

``method`` is the full gRPC method name (``/noisescore.v1.NoiseScoring/GetJob``); ``code``
the final status code's name (``OK``, ``NOT_FOUND``, ``UNAUTHENTICATED``, ``INTERNAL``, ...;
``CANCELLED`` when the client went away first); ``state`` one of queued, running,
succeeded, failed, cancelled, waiting_for_labels (all six present from the start, at 0).
The duration buckets span 0.5 ms to 30 s.

Calls to a method the server does not have are counted as ``method="unknown"``,
``code="UNIMPLEMENTED"`` (a client cannot create series by inventing method names). Calls
refused for a budget (the RPC pool's admission limit, open watches, decoded pixels) are
counted with ``RESOURCE_EXHAUSTED``; a request over ``max_message_bytes``, which gRPC
itself turns away before any handler runs, is not counted here.

The endpoint is plain HTTP and not behind the service's auth (as Prometheus scrapes
usually are): it holds counts and timings, no job data. It binds its own address.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import start_http_server

__all__ = ["DURATION_BUCKETS", "JOB_STATES", "UNKNOWN_METHOD", "ServiceMetrics", "parse_addr"]

_LOG = logging.getLogger(__name__)

# 0.5 ms (a GetJob from memory) .. 30 s (a 100k-row StreamCorrections, a large Predict).
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0
)  # fmt: skip
BATCH_SIZE_BUCKETS = tuple(float(2**i) for i in range(13))  # 1, 2, 4, .. 4096
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled", "waiting_for_labels")
UNKNOWN_METHOD = "unknown"
DEFAULT_HOST = "127.0.0.1"


def parse_addr(addr: str, *, default_host: str = DEFAULT_HOST) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``; ``"[::1]:9464"`` -> ``("::1", 9464)``;
    ``":9464"`` or ``"9464"`` -> ``(default_host, 9464)``. Port 0 means any free port."""
    text = addr.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    host = host.strip("[]") or default_host
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ValueError(
            f"invalid address {addr!r}: expected host:port with a port in 0..65535 "
            "(e.g. 127.0.0.1:9464; port 0 picks a free port)"
        )
    return host, port


class ServiceMetrics:
    """The service's metrics (see the module docstring for the table) in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.rpc_requests = Counter(
            "noisescore_rpc_requests_total",
            "Finished RPCs by full method name and final status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.rpc_duration = Histogram(
            "noisescore_rpc_duration_seconds",
            "RPC latency from arrival to status (streams: until the stream ends).",
            ["method"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.jobs = Gauge(
            "noisescore_jobs", "Cleaning jobs by state.", ["state"], registry=self.registry
        )
        self.job_queue_depth = Gauge(
            "noisescore_job_queue_depth", "Jobs waiting for a worker.", registry=self.registry
        )
        self.onnx_inference = Histogram(
            "noisescore_onnx_inference_seconds",
            "Duration of one ONNX Runtime call.",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.onnx_batch_size = Histogram(
            "noisescore_onnx_batch_size",
            "Images in one ONNX Runtime call.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.budgets = {
            name: Gauge(f"noisescore_{name}", help_text, registry=self.registry)
            for name, help_text in (
                ("rpc_calls_in_progress", "Blocking calls admitted to the RPC pool."),
                ("rpc_calls_waiting", "Admitted calls waiting for an RPC thread."),
                ("rpc_saturated", "1 while readiness is NOT_SERVING for saturation."),
                ("watches_open", "Open WatchJob streams."),
                ("inflight_pixels", "Decoded pixels image requests hold now."),
            )
        }
        self._lock = threading.Lock()
        self._job_states: set[str] = set(JOB_STATES)
        for state in JOB_STATES:  # present (at 0) from the first scrape
            self.jobs.labels(state=state).set(0)
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    # ------------------------------------------------------------------ recording

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """One finished RPC: ``code`` is the status code's name (``"OK"``, ``"NOT_FOUND"``)."""
        self.rpc_requests.labels(method=method, code=code).inc()
        self.rpc_duration.labels(method=method).observe(max(seconds, 0.0))

    def set_jobs(self, counts: Mapping[str, int]) -> None:
        """Jobs by state, e.g. ``{"queued": 2, "running": 1}`` (case-insensitive names;
        ``Job.State`` names like ``"QUEUED"`` work). A state not in ``counts`` is set to 0."""
        normalized: dict[str, int] = {}
        for state, count in counts.items():
            key = str(state).lower()
            normalized[key] = normalized.get(key, 0) + int(count)
        with self._lock:
            self._job_states.update(normalized)
            for state in self._job_states:
                self.jobs.labels(state=state).set(normalized.get(state, 0))

    def set_queue_depth(self, n: int) -> None:
        self.job_queue_depth.set(n)

    def observe_inference(self, seconds: float, batch_size: int) -> None:
        """One ONNX Runtime call over ``batch_size`` images that took ``seconds``."""
        self.onnx_inference.observe(max(seconds, 0.0))
        self.onnx_batch_size.observe(batch_size)

    def track_budgets(self, **readers: Callable[[], float]) -> None:
        """Read the budget gauges (``rpc_calls_in_progress=...``, see ``budgets``) from
        these functions at every scrape; a later call replaces them."""
        for name, read in readers.items():
            self.budgets[name].set_function(read)

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format (what ``/metrics`` serves)."""
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ HTTP endpoint

    def start_http(self, addr: str) -> tuple[WSGIServer, int]:
        """Serve ``/metrics`` on ``addr`` (``host:port``; port 0 = a free port) in a daemon
        thread. Binds exactly the host given (default 127.0.0.1, never all interfaces
        unless asked with 0.0.0.0 or [::]). Returns the server and the bound port.

        Raises ``ValueError`` for a malformed address or one that cannot be bound.
        """
        host, port = parse_addr(addr)
        with self._lock:
            if self._http is not None:
                raise RuntimeError("the metrics endpoint is already running; stop_http() first")
            try:
                server, thread = start_http_server(port, addr=host, registry=self.registry)
            except OSError as error:
                raise ValueError(
                    f"cannot serve metrics on {addr!r}: {error.strerror or error} "
                    "(set NOISESCORE_METRICS_ADDR to a free host:port, or empty to turn it off)"
                ) from error
            self._http = (server, thread)
        bound = int(server.server_port)
        _LOG.info(
            "metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", bound
        )
        return server, bound

    @property
    def http_port(self) -> int | None:
        """The port of the running metrics endpoint, None when it is not running."""
        http = self._http
        return None if http is None else int(http[0].server_port)

    def stop_http(self, timeout: float = 5.0) -> None:
        """Stop the metrics endpoint and free its port; a no-op when it is not running."""
        with self._lock:
            http, self._http = self._http, None
        if http is None:
            return
        server, thread = http
        server.shutdown()
        server.server_close()
        thread.join(timeout)
