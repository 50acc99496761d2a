"""Relabel rounds over gRPC: a real server on a free loopback port, a real JobManager whose
"active-clean" child is a small real process that speaks the flow's contract (write the
round's queue and waiting.json, exit 75; publish once its rounds are closed)."""

from __future__ import annotations

import contextlib
import io
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from noisescore import cli
from noisescore.client import NoiseScoringClient, RelabelsRejected
from noisescore.jobs import JobStore
from noisescore.relabels import RelabelBook
from noisescore.service.jobs import FAILED, RECORD, WAITING_FOR_LABELS, JobManager, JobRecord
from noisescore.service.server import Service
from noisescore.service.servicer import RELABEL_RESULTS_KEY, NoiseScoringServicer
from noisescore.settings import ServiceSettings
from noisescore.storage import LocalStore
from noisescore.v1 import noise_scoring_pb2 as pb
from noisescore.v1 import noise_scoring_pb2_grpc as pb_grpc

PER_ROUND = 3
TIMEOUT = 60.0

# The stand-in for `noisescore active-clean`: real BreastMNIST images, the flow's store
# contract (noisescore.relabels), no training. Its report says only what it knows.
CHILD = r"""
import json, os, sys
import numpy as np
from noisescore.jobs import JobStore
from noisescore.relabels import QueueRow, RelabelBook
from noisescore.storage import LocalStore

job_id = sys.argv[sys.argv.index("--job-id") + 1]
rounds, per_round = int(os.environ["FAKE_ROUNDS"]), int(os.environ["FAKE_PER_ROUND"])
job = JobStore(LocalStore(os.environ["FAKE_STORE"]), job_id)
book = RelabelBook(job)
with np.load(os.environ["FAKE_DATA"]) as data:
    images, labels = data["train_images"], data["train_labels"].ravel().astype(int)
for r in range(1, rounds + 1):
    if book.is_closed(r):
        continue
    if not book.has_queue(r):
        idx = list(range(per_round * (r - 1), per_round * r))
        rows = [
            QueueRow(i, f"s{i}", int(labels[i]), int(1 - labels[i]), (0.25, 0.75), float(9 - k))
            for k, i in enumerate(idx)
        ]
        book.write_queue(r, rows, images[idx][:, None], 2, class_names=["malignant", "benign"])
    book.set_waiting(r)
    sys.exit(75)
book.clear_waiting()
expert = book.expert_labels()
n = per_round * rounds + 2
lines = ["index,sample_id,observed_label,trust,flagged,corrected_label,source,relabel_round"]
for i in range(n):
    rec = expert.get(i)
    new, source, r = (rec.label, "expert", rec.round) if rec else (labels[i], "observed", 0)
    lines.append(f"{i},s{i},{labels[i]},0.5,{int(i < n - 2)},{new},{source},{r}")
report = {
    "kind": "active", "dataset": {"n_train": n, "n_classes": 2},
    "selection": {"n_clean": 2}, "relabelled": {"n": len(expert)},
    "settings": {"rounds": rounds}, "test": None,
}
refs = [
    job.put("trust.csv", ("\n".join(lines) + "\n").encode()),
    job.put("report.json", json.dumps(report).encode()),
]
job.write_manifest(refs, kind="active", suspect_cutoff=0.5)
"""


def _child(job_id: str, args: list[str]) -> list[str]:
    return [sys.executable, "-c", CHILD, *args]


@contextlib.contextmanager
def _serving(
    root: Path, data_dir: Path, *, rounds: int = 2, command: Callable[..., list[str]] = _child
) -> Iterator[tuple[NoiseScoringClient, JobManager, str]]:
    env = {
        "FAKE_STORE": str(root), "FAKE_DATA": str(data_dir / "breastmnist.npz"),
        "FAKE_ROUNDS": str(rounds), "FAKE_PER_ROUND": str(PER_ROUND),
    }  # fmt: skip
    jobs = JobManager(LocalStore(root), command=command, env=env)
    settings = ServiceSettings(grpc_addr="127.0.0.1:0", metrics_addr=None)  # type: ignore[call-arg]
    service = Service(NoiseScoringServicer(jobs, max_batch=8), settings).start()
    try:
        target = f"127.0.0.1:{service.port}"
        with NoiseScoringClient(target, timeout=TIMEOUT) as client:
            yield client, jobs, target
    finally:
        service.stop(grace=1)
        jobs.shutdown(cancel=True)


