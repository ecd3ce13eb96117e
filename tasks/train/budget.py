"""The fast retrain's time budget: training throughput measured on real batches -> a plan in steps.

Plain functions, no Prefect: `fine_tune` measures `measure_throughput` on a few batches, plans
with `plan_steps` so the learning-rate schedule ends with the budget, and after every epoch
plans the rest again on that epoch's own pace (`replan_steps`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
from torch import nn

from saofu.errors import SaofuError
from tasks.data.loading import TensorSplit
from tasks.train.config import TrainConfig
from tasks.train.loop import train_one_epoch
from tasks.train.replay import take

Clock = Callable[[], float]
PLAN_HEADROOM = 0.9  # plan epochs for 90% of the time left: throughput measured on 3 batches is noisy
# After every epoch the rest is planned again on that epoch's own pace (`replan_steps`), which measures
# what the 3 batches could not (they read 690 to 1,310 images/s on the bench's draws, one plan left 5 s
# unused). Every epoch, not the first only: epochs' paces vary by a fifth on a 2-core machine, and plans
# on the first's pace alone left 4.9 of 54 s unused in one bench draw and planned 11 epochs where 9 fitted
# in another.
REPLAN_HEADROOM = 0.95


def plan_epochs(images_per_epoch: int, images_per_s: float, budget_s: float, epoch_overhead_s: float = 0.0,
                max_epochs: int = 30) -> int:
    """How many epochs fit `budget_s`: floor(budget / (epoch's training time + overhead)), in [1, max_epochs].

    Args:
        images_per_epoch: training images per epoch (new/changed classes + replay sample), >= 1.
        images_per_s: measured training throughput, > 0.
        budget_s: seconds available for the epochs (may be <= 0: then the floor of 1).
        epoch_overhead_s: fixed cost per epoch (validation, checkpoint), >= 0.
        max_epochs: the cap, >= 1.
    """
    if images_per_epoch < 1 or not images_per_s > 0 or epoch_overhead_s < 0 or max_epochs < 1:
        raise SaofuError(f"bad plan inputs: {images_per_epoch} images/epoch at {images_per_s} images/s, "
                         f"overhead {epoch_overhead_s} s, max {max_epochs} epochs")
    per_epoch = images_per_epoch / images_per_s + epoch_overhead_s
    fit = math.floor(budget_s / per_epoch) if math.isfinite(budget_s) else max_epochs
    return max(1, min(max_epochs, fit))


def plan_steps(images_per_epoch: int, batch_size: int, images_per_s: float, budget_s: float,
               epoch_overhead_s: float = 0.0, max_epochs: int = 30) -> int:
    """Optimiser steps that fit `budget_s`: whole epochs and then part of one, at least one epoch's.

    `plan_epochs` in steps: a budget that holds 5.8 epochs trains 5.8, not 5, so the learning-rate
    schedule ends with the budget instead of up to an epoch before it. Each epoch started costs
    `epoch_overhead_s` (validation, checkpoint).
    """
    if batch_size < 1:
        raise SaofuError(f"batch_size must be >= 1, got {batch_size}")
    epochs = plan_epochs(images_per_epoch, images_per_s, budget_s, epoch_overhead_s, max_epochs)
    per_epoch = math.ceil(images_per_epoch / batch_size)
    if epochs >= max_epochs or not math.isfinite(budget_s):
        return epochs * per_epoch
    left = budget_s - epochs * (images_per_epoch / images_per_s + epoch_overhead_s) - epoch_overhead_s
    extra = math.floor(max(left, 0.0) * images_per_s / batch_size)
    return epochs * per_epoch + min(extra, per_epoch - 1)


def replan_steps(planned: int, done_epochs: int, images_per_epoch: int, batch_size: int, images_per_s: float,
                 left_s: float, epoch_overhead_s: float, max_epochs: int) -> int:
    """The plan after `done_epochs` whole epochs, in steps: theirs, plus what `left_s` holds at `images_per_s`.

    The rest is whole epochs and then part of one (`plan_steps`), or, where not one more whole epoch
    fits, the part that does (none: the run ends here), so the schedule ends with the budget; the
    total never passes `max_epochs` epochs. Without a pace (`images_per_s` 0) `planned` stays.
    """
    if not images_per_s > 0:
        return planned
    per_epoch = math.ceil(images_per_epoch / batch_size)
    done = done_epochs * per_epoch
    if done_epochs >= max_epochs:
        return done
    if left_s < images_per_epoch / images_per_s + epoch_overhead_s:
        part = math.floor(max(left_s - epoch_overhead_s, 0.0) * images_per_s / batch_size)
        return done + min(part, per_epoch - 1)
    return done + plan_steps(images_per_epoch, batch_size, images_per_s, left_s, epoch_overhead_s,
                             max_epochs - done_epochs)


def _constant_schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def measure_throughput(model: nn.Module, split: TensorSplit, cfg: TrainConfig, device: torch.device,
                       batches: int = 3, warmup: int = 1, clock: Clock = time.perf_counter,
                       step: Callable[..., dict] | None = None) -> float:
    """Training images/s of `model` on real batches of `split`: augmentation, forward, backward, step.

    A throwaway copy of the model trains (so `model`, its BN statistics included, is untouched);
    the first `warmup` batches (allocation, kernel selection) are not timed. `step(model, batch,
    optimizer, scheduler, generator)` is the training step when it is not `train_one_epoch`'s.
    """
    probe = copy.deepcopy(model).to(device)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = _constant_schedule(optimizer)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(split), generator=generator)
    bs = min(cfg.batch_size, len(split))
    timed, seconds = 0, 0.0
    for b in range(warmup + batches):
        idx = order[(torch.arange(bs) + b * bs) % len(split)]
        start = clock()
        if step is not None:
            step(probe, take(split, idx), optimizer, scheduler, generator)
        else:
            train_one_epoch(probe, take(split, idx), optimizer, scheduler, cfg, device, generator, scaler)
        if b >= warmup:
            seconds += clock() - start
            timed += bs
    return timed / max(seconds, 1e-9)
