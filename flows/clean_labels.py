"""The Prefect flow ``clean_labels``: one cleaning job, step by step, artifacts in a store.

    start_job -> load_dataset -> inject_noise -> reuse_warmup | linc_warmup -> otsu_correct
              -> train_final [-> train_baseline] -> evaluate -> export_onnx -> publish

Each step is a task calling one stage of :mod:`noisescore.ml.clean`; what a step
produces goes to the job's folder ``jobs/<job_id>/`` of the artifact store through the
``save`` task, whose retries with exponential backoff (storage errors only) are declared
on it. ``manifest.json`` is written last by ``publish``: until it exists the job is not
complete, whatever else is there. A rerun of a failed job (same ``job_id``; a retry from
the Prefect UI keeps the flow run id, which is the default job id) reuses the stored
warm-up checkpoint when it was made by the same settings and labels.

``noisescore clean`` runs this flow in-process; deployments (``prefect.yaml``) run it on a
process or Kubernetes work pool.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar, cast
from uuid import UUID

import numpy as np
from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import deployment, flow_run
from prefect.states import Failed, State
from prefect.tasks import exponential_backoff
from pydantic import ValidationError

from noisescore import __version__
from noisescore.jobmetrics import JobMetrics, MetricsHook, ProgressEvent
from noisescore.jobs import MANIFEST, JobLease, JobStore, new_job_id, validate_job_id
from noisescore.ml import clean as stages
from noisescore.ml.data import Dataset
from noisescore.ml.export import ParityReport, export_with_parity
from noisescore.ml.linc import Correction
from noisescore.ml.outputs import json_bytes, model_checkpoint, npy_bytes, trust_csv
from noisescore.settings import (
    CleanSettings,
    StoreSettings,
    TrainingSettings,
    format_settings_error,
)
from noisescore.storage import ArtifactRef, StorageUnavailable, open_store

WARMUP_CHECKPOINT = "checkpoints/warmup.pt"
PROGRESS = "progress.json"
P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound=TrainingSettings)
HISTOGRAM = "trust_histogram.png"
PARITY_BATCH = 256
READ_BACK_AT_PUBLISH = (WARMUP_CHECKPOINT, HISTOGRAM, PROGRESS)
"""Files the job keeps that are not in the flow's list of refs when it publishes: the
histogram (stored inside ``otsu-correct``), a warm-up checkpoint that an earlier attempt
stored, and ``progress.json`` (rewritten after every epoch until training ends). ``publish``
reads them back, so the manifest describes what is stored when the job completes."""


class JobAlreadyPublished(ValueError):
    """The job id names a complete job; its artifacts are never overwritten."""


class InvalidParameters(ValueError):
    """The flow run's parameters are not valid settings (the message is one line)."""


def _storage_unavailable(task: Any, task_run: Any, state: State) -> bool:
    """Retry only what a retry can fix: the store being unreachable (not bad data)."""
    try:
        state.result()
    except StorageUnavailable:
        return True
    except Exception:
        return False
    return False


def storage_task(name: str) -> Callable[[Callable[P, R]], Task[P, R]]:
    """A task that talks to the store: 3 retries after 1, 2, 4 s (+-20 %), only when the
    store is unreachable (bad data or credentials fail at once)."""
    return task(
        name=name,
        retries=3,
        retry_delay_seconds=exponential_backoff(backoff_factor=1),
        retry_jitter_factor=0.2,
        retry_condition_fn=_storage_unavailable,
        cache_policy=NO_CACHE,
    )


def compute_task(name: str) -> Callable[[Callable[P, R]], Task[P, R]]:
    """A task that computes. Its inputs are datasets and models: hashing them for Prefect's
    cache would cost more than the step; reuse across runs is explicit (the warm-up
    checkpoint in the store)."""
    return task(name=name, cache_policy=NO_CACHE)


# ----------------------------------------------------------------------------- progress


