"""The ``noisescore.v1.NoiseScoring`` servicer: validate, translate, call the domain code.

No training logic here. Every handler maps domain errors to canonical status codes with
a message a caller can act on (see :func:`_status_of`); an unexpected exception becomes
INTERNAL in the error interceptor, without a stack trace.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import functools
import inspect
import io
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import ValidationError

from noisescore.datasets import canonical_dataset_uri
from noisescore.jobs import IncompleteJob, JobStore, validate_job_id
from noisescore.ml.noise import NoiseSpecError
from noisescore.relabels import (
    NOT_RECORDED,
    Answer,
    RelabelBook,
    RoundClosed,
    RoundNotOpen,
    Submission,
)
from noisescore.service.executor import RpcExecutor, blocking_stream, blocking_unary
from noisescore.service.inference import (
    MAX_INFLIGHT_PIXELS,
    MAX_REQUEST_PIXELS,
    EncodedImage,
    ImageInput,
    InputError,
    ModelCache,
    ModelError,
    OnnxModel,
    OverBudget,
    PixelBudget,
    TensorImage,
    open_images,
    score_labels,
)
from noisescore.service.jobs import (
    ACTIVE,
    RUNNING,
    STATES,
    SUCCEEDED,
    WAITING_FOR_LABELS,
    IdempotencyConflict,
    JobManager,
    JobNotFound,
    JobRecord,
    NotCancellable,
    NoTrainingRuntime,
    OrchestratorUnavailable,
    QueueFull,
    is_active,
    public_error,
)
from noisescore.service.watches import TooManyWatches, WatchesClosed, WatchHub
from noisescore.settings import ActiveSettings, CleanSettings
from noisescore.storage import CorruptArtifact, StorageError, StorageUnavailable
from noisescore.uris import DataError, DatasetAccessDenied, DatasetPolicy
from noisescore.v1 import noise_scoring_pb2 as pb
from noisescore.v1 import noise_scoring_pb2_grpc as pb_grpc

T = TypeVar("T")
logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
DEFAULT_CORRECTIONS_PAGE = 1000
MAX_CORRECTIONS_PAGE = 100_000
DEFAULT_CHUNK = 20_000
MAX_PAGE_TOKEN = 1024  # characters; the tokens this server issues are under 100
MAX_IDEMPOTENCY_KEY = 128
WATCH_POLL_S = 0.5
DEFAULT_MAX_WATCHES = 1000
# Longest accepted value of each string field of a request, in characters (any other
# string field: MAX_STRING_CHARS). Checked for every request before its handler runs, so
# nothing longer is stored, listed back or echoed.
MAX_STRING_CHARS = 1024
STRING_CAPS = {
    "dataset_uri": 1024,
    "model": 128,
    "idempotency_key": MAX_IDEMPOTENCY_KEY,
    "device": 16,
    "kind": 32,
    "page_token": 1024,
    "sample_id": 512,
    "annotator": 128,
    "lnl_method": 32,
    "vog_mode": 16,
    "sampler": 32,
    "expert": 16,
}
# SubmitRelabels answers INVALID_ARGUMENT with every row's reason in this trailing metadata
# entry: a serialized SubmitRelabelsResponse (the message itself names at most
# MAX_REASONS_IN_MESSAGE rows).
RELABEL_RESULTS_KEY = "noisescore-relabel-results-bin"
MAX_REASONS_IN_MESSAGE = 20
# At most this much of a caller's own input is echoed in an error message.
ECHO_CHARS = 200
NOISE_KINDS = ("symmetric", "uniform", "pairflip", "instance")


class RequestError(ValueError):
    """INVALID_ARGUMENT: the request itself is wrong."""


class NotReady(RuntimeError):
    """FAILED_PRECONDITION: the job has not succeeded (yet)."""


class TooLarge(RuntimeError):
    """RESOURCE_EXHAUSTED: more than the server takes in one request."""


def _status_of(err: Exception) -> tuple[grpc.StatusCode, str] | None:
    """The canonical code for a domain error; None = unexpected (INTERNAL)."""
    codes: list[tuple[type[Exception] | tuple[type[Exception], ...], grpc.StatusCode]] = [
        (DatasetAccessDenied, grpc.StatusCode.PERMISSION_DENIED),
        (JobNotFound, grpc.StatusCode.NOT_FOUND),
        ((RequestError, InputError, NoiseSpecError), grpc.StatusCode.INVALID_ARGUMENT),
        (
            (NotReady, IncompleteJob, ModelError, NoTrainingRuntime, RoundNotOpen, RoundClosed),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (
            (QueueFull, TooLarge, TooManyWatches, OverBudget),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        (
            (StorageUnavailable, OrchestratorUnavailable, WatchesClosed),
            grpc.StatusCode.UNAVAILABLE,
        ),
        (IdempotencyConflict, grpc.StatusCode.ALREADY_EXISTS),
        (NotCancellable, grpc.StatusCode.FAILED_PRECONDITION),
        # Stored data that contradicts itself (checksum, manifest, a listed file missing):
        # no retry repairs it. Only an unreachable store is UNAVAILABLE.
        (CorruptArtifact, grpc.StatusCode.DATA_LOSS),
        (StorageError, grpc.StatusCode.UNAVAILABLE),
    ]
    for kinds, code in codes:
        if isinstance(err, kinds):
            return code, str(err)
    return None


def _abort_on_domain_errors(context: grpc.ServicerContext, err: Exception) -> None:
    status = _status_of(err)
    if status is None:
        raise err
    context.abort(*status)


def unary(method: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> T:
        try:
            return method(self, request, context)
        except Exception as err:
            _abort_on_domain_errors(context, err)
            raise  # unreachable: abort raises

    return wrapper


def streaming(method: Callable[..., Iterator[T]]) -> Callable[..., Iterator[T]]:
    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[T]:
        try:
            yield from method(self, request, context)
        except Exception as err:
            _abort_on_domain_errors(context, err)

    return wrapper


# ----------------------------------------------------------------------------- boundary


def echo(value: str, limit: int = ECHO_CHARS) -> str:
    """``value`` quoted for an error message, cut to ``limit`` characters: a caller's own
    input is echoed so they can find the mistake, never at its full (unbounded) length."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def clip_echoes(message: str, inputs: Iterator[str] | list[str]) -> str:
    """``message`` with every long caller input in it replaced by its :func:`echo`."""
    for value in inputs:
        if len(value) > ECHO_CHARS:
            message = message.replace(repr(value), echo(value)).replace(value, echo(value))
    return message


