"""Label-noise detectors: each against hand-computed values, on real data, and wired
through settings, correction, outputs and the report."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from noisescore.ml import clean
from noisescore.ml.detector_names import DETECTOR_NAMES, ETA_MIN, DetectorError, parse_detectors
from noisescore.ml.detectors import DETECTORS, OOF, create_detectors
from noisescore.ml.detectors.bimodality import bimodality
from noisescore.ml.detectors.confident_learning import out_of_fold_probabilities
from noisescore.ml.detectors.consensus import consensus_score, normalised_ranks
from noisescore.ml.linc import LiNC
from noisescore.ml.metrics import detection_auroc
from noisescore.ml.outputs import trust_csv
from noisescore.ml.train import DeviceImages, Step, TrainConfig, Trainer, final_linear
from noisescore.settings import CleanSettings

E = math.e

# Three samples, three classes, two epochs. Sample 1 carries label 0 but the model
# prefers class 1 (the "mislabelled" one).
LABELS = torch.tensor([0, 0, 2])
LOGITS = (
    torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]),
    torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 0.0, 1.0]]),
)
FEATURES = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 4.0]])


def _p(logits: list[float], k: int) -> float:
    z = sum(math.exp(v) for v in logits)
    return math.exp(logits[k]) / z


def _trainer(n: int = 3, hooks: list | None = None) -> Trainer:
    images = np.zeros((n, 1, 2, 2), dtype=np.uint8)
    return Trainer(
        nn.Sequential(nn.Flatten(), nn.Linear(4, 3)),
        DeviceImages(images, torch.device("cpu"), mean=[0.0], std=[1.0]),
        np.asarray(LABELS[:n]),
        config=TrainConfig(epochs=2),
        hooks=hooks or [],
    )


def _run(name: str) -> np.ndarray:
    """Feed the two hand-made epochs to detector ``name``; its (2, 3) scores."""
    (detector,) = [d for d in create_detectors([name], 3, warmup_epochs=2) if d.name == name]
    trainer = _trainer(hooks=[detector])
    detector.on_train_start(trainer)
    idx = torch.arange(3)
    for epoch, logits in enumerate(LOGITS, start=1):
        detector.on_step(trainer, Step(idx, logits, LABELS, epoch, FEATURES))
        detector.on_epoch_end(trainer, epoch, {})
    detector.on_step(trainer, Step(idx, LOGITS[0] * 0, LABELS, 3, FEATURES))  # after warm-up
    return detector.scores_by_epoch_


def _observed_p(epoch: int) -> list[float]:
    return [_p(LOGITS[epoch][i].tolist(), int(LABELS[i])) for i in range(3)]


def test_registry_matches_the_names_the_settings_know() -> None:
    assert set(DETECTORS) == set(DETECTOR_NAMES)
    assert parse_detectors("all") == DETECTOR_NAMES and DETECTOR_NAMES[0] == "linc"
    assert parse_detectors(" EL2N ,aum") == ("linc", "aum", "el2n")  # linc always, fixed order


@pytest.mark.parametrize("bad", ["foo", "aum,nope", "all,aum", ""])
def test_bad_detector_names_list_the_valid_ones(bad: str) -> None:
    with pytest.raises(DetectorError) as info:
        parse_detectors(bad)
    if "nope" in bad or bad == "foo":
        assert "valid detectors: linc, aum, cnlcu" in str(info.value)
    with pytest.raises(ValidationError, match="detector"):
        CleanSettings(detectors=bad)


def test_settings_check_flag_by_and_folds() -> None:
    assert CleanSettings(flag_by="Consensus").flag_by == "consensus"
    with pytest.raises(ValidationError, match="choose one of: linc, aum, consensus"):
        CleanSettings(detectors="aum", flag_by="grand")
    with pytest.raises(ValidationError, match="confident_learning_oof"):
        CleanSettings(flag_by="confident_learning_oof")  # needs cl_folds
    assert CleanSettings(flag_by="confident_learning_oof", cl_folds=3).cl_folds == 3
    with pytest.raises(ValidationError, match="cl_folds"):
        CleanSettings(cl_folds=1)


def test_small_loss_el2n_grand_by_hand() -> None:
    small, el2n, grand = _run("small_loss"), _run("el2n"), _run("grand")
    # Epoch 2, sample 1: logits (0, 2, 0), label 0: CE = log(2 + e^2).
    assert small[1, 1] == pytest.approx(-math.log(2 + E**2), rel=1e-6)
    # Epoch 2, sample 0: p = (e^3, 1, 1) / (e^3 + 2): ||p - onehot|| = sqrt(6) / (e^3 + 2).
    assert el2n[1, 0] == pytest.approx(-math.sqrt(6) / (E**3 + 2), rel=1e-6)
    # GraNd (last layer) = EL2N * ||[h, 1]||: h = (1, 2) -> sqrt(6); h = 0 -> 1.
    assert grand[1, 0] == pytest.approx(el2n[1, 0] * math.sqrt(6), rel=1e-6)
    assert grand[1, 1] == pytest.approx(el2n[1, 1], rel=1e-6)
    # Epoch 1 scores are kept as recorded.
    assert small[0, 2] == pytest.approx(-math.log(_p([0, 0, 3], 2) ** -1), rel=1e-6)


def test_aum_by_hand() -> None:
    aum = _run("aum")
    # Margins: sample 0: 2, 3; sample 1: -1, -2; sample 2: 3, 0. AUM = running mean.
    np.testing.assert_allclose(aum, [[2, -1, 3], [2.5, -1.5, 1.5]], rtol=1e-6)


def test_datamaps_and_data_iq_by_hand() -> None:
    p1, p2 = _observed_p(0), _observed_p(1)
    confidence = [(a + b) / 2 for a, b in zip(p1, p2, strict=True)]
    second = [(a * a + b * b) / 2 for a, b in zip(p1, p2, strict=True)]
    np.testing.assert_allclose(_run("datamaps")[1], confidence, rtol=1e-6)
    aleatoric = [c - s for c, s in zip(confidence, second, strict=True)]  # mean p (1 - p)
    expected = [c + a for c, a in zip(confidence, aleatoric, strict=True)]
    np.testing.assert_allclose(_run("data_iq")[1], expected, rtol=1e-6)
    # Secondary values: variability = std over epochs; aleatoric as above.
    (dm,) = create_detectors(["datamaps"], 3, warmup_epochs=2)[1:]
    trainer = _trainer(hooks=[dm])
    dm.on_train_start(trainer)
    for epoch, logits in enumerate(LOGITS, start=1):
        dm.on_step(trainer, Step(torch.arange(3), logits, LABELS, epoch))
        dm.on_epoch_end(trainer, epoch, {})
    variability = [abs(a - b) / 2 for a, b in zip(p1, p2, strict=True)]
    np.testing.assert_allclose(dm.extras_["datamaps_variability"], variability, rtol=1e-5)


def test_cnlcu_by_hand() -> None:
    cnlcu = _run("cnlcu")

    def psi(loss: float) -> float:
        return math.log(1 + loss + loss * loss / 2)

    n, s2 = 2, 0.1
    bound = s2 * (n + s2 * math.log(2 * n) / n**2) / (n - s2)
    losses = [[-math.log(p) for p in _observed_p(e)] for e in (0, 1)]
    for i in range(3):
        mean = (psi(losses[0][i]) + psi(losses[1][i])) / 2
        assert cnlcu[1, i] == pytest.approx(-max(mean - bound, 0.0), rel=1e-5, abs=1e-7)
    assert cnlcu[1, 1] < cnlcu[1, 0]  # the mislabelled sample's loss bound is highest


def test_confident_learning_equals_cleanlab_called_directly() -> None:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    scores = _run("confident_learning")
    for epoch, logits in enumerate(LOGITS):
        proba = torch.softmax(logits.double(), dim=1).numpy()
        direct = get_label_quality_scores(LABELS.numpy(), proba)
        np.testing.assert_allclose(scores[epoch], direct, rtol=1e-5)
    # On a bigger random problem, the issues too.
    rng = np.random.default_rng(0)
    n = 200
    logits = torch.from_numpy(rng.normal(0, 2, (n, 3))).float()
    labels = torch.from_numpy(rng.integers(0, 3, n))
    (cl,) = create_detectors(["confident_learning"], 3, warmup_epochs=1)[1:]
    trainer = Trainer(
        nn.Sequential(nn.Flatten(), nn.Linear(4, 3)),
        DeviceImages(np.zeros((n, 1, 2, 2), np.uint8), torch.device("cpu"), mean=[0], std=[1]),
        labels.numpy(),
        config=TrainConfig(epochs=1),
        hooks=[cl],
    )
    cl.on_train_start(trainer)
    cl.on_step(trainer, Step(torch.arange(n), logits, labels, 1))
    cl.on_epoch_end(trainer, 1, {})
    proba = torch.softmax(logits, dim=1).double().numpy()
    proba /= proba.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(
        cl.scores_by_epoch_[0], get_label_quality_scores(labels.numpy(), proba), rtol=1e-5
    )
    np.testing.assert_array_equal(
        cl.extras_["confident_learning_issue"].astype(bool),
        find_label_issues(labels.numpy(), proba),
    )


def test_linc_detector_is_the_linc_hooks_alpha() -> None:
    rng = np.random.default_rng(0)
    n = 64
    images = rng.integers(0, 255, (n, 1, 2, 2), dtype=np.uint8)
    labels = rng.integers(0, 3, n)
    linc = LiNC(3, warmup_epochs=2)
    detectors = create_detectors(["linc"], 3, warmup_epochs=2)
    trainer = Trainer(
        nn.Sequential(nn.Flatten(), nn.Linear(4, 3)),
        DeviceImages(images, torch.device("cpu")),
        labels,
        config=TrainConfig(epochs=2, lr=1e-2, batch_size=16),
        hooks=[linc, *detectors],
    )
    trainer.fit()
    np.testing.assert_array_equal(detectors[0].scores_by_epoch_, linc.trust_by_epoch_)


def test_detectors_do_not_change_the_training() -> None:
    """Recording is read-only: the same seed gives the same weights with or without them."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (50, 1, 2, 2), dtype=np.uint8)
    labels = rng.integers(0, 3, 50)

    def weights(with_detectors: bool) -> torch.Tensor:
        torch.manual_seed(0)
        linc = LiNC(3, warmup_epochs=2)
        hooks = [linc, *create_detectors(["all"], 3, warmup_epochs=2)] if with_detectors else [linc]
        trainer = Trainer(
            nn.Sequential(nn.Flatten(), nn.Linear(4, 3)),
            DeviceImages(images, torch.device("cpu")),
            labels,
            config=TrainConfig(epochs=3, lr=1e-2, batch_size=16),
            hooks=hooks,
        )
        trainer.fit()
        return trainer.model[1].weight.detach().clone()

    torch.testing.assert_close(weights(True), weights(False), rtol=0, atol=0)


