"""The campaign's loop, second round: a refused fast retrain's badcases, labelled, in the next one.

The fast retrain's gate refuses a challenger that loses more than half a point of an old class,
and the release sends the images it decided wrong (its badcases) to the labelers. Their labels
join the dataset through the ordinary ingest, so the next fast retrain of the same change replays
them. The first round's losses are look-alikes in fonts the training data never drew; the
badcases are such images, labelled. This probe measures whether that second run keeps its old
classes where the first did not.

Per seed, from the world's champion: round 1 fine-tunes as the fast retrain does (`fine_tune`,
the flow's settings); its badcases are the images of the world's test split (the gate's slice:
held-out fonts) it decides wrong at the serving threshold, given their true labels (the labelers
answering right); round 2 fine-tunes again from the champion, with the same seed, on the dataset
that gained them. Both rounds are scored against the champion on a second world drawn in the same
held-out fonts (`bench.held_out_world`, another seed), which nobody labels: new-class recall and
each old class's drop in points, with its 95 % interval.

Run it alone (two torch processes on 2 cores slow each other):
    python -m bench.second_round [--world selection|bench] [--seeds 0,1,2,3,4] [--budget-s S]
                                 [--held-out-n 12000] [--bench-results PATH] [--badcase-copies K]
                                 [--out PATH]
`--world selection` (default): the selection world (`bench.fine_tune_selection`), built on first
use, at the flow's 60 s; its clean set is drawn here (`--held-out-n`). `--world bench`: the
fast-retrain bench's world as its last run left it (`--bench-results`: that run's JSON, for the
champion version), at the bench's budget; its clean set is the bench's own second world.
`--badcase-copies K`: each labelled badcase of an old class K times in round 2's training images,
so the replay's sample draws it about K times as often (as the flow would, were new labels of old
classes replayed first; the new class's images are all trained every epoch anyway). About 2.5
minutes a seed on 2 CPU cores. Writes bench/results/second_round[_bench].json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bench.fast_retrain import BUDGET_MIN, paired_drop
from bench.fine_tune_selection import (
    BENCH_HOME,
    BENCH_RESULTS,
    HOME,
    REFINES,
    ProbeWorld,
    bench_world,
    dataset_with,
    decided_right,
    probabilities,
    seed_list,
    selection_world,
)

if TYPE_CHECKING:
    from tasks.data.loading import TensorSplit

OUT = {"selection": Path("bench/results/second_round.json"), "bench": Path("bench/results/second_round_bench.json")}
BUDGET_S = {"selection": 60.0, "bench": 60 * BUDGET_MIN}  # the flow's default; the bench's own
CLEAN_SEED = 2  # the selection world is seed 1; the clean set must be another draw
WORK = HOME / "second-round"


def badcases(world: ProbeWorld, model, classes: list[str]) -> list[dict]:
    """The world's test-split images `model` decides wrong, as `add_images` rows with their true class."""
    paths = list(world.held_out) + [p for p, _ in world.regression]
    labels = ["fu_merchant"] * len(world.held_out) + [c for _, c in world.regression]
    right = decided_right(*probabilities(model, classes, paths, labels, world.image_size), classes)
    return [{"image": str(p), "label": c, "source": "human", "split": "train"}
            for p, c, ok in zip(paths, labels, right, strict=True) if not ok]


def with_labelled(world: ProbeWorld, rows: list[dict], home: Path) -> ProbeWorld:
    """`world` whose dataset also holds `rows` (a hard-linked copy; the original is untouched)."""
    dataset_with(world.data_dir, home / "dataset", rows)
    return dataclasses.replace(world, data_dir=home / "dataset", work=home / "fine-tune")


