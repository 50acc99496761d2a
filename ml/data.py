"""Load labelled medical image datasets into one in-memory format.

Two sources are supported:

* MedMNIST ``.npz`` archives (keys ``train_images``, ``train_labels`` and optionally the
  ``val_*`` / ``test_*`` pairs), addressed either by path or by dataset name
  (``"breastmnist"``, ``"breastmnist_64"``) looked up in a data directory;
* CSV manifests as exported by a hospital system: a header row with the columns
  ``path,label`` and optionally ``true_label`` and ``split``; images are read with Pillow.

Every loader returns a :class:`Dataset` whose splits hold ``uint8`` images shaped
``(N, C, H, W)`` and ``int64`` labels shaped ``(N,)``. Every problem with the input raises
:class:`DataError`, whose message names the file, what is wrong and how to fix it.
"""

from __future__ import annotations

import csv
import os
import re
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "DATA_DIR_ENV",
    "MEDMNIST_N_CLASSES",
    "DataError",
    "Dataset",
    "Split",
    "load_dataset",
    "load_manifest",
    "load_npz",
    "read_manifest_paths",
    "resolve_data_dir",
    "stratified_assignment",
]

DATA_DIR_ENV = "NOISESCORE_DATA_DIR"
"""Environment variable naming the folder that holds ``<name>.npz`` files."""

MEDMNIST_N_CLASSES: dict[str, int] = {
    "pathmnist": 9,
    "dermamnist": 7,
    "octmnist": 4,
    "pneumoniamnist": 2,
    "retinamnist": 5,
    "breastmnist": 2,
    "bloodmnist": 8,
    "tissuemnist": 8,
    "organamnist": 11,
    "organcmnist": 11,
    "organsmnist": 11,
}
"""Number of classes of the single-label 2D MedMNIST datasets, by flag."""

_MULTI_LABEL_FLAGS = {"chestmnist": 14}
_SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
_DEFAULT_DATA_DIRS = (Path("..") / "shared" / "data", Path("data"))
_SIZE_SUFFIX = re.compile(r"_\d+$")
_GREY_MODES = {"L", "1", "LA", "I", "F"}
_NPZ_READ_ERRORS = (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error, KeyError)
_IMAGE_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

PathLike = str | os.PathLike[str]


class DataError(ValueError):
    """A dataset file is missing, malformed or inconsistent; the message says how to fix it."""


# --------------------------------------------------------------------------- containers


