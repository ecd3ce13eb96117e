"""The fast retrain's fine-tune settings, checked on images `saofu bench fast-retrain` never reports.

The fast-retrain bench reports new-class recall and old-class drops on the Fu world's held-out
fonts (the arphic-ming lineage: bsmi, gbsn, uming). The fine-tune's settings (the old-class weight,
half the replay hard, the branch after two stages) were first chosen on those same images. This
check runs the candidates on a second world (seed 1) whose held-out fonts are another lineage
(arphic-kai: gkai, ukai), with its own champion trained on the rest, so an ordering seen here was
not fitted to the reported figures.

Each candidate: `tasks.train.fine_tune.fine_tune` from the champion with the merchant class added
(refining `fu`), 52 s of training (what the bench's one-minute step leaves after reading the data),
seeds 0, 1, 2; scored as the bench scores (threshold 0.9, `not_fu` the fallback, the refinement
rule) on the held-out merchant images and the held-out `fu`/`not_fu` images, against the champion.
Differences from the bench (on this world): the champion is the trained checkpoint (not released: unpruned) and
the labels go straight into the dataset (no Label Studio, no ingest).

`--world bench` runs the same loop on the fast-retrain bench's own world instead, as its last run
left it in bench/work/fast_retrain/ (run `saofu bench fast-retrain` first): its released champion
(pruned, the weights the bench's fast retrain starts from), the ship draw's dataset (the merchant
labels ingested from Label Studio), the base run's split; scored on the images the bench reports.
That is where a setting is tried on the bench's figures without the 42-minute bench (the figures
move like the bench's fast-retrain step, not its Label Studio or release steps); the selection
world is where it is chosen.

`--world bench --extra-decoys N` asks what more labels of the campaign's look-alikes would buy: the
same loop with N more merchant-framed look-alikes (副 幅 褔 辐 ...; train fonts, from a world of
another seed) labelled `not_fu` among the training images, as if labelers had been sent the
look-alikes the merchant's frame draws in beside its own 福 (the dataset is a hard-linked copy),
each config run without and then with them in the same command (results in
bench/results/fine_tune_bench_world_decoys.json).

Run it alone (two torch processes on 2 cores slow each other):
    python -m bench.fine_tune_selection [--world selection|bench] [--extra-decoys N] [--out PATH] [CONFIG_JSON ...]
each CONFIG_JSON a dict of `FineTuneConfig` fields (none: `CANDIDATES`). About 8 minutes for the
selection world and its champion (kept in bench/work/fine_tune_selection/ for the next run), then
under 3 minutes per candidate on 2 CPU cores. Writes bench/results/fine_tune_selection.json
(`--world bench`: bench/results/fine_tune_bench_world.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.fast_retrain import MODEL, THRESHOLD, aligned, split_world

# Old-class weight 1 or 3, with and without half the replay hard, and growing instead of expanding.
CANDIDATES = [{}, {"hard_replay_share": 0.0}, {"old_class_weight": 3.0},
              {"old_class_weight": 3.0, "hard_replay_share": 0.0}, {"expand": False}]
# What each result records of its config, overrides or not (the defaults may change).
SETTINGS = ("expand", "old_class_weight", "hard_replay_share", "aug_strength")
REFINES = {"fu_merchant": "fu"}
HOME = Path("bench/work/fine_tune_selection")
BENCH_HOME = Path("bench/work/fast_retrain")  # where `saofu bench fast-retrain` leaves its world
BENCH_RESULTS = Path("bench/results/fast_retrain.json")  # ... and the champion version it started from
OUT = {"selection": Path("bench/results/fine_tune_selection.json"),
       "bench": Path("bench/results/fine_tune_bench_world.json")}
DECOYS_OUT = Path("bench/results/fine_tune_bench_world_decoys.json")
DECOY_SEED = 8  # the extra look-alikes' world: neither the bench's (0) nor the selection's (1)


@dataclass
class ProbeWorld:
    """What the candidates fine-tune from and are scored on."""

    description: str
    champion: Path  # checkpoint the fine-tunes start from (and the "before" of the old classes)
    data_dir: Path  # the campaign's dataset: old classes plus the merchant labels
    val_share: float
    split_seed: int
    cache_dir: Path
    held_out: list[Path]  # merchant images of held-out fonts
    regression: list[tuple[Path, str]]  # old-class images of held-out fonts, with their class
    work: Path  # where the fine-tunes write
    image_size: int = 64  # the side its images are read at: its champion's input


def seed_list(text: str) -> list[int]:
    """`--seeds` of the fine-tune probes: comma-separated integers ("0,1,2,3,4"); argparse's `type`."""
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers, got {text!r}") from None


