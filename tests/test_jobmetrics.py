"""Job metrics pushed to a Pushgateway-compatible HTTP server that the tests run themselves.

No Pushgateway binary is installable from PyPI (the real one is a Go program released on
GitHub, which this project's machines cannot download), so the peer here is a small
``http.server`` that speaks the part of the Pushgateway API a push uses: PUT/POST/DELETE on
``/metrics/job/<job>/<label>/<value>...``, answering 200 (202 for DELETE, as the real one
does). It records what arrived; the tests parse the bodies with prometheus_client's own
text parser. Nothing of ours is mocked.
"""

from __future__ import annotations

import logging
import socket

import numpy as np
import pytest
import torch
from conftest import Gateway
from torch import nn

from noisescore.jobmetrics import (
    GATEWAY_ENV,
    PUSH_JOB,
    JobMetrics,
    MetricsHook,
    ProgressEvent,
)
from noisescore.ml.linc import LiNC
from noisescore.ml.train import DeviceImages, Hook, TrainConfig, Trainer

LOGGER = "noisescore.jobmetrics"


@pytest.fixture(autouse=True)
def _no_env_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own NOISESCORE_PUSHGATEWAY must not leak into these tests."""
    monkeypatch.delenv(GATEWAY_ENV, raising=False)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def event(**overrides: object) -> ProgressEvent:
    fields: dict[str, object] = {
        "job_id": "job-1",
        "stage": "warmup",
        "epoch": 3,
        "epochs": 10,
        "loss": 0.52,
        "train_accuracy": 0.81,
        "trust_mean": 0.9,
        "flagged_fraction": 0.25,
        "flagged_count": 50,
        "samples_per_second": 1234.5,
    }
    fields.update(overrides)
    return ProgressEvent(**fields)  # type: ignore[arg-type]


# --- ProgressEvent -------------------------------------------------------------------------


def test_event_time_is_filled_and_dict_round_trips() -> None:
    e = event()
    assert e.time.endswith("Z") and "T" in e.time
    assert ProgressEvent.from_dict(e.as_dict()) == e
    given = event(time="2025-01-31T12:00:00.000Z")
    assert given.time == "2025-01-31T12:00:00.000Z"


def test_event_from_dict_ignores_unknown_keys_and_needs_the_required_ones() -> None:
    e = ProgressEvent.from_dict(
        {"job_id": "j", "stage": "final", "epoch": "2", "epochs": 5, "loss": 1, "new": "x"}
    )
    assert (e.epoch, e.epochs, e.loss, e.trust_mean) == (2, 5, 1.0, None)
    with pytest.raises(ValueError, match="missing: epoch, epochs"):
        ProgressEvent.from_dict({"job_id": "j", "stage": "final"})


# --- JobMetrics and the gateway ------------------------------------------------------------


def test_record_pushes_the_recorded_values_to_the_job_group(gateway: Gateway) -> None:
    metrics = JobMetrics("job-1", gateway=gateway.address)
    metrics.record(event(time="2025-01-31T12:00:00Z"))

    assert len(gateway.requests) == 1
    request = gateway.requests[0]
    assert request.method == "PUT"  # the registry is the job's whole state: replace the group
    assert request.path == f"/metrics/job/{PUSH_JOB}/job_id/job-1"
    assert request.content_type.startswith("text/plain")
    samples = gateway.samples()
    by_stage = {"job_id": "job-1", "stage": "warmup"}
    assert samples[key("noisescore_job_epoch", **by_stage)] == 3
    assert samples[key("noisescore_job_epochs_planned", **by_stage)] == 10
    assert samples[key("noisescore_job_loss", **by_stage)] == pytest.approx(0.52)
    assert samples[key("noisescore_job_train_accuracy", **by_stage)] == pytest.approx(0.81)
    assert samples[key("noisescore_job_trust_mean", **by_stage)] == pytest.approx(0.9)
    assert samples[key("noisescore_job_flagged_fraction", **by_stage)] == pytest.approx(0.25)
    assert samples[key("noisescore_job_flagged", **by_stage)] == 50
    assert samples[key("noisescore_job_samples_per_second", **by_stage)] == pytest.approx(1234.5)
    assert samples[key("noisescore_job_epochs_completed_total", **by_stage)] == 1
    assert samples[key("noisescore_job_stage", **by_stage)] == 1
    assert samples[key("noisescore_job_last_update_timestamp_seconds", job_id="job-1")] == (
        1738324800.0
    )
    assert samples[key("noisescore_job_state", job_id="job-1", state="running")] == 1
    assert samples[key("noisescore_job_state", job_id="job-1", state="queued")] == 0
    assert not any(name == "noisescore_job_last_success_timestamp_seconds" for name, _ in samples)


def test_later_events_update_gauges_count_epochs_and_move_the_stage(gateway: Gateway) -> None:
    metrics = JobMetrics("job-1", gateway=f"http://{gateway.address}")
    metrics.record(event(epoch=1))
    metrics.record(event(epoch=2, loss=0.4, trust_mean=None))
    metrics.record(event(stage="final", epoch=3, epochs=4, trust_mean=None, loss=0.1))
    metrics.record(event(stage="export", epoch=0, epochs=0, loss=None, trust_mean=None))

    assert [r.method for r in gateway.requests] == ["PUT"] * 4
    samples = gateway.samples()
    warmup = {"job_id": "job-1", "stage": "warmup"}
    final = {"job_id": "job-1", "stage": "final"}
    assert samples[key("noisescore_job_epoch", **warmup)] == 2
    assert samples[key("noisescore_job_loss", **warmup)] == pytest.approx(0.4)
    assert samples[key("noisescore_job_trust_mean", **warmup)] == pytest.approx(0.9)  # kept
    assert samples[key("noisescore_job_epochs_completed_total", **warmup)] == 2
    assert samples[key("noisescore_job_epoch", **final)] == 3
    assert samples[key("noisescore_job_epochs_planned", **final)] == 4
    assert samples[key("noisescore_job_epochs_completed_total", **final)] == 1
    assert key("noisescore_job_trust_mean", **final) not in samples
    assert key("noisescore_job_epoch", job_id="job-1", stage="export") not in samples
    stages = ("warmup", "final", "export")
    stage = {s: samples[key("noisescore_job_stage", job_id="job-1", stage=s)] for s in stages}
    assert stage == {"warmup": 0, "final": 0, "export": 1}


def test_finish_sets_state_one_hot_and_last_success(gateway: Gateway) -> None:
    metrics = JobMetrics("job-1", gateway=gateway.address)
    metrics.record(event())
    metrics.finish("succeeded")

    samples = gateway.samples()
    states = {
        labels[1][1]: value
        for (name, labels), value in samples.items()
        if name == "noisescore_job_state"
    }
    assert states == {
        "queued": 0, "running": 0, "succeeded": 1, "failed": 0, "cancelled": 0,
        "waiting_for_labels": 0,
    }  # fmt: skip
    success = samples[key("noisescore_job_last_success_timestamp_seconds", job_id="job-1")]
    assert success > 1.7e9
    states = "queued, running, succeeded, failed, cancelled, waiting_for_labels"
    with pytest.raises(ValueError, match=states):
        metrics.finish("done")


def test_failed_job_has_no_success_time() -> None:
    metrics = JobMetrics("job-1", gateway="")
    metrics.finish("failed")
    text = metrics.exposition().decode()
    assert 'noisescore_job_state{job_id="job-1",state="failed"} 1.0' in text
    assert "noisescore_job_last_success_timestamp_seconds{" not in text


def test_delete_removes_the_job_group(gateway: Gateway) -> None:
    metrics = JobMetrics("job-1", gateway=gateway.address)
    assert metrics.delete()
    assert [(r.method, r.path) for r in gateway.requests] == [
        ("DELETE", f"/metrics/job/{PUSH_JOB}/job_id/job-1")
    ]


def test_job_id_with_a_slash_is_escaped_in_the_path(gateway: Gateway) -> None:
    metrics = JobMetrics("team/a", gateway=gateway.address)
    assert metrics.push()
    # The Pushgateway's base64 form of a label value that contains '/'.
    assert gateway.requests[0].path == f"/metrics/job/{PUSH_JOB}/job_id@base64/dGVhbS9h"


def test_env_var_is_honoured(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GATEWAY_ENV, gateway.address)
    metrics = JobMetrics("job-env")
    assert metrics.gateway == gateway.address
    metrics.record(event(job_id="job-env"))
    assert [r.path for r in gateway.requests] == [f"/metrics/job/{PUSH_JOB}/job_id/job-env"]


def test_explicit_empty_gateway_overrides_the_env_var(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(GATEWAY_ENV, gateway.address)
    JobMetrics("job-1", gateway="").record(event())
    assert gateway.requests == []


def test_no_gateway_means_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GATEWAY_ENV, "")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("no gateway is configured, yet a connection was opened")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    metrics = JobMetrics("job-1")
    assert metrics.gateway is None
    metrics.record(event())
    metrics.finish("succeeded")
    assert metrics.push() is False
    text = metrics.exposition().decode()
    assert 'noisescore_job_loss{job_id="job-1",stage="warmup"} 0.52' in text
    assert 'noisescore_job_state{job_id="job-1",state="succeeded"} 1.0' in text


def test_gateway_down_never_fails_training_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    address = f"127.0.0.1:{closed_port()}"
    metrics = JobMetrics("job-1", gateway=address, timeout=2)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        metrics.record(event(epoch=1))
        metrics.record(event(epoch=2))  # inside the back-off: not even tried
        assert metrics.push() is False
        metrics.finish("failed")
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert address in warnings[0].getMessage()
    assert "refused" in warnings[0].getMessage().lower()
    assert b'noisescore_job_epoch{job_id="job-1",stage="warmup"} 2.0' in metrics.exposition()


def test_gateway_error_status_is_a_failed_push_and_recovery_is_logged(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    gateway.status = 400  # what a Pushgateway answers to an inconsistent push
    metrics = JobMetrics("job-1", gateway=gateway.address)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert metrics.push() is False
        gateway.status = 200
        assert metrics.push() is True
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]
    assert messages[0][0] == logging.WARNING and "400" in messages[0][1]
    assert messages[1][0] == logging.INFO and "reachable again" in messages[1][1]


def test_invalid_arguments_say_what_is_expected() -> None:
    with pytest.raises(ValueError, match=r"host:port or http\(s\)://host:port"):
        JobMetrics("job-1", gateway="ftp://example:21")
    with pytest.raises(ValueError, match="non-empty"):
        JobMetrics("")
    with pytest.raises(ValueError, match="of job 'other'"):
        JobMetrics("job-1", gateway="").record(event(job_id="other"))


def test_registry_is_not_the_global_one() -> None:
    from prometheus_client import REGISTRY

    JobMetrics("job-1", gateway="")
    JobMetrics("job-1", gateway="")  # a second job of the same id: no duplicate-series error
    assert REGISTRY.get_sample_value("noisescore_job_state", {"job_id": "job-1"}) is None


# --- MetricsHook on a real Trainer with LiNC -----------------------------------------------


class Memo(nn.Module):
    def __init__(self, d: int, c: int):
        super().__init__()
        self.fc = nn.Linear(d, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def make_trainer(hooks: list[Hook], epochs: int) -> Trainer:
    rng = np.random.default_rng(0)
    n = 120
    true = rng.integers(0, 2, n)
    images = np.where(true[:, None, None, None] == 1, 200, 50).astype(np.int64)
    images = np.clip(images + rng.normal(0, 30, (n, 1, 4, 4)), 0, 255).astype(np.uint8)
    noisy = np.where(rng.random(n) < 0.3, 1 - true, true)
    torch.manual_seed(0)
    return Trainer(  # sets last_epoch_stats before the hooks' on_epoch_end
        Memo(16, 2),
        DeviceImages(images, torch.device("cpu")),
        noisy,
        config=TrainConfig(epochs=epochs, lr=1e-2, batch_size=32),
        hooks=hooks,
    )


def test_hook_after_linc_emits_one_event_per_epoch_with_trust(gateway: Gateway) -> None:
    events: list[ProgressEvent] = []
    metrics = JobMetrics("job-h", gateway=gateway.address)

    def sink(e: ProgressEvent) -> None:
        events.append(e)
        metrics.record(e)

    linc = LiNC(2, warmup_epochs=2)
    hook = MetricsHook(
        sink,
        job_id="job-h",
        stage=lambda epoch: "warmup" if epoch <= 2 else "final",
        epochs=3,
        n_samples=120,
    )
    trainer = make_trainer([linc, hook], epochs=3)
    history = trainer.fit()

    assert [(e.stage, e.epoch, e.epochs) for e in events] == [
        ("warmup", 1, 3),
        ("warmup", 2, 3),
        ("final", 3, 3),
    ]
    for e, stats in zip(events, history, strict=True):
        assert e.job_id == "job-h"
        assert e.loss == pytest.approx(stats.loss)
        assert e.train_accuracy == pytest.approx(stats.train_accuracy)
        assert e.samples_per_second is not None and e.samples_per_second > 0
    for e, stats in zip(events[:2], history[:2], strict=True):
        assert e.trust_mean == pytest.approx(stats.extra["trust_mean"])
        assert e.flagged_fraction == pytest.approx(stats.extra["flagged_fraction"])
        assert e.flagged_count == round(stats.extra["flagged_fraction"] * 120)
    assert events[1].flagged_count == int(linc.flagged_.sum())
    assert events[2].trust_mean is None  # LiNC's alpha is frozen after warm-up

    assert len(gateway.requests) == 3
    samples = gateway.samples()
    warmup = {"job_id": "job-h", "stage": "warmup"}
    assert samples[key("noisescore_job_epoch", **warmup)] == 2
    assert samples[key("noisescore_job_trust_mean", **warmup)] == pytest.approx(
        float(linc.trust_.mean())
    )
    assert samples[key("noisescore_job_flagged", **warmup)] == int(linc.flagged_.sum())
    assert samples[key("noisescore_job_epochs_completed_total", **warmup)] == 2
    assert samples[key("noisescore_job_epoch", job_id="job-h", stage="final")] == 3


def test_hook_before_linc_sees_no_trust() -> None:
    events: list[ProgressEvent] = []
    hook = MetricsHook(events.append, job_id="j", stage="warmup", epochs=1, n_samples=120)
    make_trainer([hook, LiNC(2, warmup_epochs=1)], epochs=1).fit()
    assert len(events) == 1
    assert events[0].trust_mean is None and events[0].flagged_count is None
    assert events[0].loss is not None


def test_hook_without_epoch_stats_reports_trust_only() -> None:
    class Bare:  # a trainer that offers no last_epoch_stats
        pass

    events: list[ProgressEvent] = []
    hook = MetricsHook(events.append, job_id="j", stage="warmup", epochs=5, n_samples=10)
    hook.on_epoch_end(Bare(), 1, {"trust_mean": 0.8, "flagged_fraction": 0.26})  # type: ignore[arg-type]
    (e,) = events
    assert (e.loss, e.train_accuracy, e.samples_per_second) == (None, None, None)
    assert (e.trust_mean, e.flagged_count) == (0.8, 3)
