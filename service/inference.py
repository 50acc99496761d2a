"""Serving a finished job's ONNX model: decode request images, predict, score given labels.

Plain Python and numpy types only: the gRPC servicer translates its messages into
:class:`EncodedImage`/:class:`TensorImage` and label lists, calls the functions here, and
maps the errors to status codes:

- :class:`InputError` (a ``ValueError``): the request content is wrong (an undecodable or
  too large image, a tensor of the wrong shape, a label outside ``[0, K)``) and the
  message says which item and what is wrong -> ``INVALID_ARGUMENT``;
- :class:`OverBudget` (a ``RuntimeError``): the images would take more decoded pixels than
  one request or the whole process may hold at once -> ``RESOURCE_EXHAUSTED``;
- :class:`ModelError`: the stored model cannot be served (not an ONNX model from
  :func:`noisescore.ml.export.export_onnx`) -> ``FAILED_PRECONDITION``/``INTERNAL``.

The model contract is the one :mod:`noisescore.ml.export` writes: input ``images``
float32 ``(N, C, H, W)`` raw pixel values ``0..255``, output ``probabilities`` float32
``(N, K)``, and ``metadata_props`` naming ``model``, ``num_classes``, ``in_chans`` and
``img_size``. Normalisation lives inside the graph, so requests carry raw pixels.

Label scores follow cleanlab's conventions (``label_quality`` = ``p(given label)``, lower
is more likely mislabelled). A job's cut-off for calling a label *suspect* is calibrated
on its training set by :func:`suspect_cutoff`, so that ``label_quality < cutoff``
reproduces LiNC's own flags as closely as a single threshold can.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from noisescore.ml.onnx_runtime import (
    INPUT_NAME,
    ONNX_FORMAT,
    OUTPUT_NAMES,
    load_session,
    read_metadata,
)

# Largest decoded image accepted, in pixels (Pillow's MAX_IMAGE_PIXELS idea, stricter):
# the check runs on the header, before any pixel is decompressed.
MAX_IMAGE_PIXELS = 4096 * 4096
# Decoded pixels one Predict/ScoreLabels request may need, and all requests of the process
# at once (see image_cost); defaults of NOISESCORE_MAX_REQUEST_PIXELS / _MAX_INFLIGHT_PIXELS.
MAX_REQUEST_PIXELS = 16 * 1024 * 1024
MAX_INFLIGHT_PIXELS = 64 * 1024 * 1024
# Formats Pillow may open from a request. Others (EPS runs Ghostscript, for one) are not
# worth the attack surface for image classification.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP", "PPM")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Bytes per sample of Pillow modes wider than 8 bit: such a pixel costs that many pixels.
_WIDE_MODES = {"I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2, "I": 4, "F": 4}
_PIL_MODE = {1: "L", 3: "RGB"}

Observer = Callable[[float, int], None]
Providers = Sequence[str | tuple[str, dict[str, Any]]]


class InputError(ValueError):
    """The request content is wrong; the message names the item and what is wrong."""


class OverBudget(RuntimeError):
    """The images need more decoded pixels than allowed (per request or in flight)."""


class ModelError(RuntimeError):
    """The stored model cannot be served (not loadable, or lacking the export contract)."""


@dataclass(frozen=True)
class EncodedImage:
    """An image file as sent by a client.

    Attributes
    ----------
    data : bytes
        PNG, JPEG, BMP, TIFF, GIF, WebP or PPM bytes (:data:`IMAGE_FORMATS`).
    """

    data: bytes


@dataclass(frozen=True)
class TensorImage:
    """Raw pixels already in the model's layout.

    Attributes
    ----------
    shape : tuple of int
        ``(C, H, W)``; must equal ``(in_chans, img_size, img_size)`` of the model.
    data : bytes
        ``C * H * W`` uint8 values, row-major (C-order).
    """

    shape: tuple[int, ...]
    data: bytes


ImageInput = EncodedImage | TensorImage


@dataclass(frozen=True)
class ModelInfo:
    """What an exported model takes and returns.

    Attributes
    ----------
    model : str
        Its timm name (``noisescore_cnn``, ``resnet18``...).
    num_classes : int
        ``K``, the width of ``probabilities``.
    in_chans : int
        Image channels ``C``.
    img_size : int
        Square image side ``H = W`` in pixels.
    """

    model: str
    num_classes: int
    in_chans: int
    img_size: int

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> ModelInfo:
        """Read the ``metadata_props`` written by :func:`noisescore.ml.export.export_onnx`.

        Parameters
        ----------
        meta : mapping of str to str
            As returned by :func:`noisescore.ml.export.read_metadata`.

        Returns
        -------
        ModelInfo

        Raises
        ------
        ModelError
            A key is missing or not a positive integer, or the format is not
            :data:`noisescore.ml.export.ONNX_FORMAT`.
        """
        fmt = meta.get("noisescore.format")
        if fmt is not None and fmt != ONNX_FORMAT:
            raise ModelError(f"model format is {fmt!r}; this service reads {ONNX_FORMAT!r}")
        missing = [k for k in ("model", "num_classes", "in_chans", "img_size") if k not in meta]
        if missing:
            raise ModelError(
                f"model metadata lacks {missing}; export it with noisescore.ml.export.export_onnx"
            )
        sizes: dict[str, int] = {}
        for key in ("num_classes", "in_chans", "img_size"):
            try:
                sizes[key] = int(meta[key])
            except ValueError:
                sizes[key] = 0
            if sizes[key] < 1:
                raise ModelError(f"model metadata {key}={meta[key]!r} is not a positive integer")
        return cls(model=meta["model"], **sizes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one input image."""
        return (self.in_chans, self.img_size, self.img_size)


