"""What a fine-tune replays of the old classes: a class-stratified sample, part of it the old
images that look most like the new classes.

A fast retrain (`tasks.train.fine_tune`) trains every image of its new (or changed) classes and
only a sample of the old ones, drawn afresh every epoch (`training_set`). A uniform sample
under-represents exactly the old images the change puts at risk: in the Fu world, ``fu_merchant``
is 福 in one merchant's frame, and ``not_fu`` holds decoys in that same frame (15 % of it). An epoch
of all 2,450 merchant images and a 2,450-image replay holds ~180 decoys, 13 merchant-framed
``fu_merchant`` images to each decoy against 2.7 in the data, so the cheapest rule the model can
learn is "the frame means ``fu_merchant``", and ``not_fu`` pays for it (measured: the largest
old-class drop of the fast retrain was ``not_fu``'s, 1.4-1.7 points).

So the old training images are ranked by how close the base model's penultimate features put
them to the new classes (cosine similarity to the nearest new-class centroid,
`confusable_ranking`), and `hard_share` of every epoch's replay is taken from the top of that
ranking (hard-negative replay, as exemplar selection near the decision boundary in
class-incremental learning: Rebuffi et al. 2017, iCaRL; Bang et al. 2021, "Rainbow Memory"). It
needs no knowledge of the world: the base model already sees the frame, it was only never asked
to tell 福 in it from a decoy. Cost: one forward pass of the base model over (at most
`max_scored`) old training images and the new ones, a few seconds on 2 CPU cores at 64 px.

What it did, measured (`tasks.train.fine_tune`'s notes): nothing the draw-to-draw noise does not
hide, so `FineTuneConfig.hard_replay_share` is 0 by default. The nearest old images were not the
decoys: 86 % of the top of the ranking on the merchant world was ``fu`` itself, the class
``fu_merchant`` refines, which the fine-tune now leaves out of the ranking (`exclude`); with the
decoys on top, ``not_fu`` still fell 0.9-2.0 points.
"""


from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saofu.errors import SaofuError
from tasks.data.loading import TensorSplit
from tasks.data.preprocess import normalize, to_float
from tasks.train.loop import inference_batch


