from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from noisescore.ml import clean
from noisescore.ml.clean import PreparedData
from noisescore.ml.data import Dataset, Split
from noisescore.ml.linc import LiNC, alpha_gradient, linc_targets
from noisescore.ml.train import DeviceImages, TrainConfig, Trainer
from noisescore.settings import CleanSettings


def autograd_alpha_grad(
    logits: torch.Tensor, labels: torch.Tensor, alpha: torch.Tensor, reduction: str
) -> torch.Tensor:
    alpha = alpha.clone().requires_grad_(True)
    onehot = F.one_hot(labels, logits.shape[1]).float()
    log_probs = F.log_softmax(logits, dim=1)
    per_sample = -(linc_targets(log_probs, onehot, alpha) * log_probs).sum(dim=1)
    loss = per_sample.mean() if reduction == "mean" else per_sample.sum()
    (grad,) = torch.autograd.grad(loss, alpha)
    return grad


@pytest.mark.parametrize("reduction", ["mean", "sample"])
@pytest.mark.parametrize("n_classes", [2, 8])
def test_manual_alpha_gradient_equals_autograd(reduction: str, n_classes: int) -> None:
    gen = torch.Generator().manual_seed(n_classes)
    logits = torch.randn(64, n_classes, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, n_classes, (64,), generator=gen)
    alpha = torch.rand(64, generator=gen, dtype=torch.float64)
    manual = alpha_gradient(
        F.log_softmax(logits, dim=1),
        F.one_hot(labels, n_classes).double(),
        reduction=reduction,  # type: ignore[arg-type]
    )
    torch.testing.assert_close(manual, autograd_alpha_grad(logits, labels, alpha, reduction))


