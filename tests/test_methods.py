"""Learning-with-noisy-labels methods (noisescore.ml.methods): Co-teaching, its VOG variant,
the forget-rate schedule and the VOG tracker."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from noisescore.ml.method_names import METHOD_NAMES, check_method_name
from noisescore.ml.methods import (
    METHODS,
    CoTeaching,
    CoTeachingVOG,
    CrossEntropy,
    MethodError,
    VOGTracker,
    create_method,
    forget_rate_schedule,
    label_row_gradient,
    method_params,
    mixed_selection,
    n_keep,
    small_loss_indices,
)
from noisescore.ml.train import Batch, DeviceImages, TrainConfig, Trainer

# ----------------------------------------------------------------------------- helpers


class MLP(nn.Module):
    """Flattened pixels -> hidden ReLU layer -> linear classifier."""

    def __init__(self, d: int, c: int, hidden: int = 8):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, c)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden(x))


def seeded_mlp(seed: int, d: int = 16, c: int = 2) -> MLP:
    torch.manual_seed(seed)
    return MLP(d, c)


def toy_images(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """4x4 grey images whose label is whether the left half is brighter."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 1, 4, 4), dtype=np.uint8)
    labels = images[:, 0, :, :2].mean(axis=(1, 2)) > images[:, 0, :, 2:].mean(axis=(1, 2))
    return images, labels.astype(np.int64)


def params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ----------------------------------------------------------------------------- schedule


def han_rate_schedule(n_epoch: int, forget_rate: float, num_gradual: int, exponent: float):
    """The authors' code, verbatim (Co-teaching, main.py)."""
    rate_schedule = np.ones(n_epoch) * forget_rate
    rate_schedule[:num_gradual] = np.linspace(0, forget_rate**exponent, num_gradual)
    return rate_schedule


@pytest.mark.parametrize(
    ("forget_rate", "t_k", "exponent"), [(0.4, 10, 1.0), (0.2, 5, 1.0), (0.5, 3, 2.0), (0.3, 1, 1)]
)
def test_forget_rate_schedule_is_hans_linspace(forget_rate: float, t_k: int, exponent: float):
    epochs = 15
    expected = han_rate_schedule(epochs, forget_rate, t_k, exponent)
    got = [
        forget_rate_schedule(e, forget_rate=forget_rate, t_k=t_k, exponent=exponent)
        for e in range(1, epochs + 1)
    ]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)
    assert got[0] == 0.0
    if t_k > 1:  # linspace(0, x, 1) is [0]: with t_k = 1 the ramp is epoch 1 alone
        assert got[t_k - 1] == pytest.approx(forget_rate**exponent)
    assert got[-1] == forget_rate


def test_forget_rate_schedule_values_by_hand():
    rates = [forget_rate_schedule(e, forget_rate=0.4, t_k=5) for e in (1, 2, 3, 5, 6, 100)]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.4, 0.4])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epoch": 0, "forget_rate": 0.2, "t_k": 5},
        {"epoch": 1, "forget_rate": 1.0, "t_k": 5},
        {"epoch": 1, "forget_rate": -0.1, "t_k": 5},
        {"epoch": 1, "forget_rate": 0.2, "t_k": 0},
        {"epoch": 1, "forget_rate": 0.2, "t_k": 5, "exponent": 0},
    ],
)
def test_forget_rate_schedule_rejects_bad_values(kwargs: dict[str, float]):
    epoch = kwargs.pop("epoch")
    with pytest.raises(MethodError):
        forget_rate_schedule(epoch, **kwargs)  # type: ignore[arg-type]


def test_n_keep_and_small_loss_indices():
    assert n_keep(128, 0.0) == 128
    assert n_keep(128, 0.2) == math.floor(0.8 * 128) == 102
    assert n_keep(10, 0.45) == 5
    assert n_keep(3, 0.9) == 1  # never an empty selection
    losses = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3])
    assert small_loss_indices(losses, 3).tolist() == [1, 3, 4]  # ties: smaller position
    assert small_loss_indices(losses, 0).tolist() == []


# ----------------------------------------------------------------------------- R1 / R2 split


