"""Calibration (temperature scaling, ECE) and the threshold chosen for a target precision."""

from __future__ import annotations

import numpy as np
import pytest

from saofu.errors import SaofuError
from tasks.labeling.calibration import (
    Calibration,
    apply_temperature,
    calibrate,
    dual_scores,
    expected_calibration_error,
    fit_temperature,
    threshold_for_precision,
)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _calibrated_world(n: int, classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels DRAWN from softmax(logits): a model calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, (n, classes))
    probs = _softmax(logits)
    labels = (rng.uniform(size=(n, 1)) > probs.cumsum(1)).sum(1)
    return logits, labels


def _halves(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x[: len(x) // 2], x[len(x) // 2 :]


@pytest.mark.timeout(60)
def test_overconfident_model_is_calibrated_on_a_held_out_half():
    logits, labels = _calibrated_world(8000)
    steered = _softmax(4.0 * logits)  # the steer: four times too sure of itself
    fit_p, held_p = _halves(steered)
    fit_y, held_y = _halves(labels)
    cal = calibrate(fit_p, fit_y)
    before = expected_calibration_error(held_p, held_y)
    after = expected_calibration_error(cal.apply(held_p), held_y)
    print(f"overconfident: T={cal.temperature:.3f} held-out ECE {before:.4f} -> {after:.4f} "
          f"(fit half {cal.ece_before:.4f} -> {cal.ece_after:.4f})")
    assert cal.temperature > 1.0
    assert cal.temperature == pytest.approx(4.0, rel=0.15)  # it undoes the known steer
    assert after < before / 3
    assert after < 0.03
    assert cal.ece_after < cal.ece_before and cal.n == len(fit_y)
    # accuracy is untouched: temperature never moves the top class
    assert (cal.apply(held_p).argmax(1) == held_p.argmax(1)).all()


@pytest.mark.timeout(60)
def test_underconfident_model_gets_a_temperature_below_one():
    logits, labels = _calibrated_world(8000, seed=1)
    steered = _softmax(0.4 * logits)
    fit_p, held_p = _halves(steered)
    fit_y, held_y = _halves(labels)
    t = fit_temperature(fit_p, fit_y)
    before = expected_calibration_error(held_p, held_y)
    after = expected_calibration_error(apply_temperature(held_p, t), held_y)
    print(f"underconfident: T={t:.3f} held-out ECE {before:.4f} -> {after:.4f}")
    assert t < 1.0
    assert t == pytest.approx(0.4, rel=0.15)
    assert after < before / 3


@pytest.mark.timeout(60)
def test_calibrated_model_keeps_its_temperature_near_one():
    logits, labels = _calibrated_world(8000, seed=2)
    assert fit_temperature(_softmax(logits), labels) == pytest.approx(1.0, abs=0.1)


@pytest.mark.timeout(60)
def test_apply_temperature_rows_sum_to_one_and_keep_the_top_class():
    rng = np.random.default_rng(3)
    probs = _softmax(rng.normal(0, 3, (200, 4)))
    probs[0] = [1.0, 0.0, 0.0, 0.0]  # saturated rows and zero columns do not make NaN
    for t in (0.1, 1.0, 7.0):
        out = apply_temperature(probs, t)
        assert np.allclose(out.sum(1), 1.0) and np.isfinite(out).all()
        assert (out.argmax(1) == probs.argmax(1)).all()
    assert np.allclose(apply_temperature(probs[1:], 1.0), probs[1:])
    assert (apply_temperature(probs, 3.0).max(1) <= probs.max(1) + 1e-12).all()  # T > 1 softens
    assert Calibration(2.0, 0.1, 0.01, 10).apply(probs).shape == probs.shape


@pytest.mark.timeout(60)
def test_ece_of_a_known_miscalibration():
    # every row says 0.9 for class 0; half are class 0: the ECE is |0.5 - 0.9|
    probs = np.tile([0.9, 0.1], (100, 1))
    labels = np.array([0, 1] * 50)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)
    assert expected_calibration_error(probs, np.zeros(100, dtype=int)) == pytest.approx(0.1)


# ------------------------------------------------------------------------------------ threshold


def _synthetic_scores(n: int, seed: int, low: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Scores uniform on [low, 1], each item right with probability equal to its score."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(low, 1.0, n)
    return s, rng.uniform(size=n) < s


def _true_precision(t: float) -> float:
    # E[s | s >= t] for a uniform score, whatever the lower end: the precision at threshold t
    return (1.0 + t) / 2.0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("target,low", [(0.95, 0.0), (0.995, 0.9)])
def test_threshold_hits_the_target_precision_on_a_fresh_sample(target, low):
    scores, right = _synthetic_scores(50_000, seed=11, low=low)
    choice = threshold_for_precision(scores, right, target)
    fresh_s, fresh_r = _synthetic_scores(400_000, seed=12, low=low)
    picked = fresh_s >= choice.threshold
    fresh_precision = fresh_r[picked].mean()
    best_threshold = 2 * target - 1  # where the true precision is exactly the target
    best_share = (1 - best_threshold) / (1 - low)
    print(f"target {target}: threshold {choice.threshold:.4f} precision {choice.precision:.4f} "
          f"[{choice.lower:.4f}, {choice.upper:.4f}] share {choice.share:.4f} (best {best_share:.4f}); "
          f"fresh precision {fresh_precision:.4f}")
    assert choice.met
    assert choice.lower >= target and choice.lower <= choice.precision <= choice.upper
    assert choice.selected >= 20 and choice.share == pytest.approx(choice.selected / choice.n)
    # the lowest threshold that holds is, among thousands tried, one the noise favoured: a hair
    # under the target at worst (see threshold_for_precision), never a point below it
    assert _true_precision(choice.threshold) >= target - 0.002
    assert fresh_precision >= target - 0.002
    # not wastefully strict: most of the share the target allows
    assert picked.mean() >= 0.6 * best_share
    assert choice.share >= 0.6 * best_share


@pytest.mark.timeout(60)
def test_threshold_holds_the_target_across_samples():
    # the lower bound, not the point estimate: the truth at the chosen threshold is at or above
    # the target for most seeds and never far below it; choosing on the point estimate instead
    # lands under the target about half the time
    truths, naive = [], []
    for seed in range(12):
        scores, right = _synthetic_scores(20_000, seed=100 + seed)
        truths.append(_true_precision(threshold_for_precision(scores, right, 0.95).threshold))
        order = np.argsort(-scores)
        point = np.cumsum(right[order]) / np.arange(1, len(scores) + 1)
        naive.append(_true_precision(scores[order][np.flatnonzero(point >= 0.95)[-1]]))
    truths, naive = np.array(truths), np.array(naive)
    print(f"true precision at the chosen threshold over 12 samples: {np.round(truths, 4).tolist()}")
    assert (truths >= 0.95).mean() >= 0.8 and truths.min() >= 0.95 - 0.004
    assert np.median(truths) < 0.965  # and, typically, not far above it
    assert (naive < 0.95).mean() > (truths < 0.95).mean()


@pytest.mark.timeout(60)
def test_unreachable_target_returns_the_strictest_threshold_not_met():
    scores, right = _synthetic_scores(2_000, seed=5)
    choice = threshold_for_precision(scores, right, 0.9999)
    assert not choice.met
    assert choice.threshold == scores.max()  # the strictest threshold, never a lowered bar
    assert choice.lower < 0.9999
    # nothing selectable: everything disagreed
    none = threshold_for_precision(np.zeros(50), np.zeros(50, dtype=bool), 0.9)
    assert not none.met and none.selected == 0 and none.threshold == 1.0


@pytest.mark.timeout(60)
def test_min_selected_keeps_a_few_lucky_items_from_choosing():
    scores = np.r_[np.full(10, 0.99), np.linspace(0.1, 0.9, 100)]
    right = np.r_[np.ones(10, dtype=bool), np.zeros(100, dtype=bool)]
    assert not threshold_for_precision(scores, right, 0.6).met  # 10 right items are too few
    assert threshold_for_precision(scores, right, 0.6, min_selected=10).met


@pytest.mark.timeout(60)
def test_disagreements_are_never_selected():
    scores = np.r_[np.full(100, 0.95), np.zeros(900)]
    right = np.r_[np.ones(100, dtype=bool), np.zeros(900, dtype=bool)]
    choice = threshold_for_precision(scores, right, 0.9)
    assert choice.met and choice.threshold == 0.95 and choice.selected == 100 and choice.share == 0.1


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: threshold_for_precision(np.ones(3), np.ones(4, dtype=bool), 0.9), "one entry per score"),
        (lambda: threshold_for_precision(np.ones(3), np.ones(3, dtype=bool), 1.0), "target precision"),
        (lambda: threshold_for_precision(np.ones(3), np.ones(3, dtype=bool), 0.0), "target precision"),
        (lambda: threshold_for_precision(np.array([]), np.array([], dtype=bool), 0.9), "non-empty"),
        (lambda: threshold_for_precision(np.array([np.nan]), np.ones(1, dtype=bool), 0.9), "NaN"),
        (lambda: threshold_for_precision(np.array([3.0]), np.ones(1, dtype=bool), 0.9), "probabilities"),
        (lambda: fit_temperature(np.ones((3, 2)) / 2, np.array([0, 1])), "labels must be"),
        (lambda: fit_temperature(np.ones((3, 2)) / 2, np.array([0, 1, 2])), r"in \[0, 2\)"),
        (lambda: expected_calibration_error(np.zeros((0, 2)), np.zeros(0, dtype=int)), "non-empty"),
        (lambda: apply_temperature(np.ones((2, 2)) / 2, 0.0), "temperature"),
        (lambda: dual_scores(np.ones((2, 2)) / 2, np.ones((2, 3)) / 3), "one shape"),
    ],
)
def test_bad_input_names_the_problem(call, match):
    with pytest.raises(SaofuError, match=match):
        call()


@pytest.mark.timeout(60)
def test_dual_scores_are_the_weaker_vote_where_both_agree():
    a = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    b = np.array([[0.7, 0.3], [0.3, 0.7], [0.1, 0.9]])
    scores, labels = dual_scores(a, b)
    assert np.allclose(scores, [0.7, 0.0, 0.8])
    assert labels.tolist() == [0, 0, 1]
