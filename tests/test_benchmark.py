"""The learning-with-noisy-labels benchmark's pieces (issue 12): the grid settings, the
cells' data and method parameters, and the report built from cell records. The flow is in
test_benchmark_flow.py."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from noisescore.ml import bench_report as report
from noisescore.ml.benchmark import Cell, cell_data, grid, method_kwargs, run_cell
from noisescore.ml.data import DataError, Dataset, load_dataset, load_manifest
from noisescore.ml.method_names import BENCH_METHODS
from noisescore.ml.methods import METHODS, create_method, method_params
from noisescore.ml.models import create_model
from noisescore.settings import REAL_NOISE, BenchSettings

# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("methods", "ce,nosuch", "unknown method 'nosuch'; valid methods: cdr, ce"),
        ("noise", "symmetric:1.0", "noise rate must lie in [0, 1), got 'symmetric:1.0'"),
        ("noise", "symmetric:0.2,symmetric:-0.1", "noise rate must be a float in [0, 1]"),
        ("noise", "weird:0.2", "unknown noise kind 'weird'; valid kinds:"),
        ("methods", "ce,coteaching,ce", "method listed twice: ce"),
        ("noise", "symmetric:0.2,SYMMETRIC:0.20", "noise setting listed twice: symmetric:0.2"),
        ("seeds", "0,1,0", "seed listed twice: 0"),
        ("datasets", "breastmnist,breastmnist", "dataset listed twice: breastmnist"),
        ("seeds", "0,-1", "seeds must be >= 0"),
        ("datasets", "http://example.org/x.npz", "unsupported dataset URI scheme 'http'"),
        ("datasets", "medmnist://", "dataset URI 'medmnist://' names no dataset"),
        ("methods", "", "the grid needs at least one method"),
    ],
)
def test_bad_grid_is_rejected_naming_the_problem(field: str, value: str, message: str) -> None:
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(ValidationError) as info:
        BenchSettings(**kwargs)
    (error,) = info.value.errors()
    assert error["loc"] == (field,)
    assert message in error["msg"]


def test_comma_lists_are_parsed_and_real_is_accepted() -> None:
    settings = BenchSettings(
        methods=" CE, coteaching ",
        datasets="breastmnist,medmnist://pneumoniamnist",
        noise="Symmetric:0.4, real,instance:0.2",
        seeds="3,1",
    )
    assert settings.methods == ("ce", "coteaching")
    assert settings.datasets == ("breastmnist", "medmnist://pneumoniamnist")
    assert settings.noise == ("symmetric:0.4", REAL_NOISE, "instance:0.2")
    assert settings.seeds == (3, 1)
    # Lists (a deployment's JSON parameters) pass as they are.
    assert BenchSettings(seeds=[0, 2], noise=["real"]).seeds == (0, 2)


def test_grid_settings_come_from_their_own_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOISESCORE_EPOCHS", "7")  # a cleaning job's, not the benchmark's
    monkeypatch.setenv("NOISESCORE_BENCH_METHODS", "ce,linc")
    monkeypatch.setenv("NOISESCORE_BENCH_SEEDS", "4")
    settings = BenchSettings()
    assert settings.methods == ("ce", "linc") and settings.seeds == (4,)
    assert settings.epochs == 100
    monkeypatch.setenv("NOISESCORE_BENCH_NOISE", "symmetric:1.5")
    with pytest.raises(ValidationError, match="noise rate"):
        BenchSettings()


# ----------------------------------------------------------------------------- grid


def test_grid_order_and_cell_keys() -> None:
    settings = BenchSettings(
        methods="ce,coteaching",
        datasets="breastmnist,file:///data/My Set.npz",
        noise="symmetric:0.4,real",
        seeds="0,1",
    )
    cells = grid(settings)
    assert len(cells) == 2 * 2 * 2 * 2
    # Dataset-major, then noise, then seed, then method.
    assert [(c.dataset, c.noise, c.seed, c.method) for c in cells[:5]] == [
        ("breastmnist", "symmetric:0.4", 0, "ce"),
        ("breastmnist", "symmetric:0.4", 0, "coteaching"),
        ("breastmnist", "symmetric:0.4", 1, "ce"),
        ("breastmnist", "symmetric:0.4", 1, "coteaching"),
        ("breastmnist", "real", 0, "ce"),
    ]
    assert cells[-1] == Cell("coteaching", "file:///data/My Set.npz", "real", 1)
    assert cells[0].key == "breastmnist/symmetric-0.4/ce/seed0"
    assert cells[0].setting == "breastmnist symmetric:0.4"
    assert cells[-1].key == "my-set/real/coteaching/seed1"
    assert len({c.key for c in cells}) == len(cells)
    assert Cell("ce", "medmnist://pneumoniamnist", "instance:0.2", 3).key == (
        "pneumoniamnist/instance-0.2/ce/seed3"
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "datasets",
            "breastmnist,medmnist://breastmnist",
            "datasets 'breastmnist' and 'medmnist://breastmnist' would share the cell "
            "'breastmnist/symmetric-0.4/ce/seed0'",
        ),
        (
            "datasets",
            "file:///a/x.npz,file:///b/x.npz",
            "datasets 'file:///a/x.npz' and 'file:///b/x.npz' would share the cell "
            "'x/symmetric-0.4/ce/seed0'",
        ),
        (
            "noise",
            "asymmetric:/a/m.csv,asymmetric:/b/m.csv",
            "noise settings 'asymmetric:/a/m.csv' and 'asymmetric:/b/m.csv' would share "
            "the cell 'breastmnist/m/ce/seed0'",
        ),
    ],
)
def test_grid_refuses_cells_that_share_a_key(field: str, value: str, message: str) -> None:
    """Distinct entries whose cells would overwrite each other's record in the store."""
    base: dict[str, Any] = {"methods": "ce", "datasets": "breastmnist", "noise": "symmetric:0.4"}
    settings = BenchSettings(**{**base, "seeds": "0", field: value})
    with pytest.raises(ValueError, match="give them different file names") as info:
        grid(settings)
    assert message in str(info.value)


