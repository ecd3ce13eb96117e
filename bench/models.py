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
from tasks.data import prepare_dataset
from tasks.evaluation import evaluate_onnx, measure_latency
from tasks.export import export_onnx
from tasks.fu_world import WorldConfig
from tasks.training import TrainConfig, epoch_printer, fit

BENCH_MODELS = (
    "saofu_fu",
    "mobilenet_v3_small_050",
    "mobilenet_v3_small_075",
    "mobilenet_v3_small_100",
    "mobilenet_v2_035",
)
THRESHOLD = 0.9


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_table(rows: list[dict]) -> str:
    head = (f"{'model':<24}{'params':>10}{'MFLOPs':>9}{'val acc':>9}{'test acc@0.9':>14}"
            f"{'ort p50 ms':>12}{'ort p95 ms':>12}{'train s':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<24}{r['params']:>10,}{r['mflops']:>9.2f}{r['val_accuracy']:>9.4f}"
            f"{r['test_accuracy_at_threshold']:>14.4f}{r['latency_p50_ms']:>12.3f}{r['latency_p95_ms']:>12.3f}"
            f"{r['train_seconds']:>9.1f}"
        )
    return "\n".join(lines)


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
        from tasks.train_steps import generate_fu_world

        data_dir = generate_fu_world.fn(str(settings.data_dir / f"fu_world_n{n}_s{seed}"), n, seed)
    data = prepare_dataset(data_dir, 64, 0.15, seed, settings.cache_dir)
    eval_split = data.test if data.test is not None else data.val
    negative = "not_fu" if "not_fu" in data.classes else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            print(f"== {name}: training {epochs} epochs on {len(data.train)} images", flush=True)
            cfg = TrainConfig(model=name, epochs=epochs, seed=seed)
            result = fit(cfg, data.train, data.val, on_epoch=epoch_printer(epochs, prefix="  "))
            onnx_path = export_onnx(result.model, data.classes, Path(tmp) / f"{name}.onnx")
            report = evaluate_onnx(onnx_path, eval_split, THRESHOLD, negative)
            latency = measure_latency(onnx_path, threads=1, runs=300)
            rows.append({
                "model": name,
                "arch": getattr(result.model, "arch_string", ""),
                "params": count_params(result.model),
                "mflops": count_flops(result.model, (64, 64)) / 1e6,
                "val_accuracy": result.history[-1]["val_accuracy"],
                "test_accuracy": report.accuracy,
                "test_accuracy_at_threshold": report.accuracy_at_threshold,
                "recall_fu": report.per_class.get("fu").recall if "fu" in report.per_class else None,
                "precision_fu": report.per_class.get("fu").precision if "fu" in report.per_class else None,
                "latency_p50_ms": latency["latency_p50_ms"],
                "latency_p95_ms": latency["latency_p95_ms"],
                "onnx_bytes": Path(onnx_path).stat().st_size,
                "train_seconds": result.seconds,
            })
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
    table = format_table(rows) + f"\n\n{summary['device']}; written to {out}"
    return {"summary": summary, "table": table}
