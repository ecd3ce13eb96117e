"""The fast-retrain tests' world: the shapes dataset before `triangle` existed, and a base trained on it."""

from __future__ import annotations

import torch

from tasks.data.loading import TensorSplit

OLD = ["circle", "square"]


def only(split: TensorSplit, classes: list[str]) -> TensorSplit:
    """The images of `classes`, relabelled onto that list: a dataset as it was before a class existed."""
    keep = torch.tensor([split.classes.index(c) for c in classes])
    idx = torch.nonzero(torch.isin(split.labels, keep)).flatten()
    labels = torch.tensor([classes.index(split.classes[y]) for y in split.labels[idx].tolist()])
    return TensorSplit(split.images[idx], labels, list(classes), [split.paths[i] for i in idx.tolist()])
