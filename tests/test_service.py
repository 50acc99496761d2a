"""The gRPC service end to end: a real server on a free loopback port, the generated stubs,
a real BreastMNIST job produced by the clean-labels flow, jobs run by the service."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from noisescore.client import NoiseScoringClient
from noisescore.jobs import LEASE, JobStore, Lease
from noisescore.ml.data import load_dataset
from noisescore.ml.export import ProbabilityModel, load_session
from noisescore.service.app import App, create_app
from noisescore.service.jobs import RECORD, JobRecord
from noisescore.settings import CleanSettings, ServiceSettings
from noisescore.storage import LocalStore
from noisescore.v1 import noise_scoring_pb2 as pb

pytestmark = [pytest.mark.usefixtures("prefect_api"), pytest.mark.slow]

JOB = "svc-job"
N_TRAIN = 546
TOKEN = "test-token-0123456789"
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def _settings(**overrides: Any) -> ServiceSettings:
    base: dict[str, Any] = {"grpc_addr": "127.0.0.1:0", "metrics_addr": "127.0.0.1:0"}
    return ServiceSettings(**{**base, **overrides})


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A store holding one finished BreastMNIST job made by the clean-labels flow."""
    from noisescore.flows.clean_labels import clean_labels

    root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("NOISESCORE_S3_ENDPOINT", raising=False)
        mp.setenv("NOISESCORE_STORE_DIR", str(root))
        settings = CleanSettings(
            dataset="medmnist://breastmnist", data_dir=data_dir, noise="uniform:0.5",
            epochs=12, warmup_epochs=10, seed=0, device="cpu",
        )  # fmt: skip
        state = clean_labels(settings=settings, job_id=JOB, return_state=True)
    assert state.is_completed(), state.message
    return root


@pytest.fixture(scope="module")
def app(store_dir: Path, data_dir: Path) -> Iterator[App]:
    service = create_app(
        _settings(), store=LocalStore(store_dir), job_env={"NOISESCORE_DATA_DIR": str(data_dir)}
    ).start()
    try:
        yield service
    finally:
        service.stop(grace=1)


@pytest.fixture(scope="module")
def client(app: App) -> Iterator[NoiseScoringClient]:
    with NoiseScoringClient(f"127.0.0.1:{app.port}") as c:
        yield c


