"""Training throughput by memory layout: NCHW (PyTorch's default) beside channels-last (`loop.place`).

`tasks.train.loop.place` puts a model's convolution weights in channels-last on the CPU. This
measures what that buys where saofu trains: `train_one_epoch` (the training flow, search trials,
the release's pruning fine-tune) for saofu_fu and the smallest torchvision baseline, and the fast
retrain's `fine_tune_step` on an expanded saofu_fu (frozen base, trained branch). Each case runs
both layouts on the same batches, one after the other, per seed (seeds 0-4: weights, batch order
and augmentation), after one warm-up epoch each; the table prints medians and each seed's ratio.
The pixels are random (throughput does not depend on what the images show); 64 px, the Fu world's
size, batch 64, as the training flow's defaults.

Run it alone (two torch processes on 2 cores slow each other):
    saofu bench train-layout        (or python -m bench.train_layout)
About 2.5 minutes on 2 CPU cores. Writes bench/results/train_layout.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from models import create_model
from models.expand import expand_recognizer
from tasks.data.loading import TensorSplit, iterate_batches
from tasks.train.budget import _constant_schedule
from tasks.train.config import TrainConfig
from tasks.train.forgetting import fine_tune_step, fold_matrix
from tasks.train.loop import place, train_one_epoch

OUT = Path("bench/results/train_layout.json")
IMAGES = 2048  # one timed epoch
SIZE = 64
CASES = ("saofu_fu: train_one_epoch", "mobilenet_v3_small_050: train_one_epoch",
         "expanded saofu_fu: fine_tune_step")


def _split(seed: int, classes: list[str]) -> TensorSplit:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (IMAGES, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, len(classes), (IMAGES,), generator=g)
    return TensorSplit(images, labels, classes, [str(i) for i in range(IMAGES)])


def _model(case: str, seed: int) -> tuple[torch.nn.Module, list[str]]:
    torch.manual_seed(seed)
    if case.startswith("expanded"):
        base = create_model("saofu_fu", 2).eval()
        return expand_recognizer(base, ["fu", "not_fu"], ["fu_merchant"], {"fu_merchant": "fu"}), [
            "fu", "not_fu", "fu_merchant"]
    return create_model(case.split(":")[0], 2), ["fu", "not_fu"]


def _epoch(case: str, model: torch.nn.Module, split: TensorSplit, cfg: TrainConfig, seed: int) -> float:
    """Seconds for one pass over `split` with `case`'s training step."""
    cpu = torch.device("cpu")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = _constant_schedule(optimizer)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    if case.startswith("expanded"):
        fold = fold_matrix(split.classes, split.classes[:2], {"fu_merchant": "fu"})
        for images, labels in iterate_batches(split, cfg.batch_size, shuffle=True, generator=generator):
            batch = TensorSplit(images, labels, split.classes, [])
            fine_tune_step(model, model, batch, optimizer, scheduler, cfg, cpu, generator, fold, 0.0, 2.0)
    else:
        train_one_epoch(model, split, optimizer, scheduler, cfg, cpu, generator, None)
    return time.perf_counter() - start


def measure(case: str, seed: int, channels_last: bool) -> float:
    """Training images/s of `case` in one layout: a warm-up epoch, then a timed one."""
    cfg = TrainConfig(model="saofu_fu", image_size=SIZE, seed=seed, device="cpu")
    model, classes = _model(case, seed)
    if channels_last:  # what training does on the CPU
        model = place(model, torch.device("cpu"))
    split = _split(seed, classes)
    _epoch(case, model, split, cfg, seed)
    return IMAGES / _epoch(case, model, split, cfg, seed)


def run(seeds: tuple[int, ...] = (0, 1, 2, 3, 4), out: Path = OUT) -> dict:
    started = time.perf_counter()
    rows = []
    for case in CASES:
        draws = []
        for seed in seeds:
            nchw, nhwc = measure(case, seed, False), measure(case, seed, True)
            draws.append({"seed": seed, "nchw_images_per_s": nchw, "channels_last_images_per_s": nhwc,
                          "ratio": nhwc / nchw})
            print(f"{case}, seed {seed}: NCHW {nchw:.0f} images/s, channels-last {nhwc:.0f} ({nhwc / nchw:.2f}x)",
                  flush=True)
        rows.append({"case": case, "draws": draws,
                     "nchw_images_per_s": statistics.median(d["nchw_images_per_s"] for d in draws),
                     "channels_last_images_per_s": statistics.median(d["channels_last_images_per_s"] for d in draws),
                     "ratio": statistics.median(d["ratio"] for d in draws)})
    result = {"device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "torch": torch.__version__, "image_size": SIZE, "batch_size": TrainConfig.batch_size,
              "images_per_epoch": IMAGES, "seeds": list(seeds), "cases": rows,
              "seconds": time.perf_counter() - started, "date": time.strftime("%Y-%m-%d")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return {**result, "table": table(result)}


def table(result: dict) -> str:
    lines = [f"training images/s by layout, {result['device']}, torch {result['torch']}, {result['image_size']} px, "
             f"batch {result['batch_size']}, medians of seeds {result['seeds']}",
             f"{'case':<40} | {'NCHW (default)':>14} | {'channels-last':>13} | {'ratio':>5} | per seed"]
    for r in result["cases"]:
        per_seed = " ".join(f"{d['ratio']:.2f}" for d in r["draws"])
        lines.append(f"{r['case']:<40} | {r['nchw_images_per_s']:>14.0f} | {r['channels_last_images_per_s']:>13.0f} | "
                     f"{r['ratio']:>4.2f}x | {per_seed}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    print(run(tuple(args.seeds))["table"])
