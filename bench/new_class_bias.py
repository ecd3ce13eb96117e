"""What lowering the new class's logit after the fine-tune trades: new-class recall for old-class images.

An expanded model's old logits are the champion's, bit for bit (`models.expand`), so every old
image it loses is one where the new class's logit rose over them. Subtracting a constant `b` from
the new class's logit (its bias in the branch's classifier) can only win such images back and can
only lose new-class images, so one fine-tune's answers trace the whole trade-off: this probe
fine-tunes as the fast retrain does (45 s, last epoch), keeps the softmax of its val split, the
held-out merchant images and the regression images, and re-decides them at the serving threshold
with `b` from 0 up (`shift_new_classes`; nothing is trained again). It prints, per seed and on the
median, held-out new-class recall and old-class drop per `b`, with the val split's new-class
recall beside them (all a rule choosing `b` during the fine-tune could read).

Run it alone (two torch processes on 2 cores slow each other):
    python -m bench.new_class_bias [--world selection|bench] [--seeds 0,1,2,3,4] [--budget-s 45] [--out PATH]
About 75 s per seed. Writes bench/results/new_class_bias_<world>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from bench.fine_tune_selection import REFINES, ProbeWorld, bench_world, decided_right, probabilities, selection_world

OUT = "bench/results/new_class_bias_{world}.json"
BIASES = [round(0.25 * i, 2) for i in range(17)]  # 0 .. 4 nats


def shift_new_classes(probs: np.ndarray, new: list[int], b: float) -> np.ndarray:
    """Softmax probabilities as they would be with `b` subtracted from the `new` columns' logits."""
    scaled = probs.copy()
    scaled[:, new] *= np.exp(-b)
    return scaled / scaled.sum(1, keepdims=True)


def run(world: ProbeWorld, seeds: list[int], budget_s: float) -> dict:
    from bench.models import _device_name
    from tasks.data.loading import prepare_dataset
    from tasks.train.fine_tune import FineTuneConfig, fine_tune
    from tasks.train.loop import load_checkpoint, predict_proba

    data = prepare_dataset(world.data_dir, 64, world.val_share, world.split_seed, world.cache_dir)
    reg_paths = [p for p, _ in world.regression]
    reg_names = [c for _, c in world.regression]
    names = np.array(reg_names)
    base, state = load_checkpoint(world.champion)
    before = decided_right(*probabilities(base, list(state["classes"]), reg_paths, reg_names), list(state["classes"]))
    draws = []
    for seed in seeds:
        cfg = FineTuneConfig(new_classes=["fu_merchant"], refines=REFINES, budget_s=budget_s, seed=seed)
        result = fine_tune(world.champion, data, cfg, world.work / f"bias-seed{seed}.pt")
        classes = result.classes
        new = [classes.index("fu_merchant")]
        val = np.asarray(predict_proba(result.model, data.val, torch.device("cpu")))
        # the val split's labels index the data's classes; the model's columns are in its own order
        val_labels = np.array([classes.index(data.classes[i]) for i in data.val.labels.numpy()])
        held, held_labels = probabilities(result.model, classes, world.held_out, ["fu_merchant"] * len(world.held_out))
        reg, reg_labels = probabilities(result.model, classes, reg_paths, reg_names)
        rows = []
        for b in BIASES:
            v_right = decided_right(shift_new_classes(val, new, b), val_labels, classes)
            after = decided_right(shift_new_classes(reg, new, b), reg_labels, classes)
            lost = {c: int((before & ~after)[names == c].sum()) for c in ("fu", "not_fu")}
            won = {c: int((~before & after)[names == c].sum()) for c in ("fu", "not_fu")}
            drops = {c: 100 * (lost[c] - won[c]) / (names == c).sum() for c in ("fu", "not_fu")}
            rows.append({
                "bias": b,
                "new_class_recall": float(decided_right(shift_new_classes(held, new, b), held_labels, classes).mean()),
                "max_old_class_drop_pts": float(max(drops.values())), "lost": lost, "won": won,
                "val_recall": {c: float(v_right[val_labels == i].mean()) for i, c in enumerate(classes)},
            })
        print(f"seed {seed} ({result.epochs_run} epochs): " + "  ".join(
            f"b{r['bias']:g} ({r['new_class_recall']:.3f}, {r['max_old_class_drop_pts']:.2f}, "
            f"val m {r['val_recall']['fu_merchant']:.3f})" for r in rows[::2]), flush=True)
        draws.append({"seed": seed, "epochs_run": result.epochs_run, "by_bias": rows})
    median = [{"bias": b,
               "new_class_recall": statistics.median(d["by_bias"][i]["new_class_recall"] for d in draws),
               "max_old_class_drop_pts": statistics.median(d["by_bias"][i]["max_old_class_drop_pts"] for d in draws),
               "val_merchant_recall": statistics.median(d["by_bias"][i]["val_recall"]["fu_merchant"] for d in draws)}
              for i, b in enumerate(BIASES)]
    return {"world": world.description, "budget_s": budget_s, "seeds": seeds, "device": _device_name(),
            "held_out_merchant": len(world.held_out), "regression_images": len(world.regression),
            "median": median, "draws": draws}


def format_table(summary: dict) -> str:
    lines = ["bias  median held-out recall  median largest old drop pts  median val merchant recall"]
    lines += [f"{m['bias']:4.2f}  {m['new_class_recall']:22.3f}  {m['max_old_class_drop_pts']:27.2f}  "
              f"{m['val_merchant_recall']:26.3f}" for m in summary["median"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.new_class_bias", description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=["selection", "bench"], default="bench")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--budget-s", type=float, default=45.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as exc:
        parser.error(f"--seeds: {exc}")
    world = bench_world() if args.world == "bench" else selection_world()
    summary = run(world, seeds, args.budget_s)
    out = args.out or Path(OUT.format(world=args.world))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(format_table(summary))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