def _string_fields(descriptor: Any) -> tuple[list[Any], list[Any]]:
    """(string fields, message fields that may hold strings) of a message type; cached."""
    cached = _STRING_FIELDS.get(descriptor.full_name)
    if cached is None:
        strings = [f for f in descriptor.fields if f.type == f.TYPE_STRING]
        _STRING_FIELDS[descriptor.full_name] = ([], [])  # a recursive type ends here
        nested = [
            f
            for f in descriptor.fields
            if f.message_type is not None and any(_string_fields(f.message_type))
        ]
        cached = _STRING_FIELDS[descriptor.full_name] = (strings, nested)
    return cached


_STRING_FIELDS: dict[str, tuple[list[Any], list[Any]]] = {}


def check_string_lengths(message: Any, path: str = "") -> None:
    """INVALID_ARGUMENT when a string field anywhere in ``message`` is longer than its cap
    (:data:`STRING_CAPS`, else :data:`MAX_STRING_CHARS`). The message names the field, the
    cap and the length, and echoes none of the value."""
    strings, nested = _string_fields(message.DESCRIPTOR)
    for field in strings:
        cap = STRING_CAPS.get(field.name, MAX_STRING_CHARS)
        values = getattr(message, field.name)
        for i, value in enumerate(values if field.is_repeated else (values,)):
            if len(value) > cap:
                where = f"{path}{field.name}" + (f"[{i}]" if field.is_repeated else "")
                raise RequestError(f"{where} is {len(value)} characters long; the limit is {cap}")
    for field in nested:
        value = getattr(message, field.name)
        if field.message_type.GetOptions().map_entry:  # a map: its string keys and values
            for key, item in value.items():
                for part in (key, item):
                    if isinstance(part, str) and len(part) > MAX_STRING_CHARS:
                        raise RequestError(
                            f"{path}{field.name} has an entry of {len(part)} characters; "
                            f"the limit is {MAX_STRING_CHARS}"
                        )
                    if not isinstance(part, str | bytes | int | float | bool):
                        check_string_lengths(part, f"{path}{field.name}[...].")
        elif field.is_repeated:
            for i, item in enumerate(value):
                check_string_lengths(item, f"{path}{field.name}[{i}].")
        elif message.HasField(field.name):
            check_string_lengths(value, f"{path}{field.name}.")


# ----------------------------------------------------------------------------- translation


def parse_job_name(name: str, *, field: str = "name") -> str:
    """``jobs/{job_id}`` -> job id (INVALID_ARGUMENT when malformed)."""
    if not name:
        raise RequestError(f"{field} is required: jobs/{{job_id}}")
    prefix, _, job_id = name.partition("/")
    if prefix != "jobs" or not job_id:
        raise RequestError(f"{field} must look like jobs/{{job_id}}, got {echo(name)}")
    try:
        return validate_job_id(job_id)
    except ValueError as err:
        raise RequestError(clip_echoes(f"{field}: {err}", [job_id])) from err


def _timestamp(text: str | None) -> Timestamp | None:
    if not text:
        return None
    stamp = Timestamp()
    try:
        stamp.FromJsonString(text if text.endswith("Z") else text.replace("+00:00", "Z"))
    except ValueError:  # a hand-edited or foreign record: the time is left out
        return None
    return stamp


def spec_to_settings_fields(spec: pb.CleaningJobSpec) -> dict[str, Any]:
    """The CleanSettings fields a spec sets (defaults for what it leaves at zero)."""
    fields: dict[str, Any] = {"dataset": spec.dataset_uri}
    if not spec.dataset_uri:
        raise RequestError("spec.dataset_uri is required (medmnist://NAME, file:///…, s3://…)")
    if spec.model:
        fields["model"] = spec.model
    for name in ("epochs", "warmup_epochs"):
        value = getattr(spec, name)
        if value < 0:
            raise RequestError(f"spec.{name} must be positive, got {value}")
        if value:
            fields[name] = value
    for name in ("alpha_lr", "alpha_wd"):
        value = getattr(spec, name)
        if value < 0 or not np.isfinite(value):
            raise RequestError(f"spec.{name} must be a finite number >= 0, got {value}")
        if value:
            fields[name] = value
    if spec.HasField("seed"):
        fields["seed"] = spec.seed
    if spec.noise.kind:
        if spec.noise.kind not in NOISE_KINDS:
            raise RequestError(
                f"spec.noise.kind {spec.noise.kind!r} is not one of {', '.join(NOISE_KINDS)}"
            )
        if not 0.0 <= spec.noise.rate <= 1.0:
            raise RequestError(f"spec.noise.rate must lie in [0, 1], got {spec.noise.rate}")
        fields["noise"] = f"{spec.noise.kind}:{spec.noise.rate:g}"
    elif spec.noise.rate:
        raise RequestError("spec.noise.rate is set but spec.noise.kind is empty")
    if spec.device:
        fields["device"] = spec.device
    if spec.detectors:
        fields["detectors"] = ",".join(spec.detectors)
    if spec.flag_by:
        fields["flag_by"] = spec.flag_by
    if spec.cl_folds < 0:
        raise RequestError(f"spec.cl_folds must be 0 (off) or at least 2, got {spec.cl_folds}")
    if spec.cl_folds:
        fields["cl_folds"] = spec.cl_folds
    return fields


def validate_settings(fields: dict[str, Any]) -> None:
    """Reject what ``noisescore clean`` would reject, before the job is queued."""
    try:
        CleanSettings(**fields)
    except ValidationError as err:
        raise RequestError(_settings_problems(err, fields)) from err


