"""`saofu bench retrain-churn`: how far the same model, trained and released again, moves the old classes.

The fast-retrain bench asks that no old class fall by more than half a point against the serving
champion. This measures the floor under that target, on the same regression set (the held-out-font
`fu`/`not_fu` test images of the bench's world and of its second held-out world, `bench.held_out_world`,
since 2026-12-07) and the same decision (threshold 0.9, `not_fu`
fallback): the champion's own unpruned parent (the model the release pruned it from), and champions
trained exactly as it was (same data, split and settings) with other seeds, each against the
champion's answers, image by image.

It reads the folder `saofu bench fast-retrain` leaves (`bench/work/fast_retrain`: its world, base
dataset and MLflow store with the champion) and trains nothing else there. The champion is the one
that bench's campaign started from (`setup.champion_version` in its results): by the end of that
bench the `champion` alias names the ship draw's model, which knows the new class.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

from bench.fast_retrain import aligned

HOME = Path("bench/work/fast_retrain")


def run_retrain_churn_bench(seeds: tuple[int, ...] = (1, 2), home: Path = HOME,
                            out: Path = Path("bench/results/retrain_churn.json"),
                            bench_results: Path = Path("bench/results/fast_retrain.json")) -> dict:
    from saofu.errors import SaofuError

    home = home.resolve()
    if not (home / "world").is_dir() or not (home / "data" / "fu_base").is_dir():
        raise SaofuError(f"{home} holds no fast-retrain bench (world/, data/fu_base/): run `saofu bench "
                         "fast-retrain` first; this bench measures against its champion")
    if not bench_results.is_file():
        raise SaofuError(f"no {bench_results}: run `saofu bench fast-retrain` first; it names the champion")
    champion = str(json.loads(bench_results.read_text())["setup"]["champion_version"])
    os.environ["SAOFU_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    from bench.fast_retrain import MODEL, _recalls, _version_onnx, paired_drop, write_summary
    from bench.held_out_world import held_out_sets
    from bench.models import _device_name
    from saofu.settings import get_settings
    from tasks.data.loading import prepare_dataset
    from tasks.release.steps import load_candidate
    from tasks.train.export import export_onnx
    from tasks.train.loop import checkpoint_config, fit, load_checkpoint
    from tasks.train.retrain_steps import resolve_base

    started = time.perf_counter()
    regression = held_out_sets(home)["both"][1]  # the fast-retrain bench's own regression set
    paths, labels = [p for p, _ in regression], [c for _, c in regression]
    work = home / "runs" / "retrain-churn"
    work.mkdir(parents=True, exist_ok=True)
    base = resolve_base(MODEL, champion, work / "base")
    champion_right = _recalls(_version_onnx(champion), paths, labels, base.image_size)
    parent_model, state = load_checkpoint(load_candidate(MODEL, base.trained_version, work / "parent").checkpoint)
    cfg = checkpoint_config(state)

    def compare(name: str, model, classes: list[str]) -> dict:
        onnx = export_onnx(model, classes, work / f"{name}.onnx", base.image_size, {})
        right = _recalls(onnx, paths, labels, base.image_size)
        row = {"name": name, "classes": {c: paired_drop(champion_right[c], right[c]) for c in champion_right}}
        print(f"{name}: " + "; ".join(f"{c} {v['after']:.4f} (drop {v['drop_pts']:+.2f} pts, "
                                      f"{v['flipped_pts']:.1f} % flipped)" for c, v in row["classes"].items()),
              flush=True)
        return row

    refs = [compare(f"unpruned parent (version {base.trained_version})", parent_model, list(state["classes"]))]
    data = prepare_dataset(base.data_dir, cfg.image_size, base.val_share, base.split_seed, get_settings().cache_dir)
    for seed in seeds:
        print(f"training {cfg.model} as the champion was ({cfg.epochs} epochs), seed {seed}", flush=True)
        result = fit(replace(cfg, seed=seed), data.train, data.val)
        refs.append(compare(f"retrained, seed {seed}", result.model, data.train.classes))
    summary = {
        "champion_version": champion,
        "champion": {c: float(v.mean()) for c, v in champion_right.items()},
        "references": refs,
        "max_drop_pts": {c: max(r["classes"][c]["drop_pts"] for r in refs) for c in champion_right},
        "device": _device_name(),
        "setup": {"seeds": list(seeds), "regression_images": len(regression), "epochs": cfg.epochs,
                  "bench_seconds": time.perf_counter() - started, "date": time.strftime("%Y-%m-%d")},
    }
    return write_summary(summary, out, format_table)


def format_table(s: dict) -> str:
    """One row per reference; per class its recall, drop [95 %] and the flipped images: lost/won
    against the champion with McNemar's p (results from before those were kept: the flipped %)."""
    classes = list(s["champion"])
    paired = all("lost" in r["classes"][c] for r in s["references"] for c in classes)
    flips = "lost/won (p)" if paired else "flipped %"
    head = ["reference"] + [f"{c}: recall / drop pts [95 %] / {flips}" for c in classes]
    rows = [[f"champion (version {s['champion_version']})"] + [f"{s['champion'][c]:.4f}" for c in classes]]
    for r in s["references"]:
        rows.append([r["name"]] + [
            f"{v['after']:.4f} / {v['drop_pts']:+.2f} [{v['ci95_pts'][0]:+.2f}, {v['ci95_pts'][1]:+.2f}] / "
            + (f"{v['lost']}/{v['won']} ({v['p_value']:.2g})" if paired else f"{v['flipped_pts']:.1f}")
            for v in (r["classes"][c] for c in classes)])
    return aligned([head, *rows]) + f"\ndevice: {s['device']}"
