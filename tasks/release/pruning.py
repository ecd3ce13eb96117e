"""Structured channel pruning of a saofu `Recognizer`, and the short fine-tune that follows it.

Structured means whole channels leave the network: the pruned model is a new, narrower
`Recognizer` (smaller ONNX file, fewer FLOPs on any runtime), not a mask of zeros that only a
sparse kernel could skip.

What is pruned:

* the hidden (expanded) channels of every inverted residual with an expand conv: expand conv
  rows, its BN, the depthwise conv and its BN, the SE gate's reduce columns and expand rows, and
  the project conv's columns. The block's input and output widths are untouched, so residual
  connections and the neighbouring blocks stay as they are;
* optionally the head conv's channels: head conv rows, its BN, the classifier's columns.

Depthwise-separable blocks and ``e1`` inverted residuals have no hidden channels of their own
(their depthwise conv runs on the residual stream), so they are left alone, as are the stem and
block outputs.

Importance of a channel: how much it feeds the next layer, ``E|a_c| * ||W_next[:, c]||_1``, where
``a_c`` is the channel's activation entering the project conv (or the classifier, for the head)
and ``W_next`` that layer's weights. With example images ``E|a_c|`` is measured on them; without,
it is estimated by the channel's BN scale ``|gamma_c|`` (BN leaves the channel with standard
deviation ``|gamma_c|`` before its activation). Why not either measure of the issue alone: the L1 norm of the depthwise
weights means nothing under BN, which divides it away, and ``|gamma|`` alone ignores whether the
next layer uses the channel at all; the product covers both. Ranking is per layer (each layer
keeps the same share), so no block can be emptied by a global ranking.

Given example images, the pruned model's BatchNorm statistics are re-estimated on them
(`recalibrate_batchnorm`): the statistics kept from training no longer fit the narrower blocks.
`fine_tune` then trains it for a few epochs.

Widths are multiples of 8 (`make_divisible`: phones' vector units) and travel in the
architecture string, so a pruned checkpoint rebuilds through `models.build_from_checkpoint_meta`
like any other: a block's kept width is written as the shortest expansion ratio ``e`` with
``make_divisible(in_chs * e) == kept`` (e.g. 40 of 72 channels at ``in_chs`` 24 is ``e1.7``), the
head's as ``head<kept>``, with no change to the grammar. It allows ``e >= 1`` only and ``e1`` means
"no expand conv", so a block keeps at least ``make_divisible(in_chs)`` channels (about its input
width; ``e1.1`` at ``in_chs`` 16 is an expand conv to 16 channels), which bounds what large
amounts can remove. A width multiplier is baked into the string (the pruned model is built at width 1.0), since
`make_divisible` of a scaled width cannot be inverted exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch
from torch import Tensor, nn

from models import create_model
from models.arch import ArchSpec, BlockArgs, decode_arch, encode_arch, make_divisible, scale_arch
from models.blocks import InvertedResidual
from models.recognizer import Recognizer
from saofu.errors import SaofuError
from tasks.data.loading import TensorSplit, iterate_batches
from tasks.data.preprocess import normalize, to_float
from tasks.train import distributed
from tasks.train.loop import (
    EpochCallback,
    FitResult,
    TrainConfig,
    evaluate,
    place,
    resolve_device,
    train_one_epoch,
)

HEAD = "conv_head"  # name of the head's entry in importance and kept-channel dicts
_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")
_MAX_EXPANSION_DIGITS = 6


# ---------------------------------------------------------------------------------------------
# Which channels can go, and how important each one is
# ---------------------------------------------------------------------------------------------


def _check_amount(amount: float) -> None:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount < 1.0:
        raise SaofuError(f"bad pruning amount {amount!r}: must be a share of channels to remove in [0, 1)")


def _prunable_blocks(model: Recognizer) -> dict[str, InvertedResidual]:
    """Inverted residuals that own hidden channels (an expand conv), by module name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, InvertedResidual) and not isinstance(m.conv_pw, nn.Identity)}


def _consumers(model: Recognizer, prune_head: bool) -> dict[str, tuple[nn.Module, Tensor]]:
    """Per prunable layer: the module its channels feed and that module's weights per input channel (L1)."""
    consumers = {name: (block.conv_pwl, block.conv_pwl[0].weight.detach().abs().sum(dim=(0, 2, 3)))
                 for name, block in _prunable_blocks(model).items()}
    if prune_head:
        consumers[HEAD] = (model.classifier, model.classifier.weight.detach().abs().sum(dim=0))
    return consumers


