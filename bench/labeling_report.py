"""The labeling bench's report: medians and worst over draws, the verdict, the tables.

A draw is one seed: its own generated worlds, its own trained models, its own random control. One
draw's margin over the target is mostly luck (a handful of wrong labels decides 99.5 %), so the
verdict is taken on the median of at least `MIN_DRAWS` draws, with the worst draw shown beside it.

A draw (`bench.labeling.run_draw`) is a dict with at least:
    seed: int
    results: [{key, strategy, threshold, auto_labelled, share, precision, wrong, human_labels}]
        one per (strategy, fixed threshold) and per target mode (key = the mode's name,
        threshold = the one it chose in that draw);
    calibration: {view: {temperature, fit_n, check_n, ece_before, ece_after, pool_ece_before, pool_ece_after}}
    target_modes: {name: `labeling_strategies.target_mode`'s dict}
The accuracy question's rows (`bench.labeling.retrain_row`) are tabled here too. Nothing here
trains or reads images: the functions work on those dicts (and are tested on hand-made ones).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from bench.labeling_strategies import MIN_DRAWS, PIPELINE_DEFAULT, TARGET_PRECISION, TARGET_SHARE

VIEW_NAMES = {"a": "A", "a_tta": "A + TTA", "b": "B", "b_tta": "B + TTA"}


def result_key(strategy: str, threshold: float | None) -> str:
    """"dual_tta @ 0.95" for a fixed threshold; the bare name for a mode that chooses its own."""
    return strategy if threshold is None else f"{strategy} @ {threshold:g}"


# ---------------------------------------------------------------------------------- aggregation


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def _worst(values: Sequence[float | None], seeds: Sequence[int]) -> tuple[float | None, int | None]:
    """The lowest value and its draw's seed, draws without a value (precision of nothing) skipped."""
    pairs = [(v, s) for v, s in zip(values, seeds, strict=True) if v is not None]
    return min(pairs) if pairs else (None, None)


def summarise_draws(
    draws: Sequence[dict], precision: float = TARGET_PRECISION, share: float = TARGET_SHARE,
    min_draws: int = MIN_DRAWS,
) -> list[dict]:
    """Per result key (strategy and threshold, or target mode): median and worst over the draws.

    Medians and worsts of precision and of share are taken separately (the worst precision and the
    worst share may be different draws). A draw that auto-labelled nothing has no precision: it
    counts in the share's median (as 0) and not in the precision's. `met`: at least `min_draws`
    draws, median precision >= `precision` and median share >= `share`.

    Returns:
        One dict per key, in the order the keys first appear: key, strategy, threshold (None for a
        target mode, whose threshold is chosen per draw), draws, median_precision, median_share, worst_precision,
        worst_precision_seed, worst_share, worst_share_seed, precisions and shares (per draw, in
        draw order), met.
    """
    keys: dict[str, str] = {}
    for draw in draws:
        for r in draw["results"]:
            keys.setdefault(r["key"], r["strategy"])
    summary = []
    for key, strategy in keys.items():
        found = [(d["seed"], r) for d in draws for r in d["results"] if r["key"] == key]
        seeds = [s for s, _ in found]
        precisions = [r["precision"] for _, r in found]
        shares = [r["share"] for _, r in found]
        median_precision = _median([p for p in precisions if p is not None])
        median_share = _median(shares)
        worst_precision, worst_precision_seed = _worst(precisions, seeds)
        worst_share, worst_share_seed = _worst(shares, seeds)
        summary.append({
            "key": key, "strategy": strategy, "threshold": None if key == strategy else found[0][1]["threshold"],
            "draws": len(found), "median_precision": median_precision, "median_share": median_share,
            "worst_precision": worst_precision, "worst_precision_seed": worst_precision_seed,
            "worst_share": worst_share, "worst_share_seed": worst_share_seed,
            "precisions": precisions, "shares": shares,
            "met": (len(found) >= min_draws and median_precision is not None and median_precision >= precision
                    and median_share >= share),
        })
    return summary


