"""Growing a recogniser's classifier by new classes, keeping everything it already knows.

A fast retrain adds a class to a trained model instead of training a new one. `grow_classifier`
returns a copy whose last Linear layer has one more output row per new class: the old rows, the
biases and every other weight are copied unchanged, so on any input the old classes' logits are
the base model's, bit for bit, and old class indices never move (new classes are appended).

A new class that *refines* an old one (``fu_merchant`` refines ``fu``) starts as a copy of its
parent's row with the bias lowered by `refine_logit_offset`: its logit is then the parent's minus
that offset on every input, so the parent still wins every argmax (the grown model predicts
exactly what the base did) while the child already responds to the parent's features and holds a
fixed share of the parent's probability (1/4 of it by default, e^-offset). Training only has to
tell parent and child apart, not to find the child's features from nothing. Other new classes
start like a fresh head (`recognizer.init_weights`: N(0, 0.01) weights, zero bias).

Works for every recogniser `create_model` builds: the saofu `Recognizer` (``classifier`` is the
Linear) and the torchvision baselines (``classifier`` is a Sequential ending in the Linear). The
grown model's ``num_classes`` is updated, so `model_meta` / `build_from_checkpoint_meta` rebuild it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from saofu.errors import SaofuError

# e^-offset is the child's initial share of its parent's probability: 1/4 keeps the parent's
# argmax everywhere and most of its confidence, and is small enough to close in a few steps.
DEFAULT_REFINE_LOGIT_OFFSET = math.log(4.0)
NEW_ROW_STD = 0.01  # what init_weights gives a fresh classifier


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The Linear layer that produces the logits of a recogniser.

    Args:
        model: a `Recognizer` or `TorchvisionRecognizer` (anything whose ``classifier`` is a
            Linear or a Sequential ending in one).

    Returns:
        That Linear layer (a module of `model`, not a copy).

    Raises:
        SaofuError: the model has no such layer.
    """
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Sequential) and len(head) and isinstance(head[-1], nn.Linear):
        return head[-1]
    if isinstance(head, nn.Linear):
        return head
    raise SaofuError(f"{type(model).__name__} has no classifier Linear layer to grow: expected "
                     "`classifier` to be an nn.Linear or an nn.Sequential ending in one")


def _set_classifier_layer(model: nn.Module, layer: nn.Linear) -> None:
    if isinstance(model.classifier, nn.Sequential):
        model.classifier[len(model.classifier) - 1] = layer
    else:
        model.classifier = layer


def check_new_classes(old_classes: Sequence[str], new_classes: Sequence[str],
                      refines: Mapping[str, str] | None = None) -> None:
    """Raise SaofuError unless `new_classes` can be appended to `old_classes` as `refines` says.

    Args:
        old_classes: the model's classes, in logit order.
        new_classes: classes to append; none of them may be an old class, none repeated.
        refines: new class -> the old class it refines (a subset of the new classes).
    """
    if len(set(old_classes)) != len(old_classes):
        raise SaofuError(f"old classes repeat a name: {list(old_classes)}")
    if len(set(new_classes)) != len(new_classes):
        raise SaofuError(f"new classes repeat a name: {list(new_classes)}")
    clash = [c for c in new_classes if c in old_classes]
    if clash:
        raise SaofuError(f"new classes {clash} are already classes of the model {list(old_classes)}; "
                         "to retrain an existing class with corrected labels, name it as changed, not new")
    for child, parent in (refines or {}).items():
        if child not in new_classes:
            raise SaofuError(f"refines names {child!r}, which is not one of the new classes {list(new_classes)}")
        if parent not in old_classes:
            raise SaofuError(f"{child!r} refines {parent!r}, which is not one of the model's classes "
                             f"{list(old_classes)}")


def _check_offset(refine_logit_offset: float) -> None:
    if not (math.isfinite(refine_logit_offset) and refine_logit_offset >= 0):
        raise SaofuError(f"refine_logit_offset must be a finite number >= 0, got {refine_logit_offset!r}")


def new_class_rows(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    old_classes: Sequence[str],
    new_classes: Sequence[str],
    refines: Mapping[str, str] | None,
    refine_logit_offset: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting classifier rows and biases for `new_classes`, given the old classes' `weight` rows and `bias`.

    A class refining an old one starts as its parent's row with the bias lowered by
    `refine_logit_offset`; any other as a fresh row (N(0, `NEW_ROW_STD`), bias 0). Shared by
    `grow_classifier` and `models.expand`, so a new class starts alike whichever way it is added.
    """
    _check_offset(refine_logit_offset)
    refines = refines or {}
    rows = (torch.randn(len(new_classes), weight.shape[1], generator=generator) * NEW_ROW_STD).to(weight)
    biases = torch.zeros(len(new_classes), device=weight.device, dtype=weight.dtype)
    for i, name in enumerate(new_classes):
        parent = refines.get(name)
        if parent is not None:
            p = list(old_classes).index(parent)
            rows[i] = weight[p]
            biases[i] = (bias[p] if bias is not None else 0.0) - refine_logit_offset
    return rows, biases


def grow_classifier(
    model: nn.Module,
    old_classes: Sequence[str],
    new_classes: Sequence[str],
    refines: Mapping[str, str] | None = None,
    refine_logit_offset: float = DEFAULT_REFINE_LOGIT_OFFSET,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """A copy of `model` whose classifier has one more output row per new class.

    Class order of the result: `old_classes` in their order, then `new_classes` in theirs, so an
    old class keeps its index. `model` itself is left unchanged.

    Args:
        model: a recogniser built by `models.create_model`, trained on `old_classes`.
        old_classes: its classes, in logit order (``len == model.num_classes``).
        new_classes: classes to append (may be empty: then the copy is the same model).
        refines: new class -> old class it refines; such a class starts from its parent's row
            (weights copied, bias lowered by `refine_logit_offset`).
        refine_logit_offset: how far below its parent's logit a refining class starts, >= 0.
        generator: draws the rows of new classes that refine nothing (seeded runs).

    Returns:
        The grown copy, same device, dtype and train/eval mode as `model`, ``num_classes`` updated.

    Raises:
        SaofuError: class lists that do not fit the model or each other, or a model without a
            classifier Linear layer.
    """
    check_new_classes(old_classes, new_classes, refines)
    _check_offset(refine_logit_offset)
    old = classifier_layer(model)
    if old.out_features != len(old_classes) or getattr(model, "num_classes", len(old_classes)) != len(old_classes):
        raise SaofuError(f"the model has {old.out_features} outputs but {len(old_classes)} old classes were "
                         f"given: {list(old_classes)}")
    grown = copy.deepcopy(model)
    if not new_classes:
        return grown
    n_old, n_new = len(old_classes), len(new_classes)
    weight, bias = old.weight.detach(), old.bias.detach() if old.bias is not None else None
    layer = nn.Linear(old.in_features, n_old + n_new, bias=bias is not None,
                      device=weight.device, dtype=weight.dtype)
    rows, row_biases = new_class_rows(weight, bias, old_classes, new_classes, refines, refine_logit_offset, generator)
    with torch.no_grad():
        layer.weight[:n_old], layer.weight[n_old:] = weight, rows
        if bias is not None:
            layer.bias[:n_old], layer.bias[n_old:] = bias, row_biases
    layer.weight.requires_grad_(old.weight.requires_grad)
    if bias is not None:
        layer.bias.requires_grad_(old.bias.requires_grad)
    _set_classifier_layer(grown, layer)
    grown.num_classes = n_old + n_new
    return grown
