"""An active-clean deployment run waits for its expert the Prefect way: it suspends (no
process left), the expert answers through the typed resume form (what the Prefect UI
shows and posts), and the run resumes from its stored checkpoints and finishes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from noisescore.jobs import JobStore
from noisescore.relabels import RelabelBook
from noisescore.settings import StoreSettings
from noisescore.storage import open_store

pytestmark = pytest.mark.slow

SETTINGS: dict[str, Any] = {
    "dataset": "medmnist://breastmnist",
    "imbalance": 3.0,
    "noise": "symmetric:0.3",
    "lnl_method": "coteaching",
    "epochs": 2,
    "t_k": 1,
    "clean_epochs": 1,
    "rounds": 1,
    "budget": 4,
    "fine_tune_epochs": 1,
    "device": "cpu",
    "expert": "human",
}


def _state(client: Any, run_id: Any) -> Any:
    return client.read_flow_run(run_id).state


def _wait(client: Any, run_id: Any, done: Any, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _state(client, run_id)
        if state is not None and done(state):
            return state
        if state is not None and (state.is_failed() or state.is_crashed()):
            raise AssertionError(f"the run ended {state.name}: {state.message}")
        time.sleep(1)
    raise AssertionError(f"still {state.name if state else None} after {timeout} s")


def test_deployment_run_suspends_and_resumes_with_the_form_input(
    prefect_api: str, data_dir: Path, tmp_path: Path
) -> None:
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.flow_runs import resume_flow_run

    store = tmp_path / "artifacts"
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "NOISESCORE_STORE_DIR": str(store),
        "NOISESCORE_DATA_DIR": str(data_dir),
    }
    env.pop("NOISESCORE_S3_ENDPOINT", None)
    log = (tmp_path / "serve.log").open("wb")
    served = subprocess.Popen(
        [sys.executable, "-m", "noisescore.cli", "flow", "serve", "--flow", "active-clean",
         "--name", "served-test"],
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    client.read_deployment_by_name("active-clean/served-test")
                    break
                except Exception:
                    if time.monotonic() > deadline or served.poll() is not None:
                        raise AssertionError((tmp_path / "serve.log").read_text()) from None
                    time.sleep(1)
            run = run_deployment(
                "active-clean/served-test",
                parameters={"settings": SETTINGS, "job_id": "active-ui"},
                timeout=0,
            )
            state = _wait(client, run.id, lambda s: s.is_paused())
            assert state.name == "Suspended"  # not Paused: nothing holds the run's place

            job = JobStore(open_store(StoreSettings(store_dir=store)), "active-ui")
            book = RelabelBook(job)
            assert book.waiting() == 1 and not book.is_closed(1)
            queue = book.queue(1)
            # What the UI's form posts: the typed RelabelInput of the round.
            answers = [
                {"sample_id": row.sample_id, "label": row.predicted_label} for row in queue.rows
            ]
            resume_flow_run(run.id, run_input={"rows": answers, "annotator": "dr-ui"})
            state = _wait(client, run.id, lambda s: s.is_completed())
        assert job.is_complete()
        audit = book.audit()
        assert {(a.sample_id, a.label) for a in audit} == {
            (a["sample_id"], a["label"]) for a in answers
        }
        assert {a.annotator for a in audit} == {"dr-ui"} and {a.source for a in audit} == {"expert"}
        assert book.is_closed(1) and book.waiting() is None
    finally:
        served.terminate()
        try:
            served.wait(timeout=30)
        except subprocess.TimeoutExpired:
            served.kill()
        log.close()
