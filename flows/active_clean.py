"""The Prefect flow ``active-clean``: active label cleaning with an expert in the loop.

    start_job -> load_dataset -> imbalance_and_noise -> lnl_select -> train_clean
              -> [round r: rank -> request_labels -> await_labels -> fine_tune] x M
              -> evaluate -> export_onnx -> publish

Khanal et al., MICCAI 2024 (:mod:`noisescore.ml.active`): a learning-with-noisy-labels
method (Co-teaching VOG by default) selects a clean set, a new model trains on it, and in
each round an expert relabels the ``budget`` suspects a sampler ranks first; the model is
fine-tuned on the grown set after each round.

Waiting for the expert holds no GPU. The round's queue goes to the store
(``rounds/<r>/queue.json`` + images, :class:`noisescore.relabels.RelabelBook`), then:

- ``expert=oracle`` (benchmarks): the true labels answer at once;
- a run of a **deployment** suspends (``suspend_flow_run`` with the typed
  :class:`RelabelInput`, so the Prefect UI shows a form) and its infrastructure goes
  away; answers come from that form or from the service's ``SubmitRelabels``, which
  records them in the store and resumes the run;
- a run **in this process** (``noisescore active-clean``, the service's local runner)
  ends with ``status = waiting_for_labels`` (the CLI exits 75): answers go into the store
  (``noisescore relabel submit`` / ``SubmitRelabels``), and running the same job id again
  continues.

Every stage is checkpointed in the store (the selection, the learner after each round)
and every answer is an immutable audit record there, so a resumed run recomputes
nothing it already has and a restarted service loses no answer.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Any, cast

import numpy as np
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.input import RunInput
from prefect.runtime import deployment, flow_run
from prefect.states import Failed
from pydantic import BaseModel, Field

from noisescore import __version__
from noisescore.flows.clean_labels import (
    InvalidParameters,
    JobAlreadyPublished,
    Progress,
    announce_store,
    check_parameters,
    compute_task,
    default_job_id,
    export_onnx,
    job_spec,
    load_dataset,
    model_bytes,
    save,
    storage_task,
)
from noisescore.jobs import MANIFEST, JobLease, JobStore
from noisescore.ml import active as stages
from noisescore.ml.clean import PreparedData, TrainedRun
from noisescore.ml.data import Dataset
from noisescore.ml.imbalance import long_tailed
from noisescore.ml.metrics import suspect_cutoff
from noisescore.ml.outputs import json_bytes, npy_bytes
from noisescore.relabels import Answer, QueueRow, RelabelBook
from noisescore.settings import ActiveSettings, StoreSettings
from noisescore.storage import ArtifactRef, open_store

SELECTION = "checkpoints/selection.npz"
LEARNER = "checkpoints/learner.pt"
WAITING = "waiting_for_labels"
EXIT_WAITING = 75  # EX_TEMPFAIL: the CLI's exit status while a round waits for an expert


class RelabelRow(BaseModel):
    sample_id: str = Field(description="the sample's id as the queue lists it")
    label: int = Field(ge=0, description="the correct class index")


class RelabelInput(RunInput):
    """What an expert answers for one round, in the Prefect UI's resume form.

    Give ``rows`` or paste ``answers_csv`` (``sample_id,label`` lines); an empty answer
    means the answers are already in the store (the service's ``SubmitRelabels``)."""

    rows: list[RelabelRow] = Field(default_factory=list)
    answers_csv: str = Field("", description="sample_id,label per line (optional)")
    annotator: str = Field("prefect-ui", description="who answered (kept in the audit record)")


# ----------------------------------------------------------------------------- tasks


@storage_task("start-active-job")
def start_job(job: JobStore, settings: ActiveSettings) -> ArtifactRef:
    """Record the spec (once: a resumed run keeps the first); a published job is final."""
    job.store.check()
    if job.is_complete():
        raise JobAlreadyPublished(
            f"job {job.job_id} is already complete ({job.url(MANIFEST)}); "
            "published jobs are immutable: use a new job id"
        )
    if job.exists("spec.json"):
        return job.ref("spec.json")
    return job.put("spec.json", job_spec(job.job_id, settings, kind="active"))


@compute_task("imbalance-and-noise")
def imbalance_and_noise(
    dataset: Dataset, settings: ActiveSettings
) -> tuple[PreparedData, dict[str, Any] | None]:
    """The long-tailed subset (``imbalance``), then noise injected with the truth kept."""
    from noisescore.ml import clean

    report = None
    if settings.imbalance is not None:
        dataset, report = long_tailed(dataset, ratio=settings.imbalance, seed=settings.seed)
        get_run_logger().info(
            "long-tailed subset r=%g: %d of %d train samples, per class %s",
            settings.imbalance,
            report["n_after"],
            report["n_before"],
            report["counts_after"],
        )
    data = clean.add_noise(dataset, settings)
    if data.noise is not None:
        get_run_logger().info(
            "injected %s: %.3f of train labels flipped", data.noise.spec, data.noise.realised_rate
        )
    return data, report


@storage_task("reuse-selection")
def reuse_selection(job: JobStore, fingerprint: str) -> stages.CleanSelection | None:
    if not job.exists(SELECTION):
        return None
    try:
        selection = stages.CleanSelection.from_bytes(
            job.get(SELECTION, verify=False), fingerprint=fingerprint
        )
    except ValueError as err:
        get_run_logger().warning("not reusing %s: %s", job.url(SELECTION), err)
        return None
    get_run_logger().info("reusing the clean selection %s", job.url(SELECTION))
    return selection


@compute_task("lnl-select")
def lnl_select(
    data: PreparedData, settings: ActiveSettings, progress: Progress
) -> stages.CleanSelection:
    """Phase 1: the learning-with-noisy-labels method selects the clean set."""
    hook = progress.hook("select", len(data.train_labels), epochs=settings.epochs)
    selection = stages.select_clean(data, settings, hooks=[hook])
    n_clean, n = int(selection.clean.sum()), len(selection.clean)
    line = f"{settings.lnl_method}: {n_clean} of {n} kept as clean"
    if data.train_true is not None:
        m = stages.selection_metrics(
            selection.clean, data.train_labels, data.train_true, data.dataset.n_classes
        )
        line += (
            f" (precision {m['precision']:.3f}, worst-class recall {m['worst_class_recall']:.3f})"
        )
    get_run_logger().info(line)
    return selection


@storage_task("reuse-learner")
def reuse_learner(job: JobStore, learner: stages.Learner, fingerprint: str) -> int | None:
    """Restore the learner stored after its last finished round; returns that round."""
    if not job.exists(LEARNER):
        return None
    try:
        meta = learner.load_state_bytes(job.get(LEARNER, verify=False), fingerprint=fingerprint)
    except ValueError as err:
        get_run_logger().warning("not reusing %s: %s", job.url(LEARNER), err)
        return None
    done = int(meta["round"])
    get_run_logger().info("resuming after round %d (%s)", done, job.url(LEARNER))
    return done


@compute_task("train-clean")
def train_clean(
    learner: stages.Learner, labels: stages.Labels, settings: ActiveSettings, progress: Progress
) -> stages.Phase:
    """A new model, plain CE on the clean set with the labels it has (observed)."""
    indices = np.flatnonzero(labels.labelled)
    hook = progress.hook("clean", len(indices), epochs=settings.clean_epochs)
    phase = learner.fit(
        indices,
        labels.labels[indices],
        epochs=settings.clean_epochs,
        round=0,
        n_relabelled=0,
        hooks=[hook],
    )
    _log_phase(phase)
    return phase


@compute_task("rank")
def rank(
    learner: stages.Learner, labels: stages.Labels, settings: ActiveSettings, round: int
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The sampler's ``budget`` first suspects of the pool."""
    rows, images = stages.rank_suspects(learner, labels, settings, round)
    get_run_logger().info(
        "round %d: %s ranked %d of %d pool samples for relabelling",
        round,
        settings.sampler,
        len(rows),
        len(labels.pool()),
    )
    return rows, images


@storage_task("request-labels")
def request_labels(
    book: RelabelBook, round: int, rows: list[dict[str, Any]], images: np.ndarray, n_classes: int
) -> None:
    """Store the round's queue (rows and images) for the expert."""
    queue_rows = [
        QueueRow(
            index=r["index"],
            sample_id=r["sample_id"],
            current_label=r["current_label"],
            predicted_label=r["predicted_label"],
            probabilities=tuple(r["probabilities"]),
            score=r["score"],
        )
        for r in rows
    ]
    book.write_queue(round, queue_rows, images, n_classes)
    create_table_artifact(
        key=f"queue-{book.job.job_id}-r{round}"[:63].lower().rstrip("-"),
        table=[
            {
                "sample_id": r["sample_id"],
                "current_label": r["current_label"],
                "predicted_label": r["predicted_label"],
                "priority": r["score"],
            }
            for r in rows
        ],
        description=f"round {round} of job {book.job.job_id}: samples to relabel",
    )


@storage_task("await-labels")
def answers_in_store(book: RelabelBook, round: int) -> dict[int, int] | None:
    """The round's answers when the round is closed, else ``None``."""
    if not book.is_closed(round):
        return None
    return {index: record.label for index, record in book.answers(round).items()}


@storage_task("record-answers")
def record_answers(
    book: RelabelBook, round: int, answers: list[Answer], source: str
) -> dict[int, int]:
    """Record answers (oracle or the UI form) and close the round."""
    rejected = book.submit(round, answers, source=source, close=True).rejected
    if rejected:
        reasons = "; ".join(f"{r.sample_id}: {r.reason}" for r in rejected[:10])
        raise ValueError(f"round {round}: {len(rejected)} answers rejected: {reasons}")
    return {index: record.label for index, record in book.answers(round).items()}


@compute_task("fine-tune")
def fine_tune(
    learner: stages.Learner,
    labels: stages.Labels,
    settings: ActiveSettings,
    round: int,
    progress: Progress,
) -> stages.Phase:
    """Fine-tune on the clean set plus every answer so far."""
    indices = np.flatnonzero(labels.labelled)
    hook = progress.hook(f"round-{round}", len(indices), epochs=settings.fine_tune_epochs)
    phase = learner.fit(
        indices,
        labels.labels[indices],
        epochs=settings.fine_tune_epochs,
        round=round,
        n_relabelled=labels.n_relabelled,
        hooks=[hook],
    )
    _log_phase(phase)
    return phase


@compute_task("evaluate")
def evaluate(
    settings: ActiveSettings,
    data: PreparedData,
    imbalance: dict[str, Any] | None,
    selection: stages.CleanSelection,
    learner: stages.Learner,
    labels: stages.Labels,
) -> dict[str, Any]:
    report = stages.active_report(settings, data, imbalance, selection, learner, labels)
    proba = learner.predict_proba(learner.train_images)
    # ScoreLabels flags new samples whose label quality falls where the noisy pool's did.
    report["suspect_cutoff"] = suspect_cutoff(proba, data.train_labels, ~selection.clean)
    test = report.get("test") or {}
    if test:
        get_run_logger().info(
            "test accuracy %.4f, macro-F1 %.4f after %d relabels",
            test["accuracy"],
            test["macro_f1"],
            labels.n_relabelled,
        )
    return report


@storage_task("publish")
def publish(
    job: JobStore, refs: list[ArtifactRef], parity: Any, report: dict[str, Any], rounds: int
) -> dict[str, Any]:
    """``manifest.json`` last, listing every file the job keeps, the relabel rounds'
    queues and answers included."""
    listed = {ref.name for ref in refs}
    for key in job.store.list(job.prefix):
        name = key[len(job.prefix) :]
        if name.startswith(("rounds/", "checkpoints/", "progress.json")) and name not in listed:
            refs = [*refs, job.ref(name)]
    manifest_ref = job.write_manifest(
        refs,
        kind="active",
        onnx_parity=parity.as_dict(),
        suspect_cutoff=report["suspect_cutoff"],
        noisescore_version=__version__,
        flow_run_id=str(flow_run.id) if flow_run.id else None,
    )
    test = report.get("test") or {}
    summary: dict[str, Any] = {
        "job_id": job.job_id,
        "status": "complete",
        "url": job.url(),
        "manifest_sha256": manifest_ref.sha256,
        "completed": datetime.now(UTC).isoformat(),
        "n_train": report["dataset"]["n_train"],
        "n_clean": report["selection"]["n_clean"],
        "rounds": rounds,
        "n_relabelled": report["relabelled"]["n"],
        "test_macro_f1": test.get("macro_f1"),
        "test_accuracy": test.get("accuracy"),
    }
    table = [
        "| round | labelled | relabelled | best epoch | val macro-F1 | test macro-F1 |",
        "|---:|---:|---:|---:|---:|---:|",
    ] + [
        f"| {p['round']} | {p['n_labelled']} | {p['n_relabelled']} | {p['best_epoch']} | "
        f"{_fmt(p['val_macro_f1'])} | {_fmt(p['test_macro_f1'])} |"
        for p in report["rounds"]
    ]
    create_markdown_artifact(
        key=f"job-{job.job_id}"[:63].rstrip("-"),
        markdown="\n".join(
            ["## noisescore active cleaning job", "", "| | |", "|---|---|"]
            + [f"| {k} | {v} |" for k, v in summary.items()]
            + ["", "### Macro-F1 after each round", "", *table]
        ),
        description=f"noisescore active cleaning job {job.job_id}",
    )
    get_run_logger().info("job %s complete: %s", job.job_id, job.url())
    return summary


# ----------------------------------------------------------------------------- the flow


@flow(name="active-clean", log_prints=True, validate_parameters=False)
def active_clean(
    settings: ActiveSettings | None = None,
    job_id: str | None = None,
) -> dict[str, Any]:
    """Select a clean set, then relabel the most useful suspects with an expert, round by
    round; store every artifact, queue and answer.

    Parameters
    ----------
    settings : ActiveSettings
        The same typed settings as ``noisescore active-clean``'s flags.
    job_id : str, optional
        Folder ``jobs/<job_id>/`` of the store; default: this flow run's id. Running the
        same id again resumes the job (after a failure, or once a waiting round has its
        answers).

    Returns the job summary, or ``{"status": "waiting_for_labels", "round": r, ...}`` when
    a run outside a deployment reached a round that has no answers yet.
    """
    try:
        if isinstance(settings, dict):  # the service's job record names its kind
            settings = {k: v for k, v in settings.items() if k != "kind"}
        settings, job_id = check_parameters(settings, job_id, ActiveSettings)
    except InvalidParameters as err:
        get_run_logger().error("invalid parameters: %s", err)
        return cast(dict[str, Any], Failed(message=f"invalid parameters: {err}"))
    store_settings = StoreSettings()
    job = JobStore(open_store(store_settings), job_id or default_job_id())
    announce_store(job, store_settings)
    progress = Progress(job, settings)
    book = RelabelBook(job)
    with JobLease(job, store_settings.job_lease_ttl), progress.tracking():
        refs = [start_job(job, settings)]
        dataset = load_dataset(settings)
        data, imbalance = imbalance_and_noise(dataset, settings)
        if settings.expert == "oracle" and data.train_true is None:
            raise ValueError(_no_truth())
        refs.append(save(job, "noisy_labels.npy", npy_bytes(data.train_labels)))

        selection_fp = stages.fingerprint(settings, data, stages.SELECTION_FIELDS)
        selection = reuse_selection(job, selection_fp)
        if selection is None:
            selection = lnl_select(data, settings, progress)
            refs.append(save(job, SELECTION, selection.to_bytes(fingerprint=selection_fp)))

        learner = stages.Learner(data, settings)
        labels = stages.Labels.start(selection.clean, data.train_labels)
        learner_fp = stages.fingerprint(settings, data, stages.LEARNER_FIELDS)
        done = reuse_learner(job, learner, learner_fp)
        for r in range(1, (done or 0) + 1):  # the answers of finished rounds, from the audit
            labels.answer(r, answers_in_store(book, r) or {})
        if done is None:
            train_clean(learner, labels, settings, progress)
            save(job, LEARNER, learner.state_bytes(fingerprint=learner_fp, extra={"round": 0}))
            done = 0

        for r in range(done + 1, settings.rounds + 1):
            answers = answers_in_store(book, r)
            if answers is None:
                if not book.has_queue(r):
                    rows, images = rank(learner, labels, settings, r)
                    request_labels(book, r, rows, images, data.dataset.n_classes)
                answers = await_labels(book, r, settings, data)
                if answers is None:
                    progress.outcome = "waiting_for_labels"
                    return waiting(job, book, r)
            labels.answer(r, answers)
            fine_tune(learner, labels, settings, r, progress)
            save(job, LEARNER, learner.state_bytes(fingerprint=learner_fp, extra={"round": r}))
        book.clear_waiting()

        report = evaluate(settings, data, imbalance, selection, learner, labels)
        report["job"] = {"id": job.job_id, "url": job.url()}
        run = TrainedRun(learner.model, learner.train_images, [], 0.0)
        onnx_bytes, parity = export_onnx(run, data, settings)
        refs.append(save(job, "trust.csv", corrections_csv(data, selection, labels)))
        refs.append(save(job, "model.pt", model_bytes(run, settings, data.dataset)))
        refs.append(save(job, "model.onnx", onnx_bytes))
        refs.append(save(job, "report.json", json_bytes(report)))
        return publish(job, refs, parity, report, settings.rounds)


def await_labels(
    book: RelabelBook, round: int, settings: ActiveSettings, data: PreparedData
) -> dict[int, int] | None:
    """The round's answers: the oracle's at once; in a deployment run, suspend until the
    expert answers (UI form or ``SubmitRelabels``); else ``None`` (the caller stops and
    the job waits, holding nothing)."""
    logger = get_run_logger()
    queue = book.queue(round)
    if settings.expert == "oracle":
        truth = stages.Oracle(data).answer([row.index for row in queue.rows])
        answers = [Answer(row.sample_id, truth[row.index], "oracle") for row in queue.rows]
        return record_answers(book, round, answers, "oracle")
    book.set_waiting(round)
    logger.info(
        "round %d waits for an expert: %d samples in %s (answer with `noisescore relabel "
        "submit`, the service's SubmitRelabels, or the Prefect UI's resume form)",
        round,
        len(queue.rows),
        book.job.url(f"rounds/{round}/queue.json"),
    )
    if not deployment.id:
        return None
    from prefect.flow_runs import suspend_flow_run

    answer = suspend_flow_run(
        wait_for_input=RelabelInput, key=f"round-{round}", timeout=int(settings.label_timeout)
    )
    stored = answers_in_store(book, round)
    if stored is not None:
        return stored
    if answer is None:
        raise ValueError(f"round {round} was resumed without answers")
    rows = [Answer(r.sample_id, r.label, answer.annotator) for r in answer.rows]
    rows += parse_answers_csv(answer.answers_csv, answer.annotator)
    return record_answers(book, round, rows, "expert")


def waiting(job: JobStore, book: RelabelBook, round: int) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "status": WAITING,
        "round": round,
        "url": job.url(),
        "queue": job.url(f"rounds/{round}/queue.json"),
        "n_queued": len(book.queue(round).rows),
    }


# ----------------------------------------------------------------------------- helpers


def _log_phase(phase: stages.Phase) -> None:
    f1 = "n/a" if phase.test_macro_f1 is None else f"{phase.test_macro_f1:.4f}"
    val = "n/a" if phase.val_macro_f1 is None else f"{phase.val_macro_f1:.4f}"
    get_run_logger().info(
        "round %d: %d labelled (%d relabelled), best val macro-F1 %s at epoch %d, test "
        "macro-F1 there %s",
        phase.round,
        phase.n_labelled,
        phase.n_relabelled,
        val,
        phase.best_epoch,
        f1,
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _no_truth() -> str:
    return (
        "expert=oracle answers with the true labels, and this dataset has none: inject "
        "noise (--noise) or use a manifest with a true_label column, or let a human answer "
        "(--expert human)"
    )


def parse_answers_csv(text: str, annotator: str) -> list[Answer]:
    """``sample_id,label[,annotator]`` lines (a header line is skipped)."""
    answers = []
    for row in csv.reader(io.StringIO(text)):
        if not row or not row[0].strip() or row[0].strip() == "sample_id":
            continue
        if len(row) < 2:
            raise ValueError(f"answer {row!r}: expected sample_id,label")
        try:
            label = int(row[1])
        except ValueError:
            raise ValueError(f"answer {row!r}: label {row[1]!r} is not an integer") from None
        who = row[2].strip() if len(row) > 2 and row[2].strip() else annotator
        answers.append(Answer(row[0].strip(), label, who))
    return answers


def corrections_csv(
    data: PreparedData, selection: stages.CleanSelection, labels: stages.Labels
) -> bytes:
    """``trust.csv`` of an active job: ``index,sample_id,observed_label,trust,flagged,
    corrected_label[,true_label],source,relabel_round[,vog]`` (trust = how consistently the
    selection kept the sample; flagged = in the noisy pool; source = expert | observed)."""
    columns = stages.corrections(data, selection, labels)
    truth = data.train_true
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["index", "sample_id", "observed_label", "trust", "flagged", "corrected_label"]
    if truth is not None:
        header.append("true_label")
    header += ["source", "relabel_round"]
    if selection.vog is not None:
        header.append("vog")
    writer.writerow(header)
    ids = data.dataset.train.sample_ids
    for i in range(len(data.train_labels)):
        row: list[Any] = [
            i,
            ids[i],
            int(data.train_labels[i]),
            f"{columns['trust'][i]:.6f}",
            int(columns["flagged"][i]),
            int(columns["corrected_label"][i]),
        ]
        if truth is not None:
            row.append(int(truth[i]))
        row += [columns["source"][i], int(columns["relabel_round"][i])]
        if selection.vog is not None:
            row.append(f"{selection.vog[i]:.6g}")
        writer.writerow(row)
    return buffer.getvalue().encode()
