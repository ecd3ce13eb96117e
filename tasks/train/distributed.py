"""Data-parallel training under `torchrun`: launch detection and the few collectives training needs.

`torchrun --nproc_per_node N ...` starts N processes and hands each WORLD_SIZE, RANK and
LOCAL_RANK in its environment. A process without them, or with WORLD_SIZE 1, is a plain
single-process run: every helper here then answers as rank 0 of a world of 1 and does no
communication, so training code calls them unconditionally.

Processes talk over gloo on the CPU and NCCL on CUDA, one GPU per process (cuda:LOCAL_RANK).
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from saofu.errors import SaofuError


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise SaofuError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def launched() -> bool:
    """True when this process is one of several that torchrun started."""
    return _env_int("WORLD_SIZE", 1) > 1


def world_size() -> int:
    return _env_int("WORLD_SIZE", 1) if launched() else 1


def rank() -> int:
    """This process's rank among all processes (0 when not distributed)."""
    return _env_int("RANK", 0) if launched() else 0


def local_rank() -> int:
    """This process's rank on its own machine: the GPU it uses."""
    return _env_int("LOCAL_RANK", 0) if launched() else 0


def is_main_process() -> bool:
    """Rank 0: the one process that prints, writes files and saves checkpoints."""
    return rank() == 0


def check_global_batch(batch_size: int) -> None:
    """Every process trains on an equal share of each global batch of `batch_size` images.

    Raises:
        SaofuError: `batch_size` is not a multiple of the number of processes.
    """
    n = world_size()
    if batch_size % n:
        raise SaofuError(
            f"batch size {batch_size} is the global batch and must split evenly over the {n} torchrun "
            f"processes: use a multiple of {n}"
        )


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group (once) and return the device this process trains on.

    The process stays in the group until it exits: leaving and joining again between two runs in
    one process races (a fast rank can read its peer's address from the old group).

    Args:
        device: the device the run asked for; on CUDA each process takes GPU LOCAL_RANK.
    """
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # torchrun's env:// rendezvous: MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE are set.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        atexit.register(cleanup)
    return device


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def local_slice(n: int, rank: int, world: int) -> slice:
    """This rank's contiguous part of a global batch of `n` items.

    The parts are disjoint, cover the batch in order and differ in size by at most one (only a
    dataset's last, short batch splits unevenly).
    """
    return slice(n * rank // world, n * (rank + 1) // world)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` in DistributedDataParallel: gradients are averaged over all processes.

    BatchNorm stays per process: each normalises over its own slice of the global batch, so a
    loss curve differs slightly from one process's. SyncBatchNorm would normalise over the global
    batch, but it has no CPU kernels (gloo), and on CUDA `convert_sync_batchnorm` swaps the
    layers of `model` in place: the model `fit` returns would keep layers that cannot train on
    the CPU.
    """
    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def all_reduce_mean(sums: dict[str, float], count: int) -> dict[str, float]:
    """Means over the items of all processes, from each process's sums over its own `count` items."""
    if not initialized():
        return {k: v / count for k, v in sums.items()}
    # float64: sums of per-item losses stay exact enough; the CPU tensor suits gloo, NCCL needs CUDA.
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    totals = torch.tensor([*sums.values(), count], dtype=torch.float64, device=dev)
    dist.all_reduce(totals)
    return {k: (totals[i] / totals[-1]).item() for i, k in enumerate(sums)}


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every process.

    Each process updates its running statistics from its own part of the batch; after this all
    processes hold the same model, so they evaluate alike and report the same metrics.
    """
    if not initialized():
        return
    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def barrier() -> None:
    if initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (a no-op when there is none)."""
    if initialized():
        dist.destroy_process_group()
