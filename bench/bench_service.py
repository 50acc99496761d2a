"""Benchmark of the gRPC service (noisescore.v1.NoiseScoring) on CPU, in one run.

Three measurements against one real cleaning job (BreastMNIST, ``uniform:0.5`` noise,
seed 0, trained by the clean-labels flow in this run unless ``--store``/``--job`` name
an existing one):

1. **Predict latency**: the job's trained model on batch 1 and batch 256 of real
   BreastMNIST test images (the 156 test images, cycled to fill 256) by (a) torch eager
   (``model.pt`` wrapped in :class:`~noisescore.ml.export.ProbabilityModel`, eval mode,
   ``no_grad``), (b) onnxruntime directly (``OnnxModel.predict_proba`` on ``model.onnx``)
   and (c) the ``Predict`` RPC end to end over loopback (typed client -> server ->
   onnxruntime -> response). The cases are interleaved in a shuffled order within every
   repeat; p50 and p99 per case, and ``torch_p50 / case_p50`` (> 1 = faster than torch).
2. **Concurrency**: ``ScoreLabels`` (16 images per request) and ``GetCorrections`` (one
   full page of the job's rows) from ``--clients`` threads, each with its own channel and
   connection, for ``--duration`` seconds; the baseline is the same requests from one
   client, so the ratio is the concurrency scaling. Requests are built once, before the
   timed window, so the client's Python cost is not counted as the service's.
3. **Watches under load**: ``--watches`` concurrent ``WatchJob`` streams stay open on a
   real job held RUNNING (a long cleaning job submitted to the server, its process group
   stopped with SIGSTOP once it runs, so it costs no CPU) while ``--clients`` clients call
   ``ScoreLabels``; the baseline is the same load without the watches, alternated with it
   in rounds within the run. Errors count failed calls and watch streams that ended.
4. **Large job read**: a *synthetic* job of ``--large-rows`` rows (the real MedMNIST sets
   are smaller) in the real layout (``trust.csv``, ``report.json``/``spec.json``/
   ``model.onnx`` copied from the real job, ``manifest.json`` by ``JobStore``), read with
   ``StreamCorrections`` and with ``GetCorrections`` pages of 10,000. The first read of a
   job is cold (the server reads, verifies and parses ``trust.csv``); the next is warm
   (parsed table cached). Each cold read is of a fresh copy of the job.

The server runs in a child process (``create_app(...).start()`` on ``127.0.0.1:0``, a
:class:`~noisescore.storage.LocalStore` over a temporary folder), so that client and
server threads do not share one GIL; both processes share the machine's cores.
onnxruntime sessions (direct and in the server) and torch use ``--threads`` intra-op
threads. Speed claims are ratios against a baseline measured in the same run.

Usage::

    python bench/bench_service.py [--duration 10] [--clients 32] [--repeats 200] [--watches 200]
    python bench/bench_service.py --store DIR --job ID    # an existing finished job

Writes ``service.json``, ``service.md`` and ``service.png`` to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import io
import json
import os
import platform
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import torch

from noisescore.atomic import atomic_write, atomic_write_bytes
from noisescore.client import NoiseScoringClient, image_message
from noisescore.jobs import JobStore
from noisescore.ml.data import load_dataset
from noisescore.ml.export import ProbabilityModel
from noisescore.ml.models import DEFAULT_MODEL, create_model
from noisescore.storage import ArtifactStore, LocalStore
from noisescore.v1 import noise_scoring_pb2 as pb
from noisescore.v1 import noise_scoring_pb2_grpc as pb_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT_DIR = REPO_ROOT / "docs" / "bench"
DATASET = "breastmnist"
NOISE_SPEC = "uniform:0.5"
SERVE_COMMAND = "_serve"  # argv[1] of the server child process
BATCH_SIZES = (1, 256)
CASES = ("torch", "onnxruntime", "predict_rpc")
CASE_LABELS = {
    "torch": "torch eager",
    "onnxruntime": "onnxruntime direct",
    "predict_rpc": "Predict RPC (loopback)",
}
# Latency rows: key of raw["predict"] -> label. Interleaved, every call follows ~0.1 s of
# other work (an isolated request); back to back, the same call repeated (a hot loop).
LATENCY_ROWS = {"1": "1", "256": "256", "1_back_to_back": "1, back to back"}
SCORE_BATCH = 16
PAGE_ROWS = 10_000
LARGE_TARGET_S = 1.0
WARMUP_CALLS = 5
PARITY_TOLERANCE = 1e-4
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # as NoiseScoringClient
WATCH_ROUNDS = 2  # baseline and with-watches windows, alternated
WATCHES_PER_CHANNEL = 25
HELD_JOB_EPOCHS = 10_000  # long enough never to finish while held


# --------------------------------------------------------------------------- threads


# --------------------------------------------------------------------------- server child


class GcPauses:
    """Full (generation 2) garbage collections of this process, timed, per phase."""

    def __init__(self) -> None:
        self.phase = "start"
        self.pauses: dict[str, list[float]] = {}
        self._began = 0.0

    def __call__(self, stage: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if stage == "start":
            self._began = time.perf_counter()
        else:
            elapsed = time.perf_counter() - self._began
            self.pauses.setdefault(self.phase, []).append(elapsed)


def serve(argv: Sequence[str]) -> None:
    """The server child process: start, print ``PORT <n> ...``, read ``phase NAME`` lines
    from stdin; when stdin closes, stop and print the full-GC pauses per phase as JSON."""
    parser = argparse.ArgumentParser(prog=f"bench_service.py {SERVE_COMMAND}")
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from noisescore.service.app import create_app
    from noisescore.settings import ServiceSettings

    settings = ServiceSettings(
        grpc_addr="127.0.0.1:0", metrics_addr=None, auth_tokens=None,
        tls_cert=None, tls_key=None, tls_client_ca=None, onnx_threads=args.threads,
    )  # fmt: skip
    gc_pauses = GcPauses()
    app = create_app(settings, store=LocalStore(args.store)).start()
    tracked = len(gc.get_objects())  # what a full collection still walks
    frozen = gc.get_freeze_count()  # what App.start() moved out of its reach
    gc.callbacks.append(gc_pauses)
    print(f"PORT {app.port} RPC_THREADS {settings.rpc_threads}", flush=True)
    try:
        for line in sys.stdin:  # until the parent closes it (or dies)
            if line.startswith("phase "):
                gc_pauses.phase = line.split(maxsplit=1)[1].strip()
    finally:
        app.stop(grace=1)
        gc.callbacks.remove(gc_pauses)
    report = {
        "tracked_objects_at_start": tracked,
        "frozen_objects_at_start": frozen,
        "gen2_pauses_s": gc_pauses.pauses,
    }
    print("GC " + json.dumps(report), flush=True)


class ServerProcess:
    """The service in a child process over ``store_dir``; ``target`` is ``127.0.0.1:PORT``."""

    START_TIMEOUT_S = 180.0

    def __init__(
        self, store_dir: Path, *, threads: int, log: Path, data_dir: Path | None = None
    ) -> None:
        self.store_dir, self.threads, self.log = store_dir, threads, log
        self.data_dir = data_dir
        self.process: subprocess.Popen[str] | None = None
        self.port = 0
        self.rpc_threads = 0
        self.gc: dict[str, Any] = {}

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _child_env(self) -> dict[str, str]:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "NOISESCORE_S3_ENDPOINT": ""}
        env["NOISESCORE_JOB_RUNNER"] = "local"  # section 3 holds a job of its own child
        if self.data_dir is not None:  # for the job it runs (section 3)
            env["NOISESCORE_DATA_DIR"] = str(self.data_dir)
        return env

    def __enter__(self) -> ServerProcess:
        env = self._child_env()
        command = [
            sys.executable, str(Path(__file__).resolve()), SERVE_COMMAND,
            "--store", str(self.store_dir), "--threads", str(self.threads),
        ]  # fmt: skip
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                text=True, env=env, cwd=REPO_ROOT,
            )  # fmt: skip
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], self.START_TIMEOUT_S)
        line = self.process.stdout.readline() if ready else ""
        if not line.startswith("PORT "):
            self.__exit__(None, None, None)
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the server child did not start ({line!r}); its log:\n{tail}")
        fields = line.split()
        self.port, self.rpc_threads = int(fields[1]), int(fields[3])
        return self

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux ``/proc``; else NaN)."""
        assert self.process is not None
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def job_process_groups(self) -> list[int]:
        """Process groups of the server's children (a job runs in its own session)."""
        assert self.process is not None
        groups = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(stat.parent.name)
            if int(fields[1]) == self.process.pid and int(fields[2]) == pid:  # ppid, pgrp
                groups.append(pid)
        return groups

    def phase(self, name: str) -> None:
        """Attribute the server's garbage collections from now on to ``name``."""
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(f"phase {name}\n")
        self.process.stdin.flush()

    def __exit__(self, *exc: object) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        try:
            out, _ = process.communicate(timeout=60)  # closes stdin: the child stops
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate(timeout=10)
        for line in (out or "").splitlines():
            if line.startswith("GC "):
                self.gc = json.loads(line[3:])


