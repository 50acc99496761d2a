from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from noisescore.ml.export import ProbabilityModel, export_onnx, read_metadata
from noisescore.ml.metrics import suspect_cutoff
from noisescore.ml.models import create_model
from noisescore.service.inference import (
    MAX_IMAGE_PIXELS,
    EncodedImage,
    InputError,
    LabelScores,
    ModelCache,
    ModelError,
    ModelInfo,
    OnnxModel,
    TensorImage,
    decode_images,
    score_labels,
)

NUM_CLASSES = 3
IMG_SIZE = 28
GREY = ModelInfo(model="noisescore_cnn", num_classes=NUM_CLASSES, in_chans=1, img_size=IMG_SIZE)
RGB = ModelInfo(model="noisescore_cnn", num_classes=NUM_CLASSES, in_chans=3, img_size=IMG_SIZE)


class Exported:
    """A small trained-looking model, its torch reference and its ONNX bytes."""

    def __init__(self, in_chans: int, seed: int) -> None:
        torch.manual_seed(seed)
        model = create_model(
            "noisescore_cnn", num_classes=NUM_CLASSES, in_chans=in_chans, img_size=IMG_SIZE
        )
        with torch.no_grad():  # non-trivial BatchNorm running statistics
            model.train()
            for _ in range(3):
                model(torch.randn(16, in_chans, IMG_SIZE, IMG_SIZE))
        self.mean = [0.3 + 0.1 * c for c in range(in_chans)]
        self.std = [0.2 + 0.05 * c for c in range(in_chans)]
        self.onnx = export_onnx(
            model,
            model_name="noisescore_cnn",
            num_classes=NUM_CLASSES,
            in_chans=in_chans,
            img_size=IMG_SIZE,
            mean=self.mean,
            std=self.std,
        )
        self.reference = ProbabilityModel(model, mean=self.mean, std=self.std)

    def torch_proba(self, images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.reference(torch.from_numpy(images.astype(np.float32)))[0].numpy()


@pytest.fixture(scope="module")
def grey_model() -> Exported:
    return Exported(in_chans=1, seed=0)


@pytest.fixture(scope="module")
def rgb_model() -> Exported:
    return Exported(in_chans=3, seed=1)


def _encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kw)
    return buf.getvalue()


