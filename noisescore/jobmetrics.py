"""Training progress of a batch cleaning job as Prometheus metrics, pushed to a Pushgateway.

A cleaning job is a batch job: it may end before Prometheus ever scrapes it, so it
*pushes* its metrics to a Pushgateway (the pattern Prometheus recommends for batch jobs)
when ``NOISESCORE_PUSHGATEWAY`` (``host:port`` or ``http(s)://host:port``) is set. Without
it nothing touches the network; :meth:`JobMetrics.exposition` still renders the metrics.

Each job pushes to its own group, ``/metrics/job/noisescore_clean/job_id/<job id>``, with
PUT: the job's :class:`~prometheus_client.CollectorRegistry` holds the job's whole state, so
each push replaces the group. The Pushgateway keeps a group until it is deleted
(:meth:`JobMetrics.delete`); it has no expiry of its own.

A push failure never fails the training: it is logged once per distinct error (with the
gateway's address) and later automatic pushes back off (1 s, doubling to 60 s) so a
gateway that hangs costs at most a few timeouts over a long run.

Metrics. Every one carries the label ``job_id`` (the Pushgateway adds ``job="noisescore_clean"``);
``{stage}`` marks those also labelled by stage ("warmup", "final", ...):

| name | type | meaning |
| --- | --- | --- |
| `noisescore_job_epoch{stage}` | gauge | last finished epoch of the stage, 1-based |
| `noisescore_job_epochs_planned{stage}` | gauge | epochs planned for the stage |
| `noisescore_job_loss{stage}` | gauge | mean training loss of the last epoch |
| `noisescore_job_train_accuracy{stage}` | gauge | training accuracy of the last epoch (0..1) |
| `noisescore_job_trust_mean{stage}` | gauge | mean LiNC trust (alpha) of the training set (0..1) |
| `noisescore_job_flagged_fraction{stage}` | gauge | fraction of samples below the Otsu threshold |
| `noisescore_job_flagged{stage}` | gauge | number of samples below the Otsu threshold |
| `noisescore_job_samples_per_second{stage}` | gauge | training throughput of the last epoch |
| `noisescore_job_epochs_completed_total{stage}` | counter | epochs finished |
| `noisescore_job_stage{stage}` | gauge | 1 for the latest event's stage, 0 for earlier ones |
| `noisescore_job_last_update_timestamp_seconds` | gauge | Unix time of the latest update |
| `noisescore_job_state{state}` | gauge | 1 for the job's state, 0 for the others |
| `noisescore_job_last_success_timestamp_seconds` | gauge | Unix time the job succeeded |

``state`` is one of queued, running, succeeded, failed, cancelled, waiting_for_labels (an
active-clean job whose round waits for an expert): ``queued`` until the
first event, ``running`` from then on, until :meth:`JobMetrics.finish`. The epoch gauges
are set for events of a stage with planned epochs (``epochs > 0``); the counter counts
events with ``epoch >= 1`` (one per finished epoch). The last-success time is absent
until the job succeeds. "Last update" is the latest event's own time or a state change.

A gauge of an optional quantity (loss, trust, ...) appears once an event carried a value
for it. The counter also exposes ``noisescore_job_epochs_completed_created`` (its creation
time), as every prometheus_client counter does.

Example
-------
>>> metrics = JobMetrics("job-42", gateway="")  # "" = never push (default: the env var)
>>> metrics.record(ProgressEvent("job-42", "warmup", epoch=1, epochs=10, loss=0.7))
>>> b'noisescore_job_loss{job_id="job-42",stage="warmup"} 0.7' in metrics.exposition()
True
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlparse

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import delete_from_gateway, push_to_gateway

from noisescore.ml.train import EpochStats, Hook, Trainer

__all__ = [
    "GATEWAY_ENV",
    "JOB_STATES",
    "PUSH_JOB",
    "JobMetrics",
    "MetricsHook",
    "ProgressEvent",
]

logger = logging.getLogger(__name__)

PUSH_JOB = "noisescore_clean"
"""The Pushgateway ``job`` grouping label of every cleaning job (the job id goes in ``job_id``)."""

GATEWAY_ENV = "NOISESCORE_PUSHGATEWAY"

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled", "waiting_for_labels")
"""Values of the ``state`` label of ``noisescore_job_state`` (the job resource's states)."""

_BACKOFF_START_S = 1.0
_BACKOFF_MAX_S = 60.0


def utc_now_iso() -> str:
    """The current time as ISO-8601 UTC, in milliseconds: ``2025-01-31T12:00:00.000Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _unix_time(iso: str) -> float:
    """Seconds since the epoch of an ISO-8601 time (naive = UTC); now if it does not parse."""
    try:
        parsed = datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return datetime.now(UTC).timestamp()
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


@dataclass(frozen=True)
class ProgressEvent:
    """One point of a job's progress; what :class:`JobMetrics` records and a watcher streams.

    Parameters
    ----------
    job_id : str
    stage : str
        ``"warmup"``, ``"final"``, ``"correct"``, ``"export"``, ``"publish"``, ...
    epoch : int
        Last finished epoch of the stage, 1-based; 0 when the stage has no epochs or none
        has finished yet.
    epochs : int
        Epochs planned for the stage (0 for a stage without epochs).
    loss, train_accuracy, samples_per_second : float or None
        Of the epoch just finished.
    trust_mean, flagged_fraction : float or None
        LiNC's mean trust and the fraction of samples below the Otsu threshold (0..1).
    flagged_count : int or None
        Number of samples below the Otsu threshold.
    time : str
        ISO-8601 UTC time of the event; filled with the current time when left empty.
    """

    job_id: str
    stage: str
    epoch: int
    epochs: int
    loss: float | None = None
    train_accuracy: float | None = None
    trust_mean: float | None = None
    flagged_fraction: float | None = None
    flagged_count: int | None = None
    samples_per_second: float | None = None
    time: str = ""

    def __post_init__(self) -> None:
        if not self.time:
            object.__setattr__(self, "time", utc_now_iso())

    def as_dict(self) -> dict[str, Any]:
        """Every field by name (``None`` for the absent ones); JSON-ready if values are finite."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProgressEvent:
        """The event :meth:`as_dict` gave; unknown keys are ignored, missing optional ones ``None``.

        Raises
        ------
        ValueError
            When ``job_id``, ``stage``, ``epoch`` or ``epochs`` is missing.
        """
        required = ("job_id", "stage", "epoch", "epochs")
        missing = [key for key in required if d.get(key) is None]
        if missing:
            raise ValueError(
                f"a progress event needs {', '.join(required)}; missing: {', '.join(missing)}"
            )

        def opt_float(key: str) -> float | None:
            value = d.get(key)
            return None if value is None else float(value)

        count = d.get("flagged_count")
        return cls(
            job_id=str(d["job_id"]),
            stage=str(d["stage"]),
            epoch=int(d["epoch"]),
            epochs=int(d["epochs"]),
            loss=opt_float("loss"),
            train_accuracy=opt_float("train_accuracy"),
            trust_mean=opt_float("trust_mean"),
            flagged_fraction=opt_float("flagged_fraction"),
            flagged_count=None if count is None else int(count),
            samples_per_second=opt_float("samples_per_second"),
            time=str(d.get("time") or ""),
        )


def _resolve_gateway(gateway: str | None) -> str | None:
    """The gateway address to push to, or ``None`` (disabled); only http(s) schemes are valid."""
    if gateway is None:
        gateway = os.environ.get(GATEWAY_ENV, "")
    gateway = gateway.strip()
    if not gateway:
        return None
    if "://" in gateway and urlparse(gateway).scheme not in ("http", "https"):
        raise ValueError(
            f"Pushgateway address {gateway!r} (from the argument or {GATEWAY_ENV}) must be "
            "host:port or http(s)://host:port"
        )
    return gateway


class JobMetrics:
    """Job-labelled gauges and counters in their own ``CollectorRegistry`` (never the global one).

    Parameters
    ----------
    job_id : str
        The job's id: the ``job_id`` label of every metric and of the Pushgateway group.
    gateway : str or None
        ``host:port`` or ``http(s)://host:port`` of a Pushgateway. ``None`` reads
        ``NOISESCORE_PUSHGATEWAY``; an empty value disables pushing.
    timeout : float
        Seconds one push may take before it counts as failed.

    Attributes
    ----------
    registry : prometheus_client.CollectorRegistry
        This job's metrics (see the module docstring); its state is ``queued`` until the
        first :meth:`record`.
    gateway : str or None
        Where pushes go; ``None`` when pushing is disabled.
    """

    def __init__(self, job_id: str, *, gateway: str | None = None, timeout: float = 5.0):
        if not job_id:
            raise ValueError("job_id must be a non-empty string")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.job_id = job_id
        self.gateway = _resolve_gateway(gateway)
        self.timeout = timeout
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.RLock()
        self._warned: set[str] = set()
        self._failing = False
        self._backoff_s = 0.0
        self._retry_at = 0.0  # monotonic time before which record() does not push
        self._stages: list[str] = []
        self._state: str | None = None

        by_stage = ("job_id", "stage")
        r = self.registry

        def gauge(name: str, doc: str, labels: tuple[str, ...] = by_stage) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        self._epoch = gauge("noisescore_job_epoch", "Last finished epoch of the stage (1-based).")
        self._epochs = gauge("noisescore_job_epochs_planned", "Epochs planned for the stage.")
        self._loss = gauge("noisescore_job_loss", "Mean training loss of the last epoch.")
        self._accuracy = gauge(
            "noisescore_job_train_accuracy", "Training accuracy of the last epoch (0..1)."
        )
        self._trust = gauge(
            "noisescore_job_trust_mean", "Mean LiNC trust (alpha) over the training set (0..1)."
        )
        self._flagged_fraction = gauge(
            "noisescore_job_flagged_fraction",
            "Fraction of training samples below the Otsu threshold of trust (0..1).",
        )
        self._flagged = gauge(
            "noisescore_job_flagged", "Training samples below the Otsu threshold of trust."
        )
        self._throughput = gauge(
            "noisescore_job_samples_per_second", "Training throughput of the last epoch."
        )
        self._completed = Counter(
            "noisescore_job_epochs_completed_total", "Epochs finished.", by_stage, registry=r
        )
        self._stage = gauge(
            "noisescore_job_stage", "1 for the stage of the latest event, 0 for earlier stages."
        )
        self._last_update = gauge(
            "noisescore_job_last_update_timestamp_seconds",
            "Unix time of the latest event or state change.",
            ("job_id",),
        )
        self._job_state = gauge(
            "noisescore_job_state",
            "1 for the job's state, 0 for the others.",
            ("job_id", "state"),
        )
        self._last_success = gauge(
            "noisescore_job_last_success_timestamp_seconds",
            "Unix time the job succeeded.",
            ("job_id",),
        )
        self._set_state("queued")

    def __repr__(self) -> str:
        return f"JobMetrics(job_id={self.job_id!r}, gateway={self.gateway!r})"

    def _set_state(self, state: str) -> None:
        for name in JOB_STATES:
            self._job_state.labels(self.job_id, name).set(1.0 if name == state else 0.0)
        self._state = state

    def record(self, event: ProgressEvent) -> None:
        """Update the metrics from ``event``, then push if a gateway is set.

        Fields that are ``None`` leave their gauge as it was. The job's state becomes
        ``running`` unless :meth:`finish` already set one. Never raises for a push failure.

        Raises
        ------
        ValueError
            When ``event.job_id`` is not this job's id.
        """
        if event.job_id != self.job_id:
            raise ValueError(
                f"event of job {event.job_id!r} recorded in the metrics of job {self.job_id!r}"
            )
        with self._lock:
            job, stage = self.job_id, event.stage
            if event.epochs > 0:  # stages without epochs (export, publish) get no epoch series
                self._epoch.labels(job, stage).set(event.epoch)
                self._epochs.labels(job, stage).set(event.epochs)
            if event.epoch >= 1:
                self._completed.labels(job, stage).inc()
            for gauge, value in (
                (self._loss, event.loss),
                (self._accuracy, event.train_accuracy),
                (self._trust, event.trust_mean),
                (self._flagged_fraction, event.flagged_fraction),
                (self._flagged, event.flagged_count),
                (self._throughput, event.samples_per_second),
            ):
                if value is not None:
                    gauge.labels(job, stage).set(value)
            if stage not in self._stages:
                self._stages.append(stage)
            for seen in self._stages:
                self._stage.labels(job, seen).set(1.0 if seen == stage else 0.0)
            self._last_update.labels(job).set(_unix_time(event.time))
            if self._state in (None, "queued"):
                self._set_state("running")
            in_backoff = self._failing and time.monotonic() < self._retry_at
        if self.gateway is not None and not in_backoff:
            self.push()

    def finish(self, state: str) -> None:
        """Set the job's final state (one-hot ``noisescore_job_state``) and push.

        ``"succeeded"`` also sets ``noisescore_job_last_success_timestamp_seconds``. The
        push is tried even while earlier pushes failed, as it is the job's last word.

        Raises
        ------
        ValueError
            When ``state`` is not one of ``JOB_STATES``.
        """
        if state not in JOB_STATES:
            raise ValueError(f"state must be one of {', '.join(JOB_STATES)}; got {state!r}")
        with self._lock:
            now = datetime.now(UTC).timestamp()
            self._set_state(state)
            self._last_update.labels(self.job_id).set(now)
            if state == "succeeded":
                self._last_success.labels(self.job_id).set(now)
        if self.gateway is not None:
            self.push()

    def push(self) -> bool:
        """Push the registry to the gateway (PUT: replaces this job's group).

        Returns
        -------
        bool
            True when the gateway accepted it; False when pushing is disabled or failed. A
            failure is logged as a warning (once per distinct error message) and never raised.
        """
        gateway = self.gateway
        if gateway is None:
            return False
        return self._send(
            lambda: push_to_gateway(
                gateway,
                job=PUSH_JOB,
                grouping_key={"job_id": self.job_id},
                registry=self.registry,
                timeout=self.timeout,
            ),
            "push job metrics to",
        )

    def delete(self) -> bool:
        """Delete this job's group from the gateway (the Pushgateway never expires one).

        Returns
        -------
        bool
            As :meth:`push`.
        """
        gateway = self.gateway
        if gateway is None:
            return False
        return self._send(
            lambda: delete_from_gateway(
                gateway,
                job=PUSH_JOB,
                grouping_key={"job_id": self.job_id},
                timeout=self.timeout,
            ),
            "delete job metrics from",
        )

    def _send(self, request: Callable[[], None], what: str) -> bool:
        try:
            request()
        except Exception as exc:  # a metrics outage must never end a training run
            message = f"{type(exc).__name__}: {exc}"
            with self._lock:
                first = message not in self._warned
                self._warned.add(message)
                self._failing = True
                self._backoff_s = min(max(2 * self._backoff_s, _BACKOFF_START_S), _BACKOFF_MAX_S)
                self._retry_at = time.monotonic() + self._backoff_s
            log = logger.warning if first else logger.debug
            log(
                "could not %s Pushgateway %s for job %s: %s (training goes on; "
                "a repeat of this error is logged at DEBUG)",
                what,
                self.gateway,
                self.job_id,
                message,
            )
            return False
        with self._lock:
            recovered = self._failing
            self._failing, self._backoff_s, self._retry_at = False, 0.0, 0.0
        if recovered:
            logger.info("Pushgateway %s reachable again for job %s", self.gateway, self.job_id)
        return True

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (``prometheus_client.generate_latest``)."""
        return generate_latest(self.registry)


class MetricsHook(Hook):
    """Training-loop hook that sends one :class:`ProgressEvent` per finished epoch to ``sink``.

    Put it **after** :class:`~noisescore.ml.linc.LiNC` in the trainer's hook list: hooks'
    ``on_epoch_end`` run in list order and LiNC writes ``trust_mean`` and
    ``flagged_fraction`` into the epoch's ``stats`` there; a MetricsHook placed before it
    sees them empty and reports no trust values.

    Loss, training accuracy and throughput come from ``trainer.last_epoch_stats`` (the
    :class:`~noisescore.ml.train.EpochStats` of the epoch just finished, set before the
    hooks run); a trainer without it gives events without those three fields.

    Parameters
    ----------
    sink : callable
        Receives each event, e.g. :meth:`JobMetrics.record` or a watcher's queue ``put``.
        Its exceptions propagate (``JobMetrics.record`` raises none for push failures).
    job_id : str
    stage : str or callable
        The events' stage, or a function of the 1-based epoch giving it (one trainer runs
        LiNC's warm-up and final epochs: ``lambda e: "warmup" if e <= w else "final"``).
    epochs : int
        Epochs planned for the run (the events' ``epochs``).
    n_samples : int
        Training-set size; ``flagged_count = round(flagged_fraction * n_samples)``.
    """

    def __init__(
        self,
        sink: Callable[[ProgressEvent], None],
        *,
        job_id: str,
        stage: str | Callable[[int], str],
        epochs: int,
        n_samples: int,
    ):
        if epochs < 0 or n_samples < 0:
            raise ValueError(f"epochs and n_samples must be >= 0, got {epochs} and {n_samples}")
        self.sink = sink
        self.job_id = job_id
        self.stage = stage
        self.epochs = epochs
        self.n_samples = n_samples

    def on_epoch_end(self, trainer: Trainer, epoch: int, stats: dict[str, float]) -> None:
        epoch_stats: EpochStats | None = getattr(trainer, "last_epoch_stats", None)
        if epoch_stats is not None and epoch_stats.epoch != epoch:
            epoch_stats = None  # stale: not this epoch's
        fraction = stats.get("flagged_fraction")
        throughput = None if epoch_stats is None else epoch_stats.samples_per_second
        if throughput is not None and not math.isfinite(throughput):
            throughput = None  # an epoch too short to time
        stage = self.stage(epoch) if callable(self.stage) else self.stage
        self.sink(
            ProgressEvent(
                job_id=self.job_id,
                stage=stage,
                epoch=epoch,
                epochs=self.epochs,
                loss=None if epoch_stats is None else epoch_stats.loss,
                train_accuracy=None if epoch_stats is None else epoch_stats.train_accuracy,
                trust_mean=stats.get("trust_mean"),
                flagged_fraction=fraction,
                flagged_count=None if fraction is None else round(fraction * self.n_samples),
                samples_per_second=throughput,
            )
        )
