"""The fast retrain's fine-tune: add or correct classes of a trained model within a wall-clock budget.

Plain functions: no Prefect, no MLflow; progress leaves through `on_epoch`, like `loop.fit`.
`fine_tune` starts from a base checkpoint (the champion's, as `loop.fit` wrote it) and

* for new classes on a saofu recogniser, *expands* it (`models.expand`, the default, `expand`): the
  base stays whole and frozen, its old classes' logits bit for bit, and a branch (a copy of its
  upper layers on its shared lower ones) with one classifier row per new class answers them, so the
  old classes can only lose where a new class outscores them; half the replay is of the old images
  nearest the new class (`old_class_weight` can count old-class images more in the loss; default 1);
* otherwise (changed classes, a torchvision base, `expand=False`) grows the classifier by one row
  per new class (`models.head.grow_classifier`: old rows and all other weights unchanged, a class
  that refines an old one starts from its parent's row) and fine-tunes the upper layers, or, for
  *changed* classes only (corrected labels of classes the model has), keeps the class list as it is;
* trains on every training image of the new and changed classes plus a replay sample of the other
  classes (`replay_share` of each epoch, drawn afresh every epoch so the run sees as much of the
  old data as its epochs allow), so old classes do not regress; stratified by class, with
  `hard_replay_share` of it from the old images the base model sees as most like the new classes
  (`tasks/train/replay.py`; with expansion: the look-alikes its new class could be taken for);
* plans its epochs from the training throughput measured on a few real batches of this data and
  model, and again after every epoch on its own pace (`tasks/train/budget.py`), so the learning-rate
  schedule ends with the budget;
* keeps one checkpoint, in `loop.save_checkpoint`'s format (export, evaluation and release take
  it like any other): expanding, the last epoch's, the only one it validates (choosing by the val
  split gained nothing there, `tasks/train/kept_epoch.py`); growing, validated after every epoch, among
  the epochs whose old classes lost at most `max_old_class_drop` of val recall at the threshold
  (the gate's own check; the flow passes the gate's setting), or within two val images of the
  fewest any epoch lost, the one with the best balanced recall deciding as the gate and serving
  do (threshold, refinement groups, negative class; `tasks/train/kept_epoch.py`, which says
  why): the validation split
  is mostly old classes, so plain accuracy would prefer an epoch that has not learned the new
  class yet, and argmax would prefer an early epoch whose new class is not yet sure enough to
  clear the threshold (measured: best-by-argmax kept epoch 2 of 6, new-class recall 0.92);
* stops at the budget: the clock is checked before every batch, and training ends early enough
  that the last (possibly partial) epoch is still evaluated and saved within the budget; the
  plan counts steps (`plan_steps`), so the schedule ends with the budget, not up to an epoch before;
* growing, freezes the stem and the first two stages (`freeze_leading_stages`: no backward through the
  high-resolution layers, BatchNorm there in eval mode): 1.8x the training throughput of the
  default saofu_fu at 64 px on 2 CPU cores (650 -> 1150 images/s, measured before `loop.place`),
  so a one-minute budget holds twice the epochs, and the features the old classes are told apart by stay as they were;
* growing, holds the model to the base model's answers on the old-class images it replays
  (`fine_tune_step`: a distillation term, weight `distill_weight`, with the new class folded
  into the class it refines), so that old-class answers near the threshold do not churn.

Expansion, the old-class weight, half the replay hard and the branch after one stage were chosen
by measurement (`python -m bench.fine_tune_selection`, on the bench's world and on a second world
the bench never reports); the figures, and what else was tried and not kept (growing with
distillation, EMA/SWA weights, three frozen stages, temperatures, rates), are in
docs/fine_tune_measurements.md. In short: expansion beats growing by 11-18 points of new-class
recall; the old classes lost are merchant frames around look-alikes (褔, 幅, 辐), now the only way
to lose one; and a half-point old-class target sits inside the churn of training and releasing the
same model again (`saofu bench retrain-churn`).

Augmentation: `aug_strength` 0.6, twice the base run's default (`loop.augment`: rotation up to 12
degrees, scale and shift up to 12 % and 9 %, brightness and contrast jitter). A fine-tune sees the
new class's few thousand images a dozen times; harder augmentation makes them generalise to fonts
they were not drawn in. Against the base run's 0.3 and 0.9, 0.6 gave the most new-class recall
within the half-point old-class drop on the selection world, and was better on both counts on the
bench's (docs/fine_tune_measurements.md has the figures).

Learning rate: half the base run's peak rate (5e-3 -> 2.5e-3 at the defaults), decayed to zero on
a cosine with no warm-up over the planned steps (so it reaches zero as the budget ends), like
`tasks.release.pruning.fine_tune` for pruned models: the weights are already trained, and `fit`'s
one-cycle climb from a small rate would spend the few minutes warming up. Half the peak is about
the mean rate of the from-scratch schedule. The classifier layer trains at `head_lr_scale` (3x)
that rate: its new rows start untrained while the features only need to adjust. Measured on a
48px Fu world with ``fu_merchant`` refining ``fu`` (saofu_fu_tiny, 8 epochs, replay 0.5): at a
fifth of the peak the merchant row could not leave its parent in time (``fu`` recall 0.83 ->
0.40); at half, ``fu`` 0.85, ``fu_merchant`` 0.94-0.97, ``not_fu`` 0.74 -> 0.58-0.65, as good as a
3-class model trained from scratch on all the data (0.81 / 0.96 / 0.57: merchant-frame decoys in
``not_fu`` are what costs it); at the full peak ``not_fu`` fell further (0.55); the head at 1x
left ``fu`` at 0.60.

Class prior: an epoch holds every new-class image but only a sample of the old ones, so the
model is validated and saved with the data's class prior put back into its biases
(`prior_correction`); training goes on without it. Half of it (`prior_correction_scale` 0.5): a
few epochs from a trained model do not learn the epochs' prior in full, and the whole correction
(-0.89 on ``fu_merchant``'s logit against ``fu``'s and ``not_fu``'s on the merchant world) held
the new class under the threshold. Measured on 5 saved fine-tunes of the bench (3 seeds, with and
without hard replay), new-class recall on held-out fonts at scale 1 / 0.5 / 0: 0.939-0.963 /
0.943-0.967 / 0.969-0.978 (+0.4 to +1.8 points at 0.5), ``not_fu`` 0.0-0.3 points lower at 0.5
than at 1, 0.2-0.7 at 0.

Works for any model `models.create_model` builds and any ImageFolder dataset: the data's classes
(sorted folder names) are mapped onto the model's order, old classes first, new ones appended.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.expand import DEFAULT_SHARED_STAGES, ExpandedRecognizer, can_expand, expand_recognizer
from models.head import DEFAULT_REFINE_LOGIT_OFFSET, check_new_classes, classifier_layer, grow_classifier
from saofu.errors import SaofuError
from tasks.data.loading import PreparedData, TensorSplit
from tasks.train import distributed
from tasks.train.budget import PLAN_HEADROOM, REPLAN_HEADROOM, Clock, measure_throughput, plan_steps, replan_steps
from tasks.train.forgetting import fine_tune_step, fold_matrix, freeze_leading_stages
from tasks.train.kept_epoch import EpochKeeper, EvaluatedEpoch, LastEpochKeeper, drop_tolerance, largest_drop
from tasks.train.loop import (
    EpochCallback,
    checkpoint_config,
    load_checkpoint,
    place,
    predict_proba,
    resolve_device,
    save_checkpoint,
    seed_everything,
)
from tasks.train.replay import confusable_ranking, replay_count, take, training_set

LR_SCALE = 0.5  # fine-tune rate as a share of the base run's peak rate, when `lr` is not given
WARM_TIMING_IMAGES = 512  # val images the second, warm validation pass is timed on


@dataclass
class FineTuneConfig:
    """What a fine-tune changes and how; logged as the run's parameters.

    A label correction moves images between classes: name as changed every class that lost or
    gained images, so all the corrected images are trained on in full, not only by chance in the
    replay sample.
    """

    new_classes: list[str] = field(default_factory=list)  # appended to the model's classes
    changed_classes: list[str] = field(default_factory=list)  # classes it has, with corrected labels
    refines: dict[str, str] = field(default_factory=dict)  # new class -> the old class it refines
    replay_share: float = 0.5  # share of each epoch's training images drawn from the other classes
    # New classes only, on a saofu recogniser: keep the base whole and frozen and train a branch for
    # the new classes (`models.expand`); False (or changed classes, or a torchvision base): grow the
    # classifier and fine-tune the upper layers with distillation (`grow_classifier`).
    expand: bool = True
    shared_stages: int = DEFAULT_SHARED_STAGES  # expand: the base's leading stages the branch reads from
    # expand: answer a refining class only where the base is not this sure of another class
    # (`models.expand.ParentGate`; 0: off). Acts when the model answers, not in training.
    parent_gate: float = 0.0
    # Share of that replay taken from the old images most like the new classes (`confusable_ranking`):
    # with expansion they are what its new class could be mistaken for (the merchant-frame decoys).
    hard_replay_share: float = 0.5
    # Cross-entropy weight of the old classes' images against the new and changed classes' (1: plain).
    # 3 trades recall for old-class drop (module docstring); 1 was the pick on the selection world.
    old_class_weight: float = 1.0
    budget_s: float = 600.0  # wall clock for the whole call, loading and evaluation included
    max_epochs: int = 30  # cap on planned epochs
    epochs: int | None = None  # a fixed epoch count instead of a plan (the budget still stops it)
    lr: float | None = None  # None: LR_SCALE x the base run's peak rate
    head_lr_scale: float = 3.0  # the classifier layer's rate, relative to `lr`
    refine_logit_offset: float = DEFAULT_REFINE_LOGIT_OFFSET
    # Stem + this many leading stages of a saofu recogniser keep their weights and BatchNorm
    # statistics (`freeze_leading_stages`); 0 trains everything.
    freeze_stages: int = 2
    # Distillation from the base model on old-class images (`distill_step`): weight of its loss
    # (0: plain cross-entropy) and the softmax temperature both sides are softened with. Not with
    # expansion: there the old classes' logits are the base's by construction.
    distill_weight: float = 0.3
    distill_temperature: float = 2.0
    batch_size: int | None = None  # None: the base run's
    # `loop.augment`'s strength; None: the base run's (0.3 at the defaults). Twice that generalised the
    # new class to held-out fonts better on both measured worlds (module docstring).
    aug_strength: float | None = 0.6
    seed: int | None = None  # None: the base run's
    device: str = "auto"
    # The epoch kept (`tasks/train/kept_epoch.py`): expanding, the last; growing, among those whose old
    # classes lost at most `max_old_class_drop` of val recall at the threshold (the gate's own check),
    # or within two val images of the fewest any epoch lost, the best balanced recall at the threshold.
    # The validated epochs' val figures are in the history (`validate_every_epoch` says which).
    threshold: float = 0.9
    # Validate after every epoch (True) or only the last (False); None: every epoch only where the
    # choice of epoch reads it (growing). An expanded model keeps its last epoch, and validating the
    # others cost a quarter of a 45-s budget on the bench (1.8 s of 2,479 val images an epoch) for
    # the history's curves; the probes that compare epochs ask for them.
    validate_every_epoch: bool | None = None
    negative_class: str = "not_fu"  # where unsure answers go, when the model has it
    max_old_class_drop: float = 0.005
    # Share of the class-prior correction put into the biases that are validated and shipped
    # (`prior_correction`): 1 the whole of log(p_data / p_epoch), 0 none. Not with expansion: the
    # base's logits never saw the epochs' prior, and the branch's rows are weighted against it.
    prior_correction_scale: float = 0.5


@dataclass
class FineTuneResult:
    """What a fine-tune did; `recall_before` / `recall_after` show whether old classes held."""

    model: nn.Module  # the best model (eval mode, CPU)
    classes: list[str]  # its classes in logit order: the base's, then the new ones
    checkpoint_path: Path  # the best checkpoint, in loop.save_checkpoint's format
    new_classes: list[str]
    changed_classes: list[str]
    epochs_planned: int
    epochs_run: int  # epochs that trained at least one batch (history's epoch_fraction < 1: cut short)
    stopped_by_budget: bool
    seconds: float
    budget_s: float
    images_per_s: float  # measured training throughput the plan used
    train_images: int  # per epoch: all new/changed-class images + the replay sample
    replay_images: int
    best_epoch: int  # 0: no epoch trained (the starting, grown or expanded, untrained model)
    best_val_accuracy: float
    best_val_balanced_accuracy: float
    recall_before: dict[str, float]  # per-class val recall of the base model (0 for new classes)
    recall_after: dict[str, float]  # per-class val recall of the best model
    lr: float
    history: list[dict[str, float]] = field(default_factory=list)
    method: str = "grow"  # "expand": a frozen base plus a branch (`models.expand`); "grow": see `FineTuneConfig.expand`

    def regressions(self, tolerance: float = 0.02) -> dict[str, float]:
        """Classes outside the fine-tune whose val recall fell by more than `tolerance`: {class: drop}."""
        touched = set(self.new_classes) | set(self.changed_classes)
        drops = {c: self.recall_before[c] - self.recall_after.get(c, 0.0)
                 for c in self.recall_before if c not in touched}
        return {c: d for c, d in drops.items() if d > tolerance}

    def summary(self) -> dict:
        """The result without model and history: JSON-ready, for logs and a flow's return value."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model", "history")}
        out["checkpoint_path"] = str(self.checkpoint_path)
        return out