def _pixels(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` 8-bit grey pixels but holds almost none."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- ModelInfo


def test_model_info_from_exported_metadata(grey_model: Exported) -> None:
    assert ModelInfo.from_metadata(read_metadata(grey_model.onnx)) == GREY
    assert GREY.shape == (1, 28, 28)


def test_model_info_rejects_incomplete_metadata() -> None:
    with pytest.raises(ModelError, match=r"lacks \['img_size'\]"):
        ModelInfo.from_metadata({"model": "m", "num_classes": "3", "in_chans": "1"})
    with pytest.raises(ModelError, match="in_chans='x' is not a positive integer"):
        ModelInfo.from_metadata(
            {"model": "m", "num_classes": "3", "in_chans": "x", "img_size": "4"}
        )
    with pytest.raises(ModelError, match="format"):
        ModelInfo.from_metadata({"noisescore.format": "other.v9"})


# --------------------------------------------------------------------------- decoding


def test_decode_grey_png_exact() -> None:
    grey = _pixels((28, 28))
    out = decode_images([EncodedImage(_encode(grey, "PNG"))], GREY)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 28, 28)
    np.testing.assert_array_equal(out[0, 0], grey)


def test_decode_rgb_png_to_three_channels_exact() -> None:
    rgb = _pixels((28, 28, 3))
    out = decode_images([EncodedImage(_encode(rgb, "PNG"))], RGB)
    assert out.shape == (1, 3, 28, 28)
    np.testing.assert_array_equal(out[0], rgb.transpose(2, 0, 1))


def test_decode_jpeg_grey_and_rgb_as_pillow_decodes_them() -> None:
    grey_jpeg = _encode(_pixels((28, 28), 1), "JPEG", quality=90)
    rgb_jpeg = _encode(_pixels((28, 28, 3), 2), "JPEG", quality=90)
    out_grey = decode_images([EncodedImage(grey_jpeg)], GREY)
    out_rgb = decode_images([EncodedImage(rgb_jpeg)], RGB)
    np.testing.assert_array_equal(out_grey[0, 0], np.asarray(Image.open(io.BytesIO(grey_jpeg))))
    expected = np.asarray(Image.open(io.BytesIO(rgb_jpeg)).convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(out_rgb[0], expected)


def test_decode_converts_channels() -> None:
    rgb = _pixels((28, 28, 3), 3)
    grey = _pixels((28, 28), 4)
    to_grey = decode_images([EncodedImage(_encode(rgb, "PNG"))], GREY)
    # ITU-R 601-2 luma, as Pillow's convert("L")
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(to_grey[0, 0].astype(float) - luma).max() <= 1.0
    to_rgb = decode_images([EncodedImage(_encode(grey, "PNG"))], RGB)
    for channel in range(3):
        np.testing.assert_array_equal(to_rgb[0, channel], grey)
    rgba = np.dstack([rgb, np.full((28, 28), 7, np.uint8)])  # alpha is dropped
    out = decode_images([EncodedImage(_encode(rgba, "PNG"))], RGB)
    np.testing.assert_array_equal(out[0], rgb.transpose(2, 0, 1))


def test_decode_resizes_bilinear() -> None:
    big = _pixels((56, 40), 5)
    out = decode_images([EncodedImage(_encode(big, "BMP"))], GREY)
    expected = np.asarray(Image.fromarray(big).resize((28, 28), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out[0, 0], expected)
    flat = decode_images([EncodedImage(_encode(np.full((90, 90), 123, np.uint8), "PNG"))], GREY)
    assert np.all(flat == 123)


def test_decode_sixteen_bit_png_scaled_to_eight_bit() -> None:
    wide = np.zeros((28, 28), np.uint16)
    wide[0, :4] = [0, 257, 32896, 65535]
    wide[1:] = 257 * 200
    data = _encode(wide, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode_images([EncodedImage(data)], GREY)
    np.testing.assert_array_equal(out[0, 0, 0, :4], [0, 1, 128, 255])
    assert np.all(out[0, 0, 1:] == 200)


def test_decode_tensor_exact_and_mixed_with_encoded() -> None:
    tensor = _pixels((1, 28, 28), 6)
    grey = _pixels((28, 28), 7)
    out = decode_images(
        [TensorImage((1, 28, 28), tensor.tobytes()), EncodedImage(_encode(grey, "PNG"))], GREY
    )
    assert out.shape == (2, 1, 28, 28)
    np.testing.assert_array_equal(out[0], tensor)
    np.testing.assert_array_equal(out[1, 0], grey)
    rgb = _pixels((3, 28, 28), 8)
    np.testing.assert_array_equal(
        decode_images([TensorImage((3, 28, 28), rgb.tobytes())], RGB)[0], rgb
    )


def test_decode_errors_name_the_item() -> None:
    good = EncodedImage(_encode(_pixels((28, 28)), "PNG"))
    with pytest.raises(InputError, match=r"^no images$"):
        decode_images([], GREY)
    with pytest.raises(InputError, match=r"^images\[1\]: cannot decode 12 bytes as an image"):
        decode_images([good, EncodedImage(b"not an image")], GREY)
    truncated = EncodedImage(good.data[: len(good.data) // 2])
    with pytest.raises(InputError, match=r"^images\[2\]: cannot decode image"):
        decode_images([good, good, truncated], GREY)
    with pytest.raises(
        InputError, match=r"^images\[3\]: 3 channels but the model takes 1 \(expected shape"
    ):
        decode_images([good] * 3 + [TensorImage((3, 28, 28), bytes(3 * 28 * 28))], GREY)
    with pytest.raises(
        InputError,
        match=r"images\[0\]: tensor shape \[1, 32, 32\] but the model takes \[1, 28, 28\]",
    ):
        decode_images([TensorImage((1, 32, 32), bytes(32 * 32))], GREY)
    with pytest.raises(InputError, match=r"images\[0\]: tensor shape \[28, 28\] has 2 dimensions"):
        decode_images([TensorImage((28, 28), bytes(28 * 28))], GREY)
    with pytest.raises(
        InputError, match=r"images\[0\]: 783 bytes but shape \[1, 28, 28\] needs 784"
    ):
        decode_images([TensorImage((1, 28, 28), bytes(783))], GREY)


def test_decode_refuses_too_large_images_before_decompressing() -> None:
    side = 4097
    assert side * side > MAX_IMAGE_PIXELS
    with pytest.raises(
        InputError, match=r"^images\[1\]: image too large: 4097x4097 = 16785409 pixels"
    ):
        decode_images(
            [
                EncodedImage(_encode(_pixels((28, 28)), "PNG")),
                EncodedImage(_png_header(side, side)),
            ],
            GREY,
        )
    # Beyond Pillow's own bomb limit, refused while opening
    with pytest.raises(InputError, match=r"^images\[0\]: image too large"):
        decode_images([EncodedImage(_png_header(20000, 20000))], GREY)
    # A real (compressible) image over a smaller limit
    with pytest.raises(InputError, match=r"60x60 = 3600 pixels, more than the 2500 allowed"):
        decode_images(
            [EncodedImage(_encode(np.zeros((60, 60), np.uint8), "PNG"))], GREY, max_pixels=2500
        )


# --------------------------------------------------------------------------- OnnxModel


def test_predict_proba_matches_torch_single_and_chunked(grey_model: Exported) -> None:
    calls: list[int] = []
    seconds: list[float] = []

    def observe(elapsed: float, batch: int) -> None:
        seconds.append(elapsed)
        calls.append(batch)

    model = OnnxModel(
        grey_model.onnx, providers=["CPUExecutionProvider"], max_run_batch=128, observe=observe
    )
    assert model.info == GREY
    assert model.provider == "CPUExecutionProvider"

    one = _pixels((1, 1, 28, 28), 9)
    probs = model.predict_proba(one)
    assert probs.dtype == np.float32 and probs.shape == (1, NUM_CLASSES)
    np.testing.assert_allclose(probs, grey_model.torch_proba(one), atol=1e-4, rtol=0)
    assert calls == [1]

    calls.clear()
    many = _pixels((300, 1, 28, 28), 10)
    probs = model.predict_proba(many)
    assert probs.shape == (300, NUM_CLASSES)
    np.testing.assert_allclose(probs, grey_model.torch_proba(many), atol=1e-4, rtol=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert calls == [128, 128, 44]
    assert all(s > 0 for s in seconds)
    # float input gives the same answer as uint8
    np.testing.assert_allclose(
        model.predict_proba(many[:5].astype(np.float64)), probs[:5], atol=1e-6
    )


def test_predict_proba_rgb_and_shape_errors(rgb_model: Exported) -> None:
    model = OnnxModel(rgb_model.onnx, providers=["CPUExecutionProvider"])
    assert model.info == RGB
    images = decode_images([EncodedImage(_encode(_pixels((40, 40, 3), 11), "PNG"))] * 2, model.info)
    np.testing.assert_allclose(
        model.predict_proba(images), rgb_model.torch_proba(images), atol=1e-4, rtol=0
    )
    with pytest.raises(
        InputError, match=r"shape \[2, 1, 28, 28\] but the model takes \[N, 3, 28, 28\]"
    ):
        model.predict_proba(np.zeros((2, 1, 28, 28), np.uint8))
    assert model.predict_proba(np.zeros((0, 3, 28, 28), np.uint8)).shape == (0, NUM_CLASSES)


def test_onnx_model_rejects_bad_bytes() -> None:
    with pytest.raises(ModelError, match="onnxruntime cannot load the model"):
        OnnxModel(b"definitely not onnx", providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- ModelCache


class CountingLoader:
    def __init__(self, models: dict[str, bytes], delay: float = 0.0) -> None:
        self.models = models
        self.delay = delay
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, job_id: str) -> bytes:
        with self._lock:
            self.calls.append(job_id)
        time.sleep(self.delay)
        if job_id not in self.models:
            raise KeyError(job_id)
        return self.models[job_id]


def _run_threads(target: Callable[[], object], n: int) -> list[object]:
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def work(i: int) -> None:
        barrier.wait()
        try:
            results[i] = target()
        except Exception as err:  # collected and checked by the caller
            results[i] = err

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_cache_loads_once_under_concurrent_first_requests(grey_model: Exported) -> None:
    loader = CountingLoader({"job": grey_model.onnx}, delay=0.2)
    cache = ModelCache(loader, providers=["CPUExecutionProvider"])
    results = _run_threads(lambda: cache.get("job"), 8)
    assert loader.calls == ["job"]
    assert all(isinstance(r, OnnxModel) for r in results)
    assert all(r is results[0] for r in results)
    assert cache.get("job") is results[0] and loader.calls == ["job"]


def test_cache_failed_load_reaches_every_waiter_and_is_retried(grey_model: Exported) -> None:
    models: dict[str, bytes] = {}
    loader = CountingLoader(models, delay=0.2)
    cache = ModelCache(loader, providers=["CPUExecutionProvider"])
    results = _run_threads(lambda: cache.get("job"), 4)
    assert loader.calls == ["job"]
    assert all(isinstance(r, KeyError) for r in results)
    assert "job" not in cache
    models["job"] = grey_model.onnx
    assert isinstance(cache.get("job"), OnnxModel)
    assert loader.calls == ["job", "job"]


def test_cache_lru_eviction_at_capacity(grey_model: Exported, rgb_model: Exported) -> None:
    loader = CountingLoader({"a": grey_model.onnx, "b": rgb_model.onnx, "c": grey_model.onnx})
    cache = ModelCache(loader, capacity=2, providers=["CPUExecutionProvider"])
    a = cache.get("a")
    cache.get("b")
    assert cache.get("a") is a  # a is now the most recently used
    cache.get("c")  # evicts b
    assert len(cache) == 2 and "b" not in cache and "a" in cache and "c" in cache
    assert loader.calls == ["a", "b", "c"]
    assert cache.get("b").info == RGB  # reloaded, evicting a
    assert loader.calls == ["a", "b", "c", "b"]
    assert "a" not in cache
    cache.evict("c")
    cache.evict("never-loaded")
    assert "c" not in cache and len(cache) == 1


def test_cache_loads_other_jobs_while_one_is_slow(grey_model: Exported) -> None:
    release = threading.Event()

    def loader(job_id: str) -> bytes:
        if job_id == "slow":
            assert release.wait(timeout=20)
        return grey_model.onnx

    cache = ModelCache(loader, providers=["CPUExecutionProvider"])
    slow = threading.Thread(target=cache.get, args=("slow",))
    slow.start()
    try:
        assert isinstance(cache.get("fast"), OnnxModel)  # not blocked by "slow"
    finally:
        release.set()
        slow.join(timeout=20)
    assert "slow" in cache


# --------------------------------------------------------------------------- label scores

PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.1, 0.6, 0.3],
        [0.05, 0.15, 0.8],
        [0.4, 0.4, 0.2],
    ],
    dtype=np.float32,
)


def test_score_labels_hand_made() -> None:
    scores = score_labels(PROBS, [0, 2, 0, 1], cutoff=0.35)
    assert isinstance(scores, LabelScores)
    np.testing.assert_allclose(scores.label_quality, [0.7, 0.3, 0.05, 0.4], atol=1e-7)
    np.testing.assert_allclose(scores.normalized_margin, [0.5, -0.3, -0.75, 0.0], atol=1e-7)
    np.testing.assert_array_equal(scores.predicted_label, [0, 1, 2, 0])
    np.testing.assert_array_equal(scores.suspect, [False, True, True, False])
    assert scores.suspect.dtype == np.bool_
    assert np.all(np.abs(scores.normalized_margin) <= 1)
    assert not score_labels(PROBS, np.array([0, 2, 0, 1]), cutoff=0.0).suspect.any()


def test_score_labels_errors() -> None:
    with pytest.raises(InputError, match=r"labels\[2\]: 3 is outside \[0, 3\)"):
        score_labels(PROBS, [0, 1, 3, 0], cutoff=0.5)
    with pytest.raises(InputError, match=r"labels\[1\]: -1 is outside \[0, 3\)"):
        score_labels(PROBS, [0, -1, 2, 0], cutoff=0.5)
    with pytest.raises(InputError, match="3 labels for 4 images"):
        score_labels(PROBS, [0, 1, 2], cutoff=0.5)
    with pytest.raises(InputError, match=r"labels\[0\]: 0.5 is not an integer"):
        score_labels(PROBS, [0.5, 1, 2, 0], cutoff=0.5)


def test_suspect_cutoff_reproduces_planted_separation() -> None:
    rng = np.random.default_rng(12)
    n, k = 400, 4
    labels = rng.integers(0, k, n)
    flagged = rng.random(n) < 0.2
    # flagged labels get quality in [0.02, 0.30], the rest in [0.45, 0.98]
    quality = np.where(flagged, rng.uniform(0.02, 0.30, n), rng.uniform(0.45, 0.98, n))
    probs = rng.random((n, k)) + 1e-3
    probs[np.arange(n), labels] = 0
    probs *= ((1 - quality) / probs.sum(axis=1))[:, None]
    probs[np.arange(n), labels] = quality
    probs = probs.astype(np.float32)

    cutoff = suspect_cutoff(probs, labels, flagged)
    q = probs[np.arange(n), labels].astype(np.float64)
    assert q[flagged].max() < cutoff < q[~flagged].min()
    np.testing.assert_array_equal(score_labels(probs, labels, cutoff=cutoff).suspect, flagged)
    perm = rng.permutation(n)  # deterministic and order-free
    assert suspect_cutoff(probs[perm], labels[perm], flagged[perm]) == cutoff
    assert suspect_cutoff(probs, labels, flagged) == cutoff


def test_suspect_cutoff_without_flags_and_imperfect_flags() -> None:
    labels = np.array([0, 1, 2, 1])
    assert suspect_cutoff(PROBS, labels, np.zeros(4, bool)) == 0.0
    # qualities [0.7, 0.6, 0.8, 0.4], flags on 0.8 and 0.4: F1 is 2/3 at c = 0.5 (flags 0.4)
    # and at c = 1 (flags all), less in between; the tie goes to the smaller c.
    flagged = np.array([False, False, True, True])
    assert suspect_cutoff(PROBS, labels, flagged) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="flagged must have shape"):
        suspect_cutoff(PROBS, labels, np.zeros(3, bool))
