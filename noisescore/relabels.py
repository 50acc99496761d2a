"""The relabel book of an active-cleaning job: what an expert is asked, and what they answered.

Each round of active label cleaning ranks the noisy samples and asks an expert (or, in
benchmarks, the oracle) for the labels of the top ones. The book keeps, under the job's
folder of the artifact store (:class:`noisescore.jobs.JobStore`):

``rounds/<r>/queue.json``
    The samples of round ``r`` (1, 2, ...) in priority order, written by the flow before it
    waits: ``{"job_id", "round", "created", "n_classes", "class_names", "rows": [{"index",
    "sample_id", "current_label", "predicted_label", "probabilities", "score"}]}``. Its
    presence is what "round ``r`` is open" means.
``rounds/<r>/images.npz``
    The images of those samples, uint8 ``(n, C, H, W)`` in queue order (written before the
    queue), so the service never reads the dataset.
``rounds/<r>/answers/<index>.json``
    One answer per (sample, round), claimed with :meth:`ArtifactStore.claim` (first writer
    wins, on S3 too): ``{"index", "sample_id", "round", "label", "old_label", "annotator",
    "time", "source"}``. Never overwritten, never deleted: the append-only audit record.
    Sending the same label again is an idempotent replay; a different label is refused.
``rounds/<r>/closed.json``
    Claimed once when the round closes (every row answered, or closed on request): ``{"round",
    "closed", "by", "n_answered", "answered"}``. ``answered`` freezes the round's answers:
    one recorded by a submission racing the close is kept in the audit but not used.
``waiting.json``
    ``{"round", "since"}`` while the job waits for an expert.

A submission is validated row by row first; if any row is invalid nothing is recorded and
every row says why (:class:`Submission`). Only a row that loses a race with a concurrent
submitter of another label for the same sample can be refused after the others were
recorded (there is no transaction across objects); it then says so.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np

from noisescore.jobs import JobStore
from noisescore.storage import ArtifactNotFound, CorruptArtifact

__all__ = [
    "NOT_RECORDED",
    "SOURCES",
    "Answer",
    "AnswerRecord",
    "QueueRow",
    "RelabelBook",
    "RelabelQueue",
    "RoundClosed",
    "RoundClosure",
    "RoundNotOpen",
    "RowResult",
    "Submission",
]

SOURCES = ("expert", "oracle")
"""Who answered: a person (through the service or the Prefect UI) or the oracle (the true
labels, for benchmarks)."""

WAITING = "waiting.json"
NOT_RECORDED = "valid, but not recorded: other rows of this request are invalid"
"""The reason of a valid row of a submission that had invalid rows."""
CLAIM_THREADS = 32  # concurrent answer claims: an S3 claim waits ~1.2 s for contenders
_ANSWER_KEY = re.compile(r"answers/(\d+)\.json")
_ROUND_KEY = re.compile(r"rounds/(\d+)/queue\.json")

T = TypeVar("T")


class RoundNotOpen(LookupError):
    """The round has no queue yet (FAILED_PRECONDITION: wait until the job asks)."""

    def __str__(self) -> str:
        return str(self.args[0])


class RoundClosed(RuntimeError):
    """The round is closed: its answers are final (FAILED_PRECONDITION)."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_round(round: int) -> int:
    if not _is_int(round) or round < 1:
        raise ValueError(f"round must be an integer >= 1, got {round!r}")
    return int(round)


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class QueueRow:
    """One sample an expert is asked to relabel.

    Attributes
    ----------
    index : int
        The sample's index in the job's training set.
    sample_id : str
        Its id (``trust.csv``'s ``sample_id``): what the expert answers with.
    current_label : int
        The label it has now, in ``[0, n_classes)``; kept when nobody answers.
    predicted_label : int
        The model's prediction.
    probabilities : tuple of float
        The model's class probabilities, length ``n_classes``.
    score : float
        The sampler's priority (higher = asked first).
    """

    index: int
    sample_id: str
    current_label: int
    predicted_label: int
    probabilities: tuple[float, ...]
    score: float