# ---------------------------------------------------------------------------------------------
# Training set: new/changed classes + a replay sample (tasks/train/replay.py)
# ---------------------------------------------------------------------------------------------


def align_split(split: TensorSplit, classes: Sequence[str]) -> TensorSplit:
    """`split` with its labels re-indexed onto `classes` (which must hold all of its classes)."""
    unknown = [c for c in split.classes if c not in classes]
    if unknown:
        raise SaofuError(f"the data has classes {unknown} that are neither the model's nor new: {list(classes)}")
    remap = torch.tensor([list(classes).index(c) for c in split.classes], dtype=torch.int64)
    labels = remap[split.labels] if len(split) else split.labels
    return TensorSplit(split.images, labels, list(classes), list(split.paths))


def prior_correction(train_labels: Tensor, epoch_labels: Tensor, num_classes: int) -> Tensor:
    """Per-class logit offsets log(p_data / p_epoch) that undo the class mix of the fine-tune's epochs.

    An epoch holds every new-class image but only a sample of the old ones, so the new classes are
    far more frequent in it than in the data (half of it at replay_share 0.5, against a fifth of
    the data for the Fu world's ``fu_merchant``). Softmax cross-entropy learns the training
    distribution's class prior into the logits; adding log(prior in the data / prior in the
    epochs) to the biases puts back the data's prior (logit adjustment, Menon et al. 2021,
    "Long-tail learning via logit adjustment"), which a model trained on all the data would have
    learned. Classes absent from either get no offset.
    """
    data = torch.bincount(train_labels, minlength=num_classes).double()
    epoch = torch.bincount(epoch_labels, minlength=num_classes).double()
    ratio = (data / data.sum()) / (epoch / epoch.sum())
    return torch.where((data > 0) & (epoch > 0), ratio.log(), torch.zeros_like(ratio)).float()