# --------------------------------------------------------------------------- decoding


def image_cost(width: int, height: int, mode: str, info: ModelInfo) -> int:
    """Decoded pixels an encoded image costs: its own ``width * height`` (times the bytes
    per sample of a 16- or 32-bit mode) plus the model's input ``img_size ** 2`` that it
    is resized to. A tensor image costs the model's input alone."""
    return width * height * _WIDE_MODES.get(mode, 1) + info.img_size**2


class OpenedImages:
    """Request images with their headers read and nothing decoded yet (Pillow opens
    lazily): :attr:`pixels` is what decoding them will cost (:func:`image_cost`), known
    before a single pixel is decompressed. :meth:`decode` makes the batch. A context
    manager: closing releases the opened images."""

    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self.pixels = 0
        self._items: list[tuple[Image.Image | None, np.ndarray | None, str]] = []

    def __enter__(self) -> OpenedImages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        for opened, _, _ in self._items:
            if opened is not None:
                opened.close()
        self._items = []

    def decode(self) -> np.ndarray:
        """uint8 ``(N, C, H, W)``; see :func:`decode_images`."""
        batch = np.empty((len(self._items), *self.info.shape), dtype=np.uint8)
        for index, (opened, tensor, where) in enumerate(self._items):
            if tensor is not None:
                batch[index] = tensor
            else:
                assert opened is not None
                batch[index] = _decode_opened(opened, self.info, where)
        return batch


def open_images(
    images: Sequence[ImageInput],
    info: ModelInfo,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_total: int | None = None,
    total_setting: str = "",
) -> OpenedImages:
    """Read the headers of the request's images and add up their decoded cost.

    Raises :class:`InputError` as :func:`decode_images` does, for what the header or the
    tensor already shows (size over ``max_pixels``, a 32-bit float mode, wrong tensor
    shape, not an image), and :class:`OverBudget` as soon as the running cost passes
    ``max_total`` (named ``total_setting`` in the message). No pixel is decoded here.
    """
    if len(images) == 0:
        raise InputError("no images")
    opened = OpenedImages(info)
    try:
        for index, image in enumerate(images):
            where = f"images[{index}]"
            if isinstance(image, TensorImage):
                opened._items.append((None, _tensor(image, info, index), where))
                opened.pixels += info.img_size**2
            elif isinstance(image, EncodedImage):
                header = _open(image.data, info, where, max_pixels)
                opened._items.append((header, None, where))
                width, height = header.size
                opened.pixels += image_cost(width, height, header.mode, info)
            else:
                raise InputError(
                    f"{where}: expected EncodedImage or TensorImage, got {type(image).__name__}"
                )
            if max_total is not None and opened.pixels > max_total:
                hint = f" ({total_setting})" if total_setting else ""
                raise OverBudget(
                    f"images[0..{index}] already need {opened.pixels} decoded pixels (each "
                    f"image's width x height, x2 for 16-bit, plus the model's "
                    f"{info.img_size}x{info.img_size} input), more than the {max_total} one "
                    f"request may use{hint}: send fewer or smaller images per request"
                )
    except BaseException:
        opened.close()
        raise
    return opened


