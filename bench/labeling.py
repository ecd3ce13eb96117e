"""`saofu bench labeling`: how much of a pool the models may label themselves, and at what cost.

Setup, per draw (one seed). Two generated Fu worlds with seeds derived from the draw's: a small
human-labelled *seed set* (train and val splits of the first world, train fonts) and an unlabelled
*pool* with known truth (train and val splits of the second world). The second world's test split
(held-out fonts) is the test set for the accuracy comparison. Two models of different architecture
(model A, the champion, and model B) are trained on the seed set's train split with the same
budget and the draw's seed, and predict the pool, as they are and under test-time augmentation
(`tasks.labeling.tta`). The seed set's val split, labelled and never trained on, calibrates each
model (temperature scaling, `tasks.labeling.calibration`; the expected calibration error is
measured before and after, on that slice and on the pool) and is the validation slice the target
mode chooses its threshold on.

Per threshold, the strategies of `bench.labeling_strategies` side by side (dual agreement plain,
with the champion under TTA, calibrated, the committee with both models under TTA; single-model
confidence; random), plus the target modes, whose threshold is the lowest one certified for 99.5 %
precision on the validation slice. Each reports the share of the pool auto-labelled and the
precision of those labels against the generator's truth. Over the draws, `bench.labeling_report`
takes the median and the worst draw per strategy and names the strategy kept: the one meeting the
target (precision >= 99.5 % with >= 60 % auto-labelled, on the median of >= 3 draws) at the
largest share, or else the pipeline's default.

Then, for the first draw only (it retrains a model per configuration), the accuracy question: a
model trained on seed + the whole pool with TRUE labels (the fully human-labelled reference)
against models trained on seed + auto-labels (wrong ones included) + true labels for the rest, per
configured (strategy, threshold). Reported: human labels used, test accuracy, gap to the
reference, and whether the gap is within 1 point.

Run it: `python -m bench.labeling --help`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bench.labeling_report import (
    format_calibration_table,
    format_draw_table,
    format_labels_needed,
    format_retrain_table,
    format_summary_table,
    format_target_modes,
    format_verdict,
    kept_strategy,
    labels_needed,
    result_key,
    summarise_draws,
)
from bench.labeling_strategies import (
    FIT_SHARE,
    MIN_DRAWS,
    STRATEGIES,
    TARGET_CONFIDENCE,
    TARGET_PRECISION,
    TARGET_RULES,
    TARGET_SHARE,
    THRESHOLDS,
    calibrate_views,
    mask_stats,
    split_holdout,
    strategy_masks,
    target_mode,
    with_calibrated,
    wrong_by_true_class,
)
from bench.models import _device_name
from saofu.errors import SaofuError
from saofu.settings import get_settings
from tasks.data.fu_world import WorldConfig, generate_world, is_same_world
from tasks.data.loading import TensorSplit, prepare_dataset
from tasks.labeling.calibration import expected_calibration_error
from tasks.labeling.tta import tta_probabilities
from tasks.release.evaluation import threshold_report
from tasks.train.loop import TrainConfig, epoch_printer, fit, predict_proba, resolve_device

WITHIN_POINTS = 1.0  # "within 1 point of the fully human-labelled model"
# The seed world needs only train+val; a small test split is mandatory (all shares positive).
SEED_SPLITS = (0.8, 0.15, 0.05)
POOL_SPLITS = (0.7, 0.15, 0.15)  # train+val = pool, test (held-out fonts) = test set
POOL_SEED_OFFSET = 1000  # the pool world's seed: a different world from the seed set's
HOLDOUT_SEED_OFFSET = 2000  # the extra held-out slice's world (`--n-val`), a third one
SEEDS = (0, 1, 2)


# ------------------------------------------------------------------------------------ data


def _world(name: str, cfg: WorldConfig, workers: int | None) -> Path:
    """Generate a world under the data dir, or reuse it when the same config is already there."""
    out = get_settings().data_dir / name
    if is_same_world(out, cfg):
        print(f"world {name}: reusing {out}", flush=True)
        return out
    print(f"world {name}: generating {cfg.n} images of {cfg.image_size}px", flush=True)
    generate_world(out, cfg, progress=lambda d, t: print(f"  {d}/{t} images", flush=True), workers=workers)
    return out


def concat_splits(*splits: TensorSplit) -> TensorSplit:
    """One split holding all of `splits` (same class map) in order."""
    classes = splits[0].classes
    if any(s.classes != classes for s in splits):
        raise SaofuError(f"cannot join splits with different classes: {[s.classes for s in splits]}")
    return TensorSplit(
        torch.cat([s.images for s in splits]), torch.cat([s.labels for s in splits]), list(classes),
        [p for s in splits for p in s.paths],
    )


def with_images(split: TensorSplit, images: torch.Tensor) -> TensorSplit:
    """The same labels on other pixels (a test-time augmented view)."""
    return TensorSplit(images, split.labels, split.classes, split.paths)


def with_labels(split: TensorSplit, labels: np.ndarray) -> TensorSplit:
    """The same images carrying other labels (auto-labels, possibly wrong)."""
    return TensorSplit(split.images, torch.as_tensor(labels, dtype=torch.int64), split.classes, split.paths)


def load_data(n_seed: int, n_pool: int, image_size: int, seed: int, workers: int | None):
    """(seed train, seed val, pool, test) splits of two generated worlds.

    The world sizes are chosen so that seed train+val ~= n_seed and pool ~= n_pool.
    """
    settings = get_settings()
    n1 = round(n_seed / (1 - SEED_SPLITS[2]))
    n2 = round(n_pool / (1 - POOL_SPLITS[2]))
    seed_cfg = WorldConfig(n=n1, seed=seed, image_size=image_size, splits=SEED_SPLITS)
    pool_seed = seed + POOL_SEED_OFFSET
    pool_cfg = WorldConfig(n=n2, seed=pool_seed, image_size=image_size, splits=POOL_SPLITS)
    seed_dir = _world(f"labeling_seed_n{n1}_s{seed}", seed_cfg, workers)
    pool_dir = _world(f"labeling_pool_n{n2}_s{pool_seed}", pool_cfg, workers)
    seed_data = prepare_dataset(seed_dir, image_size, 0.15, seed, settings.cache_dir)
    pool_data = prepare_dataset(pool_dir, image_size, 0.15, seed, settings.cache_dir)
    if seed_data.classes != pool_data.classes:
        raise SaofuError(f"seed and pool worlds differ in classes: {seed_data.classes} vs {pool_data.classes}")
    pool = concat_splits(pool_data.train, pool_data.val)
    return seed_data.train, seed_data.val, pool, pool_data.test


def extra_holdout(n_val: int, image_size: int, seed: int, workers: int | None) -> TensorSplit:
    """~`n_val` more labelled images for the held-out slice: train+val of a third world (train fonts).

    The seed set's val split alone is a few hundred images, and a slice of n can certify at most a
    precision of (alpha/2)^(1/n) (`certifiable_precision`: 99.42 % for 632 at 95 %): under 99.5 %.
    """
    n3 = round(n_val / (1 - SEED_SPLITS[2]))
    cfg = WorldConfig(n=n3, seed=seed + HOLDOUT_SEED_OFFSET, image_size=image_size, splits=SEED_SPLITS)
    data = prepare_dataset(_world(f"labeling_val_n{n3}_s{cfg.seed}", cfg, workers), image_size, 0.15, seed,
                           get_settings().cache_dir)
    return concat_splits(data.train, data.val)


# ------------------------------------------------------------------------------------ training


def train(model: str, train_split: TensorSplit, val: TensorSplit, epochs: int, seed: int, label: str):
    """`fit` with the bench's one budget, printing one line per epoch."""
    print(f"== {label}: {model}, {epochs} epochs on {len(train_split)} images", flush=True)
    cfg = TrainConfig(model=model, epochs=epochs, seed=seed, image_size=int(train_split.images.shape[-1]))
    return fit(cfg, train_split, val, on_epoch=epoch_printer(epochs, prefix="  "))


