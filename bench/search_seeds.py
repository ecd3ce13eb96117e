"""The pruning comparison of `saofu bench search` over several draws (seeds), side by side.

One draw of three studies says little: a single lucky random trial decides "random search's final
best", the bar the others race to. This reads the JSON files of several `bench search` runs (one
seed each) and puts them side by side: per seed, each study's best score and the share of random
search's compute it needed to reach random's final best; over seeds, the median share and in how
many draws each study reached the bar within the target share. One plot shows every draw's
curves on a common scale: compute as a share of random's, score relative to random's final best,
so "reaching the bar within 1/3" is the curve crossing 1.0 left of the dashed line.

Run it: `python -m bench.search_seeds bench/results/search_pruning_s*.json` or
`saofu bench search-seeds FILES...`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from bench.search import TARGET_COMPUTE_SHARE, compute_to_reach
from saofu.errors import SaofuError


def _load(path: Path) -> dict:
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SaofuError(f"cannot read search bench result {path}: {exc}") from exc
    if summary.get("benchmark") != "search" or not summary.get("studies"):
        raise SaofuError(f"{path} is not a `saofu bench search` result (no 'studies')")
    return summary


def _random_study(summary: dict) -> dict:
    """The draw's random-search study: its final best is the bar, its compute the unit."""
    study = next((s for s in summary["studies"] if s["sampler"] == "random"), None)
    if study is None or study["best_score"] is None:
        raise SaofuError(f"seed {summary['settings']['seed']}: no finished random-search study to race against")
    return study


def draw_row(summary: dict) -> dict:
    """One draw: per study its best score, compute, and share of random's compute to reach random's best."""
    studies = summary["studies"]
    random_study = _random_study(summary)
    bar, random_compute = random_study["best_score"], random_study["compute_s"]
    row = {"seed": summary["settings"]["seed"], "random_best": bar, "date": summary["date"], "studies": {}}
    for s in studies:
        reach = compute_to_reach([tuple(p) for p in s["curve"]], bar)
        row["studies"][s["label"]] = {
            "trials": s["trials"], "pruned": s["pruned"], "best_score": s["best_score"],
            "compute_s": s["compute_s"], "share": None if reach is None else reach / random_compute,
        }
    return row


def summarise_seeds(summaries: Sequence[dict]) -> dict:
    """Per-draw rows and, per study, the median share (a draw that never reached the bar counts as
    infinitely late) and how many draws reached the bar within `TARGET_COMPUTE_SHARE`."""
    if not summaries:
        raise SaofuError("no search bench results given")
    seeds = [s["settings"]["seed"] for s in summaries]
    if len(set(seeds)) != len(seeds):
        raise SaofuError(f"search bench results repeat a seed: {seeds}")
    rows = [draw_row(s) for s in summaries]
    labels = [s["label"] for s in summaries[0]["studies"]]
    per_study = {}
    for label in labels:
        shares = [r["studies"][label]["share"] for r in rows if label in r["studies"]]
        ranked = [float("inf") if v is None else v for v in shares]
        median = statistics.median(ranked)
        per_study[label] = {
            "median_share": None if median == float("inf") else median,
            "within_target": sum(v <= TARGET_COMPUTE_SHARE for v in ranked),
            "draws": len(shares),
            "median_best_score": statistics.median(r["studies"][label]["best_score"] for r in rows
                                                   if label in r["studies"]),
        }
    hyperband = per_study[labels[0]]
    return {
        "benchmark": "search_seeds",
        "seeds": seeds,
        "draws": rows,
        "studies": per_study,
        "target": {"share_of_random_compute_at_most": TARGET_COMPUTE_SHARE, "judged_on": "median over draws",
                   "met": hyperband["median_share"] is not None and hyperband["median_share"] <= TARGET_COMPUTE_SHARE},
    }


def format_seeds(result: dict) -> str:
    labels = list(result["studies"])
    head = f"{'seed':>5}{'random best':>13}" + "".join(f"{label:>24}" for label in labels)
    lines = ["best score / share of random's compute to reach random's best, per draw", head, "-" * len(head)]
    for r in result["draws"]:
        cells = []
        for label in labels:
            s = r["studies"].get(label)
            share = "never" if s is None or s["share"] is None else f"{s['share']:.2f}"
            cells.append(f"{'-' if s is None else format(s['best_score'], '.3f')} / {share}".rjust(24))
        lines.append(f"{r['seed']:>5}{r['random_best']:>13.3f}" + "".join(cells))
    lines.append("-" * len(head))
    cells = []
    for label in labels:
        s = result["studies"][label]
        share = "never" if s["median_share"] is None else f"{s['median_share']:.2f}"
        cells.append(f"{s['median_best_score']:.3f} / {share}".rjust(24))
    lines.append(f"{'median':>5}{'':>13}" + "".join(cells))
    lines.append(f"{'draws within 1/3':<18}" + "".join(
        f"{result['studies'][label]['within_target']} of {result['studies'][label]['draws']}".rjust(24)
        for label in labels))
    t = result["target"]
    lines.append(f"pruning target (Hyperband's median share <= {t['share_of_random_compute_at_most']:.2f}): "
                 f"{'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def plot_seeds(summaries: Sequence[dict], path: Path) -> Path:
    """Every draw's best-so-far curves, compute relative to random's total, score relative to random's best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    styles = ["-", "--", ":", "-."]
    for i, summary in enumerate(summaries):
        random_study = _random_study(summary)
        bar, total = random_study["best_score"], random_study["compute_s"]
        for s in summary["studies"]:
            pts = [(sec / total, best / bar) for sec, _, best in s["curve"] if best > float("-inf")]
            if not pts:
                continue
            colour = colours.setdefault(s["label"], f"C{len(colours)}")
            ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color=colour,
                    linestyle=styles[i % len(styles)], alpha=0.85,
                    label=f"{s['label']} (seed {summary['settings']['seed']})")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.axvline(TARGET_COMPUTE_SHARE, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("compute spent / random search's total compute")
    ax.set_ylabel("best score so far / random search's final best")
    ax.set_ylim(bottom=0.6)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7, ncol=2)
    ax.set_title(f"search at equal compute, {len(summaries)} draws")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_search_seeds(paths: Sequence[str | Path], out: str | Path = "bench/results/search_pruning.json") -> dict:
    summaries = sorted((_load(Path(p)) for p in paths), key=lambda s: s["settings"]["seed"])
    result = summarise_seeds(summaries)
    out = Path(out)
    result["inputs"] = [str(p) for p in paths]
    result["curves_png"] = str(plot_seeds(summaries, out.with_name(out.stem + "_curves.png")))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return {"summary": result, "table": format_seeds(result) + f"\nplot {result['curves_png']}; written to {out}"}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="JSON files written by `saofu bench search`, one seed each")
    p.add_argument("--out", default="bench/results/search_pruning.json")
    a = p.parse_args(argv)
    print(run_search_seeds(a.results, a.out)["table"])


if __name__ == "__main__":
    main()
