"""Tests of noisescore.ml.data: MedMNIST npz archives and CSV manifests."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from noisescore.ml.data import (
    MEDMNIST_N_CLASSES,
    DataError,
    Dataset,
    Split,
    load_dataset,
    load_manifest,
    load_npz,
    resolve_data_dir,
)

# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real MedMNIST files next to the repository; skip if absent."""
    folder = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not (folder / "breastmnist.npz").is_file():
        pytest.skip(f"real MedMNIST data not found in {folder}")
    return folder


@pytest.fixture(autouse=True)
def _no_data_dir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a NOISESCORE_DATA_DIR set by the caller from leaking into the tests."""
    monkeypatch.delenv("NOISESCORE_DATA_DIR", raising=False)


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    """Write ``arrays`` to the npz archive ``path`` and return the path."""
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]
    return path


def grey_images(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    """Random uint8 grey images shaped (n, size, size)."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def write_png(
    path: Path, *, size: tuple[int, int] = (8, 8), mode: str = "L", value: int = 0
) -> str:
    """Write a constant image of ``size`` (W, H) and ``mode``; return its file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode == "L" else (value, 255 - value, 7)
    Image.new(mode, size, colour).save(path)
    return path.name


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    """Write a CSV manifest and return its path."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def grey_manifest(tmp_path: Path, labels: Sequence[int], **extra: Sequence[object]) -> Path:
    """Write one grey PNG per label plus a manifest; ``extra`` adds columns."""
    rows = []
    for i, label in enumerate(labels):
        write_png(tmp_path / "img" / f"{i}.png", value=i % 256)
        rows.append([f"img/{i}.png", label, *(values[i] for values in extra.values())])
    return write_csv(tmp_path / "manifest.csv", ["path", "label", *extra], rows)


# --------------------------------------------------------------------------- real data


def test_breastmnist_by_name(shared_data: Path) -> None:
    ds = load_dataset("BreastMNIST", data_dir=shared_data)
    assert isinstance(ds, Dataset)
    assert ds.name == "breastmnist"
    assert ds.source == str((shared_data / "breastmnist.npz").resolve())
    assert ds.n_classes == 2
    assert ds.in_chans == 1
    assert ds.image_size == (28, 28)
    assert ds.val is not None and ds.test is not None
    assert (len(ds.train), len(ds.val), len(ds.test)) == (546, 78, 156)
    assert ds.train.images.shape == (546, 1, 28, 28)
    assert ds.train.images.dtype == np.uint8 and ds.train.images.flags.c_contiguous
    assert ds.train.labels.dtype == np.int64 and ds.train.labels.shape == (546,)
    assert set(np.unique(ds.train.labels)) == {0, 1}
    assert ds.train.true_labels is None
    assert ds.train.sample_ids[0] == "train/0" and ds.test.sample_ids[-1] == "test/155"


def test_bloodmnist_by_path_is_rgb(shared_data: Path) -> None:
    ds = load_dataset(shared_data / "bloodmnist.npz")
    assert ds.name == "bloodmnist"
    assert ds.n_classes == MEDMNIST_N_CLASSES["bloodmnist"] == 8
    assert ds.in_chans == 3
    assert ds.train.images.shape == (11959, 3, 28, 28)
    assert ds.train.labels.max() == 7


