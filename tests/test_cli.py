"""Tests of the ``noisescore`` command line (``noisescore.cli.main``), end to end on CPU."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from noisescore import __version__
from noisescore.cli import main
from noisescore.ml.models import create_model

TRUST_HEADER = [
    "index", "sample_id", "observed_label", "trust", "flagged", "corrected_label", "true_label",
]  # fmt: skip
N_TRAIN = 546  # breastmnist train split

# `noisescore clean` runs the clean-labels flow: against one real Prefect API per session.
pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """NOISESCORE_* variables of the caller must not change what the flags say."""
    for key in list(os.environ):
        if key.startswith("NOISESCORE_"):
            monkeypatch.delenv(key)


JOB = "cli-test"


def _job(store: Path) -> Path:
    """The job's folder in the local artifact store ``store``."""
    return store / "jobs" / JOB


def _clean(data_dir: Path, out: Path, *extra: str, dataset: str = "breastmnist") -> int:
    """``noisescore clean`` with the local store ``out`` and job id JOB."""
    argv = ["clean", "--dataset", dataset, "--data-dir", str(data_dir), "--seed", "0"]
    store = ["--store-dir", str(out), "--job-id", JOB]
    return main([*argv, *store, "--quiet", "--device", "cpu", *extra])


def _read_report(out: Path) -> dict[str, Any]:
    return json.loads((_job(out) / "report.json").read_text())


