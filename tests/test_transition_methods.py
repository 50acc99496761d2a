"""The transition-matrix methods on the one loop: volminnet and t_revision.

Each key formula is checked against values computed by hand from explicit probabilities
and matrices (logits are ``log p``, so ``softmax(logits) = p``); the transition matrices'
updates run through a real (tiny) Trainer; one slow test per method trains a few epochs
on real BreastMNIST with 40 % symmetric noise.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import noisescore.ml.methods.t_revision
import noisescore.ml.methods.volminnet  # noqa: F401  (registration)
from noisescore.ml.methods.base import MethodError, create_method, method_params
from noisescore.ml.methods.t_revision import (
    TRevision,
    estimate_transition,
    importance_weights,
    reweighted_loss,
)
from noisescore.ml.methods.transition import (
    TransitionMatrix,
    forward_corrected_ce,
    noisy_posterior,
)
from noisescore.ml.methods.volminnet import VolMinNet, volminnet_loss, volume_loss
from noisescore.ml.train import DeviceImages, TrainConfig, Trainer

LN = math.log
#: T[i, j] = P(noisy j | clean i); det = 0.56 - 0.06 = 0.5.
T2 = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
#: det = 0.8 (0.42 - 0.06) - 0.1 (0.14 - 0) + 0.1 (0.06 - 0) = 0.28.
T3 = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.6, 0.2], [0.0, 0.3, 0.7]])

# ----------------------------------------------------------------------------- helpers


def seeded_mlp(seed: int, d: int = 16, c: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, c))


def tiny_trainer(method: Any, *, n: int = 64, c: int = 2, epochs: int = 3) -> Trainer:
    """A real trainer on n random 4x4 images with random labels."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 1, 4, 4), dtype=np.uint8)
    labels = rng.integers(0, c, size=n)
    return Trainer(
        seeded_mlp(0, c=c),
        DeviceImages(images, torch.device("cpu")),
        labels,
        config=TrainConfig(epochs=epochs, batch_size=16, lr=1e-2, lr_milestones=(), seed=0),
        hooks=[method],
    )


def logits_of(*rows: tuple[float, ...]) -> torch.Tensor:
    """Logits ``log p`` of the given probability rows, (B, C), with gradients."""
    return torch.tensor([[LN(v) for v in row] for row in rows], requires_grad=True)


# ----------------------------------------------------------------------------- shared


def test_transition_matrix_starts_near_identity_and_is_row_stochastic():
    s = 1.0 / (1.0 + math.exp(2.0))  # sigmoid(-2) = 0.1192
    t = TransitionMatrix(3, init=2.0)()
    diag, off = 1.0 / (1.0 + 2 * s), s / (1.0 + 2 * s)  # 0.8075, 0.0963
    expected = torch.full((3, 3), off) + torch.eye(3) * (diag - off)
    torch.testing.assert_close(t, expected)
    torch.testing.assert_close(t.sum(dim=1), torch.ones(3))


def test_noisy_posterior_and_forward_corrected_ce_by_hand():
    logits = logits_of((0.5, 0.5), (0.9, 0.1))
    # q = p @ T2: (0.5 * 0.8 + 0.5 * 0.3, ...) = (0.55, 0.45); (0.72 + 0.03, 0.18 + 0.07)
    q = noisy_posterior(F.softmax(logits, dim=1), T2)
    torch.testing.assert_close(q, torch.tensor([[0.55, 0.45], [0.75, 0.25]]))
    ce = forward_corrected_ce(logits, T2, torch.tensor([0, 1]))
    torch.testing.assert_close(ce, torch.tensor([-LN(0.55), -LN(0.25)]))
    # T = I is plain cross-entropy.
    torch.testing.assert_close(
        forward_corrected_ce(logits, torch.eye(2), torch.tensor([0, 1])),
        torch.tensor([-LN(0.5), -LN(0.1)]),
    )