def test_final_linear_finds_the_classifier() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert final_linear(model) is model[3]
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        final_linear(nn.Sequential(nn.Flatten()))


def test_consensus_is_the_median_normalised_rank() -> None:
    a = np.array([0.1, 0.5, 0.3, 0.9])  # ranks 1, 3, 2, 4
    b = np.array([10.0, -5.0, 0.0, 7.0])  # ranks 4, 1, 2, 3
    c = np.array([1.0, 2.0, 2.0, 0.0])  # ranks 2, 3.5, 3.5, 1 (ties share the average)
    np.testing.assert_allclose(normalised_ranks(a), [0.25, 0.75, 0.5, 1.0])
    np.testing.assert_allclose(normalised_ranks(c), [0.5, 0.875, 0.875, 0.25])
    # Medians of (1, 4, 2), (3, 1, 3.5), (2, 2, 3.5), (4, 3, 1) over 4 samples.
    np.testing.assert_allclose(consensus_score({"a": a, "b": b, "c": c}), [0.5, 0.75, 0.5, 0.75])
    # Two detectors: the median is the mean of the two ranks.
    np.testing.assert_allclose(consensus_score({"a": a, "b": b}), [0.625, 0.5, 0.5, 0.875])
    # Scale-free: any increasing transform of a detector leaves the consensus unchanged.
    np.testing.assert_allclose(
        consensus_score({"a": np.exp(a), "b": b, "c": c}),
        consensus_score({"a": a, "b": b, "c": c}),
    )