def test_mixed_selection_splits_r1_and_r2():
    losses = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    vog = torch.tensor([9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 0.3, 9.0, 0.1, 0.2])
    # R = 5, m = 0.4: R1 = floor(0.6 * 5) = 3 by loss, R2 = 2 by VOG among the other 7.
    picks = mixed_selection(losses, vog, keep=5, mix_ratio=0.4)
    assert picks.tolist() == [0, 1, 2, 8, 9]
    assert mixed_selection(losses, vog, keep=5, mix_ratio=0.0).tolist() == [0, 1, 2, 3, 4]
    assert mixed_selection(losses, vog, keep=3, mix_ratio=1.0).tolist() == [8, 9, 6]
    # No VOG yet (+inf) is never preferred; ties among inf go by loss.
    vog_inf = torch.tensor([float("inf")] * 9 + [0.5])
    assert mixed_selection(losses, vog_inf, keep=4, mix_ratio=0.5).tolist() == [0, 1, 9, 2]


def tiny_trainer(method: CoTeaching, n: int = 64, epochs: int = 3, batch_size: int = 16):
    images, labels = toy_images(n)
    return Trainer(
        seeded_mlp(0),
        DeviceImages(images, torch.device("cpu")),
        labels,
        config=TrainConfig(epochs=epochs, batch_size=batch_size, lr=1e-2, seed=0),
        hooks=[method],
    )


def hand_made_batch(l0: list[float], l1: list[float], *, epoch: int, features: bool) -> Batch:
    b = len(l0)
    idx = torch.arange(10, 10 + b)
    logits = (torch.zeros(b, 2), torch.zeros(b, 2))
    feats = (torch.ones(b, 8), torch.ones(b, 8)) if features else (None, None)
    batch = Batch(idx, torch.zeros(b, dtype=torch.long), epoch, logits, feats)
    batch._ce.update(
        {0: torch.tensor(l0, requires_grad=True), 1: torch.tensor(l1, requires_grad=True)}
    )
    return batch


L0 = [0.1, 0.9, 0.2, 0.8, 0.3, 0.7]
L1 = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3]


def test_coteaching_each_network_learns_from_the_others_picks():
    method = CoTeaching(n_samples=64, n_classes=2, peer=seeded_mlp(1), forget_rate=0.5, t_k=1)
    trainer = tiny_trainer(method)
    method.on_train_start(trainer)
    method.on_epoch_start(trainer, 2)  # tau = 0.5: R = 3 of 6
    batch = hand_made_batch(L0, L1, epoch=2, features=False)
    loss = method.batch_loss(trainer, batch)
    assert method._mask is not None
    kept = [torch.nonzero(method._mask[k]).flatten().tolist() for k in (0, 1)]
    assert kept == [[10, 12, 14], [11, 13, 15]]  # net 0 keeps positions 0, 2, 4; net 1 1, 3, 5
    # net 0 is updated on net 1's picks and vice versa
    expected = np.mean([L0[1], L0[3], L0[5]]) + np.mean([L1[0], L1[2], L1[4]])
    assert float(loss.detach()) == pytest.approx(expected)
    loss.backward()
    g0, g1 = batch._ce[0].grad, batch._ce[1].grad
    assert g0 is not None and g1 is not None
    assert torch.nonzero(g0).flatten().tolist() == [1, 3, 5]
    assert torch.nonzero(g1).flatten().tolist() == [0, 2, 4]