def decode_images(
    images: Sequence[ImageInput], info: ModelInfo, *, max_pixels: int = MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Turn request images into the model's input batch.

    Encoded images are decoded with Pillow (first frame; EXIF orientation applied),
    converted to the model's channels (``L`` for 1, ``RGB`` for 3, alpha dropped;
    16-bit greyscale scaled to 8 bit as ``round(v * 255 / 65535)``) and resized to
    ``(img_size, img_size)`` with bilinear filtering when their size differs. Tensor
    images are taken as they are and must already have the model's shape. Every header
    is checked (:func:`open_images`) before the first image is decoded.

    Parameters
    ----------
    images : sequence of EncodedImage or TensorImage
        The request's images, in order; the two kinds may be mixed.
    info : ModelInfo
        The model they are for.
    max_pixels : int, keyword-only
        Largest ``width * height`` an encoded image may declare; checked on the header,
        before decompression (decompression-bomb guard).

    Returns
    -------
    numpy.ndarray
        uint8 ``(N, C, H, W)`` with ``(C, H, W) = (in_chans, img_size, img_size)``.

    Raises
    ------
    InputError
        No images; an image that cannot be decoded, is too large, or has a mode that
        cannot be converted; a tensor whose shape or byte length is wrong. The message
        starts with ``images[i]:``.
    """
    with open_images(images, info, max_pixels=max_pixels) as opened:
        return opened.decode()


class PixelBudget:
    """Decoded pixels all requests of the process may hold at once: :meth:`reserve`
    raises :class:`OverBudget` (answered ``RESOURCE_EXHAUSTED``: retry later) instead of
    letting concurrent requests grow the process without bound."""

    def __init__(self, capacity: int, *, setting: str = "") -> None:
        self.capacity = capacity
        self.setting = setting
        self.in_flight = 0
        self.peak = 0  # the most ever held at once
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        with self._lock:
            if self.in_flight + pixels > self.capacity:
                hint = f" ({self.setting})" if self.setting else ""
                raise OverBudget(
                    f"the server is busy: requests in progress hold {self.in_flight} decoded "
                    f"pixels, this one needs {pixels} and the limit is {self.capacity}"
                    f"{hint}; retry with backoff"
                )
            self.in_flight += pixels
            self.peak = max(self.peak, self.in_flight)
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= pixels


def _tensor(image: TensorImage, info: ModelInfo, index: int) -> np.ndarray:
    shape = list(image.shape)
    expected = list(info.shape)
    if len(shape) != 3:
        raise InputError(
            f"images[{index}]: tensor shape {shape} has {len(shape)} dimensions; "
            f"expected [C, H, W] = {expected}"
        )
    if shape[0] != expected[0]:
        raise InputError(
            f"images[{index}]: {shape[0]} channels but the model takes {expected[0]} "
            f"(expected shape {expected}, got {shape})"
        )
    if shape != expected:
        raise InputError(
            f"images[{index}]: tensor shape {shape} but the model takes {expected} [C, H, W]"
        )
    needed = int(np.prod(expected))
    if len(image.data) != needed:
        raise InputError(
            f"images[{index}]: {len(image.data)} bytes but shape {expected} needs {needed} "
            "(uint8, row-major)"
        )
    return np.frombuffer(image.data, dtype=np.uint8).reshape(expected)


def _open(data: bytes, info: ModelInfo, where: str, max_pixels: int) -> Image.Image:
    """The image opened lazily (header only), checked for size and mode."""
    if _PIL_MODE.get(info.in_chans) is None:
        raise InputError(
            f"{where}: the model takes {info.in_chans} channels, which an encoded image "
            "cannot supply; send a tensor image"
        )
    try:
        opened = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as err:  # Pillow's own, larger limit hit in open()
        raise InputError(f"{where}: image too large ({err})") from err
    except UnidentifiedImageError as err:
        raise InputError(
            f"{where}: cannot decode {len(data)} bytes as an image "
            f"(supported: {', '.join(IMAGE_FORMATS)})"
        ) from err
    except Exception as err:  # a corrupt header raises many kinds inside Pillow
        raise InputError(f"{where}: cannot decode image: {err}") from err
    width, height = opened.size
    problem = None
    if width * height > max_pixels:
        problem = _too_large(where, width, height, max_pixels)
    elif opened.mode == "F":
        problem = f"{where}: 32-bit float images are not supported; send 8- or 16-bit pixels"
    if problem is not None:
        opened.close()
        raise InputError(problem)
    return opened


def _decode_opened(opened: Image.Image, info: ModelInfo, where: str) -> np.ndarray:
    mode = _PIL_MODE[info.in_chans]
    try:
        opened.load()
        pixels = _to_mode(ImageOps.exif_transpose(opened), mode, where)
    except InputError:
        raise
    except Image.DecompressionBombError as err:
        raise InputError(f"{where}: image too large ({err})") from err
    except Exception as err:  # corrupt or truncated data raises many kinds inside Pillow
        raise InputError(f"{where}: cannot decode image: {err}") from err
    side = info.img_size
    if pixels.size != (side, side):
        pixels = pixels.resize((side, side), Image.Resampling.BILINEAR)
    array = np.asarray(pixels, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _too_large(where: str, width: int, height: int, max_pixels: int) -> str:
    return (
        f"{where}: image too large: {width}x{height} = {width * height} pixels, "
        f"more than the {max_pixels} allowed"
    )


def _to_mode(image: Image.Image, mode: str, where: str) -> Image.Image:
    """``image`` as ``mode`` (``L`` or ``RGB``), 16-bit greyscale scaled to 8 bit."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own I;16 -> L conversion clips at 255 instead of scaling. In integers:
        # round(v * 255 / 65535) = round(v / 257) = (v + 128) // 257 (v / 257 is never
        # exactly half-way), at 4 bytes a pixel instead of float64's 8 and its copies.
        wide = np.asarray(image)
        if wide.dtype != np.uint16:  # mode I: 32-bit signed
            wide = np.clip(wide, 0, 65535)
        grey = ((wide.astype(np.uint32) + 128) // 257).astype(np.uint8)
        image = Image.fromarray(grey)
    elif image.mode == "P":
        image = image.convert("RGBA")  # palette transparency resolved before dropping it
    return image if image.mode == mode else image.convert(mode)


# --------------------------------------------------------------------------- model


class OnnxModel:
    """An exported model loaded in onnxruntime, predicting probabilities in chunks.

    Parameters
    ----------
    onnx_bytes : bytes
        A model from :func:`noisescore.ml.export.export_onnx`.
    providers : sequence, optional, keyword-only
        onnxruntime execution providers, as for :func:`noisescore.ml.export.load_session`
        (default: CUDA when available, else CPU).
    max_run_batch : int, keyword-only
        Most images per onnxruntime run; larger batches are split.
    observe : callable, optional, keyword-only
        ``observe(seconds, batch_size)``, called after every onnxruntime run (the service
        records Prometheus histograms with it).

    Attributes
    ----------
    info : ModelInfo
        What the model takes and returns, from its metadata.
    provider : str
        The execution provider onnxruntime actually runs it with.

    Raises
    ------
    ModelError
        onnxruntime cannot load the bytes, or the graph lacks the export contract.
    """

    def __init__(
        self,
        onnx_bytes: bytes,
        *,
        providers: Providers | None = None,
        max_run_batch: int = 256,
        observe: Observer | None = None,
        intra_op_threads: int = 0,
    ) -> None:
        if max_run_batch < 1:
            raise ValueError(f"max_run_batch must be >= 1, got {max_run_batch}")
        try:
            self._session = load_session(
                onnx_bytes, providers=providers, intra_op_threads=intra_op_threads
            )
        except Exception as err:  # onnxruntime raises its own exception types
            raise ModelError(f"onnxruntime cannot load the model: {err}") from err
        inputs = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        if inputs != [INPUT_NAME] or OUTPUT_NAMES[0] not in outputs:
            raise ModelError(
                f"model has inputs {inputs} and outputs {outputs}; expected input "
                f"{INPUT_NAME!r} and output {OUTPUT_NAMES[0]!r}"
            )
        self.info = ModelInfo.from_metadata(read_metadata(self._session))
        self.provider: str = self._session.get_providers()[0]
        self.max_run_batch = int(max_run_batch)
        self._observe = observe

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities of a batch of raw-pixel images.

        Thread-safe: onnxruntime sessions may be run from several threads at once.

        Parameters
        ----------
        images : numpy.ndarray
            uint8 or float ``(N, C, H, W)`` pixel values in ``[0, 255]`` (as
            :func:`decode_images` returns them), ``(C, H, W)`` the model's.

        Returns
        -------
        numpy.ndarray
            float32 ``(N, K)``; each row sums to 1.

        Raises
        ------
        InputError
            ``images`` does not have the model's ``(N, C, H, W)`` shape.
        """
        if images.ndim != 4 or tuple(images.shape[1:]) != self.info.shape:
            raise InputError(
                f"images have shape {list(images.shape)} but the model takes "
                f"[N, {', '.join(map(str, self.info.shape))}]"
            )
        n = images.shape[0]
        if n == 0:
            return np.empty((0, self.info.num_classes), dtype=np.float32)
        chunks = []
        for start in range(0, n, self.max_run_batch):
            chunk = np.ascontiguousarray(images[start : start + self.max_run_batch], np.float32)
            began = time.perf_counter()
            (probs,) = self._session.run([OUTPUT_NAMES[0]], {INPUT_NAME: chunk})
            if self._observe is not None:
                self._observe(time.perf_counter() - began, chunk.shape[0])
            chunks.append(probs)
        out = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        return np.asarray(out, dtype=np.float32)


class ModelCache:
    """LRU of :class:`OnnxModel` per job id; thread-safe.

    A model is loaded once even under concurrent first requests: the first caller loads
    it (outside the cache lock, so other jobs are served meanwhile) and the others wait
    for that load. A failed load is not cached; every waiter gets its exception and the
    next :meth:`get` tries again.

    Parameters
    ----------
    loader : callable
        ``loader(job_id) -> bytes``, the job's exported ONNX model. Its exceptions (e.g.
        the job does not exist) propagate from :meth:`get` unchanged.
    capacity : int, keyword-only
        Most models kept; the least recently used one is dropped beyond it.
    providers, observe, intra_op_threads
        Passed to every :class:`OnnxModel`.
    """

    def __init__(
        self,
        loader: Callable[[str], bytes],
        *,
        capacity: int = 8,
        providers: Providers | None = None,
        observe: Observer | None = None,
        intra_op_threads: int = 0,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._loader = loader
        self.capacity = int(capacity)
        self._providers = providers
        self._observe = observe
        self._threads = intra_op_threads
        self._lock = threading.Lock()
        self._models: OrderedDict[str, OnnxModel] = OrderedDict()
        self._loading: dict[str, Future[OnnxModel]] = {}

    def get(self, job_id: str) -> OnnxModel:
        """The job's model, loading it on first use.

        Parameters
        ----------
        job_id : str
            The job whose model to serve.

        Returns
        -------
        OnnxModel
        """
        with self._lock:
            model = self._models.get(job_id)
            if model is not None:
                self._models.move_to_end(job_id)
                return model
            pending = self._loading.get(job_id)
            owner = pending is None
            if pending is None:
                pending = self._loading[job_id] = Future()
        if not owner:
            return pending.result()
        try:
            model = OnnxModel(
                self._loader(job_id),
                providers=self._providers,
                observe=self._observe,
                intra_op_threads=self._threads,
            )
        except BaseException as err:
            with self._lock:
                if self._loading.get(job_id) is pending:
                    del self._loading[job_id]
            pending.set_exception(err)
            raise
        with self._lock:
            # evict() during the load means the job changed: serve, but do not keep.
            if self._loading.get(job_id) is pending:
                del self._loading[job_id]
                self._models[job_id] = model
                while len(self._models) > self.capacity:
                    self._models.popitem(last=False)
        pending.set_result(model)
        return model

    def evict(self, job_id: str) -> None:
        """Forget the job's model (a no-op when it is not cached).

        A load in progress still answers its callers but is not kept.

        Parameters
        ----------
        job_id : str
        """
        with self._lock:
            self._models.pop(job_id, None)
            self._loading.pop(job_id, None)

    def __contains__(self, job_id: object) -> bool:
        with self._lock:
            return job_id in self._models

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)


# --------------------------------------------------------------------------- label scores


@dataclass(frozen=True)
class LabelScores:
    """Per-image scores of given labels against a model's probabilities.

    Attributes
    ----------
    label_quality : numpy.ndarray
        float64 ``(N,)``, ``p(given label)`` in ``[0, 1]``; lower = more likely mislabelled.
    normalized_margin : numpy.ndarray
        float64 ``(N,)``, ``p(given) - max_{k != given} p(k)`` in ``[-1, 1]``; negative
        when the model prefers another class (``p(given)`` itself when ``K = 1``).
    predicted_label : numpy.ndarray
        int64 ``(N,)``, ``argmax_k p(k)`` (the first on ties).
    suspect : numpy.ndarray
        bool ``(N,)``, ``label_quality < cutoff``.
    """

    label_quality: np.ndarray
    normalized_margin: np.ndarray
    predicted_label: np.ndarray
    suspect: np.ndarray


def _check_probabilities(probabilities: np.ndarray) -> np.ndarray:
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 1:
        raise ValueError(f"probabilities must be (N, K) with K >= 1, got shape {probs.shape}")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probabilities contain NaN or infinite values")
    return probs


def _check_labels(labels: Sequence[int] | np.ndarray, n: int, k: int) -> np.ndarray:
    given = np.asarray(labels)
    if given.ndim != 1:
        raise InputError(f"labels must be a flat list, got shape {list(given.shape)}")
    if len(given) != n:
        raise InputError(f"{len(given)} labels for {n} images; send one label per image")
    if n and not np.issubdtype(given.dtype, np.integer):
        if given.dtype == np.bool_ or not np.issubdtype(given.dtype, np.number):
            raise InputError(f"labels must be integers, got {given.dtype}")
        whole = np.isfinite(given) & (given == np.round(given))
        if not whole.all():
            bad = int(np.flatnonzero(~whole)[0])
            raise InputError(f"labels[{bad}]: {given[bad].item()!r} is not an integer class index")
    given = given.astype(np.int64)
    outside = (given < 0) | (given >= k)
    if outside.any():
        bad = int(np.flatnonzero(outside)[0])
        raise InputError(
            f"labels[{bad}]: {int(given[bad])} is outside [0, {k}); the model has {k} classes"
        )
    return given


def score_labels(
    probabilities: np.ndarray, labels: Sequence[int] | np.ndarray, *, cutoff: float
) -> LabelScores:
    """Score given labels against predicted probabilities.

    Parameters
    ----------
    probabilities : numpy.ndarray
        float ``(N, K)``, rows summing to 1 (:meth:`OnnxModel.predict_proba`).
    labels : sequence of int or numpy.ndarray
        ``(N,)`` given class indices in ``[0, K)``.
    cutoff : float, keyword-only
        A label is suspect when its quality is below it; a job's calibrated value comes
        from :func:`suspect_cutoff`.

    Returns
    -------
    LabelScores

    Raises
    ------
    InputError
        The number of labels differs from ``N``, or a label is not an integer in
        ``[0, K)`` (the message names the first offending index and value).
    """
    probs = _check_probabilities(probabilities)
    n, k = probs.shape
    given = _check_labels(labels, n, k)
    rows = np.arange(n)
    quality = probs[rows, given]
    if k > 1:
        others = probs.copy()
        others[rows, given] = -np.inf
        margin = quality - others.max(axis=1)
    else:
        margin = quality.copy()
    return LabelScores(
        label_quality=quality,
        normalized_margin=margin,
        predicted_label=probs.argmax(axis=1).astype(np.int64),
        suspect=quality < float(cutoff),
    )
