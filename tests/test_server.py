"""The server plumbing (service/server.py, interceptors.py, metrics.py) against a REAL gRPC
server on a free loopback port, with a small fake servicer: the real one is tested on its
own. Auth, errors, metrics over HTTP, health, reflection, TLS/mTLS, limits, shutdown."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from noisescore.service.interceptors import MISSING_TOKEN, WRONG_TOKEN
from noisescore.service.metrics import ServiceMetrics, parse_addr
from noisescore.service.server import (
    SERVICE_NAME,
    Service,
    build_server,
    serve_forever,
    server_credentials,
)
from noisescore.settings import ServiceSettings
from noisescore.v1 import noise_scoring_pb2 as pb
from noisescore.v1 import noise_scoring_pb2_grpc as pb_grpc

GET_JOB = f"/{SERVICE_NAME}/GetJob"
TIMEOUT = 10.0


class FakeServicer(pb_grpc.NoiseScoringServicer):
    """Just enough behaviour to exercise the plumbing around a servicer."""

    def __init__(self, slow_seconds: float = 1.0) -> None:
        self.slow_seconds = slow_seconds
        self.slow_started = threading.Event()

    def GetJob(self, request, context):
        return pb.Job(name=request.name, state=pb.Job.SUCCEEDED)

    def CancelJob(self, request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, f"{request.name} not found")

    def ListJobs(self, request, context):
        raise RuntimeError("secret detail: database password is hunter2")

    def WatchJob(self, request, context):
        for epoch in (1, 2, 3):
            yield pb.JobEvent(name=request.name, state=pb.Job.RUNNING, epoch=epoch)

    def StreamCorrections(self, request, context):
        yield pb.GetCorrectionsResponse(total_size=1)
        raise RuntimeError("secret detail in a stream")

    def GetCorrections(self, request, context):
        return None  # a bug: a unary handler must return a message

    def SubmitCleaningJob(self, request, context):
        self.slow_started.set()
        time.sleep(self.slow_seconds)
        return pb.Job(name="jobs/slow", state=pb.Job.QUEUED)


def make_settings(**overrides) -> ServiceSettings:
    values = dict(
        grpc_addr="127.0.0.1:0",
        metrics_addr=None,
        auth_tokens=None,
        rpc_threads=4,
        shutdown_grace=1.0,
    )
    values.update(overrides)
    return ServiceSettings(**values)


@pytest.fixture
def serve() -> Iterator[Callable[..., Service]]:
    """serve(**settings) -> a started Service; all are stopped at the end of the test."""
    started: list[Service] = []

    def start(servicer: FakeServicer | None = None, **overrides) -> Service:
        service = Service(servicer or FakeServicer(), make_settings(**overrides)).start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop(0)


@pytest.fixture
def channels() -> Iterator[Callable[..., grpc.Channel]]:
    opened: list[grpc.Channel] = []

    def open_channel(target: str, credentials: grpc.ChannelCredentials | None = None, **kw):
        if credentials is None:
            channel = grpc.insecure_channel(target, **kw)
        else:
            channel = grpc.secure_channel(target, credentials, **kw)
        opened.append(channel)
        return channel

    yield open_channel
    for channel in opened:
        channel.close()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def requests_total(samples, method: str, code: str) -> float:
    key = ("noisescore_rpc_requests_total", (("code", code), ("method", method)))
    return samples.get(key, 0.0)


# --------------------------------------------------------------------------- auth


def test_auth_off_lets_every_call_through(serve, channels):
    service = serve()
    stub = pb_grpc.NoiseScoringStub(channels(service.target))
    job = stub.GetJob(pb.GetJobRequest(name="jobs/a"), timeout=TIMEOUT)
    assert job.name == "jobs/a" and job.state == pb.Job.SUCCEEDED
    events = list(stub.WatchJob(pb.WatchJobRequest(name="jobs/a"), timeout=TIMEOUT))
    assert [e.epoch for e in events] == [1, 2, 3]


def test_auth_on_requires_a_valid_bearer_token(serve, channels):
    service = serve(auth_tokens=SecretStr("alpha, beta"))
    channel = channels(service.target)
    stub = pb_grpc.NoiseScoringStub(channel)
    request = pb.GetJobRequest(name="jobs/a")

    error = rpc_error(lambda: stub.GetJob(request, timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == MISSING_TOKEN
    assert MISSING_TOKEN == "missing bearer token: send metadata 'authorization: Bearer <token>'"

    basic = (("authorization", "Basic YWxwaGE="),)
    error = rpc_error(lambda: stub.GetJob(request, metadata=basic, timeout=TIMEOUT))
    assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN)

    error = rpc_error(lambda: stub.GetJob(request, metadata=bearer("gamma"), timeout=TIMEOUT))
    assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, WRONG_TOKEN)
    prefix = bearer("alph")  # a prefix of a real token is not that token
    error = rpc_error(lambda: stub.GetJob(request, metadata=prefix, timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED

    for token in ("alpha", "beta"):  # any configured token; the list was trimmed
        job = stub.GetJob(request, metadata=bearer(token), timeout=TIMEOUT)
        assert job.name == "jobs/a"
    lower = (("authorization", "bearer beta"),)  # the scheme is case-insensitive
    assert stub.GetJob(request, metadata=lower, timeout=TIMEOUT).name == "jobs/a"

    # Server streaming: rejected before the first message, served with the token.
    watch = pb.WatchJobRequest(name="jobs/a")
    error = rpc_error(lambda: list(stub.WatchJob(watch, timeout=TIMEOUT)))
    assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN)
    events = list(stub.WatchJob(watch, metadata=bearer("alpha"), timeout=TIMEOUT))
    assert [e.epoch for e in events] == [1, 2, 3]

    # Health checking needs no token (probes); reflection does.
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    error = rpc_error(lambda: list_services(channel))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert SERVICE_NAME in list_services(channel, metadata=bearer("beta"))


# --------------------------------------------------------------------------- errors


def test_unexpected_exception_is_internal_without_details(serve, channels, caplog):
    caplog.set_level(logging.ERROR, logger="noisescore.service.interceptors")
    service = serve()
    stub = pb_grpc.NoiseScoringStub(channels(service.target))

    error = rpc_error(lambda: stub.ListJobs(pb.ListJobsRequest(), timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.INTERNAL
    details = error.details()
    assert details.startswith("internal error; see the server log (request id ")
    for leak in ("Traceback", "RuntimeError", "secret", "hunter2", "File "):
        assert leak not in details
    request_id = details.rsplit(" ", 1)[-1].rstrip(")")
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert len(logged) == 1
    assert "/noisescore.v1.NoiseScoring/ListJobs" in logged[0].getMessage()
    assert logged[0].exc_info is not None and logged[0].exc_info[0] is RuntimeError
    assert "hunter2" in caplog.text  # the traceback is in the server log, only there

    # In a stream: the messages before the failure arrive, then INTERNAL.
    received = []
    stream = stub.StreamCorrections(pb.StreamCorrectionsRequest(job="jobs/a"), timeout=TIMEOUT)
    error = rpc_error(lambda: received.extend(stream))
    assert len(received) == 1
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in error.details() and "RuntimeError" not in error.details()

    # A unary handler that returns nothing is a bug too, logged with the method's name.
    error = rpc_error(lambda: stub.GetCorrections(pb.GetCorrectionsRequest(), timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "GetCorrections returned None" in caplog.text

    # An abort keeps its own code and message.
    error = rpc_error(lambda: stub.CancelJob(pb.CancelJobRequest(name="jobs/x"), timeout=TIMEOUT))
    assert (error.code(), error.details()) == (grpc.StatusCode.NOT_FOUND, "jobs/x not found")


# --------------------------------------------------------------------------- metrics


def test_metrics_endpoint_counts_calls_by_method_and_code(serve, channels):
    service = serve(metrics_addr="127.0.0.1:0", auth_tokens=SecretStr("tok"))
    assert service.metrics_port and service.metrics_port == service.metrics.http_port
    channel = channels(service.target)
    stub = pb_grpc.NoiseScoringStub(channel)
    auth = bearer("tok")

    for _ in range(2):
        stub.GetJob(pb.GetJobRequest(name="jobs/a"), metadata=auth, timeout=TIMEOUT)
    rpc_error(lambda: stub.CancelJob(pb.CancelJobRequest(name="x"), metadata=auth, timeout=TIMEOUT))
    rpc_error(lambda: stub.ListJobs(pb.ListJobsRequest(), metadata=auth, timeout=TIMEOUT))
    rpc_error(lambda: stub.GetJob(pb.GetJobRequest(name="jobs/a"), timeout=TIMEOUT))
    assert len(list(stub.WatchJob(pb.WatchJobRequest(), metadata=auth, timeout=TIMEOUT))) == 3
    missing = channel.unary_unary("/noisescore.v1.NoiseScoring/NoSuchMethod")
    error = rpc_error(lambda: missing(b"", metadata=auth, timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    service.metrics.set_jobs({"QUEUED": 2, "running": 1})
    service.metrics.set_queue_depth(2)
    service.metrics.observe_inference(0.003, 64)

    samples = scrape(service.metrics_port)
    svc = "/noisescore.v1.NoiseScoring/"
    assert requests_total(samples, GET_JOB, "OK") == 2
    assert requests_total(samples, GET_JOB, "UNAUTHENTICATED") == 1
    assert requests_total(samples, svc + "CancelJob", "NOT_FOUND") == 1
    assert requests_total(samples, svc + "ListJobs", "INTERNAL") == 1
    assert requests_total(samples, svc + "WatchJob", "OK") == 1
    assert requests_total(samples, "unknown", "UNIMPLEMENTED") == 1
    assert not any("NoSuchMethod" in str(labels) for _, labels in samples)
    duration = "noisescore_rpc_duration_seconds"
    assert samples[(f"{duration}_count", (("method", GET_JOB),))] == 3
    assert 0 < samples[(f"{duration}_sum", (("method", GET_JOB),))] < 5
    assert samples[(f"{duration}_bucket", (("le", "30.0"), ("method", GET_JOB)))] == 3
    assert samples[(f"{duration}_bucket", (("le", "0.0005"), ("method", GET_JOB)))] <= 3
    assert samples[("noisescore_jobs", (("state", "queued"),))] == 2
    assert samples[("noisescore_jobs", (("state", "running"),))] == 1
    assert samples[("noisescore_jobs", (("state", "failed"),))] == 0
    assert samples[("noisescore_job_queue_depth", ())] == 2
    assert samples[("noisescore_onnx_inference_seconds_count", ())] == 1
    assert samples[("noisescore_onnx_batch_size_bucket", (("le", "64.0"),))] == 1
    assert samples[("noisescore_onnx_batch_size_bucket", (("le", "32.0"),))] == 0
    assert samples[("noisescore_onnx_batch_size_bucket", (("le", "4096.0"),))] == 1

    port = service.metrics_port
    service.stop(0)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_service_metrics_are_private_and_set_jobs_resets_missing_states():
    first, second = ServiceMetrics(), ServiceMetrics()
    first.observe_rpc(GET_JOB, "OK", 0.01)
    assert b'noisescore_rpc_requests_total{code="OK"' in first.exposition()
    assert b"noisescore_rpc_requests_total{" not in second.exposition()
    assert REGISTRY.get_sample_value("noisescore_job_queue_depth") is None  # not global
    first.set_jobs({"running": 3, "succeeded": 1})
    first.set_jobs({"succeeded": 2})
    text = first.exposition().decode()
    assert 'noisescore_jobs{state="running"} 0.0' in text
    assert 'noisescore_jobs{state="succeeded"} 2.0' in text


def test_metrics_http_binds_the_given_host_and_reports_bad_addresses():
    metrics = ServiceMetrics()
    server, port = metrics.start_http("127.0.0.1:0")
    try:
        assert server.server_address[0] == "127.0.0.1" and port > 0
        assert ("noisescore_job_queue_depth", ()) in scrape(port)
        other = ServiceMetrics()
        with pytest.raises(ValueError, match="cannot serve metrics on"):
            other.start_http(f"127.0.0.1:{port}")
    finally:
        metrics.stop_http()
    metrics.stop_http()  # idempotent
    assert parse_addr(":9464") == ("127.0.0.1", 9464)
    assert parse_addr("[::1]:0") == ("::1", 0)
    for bad in ("localhost", "127.0.0.1:http", "127.0.0.1:70000"):
        with pytest.raises(ValueError, match="expected host:port"):
            parse_addr(bad)


# --------------------------------------------------------------------------- health, reflection


def list_services(channel: grpc.Channel, metadata=None) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = list(stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=TIMEOUT))
    return [s.name for s in replies[0].list_services_response.service]


def test_health_and_reflection(serve, channels):
    service = serve()
    channel = channels(service.target)
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    error = rpc_error(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope")))
    assert error.code() == grpc.StatusCode.NOT_FOUND

    # A client with only the reflection protocol discovers the service and its schema.
    services = list_services(channel)
    assert SERVICE_NAME in services
    assert "grpc.health.v1.Health" in services
    assert "grpc.reflection.v1alpha.ServerReflection" in services
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)
    (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT))
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]
    ours = next(f for f in files if f.package == "noisescore.v1")
    assert ours.name == "noisescore/v1/noise_scoring.proto"
    (service_proto,) = ours.service
    methods = {m.name: m for m in service_proto.method}
    assert {"GetJob", "WatchJob", "Predict", "StreamCorrections"} <= set(methods)
    assert methods["WatchJob"].server_streaming and not methods["GetJob"].server_streaming
    assert "google/protobuf/timestamp.proto" in ours.dependency


def test_health_watch_holds_no_thread_and_is_counted_when_cancelled(serve, channels):
    # Health's Watch is a non-blocking handler: the interceptors must keep it so, or each
    # watcher (a load balancer, say) would pin one of the rpc_threads for its lifetime.
    service = serve(rpc_threads=1)
    channel = channels(service.target)
    health = health_pb2_grpc.HealthStub(channel)
    watches = [
        health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT)
        for _ in range(3)
    ]
    for watch in watches:
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    assert _get_job(channel).name == "jobs/t"  # the one thread is free
    for watch in watches:
        watch.cancel()
    method = "/grpc.health.v1.Health/Watch"
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        counted = service.metrics.registry.get_sample_value(
            "noisescore_rpc_requests_total", {"method": method, "code": "CANCELLED"}
        )
        if counted == 3:
            break
        time.sleep(0.02)
    assert counted == 3


# --------------------------------------------------------------------------- TLS


def _certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate, and a
    client certificate from another CA; EC P-256 keys (fast to make). PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    paths: dict[str, Path] = {}

    def write(name: str, key, cert) -> None:
        paths[f"{name}_key"] = directory / f"{name}.key"
        paths[f"{name}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        paths[f"{name}_cert"] = directory / f"{name}.pem"
        paths[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def build(common_name, key, issuer_name, issuer_key, *, ca=False, san=None, usage=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )  # fmt: skip
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def new_ca(name: str):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = build(name, key, subject, key, ca=True)
        write(name, key, cert)
        return key, cert

    ca_key, ca_cert = new_ca("ca")
    other_key, other_cert = new_ca("other_ca")
    server_key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = build(
        "localhost", server_key, ca_cert.subject, ca_key,
        san=san, usage=ExtendedKeyUsageOID.SERVER_AUTH,
    )  # fmt: skip
    write("server", server_key, server)
    for name, issuer_cert, issuer_key in (
        ("client", ca_cert, ca_key),
        ("stranger", other_cert, other_key),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = build(
            name, key, issuer_cert.subject, issuer_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH
        )
        write(name, key, cert)
    return paths


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    return _certificates(tmp_path_factory.mktemp("certs"))


def _get_job(channel: grpc.Channel) -> pb.Job:
    return pb_grpc.NoiseScoringStub(channel).GetJob(pb.GetJobRequest(name="jobs/t"), timeout=5)


def test_tls(serve, channels, certs):
    service = serve(tls_cert=certs["server_cert"], tls_key=certs["server_key"])
    ca = certs["ca_cert"].read_bytes()
    secure = channels(service.target, grpc.ssl_channel_credentials(root_certificates=ca))
    assert _get_job(secure).name == "jobs/t"
    by_name = channels(
        f"localhost:{service.port}", grpc.ssl_channel_credentials(root_certificates=ca)
    )
    assert _get_job(by_name).name == "jobs/t"
    error = rpc_error(lambda: _get_job(channels(service.target)))  # plaintext to a TLS port
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    untrusted = grpc.ssl_channel_credentials(root_certificates=certs["other_ca_cert"].read_bytes())
    error = rpc_error(lambda: _get_job(channels(service.target, untrusted)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_rejects_clients_without_a_certificate_from_the_ca(serve, channels, certs):
    service = serve(
        tls_cert=certs["server_cert"],
        tls_key=certs["server_key"],
        tls_client_ca=certs["ca_cert"],
    )
    ca = certs["ca_cert"].read_bytes()

    def credentials(name: str | None) -> grpc.ChannelCredentials:
        if name is None:
            return grpc.ssl_channel_credentials(root_certificates=ca)
        return grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=certs[f"{name}_key"].read_bytes(),
            certificate_chain=certs[f"{name}_cert"].read_bytes(),
        )

    assert _get_job(channels(service.target, credentials("client"))).name == "jobs/t"
    for name in (None, "stranger"):
        error = rpc_error(lambda n=name: _get_job(channels(service.target, credentials(n))))
        assert error.code() == grpc.StatusCode.UNAVAILABLE, name


def test_server_credentials_explain_unusable_files(tmp_path, certs):
    assert server_credentials(make_settings()) is None
    assert server_credentials(
        make_settings(tls_cert=certs["server_cert"], tls_key=certs["server_key"])
    ) is not None  # fmt: skip
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match=r"cannot read tls_cert .*missing\.pem"):
        server_credentials(make_settings(tls_cert=missing, tls_key=certs["server_key"]))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ValueError, match=r"tls_key .* is not a PEM file"):
        server_credentials(make_settings(tls_cert=certs["server_cert"], tls_key=garbage))
    with pytest.raises(ValueError, match="does not go with tls_cert"):
        server_credentials(make_settings(tls_cert=certs["server_cert"], tls_key=certs["ca_key"]))
    with pytest.raises(ValueError, match="cannot read tls_client_ca"):
        server_credentials(
            make_settings(
                tls_cert=certs["server_cert"], tls_key=certs["server_key"], tls_client_ca=missing
            )
        )


# --------------------------------------------------------------------------- limits, binding


def test_request_over_max_message_bytes_is_resource_exhausted(serve, channels):
    service = serve(max_message_bytes=1024)
    stub = pb_grpc.NoiseScoringStub(channels(service.target))
    assert stub.GetJob(pb.GetJobRequest(name="jobs/" + "x" * 500), timeout=TIMEOUT).name
    big = pb.GetJobRequest(name="jobs/" + "x" * 2000)
    error = rpc_error(lambda: stub.GetJob(big, timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_bind_failures_are_clear_errors(serve, channels):
    first = serve(metrics_addr="127.0.0.1:0")
    taken = make_settings(grpc_addr=f"127.0.0.1:{first.port}")
    with pytest.raises(ValueError, match=r"cannot bind the gRPC server to '127\.0\.0\.1:"):
        build_server(FakeServicer(), taken, metrics=ServiceMetrics())
    with pytest.raises(ValueError, match="expected host:port"):
        Service(FakeServicer(), make_settings(grpc_addr="127.0.0.1")).start()
    clash = Service(FakeServicer(), make_settings(metrics_addr=f"127.0.0.1:{first.metrics_port}"))
    with pytest.raises(ValueError, match="cannot serve metrics"):
        clash.start()
    assert _get_job(channels(first.target)).name == "jobs/t"  # the first is unharmed


# --------------------------------------------------------------------------- shutdown


def test_graceful_stop_drains_in_flight_calls_and_refuses_new_ones(serve, channels):
    servicer = FakeServicer(slow_seconds=1.0)
    service = serve(servicer, shutdown_grace=5.0)
    channel = channels(service.target)
    stub = pb_grpc.NoiseScoringStub(channel)
    slow = stub.SubmitCleaningJob.future(pb.SubmitCleaningJobRequest(), timeout=TIMEOUT)
    assert servicer.slow_started.wait(TIMEOUT)
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT
    )
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

    began = time.monotonic()
    stopper = threading.Thread(target=service.stop, kwargs={"grace": 5.0})
    stopper.start()
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()  # a watcher that stays would hold the drain for the whole grace

    refused = None
    deadline = time.monotonic() + 3
    while refused is None and time.monotonic() < deadline:
        try:
            _get_job(grpc.insecure_channel(service.target))
        except grpc.RpcError as error:
            refused = error
    # grpc core answers a call that reaches a stopping server CANCELLED, and one that finds
    # the listener closed UNAVAILABLE; either way it is not served.
    assert refused is not None
    assert refused.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert slow.result(timeout=TIMEOUT).name == "jobs/slow"  # the in-flight call finished
    stopper.join(TIMEOUT)
    assert not stopper.is_alive()
    assert time.monotonic() - began < 4.0  # done when drained, not after the full grace
    assert service.wait(timeout=0)
    service.stop()  # idempotent
    assert service.health is not None


def test_stop_cancels_calls_still_running_after_the_grace(serve, channels):
    servicer = FakeServicer(slow_seconds=3.0)
    service = serve(servicer)
    stub = pb_grpc.NoiseScoringStub(channels(service.target))
    slow = stub.SubmitCleaningJob.future(pb.SubmitCleaningJobRequest(), timeout=TIMEOUT)
    assert servicer.slow_started.wait(TIMEOUT)
    began = time.monotonic()
    service.stop(grace=0.2)
    assert time.monotonic() - began < 2.0
    error = rpc_error(lambda: slow.result(timeout=TIMEOUT))
    assert error.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="signals need main thread"
)
def test_serve_forever_stops_on_sigterm_and_restores_handlers():
    service = Service(FakeServicer(), make_settings(shutdown_grace=0.5))
    before = signal.getsignal(signal.SIGTERM)
    sent = threading.Event()

    def send_sigterm_once_installed() -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:  # never signal before serve_forever's handler
            if service.started and signal.getsignal(signal.SIGTERM) is not before:
                os.kill(os.getpid(), signal.SIGTERM)
                sent.set()
                return
            time.sleep(0.01)

    threading.Thread(target=send_sigterm_once_installed, daemon=True).start()
    serve_forever(service)
    assert sent.is_set()
    assert service.wait(timeout=0)
    assert signal.getsignal(signal.SIGTERM) is before


# --------------------------------------------------------------------------- health port


def test_health_port_is_plaintext_health_only_beside_a_tls_port(serve, channels, certs):
    servicer = FakeServicer(slow_seconds=1.0)
    service = serve(
        servicer,
        tls_cert=certs["server_cert"],
        tls_key=certs["server_key"],
        auth_tokens=SecretStr("s3cret"),
        health_addr="127.0.0.1:0",
        shutdown_grace=5.0,
    )
    assert service.health_port and service.health_port != service.port
    health_target = f"127.0.0.1:{service.health_port}"
    plain = channels(health_target)
    check = health_pb2_grpc.HealthStub(plain).Check
    for name in ("", SERVICE_NAME):  # plaintext, no token: what a kubelet grpc probe sends
        reply = check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # The health port carries no data: the API and reflection are not there.
    error = rpc_error(lambda: _get_job(plain))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert rpc_error(lambda: list_services(plain)).code() == grpc.StatusCode.UNIMPLEMENTED
    # The command the image's HEALTHCHECK runs, against both ports.
    from noisescore import healthcheck

    assert healthcheck.main(["--addr", health_target, "-q"]) == healthcheck.EXIT_SERVING
    assert (
        healthcheck.main(["--addr", service.target, "--tls-ca", str(certs["ca_cert"]), "-q"]) == 0
    )
    assert healthcheck.main(["--addr", service.target, "--timeout", "1", "-q"]) == 1  # no TLS

    # Draining: the health port answers NOT_SERVING until the main server has stopped.
    stub = pb_grpc.NoiseScoringStub(
        channels(
            service.target,
            grpc.ssl_channel_credentials(root_certificates=certs["ca_cert"].read_bytes()),
        )
    )
    slow = stub.SubmitCleaningJob.future(
        pb.SubmitCleaningJobRequest(), metadata=bearer("s3cret"), timeout=TIMEOUT
    )
    assert servicer.slow_started.wait(TIMEOUT)
    stopper = threading.Thread(target=service.stop, kwargs={"grace": 5.0})
    stopper.start()
    deadline = time.monotonic() + TIMEOUT
    status = health_pb2.HealthCheckResponse.SERVING
    while status == health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
        status = check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert healthcheck.main(["--addr", health_target, "-q"]) == healthcheck.EXIT_UNHEALTHY
    assert slow.result(timeout=TIMEOUT).name == "jobs/slow"
    stopper.join(TIMEOUT)
    assert not stopper.is_alive()
    assert healthcheck.main(["--addr", health_target, "--timeout", "1", "-q"]) == 1  # closed


def test_health_port_bind_failure_releases_the_main_port(serve):
    first = serve(health_addr="127.0.0.1:0")
    service = Service(FakeServicer(), make_settings(health_addr=f"127.0.0.1:{first.health_port}"))
    with pytest.raises(ValueError, match=r"cannot bind the health server to '127\.0\.0\.1:"):
        service.start()
    assert not service.started


def test_healthcheck_address_defaults_and_usage_errors(capsys):
    from noisescore import healthcheck

    assert healthcheck.default_addr({}) == "127.0.0.1:50051"
    env = {"NOISESCORE_GRPC_ADDR": "0.0.0.0:7000"}
    assert healthcheck.default_addr(env) == "127.0.0.1:7000"
    env["NOISESCORE_HEALTH_ADDR"] = "[::]:8081"
    assert healthcheck.default_addr(env) == "[::1]:8081"
    assert healthcheck.default_addr({"NOISESCORE_HEALTH_ADDR": "10.1.2.3:8081"}) == "10.1.2.3:8081"
    with pytest.raises(ValueError, match="not host:port"):
        healthcheck.default_addr({"NOISESCORE_GRPC_ADDR": "localhost"})
    missing = "/nonexistent/ca.pem"
    assert healthcheck.main(["--addr", "127.0.0.1:1", "--tls-ca", missing]) == 2
    assert "No such file" in capsys.readouterr().err


def test_client_verifies_a_tls_server_name_other_than_the_address(serve, certs):
    """What a `kubectl port-forward` needs: dial 127.0.0.1, verify the certificate's name."""
    from noisescore import healthcheck
    from noisescore.client import NoiseScoringClient

    service = serve(tls_cert=certs["server_cert"], tls_key=certs["server_key"])
    target, ca = f"127.0.0.1:{service.port}", certs["ca_cert"]
    with NoiseScoringClient(target, tls_ca=ca, tls_server_name="localhost", timeout=5) as c:
        assert c.stub.GetJob(pb.GetJobRequest(name="jobs/t"), timeout=5).name == "jobs/t"
    with NoiseScoringClient(target, tls_ca=ca, tls_server_name="noisescore.ns.svc", timeout=5) as c:
        error = rpc_error(lambda: c.stub.GetJob(pb.GetJobRequest(name="jobs/t"), timeout=5))
        assert error.code() == grpc.StatusCode.UNAVAILABLE  # the certificate does not name it
    probe = ["--addr", target, "--tls-ca", str(ca), "--timeout", "2", "-q"]
    assert healthcheck.main([*probe, "--tls-server-name", "localhost"]) == 0
    assert healthcheck.main([*probe, "--tls-server-name", "noisescore.ns.svc"]) == 1
    with pytest.raises(ValueError, match="tls_server_name needs tls_ca"):
        NoiseScoringClient(target, tls_server_name="localhost")
