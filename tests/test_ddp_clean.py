"""``noisescore clean --nproc N``: the job in N processes under torchrun (DDP, gloo on CPU).

End to end on the real BreastMNIST: one report and one manifest, the same detection as one
process; a rank that dies fails the job cleanly; what cannot train in several processes
is refused before any process starts; ``noisescore flow execute`` under torchrun.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from noisescore.cli import _without_nproc, main
from noisescore.ml.clean import check_distributed
from noisescore.settings import CleanSettings

ROOT = Path(__file__).resolve().parents[1]
JOB = "ddp"
# uniform:0.5 on BreastMNIST, the paper's warm-up of 10 epochs and one final epoch: the
# trust histogram is bimodal there (a tiny run's is not, and its AUROC means little).
TRAINING = [
    "--dataset", "breastmnist", "--noise", "uniform:0.5", "--seed", "0", "--epochs", "11",
    "--warmup-epochs", "10", "--device", "cpu",  # every detector (the default)
]  # fmt: skip

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """NOISESCORE_* and torchrun variables of the caller must not change what flags say."""
    for key in list(os.environ):
        if key.startswith("NOISESCORE_") or key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            monkeypatch.delenv(key)


def _env(prefect_api: str) -> dict[str, str]:
    """The children's environment: this Prefect API (no temporary server per run), one
    thread per process (2 processes share the machine)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOISESCORE_")}
    env.update(PREFECT_API_URL=prefect_api, OMP_NUM_THREADS="1")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env


def _noisescore(*args: str) -> list[str]:
    return [sys.executable, "-m", "noisescore.cli", *args]


