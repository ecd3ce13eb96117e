"""Confidences that mean what they say, and the threshold that buys a wanted precision.

Active learning auto-labels an image when two models agree and both are confident enough. A
raw softmax is rarely a probability: a network trained to low loss is overconfident (its 0.99
is right far less than 99 % of the time), and two architectures are overconfident by different
amounts, so one threshold means something else for each model and after each retrain.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017) fixes that
with one number per model: the logits are divided by T, fitted to minimise the negative
log-likelihood on held-out labelled data. One parameter cannot overfit a few hundred images, it
never changes the top class (so accuracy stays the same), and it measurably lowers the expected
calibration error (ECE). The exported graphs output probabilities; log-probabilities are logits
up to a per-row constant, which softmax ignores, so the temperature is fitted on those.

With calibrated scores, the threshold is chosen for a target precision instead of by hand
(`threshold_for_precision`): on a labelled validation slice, the lowest threshold whose
precision's lower confidence bound still reaches the target.

numpy in, numpy out: no Prefect, no MLflow (benchmarks and the flow both call it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from saofu.errors import SaofuError

PROB_FLOOR = 1e-12  # log(0) would be -inf; a class the model gives nothing stays ~impossible
T_MIN, T_MAX = 0.05, 20.0  # beyond these a model is broken, not miscalibrated


# ---------------------------------------------------------------------------------- input checks


def _probs_and_labels(probs: np.ndarray, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise SaofuError(f"probabilities must be a non-empty [N, C] array, got shape {probs.shape}")
    if not np.all(np.isfinite(probs)):
        raise SaofuError("probabilities contain NaN or infinite values")
    if labels is None:
        return probs, None
    labels = np.asarray(labels)
    if labels.shape != (probs.shape[0],):
        raise SaofuError(f"labels must be [N] = [{probs.shape[0]}] class indices, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise SaofuError(f"labels must be integer class indices (columns of the probabilities), got {labels.dtype}")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise SaofuError(f"labels must be class indices in [0, {probs.shape[1]}), got {labels.min()}..{labels.max()}")
    return probs, labels


# ----------------------------------------------------------------------------------- calibration


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label expected calibration error: how far confidence is from accuracy, on average.

    The top probability of every row is put in one of `bins` equal-width bins over (0, 1]; the
    ECE is the mean over bins of |accuracy - mean confidence|, weighted by the bin's share of rows.

    Args:
        probs: [N, C] probabilities.
        labels: [N] true class indices (columns of `probs`).
        bins: number of equal-width confidence bins (15, as Guo et al.).

    Returns:
        The ECE in [0, 1] (0: every confidence is its accuracy).
    """
    probs, labels = _probs_and_labels(probs, labels)
    if bins < 1:
        raise SaofuError(f"bins must be >= 1, got {bins}")
    conf = probs.max(1)
    right = (probs.argmax(1) == labels).astype(np.float64)
    # bin (lo, hi]: a confidence of exactly 1 falls in the last bin, 0 in the first
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, right, bins) - np.bincount(which, conf, bins))  # sums per bin
    return float(gap.sum() / len(conf)) if count.any() else 0.0