@dataclass(frozen=True, eq=False)
class Split:
    """One split (train, val or test) of a dataset.

    Parameters
    ----------
    images : numpy.ndarray
        ``uint8`` array of shape ``(N, C, H, W)`` with ``C`` in ``{1, 3}``.
    labels : numpy.ndarray
        Observed (possibly noisy) labels, ``int64`` of shape ``(N,)``.
    true_labels : numpy.ndarray or None
        Reference labels, ``int64`` of shape ``(N,)``, when the source provides them.
    sample_ids : numpy.ndarray
        Object array of ``N`` strings identifying each sample (``"train/0"`` for an npz,
        the path as written in the CSV for a manifest).

    Notes
    -----
    Integer label arrays of another dtype are converted to ``int64``; anything else that
    does not fit the shapes above raises :class:`DataError`. Instances compare by identity.
    """

    images: np.ndarray
    labels: np.ndarray
    true_labels: np.ndarray | None
    sample_ids: np.ndarray

    def __post_init__(self) -> None:
        images = np.asarray(self.images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise DataError(
                f"Split images must be uint8 of shape (N, C, H, W) with C in (1, 3); "
                f"got {images.dtype} {images.shape}."
            )
        n = images.shape[0]
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", _as_label_vector(self.labels, n, "labels"))
        if self.true_labels is not None:
            true_labels = _as_label_vector(self.true_labels, n, "true_labels")
            object.__setattr__(self, "true_labels", true_labels)
        ids = np.asarray(self.sample_ids, dtype=object)
        if ids.shape != (n,):
            raise DataError(f"Split sample_ids must have shape ({n},); got {ids.shape}.")
        object.__setattr__(self, "sample_ids", ids)

    def __len__(self) -> int:
        """Return the number of samples."""
        return int(self.images.shape[0])


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image dataset with a train split and optional val and test splits.

    Parameters
    ----------
    name : str
        Short name, e.g. ``"breastmnist"`` or the stem of the file read.
    source : str
        Absolute path of the file read.
    n_classes : int
        Number of classes; every label lies in ``[0, n_classes)``.
    train, val, test : Split
        The splits; ``val`` and ``test`` are ``None`` when the source has none.
    """

    name: str
    source: str
    n_classes: int
    train: Split
    val: Split | None
    test: Split | None

    @property
    def in_chans(self) -> int:
        """Number of image channels ``C`` (1 for grey, 3 for RGB)."""
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """Image height and width ``(H, W)``."""
        return int(self.train.images.shape[2]), int(self.train.images.shape[3])

    def splits(self) -> dict[str, Split]:
        """Return the splits that exist, keyed ``"train"``, ``"val"``, ``"test"``."""
        found = {"train": self.train, "val": self.val, "test": self.test}
        return {key: split for key, split in found.items() if split is not None}


def _as_label_vector(values: np.ndarray, n: int, what: str) -> np.ndarray:
    """Return ``values`` as an ``int64`` vector of length ``n`` or raise :class:`DataError`."""
    arr = np.asarray(values)
    if arr.shape != (n,) or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise DataError(
            f"Split {what} must be an integer array of shape ({n},); got {arr.dtype} {arr.shape}."
        )
    return arr.astype(np.int64, copy=False)


# --------------------------------------------------------------------------- data dir


def resolve_data_dir(data_dir: PathLike | None = None) -> Path:
    """Return the folder in which dataset names are looked up.

    Parameters
    ----------
    data_dir : str or os.PathLike, optional
        Explicit folder (e.g. from ``--data-dir``); returned as an absolute path as is.

    Returns
    -------
    pathlib.Path
        ``data_dir`` if given, else ``$NOISESCORE_DATA_DIR`` if set, else the first
        existing of ``../shared/data`` and ``./data`` (relative to the working directory).

    Raises
    ------
    DataError
        If no folder is given and none of the default places exists.
    """
    return _resolve_data_dir_with_origin(data_dir)[0]


def _resolve_data_dir_with_origin(data_dir: PathLike | None) -> tuple[Path, str]:
    """Return the data folder and a phrase saying where it came from."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser().resolve(), "the data_dir argument / --data-dir"
    from_env = os.environ.get(DATA_DIR_ENV, "").strip()
    if from_env:
        return Path(from_env).expanduser().resolve(), f"${DATA_DIR_ENV}"
    for candidate in _DEFAULT_DATA_DIRS:
        if candidate.is_dir():
            return candidate.resolve(), "the default search path"
    searched = ", ".join(str(c.resolve()) for c in _DEFAULT_DATA_DIRS)
    raise DataError(
        f"No data directory found: {DATA_DIR_ENV} is not set and none of {searched} exists. "
        f"Pass --data-dir /path/to/data (data_dir=...) or set {DATA_DIR_ENV}, "
        f"or give the path of a .npz or .csv file instead of a dataset name."
    )


# --------------------------------------------------------------------------- entry point


def load_dataset(
    source: PathLike,
    *,
    data_dir: PathLike | None = None,
    n_classes: int | None = None,
    test_fraction: float = 0.2,
    val_fraction: float = 0.0,
    seed: int = 0,
    image_size: int | None = None,
) -> Dataset:
    """Load a dataset by name or from a ``.npz`` / ``.csv`` path.

    Parameters
    ----------
    source : str or os.PathLike
        A dataset name (case-insensitive, e.g. ``"breastmnist"`` or ``"breastmnist_64"``,
        read from ``<data_dir>/<name>.npz``) or the path of a ``.npz`` archive or ``.csv``
        manifest. A string containing a path separator or ending in ``.npz`` / ``.csv``
        is a path.
    data_dir : str or os.PathLike, optional
        Folder in which names are looked up; see :func:`resolve_data_dir`.
    n_classes : int, optional
        Number of classes; inferred when omitted.
    test_fraction, val_fraction : float
        Held-out fractions for a manifest without a ``split`` column (ignored otherwise).
    seed : int
        Seed of the stratified manifest split.
    image_size : int, optional
        Resize every image to ``(image_size, image_size)`` (bilinear).

    Returns
    -------
    Dataset

    Raises
    ------
    DataError
        If the source cannot be found or read, or its content is invalid.
    """
    if _looks_like_path(source):
        path = Path(source).expanduser()
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return load_manifest(
                path,
                n_classes=n_classes,
                test_fraction=test_fraction,
                val_fraction=val_fraction,
                seed=seed,
                image_size=image_size,
            )
        if suffix != ".npz":
            raise DataError(
                f"{path}: unsupported file type {path.suffix!r}; "
                f"give a MedMNIST .npz archive or a .csv manifest (columns path,label)."
            )
        return _resize_dataset(load_npz(path, n_classes=n_classes), image_size)
    name = str(source).strip().lower()
    path = _find_named_npz(name, data_dir)
    dataset = load_npz(path, name=name, n_classes=n_classes)
    return _resize_dataset(dataset, image_size)


def _looks_like_path(source: PathLike) -> bool:
    """Return whether ``source`` is a file path rather than a dataset name."""
    if not isinstance(source, str):
        return True
    text = source.strip()
    separators = {"/", "\\", os.sep}
    return any(sep in text for sep in separators) or text.lower().endswith((".npz", ".csv"))


def _find_named_npz(name: str, data_dir: PathLike | None) -> Path:
    """Return ``<data_dir>/<name>.npz`` or raise a :class:`DataError` that says how to fix it."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name):
        raise DataError(
            f"{name!r} is not a dataset name; give a name like 'breastmnist' "
            f"or the path of a .npz or .csv file."
        )
    _reject_multi_label_name(name, name)
    folder, origin = _resolve_data_dir_with_origin(data_dir)
    path = folder / f"{name}.npz"
    if path.is_file():
        return path
    how = (
        f"Put {name}.npz there, or point --data-dir (data_dir=...) or {DATA_DIR_ENV} "
        f"at the folder that holds it."
    )
    if not folder.is_dir():
        raise DataError(
            f"Dataset {name!r}: data directory {folder} (from {origin}) does not exist. {how}"
        )
    available = sorted(p.stem for p in folder.glob("*.npz"))
    listing = ", ".join(available) if available else "none"
    raise DataError(
        f"Dataset {name!r}: file {path} not found in data directory {folder} (from {origin}); "
        f"datasets available there: {listing}. {how}"
    )


def _reject_multi_label_name(name: str, where: object) -> None:
    """Raise :class:`DataError` if ``name`` is a multi-label MedMNIST flag."""
    flag = _medmnist_flag(name)
    if flag in _MULTI_LABEL_FLAGS:
        raise DataError(
            f"{where}: {flag} is multi-label ({_MULTI_LABEL_FLAGS[flag]} labels per image); "
            f"multi-label datasets are not supported. Use a single-label dataset "
            f"such as {', '.join(sorted(MEDMNIST_N_CLASSES)[:3])}, ..."
        )


def _medmnist_flag(name: str) -> str:
    """Return the MedMNIST flag of ``name``: lower case, without a ``_<size>`` suffix."""
    return _SIZE_SUFFIX.sub("", name.strip().lower())


# --------------------------------------------------------------------------- npz


def load_npz(path: PathLike, *, name: str | None = None, n_classes: int | None = None) -> Dataset:
    """Load a MedMNIST-format ``.npz`` archive.

    Parameters
    ----------
    path : str or os.PathLike
        The archive, with keys ``train_images``, ``train_labels`` and optionally
        ``val_images``/``val_labels`` and ``test_images``/``test_labels``. Images are
        ``uint8`` shaped ``(N, H, W)``, ``(N, H, W, 1)`` or ``(N, H, W, 3)``; labels are
        integers shaped ``(N,)`` or ``(N, 1)``.
    name : str, optional
        Dataset name; defaults to the file stem. Used to look up ``n_classes`` in
        :data:`MEDMNIST_N_CLASSES` (a ``_<size>`` suffix is ignored).
    n_classes : int, optional
        Number of classes; default from the name if it is a known MedMNIST flag, else
        the largest label over all splits plus one.

    Returns
    -------
    Dataset
        ``sample_ids`` are ``"<split>/<index>"``.

    Raises
    ------
    DataError
        If the file is missing, not an npz archive, lacks keys or holds invalid arrays.
    """
    path = Path(path).expanduser().resolve()
    name = (name or path.stem).strip()
    _reject_multi_label_name(name, path)
    arrays, names = _read_npz_arrays(path)
    raw = {key: _npz_split(path, arrays, names, key) for key in _SPLITS}
    raw_splits = {key: value for key, value in raw.items() if value is not None}
    if "train" not in raw_splits:
        raise DataError(f"{path}: the train split is missing or empty; it needs at least 1 image.")
    flag = _medmnist_flag(name)
    n_classes = _npz_n_classes(path, raw_splits, flag, n_classes)
    _check_two_classes(path, raw_splits["train"][1], n_classes)
    splits = {}
    for key, (images, labels) in raw_splits.items():
        _check_label_range(path, labels, n_classes, f"the {key} split")
        ids = np.array([f"{key}/{i}" for i in range(len(labels))], dtype=object)
        splits[key] = Split(images=images, labels=labels, true_labels=None, sample_ids=ids)
    _check_same_image_shape(path, splits)
    return Dataset(
        name=name,
        source=str(path),
        n_classes=n_classes,
        train=splits["train"],
        val=splits.get("val"),
        test=splits.get("test"),
    )


def _read_npz_arrays(path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read the split arrays of the archive at ``path``; return them and every key's name.

    Only ``{train,val,test}_{images,labels}`` are decompressed: other members of the
    archive (however large) are never read.
    """
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"{path}: {what}; give the path of a MedMNIST .npz archive.")
    wanted = [f"{split}_{part}" for split in _SPLITS for part in ("images", "labels")]
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)  # the zip directory only; members load on access
            arrays = {key: np.asarray(archive[key]) for key in wanted if key in names}
    except (TypeError, AttributeError):  # a plain .npy array is not a context manager
        raise DataError(
            f"{path}: holds a single .npy array, not an .npz archive with keys "
            f"train_images and train_labels; save the splits with numpy.savez_compressed."
        ) from None
    except _NPZ_READ_ERRORS as exc:
        raise DataError(
            f"{path}: not a valid .npz archive or the file is corrupt ({type(exc).__name__}: "
            f"{exc}). Download the file again, or re-save it with numpy.savez_compressed "
            f"(object arrays are not accepted)."
        ) from exc
    return arrays, names