def probabilities(model, split: TensorSplit) -> np.ndarray:
    with torch.no_grad():
        return predict_proba(model, split, resolve_device("auto")).numpy()


def accuracy_on_test(model, test: TensorSplit, threshold: float = 0.9) -> dict:
    """Top-1 accuracy (the comparison's number) and accuracy at the app's threshold on `test`."""
    negative = "not_fu" if "not_fu" in test.classes else None
    report = threshold_report(probabilities(model, test), test.labels.numpy(), list(test.classes), threshold, negative)
    return {"test_accuracy": report.accuracy, "test_accuracy_at_threshold": report.accuracy_at_threshold}


def retrain_row(
    name: str, mask: np.ndarray, auto_labels: np.ndarray, seed_train: TensorSplit, seed_val: TensorSplit,
    pool: TensorSplit, test: TensorSplit, model: str, epochs: int, seed: int,
) -> dict:
    """Train on seed + pool where `mask` images carry `auto_labels` and the rest the truth."""
    truth = pool.labels.numpy()
    labels = np.where(mask, auto_labels, truth)
    data = concat_splits(seed_train, with_labels(pool, labels))
    result = train(model, data, seed_val, epochs, seed, name)
    return {
        "config": name,
        "auto_labels": int(mask.sum()),
        "wrong_auto_labels": int((labels != truth).sum()),
        # The seed set was labelled by humans too: it counts.
        "human_labels": len(seed_train) + len(seed_val) + int((~mask).sum()),
        **accuracy_on_test(result.model, test),
        "train_seconds": result.seconds,
    }


