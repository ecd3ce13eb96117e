"""Score a finished `saofu bench fast-retrain` run's models on each held-out set apart.

    python -m bench.held_out_rescore [--home bench/work/fast_retrain] [--out bench/results/held_out_rescore.json]

The bench judges its models on the world's own held-out-font test split and on a second world drawn
in the same fonts (`bench.held_out_world`), together. This probe takes the models the run left
registered in its folder (the champion, each fast-retrain draw's released version in the order they
ran, the ship draw last, the full retrains) and scores them on each set apart and on both, with the
bench's own `measure`: whether the 2,040 images of the test split alone, all the bench had until
2026-12-07, told the same story as the 9,408 more. Two minutes on 2 cores, after the bench, alone.

With `--shift N` (repeat): each fast-retrain draw re-decided with `fu_merchant`'s logit lowered by N
nats, on both sets: how much new-class recall each old-class image won back costs. With `--gate S`
(repeat): each draw re-decided with the new class gated by its parent: where the champion inside the
expanded model (its old classes' logits, the champion's bit for bit) is at least S sure of a class
other than `fu`, `fu_merchant` cannot answer, so the image gets the champion's answer.

Images are read at the size of the bench's world (`--image-size` of the bench run that left it).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.fast_retrain import CAMPAIGN_REFINES, MODEL, _answers, _version_onnx, forgotten_pts, measure
from bench.held_out_world import held_out_sets, world_image_size


def bench_models(versions: list | None = None) -> dict[str, str]:
    """Name -> registered version, of what the bench run left: `champion`, `fast retrain 1..k`, `ship`,
    `full retrain 1..m`.

    Read from the registry's lineage tags (`versions`: MLflow's model versions, the registry's
    when None): a fine-tune has `saofu.change` and its parent is the champion; a release of it adds
    `saofu.artefact`; a full retrain's release has the artefact tag and no change.
    """
    if versions is None:
        from tasks import tracking

        versions = tracking.client().search_model_versions(f"name='{MODEL}'")
    versions = sorted(versions, key=lambda v: int(v.version))
    fine_tunes = [v for v in versions if "saofu.change" in v.tags and "saofu.artefact" not in v.tags]
    if not fine_tunes:
        raise SystemExit("no fast-retrain fine-tune in this registry: run `saofu bench fast-retrain` first")
    champion = fine_tunes[0].tags["parent_version"]
    released = [str(v.version) for v in versions if "saofu.change" in v.tags and "saofu.artefact" in v.tags]
    peers = [str(v.version) for v in versions  # (MLflow gives versions as numbers, tags as strings)
             if "saofu.artefact" in v.tags and "saofu.change" not in v.tags and str(v.version) != champion]
    return {"champion": champion, **{f"fast retrain {i + 1}": v for i, v in enumerate(released[:-1])},
            "ship": released[-1], **{f"full retrain {i + 1}": v for i, v in enumerate(peers)}}


def rescore(home: Path, shifts: list[float] | None = None, gates: list[float] | None = None) -> dict:
    """Every model on each set; with `shifts` or `gates`, the fast-retrain draws' `rescored_curve` on both
    sets too."""
    import os

    os.environ["SAOFU_HOME"] = str(home.resolve())
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    models = bench_models()
    onnx = {name: _version_onnx(v) for name, v in models.items()}
    size = world_image_size(home / "world")
    result = {"home": str(home), "image_size": size, "versions": models, "sets": {}}
    for set_name, (merchant, regression) in held_out_sets(home).items():
        started = time.perf_counter()
        paths, labels = [p for p, _ in regression], [c for _, c in regression]
        right, sure, _ = _answers(onnx["champion"], paths, labels, size)
        scores = {name: measure(path, right, merchant, regression, size, sure)
                  for name, path in onnx.items() if name != "champion"}
        draws = [s for name, s in scores.items() if name.startswith("fast retrain")]
        peers = [s for name, s in scores.items() if name.startswith("full retrain")]
        result["sets"][set_name] = {
            "merchant_images": len(merchant), "regression_images": {c: labels.count(c) for c in sorted(set(labels))},
            "fast_retrain_median": {
                "new_class_recall": statistics.median(d["new_class_recall"] for d in draws),
                "max_old_class_drop_pts": statistics.median(d["max_old_class_drop_pts"] for d in draws),
                "max_old_class_forgotten_pts": statistics.median(forgotten_pts(d) for d in draws)},
            "full_retrain_median": ({"new_class_recall": statistics.median(p["new_class_recall"] for p in peers),
                                     "max_old_class_drop_pts": statistics.median(p["max_old_class_drop_pts"]
                                                                                 for p in peers)} if peers else None),
            "models": scores}
        print(f"{set_name}: {len(merchant)} merchant, {len(regression)} old-class images, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        for name, s in scores.items():
            print(f"  {name:15s} recall {s['new_class_recall']:.3f}  " + "; ".join(
                f"{c} {o['drop_pts']:+.2f} [{o['ci95_pts'][0]:+.2f}, {o['ci95_pts'][1]:+.2f}] {o['lost']}/{o['won']}"
                f", forgotten {o['forgotten']} of {o['sure']}" for c, o in s["old_classes"].items()), flush=True)
        if set_name == "both":
            both = (right, merchant, regression)
            result["lost_by_look_alike"] = lost_by_look_alike(
                {n: path for n, path in onnx.items() if n.startswith("fast retrain")}, right, sure, regression,
                size, image_records(home))
    if shifts:
        print(f"fu_merchant's logit lowered (both sets), nats: {shifts}", flush=True)
        result["new_class_logit_shift"] = rescored_curve(
            onnx, *both, size, "shift_nats", sorted({0.0, *shifts}),
            lambda probs, classes, nats: shifted(probs, classes.index("fu_merchant"), nats))
    if gates:
        print(f"fu_merchant gated by its parent (both sets), where the champion is this sure of another "
              f"class: {gates}", flush=True)
        result["parent_gate"] = rescored_curve(
            onnx, *both, size, "gate", [None, *sorted(set(gates), reverse=True)],
            lambda probs, classes, sure: parent_gated(
                probs, classes.index("fu_merchant"),
                [i for i, c in enumerate(classes) if c not in ("fu_merchant", CAMPAIGN_REFINES["fu_merchant"])], sure))
    return result


def image_records(home: Path) -> dict[str, dict]:
    """The generator's record (style, char, ...) of every image of the bench's two worlds, by resolved path."""
    from tasks.data.manifest import read_manifest

    return {str((world / r["path"]).resolve()): r for world in (home / "world", home / "held_out_world")
            if (world / "manifest.csv").is_file() for r in read_manifest(world)}


def lost_by_look_alike(onnx: dict[str, Path], champion_right: dict[str, np.ndarray],
                       champion_sure: dict[str, np.ndarray], regression: list[tuple[Path, str]], size: int,
                       records: dict[str, dict]) -> dict:
    """Per old class, the images the draws in `onnx` lose against the champion, by what they show
    (style and character, from the generator's records): how many draws lose each kind (image-draws),
    how many distinct images, how many every draw loses, and of those lost how many the champion was
    sure of. Which look-alikes the new class takes, and whether the champion could read them."""
    from collections import Counter

    from bench.fast_retrain import _answers

    paths, labels = [p for p, _ in regression], [c for _, c in regression]
    lost = {c: np.zeros(len(m), dtype=int) for c, m in champion_right.items()}
    for path in onnx.values():
        after = _answers(path, paths, labels, size)[0]
        for c in lost:
            lost[c] += (champion_right[c] > 0) & (after[c] == 0)
    out = {}
    for c, counts in lost.items():
        class_paths = [p for p, label in regression if label == c]
        kinds = Counter()
        for i in np.nonzero(counts)[0]:
            r = records.get(str(Path(class_paths[i]).resolve()), {})
            kinds[f"{r.get('style', '?')} {r.get('char') or '-'}"] += int(counts[i])
        out[c] = {"images": int((counts > 0).sum()), "lost_by_every_draw": int((counts == len(onnx)).sum()),
                  "champion_sure": int(champion_sure[c][counts > 0].sum()),
                  "image_draws_by_kind": dict(kinds.most_common())}
        print(f"  {c}: {out[c]['images']} images lost by some draw ({out[c]['lost_by_every_draw']} by every one, "
              f"{out[c]['champion_sure']} the champion was sure of); image-draws by kind: "
              + ", ".join(f"{k} {n}" for k, n in kinds.most_common(8)), flush=True)
    return out


def shifted(probs: np.ndarray, column: int, nats: float) -> np.ndarray:
    """The probabilities with one class's logit lowered by `nats` (softmax of the shifted logits)."""
    out = probs.copy()
    out[:, column] *= math.exp(-nats)
    return out / out.sum(1, keepdims=True)


def parent_gated(probs: np.ndarray, column: int, others: list[int], sure: float | None) -> np.ndarray:
    """The probabilities with class `column` (a new class, after the old ones) silenced wherever the
    old classes alone (their probabilities renormalised: the champion's, as the expanded model keeps
    its logits) put at least `sure` on one of `others`, the old classes other than its parent.
    Silenced, an image's probabilities are the champion's. `sure` None: no gate."""
    if sure is None:
        return probs
    old = probs[:, :column] / probs[:, :column].sum(1, keepdims=True)
    out = probs.copy()
    out[old[:, others].max(1) >= sure, column] = 0.0
    return out / out.sum(1, keepdims=True)


def rescored_curve(onnx: dict[str, Path], champion_right: dict[str, np.ndarray], merchant: list[Path],
                   regression: list[tuple[Path, str]], size: int, key: str, settings: list[float | None],
                   rescored: Callable[[np.ndarray, list[str], float | None], np.ndarray]) -> dict:
    """Each fast-retrain draw's new-class recall and old-class drops with its probabilities re-decided by
    `rescored(probs, the graph's classes, setting)` at each setting, on `merchant` and `regression`
    (`champion_right`: the champion's answers there, per class): the price in recall of each old-class
    image back."""
    from bench.fast_retrain import graph_probabilities, judged

    paths = [p for p, _ in regression] + merchant
    labels = np.array([c for _, c in regression] + ["fu_merchant"] * len(merchant))
    old = labels != "fu_merchant"
    draws = {}
    for name in (n for n in onnx if n.startswith("fast retrain")):
        probs, truth, classes, refines = graph_probabilities(onnx[name], paths, list(labels), size)
        rows = []
        for setting in settings:
            right = judged(rescored(probs, classes, setting), truth, classes, refines)[0]
            drops = {c: float(100 * (champion_right[c] - right[old][labels[old] == c]).mean())
                     for c in champion_right}
            rows.append({key: setting, "new_class_recall": float(right[~old].mean()), "drop_pts": drops})
        draws[name] = rows
        print(f"  {name:15s} " + " | ".join(f"{_setting(r[key])}: {r['new_class_recall']:.3f}, "
                                            + ", ".join(f"{c} {d:+.2f}" for c, d in r["drop_pts"].items())
                                            for r in rows), flush=True)
    median = [{key: setting,
               "new_class_recall": statistics.median(d[i]["new_class_recall"] for d in draws.values()),
               "max_old_class_drop_pts": statistics.median(max(d[i]["drop_pts"].values()) for d in draws.values()),
               "worst": {"new_class_recall": min(d[i]["new_class_recall"] for d in draws.values()),
                         "max_old_class_drop_pts": max(max(d[i]["drop_pts"].values()) for d in draws.values())}}
              for i, setting in enumerate(settings)]
    for row in median:
        print(f"  median {key} {_setting(row[key])}: recall {row['new_class_recall']:.3f}, largest old-class drop "
              f"{row['max_old_class_drop_pts']:.2f} (worst draw {row['worst']['new_class_recall']:.3f}, "
              f"{row['worst']['max_old_class_drop_pts']:.2f})", flush=True)
    return {"draws": draws, "median": median}


def _setting(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path("bench/work/fast_retrain"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/held_out_rescore.json"))
    parser.add_argument("--shift", type=float, action="append", default=None,
                        help="also lower fu_merchant's logit by this many nats, on both sets (repeat)")
    parser.add_argument("--gate", type=float, action="append", default=None,
                        help="also gate fu_merchant by its parent where the champion is this sure of another "
                             "class, on both sets (repeat)")
    args = parser.parse_args()
    result = rescore(args.home, args.shift, args.gate)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
