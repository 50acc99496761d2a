"""Budgets of the service against a REAL gRPC server (the asyncio server, the real
NoiseScoringServicer and its WatchJob, a real ONNX model in a real LocalStore): watches
hold no RPC thread and are capped, health tells a saturated API, images are bounded by
decoded pixels per request and per process, and request strings are capped.

The job *state* comes from :class:`HeldJobs`, a fixed table of records (the job manager
has its own tests): what is under test here is the server around it.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image, ImageFile

from noisescore.jobs import JobStore
from noisescore.ml.export import export_onnx
from noisescore.ml.models import create_model
from noisescore.service.inference import (
    EncodedImage,
    InputError,
    ModelInfo,
    OverBudget,
    open_images,
)
from noisescore.service.jobs import JobNotFound, JobRecord
from noisescore.service.server import SERVICE_NAME, Service
from noisescore.service.servicer import ECHO_CHARS, STRING_CAPS, NoiseScoringServicer
from noisescore.settings import ServiceSettings
from noisescore.storage import LocalStore
from noisescore.v1 import noise_scoring_pb2 as pb
from noisescore.v1 import noise_scoring_pb2_grpc as pb_grpc

TIMEOUT = 10.0
RUNNING_JOB = "running-job"
DONE_JOB = "done-job"
IMG_SIZE = 28
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HeldJobs:
    """Fixed job records over a real store: RUNNING_JOB never ends, DONE_JOB succeeded,
    ``block`` is queued."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store
        self.records = {
            job_id: JobRecord(job_id, state, {"dataset": "medmnist://breastmnist"}, "2026-01-01")
            for job_id, state in (
                (RUNNING_JOB, "RUNNING"),
                (DONE_JOB, "SUCCEEDED"),
                ("block", "QUEUED"),
            )
        }

    def get(self, job_id: str) -> JobRecord:
        try:
            return self.records[job_id]
        except KeyError:
            raise JobNotFound(f"job {job_id} not found") from None

    def progress(self, job_id: str) -> dict:
        return {}


class BlockingServicer(NoiseScoringServicer):
    """The real servicer, but ``GetJob`` of ``jobs/block`` waits for ``release``: a call
    that holds an RPC thread for as long as the test wants."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.blocked = threading.Semaphore(0)

    def GetJob(self, request, context):
        if request.name == "jobs/block":
            self.blocked.release()
            self.release.wait(TIMEOUT * 3)
        return super().GetJob(request, context)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> LocalStore:
    """A store with DONE_JOB's model (a small untrained CNN exported to ONNX)."""
    import torch

    root: Path = tmp_path_factory.mktemp("budget-store")
    torch.manual_seed(0)
    model = create_model("noisescore_cnn", num_classes=2, in_chans=1, img_size=IMG_SIZE).eval()
    onnx = export_onnx(
        model,
        model_name="noisescore_cnn",
        num_classes=2,
        in_chans=1,
        img_size=IMG_SIZE,
        mean=[0.5],
        std=[0.25],
    )
    store = LocalStore(root)
    job = JobStore(store, DONE_JOB)
    job.write_manifest([job.put("model.onnx", onnx)])
    return store


@pytest.fixture
def serve(store: LocalStore) -> Iterator[Callable[..., tuple[Service, BlockingServicer]]]:
    started: list[Service] = []

    def start(servicer_options: dict | None = None, **settings) -> tuple[Service, BlockingServicer]:
        servicer = BlockingServicer(HeldJobs(store), **(servicer_options or {}))
        values = dict(grpc_addr="127.0.0.1:0", metrics_addr=None, rpc_threads=2)
        values.update(settings)
        service = Service(servicer, ServiceSettings(**values)).start()
        started.append(service)
        return service, servicer

    yield start
    for service in started:
        service.stop(0)


@pytest.fixture
def channels() -> Iterator[Callable[[str], grpc.Channel]]:
    opened: list[grpc.Channel] = []

    def open_channel(target: str) -> grpc.Channel:
        opened.append(grpc.insecure_channel(target))
        return opened[-1]

    yield open_channel
    for channel in opened:
        channel.close()


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def health_status(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT).status


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --------------------------------------------------------------------------- watches


def test_open_watches_hold_no_rpc_thread(serve, channels):
    # 40 watches on a server with 2 RPC threads: the thread-pool server answered the 9th
    # RESOURCE_EXHAUSTED and nothing else once 2 were open.
    service, _ = serve(rpc_threads=2)
    stub = pb_grpc.NoiseScoringStub(channels(service.target))
    watches = [
        stub.WatchJob(pb.WatchJobRequest(name=f"jobs/{RUNNING_JOB}"), timeout=60) for _ in range(40)
    ]
    try:
        for watch in watches:
            assert next(watch).state == pb.Job.RUNNING
        for _ in range(4):  # more calls than threads, each answered while all 40 stay open
            job = stub.GetJob(pb.GetJobRequest(name=f"jobs/{RUNNING_JOB}"), timeout=TIMEOUT)
            assert job.state == pb.Job.RUNNING
        assert health_status(channels(service.target), SERVICE_NAME) == SERVING
        assert service.executor.in_progress == 0  # no watch counts against the pool
        gauges = service.metrics.registry.get_sample_value
        assert gauges("noisescore_watches_open") == 40
        assert gauges("noisescore_rpc_calls_in_progress") == 0
    finally:
        for watch in watches:
            watch.cancel()
    wait_for(lambda: service.servicer.watches.open == 0, "the watches to close")