def kept_strategy(summary: Sequence[dict], default: tuple[str, float] = PIPELINE_DEFAULT) -> tuple[dict, bool]:
    """The strategy kept: the one meeting the target at the largest median share.

    Ties go to the higher median precision. When none meets the target, the pipeline's default
    (`default`: strategy and threshold; the nearest compared threshold of that strategy if its
    own was not compared) is reported instead.

    Returns:
        (its summary row, whether it met the target).
    """
    met = [r for r in summary if r["met"]]
    if met:
        return max(met, key=lambda r: (r["median_share"], r["median_precision"])), True
    strategy, threshold = default
    same = [r for r in summary if r["strategy"] == strategy and r["threshold"] is not None]
    if not same:
        return summary[0], False
    return min(same, key=lambda r: abs(r["threshold"] - threshold)), False


# ---------------------------------------------------------------------------------- tables


def _pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def _thr(threshold: float | None) -> str:
    if threshold is None:
        return "chosen"
    return f"{threshold:.2f}" if round(threshold, 2) == threshold else f"{threshold:.3f}"  # 0.995 is not 0.99


def format_draw_table(results: Sequence[dict]) -> str:
    """One draw's results, one line per strategy and threshold: auto %, precision %, wrong, human."""
    head = f"{'strategy':<20}{'thr':>7}{'auto %':>9}{'prec %':>9}{'wrong':>7}{'human':>7}"
    lines = [head, "-" * len(head)]
    lines += [f"{r['strategy']:<20}{_thr(r['threshold']):>7}{_pct(r['share'], 1):>9}{_pct(r['precision']):>9}"
              f"{r['wrong']:>7}{r['human_labels']:>7}" for r in results]
    return "\n".join(lines)


def format_summary_table(summary: Sequence[dict], kept: str | None = None, kept_met: bool = True) -> str:
    """Per strategy and threshold: median and worst draw of auto share and precision, target met.

    A target mode's threshold is chosen per draw ("chosen"; the per-draw values are in
    `format_target_modes`). The strategy `kept` is marked "<- kept", or "<- default" when it is
    the pipeline's default standing in because nothing met the target (`kept_met` False).
    """
    head = (f"{'strategy':<20}{'thr':>7} | {'median: auto %':>14}{'prec %':>8} | {'worst: auto %':>13}"
            f"{'prec %':>8} | target")
    lines = [head, "-" * len(head)]
    for r in summary:
        mark = ("<- kept" if kept_met else "<- default") if r["key"] == kept else ""
        lines.append(
            f"{r['strategy']:<20}{_thr(r['threshold']):>7} | {_pct(r['median_share'], 1):>14}"
            f"{_pct(r['median_precision']):>8} | {_pct(r['worst_share'], 1):>13}{_pct(r['worst_precision']):>8} | "
            f"{'met' if r['met'] else 'no':<6}{mark}".rstrip()
        )
    return "\n".join(lines)


def format_calibration_table(draws: Sequence[dict]) -> str:
    """Per draw and model view: temperature and ECE % before -> after, on the slice's check part and the pool."""
    head = (f"{'seed':>4}  {'model':<9}{'T':>7} | {'held-out ECE %: before':>22}{'after':>7} | "
            f"{'pool ECE %: before':>18}{'after':>7}")
    lines = [head, "-" * len(head)]
    for d in draws:
        for view, c in d["calibration"].items():
            lines.append(
                f"{d['seed']:>4}  {VIEW_NAMES.get(view, view):<9}{c['temperature']:>7.3f} | "
                f"{_pct(c['ece_before']):>22}{_pct(c['ece_after']):>7} | "
                f"{_pct(c['pool_ece_before']):>18}{_pct(c['pool_ece_after']):>7}"
            )
    return "\n".join(lines)