def _until(client: NoiseScoringClient, job: str, ok: Callable[[pb.Job], bool]) -> pb.Job:
    deadline = time.monotonic() + TIMEOUT
    while True:
        got = client.get(job)
        if ok(got):
            return got
        assert got.state != pb.Job.FAILED, got.error
        assert time.monotonic() < deadline, f"still {pb.Job.State.Name(got.state)}"
        time.sleep(0.1)


def _waiting(client: NoiseScoringClient, job: str, round: int) -> pb.Job:
    return _until(
        client, job, lambda j: j.state == pb.Job.WAITING_FOR_LABELS and j.waiting_round == round
    )


def _seen(events: list[pb.JobEvent], state: int, round: int) -> bool:
    return any(e.state == state and e.waiting_round == round for e in list(events))


def _code(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def _train(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(data_dir / "breastmnist.npz") as data:
        return data["train_images"], data["train_labels"].ravel()


def _submit(client: NoiseScoringClient) -> pb.Job:
    return client.submit_active(
        "medmnist://breastmnist", noise="symmetric:0.4", expert="human", rounds=2,
        budget=PER_ROUND, sampler="entropy",
    )  # fmt: skip


def test_a_job_waits_is_answered_resumes_and_finishes(tmp_path: Path, data_dir: Path) -> None:
    root = tmp_path / "store"
    images, labels = _train(data_dir)
    with _serving(root, data_dir) as (client, jobs, _):
        job = _submit(client)
        assert job.active_spec.sampler == "entropy" and job.active_spec.rounds == 2
        assert not job.spec.dataset_uri and job.active_spec.dataset_uri == "medmnist://breastmnist"
        events: list[pb.JobEvent] = []
        watcher = threading.Thread(target=lambda: events.extend(client.watch(job.name, timeout=60)))
        watcher.start()

        waiting = _waiting(client, job.name, 1)
        assert not waiting.HasField("end_time")
        listed = list(client.list(state="WAITING_FOR_LABELS"))
        assert [j.name for j in listed] == [job.name] and listed[0].waiting_round == 1
        assert jobs.counts()[WAITING_FOR_LABELS] == 1
        with jobs._lock:  # the worker slot is free while the job waits
            assert job.name.split("/")[1] not in jobs._running

        # The queue of the round it waits for, each image as a PNG of the stored pixels.
        queue = client.relabel_queue(job.name)
        assert (queue.round, queue.closed, queue.n_classes) == (1, False, 2)
        assert list(queue.class_names) == ["malignant", "benign"]
        assert [i.sample_id for i in queue.items] == ["s0", "s1", "s2"]
        for item in queue.items:
            png = np.asarray(Image.open(io.BytesIO(item.png)))
            np.testing.assert_array_equal(png, images[item.index])
            assert item.current_label == labels[item.index] and not item.HasField("answered_label")
            assert list(item.probabilities) == [0.25, 0.75]
        assert all(not i.png for i in client.relabel_queue(job.name, images=False).items)

        # Bad rows: INVALID_ARGUMENT, every row's reason, nothing recorded.
        book = RelabelBook(JobStore(LocalStore(root), job.name.split("/")[1]))
        with pytest.raises(RelabelsRejected) as rejected:
            client.submit_relabels(
                job.name, 1, [("s0", 1, "dr-a"), ("s9", 1, "dr-a"), ("s1", 2, "dr-a"),
                              ("s2", 0, "")],
            )  # fmt: skip
        assert "3 of 4 relabels are invalid, nothing was recorded" in rejected.value.details
        assert "relabels[1] (sample_id 's9'): unknown sample id" in rejected.value.details
        reasons = [r.reason for r in rejected.value.response.results]
        assert reasons[0].startswith("valid, but not recorded")
        assert reasons[2] == "label 2 is out of range: use 0..1"
        assert reasons[3].startswith("annotator is missing")
        assert book.answered(1) == set()

        # Accepted, replayed, refused as a duplicate.
        answer = client.submit_relabels(job.name, 1, [("s0", 1, "dr-a"), ("s1", 0, "dr-a")])
        assert [r.accepted for r in answer.results] == [True, True]
        assert (answer.round_closed, answer.n_answered, answer.n_queued) == (False, 2, 3)
        replay = client.submit_relabels(job.name, 1, [("s0", 1, "dr-b")])
        assert replay.results[0].accepted and "idempotent replay" in replay.results[0].reason
        with pytest.raises(RelabelsRejected, match="duplicate: sample 's0' already has label 1"):
            client.submit_relabels(job.name, 1, [("s0", 0, "dr-b")])
        assert client.relabel_queue(job.name).items[0].answered_label == 1

        # The last answer closes the round: the job runs again and waits for round 2.
        # (WatchJob polls every 0.5 s: let the watcher see round 1 first.)
        _until(client, job.name, lambda j: _seen(events, pb.Job.WAITING_FOR_LABELS, 1))
        last = client.submit_relabels(job.name, 0, [("s2", 1, "dr-a")])
        assert last.round_closed and last.n_answered == 3
        _waiting(client, job.name, 2)
        err = _code(lambda: client.submit_relabels(job.name, 1, [("s0", 1, "dr-a")]))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "round 1 is closed" in err.details()
        closed = client.relabel_queue(job.name, round=1, images=False)
        assert closed.closed and closed.n_answered == 3

        _until(client, job.name, lambda j: _seen(events, pb.Job.WAITING_FOR_LABELS, 2))
        # Close round 2 with one answer: the others keep their labels; the job finishes.
        end = client.submit_relabels(job.name, 2, [("s4", 1, "dr-c")], close_round=True)
        assert end.round_closed and (end.n_answered, end.n_queued) == (1, 3)
        done = _until(client, job.name, lambda j: j.state == pb.Job.SUCCEEDED)
        watcher.join(timeout=60)
        assert done.active_result.n_relabelled == 4 and done.active_result.rounds == 2
        assert not done.active_result.HasField("test_macro_f1")  # this child does not test

        rows = {c.sample_id: c for c in client.corrections(job.name)}
        expert = {
            s: rows[s].corrected_label for s in rows if rows[s].source == pb.Correction.EXPERT
        }
        assert expert == {"s0": 1, "s1": 0, "s2": 1, "s4": 1}
        assert rows["s3"].source == pb.Correction.OBSERVED
        assert rows["s3"].corrected_label == labels[3]
        err = _code(lambda: client.submit_relabels(job.name, 2, [("s3", 1, "dr-a")]))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION

    states = [(pb.Job.State.Name(e.state), e.waiting_round) for e in events if not e.stage]
    assert ("WAITING_FOR_LABELS", 1) in states and ("WAITING_FOR_LABELS", 2) in states
    assert states.index(("WAITING_FOR_LABELS", 1)) < states.index(("WAITING_FOR_LABELS", 2))
    assert states[-1] == ("SUCCEEDED", 0)
    audit = book.audit()
    assert [(a.round, a.sample_id, a.label, a.annotator) for a in audit] == [
        (1, "s0", 1, "dr-a"), (1, "s1", 0, "dr-a"), (1, "s2", 1, "dr-a"), (2, "s4", 1, "dr-c"),
    ]  # fmt: skip
    assert all(a.old_label == labels[a.index] and a.source == "expert" for a in audit)


def test_answers_and_waiting_jobs_survive_a_restart(tmp_path: Path, data_dir: Path) -> None:
    root = tmp_path / "store"
    with _serving(root, data_dir, rounds=1) as (client, _, _):
        job = _submit(client)
        _waiting(client, job.name, 1)
        client.submit_relabels(job.name, 1, [("s1", 0, "dr-a")])
        before = RelabelBook(JobStore(LocalStore(root), job.name.split("/")[1])).audit()
    with _serving(root, data_dir, rounds=1) as (client, _, _):  # a new service, same store
        got = _waiting(client, job.name, 1)
        assert got.active_spec.expert == "human"
        queue = client.relabel_queue(job.name, images=False)
        answered = [i.answered_label if i.HasField("answered_label") else None for i in queue.items]
        assert answered == [None, 0, None]
        replay = client.submit_relabels(job.name, 1, [("s1", 0, "dr-z")])
        assert "idempotent replay" in replay.results[0].reason
    job_id = job.name.split("/")[1]
    book = RelabelBook(JobStore(LocalStore(root), job_id))
    assert book.audit() == before
    # The round is closed while no service runs: the next one relaunches the job.
    book.close(1, by="closed by dr-a")
    with _serving(root, data_dir, rounds=1) as (client, _, _):
        done = _until(client, job.name, lambda j: j.state == pb.Job.SUCCEEDED)
        assert done.active_result.n_relabelled == 1


def test_relabel_errors(tmp_path: Path, data_dir: Path) -> None:
    root = tmp_path / "store"
    store = LocalStore(root)
    clean = JobRecord(
        "clean-job", FAILED, {"dataset": "medmnist://breastmnist"}, "2026-01-01T00:00:00Z"
    )
    JobStore(store, "clean-job").put(RECORD, clean.to_bytes())
    with _serving(root, data_dir, rounds=1) as (client, _, _):
        job = _submit(client)
        _waiting(client, job.name, 1)
        cases: list[tuple[Callable[[], Any], grpc.StatusCode, str]] = [
            (lambda: client.relabel_queue("jobs/nope"), grpc.StatusCode.NOT_FOUND, "not found"),
            (lambda: client.relabel_queue("x/y"), grpc.StatusCode.INVALID_ARGUMENT, "invalid job"),
            (lambda: client.relabel_queue("clean-job"), grpc.StatusCode.FAILED_PRECONDITION,
             "not an active cleaning job"),
            (lambda: client.relabel_queue(job.name, round=-1), grpc.StatusCode.INVALID_ARGUMENT,
             "round must be 0"),
            (lambda: client.relabel_queue(job.name, round=5), grpc.StatusCode.FAILED_PRECONDITION,
             "no relabel queue for round 5"),
            (lambda: client.submit_relabels(job.name, 1, []), grpc.StatusCode.INVALID_ARGUMENT,
             "relabels is empty"),
            (lambda: client.submit_relabels(job.name, 1, [("s0", 0, "a")] * 9),
             grpc.StatusCode.RESOURCE_EXHAUSTED, "the limit is 8"),
            (lambda: client.submit_relabels(job.name, 1, [("s0", 0, "a" * 129)]),
             grpc.StatusCode.INVALID_ARGUMENT, "annotator is 129 characters long"),
            (lambda: client.submit_active("medmnist://breastmnist", sampler="magic"),
             grpc.StatusCode.INVALID_ARGUMENT, "spec.sampler"),
            (lambda: client.submit_active("medmnist://breastmnist", lnl_method="coteaching"),
             grpc.StatusCode.INVALID_ARGUMENT, "forget_rate is needed"),
            (lambda: client.submit_active("medmnist://breastmnist", imbalance=-2),
             grpc.StatusCode.INVALID_ARGUMENT, "spec.imbalance"),
        ]  # fmt: skip
        for call, code, text in cases:
            err = _code(call)
            assert (err.code(), text in (err.details() or "")) == (code, True), err.details()
        # The raw reply: INVALID_ARGUMENT with every row's result in the trailing metadata.
        stub = pb_grpc.NoiseScoringStub(client.channel)
        bad = pb.SubmitRelabelsRequest(
            job=job.name, round=1, relabels=[pb.Relabel(sample_id="s0", label=7, annotator="a")]
        )
        err = _code(lambda: stub.SubmitRelabels(bad, timeout=TIMEOUT))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        sent = dict(err.trailing_metadata())[RELABEL_RESULTS_KEY]
        rows = pb.SubmitRelabelsResponse.FromString(sent).results
        assert [(r.sample_id, r.accepted, r.reason) for r in rows] == [
            ("s0", False, "label 7 is out of range: use 0..1")
        ]
        # A stored queue that is not one: DATA_LOSS, and GetJob still answers.
        JobStore(store, job.name.split("/")[1]).put("rounds/1/queue.json", b'{"rows": 3}')
        err = _code(lambda: client.relabel_queue(job.name))
        assert err.code() == grpc.StatusCode.DATA_LOSS and "not a relabel queue" in err.details()
        assert client.get(job.name).state == pb.Job.WAITING_FOR_LABELS


def test_a_child_that_waits_again_for_an_answered_round_fails(
    tmp_path: Path, data_dir: Path
) -> None:
    """A flow bug must not relaunch the job forever: waiting again for the round it was
    resumed with is FAILED."""
    stuck = CHILD.replace("if book.is_closed(r):\n        continue", "pass")
    assert stuck != CHILD
    command = lambda job_id, args: [sys.executable, "-c", stuck, *args]  # noqa: E731
    with _serving(tmp_path / "store", data_dir, rounds=1, command=command) as (client, _, _):
        job = _submit(client)
        _waiting(client, job.name, 1)
        client.submit_relabels(job.name, 1, [], close_round=True)
        failed = _until(client, job.name, lambda j: j.state == pb.Job.FAILED)
        assert "stopped again to wait for that round" in failed.error


def test_the_relabel_cli(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, _ = _train(data_dir)
    with _serving(tmp_path / "store", data_dir, rounds=1) as (client, _, target):
        job = _submit(client)
        _waiting(client, job.name, 1)
        server = ["--server", target]
        pngs = tmp_path / "pngs"
        assert (
            cli.main(["relabel", "queue", "--job", job.name, "--images", str(pngs), *server]) == 0
        )
        out = capsys.readouterr()
        lines = out.out.splitlines()
        assert lines[0] == "sample_id,current_label,predicted_label,priority"
        assert [line.split(",")[0] for line in lines[1:]] == ["s0", "s1", "s2"]
        assert "round 1: 3 samples, 0 answered, open" in out.err
        np.testing.assert_array_equal(np.asarray(Image.open(pngs / "s2.png")), images[2])

        answers = tmp_path / "answers.csv"
        answers.write_text("sample_id,label\ns0,1\nnope,0\n")
        code = cli.main(["relabel", "submit", "--job", job.name, "--round", "1",
                         "--csv", str(answers), "--annotator", "dr-a", *server])  # fmt: skip
        out = capsys.readouterr()
        assert code == 1 and "INVALID_ARGUMENT" in out.err
        assert "nope,0,unknown sample id 'nope': not in round 1's queue" in out.out
        answers.write_text("sample_id,label,annotator\ns0,1,dr-b\ns1,0,\n")
        code = cli.main(["relabel", "submit", "--job", job.name, "--csv", str(answers),
                         "--annotator", "dr-a", "--close", *server])  # fmt: skip
        out = capsys.readouterr()
        assert code == 0 and out.out.splitlines()[1:] == ["s0,1,recorded", "s1,1,recorded"]
        assert "2 of 3 answered, round closed" in out.err
        answers.write_text("sample_id,label\ns0,x\n")
        assert cli.main(["relabel", "submit", "--job", job.name, "--csv", str(answers),
                         "--annotator", "a", *server]) == 2  # fmt: skip
        assert "line 2: label 'x' is not an integer" in capsys.readouterr().err
        audit = RelabelBook(JobStore(LocalStore(tmp_path / "store"), job.name[5:])).audit()
        assert {(a.sample_id, a.annotator) for a in audit} == {("s0", "dr-b"), ("s1", "dr-a")}
        _until(client, job.name, lambda j: j.state == pb.Job.SUCCEEDED)


def test_prefect_mode_waits_while_the_run_is_paused_and_resumes_it(
    prefect_api: str, tmp_path: Path
) -> None:
    """A real flow run paused for the flow's RelabelInput is WAITING_FOR_LABELS; closing the
    round resumes it through the Prefect API (empty input: the answers are in the store)."""
    from prefect import flow
    from prefect.runtime import flow_run

    from noisescore.flows.active_clean import RelabelInput
    from noisescore.service.jobs import PrefectJobManager

    store = LocalStore(tmp_path / "store")
    job = JobStore(store, "prefect-active")
    book = RelabelBook(job)
    seen: dict[str, Any] = {}

    @flow(name="waits-for-labels")
    def waits_for_labels() -> None:
        from prefect.flow_runs import pause_flow_run

        seen["id"] = str(flow_run.id)
        seen["input"] = pause_flow_run(
            wait_for_input=RelabelInput, timeout=120, poll_interval=1, key="round-1"
        )
        job.write_manifest([])

    thread = threading.Thread(target=waits_for_labels)
    thread.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while "id" not in seen:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        spec = {"kind": "active", "dataset": "medmnist://breastmnist", "expert": "human"}
        record = JobRecord(
            job.job_id, "QUEUED", spec, "2026-01-01T00:00:00Z", flow_run_id=seen["id"]
        )
        job.put(RECORD, record.to_bytes())
        images = np.zeros((1, 1, 4, 4), np.uint8)
        from noisescore.relabels import QueueRow

        book.write_queue(1, [QueueRow(0, "s0", 0, 1, (0.4, 0.6), 1.0)], images, 2)
        book.set_waiting(1)
        jobs = PrefectJobManager(store)
        try:
            deadline = time.monotonic() + TIMEOUT
            while jobs.get(job.job_id).state != WAITING_FOR_LABELS:
                assert time.monotonic() < deadline, jobs.get(job.job_id).state
                time.sleep(0.2)
            assert jobs.resume(job.job_id).state == WAITING_FOR_LABELS  # the round is open
            time.sleep(2)  # the flow polls every second: it would have been resumed by now
            assert "input" not in seen and jobs.get(job.job_id).state == WAITING_FOR_LABELS
            from noisescore.relabels import Answer

            assert book.submit(1, [Answer("s0", 1, "dr-a")]).closed
            jobs.resume(job.job_id)
            thread.join(timeout=TIMEOUT)
            assert not thread.is_alive()
            assert seen["input"].rows == [] and seen["input"].annotator == "prefect-ui"
            deadline = time.monotonic() + TIMEOUT
            while jobs.get(job.job_id).state != "SUCCEEDED":
                assert time.monotonic() < deadline, jobs.get(job.job_id)
                time.sleep(0.2)
        finally:
            jobs.shutdown()
    finally:
        thread.join(timeout=TIMEOUT)


@pytest.mark.slow
def test_the_real_active_clean_job_waits_is_answered_and_finishes(
    tmp_path: Path, data_dir: Path
) -> None:
    """The service's default child, `noisescore active-clean`, on BreastMNIST for a few
    epochs: it waits for round 1, the answers go in over SubmitRelabels, it resumes from its
    checkpoints and publishes; GetCorrections gives the answers as EXPERT labels."""
    from noisescore.service.app import create_app

    store = LocalStore(tmp_path / "store")
    settings = ServiceSettings(grpc_addr="127.0.0.1:0", metrics_addr=None)  # type: ignore[call-arg]
    app = create_app(settings, store=store, job_env={"NOISESCORE_DATA_DIR": str(data_dir)}).start()
    try:
        with NoiseScoringClient(f"127.0.0.1:{app.port}", timeout=TIMEOUT) as client:
            job = client.submit_active(
                "medmnist://breastmnist", noise="symmetric:0.4", lnl_method="coteaching",
                epochs=2, clean_epochs=1, rounds=1, budget=4, fine_tune_epochs=1,
                expert="human", device="cpu", seed=0,
            )  # fmt: skip
            deadline = time.monotonic() + 300
            while (got := client.get(job.name)).state != pb.Job.WAITING_FOR_LABELS:
                assert got.state not in (pb.Job.FAILED, pb.Job.SUCCEEDED), got.error
                assert time.monotonic() < deadline
                time.sleep(1)
            assert got.waiting_round == 1
            queue = client.relabel_queue(job.name)
            assert len(queue.items) == 4 and all(item.png for item in queue.items)
            answers = [(i.sample_id, 1 - i.current_label, "dr-e2e") for i in queue.items]
            reply = client.submit_relabels(job.name, queue.round, answers)
            assert reply.round_closed and all(r.accepted for r in reply.results)
            while (got := client.get(job.name)).state != pb.Job.SUCCEEDED:
                assert got.state != pb.Job.FAILED, got.error
                assert time.monotonic() < deadline
                time.sleep(1)
            assert got.active_result.n_relabelled == 4 and got.active_result.rounds == 1
            expert = {
                c.sample_id: c.corrected_label
                for c in client.corrections(job.name)
                if c.source == pb.Correction.EXPERT
            }
            assert expert == {sample_id: label for sample_id, label, _ in answers}
    finally:
        app.stop(grace=1)
