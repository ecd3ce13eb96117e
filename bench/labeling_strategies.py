"""The labeling bench's auto-labelling strategies on probabilities already computed (no torch).

Every strategy auto-labels a subset of the pool with one model's top class; they differ in which
probabilities vote and how. Votes are named views of the two models' probabilities:

    a, b            model A (the champion) and model B (the second model), as they are
    a_tta, b_tta    the same models under test-time augmentation (`tasks.labeling.tta`)
    <view>_cal      a view after temperature scaling fitted on labelled held-out data
                    (`tasks.labeling.calibration`)

The dual strategies are all the pipeline's rule (`select_batch`: both agree, both >= threshold)
on different pairs of views (`DUAL_RULES`); `single` is model A's confidence alone; `random` takes
as many images as `dual`, drawn at random (the control: precision differences are the selection's).
The target mode (`target_mode`) chooses its threshold per draw for a wanted precision on a
labelled validation slice instead of taking one by hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from tasks.labeling.active_learning import select_batch
from tasks.labeling.calibration import Calibration, calibrate, dual_scores, threshold_for_precision

THRESHOLDS = (0.8, 0.9, 0.95, 0.98)
# dual strategy -> (model A's view, model B's view) it votes with. Order = table order.
DUAL_RULES = {
    "dual": ("a", "b"),
    "dual_tta": ("a_tta", "b"),  # what the active-learning flow does by default (`champion_tta`)
    "dual_cal": ("a_cal", "b_cal"),
    "dual_tta_cal": ("a_tta_cal", "b_cal"),
    "dual_tta_both_cal": ("a_tta_cal", "b_tta_cal"),  # the committee: both models under TTA
}
STRATEGIES = ("dual", "dual_tta", "dual_cal", "dual_tta_cal", "dual_tta_both_cal", "single", "random")
# target mode -> the dual strategy whose calibrated scores it thresholds. `target` follows the
# pipeline's default vote (champion under TTA); `target_tta_both` the committee's.
TARGET_RULES = {"target": "dual_tta_cal", "target_tta_both": "dual_tta_both_cal"}
TARGET_PRECISION = 0.995
TARGET_SHARE = 0.60
TARGET_CONFIDENCE = 0.95  # of the precision interval the target mode's threshold must hold
MIN_DRAWS = 3  # "on the median of at least three draws"
# What active learning does when nobody changes its settings: the champion votes under TTA, both
# models temperature-scaled (`saofu active-learning --calibrate`, the default), threshold 0.9.
PIPELINE_DEFAULT = ("dual_tta_cal", 0.9)
# Share of the held-out slice the temperatures are fitted on; the rest measures the ECE and chooses
# the target modes' threshold, as active learning splits its val slice (`tasks.labeling.vote_calibration`):
# a threshold chosen on the images the temperatures were fitted to would get an optimistic estimate.
FIT_SHARE = 0.4


# ---------------------------------------------------------------------------------- calibration


def split_holdout(truth: np.ndarray, seed: int, fit_share: float = FIT_SHARE) -> tuple[np.ndarray, np.ndarray]:
    """(fit, check) indices of the held-out slice: `fit_share` of every class to fit temperatures on."""
    rng = np.random.default_rng([seed, 7])
    truth = np.asarray(truth)
    fit = np.zeros(len(truth), dtype=bool)
    for c in np.unique(truth):
        idx = rng.permutation(np.flatnonzero(truth == c))
        fit[idx[: round(fit_share * len(idx))]] = True
    return np.flatnonzero(fit), np.flatnonzero(~fit)


def calibrate_views(val_votes: Mapping[str, np.ndarray], val_truth: np.ndarray) -> dict[str, Calibration]:
    """One temperature per view, fitted on labelled held-out probabilities (`calibrate`)."""
    return {view: calibrate(probs, val_truth) for view, probs in val_votes.items()}


def with_calibrated(votes: Mapping[str, np.ndarray], calibrations: Mapping[str, Calibration]) -> dict[str, np.ndarray]:
    """`votes` plus `<view>_cal` for every view that has a calibration."""
    out = dict(votes)
    out.update({f"{view}_cal": calibrations[view].apply(votes[view]) for view in votes if view in calibrations})
    return out


# ---------------------------------------------------------------------------------- strategies


def strategy_masks(
    votes: Mapping[str, np.ndarray], classes: Sequence[str], threshold: float, rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Which pool images each strategy auto-labels, and the labels it writes.

    Args:
        votes: view name -> [N, C] probabilities; "a" and "b" are required, a dual strategy is
            included only when both of its views are there (`DUAL_RULES`).
        classes: the probabilities' columns.
        threshold: the confidence threshold (>=).
        rng: draws the random control.

    Returns:
        ({strategy: mask [N] bool}, {strategy: labels [N] class indices}) in STRATEGIES order; the
        labels are the top class of the strategy's model-A view (temperature never changes it).
    """
    probs_a = np.asarray(votes["a"])
    masks: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    for name, (view_a, view_b) in DUAL_RULES.items():
        if view_a in votes and view_b in votes:
            masks[name], _, _ = select_batch(votes[view_a], votes[view_b], classes, threshold)
            labels[name] = np.asarray(votes[view_a]).argmax(1)
    masks["single"], labels["single"] = probs_a.max(1) >= threshold, probs_a.argmax(1)
    random = np.zeros(len(probs_a), dtype=bool)
    random[rng.choice(len(probs_a), size=int(masks["dual"].sum()), replace=False)] = True
    masks["random"], labels["random"] = random, probs_a.argmax(1)
    order = [s for s in STRATEGIES if s in masks]
    return {s: masks[s] for s in order}, {s: labels[s] for s in order}