@pytest.fixture(scope="module")
def test_images(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    test = load_dataset("breastmnist", data_dir=data_dir).test
    assert test is not None
    return test.images[:64], test.labels[:64]


def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    err = info.value
    assert "Traceback" not in (err.details() or "")
    return err.code(), err.details() or ""


# --------------------------------------------------------------------------- happy paths


def test_get_and_list_a_finished_job(client: NoiseScoringClient) -> None:
    job = client.get(JOB)
    assert job.name == f"jobs/{JOB}" and job.state == pb.Job.SUCCEEDED
    assert job.spec.dataset_uri == "medmnist://breastmnist"
    assert (job.spec.epochs, job.spec.warmup_epochs) == (12, 10)
    assert (job.spec.noise.kind, job.spec.noise.rate) == ("uniform", 0.5)
    r = job.result
    assert (r.n_train, r.n_classes) == (N_TRAIN, 2)
    assert 0 < r.n_flagged < N_TRAIN and 0.0 < r.otsu_threshold <= 1.0
    assert r.HasField("detection_auroc") and r.detection_auroc > 0.6
    assert 0.0 < r.suspect_cutoff < 1.0
    assert job.artifacts_uri.endswith(f"/jobs/{JOB}/")
    assert JOB in [j.name.removeprefix("jobs/") for j in client.list(state="SUCCEEDED")]


def test_corrections_pages_stream_and_flags(client: NoiseScoringClient) -> None:
    stub, job = client.stub, f"jobs/{JOB}"
    rows, token = [], ""
    while True:
        page = stub.GetCorrections(
            pb.GetCorrectionsRequest(job=job, page_size=200, page_token=token)
        )
        assert page.total_size == N_TRAIN
        rows += page.corrections
        token = page.next_page_token
        if not token:
            break
    assert [r.index for r in rows] == list(range(N_TRAIN))
    streamed = list(client.corrections(job))
    assert streamed == rows
    flagged = list(client.corrections(job, only_flagged=True))
    assert flagged == [r for r in rows if r.flagged]
    assert client.get(job).result.n_flagged == len(flagged)
    assert all((r.corrected_label == r.observed_label) for r in rows if not r.flagged)
    assert rows[0].sample_id == "train/0"


def test_predict_matches_the_onnx_model(
    client: NoiseScoringClient, store_dir: Path, test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = test_images
    probabilities = client.predict(JOB, list(images))
    session = load_session(JobStore(LocalStore(store_dir), JOB).get("model.onnx"))
    expected = session.run(["probabilities"], {"images": images.astype(np.float32)})[0]
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    # Encoded PNGs give the same answer as tensors.
    pngs = []
    for image in images[:4]:
        buffer = io.BytesIO()
        Image.fromarray(image[0]).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    np.testing.assert_allclose(client.predict(JOB, pngs), expected[:4], atol=1e-6)


def test_score_labels_flags_wrong_labels(
    client: NoiseScoringClient, test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = test_images
    right = client.score(
        JOB, list(images), labels.tolist(), sample_ids=[f"t{i}" for i in range(64)]
    )
    wrong = client.score(JOB, list(images), (1 - labels).tolist())
    cutoff = right.suspect_cutoff
    assert cutoff == client.get(JOB).result.suspect_cutoff
    q_right = np.array([s.label_quality for s in right.scores])
    q_wrong = np.array([s.label_quality for s in wrong.scores])
    np.testing.assert_allclose(q_right + q_wrong, 1.0, atol=1e-5)  # two classes
    assert [s.sample_id for s in right.scores] == [f"t{i}" for i in range(64)]
    assert all(s.suspect == (s.label_quality < cutoff) for s in right.scores)
    # Flipped labels look worse than the given ones, on average and by suspicion.
    assert q_wrong.mean() < q_right.mean()
    assert sum(s.suspect for s in wrong.scores) > sum(s.suspect for s in right.scores)


def test_watch_a_finished_job_ends(client: NoiseScoringClient) -> None:
    events = list(client.watch(JOB, timeout=30))
    assert events[0].state == pb.Job.SUCCEEDED


def test_health_and_reflection_without_stubs(app: App) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "noisescore.v1.NoiseScoring"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(reflection.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in reply.list_services_response.service}
        assert {"noisescore.v1.NoiseScoring", "grpc.health.v1.Health"} <= names


# --------------------------------------------------------------------------- jobs


def test_submit_runs_the_flow_and_idempotency(client: NoiseScoringClient, store_dir: Path) -> None:
    kwargs: dict[str, Any] = dict(
        epochs=2, warmup_epochs=1, seed=1, noise="symmetric:0.2", device="cpu",
        idempotency_key="svc-test-key",
    )  # fmt: skip
    job = client.submit("medmnist://breastmnist", **kwargs)
    assert job.state in (pb.Job.QUEUED, pb.Job.RUNNING)
    again = client.submit("medmnist://breastmnist", **kwargs)
    assert again.name == job.name  # same key, same job
    states = [e.state for e in client.watch(job.name, timeout=300)]
    assert states[-1] == pb.Job.SUCCEEDED, client.get(job.name).error
    assert pb.Job.RUNNING in states
    done = client.get(job.name)
    assert done.result.n_train == N_TRAIN and done.HasField("end_time")
    assert sum(1 for _ in client.corrections(done.name)) == N_TRAIN
    # A restarted service answers for the job submitted to the previous one.
    restarted = create_app(_settings(metrics_addr=None), store=LocalStore(store_dir)).start()
    try:
        with NoiseScoringClient(f"127.0.0.1:{restarted.port}") as c:
            assert c.get(done.name) == done
            assert (
                sum(1 for _ in c.corrections(done.name, only_flagged=True)) == done.result.n_flagged
            )
    finally:
        restarted.stop(grace=1)


def test_cancel_a_running_job(client: NoiseScoringClient) -> None:
    job = client.submit("medmnist://breastmnist", epochs=200, warmup_epochs=10, device="cpu")
    deadline = time.monotonic() + 120
    while client.get(job.name).state != pb.Job.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # A deadline is honoured: the watch of a running job ends with DEADLINE_EXCEEDED.
    code, _ = _code(lambda: client.watch(job.name, timeout=1.0))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    cancelled = client.cancel(job.name)
    deadline = time.monotonic() + 60
    while cancelled.state != pb.Job.CANCELLED:
        assert time.monotonic() < deadline, cancelled
        time.sleep(0.2)
        cancelled = client.get(job.name)
    assert "cancelled" in cancelled.error
    code, details = _code(lambda: client.corrections(job.name))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "CANCELLED" in details


def test_a_failing_job_says_why(client: NoiseScoringClient) -> None:
    job = client.submit("medmnist://nosuchmnist", epochs=1, warmup_epochs=1)
    states = [e.state for e in client.watch(job.name, timeout=120)]
    assert states[-1] == pb.Job.FAILED
    error = client.get(job.name).error
    assert "nosuchmnist" in error and "Traceback" not in error


def test_getjob_gives_a_bare_dataset_name_as_a_uri(client: NoiseScoringClient) -> None:
    """A job submitted with a bare name reads back in the URI form the proto documents."""
    job = client.submit("NoSuchMNIST", epochs=1, warmup_epochs=1)  # fails fast: no training
    assert job.spec.dataset_uri == "medmnist://nosuchmnist"
    assert client.get(job.name).spec.dataset_uri == "medmnist://nosuchmnist"
    listed = {j.name: j.spec.dataset_uri for j in client.list()}
    assert listed[job.name] == "medmnist://nosuchmnist"
    states = [e.state for e in client.watch(job.name, timeout=120)]
    assert states[-1] == pb.Job.FAILED


# --------------------------------------------------------------------------- errors


def test_error_codes(
    client: NoiseScoringClient, test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    stub, submit, breast = client.stub, client.submit, "medmnist://breastmnist"
    images = test_images[0]
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    corrections = pb.GetCorrectionsRequest(job=f"jobs/{JOB}", page_size=-1)
    cases: list[tuple[Any, grpc.StatusCode, str]] = [
        (lambda: stub.GetJob(pb.GetJobRequest(name="nope")), invalid, "jobs/{job_id}"),
        (lambda: stub.GetJob(pb.GetJobRequest(name="")), invalid, "required"),
        (lambda: stub.GetJob(pb.GetJobRequest(name="jobs/Bad_ID")), invalid, "job id"),
        (lambda: stub.GetJob(pb.GetJobRequest(name="jobs/missing")), not_found, "missing"),
        (lambda: submit("http://x/y.npz"), invalid, "scheme 'http'"),
        (lambda: submit(""), invalid, "dataset_uri is required"),
        (lambda: submit(breast, epochs=2, warmup_epochs=5), invalid, "warmup_epochs"),
        (lambda: submit(breast, noise="gaussian:0.1"), invalid, "noise.kind"),
        (lambda: submit(breast, noise="uniform:1.5"), invalid, "noise.rate"),
        (lambda: submit(breast, model="no_such_net"), invalid, "no_such_net"),
        (lambda: submit(breast, detectors=["linc", "vog"]), invalid, "valid detectors: linc, aum"),
        (lambda: submit(breast, detectors=["linc"], flag_by="aum"), invalid, "flag_by"),
        (lambda: submit(breast, cl_folds=-1), invalid, "cl_folds"),
        (lambda: submit(breast, cl_folds=1), invalid, "cl_folds"),
        (lambda: stub.ListJobs(pb.ListJobsRequest(page_size=5000)), invalid, "page_size"),
        (lambda: stub.ListJobs(pb.ListJobsRequest(page_token="garbage")), invalid, "page_token"),
        (lambda: stub.GetCorrections(corrections), invalid, "page_size"),
        (lambda: client.score(JOB, list(images[:2]), [0, 7]), invalid, "label"),
        (lambda: client.score(JOB, [], []), invalid, "empty"),
        (lambda: client.predict(JOB, [np.zeros((3, 28, 28), np.uint8)]), invalid, "channel"),
        (lambda: client.predict(JOB, [np.zeros((1, 20, 28), np.uint8)]), invalid, "28"),
        (lambda: client.predict(JOB, [b"not an image"]), invalid, "images[0]"),
        (lambda: client.predict("jobs/missing", list(images[:1])), not_found, "missing"),
        (lambda: client.predict(JOB, [images[0]] * 1025), RESOURCE_EXHAUSTED, "1024"),
    ]  # fmt: skip
    for call, expected, needle in cases:
        code, details = _code(call)
        assert code == expected, (needle, code, details)
        assert needle.lower() in details.lower(), (needle, details)


def test_unfinished_job_is_a_failed_precondition(
    client: NoiseScoringClient, store_dir: Path
) -> None:
    record = JobRecord(
        "queued-elsewhere", "QUEUED", {"dataset": "medmnist://breastmnist"}, "2026-01-01T00:00:00Z"
    )
    job = JobStore(LocalStore(store_dir), record.job_id)
    # Queued by a live process (this one holds its lease), so it stays QUEUED.
    job.put(LEASE, Lease.of_process(record.job_id, os.getpid(), 60).to_bytes())
    job.put(RECORD, record.to_bytes())
    code, details = _code(lambda: client.corrections(record.job_id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "QUEUED" in details


def test_auth(store_dir: Path) -> None:
    app = create_app(_settings(auth_tokens=TOKEN), store=LocalStore(store_dir)).start()
    try:
        target = f"127.0.0.1:{app.port}"
        with NoiseScoringClient(target) as anonymous:
            code, details = _code(lambda: anonymous.get(JOB))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer" in details.lower()
            code, _ = _code(lambda: anonymous.corrections(JOB))
            assert code == grpc.StatusCode.UNAUTHENTICATED
        with NoiseScoringClient(target, token="wrong") as wrong:
            assert _code(lambda: wrong.get(JOB))[0] == grpc.StatusCode.UNAUTHENTICATED
        with NoiseScoringClient(target, token=TOKEN) as good:
            assert good.get(JOB).state == pb.Job.SUCCEEDED
        with grpc.insecure_channel(target) as channel:  # health needs no token
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        app.stop(grace=1)


def test_restart_keeps_finished_jobs_and_fails_orphans(store_dir: Path) -> None:
    orphan = JobRecord(
        "orphan-job", "RUNNING", {"dataset": "medmnist://breastmnist"}, "2026-01-01T00:00:00Z",
        start_time="2026-01-01T00:00:01Z", owner="a-service-that-died",
    )  # fmt: skip
    JobStore(LocalStore(store_dir), orphan.job_id).put(RECORD, orphan.to_bytes())
    app = create_app(_settings(), store=LocalStore(store_dir)).start()
    try:
        with NoiseScoringClient(f"127.0.0.1:{app.port}") as c:
            assert c.get(JOB).state == pb.Job.SUCCEEDED
            assert sum(1 for _ in c.corrections(JOB)) == N_TRAIN
            failed = c.get("orphan-job")
            assert failed.state == pb.Job.FAILED
            assert "service stopped while the job was running" in failed.error
    finally:
        app.stop(grace=1)
    stored = JobRecord.from_bytes(
        JobStore(LocalStore(store_dir), "orphan-job").get(RECORD, verify=False)
    )
    assert stored.state == "FAILED"


# --------------------------------------------------------------------------- robustness


def _methods() -> dict[str, tuple[str, type, bool]]:
    service = pb.DESCRIPTOR.services_by_name["NoiseScoring"]
    classes = {
        m.full_name: getattr(pb, m.name) for m in pb.DESCRIPTOR.message_types_by_name.values()
    }
    return {
        m.name: (
            f"/noisescore.v1.NoiseScoring/{m.name}",
            classes[m.input_type.full_name],
            m.server_streaming,
        )
        for m in service.methods
    }


def test_fuzz_random_and_malformed_requests_keep_the_server_healthy(app: App) -> None:
    rng = np.random.default_rng(0)
    allowed = {
        grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
    }  # fmt: skip
    names = [f"jobs/{JOB}", "jobs/missing", "", "jobs/", "x" * 300, "jobs/../etc", "jobs/a\x00b"]
    seen: dict[grpc.StatusCode, int] = {}
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        methods = _methods()
        for i in range(2000):
            name = list(methods)[i % len(methods)]
            path, request_class, server_streaming = methods[name]
            if name in ("SubmitCleaningJob",) and i % 3:
                continue  # a valid random spec would start real jobs: covered with bad specs only
            if i % 2:  # raw random bytes: usually not a valid message at all
                payload = rng.bytes(int(rng.integers(0, 200)))
            else:  # a structurally valid message with hostile values
                payload = _hostile(request_class, rng, names).SerializeToString()
            if name == "SubmitCleaningJob" and i % 2 == 0:
                payload = pb.SubmitCleaningJobRequest(
                    spec=pb.CleaningJobSpec(dataset_uri="gs://x")
                ).SerializeToString()
            call = (channel.unary_stream if server_streaming else channel.unary_unary)(
                path, request_serializer=None, response_deserializer=None
            )
            try:
                result = call(payload, timeout=10)
                if server_streaming:
                    for _ in result:
                        pass
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
                assert "Traceback" not in (err.details() or ""), err.details()
            assert code in allowed, (name, code)
            seen[code] = seen.get(code, 0) + 1
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 500


def _hostile(request_class: type, rng: np.random.Generator, names: list[str]) -> Any:
    message = request_class()
    for field in message.DESCRIPTOR.fields:
        if field.name in ("name", "job"):
            setattr(message, field.name, names[int(rng.integers(len(names)))])
        elif field.name in ("page_size", "chunk_size"):
            setattr(message, field.name, int(rng.choice([-5, 0, 1, 3, 100_001, 2**31 - 1])))
        elif field.name == "page_token":
            setattr(message, field.name, rng.bytes(8).hex())
        elif field.name in ("samples", "images"):
            for _ in range(int(rng.integers(0, 4))):
                item = getattr(message, field.name).add()
                image = item.image if field.name == "samples" else item
                if rng.random() < 0.5:
                    image.encoded = rng.bytes(int(rng.integers(0, 64)))
                else:
                    shape = [int(x) for x in rng.integers(-2, 40, size=int(rng.integers(0, 5)))]
                    image.tensor.shape.extend(shape)
                    image.tensor.data = rng.bytes(int(rng.integers(0, 3000)))
                if field.name == "samples":
                    item.label = int(rng.integers(-3, 5))
    return message


def test_concurrent_clients_get_no_errors(
    app: App, test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = test_images
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            with NoiseScoringClient(f"127.0.0.1:{app.port}") as c:
                for _ in range(5):
                    if k % 2:
                        response = c.score(JOB, list(images[:16]), labels[:16].tolist())
                        assert len(response.scores) == 16
                    else:
                        page = c.stub.GetCorrections(
                            pb.GetCorrectionsRequest(job=f"jobs/{JOB}", page_size=546)
                        )
                        assert len(page.corrections) == N_TRAIN
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]


def test_metrics_endpoint(app: App, client: NoiseScoringClient) -> None:
    import urllib.request

    client.get(JOB)
    _code(lambda: client.get("missing"))
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{app.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    assert (
        'noisescore_rpc_requests_total{code="OK",method="/noisescore.v1.NoiseScoring/GetJob"}'
        in body
    )
    assert 'code="NOT_FOUND"' in body
    assert "noisescore_onnx_inference_seconds_bucket" in body
    assert "noisescore_jobs{" in body


def test_torch_reference_for_the_onnx_contract(store_dir: Path) -> None:
    """model.pt and model.onnx of the job agree (what Predict serves is what was trained)."""
    import torch

    from noisescore.ml.models import create_model

    job = JobStore(LocalStore(store_dir), JOB)
    ckpt = torch.load(io.BytesIO(job.get("model.pt")), map_location="cpu", weights_only=True)
    model = create_model(ckpt["model"], num_classes=2, in_chans=1, img_size=28)
    model.load_state_dict(ckpt["state_dict"])
    wrapped = ProbabilityModel(model, mean=ckpt["mean"], std=ckpt["std"])
    x = torch.rand(4, 1, 28, 28) * 255
    with torch.no_grad():
        expected = wrapped(x)[0].numpy()
    got = load_session(job.get("model.onnx")).run(["probabilities"], {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert json.loads(job.get("report.json"))["linc"]["suspect_cutoff"] > 0


# --------------------------------------------------------------------------- CLI verbs


def test_cli_verbs_against_the_server(
    app: App, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    test_images: tuple[np.ndarray, np.ndarray],
) -> None:  # fmt: skip
    from noisescore.cli import main

    server = ["--server", f"127.0.0.1:{app.port}"]
    assert main(["jobs", "get", JOB, *server]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "SUCCEEDED" and shown["name"] == f"jobs/{JOB}"
    assert main(["jobs", "list", "--state", "SUCCEEDED", *server]) == 0
    assert f"jobs/{JOB}\tSUCCEEDED" in capsys.readouterr().out
    assert main(["corrections", JOB, "--only-flagged", *server]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "index,sample_id,observed_label,trust,flagged,corrected_label"
    assert all(line.split(",")[4] == "1" for line in lines[1:]) and len(lines) > 1
    assert main(["corrections", JOB, "--detector-scores", *server]) == 0
    full = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert full[0][:6] == lines[0].split(",") and {"consensus", "linc", "aum"} <= set(full[0])
    linc = full[0].index("linc")
    assert all(row[linc] == row[3] for row in full[1:]) and len(full) == N_TRAIN + 1
    images, labels = test_images
    manifest = tmp_path / "new.csv"
    rows = ["path,label"]
    for i in range(3):
        Image.fromarray(images[i][0]).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{int(labels[i])}")
    manifest.write_text("\n".join(rows) + "\n")
    assert main(["score", JOB, "--manifest", str(manifest), *server]) == 0
    scored = capsys.readouterr().out.strip().splitlines()
    assert scored[0].startswith("sample_id,label,label_quality") and len(scored) == 4
    assert main(["jobs", "get", "missing", *server]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(["score", JOB, "nothing.png=1", *server]) == 2
    assert "not found" in capsys.readouterr().err


@contextlib.contextmanager
def _serving(command: list[str], env: dict[str, str]) -> Iterator[tuple[subprocess.Popen, str]]:
    """Start a `noisescore serve` process; yield it and its first line (the bound ports).
    Killed at the end if the test did not stop it."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        assert line.startswith("noisescore serving gRPC on 127.0.0.1:"), line
        yield process, line
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _port(line: str, after: str = "gRPC on 127.0.0.1:") -> int:
    return int(line.split(after, 1)[1].split(",")[0])


def test_serve_command_starts_and_stops_on_sigterm(store_dir: Path) -> None:
    env = {**os.environ, "NOISESCORE_STORE_DIR": str(store_dir), "NOISESCORE_S3_ENDPOINT": ""}
    command = [
        str(Path(sys.executable).parent / "noisescore"), "serve",
        "--grpc-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0",
    ]  # fmt: skip
    with _serving(command, env) as (process, line):
        with NoiseScoringClient(f"127.0.0.1:{_port(line)}") as c:
            assert c.get(JOB).state == pb.Job.SUCCEEDED
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def test_storage_down_is_unavailable(tmp_path: Path) -> None:
    from conftest import S3Server

    from noisescore.storage import open_store

    server = S3Server(tmp_path / "s3").start()
    try:
        app = create_app(_settings(metrics_addr=None), store=open_store(server.settings())).start()
        try:
            with NoiseScoringClient(f"127.0.0.1:{app.port}") as c:
                assert list(c.list()) == []
                server.stop()
                code, details = _code(lambda: c.get("some-job"))
                assert code == grpc.StatusCode.UNAVAILABLE and "unreachable" in details
                assert _code(lambda: list(c.list()))[0] == grpc.StatusCode.UNAVAILABLE
                code, _ = _code(
                    lambda: c.submit("medmnist://breastmnist", epochs=1, warmup_epochs=1)
                )
                assert code == grpc.StatusCode.UNAVAILABLE
        finally:
            app.stop(grace=1)
    finally:
        server.stop()


# ------------------------------------------------------------- the service image's install

# The service image installs `noisescore[cpu]`: no `train` extra. Its distributions are
# made unimportable in a child process (``sys.modules[name] = None``: `import` fails and
# `importlib.util.find_spec` says "not installed"), which then serves a real job.
_LAUNCHER = """
import importlib.util, sys
blocked = sys.argv[1].split(",")
for name in blocked:
    sys.modules[name] = None
assert all(importlib.util.find_spec(name) is None for name in blocked)
from noisescore.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _train_only_modules() -> list[str]:
    """Top-level import names of the `train` extra's distributions (torch, timm, sklearn...)
    that neither the core dependencies nor the `cpu` extra bring in."""
    import importlib.metadata as md
    import re
    import tomllib

    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}

    extras = project["optional-dependencies"]
    train = names(extras["train"])
    service = names(project["dependencies"]) | names(extras["cpu"])
    assert train and not (train & service), "the service install must not pull training deps"
    modules = {
        module
        for module, dists in md.packages_distributions().items()
        if any(d.lower().replace("_", "-") in train for d in dists) and not module.startswith("_")
    }
    assert {"torch", "timm", "torchvision", "sklearn", "scipy", "onnx"} <= modules
    return sorted(modules)


def test_the_service_install_serves_without_the_training_runtime(
    store_dir: Path, test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    blocked = _train_only_modules()
    env = {
        **os.environ, "NOISESCORE_STORE_DIR": str(store_dir), "NOISESCORE_S3_ENDPOINT": "",
        "NOISESCORE_JOB_RUNNER": "local", "NOISESCORE_METRICS_ADDR": "",
    }  # fmt: skip
    command = [
        sys.executable, "-c", _LAUNCHER, ",".join(blocked), "serve",
        "--grpc-addr", "127.0.0.1:0", "--health-addr", "127.0.0.1:0",
    ]  # fmt: skip
    with _serving(command, env) as (process, line):
        port, health_port = _port(line), _port(line, "health on 127.0.0.1:")
        probe = [sys.executable, "-m", "noisescore.healthcheck", "--addr"]
        done = subprocess.run([*probe, f"127.0.0.1:{health_port}"], capture_output=True)
        assert done.returncode == 0 and b"SERVING" in done.stdout, done

        images, labels = test_images
        with NoiseScoringClient(f"127.0.0.1:{port}") as c:
            assert c.get(JOB).state == pb.Job.SUCCEEDED
            assert len(list(c.corrections(JOB))) == N_TRAIN
            assert c.predict(JOB, list(images[:8])).shape == (8, 2)
            scores = c.score(JOB, list(images[:8]), labels[:8].tolist()).scores
            assert len(scores) == 8
            # Jobs cannot run here: refused up front, with where they can run instead.
            code, details = _code(
                lambda: c.submit("medmnist://breastmnist", epochs=2, warmup_epochs=1)
            )
            assert code == grpc.StatusCode.FAILED_PRECONDITION, details
            assert "torch" in details and "PREFECT_API_URL" in details
            # Model names are still checked (syntax only without timm).
            code, details = _code(lambda: c.submit("medmnist://breastmnist", model="Res Net"))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "model" in details
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        done = subprocess.run([*probe, f"127.0.0.1:{health_port}", "--timeout", "1"])
        assert done.returncode == 1


# --------------------------------------------------------------------------- detectors


def test_corrections_carry_every_detector_score(client: NoiseScoringClient) -> None:
    from noisescore.ml.detector_names import DETECTOR_NAMES

    result = client.get(JOB).result
    assert list(result.detectors) == [*DETECTOR_NAMES, "consensus"]
    assert result.flagged_by == "linc" and result.HasField("bimodality")
    assert set(result.detector_auroc) == {*DETECTOR_NAMES, "consensus"}
    assert all(0.5 < v <= 1 for v in result.detector_auroc.values())
    # The default (BASIC) view leaves them out: they make every row ~8x larger.
    assert all(not r.detector_scores for r in client.corrections(f"jobs/{JOB}"))
    rows = list(client.corrections(f"jobs/{JOB}", detector_scores=True))
    page = client.stub.GetCorrections(
        pb.GetCorrectionsRequest(job=f"jobs/{JOB}", page_size=3, view=pb.CORRECTION_VIEW_FULL)
    ).corrections
    assert [dict(r.detector_scores) for r in page] == [dict(r.detector_scores) for r in rows[:3]]
    code, details = _code(
        lambda: client.stub.GetCorrections(pb.GetCorrectionsRequest(job=f"jobs/{JOB}", view=7))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "CORRECTION_VIEW_FULL" in details
    expected = {*DETECTOR_NAMES, "consensus", "datamaps_variability", "data_iq_aleatoric"}
    assert expected <= set(rows[0].detector_scores)
    assert all(r.detector_scores["linc"] == r.trust for r in rows)
    assert len({r.detector_scores["consensus"] for r in rows}) > 10  # real per-sample values


def test_a_job_published_before_detectors_is_still_served(
    client: NoiseScoringClient, store_dir: Path
) -> None:
    """trust.csv and report.json exactly as noisescore wrote them before the detectors."""
    store = LocalStore(store_dir)
    new, old = JobStore(store, JOB), JobStore(store, "pre-detectors")
    manifest = new.read_manifest()
    refs = []
    for name in manifest["files"]:
        data = new.get(name)
        if name == "trust.csv":
            lines = [",".join(line.split(",")[:7]) for line in data.decode().splitlines()]
            data = ("\n".join(lines) + "\n").encode()
        elif name == "report.json":
            report = json.loads(data)
            del report["detectors"]
            for key in ("flag_by", "relabelled", "bimodality"):
                del report["linc"][key]
            data = json.dumps(report).encode()
        refs.append(old.put(name, data))
    extra = {k: v for k, v in manifest.items() if k not in ("format", "job_id", "created", "files")}
    old.write_manifest(refs, **extra)
    assert old.get("trust.csv").decode().splitlines()[0] == (
        "index,sample_id,observed_label,trust,flagged,corrected_label,true_label"
    )
    job = client.get("pre-detectors")
    assert job.state == pb.Job.SUCCEEDED and list(job.result.detectors) == []
    assert job.result.flagged_by == "linc" and not job.result.correction_skipped
    assert not job.result.HasField("bimodality") and not job.result.detector_auroc
    rows = list(client.corrections("jobs/pre-detectors", detector_scores=True))
    current = list(client.corrections(f"jobs/{JOB}"))
    assert len(rows) == N_TRAIN and all(not r.detector_scores for r in rows)
    assert [(r.trust, r.flagged, r.corrected_label) for r in rows] == [
        (r.trust, r.flagged, r.corrected_label) for r in current
    ]


def test_a_spec_chooses_detectors_and_what_flags() -> None:
    """The job spec's detector fields become the job's settings and come back in GetJob."""
    from noisescore.service.servicer import settings_to_spec, spec_to_settings_fields

    spec = pb.CleaningJobSpec(
        dataset_uri="medmnist://breastmnist", detectors=["linc", "aum"], flag_by="aum", cl_folds=3
    )
    fields = spec_to_settings_fields(spec)
    assert (fields["detectors"], fields["flag_by"], fields["cl_folds"]) == ("linc,aum", "aum", 3)
    assert settings_to_spec(fields, "") == spec
    default = spec_to_settings_fields(pb.CleaningJobSpec(dataset_uri="medmnist://breastmnist"))
    assert not {"detectors", "flag_by", "cl_folds"} & set(default)
    assert list(settings_to_spec(default, "").detectors) == []