def _bn_scales(model: Recognizer, prune_head: bool) -> dict[str, Tensor]:
    """|gamma| of the BN right before each prunable layer's consumer: the data-free E|a_c|."""
    scales = {name: block.conv_dw[1].weight.detach().abs() for name, block in _prunable_blocks(model).items()}
    if prune_head:
        scales[HEAD] = model.conv_head[1].weight.detach().abs()
    return scales


@torch.no_grad()
def _mean_abs_inputs(model: Recognizer, consumers: dict[str, nn.Module], split: TensorSplit,
                     batch_size: int = 256) -> dict[str, Tensor]:
    """Mean |activation| per channel entering each consumer, over `split` in eval mode."""
    sums: dict[str, Tensor] = {}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().abs().double()
            # Mean over positions here (conv inputs), sum over images; divided by the image count below.
            per_image = x.mean(dim=(2, 3)) if x.dim() == 4 else x
            sums[name] = sums.get(name, 0) + per_image.sum(dim=0)
        return hook

    device = next(model.parameters()).device
    was_training = model.training
    handles = [module.register_forward_pre_hook(recorder(name)) for name, module in consumers.items()]
    try:
        model.eval()
        for images, _ in iterate_batches(split, batch_size, shuffle=False):
            model(normalize(to_float(images.to(device))))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: (total / len(split)).float().cpu() for name, total in sums.items()}


def channel_importance(model: Recognizer, example_split: TensorSplit | None = None,
                       prune_head: bool = True) -> dict[str, Tensor]:
    """Importance of every prunable channel: ``E|a_c| * ||W_next[:, c]||_1`` (module docstring).

    Args:
        model: the recogniser.
        example_split: images to measure ``E|a_c|`` on (a few hundred training images are plenty);
            None estimates it by the BN scale ``|gamma_c|``.
        prune_head: include the head conv's channels (under the key ``"conv_head"``).

    Returns:
        Module name of each prunable inverted residual (e.g. ``"stages.2.0"``) and ``"conv_head"``
        -> a float tensor with one importance per channel, on the CPU.
    """
    consumers = _consumers(model, prune_head)
    if example_split is None:
        activity = _bn_scales(model, prune_head)
    else:
        if len(example_split) == 0:
            raise SaofuError("example split for pruning is empty: pass some training images or None")
        activity = _mean_abs_inputs(model, {name: module for name, (module, _) in consumers.items()}, example_split)
    return {name: activity[name].cpu() * weight_l1.cpu() for name, (_, weight_l1) in consumers.items()}


def kept_channels(importance: Tensor, keep: int) -> Tensor:
    """Indices of the `keep` most important channels, in their original order (ties: lower index wins)."""
    order = torch.argsort(importance, descending=True, stable=True)
    return order[:keep].sort().values


# ---------------------------------------------------------------------------------------------
# The narrower architecture
# ---------------------------------------------------------------------------------------------


def _kept_width(width: int, amount: float, floor: int = 8) -> int:
    """(1 - amount) of `width`, rounded to a multiple of 8, at least `floor`, at most `width`."""
    return min(width, max(floor, make_divisible(width * (1.0 - amount))))


def expansion_for(in_chs: int, hidden: int) -> float:
    """The shortest decimal expansion ratio ``e > 1`` with ``make_divisible(in_chs * e) == hidden``.

    Shortest so the architecture string stays readable (``e1.7``, not ``e1.6666666666666667``);
    ``e`` must not be 1, which would mean "no expand conv".

    Raises:
        SaofuError: no such ratio (the width is below what the grammar's ``e >= 1`` can express).
    """
    for digits in range(_MAX_EXPANSION_DIGITS + 1):
        step = 10.0 ** -digits
        base = round(hidden / in_chs, digits)
        for e in (base, round(base + step, digits), round(base - step, digits)):
            if e > 1.0 and make_divisible(in_chs * e) == hidden:
                return e
    raise SaofuError(f"no expansion ratio >= 1 gives {hidden} hidden channels from {in_chs} input channels")


def _block_inputs(spec: ArchSpec) -> list[list[list[int]]]:
    """Input width of every repeat of every block, shaped like ``spec.stages``."""
    in_chs, widths = spec.stem, []
    for stage in spec.stages:
        stage_widths = []
        for args in stage:
            stage_widths.append([in_chs] + [args.out_chs] * (args.repeats - 1))
            in_chs = args.out_chs
        widths.append(stage_widths)
    return widths


def _pruned_block(args: BlockArgs, expansions: list[float]) -> list[BlockArgs]:
    """`args` with each repeat's expansion; repeats that now differ become blocks of their own."""
    if len(set(expansions)) == 1:
        return [replace(args, expansion=expansions[0])]
    return [replace(args, repeats=1, stride=args.stride if i == 0 else 1, expansion=e)
            for i, e in enumerate(expansions)]