# ------------------------------------------------------------------------------------ one draw


def model_votes(model_a, model_b, split: TensorSplit) -> dict[str, np.ndarray]:
    """Both models' probabilities on `split`, as they are and under test-time augmentation."""
    votes = {}
    for view, model in (("a", model_a), ("b", model_b)):
        votes[view] = probabilities(model, split)
        votes[f"{view}_tta"] = tta_probabilities(lambda images, m=model: probabilities(m, with_images(split, images)),
                                                 split.images)
    return votes


def calibration_figures(
    calibrations: dict, check_votes: dict[str, np.ndarray], check_truth: np.ndarray,
    pool_votes: dict[str, np.ndarray], pool_truth: np.ndarray,
) -> dict:
    """Per view: the temperature and ECE before/after on the slice's check part and on the pool.

    Neither was fitted on: the check part is the held-out slice's share the temperature never saw.
    """
    def ece(cal, votes, truth):
        return expected_calibration_error(votes, truth), expected_calibration_error(cal.apply(votes), truth)

    figures = {}
    for view, c in calibrations.items():
        before, after = ece(c, check_votes[view], check_truth)
        pool_before, pool_after = ece(c, pool_votes[view], pool_truth)
        figures[view] = {"temperature": c.temperature, "fit_n": c.n, "check_n": len(check_truth),
                         "ece_before": before, "ece_after": after,
                         "pool_ece_before": pool_before, "pool_ece_after": pool_after}
    return figures


def draw_results(
    votes: dict[str, np.ndarray], truth: np.ndarray, classes: Sequence[str], thresholds: Sequence[float],
    seed: int,
) -> tuple[list[dict], dict]:
    """Every strategy at every threshold on the pool.

    Returns:
        (results: one `mask_stats` per (strategy, threshold) with key/strategy/threshold and the
        wrong labels by true class, {threshold: (masks, labels)} for the retrains).
    """
    results, selections = [], {}
    for i, thr in enumerate(thresholds):
        rng = np.random.default_rng([seed, i])  # reproducible control, independent per threshold
        masks, labels = selections[thr] = strategy_masks(votes, classes, thr, rng)
        for s in masks:
            results.append({"key": result_key(s, thr), "strategy": s, "threshold": thr,
                            **mask_stats(masks[s], labels[s], truth),
                            "wrong_by_true_class": wrong_by_true_class(masks[s], labels[s], truth, classes)})
    return results, selections


