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

It also re-decides them with a *parent gate* instead (`gate_to_parent`, rows with `gate` set):
the new class held down wherever the base, the champion inside the expanded model, is at least
`gate` sure of a class other than the one the new class refines. A refinement is by definition
one of its parent's images, so where the champion is sure an image is not a 福 the merchant class
should not take it; the probe measures whether the champion's own confidence separates the lost
look-alikes from the merchant 福s better than the new class's logit does.

Run it alone (two torch processes on 2 cores slow each other):
    python -m bench.new_class_bias [--world selection|bench] [--seeds 0,1,2,3,4] [--budget-s 45] [--out PATH]
About 75 s per seed. Writes bench/results/new_class_bias_<world>.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from bench.fine_tune_selection import (
    REFINES,
    ProbeWorld,
    bench_world,
    decided_right,
    probabilities,
    seed_list,
    selection_world,
)

OUT = "bench/results/new_class_bias_{world}.json"
BIASES = [round(0.25 * i, 2) for i in range(17)]  # 0 .. 4 nats


def shift_new_classes(probs: np.ndarray, new: list[int], b: float) -> np.ndarray:
    """Softmax probabilities as they would be with `b` subtracted from the `new` columns' logits."""
    scaled = probs.copy()
    scaled[:, new] *= np.exp(-b)
    return scaled / scaled.sum(1, keepdims=True)


GATES = [0.5, 0.9, 0.99, 0.999, 0.9999]  # how sure of another class the base must be for the gate to close
# Every re-decision, one row each, in this order: (bias, gate); the gated rows at no bias.
REDECISIONS = [(b, None) for b in BIASES] + [(0.0, g) for g in GATES]


def gate_to_parent(probs: np.ndarray, old: int, new: list[int], parents: list[int], sure: float) -> np.ndarray:
    """Softmax probabilities with each new class's logit held down where the base is sure of another
    class than the one it refines (`parents`, one per `new` column): the base's top class among the
    first `old` columns is not the parent and has at least `sure` of their probability."""
    gated = probs.copy()
    base = probs[:, :old] / probs[:, :old].sum(1, keepdims=True)
    off = (base.argmax(1)[:, None] != np.asarray(parents)[None, :]) & (base.max(1)[:, None] >= sure)
    cols = gated[:, new]
    cols[off] = 0.0
    gated[:, new] = cols
    return gated / gated.sum(1, keepdims=True)


def redecided(probs: np.ndarray, new: list[int], b: float, gate: float | None, old: int,
              parents: list[int]) -> np.ndarray:
    """`probs` with the new classes' logits lowered by `b`, then gated by their parents if `gate` is set."""
    shifted = shift_new_classes(probs, new, b)
    return shifted if gate is None else gate_to_parent(shifted, old, new, parents, gate)


def run(world: ProbeWorld, seeds: list[int], budget_s: float) -> dict:
    from bench.models import _device_name
    from tasks.data.loading import prepare_dataset
    from tasks.train.fine_tune import FineTuneConfig, fine_tune
    from tasks.train.loop import load_checkpoint, predict_proba

    size = world.image_size
    data = prepare_dataset(world.data_dir, size, world.val_share, world.split_seed, world.cache_dir)
    reg_paths = [p for p, _ in world.regression]
    reg_names = [c for _, c in world.regression]
    names = np.array(reg_names)
    base, state = load_checkpoint(world.champion)
    before = decided_right(*probabilities(base, list(state["classes"]), reg_paths, reg_names, size),
                           list(state["classes"]))
    draws = []
    for seed in seeds:
        cfg = FineTuneConfig(new_classes=["fu_merchant"], refines=REFINES, budget_s=budget_s, seed=seed)
        result = fine_tune(world.champion, data, cfg, world.work / f"bias-seed{seed}.pt")
        classes = result.classes
        new = [classes.index("fu_merchant")]
        val = np.asarray(predict_proba(result.model, data.val, torch.device("cpu")))
        # the val split's labels index the data's classes; the model's columns are in its own order
        val_labels = np.array([classes.index(data.classes[i]) for i in data.val.labels.numpy()])
        held, held_labels = probabilities(result.model, classes, world.held_out, ["fu_merchant"] * len(world.held_out),
                                          size)
        reg, reg_labels = probabilities(result.model, classes, reg_paths, reg_names, size)
        old, parents = len(classes) - len(new), [classes.index(REFINES["fu_merchant"])]
        rows = []
        for b, gate in REDECISIONS:
            adjust = functools.partial(redecided, new=new, b=b, gate=gate, old=old, parents=parents)
            v_right = decided_right(adjust(val), val_labels, classes)
            after = decided_right(adjust(reg), reg_labels, classes)
            lost = {c: int((before & ~after)[names == c].sum()) for c in ("fu", "not_fu")}
            won = {c: int((~before & after)[names == c].sum()) for c in ("fu", "not_fu")}
            drops = {c: 100 * (lost[c] - won[c]) / (names == c).sum() for c in ("fu", "not_fu")}
            rows.append({
                "bias": b, "parent_gate": gate,
                "new_class_recall": float(decided_right(adjust(held), held_labels, classes).mean()),
                "max_old_class_drop_pts": float(max(drops.values())), "lost": lost, "won": won,
                "val_recall": {c: float(v_right[val_labels == i].mean()) for i, c in enumerate(classes)},
            })
        print(f"seed {seed} ({result.epochs_run} epochs): " + "  ".join(
            f"b{r['bias']:g} ({r['new_class_recall']:.3f}, {r['max_old_class_drop_pts']:.2f}, "
            f"val m {r['val_recall']['fu_merchant']:.3f})" for r in rows[:len(BIASES):2]), flush=True)
        for g in rows[len(BIASES):]:
            print(f"  gated where the base is {g['parent_gate']} sure of another class: ({g['new_class_recall']:.3f}, "
                  f"{g['max_old_class_drop_pts']:.2f}), lost {g['lost']} won {g['won']}", flush=True)
        draws.append({"seed": seed, "epochs_run": result.epochs_run, "by_bias": rows})
    median = [{"bias": b, "parent_gate": gate,
               "new_class_recall": statistics.median(d["by_bias"][i]["new_class_recall"] for d in draws),
               "max_old_class_drop_pts": statistics.median(d["by_bias"][i]["max_old_class_drop_pts"] for d in draws),
               "val_merchant_recall": statistics.median(d["by_bias"][i]["val_recall"]["fu_merchant"] for d in draws)}
              for i, (b, gate) in enumerate(REDECISIONS)]
    return {"world": world.description, "budget_s": budget_s, "seeds": seeds, "device": _device_name(),
            "held_out_merchant": len(world.held_out), "regression_images": len(world.regression),
            "median": median, "draws": draws}


def format_table(summary: dict) -> str:
    lines = ["bias  gate    median held-out recall  median largest old drop pts  median val merchant recall"]
    lines += [f"{m['bias']:4.2f}  {m.get('parent_gate') or '-':<6}  {m['new_class_recall']:22.3f}  "
              f"{m['max_old_class_drop_pts']:27.2f}  "
              f"{m['val_merchant_recall']:26.3f}" for m in summary["median"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.new_class_bias", description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=["selection", "bench"], default="bench")
    parser.add_argument("--seeds", type=seed_list, default="0,1,2,3,4")
    parser.add_argument("--budget-s", type=float, default=45.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    world = bench_world() if args.world == "bench" else selection_world()
    summary = run(world, args.seeds, args.budget_s)
    out = args.out or Path(OUT.format(world=args.world))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(format_table(summary))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