def repeated(split: TensorSplit, rel_paths: set[str], copies: int) -> TensorSplit:
    """`split` with each image at `rel_paths` (dataset-relative, POSIX paths) `copies`
    times: the replay's class-stratified sample then draws it about `copies` times as often."""
    import torch

    from tasks.data.loading import TensorSplit

    ends = tuple("/" + r for r in rel_paths)
    idx = [i for i, p in enumerate(split.paths) if Path(p).as_posix().endswith(ends)]
    if copies <= 1 or not idx:
        return split
    extra = torch.tensor(idx * (copies - 1))
    return TensorSplit(torch.cat([split.images, split.images[extra]]), torch.cat([split.labels, split.labels[extra]]),
                       split.classes, split.paths + [split.paths[i] for i in extra.tolist()])


def clean_world(world: ProbeWorld, n: int) -> ProbeWorld:
    """The selection world scored on a second world of `n` images in its held-out fonts, not its test split."""
    from bench.held_out_world import generate_held_out, world_test_split

    out = WORK / f"clean-{n}"
    if (out / "manifest.csv").exists():
        held, regression = world_test_split(out)
    else:
        shutil.rmtree(out, ignore_errors=True)
        held, regression = generate_held_out(out, n, like=HOME / "world", seed=CLEAN_SEED)
    return dataclasses.replace(world, held_out=held, regression=regression)


def score(clean: ProbeWorld, before: np.ndarray, model, classes: list[str]) -> dict:
    """New-class recall and each old class's drop against the champion (`paired_drop`) on the clean set."""
    held = clean.held_out
    paths, old = [p for p, _ in clean.regression], np.array([c for _, c in clean.regression])
    after = decided_right(*probabilities(model, classes, paths, list(old), clean.image_size), classes)
    held_p = probabilities(model, classes, held, ["fu_merchant"] * len(held), clean.image_size)
    recall = float(decided_right(*held_p, classes).mean())
    drops = {c: paired_drop(before[old == c].astype(float), after[old == c].astype(float)) for c in ("fu", "not_fu")}
    return {"new_class_recall": recall, "old_classes": drops,
            "max_old_class_drop_pts": max(d["drop_pts"] for d in drops.values())}


def bench_clean_world(world: ProbeWorld) -> ProbeWorld:
    """The bench's world scored on the second world its run drew in the same held-out fonts."""
    from bench.held_out_world import held_out_sets

    held, regression = held_out_sets(BENCH_HOME)["second world"]
    return dataclasses.replace(world, held_out=held, regression=regression)


def run(world_name: str, seeds: list[int], budget_s: float, held_out_n: int,
        bench_results: Path = BENCH_RESULTS, badcase_copies: int = 1) -> dict:
    from bench.models import _device_name
    from tasks.data.loading import prepare_dataset
    from tasks.data.manifest import file_sha256, read_manifest
    from tasks.train.fine_tune import FineTuneConfig, fine_tune
    from tasks.train.loop import load_checkpoint

    if world_name == "bench":
        world = bench_world(results=bench_results)
        clean, clean_set = bench_clean_world(world), "the bench's second world, in the same held-out fonts"
    else:
        world = selection_world()
        clean = clean_world(world, held_out_n)
        clean_set = f"a second world, seed {CLEAN_SEED}, {held_out_n} images in the same held-out fonts"
    work = WORK if world_name == "selection" else WORK.with_name("second-round-bench")
    base, state = load_checkpoint(world.champion)
    paths, old = [p for p, _ in clean.regression], [c for _, c in clean.regression]
    before = decided_right(*probabilities(base, state["classes"], paths, old, world.image_size), state["classes"])

    def round_of(w: ProbeWorld, seed: int, home: Path, cases: list[dict] = ()):
        data = prepare_dataset(w.data_dir, w.image_size, w.val_share, w.split_seed, work / "cache")
        if cases and badcase_copies > 1:  # the old classes' labelled badcases counted more in the replay
            shas = {file_sha256(c["image"]) for c in cases if c["label"] in state["classes"]}
            rel = {r["path"] for r in read_manifest(w.data_dir) if r["sha256"] in shas}
            data = dataclasses.replace(data, train=repeated(data.train, rel, badcase_copies))
        cfg = FineTuneConfig(new_classes=["fu_merchant"], refines=REFINES, budget_s=budget_s, seed=seed)
        home.mkdir(parents=True, exist_ok=True)
        return fine_tune(w.champion, data, cfg, home / f"seed{seed}.pt")

    draws = []
    for seed in seeds:
        first = round_of(world, seed, work / "round1")
        model1 = first.model.eval()
        cases = badcases(world, model1, first.classes)
        second = round_of(with_labelled(world, cases, work / f"round2-seed{seed}"), seed, work / "round2", cases)
        draw = {"seed": seed, "badcases": dict(sorted(Counter(c["label"] for c in cases).items())),
                "round1": {**score(clean, before, model1, first.classes), "epochs_run": first.epochs_run},
                "round2": {**score(clean, before, second.model.eval(), second.classes),
                           "epochs_run": second.epochs_run}}
        draws.append(draw)
        print(f"seed {seed}: {len(cases)} badcases {draw['badcases']}; "
              + "; ".join(f"{r} {_cell(draw[r])}" for r in ("round1", "round2")), flush=True)
    medians = {r: {k: statistics.median(d[r][k] for d in draws) for k in ("new_class_recall", "max_old_class_drop_pts")}
               for r in ("round1", "round2")}
    return {"world": world.description, "clean_set": f"{clean_set}, never labelled",
            "budget_s": budget_s, "seeds": seeds, "held_out_merchant": len(clean.held_out),
            "regression_images": len(clean.regression), "badcase_copies": badcase_copies,
            "device": _device_name(), "draws": draws,
            "median": medians}