def test_estimate_transition_anchor_picks_and_percentile_rule():
    probs = np.array(
        [
            [0.90, 0.05, 0.05],  # r0
            [0.80, 0.10, 0.10],  # r1
            [0.70, 0.20, 0.10],  # r2
            [0.10, 0.60, 0.30],  # r3
            [0.05, 0.15, 0.80],  # r4
        ]
    )
    r = probs
    # percentile 100: the plain maximum of each column: r0, r3, r4.
    np.testing.assert_allclose(estimate_transition(probs, 100.0), r[[0, 3, 4]])
    # percentile 70 of 5 values, numpy "higher": position 0.7 * 4 = 2.8 -> the 4th
    # smallest. Column 0 [.9 .8 .7 .1 .05]: threshold .8, largest below it .7 -> r2.
    # Column 1 [.05 .1 .2 .6 .15]: threshold .2, largest below .15 -> r4.
    # Column 2 [.05 .1 .1 .3 .8]: threshold .3, largest below .1 (r1 and r2; first) -> r1.
    np.testing.assert_allclose(estimate_transition(probs, 70.0), r[[2, 4, 1]])
    # The official rule (tools.fit with filter_outlier): zero the values >= the threshold.
    for i, anchor in enumerate((2, 4, 1)):
        column = probs[:, i].copy()
        column[column >= np.percentile(column, 70, method="higher")] = 0.0
        assert int(np.argmax(column)) == anchor
    # Rows are renormalised to sum to 1 (scaled rows give the same T).
    np.testing.assert_allclose(estimate_transition(probs * 3.0, 70.0), r[[2, 4, 1]])
    # A constant column has nothing below its percentile: the maximum (first) is taken.
    flat = np.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    np.testing.assert_allclose(estimate_transition(flat, 97.0), flat[:2])


def test_estimate_transition_rejects_bad_input():
    with pytest.raises(MethodError, match="percentile"):
        estimate_transition(np.full((4, 2), 0.5), 0.0)
    with pytest.raises(MethodError, match="percentile"):
        estimate_transition(np.full((4, 2), 0.5), 101.0)
    with pytest.raises(MethodError, match="shape"):
        estimate_transition(np.full((4,), 0.5), 97.0)
    with pytest.raises(MethodError, match="finite"):
        estimate_transition(np.array([[np.nan, 1.0], [0.5, 0.5]]), 97.0)


# ----------------------------------------------------------------------------- volminnet


def test_volume_loss_is_log_det_by_hand():
    assert volume_loss(T2).item() == pytest.approx(LN(0.5), rel=1e-6)
    assert volume_loss(T3).item() == pytest.approx(LN(0.28), rel=1e-5)
    assert volume_loss(torch.eye(3)).item() == pytest.approx(0.0, abs=1e-7)
    # Its gradient is the inverse transpose: d log det T / dT = T^-T.
    t = T2.clone().requires_grad_(True)
    volume_loss(t).backward()
    # T2^-1 = [[0.7, -0.2], [-0.3, 0.8]] / 0.5
    torch.testing.assert_close(t.grad, torch.tensor([[1.4, -0.6], [-0.4, 1.6]]))


def test_volminnet_loss_by_hand():
    logits = logits_of((0.5, 0.5), (0.9, 0.1))
    labels = torch.tensor([0, 1])
    expected = (-LN(0.55) - LN(0.25)) / 2 + 1e-4 * LN(0.5)
    assert volminnet_loss(logits, T2, labels).item() == pytest.approx(expected, rel=1e-6)
    assert volminnet_loss(logits, T2, labels, lam=0.5).item() == pytest.approx(
        (-LN(0.55) - LN(0.25)) / 2 + 0.5 * LN(0.5), rel=1e-6
    )
    # Through the method, with its own T (the initial, near-identity one).
    method = create_method("volminnet", n_samples=64, n_classes=2)
    trainer = tiny_trainer(method)
    method.on_train_start(trainer)
    idx = torch.tensor([0, 1])
    trainer.labels[idx] = labels
    t0 = torch.as_tensor(method.transition_, dtype=torch.float32)
    expected_t0 = volminnet_loss(logits, t0, labels).item()
    assert method.loss(trainer, logits, idx, 1).item() == pytest.approx(expected_t0, rel=1e-6)


def test_volminnet_learns_t_which_stays_row_stochastic():
    method = create_method("volminnet", n_samples=64, n_classes=3, lam=1e-2)
    assert isinstance(method, VolMinNet)
    trainer = tiny_trainer(method, c=3)
    before = method.transition_.copy()
    history = trainer.fit()
    after = method.transition_
    assert not np.allclose(before, after)  # T was stepped
    np.testing.assert_allclose(after.sum(axis=1), np.ones(3), rtol=1e-6)
    assert (after > 0).all()
    assert method.transition.w.grad is None  # zeroed after each step
    assert all(math.isfinite(h.loss) and "volume" in h.extra for h in history)
    assert history[-1].extra["volume"] == pytest.approx(np.linalg.slogdet(after)[1])