@contextmanager
def _bias_offset(model: nn.Module, offset: Tensor | None):
    """`model` with `offset` added to its classifier's bias inside the block, the trained bias after."""
    bias = classifier_layer(model).bias
    if bias is None or offset is None:
        yield model
        return
    kept = bias.detach().clone()
    with torch.no_grad():
        bias.add_(offset.to(bias.device, bias.dtype))
    try:
        yield model
    finally:
        with torch.no_grad():
            bias.copy_(kept)


# ---------------------------------------------------------------------------------------------
# Fine-tune
# ---------------------------------------------------------------------------------------------


def _val_metrics(probs: Tensor, labels: Tensor, classes: Sequence[str], threshold: float, negative_class: str,
                 refines: dict[str, str]) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """(loss, accuracy, balanced accuracy, balanced recall at the threshold), per-class recall
    (argmax) and per-class recall at the threshold, of the classes that have val images.

    `val_balanced_recall_at_threshold` decides as the gate and the serving app do
    (`tasks.release.evaluation.decide`: the top class where it reaches the threshold, a sure
    refinement group's root, else the negative class), so the epoch kept is the one the gate
    would judge best, not the one with the best argmax: a fine-tune of a few epochs is best by
    argmax early, before its new class is confident enough to clear the threshold.
    """
    from saofu.refines import refinement_roots
    from tasks.release.evaluation import decide

    pred = probs.argmax(1)
    recall = _recall_of(pred, labels, classes)
    negative = list(classes).index(negative_class) if negative_class in classes else None
    decided = torch.from_numpy(decide(probs.numpy(), threshold, negative, refinement_roots(classes, refines)))
    at_threshold = _recall_of(decided, labels, classes)
    metrics = {
        "val_loss": F.nll_loss(probs.clamp_min(1e-12).log(), labels).item(),
        "val_accuracy": (pred == labels).float().mean().item(),
        "val_balanced_accuracy": sum(recall.values()) / max(len(recall), 1),
        "val_balanced_recall_at_threshold": sum(at_threshold.values()) / max(len(at_threshold), 1),
    }
    return metrics, recall, at_threshold


