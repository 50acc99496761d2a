"""A typed Python client of the ``noisescore.v1.NoiseScoring`` gRPC API.

    with NoiseScoringClient("127.0.0.1:50051", token="…") as client:
        job = client.submit("medmnist://breastmnist", noise="uniform:0.5", epochs=30)
        job = client.wait(job.name)
        flagged = [c for c in client.corrections(job.name, only_flagged=True)]
        scores = client.score(job.name, images, labels)

    # active label cleaning: answer the relabel round a job waits for
        job = client.submit_active("medmnist://bloodmnist", noise="symmetric:0.4", rounds=8)
        queue = client.relabel_queue(job.name)  # the round it waits for; PNG per sample
        client.submit_relabels(job.name, queue.round, [("s17", 3, "dr-a")], close_round=True)

Images are numpy uint8 arrays (H, W) or (C, H, W), or encoded PNG/JPEG bytes. Errors
are ``grpc.RpcError`` with a canonical status code and an actionable message.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from noisescore.v1 import noise_scoring_pb2 as pb
from noisescore.v1 import noise_scoring_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
TERMINAL = {pb.Job.SUCCEEDED, pb.Job.FAILED, pb.Job.CANCELLED}
ImageLike = np.ndarray | bytes
RELABEL_RESULTS_KEY = "noisescore-relabel-results-bin"  # service.servicer.RELABEL_RESULTS_KEY


class RelabelsRejected(Exception):
    """SubmitRelabels answered INVALID_ARGUMENT: nothing was recorded. ``response`` holds
    every row's result and reason (from the reply's trailing metadata)."""

    def __init__(self, details: str, response: pb.SubmitRelabelsResponse) -> None:
        super().__init__(details)
        self.details = details
        self.response = response


def _set_noise(spec: Any, noise: str | None) -> None:
    if not noise:
        return
    kind, _, rate = noise.partition(":")
    try:
        spec.noise.kind, spec.noise.rate = kind, float(rate)
    except ValueError as err:
        raise ValueError(f"noise must be KIND:RATE, e.g. uniform:0.5; got {noise!r}") from err


def job_name(job: str) -> str:
    """``"jobs/<id>"`` from an id or a name."""
    return job if job.startswith("jobs/") else f"jobs/{job}"


def image_message(image: ImageLike) -> pb.Image:
    if isinstance(image, bytes | bytearray):
        return pb.Image(encoded=bytes(image))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"an image must be (H, W) or (C, H, W), got shape {array.shape}")
    return pb.Image(tensor=pb.Tensor(shape=list(array.shape), data=array.tobytes()))


class NoiseScoringClient:
    """Calls to one noisescore server.

    Parameters
    ----------
    target : str
        ``host:port``.
    token : str, optional
        Bearer token (sent as ``authorization: Bearer <token>``).
    tls_ca : path, optional
        CA certificate of the server: connect with TLS. ``client_cert``/``client_key``
        add a client certificate (mTLS).
    tls_server_name : str, optional
        Name to verify the server certificate against instead of ``target``'s host, e.g.
        ``noisescore.ns.svc`` when ``target`` is a ``kubectl port-forward`` on 127.0.0.1.
    timeout : float
        Deadline of each unary call, in seconds.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls_ca: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
        tls_server_name: str | None = None,
        timeout: float = 60.0,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        options: list[tuple[str, int | str]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if tls_server_name:
            if tls_ca is None:
                raise ValueError("tls_server_name needs tls_ca (it only applies to TLS)")
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(tls_ca).read_bytes(),
                private_key=Path(client_key).read_bytes() if client_key else None,
                certificate_chain=Path(client_cert).read_bytes() if client_cert else None,
            )
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.NoiseScoringStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.timeout = timeout

    def __enter__(self) -> NoiseScoringClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: Any, request: Any) -> Any:
        return method(request, timeout=self.timeout, metadata=self.metadata)

    # ------------------------------------------------------------------- jobs

    def submit(
        self,
        dataset_uri: str,
        *,
        model: str = "",
        epochs: int = 0,
        warmup_epochs: int = 0,
        alpha_lr: float = 0.0,
        alpha_wd: float = 0.0,
        seed: int | None = None,
        noise: str | None = None,
        idempotency_key: str = "",
        device: str = "",
        detectors: Sequence[str] = (),
        flag_by: str = "",
        cl_folds: int = 0,
    ) -> pb.Job:
        """Start a cleaning job; ``noise`` is ``KIND:RATE`` for evaluation runs;
        ``detectors`` empty = all, ``flag_by`` empty = ``linc``."""
        spec = pb.CleaningJobSpec(
            dataset_uri=dataset_uri, model=model, epochs=epochs, warmup_epochs=warmup_epochs,
            alpha_lr=alpha_lr, alpha_wd=alpha_wd, idempotency_key=idempotency_key, device=device,
            detectors=list(detectors), flag_by=flag_by, cl_folds=cl_folds,
        )  # fmt: skip
        if seed is not None:
            spec.seed = seed
        _set_noise(spec, noise)
        return self._call(self.stub.SubmitCleaningJob, pb.SubmitCleaningJobRequest(spec=spec))  # type: ignore[no-any-return]

    def submit_active(
        self,
        dataset_uri: str,
        *,
        model: str = "",
        seed: int | None = None,
        noise: str | None = None,
        imbalance: float = 0.0,
        lnl_method: str = "",
        epochs: int = 0,
        forget_rate: float | None = None,
        mix_ratio: float | None = None,
        vog_mode: str = "",
        clean_epochs: int = 0,
        sampler: str = "",
        rounds: int = 0,
        budget: int = 0,
        fine_tune_epochs: int = 0,
        expert: str = "",
        idempotency_key: str = "",
        device: str = "",
    ) -> pb.Job:
        """Start an active label cleaning job (``noisescore active-clean``'s settings; zero
        or empty = the default). With ``expert="human"`` it waits for
        :meth:`submit_relabels` at every round (state ``WAITING_FOR_LABELS``)."""
        spec = pb.ActiveCleaningJobSpec(
            dataset_uri=dataset_uri, model=model, imbalance=imbalance, lnl_method=lnl_method,
            epochs=epochs, vog_mode=vog_mode, clean_epochs=clean_epochs, sampler=sampler,
            rounds=rounds, budget=budget, fine_tune_epochs=fine_tune_epochs, expert=expert,
            idempotency_key=idempotency_key, device=device,
        )  # fmt: skip
        if seed is not None:
            spec.seed = seed
        if forget_rate is not None:
            spec.forget_rate = forget_rate
        if mix_ratio is not None:
            spec.mix_ratio = mix_ratio
        _set_noise(spec, noise)
        request = pb.SubmitActiveCleaningJobRequest(spec=spec)
        return self._call(self.stub.SubmitActiveCleaningJob, request)  # type: ignore[no-any-return]

    def get(self, job: str) -> pb.Job:
        return self._call(self.stub.GetJob, pb.GetJobRequest(name=job_name(job)))  # type: ignore[no-any-return]

    def list(self, *, state: str | None = None, page_size: int = 100) -> Iterator[pb.Job]:
        """Every job (newest first), page after page; ``state`` e.g. ``"RUNNING"``."""
        token = ""
        state_value = pb.Job.State.Value(state) if state else pb.Job.STATE_UNSPECIFIED
        while True:
            request = pb.ListJobsRequest(page_size=page_size, page_token=token, state=state_value)
            response = self._call(self.stub.ListJobs, request)
            yield from response.jobs
            token = response.next_page_token
            if not token:
                return

    # ------------------------------------------------------------------- relabel rounds

    def relabel_queue(self, job: str, *, round: int = 0, images: bool = True) -> pb.RelabelQueue:
        """The samples of a relabel round (0 = the round the job waits for), each with its
        image as PNG unless ``images`` is False."""
        request = pb.GetRelabelQueueRequest(job=job_name(job), round=round, skip_images=not images)
        return self._call(self.stub.GetRelabelQueue, request)  # type: ignore[no-any-return]

    def submit_relabels(
        self,
        job: str,
        round: int,
        relabels: Sequence[tuple[str, int, str]],
        *,
        close_round: bool = False,
    ) -> pb.SubmitRelabelsResponse:
        """Answer a relabel round with ``(sample_id, label, annotator)`` rows.

        Raises
        ------
        RelabelsRejected
            When a row is invalid: nothing was recorded; ``err.response`` says why, row by row.
        grpc.RpcError
            Any other error (FAILED_PRECONDITION: the round is closed or not open, ...).
        """
        request = pb.SubmitRelabelsRequest(
            job=job_name(job),
            round=round,
            relabels=[pb.Relabel(sample_id=s, label=int(y), annotator=a) for s, y, a in relabels],
            close_round=close_round,
        )
        try:
            return self._call(self.stub.SubmitRelabels, request)  # type: ignore[no-any-return]
        except grpc.RpcError as err:
            response = rejected_relabels(err)
            if response is None:
                raise
            raise RelabelsRejected(err.details() or "", response) from err

    def cancel(self, job: str) -> pb.Job:
        return self._call(self.stub.CancelJob, pb.CancelJobRequest(name=job_name(job)))  # type: ignore[no-any-return]

    def watch(self, job: str, *, timeout: float | None = None) -> Iterator[pb.JobEvent]:
        """Progress events until the job ends (or ``timeout`` seconds pass)."""
        request = pb.WatchJobRequest(name=job_name(job))
        yield from self.stub.WatchJob(request, timeout=timeout, metadata=self.metadata)

    def wait(self, job: str, *, timeout: float | None = None) -> pb.Job:
        """Block until the job is SUCCEEDED, FAILED or CANCELLED; return it."""
        for event in self.watch(job, timeout=timeout):
            if event.state in TERMINAL:
                break
        return self.get(job)

    # ------------------------------------------------------------------- results

    def corrections(
        self, job: str, *, only_flagged: bool = False, detector_scores: bool = False
    ) -> Iterator[pb.Correction]:
        """Every training sample's trust, flag and corrected label (streamed);
        ``detector_scores`` adds every detector's score to each row (``CORRECTION_VIEW_FULL``).
        """
        view = pb.CORRECTION_VIEW_FULL if detector_scores else pb.CORRECTION_VIEW_BASIC
        request = pb.StreamCorrectionsRequest(
            job=job_name(job), only_flagged=only_flagged, view=view
        )
        for chunk in self.stub.StreamCorrections(request, metadata=self.metadata):
            yield from chunk.corrections

    def score(
        self,
        job: str,
        images: Sequence[ImageLike],
        labels: Sequence[int],
        *,
        sample_ids: Sequence[str] | None = None,
    ) -> pb.ScoreLabelsResponse:
        """Label quality of ``labels`` for ``images`` under the job's model."""
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        ids = list(sample_ids) if sample_ids is not None else [""] * len(images)
        samples = [
            pb.LabelledSample(image=image_message(image), label=int(label), sample_id=sid)
            for image, label, sid in zip(images, labels, ids, strict=True)
        ]
        request = pb.ScoreLabelsRequest(job=job_name(job), samples=samples)
        return self._call(self.stub.ScoreLabels, request)  # type: ignore[no-any-return]

    def predict(self, job: str, images: Sequence[ImageLike]) -> np.ndarray:
        """Class probabilities, shape (N, K)."""
        request = pb.PredictRequest(job=job_name(job), images=[image_message(i) for i in images])
        response = self._call(self.stub.Predict, request)
        return np.array([list(p.probabilities) for p in response.predictions], dtype=np.float32)


def rejected_relabels(err: grpc.RpcError) -> pb.SubmitRelabelsResponse | None:
    """The per-row results an INVALID_ARGUMENT SubmitRelabels reply carries, else None."""
    if err.code() != grpc.StatusCode.INVALID_ARGUMENT:  # type: ignore[attr-defined]
        return None
    for key, value in err.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == RELABEL_RESULTS_KEY and isinstance(value, bytes):
            return pb.SubmitRelabelsResponse.FromString(value)
    return None