class Progress:
    """Per-epoch progress of one job: Prefect logs, a progress artifact, Pushgateway
    metrics (when ``NOISESCORE_PUSHGATEWAY`` is set) and ``progress.json`` in the store
    (the latest event per stage, for the service's ``WatchJob``)."""

    def __init__(self, job: JobStore, settings: TrainingSettings):
        self.job = job
        self.epochs = settings.epochs
        self.metrics = JobMetrics(job.job_id)
        self.events: dict[str, dict[str, Any]] = {}
        self.artifact_id: UUID | None = None
        #: The state pushed when the tracked block ends normally (an active-clean run that
        #: stops for an expert sets ``waiting_for_labels``).
        self.outcome = "succeeded"

    @contextmanager
    def tracking(self) -> Iterator[None]:
        """The job's state in the pushed metrics: running, then succeeded or failed
        (``waiting_for_labels`` when a deployment run suspends for an expert)."""
        from prefect.exceptions import Pause

        try:
            yield
        except Pause:
            self.metrics.finish("waiting_for_labels")
            raise
        except BaseException:
            self.metrics.finish("failed")
            raise
        self.metrics.finish(self.outcome)

    def hook(self, stage: str, n_samples: int, *, epochs: int | None = None) -> MetricsHook:
        """Events of ``stage``; ``epochs`` planned for it (default: the settings' epochs)."""
        planned = self.epochs if epochs is None else epochs
        return MetricsHook(
            self, job_id=self.job.job_id, stage=stage, epochs=planned, n_samples=n_samples
        )

    def __call__(self, event: ProgressEvent) -> None:
        logger = get_run_logger()
        parts = [f"epoch {event.epoch}/{event.epochs}", f"loss {event.loss:.4f}"]
        if event.trust_mean is not None:
            parts.append(f"mean trust {event.trust_mean:.4f}")
        if event.flagged_fraction is not None:
            parts.append(f"flagged {event.flagged_fraction:.3f}")
        if event.samples_per_second is not None:
            parts.append(f"{event.samples_per_second:.0f} samples/s")
        logger.info("%s: %s", event.stage, ", ".join(parts))
        self.metrics.record(event)
        self.events[event.stage] = event.as_dict()
        self._update_artifact(100.0 * event.epoch / max(event.epochs, 1))
        try:  # progress is best effort: a flaky store must not stop the training
            self.job.put(PROGRESS, json_bytes({"job_id": self.job.job_id, **self.events}))
        except Exception as err:
            logger.warning("could not store %s: %s", PROGRESS, err)

    def _update_artifact(self, percent: float) -> None:
        if self.artifact_id is None:
            self.artifact_id = cast(
                UUID,
                create_progress_artifact(
                    progress=percent, description=f"training progress of job {self.job.job_id}"
                ),
            )
        else:
            update_progress_artifact(self.artifact_id, progress=percent)


# ----------------------------------------------------------------------------- tasks


@storage_task("save")
def save(job: JobStore, name: str, data: bytes) -> ArtifactRef:
    """Store one artifact of the job (atomic: a reader sees all of it or nothing)."""
    ref = job.put(name, data)
    get_run_logger().info("stored %s (%d bytes)", job.url(name), ref.size)
    return ref


@storage_task("start-job")
def start_job(job: JobStore, settings: CleanSettings) -> ArtifactRef:
    """Record the job's spec; a published job is immutable, so its id cannot be reused."""
    job.store.check()  # reachable, and the bucket exists
    if job.is_complete():
        raise JobAlreadyPublished(
            f"job {job.job_id} is already complete ({job.url(MANIFEST)}); "
            "published jobs are immutable: use a new job id"
        )
    return job.put("spec.json", job_spec(job.job_id, settings))


@storage_task("load-dataset")  # an s3:// dataset is downloaded
def load_dataset(settings: CleanSettings) -> Dataset:
    """Read the dataset URI; a bad URI or file fails at once (no retry)."""
    dataset = stages.load_data(settings)
    get_run_logger().info(
        "%s: %d train / %d val / %d test images %s, %d classes",
        dataset.name,
        len(dataset.train),
        len(dataset.val) if dataset.val is not None else 0,
        len(dataset.test) if dataset.test is not None else 0,
        "x".join(map(str, (dataset.in_chans, *dataset.image_size))),
        dataset.n_classes,
    )
    return dataset


@compute_task("inject-noise")
def inject_noise(dataset: Dataset, settings: CleanSettings) -> stages.PreparedData:
    """Noise for evaluation runs, truth kept; without ``settings.noise`` the labels as read."""
    data = stages.add_noise(dataset, settings)
    if data.noise is not None:
        get_run_logger().info(
            "injected %s: %.3f of train labels flipped", data.noise.spec, data.noise.realised_rate
        )
    return data


