"""Inference images/s by batch size: what `tasks.train.loop.inference_batch` is chosen by.

Every validation pass (the training flow's epochs, the fast retrain's fine-tune), the fast retrain's
ranking of the old images most like the new class, and every ONNX evaluation run a whole split
through a model in batches. On the CPU they ran in batches of 512 (PyTorch) and 256
(onnxruntime); on the 2-core machine saofu measures on, PyTorch ran saofu's recognisers in those
batches at under a third of the images/s of batches of 64 (why was not measured). This measures
each case at batch 32 to 512 on the same images, the batch sizes taking turns within each round
(three rounds per seed, seeds 0-2: weights and pixels), and prints medians of images/s with each
size's ratio to 512. The pixels and weights are random
(speed does not depend on what the images show); 64 px, the Fu world's size, 2,048 images a pass.

Run it alone (two torch processes on 2 cores slow each other):
    saofu bench inference-batch        (or python -m bench.inference_batch)
About 3 minutes on 2 CPU cores. Writes bench/results/inference_batch.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

from models import create_model
from models.expand import expand_recognizer
from tasks.data.loading import TensorSplit
from tasks.release.evaluation import onnx_predict_proba, session
from tasks.train.export import export_onnx
from tasks.train.loop import place, predict_proba

OUT = Path("bench/results/inference_batch.json")
IMAGES = 2048
SIZE = 64
BATCHES = (32, 64, 128, 256, 512)
ROUNDS = 3
CASES = ("saofu_fu (torch)", "expanded saofu_fu (torch)", "mobilenet_v3_small_050 (torch)",
         "saofu_fu (onnxruntime FP32)")


def _split(seed: int) -> TensorSplit:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (IMAGES, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    return TensorSplit(images, torch.zeros(IMAGES, dtype=torch.int64), ["fu", "not_fu"], [])


def _predictor(case: str, seed: int, tmp: Path):
    """A function running a whole split through `case` at a given batch size, as saofu does."""
    torch.manual_seed(seed)
    cpu = torch.device("cpu")
    if case.startswith("expanded"):
        model = expand_recognizer(create_model("saofu_fu", 2).eval(), ["fu", "not_fu"], ["fu_merchant"],
                                  {"fu_merchant": "fu"})
    else:
        model = create_model(case.split(" ")[0], 2)
    if case.endswith("(onnxruntime FP32)"):
        path = export_onnx(model.eval(), ["fu", "not_fu"], tmp / f"seed{seed}.onnx", SIZE)
        sess: ort.InferenceSession = session(path, threads=2)  # as the release's evaluation opens it
        return lambda split, batch: onnx_predict_proba(sess, split, batch)
    model = place(model, cpu)  # channels-last on the CPU, as training and validation run
    return lambda split, batch: predict_proba(model, split, cpu, batch)


def measure(case: str, seed: int, tmp: Path) -> dict[int, float]:
    """Images/s of `case` per batch size: a warm-up pass each, then the sizes in turn, `ROUNDS` rounds."""
    predict, split = _predictor(case, seed, tmp), _split(seed)
    for batch in BATCHES:
        predict(split, batch)
    seconds: dict[int, list[float]] = {b: [] for b in BATCHES}
    for _ in range(ROUNDS):
        for batch in BATCHES:
            start = time.perf_counter()
            predict(split, batch)
            seconds[batch].append(time.perf_counter() - start)
    return {b: IMAGES / statistics.median(s) for b, s in seconds.items()}


def run(seeds: tuple[int, ...] = (0, 1, 2), out: Path = OUT) -> dict:
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="saofu-inference-batch-") as tmp:
        for case in CASES:
            draws = []
            for seed in seeds:
                per_batch = measure(case, seed, Path(tmp))
                draws.append({"seed": seed, "images_per_s": {str(b): v for b, v in per_batch.items()}})
                print(f"{case}, seed {seed}: " + ", ".join(f"batch {b} {v:.0f}/s" for b, v in per_batch.items()),
                      flush=True)
            medians = {str(b): statistics.median(d["images_per_s"][str(b)] for d in draws) for b in BATCHES}
            rows.append({"case": case, "draws": draws, "images_per_s": medians,
                         "ratio_to_512": {b: v / medians["512"] for b, v in medians.items()}})
    result = {"device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "torch": torch.__version__, "onnxruntime": ort.__version__, "image_size": SIZE,
              "images_per_pass": IMAGES, "rounds": ROUNDS, "seeds": list(seeds), "batch_sizes": list(BATCHES),
              "cases": rows, "seconds": time.perf_counter() - started, "date": time.strftime("%Y-%m-%d")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return {**result, "table": table(result)}


def table(result: dict) -> str:
    sizes = [str(b) for b in result["batch_sizes"]]
    lines = [f"inference images/s by batch size, {result['device']}, torch {result['torch']}, onnxruntime "
             f"{result['onnxruntime']}, {result['image_size']} px, medians of seeds {result['seeds']} "
             "(in brackets: the ratio to batch 512)",
             f"{'case':<32} | " + " | ".join(f"{'batch ' + b:>15}" for b in sizes)]
    for r in result["cases"]:
        lines.append(f"{r['case']:<32} | " + " | ".join(
            f"{r['images_per_s'][b]:>7.0f} ({r['ratio_to_512'][b]:.2f}x)" for b in sizes))
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    print(run(tuple(args.seeds))["table"])