def test_name_resolved_through_env_var(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOISESCORE_DATA_DIR", str(shared_data))
    assert resolve_data_dir() == shared_data.resolve()
    assert len(load_dataset("breastmnist").train) == 546


def test_explicit_data_dir_beats_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_npz(tmp_path / "toy.npz", train_images=grey_images(3), train_labels=np.array([0, 1, 2]))
    monkeypatch.setenv("NOISESCORE_DATA_DIR", str(tmp_path / "elsewhere"))
    assert resolve_data_dir(tmp_path) == tmp_path.resolve()
    ds = load_dataset("TOY", data_dir=tmp_path)
    assert ds.name == "toy" and ds.n_classes == 3


def test_default_data_dir_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    with pytest.raises(DataError, match=r"No data directory found.*NOISESCORE_DATA_DIR"):
        resolve_data_dir()
    (project / "data").mkdir()
    assert resolve_data_dir() == (project / "data").resolve()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert resolve_data_dir() == (tmp_path / "shared" / "data").resolve()


# --------------------------------------------------------------------------- npz


def test_npz_labels_flat_or_column(tmp_path: Path) -> None:
    images = grey_images(4)
    flat = write_npz(
        tmp_path / "flat.npz", train_images=images, train_labels=np.array([0, 1, 2, 1])
    )
    column = write_npz(
        tmp_path / "column.npz",
        train_images=images,
        train_labels=np.array([[0], [1], [2], [1]], dtype=np.uint8),
    )
    a, b = load_npz(flat), load_npz(column)
    np.testing.assert_array_equal(a.train.labels, [0, 1, 2, 1])
    np.testing.assert_array_equal(b.train.labels, [0, 1, 2, 1])
    assert b.train.labels.dtype == np.int64
    assert a.n_classes == 3 and a.val is None and a.test is None
    np.testing.assert_array_equal(a.train.images[:, 0], images)


def test_npz_whole_float_labels_accepted_fractional_rejected(tmp_path: Path) -> None:
    ok = write_npz(
        tmp_path / "ok.npz", train_images=grey_images(2), train_labels=np.array([0.0, 1])
    )
    np.testing.assert_array_equal(load_npz(ok).train.labels, [0, 1])
    bad = write_npz(
        tmp_path / "bad.npz", train_images=grey_images(2), train_labels=np.array([0.5, 1])
    )
    with pytest.raises(DataError, match=r"bad\.npz.*whole class indices.*0\.5"):
        load_npz(bad)


def test_npz_rgb_and_other_size(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    path = write_npz(
        tmp_path / "pathmnist_64.npz",
        train_images=rgb,
        train_labels=np.arange(5).reshape(5, 1),
        test_images=rgb[:2],
        test_labels=np.array([[0], [8]]),
    )
    ds = load_dataset(path)
    assert ds.n_classes == 9  # from the MedMNIST flag, not from the labels
    assert ds.in_chans == 3 and ds.image_size == (64, 64)
    np.testing.assert_array_equal(ds.train.images[2], rgb[2].transpose(2, 0, 1))
    assert ds.test is not None and ds.test.sample_ids.tolist() == ["test/0", "test/1"]


def test_npz_single_channel_axis_and_resize(tmp_path: Path) -> None:
    images = grey_images(3, size=8)[..., None]
    path = write_npz(tmp_path / "toy.npz", train_images=images, train_labels=np.array([0, 1, 0]))
    assert load_npz(path).in_chans == 1
    resized = load_dataset(path, image_size=16)
    assert resized.train.images.shape == (3, 1, 16, 16)


def test_npz_name_with_size_suffix(tmp_path: Path) -> None:
    write_npz(
        tmp_path / "breastmnist_64.npz",
        train_images=grey_images(2, size=64),
        train_labels=np.array([[0], [1]]),
    )
    ds = load_dataset("breastmnist_64", data_dir=tmp_path)
    assert ds.name == "breastmnist_64" and ds.n_classes == 2 and ds.image_size == (64, 64)


def test_npz_n_classes_argument_wins(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "x.npz", train_images=grey_images(2), train_labels=np.array([0, 1]))
    assert load_npz(path, n_classes=5).n_classes == 5


def test_npz_missing_keys_lists_present_keys(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "x.npz", train_images=grey_images(2), labels=np.array([0, 1]))
    with pytest.raises(DataError, match=r"missing key\(s\) train_labels.*has labels, train_images"):
        load_npz(path)
    half = write_npz(
        tmp_path / "half.npz",
        train_images=grey_images(2),
        train_labels=np.array([0, 1]),
        val_images=grey_images(2),
    )
    with pytest.raises(DataError, match=r"missing key\(s\) val_labels"):
        load_npz(half)


def test_npz_count_mismatch(tmp_path: Path) -> None:
    path = write_npz(
        tmp_path / "x.npz",
        train_images=grey_images(4),
        train_labels=np.array([0, 1, 0, 1]),
        val_images=grey_images(3),
        val_labels=np.array([0, 1]),
    )
    with pytest.raises(DataError, match=r"val split has 3 images .* but 2 labels"):
        load_npz(path)


@pytest.mark.parametrize(
    ("label", "pattern"),
    [
        (-1, r"label -1 at index 1 of the test split.*0\.\.1"),
        (2, r"label 2 at index 1 of the test"),
    ],
)
def test_npz_label_out_of_range(tmp_path: Path, label: int, pattern: str) -> None:
    path = write_npz(
        tmp_path / "breastmnist.npz",
        train_images=grey_images(2),
        train_labels=np.array([0, 1]),
        test_images=grey_images(2),
        test_labels=np.array([0, label]),
    )
    with pytest.raises(DataError, match=pattern):
        load_npz(path)


def test_npz_multi_label_rejected(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "x.npz", train_images=grey_images(2), train_labels=np.eye(2, 14))
    with pytest.raises(DataError, match=r"multi-label .*not supported"):
        load_npz(path)
    with pytest.raises(DataError, match=r"chestmnist is multi-label.*not supported"):
        load_dataset("chestmnist", data_dir=tmp_path)


def test_npz_bad_image_shapes(tmp_path: Path) -> None:
    four = np.zeros((2, 8, 8, 4), dtype=np.uint8)
    path = write_npz(tmp_path / "x.npz", train_images=four, train_labels=np.array([0, 1]))
    with pytest.raises(DataError, match=r"train_images has shape \(2, 8, 8, 4\).*1 \(grey\) or 3"):
        load_npz(path)
    flat = write_npz(tmp_path / "y.npz", train_images=np.zeros((2, 64)), train_labels=[0, 1])
    with pytest.raises(DataError, match=r"train_images has shape \(2, 64\)"):
        load_npz(flat)
    floats = write_npz(tmp_path / "z.npz", train_images=np.zeros((2, 8, 8)), train_labels=[0, 1])
    with pytest.raises(DataError, match=r"dtype float64; images must be uint8"):
        load_npz(floats)


def test_npz_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.npz"
    path.write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(DataError, match=r"broken\.npz: not a valid \.npz archive or .*corrupt"):
        load_npz(path)
    truncated = tmp_path / "truncated.npz"
    write_npz(truncated, train_images=grey_images(50), train_labels=np.zeros(50, dtype=int))
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(DataError, match=r"truncated\.npz: not a valid \.npz"):
        load_npz(truncated)


def test_missing_file_by_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nothere\.npz: does not exist"):
        load_dataset(tmp_path / "nothere.npz")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_dataset(str(tmp_path / "labels.txt"))


def test_missing_file_by_name_says_how_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_npz(tmp_path / "toy.npz", train_images=grey_images(1), train_labels=np.array([0]))
    with pytest.raises(DataError, match=r"dermamnist\.npz not found.*available there: toy") as err:
        load_dataset("dermamnist", data_dir=tmp_path)
    assert "--data-dir" in str(err.value) and "NOISESCORE_DATA_DIR" in str(err.value)
    monkeypatch.setenv("NOISESCORE_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(DataError, match=r"missing \(from \$NOISESCORE_DATA_DIR\) does not exist"):
        load_dataset("dermamnist")


# --------------------------------------------------------------------------- manifest


def test_manifest_grey_with_split_and_true_label(tmp_path: Path) -> None:
    path = grey_manifest(
        tmp_path,
        [0, 1, 1, 0, 2],
        true_label=[0, 1, 0, 0, 2],
        split=["train", "train", "val", "test", "TRAIN"],
    )
    ds = load_dataset(str(path))
    assert ds.name == "manifest" and ds.source == str(path.resolve())
    assert ds.n_classes == 3 and ds.in_chans == 1 and ds.image_size == (8, 8)
    assert ds.val is not None and ds.test is not None
    assert ds.train.sample_ids.tolist() == ["img/0.png", "img/1.png", "img/4.png"]
    np.testing.assert_array_equal(ds.train.labels, [0, 1, 2])
    assert ds.train.true_labels is not None and ds.val.true_labels is not None
    np.testing.assert_array_equal(ds.train.true_labels, [0, 1, 2])
    np.testing.assert_array_equal(ds.val.true_labels, [0])
    assert ds.test.sample_ids.tolist() == ["img/3.png"]
    assert ds.train.images[1, 0, 0, 0] == 1 and ds.train.images.dtype == np.uint8


def test_manifest_mixed_colour_becomes_rgb(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", mode="L", value=50)
    write_png(tmp_path / "b.png", mode="RGB", value=100)
    write_png(tmp_path / "c.jpg", mode="RGB", value=200)
    absolute = str((tmp_path / "c.jpg").resolve())
    path = write_csv(
        tmp_path / "mixed.csv", ["Path", "Label"], [["a.png", 0], ["b.png", 1], [absolute, "1.0"]]
    )
    ds = load_manifest(path, test_fraction=0.0)
    assert ds.in_chans == 3 and ds.test is None and ds.train.true_labels is None
    assert ds.train.images.shape == (3, 3, 8, 8)
    np.testing.assert_array_equal(ds.train.images[0, :, 0, 0], [50, 50, 50])
    np.testing.assert_array_equal(ds.train.images[1, :, 0, 0], [100, 155, 7])
    assert abs(int(ds.train.images[2, 0, 4, 4]) - 200) < 8  # JPEG is lossy
    assert ds.train.sample_ids[2] == absolute


def test_manifest_16_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "xray.png")
    write_png(tmp_path / "b.png", size=(2, 2), value=9)
    path = write_csv(tmp_path / "m.csv", ["path", "label"], [["xray.png", 0], ["b.png", 1]])
    ds = load_manifest(path, test_fraction=0.0)
    assert ds.in_chans == 1
    np.testing.assert_array_equal(ds.train.images[0, 0], [[0, 64], [128, 255]])


def test_manifest_stratified_split_is_deterministic(tmp_path: Path) -> None:
    labels = [0] * 20 + [1] * 10 + [2] * 2
    path = grey_manifest(tmp_path, labels)
    ds = load_manifest(path, test_fraction=0.2, val_fraction=0.1, seed=3)
    assert ds.val is not None and ds.test is not None
    ids = {key: set(split.sample_ids) for key, split in ds.splits().items()}
    assert sum(len(v) for v in ids.values()) == len(labels)
    assert set().union(*ids.values()) == {f"img/{i}.png" for i in range(len(labels))}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert np.bincount(ds.test.labels, minlength=3).tolist() == [4, 2, 0]
    assert np.bincount(ds.val.labels, minlength=3).tolist() == [2, 1, 0]
    assert np.bincount(ds.train.labels, minlength=3).tolist() == [14, 7, 2]
    again = load_manifest(path, test_fraction=0.2, val_fraction=0.1, seed=3)
    assert again.test is not None
    assert again.test.sample_ids.tolist() == ds.test.sample_ids.tolist()
    other = load_manifest(path, test_fraction=0.2, val_fraction=0.1, seed=4)
    assert other.test is not None
    assert other.test.sample_ids.tolist() != ds.test.sample_ids.tolist()
    for split in ds.splits().values():  # images follow their rows
        index = [int(s.split("/")[1][:-4]) for s in split.sample_ids]
        np.testing.assert_array_equal(split.images[:, 0, 0, 0], np.array(index) % 256)


def test_manifest_tiny_class_stays_in_train(tmp_path: Path) -> None:
    path = grey_manifest(tmp_path, [0, 0, 0, 0, 0, 1])
    ds = load_manifest(path, test_fraction=0.5, val_fraction=0.4)
    assert 1 in ds.train.labels
    assert sum(len(s) for s in ds.splits().values()) == 6


def test_manifest_size_mismatch_and_image_size_fix(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", size=(8, 8))
    write_png(tmp_path / "b.png", size=(8, 8))
    write_png(tmp_path / "big.png", size=(12, 10))
    rows = [["a.png", 0], ["b.png", 1], ["big.png", 1]]
    path = write_csv(tmp_path / "m.csv", ["path", "label"], rows)
    with pytest.raises(DataError, match=r"line 4: image big\.png is 12x10.*8x8.*--image-size"):
        load_manifest(path)
    ds = load_manifest(path, image_size=16, test_fraction=0.0)
    assert ds.image_size == (16, 16) and ds.train.images.shape == (3, 1, 16, 16)


UNUSABLE = r"cannot be used: each path must name a readable PNG or JPEG file inside the manifest"


def test_manifest_unreadable_image(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png")
    (tmp_path / "garbage.png").write_bytes(b"this is not a png at all" * 10)
    path = write_csv(tmp_path / "m.csv", ["path", "label"], [["a.png", 0], ["garbage.png", 1]])
    with pytest.raises(DataError, match=rf"line 3: image 'garbage\.png' {UNUSABLE}"):
        load_manifest(path)


def test_manifest_missing_image(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png")
    path = write_csv(tmp_path / "m.csv", ["path", "label"], [["a.png", 0], ["gone/b.png", 1]])
    with pytest.raises(DataError, match=rf"line 3: image 'gone/b\.png' {UNUSABLE}"):
        load_manifest(path)


def test_manifest_missing_column_lists_found_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", ["file", "label"], [["a.png", 0]])
    with pytest.raises(
        DataError, match=r"missing column\(s\) path; columns found: 'file', 'label'"
    ):
        load_manifest(path)


def test_manifest_empty(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.csv: the manifest is empty"):
        load_manifest(empty)
    header_only = write_csv(tmp_path / "header.csv", ["path", "label"], [])
    with pytest.raises(DataError, match=r"header\.csv: the manifest has a header but no rows"):
        load_manifest(header_only)


def test_manifest_non_integer_label(tmp_path: Path) -> None:
    path = grey_manifest(tmp_path, [0, "cat"])  # type: ignore[list-item]
    with pytest.raises(DataError, match=r"line 3, column label: 'cat' is not an integer"):
        load_manifest(path)


def test_manifest_label_out_of_range(tmp_path: Path) -> None:
    path = grey_manifest(tmp_path, [0, 1, 3])
    with pytest.raises(DataError, match=r"line 4, column label: label 3 is out of range.*0\.\.2"):
        load_manifest(path, n_classes=3)
    assert load_manifest(path).n_classes == 4
    true_path = grey_manifest(tmp_path, [0, 1, 1], true_label=[0, 1, 5])
    assert load_manifest(true_path).n_classes == 6
    negative = grey_manifest(tmp_path, [0, -1, 1])
    with pytest.raises(DataError, match=r"line 3, column label: label -1 is out of range"):
        load_manifest(negative)


def test_manifest_bad_split_value_and_duplicates(tmp_path: Path) -> None:
    path = grey_manifest(tmp_path, [0, 1], split=["train", "holdout"])
    with pytest.raises(DataError, match=r"line 3, column split: 'holdout' is not a split"):
        load_manifest(path)
    write_png(tmp_path / "a.png")
    dup = write_csv(tmp_path / "dup.csv", ["path", "label"], [["a.png", 0], ["a.png", 1]])
    with pytest.raises(DataError, match=r"'a\.png' is listed on line 2 and again on line 3"):
        load_manifest(dup)


def test_split_validates_shapes() -> None:
    images = np.zeros((2, 1, 4, 4), dtype=np.uint8)
    split = Split(
        images=images,
        labels=np.array([0, 1], dtype=np.int32),
        true_labels=None,
        sample_ids=np.array(["a", "b"]),
    )
    assert split.labels.dtype == np.int64 and len(split) == 2
    with pytest.raises(DataError, match=r"labels must be an integer array of shape \(2,\)"):
        Split(images=images, labels=np.array([0]), true_labels=None, sample_ids=["a", "b"])
