"""``noisescore serve``: the servicer, the job manager, metrics and the gRPC server, wired.

Embedded default: jobs run as child processes of this server through the clean-labels
flow, their state and results in the artifact store (``NOISESCORE_S3_*`` or
``NOISESCORE_STORE_DIR``). With a Prefect API (``PREFECT_API_URL``, or
``NOISESCORE_JOB_RUNNER=prefect``) jobs are runs of ``NOISESCORE_PREFECT_DEPLOYMENT``.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

from noisescore.service.jobs import JobManager, PrefectJobManager
from noisescore.service.metrics import ServiceMetrics
from noisescore.service.server import Service
from noisescore.service.servicer import NoiseScoringServicer
from noisescore.settings import ServiceSettings, StoreSettings
from noisescore.storage import ArtifactStore, LocalStore, open_store


@dataclass
class App:
    """A running noisescore service: ``app.port``, ``app.metrics_port``, ``app.stop()``."""

    service: Service
    jobs: JobManager
    metrics: ServiceMetrics

    @property
    def port(self) -> int:
        return self.service.port

    @property
    def metrics_port(self) -> int | None:
        return self.service.metrics_port

    def start(self) -> App:
        self.service.start()
        # torch, timm and onnx leave ~500k objects behind at import; frozen, a full garbage
        # collection no longer walks them (measured: 170-270 ms pauses while building large
        # GetCorrections replies, docs/bench/service.md).
        gc.collect()
        gc.freeze()
        return self

    def stop(self, grace: float | None = None) -> None:
        """Drain in-flight RPCs, then stop the jobs this process runs."""
        self.service.stop(grace)
        self.jobs.shutdown(cancel=True)


def create_app(
    settings: ServiceSettings | None = None,
    *,
    store: ArtifactStore | None = None,
    job_env: dict[str, str] | None = None,
) -> App:
    """Build (not start) the service; the store is checked first (fail fast)."""
    settings = settings or ServiceSettings()
    store = store or open_store(StoreSettings())
    store.check()
    metrics = ServiceMetrics()
    env = dict(job_env or {})
    if isinstance(store, LocalStore):  # job processes must write where this service reads
        env.update(NOISESCORE_STORE_DIR=str(store.root.resolve()), NOISESCORE_S3_ENDPOINT="")
    jobs: JobManager
    if settings.runner() == "prefect":
        jobs = PrefectJobManager(
            store,
            max_queue=settings.max_queue,
            deployment=settings.prefect_deployment,
            active_deployment=settings.prefect_active_deployment,
        )
    else:
        jobs = JobManager(
            store, workers=settings.job_workers, max_queue=settings.max_queue, env=env,
            lease_ttl=StoreSettings().job_lease_ttl,
        )  # fmt: skip

    def publish_job_metrics() -> None:
        metrics.set_jobs(jobs.counts())
        metrics.set_queue_depth(jobs.queue_depth())

    jobs.on_change = publish_job_metrics
    publish_job_metrics()
    servicer = NoiseScoringServicer(
        jobs,
        max_batch=settings.max_batch,
        observe_inference=metrics.observe_inference,
        onnx_threads=settings.onnx_threads,
        dataset_roots=settings.dataset_roots,
        max_watches=settings.max_watches,
        max_request_pixels=settings.max_request_pixels,
        max_inflight_pixels=settings.max_inflight_pixels,
    )
    return App(Service(servicer, settings, metrics=metrics), jobs, metrics)
