"""CDR (robust early-learning): the critical split by hand, the gradients Adam sees, the
hook order of the Trainer, parameter checks, and a short real run on BreastMNIST."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import noisescore.ml.methods.cdr  # noqa: F401  (registers "cdr")
from noisescore.ml.methods.base import MethodError, create_method
from noisescore.ml.methods.cdr import (
    clip_gradients,
    clip_rate_schedule,
    clipped_parameters,
    critical_mask,
    n_critical,
)
from noisescore.ml.train import Batch, DeviceImages, Hook, TrainConfig, Trainer

# ----------------------------------------------------------------------------- helpers


def seeded_mlp(seed: int = 0, d: int = 16, c: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, c))


def tiny_data(n: int = 16, c: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 1, 4, 4), dtype=np.uint8)
    labels = rng.integers(0, c, size=n)
    return images, labels


def tiny_trainer(hooks: list[Hook], *, epochs: int = 1, n: int = 16, batch: int = 16) -> Trainer:
    images, labels = tiny_data(n)
    return Trainer(
        seeded_mlp(0),
        DeviceImages(images, torch.device("cpu")),
        labels,
        config=TrainConfig(epochs=epochs, batch_size=batch, lr=1e-2, seed=0),
        hooks=hooks,
    )


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ----------------------------------------------------------------------------- the split


def test_critical_mask_is_the_top_share_of_abs_w_times_g():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    g = torch.tensor([[0.5, 1.0], [-0.1, 4.0]])
    # |w * g| = [[0.5, 2.0], [0.3, 2.0]]
    assert critical_mask(w, g, 0.75).tolist() == [[True, True], [False, True]]  # K = 3
    assert critical_mask(w, g, 0.5).tolist() == [[False, True], [False, True]]  # K = 2
    # K = 1, but the two importances of 2.0 tie at the threshold: both are critical.
    assert critical_mask(w, g, 0.25).tolist() == [[False, True], [False, True]]
    assert critical_mask(w, g, 1.0).all()
    # floor(0.1 * 4) = 0 is raised to one critical entry (the threshold must exist).
    assert n_critical(4, 0.1) == 1 and n_critical(10, 0.35) == 3 and n_critical(4, 1.0) == 4
    assert critical_mask(w, g, 0.1).sum() == 2  # the tie again
    w3 = torch.tensor([1.0, 2.0, 3.0])
    assert critical_mask(w3, torch.ones(3), 0.34).tolist() == [False, False, True]  # no tie


def test_critical_mask_rejects_bad_input():
    w = torch.ones(3)
    for bad in (0.0, -0.1, 1.5, float("nan"), True):
        with pytest.raises(MethodError, match="clip_rate"):
            critical_mask(w, w, bad)
    with pytest.raises(ValueError, match="differ"):
        critical_mask(w, torch.ones(4), 0.5)


def test_clip_gradients_global_threshold_and_decay():
    """Non-critical gradients become lambda * w, critical ones are untouched; the threshold
    is global over all tensors (a per-tensor split would keep one entry of ``a``)."""
    lam = 0.1
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    b = torch.tensor([[-1.0, 0.5]], requires_grad=True)
    g_a = torch.tensor([[1.0, 0.1], [0.1, 0.125]])  # |w g| = 1, 0.2, 0.3, 0.5
    g_b = torch.tensor([[2.0, 8.0]])  # |w g| = 2, 4
    a.grad, b.grad = g_a.clone(), g_b.clone()
    kept = clip_gradients([a, b], 1 / 3, lam)  # n = 6, K = 2, threshold 2
    assert int(kept) == 2
    torch.testing.assert_close(a.grad, lam * a.detach())
    torch.testing.assert_close(b.grad, g_b)

    a.grad, b.grad = g_a.clone(), g_b.clone()
    kept = clip_gradients([a, b], 0.5, lam)  # K = 3, threshold 1: a's first entry is critical
    assert int(kept) == 3
    torch.testing.assert_close(a.grad, torch.tensor([[1.0, 0.2], [0.3, 0.4]]))
    torch.testing.assert_close(b.grad, g_b)

    a.grad, b.grad = g_a.clone(), g_b.clone()
    assert int(clip_gradients([a, b], 1.0, lam)) == 6  # keep everything: nothing changes
    torch.testing.assert_close(a.grad, g_a)
    torch.testing.assert_close(b.grad, g_b)


def test_clip_gradients_rejects_bad_input():
    a = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="no gradient"):
        clip_gradients([a], 0.5, 0.1)
    a.grad = torch.ones(3)
    with pytest.raises(ValueError, match="weight_decay"):
        clip_gradients([a], 0.5, -1.0)
    with pytest.raises(MethodError, match="clip_rate"):
        clip_gradients([a], 0.0, 0.1)
    with pytest.raises(ValueError, match="at least one"):
        clip_gradients([], 0.5, 0.1)


def test_clipped_parameters_are_weight_matrices_and_kernels():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    got = clipped_parameters(model)
    assert [id(p) for p in got] == [id(model[0].weight), id(model[3].weight)]


def test_clip_rate_schedule():
    assert clip_rate_schedule(1, clip_rate=0.6) == 0.6  # t_k = 0: constant (paper)
    assert clip_rate_schedule(50, clip_rate=0.6) == 0.6
    ramp = [clip_rate_schedule(e, clip_rate=0.6, t_k=5) for e in (1, 2, 3, 5, 9)]
    np.testing.assert_allclose(ramp, [1.0, 0.9, 0.8, 0.6, 0.6])
    assert clip_rate_schedule(1, clip_rate=0.6, t_k=1) == 0.6


# ----------------------------------------------------------------------------- in the loop


class OrderProbe(Hook):
    """Records, per batch, what ``before_step`` and ``after_step`` see."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.snapshot: torch.Tensor | None = None
        self.model: nn.Module | None = None

    def batch_loss(self, trainer: Trainer, batch: Batch) -> torch.Tensor | None:
        self.model = trainer.model
        self.snapshot = flat(trainer.model).clone()  # the weights this step starts from
        self.events.append("loss")
        return None  # the loop's plain cross-entropy

    def before_step(self, trainer: Trainer, batch: Batch) -> None:
        assert self.snapshot is not None
        grads = [p.grad for p in trainer.model.parameters()]
        assert all(g is not None and bool(g.abs().sum() > 0) for g in grads)
        assert torch.equal(flat(trainer.model), self.snapshot)  # not yet stepped
        self.events.append("before")

    def after_step(self, trainer: Trainer, idx: torch.Tensor, epoch: int) -> None:
        assert self.snapshot is not None
        assert not torch.equal(flat(trainer.model), self.snapshot)  # stepped
        self.events.append("after")


