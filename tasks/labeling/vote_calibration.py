"""Calibrated votes for active learning: each model's temperature, and a threshold for a precision.

Before the two models vote on the pool, each one's probabilities are temperature-scaled
(`tasks.labeling.calibration`) with a temperature fitted on the labelled dataset's val split, so
a confidence of 0.95 means about 95 % right for both architectures and after every retrain. With
a target precision (e.g. 0.995) the auto-label threshold is then found on that split instead of
set by hand: the lowest threshold at which the dual rule's precision, lower confidence bound
included, reaches the target.

The val slice. Manifest rows of split `val` whose source is a person or the generator: never
`auto` rows, whose labels are the models' own agreed answers (calibrating on them would grade
the models on their own homework). A dataset with no manifest is read from its `val/<class>/`
folders. The slice is capped (2,000 images by default, per-class proportional, seeded) so the
extra inference stays a few seconds; the champion predicts it with TTA when it votes with TTA.

Why the slice is split in two. The temperatures are fitted on one half; the ECE after
calibration and the threshold are measured on the other. A threshold chosen on the very images
the temperatures were fitted to would see scores that fit those images a little better than new
pool images will, and its precision estimate would be optimistic; the held-out half also makes
the reported ECE an honest one. One temperature needs only a few hundred images, so the half
left for the threshold is the larger share where the slice is small.

Plain functions are what tests call; `calibrate_vote_task` is the Prefect face for the flow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from saofu.errors import SaofuError
from tasks.data.manifest import read_manifest
from tasks.labeling.calibration import (
    Calibration,
    ThresholdChoice,
    apply_temperature,
    dual_scores,
    expected_calibration_error,
    fit_temperature,
    threshold_for_precision,
)
from tasks.labeling.pool import load_state, pool_images
from tasks.labeling.pool_predict import predict_pool
from tasks.release.evaluation import align_probs

if TYPE_CHECKING:
    from tasks.labeling.active_learning import ModelRef

VAL_LIMIT = 2000
MIN_VAL_IMAGES = 40  # fewer, and a fitted temperature is noise: calibration is refused, not faked
FIT_SHARE = 0.4  # of the slice for the temperatures; the rest, the larger part, chooses the threshold
TRUSTED_SOURCES = ("generated", "human")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class LabelledSlice:
    """Labelled images to calibrate on: their files and true class names."""

    paths: list[Path]
    labels: list[str]


def val_slice(dataset_dir: str | Path, classes: Sequence[str], limit: int = VAL_LIMIT, seed: int = 0) -> LabelledSlice:
    """The dataset's labelled val images of `classes`, at most `limit`, per-class proportional.

    Args:
        dataset_dir: the labelled dataset (manifest.csv, or an ImageFolder tree with `val/`).
        classes: the classes either model knows; other labels are left out.
        limit: most images taken (a seeded per-class share of each class's images).
        seed: of that choice; the same dataset and seed give the same slice.

    Returns:
        The slice (possibly empty: the caller decides whether that is enough).
    """
    if limit < 1:
        raise SaofuError(f"the calibration slice's limit must be >= 1, got {limit}")
    root = Path(dataset_dir)
    rows = [r for r in read_manifest(root) if r.get("split") == "val" and r.get("source") in TRUSTED_SOURCES]
    if rows:
        found = sorted((r["path"], r["label"]) for r in rows if r["label"] in classes)
        pairs = [(root / p, label) for p, label in found if (root / p).is_file()]
    else:  # an ImageFolder dataset without a manifest
        pairs = sorted((f, d.name) for d in (root / "val").glob("*") if d.is_dir() and d.name in classes
                       for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    rng = np.random.default_rng(seed)
    labels = np.array([label for _, label in pairs], dtype=object)
    keep: list[int] = []
    for name in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == name)
        take = max(1, int(round(limit * len(idx) / len(pairs)))) if len(pairs) > limit else len(idx)
        keep += rng.permutation(idx)[:take].tolist()
    keep = sorted(keep)[:limit] if len(keep) > limit else sorted(keep)
    return LabelledSlice([pairs[i][0] for i in keep], [pairs[i][1] for i in keep])


def _split_halves(labels: Sequence[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, choose) indices: FIT_SHARE of every class to fit temperatures on, the rest to choose with."""
    rng = np.random.default_rng(seed + 1)
    labels = np.asarray(labels, dtype=object)
    fit: list[int] = []
    for name in sorted(set(labels.tolist())):
        idx = rng.permutation(np.flatnonzero(labels == name))
        fit += idx[: int(round(FIT_SHARE * len(idx)))].tolist()
    fit_mask = np.zeros(len(labels), dtype=bool)
    fit_mask[fit] = True
    return np.flatnonzero(fit_mask), np.flatnonzero(~fit_mask)


@dataclass(frozen=True)
class VoteCalibration:
    """Both models' calibrations and, with a target precision, the threshold found for it.

    The ECEs in `champion` and `second` are measured on the held-out part of the val slice (not
    the part the temperature was fitted on); `n` is how many images each temperature was fitted on.
    """

    champion: Calibration
    second: Calibration
    choice: ThresholdChoice | None
    val_images: int
    fit_images: int
    choice_images: int

    @property
    def temperatures(self) -> tuple[float, float]:
        return self.champion.temperature, self.second.temperature

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow and the flow's result."""
        out: dict[str, float] = {"calibration_val_images": self.val_images,
                                 "calibration_fit_images": self.fit_images,
                                 "calibration_choice_images": self.choice_images}
        for who, cal in (("champion", self.champion), ("second", self.second)):
            out |= {f"{who}_temperature": cal.temperature, f"{who}_ece_before": cal.ece_before,
                    f"{who}_ece_after": cal.ece_after}
        if self.choice is not None:
            c = self.choice
            out |= {"target_precision": c.target, "chosen_threshold": c.threshold, "estimated_precision": c.precision,
                    "precision_lower": c.lower, "precision_upper": c.upper, "target_met": float(c.met),
                    "val_auto_share": c.share}
        return out


def vote_scores(
    probs_a: np.ndarray, probs_b: np.ndarray, classes: Sequence[str], classes_a: Sequence[str],
    classes_b: Sequence[str],
) -> tuple[np.ndarray, np.ndarray]:
    """`dual_scores` with the active-learning rule's other exception: a class the other model lacks.

    Args:
        probs_a, probs_b: [N, C] calibrated probabilities aligned to `classes`.
        classes: the union of both models' classes (`label_classes`).
        classes_a, classes_b: each model's own classes.

    Returns:
        (scores [N]: 0 where the rule sends the image to labelers whatever the threshold,
        agreed column index [N]).
    """
    scores, top_a = dual_scores(probs_a, probs_b)
    names = np.asarray(classes, dtype=object)
    unknown = ~np.isin(names[top_a], list(classes_b)) | ~np.isin(names[probs_b.argmax(1)], list(classes_a))
    return np.where(unknown, 0.0, scores), top_a


def calibrate_vote(
    dataset_dir: str | Path, champion: ModelRef, second: ModelRef, *, champion_tta: bool = True,
    second_tta: bool = False, fit_temperatures: bool = True, target_precision: float = 0.0, limit: int = VAL_LIMIT,
    confidence: float = 0.95, batch_size: int = 256, seed: int = 0,
) -> VoteCalibration:
    """Fit both models' temperatures on the dataset's val split; with a target, find the threshold.

    Args:
        dataset_dir: the labelled dataset the auto-labels go into.
        champion, second: the two voting models.
        champion_tta: the champion votes with TTA, so it is calibrated on its TTA probabilities.
        second_tta: the same for the second model.
        fit_temperatures: False keeps both temperatures at 1 (only measures, and finds the
            threshold on the raw scores).
        target_precision: in (0, 1): find the threshold for it (`threshold_for_precision`); 0: don't.
        limit: most val images used (`val_slice`).
        confidence: of the precision's interval.
        batch_size: inference batch size.
        seed: of the slice and its split.

    Returns:
        The VoteCalibration.

    Raises:
        SaofuError: fewer than MIN_VAL_IMAGES labelled val images of the models' classes (or
            fewer than MIN_VAL_IMAGES // 2 for either model or either part).
    """
    if not (target_precision == 0.0 or 0.0 < target_precision < 1.0):
        raise SaofuError(f"target precision must be 0 (off) or in (0, 1), got {target_precision}")
    classes = list(champion.classes) + [c for c in second.classes if c not in champion.classes]
    found = val_slice(dataset_dir, classes, limit, seed)
    if len(found.paths) < MIN_VAL_IMAGES:
        raise SaofuError(f"{dataset_dir} has {len(found.paths)} labelled val images of the classes {classes} "
                         f"(human or generated, not auto): calibration needs at least {MIN_VAL_IMAGES}")
    fit, choose = _split_halves(found.labels, seed)
    raw_a = predict_pool(champion.onnx_path, found.paths, batch_size, tta=champion_tta)
    raw_b = predict_pool(second.onnx_path, found.paths, batch_size, tta=second_tta)
    cal_a = _calibrate_one(raw_a, found.labels, champion, fit, choose, fit_temperatures)
    cal_b = _calibrate_one(raw_b, found.labels, second, fit, choose, fit_temperatures)
    choice = None
    if target_precision:
        probs_a = align_probs(cal_a.apply(raw_a[choose]), champion.classes, classes)
        probs_b = align_probs(cal_b.apply(raw_b[choose]), second.classes, classes)
        scores, agreed = vote_scores(probs_a, probs_b, classes, champion.classes, second.classes)
        truth = np.array([classes.index(found.labels[i]) for i in choose])
        choice = threshold_for_precision(scores, agreed == truth, target_precision, confidence)
    return VoteCalibration(cal_a, cal_b, choice, len(found.paths), len(fit), len(choose))


def _calibrate_one(
    raw: np.ndarray, labels: list[str], model: ModelRef, fit: np.ndarray, choose: np.ndarray, fit_temperature_: bool,
) -> Calibration:
    """One model's temperature, fitted on the `fit` images of its own classes, ECE on the `choose` ones."""
    y = np.array([model.classes.index(label) if label in model.classes else -1 for label in labels])
    fit, choose = fit[y[fit] >= 0], choose[y[choose] >= 0]
    if min(len(fit), len(choose)) < MIN_VAL_IMAGES // 2:
        raise SaofuError(f"too few labelled val images of {model.model_version}'s classes {list(model.classes)} "
                         f"to calibrate it: {len(fit)} to fit, {len(choose)} to check (need "
                         f"{MIN_VAL_IMAGES // 2} each)")
    temperature = fit_temperature(raw[fit], y[fit]) if fit_temperature_ else 1.0
    held_out, truth = raw[choose], y[choose]
    return Calibration(temperature, expected_calibration_error(held_out, truth),
                       expected_calibration_error(apply_temperature(held_out, temperature), truth), len(fit))


def describe(cal: VoteCalibration) -> str:
    """One log line: temperatures, ECE before -> after, and the threshold's estimate."""
    parts = [f"{who} T={c.temperature:.3f} ECE {c.ece_before:.4f} -> {c.ece_after:.4f}"
             for who, c in (("champion", cal.champion), ("second", cal.second))]
    text = f"calibration on {cal.val_images} val images ({cal.fit_images} fit, {cal.choice_images} held out): " + \
        "; ".join(parts)
    if (c := cal.choice) is not None:
        text += (f"; threshold {c.threshold:.4f} for precision >= {c.target}: estimated {c.precision:.4f} "
                 f"[{c.lower:.4f}, {c.upper:.4f}] on {c.selected}/{c.n} held-out images "
                 f"({'met' if c.met else 'NOT met'})")
    return text


def has_new_images(pool_dir: str | Path, since: str | None = None) -> bool:
    """Whether the pool holds images no pass handled yet: without any, calibrating is wasted inference.

    Read without the pool's lock: a pass running meanwhile can only leave fewer, and `route`
    itself reads them again under the lock.
    """
    return bool(pool_images(pool_dir, since, load_state(pool_dir)))


# NO_CACHE: the models and the dataset change under the same arguments (a new champion, new labels).
calibrate_vote_task = task(name="calibrate-vote", cache_policy=NO_CACHE)(calibrate_vote)