@dataclass(frozen=True)
class RelabelQueue:
    """``rounds/<r>/queue.json``: the samples of one round, in priority order."""

    job_id: str
    round: int
    created: str
    n_classes: int
    class_names: tuple[str, ...] | None
    rows: tuple[QueueRow, ...]

    def by_sample_id(self) -> dict[str, QueueRow]:
        return {row.sample_id: row for row in self.rows}


@dataclass(frozen=True)
class Answer:
    """A label an annotator gives a sample of a round's queue."""

    sample_id: str
    label: int
    annotator: str


@dataclass(frozen=True)
class AnswerRecord:
    """``rounds/<r>/answers/<index>.json``: an answer as recorded (the audit record).

    Attributes
    ----------
    index, sample_id : int, str
        The sample.
    round : int
    label, old_label : int
        The label given, and the one the sample had when it was queued.
    annotator : str
        Who gave it.
    time : str
        When it was recorded, ISO-8601 UTC.
    source : str
        One of :data:`SOURCES`.
    """

    index: int
    sample_id: str
    round: int
    label: int
    old_label: int
    annotator: str
    time: str
    source: str

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> AnswerRecord:
        """Parse a stored answer; :class:`CorruptArtifact` names ``where`` if it is not one."""
        try:
            fields = json.loads(data)
            record = cls(
                index=fields["index"], sample_id=fields["sample_id"], round=fields["round"],
                label=fields["label"], old_label=fields["old_label"],
                annotator=fields["annotator"], time=fields["time"], source=fields["source"],
            )  # fmt: skip
        except (ValueError, TypeError, KeyError, RecursionError) as err:
            raise CorruptArtifact(f"{where} is not an answer record: {err}") from err
        ints = (record.index, record.round, record.label, record.old_label)
        strings = (record.sample_id, record.annotator, record.time, record.source)
        if not all(_is_int(v) for v in ints) or not all(isinstance(v, str) for v in strings):
            raise CorruptArtifact(f"{where} is not an answer record: a field has the wrong type")
        return record


@dataclass(frozen=True)
class RowResult:
    """What became of one row of a submission.

    Attributes
    ----------
    sample_id : str
    accepted : bool
        The answer is recorded (now, or identically before: an idempotent replay).
    reason : str
        Why it was refused, or how it was accepted.
    recorded : AnswerRecord or None
        The stored record of this (sample, round), when there is one.
    """

    sample_id: str
    accepted: bool
    reason: str
    recorded: AnswerRecord | None = None


@dataclass(frozen=True)
class Submission:
    """The outcome of :meth:`RelabelBook.submit`.

    Attributes
    ----------
    rows : list of RowResult
        One per submitted answer, in order.
    recorded : bool
        False when a row was invalid: then nothing was recorded (and the round was not
        closed).
    closed : bool
        The round is closed after this submission.
    n_answered, n_queued : int
        Answers of the round now, and rows of its queue.
    """

    rows: list[RowResult]
    recorded: bool
    closed: bool
    n_answered: int
    n_queued: int

    @property
    def rejected(self) -> list[RowResult]:
        return [row for row in self.rows if not row.accepted]


@dataclass(frozen=True)
class RoundClosure:
    """``rounds/<r>/closed.json``."""

    round: int
    closed: str
    by: str
    n_answered: int
    answered: tuple[int, ...]


# ----------------------------------------------------------------------------- the book