def _read_trust(out: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (_job(out) / "trust.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


# --------------------------------------------------------------------------- integration


@pytest.fixture(scope="module")
def uniform_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One LiNC + baseline run on breastmnist with uniform:0.5 noise, shared by the tests."""
    out = tmp_path_factory.mktemp("uniform") / "out"
    extra = ["--noise", "uniform:0.5", "--epochs", "12", "--warmup-epochs", "10", "--baseline"]
    assert _clean(data_dir, out, *extra) == 0
    return out


@pytest.mark.slow
def test_report_keys_and_quality(uniform_run: Path) -> None:
    report = _read_report(uniform_run)
    assert report["noisescore_version"] == __version__
    assert report["settings"]["epochs"] == 12
    assert report["settings"]["warmup_epochs"] == 10
    d = report["dataset"]
    assert (d["name"], d["n_train"], d["n_classes"]) == ("breastmnist", N_TRAIN, 2)
    noise = report["noise"]
    assert noise["kind"] == "uniform"
    assert noise["rate"] == 0.5
    assert noise["seed"] == 0
    # uniform:p over 2 classes flips about p/2 of the labels.
    assert 0.18 < noise["realised_rate"] < 0.32

    linc = report["linc"]
    for key in (
        "otsu_threshold", "n_flagged", "n_changed", "correction_accuracy",
        "label_accuracy_before", "label_accuracy_after",
    ):  # fmt: skip
        assert key in linc, key
    assert 0.0 <= linc["otsu_threshold"] <= 1.0
    assert 0 < linc["n_flagged"] < N_TRAIN
    assert linc["n_changed"] <= linc["n_flagged"]
    assert linc["label_accuracy_before"] == pytest.approx(1 - noise["realised_rate"])
    det = linc["detection"]
    assert set(det) >= {"auroc", "average_precision", "precision", "recall", "f1"}
    assert all(isinstance(det[k], float) and 0.0 <= det[k] <= 1.0 for k in det)
    # Measured 0.79 at this setting; chance is 0.5.
    assert det["auroc"] > 0.65
    assert det["average_precision"] > noise["realised_rate"]
    by_epoch = linc["detection_auroc_by_epoch"]
    assert list(by_epoch) == [str(e) for e in range(1, 11)]
    assert by_epoch["10"] == pytest.approx(det["auroc"])
    assert linc["label_accuracy_after"] >= linc["label_accuracy_before"] - 0.02

    metric_keys = {"accuracy", "macro_f1", "balanced_accuracy", "auroc"}
    for test in (report["test"], report["baseline"]["test"]):
        assert set(test) >= metric_keys
        assert all(0.0 <= test[k] <= 1.0 for k in metric_keys)
    timing = report["timing"]
    for key in ("train_seconds", "epoch_seconds_mean", "warmup_epoch_seconds_mean"):
        assert timing[key] > 0, key
    assert report["baseline"]["timing"]["epoch_seconds_mean"] > 0
    assert len(linc["history"]) == len(report["baseline"]["history"]) == 12


@pytest.mark.slow
def test_trust_csv_consistent_with_report(uniform_run: Path) -> None:
    report = _read_report(uniform_run)
    linc, threshold = report["linc"], report["linc"]["otsu_threshold"]
    header, rows = _read_trust(uniform_run)
    assert header[: len(TRUST_HEADER)] == TRUST_HEADER  # then the detector columns
    assert len(rows) == N_TRAIN
    assert [int(r["index"]) for r in rows] == list(range(N_TRAIN))
    assert rows[0]["sample_id"] == "train/0"

    trust = np.array([float(r["trust"]) for r in rows])
    flagged = np.array([int(r["flagged"]) for r in rows])
    observed = np.array([int(r["observed_label"]) for r in rows])
    corrected = np.array([int(r["corrected_label"]) for r in rows])
    true = np.array([int(r["true_label"]) for r in rows])
    assert set(np.unique(flagged)) <= {0, 1}
    assert ((trust >= 0) & (trust <= 1)).all()
    # trust is written with 6 decimals: ignore values within rounding of the threshold.
    clear = np.abs(trust - threshold) > 1e-6
    assert (flagged.astype(bool) == (trust < threshold))[clear].all()
    # The exact float32 trust is in trust_by_epoch.npy: there flagged is exactly trust < t.
    exact = np.load(_job(uniform_run) / "trust_by_epoch.npy")[-1]
    assert np.array_equal(flagged.astype(bool), exact < threshold)

    assert flagged.sum() == linc["n_flagged"]
    assert (corrected != observed).sum() == linc["n_changed"]
    assert (corrected == observed)[flagged == 0].all()
    assert (observed != true).mean() == pytest.approx(report["noise"]["realised_rate"])
    assert (observed == true).mean() == pytest.approx(linc["label_accuracy_before"])
    assert (corrected == true).mean() == pytest.approx(linc["label_accuracy_after"])


@pytest.mark.slow
def test_trust_by_epoch_and_model(uniform_run: Path) -> None:
    by_epoch = np.load(_job(uniform_run) / "trust_by_epoch.npy")
    assert by_epoch.shape == (10, N_TRAIN)
    assert np.isfinite(by_epoch).all()
    assert ((by_epoch >= 0) & (by_epoch <= 1)).all()

    ckpt = torch.load(_job(uniform_run) / "model.pt", map_location="cpu", weights_only=True)
    assert ckpt["format"] == "noisescore.model.v1"
    assert (ckpt["num_classes"], ckpt["in_chans"], ckpt["img_size"]) == (2, 1, 28)
    assert len(ckpt["mean"]) == len(ckpt["std"]) == 1
    model = create_model(
        ckpt["model"],
        num_classes=ckpt["num_classes"],
        in_chans=ckpt["in_chans"],
        img_size=ckpt["img_size"],
    )
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    with torch.no_grad():
        logits = model(torch.zeros(3, 1, 28, 28))
    assert logits.shape == (3, 2)
    # Every artifact of the layout, and no leftover temporary files from atomic writes.
    assert sorted(p.name for p in _job(uniform_run).iterdir()) == [
        "checkpoints", "manifest.json", "model.onnx", "model.pt", "noisy_labels.npy",
        "progress.json", "report.json", "spec.json", "trust.csv", "trust_by_epoch.npy",
        "trust_histogram.png",
    ]  # fmt: skip


@pytest.mark.slow
def test_same_seed_same_trust(data_dir: Path, tmp_path: Path) -> None:
    extra = ["--noise", "uniform:0.5", "--epochs", "3", "--warmup-epochs", "2"]
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert _clean(data_dir, out, *extra) == 0
    a, b = outs
    ja, jb = _job(a), _job(b)
    assert (ja / "trust.csv").read_bytes() == (jb / "trust.csv").read_bytes()
    assert np.array_equal(np.load(ja / "trust_by_epoch.npy"), np.load(jb / "trust_by_epoch.npy"))
    ra, rb = _read_report(a), _read_report(b)
    assert ra["linc"]["detection"] == rb["linc"]["detection"]
    assert ra["test"] == rb["test"]


@pytest.mark.slow
def test_without_noise_has_no_detection(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _clean(data_dir, out, "--epochs", "2", "--warmup-epochs", "1") == 0
    report = _read_report(out)
    assert report["noise"] is None
    linc = report["linc"]
    for key in (
        "detection", "detection_auroc_by_epoch", "correction_accuracy",
        "label_accuracy_before", "label_accuracy_after",
    ):  # fmt: skip
        assert key not in linc, key
    assert "n_flagged" in linc
    header, rows = _read_trust(out)
    assert header[:6] == TRUST_HEADER[:-1] and "true_label" not in header
    assert len(rows) == N_TRAIN
    assert np.load(_job(out) / "trust_by_epoch.npy").shape == (1, N_TRAIN)


@pytest.mark.slow
def test_env_vars_fill_absent_flags(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOISESCORE_EPOCHS", "2")
    monkeypatch.setenv("NOISESCORE_WARMUP_EPOCHS", "1")
    monkeypatch.setenv("NOISESCORE_BATCH_SIZE", "256")
    out = tmp_path / "out"
    # A flag wins over its variable: batch size 128 from the flag, epochs from the env.
    assert _clean(data_dir, out, "--batch-size", "128") == 0
    settings = _read_report(out)["settings"]
    assert settings["epochs"] == 2
    assert settings["warmup_epochs"] == 1
    assert settings["batch_size"] == 128


def _write_manifest(folder: Path, n: int = 40, size: int = 16) -> tuple[Path, set[int]]:
    """``n`` grey PNGs, class 1 bright and class 0 dark; a few observed labels are wrong."""
    rng = np.random.default_rng(0)
    wrong = {0, 7, 13, 22, 31, 38}
    rows = []
    for i in range(n):
        true = i % 2
        level = 190 if true else 60
        pixels = np.clip(rng.normal(level, 20, size=(size, size)), 0, 255).astype(np.uint8)
        name = f"img_{i:02d}.png"
        Image.fromarray(pixels, mode="L").save(folder / name)
        label = 1 - true if i in wrong else true
        rows.append([name, label, true])
    path = folder / "manifest.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "true_label"])
        writer.writerows(rows)
    return path, wrong


@pytest.mark.slow
def test_manifest_with_true_label(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    manifest, wrong = _write_manifest(images)
    out = tmp_path / "out"
    code = main(
        ["clean", "--dataset", str(manifest), "--epochs", "2", "--warmup-epochs", "1",
         "--seed", "0", "--store-dir", str(out), "--job-id", JOB, "--quiet", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    report = _read_report(out)
    d = report["dataset"]
    assert d["n_classes"] == 2
    assert d["n_train"] + d["n_val"] + d["n_test"] == 40
    assert d["image_size"] == [16, 16]
    assert report["noise"]["kind"] == "reference"
    header, rows = _read_trust(out)
    assert header[: len(TRUST_HEADER)] == TRUST_HEADER  # then the detector columns
    assert len(rows) == d["n_train"]
    flipped = np.array([r["observed_label"] != r["true_label"] for r in rows])
    assert flipped.sum() >= 1
    assert {int(r["sample_id"][4:6]) for r, f in zip(rows, flipped, strict=True) if f} <= wrong
    assert report["noise"]["realised_rate"] == pytest.approx(flipped.mean())
    linc = report["linc"]
    assert set(linc["detection"]) >= {"auroc", "average_precision", "precision", "recall", "f1"}
    assert linc["detection"]["auroc"] is not None
    assert list(linc["detection_auroc_by_epoch"]) == ["1"]
    assert linc["label_accuracy_before"] == pytest.approx(1 - flipped.mean())
    assert report["test"] is not None


# --------------------------------------------------------------------------- bad inputs


def _assert_usage_error(
    capsys: pytest.CaptureFixture[str], code: int, out: Path, pattern: str
) -> str:
    full = capsys.readouterr().err
    assert code == 2, full
    assert "Traceback" not in full
    # Prefect's log lines of the flow run may come first; our one-line error is last.
    err = full.strip().splitlines()[-1]
    assert err.startswith("noisescore: error: "), full
    assert re.search(pattern, err, flags=re.IGNORECASE | re.DOTALL), err
    assert not (_job(out) / "manifest.json").exists()
    return err


def test_unknown_dataset_name(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = _clean(data_dir, out, dataset="nosuchmnist")
    err = _assert_usage_error(capsys, code, out, r"nosuchmnist.*(--data-dir|NOISESCORE_DATA_DIR)")
    assert "breastmnist" in err  # lists what is available


def test_no_data_dir_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no ../shared/data or ./data from here
    out = tmp_path / "out"
    code = main(["clean", "--dataset", "breastmnist", "--store-dir", str(out), "--quiet"])
    _assert_usage_error(capsys, code, out, r"NOISESCORE_DATA_DIR.*--data-dir")


def test_corrupt_npz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"this is not a zip archive")
    out = tmp_path / "out"
    code = main(
        ["clean", "--dataset", str(bad), "--store-dir", str(out), "--quiet", "--device", "cpu"]
    )
    _assert_usage_error(capsys, code, out, r"broken\.npz.*(not a valid \.npz|corrupt)")


def test_unknown_noise_kind(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = _clean(data_dir, out, "--noise", "gaussian:0.2")
    err = _assert_usage_error(capsys, code, out, r"--noise.*unknown noise kind 'gaussian'")
    for kind in ("symmetric", "uniform", "pairflip", "instance", "asymmetric"):
        assert kind in err


def test_noise_rate_out_of_range(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = _clean(data_dir, out, "--noise", "uniform:1.5")
    _assert_usage_error(capsys, code, out, r"--noise.*rate.*\[0, 1\].*1\.5")


def test_unknown_model(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = _clean(data_dir, out, "--model", "no_such_net", "--epochs", "1", "--warmup-epochs", "1")
    _assert_usage_error(capsys, code, out, r"unknown model 'no_such_net'")


def test_warmup_longer_than_epochs(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = _clean(data_dir, out, "--epochs", "3", "--warmup-epochs", "5")
    err = _assert_usage_error(
        capsys, code, out, r"warmup_epochs \(5\) must not exceed epochs \(3\)"
    )
    assert "--settings" not in err  # no made-up flag name for a cross-field check


def test_store_dir_is_a_regular_file(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "taken"
    out.write_text("keep me\n")
    code = _clean(data_dir, out, "--epochs", "1", "--warmup-epochs", "1")
    err = capsys.readouterr().err
    assert code == 1, err
    assert re.search(r"storage error: local store .*taken", err), err
    assert "Traceback" not in err
    assert out.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_bad_dataset_uri(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["clean", "--dataset", "http://example.org/x.npz", "--store-dir", str(tmp_path)])
    err = _assert_usage_error(capsys, code, tmp_path, r"--dataset: unsupported .*scheme 'http'")
    assert "medmnist://" in err and "s3://" in err
    assert list(tmp_path.iterdir()) == []  # refused before any work


def test_bad_job_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["clean", "--job-id", "Bad/ID", "--store-dir", str(tmp_path)])
    _assert_usage_error(capsys, code, tmp_path, r"job id")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_gpu(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(
        ["clean", "--dataset", "breastmnist", "--data-dir", str(data_dir), "--store-dir", str(out),
         "--epochs", "1", "--warmup-epochs", "1", "--quiet", "--device", "cuda"]
    )  # fmt: skip
    _assert_usage_error(capsys, code, out, r"--device cuda.*no CUDA device")


def test_manifest_label_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8), mode="L").save(tmp_path / f"{i}.png")
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label\n0.png,0\n1.png,1\n2.png,-1\n3.png,1\n")
    out = tmp_path / "out"
    code = main(["clean", "--dataset", str(manifest), "--store-dir", str(out), "--quiet"])
    _assert_usage_error(capsys, code, out, r"labels\.csv.*line 4.*label -1 is out of range")


# --------------------------------------------------------------------------- parser


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"noisescore {__version__}"


def test_clean_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["clean", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--dataset", "--noise", "--warmup-epochs", "--store-dir", "--job-id", "s3://"):
        assert flag in text


def test_flow_help_lists_verbs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["flow", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "run" in text and "serve" in text