def _npz_split(
    path: Path, arrays: Mapping[str, np.ndarray], names: Sequence[str], key: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """Return the validated ``(images, labels)`` of split ``key``, or ``None`` if absent."""
    image_key, label_key = f"{key}_images", f"{key}_labels"
    present = [k for k in (image_key, label_key) if k in arrays]
    if key != "train" and not present:
        return None
    missing = [k for k in (image_key, label_key) if k not in arrays]
    if missing:
        raise DataError(
            f"{path}: missing key(s) {', '.join(missing)}; the archive has "
            f"{_listing(names)}. A MedMNIST .npz needs train_images "
            f"and train_labels, and optionally the val_* and test_* pairs."
        )
    images = _npz_images(path, arrays[image_key], key)
    labels = _npz_labels(path, arrays[label_key], key)
    if len(images) != len(labels):
        raise DataError(
            f"{path}: the {key} split has {len(images)} images ({image_key}) but "
            f"{len(labels)} labels ({label_key}); the two counts must match."
        )
    if len(images) == 0:
        return None
    return images, labels


def _listing(names: Sequence[str], limit: int = 20) -> str:
    """``a, b, c`` (sorted; at most ``limit`` names, then how many more)."""
    if not names:
        return "no arrays"
    shown = sorted(names)[:limit]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more


def _npz_images(path: Path, images: np.ndarray, key: str) -> np.ndarray:
    """Return ``images`` as contiguous ``uint8`` ``(N, C, H, W)``."""
    if images.ndim == 4 and images.shape[-1] not in (1, 3):
        raise DataError(
            f"{path}: {key}_images has shape {images.shape}; the last axis must be the channel "
            f"axis with 1 (grey) or 3 (RGB) channels, i.e. (N, H, W, 3), not (N, C, H, W)."
        )
    if images.ndim not in (3, 4):
        raise DataError(
            f"{path}: {key}_images has shape {images.shape}; expected (N, H, W) for grey or "
            f"(N, H, W, 3) for RGB images."
        )
    images = _as_uint8(path, images, f"{key}_images")
    nchw = images[:, None, :, :] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(nchw)


def _as_uint8(path: Path, images: np.ndarray, what: str) -> np.ndarray:
    """Return ``images`` as ``uint8``; integer arrays within 0..255 are converted."""
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.integer) and (
        images.size == 0 or (images.min() >= 0 and images.max() <= 255)
    ):
        return images.astype(np.uint8)
    raise DataError(
        f"{path}: {what} has dtype {images.dtype}; images must be uint8 with values 0..255 "
        f"(convert them, e.g. (x * 255).round().astype('uint8') for floats in [0, 1])."
    )