def test_bimodality_statistic() -> None:
    rng = np.random.default_rng(0)
    normal = rng.normal(0, 1, 5000)
    two_modes = np.concatenate([rng.normal(0, 0.1, 3000), rng.normal(1, 0.1, 1000)])
    assert bimodality(normal)["statistic"] == pytest.approx(2 / math.pi, abs=0.02)
    assert bimodality(rng.uniform(0, 1, 5000))["statistic"] == pytest.approx(0.75, abs=0.02)
    result = bimodality(two_modes)
    assert result["bimodal"] and result["statistic"] > 0.9 and result["ashman_d"] > 5
    assert result["low_fraction"] == pytest.approx(0.75, abs=0.01)
    assert not bimodality(normal)["bimodal"]
    assert bimodality(np.ones(10)) == {
        "statistic": 0.0, "threshold": ETA_MIN, "bimodal": False, "ashman_d": 0.0,
        "low_fraction": 0.0, "scale": "score", "statistic_score": 0.0,
    }  # fmt: skip
    # LiNC's alpha: a narrow clean spike just below 1 and a wide flipped spread below it.
    alpha = np.concatenate([1 - rng.uniform(0.008, 0.012, 900), rng.uniform(0.3, 0.95, 100)])
    on_log = bimodality(alpha, log_distrust=True)
    assert on_log["scale"] == "log_distrust" and on_log["bimodal"]
    assert on_log["low_fraction"] == pytest.approx(0.1, abs=0.01)
    assert on_log["statistic"] == on_log["statistic_log_distrust"] > on_log["statistic_score"]
    # Flipped alphas far below the clean spike: the linear scale is the bimodal one.
    far = np.concatenate([1 - rng.uniform(0.0, 0.03, 900), rng.uniform(0.0, 0.1, 100)])
    both = bimodality(far, log_distrust=True)
    assert both["scale"] == "score" and both["bimodal"]
    assert both["statistic"] == both["statistic_score"] > both["statistic_log_distrust"]
    with pytest.raises(ValueError, match="finite"):
        bimodality(np.array([0.0, np.nan]))


