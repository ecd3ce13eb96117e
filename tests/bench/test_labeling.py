"""The labeling benchmark's statistics on hand-made probabilities (no worlds, no training)."""

from __future__ import annotations

import numpy as np
import torch

from bench.labeling import (
    concat_splits,
    format_retrain_table,
    format_table,
    labels_needed,
    mask_stats,
    meets_target,
    strategy_masks,
    strategy_stats,
    target_verdict,
    with_labels,
)
from tasks.data.loading import TensorSplit

CLASSES = ["fu", "not_fu"]

# Six pool images. Model A's top class / confidence, model B's, and the truth:
#   0: A fu .99,     B fu .97     truth fu      -> dual auto, correct
#   1: A fu .95,     B fu .92     truth not_fu  -> dual auto, WRONG
#   2: A not_fu .97, B fu .60     truth not_fu  -> disagree; single auto (correct)
#   3: A not_fu .93, B not_fu .80 truth not_fu  -> B too low; single auto (correct)
#   4: A fu .60,     B fu .99     truth fu      -> A too low: nobody auto-labels
#   5: A fu .91,     B not_fu .95 truth not_fu  -> disagree; single auto (WRONG)
PROBS_A = np.array([[.99, .01], [.95, .05], [.03, .97], [.07, .93], [.60, .40], [.91, .09]])
PROBS_B = np.array([[.97, .03], [.92, .08], [.60, .40], [.20, .80], [.99, .01], [.05, .95]])
TRUTH = np.array([0, 1, 1, 1, 0, 1])


def test_dual_and_single_by_hand():
    stats = strategy_stats(PROBS_A, PROBS_B, TRUTH, CLASSES, 0.9, np.random.default_rng(0))
    assert stats["dual"] == {"auto_labelled": 2, "share": 2 / 6, "precision": 0.5, "wrong": 1, "human_labels": 4}
    # single: images 0 1 2 3 5 (A >= .9); wrong: 1 and 5.
    assert stats["single"] == {"auto_labelled": 5, "share": 5 / 6, "precision": 3 / 5, "wrong": 2,
                               "human_labels": 1}


def test_threshold_is_inclusive_and_raising_it_shrinks_dual():
    stats = strategy_stats(PROBS_A, PROBS_B, TRUTH, CLASSES, 0.97, np.random.default_rng(0))
    assert stats["dual"]["auto_labelled"] == 1 and stats["dual"]["precision"] == 1.0  # image 0 only
    assert stats["single"]["auto_labelled"] == 2  # .99 and .97 (>=)


def test_random_takes_exactly_the_dual_count():
    rng = np.random.default_rng(1)
    a = rng.dirichlet([1, 1, 1], size=500)
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 1e-3, None)
    b /= b.sum(1, keepdims=True)
    for thr in (0.5, 0.7, 0.9):
        masks, labels = strategy_masks(a, b, ["x", "y", "z"], thr, np.random.default_rng(int(100 * thr)))
        assert masks["random"].sum() == masks["dual"].sum() > 0
        assert set(masks) == set(labels) == {"dual", "single", "random"}  # no dual_tta without its probs
        assert all((lab == a.argmax(1)).all() for lab in labels.values())  # model A's top class


def test_random_is_reproducible_and_labels_with_model_a():
    m1, _ = strategy_masks(PROBS_A, PROBS_B, CLASSES, 0.9, np.random.default_rng(7))
    m2, _ = strategy_masks(PROBS_A, PROBS_B, CLASSES, 0.9, np.random.default_rng(7))
    assert (m1["random"] == m2["random"]).all()
    stats = mask_stats(np.ones(6, bool), PROBS_A.argmax(1), TRUTH)  # taking everything: 0 2 3 4 right
    assert stats["precision"] == 4 / 6 and stats["human_labels"] == 0


def test_nothing_auto_labelled_has_no_precision():
    stats = strategy_stats(PROBS_A, PROBS_B, TRUTH, CLASSES, 1.0, np.random.default_rng(0))
    for name in ("dual", "single", "random"):
        assert stats[name]["auto_labelled"] == 0 and stats[name]["precision"] is None
        assert stats[name]["human_labels"] == 6
        assert not meets_target(stats[name])