def prepare(home: Path) -> Path:
    """The selection world, its champion (fu/not_fu, 20 epochs) and the campaign dataset, once."""
    from tasks.data.fu_world import WorldConfig, generate_world
    from tasks.data.manifest import read_manifest, write_manifest
    from tasks.train.config import TrainConfig
    from tasks.train.steps import train_recognizer

    champion = home / "champion" / "checkpoint.pt"
    if champion.exists():
        return champion
    shutil.rmtree(home, ignore_errors=True)
    world = home / "world"
    print("generating the selection world (held-out fonts: the arphic-kai lineage)", flush=True)
    generate_world(world, WorldConfig(n=17000, seed=1, image_size=64, merchant=True, test_groups=["ukai"]))
    split_world(world, home / "base")
    print("training its champion: saofu_fu, 20 epochs on fu/not_fu", flush=True)
    train_recognizer.fn(str(home / "base"), TrainConfig(model="saofu_fu", epochs=20, image_size=64),
                        str(home / "champion"), experiment=None)
    # The campaign's dataset: everything but the held-out merchant images.
    rows = [r for r in read_manifest(world) if not (r["label"] == "fu_merchant" and r["split"] == "test")]
    for r in rows:
        (home / "campaign" / r["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(world / r["path"], home / "campaign" / r["path"])
    write_manifest(home / "campaign", rows)
    return champion


def selection_world(home: Path = HOME) -> ProbeWorld:
    """The selection world (seed 1, arphic-kai fonts held out), built and trained on first use."""
    from tasks.data.manifest import read_manifest

    home = home.resolve()
    champion = prepare(home)
    rows = [r for r in read_manifest(home / "world") if r["split"] == "test"]
    return ProbeWorld("Fu world, seed 1, held-out fonts gkai/ukai (arphic-kai)", champion, home / "campaign",
                      0.15, 0, home / "cache", *_held_out_sets(home / "world", rows), home / "fine-tune")


def bench_world(bench_home: Path = BENCH_HOME, results: Path = BENCH_RESULTS,
                work: Path = HOME / "bench-world") -> ProbeWorld:
    """The fast-retrain bench's world as its last run left it (module docstring).

    Its files are read, not changed (the fine-tunes write under `work`); only its tensor cache may
    gain what it lacked. Points this process at the bench's folder (SAOFU_HOME), whose registry
    holds the champion."""
    from saofu.errors import SaofuError
    from saofu.settings import get_settings
    from tasks.data.manifest import read_manifest
    from tasks.train.retrain_steps import base_checkpoint, resolve_base

    bench_home = bench_home.resolve()
    dataset = bench_home / "data" / "fu_ship"
    if not results.exists() or not dataset.is_dir():
        raise SaofuError(f"--world bench needs a finished `saofu bench fast-retrain` run: {results} and {dataset}")
    version = json.loads(results.read_text())["setup"]["champion_version"]
    os.environ["SAOFU_HOME"] = str(bench_home)  # its MLflow registry holds the champion
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    work = work.resolve()
    base = resolve_base(MODEL, version, work / "base")
    champion = Path(base_checkpoint(base, work / "base"))
    rows = [r for r in read_manifest(bench_home / "world") if r["split"] == "test"]
    return ProbeWorld(f"the fast-retrain bench's world (Fu world, seed 0, held-out fonts bsmi/gbsn/uming), "
                      f"from its released champion, version {version}", champion, dataset, base.val_share,
                      base.split_seed, get_settings().cache_dir, *_held_out_sets(bench_home / "world", rows),
                      work / "fine-tune", base.image_size)


def dataset_with(src: Path, dst: Path, rows: list[dict]) -> None:
    """`dst`: a hard-linked copy of the dataset `src` that also holds `rows` (`add_images` rows);
    `src` is untouched (its manifest is copied, not linked, since `add_images` rewrites it)."""
    from tasks.data.manifest import add_images

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, copy_function=os.link)
    (dst / "manifest.csv").unlink()
    shutil.copyfile(src / "manifest.csv", dst / "manifest.csv")
    add_images(dst, rows)


def with_extra_decoys(world: ProbeWorld, n: int, home: Path = HOME / "decoys") -> ProbeWorld:
    """`world` with `n` more merchant-framed look-alikes labelled `not_fu` among its training images.

    They come from a Fu world of its own seed whose `not_fu` crops all show look-alikes of 福 (no
    textures, no other characters); its merchant frame is drawn on 15 % of them, and only those of
    its training fonts are taken (the bench's held-out fonts stay held out). The dataset is a
    hard-linked copy of `world`'s with the decoys added (manifest rewritten, nothing of the original
    changed); its tensor cache lives under `home`.
    """
    from saofu.errors import SaofuError
    from tasks.data.fu_world import WorldConfig, generate_world
    from tasks.data.manifest import read_manifest

    home = home.resolve()
    decoys = home / f"world-{n}"
    if not (decoys / "manifest.csv").exists():
        shutil.rmtree(decoys, ignore_errors=True)
        # train share 0.7 x not_fu 0.96 x merchant frame 0.15, and a tenth more for the draw's luck
        total = max(4500, math.ceil(n / (0.7 * 0.96 * 0.15) * 1.1))
        print(f"generating {total} images for {n} merchant-framed look-alikes (seed {DECOY_SEED})", flush=True)
        generate_world(decoys, WorldConfig(n=total, seed=DECOY_SEED, image_size=64, merchant=True,
                                           class_weights={"fu": 0.02, "not_fu": 0.96, "fu_merchant": 0.02},
                                           lookalike_share=1.0, texture_share=0.0))
    rows = [r for r in read_manifest(decoys)
            if r["split"] == "train" and r["label"] == "not_fu" and r["style"] == "merchant"][:n]
    if len(rows) < n:
        raise SaofuError(f"the decoy world drew {len(rows)} merchant-framed look-alikes, fewer than {n}")
    data_dir = home / f"dataset-{n}"
    if not (data_dir / "manifest.csv").exists():
        dataset_with(world.data_dir, data_dir, [{"image": str(decoys / r["path"]), "label": "not_fu",
                                                 "source": "generated", "split": "train"} for r in rows])
    return dataclasses.replace(world, description=f"{world.description}, with {n} more merchant-framed look-alikes "
                                                  "labelled not_fu", data_dir=data_dir, cache_dir=home / "cache",
                               work=home / "fine-tune")


def _held_out_sets(world: Path, test_rows: list[dict]) -> tuple[list[Path], list[tuple[Path, str]]]:
    held = [world / r["path"] for r in test_rows if r["label"] == "fu_merchant"]
    return held, [(world / r["path"], r["label"]) for r in test_rows if r["label"] != "fu_merchant"]


def probabilities(model: torch.nn.Module, classes: list[str], paths: list[Path], labels: list[str],
                  image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's softmax on the images at `paths` read at `image_size`, and their labels as indices."""
    from tasks.release.sets import split_from_files
    from tasks.train.loop import predict_proba

    split = split_from_files(paths, labels, classes, image_size)
    return np.asarray(predict_proba(model, split, torch.device("cpu"))), split.labels.numpy()


def decided_right(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> np.ndarray:
    """True per image decided right at the serving threshold (as `bench.fast_retrain._recalls`)."""
    from saofu.refines import refinement_roots
    from tasks.release.evaluation import decide

    roots = refinement_roots(classes, {k: v for k, v in REFINES.items() if k in classes})
    return decide(probs, THRESHOLD, classes.index("not_fu"), roots) == labels


def _right(model: torch.nn.Module, classes: list[str], paths: list[Path], labels: list[str],
           image_size: int) -> np.ndarray:
    return decided_right(*probabilities(model, classes, paths, labels, image_size), classes)


def champion_scorer(world: ProbeWorld) -> Callable[[torch.nn.Module, list[str]], dict]:
    """A scorer of fine-tuned models on the world's held-out images, against its champion's answers.

    The scorer returns new-class recall (held-out merchant images) and each old class's drop in
    points (the regression images), both decided at the serving threshold.
    """
    from tasks.train.loop import load_checkpoint

    held, paths = world.held_out, [p for p, _ in world.regression]
    old = np.array([c for _, c in world.regression])
    base, state = load_checkpoint(world.champion)
    before = _right(base, state["classes"], paths, list(old), world.image_size)

    def score(model: torch.nn.Module, classes: list[str]) -> dict:
        after = _right(model, classes, paths, list(old), world.image_size)
        drops = {c: float(100 * (before[old == c].mean() - after[old == c].mean())) for c in ("fu", "not_fu")}
        recall = _right(model, classes, held, ["fu_merchant"] * len(held), world.image_size)
        return {"new_class_recall": float(recall.mean()),
                "old_class_drop_pts": drops, "max_old_class_drop_pts": max(drops.values())}

    return score


def run(configs: list[dict], world: ProbeWorld, seeds: tuple[int, ...] = (0, 1, 2), budget_s: float = 52.0) -> dict:
    from bench.models import _device_name
    from tasks.data.loading import prepare_dataset
    from tasks.train.fine_tune import FineTuneConfig, fine_tune

    score = champion_scorer(world)
    data = prepare_dataset(world.data_dir, world.image_size, world.val_share, world.split_seed, world.cache_dir)
    results = []
    for over in configs:
        draws = []
        for seed in seeds:
            cfg = FineTuneConfig(new_classes=["fu_merchant"], refines=REFINES, budget_s=budget_s, seed=seed, **over)
            r = fine_tune(world.champion, data, cfg, world.work / f"seed{seed}.pt")
            draws.append({"seed": seed, **score(r.model.eval(), r.classes),
                          "epochs_run": r.epochs_run, "best_epoch": r.best_epoch, "method": r.method})
            print(f"  {json.dumps(over)} seed {seed}: {json.dumps(draws[-1])}", flush=True)
        results.append({"config": over, "settings": {k: getattr(cfg, k) for k in SETTINGS}, "draws": draws,
                        **{k: statistics.median(d[k] for d in draws)
                           for k in ("new_class_recall", "max_old_class_drop_pts")}})
    return {"world": world.description, "budget_s": budget_s,
            "seeds": list(seeds), "held_out_merchant": len(world.held_out),
            "regression_images": len(world.regression), "device": _device_name(), "results": results}


def _label(result: dict) -> str:
    """A result's settings in a few words (its overrides, for results written before settings were)."""
    settings = result.get("settings")
    if not settings:
        return json.dumps(result["config"]) if result["config"] else "defaults"
    method = "expand" if settings["expand"] else "grow"
    others = "".join(f", {k} {v:g}" if isinstance(v, float) else f", {k} {v}"
                     for k, v in result["config"].items() if k not in SETTINGS)
    decoys = f", +{result['extra_decoys']} look-alike labels" if result.get("extra_decoys") else ""
    aug = settings.get("aug_strength")  # results written before it was recorded lack it
    return (f"{method}, old weight {settings['old_class_weight']:g}, hard replay {settings['hard_replay_share']:g}"
            + (f", augmentation {aug:g}" if aug is not None else "") + others
            + (" (defaults)" if not result["config"] else "") + decoys)


def format_table(summary: dict) -> str:
    rows = [("config", "new-class recall (median)", "largest old drop, pts (median)", "per seed")]
    for r in summary["results"]:
        rows.append((_label(r), f"{r['new_class_recall']:.3f}",
                     f"{r['max_old_class_drop_pts']:.2f}",
                     " ".join(f"({d['new_class_recall']:.3f}, {d['max_old_class_drop_pts']:.2f})"
                              for d in r["draws"])))
    return aligned(rows)


def _check_configs(configs: list, parser: argparse.ArgumentParser) -> None:
    """Refuse a config that is not a dict of `FineTuneConfig` fields before minutes of preparation."""
    from tasks.train.fine_tune import FineTuneConfig

    for over in configs:
        try:
            FineTuneConfig(new_classes=["fu_merchant"], refines=REFINES, **over)
        except TypeError as e:  # an unknown field, or not a dict
            parser.error(f"CONFIG_JSON {json.dumps(over)}: {e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fine_tune_selection", description=__doc__.split("\n")[0])
    parser.add_argument("--world", choices=sorted(OUT), default="selection",
                        help="the selection world (default) or the fast-retrain bench's own")
    parser.add_argument("--extra-decoys", type=int, default=0, metavar="N",
                        help="with --world bench: N more merchant-framed look-alikes labelled not_fu in training")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the JSON goes (default: the world's file, or the decoys' file)")
    parser.add_argument("configs", nargs="*", metavar="CONFIG_JSON",
                        help="FineTuneConfig fields (none: the candidates)")
    args = parser.parse_args(argv)
    try:
        configs = [json.loads(a) for a in args.configs] or CANDIDATES
    except json.JSONDecodeError as e:
        parser.error(f"a CONFIG_JSON is not JSON ({e}): give dicts of FineTuneConfig fields, "
                     "e.g. '{\"expand\": false}'")
    _check_configs(configs, parser)
    if args.extra_decoys < 0 or (args.extra_decoys and args.world != "bench"):
        parser.error("--extra-decoys takes a count >= 0, and only with --world bench")
    started = time.perf_counter()
    world = bench_world() if args.world == "bench" else selection_world()
    summary = run(configs, world)
    if args.extra_decoys:  # the same configs with the look-alike labels, side by side with those without
        grown = run(configs, with_extra_decoys(world, args.extra_decoys))
        for r in grown["results"]:
            r["extra_decoys"] = args.extra_decoys
        summary["results"] += grown["results"]
        summary["world_with_decoys"] = grown["world"]
    summary["extra_decoys"] = args.extra_decoys
    summary["seconds"] = time.perf_counter() - started
    out = args.out or (DECOYS_OUT if args.extra_decoys else OUT[args.world])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(format_table(summary))
    print(f"written: {out}")


if __name__ == "__main__":  # generate_world spawns workers: the guard keeps them from running this
    main()
