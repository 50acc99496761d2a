"""The captured training step (``--graph``): when it is used, what it needs from the loop,
and, on a CUDA machine, that replaying it trains exactly like the eager step."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from noisescore.jobmetrics import MetricsHook
from noisescore.ml.detectors import create_detectors
from noisescore.ml.linc import LiNC
from noisescore.ml.step_graph import graph_plan, per_step_hooks
from noisescore.ml.train import DeviceImages, Hook, TrainConfig, Trainer
from noisescore.settings import CleanSettings

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def _data(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 100, (n, 1, 8, 8)).astype(np.uint8)
    images[labels == 1, :, :4] += 120  # learnable
    return images, labels


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),  # a bias before BatchNorm: no gradient
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 2),
    )


class _UnsafeStep(Hook):
    def after_step(self, trainer: Trainer, idx: torch.Tensor, epoch: int) -> None:
        self.count = getattr(self, "count", 0) + 1  # Python state per step: not replayable


class _EpochOnly(Hook):
    def on_epoch_end(self, trainer: Trainer, epoch: int, stats: dict[str, float]) -> None:
        stats["seen"] = 1.0


def test_graph_plan_modes_and_devices() -> None:
    assert graph_plan("off", CUDA, []) is False
    assert graph_plan("auto", CPU, []) is False
    assert graph_plan("auto", CUDA, []) is True
    assert graph_plan("on", CUDA, [LiNC(2)]) is True
    with pytest.raises(ValueError, match="needs a CUDA device; the run is on cpu"):
        graph_plan("on", CPU, [])
    with pytest.raises(ValueError, match="graph must be one of auto, on, off"):
        graph_plan("sometimes", CUDA, [])


def test_unsafe_hook_falls_back_to_eager_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="noisescore.train"):
        assert graph_plan("on", CUDA, [LiNC(2), _UnsafeStep()]) is False
    assert "not graph-safe" in caplog.text and "_UnsafeStep" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="noisescore.train"):
        assert graph_plan("auto", CUDA, [LiNC(2)], distributed=True) is False
    assert "distributed" in caplog.text


def test_which_hooks_have_per_step_work() -> None:
    detectors = create_detectors(["aum", "el2n"], 2, warmup_epochs=2)
    metrics = MetricsHook(lambda e: None, job_id="j", stage="warmup", epochs=2, n_samples=4)
    linc = LiNC(2)
    assert per_step_hooks([linc, metrics, _EpochOnly(), *detectors]) == [linc, *detectors]
    assert linc.graph_safe and not any(d.graph_safe for d in detectors)
    # Epoch-level hooks never stop a capture.
    assert graph_plan("auto", CUDA, [linc, metrics, _EpochOnly()]) is True
    assert graph_plan("auto", CUDA, [linc, *detectors]) is False


def test_graph_on_without_cuda_is_refused_up_front() -> None:
    images, labels = _data()
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Trainer(_model(), DeviceImages(images, CPU), labels, config=TrainConfig(graph="on"))
    with pytest.raises(ValueError, match="cannot run with device 'cpu'"):
        CleanSettings(graph="on", device="cpu")
    trainer = Trainer(_model(), DeviceImages(images, CPU), labels, config=TrainConfig())
    assert not trainer.graph_captured  # auto on CPU: eager


def test_cli_rejects_graph_on_with_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    from noisescore.cli import main

    assert main(["clean", "--graph", "on", "--device", "cpu", "--epochs", "1"]) == 2
    assert "cannot run with device 'cpu'" in capsys.readouterr().err


def test_labels_are_replaced_in_place() -> None:
    images, labels = _data()
    original = labels.copy()
    trainer = Trainer(_model(), DeviceImages(images, CPU), labels, config=TrainConfig(epochs=1))
    storage = trainer.labels.data_ptr()
    trainer.labels = 1 - labels
    assert trainer.labels.data_ptr() == storage  # a captured step keeps reading the new ones
    np.testing.assert_array_equal(trainer.labels.numpy(), 1 - labels)
    np.testing.assert_array_equal(labels, original)  # never the caller's array
    with pytest.raises(ValueError, match=r"labels must have shape \(200,\), got \(3,\)"):
        trainer.labels = np.zeros(3, dtype=np.int64)


def test_tensor_lr_follows_the_schedule_and_saves_as_floats() -> None:
    """The LR a captured Adam step reads is a tensor the schedule fills in place; a saved
    state holds floats, so an eager run resumes from it."""
    images, labels = _data()
    config = TrainConfig(epochs=4, batch_size=64, lr=1e-2, lr_milestones=(2,), lr_gamma=0.5)

    def trainer(tensor_lr: bool) -> Trainer:
        torch.manual_seed(0)
        t = Trainer(_model(), DeviceImages(images, CPU), labels, config=config)
        if tensor_lr:
            t._tensor_lr()
        return t

    with_tensor, with_float = trainer(True), trainer(False)
    lr = with_tensor.optimizer.param_groups[0]["lr"]
    with_tensor.fit(stop_epoch=3)
    with_float.fit(stop_epoch=3)
    assert with_tensor.optimizer.param_groups[0]["lr"] is lr  # same storage, filled
    assert float(lr) == pytest.approx(5e-3)
    for a, b in zip(with_tensor.model.parameters(), with_float.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    state = with_tensor.state_dict()
    assert all(isinstance(g["lr"], float) for g in state["optimizer"]["param_groups"])
    assert isinstance(with_tensor.optimizer.param_groups[0]["lr"], torch.Tensor)  # live one
    resumed = trainer(False)
    resumed.load_state_dict(state)
    resumed.fit()
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (none here)"
)
def test_captured_steps_train_like_eager_steps() -> None:
    """LiNC warm-up and final epochs, full and partial batches: alpha, corrections and
    weights after the captured run equal the eager run's up to bf16 noise."""
    images, labels = _data(n=1000)
    rng = np.random.default_rng(1)
    noisy = np.where(rng.random(len(labels)) < 0.3, 1 - labels, labels)
    runs = {}
    for mode in ("off", "on"):
        torch.manual_seed(0)
        linc = LiNC(2, warmup_epochs=3)
        config = TrainConfig(epochs=5, batch_size=96, lr=1e-2, graph=mode)
        trainer = Trainer(_model(), DeviceImages(images, CUDA), noisy, config=config, hooks=[linc])
        assert trainer.graph_captured == (mode == "on")
        trainer.fit()
        runs[mode] = (trainer, linc)
    (eager, eager_linc), (graph, graph_linc) = runs["off"], runs["on"]
    assert graph._graphs is not None and graph._graphs.replays > 0
    np.testing.assert_allclose(graph_linc.trust_, eager_linc.trust_, atol=2e-2)
    assert (graph_linc.flagged_ == eager_linc.flagged_).mean() > 0.98
    for a, b in zip(graph.model.parameters(), eager.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
    assert [h.loss for h in graph.history] == pytest.approx(
        [h.loss for h in eager.history], rel=5e-2
    )


def test_a_state_saved_by_a_captured_run_resumes_eagerly() -> None:
    """A warm-up captured on a GPU stores Adam with ``capturable`` on; a retry on CPU loads
    it and trains (and the reverse flag is restored for a captured run)."""
    images, labels = _data()
    config = TrainConfig(epochs=2, batch_size=64)
    torch.manual_seed(0)
    first = Trainer(_model(), DeviceImages(images, CPU), labels, config=config)
    first.fit(stop_epoch=1)
    state = first.state_dict()
    assert all(g["capturable"] is False for g in state["optimizer"]["param_groups"])
    for group in state["optimizer"]["param_groups"]:  # as a captured run's raw state has it
        group["capturable"] = True
    resumed = Trainer(_model(), DeviceImages(images, CPU), labels, config=config)
    resumed.load_state_dict(state)
    assert all(g["capturable"] is False for g in resumed.optimizer.param_groups)
    resumed.fit()  # Adam would refuse capturable steps on CPU tensors
    assert resumed.epoch == 2