def pruned_arch(model: Recognizer, hidden: dict[str, int], head: int | None) -> str:
    """The architecture string of `model` with new hidden widths (and head width), at width 1.0.

    Args:
        model: the recogniser being pruned.
        hidden: module name of a prunable block -> its kept hidden width; blocks not named keep theirs.
        head: the kept head width, or None to keep it.
    """
    spec = scale_arch(decode_arch(model.arch_string), width=model.width_mult)
    inputs = _block_inputs(spec)
    stages = []
    for s, stage in enumerate(spec.stages):
        blocks, position = [], 0
        for b, args in enumerate(stage):
            expansions = []
            for r in range(args.repeats):
                name = f"stages.{s}.{position}"
                position += 1
                if name in hidden and hidden[name] != model.get_submodule(name).conv_dw[0].out_channels:
                    expansions.append(expansion_for(inputs[s][b][r], hidden[name]))
                else:
                    expansions.append(args.expansion)
            blocks.extend(_pruned_block(args, expansions))
        stages.append(tuple(blocks))
    return encode_arch(replace(spec, stages=tuple(stages), head=spec.head if head is None else head))


# ---------------------------------------------------------------------------------------------
# Slicing the weights
# ---------------------------------------------------------------------------------------------


def _sliced_state(state: dict[str, Tensor], kept: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` with the kept channels of each pruned layer: their producers' rows, consumers' columns."""
    new = dict(state)
    for name, idx in kept.items():
        if name == HEAD:
            rows = ["conv_head.0.weight", *(f"conv_head.1.{t}" for t in _BN_TENSORS)]
            cols = ["classifier.weight"]
        else:
            rows = [f"{name}.conv_pw.0.weight", *(f"{name}.conv_pw.1.{t}" for t in _BN_TENSORS),
                    f"{name}.conv_dw.0.weight", *(f"{name}.conv_dw.1.{t}" for t in _BN_TENSORS),
                    f"{name}.se.conv_expand.weight", f"{name}.se.conv_expand.bias"]
            cols = [f"{name}.se.conv_reduce.weight", f"{name}.conv_pwl.0.weight"]
        for key in rows:
            if key in state:  # SE tensors exist only in blocks with SE
                new[key] = state[key].index_select(0, idx.to(state[key].device))
        for key in cols:
            if key in state:
                new[key] = state[key].index_select(1, idx.to(state[key].device))
    return new


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, split: TensorSplit, batch_size: int = 256) -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance on `split`, in place; weights unchanged.

    Why: after pruning, a block's projection sums fewer channels, so the statistics its BN kept
    from training no longer match what it sees, and the error compounds block after block. On
    the shapes test set a saofu_fu_tiny pruned by half fell from 0.94-1.0 to 0.33-0.56 val
    accuracy; re-estimated statistics brought it back to 0.83-0.97 before any fine-tune.
    Statistics are the exact average over `split` (momentum None), not a moving average.

    Returns:
        `model`, in the train/eval mode it came in.
    """
    if len(split) == 0:
        raise SaofuError("split for BatchNorm recalibration is empty")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    device = next(model.parameters()).device
    was_training = model.training
    try:
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over all batches
        model.train()
        for images, _ in iterate_batches(split, batch_size, shuffle=False):
            model(normalize(to_float(images.to(device))))
    finally:
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
        model.train(was_training)
    return model


def prune_recognizer(model: Recognizer, amount: float, example_split: TensorSplit | None = None,
                     prune_head: bool = True, recalibrate_bn: bool = True) -> Recognizer:
    """A new, narrower recogniser holding the most important channels of `model` (no fine-tune).

    Args:
        model: a saofu `Recognizer` made by `models.create_model` (or a checkpoint rebuilt from one);
            it is not changed.
        amount: share of each prunable layer's channels to remove, in [0, 1). Kept widths are
            rounded to multiples of 8 and a block keeps at least ``make_divisible(in_chs)``
            channels, so the share really removed can be smaller (module docstring).
        example_split: training images (a few hundred are plenty) to measure channel activity on
            and to re-estimate the pruned model's BN statistics with; None ranks by BN scale
            alone and keeps the BN statistics as they were.
        prune_head: prune the head conv's channels too.
        recalibrate_bn: re-estimate BN statistics on `example_split` (`recalibrate_batchnorm`);
            ignored without one.

    Returns:
        The pruned `Recognizer`, on `model`'s device and in its train/eval mode, with the same
        ``model_name`` and kwargs (width multiplier baked into ``arch_string``), so
        `models.model_meta` / `models.build_from_checkpoint_meta` rebuild it.

    Raises:
        SaofuError: `amount` outside [0, 1), `model` not a saofu Recognizer, an empty example split.
    """
    _check_amount(amount)
    if not isinstance(model, Recognizer):
        raise SaofuError(f"can only prune a saofu Recognizer, not {type(model).__name__} "
                         "(torchvision baselines have no architecture string to rebuild a narrower one from)")
    importance = channel_importance(model, example_split, prune_head)
    blocks = _prunable_blocks(model)
    hidden = {name: _kept_width(block.conv_dw[0].out_channels, amount,
                                floor=make_divisible(block.conv_pw[0].in_channels))
              for name, block in blocks.items()}
    head = _kept_width(model.num_features, amount) if prune_head else None
    kept = {name: kept_channels(importance[name], width) for name, width in hidden.items()}
    if head is not None:
        kept[HEAD] = kept_channels(importance[HEAD], head)

    arch = pruned_arch(model, hidden, head)
    name = getattr(model, "model_name", "saofu_from_arch")
    kwargs = dict(getattr(model, "model_kwargs", {"dropout": model.dropout.p, "in_chans": model.in_chans}))
    kwargs.pop("width_mult", None)  # baked into `arch`
    pruned = create_model(name, model.num_classes, arch=arch, **kwargs)
    # Verify the string says what was meant: a width the string cannot express would load wrongly below.
    if pruned.arch_string != arch:
        raise SaofuError(f"pruned architecture {arch!r} does not rebuild as itself ({pruned.arch_string!r})")
    pruned.load_state_dict(_sliced_state(model.state_dict(), kept))
    pruned.to(next(model.parameters()).device)
    if example_split is not None and recalibrate_bn:
        recalibrate_batchnorm(pruned, example_split)
    return pruned.train(model.training)


# ---------------------------------------------------------------------------------------------
# Fine-tune
# ---------------------------------------------------------------------------------------------


def fine_tune(
    model: nn.Module,
    train: TensorSplit,
    val: TensorSplit,
    epochs: int = 3,
    lr: float = 1e-3,
    cfg: TrainConfig | None = None,
    on_epoch: EpochCallback | None = None,
) -> FitResult:
    """Continue training an existing model (a pruned one) for a few epochs, validating after each.

    The loop is `tasks.train.loop.fit`'s (`train_one_epoch`, `evaluate`, per-epoch reseeding), with
    two differences that suit weights that are already trained: the model is given, not built,
    and the learning rate decays from `lr` to 0 on a cosine with no warm-up, where `fit`'s
    one-cycle schedule would climb to a large rate first and undo what pruning kept. One process
    only (no torchrun); no checkpoint.

    Args:
        model: the model to train, in place.
        train, val: decoded splits sharing the model's class map.
        epochs: fine-tune epochs, >= 1.
        lr: the starting learning rate, > 0 (a fraction of the from-scratch rate).
        cfg: batch size, weight decay, augmentation, label smoothing, seed and device (its
            `epochs`, `lr` and `model` are not used); None for `TrainConfig`'s defaults.
        on_epoch: called with (epoch, metrics) after every epoch.

    Returns:
        FitResult with the model (eval mode, CPU), per-epoch history and the best val accuracy.

    Raises:
        SaofuError: bad epochs or lr, a class count that differs from the model's, or torchrun.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise SaofuError(f"fine-tune epochs must be an int >= 1, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise SaofuError(f"fine-tune learning rate must be > 0, got {lr!r}")
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and num_classes != len(train.classes):
        raise SaofuError(f"model has {num_classes} classes but the data has {len(train.classes)}: {train.classes}")
    if distributed.launched():
        raise SaofuError("fine_tune runs in one process; start it without torchrun")
    cfg = replace(cfg or TrainConfig(), epochs=epochs, lr=lr)
    device = resolve_device(cfg.device)
    place(model, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    steps = epochs * math.ceil(len(train) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    generator = torch.Generator()
    history: list[dict[str, float]] = []
    best = 0.0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        generator.manual_seed(cfg.seed + 1_000_003 * epoch)
        torch.manual_seed(cfg.seed + 1_000_003 * epoch)
        metrics = train_one_epoch(model, train, optimizer, scheduler, cfg, device, generator, scaler)
        metrics.update(evaluate(model, val, device))
        metrics["lr"] = scheduler.get_last_lr()[0]
        best = max(best, metrics["val_accuracy"])
        history.append({"epoch": epoch + 1, **metrics})
        if on_epoch:
            on_epoch(epoch + 1, metrics)
    model.eval().cpu()
    return FitResult(model, list(train.classes), history, best, None, time.perf_counter() - t0)