def test_gradient_sign_lowers_trust_when_model_disagrees() -> None:
    log_probs = torch.log(torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    onehot = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    grad = alpha_gradient(log_probs, onehot, reduction="sample")
    assert grad[0] < 0 < grad[1]  # agrees: alpha rises; disagrees: alpha falls


class Memo(nn.Module):
    """A tiny linear model on flattened pixels: enough to learn separable toy data."""

    def __init__(self, d: int, c: int):
        super().__init__()
        self.fc = nn.Linear(d, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def toy_problem(n: int = 400, flip: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 2, n)
    images = np.where(true[:, None, None, None] == 1, 200, 50).astype(np.int64)
    images = np.clip(images + rng.normal(0, 30, (n, 1, 4, 4)), 0, 255).astype(np.uint8)
    flipped = rng.random(n) < flip
    noisy = np.where(flipped, 1 - true, true)
    return images, true, noisy, flipped


@pytest.mark.parametrize("alpha_grad", ["mean", "sample"])
def test_linc_hook_results(alpha_grad: str) -> None:
    images, true, noisy, flipped = toy_problem()
    torch.manual_seed(0)
    hook = LiNC(2, warmup_epochs=5, alpha_grad=alpha_grad)  # type: ignore[arg-type]
    trainer = Trainer(
        Memo(16, 2),
        DeviceImages(images, torch.device("cpu")),
        noisy,
        config=TrainConfig(epochs=7, lr=1e-2, batch_size=32),
        hooks=[hook],
    )
    history = trainer.fit()
    assert len(history) == 7
    assert hook.trust_by_epoch_.shape == (5, 400)
    assert np.all((hook.trust_by_epoch_ >= 0) & (hook.trust_by_epoch_ <= 1))
    np.testing.assert_array_equal(hook.trust_, hook.trust_by_epoch_[-1])
    np.testing.assert_array_equal(hook.flagged_, hook.trust_ < hook.otsu_threshold_)
    # Trust ranks the flipped labels low on this separable problem.
    from noisescore.ml.metrics import detection_auroc

    assert detection_auroc(hook.trust_, flipped) > 0.9
    # Correction: flagged samples take the model's argmax, the rest keep their label.
    np.testing.assert_array_equal(
        hook.corrected_labels_, np.where(hook.flagged_, hook.predicted_labels_, noisy)
    )
    assert (hook.corrected_labels_ == true).mean() > (noisy == true).mean()
    # After warm-up the loop trains on the corrected labels and alpha is frozen.
    np.testing.assert_array_equal(trainer.labels.numpy(), hook.corrected_labels_)
    assert hook.alpha is not None
    np.testing.assert_array_equal(hook.alpha.numpy(), hook.trust_)
    assert "trust_mean" in history[0].extra and "trust_mean" not in history[-1].extra


def test_predicted_labels_are_the_models_argmax() -> None:
    images, _, noisy, _ = toy_problem(n=100)
    hook = LiNC(2, warmup_epochs=2)
    trainer = Trainer(
        Memo(16, 2),
        DeviceImages(images, torch.device("cpu")),
        noisy,
        config=TrainConfig(epochs=2, lr=1e-2, batch_size=32),
        hooks=[hook],
    )
    trainer.fit()
    expected = trainer.predict_logits(trainer.images).argmax(1).numpy()
    np.testing.assert_array_equal(hook.predicted_labels_, expected)


def test_alpha_is_clipped_to_unit_interval() -> None:
    images, _, noisy, _ = toy_problem(n=64)
    hook = LiNC(2, warmup_epochs=3, alpha_lr=100.0, alpha_grad="sample")
    trainer = Trainer(
        Memo(16, 2),
        DeviceImages(images, torch.device("cpu")),
        noisy,
        config=TrainConfig(epochs=3, lr=1e-2, batch_size=16),
        hooks=[hook],
    )
    trainer.fit()
    assert hook.trust_by_epoch_.min() >= 0.0 and hook.trust_by_epoch_.max() <= 1.0
    assert set(np.unique(hook.trust_)) <= {0.0, 1.0}  # a huge rate saturates


def test_warmup_longer_than_training_is_rejected() -> None:
    images, _, noisy, _ = toy_problem(n=32)
    trainer = Trainer(
        Memo(16, 2),
        DeviceImages(images, torch.device("cpu")),
        noisy,
        config=TrainConfig(epochs=2),
        hooks=[LiNC(2, warmup_epochs=3)],
    )
    with pytest.raises(ValueError, match="warmup_epochs"):
        trainer.fit()


# --------------------------------------------------------------------------- phases


def _phase_setup() -> tuple[PreparedData, CleanSettings]:
    images, true, _, _ = toy_problem()
    images = images.repeat(4, axis=2).repeat(4, axis=3)  # 16 px: enough for the default CNN
    ids = np.array([f"toy/{i}" for i in range(len(true))])
    dataset = Dataset("toy", "toy.npz", 2, Split(images, true, None, ids), None, None)
    settings = CleanSettings(
        dataset="toy.npz", noise="symmetric:0.2", epochs=6, warmup_epochs=3, lr=1e-2,
        batch_size=32, device="cpu", augment=True,
    )  # fmt: skip
    return clean.add_noise(dataset, settings), settings


def test_phases_through_a_checkpoint_equal_one_uninterrupted_run() -> None:
    """warm-up -> checkpoint bytes -> Otsu -> final == one LiNC fit, bit for bit."""
    data, settings = _phase_setup()
    fingerprint = clean.warmup_fingerprint(settings, data)
    blob = clean.linc_warmup(data, settings).to_bytes(fingerprint=fingerprint)
    restored = clean.Warmup.from_bytes(blob, fingerprint=fingerprint)
    correction = clean.correct(restored)
    run = clean.train_final(data, settings, restored, correction)

    hook = LiNC(2, warmup_epochs=3)
    whole = clean._trainer(
        data, settings, data.train_labels, hooks=[hook], progress=False, desc="whole"
    )
    whole.fit()
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, run.model.state_dict()[name]), name
    np.testing.assert_array_equal(hook.corrected_labels_, correction.corrected_labels)
    assert run.linc is not None
    np.testing.assert_array_equal(hook.trust_by_epoch_, run.linc.trust_by_epoch)
    assert [h.loss for h in whole.history] == [h.loss for h in run.history]
    assert [h.epoch for h in run.history] == list(range(1, 7))


def test_warmup_checkpoint_refuses_other_settings() -> None:
    data, settings = _phase_setup()
    warmup = clean.linc_warmup(data, settings)
    blob = warmup.to_bytes(fingerprint=clean.warmup_fingerprint(settings, data))
    other = settings.model_copy(update={"lr": 1e-3})
    with pytest.raises(ValueError, match="different settings"):
        clean.Warmup.from_bytes(blob, fingerprint=clean.warmup_fingerprint(other, data))
    with pytest.raises(ValueError, match="not a noisescore warm-up checkpoint"):
        clean.Warmup.from_bytes(b"junk", fingerprint="x")
    # A pickle with arbitrary objects (code a tampered bucket could run) is refused.
    import io

    buffer = io.BytesIO()
    torch.save({"format": clean.WARMUP_FORMAT, "payload": Memo(2, 2)}, buffer)
    with pytest.raises(ValueError, match="not a noisescore warm-up checkpoint"):
        clean.Warmup.from_bytes(buffer.getvalue(), fingerprint="x")