def _files(store: Path, name: str) -> list[Path]:
    return sorted(store.rglob(name))


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def runs(
    data_dir: Path, prefect_api: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The same job in one process (here) and in two (``--nproc 2``, a child process)."""
    root = tmp_path_factory.mktemp("ddp")
    one, two = root / "one", root / "two"
    store = ["--data-dir", str(data_dir), "--job-id", JOB, "--quiet"]
    with pytest.MonkeyPatch.context() as patch:  # `clean --store-dir` sets the env var
        for key in [k for k in os.environ if k.startswith("NOISESCORE_")]:
            patch.delenv(key)
        patch.setenv("NOISESCORE_STORE_DIR", str(one))
        assert main(["clean", *TRAINING, *store, "--store-dir", str(one)]) == 0
    result = subprocess.run(
        _noisescore("clean", "--nproc", "2", *TRAINING, *store, "--store-dir", str(two)),
        env=_env(prefect_api),
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {"one": one, "two": two, "stdout": result.stdout}


def _report(store: Path) -> dict[str, Any]:
    return json.loads((store / "jobs" / JOB / "report.json").read_text())


def _trust(store: Path) -> np.ndarray:
    return np.load(store / "jobs" / JOB / "trust_by_epoch.npy")[-1]


@pytest.mark.slow
def test_two_processes_write_one_job(runs: dict[str, Any]) -> None:
    two: Path = runs["two"]
    assert _files(two, "manifest.json") == [two / "jobs" / JOB / "manifest.json"]
    assert _files(two, "report.json") == [two / "jobs" / JOB / "report.json"]
    report = _report(two)
    assert report["model"]["processes"] == 2
    assert report["settings"]["nproc"] == 2
    assert _report(runs["one"])["model"]["processes"] == 1
    # Only rank 0 prints: one summary.
    assert runs["stdout"].count("dataset   breastmnist") == 1
    assert f"{two / 'jobs' / JOB}" in runs["stdout"]
    assert len(report["linc"]["history"]) == 11  # warm-up and final stages both ran
    assert main(["verify", JOB, "--store-dir", str(two)]) == 0


@pytest.mark.slow
def test_two_processes_detect_like_one(runs: dict[str, Any]) -> None:
    one, two = _report(runs["one"])["linc"], _report(runs["two"])["linc"]
    # Measured: AUROC 0.793 (one process) and 0.786 (two) here; 0.787 and 0.788 with 12
    # epochs. The runs differ by BatchNorm statistics of half batches and summation order.
    assert one["detection"]["auroc"] > 0.7
    assert abs(one["detection"]["auroc"] - two["detection"]["auroc"]) <= 0.02
    # The same alpha histogram shape: both bimodal, the same low mode and Otsu split.
    # Measured: eta 0.892 / 0.888, low-mode fraction 0.311 / 0.315, Otsu 0.9729 / 0.9726,
    # histogram total variation 0.037, correlation of the per-sample alpha 0.996.
    assert one["bimodality"]["bimodal"] and two["bimodality"]["bimodal"]
    assert abs(one["bimodality"]["statistic"] - two["bimodality"]["statistic"]) <= 0.02
    assert abs(one["bimodality"]["low_fraction"] - two["bimodality"]["low_fraction"]) <= 0.02
    assert abs(one["otsu_threshold"] - two["otsu_threshold"]) <= 0.005
    a, b = _trust(runs["one"]), _trust(runs["two"])
    bins = np.linspace(min(a.min(), b.min()), 1.0, 21)
    ha, hb = (np.histogram(x, bins)[0] / len(x) for x in (a, b))
    assert 0.5 * np.abs(ha - hb).sum() <= 0.1
    assert np.corrcoef(a, b)[0, 1] >= 0.98


# --------------------------------------------------------------------------- a rank dies


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[-1].split()
        except OSError:
            continue
        if fields[0] != b"Z":
            parents[int(entry)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, ppid in parents.items() if ppid in frontier]
        found += children
        frontier = children
    return found


def _local_rank(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            environ = handle.read().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"LOCAL_RANK="):
            return item.split(b"=", 1)[1].decode()
    return None


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the rank's process in /proc")
def test_a_rank_dying_mid_training_fails_the_job(
    data_dir: Path, prefect_api: str, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    long = [a if a not in ("11",) else "40" for a in TRAINING]  # still training when killed
    args = ["--data-dir", str(data_dir), "--store-dir", str(store), "--job-id", JOB]
    log = (tmp_path / "stderr.txt").open("w+")
    job = store / "jobs" / JOB
    process = subprocess.Popen(
        _noisescore("clean", "--nproc", "2", *long, *args),
        env=_env(prefect_api),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=log,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (job / "progress.json").exists():  # rank 0 finished warm-up epoch 1
            assert process.poll() is None, "the job ended before training"
            assert time.monotonic() < deadline, "no progress.json within 300 s"
            time.sleep(0.2)
        workers = _descendants(process.pid)
        ranks = {pid: _local_rank(pid) for pid in workers}
        victim = [pid for pid, rank in ranks.items() if rank == "1"]
        assert len(victim) == 1, ranks
        os.kill(victim[0], signal.SIGKILL)
        code = process.wait(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log.seek(0)
    stderr = log.read()
    assert code != 0
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("noisescore: error: rank 1 was killed by SIGKILL"), last
    assert f"job {JOB} has no manifest.json" in last
    assert not (job / "manifest.json").exists()
    assert json.loads((job / "progress.json").read_text())["warmup"]["epoch"] < 40
    leftovers = [pid for pid in workers if os.path.exists(f"/proc/{pid}")]
    assert not [pid for pid in leftovers if _local_rank(pid) is not None], "ranks outlived it"


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--detectors", "linc", "--cl-folds", "3"], "cl_folds 3 cannot train in 2 processes"),
        (["--detectors", "linc", "--batch-size", "3"], "batch_size 3 is the global batch"),
    ],
)
def test_refused_before_any_process_starts(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    argv = ["clean", "--nproc", "2", "--dataset", "breastmnist", "--store-dir", str(store)]
    assert main([*argv, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"noisescore: error: {message}") and "\n" not in err
    assert not (store / "jobs").exists()


def test_nproc_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["clean", "--nproc", "0"]) == 2
    assert "--nproc" in capsys.readouterr().err


def test_under_torchrun_nproc_must_match_its_processes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before joining
    assert main(["clean", "--nproc", "3", "--detectors", "linc"]) == 2
    assert "--nproc 3 but torchrun started 2 processes" in capsys.readouterr().err
    assert main(["active-clean"]) == 2
    assert "`noisescore active-clean` runs in one process" in capsys.readouterr().err


def test_check_distributed_accepts_every_detector() -> None:
    settings = CleanSettings(detectors="all", batch_size=4)
    check_distributed(settings, 2)
    with pytest.raises(ValueError, match="batch_size 4 is the global batch"):
        check_distributed(settings, 3)
    check_distributed(CleanSettings(), 1)  # one process: anything goes


def test_without_nproc() -> None:
    argv = ["clean", "--nproc", "2", "--noise", "uniform:0.5", "--nproc=3", "--np", "4", "-q"]
    assert _without_nproc(argv) == ["clean", "--noise", "uniform:0.5", "-q"]
    assert _without_nproc(["clean", "--noise-val", "--n"]) == ["clean", "--noise-val", "--n"]


# --------------------------------------------------------------------------- flow execute


def test_flow_execute_needs_a_flow_run_id(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flow", "execute"]) == 2
    assert "no flow run id" in capsys.readouterr().err
    assert main(["flow", "execute", "not-a-uuid"]) == 2
    assert "is not a UUID" in capsys.readouterr().err


def test_flow_execute_under_torchrun_runs_a_clean_labels_run(
    data_dir: Path, prefect_api: str, tmp_path: Path
) -> None:
    """What a Kubernetes pod of a multi-GPU job runs: torchrun ... flow execute RUN_ID."""
    from prefect import get_client

    from noisescore.flows.clean_labels import clean_labels

    store = tmp_path / "store"
    settings = {
        "dataset": "breastmnist", "data_dir": str(data_dir), "noise": "uniform:0.5",
        "epochs": 2, "warmup_epochs": 1, "detectors": "linc", "device": "cpu",
    }  # fmt: skip
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(clean_labels, parameters={"settings": settings})
    env = {
        **_env(prefect_api),
        "NOISESCORE_STORE_DIR": str(store),
        "NOISESCORE_DEVICE": "cpu",
        # A deployment's pod loads the flow from the image; here, from this checkout.
        "PREFECT__FLOW_ENTRYPOINT": f"{ROOT / 'flows' / 'clean_labels.py'}:clean_labels",
        "PREFECT__FLOW_RUN_ID": str(run.id),
    }
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    result = subprocess.run(
        [*torchrun, "--nproc-per-node", "2", "--max-restarts", "0",
         "-m", "noisescore.cli", "flow", "execute"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
    assert state is not None and state.is_completed(), state
    job = store / "jobs" / str(run.id)
    assert (job / "manifest.json").exists()
    report = json.loads((job / "report.json").read_text())
    assert report["model"]["processes"] == 2 and report["settings"]["nproc"] == 2
