"""Which old-class images the fast retrain loses, from seed to seed, and whether the champion knew them.

The fast-retrain bench's one unmet target is its old classes: every draw loses 7-12 of the 1,020
held-out-font `not_fu` images to the new class. This probe asks what those images are. It
fine-tunes from the bench's champion as the fast retrain does (the bench's world and budget, one
fine-tune per seed, as `bench.new_class_bias`) and reports:

* how many of the seeds lose each lost image: a loss every seed shares is the data's, one seed's
  alone is the fine-tune's noise (which an average of two fine-tunes, also reported for every
  pair of seeds, would remove);
* whether the champion was sure of each image it had right (its own probability of the class at
  least the serving threshold) or had it right only because, unsure, its answer fell back to
  `not_fu`: a confident new class can take the latter without anything the champion knew being
  forgotten; and whether a lost image was answered with a refinement of its class (a 福 as the
  merchant's 福: wrong for the bench and the gate's recall, agreement for the canary). Known, and answered as another
  class: *forgotten* (the fast-retrain bench records the same per draw);
* per look-alike character of the regression set (褔 幅 辐 ...), framed by the merchant or not:
  how often the champion itself is sure it is a 福 (wrong), its median probability of `fu`, and
  how many of the seeds' fine-tunes answer `fu_merchant`.

Run it alone after `saofu bench fast-retrain` (two torch processes on 2 cores slow each other):
    python -m bench.old_class_losses [--seeds 0,1,2,3,4] [--budget-s 27] [--out PATH]
About 40 s per seed. Writes bench/results/old_class_losses.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections import Counter
from pathlib import Path

import numpy as np

from bench.fast_retrain import BUDGET_MIN, THRESHOLD, judged
from bench.fine_tune_selection import REFINES, bench_world, decided_right, probabilities, seed_list

OUT = Path("bench/results/old_class_losses.json")
OLD = ("fu", "not_fu")


def losses(before: np.ndarray, after: np.ndarray, names: np.ndarray) -> dict:
    """Per old class: images lost (right before, wrong after) and won, and the drop in points."""
    out = {}
    for c in OLD:
        m = names == c
        lost, won = int((before & ~after & m).sum()), int((~before & after & m).sum())
        out[c] = {"lost": lost, "won": won, "drop_pts": 100 * (lost - won) / int(m.sum())}
    return out


def seeds_losing(lost_by_seed: list[np.ndarray]) -> dict[int, int]:
    """How many images are lost by exactly k of the seeds, for each k that occurs."""
    counts = Counter(np.sum(lost_by_seed, axis=0).tolist())
    return {int(k): int(v) for k, v in sorted(counts.items()) if k > 0}


def look_alike_rows(chars: list[str], framed: np.ndarray, champion_fu: np.ndarray,
                    new_class_by_seed: list[np.ndarray]) -> list[dict]:
    """Per (character, merchant frame or not) of `not_fu` images: how the champion and the seeds answer.

    Args:
        chars: each image's character ('' for none).
        framed: True where the image wears the merchant's frame.
        champion_fu: the champion's probability of `fu` per image.
        new_class_by_seed: per seed, True where the fine-tune answers the new class.
    """
    rows = []
    for char, frame in sorted({(c, bool(f)) for c, f in zip(chars, framed, strict=True)}):
        m = (np.asarray(chars) == char) & (framed == frame)
        rows.append({"char": char, "framed": frame, "n": int(m.sum()),
                     "champion_sure_fu": int((champion_fu[m] >= THRESHOLD).sum()),
                     "champion_median_p_fu": float(np.median(champion_fu[m])),
                     "answered_new_class_mean": float(np.mean([s[m].sum() for s in new_class_by_seed]))})
    return rows


def run(seeds: list[int], budget_s: float) -> dict:
    from bench.models import _device_name
    from tasks.data.loading import prepare_dataset
    from tasks.data.manifest import read_manifest
    from tasks.train.fine_tune import FineTuneConfig, fine_tune
    from tasks.train.loop import load_checkpoint

    world = bench_world()
    size = world.image_size
    data = prepare_dataset(world.data_dir, size, world.val_share, world.split_seed, world.cache_dir)
    paths, names = [p for p, _ in world.regression], np.array([c for _, c in world.regression])
    base, state = load_checkpoint(world.champion)
    champion_classes = list(state["classes"])
    before_p, labels = probabilities(base, champion_classes, paths, list(names), size)
    before, sure, _ = judged(before_p, labels, champion_classes, REFINES)
    draws, lost_by_seed, new_by_seed, held_by_seed, reg_by_seed = [], [], [], [], []
    for seed in seeds:
        cfg = FineTuneConfig(new_classes=["fu_merchant"], refines=REFINES, budget_s=budget_s, seed=seed)
        result = fine_tune(world.champion, data, cfg, world.work / f"losses-seed{seed}.pt")
        held, held_labels = probabilities(result.model, result.classes, world.held_out,
                                          ["fu_merchant"] * len(world.held_out), size)
        reg, reg_labels = probabilities(result.model, result.classes, paths, list(names), size)
        after, _, refined = judged(reg, reg_labels, result.classes, REFINES)
        lost = before & ~after
        refined &= lost
        recall = float(decided_right(held, held_labels, result.classes).mean())
        row = {"seed": seed, "epochs_run": result.epochs_run, "new_class_recall": recall,
               "old_classes": losses(before, after, names),
               "lost_sure": {c: int((lost & sure & (names == c)).sum()) for c in OLD},
               "lost_refined": {c: int((refined & (names == c)).sum()) for c in OLD},
               "forgotten": {c: int((lost & sure & ~refined & (names == c)).sum()) for c in OLD}}
        print(f"seed {seed} ({result.epochs_run} epochs): recall {recall:.3f}, " + "; ".join(
            f"{c} lost {v['lost']} ({row['lost_sure'][c]} sure, {row['lost_refined'][c]} to a refinement) "
            f"won {v['won']}" for c, v in row["old_classes"].items()), flush=True)
        draws.append(row)
        lost_by_seed.append(lost & (names == "not_fu"))
        new_by_seed.append(reg[:, result.classes.index("fu_merchant")] >= THRESHOLD)
        held_by_seed.append((held, held_labels))
        reg_by_seed.append(reg)
        classes = result.classes
    pairs = []
    for a, b in itertools.combinations(range(len(seeds)), 2):
        after = decided_right((reg_by_seed[a] + reg_by_seed[b]) / 2, reg_labels, classes)
        held = (held_by_seed[a][0] + held_by_seed[b][0]) / 2
        pairs.append({"seeds": [seeds[a], seeds[b]],
                      "new_class_recall": float(decided_right(held, held_labels, classes).mean()),
                      "old_classes": losses(before, after, names)})
    root = Path(world.regression[0][0]).parents[2]  # <world>/test/<class>/<image>: the world's manifest
    facts = {str((root / r["path"]).resolve()): r for r in read_manifest(root)}
    rows = [facts[str(Path(p).resolve())] for p in paths]
    not_fu = names == "not_fu"
    fu_col = champion_classes.index("fu")
    always = np.all(lost_by_seed, axis=0)
    return {
        "world": world.description, "budget_s": budget_s, "seeds": seeds, "device": _device_name(),
        "regression_images": {c: int((names == c).sum()) for c in OLD},
        "champion_right_sure": {c: int((before & sure & (names == c)).sum()) for c in OLD},
        "champion_right_by_fallback": {c: int((before & ~sure & (names == c)).sum()) for c in OLD},
        "draws": draws,
        "not_fu_images_lost_by_k_seeds": seeds_losing(lost_by_seed),
        "not_fu_lost_by_every_seed": [
            {"path": rows[i]["path"], "char": rows[i].get("char", ""), "style": rows[i].get("style", ""),
             "font": rows[i].get("font_group", ""), "champion_p_not_fu": float(1 - before_p[i, fu_col])}
            for i in np.flatnonzero(always)],
        "pair_averages": pairs,
        "look_alikes": look_alike_rows([rows[i].get("char", "") for i in np.flatnonzero(not_fu)],
                                       np.array([rows[i].get("style") == "merchant" for i in np.flatnonzero(not_fu)]),
                                       before_p[not_fu, fu_col], [s[not_fu] for s in new_by_seed]),
    }


def format_report(s: dict) -> str:
    """The per-seed losses, how many seeds share them, the pairs' averages and the look-alikes answered."""
    lines = [f"{s['world']}; {s['budget_s']:g} s per fine-tune, seeds {s['seeds']}",
             "champion: right and sure / right only by the not_fu fallback: " + ", ".join(
                 f"{c} {s['champion_right_sure'][c]} / {s['champion_right_by_fallback'][c]}" for c in OLD)]
    lines += [f"seed {d['seed']}: recall {d['new_class_recall']:.3f}; " + "; ".join(
        f"{c} lost {v['lost']} ({d['lost_sure'][c]} sure, {d['lost_refined'][c]} to a refinement, "
        f"{d['forgotten'][c]} forgotten) won {v['won']}" for c, v in d["old_classes"].items()) for d in s["draws"]]
    lines.append("not_fu images lost by k seeds (k: images): " + ", ".join(
        f"{k}: {v}" for k, v in s["not_fu_images_lost_by_k_seeds"].items()))
    lines += [f"  lost by every seed: {r['char'] or '-'} {r['style']} {r['font']} (champion p(not_fu) "
              f"{r['champion_p_not_fu']:.3f}) {r['path']}" for r in s["not_fu_lost_by_every_seed"]]
    def largest(row: dict) -> float:
        return max(v["drop_pts"] for v in row["old_classes"].values())

    pairs = s["pair_averages"]
    lines.append(f"two seeds' probabilities averaged, {len(pairs)} pairs: largest old-class drop median "
                 f"{statistics.median(map(largest, pairs)):.2f} pts (single seeds "
                 f"{statistics.median(map(largest, s['draws'])):.2f}), not_fu lost "
                 + ", ".join(str(p["old_classes"]["not_fu"]["lost"]) for p in pairs))
    lines.append("not_fu look-alikes the fine-tunes answer fu_merchant (char, framed: n, champion sure it is fu, "
                 "champion's median p(fu), answered fu_merchant on the seeds' mean):")
    lines += [f"  {r['char']} {'framed' if r['framed'] else 'plain '}: {r['n']}, {r['champion_sure_fu']}, "
              f"{r['champion_median_p_fu']:.3f}, {r['answered_new_class_mean']:.1f}"
              for r in s["look_alikes"] if r["answered_new_class_mean"] > 0 or r["champion_sure_fu"] > 0]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.old_class_losses", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=seed_list, default="0,1,2,3,4")
    parser.add_argument("--budget-s", type=float, default=60 * BUDGET_MIN, help="the fast-retrain bench's")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    seeds = args.seeds
    if len(seeds) < 2:
        parser.error("--seeds: at least two (the probe compares seeds)")
    summary = run(seeds, args.budget_s)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    print(format_report(summary))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
