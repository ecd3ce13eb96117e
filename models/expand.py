"""Adding classes to a trained recogniser without moving anything it already answers.

`models.head.grow_classifier` adds rows to the classifier and then fine-tunes the whole upper
network, so every old answer can move. `expand_recognizer` instead keeps the base recogniser whole
and frozen, and gives the new classes their own copy of its upper layers (a *branch*: the stages
after the first `shared_stages`, the head conv and a Linear with one row per new class), fed by the
base's lower layers, which both share:

    image -> stem, stages[:k] (base, frozen) -+-> stages[k:], conv_head, classifier (base, frozen) -> old logits
                                              +-> stages[k:], conv_head, classifier (branch, trained) -> new logits

The logits are the base's, bit for bit, followed by the branch's. An old-class answer can change
only where a new class's logit rises over it, so a fast retrain's effect on the old classes is
exactly the new classes' false positives, which the training can see and be weighted against.
This is the expansion of Yan et al. 2021, "DER: Dynamically Expandable Representation for Class
Incremental Learning" (a frozen old extractor beside a new one), sharing the generic lower layers to
keep the cost down: on saofu_fu at 64 px the stem and the first stage (the 32x32 maps); the branch
runs from the 16x16 maps down. Sharing two stages instead (the branch on 8x8 and 4x4 maps) trains
twice the epochs in a fast retrain's budget, but learnt less: 45-s fine-tunes, five seeds, the last
epoch, held-out fonts, (new-class recall, largest old-class drop in points): (0.900, 0.39) against
(0.867, 0.29) on one world, (0.967, 0.49) against (0.965, 0.59) on the fast-retrain bench's; the
price is 42 % more FLOPs for the expanded model (7.6 against 5.3 M at 64 px, unpruned;
docs/fine_tune_measurements.md). The branch starts as a copy of the base's layers and the new rows
as `grow_classifier` would start them (a refining class from its parent's row, lowered), so before
training the expanded model predicts exactly what the base did.

A *parent gate* (`parent_gate` S > 0, off by default) keeps a refining class from taking images the
base is sure of: wherever the base's own softmax puts at least S on an old class other than the one
the new class refines, the new class's logit is held `GATED_MARGIN` nats under the base's largest,
so the answer there is the base's. The gate decides answers, not training: it acts in eval mode
only, so the branch learns from every image. It pays where the base reads the look-alikes a new
class confuses: on the fast-retrain bench at 96 px, five draws' median (new-class recall, largest
old-class drop in points) was (0.979, 0.59) without it and (0.962, 0.42) shipped with it at 0.99;
at 64 px, where the base is unsure of those very images, it gave (0.945, 0.69) re-decided post hoc
(docs/fine_tune_measurements.md).

Only a saofu `Recognizer` can be expanded (it has named stages); `can_expand` says whether a model can.
The result rebuilds from its checkpoint like any model: `models.build_from_checkpoint_meta` knows
``saofu_expanded`` (not a registry name: nothing trains one from scratch) and the base's meta inside.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from models.head import DEFAULT_REFINE_LOGIT_OFFSET, check_new_classes, new_class_rows
from models.recognizer import Recognizer
from saofu.errors import SaofuError

EXPANDED_MODEL = "saofu_expanded"  # its `model_name` in checkpoints (no registry factory builds one)
DEFAULT_SHARED_STAGES = 1  # stem + one stage: the 32x32 maps of saofu_fu at 64 px (module docstring)
# How far under the base's largest logit a gated new class is held: its probability is then at most
# e^-10 (4.5e-5) of the base's answer's, and the logits' range (which INT8 calibration reads) barely grows.
GATED_MARGIN = 10.0


class ParentGate(nn.Module):
    """Holds each refining new class's logit down where the base is sure of a class other than its parent.

    `parents[j]` is the base class new class j refines, or -1 (a class that refines nothing of the
    base's is never gated: the base is always sure of *some* class it knows). Only in eval mode.
    Its own module, so its ONNX nodes carry `parent_gate` in their names: the INT8 quantizer leaves
    them in float (a 0.99 threshold on a u8 softmax would move by 1/255 steps).
    """

    def __init__(self, base_classes: int, parents: Sequence[int], sure: float = 0.0):
        super().__init__()
        others = torch.zeros(len(parents), base_classes)
        for j, parent in enumerate(parents):
            if parent >= 0:
                others[j] = 1.0
                others[j, parent] = 0.0
        self.register_buffer("others", others, persistent=False)  # rebuilt from the meta, not the weights
        self.parents = [int(p) for p in parents]
        self.sure = float(sure)

    def forward(self, old: Tensor, new: Tensor) -> Tensor:
        if self.training or self.sure <= 0 or not any(p >= 0 for p in self.parents):
            return new
        probs = old.softmax(1)  # the base's answer alone: the expanded model keeps its logits
        other = (probs.unsqueeze(1) * self.others).amax(2)  # (N, new): its surest class that is not the parent
        held = torch.minimum(new, old.amax(1, keepdim=True) - GATED_MARGIN)
        return torch.where(other >= self.sure, held, new)


class ExpandedRecognizer(nn.Module):
    """A frozen base recogniser plus a branch that answers the classes added after it."""

    def __init__(self, base: Recognizer, new_classes: int, shared_stages: int = DEFAULT_SHARED_STAGES,
                 parent_gate: float = 0.0, gate_parents: Sequence[int] | None = None):
        """Args:
            base: the trained recogniser (its weights are kept frozen and in eval mode).
            new_classes: how many classes the branch answers, >= 1.
            shared_stages: leading stages of `base` the branch reads from (0 .. its stage count - 1).
            parent_gate: the `ParentGate`'s certainty (0: off).
            gate_parents: per new class, the index of the base class it refines, or -1 (none: all -1).
        """
        super().__init__()
        stages = len(base.stages)
        if not 0 <= shared_stages < stages:
            raise SaofuError(f"shared_stages must be between 0 and {stages - 1} for this model, got {shared_stages}")
        if new_classes < 1:
            raise SaofuError(f"an expanded recogniser needs at least one new class, got {new_classes}")
        self.base = base
        self.shared_stages = shared_stages
        self.branch_stages = copy.deepcopy(nn.Sequential(*list(base.stages)[shared_stages:]))
        self.branch_head = copy.deepcopy(base.conv_head)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = copy.deepcopy(base.dropout)
        # The new classes' rows: named `classifier` so `models.head.classifier_layer` finds them
        # (the fine-tune trains the rows a class lives in at the head's own rate).
        self.classifier = nn.Linear(base.num_features, new_classes)
        parents = [-1] * new_classes if gate_parents is None else [int(p) for p in gate_parents]
        if len(parents) != new_classes or any(not -1 <= p < base.num_classes for p in parents):
            raise SaofuError(f"gate_parents must name a base class (0 .. {base.num_classes - 1}) or -1 for each "
                             f"of the {new_classes} new classes, got {parents}")
        self.parent_gate = ParentGate(base.num_classes, parents)
        self.set_parent_gate(parent_gate)
        self.num_classes = base.num_classes + new_classes
        self.in_chans = base.in_chans
        self.num_features = base.num_features
        self.arch_string = f"expanded{shared_stages}({base.arch_string})"
        self.model_name = EXPANDED_MODEL
        self._base_meta = _meta_of(base)  # its architecture: fixed, whatever training does to its weights
        self.default_input_size = getattr(base, "default_input_size", None)
        self.freeze_base()

    def freeze_base(self) -> None:
        """No gradient into the base, and its BatchNorm kept in eval mode (`forgetting.train_mode`)."""
        self.base.requires_grad_(False)
        self.base.saofu_frozen = True  # read by tasks.train.forgetting.train_mode; survives deepcopy
        self.base.eval()

    def unfreeze_base(self) -> None:
        """Let the base train too: a correction to one of its own classes has to move its weights."""
        self.base.requires_grad_(True)
        self.base.saofu_frozen = False

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """What `models.model_meta` saves; `models.build_from_checkpoint_meta` rebuilds from it."""
        return {"base": self._base_meta, "shared_stages": self.shared_stages, "parent_gate": self.parent_gate.sure,
                "gate_parents": list(self.parent_gate.parents)}

    def set_parent_gate(self, sure: float) -> None:
        """Gate the refining new classes at certainty `sure` (0: off)."""
        if not 0 <= sure <= 1:
            raise SaofuError(f"parent_gate must be between 0 (off) and 1, got {sure}")
        self.parent_gate.sure = float(sure)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, base classes + new classes): the base's, then the branch's (gated in eval mode)."""
        base = self.base
        h = base.stages[:self.shared_stages](base.stem(x))
        old = base.forward_head(base.conv_head(base.stages[self.shared_stages:](h)))
        new = self.classifier(self.dropout(self.flatten(self.global_pool(self.branch_head(self.branch_stages(h))))))
        return torch.cat([old, self.parent_gate(old, new)], 1)


def can_expand(model: nn.Module) -> bool:
    """Whether `expand_recognizer` takes this model: a saofu `Recognizer` with two or more stages, or
    one expanded already (its branch then takes the new classes too)."""
    return isinstance(model, ExpandedRecognizer) or (isinstance(model, Recognizer) and len(model.stages) >= 2)


def expand_recognizer(
    model: nn.Module,
    old_classes: Sequence[str],
    new_classes: Sequence[str],
    refines: Mapping[str, str] | None = None,
    refine_logit_offset: float = DEFAULT_REFINE_LOGIT_OFFSET,
    generator: torch.Generator | None = None,
    shared_stages: int = DEFAULT_SHARED_STAGES,
    parent_gate: float = 0.0,
) -> ExpandedRecognizer:
    """`model` (copied, frozen) with a branch answering `new_classes`, appended after the old ones.

    The new rows start as `grow_classifier` starts them, and the branch's layers as copies of the
    base's: the untrained expanded model answers every image as `model` does. A model expanded
    already keeps its base and branch; the branch's classifier grows by the new rows (`new_classes`
    may then be empty: a copy). `shared_stages` is capped at the model's stage count minus one, so
    the default (2) still leaves a two-stage model a branch of its last stage. `parent_gate` sets the
    `ParentGate` of every refining class whose parent is one of the base's classes (0: off), a model
    expanded already included: the caller's setting wins.

    Raises:
        SaofuError: a model that cannot be expanded (`can_expand`), no new classes, or class lists
            that do not fit (`check_new_classes`).
    """
    if not can_expand(model):
        raise SaofuError(f"only a saofu Recognizer with two or more stages can be expanded, not "
                         f"{type(model).__name__}")
    check_new_classes(old_classes, new_classes, refines)
    if isinstance(model, ExpandedRecognizer):
        return _grow_branch(model, old_classes, new_classes, refines or {}, refine_logit_offset, generator,
                            parent_gate)
    base = copy.deepcopy(model)
    shared = min(shared_stages, len(base.stages) - 1)
    expanded = ExpandedRecognizer(base, len(new_classes), shared, parent_gate,
                                  _gate_parents(old_classes, new_classes, refines or {}, base.num_classes))
    head = base.classifier
    rows, biases = new_class_rows(head.weight.detach(), head.bias.detach() if head.bias is not None else None,
                                  old_classes, new_classes, refines, refine_logit_offset, generator)
    with torch.no_grad():
        expanded.classifier.weight.copy_(rows)
        expanded.classifier.bias.copy_(biases)
    param = next(model.parameters())
    expanded = expanded.to(param.device, param.dtype)
    expanded.requires_grad_(True)
    expanded.freeze_base()  # after requires_grad_(True): the base stays frozen
    return expanded


def _grow_branch(model: ExpandedRecognizer, old_classes: Sequence[str], new_classes: Sequence[str],
                 refines: Mapping[str, str], refine_logit_offset: float,
                 generator: torch.Generator | None, parent_gate: float) -> ExpandedRecognizer:
    """A copy of an expanded model whose branch answers `new_classes` too (rows as `grow_classifier`'s)."""
    if len(old_classes) != model.num_classes:
        raise SaofuError(f"the model has {model.num_classes} outputs but {len(old_classes)} old classes were "
                         f"given: {list(old_classes)}")
    grown = copy.deepcopy(model)
    old = model.classifier
    # Every class's row, the base's then the branch's: a refining class starts from its parent's.
    weights = torch.cat([model.base.classifier.weight, old.weight]).detach()
    biases = torch.cat([model.base.classifier.bias, old.bias]).detach()
    rows, row_biases = new_class_rows(weights, biases, old_classes, new_classes, refines, refine_logit_offset,
                                      generator)
    layer = nn.Linear(old.in_features, old.out_features + len(new_classes)).to(old.weight.device, old.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.cat([old.weight, rows]))
        layer.bias.copy_(torch.cat([old.bias, row_biases]))
    grown.classifier = layer
    grown.num_classes = model.num_classes + len(new_classes)
    parents = model.parent_gate.parents + _gate_parents(old_classes, new_classes, refines, model.base.num_classes)
    grown.parent_gate = ParentGate(model.base.num_classes, parents).to(old.weight.device)
    grown.set_parent_gate(parent_gate)
    grown.freeze_base()
    return grown


def _gate_parents(old_classes: Sequence[str], new_classes: Sequence[str], refines: Mapping[str, str],
                  base_classes: int) -> list[int]:
    """Per new class, the index of the base class it refines; -1 where it refines none of the base's."""
    base = list(old_classes[:base_classes])
    return [base.index(refines[c]) if refines.get(c) in base else -1 for c in new_classes]


def _meta_of(model: nn.Module) -> dict[str, Any]:
    from models.registry import model_meta  # registry imports this module (to rebuild expanded checkpoints)

    return model_meta(model)