def settings_to_spec(fields: dict[str, Any], idempotency_key: str) -> pb.CleaningJobSpec:
    spec = pb.CleaningJobSpec(
        # The URI forms the proto documents: a bare name "breastmnist" is medmnist://breastmnist.
        dataset_uri=canonical_dataset_uri(str(fields.get("dataset", ""))),
        model=str(fields.get("model", "")),
        epochs=int(fields.get("epochs", 0)),
        warmup_epochs=int(fields.get("warmup_epochs", 0)),
        alpha_lr=float(fields.get("alpha_lr", 0.0)),
        alpha_wd=float(fields.get("alpha_wd", 0.0)),
        device=str(fields.get("device", "")),
        idempotency_key=idempotency_key,
    )
    if "seed" in fields:
        spec.seed = int(fields["seed"])
    if fields.get("noise"):
        kind, _, rate = str(fields["noise"]).partition(":")
        spec.noise.kind, spec.noise.rate = kind, float(rate or 0)
    if fields.get("detectors", "all") != "all":
        spec.detectors.extend(str(fields["detectors"]).split(","))
    spec.flag_by = str(fields.get("flag_by", ""))
    spec.cl_folds = int(fields.get("cl_folds", 0))
    return spec


def _noise_field(noise: pb.NoiseInjection) -> str | None:
    """``"kind:rate"`` of a spec's noise injection, None without one."""
    if noise.kind:
        if noise.kind not in NOISE_KINDS:
            raise RequestError(
                f"spec.noise.kind {noise.kind!r} is not one of {', '.join(NOISE_KINDS)}"
            )
        if not 0.0 <= noise.rate <= 1.0:
            raise RequestError(f"spec.noise.rate must lie in [0, 1], got {noise.rate}")
        return f"{noise.kind}:{noise.rate:g}"
    if noise.rate:
        raise RequestError("spec.noise.rate is set but spec.noise.kind is empty")
    return None


_ACTIVE_INTS = ("epochs", "clean_epochs", "rounds", "budget", "fine_tune_epochs")
_ACTIVE_STRINGS = ("model", "lnl_method", "vog_mode", "sampler", "expert", "device")


def active_spec_to_settings_fields(spec: pb.ActiveCleaningJobSpec) -> dict[str, Any]:
    """The ActiveSettings fields an active spec sets (defaults for what it leaves at zero)."""
    if not spec.dataset_uri:
        raise RequestError("spec.dataset_uri is required (medmnist://NAME, file:///…, s3://…)")
    fields: dict[str, Any] = {"dataset": spec.dataset_uri}
    for name in _ACTIVE_STRINGS:
        if getattr(spec, name):
            fields[name] = getattr(spec, name)
    for name in _ACTIVE_INTS:
        value = getattr(spec, name)
        if value < 0:
            raise RequestError(f"spec.{name} must be positive (0 = the default), got {value}")
        if value:
            fields[name] = value
    if spec.HasField("seed"):
        fields["seed"] = spec.seed
    noise = _noise_field(spec.noise)
    if noise is not None:
        fields["noise"] = noise
    if not np.isfinite(spec.imbalance) or spec.imbalance < 0:
        raise RequestError(f"spec.imbalance must be 0 (none) or a ratio >= 1, got {spec.imbalance}")
    if spec.imbalance:
        fields["imbalance"] = spec.imbalance
    for name in ("forget_rate", "mix_ratio"):
        if spec.HasField(name):
            fields[name] = getattr(spec, name)
    return fields


def validate_active_settings(fields: dict[str, Any]) -> None:
    """Reject what ``noisescore active-clean`` would reject, before the job is queued."""
    try:
        ActiveSettings(**fields)
    except ValidationError as err:
        raise RequestError(_settings_problems(err, fields)) from err


def _settings_problems(err: ValidationError, fields: dict[str, Any]) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"])
        where = {"dataset": "dataset_uri"}.get(where, where)
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"spec.{where}: {msg}" if where else msg)
    inputs = [v for v in fields.values() if isinstance(v, str)]
    return clip_echoes("; ".join(parts), inputs)


def settings_to_active_spec(
    fields: dict[str, Any], idempotency_key: str
) -> pb.ActiveCleaningJobSpec:
    spec = pb.ActiveCleaningJobSpec(
        dataset_uri=canonical_dataset_uri(str(fields.get("dataset", ""))),
        idempotency_key=idempotency_key,
        imbalance=float(fields.get("imbalance") or 0.0),
    )
    for name in _ACTIVE_STRINGS:
        setattr(spec, name, str(fields.get(name) or ""))
    for name in _ACTIVE_INTS:
        setattr(spec, name, int(fields.get(name) or 0))
    if fields.get("seed") is not None:
        spec.seed = int(fields["seed"])
    for name in ("forget_rate", "mix_ratio"):
        if fields.get(name) is not None:
            setattr(spec, name, float(fields[name]))
    if fields.get("noise"):
        kind, _, rate = str(fields["noise"]).partition(":")
        spec.noise.kind, spec.noise.rate = kind, float(rate or 0)
    return spec


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 ``(C, H, W)`` image (C 1 or 3) as PNG."""
    from PIL import Image

    pixels = image[0] if image.shape[0] == 1 else np.ascontiguousarray(image.transpose(1, 2, 0))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def submit_relabels_response(outcome: Submission) -> pb.SubmitRelabelsResponse:
    return pb.SubmitRelabelsResponse(
        results=[
            pb.RelabelResult(sample_id=r.sample_id, accepted=r.accepted, reason=r.reason)
            for r in outcome.rows
        ],
        round_closed=outcome.closed,
        n_answered=outcome.n_answered,
        n_queued=outcome.n_queued,
    )


def rejected_message(outcome: Submission) -> str:
    """INVALID_ARGUMENT's message: which rows are invalid and why (the first few)."""
    bad = [
        (i, r) for i, r in enumerate(outcome.rows) if not r.accepted and r.reason != NOT_RECORDED
    ]
    lines = [f"relabels[{i}] (sample_id {echo(r.sample_id, 64)}): {r.reason}" for i, r in bad]
    more = len(lines) - MAX_REASONS_IN_MESSAGE
    text = "; ".join(lines[:MAX_REASONS_IN_MESSAGE])
    if more > 0:
        text += f"; and {more} more (all in the trailing metadata {RELABEL_RESULTS_KEY})"
    return f"{len(bad)} of {len(outcome.rows)} relabels are invalid, nothing was recorded: {text}"


