"""What keeps a fine-tune from forgetting: frozen leading stages and distillation from the base model.

The fast retrain (`tasks/train/fine_tune.py`) trains a grown model for a minute or two on the new
classes plus a replay sample of the old ones. Two things here keep the old classes answering as the
champion did: the stem and first stages stay frozen, in eval mode (`freeze_leading_stages`,
`train_mode`), and each step holds the model to the base model's answers on the old-class images
of its batch (`fine_tune_step`, with `fold_matrix` mapping the grown class list onto the old one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.recognizer import Recognizer
from saofu.refines import known_ancestor
from tasks.data.loading import TensorSplit
from tasks.data.preprocess import normalize, to_float
from tasks.train.config import TrainConfig
from tasks.train.loop import augment


def fold_matrix(classes: Sequence[str], old: Sequence[str], refines: dict[str, str]) -> Tensor:
    """[len(classes), len(old)] 0/1 matrix adding each class's probability to the old class it stands for.

    An old class stands for itself; a new class that refines an old one (``fu_merchant`` -> ``fu``)
    for its parent (followed down a chain); a new class refining nothing for none (a zero row), so
    what the model gives it leaves the folded distribution, renormalised by `distill_step`.
    """
    fold = torch.zeros(len(classes), len(old))
    for i, c in enumerate(classes):
        stands_for = known_ancestor(c, old, refines)
        if stands_for is not None:
            fold[i, list(old).index(stands_for)] = 1.0
    return fold


def fine_tune_step(model: nn.Module, teacher: nn.Module, batch: TensorSplit, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: TrainConfig, device: torch.device,
                   generator: torch.Generator, fold: Tensor, weight: float, temperature: float,
                   class_weight: Tensor | None = None) -> dict[str, float]:
    """One optimiser step on `batch` (augmented as `loop.train_one_epoch` does): cross-entropy on its
    labels (each class weighted by `class_weight`, when given), plus, with `weight` > 0, on its
    old-class images the KL divergence from the base model's answer to the model's answer folded
    onto the old classes (`fold_matrix`).

    The base model already answers the old classes as the champion does; holding the fine-tuned
    model to its (softened) probabilities on the replayed images keeps those answers from drifting
    while the new class is learned (Li & Hoiem 2016, "Learning without Forgetting"; Yan et al. 2021,
    "Positive-Congruent Training" on keeping an update's answers where the old model was right).
    Both see the same augmented images. Frozen leading stages stay in eval mode (`train_mode`).
    """
    train_mode(model)
    images, labels = batch.images.to(device), batch.labels.to(device)
    x = normalize(augment(to_float(images), cfg.aug_strength, generator))
    logits = model(x)
    loss = F.cross_entropy(logits, labels, weight=class_weight, label_smoothing=cfg.label_smoothing)
    old = labels < fold.shape[1]
    if weight > 0 and bool(old.any()):
        with torch.no_grad():
            target = F.softmax(teacher(x[old]) / temperature, dim=1)
        folded = F.softmax(logits[old] / temperature, dim=1) @ fold.to(device)
        folded = folded / folded.sum(1, keepdim=True).clamp_min(1e-8)
        kd = F.kl_div(folded.clamp_min(1e-8).log(), target, reduction="batchmean") * temperature ** 2
        loss = loss + weight * kd
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return {"train_loss": loss.item(), "train_accuracy": (logits.argmax(1) == labels).float().mean().item()}


def freeze_leading_stages(model: nn.Module, stages: int) -> int:
    """Freeze the stem and the first `stages` stages of a saofu `Recognizer`; returns the stages frozen.

    Their weights get no gradient (no backward through the high-resolution layers, where most
    of a small CNN's training time goes) and they run in eval mode while the rest trains
    (`train_mode`): BatchNorm normalises with the running statistics it will use when serving,
    not with each batch's, so the layers above learn on the features they will be given. Other
    models (torchvision's) train whole: 0.
    """
    if stages <= 0 or not isinstance(model, Recognizer):
        return 0
    frozen = [model.stem, *list(model.stages)[:stages]]
    for module in frozen:
        module.requires_grad_(False)
        module.saofu_frozen = True  # survives deepcopy (measure_throughput's probe)
    return len(frozen) - 1


def train_mode(model: nn.Module) -> nn.Module:
    """`model.train()`, with the modules `freeze_leading_stages` froze left in eval mode."""
    model.train()
    for module in model.modules():
        if getattr(module, "saofu_frozen", False):
            module.eval()
    return model