def format_target_modes(draws: Sequence[dict]) -> str:
    """Per draw and target mode: the chosen threshold, the slice's estimate and interval, the pool's truth."""
    head = (f"{'seed':>4}  {'mode':<16}{'thr':>7} | {'val: sel/n':>11}{'prec %':>8}{'interval %':>17}"
            f"{'holds':>6} | {'pool: auto %':>12}{'prec %':>8}{'wrong':>6}")
    lines = [head, "-" * len(head)]
    for d in draws:
        for name, t in d["target_modes"].items():
            v, p = t["val"], t["pool"]
            lines.append(
                f"{d['seed']:>4}  {name:<16}{t['threshold']:>7.4f} | {str(v['selected']) + '/' + str(v['n']):>11}"
                f"{_pct(v['precision']):>8}{'[' + _pct(v['lower']) + ', ' + _pct(v['upper']) + ']':>17}"
                f"{'yes' if v['met'] else 'no':>6} | {_pct(p['share'], 1):>12}{_pct(p['precision']):>8}"
                f"{p['wrong']:>6}"
            )
    return "\n".join(lines)


def format_verdict(kept: dict, met: bool, n_draws: int) -> str:
    """The one line saying which strategy is kept, and why."""
    target = (f"precision >= {100 * TARGET_PRECISION:.1f} % with >= {100 * TARGET_SHARE:.0f} % auto-labelled "
              f"on the median of >= {MIN_DRAWS} draws")
    figures = f"median {_pct(kept['median_share'], 1)} % auto-labelled at {_pct(kept['median_precision'])} %"
    if met:
        return f"target ({target}) met; kept: {kept['key']} ({figures}, the largest share meeting it)"
    why = f"only {n_draws} draw(s)" if n_draws < MIN_DRAWS else "no strategy meets it"
    return f"target ({target}) not met ({why}); the pipeline's default {kept['key']}: {figures}"


# ---------------------------------------------------------------------------------- accuracy question


def format_retrain_table(rows: list[dict]) -> str:
    head = (f"{'trained on':<28}{'human':>7}{'auto':>7}{'wrong':>7}{'test acc':>10}"
            f"{'gap pts':>9}{'within 1':>10}{'train s':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        gap = r.get("gap_points")
        lines.append(
            f"{r['config']:<28}{r['human_labels']:>7}{r['auto_labels']:>7}{r['wrong_auto_labels']:>7}"
            f"{r['test_accuracy']:>10.4f}{'' if gap is None else f'{gap:.2f}':>9}"
            f"{'' if gap is None else ('yes' if r['within_1_point'] else 'no'):>10}{r['train_seconds']:>9.1f}"
        )
    return "\n".join(lines)


def labels_needed(retrain_rows: list[dict]) -> dict[str, dict | None]:
    """Per strategy, the fewest human labels whose retrained model came within 1 point of the reference.

    `retrain_rows` are `retrain_row` results with `gap_points`/`within_1_point` set and
    `config` = "<strategy> @ <threshold>" (the reference row has no gap and is skipped). A strategy
    none of whose rows came within 1 point maps to None.
    """
    best: dict[str, dict | None] = {}
    for row in retrain_rows:
        if row.get("gap_points") is None:
            continue
        strategy, _, threshold = row["config"].partition(" @ ")
        best.setdefault(strategy, None)
        if row["within_1_point"] and (best[strategy] is None or row["human_labels"] < best[strategy]["human_labels"]):
            best[strategy] = {"human_labels": row["human_labels"], "threshold": float(threshold),
                              "gap_points": row["gap_points"]}
    return best


def format_labels_needed(needed: dict[str, dict | None], reference: dict) -> str:
    parts = [f"{s} {v['human_labels']:,} (@ {v['threshold']})" if v else f"{s}: none within 1 point"
             for s, v in needed.items()]
    return (f"human labels needed to come within 1 point of the fully human-labelled model "
            f"({reference['human_labels']:,} labels, test acc {reference['test_accuracy']:.4f}): " + ", ".join(parts))