def test_watches_past_the_cap_are_resource_exhausted(serve, channels):
    service, servicer = serve(servicer_options={"max_watches": 3})
    stub = pb_grpc.NoiseScoringStub(channels(service.target))
    request = pb.WatchJobRequest(name=f"jobs/{RUNNING_JOB}")
    watches = [stub.WatchJob(request, timeout=60) for _ in range(3)]
    for watch in watches:
        assert next(watch).state == pb.Job.RUNNING
    error = rpc_error(lambda: next(stub.WatchJob(request, timeout=TIMEOUT)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "NOISESCORE_MAX_WATCHES" in error.details() and "3" in error.details()
    # A finished watch frees its place.
    watches[0].cancel()
    wait_for(lambda: servicer.watches.open == 2, "the cancelled watch to close")
    # An unknown job is NOT_FOUND, and takes no place.
    missing = pb.WatchJobRequest(name="jobs/no-such-job")
    error = rpc_error(lambda: next(stub.WatchJob(missing, timeout=TIMEOUT)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    again = stub.WatchJob(request, timeout=60)
    assert next(again).state == pb.Job.RUNNING
    for watch in [*watches[1:], again]:
        watch.cancel()


def test_stop_ends_open_watches_with_unavailable(serve, channels):
    service, _ = serve()
    stub = pb_grpc.NoiseScoringStub(channels(service.target))
    watch = stub.WatchJob(pb.WatchJobRequest(name=f"jobs/{RUNNING_JOB}"), timeout=60)
    assert next(watch).state == pb.Job.RUNNING
    began = time.monotonic()
    service.stop(grace=30)  # an open watch does not hold the drain for the whole grace
    assert time.monotonic() - began < 25
    error = rpc_error(lambda: next(watch))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "WatchJob again" in error.details()


# --------------------------------------------------------------------------- saturation


def test_health_readiness_tells_a_saturated_api_and_excess_calls_are_refused(serve, channels):
    service, servicer = serve(rpc_threads=1, saturation_grace=0.3)
    channel = channels(service.target)
    stub = pb_grpc.NoiseScoringStub(channel)
    block = pb.GetJobRequest(name="jobs/block")
    held = [stub.GetJob.future(block, timeout=TIMEOUT * 3)]  # takes the only thread
    assert servicer.blocked.acquire(timeout=TIMEOUT)
    # 3 more wait for it: 4 x rpc_threads calls in progress, the admission limit.
    held += [stub.GetJob.future(block, timeout=TIMEOUT * 3) for _ in range(3)]
    wait_for(lambda: service.executor.in_progress == 4, "4 calls in progress")
    error = rpc_error(lambda: stub.GetJob(block, timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "NOISESCORE_RPC_THREADS" in error.details()
    # Readiness follows once a call has waited longer than the grace; liveness stays.
    wait_for(lambda: health_status(channel, SERVICE_NAME) == NOT_SERVING, "NOT_SERVING")
    assert health_status(channel, "") == SERVING
    # Watches are not behind the pool: one still opens and answers.
    watch = stub.WatchJob(pb.WatchJobRequest(name=f"jobs/{RUNNING_JOB}"), timeout=TIMEOUT)
    assert next(watch).state == pb.Job.RUNNING
    watch.cancel()

    servicer.release.set()
    for call in held:
        assert call.result(timeout=TIMEOUT).name == "jobs/block"
    wait_for(lambda: health_status(channel, SERVICE_NAME) == SERVING, "SERVING again")


# --------------------------------------------------------------------------- images


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _predict(stub: pb_grpc.NoiseScoringStub, images: list[bytes]) -> pb.PredictResponse:
    request = pb.PredictRequest(
        job=f"jobs/{DONE_JOB}", images=[pb.Image(encoded=data) for data in images]
    )
    return stub.Predict(request, timeout=TIMEOUT * 3)


def test_16_bit_4096_png_is_refused_from_its_header(serve, channels, monkeypatch):
    wide = _png(np.zeros((4096, 4096), np.uint16))  # ~33 KB that decodes to 32 MiB+
    assert Image.open(io.BytesIO(wide)).mode == "I;16"
    loads: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def counting_load(self):
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    service, _ = serve()
    stub = pb_grpc.NoiseScoringStub(channels(service.target))
    small = _png(np.full((28, 28), 100, np.uint8))
    assert len(_predict(stub, [small]).predictions) == 1
    loads.clear()

    error = rpc_error(lambda: _predict(stub, [small, wide]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = error.details()
    assert "decoded pixels" in details and "NOISESCORE_MAX_REQUEST_PIXELS" in details
    assert "images[0..1]" in details
    assert loads == []  # not one image was decoded, the small one neither


def test_process_pixel_budget_refuses_instead_of_growing(serve, channels):
    service, servicer = serve(
        servicer_options={"max_inflight_pixels": 200_000, "max_request_pixels": 100_000},
        rpc_threads=4,
    )
    stub = pb_grpc.NoiseScoringStub(channels(service.target))
    images = [_png(np.random.default_rng(i).integers(0, 256, (64, 64), np.uint8)) for i in range(8)]
    cost = 8 * (64 * 64 + IMG_SIZE**2)  # 39,040 decoded pixels
    # Other requests hold all but less than this one needs: RESOURCE_EXHAUSTED, at once.
    with servicer.pixels.reserve(200_000 - cost + 1):
        error = rpc_error(lambda: _predict(stub, images))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "NOISESCORE_MAX_INFLIGHT_PIXELS" in error.details()
        assert f"this one needs {cost}" in error.details()
    assert len(_predict(stub, images).predictions) == 8  # room again

    # Many at once: each is served or refused, and the process never holds more.
    codes: list[grpc.StatusCode] = []

    def client() -> None:
        with grpc.insecure_channel(service.target) as channel:
            own = pb_grpc.NoiseScoringStub(channel)
            for _ in range(4):
                try:
                    _predict(own, images)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as err:
                    codes.append(err.code())

    threads = [threading.Thread(target=client) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 6)
    assert len(codes) == 48
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert servicer.pixels.peak <= 200_000 and servicer.pixels.in_flight == 0


def test_the_models_input_size_counts_against_the_budget():
    # A model declaring 1024x1024 input turns each tiny PNG into a 1 Mpx tensor.
    large = ModelInfo(model="m", num_classes=2, in_chans=1, img_size=1024)
    tiny = EncodedImage(_png(np.zeros((8, 8), np.uint8)))
    with open_images([tiny] * 4, large) as opened:
        assert opened.pixels == 4 * (64 + 1024 * 1024)
    with pytest.raises(OverBudget, match=r"images\[0\.\.15\] already need 16778240 decoded"):
        open_images([tiny] * 128, large, max_total=16 * 1024 * 1024, total_setting="X")
    # 32-bit float pixels are refused from the header, before any decoding.
    with pytest.raises(InputError, match="32-bit float"):
        open_images([EncodedImage(_tiff_float())], large)


def _tiff_float() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.float32)).save(buffer, "TIFF")
    return buffer.getvalue()


# --------------------------------------------------------------------------- strings


def test_every_request_string_is_capped_and_echoes_are_short(serve, channels):
    service, _ = serve()
    stub = pb_grpc.NoiseScoringStub(channels(service.target))
    huge = "s3://bucket/" + "x" * (2 * 1024 * 1024)
    spec = pb.CleaningJobSpec(dataset_uri=huge)
    error = rpc_error(lambda: stub.SubmitCleaningJob(pb.SubmitCleaningJobRequest(spec=spec)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("spec.dataset_uri is 2097164 characters long")
    assert f"the limit is {STRING_CAPS['dataset_uri']}" in error.details()
    assert len(error.details()) <= ECHO_CHARS

    long = "y" * 5000
    calls: dict[str, Callable[[], object]] = {
        "spec.model": lambda: stub.SubmitCleaningJob(
            pb.SubmitCleaningJobRequest(spec=pb.CleaningJobSpec(dataset_uri="a", model=long))
        ),
        "spec.noise.kind": lambda: stub.SubmitCleaningJob(
            pb.SubmitCleaningJobRequest(
                spec=pb.CleaningJobSpec(dataset_uri="a", noise=pb.NoiseInjection(kind=long))
            )
        ),
        "spec.idempotency_key": lambda: stub.SubmitCleaningJob(
            pb.SubmitCleaningJobRequest(
                spec=pb.CleaningJobSpec(dataset_uri="a", idempotency_key=long)
            )
        ),
        "name": lambda: stub.GetJob(pb.GetJobRequest(name=long)),
        "page_token": lambda: stub.ListJobs(pb.ListJobsRequest(page_token=long)),
        "job": lambda: stub.GetCorrections(pb.GetCorrectionsRequest(job=long)),
        "samples[1].sample_id": lambda: stub.ScoreLabels(
            pb.ScoreLabelsRequest(
                job=f"jobs/{DONE_JOB}",
                samples=[pb.LabelledSample(sample_id="ok"), pb.LabelledSample(sample_id=long)],
            )
        ),
    }
    for field, call in calls.items():
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert error.details().startswith(f"{field} is 5000 characters long"), error.details()
        assert long[:50] not in error.details(), field  # nothing of the value itself
    watch = pb.WatchJobRequest(name=long)
    error = rpc_error(lambda: next(stub.WatchJob(watch, timeout=TIMEOUT)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("name is 5000 characters long")

    # Under the cap but wrong: the message echoes at most ECHO_CHARS of the input.
    wrong = "jobs/" + "Z" * 900
    error = rpc_error(lambda: stub.GetJob(pb.GetJobRequest(name=wrong), timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "(900 characters)" in error.details()
    assert error.details().count("Z") <= ECHO_CHARS