def _npz_labels(path: Path, labels: np.ndarray, key: str) -> np.ndarray:
    """Return ``labels`` as an ``int64`` vector."""
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(
            f"{path}: {key}_labels has shape {labels.shape}: multi-label data "
            f"({labels.shape[1]} labels per image) is not supported; give one class index "
            f"per image, shaped (N,) or (N, 1)."
        )
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(
            f"{path}: {key}_labels has shape {labels.shape}; expected (N,) or (N, 1) class indices."
        )
    return _integer_labels(path, labels, f"{key}_labels")


def _integer_labels(path: Path, labels: np.ndarray, what: str) -> np.ndarray:
    """Return integer-valued ``labels`` as ``int64`` or raise :class:`DataError`."""
    if np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool:
        return labels.astype(np.int64)
    if np.issubdtype(labels.dtype, np.floating):
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if not bad.any():
            return labels.astype(np.int64)
        first = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{path}: {what} must be whole class indices; entry {first} is {labels[first]!r}."
        )
    raise DataError(f"{path}: {what} has dtype {labels.dtype}; expected integer class indices.")


def _npz_n_classes(
    path: Path,
    splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
    flag: str,
    n_classes: int | None,
) -> int:
    """Return ``n_classes``: the argument, the MedMNIST value or the largest label plus one."""
    if n_classes is not None:
        return _check_n_classes(path, n_classes)
    if flag in MEDMNIST_N_CLASSES:
        return MEDMNIST_N_CLASSES[flag]
    return _infer_n_classes([labels for _, labels in splits.values()])