# --------------------------------------------------------------------------- real data

Prepared = tuple[CleanSettings, clean.PreparedData, clean.Warmup]


@pytest.fixture(scope="module")
def breast_warmup(data_dir: Path) -> Prepared:
    torch.set_num_threads(2)
    settings = CleanSettings(
        dataset="breastmnist", data_dir=data_dir, noise="uniform:0.5", seed=0,
        warmup_epochs=3, device="cpu",
    )  # fmt: skip
    data = clean.prepare_data(settings)
    return settings, data, clean.linc_warmup(data, settings)


def test_every_detector_beats_chance_on_breastmnist(breast_warmup: Prepared) -> None:
    _, data, warmup = breast_warmup
    flipped = data.flipped
    by_epoch = warmup.scores_by_epoch()
    assert set(by_epoch) == {*DETECTOR_NAMES, "consensus"}
    for name, rows in by_epoch.items():
        assert rows.shape == (3, len(flipped)), name
        assert detection_auroc(rows[-1], flipped) > 0.65, name
    # The checkpoint carries every score (a reused warm-up loses nothing).
    again = clean.Warmup.from_bytes(warmup.to_bytes(fingerprint="f"), fingerprint="f")
    for name, rows in warmup.detector_scores.items():
        np.testing.assert_array_equal(again.detector_scores[name], rows)
    assert set(again.detector_extras) == set(warmup.detector_extras)


def test_report_and_trust_csv_carry_every_detector(breast_warmup: Prepared) -> None:
    settings, data, warmup = breast_warmup
    settings = settings.model_copy(update={"flag_by": "consensus", "bimodality_min": 0.0})
    fix = clean.correct(warmup, settings)
    assert fix.flag_by == "consensus" and fix.relabelled
    # The bimodality test is on alpha whichever score flags.
    assert fix.bimodality == clean.correct(warmup, settings.model_copy(
        update={"flag_by": "linc"})).bimodality  # fmt: skip
    consensus = warmup.scores()["consensus"]
    np.testing.assert_array_equal(fix.flagged, consensus < fix.otsu_threshold)
    report = clean.detectors_report(warmup, fix.flag_by, data.flipped)
    assert report["consensus"]["flagged_by"] and not report["linc"]["flagged_by"]
    for name in (*DETECTOR_NAMES, "consensus"):
        entry = report[name]
        assert 0.5 < entry["auroc"] <= 1 and 0 < entry["average_precision"] <= 1
        assert list(entry["auroc_by_epoch"]) == ["1", "2", "3"]
    assert "in-sample" in report["confident_learning"]["source"]
    assert report["confident_learning"]["n_issues"] > 0
    result = clean.LincResult(warmup, fix)
    rows = list(csv.DictReader(io.StringIO(trust_csv(data, result).decode())))
    header = list(rows[0])
    assert header[:7] == [
        "index", "sample_id", "observed_label", "trust", "flagged", "corrected_label",
        "true_label",
    ]  # fmt: skip
    assert {*DETECTOR_NAMES[1:], "consensus", "datamaps_variability"} <= set(header)
    assert float(rows[5]["consensus"]) == pytest.approx(float(consensus[5]), rel=1e-5)