def test_volminnet_rejects_bad_params():
    for params, what in [
        ({"lam": -1.0}, "lam"),
        ({"transition_lr": 0.0}, "transition_lr"),
        ({"transition_momentum": 1.0}, "transition_momentum"),
        ({"init": float("nan")}, "init"),
    ]:
        with pytest.raises(MethodError, match=what):
            create_method("volminnet", n_samples=10, n_classes=2, **params)
    with pytest.raises(MethodError, match="peer"):
        create_method("volminnet", n_samples=10, n_classes=2, peer=seeded_mlp(1))
    assert method_params("volminnet") == {
        "lam": 1e-4,
        "init": 2.0,
        "transition_lr": 0.01,
        "transition_momentum": 0.9,
    }


# ----------------------------------------------------------------------------- t_revision


def test_importance_weights_and_reweighted_loss_by_hand():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.9, 0.1]])
    labels = torch.tensor([0, 1, 0])
    # q = p @ T2 = (0.55, 0.45), (0.75, 0.25), (0.75, 0.25)
    # beta = p_y / q_y = 0.5 / 0.55, 0.1 / 0.25, 0.9 / 0.75
    beta = importance_weights(p, T2, labels)
    torch.testing.assert_close(beta, torch.tensor([0.5 / 0.55, 0.4, 1.2]))
    # T = I: every weight 1.
    torch.testing.assert_close(importance_weights(p, torch.eye(2), labels), torch.ones(3))

    logits = logits_of((0.5, 0.5), (0.9, 0.1), (0.9, 0.1))
    expected = (0.5 / 0.55 * -LN(0.5) + 0.4 * -LN(0.1) + 1.2 * -LN(0.9)) / 3
    loss = reweighted_loss(logits, T2, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # beta is a constant in the reweight stage: the gradient is beta * (p - onehot) / B.
    loss.backward()
    onehot = F.one_hot(labels, 2).float()
    expected_grad = torch.tensor([0.5 / 0.55, 0.4, 1.2])[:, None] * (p - onehot) / 3
    torch.testing.assert_close(logits.grad, expected_grad)


def test_revision_gradient_reaches_dt_only_through_beta():
    logits = logits_of((0.5, 0.5), (0.9, 0.1))
    labels = torch.tensor([0, 1])
    slack = torch.zeros(2, 2, requires_grad=True)
    reweighted_loss(logits, T2 + slack, labels, weight_gradient=True).backward()
    assert slack.grad is not None and slack.grad.abs().sum() > 0
    # With a constant beta (reweight stage) CE alone gets no gradient to dT.
    slack_detached = torch.zeros(2, 2, requires_grad=True)
    reweighted_loss(logits, T2 + slack_detached, labels).backward()
    assert slack_detached.grad is None


def test_t_revision_stages_through_the_loop():
    method = create_method(
        "t_revision",
        n_samples=64,
        n_classes=2,
        warmup_epochs=1,
        reweight_epochs=1,
        revision_lr=1e-3,
    )
    assert isinstance(method, TRevision)
    assert [method.stage(e) for e in (1, 2, 3, 4)] == [
        "warmup",
        "reweight",
        "revision",
        "revision",
    ]
    trainer = tiny_trainer(method, epochs=4)
    trainer.fit(stop_epoch=1)  # warm-up as a phase of its own, to see the network after it
    assert method.transition_estimate_ is None and method.transition_ is None
    probs = trainer.predict_proba(trainer.images)
    history = trainer.fit()
    assert [h.extra["stage"] for h in history] == [0.0, 1.0, 2.0, 2.0]
    assert all(math.isfinite(h.loss) for h in history)
    estimate = method.transition_estimate_
    assert estimate is not None and estimate.shape == (2, 2)
    # The anchor T is the warmed-up network's prediction on one training sample per class.
    np.testing.assert_allclose(estimate, estimate_transition(probs, 97.0), atol=1e-6)
    np.testing.assert_allclose(estimate.sum(axis=1), np.ones(2), rtol=1e-9)
    assert history[1].extra["revision_norm"] == 0.0  # no revision yet after the reweighting
    revised = method.transition_
    assert revised is not None and np.isfinite(revised).all()
    assert history[-1].extra["revision_norm"] > 0  # dT was learned
    assert method.revision.grad is None  # zeroed after each step


def test_t_revision_revision_stays_near_row_stochastic_at_paper_rate():
    method = create_method(
        "t_revision", n_samples=64, n_classes=2, warmup_epochs=1, reweight_epochs=1
    )
    trainer = tiny_trainer(method, epochs=4)
    trainer.fit()
    revised = method.transition_
    assert revised is not None
    # 2 revision epochs x 4 steps of Adam at 5e-7: each entry moves by at most ~4e-6.
    np.testing.assert_allclose(revised.sum(axis=1), np.ones(2), atol=2e-5)
    assert 0 < np.abs(revised - method.transition_estimate_).max() < 1e-5


def test_t_revision_rejects_bad_params_and_schedules():
    for params, what in [
        ({"warmup_epochs": 0}, "warmup_epochs"),
        ({"reweight_epochs": 0}, "reweight_epochs"),
        ({"warmup_epochs": 2.5}, "warmup_epochs"),
        ({"percentile": 0.0}, "percentile"),
        ({"percentile": 120.0}, "percentile"),
        ({"revision_lr": 0.0}, "revision_lr"),
        ({"revision_weight_decay": -1.0}, "revision_weight_decay"),
    ]:
        with pytest.raises(MethodError, match=what):
            create_method("t_revision", n_samples=10, n_classes=2, **params)
    # Defaults 20 + 40 leave no revision epoch in a 60-epoch run.
    method = create_method("t_revision", n_samples=64, n_classes=2)
    with pytest.raises(MethodError, match=r"warmup_epochs=20.*reweight_epochs=40.*epochs=60"):
        tiny_trainer(method, epochs=60).fit()
    method = create_method(
        "t_revision", n_samples=64, n_classes=2, warmup_epochs=2, reweight_epochs=1
    )
    with pytest.raises(MethodError, match="epochs=3"):
        tiny_trainer(method, epochs=3).fit()


# ----------------------------------------------------------------------------- BreastMNIST

SMOKE_EPOCHS = 5
SMOKE_PARAMS: dict[str, dict[str, Any]] = {
    "volminnet": {},
    "t_revision": {"warmup_epochs": 2, "reweight_epochs": 2},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOKE_PARAMS))