def _check_n_classes(path: Path, n_classes: int) -> int:
    """Return ``n_classes`` if it is an integer of at least 2."""
    if isinstance(n_classes, bool) or not isinstance(n_classes, int | np.integer):
        raise DataError(f"{path}: n_classes must be an integer, got {n_classes!r}.")
    if n_classes < 2:
        raise DataError(f"{path}: n_classes must be at least 2, got {n_classes}.")
    return int(n_classes)


def _infer_n_classes(label_arrays: Iterable[np.ndarray]) -> int:
    """Return the largest label plus one (at least 1)."""
    largest = max((int(a.max()) for a in label_arrays if a.size), default=0)
    return max(largest + 1, 1)


def _check_two_classes(path: Path, train_labels: np.ndarray, n_classes: int) -> None:
    """Raise :class:`DataError` unless there are 2+ classes and the train split has 2+."""
    present = np.unique(train_labels)
    if n_classes < 2 or len(present) < 2:
        found = ", ".join(str(int(c)) for c in present[:1])
        raise DataError(
            f"{path}: the train split has a single class (label {found}); scoring labels "
            f"needs at least 2 classes with training samples each. Check the label column "
            f"or pick a dataset with several classes."
        )


def _check_label_range(path: Path, labels: np.ndarray, n_classes: int, where: str) -> None:
    """Raise :class:`DataError` naming the first label outside ``[0, n_classes)``."""
    bad = (labels < 0) | (labels >= n_classes)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{path}: label {int(labels[index])} at index {index} of {where} is out of range; "
            f"valid labels are 0..{n_classes - 1} (n_classes={n_classes}). Fix the label or "
            f"pass the right n_classes."
        )


def _check_same_image_shape(path: Path, splits: Mapping[str, Split]) -> None:
    """Raise :class:`DataError` unless all splits share channels and image size."""
    shapes = {key: split.images.shape[1:] for key, split in splits.items()}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{key} {shape}" for key, shape in shapes.items())
        raise DataError(
            f"{path}: the splits have different image shapes (C, H, W): {listing}; "
            f"all splits must share one image shape."
        )


def _resize_dataset(dataset: Dataset, image_size: int | None) -> Dataset:
    """Return ``dataset`` with every image resized to ``(image_size, image_size)``."""
    if image_size is None:
        return dataset
    size = _check_image_size(Path(dataset.source), image_size)
    if dataset.image_size == (size, size):
        return dataset
    resized = {key: _resize_split(split, size) for key, split in dataset.splits().items()}
    return Dataset(
        name=dataset.name,
        source=dataset.source,
        n_classes=dataset.n_classes,
        train=resized["train"],
        val=resized.get("val"),
        test=resized.get("test"),
    )


def _resize_split(split: Split, size: int) -> Split:
    """Return ``split`` with its images resized bilinearly to ``(size, size)``."""
    out = np.empty((len(split), split.images.shape[1], size, size), dtype=np.uint8)
    for i, image in enumerate(split.images):
        for c, channel in enumerate(image):
            out[i, c] = _resize_array(channel, size)
    return Split(
        images=out, labels=split.labels, true_labels=split.true_labels, sample_ids=split.sample_ids
    )


def _resize_array(channel: np.ndarray, size: int) -> np.ndarray:
    """Resize one ``uint8`` ``(H, W)`` channel bilinearly to ``(size, size)``."""
    image = Image.fromarray(channel)
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))


def _check_image_size(path: Path, image_size: int) -> int:
    """Return ``image_size`` if it is a positive integer."""
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer):
        raise DataError(f"{path}: image_size must be an integer, got {image_size!r}.")
    if image_size < 1:
        raise DataError(f"{path}: image_size must be positive, got {image_size}.")
    return int(image_size)


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class _Row:
    """One parsed manifest row."""

    line: int
    path: str
    label: int
    true_label: int | None
    split: str | None


