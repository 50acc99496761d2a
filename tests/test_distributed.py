"""Data-parallel training (ml/distributed.py and the Trainer/LiNC under a process group).

The two-process tests start this file as a script twice, as torchrun would (the same
environment variables), on gloo over 127.0.0.1, and compare what the ranks saved with
each other and with one process trained on the same global batches.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from noisescore.ml import distributed
from noisescore.ml.detectors import DETECTORS, create_detectors
from noisescore.ml.distributed import Dist, shard_batches
from noisescore.ml.linc import LiNC
from noisescore.ml.train import DeviceImages, Hook, Step, TrainConfig, Trainer

WORLD = 2
N_SAMPLES = 400  # a multiple of WORLD: one process sees the same samples as the ranks
CONFIG = TrainConfig(epochs=4, batch_size=64, lr=1e-2, seed=0)
WARMUP = 3
CPU = torch.device("cpu")


# --------------------------------------------------------------------------- shard_batches


def test_shards_are_disjoint_equal_and_cover_the_trimmed_permutation() -> None:
    perm = torch.randperm(103, generator=torch.Generator().manual_seed(0))
    world = 3
    shards = [shard_batches(perm, 30, r, world) for r in range(world)]
    assert {len(s) for s in shards} == {4}  # 34 each: batches of 10, 10, 10, 4
    for k in range(4):
        assert {len(s[k]) for s in shards} == ({10} if k < 3 else {4})
    seen = torch.cat([b for s in shards for b in s])
    assert len(set(seen.tolist())) == len(seen)  # disjoint
    assert sorted(seen.tolist()) == sorted(perm[:102].tolist())  # trimmed to 3 * 34


def test_step_k_of_all_ranks_is_one_process_batch_k() -> None:
    perm = torch.randperm(N_SAMPLES, generator=torch.Generator().manual_seed(1))
    shards = [shard_batches(perm, 64, r, WORLD) for r in range(WORLD)]
    one_process = torch.split(perm, 64)
    assert len(shards[0]) == len(one_process) == 7  # six of 32 per rank, then 8
    for k, batch in enumerate(one_process):
        union = torch.cat([s[k] for s in shards])
        assert sorted(union.tolist()) == sorted(batch.tolist())


def test_a_last_batch_of_one_sample_per_rank_is_dropped() -> None:
    perm = torch.arange(42)  # 21 per rank with 2 ranks: batches of 10, 10, 1
    batches = shard_batches(perm, 20, 1, 2)
    assert [len(b) for b in batches] == [10, 10]
    assert batches[0].tolist() == list(range(1, 20, 2))


@pytest.mark.parametrize(
    ("n", "batch_size", "rank", "world", "message"),
    [
        (100, 3, 0, 2, "batch_size 3 gives 1 sample"),
        (100, 64, 2, 2, r"rank must lie in \[0, 2\)"),
        (100, 64, 0, 0, "world must be >= 1"),
        (3, 64, 0, 2, "3 samples cannot be shared by 2 processes"),
    ],
)
def test_shard_batches_rejects_bad_input(
    n: int, batch_size: int, rank: int, world: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        shard_batches(torch.arange(n), batch_size, rank, world)


def test_shard_batches_rejects_a_2d_permutation() -> None:
    with pytest.raises(ValueError, match="perm must be 1-D"):
        shard_batches(torch.arange(20).view(4, 5), 4, 0, 2)


# --------------------------------------------------------------------------- environment


def test_one_process_needs_no_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env("cpu") is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_from_env("cpu") is None
    assert distributed.current() is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "2"}, "RANK is not set"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE must be an integer, got 'two'"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, r"RANK must lie in \[0, 2\), got 2"),
        (
            {"WORLD_SIZE": "2", "RANK": "0", distributed.TIMEOUT_ENV: "0"},
            f"{distributed.TIMEOUT_ENV} must be a positive number of seconds, got '0'",
        ),
    ],
)
def test_init_from_env_names_what_is_wrong(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name in ("RANK", "LOCAL_RANK", distributed.TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        distributed.init_from_env("cpu")
    assert distributed.current() is None  # nothing was joined


# --------------------------------------------------------------------------- refusals


class Memo(nn.Module):
    """A linear model on flattened pixels (no BatchNorm: the ranks' models stay equal)."""

    def __init__(self, d: int = 16, c: int = 2):
        super().__init__()
        self.fc = nn.Linear(d, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class StepRecorder(Hook):
    """Per-step work that does not declare itself distributed-safe."""

    def on_step(self, trainer: Trainer, step: Step) -> None: ...


class EpochRecorder(Hook):
    """Epoch-level only: allowed in a distributed run without saying anything."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_epoch_end(self, trainer: Trainer, epoch: int, stats: dict[str, float]) -> None:
        assert trainer.last_epoch_stats is not None
        self.losses.append(trainer.last_epoch_stats.loss)


def toy_problem(
    n: int = N_SAMPLES, flip: float = 0.3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two separable classes of 4x4 images; ``flip`` of the labels flipped."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 2, n)
    images = np.where(true[:, None, None, None] == 1, 200, 50).astype(np.int64)
    images = np.clip(images + rng.normal(0, 30, (n, 1, 4, 4)), 0, 255).astype(np.uint8)
    flipped = rng.random(n) < flip
    return images, np.where(flipped, 1 - true, true), flipped


def test_a_hook_with_per_step_work_must_declare_distributed_safe() -> None:
    images, noisy, _ = toy_problem(40)
    # No process group: the refusal comes before anything talks to the other ranks.
    two = Dist(rank=0, world_size=2, local_rank=0, device=CPU)
    with pytest.raises(
        ValueError, match=r"^StepRecorder does not support distributed training \(--nproc > 1\)$"
    ):
        Trainer(
            Memo(),
            DeviceImages(images, CPU),
            noisy,
            config=CONFIG,
            hooks=[StepRecorder()],
            dist=two,
        )
    alone = Dist(rank=0, world_size=1, local_rank=0, device=CPU)
    trainer = Trainer(
        Memo(), DeviceImages(images, CPU), noisy, config=CONFIG, hooks=[StepRecorder()], dist=alone
    )
    assert trainer.world_size == 1


def test_the_trainer_device_must_be_the_groups() -> None:
    images, noisy, _ = toy_problem(40)
    gpu_group = Dist(rank=0, world_size=2, local_rank=0, device=torch.device("cuda", 0))
    with pytest.raises(ValueError, match="the trainer's device is cpu but the process group"):
        Trainer(Memo(), DeviceImages(images, CPU), noisy, config=CONFIG, dist=gpu_group)


# --------------------------------------------------------------------------- two processes


def train(dist: Dist | None, init_seed: int) -> dict[str, Any]:
    """LiNC warm-up then plain CE on the toy problem; what the comparisons need."""
    images, noisy, _ = toy_problem()
    torch.manual_seed(init_seed)
    model = Memo()
    initial = model.fc.weight.detach().clone()
    linc = LiNC(2, warmup_epochs=WARMUP)
    epochs = EpochRecorder()
    detectors = create_detectors(list(DETECTORS), 2, warmup_epochs=WARMUP)
    trainer = Trainer(
        model,
        DeviceImages(images, CPU),
        noisy,
        config=CONFIG,
        hooks=[linc, epochs, *detectors],
        dist=dist,
    )
    trainer.fit()
    assert linc.alpha is not None
    return {
        "world_size": trainer.world_size,
        "initial_weight": initial,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "alpha": linc.alpha.clone(),
        "trust_by_epoch": torch.from_numpy(linc.trust_by_epoch_),
        "predicted": torch.from_numpy(linc.predicted_labels_),
        "flagged": torch.from_numpy(linc.flagged_),
        "corrected": torch.from_numpy(linc.corrected_labels_),
        "labels": trainer.labels.clone(),
        "otsu": linc.otsu_threshold_,
        "loss": [h.loss for h in trainer.history],
        "accuracy": [h.train_accuracy for h in trainer.history],
        "hook_losses": epochs.losses,
        "detectors": {d.name: torch.from_numpy(d.scores_by_epoch_) for d in detectors},
    }


def _worker(out: Path) -> None:
    """One rank, started with torchrun's environment variables."""
    dist = distributed.init_from_env("cpu")
    assert dist is not None and distributed.current() == dist
    try:
        # A different initial model on each rank: DDP gives every rank rank 0's.
        result = train(dist, init_seed=100 + dist.rank)
        torch.save(result, out / f"rank{dist.rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp")
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(WORLD),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
        distributed.TIMEOUT_ENV: "60",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(out)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{logs[r]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def one_process() -> dict[str, Any]:
    return train(None, init_seed=100)  # rank 0's initial model


def test_ranks_end_with_the_same_weights_and_alpha(ranks: list[dict[str, Any]]) -> None:
    first, second = ranks
    assert first["world_size"] == second["world_size"] == WORLD
    assert not torch.equal(first["initial_weight"], second["initial_weight"])
    for name, tensor in first["state"].items():
        assert torch.equal(tensor, second["state"][name]), name
    assert torch.equal(first["alpha"], second["alpha"])
    assert torch.equal(first["trust_by_epoch"], second["trust_by_epoch"])


def test_linc_correction_is_the_same_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    first, second = ranks
    for key in ("predicted", "flagged", "corrected", "labels"):
        assert torch.equal(first[key], second[key]), key
    assert torch.equal(first["labels"], first["corrected"])  # the trainer took it
    assert first["otsu"] == second["otsu"]
    assert first["flagged"].any()  # the toy problem has flipped labels to find


def test_two_processes_train_as_one_on_the_same_global_batches(
    ranks: list[dict[str, Any]], one_process: dict[str, Any]
) -> None:
    """DDP averages the ranks' gradients of their halves of one process's batch, and LiNC
    divides by the global batch: the same optimisation up to float summation order."""
    rank0 = ranks[0]
    assert one_process["world_size"] == 1
    for name, tensor in one_process["state"].items():
        torch.testing.assert_close(rank0["state"][name], tensor, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        rank0["trust_by_epoch"], one_process["trust_by_epoch"], rtol=1e-4, atol=1e-5
    )
    assert rank0["trust_by_epoch"].min() < 0.9  # alpha moved: the comparison is not of ones
    assert torch.equal(rank0["corrected"], one_process["corrected"])
    assert rank0["otsu"] == pytest.approx(one_process["otsu"], abs=1e-4)
    # The epoch's loss and accuracy are of all ranks (what hooks and history see).
    assert rank0["loss"] == pytest.approx(one_process["loss"], rel=1e-4)
    assert rank0["accuracy"] == one_process["accuracy"]
    assert rank0["hook_losses"] == rank0["loss"]


def test_detectors_merge_their_shards_into_one_process_scores(
    ranks: list[dict[str, Any]], one_process: dict[str, Any]
) -> None:
    """Each process records its shard's steps; the epoch-end merge gives every process
    the scores one process records on the same global batches (every detector)."""
    first, second = ranks
    assert set(first["detectors"]) == set(DETECTORS)
    for name, scores in first["detectors"].items():
        assert torch.equal(scores, second["detectors"][name]), name
        assert scores.shape == (WARMUP, N_SAMPLES), name
        torch.testing.assert_close(
            scores, one_process["detectors"][name], rtol=1e-3, atol=1e-4, msg=name
        )


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