# ----------------------------------------------------------------------------- corrections


#: trust.csv columns that are not detector scores (the file's first columns).
_BASE_COLUMNS = (
    "index", "sample_id", "observed_label", "trust", "flagged", "corrected_label", "true_label",
    "source", "relabel_round",
)  # fmt: skip
#: trust.csv's ``source`` column (active cleaning jobs) -> Correction.Source.
_SOURCES = {
    "observed": pb.Correction.OBSERVED, "model": pb.Correction.MODEL,
    "expert": pb.Correction.EXPERT,
}  # fmt: skip


@dataclass(frozen=True)
class CorrectionTable:
    """``trust.csv`` of a job as columns.

    ``detector_scores`` holds every column after the base ones (detector scores,
    ``consensus``, secondary values), plus ``linc`` = trust when there are any; a job
    published before detectors existed has none and is served as before.
    """

    sample_id: list[str]
    observed: np.ndarray
    trust: np.ndarray
    flagged: np.ndarray
    corrected: np.ndarray
    detector_scores: dict[str, np.ndarray]
    source: np.ndarray  # Correction.Source values

    @classmethod
    def parse(cls, data: bytes) -> CorrectionTable:
        rows = list(csv.reader(io.StringIO(data.decode())))
        header, body = rows[0], rows[1:]
        col = {name: i for i, name in enumerate(header)}
        trust = np.array([float(r[col["trust"]]) for r in body], dtype=np.float64)
        extra = [name for name in header if name not in _BASE_COLUMNS]
        scores = {
            name: np.array([float(r[col[name]]) for r in body], dtype=np.float64) for name in extra
        }
        if scores and "source" not in col:  # LiNC's trust is a detector score too
            scores = {"linc": trust, **scores}
        observed = np.array([int(r[col["observed_label"]]) for r in body], dtype=np.int64)
        corrected = np.array([int(r[col["corrected_label"]]) for r in body], dtype=np.int64)
        if "source" in col:  # active cleaning: who gave each label
            source = np.array([_SOURCES[r[col["source"]]] for r in body], dtype=np.int64)
        else:  # LiNC: the model changed a label or kept it
            source = np.where(
                corrected != observed, pb.Correction.MODEL, pb.Correction.OBSERVED
            ).astype(np.int64)
        return cls(
            sample_id=[r[col["sample_id"]] for r in body],
            observed=observed,
            trust=trust,
            flagged=np.array([r[col["flagged"]] == "1" for r in body], dtype=bool),
            corrected=corrected,
            detector_scores=scores,
            source=source,
        )

    def rows(self, indices: np.ndarray, *, full: bool = False) -> list[pb.Correction]:
        """``full``: with ``detector_scores`` (``CORRECTION_VIEW_FULL``)."""
        ids, obs, trust = self.sample_id, self.observed, self.trust
        flagged, corrected, source = self.flagged, self.corrected, self.source
        order = indices.tolist()
        rows = [
            pb.Correction(
                index=int(i),
                sample_id=ids[i],
                observed_label=int(obs[i]),
                trust=float(trust[i]),
                flagged=bool(flagged[i]),
                corrected_label=int(corrected[i]),
                source=int(source[i]),  # type: ignore[arg-type]
            )
            for i in order
        ]
        if full and self.detector_scores:
            for row, i in zip(rows, order, strict=True):
                row.detector_scores.update(
                    {name: float(v[i]) for name, v in self.detector_scores.items()}
                )
        return rows


def _full_view(view: int) -> bool:
    """Whether a ``CorrectionView`` asks for ``detector_scores``; unknown values are errors."""
    if view not in pb.CorrectionView.values():
        names = ", ".join(pb.CorrectionView.keys())
        raise RequestError(f"view must be one of {names}, got {view}")
    return view == pb.CORRECTION_VIEW_FULL


class _LRU:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, load: Callable[[], T]) -> T:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]  # type: ignore[no-any-return]
        value = load()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value


def _encode_token(payload: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload, sort_keys=True).encode()).decode()


def _decode_token(token: str, expected: dict[str, Any]) -> int:
    """The offset in ``token``; INVALID_ARGUMENT unless it was issued for this request."""
    if not token:
        return 0
    not_ours = "page_token is not one this server issued"
    if len(token) > MAX_PAGE_TOKEN:
        raise RequestError(not_ours)
    try:
        payload = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, RecursionError) as err:  # binascii.Error, UnicodeError, JSON
        raise RequestError(not_ours) from err
    # Only what _encode_token makes: an object with an integer offset "o" (JSON also
    # parses null, numbers, strings, Infinity and deep nesting).
    if not isinstance(payload, dict) or type(payload.get("o")) is not int:
        raise RequestError(not_ours)
    offset = payload.pop("o")
    if payload != expected or offset < 0:
        raise RequestError("page_token belongs to a different request (filter or job changed)")
    return offset


# ----------------------------------------------------------------------------- servicer


