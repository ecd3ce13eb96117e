"""FP32 vs the INT8 variants onnxruntime offers, at batch 1 on one thread: why tasks.release.quantize chose them.

    OMP_NUM_THREADS=1 python -m bench.quantize_speed [--models saofu_fu mobilenet_v3_small_050] [--runs 300]

Rows per model: FP32; static INT8 with u8 activations and per-channel s8 weights (what
tasks.release.quantize.quantize_int8 writes, QDQ), the same in QOperator format, the same without
tasks.release.quantize.scalarize_uniform_constants, static INT8 with s8 activations (onnxruntime's
default activation type), and dynamic quantization. Models are random init and calibrated on
random pixels: this measures speed and size only, not accuracy. speed-up is FP32 p50 / the
variant's p50 (below 1: slower than FP32). Latency is noisy on a shared machine, so every
variant is measured in `rounds` interleaved rounds and the round with the lowest p50 is reported.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_dynamic, quantize_static

from models import create_model
from tasks.release.evaluation import measure_latency
from tasks.release.quantize import PixelCalibrationReader, calibration_pixels, prepare_for_quantization, quantize_int8
from tasks.train.export import export_onnx
from tasks.train.onnx_interface import INPUT_NAME

BENCH_MODELS = ("saofu_fu", "mobilenet_v3_small_050")
IMAGE_SIZE = 64


def build_variants(name: str, folder: Path, pixels: np.ndarray) -> dict[str, Path]:
    """Export `name` (random init) and write every quantized variant next to it."""
    fp32 = export_onnx(create_model(name, num_classes=2), ["a", "b"], folder / "fp32.onnx", IMAGE_SIZE)
    variants = {"fp32": fp32, "int8 u8s8 pc QDQ": quantize_int8(fp32, pixels, folder / "u8s8_qdq.onnx")}
    prepared = prepare_for_quantization(fp32, folder / "prepared.onnx")
    unscalarized = folder / "prepared_unscalarized.onnx"
    quant_pre_process(str(fp32), str(unscalarized))
    static = {  # label: (pre-processed graph, format, activation type)
        "int8 u8s8 pc QOperator": (prepared, QuantFormat.QOperator, QuantType.QUInt8),
        "int8 u8s8 pc QDQ, [1,3,1,1] consts": (unscalarized, QuantFormat.QDQ, QuantType.QUInt8),
        "int8 s8s8 pc QDQ": (prepared, QuantFormat.QDQ, QuantType.QInt8),
    }
    for i, (label, (source, fmt, act)) in enumerate(static.items()):
        out = folder / f"static_{i}.onnx"
        quantize_static(str(source), str(out), PixelCalibrationReader(pixels, INPUT_NAME), quant_format=fmt,
                        per_channel=True, activation_type=act, weight_type=QuantType.QInt8)
        variants[label] = out
    dynamic = folder / "dynamic.onnx"
    quantize_dynamic(str(prepared), str(dynamic), weight_type=QuantType.QInt8, per_channel=True)
    variants["dynamic s8 weights"] = dynamic
    return variants


def measure(variants: dict[str, Path], runs: int, rounds: int) -> dict[str, dict[str, float]]:
    """Per variant, the latency of its least-disturbed round (lowest p50)."""
    best: dict[str, dict[str, float]] = {}
    for _ in range(rounds):
        for label, path in variants.items():
            lat = measure_latency(path, image_size=IMAGE_SIZE, threads=1, warmup=30, runs=runs)
            if label not in best or lat["latency_p50_ms"] < best[label]["latency_p50_ms"]:
                best[label] = lat
    return best


def format_table(rows: list[dict]) -> str:
    head = f"{'model':<24}{'variant':<36}{'p50 ms':>9}{'p95 ms':>9}{'speed-up':>9}{'KiB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<24}{r['variant']:<36}{r['p50']:>9.3f}{r['p95']:>9.3f}"
                     f"{r['speedup']:>8.2f}x{r['bytes'] / 1024:>9.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BENCH_MODELS))
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    pixels = calibration_pixels(images, (IMAGE_SIZE, IMAGE_SIZE, 3), 64, seed=0)
    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix="saofu-qbench-") as tmp:
            variants = build_variants(name, Path(tmp), pixels)
            lat = measure(variants, args.runs, args.rounds)
            fp32_p50 = lat["fp32"]["latency_p50_ms"]
            for label, path in variants.items():
                rows.append({
                    "model": name, "variant": label, "p50": lat[label]["latency_p50_ms"],
                    "p95": lat[label]["latency_p95_ms"], "speedup": fp32_p50 / lat[label]["latency_p50_ms"],
                    "bytes": path.stat().st_size,
                })
    print(format_table(rows))


if __name__ == "__main__":
    main()
