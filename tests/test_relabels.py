"""The relabel book on a real local store and a real S3 server (rclone serve s3)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import S3Server

from noisescore.jobs import JobStore
from noisescore.relabels import (
    Answer,
    AnswerRecord,
    QueueRow,
    RelabelBook,
    RoundClosed,
    RoundNotOpen,
)
from noisescore.storage import ArtifactStore, CorruptArtifact, LocalStore, S3Store

JOB = "active-job"
N_CLASSES = 4


def _rows(n: int, *, start: int = 0) -> list[QueueRow]:
    rng = np.random.default_rng(start)
    rows = []
    for k in range(n):
        p = rng.dirichlet(np.ones(N_CLASSES))
        rows.append(
            QueueRow(
                index=start + 10 * k,
                sample_id=f"s{start + 10 * k}",
                current_label=k % N_CLASSES,
                predicted_label=int(p.argmax()),
                probabilities=tuple(float(x) for x in p),
                score=float(n - k),
            )
        )
    return rows


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 8, 8), dtype=np.uint8)


@pytest.fixture(params=["local", "s3"])
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], ArtifactStore]]:
    """A function that opens the same store again (a new client each call)."""
    if request.param == "local":
        yield lambda: LocalStore(tmp_path / "store")
        return
    server = S3Server(tmp_path / "s3")
    try:
        server.start()

        def s3() -> ArtifactStore:
            store = S3Store.from_settings(server.settings())
            store.check()
            return store

        yield s3
    finally:
        server.stop()


@pytest.fixture
def book(reopen: Callable[[], ArtifactStore]) -> RelabelBook:
    book = RelabelBook(JobStore(reopen(), JOB))
    book.write_queue(1, _rows(3), _images(3), N_CLASSES, class_names=["a", "b", "c", "d"])
    return book


def _files(book: RelabelBook) -> list[str]:
    return sorted(book.job.store.list(book.job.prefix))


def test_a_queue_round_trips(book: RelabelBook) -> None:
    queue = book.queue(1)
    assert queue.rows == tuple(_rows(3)) and queue.n_classes == N_CLASSES
    assert queue.class_names == ("a", "b", "c", "d") and queue.job_id == JOB
    np.testing.assert_array_equal(book.images(1), _images(3))
    assert book.rounds() == [1] and book.has_queue(1) and not book.has_queue(2)
    with pytest.raises(ValueError, match="already has a queue"):
        book.write_queue(1, _rows(3), _images(3), N_CLASSES)
    with pytest.raises(RoundNotOpen, match="no relabel queue for round 2"):
        book.queue(2)
    with pytest.raises(RoundNotOpen):
        book.submit(2, [Answer("s0", 1, "ann")])


def test_answers_are_recorded_replayed_and_final(book: RelabelBook) -> None:
    first = book.submit(1, [Answer("s0", 2, "alice"), Answer("s10", 0, " bob ")])
    assert first.recorded and not first.closed and (first.n_answered, first.n_queued) == (2, 3)
    assert [r.reason for r in first.rows] == ["recorded", "recorded"]
    record = first.rows[0].recorded
    assert record is not None
    assert (record.index, record.label, record.old_label, record.annotator, record.source) == (
        0, 2, 0, "alice", "expert",
    )  # fmt: skip
    assert first.rows[1].recorded is not None and first.rows[1].recorded.annotator == "bob"
    # The same label again, from anyone: accepted, nothing new is written.
    before = _files(book)
    replay = book.submit(1, [Answer("s0", 2, "carol")])
    assert replay.recorded and replay.rows[0].accepted
    assert "idempotent replay" in replay.rows[0].reason
    assert replay.rows[0].recorded == record  # alice's record, unchanged
    # Another label for an answered sample: refused, and nothing changes.
    changed = book.submit(1, [Answer("s0", 3, "alice")])
    assert not changed.recorded and not changed.rows[0].accepted
    assert changed.rows[0].reason.startswith("duplicate: sample 's0' already has label 2")
    assert _files(book) == before
    assert book.answers(1) == {0: record, 10: first.rows[1].recorded}


def test_bad_rows_record_nothing_and_say_why(book: RelabelBook) -> None:
    before = _files(book)
    rows = [
        Answer("s0", 1, "alice"),  # valid on its own
        Answer("nope", 1, "alice"),
        Answer("s10", N_CLASSES, "alice"),
        Answer("s10", -1, "alice"),
        Answer("s20", 1, "  "),
    ]
    outcome = book.submit(1, rows, close=True)
    assert not outcome.recorded and not outcome.closed and outcome.n_answered == 0
    reasons = [r.reason for r in outcome.rows]
    assert not any(r.accepted for r in outcome.rows)
    assert reasons[0] == "valid, but not recorded: other rows of this request are invalid"
    assert reasons[1] == "unknown sample id 'nope': not in round 1's queue"
    assert reasons[2] == f"label {N_CLASSES} is out of range: use 0..{N_CLASSES - 1}"
    assert reasons[3] == f"label -1 is out of range: use 0..{N_CLASSES - 1}"
    assert reasons[4].startswith("annotator is missing")
    # Two different labels for one sample in one request.
    twice = book.submit(1, [Answer("s0", 1, "a"), Answer("s0", 2, "b")])
    assert not twice.recorded
    assert twice.rows[0].reason == "sample 's0' is given different labels (1, 2)"
    assert _files(book) == before and not book.is_closed(1)
    with pytest.raises(ValueError, match="source must be one of"):
        book.submit(1, [Answer("s0", 1, "a")], source="crowd")


def test_the_round_closes_when_all_are_answered(book: RelabelBook) -> None:
    half = book.submit(1, [Answer("s0", 1, "alice"), Answer("s0", 1, "alice")])
    assert half.recorded and not half.closed and half.n_answered == 1
    rest = book.submit(1, [Answer("s10", 1, "bob"), Answer("s20", 3, "bob")])
    assert rest.closed and rest.n_answered == 3
    closure = book.closure(1)
    assert closure is not None and closure.by == "all answered"
    assert closure.answered == (0, 10, 20) and closure.n_answered == 3
    with pytest.raises(RoundClosed, match=r"round 1 is closed at .* \(all answered\)"):
        book.submit(1, [Answer("s0", 1, "alice")])
    assert sorted(book.answers(1)) == [0, 10, 20]


def test_an_explicit_close_keeps_the_other_labels(book: RelabelBook) -> None:
    outcome = book.submit(1, [Answer("s10", 2, "alice")], close=True)
    assert outcome.recorded and outcome.closed and outcome.n_answered == 1
    closure = book.closure(1)
    assert closure is not None and closure.by == "closed by alice" and closure.answered == (10,)
    assert book.close(1, by="someone else") == closure  # closed once
    assert list(book.answers(1)) == [10]
    with pytest.raises(RoundClosed):
        book.submit(1, [], close=True)


def test_the_audit_survives_a_new_book_and_a_new_process(
    book: RelabelBook, reopen: Callable[[], ArtifactStore], tmp_path: Path
) -> None:
    book.submit(1, [Answer("s0", 1, "alice")])
    book.submit(1, [Answer("s20", 2, "bob")], close=True)
    book.write_queue(2, _rows(2, start=5), _images(2, seed=1), N_CLASSES)
    book.submit(2, [Answer("s5", 3, "oracle")], source="oracle")
    audit = book.audit()
    assert [(r.round, r.sample_id, r.label) for r in audit] == [
        (1, "s0", 1), (1, "s20", 2), (2, "s5", 3),
    ]  # fmt: skip
    again = RelabelBook(JobStore(reopen(), JOB))
    assert again.audit() == audit and again.closure(1) == book.closure(1)
    assert {i: r.label for i, r in again.expert_labels().items()} == {0: 1, 20: 2, 5: 3}
    if isinstance(book.job.store, LocalStore):  # another process reads the same records
        code = (
            "import json, sys; from dataclasses import asdict; "
            "from noisescore.jobs import JobStore; from noisescore.relabels import RelabelBook; "
            "from noisescore.storage import LocalStore; "
            f"book = RelabelBook(JobStore(LocalStore(sys.argv[1]), {JOB!r})); "
            "print(json.dumps([asdict(r) for r in book.audit()]))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(book.job.store.root)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        assert [AnswerRecord(**r) for r in json.loads(out.stdout)] == audit


def test_a_later_round_wins_and_a_late_answer_is_not_used(book: RelabelBook) -> None:
    book.submit(1, [Answer("s0", 1, "alice")], close=True)
    # An answer recorded after the close (a submission that raced it) stays in the audit
    # but is not one of the round's answers.
    late = AnswerRecord(10, "s10", 1, 3, 1, "mallory", "2099-01-01T00:00:00.000Z", "expert")
    book.job.store.claim(book.job.key("rounds/1/answers/10.json"), late.to_bytes())
    assert list(book.answers(1)) == [0] and late in book.audit()
    book.write_queue(2, [_rows(1)[0]], _images(1), N_CLASSES)
    book.submit(2, [Answer("s0", 3, "bob")])
    labels = book.expert_labels()
    assert list(labels) == [0] and labels[0].label == 3 and labels[0].round == 2


def test_concurrent_submitters_agree_on_one_answer(
    book: RelabelBook, reopen: Callable[[], ArtifactStore]
) -> None:
    n = 4
    outcomes: list = [None] * n
    barrier = threading.Barrier(n)

    def submit(k: int) -> None:
        mine = RelabelBook(JobStore(reopen(), JOB))  # its own client, as another replica
        barrier.wait()
        # Everyone answers s10 (each with another label) and s20 (all with the same label).
        outcomes[k] = mine.submit(1, [Answer("s10", k, f"ann{k}"), Answer("s20", 1, f"ann{k}")])

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    answers = book.answers(1)
    winner = answers[10]
    assert winner.label in range(n) and winner.annotator == f"ann{winner.label}"
    assert answers[20].label == 1
    for k, outcome in enumerate(outcomes):
        s10, s20 = outcome.rows
        assert s10.accepted == (k == winner.label), (k, s10)
        if not s10.accepted:
            assert "duplicate" in s10.reason
        if s10.recorded is not None:
            assert s10.recorded == winner
        if outcome.recorded:  # validated before the winner was stored: s20 is recorded too
            assert s20.accepted and s20.recorded == answers[20]
    assert len([r for r in book.audit() if r.index == 10]) == 1


def test_waiting_and_damage(book: RelabelBook) -> None:
    assert book.waiting() is None
    book.set_waiting(1)
    assert book.waiting() == 1
    book.clear_waiting()
    book.clear_waiting()
    assert book.waiting() is None
    book.job.put("waiting.json", b'{"round": "one"}')
    with pytest.raises(CorruptArtifact, match="names no round"):
        book.waiting()
    book.job.put("rounds/1/queue.json", b'{"job_id": "active-job", "round": 1}')
    with pytest.raises(CorruptArtifact, match="is not a relabel queue"):
        book.queue(1)
    book.job.put("rounds/1/queue.json", b"[")
    with pytest.raises(CorruptArtifact, match="not valid JSON"):
        book.submit(1, [Answer("s0", 1, "a")])


def test_a_queue_is_checked_before_it_is_stored(tmp_path: Path) -> None:
    book = RelabelBook(JobStore(LocalStore(tmp_path), JOB))
    rows = _rows(2)
    cases = [
        ((rows, _images(3), N_CLASSES), "shape \\(2, C, H, W\\)"),
        ((rows, _images(2).astype(np.float32), N_CLASSES), "uint8"),
        ((rows, _images(2), 1), "n_classes must be an integer >= 2"),
        (([rows[0], rows[0]], _images(2), N_CLASSES), "lists a index twice"),
        (([], _images(0), N_CLASSES), "at least one sample"),
        ((rows, _images(2), 2), "current_label 2 is not in \\[0, 2\\)|probabilities"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            book.write_queue(1, *args)
    with pytest.raises(ValueError, match="round must be an integer >= 1"):
        book.write_queue(0, rows, _images(2), N_CLASSES)
    assert not book.has_queue(1) and book.job.store.list("") == []