@storage_task("reuse-warmup")
def reuse_warmup(job: JobStore, fingerprint: str) -> stages.Warmup | None:
    """The stored warm-up of an earlier attempt of this job, if it matches these settings."""
    if not job.exists(WARMUP_CHECKPOINT):
        return None
    logger = get_run_logger()
    try:
        warmup = stages.Warmup.from_bytes(
            job.get(WARMUP_CHECKPOINT, verify=False), fingerprint=fingerprint
        )
    except ValueError as err:
        logger.warning("not reusing %s: %s", job.url(WARMUP_CHECKPOINT), err)
        return None
    logger.info("reusing the warm-up checkpoint %s", job.url(WARMUP_CHECKPOINT))
    return warmup


@compute_task("linc-warmup")
def linc_warmup(
    data: stages.PreparedData, settings: CleanSettings, progress: Progress
) -> stages.Warmup:
    """LiNC warm-up: epochs 1..w with one trainable trust parameter per sample."""
    hook = progress.hook("warmup", len(data.train_labels))
    return stages.linc_warmup(data, settings, hooks=[hook])


@compute_task("otsu-correct")
def otsu_correct(
    warmup: stages.Warmup, data: stages.PreparedData, job: JobStore, settings: CleanSettings
) -> Correction:
    """Otsu's threshold on the flagging score's histogram (``settings.flag_by``); flagged
    samples take the prediction unless the histogram fails the bimodality test."""
    correction = stages.correct(warmup, settings)
    n_flagged = int(correction.flagged.sum())
    n_changed = int((correction.corrected_labels != warmup.observed_labels).sum())
    test = correction.bimodality or {}
    get_run_logger().info(
        "%s: Otsu threshold %.4f: %d of %d flagged, %d relabelled (bimodality eta %.3f, "
        "minimum %.3f%s)",
        correction.flag_by,
        correction.otsu_threshold,
        n_flagged,
        len(correction.flagged),
        n_changed,
        test.get("statistic", float("nan")),
        test.get("threshold", float("nan")),
        "" if correction.relabelled else ": not bimodal, correction skipped",
    )
    score = warmup.scores()[correction.flag_by]
    png = trust_histogram_png(score, correction.otsu_threshold, data.flipped, correction.flag_by)
    create_markdown_artifact(
        key=f"trust-{job.job_id}"[:63].rstrip("-"),
        markdown=warmup_markdown(warmup, correction, png),
        description=f"LiNC trust after warm-up, job {job.job_id}",
    )
    save(job, HISTOGRAM, png)
    return correction


@compute_task("train-final")
def train_final(
    data: stages.PreparedData,
    settings: CleanSettings,
    warmup: stages.Warmup,
    correction: Correction,
    progress: Progress,
) -> stages.TrainedRun:
    """Resume from the warm-up; epochs w+1..E of plain cross-entropy on corrected labels."""
    hook = progress.hook("final", len(data.train_labels))
    return stages.train_final(data, settings, warmup, correction, hooks=[hook])


@compute_task("train-baseline")
def train_baseline(
    data: stages.PreparedData, settings: CleanSettings, progress: Progress
) -> stages.TrainedRun:
    """Plain cross-entropy with the same seed, for comparison (``settings.baseline``)."""
    hook = progress.hook("baseline", len(data.train_labels))
    return stages.train_baseline(data, settings, hooks=[hook])


@compute_task("evaluate")
def evaluate(
    settings: CleanSettings,
    data: stages.PreparedData,
    run: stages.TrainedRun,
    baseline: stages.TrainedRun | None,
) -> dict[str, Any]:
    """The report: test metrics and, where the truth is known, detection and correction."""
    report = stages.build_report(settings, data, run, baseline)
    report["linc"]["suspect_cutoff"] = stages.calibrate_suspect_cutoff(data, run)
    test = report.get("test") or {}
    if test:
        get_run_logger().info(
            "test accuracy %.4f, macro-F1 %.4f", test["accuracy"], test["macro_f1"]
        )
    return report


@compute_task("export-onnx")
def export_onnx(
    run: stages.TrainedRun, data: stages.PreparedData, settings: CleanSettings
) -> tuple[bytes, ParityReport]:
    """ONNX with normalisation and softmax inside, checked against PyTorch on a test batch."""
    dataset = data.dataset
    split = dataset.test if dataset.test is not None else dataset.train
    onnx_bytes, parity = export_with_parity(
        run.model,
        images=split.images[:PARITY_BATCH],
        model_name=settings.model,
        num_classes=dataset.n_classes,
        in_chans=dataset.in_chans,
        img_size=dataset.image_size[0],
        mean=run.images.mean_list,
        std=run.images.std_list,
        metadata={"noisescore_version": __version__},
    )
    get_run_logger().info(
        "ONNX parity on %d images: max |p_onnx - p_torch| = %.2e (tolerance %.0e)",
        parity.batch_size,
        parity.max_abs_diff,
        parity.tolerance,
    )
    return onnx_bytes, parity