def _recall_of(pred: Tensor, labels: Tensor, classes: Sequence[str]) -> dict[str, float]:
    # Exact shares (image counts divided in float64): the keeper tells drops apart by whole val images,
    # and float32 means put 7/1020 above 5/1020 + 2/1020 (an epoch two images off was ruled out).
    return {c: int((pred[labels == i] == i).sum()) / int((labels == i).sum())
            for i, c in enumerate(classes) if (labels == i).any()}


def _check(cfg: FineTuneConfig, old: list[str], data: PreparedData, image_size: int) -> None:
    if not cfg.new_classes and not cfg.changed_classes:
        raise SaofuError("nothing to fine-tune: name new classes, changed classes, or both")
    check_new_classes(old, cfg.new_classes, cfg.refines)
    unknown = [c for c in cfg.changed_classes if c not in old]
    if unknown:
        raise SaofuError(f"changed classes {unknown} are not classes of the base model {old}; add them as new")
    if not cfg.budget_s > 0:
        raise SaofuError(f"budget_s must be > 0, got {cfg.budget_s!r}")
    for name in ("max_epochs", "epochs", "batch_size"):
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SaofuError(f"{name} must be an int >= 1, got {value!r}")
    if cfg.lr is not None and not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise SaofuError(f"lr must be > 0, got {cfg.lr!r}")
    if not (math.isfinite(cfg.head_lr_scale) and cfg.head_lr_scale > 0):
        raise SaofuError(f"head_lr_scale must be > 0, got {cfg.head_lr_scale!r}")
    replay_count(0, 0, cfg.replay_share)  # range check
    if not 0.0 <= cfg.hard_replay_share <= 1.0:
        raise SaofuError(f"hard_replay_share must be in [0, 1], got {cfg.hard_replay_share!r}")
    for name in ("max_old_class_drop", "prior_correction_scale", "parent_gate"):
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise SaofuError(f"{name} must be in [0, 1], got {value!r}")
    expected = set(old) | set(cfg.new_classes)
    if set(data.classes) != expected:
        extra, missing = sorted(set(data.classes) - expected), sorted(expected - set(data.classes))
        raise SaofuError(f"the data's classes {data.classes} do not match the base model's {old} plus the new "
                         f"{cfg.new_classes}: " + "; ".join(
                             ([f"not in the model and not named new: {extra}"] if extra else [])
                             + ([f"no images for: {missing} (replay needs every old class)"] if missing else [])))
    size = tuple(data.train.images.shape[-2:])
    if size != (image_size, image_size):
        raise SaofuError(f"the data is {size[0]}x{size[1]} but the base model was trained at "
                         f"{image_size}x{image_size}: prepare the dataset with image_size={image_size}")
    if distributed.launched():
        raise SaofuError("fine_tune runs in one process; start it without torchrun")