class NoiseScoringServicer(pb_grpc.NoiseScoringServicer):
    """``noisescore.v1.NoiseScoring`` over a :class:`JobManager` and an ONNX model cache."""

    def __init__(
        self,
        jobs: JobManager,
        *,
        max_batch: int = 1024,
        observe_inference: Callable[[float, int], None] | None = None,
        onnx_threads: int = 0,
        dataset_roots: tuple[str, ...] = (),
        max_watches: int = DEFAULT_MAX_WATCHES,
        watch_interval: float = WATCH_POLL_S,
        max_request_pixels: int = MAX_REQUEST_PIXELS,
        max_inflight_pixels: int = MAX_INFLIGHT_PIXELS,
    ) -> None:
        self.jobs = jobs
        self.max_batch = max_batch
        # Images are bounded by what decoding them costs, per request and in flight.
        self.max_request_pixels = max_request_pixels
        self.pixels = PixelBudget(max_inflight_pixels, setting="NOISESCORE_MAX_INFLIGHT_PIXELS")
        # Every WatchJob stream is a coroutine fed by this one poller (no RPC thread each).
        self.watches: WatchHub[tuple[JobRecord, list[pb.JobEvent], int]] = WatchHub(
            self._watch_snapshot, interval=watch_interval, max_watches=max_watches
        )
        # Jobs read dataset names from the data dir and URIs under these roots, nothing else.
        self.datasets = DatasetPolicy.from_roots(dataset_roots)
        self.models = ModelCache(
            self._onnx_bytes, observe=observe_inference, intra_op_threads=onnx_threads
        )
        self._tables = _LRU(8)
        self._results = _LRU(64)

    # -------------------------------------------------------------- helpers

    def _store(self, job_id: str) -> JobStore:
        return JobStore(self.jobs.store, job_id)

    def _onnx_bytes(self, job_id: str) -> bytes:
        return self._store(job_id).get("model.onnx")

    def _succeeded(self, job_id: str) -> JobRecord:
        record = self.jobs.get(job_id)
        if record.state != SUCCEEDED:
            detail = f": {record.error}" if record.error else ""
            raise NotReady(f"job {job_id} is {record.state}, not SUCCEEDED{detail}")
        return record

    def _result(self, job_id: str) -> pb.JobResult:
        def load() -> pb.JobResult:
            try:
                return parse()
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                # The checksums match but the content does not (a rewritten manifest).
                raise CorruptArtifact(
                    f"job {job_id}: report.json or manifest.json does not hold a job's "
                    f"results ({type(err).__name__}: {err})"
                ) from err

        def parse() -> pb.JobResult:
            report = self.jobs.report(job_id)
            manifest = self.jobs.manifest(job_id)
            linc, test = report["linc"], report.get("test") or {}
            result = pb.JobResult(
                n_train=report["dataset"]["n_train"],
                n_classes=report["dataset"]["n_classes"],
                otsu_threshold=linc["otsu_threshold"],
                n_flagged=linc["n_flagged"],
                n_changed=linc["n_changed"],
                trust_mean=linc["trust_mean"],
                suspect_cutoff=self._cutoff(manifest, report),
            )
            if test.get("accuracy") is not None:
                result.test_accuracy = test["accuracy"]
                result.test_macro_f1 = test["macro_f1"]
            if linc.get("detection", {}).get("auroc") is not None:
                result.detection_auroc = linc["detection"]["auroc"]
            if "label_accuracy_before" in linc:
                result.label_accuracy_before = linc["label_accuracy_before"]
                result.label_accuracy_after = linc["label_accuracy_after"]
            detectors = report.get("detectors") or {}  # absent in jobs before detectors
            result.detectors.extend(detectors)
            result.flagged_by = str(linc.get("flag_by", "linc"))
            result.correction_skipped = not linc.get("relabelled", True)
            test_stat = linc.get("bimodality") or {}
            if test_stat.get("statistic") is not None:
                result.bimodality = float(test_stat["statistic"])
                result.bimodality_min = float(test_stat["threshold"])
            for name, entry in detectors.items():
                if entry.get("auroc") is not None:
                    result.detector_auroc[name] = float(entry["auroc"])
            return result

        return self._results.get(job_id, load)

    def _active_result(self, job_id: str) -> pb.ActiveJobResult:
        def load() -> pb.ActiveJobResult:
            report = self.jobs.report(job_id)
            try:
                test = report.get("test") or {}
                result = pb.ActiveJobResult(
                    n_train=report["dataset"]["n_train"],
                    n_classes=report["dataset"]["n_classes"],
                    n_clean=report["selection"]["n_clean"],
                    n_relabelled=report["relabelled"]["n"],
                    rounds=report["settings"]["rounds"],
                )
                if test.get("macro_f1") is not None:
                    result.test_macro_f1 = test["macro_f1"]
                if test.get("accuracy") is not None:
                    result.test_accuracy = test["accuracy"]
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                raise CorruptArtifact(
                    f"job {job_id}: report.json does not hold an active cleaning job's results "
                    f"({type(err).__name__}: {err})"
                ) from err
            return result

        return self._results.get(f"active/{job_id}", load)

    def _suspect_cutoff(self, job_id: str) -> float:
        """ScoreLabels' cut-off: the job's calibrated one (both kinds of job)."""
        if not is_active(self.jobs.get(job_id).spec):
            return self._result(job_id).suspect_cutoff
        try:
            return self._cutoff(self.jobs.manifest(job_id), self.jobs.report(job_id))
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptArtifact(f"job {job_id}: no suspect cut-off in its manifest") from err

    def _waiting_round(self, job_id: str) -> int:
        return RelabelBook(self._store(job_id)).waiting() or 0

    @staticmethod
    def _cutoff(manifest: dict[str, Any], report: dict[str, Any]) -> float:
        if "suspect_cutoff" in manifest:
            return float(manifest["suspect_cutoff"])
        return 1.0 / float(report["dataset"]["n_classes"])  # jobs published before calibration

    def _job_message(self, record: JobRecord) -> pb.Job:
        """The Job resource; :class:`CorruptArtifact` (DATA_LOSS) when its stored state or
        results are corrupt or inconsistent."""
        if record.damage:
            raise CorruptArtifact(f"job {record.job_id}: {record.damage}")
        job = self._job_resource(record)
        for field_name in ("create_time", "start_time", "end_time"):
            stamp = _timestamp(getattr(record, field_name))
            if stamp is not None:
                getattr(job, field_name).CopyFrom(stamp)
        active = is_active(record.spec)
        if record.state == SUCCEEDED and active:
            job.active_result.CopyFrom(self._active_result(record.job_id))
        elif record.state == SUCCEEDED:
            job.result.CopyFrom(self._result(record.job_id))
        elif record.state == RUNNING:
            events = self._progress_events(record)
            if events:
                job.progress.CopyFrom(events[-1])
        elif record.state == WAITING_FOR_LABELS:
            job.waiting_round = self._waiting_round(record.job_id)
        return job

    def _job_resource(self, record: JobRecord) -> pb.Job:
        """Name, state, spec (or active_spec), error and artifacts of a job."""
        job = pb.Job(
            name=f"jobs/{record.job_id}",
            state=pb.Job.State.Value(record.state),
            error=record.error,
            artifacts_uri=self._store(record.job_id).url(),
        )
        if is_active(record.spec):
            job.active_spec.CopyFrom(settings_to_active_spec(record.spec, record.idempotency_key))
        else:
            job.spec.CopyFrom(settings_to_spec(record.spec, record.idempotency_key))
        return job

    def _progress_events(self, record: JobRecord) -> list[pb.JobEvent]:
        progress = self.jobs.progress(record.job_id)
        events = []
        # An active job's stages: select, clean, round-1, round-2, ... (in the order stored).
        stages = list(progress) if is_active(record.spec) else ("warmup", "final", "baseline")
        for stage in stages:
            e = progress.get(stage)
            if not isinstance(e, dict) or not e:
                continue
            event = pb.JobEvent(
                name=f"jobs/{record.job_id}",
                state=pb.Job.State.Value(record.state),
                stage=stage,
                epoch=int(e.get("epoch") or 0),
                epochs=int(e.get("epochs") or 0),
                loss=float(e.get("loss") or 0.0),
                trust_mean=float(e.get("trust_mean") or 0.0),
                flagged_fraction=float(e.get("flagged_fraction") or 0.0),
            )
            stamp = _timestamp(e.get("time"))
            if stamp is not None:
                event.time.CopyFrom(stamp)
            events.append(event)
        return events

    def _table(self, job_id: str) -> CorrectionTable:
        def load() -> CorrectionTable:
            data = self._store(job_id).get("trust.csv")
            try:
                return CorrectionTable.parse(data)
            except (KeyError, IndexError, ValueError) as err:  # checksums fine, content not
                # (KeyError: also a source that is not observed, model or expert)
                raise CorruptArtifact(
                    f"job {job_id}: trust.csv is not a corrections table"
                ) from err

        return self._tables.get(job_id, load)

    @contextlib.contextmanager
    def _images(self, images: Any, info: Any) -> Iterator[np.ndarray]:
        """The decoded batch, its cost (headers only) checked against the per-request
        limit and reserved from the process budget until the caller is done with it."""
        inputs: list[ImageInput] = []
        for i, image in enumerate(images):
            kind = image.WhichOneof("data")
            if kind == "encoded":
                inputs.append(EncodedImage(image.encoded))
            elif kind == "tensor":
                inputs.append(TensorImage(tuple(image.tensor.shape), image.tensor.data))
            else:
                raise RequestError(f"images[{i}]: set either encoded or tensor")
        with (
            open_images(
                inputs,
                info,
                max_total=self.max_request_pixels,
                total_setting="NOISESCORE_MAX_REQUEST_PIXELS",
            ) as opened,
            self.pixels.reserve(opened.pixels),
        ):
            yield opened.decode()

    def _model_for(self, job: str, n: int, what: str) -> tuple[str, OnnxModel]:
        """The job id and ONNX model behind a batch of ``n`` ``what`` (checked first)."""
        job_id = parse_job_name(job, field="job")
        self._check_batch(n, what)
        self._succeeded(job_id)
        return job_id, self.models.get(job_id)

    def _check_batch(self, n: int, what: str) -> None:
        if n == 0:
            raise RequestError(f"{what} is empty: send at least one")
        if n > self.max_batch:
            raise TooLarge(
                f"{n} {what} in one request; the limit is {self.max_batch} "
                "(NOISESCORE_MAX_BATCH): split the batch"
            )

    # -------------------------------------------------------------- jobs

    @unary
    def SubmitCleaningJob(
        self, request: pb.SubmitCleaningJobRequest, context: grpc.ServicerContext
    ) -> pb.Job:
        if not request.HasField("spec"):
            raise RequestError("spec is required")
        key = request.spec.idempotency_key
        if len(key) > MAX_IDEMPOTENCY_KEY:
            raise RequestError(f"spec.idempotency_key is longer than {MAX_IDEMPOTENCY_KEY}")
        fields = spec_to_settings_fields(request.spec)
        validate_settings(fields)
        try:
            self.datasets.admit(fields["dataset"])  # DatasetAccessDenied: PERMISSION_DENIED
        except DatasetAccessDenied:
            raise
        except DataError as err:
            raise RequestError(f"spec.dataset_uri: {err}") from err
        # The job checks again where it reads the data, under the same roots (ml.clean).
        fields["dataset_roots"] = list(self.datasets.roots)
        return self._job_message(self.jobs.submit(fields, idempotency_key=key))

    @unary
    def SubmitActiveCleaningJob(
        self, request: pb.SubmitActiveCleaningJobRequest, context: grpc.ServicerContext
    ) -> pb.Job:
        if not request.HasField("spec"):
            raise RequestError("spec is required")
        key = request.spec.idempotency_key
        fields = active_spec_to_settings_fields(request.spec)
        validate_active_settings(fields)
        self._admit_dataset(fields["dataset"])
        fields["dataset_roots"] = list(self.datasets.roots)
        fields["kind"] = ACTIVE  # the runner starts `noisescore active-clean` (not a setting)
        return self._job_message(self.jobs.submit(fields, idempotency_key=key))

    def _admit_dataset(self, dataset: str) -> None:
        try:
            self.datasets.admit(dataset)  # DatasetAccessDenied: PERMISSION_DENIED
        except DatasetAccessDenied:
            raise
        except DataError as err:
            raise RequestError(f"spec.dataset_uri: {err}") from err

    @unary
    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        return self._job_message(self.jobs.get(parse_job_name(request.name)))

    @unary
    def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.ServicerContext
    ) -> pb.ListJobsResponse:
        size = request.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise RequestError(f"page_size must lie in [1, {MAX_PAGE_SIZE}], got {size}")
        state = None
        if request.state != pb.Job.STATE_UNSPECIFIED:
            if request.state not in pb.Job.State.values():  # an open enum: any int32 parses
                raise RequestError(
                    f"state {request.state} is not a job state; use one of {', '.join(STATES)}"
                )
            state = pb.Job.State.Name(request.state)
        offset = _decode_token(request.page_token, {"s": state or ""})
        records = self.jobs.records(state)
        page = records[offset : offset + size]
        response = pb.ListJobsResponse(jobs=[self._listed_job(r) for r in page])
        if offset + size < len(records):
            response.next_page_token = _encode_token({"o": offset + size, "s": state or ""})
        return response

    def _listed_job(self, record: JobRecord) -> pb.Job:
        """A job as ListJobs shows it: one with corrupt stored state is listed FAILED with
        the reason (GetJob on it answers DATA_LOSS) instead of failing the whole list."""
        try:
            return self._job_message(record)
        except CorruptArtifact as err:
            logger.warning("job %s: %s", record.job_id, err)
            job = self._job_resource(record)
            job.state = pb.Job.FAILED
            job.error = (
                "DATA_LOSS: the job's stored artifacts are corrupt or inconsistent "
                f"({public_error(str(err))}); `noisescore verify {record.job_id}` on the "
                "store lists the damage"
            )
            stamp = _timestamp(record.create_time)
            if stamp is not None:
                job.create_time.CopyFrom(stamp)
            return job

    @unary
    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.Job:
        return self._job_message(self.jobs.cancel(parse_job_name(request.name)))

    def _watch_snapshot(self, job_id: str) -> tuple[JobRecord, list[pb.JobEvent], int]:
        record = self.jobs.get(job_id)
        waiting = self._waiting_round(job_id) if record.state == WAITING_FOR_LABELS else 0
        return record, self._progress_events(record), waiting

    async def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.JobEvent]:
        """A state event now and on every change, a progress event per new epoch, until
        the job is terminal. A coroutine on the event loop: it holds no RPC thread."""
        try:
            job_id = parse_job_name(request.name)
            name = f"jobs/{job_id}"
            last_state: tuple[str, int] | None = None
            seen: dict[str, int] = {}
            async with contextlib.aclosing(self.watches.follow(job_id)) as snapshots:
                async for record, events, waiting in snapshots:
                    if (record.state, waiting) != last_state:  # a new round waits: an event
                        last_state = (record.state, waiting)
                        yield pb.JobEvent(
                            name=name,
                            state=pb.Job.State.Value(record.state),
                            waiting_round=waiting,
                        )
                    for event in events:
                        if event.epoch > seen.get(event.stage, 0):
                            seen[event.stage] = event.epoch
                            yield event
                    if record.terminal:
                        return
        except Exception as err:
            status = _status_of(err)
            if status is None:
                raise
            await context.abort(*status)

    async def close_watches(self) -> None:
        """End every open WatchJob stream with UNAVAILABLE (the server is stopping)."""
        await self.watches.close()

    # -------------------------------------------------------------- results

    def _corrections_indices(self, table: CorrectionTable, only_flagged: bool) -> np.ndarray:
        if only_flagged:
            return np.flatnonzero(table.flagged)
        return np.arange(len(table.trust))

    @unary
    def GetCorrections(
        self, request: pb.GetCorrectionsRequest, context: grpc.ServicerContext
    ) -> pb.GetCorrectionsResponse:
        job_id = parse_job_name(request.job, field="job")
        size = request.page_size or DEFAULT_CORRECTIONS_PAGE
        if not 1 <= size <= MAX_CORRECTIONS_PAGE:
            raise RequestError(f"page_size must lie in [1, {MAX_CORRECTIONS_PAGE}], got {size}")
        expected = {"j": job_id, "f": request.only_flagged}
        offset = _decode_token(request.page_token, expected)
        self._succeeded(job_id)
        full = _full_view(request.view)
        indices = self._corrections_indices(self._table(job_id), request.only_flagged)
        page = indices[offset : offset + size]
        response = pb.GetCorrectionsResponse(
            corrections=self._table(job_id).rows(page, full=full), total_size=len(indices)
        )
        if offset + size < len(indices):
            response.next_page_token = _encode_token({**expected, "o": offset + size})
        return response

    @streaming
    def StreamCorrections(
        self, request: pb.StreamCorrectionsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetCorrectionsResponse]:
        job_id = parse_job_name(request.job, field="job")
        chunk = request.chunk_size or DEFAULT_CHUNK
        if not 1 <= chunk <= MAX_CORRECTIONS_PAGE:
            raise RequestError(f"chunk_size must lie in [1, {MAX_CORRECTIONS_PAGE}], got {chunk}")
        full = _full_view(request.view)
        self._succeeded(job_id)
        table = self._table(job_id)
        indices = self._corrections_indices(table, request.only_flagged)
        for start in range(0, max(len(indices), 1), chunk):
            if not context.is_active():
                return
            rows = table.rows(indices[start : start + chunk], full=full)
            yield pb.GetCorrectionsResponse(corrections=rows, total_size=len(indices))

    @unary
    def ScoreLabels(
        self, request: pb.ScoreLabelsRequest, context: grpc.ServicerContext
    ) -> pb.ScoreLabelsResponse:
        job_id, model = self._model_for(request.job, len(request.samples), "samples")
        labels = np.array([s.label for s in request.samples], dtype=np.int64)
        cutoff = self._suspect_cutoff(job_id)
        with self._images((s.image for s in request.samples), model.info) as images:
            probabilities = model.predict_proba(images)
        scores = score_labels(probabilities, labels, cutoff=cutoff)
        return pb.ScoreLabelsResponse(
            scores=[
                pb.LabelScore(
                    sample_id=sample.sample_id,
                    label=sample.label,
                    label_quality=float(scores.label_quality[i]),
                    normalized_margin=float(scores.normalized_margin[i]),
                    predicted_label=int(scores.predicted_label[i]),
                    suspect=bool(scores.suspect[i]),
                )
                for i, sample in enumerate(request.samples)
            ],
            suspect_cutoff=cutoff,
        )

    @unary
    def Predict(
        self, request: pb.PredictRequest, context: grpc.ServicerContext
    ) -> pb.PredictResponse:
        _, model = self._model_for(request.job, len(request.images), "images")
        with self._images(request.images, model.info) as images:
            probabilities = model.predict_proba(images)
        return pb.PredictResponse(
            predictions=[
                pb.Prediction(probabilities=row.tolist(), predicted_label=int(row.argmax()))
                for row in probabilities
            ]
        )

    # -------------------------------------------------------------- relabel rounds

    def _relabel_round(self, job: str, round: int) -> tuple[str, JobRecord, RelabelBook, int]:
        """(job id, record, book, round) of a relabel request; ``round`` 0 = the round the
        job waits for."""
        job_id = parse_job_name(job, field="job")
        if round < 0:
            raise RequestError(
                f"round must be 0 (the round the job waits for) or >= 1, got {round}"
            )
        record = self.jobs.get(job_id)
        if not is_active(record.spec):
            raise NotReady(
                f"job {job_id} is a cleaning job, not an active cleaning job: it has no relabel "
                "rounds (SubmitActiveCleaningJob starts one)"
            )
        book = RelabelBook(self._store(job_id))
        if round == 0:
            round = book.waiting() or 0
            if not round or record.state != WAITING_FOR_LABELS:
                raise NotReady(
                    f"job {job_id} is {record.state}, not waiting for labels: give the round"
                )
        return job_id, record, book, round

    @unary
    def GetRelabelQueue(
        self, request: pb.GetRelabelQueueRequest, context: grpc.ServicerContext
    ) -> pb.RelabelQueue:
        job_id, _, book, round = self._relabel_round(request.job, request.round)
        queue = book.queue(round)  # RoundNotOpen: FAILED_PRECONDITION
        images = None if request.skip_images else book.images(round)
        answers = book.answers(round)
        response = pb.RelabelQueue(
            job=f"jobs/{job_id}",
            round=round,
            closed=book.is_closed(round),
            n_classes=queue.n_classes,
            class_names=list(queue.class_names or ()),
            n_answered=len(answers),
        )
        for i, row in enumerate(queue.rows):
            item = response.items.add(
                index=row.index,
                sample_id=row.sample_id,
                current_label=row.current_label,
                predicted_label=row.predicted_label,
                probabilities=row.probabilities,
                priority=row.score,
            )
            if images is not None:
                item.png = png_bytes(images[i])
            if row.index in answers:
                item.answered_label = answers[row.index].label
        return response

    @unary
    def SubmitRelabels(
        self, request: pb.SubmitRelabelsRequest, context: grpc.ServicerContext
    ) -> pb.SubmitRelabelsResponse:
        job_id, record, book, round = self._relabel_round(request.job, request.round)
        if not request.relabels and not request.close_round:
            raise RequestError("relabels is empty: send at least one, or set close_round")
        if len(request.relabels) > self.max_batch:
            raise TooLarge(
                f"{len(request.relabels)} relabels in one request; the limit is "
                f"{self.max_batch} (NOISESCORE_MAX_BATCH): split them"
            )
        if record.terminal:
            raise NotReady(f"job {job_id} is {record.state}: its relabel rounds take no answers")
        answers = [Answer(r.sample_id, r.label, r.annotator) for r in request.relabels]
        outcome = book.submit(round, answers, source="expert", close=request.close_round)
        response = submit_relabels_response(outcome)
        if not outcome.recorded:  # nothing recorded: every row's reason goes back
            context.set_trailing_metadata([(RELABEL_RESULTS_KEY, response.SerializeToString())])
            raise RequestError(rejected_message(outcome))
        if outcome.closed:
            try:
                self.jobs.resume(job_id)  # the job goes on with the answers
            except (OrchestratorUnavailable, StorageError) as err:  # recorded all the same
                logger.warning("job %s: round %d closed, resume failed: %s", job_id, round, err)
        return response