def load_manifest(
    path: PathLike,
    *,
    n_classes: int | None = None,
    test_fraction: float = 0.2,
    val_fraction: float = 0.0,
    seed: int = 0,
    image_size: int | None = None,
) -> Dataset:
    """Load a CSV manifest of image files and labels.

    Parameters
    ----------
    path : str or os.PathLike
        CSV file with a header row and the columns ``path`` and ``label`` (class indices),
        optionally ``true_label`` (reference labels) and ``split`` (``train``/``val``/
        ``test``). Column names are case-insensitive. Image paths are relative to the
        CSV's folder, or absolute, and must lead to a file inside that folder (or its
        subfolders) once symlinks are resolved.
    n_classes : int, optional
        Number of classes; default the largest of ``label`` and ``true_label`` plus one.
    test_fraction, val_fraction : float
        Fractions held out per class as test and val when there is no ``split`` column.
    seed : int
        Seed of that stratified split (same seed, same split).
    image_size : int, optional
        Resize every image to ``(image_size, image_size)`` (bilinear). Without it all
        images must have the same size.

    Returns
    -------
    Dataset
        One channel if every image is greyscale, else three (RGB). ``sample_ids`` are
        the paths as written in the CSV.

    Raises
    ------
    DataError
        If the CSV or an image is missing, unreadable or inconsistent. An image that is
        outside the manifest's folder, missing, not a file, unreadable or not decodable
        gets one and the same message (the cause stays in the exception chain), so a
        manifest cannot be used to probe which files exist elsewhere on the machine.

    Notes
    -----
    16-bit and 32-bit greyscale images whose values exceed 255 are scaled linearly by
    ``255 / max`` per image rather than clipped.
    """
    csv_path = Path(path).expanduser().resolve()
    _check_fractions(csv_path, test_fraction, val_fraction)
    size = None if image_size is None else _check_image_size(csv_path, image_size)
    rows = _read_manifest_rows(csv_path)
    n_classes = _manifest_n_classes(csv_path, rows, n_classes)
    images = _load_manifest_images(csv_path, rows, size)
    assignment = _manifest_assignment(csv_path, rows, test_fraction, val_fraction, seed)
    splits = {
        key: _manifest_split(rows, images, np.flatnonzero(assignment == key))
        for key in _SPLITS
        if (assignment == key).any()
    }
    if "train" not in splits:
        raise DataError(
            f"{csv_path}: no row has split 'train'; the train split needs at least one image."
        )
    _check_two_classes(csv_path, splits["train"].labels, n_classes)
    return Dataset(
        name=csv_path.stem,
        source=str(csv_path),
        n_classes=n_classes,
        train=splits["train"],
        val=splits.get("val"),
        test=splits.get("test"),
    )


def _check_fractions(path: Path, test_fraction: float, val_fraction: float) -> None:
    """Raise :class:`DataError` unless both fractions lie in ``[0, 1)`` and sum below 1."""
    for what, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 <= value < 1.0:
            raise DataError(f"{path}: {what} must be in [0, 1), got {value}.")
    if test_fraction + val_fraction >= 1.0:
        raise DataError(
            f"{path}: test_fraction + val_fraction must be below 1 to leave a train split, "
            f"got {test_fraction} + {val_fraction}."
        )


def read_manifest_paths(path: PathLike) -> list[str]:
    """Return the image paths of the manifest at ``path``, as written, in row order.

    The manifest is checked as :func:`load_manifest` checks it (header, labels, splits,
    no path listed twice); the images are not touched.
    """
    return [row.path for row in _read_manifest_rows(Path(path).expanduser().resolve())]


def _read_manifest_rows(path: Path) -> list[_Row]:
    """Parse and validate the rows of the manifest at ``path``."""
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"{path}: {what}; give the path of a CSV manifest with columns path,label.")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: the manifest is empty; it needs a header row path,label.")
            columns = _manifest_columns(path, header)
            rows = [
                _parse_row(path, reader.line_num, cells, columns)
                for cells in reader
                if any(cell.strip() for cell in cells)
            ]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable UTF-8 CSV file ({exc}).") from exc
    if not rows:
        raise DataError(f"{path}: the manifest has a header but no rows; add one row per image.")
    _check_unique_paths(path, rows)
    return rows