@storage_task("publish")
def publish(
    job: JobStore, refs: list[ArtifactRef], parity: ParityReport, report: dict[str, Any]
) -> dict[str, Any]:
    """Write ``manifest.json`` last, listing every file the job keeps: from now on the job
    is complete and verifiable."""
    listed = {ref.name for ref in refs}
    for name in READ_BACK_AT_PUBLISH:
        # progress.json is best effort (a flaky store may have refused every write).
        if name not in listed and (name != PROGRESS or job.exists(name)):
            refs = [*refs, job.ref(name)]
    manifest_ref = job.write_manifest(
        refs,
        onnx_parity=parity.as_dict(),
        suspect_cutoff=report["linc"]["suspect_cutoff"],
        noisescore_version=__version__,
        flow_run_id=str(flow_run.id) if flow_run.id else None,
    )
    summary = job_summary(job, report, manifest_ref)
    create_markdown_artifact(
        key=f"job-{job.job_id}"[:63].rstrip("-"),
        markdown=summary_markdown(summary),
        description=f"noisescore cleaning job {job.job_id}",
    )
    get_run_logger().info("job %s complete: %s", job.job_id, job.url())
    return summary


# ----------------------------------------------------------------------------- the flow


# Parameters are validated by check_parameters (the same one-line messages as the CLI);
# Prefect's own validation would fail a UI run with a traceback before the first step.
@flow(name="clean-labels", log_prints=True, validate_parameters=False)
def clean_labels(
    settings: CleanSettings | None = None,
    job_id: str | None = None,
) -> dict[str, Any]:
    """Score and correct the labels of ``settings.dataset`` with LiNC; store every artifact.

    Parameters
    ----------
    settings : CleanSettings
        The same typed settings as ``noisescore clean``'s flags (``NOISESCORE_*`` env).
    job_id : str, optional
        Folder ``jobs/<job_id>/`` of the store; default: this flow run's id, so that a
        retry from the Prefect UI reuses what the failed attempt stored.

    The artifact store comes from the environment of the process running the flow
    (``NOISESCORE_S3_*``, else ``NOISESCORE_STORE_DIR``): credentials never travel as flow
    parameters, and a deployment's workers all write to the same place. The first log line
    names it.

    Parameters are validated here, first, not by Prefect: a run from the UI's form with
    bad settings fails with the one-line message ``noisescore clean`` gives for the same
    values, before any work.
    """
    try:
        settings, job_id = check_parameters(settings, job_id, CleanSettings)
        settings = with_processes(settings)
    except InvalidParameters as err:
        get_run_logger().error("invalid parameters: %s", err)
        # A returned Failed state ends the run with this message and no traceback; called
        # in-process, Prefect raises it as an exception.
        return cast(dict[str, Any], Failed(message=f"invalid parameters: {err}"))
    store_settings = StoreSettings()
    job = JobStore(open_store(store_settings), job_id or default_job_id())
    announce_store(job, store_settings)
    progress = Progress(job, settings)
    # The lease says "running" to readers of the store (the service, replicas) until
    # the block ends, however this process was started.
    with JobLease(job, store_settings.job_lease_ttl), progress.tracking():
        refs = [start_job(job, settings)]

        dataset = load_dataset(settings)
        data: stages.PreparedData = inject_noise(dataset, settings)
        refs.append(save(job, "noisy_labels.npy", npy_bytes(data.train_labels)))

        fingerprint = stages.warmup_fingerprint(settings, data)
        warmup: stages.Warmup | None = reuse_warmup(job, fingerprint)
        reused = warmup is not None
        if warmup is None:
            fresh: stages.Warmup = linc_warmup(data, settings, progress)
            refs.append(save(job, WARMUP_CHECKPOINT, fresh.to_bytes(fingerprint=fingerprint)))
            warmup = fresh
        refs.append(save(job, "trust_by_epoch.npy", npy_bytes(warmup.trust_by_epoch)))
        correction = otsu_correct(warmup, data, job, settings)

        run: stages.TrainedRun = train_final(data, settings, warmup, correction, progress)
        baseline = train_baseline(data, settings, progress) if settings.baseline else None
        stages.stop_peers()  # the other ranks of a distributed run have no more stages
        report = evaluate(settings, data, run, baseline)
        report["job"] = {"id": job.job_id, "url": job.url(), "warmup_reused": reused}
        onnx_bytes, parity = export_onnx(run, data, settings)

        refs.append(save(job, "trust.csv", trust_csv(data, run.linc)))
        refs.append(save(job, "model.pt", model_bytes(run, settings, data.dataset)))
        refs.append(save(job, "model.onnx", onnx_bytes))
        refs.append(save(job, "report.json", json_bytes(report)))
        return publish(job, refs, parity, report)


