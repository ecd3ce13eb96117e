"""The units of the training pipeline, on files: generate → train → export → evaluate → register.

Each is a plain typed function (what `dvc.yaml`'s stages and the tests call) with a Prefect
`@task` face (what `flows/train.py` composes); `.fn` is the plain function. They pass paths and
small results, never tensors, so each step can run in its own process or on its own machine.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import task

from models import count_flops, count_params
from saofu.errors import SaofuError
from saofu.pixels import DEFAULT_IMAGE_SIZE
from saofu.settings import get_settings
from tasks import tracking
from tasks.data.loading import prepare_dataset
from tasks.data.versions import version_of
from tasks.release.badcases import find_badcases, write_badcases
from tasks.release.evaluation import measure_latency, predict_split, threshold_report
from tasks.train.export import export_onnx, parity_max_abs_diff
from tasks.train.loop import TrainConfig, epoch_printer, fit, load_checkpoint


@dataclass
class TrainOutcome:
    checkpoint: str
    arch: str  # the model's architecture string: enough, with the class map, to rebuild it
    classes: list[str]
    val_accuracy: float
    params: int
    mflops: float
    epochs: int
    seconds: float
    data_fingerprint: str
    data_version: str = ""  # the DVC data version trained on ("" when the data is not versioned)
    run_id: str | None = None


@dataclass
class ExportOutcome:
    onnx_path: str
    parity_max_abs_diff: float
    size_bytes: int


def _write_history(history: list[dict], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


@task(name="generate-fu-world")
def generate_fu_world(out_dir: str, n: int, seed: int, image_size: int = DEFAULT_IMAGE_SIZE,
                      merchant: bool = False) -> str:
    """Generate the Fu world into `out_dir`, reusing it when the same world is already there."""
    from tasks.data.fu_world import WorldConfig, generate_world, is_same_world

    cfg = WorldConfig(n=n, seed=seed, image_size=image_size, merchant=merchant)
    if is_same_world(out_dir, cfg):
        print(f"Fu world already generated in {out_dir}", flush=True)
        return out_dir
    print(f"generating the Fu world: {n} images of {image_size}px into {out_dir}", flush=True)
    generate_world(out_dir, cfg, progress=lambda d, t: print(f"  {d}/{t} images", flush=True))
    return out_dir


@task(name="train-recognizer")
def train_recognizer(
    data_dir: str,
    cfg: TrainConfig,
    run_dir: str,
    experiment: str | None = tracking.DEFAULT_EXPERIMENT,
    run_tags: dict[str, str] | None = None,
    resume: bool = False,
) -> TrainOutcome:
    """Train on an ImageFolder dataset; with an `experiment`, track the run in MLflow.

    Writes `run_dir/checkpoint.pt` and `run_dir/history.csv`. Per-epoch metrics go to MLflow as
    they happen, so a pruner or a person watching the UI sees them live.
    """
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_dataset(data_dir, cfg.image_size, cfg.val_share, cfg.seed, get_settings().cache_dir)
    print(
        f"data: {len(data.train)} train / {len(data.val)} val"
        + (f" / {len(data.test)} test" if data.test else "")
        + f" images, classes {data.classes}",
        flush=True,
    )
    # The DVC data version (from the ingest flow) this run trains on, when the data is one.
    data_version = version_of(data_dir) or ""
    run_id = None
    show = epoch_printer(cfg.epochs)
    on_epoch = show
    if experiment:
        params = {**asdict(cfg), "data_dir": str(Path(data_dir).resolve())}
        tags = {"data_fingerprint": data.fingerprint, "classes": json.dumps(data.classes),
                "data_version": data_version, **(run_tags or {})}
        run_id = tracking.start_run(experiment, f"train-{cfg.model}", params, tags)
        if data.unreadable:  # the images this run did not see, beside the run
            tracking.log_dict(run_id, {"unreadable": [{"path": p, "why": why} for p, why in data.unreadable]},
                              "unreadable_images.json")

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            show(epoch, metrics)
            tracking.log_metrics(run_id, metrics, step=epoch)

    try:
        result = fit(cfg, data.train, data.val, out / "checkpoint.pt", resume=resume, on_epoch=on_epoch)
    except BaseException:
        if run_id:
            tracking.finish_run(run_id, "FAILED")  # not left RUNNING in the UI forever
        raise
    _write_history(result.history, out / "history.csv")
    params = count_params(result.model)
    mflops = count_flops(result.model, (cfg.image_size, cfg.image_size)) / 1e6
    final_val = result.history[-1]["val_accuracy"]
    arch = getattr(result.model, "arch_string", "")
    if run_id:
        tracking.log_metrics(run_id, {"params": params, "mflops": mflops, "val_accuracy_final": final_val})
        tracking.set_tags(run_id, {"arch": arch, "model": cfg.model})
        tracking.log_dict(run_id, {"arch": arch, "classes": data.classes}, "model_card.json")
        tracking.log_file(run_id, out / "checkpoint.pt", "checkpoint")
        tracking.log_file(run_id, out / "history.csv")
    return TrainOutcome(
        checkpoint=str(out / "checkpoint.pt"),
        arch=arch,
        classes=data.classes,
        val_accuracy=final_val,
        params=params,
        mflops=mflops,
        epochs=cfg.epochs,
        seconds=result.seconds,
        data_fingerprint=data.fingerprint,
        data_version=data_version,
        run_id=run_id,
    )


@task(name="export-onnx")
def export_recognizer(
    checkpoint: str, onnx_path: str, data_dir: str | None = None, run_id: str | None = None
) -> ExportOutcome:
    """Export a checkpoint to ONNX and check it against PyTorch on real images.

    Raises:
        SaofuError: the exported graph's logits differ from PyTorch's by more than 1e-3.
    """
    model, state = load_checkpoint(checkpoint)
    image_size = state["config"]["image_size"]
    path = export_onnx(model, state["classes"], onnx_path, image_size, state.get("refines"))
    if data_dir:
        cfg = state["config"]
        data = prepare_dataset(data_dir, image_size, cfg["val_share"], cfg["seed"], get_settings().cache_dir)
        pixels = data.val.images[:64].permute(0, 2, 3, 1).contiguous().numpy()
    else:
        import numpy as np

        pixels = np.random.default_rng(0).integers(0, 256, (16, image_size, image_size, 3), dtype=np.uint8)
    diff = parity_max_abs_diff(model, path, pixels)
    print(f"ONNX parity: max |logit difference| = {diff:.2e}", flush=True)
    if diff > 1e-3:
        raise SaofuError(f"ONNX export of {checkpoint} disagrees with PyTorch: max |diff| {diff:.2e} > 1e-3")
    outcome = ExportOutcome(str(path), diff, path.stat().st_size)
    if run_id:
        tracking.log_metrics(run_id, {"onnx_parity_max_abs_diff": diff, "onnx_size_bytes": outcome.size_bytes})
        tracking.log_file(run_id, path, "onnx")
    return outcome


@task(name="evaluate-onnx")
def evaluate_recognizer(
    onnx_path: str, data_dir: str, report_path: str, image_size: int = DEFAULT_IMAGE_SIZE, threshold: float = 0.9,
    negative_class: str | None = None, val_share: float = 0.15, seed: int = 0, run_id: str | None = None,
) -> dict:
    """Evaluate the ONNX graph on the held-out test split (the val split when there is none).

    Returns (and writes to `report_path` as JSON): accuracy, accuracy at the threshold,
    per-class precision/recall, confusion, and onnxruntime latency at batch 1 on one thread.
    """
    data = prepare_dataset(data_dir, image_size, val_share, seed, get_settings().cache_dir)
    split_name, split = ("test", data.test) if data.test is not None else ("val", data.val)
    if negative_class is not None and negative_class not in data.classes:
        negative_class = None  # a dataset without that class has no fallback: abstain instead
    probs = predict_split(onnx_path, split)
    report = threshold_report(probs, split.labels.numpy(), split.classes, threshold, negative_class).to_dict()
    report.update(split=split_name, **measure_latency(onnx_path, image_size, threads=1))
    Path(report_path).parent.mkdir(parents=True, exist_ok=True)
    Path(report_path).write_text(json.dumps(report, indent=2))
    # The false positives/negatives go back to labelers (flows/active_learning) as badcases.
    cases = find_badcases(probs, split.labels.numpy(), split.classes, split.paths, threshold, negative_class)
    badcase_path = Path(report_path).with_name("badcases.json")
    write_badcases(badcase_path, cases, run_id or str(onnx_path), split.classes, threshold, negative_class,
                   split_name, len(split))
    print(
        f"{split_name}: accuracy {report['accuracy']:.4f}, at threshold {threshold}: "
        f"{report['accuracy_at_threshold']:.4f}; onnxruntime 1 thread p50 {report['latency_p50_ms']:.3f} ms",
        flush=True,
    )
    if run_id:
        tracking.log_metrics(run_id, {
            f"onnx_{split_name}_accuracy": report["accuracy"],
            f"onnx_{split_name}_accuracy_at_threshold": report["accuracy_at_threshold"],
            "latency_p50_ms": report["latency_p50_ms"],
            "latency_p95_ms": report["latency_p95_ms"],
            **{f"onnx_{split_name}_recall_{c}": m["recall"] for c, m in report["per_class"].items()},
            **{f"onnx_{split_name}_precision_{c}": m["precision"] for c, m in report["per_class"].items()},
        })
        tracking.log_file(run_id, report_path, "evaluation")
        tracking.log_file(run_id, badcase_path, "evaluation")
    return report


@task(name="register-model")
def register_recognizer(
    run_id: str, onnx_path: str, registered_model: str, image_size: int, classes: list[str],
    version_tags: dict[str, str],
) -> str:
    """Register the ONNX graph as a new version of `registered_model`; close the run."""
    version = tracking.register_onnx(run_id, onnx_path, registered_model, image_size, classes, version_tags)
    tracking.finish_run(run_id)
    print(f"registered {registered_model} version {version}", flush=True)
    return version