# ----------------------------------------------------------------------------- method


@pytest.mark.parametrize("epochs", [10, 50, 200])
def test_method_kwargs_scale_with_the_schedule(epochs: int) -> None:
    scale = epochs / 100
    assert method_kwargs("ce", epochs=epochs, noise_rate=0.4) == {}
    assert method_kwargs("coteaching", epochs=epochs, noise_rate=0.4) == {
        "t_k": max(1, round(10 * scale)),
        "forget_rate": 0.4,
    }
    assert method_kwargs("coteaching_plus", epochs=epochs, noise_rate=0.2) == {
        "t_k": max(1, round(10 * scale)),
        "init_epoch": max(1, round(20 * scale)),
        "forget_rate": 0.2,
    }
    assert method_kwargs("linc", epochs=epochs, noise_rate=0.6) == {
        "warmup_epochs": max(1, round(10 * scale))
    }
    assert method_kwargs("cdr", epochs=epochs, noise_rate=0.4) == {"clip_rate": pytest.approx(0.6)}
    disc = method_kwargs("disc", epochs=epochs, noise_rate=0.4)
    assert disc["start_epoch"] == max(1, round(20 * scale))
    # The per-epoch average forgets as much over the run as 0.99 does over 100 epochs.
    assert disc["momentum"] == pytest.approx(0.99 ** (100 / epochs))
    assert disc["momentum"] ** epochs == pytest.approx(0.99**100)


def test_method_kwargs_bounds() -> None:
    assert method_kwargs("coteaching", epochs=2, noise_rate=0.0) == {"t_k": 1, "forget_rate": 0.0}
    assert method_kwargs("coteaching", epochs=100, noise_rate=0.99)["forget_rate"] == 0.95
    assert method_kwargs("cdr", epochs=100, noise_rate=0.99)["clip_rate"] == 0.05
    assert method_kwargs("t_revision", epochs=100, noise_rate=0.2) == {
        "warmup_epochs": 20,
        "reweight_epochs": 40,
    }


