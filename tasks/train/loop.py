"""Training as plain functions: no Prefect, no MLflow; progress leaves through a callback.

`fit` trains any registered model (or an architecture string) on tensors from `tasks.data.loading`, on
the CPU or CUDA (mixed precision on CUDA), seeded, with a checkpoint per epoch that holds model,
optimizer, scheduler, epoch, config and class map, so a killed run resumes where it stopped and a
checkpoint alone rebuilds the model.

Launched under torchrun, `fit` trains data-parallel over the processes (gloo on the CPU, NCCL on
CUDA) on the same global batches as one process would:
`torchrun --nproc_per_node 2 -m saofu.cli step train --data DIR --out RUN_DIR ...`.
"""

from __future__ import annotations

import math
import pickle
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import build_from_checkpoint_meta, create_model, model_meta
from models.expand import ExpandedRecognizer
from models.recognizer import Recognizer
from saofu.errors import SaofuError
from tasks.data.loading import TensorSplit, iterate_batches
from tasks.data.preprocess import normalize, to_float
from tasks.train import distributed
from tasks.train.config import TrainConfig

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class FitResult:
    model: nn.Module
    classes: list[str]
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_accuracy: float = 0.0
    checkpoint_path: Path | None = None
    seconds: float = 0.0


def epoch_printer(total_epochs: int, prefix: str = "") -> EpochCallback:
    """An `on_epoch` callback that prints one progress line per epoch."""

    def show(epoch: int, m: dict[str, float]) -> None:
        # A budgeted run (the fast retrain's fine-tune) reports its plan, which may change as it runs.
        total = int(m.get("epochs_planned", total_epochs))
        # An expanded fine-tune validates only its last epoch (`FineTuneConfig.validate_every_epoch`).
        val = f"  val acc {m['val_accuracy']:.3f}" if "val_accuracy" in m else ""
        print(f"{prefix}epoch {epoch:>3}/{total}  loss {m['train_loss']:.4f}  train acc {m['train_accuracy']:.3f}{val}",
              flush=True)

    return show


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SaofuError("device 'cuda' requested but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise SaofuError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` moved to `device` (in place, as `Module.to`), in the layout that trains fastest there.

    On the CPU, channels-last (NHWC) convolution weights (the activations follow the weights' layout):
    PyTorch's CPU convolutions train these small networks faster so. Measured on 2 cores (`saofu
    bench train-layout`, 64 px, 5 seeds): 1.26x `train_one_epoch`'s images/s for saofu_fu, 1.33x
    for mobilenet_v3_small_050 and for the fast retrain's expanded step, 1.22x the least of any seed.
    Only the layout changes: checkpoints load into either; the answers agree to float rounding (the
    sums run in another order). On CUDA the model is left as it is: not measured here.
    """
    model = model.to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def augment(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random affine (rotation, scale, shift) and photometric jitter on a float [0,1] batch.

    Runs on whatever device the batch is on, one fused grid_sample per batch. No flips: a
    mirrored character is not the character.
    """
    if strength <= 0:
        return x
    n, dev = x.shape[0], x.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * (hi - lo) + lo).to(dev)

    angle = uniform(-1, 1) * math.radians(20 * strength)
    scale = 1 + uniform(-1, 1) * 0.2 * strength
    tx, ty = uniform(-1, 1) * 0.15 * strength, uniform(-1, 1) * 0.15 * strength
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    brightness = uniform(-1, 1).view(n, 1, 1, 1) * 0.25 * strength
    contrast = 1 + uniform(-1, 1).view(n, 1, 1, 1) * 0.35 * strength
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + brightness).clamp_(0, 1)


def train_one_epoch(
    model: nn.Module,
    split: TensorSplit,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    device: torch.device,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None,
) -> dict[str, float]:
    """One pass over `split`; returns mean loss and training accuracy (on augmented images).

    Under torchrun, `cfg.batch_size` is the global batch: every process draws and augments the
    same global batch (same generator), trains on its own slice of it, and the returned metrics
    are the means over the whole global batch, the same on every process.
    """
    model.train()
    world, rank = distributed.world_size(), distributed.rank()
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in iterate_batches(split, cfg.batch_size, shuffle=True, generator=generator):
        if len(labels) == 1 < len(split):
            # BatchNorm cannot normalise one image (a ValueError mid-run): a last batch of one, left
            # when the split's size is one more than a multiple of the batch size, is dropped; the
            # order is shuffled every epoch, so another epoch trains on that image.
            continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        x = normalize(augment(to_float(images), cfg.aug_strength, generator))
        if world > 1:
            part = distributed.local_slice(len(labels), rank, world)
            # DDP averages gradients over processes; weighting each process's mean loss by its share
            # of the batch makes that average the gradient of the global batch's mean loss, also
            # for a last, short batch that splits unevenly.
            share = (part.stop - part.start) * world / len(labels)
            x, labels = x[part], labels[part]
        with torch.autocast(device.type, enabled=scaler is not None):
            logits = model(x)
            loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
        grad_loss = loss * share if world > 1 else loss
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(grad_loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            grad_loss.backward()
            optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    return distributed.all_reduce_mean({"train_loss": total_loss, "train_accuracy": correct}, seen)


# Batch for running a whole split through a model on the CPU (`inference_batch`), by model family.
# Measured on 2 cores, 64 px, channels-last (`saofu bench inference-batch`): saofu recognisers run
# batches of 64 at 3.3-3.8x the images/s of 512 (2.1x at 128; why was not measured), torchvision's
# mobilenet_v3_small_050 the other way round (batch 64 at half of 512's).
SAOFU_INFERENCE_BATCH = 64
OTHER_INFERENCE_BATCH = 512


def inference_batch(model: nn.Module, device: torch.device) -> int:
    """The batch size whole-split inference (validation, embeddings) runs `model` in on `device`."""
    if device.type == "cpu" and isinstance(model, (Recognizer, ExpandedRecognizer)):
        return SAOFU_INFERENCE_BATCH
    return OTHER_INFERENCE_BATCH


@torch.no_grad()
def predict_proba(model: nn.Module, split: TensorSplit, device: torch.device,
                  batch_size: int | None = None) -> torch.Tensor:
    """Softmax probabilities [N, C] for a whole split, in eval mode (batches: `inference_batch`)."""
    batch_size = batch_size or inference_batch(model, device)
    model.eval()
    out = []
    for images, _ in iterate_batches(split, batch_size, shuffle=False):
        logits = model(normalize(to_float(images.to(device))))
        out.append(logits.float().softmax(1).cpu())
    return torch.cat(out)


def evaluate(model: nn.Module, split: TensorSplit, device: torch.device) -> dict[str, float]:
    """Loss and top-1 accuracy of `model` on `split`."""
    probs = predict_proba(model, split, device)
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), split.labels).item()
    return {"val_loss": loss, "val_accuracy": (probs.argmax(1) == split.labels).float().mean().item()}


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    return create_model(cfg.model, num_classes=num_classes, **cfg.model_kwargs())


def save_checkpoint(path: Path, model, optimizer, scheduler, epoch: int, cfg: TrainConfig,
                    classes: list[str], history: list[dict], best_val_accuracy: float,
                    refines: dict[str, str] | None = None) -> None:
    """Write atomically, so a run killed mid-save still has its previous checkpoint.

    `refines` (class -> the class it refines, from a fast retrain) travels with the model so every
    graph exported from it carries it (`export_onnx`)."""
    state = {
        "model": model.state_dict(),
        "model_meta": model_meta(model),
        "optimizer": optimizer.state_dict() if optimizer else None,
        "scheduler": scheduler.state_dict() if scheduler else None,
        "epoch": epoch,
        "config": asdict(cfg),
        "classes": classes,
        "history": history,
        "best_val_accuracy": best_val_accuracy,
        "refines": dict(refines or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def checkpoint_config(state: dict) -> TrainConfig:
    """The TrainConfig a checkpoint was saved with; keys this version does not know are ignored."""
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in state.get("config", {}).items() if k in known})


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint's state, read with `weights_only=True`.

    Checkpoints travel (MLflow artefacts, a colleague's folder): a full unpickle would run any
    code a crafted file carries. What `save_checkpoint` writes is tensors, numbers, strings and
    containers of them, which is all the safe loader reads.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise SaofuError(f"checkpoint {path} holds objects other than tensors and plain values; it is not "
                         f"loaded (it could run code): {str(exc).splitlines()[0]}") from None


def checkpoint_arch(path: str | Path) -> str:
    """The architecture string of the model a checkpoint holds (a pruned model's is its own)."""
    return str(read_checkpoint(path)["model_meta"].get("arch", ""))


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a trained model from its checkpoint alone. Returns (model in eval mode, state)."""
    path = Path(path)
    if not path.is_file():
        raise SaofuError(f"checkpoint not found: {path}")
    state = read_checkpoint(path)
    model = build_from_checkpoint_meta(state["model_meta"])
    model.load_state_dict(state["model"])
    return model.eval(), state


def fit(
    cfg: TrainConfig,
    train: TensorSplit,
    val: TensorSplit,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    on_epoch: EpochCallback | None = None,
) -> FitResult:
    """Train `cfg.model` on `train`, validating on `val` after every epoch.

    Args:
        cfg: the run's configuration.
        train, val: decoded splits sharing one class map.
        checkpoint_path: where the per-epoch checkpoint goes (None: no checkpoint).
        resume: continue from `checkpoint_path` if it exists.
        on_epoch: called with (epoch, metrics) after every epoch: progress and tracking hook.
            Under torchrun it is called on every process, with the same metrics; gate output on
            `distributed.is_main_process()`.

    Returns:
        FitResult with the final model (eval mode), per-epoch history and best val accuracy.
        Under torchrun only rank 0 writes the checkpoint; every process returns the same model.
    """
    if cfg.epochs < 1:
        raise SaofuError(f"epochs must be >= 1, got {cfg.epochs}")
    device = resolve_device(cfg.device)
    ddp = distributed.launched()
    if ddp:
        distributed.check_global_batch(cfg.batch_size)
        device = distributed.init(device)
    seed_everything(cfg.seed)
    model = place(build_model(cfg, len(train.classes)), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    generator = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    best, start_epoch = 0.0, 0
    ckpt = Path(checkpoint_path) if checkpoint_path else None

    if resume and ckpt and ckpt.exists():
        state = read_checkpoint(ckpt, map_location=device)
        if state["classes"] != train.classes:
            raise SaofuError(f"checkpoint {ckpt} was trained on classes {state['classes']}, not {train.classes}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best, start_epoch = state["history"], state["best_val_accuracy"], state["epoch"]
    # Every process starts from the same seed, so the same weights; DDP checks that anyway.
    train_model = distributed.wrap(model, device) if ddp else model

    t0 = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        # Reseed per epoch (shuffling, augmentation, dropout) so a resumed run sees exactly the
        # batches and masks an uninterrupted run would have seen.
        generator.manual_seed(cfg.seed + 1_000_003 * epoch)
        torch.manual_seed(cfg.seed + 1_000_003 * epoch)
        metrics = train_one_epoch(train_model, train, optimizer, scheduler, cfg, device, generator, scaler)
        distributed.broadcast_buffers(model)
        # Every process evaluates the whole (small) val split on the same model: same metrics everywhere.
        metrics.update(evaluate(model, val, device))
        metrics["lr"] = scheduler.get_last_lr()[0]
        best = max(best, metrics["val_accuracy"])
        history.append({"epoch": epoch + 1, **metrics})
        if ckpt and distributed.is_main_process():
            save_checkpoint(ckpt, model, optimizer, scheduler, epoch + 1, cfg, train.classes, history, best)
        if on_epoch:
            on_epoch(epoch + 1, metrics)
    distributed.barrier()  # under torchrun, nobody returns before rank 0's last checkpoint is written
    model.eval().cpu()
    return FitResult(model, train.classes, history, best, ckpt, time.perf_counter() - t0)