# ----------------------------------------------------------------------------- registration


class MalformedRequest:
    """What a request that is not a valid message deserializes to (then INVALID_ARGUMENT)."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.message = f"the request is not a valid {type_name} message: {error}"


def _safe_deserializer(message_class: Any) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except Exception as err:  # DecodeError, invalid UTF-8, recursion limits
            return MalformedRequest(message_class.DESCRIPTOR.full_name, err)

    return deserialize


def _checked(request: Any) -> str | None:
    """Why ``request`` is refused before its handler runs (INVALID_ARGUMENT), or None."""
    if isinstance(request, MalformedRequest):
        return request.message
    try:
        check_string_lengths(request)
    except RequestError as err:
        return str(err)
    return None


def _unary_guard(handler: Callable[..., Any]) -> Callable[..., Any]:
    def guarded(request: Any, context: grpc.ServicerContext) -> Any:
        problem = _checked(request)
        if problem is not None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        return handler(request, context)

    return guarded


def _stream_guard(handler: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    def guarded(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        problem = _checked(request)
        if problem is not None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        yield from handler(request, context)

    return guarded


def _async_stream_guard(
    handler: Callable[..., AsyncIterator[Any]],
) -> Callable[..., AsyncIterator[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        problem = _checked(request)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        async for response in handler(request, context):
            yield response

    return guarded


def add_servicer(
    servicer: pb_grpc.NoiseScoringServicer, server: grpc.aio.Server, executor: RpcExecutor
) -> None:
    """Register ``servicer`` on the asyncio ``server`` like the generated
    ``add_NoiseScoringServicer_to_server``, except that

    - a request that does not parse, or has a string field over its cap
      (:func:`check_string_lengths`), is INVALID_ARGUMENT with the reason before the
      handler runs (grpc's default for the first is INTERNAL "Exception deserializing
      request!");
    - blocking methods run in ``executor``'s thread pool behind its admission limit;
      ``async`` ones (``WatchJob``: an async generator) run on the event loop.
    """
    service = pb.DESCRIPTOR.services_by_name["NoiseScoring"]
    handlers = {}
    for method in service.methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        implementation = getattr(servicer, method.name)
        options = dict(
            request_deserializer=_safe_deserializer(request_class),
            response_serializer=response_class.SerializeToString,
        )
        if method.server_streaming and inspect.isasyncgenfunction(implementation):
            behavior: Any = _async_stream_guard(implementation)
        elif method.server_streaming:
            behavior = blocking_stream(_stream_guard(implementation), executor)
        else:
            behavior = blocking_unary(_unary_guard(implementation), executor)
        factory = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = factory(behavior, **options)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