class RelabelBook:
    """Queues, answers and closures of the relabel rounds of one job.

    Parameters
    ----------
    job : JobStore
        The job; every read and write goes through its store.
    """

    def __init__(self, job: JobStore) -> None:
        self.job = job

    def __repr__(self) -> str:
        return f"RelabelBook({self.job!r})"

    # -- keys

    @staticmethod
    def _name(round: int, name: str) -> str:
        return f"rounds/{_check_round(round)}/{name}"

    def _read(self, name: str) -> bytes:
        return self.job.get(name, verify=False)

    def _json(self, name: str) -> Any:
        data = self._read(name)
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as err:
            raise CorruptArtifact(f"{self.job.url(name)} is not valid JSON: {err}") from err

    # -- queues (written by the flow)

    def write_queue(
        self,
        round: int,
        rows: Sequence[QueueRow],
        images: np.ndarray,
        n_classes: int,
        *,
        class_names: Sequence[str] | None = None,
    ) -> RelabelQueue:
        """Open round ``round``: store its images, then its queue (last: the round is open
        from then on).

        Parameters
        ----------
        round : int
            1, 2, ...
        rows : sequence of QueueRow
            The samples to ask, in priority order; unique indices and sample ids.
        images : np.ndarray
            uint8, shape ``(len(rows), C, H, W)`` with ``C`` 1 or 3 channels, in row order.
        n_classes : int
            Labels lie in ``[0, n_classes)``.
        class_names : sequence of str, optional
            One per class, shown to annotators.

        Raises
        ------
        ValueError
            If the rows or images are inconsistent, or the round already has a queue (a
            resumed flow reads the stored one: :meth:`has_queue`).
        """
        round = _check_round(round)
        if self.has_queue(round):
            raise ValueError(
                f"job {self.job.job_id}: round {round} already has a queue; read it with "
                "queue() instead of ranking again (its answers refer to it)"
            )
        rows = list(rows)
        _check_queue(rows, images, n_classes, class_names)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, images=np.ascontiguousarray(images))
        self.job.put(self._name(round, "images.npz"), buffer.getvalue())
        queue = RelabelQueue(
            job_id=self.job.job_id, round=round, created=_now(), n_classes=int(n_classes),
            class_names=tuple(class_names) if class_names is not None else None,
            rows=tuple(rows),
        )  # fmt: skip
        text = json.dumps(
            {
                "job_id": queue.job_id,
                "round": queue.round,
                "created": queue.created,
                "n_classes": queue.n_classes,
                "class_names": list(queue.class_names) if queue.class_names else None,
                "rows": [{**asdict(row), "probabilities": list(row.probabilities)} for row in rows],
            },
            indent=1,
            allow_nan=False,
        )
        self.job.put(
            self._name(round, "queue.json"), text.encode(), content_type="application/json"
        )
        return queue

    def has_queue(self, round: int) -> bool:
        """Whether round ``round`` is open (has a queue)."""
        return self.job.exists(self._name(round, "queue.json"))

    def rounds(self) -> list[int]:
        """The rounds that have a queue, ascending."""
        found = []
        for key in self.job.store.list(self.job.prefix + "rounds/"):
            match = _ROUND_KEY.fullmatch(key[len(self.job.prefix) :])
            if match:
                found.append(int(match.group(1)))
        return sorted(found)

    def queue(self, round: int) -> RelabelQueue:
        """The queue of round ``round``.

        Raises
        ------
        RoundNotOpen
            If it has none yet.
        CorruptArtifact
            If ``queue.json`` is not a valid queue of this job and round.
        """
        name = self._name(round, "queue.json")
        try:
            stored = self._json(name)
        except ArtifactNotFound as err:
            raise RoundNotOpen(
                f"job {self.job.job_id} has no relabel queue for round {round} (yet)"
            ) from err
        where = self.job.url(name)
        try:
            queue = _parse_queue(stored)
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptArtifact(f"{where} is not a relabel queue: {err}") from err
        if queue.round != round or queue.job_id != self.job.job_id:
            raise CorruptArtifact(
                f"{where} is the queue of job {queue.job_id} round {queue.round}, not of job "
                f"{self.job.job_id} round {round}"
            )
        return queue

    def images(self, round: int) -> np.ndarray:
        """The images of round ``round``'s queue: uint8 ``(n, C, H, W)`` in queue order.

        Raises
        ------
        RoundNotOpen
            If the round has no queue.
        CorruptArtifact
            If they are missing or do not match the queue.
        """
        n = len(self.queue(round).rows)
        name = self._name(round, "images.npz")
        where = self.job.url(name)
        try:
            data = self._read(name)
        except ArtifactNotFound as err:
            raise CorruptArtifact(f"{where} is missing but round {round} has a queue") from err
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                images = archive["images"]
        except (ValueError, KeyError, OSError, EOFError) as err:
            raise CorruptArtifact(f"{where} is not an images archive: {err}") from err
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != n:
            raise CorruptArtifact(
                f"{where} holds {images.dtype} {images.shape}; expected uint8 ({n}, C, H, W)"
            )
        return images

    # -- answers

    def _answer_name(self, round: int, index: int) -> str:
        return self._name(round, f"answers/{int(index)}.json")

    def answered(self, round: int) -> set[int]:
        """The indices with a stored answer in round ``round`` (one listing; unfrozen)."""
        prefix = self.job.prefix + self._name(round, "")
        found = set()
        for key in self.job.store.list(prefix):
            match = _ANSWER_KEY.fullmatch(key[len(prefix) :])
            if match:
                found.add(int(match.group(1)))
        return found

    def _answer(self, round: int, index: int) -> AnswerRecord:
        name = self._answer_name(round, index)
        return AnswerRecord.from_bytes(self._read(name), self.job.url(name))

    def _answers(self, round: int, indices: Sequence[int]) -> dict[int, AnswerRecord]:
        records = _parallel(lambda i: self._answer(round, i), sorted(indices))
        return dict(zip(sorted(indices), records, strict=True))

    def answers(self, round: int) -> dict[int, AnswerRecord]:
        """The answers of round ``round`` by sample index; once the round is closed, those
        its closure froze."""
        indices = self.answered(round)
        closure = self.closure(round)
        if closure is not None:
            indices &= set(closure.answered)
        return self._answers(round, sorted(indices))

    def submit(
        self,
        round: int,
        answers: Sequence[Answer],
        *,
        source: str = "expert",
        close: bool = False,
    ) -> Submission:
        """Record ``answers`` for round ``round``; all of them or, if any is invalid, none.

        A row is invalid when its sample id is not in the round's queue, its label is not
        in ``[0, n_classes)``, its annotator is empty, the sample already has another
        label in this round ("duplicate": answers are final), or the request gives the
        sample two different labels. The same label again is accepted (idempotent replay).
        The round closes when every row of its queue has an answer, or with ``close``
        (unanswered samples keep their current label).

        Parameters
        ----------
        round : int
        answers : sequence of Answer
            May be empty with ``close`` (close without answering).
        source : str
            ``"expert"`` or ``"oracle"``.
        close : bool
            Close the round after recording.

        Raises
        ------
        RoundNotOpen
            If the round has no queue.
        RoundClosed
            If it is already closed.
        """
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        queue = self.queue(round)
        if self.is_closed(round):
            raise RoundClosed(self._closed_message(round))
        rows = queue.by_sample_id()
        answered = self.answered(round)
        asked = [rows[a.sample_id].index for a in answers if _known(rows, a.sample_id)]
        stored = self._answers(round, sorted(set(asked) & answered))
        problems = _validate(answers, rows, queue.n_classes, stored, round)
        if any(problems):
            results = [
                RowResult(a.sample_id, False, problem or NOT_RECORDED)
                for a, problem in zip(answers, problems, strict=True)
            ]
            return Submission(results, False, False, len(answered), len(queue.rows))
        time = _now()
        new: dict[int, AnswerRecord] = {}
        for a in answers:
            row = rows[a.sample_id]
            if row.index not in stored and row.index not in new:
                new[row.index] = AnswerRecord(
                    index=row.index, sample_id=row.sample_id, round=queue.round,
                    label=int(a.label), old_label=row.current_label,
                    annotator=a.annotator.strip(), time=time, source=source,
                )  # fmt: skip
        claimed = _parallel(lambda r: self._claim(round, r), list(new.values()))
        won = dict(zip(new, claimed, strict=True))
        closure = self.closure(round)
        results = []
        for a in answers:
            index = rows[a.sample_id].index
            record = stored.get(index) or won[index]
            if record.label != a.label:
                reason, ok = _duplicate(a, record), False  # lost a race to another label
            elif closure is not None and index not in closure.answered:
                reason, ok = f"round {round} closed before this answer was recorded", False
            elif index in stored or record != new[index]:
                reason, ok = "already recorded with this label (idempotent replay)", True
            else:
                reason, ok = "recorded", True
            results.append(RowResult(a.sample_id, ok, reason, record))
        answered = self.answered(round)
        if closure is None and (close or answered >= {row.index for row in queue.rows}):
            annotators = sorted({a.annotator.strip() for a in answers})
            by = "all answered" if not close else f"closed by {', '.join(annotators) or source}"
            closure = self.close(round, by=by)
        return Submission(results, True, closure is not None, len(answered), len(queue.rows))

    def _claim(self, round: int, record: AnswerRecord) -> AnswerRecord:
        name = self._answer_name(round, record.index)
        data = self.job.store.claim(self.job.key(name), record.to_bytes())
        return AnswerRecord.from_bytes(data, self.job.url(name))

    # -- closing

    def closure(self, round: int) -> RoundClosure | None:
        """``closed.json`` of the round, or None while it is open."""
        name = self._name(round, "closed.json")
        try:
            stored = self._json(name)
        except ArtifactNotFound:
            return None
        try:
            closure = RoundClosure(
                round=stored["round"], closed=stored["closed"], by=stored["by"],
                n_answered=stored["n_answered"],
                answered=tuple(int(i) for i in stored["answered"]),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptArtifact(f"{self.job.url(name)} is not a round closure: {err}") from err
        return closure

    def is_closed(self, round: int) -> bool:
        return self.job.exists(self._name(round, "closed.json"))

    def close(self, round: int, by: str) -> RoundClosure:
        """Close round ``round`` (once: a second call returns the first closure), freezing
        its answers; ``by`` says who or why (``"all answered"``, ``"closed by <name>"``,
        ``"oracle"``)."""
        self.queue(round)  # RoundNotOpen
        answered = sorted(self.answered(round))
        closure = {
            "round": _check_round(round), "closed": _now(), "by": by,
            "n_answered": len(answered), "answered": answered,
        }  # fmt: skip
        name = self._name(round, "closed.json")
        self.job.store.claim(self.job.key(name), json.dumps(closure).encode() + b"\n")
        result = self.closure(round)
        assert result is not None  # claimed just now
        return result

    def _closed_message(self, round: int) -> str:
        closure = self.closure(round)
        when = f" at {closure.closed} ({closure.by})" if closure is not None else ""
        return f"job {self.job.job_id}: round {round} is closed{when}; its answers are final"

    # -- history

    def audit(self) -> list[AnswerRecord]:
        """Every answer ever recorded, in every round, oldest first."""
        records: list[AnswerRecord] = []
        for round in self.rounds():
            records += self._answers(round, sorted(self.answered(round))).values()
        return sorted(records, key=lambda r: (r.time, r.round, r.index))

    def expert_labels(self) -> dict[int, AnswerRecord]:
        """The latest answer of every relabelled sample (a later round wins)."""
        labels: dict[int, AnswerRecord] = {}
        for round in self.rounds():
            labels.update(self.answers(round))
        return labels

    # -- waiting for an expert

    def set_waiting(self, round: int) -> None:
        """Say the job waits for the answers of round ``round``."""
        text = json.dumps({"round": _check_round(round), "since": _now()})
        self.job.put(WAITING, text.encode() + b"\n", content_type="application/json")

    def waiting(self) -> int | None:
        """The round the job waits for, or None."""
        try:
            stored = self._json(WAITING)
        except ArtifactNotFound:
            return None
        round = stored.get("round") if isinstance(stored, dict) else None
        if round is None or not _is_int(round) or round < 1:
            raise CorruptArtifact(f"{self.job.url(WAITING)} names no round: {stored!r:.200}")
        return int(round)

    def clear_waiting(self) -> None:
        """The job no longer waits (idempotent)."""
        if self.job.exists(WAITING):
            self.job.store.delete(self.job.key(WAITING))


# ----------------------------------------------------------------------------- helpers


def _parallel(function: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
    """``[function(x) for x in items]``, concurrently when there are several (store round
    trips, S3 claims that wait for contenders)."""
    if len(items) <= 1:
        return [function(x) for x in items]
    with ThreadPoolExecutor(min(CLAIM_THREADS, len(items))) as pool:
        return list(pool.map(function, items))


def _known(rows: dict[str, QueueRow], sample_id: Any) -> bool:
    return isinstance(sample_id, str) and sample_id in rows


def _duplicate(answer: Answer, record: AnswerRecord) -> str:
    return (
        f"duplicate: sample {answer.sample_id!r} already has label {record.label} in round "
        f"{record.round} (by {record.annotator} at {record.time}); an answer is final"
    )


def _validate(
    answers: Sequence[Answer],
    rows: dict[str, QueueRow],
    n_classes: int,
    stored: dict[int, AnswerRecord],
    round: int,
) -> list[str]:
    """One problem per answer ("" = valid)."""
    labels: dict[str, set[Any]] = {}
    for a in answers:
        labels.setdefault(a.sample_id, set()).add(a.label)
    problems = []
    for a in answers:
        if not _known(rows, a.sample_id):
            problems.append(f"unknown sample id {a.sample_id!r:.200}: not in round {round}'s queue")
        elif not _is_int(a.label) or not 0 <= a.label < n_classes:
            problems.append(f"label {a.label!r} is out of range: use 0..{n_classes - 1}")
        elif not isinstance(a.annotator, str) or not a.annotator.strip():
            problems.append("annotator is missing: say who gave the label")
        elif len(labels[a.sample_id]) > 1:
            given = ", ".join(str(x) for x in sorted(labels[a.sample_id], key=str))
            problems.append(f"sample {a.sample_id!r} is given different labels ({given})")
        elif rows[a.sample_id].index in stored:
            record = stored[rows[a.sample_id].index]
            problems.append("" if record.label == a.label else _duplicate(a, record))
        else:
            problems.append("")
    return problems


def _check_queue(
    rows: list[QueueRow], images: np.ndarray, n_classes: int, class_names: Sequence[str] | None
) -> None:
    if not _is_int(n_classes) or n_classes < 2:
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    if not rows:
        raise ValueError("a relabel round needs at least one sample")
    if class_names is not None and len(class_names) != n_classes:
        raise ValueError(f"{len(class_names)} class names for {n_classes} classes")
    for name, values in (
        ("index", [r.index for r in rows]),
        ("sample_id", [r.sample_id for r in rows]),
    ):
        if len(set(values)) != len(values):
            raise ValueError(f"the queue lists a {name} twice")
    for row in rows:
        where = f"queue row {row.sample_id!r}"
        if not isinstance(row.sample_id, str) or not row.sample_id:
            raise ValueError(f"{where}: sample_id must be a non-empty string")
        if not _is_int(row.index) or row.index < 0:
            raise ValueError(f"{where}: index must be an integer >= 0, got {row.index!r}")
        for field in ("current_label", "predicted_label"):
            value = getattr(row, field)
            if not _is_int(value) or not 0 <= value < n_classes:
                raise ValueError(f"{where}: {field} {value!r} is not in [0, {n_classes})")
        if len(row.probabilities) != n_classes or not all(
            math.isfinite(p) for p in row.probabilities
        ):
            raise ValueError(f"{where}: probabilities must be {n_classes} finite numbers")
        if not math.isfinite(row.score):
            raise ValueError(f"{where}: score must be finite, got {row.score!r}")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(
            f"images must be a uint8 array, got {getattr(images, 'dtype', images)!r:.80}"
        )
    if images.ndim != 4 or images.shape[0] != len(rows) or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images must have shape ({len(rows)}, C, H, W) with C 1 or 3, got {images.shape}"
        )


def _parse_queue(stored: Any) -> RelabelQueue:
    if not isinstance(stored, dict):
        raise TypeError(f"expected an object, found {type(stored).__name__}")
    n_classes = stored["n_classes"]
    rows = [
        QueueRow(
            index=row["index"],
            sample_id=row["sample_id"],
            current_label=row["current_label"],
            predicted_label=row["predicted_label"],
            probabilities=tuple(float(p) for p in row["probabilities"]),
            score=float(row["score"]),
        )
        for row in stored["rows"]
    ]
    names = stored.get("class_names")
    class_names = tuple(str(n) for n in names) if names else None
    if not _is_int(stored["round"]) or not isinstance(stored["job_id"], str):
        raise ValueError("round or job_id has the wrong type")
    _check_queue(rows, np.zeros((len(rows), 1, 1, 1), np.uint8), n_classes, class_names)
    return RelabelQueue(
        job_id=stored["job_id"], round=stored["round"], created=str(stored.get("created", "")),
        n_classes=n_classes, class_names=class_names, rows=tuple(rows),
    )  # fmt: skip
