"""The active-clean flow end to end on real BreastMNIST and a real Prefect API: the oracle
answers at once; a human round makes the run stop holding nothing, and the same job id
continues once the answers are in the store. What is asserted is read back from the store."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from noisescore.cli import main
from noisescore.flows.active_clean import EXIT_WAITING, SELECTION, active_clean
from noisescore.jobs import JobStore
from noisescore.relabels import Answer, RelabelBook
from noisescore.settings import ActiveSettings, StoreSettings
from noisescore.storage import open_store

pytestmark = [pytest.mark.usefixtures("prefect_api"), pytest.mark.slow]

TINY: dict[str, Any] = dict(
    dataset="medmnist://breastmnist",
    imbalance=3.0,
    noise="symmetric:0.3",
    epochs=3,
    t_k=2,
    vog_warmup=1,
    clean_epochs=2,
    rounds=2,
    budget=8,
    fine_tune_epochs=1,
    seed=0,
    device="cpu",
)


def _rows(job: JobStore, name: str = "trust.csv") -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(job.get(name).decode())))


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("NOISESCORE_S3_ENDPOINT", raising=False)
    monkeypatch.setenv("NOISESCORE_STORE_DIR", str(tmp_path / "artifacts"))
    return tmp_path / "artifacts"


def test_oracle_flow_on_a_long_tailed_subset(store: Path, data_dir: Path) -> None:
    settings = ActiveSettings(**TINY, data_dir=data_dir, expert="oracle")
    summary = active_clean(settings=settings, job_id="active-oracle")
    assert summary["status"] == "complete"
    job = JobStore(open_store(StoreSettings()), "active-oracle")
    files = job.verify()  # every file the manifest lists is there and intact
    for r in (1, 2):
        assert f"rounds/{r}/queue.json" in files and f"rounds/{r}/closed.json" in files
    report = json.loads(job.get("report.json"))
    assert report["imbalance"]["ratio"] == 3.0
    counts = report["imbalance"]["counts_after"]
    assert counts[0] > counts[1] and report["dataset"]["n_train"] == sum(counts)
    assert [p["round"] for p in report["rounds"]] == [0, 1, 2]
    selection = report["selection"]
    asked = min(16, selection["n_noisy_pool"])  # 2 rounds of 8, or the whole pool
    assert report["relabelled"]["n"] == asked == summary["n_relabelled"]
    assert selection["method"] == "coteaching_vog" and len(selection["recall_by_class"]) == 2
    assert selection["vog_bytes"] > 0 and report["test"]["macro_f1"] > 0

    # The audit: one immutable record per answer, the oracle's true labels.
    book = RelabelBook(job)
    audit = book.audit()
    assert len(audit) == asked and {a.source for a in audit} == {"oracle"}
    rows = _rows(job)
    by_index = {int(r["index"]): r for r in rows}
    for record in audit:
        row = by_index[record.index]
        assert row["source"] == "expert" and int(row["relabel_round"]) == record.round
        assert int(row["corrected_label"]) == record.label == int(row["true_label"])
    # Leak-free: the clean set keeps the labels it has, wrong ones included.
    kept = [r for r in rows if r["flagged"] == "0"]
    wrong_but_kept = [r for r in kept if r["observed_label"] != r["true_label"]]
    assert wrong_but_kept, "the tiny run's clean set should hold some noise"
    assert all(r["corrected_label"] == r["observed_label"] for r in wrong_but_kept)
    assert all(r["source"] == "observed" for r in kept)


def test_human_rounds_wait_holding_nothing_then_continue(
    store: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["active-clean", "--data-dir", str(data_dir), "--job-id", "active-human", "--quiet"]
    for name, value in TINY.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    argv += ["--rounds", "1", "--lnl-method", "coteaching"]
    assert main(argv) == EXIT_WAITING
    out = capsys.readouterr().out
    assert "job active-human waits for an expert: round 1, 8 samples" in out
    assert "noisescore relabel submit --job active-human --round 1" in out
    job = JobStore(open_store(StoreSettings()), "active-human")
    assert not job.is_complete()
    book = RelabelBook(job)
    assert book.waiting() == 1
    queue = book.queue(1)
    assert len(queue.rows) == 8 and book.images(1).shape[0] == 8
    selection_before = job.get(SELECTION, verify=False)

    # Running again before any answer: still waiting, nothing recomputed or re-ranked.
    assert main(argv) == EXIT_WAITING
    assert book.queue(1) == queue
    assert job.get(SELECTION, verify=False) == selection_before

    # An expert answers half of them and closes the round; the same command continues.
    answers = [Answer(row.sample_id, 1 - row.current_label, "dr-a") for row in queue.rows[:4]]
    submission = book.submit(1, answers, close=True)
    assert submission.recorded and submission.closed
    capsys.readouterr()
    assert main(argv) == 0
    assert "n_relabelled  4" in capsys.readouterr().out
    assert job.is_complete() and book.waiting() is None
    rows = {r["sample_id"]: r for r in _rows(job)}
    for a in answers:
        assert rows[a.sample_id]["source"] == "expert"
        assert int(rows[a.sample_id]["corrected_label"]) == a.label
    unanswered = queue.rows[4:]
    assert all(rows[r.sample_id]["source"] == "observed" for r in unanswered)
    report = json.loads(job.get("report.json"))
    assert report["relabelled"] == {
        "n": 4,
        "n_changed": 4,
        "n_noisy_fixed": report["relabelled"]["n_noisy_fixed"],
    }


def test_bad_settings_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="unknown sampler 'kmeans'; choose one of coreset"):
        ActiveSettings(noise="symmetric:0.2", sampler="kmeans")
    assert main(["active-clean", "--lnl-method", "dividemix", "--noise", "symmetric:0.2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("noisescore: error: --lnl-method: unknown lnl_method 'dividemix'")
    assert main(["active-clean"]) == 2  # no noise rate to forget: say what to set
    assert "--forget-rate" in capsys.readouterr().err


def test_oracle_needs_the_truth(store: Path, data_dir: Path) -> None:
    settings = ActiveSettings(
        **{**TINY, "noise": None}, forget_rate=0.2, data_dir=data_dir, expert="oracle"
    )
    state = active_clean(settings=settings, job_id="active-no-truth", return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match="expert=oracle answers with the true labels"):
        state.result()
