from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from noisescore.ml.export import (
    ONNX_FORMAT,
    PARITY_TOLERANCE,
    ExportError,
    ParityReport,
    ProbabilityModel,
    check_parity,
    export_onnx,
    export_with_parity,
    load_session,
    onnx_providers,
    read_metadata,
)
from noisescore.ml.models import create_model

NUM_CLASSES = 3
IMG_SIZE = 28


def _images(n: int, in_chans: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images whose class is visible: a bright square in one of three places."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    images = rng.integers(0, 90, (n, in_chans, IMG_SIZE, IMG_SIZE)).astype(np.uint8)
    for i, y in enumerate(labels):
        top = 4 + 7 * int(y)
        images[i, :, top : top + 7, top : top + 7] = rng.integers(170, 256)
    return images, labels


def _stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    scaled = images.astype(np.float64) / 255
    return scaled.mean(axis=(0, 2, 3)).tolist(), scaled.std(axis=(0, 2, 3)).tolist()


def _export(model: nn.Module, in_chans: int, mean: list[float], std: list[float], **kw) -> bytes:
    return export_onnx(
        model,
        model_name="noisescore_cnn",
        num_classes=NUM_CLASSES,
        in_chans=in_chans,
        img_size=IMG_SIZE,
        mean=mean,
        std=std,
        **kw,
    )


def _torch_outputs(
    model: nn.Module, images: np.ndarray, mean: list[float], std: list[float]
) -> tuple[np.ndarray, np.ndarray]:
    wrapper = ProbabilityModel(copy.deepcopy(model).cpu().float(), mean=mean, std=std)
    with torch.no_grad():
        probs, logits = wrapper(torch.from_numpy(images.astype(np.float32)))
    return probs.numpy(), logits.numpy()


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, np.ndarray, list[float], list[float]]:
    """noisescore_cnn after a few Adam steps: confident outputs, moved BatchNorm stats."""
    torch.manual_seed(0)
    images, labels = _images(256, in_chans=1)
    mean, std = _stats(images)
    model = create_model("noisescore_cnn", num_classes=NUM_CLASSES, in_chans=1, img_size=IMG_SIZE)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = (torch.from_numpy(images).float() / 255 - mean[0]) / std[0]
    y = torch.from_numpy(labels)
    model.train()
    for step in range(30):
        idx = torch.arange(step * 32, step * 32 + 32) % len(x)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    test_images, _ = _images(64, in_chans=1, seed=1)
    return model, test_images, mean, std


@pytest.mark.parametrize("in_chans", [1, 3])
def test_export_matches_torch_for_any_batch_size(in_chans: int) -> None:
    torch.manual_seed(in_chans)
    model = create_model(
        "noisescore_cnn", num_classes=NUM_CLASSES, in_chans=in_chans, img_size=IMG_SIZE
    ).eval()
    images, _ = _images(64, in_chans)
    mean, std = _stats(images)
    data = _export(model, in_chans, mean, std, metadata={"dataset": "synthetic", "run": "r1"})
    onnx.checker.check_model(data)
    proto = onnx.load_from_string(data)
    assert not any(  # weights are embedded, not in external files
        init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer
    )
    session = load_session(data)
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["probabilities", "logits"]
    assert session.get_inputs()[0].type == "tensor(float)"
    assert session.get_inputs()[0].shape[1:] == [in_chans, IMG_SIZE, IMG_SIZE]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # dynamic batch

    for n in (1, 7, 64):
        batch = images[:n]
        probs, logits = session.run(None, {"images": batch.astype(np.float32)})
        want_probs, want_logits = _torch_outputs(model, batch, mean, std)
        assert probs.shape == logits.shape == (n, NUM_CLASSES)
        assert probs.dtype == logits.dtype == np.float32
        np.testing.assert_allclose(probs, want_probs, atol=PARITY_TOLERANCE, rtol=0)
        np.testing.assert_allclose(logits, want_logits, atol=PARITY_TOLERANCE, rtol=0)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    meta = read_metadata(session)
    assert meta == read_metadata(data) == read_metadata(proto)
    assert meta["noisescore.format"] == ONNX_FORMAT
    assert meta["model"] == "noisescore_cnn"
    assert (meta["num_classes"], meta["in_chans"], meta["img_size"]) == ("3", str(in_chans), "28")
    assert json.loads(meta["mean"]) == pytest.approx(mean)
    assert json.loads(meta["std"]) == pytest.approx(std)
    assert (meta["dataset"], meta["run"]) == ("synthetic", "r1")