# ----------------------------------------------------------------------------- helpers


def check_parameters(
    settings: S | dict[str, Any] | None, job_id: str | None, kind: type[S]
) -> tuple[S, str | None]:
    """The flow's parameters as typed settings of class ``kind`` (:class:`CleanSettings`,
    :class:`~noisescore.settings.ActiveSettings`) and a checked job id.

    A deployment run gets ``settings`` as JSON (a dict): fields it leaves out take the
    worker's ``NOISESCORE_*`` environment, then the defaults, as for ``noisescore clean``.

    Raises
    ------
    InvalidParameters
        With the message the CLI prints for the same values, e.g. ``warmup_epochs (10)
        must not exceed epochs (3)`` or ``--epochs: Input should be greater than or equal
        to 1``.
    """
    try:
        if settings is None:
            settings = kind()
        elif not isinstance(settings, kind):
            if not isinstance(settings, dict):
                raise InvalidParameters(
                    f"settings must be an object of {kind.__name__} fields, got "
                    f"{type(settings).__name__}"
                )
            settings = kind(**settings)
    except ValidationError as err:
        raise InvalidParameters(format_settings_error(err)) from None
    except ValueError as err:  # a validator's own error raised outside pydantic
        raise InvalidParameters(str(err)) from None
    if job_id is not None:
        try:
            validate_job_id(job_id)
        except ValueError as err:
            raise InvalidParameters(str(err)) from None
    return settings, job_id


def with_processes(settings: CleanSettings) -> CleanSettings:
    """``settings`` with ``nproc`` set to the processes this run trains in.

    A flow cannot start processes: the command that started this one decides (``noisescore
    clean --nproc N``, or ``torchrun ... noisescore.cli flow execute`` in a deployment's
    container). A different ``nproc`` in the parameters is logged and replaced, so that
    ``spec.json`` and the report say what ran.

    Raises
    ------
    InvalidParameters
        When these settings cannot train in several processes (detectors other than
        ``linc``, ``cl_folds``, a global batch under 2 per process).
    """
    world = stages.world_size()
    if "nproc" in settings.model_fields_set and settings.nproc != world:
        get_run_logger().warning(
            "nproc %d ignored: this run trains in %d process%s, as started by its command "
            "(torchrun --nproc-per-node, `noisescore clean --nproc`)",
            settings.nproc,
            world,
            "" if world == 1 else "es",
        )
    try:
        stages.check_distributed(settings, world)
    except ValueError as err:
        raise InvalidParameters(str(err)) from None
    return settings.model_copy(update={"nproc": world})


def announce_store(job: JobStore, store_settings: StoreSettings) -> None:
    """Log where the artifacts go, first; warn when that is a worker's default ./artifacts
    (store settings are read where the flow runs, not where the run was triggered)."""
    logger = get_run_logger()
    logger.info("job %s: artifacts go to %s", job.job_id, job.url())
    default_store = (
        not store_settings.s3_endpoint and "store_dir" not in store_settings.model_fields_set
    )
    if default_store and deployment.id:
        logger.warning(
            "no store is configured where this flow runs: job %s goes to the default local "
            "store ./artifacts of this worker (%s). Set NOISESCORE_S3_ENDPOINT (with "
            "NOISESCORE_S3_ACCESS_KEY/NOISESCORE_S3_SECRET_KEY) or NOISESCORE_STORE_DIR in "
            "the environment of the worker (or `noisescore flow serve`), not only where the "
            "run is triggered",
            job.job_id,
            job.url(),
        )


def default_job_id() -> str:
    """The flow run's id when running under Prefect (a UI retry keeps it), else a new id."""
    run_id = flow_run.id
    return str(run_id) if run_id else new_job_id()