def run_draw(
    seed: int, n_seed: int, n_pool: int, thresholds: Sequence[float], epochs: int, model_a: str, model_b: str,
    image_size: int, workers: int | None, target_confidence: float = TARGET_CONFIDENCE, n_val: int = 0,
) -> tuple[dict, dict]:
    """One draw: worlds and models of `seed`, calibration, every strategy and target mode on the pool.

    The held-out slice is the seed set's val split, plus `n_val` images of a third world when asked
    (`extra_holdout`); its FIT_SHARE fits the temperatures, the rest measures the ECE and chooses
    the target modes' threshold (`split_holdout`, as active learning does).

    Returns:
        (the draw's figures, as `bench.labeling_report` reads them; what the accuracy question
        needs: the splits, the pool votes and the per-threshold selections).
    """
    started = time.perf_counter()
    print(f"==== draw seed {seed}", flush=True)
    seed_train, seed_val, pool, test = load_data(n_seed, n_pool, image_size, seed, workers)
    holdout = concat_splits(seed_val, extra_holdout(n_val, image_size, seed, workers)) if n_val else seed_val
    classes, truth, holdout_truth = list(pool.classes), pool.labels.numpy(), holdout.labels.numpy()
    print(f"seed set {len(seed_train)}+{len(seed_val)}, held-out slice {len(holdout)}, pool {len(pool)}, "
          f"test {len(test)} (held-out fonts)", flush=True)
    results = {role: train(name, seed_train, seed_val, epochs, seed, f"{role} on the seed set")
               for role, name in (("model A", model_a), ("model B", model_b))}
    net_a, net_b = results["model A"].model, results["model B"].model
    # The held-out slice was never trained on (fit returns the last epoch's model, not val's best,
    # so even the seed val split only watched): an honest slice to fit temperatures and certify a
    # threshold on.
    holdout_votes, pool_votes = model_votes(net_a, net_b, holdout), model_votes(net_a, net_b, pool)
    fit, check = split_holdout(holdout_truth, seed)
    calibrations = calibrate_views({v: p[fit] for v, p in holdout_votes.items()}, holdout_truth[fit])
    check_votes = with_calibrated({v: p[check] for v, p in holdout_votes.items()}, calibrations)
    pool_votes = with_calibrated(pool_votes, calibrations)

    rows, selections = draw_results(pool_votes, truth, classes, thresholds, seed)
    modes = {name: target_mode(rule, check_votes, holdout_truth[check], pool_votes, truth, TARGET_PRECISION,
                               target_confidence)
             for name, rule in TARGET_RULES.items()}
    rows += [{"key": result_key(name, None), "strategy": name, "threshold": m["threshold"], **m["pool"]}
             for name, m in modes.items()]
    draw = {
        "seed": seed,
        "classes": classes,
        "world_seeds": {"seed_set": seed, "pool": seed + POOL_SEED_OFFSET,
                        **({"holdout": seed + HOLDOUT_SEED_OFFSET} if n_val else {})},
        "train_seed": seed,
        "sizes": {"seed_train": len(seed_train), "seed_val": len(seed_val), "holdout": len(holdout),
                  "pool": len(pool), "test": len(test)},
        "seed_models": {
            role: {"model": name, "val_accuracy": results[role].history[-1]["val_accuracy"],
                   **accuracy_on_test(results[role].model, test), "train_seconds": results[role].seconds}
            for role, name in (("model A", model_a), ("model B", model_b))
        },
        "calibration": calibration_figures(calibrations, check_votes, holdout_truth[check], pool_votes, truth),
        "results": rows,
        "target_modes": modes,
    }
    draw["seconds"] = time.perf_counter() - started
    print(format_calibration_table([draw]), flush=True)
    print(format_draw_table(rows), flush=True)
    context = {"splits": (seed_train, seed_val, pool, test), "votes": pool_votes, "selections": selections}
    return draw, context


# ------------------------------------------------------------------------------------ accuracy question


