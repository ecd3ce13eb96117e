"""`saofu bench models`: saofu's default architecture beside the torchvision baselines.

Every model is trained with the same budget (epochs, optimiser, schedule, augmentation, seed) on
the same generated Fu world, then measured the same way: parameters, MFLOPs (multiply-adds) at
the input size, validation accuracy (train fonts), accuracy at threshold 0.9 on the held-out-font
test split (from the exported ONNX graph), and onnxruntime FP32 latency at batch 1 on one thread.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from models import count_flops, count_params
from saofu.settings import get_settings
from tasks.data.fu_world import WorldConfig, world_folder_name
from tasks.data.loading import PreparedData, prepare_dataset
from tasks.release.evaluation import evaluate_onnx, measure_latency
from tasks.train.export import export_onnx
from tasks.train.loop import TrainConfig, epoch_printer, fit

BENCH_MODELS = (
    "saofu_fu",
    "mobilenet_v3_small_050",
    "mobilenet_v3_small_075",
    "mobilenet_v3_small_100",
    "mobilenet_v2_035",
)
THRESHOLD = 0.9


# The side every model here is trained and measured at: 64 px, the Fu world's size when these
# figures were measured (README); the world's default is 96 since 2026-12-07 (`saofu.pixels`).
SIZE = 64


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_table(rows: list[dict]) -> str:
    head = (f"{'model':<24}{'res':>4}{'params':>11}{'MFLOPs':>8}{'val acc':>8}{'test@0.9':>9}{'int8@0.9':>9}"
            f"{'fp32 p50':>9}{'int8 p50':>9}{'int8 p95':>9}{'train s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<24}{r.get('image_size', 64):>4}{r['params']:>11,}{r['mflops']:>8.2f}"
            f"{r['val_accuracy']:>8.4f}{r['test_accuracy_at_threshold']:>9.4f}"
            f"{r.get('int8_test_accuracy_at_threshold', float('nan')):>9.4f}{r['latency_p50_ms']:>9.3f}"
            f"{r.get('int8_latency_p50_ms', float('nan')):>9.3f}{r.get('int8_latency_p95_ms', float('nan')):>9.3f}"
            f"{r['train_seconds']:>8.1f}"
        )
    return "\n".join(lines)


def train_and_measure(cfg: TrainConfig, data: PreparedData, tmp: Path, label: str) -> dict:
    """Train `cfg` on `data`, export, and measure it as every row of the table is measured.

    Accuracy comes from the exported FP32 graph on the test split (held-out fonts) when there is
    one; latency is onnxruntime's at batch 1 on one thread, FP32 and static INT8 (u8 activations,
    per-channel s8 weights, calibrated on training images).
    """
    from tasks.release.quantize import quantize_int8

    eval_split = data.test if data.test is not None else data.val
    negative = "not_fu" if "not_fu" in data.classes else None
    print(f"== {label}: training {cfg.epochs} epochs on {len(data.train)} images", flush=True)
    result = fit(cfg, data.train, data.val, on_epoch=epoch_printer(cfg.epochs, prefix="  "))
    onnx_path = export_onnx(result.model, data.classes, tmp / f"{label}.onnx", cfg.image_size)
    int8_path = quantize_int8(onnx_path, data.train, tmp / f"{label}.int8.onnx")
    report = evaluate_onnx(onnx_path, eval_split, THRESHOLD, negative)
    int8_report = evaluate_onnx(int8_path, eval_split, THRESHOLD, negative)
    latency = measure_latency(onnx_path, image_size=cfg.image_size, threads=1, runs=300)
    int8_latency = measure_latency(int8_path, image_size=cfg.image_size, threads=1, runs=300)
    return {
        "model": label,
        "arch": getattr(result.model, "arch_string", ""),
        "image_size": cfg.image_size,
        "params": count_params(result.model),
        "mflops": count_flops(result.model, (cfg.image_size, cfg.image_size)) / 1e6,
        "val_accuracy": result.history[-1]["val_accuracy"],
        "test_accuracy": report.accuracy,
        "test_accuracy_at_threshold": report.accuracy_at_threshold,
        "int8_test_accuracy_at_threshold": int8_report.accuracy_at_threshold,
        "recall_fu": report.per_class.get("fu").recall if "fu" in report.per_class else None,
        "precision_fu": report.per_class.get("fu").precision if "fu" in report.per_class else None,
        "latency_p50_ms": latency["latency_p50_ms"],
        "latency_p95_ms": latency["latency_p95_ms"],
        "int8_latency_p50_ms": int8_latency["latency_p50_ms"],
        "int8_latency_p95_ms": int8_latency["latency_p95_ms"],
        "onnx_bytes": Path(onnx_path).stat().st_size,
        "int8_onnx_bytes": Path(int8_path).stat().st_size,
        "train_seconds": result.seconds,
    }


def run_models_bench(
    n: int = WorldConfig.n, epochs: int = TrainConfig.epochs, data_dir: str | Path | None = None,
    out: str | Path = "bench/results/models.json", models: tuple[str, ...] = BENCH_MODELS, seed: int = 0,
) -> dict:
    """Train and measure every model in `models`; write JSON to `out`.

    Returns:
        {"summary": the JSON written, "table": the printed table}.
    """
    settings = get_settings()
    if data_dir is None:
        from tasks.train.steps import generate_fu_world

        data_dir = generate_fu_world.fn(str(settings.data_dir / world_folder_name(n, seed, SIZE)), n, seed, SIZE)
    data = prepare_dataset(data_dir, SIZE, 0.15, seed, settings.cache_dir)
    eval_split = data.test if data.test is not None else data.val
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            cfg = TrainConfig(model=name, epochs=epochs, seed=seed, image_size=SIZE)
            rows.append(train_and_measure(cfg, data, Path(tmp), name))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    summary = {
        "benchmark": "models",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": _device_name(),
        "data_dir": str(data_dir),
        "train_images": len(data.train),
        "eval_split": "test (held-out fonts)" if data.test is not None else "val",
        "eval_images": len(eval_split),
        "epochs": epochs,
        "threshold": THRESHOLD,
        "rows": rows,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    table = (format_table(rows) + "\nlatency: onnxruntime ms, batch 1, one thread"
             f"\n\n{summary['device']}; written to {out}")
    return {"summary": summary, "table": table}