def mask_stats(mask: np.ndarray, labels: np.ndarray, truth: np.ndarray) -> dict:
    """Share auto-labelled, precision of those labels, wrong labels, human labels for the rest.

    Precision is None when nothing was auto-labelled (undefined, not 100%).
    """
    n, auto = len(mask), int(mask.sum())
    wrong = int((labels[mask] != truth[mask]).sum())
    return {
        "auto_labelled": auto,
        "share": auto / n if n else 0.0,
        "precision": (auto - wrong) / auto if auto else None,
        "wrong": wrong,
        "human_labels": n - auto,
    }


def wrong_by_true_class(mask: np.ndarray, labels: np.ndarray, truth: np.ndarray, classes: Sequence[str]) -> dict:
    """Wrong auto-labels counted by the image's true class: where a per-class threshold would help."""
    wrong = mask & (labels != truth)
    return {c: int((wrong & (truth == i)).sum()) for i, c in enumerate(classes)}


def strategy_stats(
    votes: Mapping[str, np.ndarray], truth: np.ndarray, classes: Sequence[str], threshold: float,
    rng: np.random.Generator,
) -> dict[str, dict]:
    """`mask_stats` of the strategies at one threshold, keyed by strategy name."""
    masks, labels = strategy_masks(votes, classes, threshold, rng)
    truth = np.asarray(truth)
    return {name: mask_stats(masks[name], labels[name], truth) for name in masks}


def meets_target(stats: dict, precision: float = TARGET_PRECISION, share: float = TARGET_SHARE) -> bool:
    """The issue's target: precision >= 99.5% while >= 60% of the pool is auto-labelled."""
    return stats["precision"] is not None and stats["precision"] >= precision and stats["share"] >= share


# ---------------------------------------------------------------------------------- target mode


def certifiable_precision(n: int, confidence: float = TARGET_CONFIDENCE) -> float:
    """The highest lower bound a slice of `n` items can give: all selected, none wrong.

    Clopper-Pearson with k = n right: (alpha/2)^(1/n). Below the target, the slice is too small
    for the target mode to certify any threshold, whatever the models do.
    """
    return float(((1 - confidence) / 2) ** (1 / n)) if n else 0.0


def target_mode(
    rule: str, val_votes: Mapping[str, np.ndarray], val_truth: np.ndarray, pool_votes: Mapping[str, np.ndarray],
    pool_truth: np.ndarray, target: float = TARGET_PRECISION, confidence: float = TARGET_CONFIDENCE,
) -> dict:
    """The threshold for `target` precision found on the validation slice, applied to the pool.

    The dual rule `rule` (a `DUAL_RULES` key) is scored per item as min(top_a, top_b) where the
    models agree (`dual_scores`); `threshold_for_precision` takes the lowest threshold whose
    precision's lower confidence bound on the slice reaches `target`. When none does, it returns
    the strictest (the slice's highest score): that one is applied and `val.met` is False.

    Returns:
        {"rule", "threshold", "val": the choice (precision, lower, upper, selected, n, share, met,
        certifiable), "pool": `mask_stats` at that threshold}.
    """
    view_a, view_b = DUAL_RULES[rule]
    val_scores, val_labels = dual_scores(val_votes[view_a], val_votes[view_b])
    choice = threshold_for_precision(val_scores, val_labels == np.asarray(val_truth), target, confidence)
    pool_scores, pool_labels = dual_scores(pool_votes[view_a], pool_votes[view_b])
    mask = (pool_scores >= choice.threshold) & (pool_scores > 0)  # 0: the models disagree
    return {
        "rule": rule,
        "threshold": choice.threshold,
        "val": {"precision": choice.precision, "lower": choice.lower, "upper": choice.upper,
                "selected": choice.selected, "n": choice.n, "share": choice.share, "met": choice.met,
                "confidence": confidence, "certifiable": certifiable_precision(choice.n, confidence)},
        "pool": mask_stats(mask, pool_labels, np.asarray(pool_truth)),
    }