def _log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(probs, PROB_FLOOR, 1.0))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(probs) / T): T > 1 softens (less confident), T < 1 sharpens; the top class stays.

    Args:
        probs: [N, C] probabilities.
        temperature: T > 0.

    Returns:
        [N, C] float64 probabilities, rows summing to 1, same argmax as `probs`; T = 1 returns
        `probs` unchanged (no floor on its zeros), so an uncalibrated vote is the raw one.
    """
    probs, _ = _probs_and_labels(probs, None)
    if not (np.isfinite(temperature) and temperature > 0):
        raise SaofuError(f"temperature must be a finite number > 0, got {temperature}")
    if temperature == 1.0:
        return probs.copy()
    z = _log_probs(probs) / temperature
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _nll(log_probs: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = log_probs / temperature
    zmax = z.max(1, keepdims=True)
    log_norm = zmax[:, 0] + np.log(np.exp(z - zmax).sum(1))
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


def _golden_section(f, lo: float, hi: float, tol: float = 1e-6) -> float:
    """Minimum of a unimodal f on [lo, hi] (the fallback when scipy is missing)."""
    ratio = (np.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return (a + b) / 2


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(log(probs) / T).

    The NLL in log T is smooth and unimodal (convex in 1/T), so a bounded 1-D search on log T
    in [log 0.05, log 20] finds it; a T at a bound means the model is far off, not that the
    search failed.

    Args:
        probs: [N, C] held-out probabilities (NOT the data the model trained on: there it is
            confident and right, and the fit would call it well calibrated).
        labels: [N] true class indices.

    Returns:
        T > 0: above 1 for an overconfident model, below 1 for an underconfident one.
    """
    probs, labels = _probs_and_labels(probs, labels)
    log_probs = _log_probs(probs)

    def nll(log_t: float) -> float:
        return _nll(log_probs, labels, float(np.exp(log_t)))

    lo, hi = np.log(T_MIN), np.log(T_MAX)
    try:
        from scipy.optimize import minimize_scalar
    except ImportError:  # scipy is optional; golden section is the same search, slower
        best = _golden_section(nll, lo, hi)
    else:
        best = float(minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6}).x)
    return float(np.exp(best))


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature and the calibration error it was measured to remove.

    `ece_before`/`ece_after` are on the data given to `calibrate` (the fitting data). For an
    honest figure, measure on another split: `expected_calibration_error(cal.apply(p), y)`.
    """

    temperature: float
    ece_before: float
    ece_after: float
    n: int

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """The calibrated probabilities of `probs` (same argmax)."""
        return apply_temperature(probs, self.temperature)


def calibrate(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> Calibration:
    """Fit a temperature on held-out `probs` with their true `labels`; ECE before and after.

    Args:
        probs: [N, C] probabilities of one model on labelled held-out data.
        labels: [N] true class indices.
        bins: ECE bins.

    Returns:
        The Calibration (ECEs measured on the same data; see the class for another split).
    """
    probs, labels = _probs_and_labels(probs, labels)
    temperature = fit_temperature(probs, labels)
    return Calibration(
        temperature=temperature,
        ece_before=expected_calibration_error(probs, labels, bins),
        ece_after=expected_calibration_error(apply_temperature(probs, temperature), labels, bins),
        n=len(labels),
    )


# ------------------------------------------------------------------------------------ threshold


@dataclass(frozen=True)
class ThresholdChoice:
    """The threshold found for a target precision, and what it was measured to give.

    threshold: auto-label when the score is >= it.
    target: the precision asked for.
    precision: the point estimate (right / selected) on the validation items at `threshold`.
    lower, upper: its Clopper-Pearson interval at the requested confidence.
    selected: validation items at or above the threshold; n: all validation items.
    share: selected / n, the share that would be auto-labelled.
    met: the interval's lower bound reaches the target; False: no threshold did, and `threshold`
        is the strictest one (the highest score seen), never a lowered bar.
    """

    threshold: float
    target: float
    precision: float
    lower: float
    upper: float
    selected: int
    n: int
    share: float
    met: bool


def precision_interval(
    right: np.ndarray, selected: np.ndarray, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided Clopper-Pearson (exact binomial) interval of right/selected, elementwise.

    Wilson's score interval replaces it when scipy is missing (close to it for large counts).
    With selected == 0 the interval is (0, 1).
    """
    k = np.asarray(right, dtype=np.float64)
    m = np.asarray(selected, dtype=np.float64)
    alpha = 1.0 - confidence
    try:
        from scipy.stats import beta
    except ImportError:
        return _wilson(k, m, confidence)
    with np.errstate(invalid="ignore", divide="ignore"):
        lower = np.where(k > 0, beta.ppf(alpha / 2, k, m - k + 1), 0.0)
        upper = np.where(k < m, beta.ppf(1 - alpha / 2, k + 1, m - k), 1.0)
    return np.nan_to_num(lower, nan=0.0), np.nan_to_num(upper, nan=1.0)


