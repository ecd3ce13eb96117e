"""Data-parallel training under torchrun: 2 CPU processes (gloo) follow 1 process's loss curve.

The torchrun test launches this file as a script: each process trains through
`saofu step train`, as `torchrun --nproc_per_node 2 -m saofu.cli step train ...` would.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from models import registry
from saofu.errors import SaofuError
from tasks.data.loading import iterate_batches, prepare_dataset
from tasks.data.preprocess import normalize, to_float
from tasks.train import distributed
from tasks.train.loop import TrainConfig, augment, fit

NO_BN = "ddp_test_no_batchnorm"
# The global batch of 32 over the 153 train images of the shapes dataset: the last batch (25)
# splits unevenly, 12 and 13, which the loss weighting must get right too.
RUN = dict(epochs=6, batch_size=32, lr=5e-3, image_size=32)
# Without BatchNorm nothing depends on how a batch is split: 2 processes follow 1 to float rounding
# (measured 5e-8; leaving out the loss weighting of the uneven last batch alone gives 3e-4).
NO_BN_TOLERANCE = 1e-5
# With BatchNorm each process normalises over its half batch (SyncBatchNorm does not run on the
# CPU) and dropout draws other masks, so the curves drift apart a little: measured 0.06 at most.
BN_TOLERANCE = 0.1


def no_batchnorm_net(num_classes: int, dropout: float = 0.0) -> nn.Module:
    """A small conv net with no BatchNorm and no dropout (`dropout` is accepted and ignored)."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )
    net.arch_string, net.num_classes = NO_BN, num_classes  # what a checkpoint records (models.model_meta)
    return net


def train_losses(history: list[dict]) -> list[float]:
    return [float(h["train_loss"]) for h in history]


def max_relative_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- without a process group
@pytest.mark.parametrize("n", [32, 25, 3, 1, 0])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_local_slices_are_disjoint_and_cover_the_global_batch(n, world):
    parts = [distributed.local_slice(n, r, world) for r in range(world)]
    assert [i for p in parts for i in range(n)[p]] == list(range(n))  # disjoint, in order, all of it
    assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def test_ranks_slice_the_same_shuffled_augmented_batches_one_process_sees(shapes_dir):
    split = prepare_dataset(shapes_dir, image_size=32).train

    def batches(rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # What train_one_epoch does on `rank`: same seed on every rank, augment the global batch, slice.
        gen = torch.Generator().manual_seed(7)
        out = []
        for images, labels in iterate_batches(split, 32, shuffle=True, generator=gen):
            x = normalize(augment(to_float(images), 0.3, gen))
            part = distributed.local_slice(len(labels), rank, world)
            out.append((x[part], labels[part]))
        return out

    one = batches(0, 1)
    two = [batches(r, 2) for r in range(2)]
    for i, (x, y) in enumerate(one):
        assert torch.equal(torch.cat([two[0][i][0], two[1][i][0]]), x)
        assert torch.equal(torch.cat([two[0][i][1], two[1][i][1]]), y)
        assert len(two[0][i][1]) + len(two[1][i][1]) == len(y) and len(two[0][i][1]) > 0


def test_without_torchrun_there_is_one_process(monkeypatch):
    for value in (None, "1"):
        if value is None:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("WORLD_SIZE", value)
        assert not distributed.launched()
        assert (distributed.world_size(), distributed.rank(), distributed.is_main_process()) == (1, 0, True)


def test_a_global_batch_that_does_not_split_evenly_is_a_clear_error(monkeypatch, shapes_dir):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.launched() and distributed.rank() == 1 and not distributed.is_main_process()
    data = prepare_dataset(shapes_dir, image_size=32)
    with pytest.raises(SaofuError, match="batch size 33 .* multiple of 2"):
        fit(TrainConfig(**{**RUN, "model": "saofu_fu_tiny", "batch_size": 33}), data.train, data.val)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(SaofuError, match="WORLD_SIZE"):
        distributed.world_size()


# ---------------------------------------------------------------- 2 processes under torchrun
@pytest.fixture(scope="module")
def torchrun_runs(shapes_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """This file run by `torchrun --standalone --nproc_per_node 2`: both models, one launch."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAOFU_HOME": str(out / "home")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(shapes_dir), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, proc


def one_process_losses(shapes_dir: Path, model: str, monkeypatch) -> list[float]:
    """The same run as `saofu step train` makes, in this one process."""
    monkeypatch.setitem(registry._REGISTRY, NO_BN, no_batchnorm_net)
    cfg = TrainConfig(model=model, **RUN)
    data = prepare_dataset(shapes_dir, cfg.image_size, cfg.val_share, cfg.seed)
    return train_losses(fit(cfg, data.train, data.val).history)


def two_process_losses(out: Path, model: str) -> list[float]:
    with (out / model / "history.csv").open() as fh:
        return train_losses(list(csv.DictReader(fh)))


def test_two_processes_without_batchnorm_follow_one_process_to_rounding(torchrun_runs, shapes_dir, monkeypatch):
    one = one_process_losses(shapes_dir, NO_BN, monkeypatch)
    two = two_process_losses(torchrun_runs[0], NO_BN)
    print(f"max relative difference without BatchNorm: {max_relative_difference(one, two):.2e}")
    assert max_relative_difference(one, two) < NO_BN_TOLERANCE
    assert two[-1] < two[0]


def test_two_processes_follow_one_process_loss_curve(torchrun_runs, shapes_dir, monkeypatch):
    one = one_process_losses(shapes_dir, "saofu_fu_tiny", monkeypatch)
    two = two_process_losses(torchrun_runs[0], "saofu_fu_tiny")
    print(f"max relative difference with BatchNorm: {max_relative_difference(one, two):.2e}")
    assert max_relative_difference(one, two) < BN_TOLERANCE
    assert two[-1] < 0.8 * two[0]  # it learned: the curves agree on something that moves


def test_only_rank_0_prints_and_writes(torchrun_runs):
    out, proc = torchrun_runs
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [s["epochs"] for s in summaries] == [RUN["epochs"]] * 2  # one summary per run, not per process
    assert proc.stderr.count("data: 153 train") == 2  # progress: rank 0's only
    for model in (NO_BN, "saofu_fu_tiny"):
        state = torch.load(out / model / "checkpoint.pt", weights_only=False)
        assert state["epoch"] == RUN["epochs"] and state["model_meta"]["model_name"] == model


def _train_both_models_through_the_cli(data_dir: str, out: str) -> None:
    """The torchrun entry: `saofu step train` for each model, in every process."""
    from saofu.cli import app

    registry.register_model(NO_BN)(no_batchnorm_net)
    for model in (NO_BN, "saofu_fu_tiny"):
        args = ["step", "train", "--data", data_dir, "--out", f"{out}/{model}", "--model", model, "--json"]
        for opt, key in (("--epochs", "epochs"), ("--batch-size", "batch_size"), ("--lr", "lr"),
                         ("--image-size", "image_size")):
            args += [opt, str(RUN[key])]
        app(args, standalone_mode=False)


if __name__ == "__main__":
    _train_both_models_through_the_cli(*sys.argv[1:3])
