"""The labeling benchmark's statistics on hand-made probabilities (no worlds, no training)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.labeling import concat_splits, with_labels
from bench.labeling_report import format_draw_table, format_retrain_table, labels_needed
from bench.labeling_strategies import (
    DUAL_RULES,
    certifiable_precision,
    mask_stats,
    meets_target,
    split_holdout,
    strategy_masks,
    strategy_stats,
    target_mode,
    with_calibrated,
)
from tasks.data.loading import TensorSplit
from tasks.labeling.calibration import Calibration

pytestmark = pytest.mark.timeout(60)

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
VOTES = {"a": PROBS_A, "b": PROBS_B}


def test_dual_and_single_by_hand():
    stats = strategy_stats(VOTES, TRUTH, CLASSES, 0.9, np.random.default_rng(0))
    assert stats["dual"] == {"auto_labelled": 2, "share": 2 / 6, "precision": 0.5, "wrong": 1, "human_labels": 4}
    # single: images 0 1 2 3 5 (A >= .9); wrong: 1 and 5.
    assert stats["single"] == {"auto_labelled": 5, "share": 5 / 6, "precision": 3 / 5, "wrong": 2,
                               "human_labels": 1}


def test_threshold_is_inclusive_and_raising_it_shrinks_dual():
    stats = strategy_stats(VOTES, TRUTH, CLASSES, 0.97, np.random.default_rng(0))
    assert stats["dual"]["auto_labelled"] == 1 and stats["dual"]["precision"] == 1.0  # image 0 only
    assert stats["single"]["auto_labelled"] == 2  # .99 and .97 (>=)


def test_random_takes_exactly_the_dual_count():
    rng = np.random.default_rng(1)
    a = rng.dirichlet([1, 1, 1], size=500)
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 1e-3, None)
    b /= b.sum(1, keepdims=True)
    for thr in (0.5, 0.7, 0.9):
        masks, labels = strategy_masks({"a": a, "b": b}, ["x", "y", "z"], thr, np.random.default_rng(int(100 * thr)))
        assert masks["random"].sum() == masks["dual"].sum() > 0
        assert set(masks) == set(labels) == {"dual", "single", "random"}  # no other dual without its views
        assert all((lab == a.argmax(1)).all() for lab in labels.values())  # model A's top class


def test_random_is_reproducible_and_labels_with_model_a():
    m1, _ = strategy_masks(VOTES, CLASSES, 0.9, np.random.default_rng(7))
    m2, _ = strategy_masks(VOTES, CLASSES, 0.9, np.random.default_rng(7))
    assert (m1["random"] == m2["random"]).all()
    stats = mask_stats(np.ones(6, bool), PROBS_A.argmax(1), TRUTH)  # taking everything: 0 2 3 4 right
    assert stats["precision"] == 4 / 6 and stats["human_labels"] == 0


def test_nothing_auto_labelled_has_no_precision():
    stats = strategy_stats(VOTES, TRUTH, CLASSES, 1.0, np.random.default_rng(0))
    for name in ("dual", "single", "random"):
        assert stats[name]["auto_labelled"] == 0 and stats[name]["precision"] is None
        assert stats[name]["human_labels"] == 6
        assert not meets_target(stats[name])


def test_target_needs_both_precision_and_share():
    assert meets_target({"precision": 0.995, "share": 0.6})
    assert not meets_target({"precision": 0.994, "share": 0.9})
    assert not meets_target({"precision": 1.0, "share": 0.59})
    assert not meets_target({"precision": None, "share": 0.0})


def test_tables_render():
    stats = strategy_stats(VOTES, TRUTH, CLASSES, 0.9, np.random.default_rng(0))
    table = format_draw_table([{"strategy": s, "threshold": 0.9, **v} for s, v in stats.items()]
                              + [{"strategy": "target", "threshold": None, **stats["dual"]}])
    dual_line = next(line for line in table.splitlines() if line.startswith("dual "))
    assert dual_line.split() == ["dual", "0.90", "33.3", "50.00", "1", "4"]
    assert table.splitlines()[-1].split()[:2] == ["target", "chosen"]
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
    stats = strategy_stats(VOTES | {"a_tta": tta}, TRUTH, CLASSES, 0.9, np.random.default_rng(0))
    assert stats["dual"]["wrong"] == 1
    assert stats["dual_tta"] == {"auto_labelled": 2, "share": 2 / 6, "precision": 1.0, "wrong": 0, "human_labels": 4}
    flipped = PROBS_A.copy()
    flipped[2] = [.95, .05]  # A's TTA top class differs from its plain top class and B agrees with it
    b = PROBS_B.copy()
    b[2] = [.96, .04]
    masks, labels = strategy_masks({"a": PROBS_A, "b": b, "a_tta": flipped}, CLASSES, 0.9, np.random.default_rng(0))
    assert masks["dual_tta"][2] and labels["dual_tta"][2] == 0 and labels["dual"][2] == 1


def test_calibrated_strategies_vote_with_the_tempered_views():
    # A softened (T=3: .99 -> .82, .95 -> .73, .93 -> .70), B left as it is (T=1).
    cal = {"a": Calibration(3.0, 0.1, 0.01, 6), "b": Calibration(1.0, 0.0, 0.0, 6)}
    votes = with_calibrated(VOTES, cal)
    assert set(votes) == {"a", "b", "a_cal", "b_cal"}
    assert (votes["a_cal"].argmax(1) == PROBS_A.argmax(1)).all() and np.allclose(votes["b_cal"], PROBS_B)
    stats = strategy_stats(votes, TRUTH, CLASSES, 0.8, np.random.default_rng(0))
    assert "dual_cal" in stats and "dual_tta_cal" not in stats  # no TTA view given
    # at 0.8 plain dual takes 0, 1 (wrong) and 3; softened A clears 0.8 on image 0 only
    assert stats["dual"]["auto_labelled"] == 3 and stats["dual_cal"]["auto_labelled"] == 1
    assert stats["dual_cal"]["precision"] == 1.0


def test_every_dual_rule_is_present_when_all_views_are():
    views = {v: PROBS_A if v.startswith("a") else PROBS_B for v in ("a", "b", "a_tta", "b_tta")}
    views |= {f"{v}_cal": p for v, p in views.items()}
    masks, _ = strategy_masks(views, CLASSES, 0.9, np.random.default_rng(0))
    assert list(masks) == [*DUAL_RULES, "single", "random"]
    assert all((masks[name] == masks["dual"]).all() for name in DUAL_RULES)  # same probabilities, same rule


def test_target_mode_takes_the_lowest_certified_threshold_on_val_and_applies_it_to_the_pool():
    # 100 val items, both models agree; scores .999 .. .900 (A) with B at .999: the dual score is A's.
    # The 10 lowest-scored are wrong. 100 items can certify at most ~.964 (all right): nothing
    # certifies .995, so the strictest threshold (the top score) is returned, met False.
    top = np.linspace(0.999, 0.900, 100)
    a = np.stack([top, 1 - top], 1)
    b = np.tile([0.999, 0.001], (100, 1))
    truth = np.array([0] * 90 + [1] * 10)
    views = {"a_tta_cal": a, "b_cal": b}
    strict = target_mode("dual_tta_cal", views, truth, views, truth, target=0.995)
    assert not strict["val"]["met"] and strict["threshold"] == pytest.approx(0.999)
    assert strict["pool"]["auto_labelled"] == 1
    assert strict["val"]["certifiable"] == pytest.approx(certifiable_precision(100))
    assert certifiable_precision(100) < 0.995
    # At a 90 % target the bound holds down into the wrong ones (93 taken, 90 right: lower ~.91) but
    # not to the bottom (90 of 100: lower ~.82). The pool here is the val slice itself: the same
    # threshold takes the same items.
    loose = target_mode("dual_tta_cal", views, truth, views, truth, target=0.9)
    assert loose["val"]["met"] and loose["val"]["lower"] >= 0.9
    taken = loose["val"]["selected"]
    assert 90 <= taken < 100 and loose["threshold"] == pytest.approx(top[taken - 1])
    assert loose["pool"]["auto_labelled"] == loose["val"]["selected"]
    assert loose["pool"]["precision"] == pytest.approx(loose["val"]["precision"])
    # disagreeing items score 0 and are never taken, whatever the threshold
    flipped = {"a_tta_cal": a, "b_cal": b[:, ::-1].copy()}
    assert target_mode("dual_tta_cal", views, truth, flipped, truth, target=0.9)["pool"]["auto_labelled"] == 0


def test_certifiable_precision_is_the_clopper_pearson_bound_of_all_right():
    assert certifiable_precision(736) >= 0.995 > certifiable_precision(700)  # (0.025)^(1/n)
    assert certifiable_precision(0) == 0.0


def test_the_held_out_slice_splits_per_class_into_a_fit_part_and_a_check_part():
    truth = np.array([0] * 100 + [1] * 50)
    fit, check = split_holdout(truth, seed=3)
    assert sorted(np.r_[fit, check].tolist()) == list(range(150))  # disjoint, and all of it
    assert (truth[fit] == 0).sum() == 40 and (truth[fit] == 1).sum() == 20  # 40 % of every class
    again, _ = split_holdout(truth, seed=3)
    other, _ = split_holdout(truth, seed=4)
    assert (again == fit).all() and not np.array_equal(other, fit)