def accuracy_question(
    context: dict, retrain: Sequence[tuple[str, float]], model_a: str, epochs: int, seed: int,
) -> list[dict]:
    """The reference (all pool labels human) and one retrain per (strategy, threshold), on one draw."""
    seed_train, seed_val, pool, test = context["splits"]
    selections, truth = context["selections"], pool.labels.numpy()
    rows = [retrain_row("all human (reference)", np.zeros(len(pool), bool), truth, seed_train, seed_val, pool,
                        test, model_a, epochs, seed)]
    for strategy, thr in retrain:
        if thr not in selections:  # a threshold outside the compared ones: draw its masks too
            selections[thr] = strategy_masks(context["votes"], list(pool.classes), thr,
                                             np.random.default_rng([seed, 99]))
        masks, labels = selections[thr]
        if strategy not in masks:
            raise SaofuError(f"cannot retrain with {strategy!r}; strategies: {', '.join(masks)}")
        row = retrain_row(f"{strategy} @ {thr}", masks[strategy], labels[strategy], seed_train, seed_val, pool,
                          test, model_a, epochs, seed)
        row["gap_points"] = 100 * (rows[0]["test_accuracy"] - row["test_accuracy"])
        row["within_1_point"] = row["gap_points"] <= WITHIN_POINTS
        rows.append(row)
        print(format_retrain_table(rows).splitlines()[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------ the bench


def run_labeling_bench(
    n_seed: int = 1200, n_pool: int = 2400, thresholds: Sequence[float] = THRESHOLDS, epochs: int = 10,
    seeds: Sequence[int] = SEEDS, out: str | Path = "bench/results/labeling.json",
    model_a: str = "saofu_fu", model_b: str = "mobilenet_v2_035",
    retrain: Sequence[tuple[str, float]] = (("dual", 0.9), ("random", 0.9), ("single", 0.9)),
    image_size: int = 64, workers: int | None = None, sweep: bool = False,
    target_confidence: float = TARGET_CONFIDENCE, n_val: int = 0,
) -> dict:
    """Compare auto-labelling strategies on generated pools, one draw per seed.

    Args:
        n_seed: human-labelled seed images (train + val of the first world).
        n_pool: unlabelled pool images (train + val of the second world).
        thresholds: confidence thresholds to compare the strategies at.
        epochs: training budget of every model (seed models and retrains alike).
        seeds: one draw per seed: its worlds (seed, seed + 1000), training and random control.
        out: JSON file written.
        model_a: the champion (its labels are the auto-labels; also the retrained architecture).
        model_b: the second model, a different architecture.
        retrain: (strategy, threshold) pairs to retrain with against the fully human-labelled
            reference, on the first draw; () skips the accuracy comparison (and the reference).
        image_size: side of the generated crops.
        workers: world-generation processes (None: generator's default).
        sweep: retrain every strategy at every threshold (replaces `retrain`), so that the human
            labels each strategy needs to come within 1 point of the reference can be read off.
        target_confidence: of the precision interval the target modes' thresholds must hold.
        n_val: labelled images added to the held-out slice (calibration, target modes) from a
            third world; 0: the seed set's val split alone.

    Returns:
        {"summary": the JSON written, "table": the printed tables}.
    """
    started = time.perf_counter()
    seeds = list(dict.fromkeys(seeds))  # a seed given twice is the same draw
    if not seeds:
        raise SaofuError("the labeling bench needs at least one seed")
    if sweep:
        retrain = [(strategy, thr) for strategy in STRATEGIES for thr in thresholds]
    draws, retrain_rows = [], []
    for i, seed in enumerate(seeds):
        draw, context = run_draw(seed, n_seed, n_pool, thresholds, epochs, model_a, model_b, image_size, workers,
                                 target_confidence, n_val)
        draws.append(draw)
        if i == 0 and retrain:
            retrain_rows = accuracy_question(context, retrain, model_a, epochs, seed)

    summary_rows = summarise_draws(draws)
    kept, met = kept_strategy(summary_rows)
    needed = labels_needed(retrain_rows) if retrain_rows else {}
    first = draws[0]
    summary = {
        "benchmark": "labeling",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": _device_name(),
        "strategy": kept["key"],
        "strategy_is": "kept: meets the target at the largest median share" if met
        else "the pipeline's default: no strategy meets the target",
        "median_precision": kept["median_precision"],
        "median_auto_share": kept["median_share"],
        "worst_precision": kept["worst_precision"],
        "worst_auto_share": kept["worst_share"],
        "met": met,
        "target": {"precision": TARGET_PRECISION, "share": TARGET_SHARE, "min_draws": MIN_DRAWS,
                   "confidence": target_confidence,
                   "met_by": [r["key"] for r in summary_rows if r["met"]]},
        "setup": {
            "seeds": seeds, "n_seed": first["sizes"]["seed_train"] + first["sizes"]["seed_val"],
            **first["sizes"], "test_split": "pool world's test (held-out fonts)",
            "holdout_slice": "the seed set's val split (labelled, not trained on)"
                             + (f" + {first['sizes']['holdout'] - first['sizes']['seed_val']} images of a third world"
                                if n_val else "")
                             + f"; {FIT_SHARE:.0%} of each class fits the temperatures, the rest measures the ECE "
                               "and chooses the target modes' threshold",
            "image_size": image_size, "epochs": epochs, "model_a": model_a, "model_b": model_b,
            "thresholds": list(thresholds), "retrain": [list(r) for r in retrain], "retrain_draw": seeds[0],
            "classes": first["classes"],
        },
        "summary": summary_rows,
        "draws": draws,
        "retrain": retrain_rows,
        "human_labels_needed_within_1_point": needed,
        "notes": (
            "median and worst are over the draws, precision and share each on its own (the worst precision and "
            "the worst share may be different draws). human_labels in `draws` counts pool images only; in "
            "`retrain` it includes the seed set, and the retrains are one draw's (the first seed). ECE: "
            "`ece_before/after` on the held-out slice's check part, `pool_ece_*` on the pool: neither was fitted on. "
            "The held-out slice is labelled by humans too: `--n-val` images are labels the pool does not save."
        ),
        "total_seconds": time.perf_counter() - started,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    table = "\n\n".join(filter(None, [
        f"{len(draws)} draw(s), seeds {', '.join(map(str, seeds))}: median and worst draw per strategy",
        format_summary_table(summary_rows, kept["key"], met),
        format_verdict(kept, met, len(draws)),
        f"calibration (temperature fitted on {FIT_SHARE:.0%} of the held-out slice; ECE % before -> after on the "
        "rest of it and on the pool):\n"
        + format_calibration_table(draws),
        f"target modes (lowest threshold whose {100 * target_confidence:.0f} % interval holds "
        f">= {100 * TARGET_PRECISION:.1f} % on the held-out slice's check part; its "
        f"{first['target_modes']['target']['val']['n']} images can certify at most "
        f"{100 * first['target_modes']['target']['val']['certifiable']:.2f} %):\n" + format_target_modes(draws),
        format_retrain_table(retrain_rows) if retrain_rows else "",
        format_labels_needed(needed, retrain_rows[0]) if retrain_rows else "",
        f"{summary['device']}; {summary['total_seconds']:.0f} s; written to {out}",
    ]))
    return {"summary": summary, "table": table}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-seed", type=int, default=1200)
    p.add_argument("--n-pool", type=int, default=2400)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    p.add_argument("--model-a", default="saofu_fu")
    p.add_argument("--model-b", default="mobilenet_v2_035")
    p.add_argument("--retrain", nargs="*", default=["dual@0.9", "random@0.9", "single@0.9"],
                   help="strategy@threshold pairs to retrain with (first draw); none to skip")
    p.add_argument("--sweep", action="store_true",
                   help="retrain every strategy at every threshold: human labels needed within 1 point")
    p.add_argument("--seed", type=int, action="append", help="one draw per seed (repeat; default 0 1 2)")
    p.add_argument("--target-confidence", type=float, default=TARGET_CONFIDENCE)
    p.add_argument("--n-val", type=int, default=0, help="labelled images added to the held-out slice")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--out", default="bench/results/labeling.json")
    a = p.parse_args(argv)
    retrain = [(s, float(t)) for s, t in (r.split("@") for r in a.retrain)]
    result = run_labeling_bench(a.n_seed, a.n_pool, a.thresholds, a.epochs, a.seed or SEEDS, a.out, a.model_a,
                                a.model_b, retrain, image_size=a.image_size, workers=a.workers, sweep=a.sweep,
                                target_confidence=a.target_confidence, n_val=a.n_val)
    print(result["table"])


if __name__ == "__main__":  # the guard also keeps the world generator's spawned workers safe
    main()