def _cell(r: dict) -> str:
    nf = r["old_classes"]["not_fu"]
    return (f"({r['new_class_recall']:.3f}, {r['max_old_class_drop_pts']:.2f}) not_fu {nf['drop_pts']:+.2f} "
            f"[{nf['ci95_pts'][0]:+.2f}, {nf['ci95_pts'][1]:+.2f}] {nf['lost']}/{nf['won']}")


def format_table(summary: dict) -> str:
    lines = [f"{summary['world']}; scored on {summary['clean_set']} ({summary['held_out_merchant']} merchant, "
             f"{summary['regression_images']} old-class images); budget {summary['budget_s']:g} s",
             "seed  badcases labelled         round 1 (recall, largest drop)          round 2"]
    for d in summary["draws"]:
        lines.append(f"{d['seed']:>4}  {json.dumps(d['badcases']):<24}  {_cell(d['round1']):<40}  {_cell(d['round2'])}")
    m = summary["median"]
    lines.append("median: " + ", ".join(f"{r} ({m[r]['new_class_recall']:.3f}, {m[r]['max_old_class_drop_pts']:.2f})"
                                        for r in ("round1", "round2")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.second_round", description=__doc__.split("\n")[0])
    parser.add_argument("--world", choices=sorted(OUT), default="selection")
    parser.add_argument("--seeds", type=seed_list, default="0,1,2,3,4")
    parser.add_argument("--budget-s", type=float, help="each fine-tune's budget (default: 60, or the bench's)")
    parser.add_argument("--held-out-n", type=int, default=12_000, help="images of the selection world's clean set")
    parser.add_argument("--bench-results", type=Path, default=BENCH_RESULTS,
                        help="with --world bench: the JSON of the bench run that left its world")
    parser.add_argument("--badcase-copies", type=int, default=1,
                        help="each old-class badcase this many times in round 2's training data (replay draws it more)")
    parser.add_argument("--out", type=Path, help="default bench/results/second_round[_bench].json")
    args = parser.parse_args(argv)
    out = args.out or OUT[args.world]
    started = time.perf_counter()
    summary = run(args.world, args.seeds, args.budget_s or BUDGET_S[args.world], args.held_out_n, args.bench_results,
                  args.badcase_copies)
    summary["seconds"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(format_table(summary))
    print(f"wrote {out}")


if __name__ == "__main__":  # generate_world spawns workers: the guard keeps them from running this
    main()