def test_correction_is_skipped_when_not_bimodal(breast_warmup: Prepared) -> None:
    settings, _, warmup = breast_warmup
    strict = clean.correct(warmup, settings.model_copy(update={"bimodality_min": 1.0}))
    assert not strict.relabelled and strict.flagged.any()
    np.testing.assert_array_equal(strict.corrected_labels, warmup.observed_labels)
    loose = clean.correct(warmup, settings.model_copy(update={"bimodality_min": 0.0}))
    assert loose.relabelled and (loose.corrected_labels != warmup.observed_labels).any()
    assert strict.bimodality == loose.bimodality | {"threshold": 1.0, "bimodal": False}


def test_out_of_fold_probabilities_never_predict_a_training_sample() -> None:
    labels = np.array([0, 1, 2] * 10)
    seen: list[tuple[set[int], set[int]]] = []

    def train_fold(fit_idx: np.ndarray, held_idx: np.ndarray) -> np.ndarray:
        seen.append((set(fit_idx.tolist()), set(held_idx.tolist())))
        proba = np.zeros((len(held_idx), 3))
        proba[:, len(seen) - 1] = 2.0  # fold k predicts class k (unnormalised)
        return proba

    proba = out_of_fold_probabilities(train_fold, labels, folds=3, seed=0)
    assert len(seen) == 3
    held = [h for _, h in seen]
    assert set().union(*held) == set(range(30)) and sum(map(len, held)) == 30
    assert all(not (fit & h) for fit, h in seen)
    for k, h in enumerate(held):
        np.testing.assert_array_equal(proba[sorted(h)], np.eye(3)[[k] * len(h)])
    with pytest.raises(DetectorError, match="at least 4 samples of every observed class"):
        out_of_fold_probabilities(train_fold, np.array([0, 0, 0, 0, 1, 1, 1]), folds=4, seed=0)


def test_out_of_fold_confident_learning_runs_k_trainings(data_dir: Path) -> None:
    settings = CleanSettings(
        dataset="breastmnist", data_dir=data_dir, noise="uniform:0.5", seed=0,
        warmup_epochs=1, cl_folds=2, flag_by="confident_learning_oof", device="cpu",
    )  # fmt: skip
    data = clean.prepare_data(settings)
    warmup = clean.linc_warmup(data, settings)
    assert warmup.detector_scores[OOF].shape == (1, len(data.train_labels))
    assert OOF in warmup.scores() and f"{OOF}_issue" in warmup.detector_extras
    assert clean.correct(warmup, settings).flag_by == OOF


def test_overhead_benchmark_writes_its_ratio(tmp_path: Path, data_dir: Path) -> None:
    import importlib.util
    import json

    script = Path(__file__).resolve().parents[1] / "bench" / "bench_detectors.py"
    spec = importlib.util.spec_from_file_location("bench_detectors", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--dataset", "breastmnist", "--data-dir", str(data_dir), "--epochs", "1",
            "--repeats", "1", "--detectors", "aum,grand", "--out-dir", str(tmp_path)]  # fmt: skip
    assert module.main(argv) == 0
    result = json.loads((tmp_path / "detectors.json").read_text())
    assert result["detectors"] == ["linc", "aum", "grand"]
    assert result["ratio_detectors_vs_ce"] > 0
    assert set(result["memory"]) == {"linc", "aum", "grand"}
    assert result["memory"]["aum"]["device_bytes_per_sample"] == 8  # two float32 sums
    assert "ratio vs plain CE" in (tmp_path / "detectors.md").read_text()


@pytest.mark.slow
def test_bimodality_skips_clean_labels_and_corrects_40_percent_noise(data_dir: Path) -> None:
    """BreastMNIST seed 1, default settings: measured eta 0.75 (clean) and 0.88 (40 %)."""
    torch.set_num_threads(2)
    decisions = {}
    for noise in ("uniform:0.0", "uniform:0.4"):
        settings = CleanSettings(
            dataset="breastmnist", data_dir=data_dir, noise=noise, seed=1, device="cpu",
            detectors="linc",
        )  # fmt: skip
        data = clean.prepare_data(settings)
        fix = clean.correct(clean.linc_warmup(data, settings), settings)
        assert fix.bimodality is not None and "statistic_log_distrust" in fix.bimodality
        assert fix.flagged.any()  # flagged for review either way
        true = data.train_true
        assert true is not None
        decisions[noise] = (fix.relabelled, (fix.corrected_labels == true).mean())
    relabelled, accuracy = decisions["uniform:0.0"]
    assert not relabelled and accuracy == 1.0
    relabelled, accuracy = decisions["uniform:0.4"]
    assert relabelled and accuracy > 0.81  # 0.804 before correction