def test_method_trains_on_noisy_breastmnist(data_dir: Path, name: str):
    """Five epochs on 400 training samples with 40 % symmetric noise, the default model.

    Batch 64, lr 1e-3, constant. BreastMNIST has 2 classes, chance is 0.5; the test set's
    majority rate is 114 / 156 = 0.731. A smoke test of the method in the loop (finite
    loss, the transition matrix fitted, better than chance), not a ranking.
    """
    from noisescore.ml.data import load_dataset
    from noisescore.ml.models import DEFAULT_MODEL, create_model
    from noisescore.ml.noise import inject_noise

    dataset = load_dataset("breastmnist", data_dir=data_dir)
    train, test = dataset.train, dataset.test
    assert test is not None
    keep = np.random.default_rng(0).permutation(len(train))[:400]
    noise = inject_noise(train.labels[keep], "symmetric:0.4", n_classes=dataset.n_classes, seed=0)
    torch.manual_seed(0)
    model = create_model(
        DEFAULT_MODEL, num_classes=dataset.n_classes, in_chans=dataset.in_chans, img_size=28
    )
    method = create_method(
        name, n_samples=len(keep), n_classes=dataset.n_classes, **SMOKE_PARAMS[name]
    )
    images = DeviceImages(train.images[keep], torch.device("cpu"))
    trainer = Trainer(
        model,
        images,
        noise.noisy_labels,
        config=TrainConfig(epochs=SMOKE_EPOCHS, batch_size=64, lr=1e-3, lr_milestones=(), seed=0),
        hooks=[method],
    )
    history = trainer.fit()
    assert len(history) == SMOKE_EPOCHS and all(math.isfinite(h.loss) for h in history)
    transition = method.transition_  # type: ignore[attr-defined]
    assert transition is not None and transition.shape == (2, 2)
    assert np.isfinite(transition).all()

    held = DeviceImages(
        test.images, torch.device("cpu"), mean=images.mean_list, std=images.std_list
    )
    logits = method.predict_logits(trainer, held)
    accuracy = float((logits.argmax(dim=1).numpy() == test.labels).mean())
    print(name, "test accuracy", accuracy, "T", transition.round(3).tolist())
    assert accuracy > 1 / dataset.n_classes, (name, accuracy)