def _wilson(k: np.ndarray, m: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    safe = np.maximum(m, 1)
    p = k / safe
    centre = (p + z * z / (2 * safe)) / (1 + z * z / safe)
    half = z * np.sqrt(p * (1 - p) / safe + z * z / (4 * safe * safe)) / (1 + z * z / safe)
    empty = m == 0
    return np.where(empty, 0.0, np.clip(centre - half, 0, 1)), np.where(empty, 1.0, np.clip(centre + half, 0, 1))


def _scores_and_truth(scores: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct)
    if scores.ndim != 1 or scores.size == 0:
        raise SaofuError(f"scores must be a non-empty 1-D array, got shape {scores.shape}")
    if correct.shape != scores.shape:
        raise SaofuError(f"correct must have one entry per score: scores {scores.shape}, correct {correct.shape}")
    if correct.dtype != bool and not np.isin(correct, (0, 1)).all():
        raise SaofuError("correct must be booleans (is the auto-label right?)")
    if np.isnan(scores).any():
        raise SaofuError("scores contain NaN")
    if (scores > 1.0 + 1e-9).any():
        raise SaofuError(f"scores must be probabilities (<= 1; -inf or 0: never selected), got max {scores.max()}")
    return scores, correct.astype(bool)


def threshold_for_precision(
    scores: np.ndarray, correct: np.ndarray, target: float, confidence: float = 0.95, min_selected: int = 20,
) -> ThresholdChoice:
    """The lowest threshold (largest auto-labelled share) whose precision holds `target`.

    "Holds" means the LOWER end of the precision's two-sided Clopper-Pearson interval (at
    `confidence`) reaches the target, not the point estimate. On a few thousand validation items
    the point estimate of a 99.5 % precision moves by tenths of a point from sample to sample;
    the threshold with the lowest point estimate above the target is the one the noise favoured
    most, so choosing on the point estimate would land below the target about half the time.
    The lower bound pays for that with a slightly smaller share. Candidates are the scores seen;
    a candidate must select at least `min_selected` items, so a handful of lucky items cannot
    carry it. Scanning thousands of thresholds is a multiple comparison, so the bound is not an
    exact guarantee: on synthetic scores with known truth (tests/labeling/test_calibration.py,
    40 samples of 20,000-50,000 items) the true precision at the chosen threshold fell short of
    the target in 3-7 % of samples, by at most 0.4 points at a 95 % target and 0.1 point at 99.5 %;
    on the point estimate it falls short about half the time.

    Args:
        scores: [N] one number per validation item, in [0, 1]; items scored 0 or -inf are never
            selected (for the dual rule, `dual_scores`: 0 where the models disagree).
        correct: [N] bool, whether the item's auto-label would be right.
        target: the precision asked for, in (0, 1), e.g. 0.995.
        confidence: of the interval, in (0, 1).
        min_selected: fewest items a threshold must select to be chosen.

    Returns:
        The ThresholdChoice; when no threshold reaches the target, the strictest one (the highest
        score, with its measured precision) and met=False: the caller decides, never a lower bar.

    Raises:
        SaofuError: empty or mismatched arrays, NaN or >1 scores, target or confidence not in (0, 1).
    """
    if not 0.0 < target < 1.0:
        raise SaofuError(f"target precision must be in (0, 1), got {target}")
    if not 0.0 < confidence < 1.0:
        raise SaofuError(f"confidence must be in (0, 1), got {confidence}")
    if min_selected < 1:
        raise SaofuError(f"min_selected must be >= 1, got {min_selected}")
    scores, correct = _scores_and_truth(scores, correct)
    n = len(scores)
    selectable = scores > 0
    if not selectable.any():
        return ThresholdChoice(1.0, target, 0.0, 0.0, 1.0, 0, n, 0.0, False)
    order = np.argsort(-scores[selectable], kind="stable")
    s, c = scores[selectable][order], correct[selectable][order]
    # a threshold at s[i] selects everything down to the last item tied with it
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    cand = np.flatnonzero(last_of_tie)
    sel = cand + 1
    right = np.cumsum(c)[cand]
    lower, upper = precision_interval(right, sel, confidence)
    ok = (lower >= target) & (sel >= min_selected)
    i = int(np.flatnonzero(ok)[-1]) if ok.any() else 0  # the lowest threshold that holds, else the strictest
    return ThresholdChoice(
        threshold=min(1.0, float(s[cand[i]])), target=target, precision=float(right[i] / sel[i]),
        lower=float(lower[i]), upper=float(upper[i]), selected=int(sel[i]), n=n, share=float(sel[i] / n),
        met=bool(ok.any()),
    )


def dual_scores(probs_a: np.ndarray, probs_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The dual-model rule as one score per item, for `threshold_for_precision`.

    An item is auto-labelled at threshold t when both models agree and both top probabilities
    are >= t, i.e. when min(top_a, top_b) >= t: that min is the score (0 where they disagree).

    Args:
        probs_a, probs_b: [N, C] (calibrated) probabilities of models A and B, same columns.

    Returns:
        (scores [N], agreed labels [N] = A's argmax column); `correct = labels == truth`.
    """
    probs_a, _ = _probs_and_labels(probs_a, None)
    probs_b, _ = _probs_and_labels(probs_b, None)
    if probs_a.shape != probs_b.shape:
        raise SaofuError(f"both models' probabilities must have one shape, got {probs_a.shape} and {probs_b.shape}")
    top_a, top_b = probs_a.argmax(1), probs_b.argmax(1)
    score = np.where(top_a == top_b, np.minimum(probs_a.max(1), probs_b.max(1)), 0.0)
    return score, top_a
