"""The streamed data path (noisescore.ml.streaming): the same batches and the same training
as the device-resident one, the placement decision, device-side resizing, and the
synthetic set the benchmark generates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from noisescore.cli import build_parser
from noisescore.ml import clean
from noisescore.ml.data import Dataset, Split
from noisescore.ml.streaming import (
    HostImages,
    StreamStats,
    choose_placement,
    images_like,
    make_images,
    placement,
)
from noisescore.ml.synthetic import BLOCK, synthetic_images, synthetic_labels
from noisescore.ml.train import DeviceImages, TrainConfig, Trainer, channel_stats
from noisescore.settings import CleanSettings

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _images(n: int = 300, size: int = 12, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8)


def _batches(n: int, batch_size: int, seed: int, device: torch.device) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    return list(torch.split(perm, batch_size))


def _same_batches(device: torch.device) -> None:
    images = _images()
    resident, streamed = DeviceImages(images, device), HostImages(images, device)
    assert resident.mean_list == streamed.mean_list
    assert resident.std_list == streamed.std_list
    batches = _batches(len(images), 64, seed=3, device=device)  # last batch partial: 44
    pairs = list(zip(resident.iter_batches(batches), streamed.iter_batches(batches), strict=True))
    assert len(pairs) == 5
    for (idx_a, x_a), (idx_b, x_b) in pairs:
        assert torch.equal(idx_a, idx_b)
        assert x_a.dtype == x_b.dtype == torch.float32 and x_a.device == x_b.device
        assert x_a.is_contiguous(memory_format=torch.channels_last) == (
            x_b.is_contiguous(memory_format=torch.channels_last)
        )
        assert torch.equal(x_a, x_b)
    assert torch.equal(resident.batch(slice(10, 20)), streamed.batch(slice(10, 20)))
    assert torch.equal(resident.batch(batches[0]), streamed.batch(batches[0]))
    stats = streamed.stream_stats
    assert (stats.batches, stats.samples) == (5, len(images))
    assert stats.stall_seconds >= 0 and stats.host_seconds > 0


def test_stream_gives_the_device_resident_batches() -> None:
    _same_batches(CPU)


@needs_cuda
def test_stream_gives_the_device_resident_batches_on_cuda() -> None:
    _same_batches(torch.device("cuda"))


@needs_cuda
def test_cuda_stream_survives_a_consumer_that_stops_early() -> None:
    device = torch.device("cuda")
    images = _images(n=512)
    streamed, resident = HostImages(images, device), DeviceImages(images, device)
    batches = _batches(len(images), 64, seed=0, device=device)
    for k, (_, _x) in enumerate(streamed.iter_batches(batches)):
        if k == 2:
            break
    for (_, x_a), (_, x_b) in zip(
        resident.iter_batches(batches), streamed.iter_batches(batches), strict=True
    ):
        assert torch.equal(x_a, x_b)


class _Tiny(torch.nn.Module):
    def __init__(self, d: int, c: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten()
        )
        self.fc = torch.nn.Linear(4 * (d - 2) ** 2, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.net(x))


def test_an_epoch_on_streamed_data_gives_the_same_weights() -> None:
    images = _images(n=200, size=8)
    labels = np.random.default_rng(1).integers(0, 3, len(images))
    config = TrainConfig(epochs=2, batch_size=32, lr=1e-2, seed=5, augment=True)
    states = []
    for source in (DeviceImages(images, CPU), HostImages(images, CPU)):
        torch.manual_seed(0)
        trainer = Trainer(_Tiny(8, 3), source, labels, config=config)
        history = trainer.fit()
        states.append((trainer.model.state_dict(), [h.loss for h in history]))
    (a, loss_a), (b, loss_b) = states
    assert loss_a == loss_b
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


def _toy_data(settings: CleanSettings) -> clean.PreparedData:
    rng = np.random.default_rng(0)
    true = rng.integers(0, 2, 240)
    base = np.where(true[:, None, None, None] == 1, 190, 60)
    images = np.clip(base + rng.normal(0, 30, (240, 1, 16, 16)), 0, 255).astype(np.uint8)
    split = Split(images, true, None, np.array([f"toy/{i}" for i in range(240)]))
    test = Split(images[:50], true[:50], None, np.array([f"t/{i}" for i in range(50)]))
    return clean.add_noise(Dataset("toy", "toy.npz", 2, split, None, test), settings)


def test_the_clean_stages_give_the_same_results_in_either_placement() -> None:
    """Warm-up trust, weights and test predictions: placement is not in the fingerprint
    because it changes nothing."""
    common = {
        "dataset": "toy.npz", "noise": "symmetric:0.2", "epochs": 2, "warmup_epochs": 2,
        "lr": 1e-2, "batch_size": 32, "device": "cpu", "detectors": "linc",
    }  # fmt: skip
    results = []
    for where in ("device", "stream"):
        settings = CleanSettings(**common, data_placement=where)  # type: ignore[arg-type]
        data = _toy_data(settings)
        trainer = clean._trainer(
            data, settings, data.train_labels, hooks=[], progress=False, desc="t"
        )
        assert isinstance(trainer.images, HostImages if where == "stream" else DeviceImages)
        warmup = clean.linc_warmup(data, settings)
        run = clean.train_final(data, settings, warmup, clean.correct(warmup, settings))
        assert isinstance(run.images, HostImages if where == "stream" else DeviceImages)
        assert data.dataset.test is not None
        proba = clean.predict_split(run, data.dataset.test)
        results.append((warmup, proba, clean.warmup_fingerprint(settings, data)))
    (w_a, p_a, f_a), (w_b, p_b, f_b) = results
    assert f_a == f_b
    np.testing.assert_array_equal(w_a.trust_by_epoch, w_b.trust_by_epoch)
    for name, value in w_a.trainer_state["model"].items():
        assert torch.equal(value, w_b.trainer_state["model"][name]), name
    np.testing.assert_array_equal(p_a, p_b)


def test_channel_stats_are_exact_and_chunk_independent() -> None:
    images = _images(n=97, size=9)
    data = torch.from_numpy(images)
    whole = channel_stats(data)
    assert channel_stats(data, chunk_elements=1) == whole  # one image at a time
    assert channel_stats(data, chunk_elements=1000) == whole
    as_float = data.double().div(255)
    np.testing.assert_allclose(whole[0], as_float.mean(dim=(0, 2, 3)).numpy(), rtol=1e-12)
    np.testing.assert_allclose(whole[1], as_float.std(dim=(0, 2, 3)).numpy(), rtol=1e-12)
    flat = torch.full((4, 1, 3, 3), 7, dtype=torch.uint8)
    assert channel_stats(flat) == ([7 / 255], [1e-3])  # constant: the std floor
    with pytest.raises(ValueError, match="zero images"):
        channel_stats(data[:0])
    with pytest.raises(ValueError, match="uint8"):
        channel_stats(data.float())


def test_placement_decision() -> None:
    cuda = torch.device("cuda")
    assert placement(10**15, CPU) == "device"  # the data is in the memory the model uses
    assert placement(500, cuda, 0.5, total_memory=1000) == "device"
    assert placement(501, cuda, 0.5, total_memory=1000) == "stream"
    assert placement(1000, cuda, 1.0, total_memory=1000) == "device"
    assert placement(101, cuda, 0.1, total_memory=1000) == "stream"
    assert choose_placement("auto", 501, cuda, 0.5, total_memory=1000) == "stream"
    assert choose_placement("device", 10**15, cuda, 0.5, total_memory=1000) == "device"
    assert choose_placement("stream", 1, CPU) == "stream"
    assert isinstance(make_images(_images(), CPU), DeviceImages)  # auto on CPU
    streamed = make_images(_images(), CPU, placement="stream")
    assert isinstance(streamed, HostImages)
    held = images_like(streamed, _images(n=10, seed=1))
    assert isinstance(held, HostImages) and held.mean_list == streamed.mean_list


@pytest.mark.parametrize("share", [0, -0.1, 1.01, 2, float("nan")])
def test_a_share_outside_zero_one_is_refused(share: float) -> None:
    with pytest.raises(ValueError, match=r"device_memory_share must lie in \(0, 1\]"):
        placement(1, torch.device("cuda"), share, total_memory=10)
    with pytest.raises(ValidationError, match="device_memory_share"):
        CleanSettings(device_memory_share=share)


def test_a_boolean_share_is_refused() -> None:
    with pytest.raises(ValueError, match=r"device_memory_share must lie in \(0, 1\], got True"):
        placement(1, torch.device("cuda"), True, total_memory=10)


def test_an_unknown_placement_is_refused() -> None:
    with pytest.raises(ValueError, match="data_placement must be one of auto, device, stream"):
        choose_placement("host", 1, CPU)
    with pytest.raises(ValidationError, match="data_placement"):
        CleanSettings(data_placement="host")  # type: ignore[arg-type]
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["clean", "--data-placement", "host"])


def test_cli_flags_reach_the_settings() -> None:
    from noisescore.cli import _settings

    args = build_parser().parse_args(
        ["clean", "--data-placement", "stream", "--device-memory-share", "0.25"]
    )
    settings = _settings(args)
    assert (settings.data_placement, settings.device_memory_share) == ("stream", 0.25)
    assert CleanSettings().data_placement == "auto"
    assert CleanSettings().device_memory_share == 0.5
    active = build_parser().parse_args(["active-clean", "--data-placement", "device"])
    assert active.data_placement == "device"


def test_resize_on_the_device() -> None:
    images = _images(n=20, size=16)
    stats = HostImages(images, CPU)
    shrunk = HostImages(images, CPU, resize_to=8)
    grown = HostImages(images, CPU, resize_to=24)
    assert shrunk.mean_list == stats.mean_list  # the stored images' statistics
    idx = torch.arange(20)
    x = shrunk.batch(idx)
    assert x.shape == (20, 3, 8, 8) and shrunk.image_size == (8, 8)
    assert grown.batch(idx).shape == (20, 3, 24, 24)
    (_, streamed), *_ = shrunk.iter_batches([idx])
    assert torch.equal(streamed, x)
    # Bilinear with antialiasing: a 2x shrink is a local average, so the per-image
    # channel means survive and the values stay within the input's range.
    full = stats.batch(idx)
    torch.testing.assert_close(x.mean(dim=(2, 3)), full.mean(dim=(2, 3)), atol=0.02, rtol=0)
    assert x.min() >= full.min() - 1e-5 and x.max() <= full.max() + 1e-5
    assert x.std() < full.std()  # smoothing lowers pixel noise
    flat = HostImages(np.full((2, 1, 10, 10), 90, np.uint8), CPU, mean=[0.2], std=[0.5])
    torch.testing.assert_close(
        HostImages(flat.data.numpy(), CPU, mean=[0.2], std=[0.5], resize_to=4).batch(slice(0, 2)),
        torch.full((2, 1, 4, 4), (90 / 255 - 0.2) / 0.5),
    )
    with pytest.raises(ValueError, match="resize_to must be a positive integer"):
        HostImages(images, CPU, resize_to=0)


def test_stream_stats_busy_share() -> None:
    stats = StreamStats(batches=3, samples=30, host_seconds=0.5, stall_seconds=0.25)
    assert stats.busy_share(1.0) == 0.75
    assert StreamStats().busy_share(2.0) == 1.0
    with pytest.raises(ValueError, match="step_seconds must be > 0"):
        stats.busy_share(0)


def test_host_images_refuse_what_device_images_refuse() -> None:
    with pytest.raises(ValueError, match=r"uint8 of shape \(N, C, H, W\)"):
        HostImages(np.zeros((4, 8, 8), np.uint8), CPU)
    with pytest.raises(ValueError, match=r"uint8 of shape \(N, C, H, W\)"):
        HostImages(np.zeros((4, 1, 8, 8), np.float32), CPU)


def test_host_images_use_a_read_only_memory_map_in_place(tmp_path) -> None:
    path = tmp_path / "images.npy"
    np.save(path, _images(n=40))
    mapped = np.load(path, mmap_mode="r")
    streamed = HostImages(mapped, CPU)
    resident = DeviceImages(np.asarray(mapped), CPU)
    assert torch.equal(streamed.batch(slice(0, 40)), resident.batch(slice(0, 40)))


def test_synthetic_set_is_deterministic_and_shaped() -> None:
    images, labels = synthetic_images(300, n_classes=4, image_size=16, seed=7)
    assert images.shape == (300, 3, 16, 16) and images.dtype == np.uint8
    assert labels.shape == (300,) and labels.dtype == np.int64
    assert set(labels.tolist()) == {0, 1, 2, 3}
    assert np.bincount(labels[:BLOCK]).tolist() == [BLOCK // 4] * 4  # balanced per block
    again, labels_again = synthetic_images(300, n_classes=4, image_size=16, seed=7)
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, labels_again)
    longer, longer_labels = synthetic_images(600, n_classes=4, image_size=16, seed=7)
    np.testing.assert_array_equal(longer[:300], images)  # a smaller set is a prefix
    np.testing.assert_array_equal(synthetic_labels(600, n_classes=4, seed=7), longer_labels)
    other, _ = synthetic_images(300, n_classes=4, image_size=16, seed=8)
    assert not np.array_equal(other, images)
    out = np.zeros((300, 1, 16, 16), np.uint8)
    written, _ = synthetic_images(300, n_classes=4, image_size=16, channels=1, seed=7, out=out)
    assert written is out and out.any()
    with pytest.raises(ValueError, match="out must be uint8 of shape"):
        synthetic_images(10, image_size=16, out=np.zeros((10, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="n_classes must be an integer >= 2"):
        synthetic_images(10, n_classes=1)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        synthetic_images(10, image_size=16, channels=2)


def test_synthetic_classes_differ_in_orientation() -> None:
    """Class 0's grating runs along x, class K/2's along y: horizontal vs vertical
    gradients tell them apart (something for a network to learn)."""
    images, labels = synthetic_images(400, n_classes=4, image_size=32, channels=1, seed=0)
    x = images[:, 0].astype(np.float64)
    dx = np.abs(np.diff(x, axis=2)).mean(axis=(1, 2))
    dy = np.abs(np.diff(x, axis=1)).mean(axis=(1, 2))
    along = dx - dy
    assert along[labels == 0].min() > 0 > along[labels == 2].max()


def test_bench_stream_writes_its_report(tmp_path) -> None:
    """bench/bench_stream.py end to end at a toy size (no assertion on speed)."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "bench_stream.py"
    spec = importlib.util.spec_from_file_location("bench_stream", script)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(
        ["--samples", "128", "--image-size", "16", "--classes", "4", "--model",
         "noisescore_cnn", "--batch-size", "32", "--steps", "2", "--warmup-steps", "1",
         "--repeats", "2", "--device", "cpu", "--out-dir", str(tmp_path)]
    )  # fmt: skip
    stream, device = result["runs"]["stream"], result["runs"]["device"]
    assert stream["samples"] == device["samples"] == 64
    assert stream["epoch_loss"] == device["epoch_loss"]  # the same training
    assert 0 <= stream["busy_share"] <= 1
    assert len(result["repeats"]["stream"]) == len(result["repeats"]["device"]) == 2
    assert len(result["stream_to_device_by_repeat"]) == 2 and result["stream_to_device"] > 0
    saved = json.loads((tmp_path / "stream.json").read_text())
    assert saved["environment"]["device"].startswith("cpu")
    assert "| stream |" in (tmp_path / "stream.md").read_text()


def test_active_learner_streams_when_asked() -> None:
    from noisescore.ml.active import Learner
    from noisescore.settings import ActiveSettings

    settings = ActiveSettings(
        dataset="toy.npz",
        epochs=1,
        batch_size=32,
        device="cpu",
        data_placement="stream",
        forget_rate=0.2,
    )
    data = _toy_data(CleanSettings(dataset="toy.npz", device="cpu"))
    learner = Learner(data, settings)
    assert isinstance(learner.train_images, HostImages)
    assert isinstance(learner.test[0], HostImages)
    indices = np.arange(120)
    phase = learner.fit(indices, data.train_labels[indices], epochs=1, round=0, n_relabelled=0)
    assert phase.epochs == 1
    proba, features = learner.embed(indices[:10])
    assert proba.shape == (10, 2) and features.shape[0] == 10