def fine_tune(
    base_checkpoint: str | Path,
    data: PreparedData,
    cfg: FineTuneConfig,
    checkpoint_path: str | Path,
    on_epoch: EpochCallback | None = None,
    clock: Clock = time.perf_counter,
) -> FineTuneResult:
    """Fine-tune a trained model on new or changed classes within `cfg.budget_s` seconds.

    Args:
        base_checkpoint: a checkpoint written by `loop.fit` (or by this function).
        data: the dataset, prepared at the base model's image size, holding every class of the base
            model (for replay) and every new class; its val split measures before and after.
        cfg: new/changed classes, replay share, budget and training knobs.
        checkpoint_path: where the best checkpoint is written (kept up to date during the run).
        on_epoch: called with (epoch, metrics) after every evaluated epoch.
        clock: seconds, monotonic; the budget is measured on it (tests pass a fake one).

    Returns:
        FineTuneResult: the best model and checkpoint, epochs planned and run, whether the
        budget stopped the run, and per-class val recall before and after.

    Raises:
        SaofuError: class lists that do not fit the base model or the data, a data image size
            other than the base run's, bad knobs, or a torchrun launch.
    """
    t0 = clock()
    deadline = t0 + cfg.budget_s
    base, state = load_checkpoint(base_checkpoint)
    old, base_cfg = list(state["classes"]), checkpoint_config(state)
    _check(cfg, old, data, base_cfg.image_size)
    classes = old + list(cfg.new_classes)
    # The base's own refinements (an earlier fast retrain) stay; this run's are added.
    refines = {**(state.get("refines") or {}), **{c: p for c, p in cfg.refines.items() if c in cfg.new_classes}}
    focus_classes = list(cfg.changed_classes) + list(cfg.new_classes)
    seed = base_cfg.seed if cfg.seed is None else cfg.seed
    lr = cfg.lr if cfg.lr is not None else LR_SCALE * base_cfg.lr
    # The saved config is the base run's (model, image size, split seed: what export and release read)
    # with this run's training settings; `epochs` is set to the plan below.
    tcfg = replace(base_cfg, lr=lr, batch_size=cfg.batch_size or base_cfg.batch_size, device=cfg.device,
                   aug_strength=base_cfg.aug_strength if cfg.aug_strength is None else cfg.aug_strength)
    device = resolve_device(cfg.device)
    train, val = align_split(data.train, classes), align_split(data.val, classes)
    missing = [c for c in focus_classes if not (train.labels == classes.index(c)).any()]
    if missing:
        raise SaofuError(f"no training images for {missing}")

    seed_everything(seed)
    expanding = cfg.expand and bool(cfg.new_classes) and not cfg.changed_classes and can_expand(base)
    init_generator = torch.Generator().manual_seed(seed)  # the new rows that refine nothing
    if expanding or isinstance(base, ExpandedRecognizer):  # a base expanded before keeps its shape
        model = expand_recognizer(base, old, cfg.new_classes, cfg.refines, cfg.refine_logit_offset, init_generator,
                                  cfg.shared_stages, cfg.parent_gate)
        if not expanding:
            model.unfreeze_base()  # a changed class may be one of the base's own: everything trains
    else:
        model = grow_classifier(base, old, cfg.new_classes, cfg.refines, cfg.refine_logit_offset, init_generator)
        freeze_leading_stages(model, cfg.freeze_stages)  # before the throughput is measured: it is faster
    model = place(model, device)
    teacher = place(base, device).eval()  # both copied it: the base model as it was
    fold = fold_matrix(classes, old, refines)
    distill_weight = 0.0 if expanding else cfg.distill_weight
    class_weight = torch.tensor([1.0 if c in focus_classes else cfg.old_class_weight for c in classes], device=device)

    def step(m: nn.Module, batch: TensorSplit, optimizer, scheduler, generator) -> dict[str, float]:
        # One batch per call, so the budget's clock is checked between batches.
        return fine_tune_step(m, teacher, batch, optimizer, scheduler, tcfg, device, generator, fold,
                              distill_weight, cfg.distill_temperature, class_weight)
    # Epoch 0: the grown model untrained. Its old-class logits are the base model's, so the base
    # model's predictions (argmax over the old columns) come from the same pass.
    start = clock()
    probs = predict_proba(model, val, device)
    eval_s = clock() - start
    # The first pass pays one-time costs (thread pools, lazy imports: seconds on a busy 2-core
    # machine). The plan reserves this time, so it is timed warm too: a cold figure once planned 3
    # epochs into a 90-second budget that held 30. Warm on a slice, scaled to the split: a second
    # whole pass cost 1.7 s of a 45-s budget on the bench's 2,479 val images.
    timed = min(len(val), WARM_TIMING_IMAGES)
    start = clock()
    predict_proba(model, take(val, torch.arange(timed)), device)
    eval_s = min(eval_s, (clock() - start) * len(val) / max(timed, 1))
    recall_before = {c: 0.0 for c in cfg.new_classes} | _recall_of(probs[:, :len(old)].argmax(1), val.labels, classes)
    judge = {"threshold": cfg.threshold, "negative_class": cfg.negative_class, "refines": refines}
    best_metrics, best_recall, at_threshold = _val_metrics(probs, val.labels, classes, **judge)
    # The base model's old-class recall at the threshold (epoch 0: the grown model answers as the base).
    kept_before = {c: r for c, r in at_threshold.items() if c in old and c not in cfg.changed_classes}
    # Epoch 0 (the grown, untrained model) is kept only when no epoch trains. An expanded model keeps
    # its last epoch; a grown one the best that held the old classes (`kept_epoch` says why).
    keeper = LastEpochKeeper() if expanding else EpochKeeper(
        cfg.max_old_class_drop, drop_tolerance(val.labels, classes, list(kept_before)))
    ckpt = Path(checkpoint_path)
    save_s = []
    for _ in range(2):  # timed warm too (the first save imports and allocates)
        start = clock()
        save_checkpoint(ckpt, model, None, None, 0, replace(tcfg, epochs=0), classes, [],
                        best_metrics["val_accuracy"], refines)
        save_s.append(clock() - start)
    # Budget reserved after the last batch: one validation and one checkpoint, so they end in time.
    reserve = eval_s + min(save_s)
    every_epoch = not expanding if cfg.validate_every_epoch is None else cfg.validate_every_epoch
    # What the plan charges to every epoch after its batches, and once more at the end: validated every
    # epoch, the reserve each time; else nothing per epoch (the re-plan measures what the logging
    # costs) and the reserve once, for the last epoch's validation.
    epoch_reserve, final_reserve = (reserve, 0.0) if every_epoch else (0.0, reserve)
    best_epoch, best_state = 0, copy.deepcopy(model.state_dict())

    # The old images most like the new classes, by the base model's features: a share of every
    # epoch's replay comes from them (`confusable_replay`: a uniform sample under-represents them).
    ranked = None
    if cfg.hard_replay_share > 0 and cfg.replay_share > 0:
        # A refined class's parent is not a confusion to replay against: its images are the nearest
        # (86 % of the top of the ranking on the merchant world) and the refinement rule answers them.
        parents = [classes.index(p) for c, p in refines.items() if c in cfg.new_classes]
        ranked = confusable_ranking(teacher, train, [classes.index(c) for c in focus_classes], device,
                                    torch.Generator().manual_seed(seed), exclude=parents)
    first_epoch = training_set(train, focus_classes, cfg.replay_share, seed, ranked, cfg.hard_replay_share)
    epoch_images = len(first_epoch)
    # Every epoch has the same class counts (all focus images, fixed replay quotas): one correction.
    # Not for an expanded model: its classes' biases live in two layers, and the base's never saw the prior.
    offset = None if isinstance(model, ExpandedRecognizer) else (
        cfg.prior_correction_scale * prior_correction(train.labels, first_epoch.labels, len(classes)))
    n_focus = sum(int((train.labels == classes.index(c)).sum()) for c in focus_classes)
    images_per_s = 0.0
    per_epoch = math.ceil(epoch_images / tcfg.batch_size)
    steps = (cfg.epochs or 1) * per_epoch
    if clock() + reserve < deadline:
        images_per_s = measure_throughput(model, train, tcfg, device, clock=clock, step=step)
        left = (deadline - clock()) * PLAN_HEADROOM - final_reserve
        if not cfg.epochs:
            steps = plan_steps(epoch_images, tcfg.batch_size, images_per_s, left, epoch_reserve, cfg.max_epochs)
    tcfg = replace(tcfg, epochs=math.ceil(steps / per_epoch))

    head_params = {id(p) for p in classifier_layer(model).parameters()}
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if id(p) not in head_params and p.requires_grad], "lr": lr},
         {"params": list(classifier_layer(model).parameters()), "lr": lr * cfg.head_lr_scale}],
        weight_decay=tcfg.weight_decay)
    # A cosine to zero over `plan["steps"]`, read at every step: the plan may change after epoch 1.
    plan = {"steps": max(steps, 1)}
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, plan["steps"]) / plan["steps"])))
    generator = torch.Generator()
    history: list[dict[str, float]] = []
    stopped = False
    epoch = 0
    # What an epoch costs after its batches (validation, checkpoint, the progress callback's logging),
    # as the last epoch measured it; with drawing the epoch's sample, the re-plan charges it to every
    # epoch to come. A fixed cost per epoch, not per image: a last part of an epoch pays it in full.
    after_batches = epoch_reserve

    def validate(entry: dict) -> None:
        # Validated, kept and saved with the data's class prior put back; training goes on without it.
        with _bias_offset(model, offset):
            val_metrics, recall, at_threshold = _val_metrics(predict_proba(model, val, device), val.labels,
                                                             classes, **judge)
            drop = largest_drop(at_threshold, kept_before)
            entry.update(val_metrics, val_largest_old_class_drop=drop)
            keeper.add(EvaluatedEpoch(entry["epoch"], drop, val_metrics["val_balanced_recall_at_threshold"],
                                      (val_metrics, recall, copy.deepcopy(model.state_dict()))))

    while epoch < math.ceil(plan["steps"] / per_epoch):
        epoch += 1
        generator.manual_seed(seed + 1_000_003 * epoch)
        torch.manual_seed(seed + 1_000_003 * epoch)
        epoch_start = clock()
        # A fresh replay sample every epoch: same size, more of the old data seen over the run.
        split = training_set(train, focus_classes, cfg.replay_share, seed + epoch, ranked, cfg.hard_replay_share)
        order = torch.randperm(len(split), generator=generator)
        sampled = clock()
        loss_sum, correct, seen = 0.0, 0.0, 0
        # The planned last epoch may be a part of one: the schedule ends at the planned steps.
        for first in range(0, min(len(split), (plan["steps"] - (epoch - 1) * per_epoch) * tcfg.batch_size),
                           tcfg.batch_size):
            if clock() + reserve >= deadline:
                stopped = True
                break
            batch = take(split, order[first:first + tcfg.batch_size])
            m = step(model, batch, optimizer, scheduler, generator)
            loss_sum += m["train_loss"] * len(batch)
            correct += m["train_accuracy"] * len(batch)
            seen += len(batch)
        if not seen:
            break
        trained = clock()
        if seen == len(split) and not cfg.epochs and not stopped:  # a whole epoch: plan the rest on its pace
            pace = seen / max(trained - sampled, 1e-9)
            plan["steps"] = replan_steps(plan["steps"], epoch, epoch_images, tcfg.batch_size, pace,
                                         (deadline - trained) * REPLAN_HEADROOM - final_reserve,
                                         sampled - epoch_start + after_batches, cfg.max_epochs)
            tcfg = replace(tcfg, epochs=max(epoch, math.ceil(plan["steps"] / per_epoch)))
        entry = {"epoch": epoch, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                 "epochs_planned": tcfg.epochs, "lr": scheduler.get_last_lr()[0], "epoch_fraction": seen / len(split)}
        if every_epoch or stopped or epoch >= math.ceil(plan["steps"] / per_epoch):  # else: not the last
            validate(entry)
        entry["seconds"] = clock() - t0
        history.append(entry)
        if on_epoch:
            on_epoch(epoch, {k: v for k, v in entry.items() if k != "epoch"})
        after_batches = max(epoch_reserve, clock() - trained)
        if stopped:
            break
    if history and "val_accuracy" not in history[-1]:
        # The budget ran out as the next epoch began: the last trained epoch was not validated yet.
        validate(history[-1])

    if keeper.kept is not None:
        best_epoch, (best_metrics, best_recall, best_state) = keeper.kept.epoch, keeper.kept.kept_with
    model.load_state_dict(best_state)
    if best_epoch:  # saved once, at the end (the budget's reserve): a later epoch may move the choice back
        save_checkpoint(ckpt, model, None, None, best_epoch, tcfg, classes, history, best_metrics["val_accuracy"],
                        refines)
    model.eval().cpu()
    return FineTuneResult(
        model=model, classes=classes, checkpoint_path=ckpt, new_classes=list(cfg.new_classes),
        changed_classes=list(cfg.changed_classes), epochs_planned=tcfg.epochs, epochs_run=len(history),
        stopped_by_budget=stopped, seconds=clock() - t0, budget_s=cfg.budget_s, images_per_s=images_per_s,
        train_images=epoch_images, replay_images=epoch_images - n_focus, best_epoch=best_epoch,
        best_val_accuracy=best_metrics["val_accuracy"],
        best_val_balanced_accuracy=best_metrics["val_balanced_accuracy"],
        recall_before=recall_before, recall_after=best_recall, lr=lr, history=history,
        method="expand" if expanding else "grow",
    )