def test_trainer_calls_before_step_between_backward_and_optimizer_step():
    probe = OrderProbe()
    trainer = tiny_trainer([probe], epochs=2, n=32, batch=16)
    trainer.fit()
    assert probe.events == ["loss", "before", "after"] * 4  # 2 epochs x 2 batches


def test_adam_sees_the_clipped_gradients():
    """One step of a real Trainer (one batch): Adam's first moment after the step is
    ``(1 - beta1) * grad``, and that grad is the clipped one, computed here by hand."""
    lam, keep = 0.5, 0.3
    method = create_method("cdr", n_samples=16, n_classes=2, clip_rate=keep, weight_decay=lam)
    trainer = tiny_trainer([method], epochs=1, n=16, batch=16)
    reference = copy.deepcopy(trainer.model)
    trainer.fit()

    # The same batch, forward and backward by hand, then CDR's rule.
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    x = trainer.images.batch(perm)
    F.cross_entropy(reference(x), trainer.labels[perm]).backward()
    raw = [p.grad.clone() for p in reference.parameters()]  # type: ignore[union-attr]
    kept = clip_gradients(clipped_parameters(reference), keep, lam)
    n_weights = sum(p.numel() for p in clipped_parameters(reference))
    assert int(kept) >= n_critical(n_weights, keep)

    changed = 0
    for p, p_ref, g_raw in zip(
        trainer.model.parameters(), reference.parameters(), raw, strict=True
    ):
        state = trainer.optimizer.state[p]
        assert p_ref.grad is not None
        torch.testing.assert_close(state["exp_avg"] / 0.1, p_ref.grad, rtol=1e-4, atol=1e-7)
        if p.ndim == 1:  # biases keep their full gradient
            torch.testing.assert_close(p_ref.grad, g_raw)
        else:
            changed += int((p_ref.grad != g_raw).sum())
    assert changed > 0  # the clip did something, so the check above can fail
    stats = trainer.history[0].extra
    assert stats["clip_rate"] == keep
    assert stats["critical_fraction"] == pytest.approx(int(kept) / n_weights)
    np.testing.assert_allclose(method.critical_fraction_by_epoch_, [int(kept) / n_weights])  # type: ignore[attr-defined]