def test_trained_model_keeps_parity_and_is_not_modified(trained) -> None:
    model, images, mean, std = trained
    bn = model.features[0][1]
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    model.train()
    model = model.to(memory_format=torch.channels_last)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    device = next(model.parameters()).device

    data, report = export_with_parity(
        model,
        model_name="noisescore_cnn",
        num_classes=NUM_CLASSES,
        in_chans=1,
        img_size=IMG_SIZE,
        mean=mean,
        std=std,
        images=images,
    )

    assert isinstance(report, ParityReport)
    assert report.passed and report.max_abs_diff <= PARITY_TOLERANCE
    assert report.batch_size == 64 and report.provider == "CPUExecutionProvider"
    assert report.as_dict() == {
        "max_abs_diff": report.max_abs_diff,
        "batch_size": 64,
        "tolerance": PARITY_TOLERANCE,
        "passed": True,
        "provider": "CPUExecutionProvider",
    }
    # The model is confident, so parity is not just two near-uniform outputs agreeing.
    probs = load_session(data).run(["probabilities"], {"images": images.astype(np.float32)})[0]
    assert probs.max(axis=1).mean() > 0.6

    assert model.training and all(m.training for m in model.modules())
    assert next(model.parameters()).device == device
    assert model.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_parity_check_detects_a_mismatch(trained) -> None:
    model, images, mean, std = trained
    data = _export(model, 1, mean, std)
    wrong_mean, wrong_std = [mean[0] + 0.2], [std[0] * 2]

    report = check_parity(data, model, images, mean=wrong_mean, std=wrong_std)
    assert not report.passed and report.max_abs_diff > 100 * PARITY_TOLERANCE
    assert check_parity(data, model, images, mean=mean, std=std).passed

    other = create_model("noisescore_cnn", num_classes=NUM_CLASSES, in_chans=1, img_size=IMG_SIZE)
    assert not check_parity(data, other, images, mean=mean, std=std).passed

    with pytest.raises(ExportError, match=r"max \|p_onnx - p_torch\| = .* > tolerance 1e-10"):
        export_with_parity(
            model,
            model_name="noisescore_cnn",
            num_classes=NUM_CLASSES,
            in_chans=1,
            img_size=IMG_SIZE,
            mean=mean,
            std=std,
            images=images,
            tolerance=1e-10,  # below float32 rounding: the check must fail, and say so
        )


def test_resnet18_at_28px_exports_with_parity() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=NUM_CLASSES, in_chans=1, img_size=IMG_SIZE)
    images, _ = _images(16, in_chans=1)
    mean, std = _stats(images)
    data, report = export_with_parity(
        model,
        model_name="resnet18",
        num_classes=NUM_CLASSES,
        in_chans=1,
        img_size=IMG_SIZE,
        mean=mean,
        std=std,
        images=images,
        metadata={"run": "resnet"},
    )
    assert report.passed
    assert read_metadata(data)["model"] == "resnet18"
    assert model.training  # create_model returns a training-mode model; export leaves it so


def test_bad_arguments_are_refused_with_the_fix() -> None:
    model = create_model("noisescore_cnn", num_classes=NUM_CLASSES, in_chans=1, img_size=IMG_SIZE)
    with pytest.raises(ValueError, match="in_chans=1"):
        _export(model, 1, [0.5, 0.5], [0.2, 0.2])
    with pytest.raises(ValueError, match="std"):
        _export(model, 1, [0.5], [0.0])
    with pytest.raises(ValueError, match="written by export_onnx"):
        _export(model, 1, [0.5], [0.2], metadata={"model": "other"})
    with pytest.raises(ValueError, match="must be str"):
        _export(model, 1, [0.5], [0.2], metadata={"epochs": 3})  # type: ignore[dict-item]


def test_parity_check_refuses_images_of_the_wrong_shape(trained) -> None:
    model, images, mean, std = trained
    data = _export(model, 1, mean, std)
    with pytest.raises(ValueError, match="uint8"):
        check_parity(data, model, images.astype(np.float32), mean=mean, std=std)
    rgb = np.repeat(images, 3, axis=1)
    with pytest.raises(ValueError, match="the model takes"):
        check_parity(data, model, rgb, mean=mean, std=std)


def test_export_is_quiet(capfd: pytest.CaptureFixture[str]) -> None:
    model = create_model("noisescore_cnn", num_classes=2, in_chans=1, img_size=IMG_SIZE)
    export_onnx(
        model,
        model_name="noisescore_cnn",
        num_classes=2,
        in_chans=1,
        img_size=28,
        mean=[0.5],
        std=[0.2],
    )
    assert "[torch.onnx]" not in capfd.readouterr().out


def test_onnx_providers_on_this_machine() -> None:
    import onnxruntime as ort

    providers = onnx_providers()
    assert providers[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        assert providers == ["CPUExecutionProvider"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_exports_from_a_cpu_copy(trained) -> None:
    model, images, mean, std = trained
    cuda_model = create_model(
        "noisescore_cnn", num_classes=NUM_CLASSES, in_chans=1, img_size=IMG_SIZE
    )
    cuda_model.load_state_dict(model.state_dict())
    cuda_model = cuda_model.cuda().to(memory_format=torch.channels_last)
    _, report = export_with_parity(
        cuda_model,
        model_name="noisescore_cnn",
        num_classes=NUM_CLASSES,
        in_chans=1,
        img_size=IMG_SIZE,
        mean=mean,
        std=std,
        images=images,
    )
    assert report.passed
    assert next(cuda_model.parameters()).is_cuda