def test_coteaching_vog_split_on_a_toy_batch():
    method = CoTeachingVOG(
        n_samples=64,
        n_classes=2,
        peer=seeded_mlp(1),
        forget_rate=0.5,
        t_k=1,
        mix_ratio=0.5,
        vog_window=2,
        vog_warmup=1,
    )
    trainer = tiny_trainer(method)
    method.on_train_start(trainer)
    assert [t.dim for t in method.trackers] == [9, 9]  # hidden 8 + bias
    # Hand-made VOG: snapshots 0 and 2v (all dims) have population std v per dim.
    idx = torch.arange(10, 16)
    vogs = (
        torch.tensor([5.0, 0.1, 5.0, 0.4, 5.0, 0.2]),  # net 0
        torch.tensor([0.2, 5.0, 0.3, 5.0, 0.1, 5.0]),  # net 1
    )
    for tracker, v in zip(method.trackers, vogs, strict=True):
        tracker.update(idx, torch.zeros(6, 9))
        tracker.update(idx, 2 * v[:, None].expand(6, 9))
        torch.testing.assert_close(tracker.vog(idx), v, rtol=1e-3, atol=0)  # float16
    method.on_epoch_start(trainer, 2)  # after the VOG warm-up; tau = 0.5: R = 3
    loss = method.batch_loss(trainer, hand_made_batch(L0, L1, epoch=2, features=True))
    # R1 = floor(0.5 * 3) = 1 smallest loss, R2 = 2 smallest VOG among the other 5.
    # net 0: loss order 0, 2, 4, 5, 3, 1 -> R1 = {0}; VOG of the rest: 1 (0.1), 5 (0.2).
    # net 1: loss order 1, 3, 5, 4, 2, 0 -> R1 = {1}; VOG of the rest: 4 (0.1), 0 (0.2).
    assert method._mask is not None
    kept = [torch.nonzero(method._mask[k]).flatten().tolist() for k in (0, 1)]
    assert kept == [[10, 11, 15], [10, 11, 14]]
    expected = np.mean([L0[1], L0[4], L0[0]]) + np.mean([L1[0], L1[1], L1[5]])
    assert float(loss.detach()) == pytest.approx(expected)
    # Before the warm-up ends the same batch is plain Co-teaching.
    method.on_epoch_start(trainer, 1)
    method.batch_loss(trainer, hand_made_batch(L0, L1, epoch=1, features=True))
    kept = [torch.nonzero(method._mask[k]).flatten().tolist() for k in (0, 1)]
    assert kept == [list(range(10, 16))] * 2  # tau(1) = 0 keeps all


# ----------------------------------------------------------------------------- VOG


def test_label_row_gradient_equals_autograd():
    gen = torch.Generator().manual_seed(0)
    model = MLP(12, 4).double()
    x = torch.randn(10, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (10,), generator=gen)
    h = model.hidden(x)
    closed = label_row_gradient(model.fc2(h), y, h)
    for i in range(10):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        gw, gb = torch.autograd.grad(loss, [model.fc2.weight, model.fc2.bias])
        torch.testing.assert_close(closed[i], torch.cat([gw[y[i]], gb[y[i] : y[i] + 1]]))