def test_target_needs_both_precision_and_share():
    assert meets_target({"precision": 0.995, "share": 0.6})
    assert not meets_target({"precision": 0.994, "share": 0.9})
    assert not meets_target({"precision": 1.0, "share": 0.59})
    rows = [{"threshold": t, "dual": {"precision": p, "share": s}, "single": {"precision": 0.9, "share": 0.9},
             "random": {"precision": None, "share": 0.0}} for t, p, s in [(0.8, 0.99, 0.9), (0.9, 0.996, 0.7)]]
    assert target_verdict(rows) == {"dual": [0.9], "single": [], "random": []}


def test_tables_render():
    stats = strategy_stats(PROBS_A, PROBS_B, TRUTH, CLASSES, 0.9, np.random.default_rng(0))
    table = format_table([{"threshold": 0.9, **stats}])
    assert "dual" in table and "50.00" in table and " 0.90 |" in table
    retrain = format_retrain_table([
        {"config": "all human (reference)", "human_labels": 10, "auto_labels": 0, "wrong_auto_labels": 0,
         "test_accuracy": 0.95, "train_seconds": 1.0},
        {"config": "dual @ 0.9", "human_labels": 6, "auto_labels": 4, "wrong_auto_labels": 1,
         "test_accuracy": 0.945, "gap_points": 0.5, "within_1_point": True, "train_seconds": 1.0},
    ])
    assert "yes" in retrain and "0.50" in retrain


def test_concat_and_relabel_splits():
    s = TensorSplit(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), CLASSES, ["a", "b"])
    t = TensorSplit(torch.ones(1, 3, 4, 4, dtype=torch.uint8), torch.tensor([1]), CLASSES, ["c"])
    joined = concat_splits(s, with_labels(t, np.array([0])))
    assert len(joined) == 3 and joined.labels.tolist() == [0, 1, 0] and joined.paths == ["a", "b", "c"]


def _retrained(config: str, human: int, gap: float | None) -> dict:
    row = {"config": config, "human_labels": human, "auto_labels": 0, "wrong_auto_labels": 0,
           "test_accuracy": 0.9, "test_accuracy_at_threshold": 0.9, "train_seconds": 1.0}
    if gap is not None:
        row |= {"gap_points": gap, "within_1_point": gap <= 1.0}
    return row


def test_labels_needed_is_the_fewest_human_labels_within_one_point_per_strategy():
    rows = [
        _retrained("all human (reference)", 5000, None),
        _retrained("dual @ 0.9", 3000, 0.4),
        _retrained("dual @ 0.8", 2500, 0.9),   # fewer labels and still within: the answer
        _retrained("dual @ 0.7", 2000, 1.6),   # fewer still, but too far behind
        _retrained("single @ 0.9", 2200, 2.5),
        _retrained("single @ 0.98", 4000, 1.0),  # exactly 1 point counts as within
        _retrained("random @ 0.9", 3000, 1.4),
    ]
    needed = labels_needed(rows)
    assert needed["dual"] == {"human_labels": 2500, "threshold": 0.8, "gap_points": 0.9}
    assert needed["single"]["human_labels"] == 4000
    assert needed["random"] is None
    assert set(needed) == {"dual", "single", "random"}


def test_dual_tta_votes_with_the_augmented_probabilities_and_labels_with_their_top_class():
    # Augmentation lowers A's confidence on image 1 (the confidently wrong one) and flips image 4
    # to B's class with high confidence: dual_tta drops 1 and takes 4, labelled from the TTA vote.
    tta = PROBS_A.copy()
    tta[1] = [.70, .30]
    tta[4] = [.95, .05]
    stats = strategy_stats(PROBS_A, PROBS_B, TRUTH, CLASSES, 0.9, np.random.default_rng(0), probs_a_tta=tta)
    assert stats["dual"]["wrong"] == 1
    assert stats["dual_tta"] == {"auto_labelled": 2, "share": 2 / 6, "precision": 1.0, "wrong": 0, "human_labels": 4}
    flipped = PROBS_A.copy()
    flipped[2] = [.95, .05]  # A's TTA top class differs from its plain top class and B agrees with it
    b = PROBS_B.copy()
    b[2] = [.96, .04]
    masks, labels = strategy_masks(PROBS_A, b, CLASSES, 0.9, np.random.default_rng(0), flipped)
    assert masks["dual_tta"][2] and labels["dual_tta"][2] == 0 and labels["dual"][2] == 1
