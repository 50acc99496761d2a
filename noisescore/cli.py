"""``noisescore`` command line. Settings flags map one-to-one onto :class:`CleanSettings`.

Verbs: ``clean`` (run the clean-labels flow here; ``--nproc N`` in N processes under
torchrun), ``flow run`` / ``flow serve`` / ``flow execute`` (through a Prefect API),
``verify`` (check a stored job against its manifest), ``datasets upload`` (put a checked
dataset into MinIO/S3).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pydantic import ValidationError

from noisescore import __version__
from noisescore.jobs import validate_job_id
from noisescore.ml.detector_names import DETECTOR_NAMES, ETA_MIN
from noisescore.ml.method_names import BENCH_METHODS, SAMPLER_NAMES, SELECTION_METHODS

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

    from noisescore.client import NoiseScoringClient
    from noisescore.jobs import JobStore
    from noisescore.ml.distributed import Dist
    from noisescore.settings import CleanSettings, StoreSettings

EXIT_USAGE = 2
NO_PREFECT_API = (
    "PREFECT_API_URL is not set: `noisescore flow run` creates a run of a deployment on a "
    "Prefect server; start one (`prefect server start`) and set "
    "PREFECT_API_URL=http://127.0.0.1:4200/api (or run the job here with `noisescore clean`)"
)


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`CleanSettings` field (defaults suppressed so env vars apply)."""
    _add_training_flags(p, epochs="total epochs (default 100)")
    p.add_argument("--warmup-epochs", type=int, help="LiNC warm-up epochs (default 10)")
    p.add_argument("--alpha-lr", type=float, help="LiNC trust learning rate (default 1)")
    p.add_argument("--alpha-wd", type=float, help="LiNC trust weight decay (default 1e-3)")
    p.add_argument(
        "--alpha-grad",
        choices=["mean", "sample"],
        help="trust gradient of the batch-mean loss (default) or per-sample loss",
    )
    p.add_argument(
        "--baseline", action="store_true", help="also train plain cross-entropy with the same seed"
    )
    p.add_argument(
        "--detectors",
        help="label-noise detectors recorded during warm-up: all (default) or a comma list "
        f"of {', '.join(DETECTOR_NAMES)}",
    )
    p.add_argument(
        "--flag-by",
        help="score whose Otsu split flags (and relabels) samples: linc (default), "
        "consensus or a detector name",
    )
    p.add_argument(
        "--cl-folds",
        type=int,
        help="also run confident learning on K-fold out-of-fold probabilities "
        "(K extra warm-up trainings; default 0 = off)",
    )
    p.add_argument(
        "--bimodality-min",
        type=float,
        help="relabel only when the flagging score's Otsu between-class variance ratio "
        f"reaches this (default {ETA_MIN}; 0 = always relabel)",
    )