@pytest.mark.parametrize("method", BENCH_METHODS)
def test_every_bench_method_accepts_its_kwargs(method: str) -> None:
    for epochs, rate in ((5, 0.2), (100, 0.6)):
        params = method_kwargs(method, epochs=epochs, noise_rate=rate)
        assert set(params) <= set(method_params(method))
        peer = None
        if METHODS[method].n_models == 2:
            peer = create_model("noisescore_cnn", num_classes=3, in_chans=1, img_size=28)
        built = create_method(method, n_samples=40, n_classes=3, peer=peer, **params)
        assert built.name == method


# ----------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def breast(data_dir: Path) -> Dataset:
    return load_dataset("breastmnist", data_dir=data_dir)


def _rows_of(images: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Index in ``pool`` of each image of ``images`` (each must be there)."""
    flat = pool.reshape(len(pool), -1)
    index = []
    for image in images.reshape(len(images), -1):
        (match,) = np.flatnonzero((flat == image).all(1))[:1]
        index.append(match)
    return np.asarray(index)


def test_cell_data_same_train_subset_for_every_method_of_a_seed(breast: Dataset) -> None:
    settings = BenchSettings(
        datasets="breastmnist", noise="symmetric:0.4", train_size=200, eval_size=40
    )
    ce = cell_data(breast, Cell("ce", "breastmnist", "symmetric:0.4", 0), settings)
    co = cell_data(breast, Cell("coteaching", "breastmnist", "symmetric:0.4", 0), settings)
    other = cell_data(breast, Cell("ce", "breastmnist", "symmetric:0.4", 1), settings)
    assert ce.train_images.shape == (200, 1, 28, 28) and ce.n_train_full == len(breast.train)
    for a, b in ((ce.train_images, co.train_images), (ce.train_labels, co.train_labels),
                 (ce.train_true, co.train_true), (ce.test[0], co.test[0])):  # fmt: skip
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(ce.train_images, other.train_images)  # another seed, another subset

    # The truth is the dataset's labels of the chosen rows; the noise flips about 40 % of them.
    rows = _rows_of(ce.train_images, breast.train.images)
    np.testing.assert_array_equal(ce.train_true, breast.train.labels[rows])
    assert ce.noise_rate == 0.4
    assert ce.realised_rate == pytest.approx(float((ce.train_labels != ce.train_true).mean()))
    assert 0.25 < ce.realised_rate < 0.55
    # Val and test: clean labels, subsets of the eval size.
    assert ce.val is not None
    for (images, labels), split in ((ce.val, breast.val), (ce.test, breast.test)):
        assert split is not None and len(labels) == 40
        np.testing.assert_array_equal(labels, split.labels[_rows_of(images, split.images)])


def test_cell_data_without_sizes_uses_everything(breast: Dataset) -> None:
    settings = BenchSettings(datasets="breastmnist", noise="symmetric:0.0")
    data = cell_data(breast, Cell("ce", "breastmnist", "symmetric:0.0", 5), settings)
    np.testing.assert_array_equal(data.train_images, breast.train.images)
    np.testing.assert_array_equal(data.train_labels, breast.train.labels)  # rate 0: no flips
    assert breast.test is not None and len(data.test[1]) == len(breast.test)


def test_real_noise_needs_true_labels(breast: Dataset) -> None:
    settings = BenchSettings(datasets="breastmnist", noise="real")
    with pytest.raises(DataError, match="noise 'real' needs reference labels: dataset "
                       "'breastmnist' has no true_label column"):  # fmt: skip
        cell_data(breast, Cell("ce", "breastmnist", "real", 0), settings)


def _stripes(vertical: bool, rng: np.random.Generator) -> Image.Image:
    pixels = rng.integers(0, 60, size=(28, 28), dtype=np.uint8)
    if vertical:
        pixels[:, ::4] = 230
    else:
        pixels[::4, :] = 230
    return Image.fromarray(pixels)  # uint8 (H, W): greyscale


def _manifest(folder: Path) -> tuple[Path, list[dict[str, Any]]]:
    """Two classes (horizontal / vertical stripes) as PNGs; some labels deliberately wrong."""
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    wrong = {"train": {1, 4, 9, 14, 17}, "val": {2}, "test": {0, 5}}
    for split, n in (("train", 20), ("val", 6), ("test", 8)):
        for i in range(n):
            true = i % 2
            name = f"img/{split}_{i:02d}.png"
            (folder / "img").mkdir(parents=True, exist_ok=True)
            _stripes(bool(true), rng).save(folder / name)
            label = 1 - true if i in wrong[split] else true
            rows.append({"path": name, "label": label, "true_label": true, "split": split})
    path = folder / "labels.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "true_label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path, rows


def test_real_noise_from_a_manifest(tmp_path: Path) -> None:
    path, rows = _manifest(tmp_path)
    dataset = load_manifest(path)
    settings = BenchSettings(datasets=str(path), noise="real", methods="ce", epochs=2)
    cell = Cell("ce", str(path), REAL_NOISE, 0)
    data = cell_data(dataset, cell, settings)
    train = [r for r in rows if r["split"] == "train"]
    share = sum(r["label"] != r["true_label"] for r in train) / len(train)
    assert share == 0.25
    assert data.noise_rate == share and data.realised_rate == share
    np.testing.assert_array_equal(data.train_labels, [r["label"] for r in train])
    np.testing.assert_array_equal(data.train_true, [r["true_label"] for r in train])
    # Val and test are scored against the true labels, not the manifest's wrong ones.
    assert data.val is not None
    for (_, labels), split in ((data.val, "val"), (data.test, "test")):
        truth = [r["true_label"] for r in rows if r["split"] == split]
        np.testing.assert_array_equal(labels, truth)

    # A subset's rate is the share of wrong labels in that subset.
    subset = cell_data(dataset, cell, BenchSettings(noise="real", train_size=8))
    assert subset.noise_rate == float((subset.train_labels != subset.train_true).mean())

    # The cell trains on the observed labels and reports the measured rate.
    record = run_cell(cell, dataset, BenchSettings(noise="real", methods="ce", epochs=2,
                                                   batch_size=8, device="cpu"))  # fmt: skip
    assert record["key"] == "labels/real/ce/seed0" and record["noise"] == "real"
    assert record["noise_rate"] == record["realised_noise_rate"] == 0.25
    assert (record["n_train"], record["n_val"], record["n_test"]) == (20, 6, 8)
    assert len(record["test_acc_by_epoch"]) == len(record["val_acc_by_epoch"]) == 2
    assert record["test_acc_last_k"] == pytest.approx(np.mean(record["test_acc_by_epoch"]))
    assert 0.0 <= record["macro_f1"] <= 1.0 and record["samples_per_second"] > 0


# ----------------------------------------------------------------------------- report


def _record(method: str, setting: str, seed: int, acc: float, **extra: Any) -> dict[str, Any]:
    dataset, noise = setting.split(" ")
    base = {
        "method": method,
        "dataset": dataset,
        "noise": noise,
        "seed": seed,
        "setting": setting,
        "key": f"{dataset}/{noise.replace(':', '-')}/{method}/seed{seed}",
        "n_train": 100,
        "n_train_full": 1000,
        "n_val": 10,
        "n_test": 20,
        "noise_rate": float(noise.split(":")[1]) if ":" in noise else 0.3,
        "realised_noise_rate": 0.41,
        "epochs": 2,
        "test_acc_last_k": acc,
        "test_acc_best_val": None,
        "wall_seconds": 10.0,
        "samples_per_second": 100.0,
    }
    return {**base, **extra}


S04, S02 = "breastmnist symmetric:0.4", "breastmnist symmetric:0.2"


def test_results_table_mean_std_and_bold_best() -> None:
    records = [
        _record("ce", S04, 0, 0.70),
        _record("ce", S04, 1, 0.74),
        _record("coteaching", S04, 0, 0.80),
        _record("coteaching", S04, 1, 0.90),
        _record("ce", S02, 0, 0.81),
        _record("linc", S04, 0, 0.60, test_acc_last_k=None),  # no score: left out
    ]
    table = report.results_table(records, ["ce", "coteaching", "linc"]).splitlines()
    assert table[0] == f"| method | {S04} | {S02} | mean rank |"
    assert table[1] == "|---|---:|---:|---:|"
    # ce: mean 72.0, std (ddof 1) of 70, 74 = 2.83; rank 2 in S04, 1 in S02.
    assert table[2] == "| ce | 72.0 ± 2.8 | **81.0 ± 0.0 (1 seed)** | 1.50 |"
    # coteaching: mean 85.0, std 7.07, the best of S04; not run in S02.
    assert table[3] == "| coteaching | **85.0 ± 7.1** | — | 1.00 |"
    assert table[4] == "| linc | — | — | — |"
    assert report.summarise(records)[("coteaching", S04)] == pytest.approx(
        (0.85, float(np.std([0.8, 0.9], ddof=1)), 2)
    )


def test_ranks_share_ties_and_average_over_settings() -> None:
    summary = {
        ("a", "s1"): (0.9, 0.0, 1),
        ("b", "s1"): (0.9, 0.0, 1),
        ("c", "s1"): (0.5, 0.0, 1),
        ("d", "s1"): (0.5, 0.0, 1),
        ("a", "s2"): (0.1, 0.0, 1),
        ("b", "s2"): (0.7, 0.0, 1),
        ("c", "s2"): (0.7, 0.0, 1),
        ("d", "s2"): (0.7, 0.0, 1),
    }
    methods = ["a", "b", "c", "d", "e"]
    ranks = report.setting_ranks(summary, methods, ["s1", "s2"])
    assert ranks["s1"] == {"a": 1.5, "b": 1.5, "c": 3.5, "d": 3.5}
    assert ranks["s2"] == {"b": 2.0, "c": 2.0, "d": 2.0, "a": 4.0}
    means = report.mean_ranks(ranks, methods, ["s1", "s2"])
    assert means == {"a": 2.75, "b": 1.75, "c": 2.75, "d": 2.75, "e": None}
    assert report.mean_ranks(ranks, methods, ["s2"])["a"] == 4.0


def test_results_csv_columns() -> None:
    records = [_record("ce", S04, 0, 0.7, extra_field="not a column"), _record("ce", S04, 1, 0.8)]
    rows = list(csv.reader(io.StringIO(report.results_csv(records).decode())))
    assert tuple(rows[0]) == report.CSV_COLUMNS
    assert len(rows) == 3
    first = dict(zip(rows[0], rows[1], strict=True))
    assert first["method"] == "ce" and first["noise"] == "symmetric:0.4" and first["seed"] == "0"
    assert first["test_acc_last_k"] == "0.7" and first["realised_noise_rate"] == "0.41"
    assert first["test_acc_best_val"] == "" and first["macro_f1"] == ""  # None / absent
    assert report.results_csv([]).decode() == ",".join(report.CSV_COLUMNS) + "\n"


def test_gpu_estimate_arithmetic() -> None:
    records = [
        _record("ce", S04, 0, 0.7, samples_per_second=100.0, n_train_full=1000),
        _record("ce", S04, 1, 0.7, samples_per_second=300.0, n_train_full=1000),
        _record("coteaching", S04, 0, 0.8, samples_per_second=50.0, n_train_full=1000),
        _record("dividemix", S04, 0, 0.8, samples_per_second=None, n_train_full=2000),
    ]
    estimate = report.gpu_estimate(records, ["ce", "coteaching", "dividemix"], epochs=100)
    assert estimate is not None
    # CE's median 200 samples/s, co-teaching's 50: 4x CE's cost. DivideMix has no measured
    # throughput: it is charged the dearest measured cost (4x).
    assert estimate["cost_vs_ce"] == {"ce": 1.0, "coteaching": 4.0}
    samples = 1000 * 100 * 1.0 * 2 + 1000 * 100 * 4.0 + 2000 * 100 * 4.0
    assert estimate["hours"] == pytest.approx(samples / 17_000 / 3600)
    assert estimate["cells"] == 4 and estimate["epochs"] == 100
    assert report.gpu_estimate(records[2:], ["coteaching"]) is None  # nothing to compare with


def test_benchmark_markdown_goal_verdict_and_failures() -> None:
    methods = ["ce", "coteaching", "linc"]
    records = [
        _record("ce", S04, 0, 0.70),
        _record("coteaching", S04, 0, 0.80, samples_per_second=50.0),
        _record("linc", S04, 0, 0.72),
        _record("ce", "pneumoniamnist symmetric:0.4", 0, 0.85),
        _record("coteaching", "pneumoniamnist symmetric:0.4", 0, 0.87),
    ]
    failures = [{"key": "pneumoniamnist/symmetric-0.4/linc/seed0", "error": "MethodError: boom"}]
    text = report.benchmark_markdown(
        records,
        methods,
        schedule={"epochs": 2, "last_k": 5},
        command="noisescore bench --epochs 2",
        device="CPU",
        failures=failures,
        missing=["x/y/z/seed1"],
        plots={"rank heat-map": "benchmark/rank_heatmap.png"},
    )
    assert "- Command: `noisescore bench --epochs 2`" in text
    assert report.results_table(records, methods) in text
    assert "![rank heat-map](benchmark/rank_heatmap.png)" in text
    assert (
        "- breastmnist symmetric:0.4: best coteaching 80.0 vs CE 70.0 (+10.0 points): **met**."
        in text
    )
    assert (
        "- pneumoniamnist symmetric:0.4: best coteaching 87.0 vs CE 85.0 (+2.0 points): "
        "**missed**." in text
    )
    assert "**LiNC** ranks 2 of 3 overall (mean rank 2.00)" in text
    assert "## Cells without a result" in text
    assert "- `pneumoniamnist/symmetric-0.4/linc/seed0`: MethodError: boom" in text
    assert "- `x/y/z/seed1`: not run" in text
    assert "on one H100" in text  # the labelled estimate (CE is in the grid)

    no_goal = report.benchmark_markdown(
        [_record("ce", S02, 0, 0.7)], ["ce"], schedule={}, command="c", device="CPU"
    )
    assert "Not measured: the grid has no `symmetric:0.4` setting with `ce`." in no_goal
    assert "Cells without a result" not in no_goal


def test_plots_are_png() -> None:
    records = [
        _record("ce", S04, 0, 0.70),
        _record("ce", S04, 1, 0.72),
        _record("ce", S02, 0, 0.80),
        _record("coteaching", S04, 0, 0.80),
    ]
    for png in (
        report.accuracy_vs_noise_png(records, ["ce", "coteaching"]),
        report.rank_heatmap_png(records, ["ce", "coteaching"]),
    ):
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        image = Image.open(io.BytesIO(png))
        assert image.size[0] > 200 and image.size[1] > 100


def test_benchmark_markdown_names_unrecoverable_settings_and_collapsed_cells() -> None:
    """Symmetric noise at (C - 1) / C or more leaves no class the plurality of its labels;
    a balanced accuracy of 1 / C means one class predicted for every test image."""
    s06 = "breastmnist symmetric:0.6"
    records = [
        _record("ce", S04, 0, 0.70, n_classes=2, balanced_accuracy=0.66),
        _record("ce", s06, 0, 0.30, n_classes=2, balanced_accuracy=0.50),
        _record("sce", S04, 0, 0.73, n_classes=2, balanced_accuracy=0.505),
        _record("sce", s06, 0, 0.35, n_classes=2, balanced_accuracy=0.52),
    ]
    text = report.benchmark_markdown(
        records, ["ce", "sce"], schedule={"epochs": 2}, command="x", device="cpu"
    )
    assert "Beyond recovery: in breastmnist symmetric:0.6 the symmetric rate" in text
    assert "symmetric:0.4 the" not in text
    assert "| ce | 1 of 2 | breastmnist symmetric:0.6 s0 |" in text
    assert "| sce | 1 of 2 | breastmnist symmetric:0.4 s0 |" in text
    healthy = [{**r, "balanced_accuracy": 0.7, "noise_rate": 0.4} for r in records[:1]]
    text = report.benchmark_markdown(
        healthy, ["ce"], schedule={"epochs": 2}, command="x", device="cpu"
    )
    assert "Collapsed" not in text and "Beyond recovery" not in text