def test_clip_rate_one_is_plain_cross_entropy():
    """Every entry critical: the weights after two epochs are those of the plain loop."""
    method = create_method("cdr", n_samples=32, n_classes=2, clip_rate=1.0)
    with_cdr = tiny_trainer([method], epochs=2, n=32, batch=16)
    plain = tiny_trainer([], epochs=2, n=32, batch=16)
    with_cdr.fit()
    plain.fit()
    torch.testing.assert_close(flat(with_cdr.model), flat(plain.model))
    assert method.critical_fraction_by_epoch_.tolist() == [1.0, 1.0]  # type: ignore[attr-defined]


def test_clip_changes_training():
    method = create_method("cdr", n_samples=32, n_classes=2, clip_rate=0.2)
    with_cdr = tiny_trainer([method], epochs=2, n=32, batch=16)
    plain = tiny_trainer([], epochs=2, n=32, batch=16)
    with_cdr.fit()
    plain.fit()
    assert not torch.allclose(flat(with_cdr.model), flat(plain.model))
    fractions = method.critical_fraction_by_epoch_  # type: ignore[attr-defined]
    n_weights = 16 * 8 + 8 * 2
    floor = n_critical(n_weights, 0.2) / n_weights  # 28 / 144
    assert all(floor <= f < 0.5 for f in fractions), fractions


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"clip_rate": 0.0}, "clip_rate"),
        ({"clip_rate": 1.2}, "clip_rate"),
        ({"clip_rate": float("nan")}, "clip_rate"),
        ({"clip_rate": True}, "clip_rate"),
        ({"clip_rate": "0.5"}, "clip_rate"),
        ({"weight_decay": -1e-3}, "weight_decay"),
        ({"weight_decay": float("inf")}, "weight_decay"),
        ({"t_k": -1}, "t_k"),
        ({"t_k": 2.5}, "t_k"),
        ({"noise_rate": 0.4}, "does not take"),
    ],
)
def test_bad_params_rejected(params: dict, match: str):
    with pytest.raises(MethodError, match=match):
        create_method("cdr", n_samples=16, n_classes=2, **params)


def test_peer_and_ramp_longer_than_training_rejected():
    with pytest.raises(MethodError, match="one network"):
        create_method("cdr", n_samples=16, n_classes=2, peer=seeded_mlp(1))
    method = create_method("cdr", n_samples=16, n_classes=2, t_k=5)
    with pytest.raises(MethodError, match="t_k=5"):
        tiny_trainer([method], epochs=2).fit()
    method = create_method("cdr", n_samples=8, n_classes=2)
    with pytest.raises(MethodError, match="n_samples=8"):
        tiny_trainer([method], epochs=1).fit()


# ----------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_cdr_trains_on_noisy_breastmnist(data_dir: Path):
    """Five epochs, 40 % symmetric noise, ``clip_rate = 1 - 0.4``, the default model.

    Same setting as the other methods' smoke test in tests/test_lnl_methods.py (batch 64,
    lr 1e-3 constant). The test set's majority-class rate is 0.731; the bar is chance
    (0.5): a smoke test of the method in the loop, not a ranking. Measured (seed 0, one
    CPU thread): test accuracy 0.705 (plain CE in the same setting: 0.718), critical share
    0.600 in every epoch, 10.8 s of training.
    """
    from noisescore.ml.data import load_dataset
    from noisescore.ml.models import DEFAULT_MODEL, create_model
    from noisescore.ml.noise import inject_noise

    dataset = load_dataset("breastmnist", data_dir=data_dir)
    train, test = dataset.train, dataset.test
    assert test is not None
    noise = inject_noise(train.labels, "symmetric:0.4", n_classes=dataset.n_classes, seed=0)
    torch.manual_seed(0)
    model = create_model(
        DEFAULT_MODEL, num_classes=dataset.n_classes, in_chans=dataset.in_chans, img_size=28
    )
    method = create_method("cdr", n_samples=len(train), n_classes=dataset.n_classes, clip_rate=0.6)
    images = DeviceImages(train.images, torch.device("cpu"))
    trainer = Trainer(
        model,
        images,
        noise.noisy_labels,
        config=TrainConfig(epochs=5, batch_size=64, lr=1e-3, lr_milestones=(), seed=0),
        hooks=[method],
    )
    history = trainer.fit()
    assert len(history) == 5 and all(math.isfinite(h.loss) for h in history)
    fractions = method.critical_fraction_by_epoch_  # type: ignore[attr-defined]
    assert all(f >= 0.599 for f in fractions), fractions  # floor(0.6 n) / n

    held = DeviceImages(
        test.images, torch.device("cpu"), mean=images.mean_list, std=images.std_list
    )
    accuracy = float((trainer.predict_proba(held).argmax(axis=1) == test.labels).mean())
    assert accuracy > 1 / dataset.n_classes, accuracy