def _add_active_flags(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`ActiveSettings` field (defaults suppressed so env vars apply)."""
    _add_training_flags(p, epochs="epochs of the clean-set selection (default 40)")
    p.add_argument(
        "--imbalance",
        type=float,
        help="draw a long-tailed train subset with ratio r (N_c = N_0 r^(-c/(C-1)), e.g. 100)",
    )
    p.add_argument(
        "--lnl-method",
        help=f"clean-set selection: {', '.join(SELECTION_METHODS)} (default coteaching_vog)",
    )
    p.add_argument(
        "--forget-rate",
        type=float,
        help="Co-teaching's final forget rate (default: the injected noise rate)",
    )
    p.add_argument("--t-k", type=int, help="epochs the forget rate ramps over (default 10)")
    p.add_argument(
        "--mix-ratio", type=float, help="share of kept samples chosen by VOG (default 0.2)"
    )
    p.add_argument("--vog-window", type=int, help="epochs of gradients VOG uses (default 5)")
    p.add_argument("--vog-warmup", type=int, help="plain Co-teaching epochs first (default 10)")
    p.add_argument("--vog-mode", choices=["exact", "ewma"], help="VOG window (default exact)")
    p.add_argument(
        "--select-last", type=int, help="clean set = union of the last N epochs' picks (1)"
    )
    p.add_argument("--clean-epochs", type=int, help="training on the clean set (default 30)")
    p.add_argument(
        "--sampler", help=f"ranks suspects: {', '.join(SAMPLER_NAMES)} (default entropy)"
    )
    p.add_argument("--rounds", type=int, help="relabelling rounds (default 8)")
    p.add_argument("--budget", type=int, help="samples relabelled per round (default 64)")
    p.add_argument("--fine-tune-epochs", type=int, help="epochs after each round (default 5)")
    p.add_argument(
        "--fine-tune-lr", type=float, help="Adam learning rate after each round (default 1e-3)"
    )
    p.add_argument(
        "--keep-start",
        action=argparse.BooleanOptionalAction,
        help="a round keeps its starting weights unless fine-tuning beats them on "
        "validation (default; --no-keep-start: the best fine-tuning epoch always)",
    )
    p.add_argument(
        "--expert",
        choices=["human", "oracle"],
        help="who answers: human (default; the job waits for answers) or oracle (true labels)",
    )
    p.add_argument(
        "--label-timeout",
        type=float,
        help="seconds a Prefect deployment run stays suspended for an answer (default 7 days)",
    )


def _add_training_flags(p: argparse.ArgumentParser, *, epochs: str) -> None:
    """Flags of :class:`TrainingSettings`: data, noise, model, optimiser."""
    p.add_argument(
        "--dataset",
        help="medmnist://NAME, file:///PATH.npz|.csv, s3://BUCKET/KEY, a MedMNIST name or a path",
    )
    p.add_argument(
        "--data-dir",
        help="where names are looked up (default: $NOISESCORE_DATA_DIR, ../shared/data, ./data)",
    )
    p.add_argument("--image-size", type=int, help="resize images to this square size")
    p.add_argument(
        "--noise",
        help="inject noise KIND:RATE for evaluation: symmetric, uniform, "
        "pairflip, instance (e.g. uniform:0.5), or asymmetric:FILE",
    )
    p.add_argument("--noise-val", action="store_true", help="inject noise into val too")
    p.add_argument("--seed", type=int)
    p.add_argument("--epochs", type=int, help=epochs)
    p.add_argument("--model", help="timm model name (default noisescore_cnn)")
    p.add_argument("--checkpoint", help="local pretrained weights for --model")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-4)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument(
        "--lr-milestones",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        help="comma-separated epochs where the LR drops x0.1 (default E/2,3E/4)",
    )
    p.add_argument("--augment", action="store_true", help="random horizontal flips")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--graph",
        choices=["auto", "on", "off"],
        help="replay each full training batch as one captured CUDA graph (auto: on for CUDA "
        "when the method's per-step work is graph-safe; on: CUDA required; off: eager)",
    )
    p.add_argument(
        "--data-placement",
        choices=["auto", "device", "stream"],
        help="training images on the device, or streamed from host memory a batch ahead "
        "(auto: stream when the uint8 train split exceeds --device-memory-share of the "
        "CUDA device's memory; same results either way)",
    )
    p.add_argument(
        "--device-memory-share",
        type=float,
        help="share in (0, 1] of the CUDA device's memory the train images may take "
        "before auto streams them (default 0.5)",
    )
    p.add_argument(
        "--dataset-roots",
        help="read the dataset only if it is a name in the data dir or lies under these "
        "comma-separated folders / s3://BUCKET/PREFIX roots, as the service's jobs do "
        "(default: any dataset; never taken from NOISESCORE_DATASET_ROOTS)",
    )


def _add_clean(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "clean",
        help="score and correct the labels of a dataset with LiNC (runs the clean-labels flow)",
        description="Run the Prefect flow clean-labels in this process: train with LiNC, "
        "flag and correct noisy labels, export ONNX, and store spec.json, noisy_labels.npy, "
        "trust_by_epoch.npy, trust.csv, report.json, model.pt, model.onnx and, last, "
        "manifest.json under jobs/<job-id>/ of the artifact store (MinIO/S3 when "
        "NOISESCORE_S3_ENDPOINT is set, else --store-dir). Unset flags fall back to "
        "NOISESCORE_<FLAG> environment variables, then to the paper's defaults.",
        argument_default=argparse.SUPPRESS,
    )
    _add_settings_flags(p)
    p.add_argument(
        "--nproc",
        type=int,
        help="train in N processes with DDP, started here by torchrun (default 1; "
        "--batch-size stays the global batch; only --detectors linc, no --cl-folds)",
    )
    _add_job_flags(p)
    p.add_argument(
        "--store-dir", help="local artifact store when no S3 endpoint is set (default ./artifacts)"
    )
    p.add_argument("--quiet", action="store_true", default=False, help="warnings and results only")


def _add_active_clean(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "active-clean",
        help="active label cleaning: select a clean set (Co-teaching VOG), then rounds in "
        "which an expert relabels the most useful suspects (runs the active-clean flow)",
        description="Run the Prefect flow active-clean in this process. With --expert human "
        "(the default) each round's queue goes to the store and the command exits 75 "
        "(waiting for labels): answer with `noisescore relabel submit` (or the service's "
        "SubmitRelabels), then run the same command with the same --job-id to continue. "
        "--expert oracle answers with the true labels (benchmarks; needs --noise or a "
        "true_label column). Unset flags fall back to NOISESCORE_<FLAG> variables.",
        argument_default=argparse.SUPPRESS,
    )
    _add_active_flags(p)
    _add_job_flags(p)
    p.add_argument(
        "--store-dir", help="local artifact store when no S3 endpoint is set (default ./artifacts)"
    )
    p.add_argument("--quiet", action="store_true", default=False, help="warnings and results only")


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark learning-with-noisy-labels methods on a grid of datasets, noise "
        "settings and seeds (runs the lnl-benchmark flow)",
        description="Run the Prefect flow lnl-benchmark in this process: every cell "
        "(method x dataset x noise x seed) trains through the one training loop and is "
        "stored under benchmarks/<bench-id>/ of the artifact store as it finishes; then "
        "results.csv, a table (mean ± std over seeds), plots and BENCHMARK.md. Rerunning "
        "with the same --bench-id reads finished cells back (resume, or extend the grid). "
        "Unset flags fall back to NOISESCORE_BENCH_<FLAG> variables, then to the defaults "
        "(LNMBench's 100 epochs).",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--methods", help=f"comma list (default: {', '.join(BENCH_METHODS)})")
    p.add_argument(
        "--datasets", help="comma list of names or URIs (default bloodmnist,pneumoniamnist)"
    )
    p.add_argument(
        "--noise",
        help="comma list of KIND:RATE with RATE in [0, 1), or real (a manifest's own "
        "label/true_label columns) (default symmetric:0.2,0.4,0.6 and instance:0.2,0.4)",
    )
    p.add_argument("--seeds", help="comma list (default 0,1)")
    p.add_argument("--epochs", type=int, help="epochs of every cell (default 100)")
    p.add_argument("--batch-size", type=int, help="default 128")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--model", help="timm model name (default noisescore_cnn)")
    p.add_argument("--augment", action="store_true", help="random horizontal flips")
    p.add_argument("--train-size", type=int, help="random train subset per dataset and seed")
    p.add_argument("--eval-size", type=int, help="random val and test subsets of this size")
    p.add_argument("--last-k", type=int, help="score = mean test accuracy of the last k epochs")
    p.add_argument("--concurrency", type=int, help="cells trained at once (default 1)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--data-dir",
        help="where names are looked up (default: $NOISESCORE_DATA_DIR, ../shared/data, ./data)",
    )
    p.add_argument(
        "--bench-id",
        default=None,
        help="benchmarks/<bench-id>/ in the store (default: the flow run id); reuse it to "
        "resume or extend a benchmark",
    )
    p.add_argument(
        "--report-dir",
        default=None,
        help="also write BENCHMARK.md and benchmark/ (results.csv, table.md, cells.jsonl, "
        "plots) into this folder, e.g. docs",
    )
    p.add_argument(
        "--store-dir", help="local artifact store when no S3 endpoint is set (default ./artifacts)"
    )
    p.add_argument("--quiet", action="store_true", default=False, help="warnings and results only")


def _add_job_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--job-id",
        default=None,
        help="jobs/<job-id>/ in the store (default: the flow run id); rerunning a failed job "
        "with its id reuses its stored warm-up",
    )


def _add_flow(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "flow", help="run, serve or execute (in a deployment's job) flows through a Prefect API"
    )
    verbs = p.add_subparsers(dest="verb", required=True)
    run = verbs.add_parser(
        "run",
        help="trigger a run of a clean-labels deployment (PREFECT_API_URL must be set)",
        description="Create a flow run of a deployment (e.g. clean-labels/local from "
        "prefect.yaml, or one served by `noisescore flow serve`) on the Prefect server of "
        "PREFECT_API_URL, with these settings; a worker of the deployment's pool runs it and "
        "stores the artifacts where the worker's NOISESCORE_S3_* / NOISESCORE_STORE_DIR say. "
        "With --wait, prints the same summary as `noisescore clean` (read from this "
        "terminal's store, which must be the worker's).",
        argument_default=argparse.SUPPRESS,
    )
    _add_settings_flags(run)
    _add_job_flags(run)
    run.add_argument(
        "--deployment",
        default="clean-labels/local",
        help="FLOW/DEPLOYMENT name (default clean-labels/local)",
    )
    run.add_argument(
        "--wait",
        action="store_true",
        default=False,
        help="wait until the run finishes and print its results",
    )
    serve = verbs.add_parser(
        "serve",
        help="serve a flow as a deployment from this process (no work pool needed)",
        description="Register the deployment FLOW/NAME (clean-labels/NAME by default) on the "
        "Prefect server of "
        "PREFECT_API_URL and run its flow runs in child processes of this one. The runs "
        "store their artifacts where this process's NOISESCORE_S3_* / NOISESCORE_STORE_DIR "
        "say (default ./artifacts).",
    )
    serve.add_argument("--name", default="served", help="deployment name (default served)")
    serve.add_argument("--limit", type=int, default=1, help="concurrent runs (default 1)")
    serve.add_argument(
        "--flow",
        choices=["clean-labels", "active-clean", "lnl-benchmark"],
        default="clean-labels",
        help="which flow: clean-labels (default), active-clean (its runs suspend while an "
        "expert answers, and resume here) or lnl-benchmark (a benchmark grid, cells under "
        "benchmarks/<bench-id>/ of the store)",
    )
    execute = verbs.add_parser(
        "execute",
        help="execute one flow run of a deployment here, as `python -m prefect.engine` does; "
        "under torchrun, a clean-labels run trains in all its processes",
        description="Execute the flow run FLOW_RUN_ID (default $PREFECT__FLOW_RUN_ID, which a "
        "Prefect worker sets in the job it starts) in this process, as Prefect's own engine "
        "does. Launched by torchrun (the container command of a multi-GPU or multi-node "
        "Kubernetes job), rank 0 executes the run and the other processes train its "
        "clean-labels stages with it (DDP); other flows run on rank 0 alone.",
    )
    execute.add_argument(
        "flow_run_id", nargs="?", default=None, help="default: $PREFECT__FLOW_RUN_ID"
    )


def _add_verify(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "verify",
        help="check a job's artifacts against its manifest (size and sha256)",
        description="Read jobs/<job-id>/manifest.json from the artifact store and verify "
        "every file it lists. The store is MinIO/S3 when NOISESCORE_S3_ENDPOINT is set "
        "(with NOISESCORE_S3_BUCKET, _ACCESS_KEY, _SECRET_KEY), else the local --store-dir. "
        "Exit 0 when all match, 1 when the job is not there or a file is missing or corrupt.",
    )
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument(
        "--store-dir",
        default=argparse.SUPPRESS,
        help="local store root when NOISESCORE_S3_ENDPOINT is unset (default "
        "$NOISESCORE_STORE_DIR or ./artifacts)",
    )


def _add_datasets(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("datasets", help="put a dataset into MinIO/S3 for s3:// jobs")
    verbs = p.add_subparsers(dest="verb", required=True)
    upload = verbs.add_parser(
        "upload",
        help="check that FILE loads as a dataset, then upload it to s3://BUCKET/KEY",
        description="Load FILE (a MedMNIST .npz or a CSV manifest of images) as a job "
        "would, then upload it to the S3/MinIO endpoint of NOISESCORE_S3_ENDPOINT with "
        "NOISESCORE_S3_ACCESS_KEY / NOISESCORE_S3_SECRET_KEY (the bucket is created if "
        "missing). A manifest goes with every image it names, at the same relative paths, "
        "and is written last. Nothing is uploaded when FILE does not load.",
    )
    upload.add_argument("file", metavar="FILE", help=".npz archive or .csv manifest")
    upload.add_argument("uri", metavar="s3://BUCKET/KEY", help="where jobs will read it")
    upload.add_argument(
        "--image-size", type=int, default=None, help="resize while checking (see clean)"
    )


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default=os.environ.get("NOISESCORE_SERVER", "127.0.0.1:50051"),
        help="host:port of noisescore serve (default $NOISESCORE_SERVER or 127.0.0.1:50051)",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("NOISESCORE_TOKEN"),
        help="bearer token (default $NOISESCORE_TOKEN)",
    )
    p.add_argument("--tls-ca", default=os.environ.get("NOISESCORE_TLS_CA"), help="server CA (TLS)")
    p.add_argument(
        "--tls-server-name",
        default=os.environ.get("NOISESCORE_TLS_SERVER_NAME"),
        help="name the server certificate must carry, when --server is another address "
        "(e.g. a kubectl port-forward on 127.0.0.1)",
    )
    p.add_argument(
        "--tls-client-cert",
        default=os.environ.get("NOISESCORE_TLS_CLIENT_CERT"),
        help="client certificate (PEM) for mTLS",
    )
    p.add_argument(
        "--tls-client-key",
        default=os.environ.get("NOISESCORE_TLS_CLIENT_KEY"),
        help="client private key (PEM) for mTLS",
    )


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the gRPC service noisescore.v1.NoiseScoring",
        description="Serve the gRPC API (health checking and reflection included) and "
        "Prometheus metrics. Settings come from NOISESCORE_* variables (auth tokens, TLS, "
        "limits: see docs/SERVICE.md); jobs run through the clean-labels flow.",
    )
    p.add_argument("--grpc-addr", help="host:port to bind (default 127.0.0.1:50051)")
    p.add_argument("--metrics-addr", help="host:port of /metrics (default 127.0.0.1:9464)")
    p.add_argument(
        "--health-addr", help="host:port of a plaintext health-only server (default: none)"
    )
    p.add_argument("--store-dir", help="local artifact store when no S3 endpoint is set")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve a non-loopback --grpc-addr without bearer tokens or mTLS (anyone who "
        "reaches the port may call every RPC); NOISESCORE_INSECURE=true does the same",
    )


def _add_jobs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("jobs", help="submit, inspect, watch or cancel jobs on a server")
    verbs = p.add_subparsers(dest="verb", required=True)
    submit = verbs.add_parser("submit", help="start a cleaning job")
    submit.add_argument("--dataset", required=True, help="medmnist://NAME, file:///…, s3://…")
    submit.add_argument("--model", default="")
    submit.add_argument("--epochs", type=int, default=0)
    submit.add_argument("--warmup-epochs", type=int, default=0)
    submit.add_argument("--alpha-lr", type=float, default=0.0)
    submit.add_argument("--alpha-wd", type=float, default=0.0)
    submit.add_argument("--seed", type=int, default=None)
    submit.add_argument("--noise", default=None, help="KIND:RATE injected for evaluation")
    submit.add_argument("--device", default="", choices=["", "auto", "cpu", "cuda"])
    submit.add_argument("--idempotency-key", default="", help="same key, same job")
    submit.add_argument(
        "--detectors", default="", help="NAME,NAME recorded during warm-up (default: all)"
    )
    submit.add_argument(
        "--flag-by", default="", help="linc (default), consensus or a detector name"
    )
    submit.add_argument("--cl-folds", type=int, default=0, help="out-of-fold CL trainings")
    submit.add_argument("--wait", action="store_true", help="wait until the job ends")
    for name, text in (
        ("get", "show a job"),
        ("watch", "stream a job's progress until it ends"),
        ("cancel", "cancel a queued or running job"),
    ):
        verb = verbs.add_parser(name, help=text)
        verb.add_argument("job", metavar="JOB", help="job id or jobs/<id>")
    listing = verbs.add_parser("list", help="list jobs, newest first")
    listing.add_argument(
        "--state",
        choices=["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "WAITING_FOR_LABELS"],
    )
    for verb in verbs.choices.values():
        _add_client_flags(verb)


def _add_relabel(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "relabel",
        help="list a relabel round of an active cleaning job, or answer it (expert in the loop)",
    )
    verbs = p.add_subparsers(dest="verb", required=True)
    queue = verbs.add_parser(
        "queue",
        help="the samples a round asks about, as CSV (sample_id,current_label,"
        "predicted_label,priority)",
    )
    queue.add_argument("--job", required=True, help="job id or jobs/<id>")
    queue.add_argument("--round", type=int, default=0, help="default: the round the job waits for")
    queue.add_argument(
        "--images", metavar="DIR", help="also write each image as DIR/<sample_id>.png"
    )
    submit = verbs.add_parser(
        "submit",
        help="answer a round from a CSV (sample_id,label[,annotator]); exits 1 when a row is "
        "rejected (then nothing was recorded)",
    )
    submit.add_argument("--job", required=True, help="job id or jobs/<id>")
    submit.add_argument("--round", type=int, default=0, help="default: the round the job waits for")
    submit.add_argument("--csv", required=True, help="answers: columns sample_id,label[,annotator]")
    submit.add_argument("--annotator", help="who answered, for rows without an annotator column")
    submit.add_argument(
        "--close", action="store_true", help="close the round (unanswered samples keep their label)"
    )
    for verb in verbs.choices.values():
        _add_client_flags(verb)


def _add_results(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "corrections", help="a finished job's trust, flag and corrected label per sample (CSV)"
    )
    p.add_argument("job", metavar="JOB")
    p.add_argument("--only-flagged", action="store_true")
    p.add_argument(
        "--detector-scores",
        action="store_true",
        help="add one column per detector score (and consensus) after the base columns",
    )
    _add_client_flags(p)
    p = sub.add_parser(
        "score",
        help="label quality of new labelled images under a job's model (CSV)",
        description="Score IMAGE=LABEL pairs (PNG/JPEG files) or a CSV manifest "
        "(path,label) with the job's ONNX model; suspect=1 marks a label below the job's "
        "calibrated cut-off.",
    )
    p.add_argument("job", metavar="JOB")
    p.add_argument("pairs", nargs="*", metavar="IMAGE=LABEL")
    p.add_argument("--manifest", help="CSV with columns path,label (paths relative to it)")
    _add_client_flags(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noisescore", description="Find and correct noisy labels in medical images."
    )
    parser.add_argument("--version", action="version", version=f"noisescore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_clean(sub)
    _add_active_clean(sub)
    _add_bench(sub)
    _add_flow(sub)
    _add_verify(sub)
    _add_datasets(sub)
    _add_serve(sub)
    # Handled before parsing (noisescore.healthcheck); listed here for --help.
    sub.add_parser(
        "health",
        help="exit 0 when a running service reports SERVING (gRPC health checking)",
        add_help=False,
    )
    _add_jobs(sub)
    _add_relabel(sub)
    _add_results(sub)
    return parser


def _summary(report: dict[str, Any], url: str, files: Sequence[str]) -> str:
    d, linc, test = report["dataset"], report["linc"], report.get("test") or {}
    lines = [
        f"dataset   {d['name']}: {d['n_train']} train, {d['n_classes']} classes",
    ]
    if report.get("noise"):
        n = report["noise"]
        lines.append(f"noise     {n['kind']}:{n['rate']} realised {n['realised_rate']:.3f}")
    lines.append(
        f"LiNC      Otsu threshold {linc['otsu_threshold']:.4f}, "
        f"flagged {linc['n_flagged']}, relabelled {linc['n_changed']}"
    )
    if "detection" in linc:
        det = linc["detection"]
        auroc = "n/a" if det["auroc"] is None else f"{det['auroc']:.3f}"
        lines.append(
            f"detection AUROC {auroc}, precision {det['precision']:.3f}, "
            f"recall {det['recall']:.3f}; label accuracy "
            f"{linc['label_accuracy_before']:.3f} -> {linc['label_accuracy_after']:.3f}"
        )
    if test:
        lines.append(f"test      accuracy {test['accuracy']:.3f}, macro-F1 {test['macro_f1']:.3f}")
    if report.get("baseline"):
        lines.append(f"baseline  test accuracy {report['baseline']['test']['accuracy']:.3f}")
    lines.append(f"artifacts {url}")
    lines.append(f"          {' '.join([*files, 'manifest.json'])}")
    return "\n".join(lines)


def _job_summary(job: JobStore) -> str:
    """The summary of a complete job, read from its store and verified."""
    report = json.loads(job.get("report.json"))  # verified against the manifest
    return _summary(report, job.url(), list(job.read_manifest()["files"]))


_SETTINGS_EXCLUDE = {"command", "verb", "quiet", "job_id", "store_dir", "deployment", "wait"}


def _settings(args: argparse.Namespace) -> CleanSettings:
    from noisescore.settings import CleanSettings

    return CleanSettings(**{k: v for k, v in vars(args).items() if k not in _SETTINGS_EXCLUDE})


def _prefect_env() -> None:
    """Defaults for Prefect, set before it is imported (an explicit env var wins)."""
    # The ephemeral server's telemetry write races its own migrations on first start.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _quiet_console(*, quiet: bool) -> None:
    """A failing step's traceback stays in the flow run's logs (Prefect API/UI); on the
    terminal, Prefect's one-line log and our error message say what went wrong. With
    ``quiet`` the terminal shows warnings only; the Prefect API still gets every log."""
    import logging

    from prefect.logging import configuration
    from prefect.logging.handlers import PrefectConsoleHandler

    if not configuration.PROCESS_LOGGING_CONFIG:
        configuration.setup_logging()  # what the flow engine would do on its first run

    def without_traceback(format: Callable[[logging.LogRecord], str]) -> Callable[..., str]:
        def wrapper(record: logging.LogRecord) -> str:
            saved = record.exc_info, record.exc_text, record.stack_info
            record.exc_info = record.exc_text = record.stack_info = None
            try:
                return format(record)
            finally:
                record.exc_info, record.exc_text, record.stack_info = saved

        return wrapper

    loggers = [logging.getLogger(), *logging.root.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            formatter = handler.formatter
            if isinstance(handler, PrefectConsoleHandler) and quiet:
                handler.setLevel(logging.WARNING)
            if (
                isinstance(handler, PrefectConsoleHandler)
                and formatter is not None
                and not getattr(formatter, "_noisescore_quiet", False)
            ):
                formatter.format = without_traceback(formatter.format)  # type: ignore[method-assign]
                formatter._noisescore_quiet = True  # type: ignore[attr-defined]


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C in the main thread: ``finally`` blocks (the job's
    lease) and ``atexit`` handlers (Prefect stops its temporary API server there) run,
    which the default action of those signals, an immediate exit, would skip."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into :class:`Terminated` while the block runs; if one arrives,
    stop whatever child processes are left (the temporary Prefect server) on the way out."""

    def interrupt(signum: int, frame: object) -> None:
        raise Terminated(signum)

    import threading

    if threading.current_thread() is not threading.main_thread():  # signals go to main only
        yield
        return
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    except KeyboardInterrupt:
        _drain_prefect()
        _stop_children()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _drain_prefect(timeout: float = 10.0) -> None:
    """Send Prefect's queued logs and events while the temporary API server still runs.
    Left to Prefect's exit hook, they are retried against the server that
    :func:`_stop_children` stopped, and the process outlived a SIGTERM by over a minute
    on a loaded machine (the hook waits for them without a timeout)."""
    try:
        from prefect._internal.concurrency.services import _QueueServiceBase

        _QueueServiceBase.drain_all(timeout=timeout)
    except Exception:  # best effort: exiting matters more than the last log lines
        pass


def _stop_children(grace: float = 5.0) -> None:
    """SIGTERM every child process of this one (then SIGKILL after ``grace`` seconds).
    Prefect's temporary server would otherwise outlive an interrupted ``noisescore clean``
    when atexit is not reached (Linux ``/proc``; elsewhere atexit must do)."""
    import time

    def children() -> list[int]:
        found = []
        for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as handle:
                    fields = handle.read().rsplit(b")", 1)[-1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] != b"Z":
                found.append(int(entry))
        return found

    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = children()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            for pid in list(pids):
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        pids.remove(pid)
            pids = [pid for pid in pids if pid in children()]
            time.sleep(0.05)
        if not pids:
            return


def _clean(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """``noisescore clean``: the flow here; with ``--nproc N`` > 1 this command again in N
    processes under torchrun (``argv``: this command's arguments); in a process torchrun
    started, rank 0 runs the flow and the others serve its training stages."""
    if "store_dir" in args:
        os.environ["NOISESCORE_STORE_DIR"] = str(args.store_dir)
    settings = _settings(args)  # validate flags before Prefect starts
    world = _torchrun_world()
    if world > 1:
        return _clean_distributed(args, settings, world)
    if settings.nproc > 1:
        return _launch_torchrun(args, settings, argv)
    return _clean_flow(args, settings)


def _clean_flow(args: argparse.Namespace, settings: CleanSettings) -> int:
    """Run the clean-labels flow in this process and print its summary."""
    _prefect_env()
    from noisescore.flows.clean_labels import clean_labels
    from noisescore.jobs import JobStore
    from noisescore.settings import StoreSettings
    from noisescore.storage import open_store

    if args.job_id is not None:
        validate_job_id(args.job_id)
    open_store(StoreSettings()).check()  # an unusable store fails before any training
    _quiet_console(quiet=args.quiet)
    with _terminate_as_interrupt():
        summary = clean_labels(settings=settings, job_id=args.job_id)
    print(_job_summary(JobStore(open_store(StoreSettings()), summary["job_id"])))
    return 0


# ----------------------------------------------------------------------------- distributed


def _torchrun_world() -> int:
    """``WORLD_SIZE`` of a process that torchrun started; 1 otherwise."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {value!r}") from None


def _launch_torchrun(args: argparse.Namespace, settings: CleanSettings, argv: Sequence[str]) -> int:
    """``noisescore clean --nproc N``: this same command in N processes on this node, started
    by ``python -m torch.distributed.run`` (no restarts: a process that dies ends the job).
    Its output passes through; on failure one line names the ranks that failed."""
    import subprocess
    import threading
    from collections import deque

    from noisescore.ml.clean import check_distributed
    from noisescore.settings import StoreSettings
    from noisescore.storage import open_store

    check_distributed(settings, settings.nproc)  # refused before any process starts
    if args.job_id is not None:
        validate_job_id(args.job_id)
    open_store(StoreSettings()).check()
    # torchrun's own parser would take --nproc (an abbreviation of its --nproc-per-node):
    # the children get the count from the environment instead.
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(settings.nproc), "--max-restarts", "0",
        "-m", "noisescore.cli", *_without_nproc(argv),
    ]  # fmt: skip
    env = {**os.environ, "NOISESCORE_NPROC": str(settings.nproc)}
    process = subprocess.Popen(
        command, env=env, stderr=subprocess.PIPE, text=True, errors="replace"
    )
    tail: deque[str] = deque(maxlen=500)

    def tee() -> None:  # the ranks' and torchrun's stderr, kept for the failure summary
        assert process.stderr is not None
        for line in process.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            tail.append(line)

    reader = threading.Thread(target=tee, name="torchrun-stderr", daemon=True)
    reader.start()
    with _terminate_as_interrupt():
        try:
            code = process.wait()
        except KeyboardInterrupt:
            process.terminate()  # torchrun stops its workers (SIGTERM, then SIGKILL)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
        finally:
            reader.join(timeout=10)
    if code == 0:
        return 0
    message, code = _torchrun_failure("".join(tail), code)
    if args.job_id is not None:
        from noisescore.jobs import JobStore

        done = JobStore(open_store(StoreSettings()), args.job_id).is_complete()
        message += f"; job {args.job_id} " + ("is complete" if done else "has no manifest.json")
    print(f"noisescore: error: {message}", file=sys.stderr)
    return code


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (or an abbreviation argparse took)."""
    out: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
            continue
        name = token.split("=", 1)[0]
        if len(name) >= len("--np") and "--nproc".startswith(name):
            skip = "=" not in token
            continue
        out.append(token)
    return out


_FAILURE = re.compile(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


def _torchrun_failure(output: str, code: int) -> tuple[str, int]:
    """One line naming the failed ranks from torchrun's failure table in ``output``, and the
    exit code to return: the first failure's own when positive (2 for bad input, as in one
    process), else 1."""
    root_at = output.rfind("Root Cause")
    failures = [(m.start() > root_at >= 0, int(m[1]), int(m[2])) for m in _FAILURE.finditer(output)]
    if not failures:
        return f"torchrun exited with code {code} (its output is above)", code or 1
    failures.sort(key=lambda f: not f[0])  # the first observed failure first
    parts = []
    for _, rank, exitcode in dict.fromkeys(failures):
        if exitcode < 0:
            try:
                how = f"was killed by {signal.Signals(-exitcode).name}"
            except ValueError:
                how = f"was killed by signal {-exitcode}"
        else:
            how = f"exited with code {exitcode}"
        parts.append(f"rank {rank} {how}")
    first = failures[0][2]
    return f"{'; then '.join(parts)}; torchrun stopped the other processes", (
        first if first > 0 else 1
    )


def _clean_distributed(args: argparse.Namespace, settings: CleanSettings, world: int) -> int:
    """``noisescore clean`` in one of the ``world`` processes torchrun started: rank 0 runs the
    flow (and alone prints), the others serve its training stages until it says stop."""
    from noisescore.ml import clean as stages
    from noisescore.ml import distributed

    if "nproc" in settings.model_fields_set and settings.nproc != world:
        raise ValueError(
            f"--nproc {settings.nproc} but torchrun started {world} processes: under torchrun "
            f"its --nnodes and --nproc-per-node decide; leave --nproc out"
        )
    settings = settings.model_copy(update={"nproc": world})
    stages.check_distributed(settings, world)
    dist = distributed.init_from_env(settings.device)
    assert dist is not None
    if not dist.is_main:
        return _serve_rank(dist)
    clean_exit = False
    try:
        code = _clean_flow(args, settings)
        clean_exit = True
        return code
    finally:
        _end_rank_zero(clean_exit=clean_exit)


def _end_rank_zero(*, clean_exit: bool) -> None:
    """Rank 0 at the end of a distributed command: tell the other ranks to stop, and leave
    the group after a clean end or when no stage failed midway (the others would still be
    inside its collectives: torchrun stops them when this process exits non-zero)."""
    from noisescore.ml import clean as stages

    stages.stop_peers()
    if clean_exit or stages.stage_failed() is None:
        _leave_group()


def _serve_rank(dist: Dist) -> int:
    """A rank > 0: run rank 0's training stages until it says stop; one line on failure."""
    from noisescore.ml import clean as stages

    try:
        stages.serve_stages(dist)
    except Exception as err:  # the launcher has the details; rank 0's message comes first
        line = (str(err).splitlines() or [type(err).__name__])[0]
        print(f"noisescore: error: rank {dist.rank}: {line}", file=sys.stderr)
        return 1
    _leave_group()
    return 0


def _leave_group() -> None:
    """Destroy the default process group (only after a clean end: with a peer gone, NCCL
    could wait on it forever)."""
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _active_clean(args: argparse.Namespace) -> int:
    if "store_dir" in args:
        os.environ["NOISESCORE_STORE_DIR"] = str(args.store_dir)
    from noisescore.settings import ActiveSettings

    fields = {k: v for k, v in vars(args).items() if k not in _SETTINGS_EXCLUDE}
    settings = ActiveSettings(**fields)  # validate flags before Prefect starts
    _prefect_env()
    from noisescore.flows.active_clean import EXIT_WAITING, WAITING, active_clean
    from noisescore.settings import StoreSettings
    from noisescore.storage import open_store

    if args.job_id is not None:
        validate_job_id(args.job_id)
    open_store(StoreSettings()).check()
    _quiet_console(quiet=args.quiet)
    with _terminate_as_interrupt():
        summary = active_clean(settings=settings, job_id=args.job_id)
    if summary.get("status") == WAITING:
        job_id = summary["job_id"]
        print(
            f"job {job_id} waits for an expert: round {summary['round']}, "
            f"{summary['n_queued']} samples in {summary['queue']}\n"
            f"answer:   noisescore relabel submit --job {job_id} --round {summary['round']} "
            f"--csv ANSWERS.csv (through a server), or the Prefect UI of a deployment run\n"
            f"continue: the same command with --job-id {job_id}"
        )
        return EXIT_WAITING
    lines = [f"{k:<14}{v}" for k, v in summary.items() if k != "status"]
    print("\n".join(lines))
    return 0


_BENCH_EXCLUDE = {"command", "quiet", "bench_id", "store_dir", "report_dir"}


def _bench(args: argparse.Namespace) -> int:
    if "store_dir" in args:
        os.environ["NOISESCORE_STORE_DIR"] = str(args.store_dir)
    from noisescore.settings import BenchSettings

    settings = BenchSettings(**{k: v for k, v in vars(args).items() if k not in _BENCH_EXCLUDE})
    if args.bench_id is not None:
        validate_job_id(args.bench_id)
    from noisescore.ml.benchmark import check_schedule, grid

    grid(settings)  # two entries whose cells would share a key
    check_schedule(settings)  # a method whose phases do not fit the epochs
    _prefect_env()
    from noisescore.flows.lnl_benchmark import BENCH_ROOT, REPORT_FILES, lnl_benchmark
    from noisescore.jobs import JobStore
    from noisescore.settings import StoreSettings
    from noisescore.storage import open_store

    store = open_store(StoreSettings())
    store.check()  # an unusable store fails before any training
    _quiet_console(quiet=args.quiet)
    with _terminate_as_interrupt():
        state = lnl_benchmark(settings=settings, bench_id=args.bench_id, return_state=True)
    summary = _bench_summary(state)
    if summary is None:  # failed before the aggregate (bad parameters, missing dataset)
        message = state.message or "the benchmark failed"
        print(f"noisescore: error: {message}", file=sys.stderr)
        return 1
    bench = JobStore(store, summary["bench_id"], root=BENCH_ROOT)
    if args.report_dir is not None:
        from noisescore.atomic import atomic_write_bytes

        root = Path(args.report_dir)
        for name in REPORT_FILES:
            if bench.exists(name):
                atomic_write_bytes(root / name, bench.get(name, verify=False))
        print(f"report      {root / 'BENCHMARK.md'}")
    print(f"benchmark   {summary['bench_id']}")
    print(f"cells       {summary['finished']} of {summary['cells']} finished")
    print(f"stored in   {summary['url']}")
    if summary["failed"]:
        print(f"failed      {', '.join(summary['failed'])}", file=sys.stderr)
        return 1
    return 0


def _bench_summary(state: Any) -> dict[str, Any] | None:
    """The flow's summary: its result, or the data of its Failed state (failed cells)."""
    try:
        result = state.result(raise_on_failure=False)
    except Exception:
        return None
    return result if isinstance(result, dict) and "bench_id" in result else None


def _flow_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.job_id is not None:
        validate_job_id(args.job_id)
    _prefect_env()
    from prefect.settings import get_current_settings

    api_url = get_current_settings().api.url  # env or the active Prefect profile
    if not api_url:
        # Without it, Prefect would start a temporary server that has no deployments.
        print(f"noisescore: error: {NO_PREFECT_API}", file=sys.stderr)
        return EXIT_USAGE
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        unhealthy = client.api_healthcheck()
    if unhealthy is not None:
        print(
            f"noisescore: error: no Prefect API answers at PREFECT_API_URL={api_url} "
            f"({type(unhealthy).__name__}: {unhealthy}); start `prefect server start` or fix "
            f"PREFECT_API_URL",
            file=sys.stderr,
        )
        return 1
    parameters: dict[str, Any] = {"settings": settings.model_dump(mode="json", exclude_unset=True)}
    if args.job_id is not None:
        parameters["job_id"] = args.job_id
    try:
        run = cast(
            "FlowRun",
            run_deployment(
                args.deployment, parameters=parameters, timeout=None if args.wait else 0
            ),
        )
    except ObjectNotFound:
        print(
            f"noisescore: error: no deployment {args.deployment} at {api_url}: deploy "
            f"prefect.yaml (`prefect --no-prompt deploy --all`) or serve one (`noisescore "
            f"flow serve`, then --deployment clean-labels/served)",
            file=sys.stderr,
        )
        return 1
    state = run.state.name if run.state else "unknown"
    job_id = args.job_id or str(run.id)
    print(f"flow run {run.name} ({run.id}) of {args.deployment}: {state}")
    print(f"job id   {job_id}")
    if not args.wait:
        return 0
    if run.state is None or not run.state.is_completed():
        message = run.state.message if run.state else ""
        print(f"noisescore: error: the run ended {state}: {message}", file=sys.stderr)
        return 1
    from noisescore.jobs import JobStore
    from noisescore.settings import StoreSettings
    from noisescore.storage import open_store

    job = JobStore(open_store(StoreSettings()), job_id)
    if not job.is_complete():
        print(
            f"noisescore: the run completed, but job {job_id} is not in this terminal's "
            f"store ({job.url()}): the worker stored it in its own ({_other_store_hint()})",
            file=sys.stderr,
        )
        return 0
    print(_job_summary(job))
    return 0


def _flow_serve(args: argparse.Namespace) -> int:
    _prefect_env()
    if args.flow == "active-clean":
        from noisescore.flows.active_clean import active_clean

        active_clean.serve(name=args.name, limit=args.limit)
        return 0
    if args.flow == "lnl-benchmark":
        from noisescore.flows.lnl_benchmark import lnl_benchmark

        lnl_benchmark.serve(name=args.name, limit=args.limit)
        return 0
    from noisescore.flows.clean_labels import clean_labels

    clean_labels.serve(name=args.name, limit=args.limit)
    return 0


CLEAN_FLOW = "clean-labels"
#: The commands that may run in processes torchrun started (WORLD_SIZE > 1).
_DISTRIBUTED_COMMANDS = {("clean", None), ("flow", "execute")}


def _flow_execute(args: argparse.Namespace) -> int:
    """``noisescore flow execute [FLOW_RUN_ID]``: Prefect's engine in this process; under
    torchrun, rank 0 runs it and the other ranks serve the clean-labels training stages."""
    import uuid

    run_id = args.flow_run_id or os.environ.get("PREFECT__FLOW_RUN_ID")
    if not run_id:
        print(
            "noisescore: error: no flow run id: give FLOW_RUN_ID or set PREFECT__FLOW_RUN_ID "
            "(a Prefect worker sets it in the jobs it starts)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        uuid.UUID(run_id)
    except ValueError:
        print(f"noisescore: error: flow run id {run_id!r} is not a UUID", file=sys.stderr)
        return EXIT_USAGE
    _prefect_env()
    world = _torchrun_world()
    if world == 1:
        return _prefect_engine(run_id)
    from noisescore.ml import clean as stages
    from noisescore.ml import distributed
    from noisescore.settings import CleanSettings

    # The pod's NOISESCORE_DEVICE (default auto) picks NCCL or gloo before any rank can
    # read the run's parameters; the run's own device setting must agree (checked later).
    dist = distributed.init_from_env(CleanSettings().device)
    assert dist is not None
    if not dist.is_main:
        return _serve_rank(dist)
    clean_exit = False
    try:
        name = _flow_name(run_id)
        if name != CLEAN_FLOW:
            print(
                f"noisescore: flow run {run_id} is of {name}, which trains in one process: the "
                f"other {world - 1} processes stop",
                file=sys.stderr,
            )
            stages.stop_peers()
            _leave_group()  # one process from here: no trainer may wrap itself in DDP
        code = _prefect_engine(run_id)
        failed = stages.stage_failed()
        if failed is not None:
            # Prefect recorded the failure (the engine exits 0 then), but the other ranks
            # are inside the stage's collectives: exiting non-zero makes torchrun stop them.
            print(
                f"noisescore: error: {failed} failed on rank 0 while the other ranks trained",
                file=sys.stderr,
            )
            return code or 1
        clean_exit = True
        return code
    finally:
        _end_rank_zero(clean_exit=clean_exit)


def _flow_name(run_id: str) -> str:
    """The name of the flow of the flow run ``run_id`` (from the Prefect API)."""
    import uuid

    from prefect import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(uuid.UUID(run_id))
        return str(client.read_flow(run.flow_id).name)


def _prefect_engine(run_id: str) -> int:
    """Run ``python -m prefect.engine RUN_ID`` in this process; its exit code."""
    import runpy

    saved = sys.argv
    sys.argv = [saved[0] if saved else "noisescore", run_id]
    try:
        runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        if exit.code is None or isinstance(exit.code, int):
            return exit.code or 0
        print(f"noisescore: error: {exit.code}", file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0


def _store_in_use(settings: StoreSettings, url: str) -> str:
    """Which store the settings chose (its URL) and why, for messages."""
    if settings.s3_endpoint:
        return f"the S3 store {url} (NOISESCORE_S3_ENDPOINT={settings.s3_endpoint})"
    return f"the local store {url} (NOISESCORE_S3_ENDPOINT is not set)"


def _other_store_hint() -> str:
    return (
        "set NOISESCORE_S3_ENDPOINT, NOISESCORE_S3_BUCKET, NOISESCORE_S3_ACCESS_KEY and "
        "NOISESCORE_S3_SECRET_KEY for a job in MinIO/S3, or unset NOISESCORE_S3_ENDPOINT and "
        "give --store-dir (or NOISESCORE_STORE_DIR) for a local one, as where the job ran"
    )


def _verify(args: argparse.Namespace) -> int:
    if "store_dir" in args:
        os.environ["NOISESCORE_STORE_DIR"] = str(args.store_dir)
    from noisescore.jobs import IncompleteJob, JobStore
    from noisescore.settings import StoreSettings
    from noisescore.storage import ChecksumMismatch, StorageError, open_store

    store_settings = StoreSettings()
    job = JobStore(open_store(store_settings), validate_job_id(args.job_id))
    try:
        refs = job.verify()
    except ChecksumMismatch as err:
        print(f"noisescore: corrupt: {err}", file=sys.stderr)
        return 1
    except IncompleteJob as err:
        searched = _store_in_use(store_settings, job.store.url())
        try:
            started = bool(job.store.list(job.prefix))
        except StorageError:  # e.g. the bucket does not exist
            started = False
        if started:
            print(f"noisescore: incomplete: {err}; searched {searched}", file=sys.stderr)
        else:
            print(
                f"noisescore: error: no job {job.job_id} in {searched} (looked for "
                f"{job.url('manifest.json')}); to search another store, {_other_store_hint()}",
                file=sys.stderr,
            )
        return 1
    for name, ref in sorted(refs.items()):
        print(f"ok  {ref.size:>12,d}  {ref.sha256[:16]}  {name}")
    print(f"job {job.job_id} verified: {len(refs)} files match {job.url('manifest.json')}")
    return 0


def _format_validation(err: ValidationError) -> str:
    from noisescore.settings import format_settings_error  # the flow fails with the same

    return format_settings_error(err)


def _datasets_upload(args: argparse.Namespace) -> int:
    from noisescore.datasets import upload_dataset
    from noisescore.settings import StoreSettings

    upload = upload_dataset(args.file, args.uri, StoreSettings(), image_size=args.image_size)
    for url, ref in upload.objects:
        print(f"uploaded  {ref.size:>12,d}  {ref.sha256[:16]}  {url}")
    d = upload.dataset
    splits = [f"{len(d.train)} train"]
    splits += [f"{len(s)} {n}" for n, s in (("val", d.val), ("test", d.test)) if s is not None]
    print(
        f"dataset {upload.uri}: {', '.join(splits)}, {d.n_classes} classes; jobs read it with "
        f"--dataset {upload.uri} (where NOISESCORE_S3_* point at this endpoint)"
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    for flag in ("grpc_addr", "metrics_addr", "health_addr"):
        if getattr(args, flag):
            os.environ[f"NOISESCORE_{flag.upper()}"] = getattr(args, flag)
    if args.store_dir:
        os.environ["NOISESCORE_STORE_DIR"] = args.store_dir
    if args.insecure:
        os.environ["NOISESCORE_INSECURE"] = "true"
    from noisescore.service.app import create_app
    from noisescore.service.server import check_exposure, serve_forever
    from noisescore.settings import ServiceSettings

    settings = ServiceSettings()
    check_exposure(settings)  # before the store is opened or any job is recovered
    app = create_app(settings).start()
    where = f"gRPC on {settings.grpc_addr.rsplit(':', 1)[0]}:{app.port}"
    if app.metrics_port and settings.metrics_addr:
        host = settings.metrics_addr.rsplit(":", 1)[0]
        where += f", metrics on http://{host}:{app.metrics_port}/metrics"
    if app.service.health_port and settings.health_addr:
        where += f", health on {settings.health_addr.rsplit(':', 1)[0]}:{app.service.health_port}"
    print(f"noisescore serving {where}", flush=True)
    try:
        serve_forever(app.service)
    finally:
        app.stop()
    return 0


def _client(args: argparse.Namespace) -> NoiseScoringClient:
    from noisescore.client import NoiseScoringClient

    return NoiseScoringClient(
        args.server,
        token=args.token,
        tls_ca=args.tls_ca,
        tls_server_name=args.tls_server_name,
        client_cert=args.tls_client_cert,
        client_key=args.tls_client_key,
    )


def _job_text(job: Any) -> str:
    from google.protobuf.json_format import MessageToJson

    return MessageToJson(job, preserving_proto_field_name=True, indent=2)


def _jobs(args: argparse.Namespace) -> int:
    from noisescore.client import TERMINAL

    with _client(args) as client:
        if args.verb == "submit":
            job = client.submit(
                args.dataset, model=args.model, epochs=args.epochs,
                warmup_epochs=args.warmup_epochs, alpha_lr=args.alpha_lr, alpha_wd=args.alpha_wd,
                seed=args.seed, noise=args.noise, idempotency_key=args.idempotency_key,
                device=args.device, detectors=[d for d in args.detectors.split(",") if d],
                flag_by=args.flag_by, cl_folds=args.cl_folds,
            )  # fmt: skip
            if args.wait:
                job = client.wait(job.name)
            print(_job_text(job))
            return 0 if not args.wait or job.state == job.SUCCEEDED else 1
        if args.verb == "get":
            print(_job_text(client.get(args.job)))
        elif args.verb == "list":
            for job in client.list(state=args.state):
                created = job.create_time.ToJsonString() if job.HasField("create_time") else ""
                dataset = job.spec.dataset_uri or job.active_spec.dataset_uri
                print(f"{job.name}\t{job.State.Name(job.state)}\t{created}\t{dataset}")
        elif args.verb == "watch":
            for event in client.watch(args.job):
                state = event.State.Name(event.state)
                if event.stage:
                    print(
                        f"{state} {event.stage} epoch {event.epoch}/{event.epochs} "
                        f"loss {event.loss:.4f} trust {event.trust_mean:.4f} "
                        f"flagged {event.flagged_fraction:.3f}",
                        flush=True,
                    )
                elif event.waiting_round:  # an active job waits for an expert
                    print(f"{state} round {event.waiting_round}", flush=True)
                else:
                    print(state, flush=True)
                if event.state in TERMINAL and not event.stage:
                    break
        elif args.verb == "cancel":
            print(_job_text(client.cancel(args.job)))
    return 0


_SAFE_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def _relabel(args: argparse.Namespace) -> int:
    import csv
    from pathlib import Path

    from noisescore.client import RelabelsRejected

    writer = csv.writer(sys.stdout, lineterminator="\n")
    if args.verb == "queue":
        folder = Path(args.images) if args.images else None
        with _client(args) as client:
            queue = client.relabel_queue(args.job, round=args.round, images=folder is not None)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        writer.writerow(["sample_id", "current_label", "predicted_label", "priority"])
        for item in queue.items:
            writer.writerow(
                [item.sample_id, item.current_label, item.predicted_label, f"{item.priority:.6g}"]
            )
            if folder is not None:  # a sample id that is no safe file name: the index
                safe = _SAFE_FILE_NAME.fullmatch(item.sample_id)
                (folder / f"{item.sample_id if safe else item.index}.png").write_bytes(item.png)
        state = "closed" if queue.closed else "open"
        print(
            f"# {queue.job} round {queue.round}: {len(queue.items)} samples, {queue.n_answered} "
            f"answered, {state}",
            file=sys.stderr,
        )
        return 0
    rows: list[tuple[str, int, str]] = []
    with Path(args.csv).open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"sample_id", "label"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{args.csv}: missing column(s) {', '.join(sorted(missing))}")
        for line, row in enumerate(reader, start=2):
            label = (row["label"] or "").strip()
            if not label.lstrip("-").isdigit():
                raise ValueError(f"{args.csv} line {line}: label {label!r} is not an integer")
            annotator = (row.get("annotator") or "").strip() or args.annotator
            if not annotator:
                raise ValueError(
                    f"{args.csv} line {line}: no annotator; add an annotator column or give "
                    "--annotator NAME"
                )
            rows.append((row["sample_id"].strip(), int(label), annotator))
    with _client(args) as client:
        try:
            response = client.submit_relabels(args.job, args.round, rows, close_round=args.close)
        except RelabelsRejected as err:
            response = err.response
            print(f"noisescore: error: INVALID_ARGUMENT: {err.details}", file=sys.stderr)
    writer.writerow(["sample_id", "accepted", "reason"])
    for result in response.results:
        writer.writerow([result.sample_id, int(result.accepted), result.reason])
    state = "closed" if response.round_closed else "open"
    print(
        f"# {response.n_answered} of {response.n_queued} answered, round {state}",
        file=sys.stderr,
    )
    return 0 if all(r.accepted for r in response.results) else 1


def _corrections(args: argparse.Namespace) -> int:
    import csv

    writer = csv.writer(sys.stdout, lineterminator="\n")
    base = ["index", "sample_id", "observed_label", "trust", "flagged", "corrected_label"]
    names: list[str] | None = None
    with _client(args) as client:
        rows = client.corrections(
            args.job, only_flagged=args.only_flagged, detector_scores=args.detector_scores
        )
        for c in rows:
            if names is None:  # the first row says which detectors the job has
                names = sorted(c.detector_scores) if args.detector_scores else []
                writer.writerow(base + names)
            writer.writerow(
                [c.index, c.sample_id, c.observed_label, f"{c.trust:.6f}", int(c.flagged),
                 c.corrected_label, *(f"{c.detector_scores[n]:.6f}" for n in names)]
            )  # fmt: skip
    if names is None:  # no rows: the header alone
        writer.writerow(base)
    return 0


def _score(args: argparse.Namespace) -> int:
    import csv
    from pathlib import Path

    items: list[tuple[str, Path, int]] = []
    for pair in args.pairs:
        path, sep, label = pair.rpartition("=")
        if not sep or not label.lstrip("-").isdigit():
            raise ValueError(f"expected IMAGE=LABEL, got {pair!r}")
        items.append((path, Path(path), int(label)))
    if args.manifest:
        manifest = Path(args.manifest)
        with manifest.open(newline="") as handle:
            for row in csv.DictReader(handle):
                items.append((row["path"], manifest.parent / row["path"], int(row["label"])))
    if not items:
        raise ValueError("give IMAGE=LABEL pairs or --manifest")
    for _, path, _ in items:
        if not path.is_file():
            raise ValueError(f"image {path} not found")
    with _client(args) as client:
        response = client.score(
            args.job,
            [path.read_bytes() for _, path, _ in items],
            [label for *_, label in items],
            sample_ids=[name for name, *_ in items],
        )
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(
        ["sample_id", "label", "label_quality", "normalized_margin", "predicted_label", "suspect"]
    )
    for s in response.scores:
        writer.writerow(
            [s.sample_id, s.label, f"{s.label_quality:.6f}", f"{s.normalized_margin:.6f}",
             s.predicted_label, int(s.suspect)]
        )  # fmt: skip
    print(f"# suspect cut-off {response.suspect_cutoff:.6f}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["health"]:  # light: no settings, storage or Prefect imports
        from noisescore import healthcheck

        return healthcheck.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    import grpc

    from noisescore.storage import StorageError

    commands = {
        ("clean", None): lambda a: _clean(a, argv),
        ("active-clean", None): _active_clean,
        ("bench", None): _bench,
        ("flow", "run"): _flow_run,
        ("flow", "serve"): _flow_serve,
        ("flow", "execute"): _flow_execute,
        ("verify", None): _verify,
        ("datasets", "upload"): _datasets_upload,
        ("serve", None): _serve,
        ("jobs", getattr(args, "verb", None)): _jobs,
        ("relabel", getattr(args, "verb", None)): _relabel,
        ("corrections", None): _corrections,
        ("score", None): _score,
    }
    key = (args.command, getattr(args, "verb", None))
    command = commands[key]
    try:
        if key not in _DISTRIBUTED_COMMANDS and _torchrun_world() > 1:
            raise ValueError(
                f"`noisescore {' '.join(filter(None, key))}` runs in one process; under "
                f"torchrun only `noisescore clean` and `noisescore flow execute` do"
            )
        return command(args)
    except ValidationError as err:
        print(f"noisescore: error: {_format_validation(err)}", file=sys.stderr)
    except grpc.RpcError as err:  # the server's canonical code and message
        code = err.code().name if err.code() else "UNKNOWN"
        print(f"noisescore: error: {code}: {err.details()}", file=sys.stderr)
        return 1
    except StorageError as err:  # unreachable store, missing or corrupt artifact
        print(f"noisescore: storage error: {err}", file=sys.stderr)
        return 1
    except (ValueError, NotADirectoryError) as err:  # DataError, NoiseSpecError, ModelError...
        print(f"noisescore: error: {err}", file=sys.stderr)
    except KeyboardInterrupt as err:
        print("noisescore: interrupted; the job has no manifest.json", file=sys.stderr)
        return 128 + err.signum if isinstance(err, Terminated) else 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