def job_spec(job_id: str, settings: TrainingSettings, *, kind: str | None = None) -> bytes:
    """``spec.json``; ``kind`` names a flow other than clean-labels (``"active"``)."""
    return json_bytes(
        {
            "job_id": job_id,
            **({"kind": kind} if kind is not None else {}),
            "created": datetime.now(UTC).isoformat(),
            "noisescore_version": __version__,
            "flow_run_id": str(flow_run.id) if flow_run.id else None,
            "settings": settings.model_dump(mode="json"),
        }
    )


def model_bytes(run: stages.TrainedRun, settings: CleanSettings, dataset: Dataset) -> bytes:
    return model_checkpoint(
        run.model,
        model_name=settings.model,
        num_classes=dataset.n_classes,
        in_chans=dataset.in_chans,
        img_size=dataset.image_size[0],
        mean=run.images.mean_list,
        std=run.images.std_list,
    )


def trust_histogram_png(
    trust: np.ndarray, threshold: float, flipped: np.ndarray | None, score: str = "linc"
) -> bytes:
    """Histogram of the flagging score (trust by default) with Otsu's threshold; split by
    the truth when it is known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    # Trust after a short warm-up often lives in a narrow band below 1: zoom onto it.
    low = min(float(np.min(trust)), threshold)
    high = 1.0 if score == "linc" else max(float(np.max(trust)), threshold)
    low = max(0.0, low - 0.05 * (high - low)) if score == "linc" else low
    bins = [low + (high - low) * i / 60 for i in range(61)]
    if flipped is not None:
        ax.hist(
            [trust[~flipped], trust[flipped]],
            bins=bins,
            stacked=True,
            label=["label was right", "label was flipped"],
            color=["#4c72b0", "#dd8452"],
        )
        ax.legend(loc="upper left", fontsize=8)
    else:
        ax.hist(trust, bins=bins, color="#4c72b0")
    ax.set_xlim(low, high)
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
    ax.text(threshold, ax.get_ylim()[1] * 0.95, f" Otsu {threshold:.3f}", va="top", fontsize=8)
    ax.set_xlabel("trust (alpha) after warm-up" if score == "linc" else f"{score} score")
    ax.set_ylabel("samples")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def warmup_markdown(warmup: stages.Warmup, correction: Correction, png: bytes) -> str:
    rows = ["| epoch | loss | train acc | mean trust | flagged fraction | samples/s |",
            "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for h in warmup.history:
        rows.append(
            f"| {h.epoch} | {h.loss:.4f} | {h.train_accuracy:.4f} | "
            f"{h.extra.get('trust_mean', float('nan')):.4f} | "
            f"{h.extra.get('flagged_fraction', float('nan')):.4f} | {h.samples_per_second:.0f} |"
        )
    n = len(correction.flagged)
    changed = int((correction.corrected_labels != warmup.observed_labels).sum())
    image = base64.b64encode(png).decode()
    return "\n".join(
        [
            "## LiNC warm-up",
            "",
            *rows,
            "",
            f"Otsu threshold on `{correction.flag_by}` **{correction.otsu_threshold:.4f}**: "
            f"{int(correction.flagged.sum())} of {n} samples flagged, {changed} relabelled"
            + ("." if correction.relabelled else " (histogram not bimodal: no relabelling)."),
            "",
            f"![trust histogram](data:image/png;base64,{image})",
        ]
    )


def job_summary(job: JobStore, report: dict[str, Any], manifest: ArtifactRef) -> dict[str, Any]:
    linc, test = report["linc"], report.get("test") or {}
    summary: dict[str, Any] = {
        "job_id": job.job_id,
        "url": job.url(),
        "manifest_sha256": manifest.sha256,
        "completed": datetime.now(UTC).isoformat(),
        "n_train": report["dataset"]["n_train"],
        "otsu_threshold": linc["otsu_threshold"],
        "n_flagged": linc["n_flagged"],
        "n_changed": linc["n_changed"],
        "test_accuracy": test.get("accuracy"),
        "warmup_reused": report["job"]["warmup_reused"],
        "flag_by": linc.get("flag_by", "linc"),
        "relabelled": linc.get("relabelled", True),
        "detectors": ",".join(report.get("detectors", {})),
    }
    if "detection" in linc:
        summary["detection_auroc"] = linc["detection"]["auroc"]
        summary["label_accuracy_before"] = linc["label_accuracy_before"]
        summary["label_accuracy_after"] = linc["label_accuracy_after"]
    return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    rows = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in summary.items()]
    return "\n".join(["## noisescore cleaning job", "", *rows])
