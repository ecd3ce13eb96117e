"""Every epoch of the fast retrain's fine-tune scored on held-out images: what each keep rule would keep.

The fine-tune validates after every epoch and keeps one (`tasks/train/kept_epoch.py`). Whether a
rule keeps well cannot be read off one fine-tune's result: this probe records the weights of every
epoch as the fine-tune validated them and scores each on the held-out images of a world (new-class
recall at the serving threshold on held-out fonts, largest old-class drop in points against the
champion; as `bench/fine_tune_selection.py` scores), then says what each rule would have kept:

* `kept`: what the fine-tune returned (an expanded model's last epoch, since 2026-12-06);
* `recall`: `EpochKeeper`'s rule, the grown classifier's (the old-class check, or within two val
  images of the fewest lost, then the best balanced recall), read off the same epochs; the
  expanded fine-tune's rule from 2026-12-05 to -06;
* `strict`: the rule before 2026-12-05 (the check, else the fewest lost, the first of equals);
* `last`: the last epoch.

Run it alone (two torch processes on 2 cores slow each other):
    python -m bench.fine_tune_epochs [--world selection|bench] [--seeds 0,1,2,3,4] [--budget-s 45]
                                     [--out PATH] [CONFIG_JSON]
`--world` as in `bench.fine_tune_selection` (bench: the fast-retrain bench's world as its last run
left it); CONFIG_JSON: `FineTuneConfig` fields to override. About 75 s per seed at 45 s on 2 CPU
cores. Writes bench/results/fine_tune_epochs_<world>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from unittest import mock

from bench.fine_tune_selection import REFINES, ProbeWorld, bench_world, champion_scorer, seed_list, selection_world

OUT = "bench/results/fine_tune_epochs_{world}.json"


def strict_rule(epochs: list[dict], max_drop: float) -> dict:
    """The keep rule until 2026-12-05: the best recall among passing epochs, else the first that lost least."""
    passing = [e for e in epochs if e["val_drop"] <= max_drop + 1e-9]
    if passing:
        return max(passing, key=lambda e: e["val_recall"])
    return min(epochs, key=lambda e: round(e["val_drop"], 6))


def recall_rule(epochs: list[dict], max_drop: float, tolerance: float) -> dict:
    """`EpochKeeper`'s choice among `epochs` (as the fine-tune would make it for a grown classifier)."""
    from tasks.train.kept_epoch import EpochKeeper, EvaluatedEpoch

    keeper = EpochKeeper(max_drop, tolerance)
    for e in epochs:
        keeper.add(EvaluatedEpoch(e["epoch"], e["val_drop"], e["val_recall"], e))
    return keeper.kept.kept_with


def run(world: ProbeWorld, seeds: list[int], budget_s: float, over: dict) -> dict:
    import tasks.train.fine_tune as fine_tune_module
    from bench.models import _device_name
    from tasks.data.loading import prepare_dataset
    from tasks.train.fine_tune import FineTuneConfig, fine_tune
    from tasks.train.kept_epoch import drop_tolerance

    score = champion_scorer(world)
    data = prepare_dataset(world.data_dir, 64, world.val_share, world.split_seed, world.cache_dir)
    tolerance = drop_tolerance(data.val.labels, data.classes, ["fu", "not_fu"])
    evaluated = []

    def recording(keeper: type) -> type:
        """The fine-tune's own keeper, also holding every epoch it was shown (weights as validated)."""

        class Recording(keeper):
            def add(self, epoch):
                evaluated.append(epoch)
                return super().add(epoch)

        return Recording

    draws = []
    for seed in seeds:
        evaluated.clear()
        # Every epoch validated, so that every epoch reaches the keeper (an expanded fine-tune
        # validates only its last by default); each one costs training time within the budget.
        cfg = FineTuneConfig(new_classes=["fu_merchant"], refines=REFINES, budget_s=budget_s, seed=seed,
                             **{"validate_every_epoch": True, **over})
        with (mock.patch.object(fine_tune_module, "EpochKeeper", recording(fine_tune_module.EpochKeeper)),
              mock.patch.object(fine_tune_module, "LastEpochKeeper", recording(fine_tune_module.LastEpochKeeper))):
            result = fine_tune(world.champion, data, cfg, world.work / f"epochs-seed{seed}.pt")
        model, epochs = result.model, []
        for e in evaluated:
            model.load_state_dict(e.kept_with[2])  # fine_tune keeps (val metrics, val recall, weights)
            epochs.append({"epoch": e.epoch, "val_drop": e.drop, "val_recall": e.recall,
                           **score(model, result.classes)})
        by_epoch = {e["epoch"]: e for e in epochs}
        picks = {"kept": by_epoch[result.best_epoch], "recall": recall_rule(epochs, cfg.max_old_class_drop, tolerance),
                 "strict": strict_rule(epochs, cfg.max_old_class_drop), "last": epochs[-1]}
        print(f"seed {seed}: " + ", ".join(f"{k} epoch {p['epoch']} ({p['new_class_recall']:.3f}, "
                                           f"{p['max_old_class_drop_pts']:.2f})" for k, p in picks.items()), flush=True)
        draws.append({"seed": seed, "epochs": epochs, "picked": {k: p["epoch"] for k, p in picks.items()}})
    rules = {}
    for rule in picks:
        chosen = [{e["epoch"]: e for e in d["epochs"]}[d["picked"][rule]] for d in draws]
        rules[rule] = {k: statistics.median(c[k] for c in chosen)
                       for k in ("new_class_recall", "max_old_class_drop_pts")}
        rules[rule]["draws"] = [(c["epoch"], round(c["new_class_recall"], 4), round(c["max_old_class_drop_pts"], 2))
                                for c in chosen]
    return {"world": world.description, "budget_s": budget_s, "config": over, "seeds": seeds,
            "held_out_merchant": len(world.held_out), "regression_images": len(world.regression),
            "device": _device_name(),
            "rules": rules, "draws": draws}


def format_table(summary: dict) -> str:
    lines = ["rule    median (new-class recall, largest old-class drop pts)   per seed: epoch (recall, drop)"]
    for rule, r in summary["rules"].items():
        per_seed = "  ".join(f"e{e} ({rec:.3f}, {d:.2f})" for e, rec, d in r["draws"])
        lines.append(f"{rule:7s} ({r['new_class_recall']:.3f}, {r['max_old_class_drop_pts']:.2f})   {per_seed}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fine_tune_epochs", description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=["selection", "bench"], default="selection")
    parser.add_argument("--seeds", type=seed_list, default="0,1,2,3,4", help="comma-separated (default 0,1,2,3,4)")
    parser.add_argument("--budget-s", type=float, default=45.0)
    parser.add_argument("--out", type=Path,
                        help="where the JSON goes (default bench/results/fine_tune_epochs_<world>.json)")
    parser.add_argument("config", nargs="?", default="{}", help="FineTuneConfig fields to override, as JSON")
    args = parser.parse_args(argv)
    try:
        over = json.loads(args.config)
    except ValueError as exc:
        parser.error(f"{exc}")
    if not isinstance(over, dict):
        parser.error(f"CONFIG_JSON must be a JSON object of FineTuneConfig fields, got {args.config}")
    from tasks.train.fine_tune import FineTuneConfig

    unknown = sorted(set(over) - {f.name for f in dataclasses.fields(FineTuneConfig)})
    if unknown:
        parser.error(f"not FineTuneConfig fields: {', '.join(unknown)}")
    world = bench_world() if args.world == "bench" else selection_world()
    summary = run(world, args.seeds, args.budget_s, over)
    out = args.out or Path(OUT.format(world=args.world))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(format_table(summary))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