@torch.no_grad()
def embeddings(model: nn.Module, images: Tensor, device: torch.device, batch_size: int | None = None) -> Tensor:
    """L2-normalised penultimate features [N, D] of uint8 images [N, C, H, W], in eval mode
    (batches: `loop.inference_batch`).

    Any saofu model (`Recognizer`, `TorchvisionRecognizer`) has `forward_features` and
    `forward_head(pre_logits=True)`; a model without them is embedded by its logits.
    """
    batch_size = batch_size or inference_batch(model, device)
    was_training = model.training
    model.eval()
    out = []
    for first in range(0, len(images), batch_size):
        x = normalize(to_float(images[first:first + batch_size].to(device)))
        if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
            feats = model.forward_head(model.forward_features(x), pre_logits=True)
        else:
            feats = model(x)
        out.append(F.normalize(feats.float().flatten(1), dim=1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def similarity_to_classes(old: Tensor, focus: Tensor, focus_labels: Tensor) -> Tensor:
    """Each old image's cosine similarity [N_old] to the nearest centroid of a focus class."""
    centroids = torch.stack([F.normalize(focus[focus_labels == c].mean(0), dim=0)
                             for c in focus_labels.unique()])
    return (old @ centroids.T).max(1).values


def confusable_ranking(model: nn.Module, train: TensorSplit, focus: Sequence[int], device: torch.device,
                       generator: torch.Generator, max_scored: int = 8000, exclude: Sequence[int] = ()) -> Tensor:
    """Indices into `train` of old-class images (outside `focus` and `exclude`), most like the focus classes first.

    At most `max_scored` old images are scored (a seeded random subset beyond that: the ranking
    only needs enough of the near ones, not all of them); the focus classes' centroids come from
    at most as many of their own images.
    """
    focus_t = torch.tensor(list(focus), dtype=train.labels.dtype)
    in_focus = torch.isin(train.labels, focus_t)
    skipped = torch.isin(train.labels, torch.tensor(list(exclude), dtype=train.labels.dtype))
    old_idx, focus_idx = torch.nonzero(~in_focus & ~skipped).flatten(), torch.nonzero(in_focus).flatten()
    if not len(old_idx) or not len(focus_idx):
        return torch.zeros(0, dtype=torch.int64)
    if len(old_idx) > max_scored:
        old_idx = old_idx[torch.randperm(len(old_idx), generator=generator)[:max_scored]]
    if len(focus_idx) > max_scored:
        focus_idx = focus_idx[torch.randperm(len(focus_idx), generator=generator)[:max_scored]]
    sims = similarity_to_classes(embeddings(model, train.images[old_idx], device),
                                 embeddings(model, train.images[focus_idx], device), train.labels[focus_idx])
    return old_idx[sims.argsort(descending=True)]


def take(split: TensorSplit, idx: Tensor) -> TensorSplit:
    return TensorSplit(split.images[idx], split.labels[idx], split.classes, [split.paths[i] for i in idx.tolist()])


def replay_count(n_focus: int, n_available: int, share: float) -> int:
    """Replay images that make `share` of an epoch of `n_focus` focus images (at most all available)."""
    if not 0.0 <= share < 1.0:
        raise SaofuError(f"replay_share must be >= 0 and < 1, got {share!r}")
    return min(n_available, round(n_focus * share / (1.0 - share)))


def _stratified_quota(counts: list[int], n: int) -> list[int]:
    """Split `n` draws over classes in proportion to `counts`, at least one per non-empty class.

    Proportional, so the old classes keep the mix the base model was trained on; the floor of one
    keeps a rare class in every epoch. Largest remainders round the shares to whole images.
    """
    quota = [0] * len(counts)
    present = [i for i, c in enumerate(counts) if c > 0]
    if n <= 0 or not present:
        return quota
    if n < len(present):  # fewer draws than classes: the largest classes get one each
        for i in sorted(present, key=lambda i: -counts[i])[:n]:
            quota[i] = 1
        return quota
    for i in present:
        quota[i] = 1
    rest, spare = n - len(present), [max(counts[i] - 1, 0) for i in range(len(counts))]
    total = sum(spare)
    if rest and total:
        exact = [rest * s / total for s in spare]
        floors = [math.floor(e) for e in exact]
        left = rest - sum(floors)
        for i in sorted(range(len(counts)), key=lambda i: floors[i] - exact[i])[:left]:
            floors[i] += 1
        quota = [q + f for q, f in zip(quota, floors)]
    return quota


def replay_sample(labels: Tensor, focus: Sequence[int], share: float, generator: torch.Generator,
                  ranked: Tensor | None = None, hard_share: float = 0.0) -> Tensor:
    """Indices of a replay sample of the images outside the `focus` classes.

    Args:
        labels: int64 labels of the training split.
        focus: class indices trained in full (new and changed classes); never sampled.
        share: the sample's share of focus images + sample, in [0, 1).
        generator: draws the sample (seeded runs).
        ranked: old-class indices, most like the focus classes first (`confusable_ranking`).
        hard_share: share of the sample drawn from the top of `ranked`, whatever their class (from
            its first 2 x that many, so epochs differ); the rest is class-stratified and random.

    Returns:
        Sorted int64 indices into `labels`.

    The hard share is drawn across classes, not out of each class's quota, so it goes to the
    classes the new ones look like (one draw, from an unpruned base: ``not_fu`` lost 0.69 points
    with it, 1.76 when it came out of each class's quota; within the noise of draws, see the
    module's notes).
    """
    focus_mask = torch.isin(labels, torch.tensor(list(focus), dtype=labels.dtype))
    n = replay_count(int(focus_mask.sum()), int((~focus_mask).sum()), share)
    hard = torch.zeros(0, dtype=torch.int64)
    if ranked is not None and len(ranked) and hard_share > 0:
        n_hard = min(round(n * hard_share), len(ranked))
        top = ranked[:2 * n_hard]
        hard = top[torch.randperm(len(top), generator=generator)[:n_hard]]
    rest = ~focus_mask
    rest[hard] = False
    old_classes = sorted(set(labels[rest].tolist()))
    pools = [torch.nonzero(rest & (labels == c)).flatten() for c in old_classes]
    picked = [pool[torch.randperm(len(pool), generator=generator)[:q]]
              for pool, q in zip(pools, _stratified_quota([len(p) for p in pools], n - len(hard)))]
    return torch.cat([hard, *picked]).sort().values


def training_set(train: TensorSplit, focus_classes: Sequence[str], replay_share: float, seed: int,
                 ranked: Tensor | None = None, hard_share: float = 0.0) -> TensorSplit:
    """Every image of `focus_classes` plus a seeded replay sample of the other classes (`replay_sample`)."""
    focus = [train.classes.index(c) for c in focus_classes]
    in_focus = torch.nonzero(torch.isin(train.labels, torch.tensor(focus, dtype=torch.int64))).flatten()
    replay = replay_sample(train.labels, focus, replay_share, torch.Generator().manual_seed(seed), ranked, hard_share)
    return take(train, torch.cat([in_focus, replay]).sort().values)