def _manifest_columns(path: Path, header: Sequence[str]) -> dict[str, int]:
    """Return the column index of each known column, checking the required ones."""
    names = [cell.strip().lower() for cell in header]
    columns = {name: i for i, name in reversed(list(enumerate(names))) if name}
    missing = [name for name in ("path", "label") if name not in columns]
    if missing:
        found = ", ".join(repr(cell) for cell in header) or "none"
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; columns found: {found}. The first "
            f"row must be a header with path,label (optionally true_label and split)."
        )
    return columns


def _parse_row(path: Path, line: int, cells: Sequence[str], columns: Mapping[str, int]) -> _Row:
    """Parse one data row (``line`` is its line number in the CSV)."""

    def cell(name: str) -> str:
        index = columns[name]
        return cells[index].strip() if index < len(cells) else ""

    image_path = cell("path")
    if not image_path:
        raise DataError(f"{path}: line {line} has an empty path; every row needs an image path.")
    label = _parse_label(path, line, "label", cell("label"))
    true_label = None
    if "true_label" in columns:
        true_label = _parse_label(path, line, "true_label", cell("true_label"))
    split = _parse_split(path, line, cell("split")) if "split" in columns else None
    return _Row(line=line, path=image_path, label=label, true_label=true_label, split=split)


def _parse_label(path: Path, line: int, column: str, text: str) -> int:
    """Parse an integer class index (``"2"`` or ``"2.0"``)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if np.isfinite(value) and value == round(value):
        return int(value)
    raise DataError(
        f"{path}: line {line}, column {column}: {text!r} is not an integer class index; "
        f"labels must be integers 0..n_classes-1 (map class names to indices first)."
    )


def _parse_split(path: Path, line: int, text: str) -> str:
    """Parse a split name: ``train``, ``val`` (or ``validation``) or ``test``."""
    split = _SPLIT_ALIASES.get(text.lower())
    if split is None:
        raise DataError(
            f"{path}: line {line}, column split: {text!r} is not a split; use train, val or test."
        )
    return split


def _check_unique_paths(path: Path, rows: Sequence[_Row]) -> None:
    """Raise :class:`DataError` if an image path appears on two rows."""
    first_line: dict[str, int] = {}
    for row in rows:
        if row.path in first_line:
            raise DataError(
                f"{path}: image {row.path!r} is listed on line {first_line[row.path]} and again "
                f"on line {row.line}; list each image once."
            )
        first_line[row.path] = row.line


def _manifest_n_classes(path: Path, rows: Sequence[_Row], n_classes: int | None) -> int:
    """Return ``n_classes`` and check every label against it."""
    if n_classes is not None:
        n_classes = _check_n_classes(path, n_classes)
    else:
        values = [row.label for row in rows] + [
            row.true_label for row in rows if row.true_label is not None
        ]
        n_classes = max(max(values) + 1, 1)
    for row in rows:
        for column, value in (("label", row.label), ("true_label", row.true_label)):
            if value is not None and not 0 <= value < n_classes:
                raise DataError(
                    f"{path}: line {row.line}, column {column}: label {value} is out of range; "
                    f"valid labels are 0..{n_classes - 1} (n_classes={n_classes}). Fix the "
                    f"label or pass the right n_classes."
                )
    return n_classes


def _load_manifest_images(path: Path, rows: Sequence[_Row], size: int | None) -> np.ndarray:
    """Read every image of the manifest into ``uint8`` ``(N, C, H, W)``."""
    images = [_open_image(path, row) for row in rows]
    if size is not None:
        images = [im.resize((size, size), Image.Resampling.BILINEAR) for im in images]
    else:
        _check_same_size(path, rows, images)
    grey = all(im.mode == "L" for im in images)
    if grey:
        return np.stack([np.asarray(im) for im in images])[:, None, :, :]
    rgb = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return np.ascontiguousarray(rgb.transpose(0, 3, 1, 2))


class _UnusableImage(Exception):
    """Why an image of a manifest cannot be used (kept as the DataError's cause only)."""


def _open_image(path: Path, row: _Row) -> Image.Image:
    """Open the image of ``row``; greyscale modes become ``"L"``, others stay as they are.

    The image's real path (symlinks resolved) must lie inside the manifest's folder
    ``path.parent``. Whatever is wrong — outside, missing, not a file, unreadable, not
    an image — the error says the same thing.
    """
    folder = path.parent
    try:
        file = (folder / row.path).resolve()  # an absolute row.path replaces folder
        if not file.is_relative_to(folder):
            raise _UnusableImage("outside the manifest's folder")
        if not file.is_file():
            raise _UnusableImage("not a file")
        with Image.open(file) as image:
            image.load()
            return _normalise_mode(image)
    except (_UnusableImage, RuntimeError, *_IMAGE_READ_ERRORS) as exc:
        raise DataError(
            f"{path}: line {row.line}: image {row.path[:200]!r} cannot be used: each path must "
            f"name a readable PNG or JPEG file inside the manifest's folder (relative to it; "
            f"absolute paths, '..' and symlinks must not lead out of it). Fix or remove the "
            f"row."
        ) from exc


def _normalise_mode(image: Image.Image) -> Image.Image:
    """Return greyscale images as mode ``"L"`` and colour images unchanged."""
    if image.mode == "L":
        return image.copy()
    if image.mode.startswith("I;16") or image.mode in {"I", "F"}:
        return Image.fromarray(_scale_to_uint8(np.asarray(image)))
    if image.mode in _GREY_MODES:
        return image.convert("L")
    return image.copy()


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map a high bit-depth grey image to ``uint8``, scaling by ``255 / max`` if above 255."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    values = np.clip(values, 0.0, None)
    peak = float(values.max()) if values.size else 0.0
    if peak > 255.0:
        values = values * (255.0 / peak)
    return np.round(values).astype(np.uint8)


def _check_same_size(path: Path, rows: Sequence[_Row], images: Sequence[Image.Image]) -> None:
    """Raise :class:`DataError` naming the first image whose size differs from the first one."""
    expected = images[0].size
    for row, image in zip(rows, images, strict=True):
        if image.size != expected:
            raise DataError(
                f"{path}: line {row.line}: image {row.path} is {_wxh(image.size)} but "
                f"{rows[0].path} (line {rows[0].line}) is {_wxh(expected)}; all images must "
                f"share one size. Pass --image-size N (image_size=N) to resize every image "
                f"to N x N."
            )


def _wxh(size: tuple[int, int]) -> str:
    """Format a Pillow ``(width, height)`` size as ``"WxH"``."""
    return f"{size[0]}x{size[1]} (WxH)"


def _manifest_assignment(
    path: Path,
    rows: Sequence[_Row],
    test_fraction: float,
    val_fraction: float,
    seed: int,
) -> np.ndarray:
    """Return the split name of every row: from the ``split`` column or a stratified draw."""
    if rows[0].split is not None:
        return np.array([row.split for row in rows], dtype=object)
    labels = np.array([row.label for row in rows], dtype=np.int64)
    return stratified_assignment(
        labels, test_fraction=test_fraction, val_fraction=val_fraction, seed=seed
    )


def stratified_assignment(
    labels: np.ndarray, *, test_fraction: float = 0.2, val_fraction: float = 0.0, seed: int = 0
) -> np.ndarray:
    """Assign each sample to ``"train"``, ``"val"`` or ``"test"``, stratified by label.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer labels of shape ``(N,)``.
    test_fraction, val_fraction : float
        Fraction of each class held out (rounded half up per class).
    seed : int
        Seed of the ``numpy.random.Generator``; the same seed gives the same assignment.

    Returns
    -------
    numpy.ndarray
        Object array of ``N`` split names. Every class keeps at least one training sample.
    """
    rng = np.random.default_rng(seed)
    assignment = np.full(len(labels), "train", dtype=object)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_test, n_val = _holdout_counts(len(members), test_fraction, val_fraction)
        assignment[members[:n_test]] = "test"
        assignment[members[n_test : n_test + n_val]] = "val"
    return assignment


def _holdout_counts(n: int, test_fraction: float, val_fraction: float) -> tuple[int, int]:
    """Return ``(n_test, n_val)`` for a class of ``n`` samples, leaving one for train."""
    n_test = int(np.floor(n * test_fraction + 0.5))
    n_val = int(np.floor(n * val_fraction + 0.5))
    excess = n_test + n_val - (n - 1)
    if excess > 0:
        cut_val = min(excess, n_val)
        n_val -= cut_val
        n_test -= excess - cut_val
    return max(n_test, 0), max(n_val, 0)


def _manifest_split(rows: Sequence[_Row], images: np.ndarray, index: np.ndarray) -> Split:
    """Build the :class:`Split` of the rows at ``index`` (kept in CSV order)."""
    chosen = [rows[i] for i in index]
    has_true = chosen[0].true_label is not None
    return Split(
        images=np.ascontiguousarray(images[index]),
        labels=np.array([row.label for row in chosen], dtype=np.int64),
        true_labels=(
            np.array([row.true_label for row in chosen], dtype=np.int64) if has_true else None
        ),
        sample_ids=np.array([row.path for row in chosen], dtype=object),
    )
