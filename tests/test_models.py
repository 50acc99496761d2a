from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from noisescore.ml.models import ModelError, create_model


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", ["noisescore_cnn", "resnet18", "vit_tiny_patch16_224"])
def test_models_take_28px_images(name: str, in_chans: int) -> None:
    model = create_model(name, num_classes=8, in_chans=in_chans, img_size=28).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_chans, 28, 28))
    assert out.shape == (2, 8)


def test_resnet_stem_is_adapted_to_small_images() -> None:
    model = create_model("resnet18", num_classes=2, in_chans=1, img_size=28)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)  # type: ignore[union-attr]
    assert isinstance(model.maxpool, nn.Identity)
    large = create_model("resnet18", num_classes=2, in_chans=3, img_size=224)
    assert large.conv1.stride == (2, 2)  # type: ignore[union-attr]


def test_vit_uses_a_7x7_token_grid_at_28px() -> None:
    model = create_model("vit_tiny_patch16_224", num_classes=2, in_chans=1, img_size=28)
    assert model.patch_embed.grid_size == (7, 7)  # type: ignore[union-attr]


def test_local_checkpoint_is_loaded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = create_model("resnet18", num_classes=5, in_chans=3, img_size=224)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    # Different head size and channels: timm adapts conv1 and drops the classifier.
    model = create_model("resnet18", num_classes=2, in_chans=3, img_size=224, checkpoint=path)
    torch.testing.assert_close(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert model.fc.out_features == 2  # type: ignore[union-attr]


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        create_model(
            "resnet18", num_classes=2, in_chans=1, img_size=28, checkpoint=tmp_path / "nope.pth"
        )


def test_unknown_model_name_suggests_close_names() -> None:
    with pytest.raises(ModelError, match=r"unknown model 'resnet19'.*resnet18"):
        create_model("resnet19", num_classes=2, in_chans=1, img_size=28)


def test_model_names_without_the_training_runtime_are_checked_by_syntax(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from noisescore.ml import model_names
    from noisescore.settings import CleanSettings

    # With timm: the registry decides (noisescore_cnn is registered by noisescore).
    assert model_names.check_model_name("noisescore_cnn") == "noisescore_cnn"
    with pytest.raises(ModelError, match="not in timm's registry"):
        model_names.check_model_name("resnet19")
    # The service image (no torch/timm): syntax only; the worker checks the registry.
    monkeypatch.setattr(model_names, "training_runtime_available", lambda: False)
    for name in ("resnet19", "vit_tiny_patch16_224.augreg_in21k", "noisescore_cnn"):
        assert CleanSettings(model=name).model == name
    for bad in ("ResNet18", "hf-hub:timm/resnet18", "resnet 18", "", "resnet18.a.b"):
        with pytest.raises(ModelError, match="invalid model name"):
            model_names.check_model_name(bad)