def brute_force_snapshots(model: MLP, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per-sample autograd gradient wrt fc2's weight row and bias of the label: (N, D)."""
    rows = []
    for i in range(len(y)):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        gw, gb = torch.autograd.grad(loss, [model.fc2.weight, model.fc2.bias])
        rows.append(torch.cat([gw[y[i]], gb[y[i] : y[i] + 1]]).double().numpy())
    return np.stack(rows)


def ewma_reference(snapshots: list[np.ndarray], window: int) -> np.ndarray:
    """The documented ewma update, per sample, in float64 numpy; VOG (N,)."""
    a = 2.0 / (window + 1)
    mean, var = snapshots[0].copy(), np.zeros_like(snapshots[0])
    for x in snapshots[1:]:
        delta = x - mean
        mean = mean + a * delta
        var = (1 - a) * (var + a * delta**2)
    vog = np.sqrt(var).mean(axis=1)
    return vog if len(snapshots) >= 2 else np.full(len(vog), np.inf)


def test_vog_exact_and_ewma_against_brute_force_autograd():
    n, c, window, epochs = 30, 3, 4, 7
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = MLP(6, c)
    x = torch.randn(n, 6, generator=gen)
    y = torch.randint(0, c, (n,), generator=gen)
    exact = VOGTracker(n, 9, window=window, mode="exact")
    ewma = VOGTracker(n, 9, window=window, mode="ewma")
    history: list[np.ndarray] = []
    for epoch in range(1, epochs + 1):
        history.append(brute_force_snapshots(model, x, y))
        for idx in torch.randperm(n, generator=gen).split(8):  # batches in a random order
            with torch.no_grad():
                h = model.hidden(x[idx])
                snap = label_row_gradient(model.fc2(h), y[idx], h)
            exact.update(idx, snap)
            ewma.update(idx, snap)
        exact.end_epoch()
        ewma.end_epoch()
        recent = np.stack(history[-window:])  # (t, N, D)
        brute = recent.std(axis=0, ddof=0).mean(axis=1)
        if epoch == 1:
            assert torch.isinf(exact.vog()).all() and torch.isinf(ewma.vog()).all()
        else:
            np.testing.assert_allclose(exact.vog().numpy(), brute, rtol=1e-3)
            np.testing.assert_allclose(
                ewma.vog().numpy(), ewma_reference(history, window), rtol=1e-4
            )
        assert exact.filled().tolist() == [min(epoch, window)] * n
        # The model moves between epochs, so the gradients vary over the window.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    assert exact.epochs_ == epochs
    subset = torch.tensor([3, 0, 17])
    torch.testing.assert_close(exact.vog(subset), exact.vog()[subset])


def test_vog_memory_of_both_modes():
    n, d, window = 1000, 65, 5
    exact = VOGTracker(n, d, window=window, mode="exact")
    ewma = VOGTracker(n, d, window=window, mode="ewma")
    assert exact.snapshots.dtype == torch.float16
    assert exact.snapshots.numel() * exact.snapshots.element_size() == window * n * d * 2
    assert exact.nbytes == window * n * d * 2 + n  # + the uint8 per-sample counter
    assert ewma.mean.dtype == ewma.var.dtype == torch.float32
    assert ewma.nbytes == 2 * n * d * 4 + n


def test_vog_tracker_rejects_bad_settings():
    with pytest.raises(MethodError, match="window"):
        VOGTracker(10, 3, window=1)
    with pytest.raises(MethodError, match="mode"):
        VOGTracker(10, 3, mode="window")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the trainer


def test_trainer_with_coteaching_trains_two_different_networks():
    images, labels = toy_images(64)
    config = TrainConfig(epochs=4, batch_size=16, lr=1e-2, seed=0)

    def build(model_seed: int) -> tuple[Trainer, CoTeaching]:
        method = create_method(
            "coteaching",
            n_samples=64,
            n_classes=2,
            peer=seeded_mlp(model_seed + 1),
            forget_rate=0.25,
            t_k=2,
        )
        assert isinstance(method, CoTeaching)
        trainer = Trainer(
            seeded_mlp(model_seed),
            DeviceImages(images, torch.device("cpu")),
            labels,
            config=config,
            hooks=[method],
        )
        return trainer, method

    trainer, method = build(0)
    assert len(trainer.models) == 2 and trainer.models[1] is method.peer
    before = [params(m) for m in trainer.models]
    assert not torch.equal(before[0], before[1])
    trainer.fit(stop_epoch=2)
    state = copy.deepcopy(trainer.state_dict())
    history = trainer.fit()
    after = [params(m) for m in trainer.models]
    for b, a in zip(before, after, strict=True):
        assert not torch.equal(a, b)  # both networks trained
    assert not torch.equal(after[0], after[1])  # and stayed different
    assert [h.extra["forget_rate"] for h in history] == pytest.approx([0.0, 0.25, 0.25, 0.25])

    selected = method.selected_by_epoch_
    assert selected.shape == (4, 2, 64) and selected.dtype == bool
    assert selected[0].all()  # tau(1) = 0: both keep everything
    assert (selected[2:].sum(axis=2) == 4 * n_keep(16, 0.25)).all()  # 12 of each 16
    assert method.forget_rate_by_epoch_.tolist() == pytest.approx([0.0, 0.25, 0.25, 0.25])
    assert method.epochs_.tolist() == [1, 2, 3, 4]
    np.testing.assert_array_equal(method.clean_set(), selected[-1].any(axis=0))
    np.testing.assert_array_equal(method.clean_set(last=2), selected[-2:].any(axis=(0, 1)))
    np.testing.assert_allclose(method.selection_frequency_, selected[1:].any(axis=1).mean(0))
    with pytest.raises(MethodError, match="last"):
        method.clean_set(last=5)

    # A state_dict round trip restores both networks, and the run resumes exactly.
    resumed, _ = build(7)
    resumed.load_state_dict(state)
    resumed.fit()
    for m, r in zip(trainer.models, resumed.models, strict=True):
        torch.testing.assert_close(params(r), params(m), rtol=0, atol=0)


def test_trainer_with_coteaching_vog_records_vog():
    images, labels = toy_images(48)
    method = create_method(
        "coteaching_vog",
        n_samples=48,
        n_classes=2,
        peer=seeded_mlp(1),
        forget_rate=0.2,
        t_k=2,
        vog_window=2,
        vog_warmup=2,
        vog_mode="exact",
    )
    assert isinstance(method, CoTeachingVOG)
    trainer = Trainer(
        seeded_mlp(0),
        DeviceImages(images, torch.device("cpu")),
        labels,
        config=TrainConfig(epochs=4, batch_size=16, lr=1e-2, seed=0),
        hooks=[method],
    )
    trainer.fit()
    assert method.vog_.shape == (2, 48) and np.isfinite(method.vog_).all()
    assert not np.array_equal(method.vog_[0], method.vog_[1])
    assert method.vog_nbytes_ == 2 * (2 * 48 * 9 * 2 + 48)
    assert all(t.filled().tolist() == [2] * 48 for t in method.trackers)
    assert method.clean_set().shape == (48,)


def test_one_network_method_is_the_loops_default():
    images, labels = toy_images(32)
    runs = []
    for hooks in ([], [create_method("ce", n_samples=32, n_classes=2)]):
        trainer = Trainer(
            seeded_mlp(0),
            DeviceImages(images, torch.device("cpu")),
            labels,
            config=TrainConfig(epochs=2, batch_size=8, lr=1e-2, seed=0),
            hooks=hooks,
        )
        trainer.fit()
        runs.append(params(trainer.model))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_errors():
    assert tuple(sorted(METHODS)) == METHOD_NAMES
    assert METHODS["ce"] is CrossEntropy and METHODS["coteaching_vog"] is CoTeachingVOG
    assert {m: METHODS[m].n_models for m in ("ce", "coteaching", "coteaching_vog")} == {
        "ce": 1,
        "coteaching": 2,
        "coteaching_vog": 2,
    }
    with pytest.raises(MethodError, match=", ".join(METHOD_NAMES)):
        create_method("mixmatch", n_samples=10, n_classes=2)
    with pytest.raises(MethodError, match=", ".join(METHOD_NAMES)):
        check_method_name("co-teaching")
    assert check_method_name(" CoTeaching ") == "coteaching"
    with pytest.raises(MethodError, match=r"'mix_ratio'.*forget_rate \(required\), t_k=10"):
        create_method(
            "coteaching", n_samples=10, n_classes=2, peer=seeded_mlp(1), forget_rate=0.2,
            mix_ratio=0.5,
        )  # fmt: skip
    with pytest.raises(MethodError, match="needs 'forget_rate'"):
        create_method("coteaching", n_samples=10, n_classes=2, peer=seeded_mlp(1))
    with pytest.raises(MethodError, match="peer="):
        create_method("coteaching", n_samples=10, n_classes=2, forget_rate=0.2)
    with pytest.raises(MethodError, match="one network"):
        create_method("ce", n_samples=10, n_classes=2, peer=seeded_mlp(1))
    with pytest.raises(MethodError, match="mix_ratio"):
        create_method(
            "coteaching_vog", n_samples=10, n_classes=2, peer=seeded_mlp(1), forget_rate=0.2,
            mix_ratio=1.5,
        )  # fmt: skip
    assert method_params("coteaching_vog")["vog_mode"] == "exact"
    # Selecting methods have a clean set; plain CE has none (callers test with hasattr).
    assert not hasattr(create_method("ce", n_samples=10, n_classes=2), "clean_set")
    assert all(hasattr(METHODS[m], "clean_set") for m in ("coteaching", "coteaching_vog"))


# ----------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.parametrize("name", ["coteaching", "coteaching_vog"])
def test_coteaching_clean_set_is_cleaner_on_breastmnist(data_dir: Path, name: str):
    from noisescore.ml.data import load_dataset
    from noisescore.ml.models import DEFAULT_MODEL, create_model
    from noisescore.ml.noise import inject_noise

    dataset = load_dataset("breastmnist", data_dir=data_dir)
    train = dataset.train
    noise = inject_noise(train.labels, "symmetric:0.4", n_classes=dataset.n_classes, seed=0)

    def model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return create_model(
            DEFAULT_MODEL, num_classes=dataset.n_classes, in_chans=dataset.in_chans, img_size=28
        )

    extra = {"vog_window": 2, "vog_warmup": 2} if name == "coteaching_vog" else {}
    method = create_method(
        name,
        n_samples=len(train),
        n_classes=dataset.n_classes,
        peer=model(1),
        forget_rate=0.4,
        t_k=2,
        **extra,
    )
    trainer = Trainer(
        model(0),
        DeviceImages(train.images, torch.device("cpu")),
        noise.noisy_labels,
        config=TrainConfig(epochs=4, batch_size=32, lr=1e-3, seed=0),
        hooks=[method],
    )
    trainer.fit()
    clean = method.clean_set()
    truly_clean = ~noise.flipped
    precision = truly_clean[clean].mean()
    assert 0.3 < clean.mean() < 1.0
    assert precision > 1 - noise.realised_rate + 0.05, (precision, noise.realised_rate)