# --------------------------------------------------------------------------- the real job


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def train_job(store_dir: Path, job_id: str, args: argparse.Namespace) -> float:
    """Run the clean-labels flow into ``store_dir``; returns its wall time in seconds."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from noisescore.flows.clean_labels import clean_labels
    from noisescore.settings import CleanSettings

    settings = CleanSettings(
        dataset=f"medmnist://{DATASET}", data_dir=args.data_dir, noise=NOISE_SPEC,
        epochs=args.epochs, warmup_epochs=args.warmup_epochs, seed=0, device="cpu",
        model=args.model,
    )  # fmt: skip
    start = time.perf_counter()
    with _env(NOISESCORE_STORE_DIR=str(store_dir), NOISESCORE_S3_ENDPOINT=""):
        state = clean_labels(settings=settings, job_id=job_id, return_state=True)
    if not state.is_completed():
        raise RuntimeError(f"the clean-labels flow did not complete: {state.message}")
    return time.perf_counter() - start


def copy_job(source: ArtifactStore, target: ArtifactStore, job_id: str) -> None:
    """Every object of ``jobs/<job_id>/`` from one store to another."""
    keys = source.list(JobStore(source, job_id).prefix)
    if not keys:
        raise SystemExit(f"no job {job_id!r} in {source!r}")
    for key in keys:
        target.put_bytes(key, source.get_bytes(key))


def torch_model(job: JobStore) -> tuple[ProbabilityModel, dict[str, Any]]:
    """``model.pt`` rebuilt and wrapped like the ONNX graph (raw pixels in, softmax out)."""
    ckpt = torch.load(io.BytesIO(job.get("model.pt")), map_location="cpu", weights_only=True)
    model = create_model(
        ckpt["model"],
        num_classes=ckpt["num_classes"],
        in_chans=ckpt["in_chans"],
        img_size=ckpt["img_size"],
    )
    model.load_state_dict(ckpt["state_dict"])
    wrapped = ProbabilityModel(model, mean=ckpt["mean"], std=ckpt["std"]).eval()
    return wrapped, ckpt


# --------------------------------------------------------------------------- 1. latency


def percentiles(seconds: Sequence[float]) -> dict[str, float]:
    values = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "p50_ms": float(np.percentile(values, 50)),
        "p99_ms": float(np.percentile(values, 99)),
        "mean_ms": float(values.mean()),
        "min_ms": float(values.min()),
        "max_ms": float(values.max()),
        "n": int(values.size),
    }


def measure_latency(
    predictors: dict[str, Callable[[np.ndarray], np.ndarray]],
    batches: dict[int, np.ndarray],
    *,
    repeats: int,
    seed: int,
) -> dict[str, dict[str, list[float]]]:
    """Seconds per call, ``raw[str(batch)][case]``; cases shuffled within each repeat."""
    rng = np.random.default_rng(seed)
    for images in batches.values():  # warm-up: first-call allocations, lazy loads
        for predict in predictors.values():
            for _ in range(WARMUP_CALLS):
                predict(images)
    raw: dict[str, dict[str, list[float]]] = {
        str(b): {case: [] for case in predictors} for b in batches
    }
    for _ in range(repeats):
        for batch, images in batches.items():
            for case in rng.permutation(list(predictors)):
                predict = predictors[str(case)]
                start = time.perf_counter()
                predict(images)
                raw[str(batch)][str(case)].append(time.perf_counter() - start)
    return raw


def measure_back_to_back(
    predictors: dict[str, Callable[[np.ndarray], np.ndarray]],
    images: np.ndarray,
    *,
    repeats: int,
) -> dict[str, list[float]]:
    """Seconds per call of each case called ``repeats`` times in a row (after warm-up)."""
    raw: dict[str, list[float]] = {}
    for case, predict in predictors.items():
        for _ in range(WARMUP_CALLS):
            predict(images)
        raw[case] = []
        for _ in range(repeats):
            start = time.perf_counter()
            predict(images)
            raw[case].append(time.perf_counter() - start)
    return raw


def check_parity(
    predictors: dict[str, Callable[[np.ndarray], np.ndarray]], images: np.ndarray
) -> dict[str, float]:
    """Largest |p_case - p_torch| on ``images``: every case must serve the same model."""
    reference = predictors["torch"](images)
    diffs = {}
    for case, predict in predictors.items():
        if case == "torch":
            continue
        diffs[case] = float(np.max(np.abs(predict(images) - reference)))
        if not diffs[case] <= PARITY_TOLERANCE:
            raise RuntimeError(
                f"{case} disagrees with torch eager by {diffs[case]:.3g} "
                f"(> {PARITY_TOLERANCE}): not the same model"
            )
    return diffs


# --------------------------------------------------------------------------- 2. concurrency


def own_channel(target: str) -> grpc.Channel:
    """A channel with its own connection: by default gRPC shares one between channels of
    the same target and arguments, which would multiplex every client on one socket."""
    return grpc.insecure_channel(
        target,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.use_local_subchannel_pool", 1),
        ],
    )


def run_load(
    target: str,
    method: str,
    requests: Sequence[Any],
    *,
    clients: int,
    duration: float,
    samples_in: Callable[[Any], int],
    expected_samples: int,
    server_cpu: Callable[[], float],
    keep_latencies: bool = False,
) -> dict[str, Any]:
    """``clients`` threads call ``method`` back to back for ``duration`` seconds.

    ``server_cpu()`` is the server process's CPU time so far, in seconds: with this
    process's own, it tells how many cores each side kept busy during the window.
    """
    results: list[dict[str, Any]] = [{} for _ in range(clients)]
    window: dict[str, float] = {}

    def open_window() -> None:
        window["server_cpu"], window["client_cpu"] = server_cpu(), time.process_time()
        window["start"] = time.perf_counter()
        window["deadline"] = window["start"] + duration

    barrier = threading.Barrier(clients, action=open_window)

    def worker(k: int) -> None:
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        samples = 0
        channel = own_channel(target)
        try:
            call = getattr(pb_grpc.NoiseScoringStub(channel), method)
            mine = [requests[(k + i) % len(requests)] for i in range(len(requests))]
            try:  # connects the channel; not timed
                call(mine[0], timeout=60)
            except grpc.RpcError as err:
                errors[f"warm-up {err.code().name}"] += 1
            barrier.wait()
            i = 0
            while (start := time.perf_counter()) < window["deadline"]:
                try:
                    response = call(mine[i % len(mine)], timeout=60)
                except grpc.RpcError as err:
                    errors[err.code().name] += 1
                else:
                    latencies.append(time.perf_counter() - start)
                    got = samples_in(response)
                    if got == expected_samples:
                        samples += got
                    else:
                        errors[f"wrong size {got}"] += 1
                i += 1
            finish = time.perf_counter()
        finally:
            channel.close()
        results[k] = {
            "latencies": latencies,
            "errors": dict(errors),
            "samples": samples,
            "finish": finish,
        }

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    server_cores = server_cpu() - window["server_cpu"]
    client_cores = time.process_time() - window["client_cpu"]
    if any(not r for r in results):
        raise RuntimeError(f"{method}: a client thread died; see the traceback above")
    elapsed = max(r["finish"] for r in results) - window["start"]
    latencies = [t for r in results for t in r["latencies"]]
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
    n_ok = len(latencies)
    return {
        "clients": clients,
        "seconds": elapsed,
        "requests": n_ok,
        "requests_per_second": n_ok / elapsed,
        "samples_per_second": sum(r["samples"] for r in results) / elapsed,
        "samples_per_request": expected_samples,
        "server_cpu_cores": server_cores / elapsed,
        "client_cpu_cores": client_cores / elapsed,
        **({"latency": percentiles(latencies)} if latencies else {}),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "requests_per_client": [len(r["latencies"]) for r in results],
        **({"latencies": [round(t, 6) for t in latencies]} if keep_latencies else {}),
    }


# --------------------------------------------------------------------------- 3. watches


@contextlib.contextmanager
def held_job(client: NoiseScoringClient, server: ServerProcess) -> Iterator[str]:
    """A real job of the server held RUNNING at no CPU cost: submitted, then its process
    group stopped (SIGSTOP) once it runs; resumed and cancelled at the end."""
    job = client.submit(
        f"medmnist://{DATASET}", epochs=HELD_JOB_EPOCHS, warmup_epochs=1, device="cpu"
    )
    groups: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while client.get(job.name).state != pb.Job.RUNNING or not groups:
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job.name} did not start: {client.get(job.name)}")
            time.sleep(0.2)
            groups = server.job_process_groups()
        for group in groups:
            os.killpg(group, signal.SIGSTOP)
        yield job.name
    finally:
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGCONT)
        client.cancel(job.name)


def open_watches(target: str, job: str, n: int) -> tuple[list[grpc.Channel], list[Any]]:
    """``n`` WatchJob streams of ``job`` over their own connections; each has delivered
    its first event (the job's state) when this returns."""
    channels = [own_channel(target) for _ in range(-(-n // WATCHES_PER_CHANNEL))]
    streams = [
        pb_grpc.NoiseScoringStub(channels[i // WATCHES_PER_CHANNEL]).WatchJob(
            pb.WatchJobRequest(name=job), timeout=3600
        )
        for i in range(n)
    ]
    for stream in streams:
        event = next(stream)
        if event.state != pb.Job.RUNNING:
            raise RuntimeError(f"a watch of {job} started with {event}")
    return channels, streams


def measure_watch_load(
    server: ServerProcess,
    client: NoiseScoringClient,
    requests: Sequence[Any],
    samples_in: Callable[[Any], int],
    expected: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """ScoreLabels from ``--clients`` clients without and with ``--watches`` open
    WatchJob streams, in alternated rounds; per condition the runs and the watch errors."""
    runs: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
    watch_errors = 0
    with held_job(client, server) as job:
        for round_ in range(WATCH_ROUNDS):
            for condition in ("without", "with"):
                print(f"ScoreLabels x{args.clients}, {condition} watches ({round_ + 1})...",
                      file=sys.stderr)  # fmt: skip
                server.phase(f"ScoreLabels x{args.clients} {condition} watches")
                channels, streams = (
                    open_watches(server.target, job, args.watches)
                    if condition == "with"
                    else ([], [])
                )
                try:
                    run = run_load(
                        server.target, "ScoreLabels", requests, clients=args.clients,
                        duration=args.duration, samples_in=samples_in,
                        expected_samples=expected, server_cpu=server.cpu_seconds,
                        keep_latencies=True,
                    )  # fmt: skip
                    runs[condition].append(run)
                    watch_errors += sum(1 for stream in streams if stream.done())
                finally:
                    for stream in streams:
                        stream.cancel()
                    for channel in channels:
                        channel.close()
    return {"watches": args.watches, "rounds": WATCH_ROUNDS, "runs": runs,
            "watch_errors": watch_errors}  # fmt: skip


# --------------------------------------------------------------------------- 4. large job


def synthetic_trust_csv(
    header: Sequence[str], rows: int, *, n_classes: int, seed: int, template: bytes = b""
) -> bytes:
    """A ``trust.csv`` with the real columns and ``rows`` made-up samples. Columns other
    than LiNC's (the scores of other detectors a job may add) cycle the values of the real
    job's ``template`` rows."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, n_classes, rows)
    flipped = rng.random(rows) < 0.3
    observed = np.where(
        flipped, (true + rng.integers(1, max(n_classes, 2), rows)) % n_classes, true
    )
    trust = np.where(
        flipped, rng.uniform(0.55, 0.97, rows), 1.0 - np.abs(rng.normal(0, 0.02, rows))
    )
    flagged = trust < 0.95
    corrected = np.where(flagged, (observed + 1) % n_classes, observed)
    columns = {
        "index": np.arange(rows),
        "sample_id": [f"train/{i}" for i in range(rows)],
        "observed_label": observed,
        "trust": [f"{t:.6f}" for t in trust],
        "flagged": flagged.astype(int),
        "corrected_label": corrected,
        "true_label": true,
    }
    unknown = [name for name in header if name not in columns]
    real = list(csv.DictReader(io.StringIO(template.decode()))) if unknown else []
    if unknown and not real:
        raise RuntimeError(f"trust.csv has columns {unknown} and no template rows to cycle")
    for name in unknown:
        values = [row[name] for row in real]
        columns[name] = [values[i % len(values)] for i in range(rows)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(zip(*(columns[name] for name in header), strict=True))
    return buffer.getvalue().encode()


def write_synthetic_job(
    store: ArtifactStore, job_id: str, real: JobStore, trust_csv: bytes, rows: int
) -> None:
    job = JobStore(store, job_id)
    refs = [job.put("trust.csv", trust_csv, content_type="text/csv")]
    for name in ("report.json", "spec.json", "model.onnx"):
        refs.append(job.put(name, real.get(name, verify=name != "spec.json")))
    job.write_manifest(
        refs,
        synthetic=True,
        synthetic_rows=rows,
        synthetic_note=(
            f"benchmark data: trust.csv is made up ({rows} rows); report/spec/model copied "
            f"from job {real.job_id}"
        ),
    )


def read_stream(
    client: NoiseScoringClient, job_id: str, view: int = pb.CORRECTION_VIEW_BASIC
) -> tuple[float, int]:
    start = time.perf_counter()
    rows = 0
    request = pb.StreamCorrectionsRequest(job=f"jobs/{job_id}", view=view)
    for chunk in client.stub.StreamCorrections(request):
        rows += len(chunk.corrections)
    return time.perf_counter() - start, rows


def read_pages(client: NoiseScoringClient, job_id: str) -> tuple[float, int, list[float]]:
    start = time.perf_counter()
    rows, token, pages = 0, "", []
    while True:
        began = time.perf_counter()
        page = client.stub.GetCorrections(
            pb.GetCorrectionsRequest(job=f"jobs/{job_id}", page_size=PAGE_ROWS, page_token=token),
            timeout=120,
        )
        pages.append(time.perf_counter() - began)
        rows += len(page.corrections)
        token = page.next_page_token
        if not token:
            return time.perf_counter() - start, rows, pages


def measure_large_reads(
    client: NoiseScoringClient, job_ids: dict[str, list[str]], rows: int
) -> dict[str, Any]:
    """Per read kind: a cold read of each fresh job copy, each followed by a warm read."""
    raw: dict[str, Any] = {
        "stream": {"cold_s": [], "warm_s": []},
        "paged": {"cold_s": [], "warm_s": [], "cold_first_page_s": [], "warm_first_page_s": []},
        # CORRECTION_VIEW_FULL: every detector's score in each row (the table is cached).
        "stream_full": {"warm_s": []},
    }
    for stream_id, paged_id in zip(job_ids["stream"], job_ids["paged"], strict=True):
        for temperature in ("cold", "warm"):
            seconds, got = read_stream(client, stream_id)
            _check_rows("StreamCorrections", got, rows)
            raw["stream"][f"{temperature}_s"].append(seconds)
        seconds, got = read_stream(client, stream_id, pb.CORRECTION_VIEW_FULL)
        _check_rows("StreamCorrections (full view)", got, rows)
        raw["stream_full"]["warm_s"].append(seconds)
        for temperature in ("cold", "warm"):
            seconds, got, pages = read_pages(client, paged_id)
            _check_rows("GetCorrections", got, rows)
            raw["paged"][f"{temperature}_s"].append(seconds)
            raw["paged"][f"{temperature}_first_page_s"].append(pages[0])
    return raw


def _check_rows(what: str, got: int, rows: int) -> None:
    if got != rows:
        raise RuntimeError(f"{what} returned {got} rows, expected {rows}")


# --------------------------------------------------------------------------- environment


def git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def machine_busy_seconds() -> float:
    """CPU time all cores of the machine spent busy since boot (Linux ``/proc/stat``)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_busy_seconds(server: ServerProcess) -> float:
    """CPU time of this process (all threads) and of the server child so far."""
    times = os.times()
    return times.user + times.system + server.cpu_seconds()


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(args: argparse.Namespace, extra: dict[str, Any], cmd: str) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "grpcio": grpc.__version__,
        "device": f"cpu: {cpu_name()}",
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        **extra,
        "repeats": args.repeats,
        "clients": args.clients,
        "duration_s": args.duration,
        "large_rows": args.large_rows,
        "large_repeats": args.large_repeats,
        "git_commit": git("rev-parse", "--short", "HEAD") or "uncommitted",
        # Dirty: tracked files changed, or this script itself not committed as it is.
        "git_dirty": bool(
            git("status", "--porcelain", "--untracked-files=no")
            or git("status", "--porcelain", "--", str(Path(__file__).resolve()))
        ),
        "command": cmd,
    }


# --------------------------------------------------------------------------- summary


def summarise(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    predict: dict[str, Any] = {}
    for batch, cases in raw["predict"].items():
        stats = {case: percentiles(seconds) for case, seconds in cases.items()}
        torch_p50 = stats["torch"]["p50_ms"]
        predict[f"batch_{batch}"] = {
            **stats,
            "torch_over_onnxruntime": torch_p50 / stats["onnxruntime"]["p50_ms"],
            "torch_over_predict_rpc": torch_p50 / stats["predict_rpc"]["p50_ms"],
        }
    throughput: dict[str, Any] = {}
    for method, runs in raw["load"].items():
        one, many = runs["1"], runs[str(args.clients)]
        throughput[method] = {
            "clients_1": _drop_lists(one),
            f"clients_{args.clients}": _drop_lists(many),
            "scaling": many["requests_per_second"] / one["requests_per_second"],
            "errors": one["errors"] + many["errors"],
        }
    watch = raw["watch_load"]
    watch_load: dict[str, Any] = {"watches": watch["watches"], "rounds": watch["rounds"]}
    for condition, runs in watch["runs"].items():
        latencies = [t for run in runs for t in run["latencies"]]
        seconds = sum(run["seconds"] for run in runs)
        watch_load[condition] = {
            "requests": len(latencies),
            "requests_per_second": len(latencies) / seconds,
            "latency": percentiles(latencies),
            "errors": sum(run["errors"] for run in runs),
            "server_cpu_cores": statistics.mean(run["server_cpu_cores"] for run in runs),
        }
    watch_load["watch_errors"] = watch["watch_errors"]
    watch_load["errors"] = (
        watch_load["with"]["errors"] + watch_load["without"]["errors"] + watch["watch_errors"]
    )
    watch_load["p99_with_over_without"] = (
        watch_load["with"]["latency"]["p99_ms"] / watch_load["without"]["latency"]["p99_ms"]
    )
    large: dict[str, Any] = {"synthetic": True, "rows": args.large_rows, "page_rows": PAGE_ROWS}
    for kind, values in raw["large"].items():
        large[kind] = {}
        for key, seconds in values.items():
            name = key.removesuffix("_s")
            large[kind][f"{name}_median_s"] = statistics.median(seconds)
            large[kind][f"{name}_min_s"] = min(seconds)
            large[kind][f"{name}_max_s"] = max(seconds)
        large[kind]["rows_per_second_warm"] = args.large_rows / large[kind]["warm_median_s"]
    large["target_warm_s"] = LARGE_TARGET_S
    large["target_met"] = all(
        large[kind]["warm_median_s"] < LARGE_TARGET_S for kind in ("stream", "paged")
    )
    gc_report = raw.get("server_gc") or {}
    server_gc = {
        phase: {"count": len(pauses), "total_s": sum(pauses), "max_ms": 1e3 * max(pauses)}
        for phase, pauses in gc_report.get("gen2_pauses_s", {}).items()
    }
    return {
        "predict": predict,
        "throughput": throughput,
        "errors": sum(t["errors"] for t in throughput.values()) + watch_load["errors"],
        "watch_load": watch_load,
        "large_job": large,
        "server_gc_gen2": server_gc,
        "server_tracked_objects": gc_report.get("tracked_objects_at_start"),
        "server_frozen_objects": gc_report.get("frozen_objects_at_start"),
    }


def _drop_lists(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "requests_per_client"}


# --------------------------------------------------------------------------- outputs


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def render_markdown(result: dict[str, Any]) -> str:
    s, env = result["summary"], result["environment"]
    lines = [
        "# Service benchmark",
        "",
        "Generated by `bench/bench_service.py`; ratios are against a baseline measured in "
        "the same run. CPU only, "
        f"{env['threads']} intra-op thread(s) for torch and onnxruntime; the server runs in "
        f"a child process ({env['rpc_threads']} RPC threads) on the same "
        f"{env['cpu_count']}-core machine as the clients, over loopback. Raw timings: "
        "`service.json`; plot: `service.png`.",
        "",
        "## Predict latency",
        "",
        f"The job's model (`{env['model']}`; {env['job_source']}) on real "
        f"{env['dataset']} test images; batch 256 cycles the "
        f"{env['n_test']} test images. {env['repeats']} interleaved repeats per case. "
        "Ratio: torch eager p50 / case p50 (> 1 = faster than torch eager).",
        "",
        "| batch | case | p50 (ms) | p99 (ms) | torch p50 / p50 |",
        "|---|---|---:|---:|---:|",
    ]
    for key, label in LATENCY_ROWS.items():
        row = s["predict"][f"batch_{key}"]
        ratios = {
            "torch": "1.00 (baseline)",
            "onnxruntime": f"{row['torch_over_onnxruntime']:.2f}",
            "predict_rpc": f"{row['torch_over_predict_rpc']:.2f}",
        }
        for case in CASES:
            lines.append(
                f"| {label} | {CASE_LABELS[case]} | {_ms(row[case]['p50_ms'])} "
                f"| {_ms(row[case]['p99_ms'])} | {ratios[case]} |"
            )
    parity = result["raw"]["parity_max_abs_diff"]
    lines += [
        "",
        "All three serve the same model: largest |p − p_torch| on the batch of 256 is "
        + ", ".join(f"{v:.1e} ({CASE_LABELS[k]})" for k, v in parity.items())
        + ". The RPC case is the typed client's `predict` (request built from uint8 arrays, "
        "response turned back into an array), so it includes both ends' (de)serialisation. "
        "Batches 1 and 256 are interleaved: every call follows about 0.1 s of other work, as "
        "an isolated request would. *Back to back* repeats the same batch-1 call "
        f"{env['repeats']} times in a row: a hot loop, where nothing else ran in between.",
        "",
        "## Concurrency",
        "",
        f"Each client is a thread with its own channel and connection, calling back to back "
        f"for {env['duration_s']:g} s; requests are built before the window. Scaling = "
        f"requests/s with {env['clients']} clients / requests/s with 1 client. CPU cores busy: "
        "CPU time of the server process and of the benchmark process (all client threads) "
        f"over the window; the machine has {env['cpu_count']} cores, shared with other work.",
        "",
        "| RPC | per request | clients | requests/s | samples/s | p50 (ms) | p99 (ms) "
        "| errors | scaling | CPU cores busy: server + clients |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    what = {
        "ScoreLabels": f"{SCORE_BATCH} images",
        "GetCorrections": f"a page of {env['n_train']} rows",
    }
    for method, t in s["throughput"].items():
        for key in ("clients_1", f"clients_{env['clients']}"):
            run = t[key]
            scaling = "1.00 (baseline)" if key == "clients_1" else f"{t['scaling']:.2f}"
            lat = run.get("latency", {"p50_ms": float("nan"), "p99_ms": float("nan")})
            lines.append(
                f"| {method} | {what[method]} | {run['clients']} "
                f"| {run['requests_per_second']:.0f} | {run['samples_per_second']:.0f} "
                f"| {_ms(lat['p50_ms'])} | {_ms(lat['p99_ms'])} "
                f"| {run['errors']} | {scaling} "
                f"| {run['server_cpu_cores']:.2f} + {run['client_cpu_cores']:.2f} |"
            )
    w = s["watch_load"]
    lines += [
        "",
        f"## Watches under load ({w['watches']} WatchJob streams)",
        "",
        f"{env['clients']} clients call `ScoreLabels` ({SCORE_BATCH} images) back to back, "
        f"without and with {w['watches']} open `WatchJob` streams of a real job held RUNNING "
        "(a long cleaning job submitted to the server, its processes stopped with SIGSTOP "
        "once it runs, so it costs no CPU). The two conditions alternate, "
        f"{w['rounds']} rounds of {env['duration_s']:g} s each; percentiles pool the rounds. "
        "Errors: failed calls plus watch streams that ended before the window did.",
        "",
        "| condition | requests/s | p50 (ms) | p99 (ms) | errors | server CPU cores |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for condition, label in (("without", "no watches (baseline)"),
                             ("with", f"{w['watches']} open watches")):  # fmt: skip
        run = w[condition]
        errors = run["errors"] + (w["watch_errors"] if condition == "with" else 0)
        lines.append(
            f"| {label} | {run['requests_per_second']:.0f} | {_ms(run['latency']['p50_ms'])} "
            f"| {_ms(run['latency']['p99_ms'])} | {errors} | {run['server_cpu_cores']:.2f} |"
        )
    lines += [
        "",
        f"ScoreLabels p99 with the watches / without: {w['p99_with_over_without']:.2f}.",
    ]
    large = s["large_job"]
    met = "met" if large["target_met"] else "**not met**"
    lines += [
        "",
        f"Errors in all: {s['errors']} (must be 0).",
        "",
        f"## Large job read (synthetic, {large['rows']:,} rows)",
        "",
        f"**Synthetic data**: a made-up `trust.csv` of {large['rows']:,} rows (the real "
        "MedMNIST training sets are smaller) in the real job layout, with `report.json`, "
        "`spec.json` and `model.onnx` copied from the real job and a `manifest.json` written "
        "by `JobStore`. Cold = the first read of a job (the server reads and verifies "
        "`trust.csv` against the manifest and parses it); warm = the next read (parsed table "
        f"cached). Each cold read is of a fresh copy; medians of {env['large_repeats']}. "
        "Rows are counted with `len()` per message, not converted to Python objects.",
        "",
        "| read | cold (s), median [min–max] | warm (s), median [min–max] | warm rows/s "
        "| warm < 1 s |",
        "|---|---:|---:|---:|---|",
        _large_row("StreamCorrections, all rows", large["stream"], "", with_rate=True),
        _full_view_row(large),
        _large_row(f"GetCorrections, pages of {PAGE_ROWS:,}", large["paged"], "", with_rate=True),
        _large_row("GetCorrections, first page only", large["paged"], "_first_page"),
        "",
        f"Target (warm read of all rows well under {LARGE_TARGET_S:g} s): {met}.",
        "",
        *_gc_lines(s),
        "## Environment",
        "",
        "```",
        *(f"{key}: {value}" for key, value in env.items() if key != "command"),
        "```",
        "",
        "## Command",
        "",
        "```",
        env["command"],
        "```",
        "",
    ]
    return "\n".join(lines)


def _large_row(what: str, reads: dict[str, float], part: str, *, with_rate: bool = False) -> str:
    def cell(temperature: str) -> str:
        key = f"{temperature}{part}"
        return (
            f"{reads[f'{key}_median_s']:.3f} "
            f"[{reads[f'{key}_min_s']:.3f}–{reads[f'{key}_max_s']:.3f}]"
        )

    if not with_rate:
        return f"| {what} | {cell('cold')} | {cell('warm')} | | |"
    ok = "yes" if reads["warm_median_s"] < LARGE_TARGET_S else "no"
    return (
        f"| {what} | {cell('cold')} | {cell('warm')} "
        f"| {reads['rows_per_second_warm']:,.0f} | {ok} |"
    )


def _full_view_row(large: dict[str, Any]) -> str:
    full = large["stream_full"]
    return (
        "| StreamCorrections, all rows with every detector score (`CORRECTION_VIEW_FULL`) | "
        f"| {full['warm_median_s']:.3f} [{full['warm_min_s']:.3f}–{full['warm_max_s']:.3f}] "
        f"| {full['rows_per_second_warm']:,.0f} | (not a target) |"
    )


def _gc_lines(s: dict[str, Any]) -> list[str]:
    if not s["server_gc_gen2"]:
        return []
    lines = [
        "## Server garbage collection",
        "",
        "Full (generation 2) collections of CPython in the server process, timed with "
        f"`gc.callbacks`. After start the service froze {s['server_frozen_objects'] or 0:,} "
        "objects (`gc.freeze()` in `App.start`: the imports of torch, timm and onnx) and "
        f"{s['server_tracked_objects']:,} stayed GC-tracked; a full collection walks only "
        "those.",
        "",
        "| phase | full collections | total (s) | longest (ms) |",
        "|---|---:|---:|---:|",
    ]
    for phase, g in s["server_gc_gen2"].items():
        lines.append(f"| {phase} | {g['count']} | {g['total_s']:.2f} | {g['max_ms']:.0f} |")
    return [*lines, ""]


def render_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, env = result["summary"], result["environment"]
    fig, axes = plt.subplots(3, 2, figsize=(11, 11.5))
    panels = [("1", "1_back_to_back"), ("256",)]
    for ax, keys in zip(axes[0], panels, strict=True):
        x = 0
        ticks: list[int] = []
        names: list[str] = []
        for key in keys:
            row = s["predict"][f"batch_{key}"]
            hot = key.endswith("back_to_back")
            p50 = [row[c]["p50_ms"] for c in CASES]
            p99 = [row[c]["p99_ms"] for c in CASES]
            xs = list(range(x, x + len(CASES)))
            ax.bar(
                xs, p50, width=0.6, color=["C0", "C1", "C2"], alpha=0.7,
                hatch="//" if hot else None, edgecolor="k" if hot else None,
            )  # fmt: skip
            ax.errorbar(
                xs, p50, yerr=[[0] * len(CASES), [b - a for a, b in zip(p50, p99, strict=True)]],
                fmt="none", ecolor="k", capsize=4,
            )  # fmt: skip
            for xi, value in zip(xs, p50, strict=True):
                ax.text(xi, value, f" {_ms(value)}", ha="left", va="bottom", fontsize=7)
            ticks += xs
            names += [
                CASE_LABELS[c].replace(" (loopback)", "").replace(" ", "\n", 1) for c in CASES
            ]
            if len(keys) > 1:
                ax.annotate(
                    "back to back" if hot else "interleaved", xy=(xs[1], 0.96),
                    xycoords=("data", "axes fraction"), ha="center", va="top", fontsize=8,
                )  # fmt: skip
            x += len(CASES) + 1
        ax.set_xticks(ticks, names, fontsize=7)
        ax.set_ylabel("latency (ms)")
        ratios = [(k, s["predict"][f"batch_{k}"]) for k in keys]
        title = "; ".join(
            f"{LATENCY_ROWS[k]}: torch/ORT {r['torch_over_onnxruntime']:.2f}, "
            f"torch/RPC {r['torch_over_predict_rpc']:.2f}"
            for k, r in ratios
        )
        ax.set_title(f"Predict, batch {keys[0]}: bar p50, whisker p99\n{title}", fontsize=8)

    ax = axes[1][0]
    methods = list(s["throughput"])
    width = 0.38
    for j, key in enumerate(("clients_1", f"clients_{env['clients']}")):
        values = [s["throughput"][m][key]["requests_per_second"] for m in methods]
        centres = [i + (j - 0.5) * width for i in range(len(methods))]
        ax.bar(
            centres, values, width=width, color=f"C{j + 3}", alpha=0.7,
            label=key.replace("_", " "),
        )  # fmt: skip
        for centre, value in zip(centres, values, strict=True):
            ax.text(centre, value, f"{value:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(
        range(len(methods)),
        [f"{m}\nscaling {s['throughput'][m]['scaling']:.2f}x" for m in methods],
        fontsize=8,
    )
    ax.set_ylabel("requests/s")
    ax.set_title(f"Throughput, {env['duration_s']:g} s per run", fontsize=9)
    ax.legend(fontsize=8)

    ax = axes[1][1]
    large = s["large_job"]
    raw = result["raw"]["large"]
    labels = ["stream\ncold", "stream\nwarm", "pages\ncold", "pages\nwarm"]
    series = [raw["stream"]["cold_s"], raw["stream"]["warm_s"]]
    series += [raw["paged"]["cold_s"], raw["paged"]["warm_s"]]
    for i, values in enumerate(series):
        ax.bar(
            i, statistics.median(values), width=0.6, color=f"C{i // 2}", alpha=0.4 + 0.3 * (i % 2)
        )
        ax.scatter([i] * len(values), values, color="k", s=12, zorder=3)
    ax.axhline(LARGE_TARGET_S, color="k", linestyle="--", linewidth=1)
    ax.set_xticks(range(4), labels, fontsize=8)
    ax.set_ylabel("seconds to read all rows")
    ax.set_title(f"SYNTHETIC job, {large['rows']:,} rows: bar median, points reads", fontsize=9)

    ax = axes[2][0]
    w = s["watch_load"]
    for i, key in enumerate(("without", "with")):
        p50, p99 = w[key]["latency"]["p50_ms"], w[key]["latency"]["p99_ms"]
        ax.bar(i, p50, width=0.6, color=f"C{i + 5}", alpha=0.7)
        ax.errorbar([i], [p50], yerr=[[0], [p99 - p50]], fmt="none", ecolor="k", capsize=4)
        ax.text(i, p99, f"p99 {_ms(p99)}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks([0, 1], ["no watches\n(baseline)", f"{w['watches']} open\nWatchJob streams"])
    ax.set_ylabel("ScoreLabels latency (ms)")
    ax.set_title(
        f"ScoreLabels x{env['clients']} while watches are open: bar p50, whisker p99\n"
        f"p99 ratio {w['p99_with_over_without']:.2f}, errors {w['errors']}",
        fontsize=9,
    )
    axes[2][1].axis("off")
    fig.suptitle(
        f"noisescore service, {env['dataset']} {env['model']}, {env['device']}, "
        f"{env['threads']} intra-op thread(s), {env['cpu_count']} cores",
        fontsize=9,
    )
    fig.tight_layout()
    try:
        atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="default: ../shared/data"
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="of the job trained here")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--warmup-epochs", type=int, default=10)
    parser.add_argument("--store", type=Path, help="an existing local store (with --job)")
    parser.add_argument("--job", help="a finished job in --store instead of training one")
    parser.add_argument("--threads", type=int, default=1, help="torch/onnxruntime intra-op")
    parser.add_argument("--repeats", type=int, default=200, help="Predict latency repeats")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load run")
    parser.add_argument("--watches", type=int, default=200, help="open WatchJob streams")
    parser.add_argument("--large-rows", type=int, default=100_000)
    parser.add_argument("--large-repeats", type=int, default=5, help="cold and warm reads")
    parser.add_argument("--seed", type=int, default=0, help="order of the latency cases")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    if (args.store is None) != (args.job is None):
        parser.error("--store and --job go together")
    positive = (
        "threads", "repeats", "clients", "large_rows", "large_repeats", "epochs", "watches"
    )  # fmt: skip
    if any(getattr(args, name) < 1 for name in positive) or args.duration <= 0:
        parser.error("--threads, --repeats, --clients, --large-rows, --large-repeats, --epochs, "
                     "--watches and --duration must be positive")  # fmt: skip
    return args


def prepare_job(args: argparse.Namespace, store_dir: Path) -> tuple[str, str, float | None]:
    """The real job in the benchmark's store: ``(job_id, where it came from, flow seconds)``."""
    if args.store is not None:
        copy_job(LocalStore(args.store), LocalStore(store_dir), args.job)
        return args.job, f"existing job {args.job} of {args.store}", None
    job_id = "bench-service"
    print("training the job (clean-labels flow)...", file=sys.stderr)
    seconds = train_job(store_dir, job_id, args)
    source = (
        f"trained in this run by the clean-labels flow: epochs {args.epochs}, warm-up "
        f"{args.warmup_epochs}, {NOISE_SPEC}, seed 0, cpu"
    )
    return job_id, source, seconds


def load_requests(
    job_id: str, images: np.ndarray, labels: np.ndarray, n_train: int
) -> dict[str, tuple[list[Any], Callable[[Any], int], int]]:
    """Per RPC: the requests to cycle through, how many samples a response holds, and
    how many it must hold."""
    score = [
        pb.ScoreLabelsRequest(
            job=f"jobs/{job_id}",
            samples=[
                pb.LabelledSample(image=image_message(images[i]), label=int(labels[i]))
                for i in range(start, start + SCORE_BATCH)
            ],
        )
        for start in range(0, len(images) - SCORE_BATCH + 1, SCORE_BATCH)
    ]
    page = pb.GetCorrectionsRequest(job=f"jobs/{job_id}", page_size=n_train)
    return {
        "ScoreLabels": (score, lambda r: len(r.scores), SCORE_BATCH),
        "GetCorrections": ([page], lambda r: len(r.corrections), n_train),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cli = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(cli)
    cmd = shlex.join(["python", "bench/bench_service.py", *cli])
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    test = load_dataset(DATASET, data_dir=args.data_dir).test
    assert test is not None, f"{DATASET} has no test split"
    work = Path(tempfile.mkdtemp(prefix="noisescore-bench-service-"))
    raw: dict[str, Any] = {}
    try:
        store_dir = work / "store"
        store = LocalStore(store_dir)
        job_id, job_source, flow_seconds = prepare_job(args, store_dir)
        real = JobStore(store, job_id)
        n_train = int(json.loads(real.get("report.json"))["dataset"]["n_train"])
        net, ckpt = torch_model(real)
        from noisescore.service.inference import OnnxModel

        onnx = OnnxModel(real.get("model.onnx"), intra_op_threads=args.threads)

        # Written before the server starts, which then lists them as SUCCEEDED jobs.
        real_csv = real.get("trust.csv")
        header = real_csv.decode().split("\n", 1)[0].split(",")
        trust_csv = synthetic_trust_csv(
            header,
            args.large_rows,
            n_classes=int(ckpt["num_classes"]),
            seed=args.seed,
            template=real_csv,
        )
        large_ids = {
            kind: [f"synthetic-{kind}-{i}" for i in range(args.large_repeats)]
            for kind in ("stream", "paged")
        }
        for large_id in (*large_ids["stream"], *large_ids["paged"]):
            write_synthetic_job(store, large_id, real, trust_csv, args.large_rows)

        server = ServerProcess(
            store_dir, threads=args.threads, log=work / "server.log", data_dir=args.data_dir
        )
        with server, NoiseScoringClient(server.target, timeout=120) as client:

            def torch_predict(images: np.ndarray) -> np.ndarray:
                with torch.no_grad():
                    return net(torch.from_numpy(images).float())[0].numpy()

            predictors: dict[str, Callable[[np.ndarray], np.ndarray]] = {
                "torch": torch_predict,
                "onnxruntime": onnx.predict_proba,
                "predict_rpc": lambda images: client.predict(job_id, list(images)),
            }
            cycled = test.images[np.arange(max(BATCH_SIZES)) % len(test)]
            batches = {b: np.ascontiguousarray(cycled[:b]) for b in BATCH_SIZES}
            busy_before = (machine_busy_seconds(), own_busy_seconds(server), time.time())
            server.phase("predict")
            raw["parity_max_abs_diff"] = check_parity(predictors, batches[max(BATCH_SIZES)])
            print(f"Predict latency: {args.repeats} repeats...", file=sys.stderr)
            raw["predict"] = measure_latency(
                predictors, batches, repeats=args.repeats, seed=args.seed
            )
            raw["predict"]["1_back_to_back"] = measure_back_to_back(
                predictors, batches[1], repeats=args.repeats
            )

            raw["load"] = {}
            loads = load_requests(job_id, test.images, test.labels, n_train)
            for method, (requests, samples_in, expected) in loads.items():
                raw["load"][method] = {}
                for clients in (1, args.clients):
                    print(f"{method}: {clients} client(s)...", file=sys.stderr)
                    server.phase(f"{method} x{clients}")
                    raw["load"][method][str(clients)] = run_load(
                        server.target, method, requests, clients=clients,
                        duration=args.duration, samples_in=samples_in,
                        expected_samples=expected, server_cpu=server.cpu_seconds,
                    )  # fmt: skip

            score_requests, score_samples, score_expected = loads["ScoreLabels"]
            raw["watch_load"] = measure_watch_load(
                server, client, score_requests, score_samples, score_expected, args
            )

            print(f"large job: {args.large_rows} synthetic rows...", file=sys.stderr)
            server.phase("large job")
            raw["large"] = measure_large_reads(client, large_ids, args.large_rows)
            machine, own, wall = (
                after - before
                for after, before in zip(
                    (machine_busy_seconds(), own_busy_seconds(server), time.time()),
                    busy_before,
                    strict=True,
                )
            )
        raw["server_gc"] = server.gc
    finally:
        shutil.rmtree(work, ignore_errors=True)

    extra = {
        "dataset": DATASET,
        "n_train": n_train,
        "n_test": len(test),
        "model": ckpt["model"],
        "job_source": job_source,
        "flow_seconds": round(flow_seconds, 1) if flow_seconds is not None else None,
        "rpc_threads": server.rpc_threads,
        "server": "child process, create_app(), LocalStore, 127.0.0.1 loopback",
        "loadavg_1m_before": round(load_before[0], 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
        # Cores kept busy by other processes while this one measured (0 = a quiet machine).
        "other_cpu_cores_during_measurements": round(max(machine - own, 0.0) / wall, 2),
    }
    result = {
        "environment": environment(args, extra, cmd),
        "summary": summarise(raw, args),
        "raw": raw,
    }
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(out_dir / "service.json", json.dumps(result, indent=2) + "\n")
    _write_text(out_dir / "service.md", render_markdown(result))
    render_plot(result, out_dir / "service.png")
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == [SERVE_COMMAND]:
        serve(sys.argv[2:])
    else:
        main()
