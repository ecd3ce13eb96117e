"""`saofu train`, `saofu demo`, `saofu models list` and `saofu step ...` (the steps dvc.yaml runs).

Option defaults come from `TrainConfig` (torch-free); torch, Prefect and MLflow load inside the
commands, so building the command tree for `saofu --help` or `saofu serve` never imports them.
"""

from __future__ import annotations

from pathlib import Path

import typer

from saofu.cli.common import JsonOpt, emit, progress_to_stderr, run_flow
from saofu.errors import SaofuError
from saofu.urls import hide_password
from tasks.data.fu_world import WorldConfig
from tasks.train.config import TrainConfig

app = typer.Typer()
models_app = typer.Typer(no_args_is_help=True, help="Registered model factories.")
step_app = typer.Typer(no_args_is_help=True, help="Single pipeline steps on files (what dvc.yaml runs).")

# What a new user runs after `saofu demo`: the demo registers a version but names no champion, so
# `saofu serve` has nothing to serve until a release promotes one.
DEMO_NEXT = (
    "next: saofu release   (compress, evaluate, gate: the first release becomes the champion)\n"
    "then: saofu serve --port 8000"
)


# ---------------------------------------------------------------- models
@models_app.command("list")
def models_list(
    size: int = typer.Option(TrainConfig.image_size, "--size", help="Input size for the FLOP count."),
    classes: int = typer.Option(2, "--classes", help="Class count of the head."),
    as_json: bool = JsonOpt,
):
    """Name, parameters and MFLOPs (multiply-adds) of every registered model."""
    from models import count_flops, count_params, create_model, list_models

    rows = []
    for name in list_models():
        kwargs = {}
        if name == "saofu_from_arch":
            continue  # needs an architecture string; shown through the models it builds
        m = create_model(name, num_classes=classes, **kwargs)
        rows.append({"name": name, "params": count_params(m), "mflops": count_flops(m, (size, size)) / 1e6})
    lines = [f"{'name':<26}{'params':>12}{'MFLOPs@' + str(size):>14}"]
    lines += [f"{r['name']:<26}{r['params']:>12,}{r['mflops']:>14.2f}" for r in rows]
    emit({"input_size": size, "num_classes": classes, "models": rows}, as_json, "\n".join(lines))


# ---------------------------------------------------------------- train / demo
def _check_train_inputs(data: Path | None, cfg: TrainConfig) -> None:
    from models import is_model, list_models

    if not is_model(cfg.model):
        raise SaofuError(f"unknown model {cfg.model!r}; known: {', '.join(list_models())}")
    if data is not None:
        from saofu.settings import get_settings
        from tasks.data.loading import prepare_dataset

        # Decode (and cache) the data before the flow starts, so bad images are one clear line here
        # rather than a failed flow run; the flow then reads the same cache entry.
        prepare_dataset(data, cfg.image_size, cfg.val_share, cfg.seed, get_settings().cache_dir)


@app.command()
def train(
    data: Path = typer.Option(..., "--data", help="ImageFolder dataset (flat or train/val/test)."),
    model: str = typer.Option("saofu_fu", "--model", help="Model factory (see `saofu models list`)."),
    arch: str | None = typer.Option(None, "--arch", help="Architecture string (with --model saofu_from_arch)."),
    epochs: int = typer.Option(TrainConfig.epochs, "--epochs"),
    batch_size: int = typer.Option(TrainConfig.batch_size, "--batch-size"),
    lr: float = typer.Option(TrainConfig.lr, "--lr"),
    image_size: int = typer.Option(TrainConfig.image_size, "--image-size"),
    val_share: float = typer.Option(
        TrainConfig.val_share, "--val-share", help="Validation share when DIR has no val/ folder."
    ),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    threshold: float = typer.Option(0.9, "--threshold"),
    negative_class: str | None = typer.Option(None, "--negative-class", help="Fallback class under the threshold."),
    registered_model: str = typer.Option("saofu-recognizer", "--registered-model"),
    experiment: str = typer.Option("saofu-train", "--experiment"),
    as_json: bool = JsonOpt,
):
    """Train on any ImageFolder dataset, export ONNX, evaluate, register in MLflow."""
    from flows.train import TrainFlowParams, train_flow

    params = TrainFlowParams(
        data_dir=str(data), model=model, arch=arch, epochs=epochs, batch_size=batch_size, lr=lr,
        image_size=image_size, val_share=val_share, seed=seed, device=device, threshold=threshold,
        negative_class=negative_class, registered_model=registered_model, experiment=experiment,
    )
    with progress_to_stderr(as_json):
        _check_train_inputs(data, params.train_config())
        result = run_flow(train_flow, params)
    emit(result.model_dump(), as_json, _train_summary(result))


def _train_summary(r) -> str:
    return (
        f"\nvalidation accuracy {r.val_accuracy:.4f}; {r.eval_split} accuracy at threshold: "
        f"{r.test_accuracy_at_threshold:.4f}\n"
        f"model: {r.params:,} params, {r.mflops:.2f} MFLOPs, onnxruntime p50 {r.latency_p50_ms:.3f} ms\n"
        f"MLflow run {r.run_id}, registered {r.registered_model} version {r.version}\n"
        f"tracking store: {hide_password(r.tracking_uri)}\nONNX: {r.onnx_path}"
    )


@app.command()
def demo(
    train_only: bool = typer.Option(
        False, "--train-only", help="Only the training flow on the generated Fu world (the earlier demo)."),
    n: int = typer.Option(WorldConfig.n, "--n", help="Images in the generated Fu world (--train-only)."),
    epochs: int = typer.Option(TrainConfig.epochs, "--epochs", help="Training epochs (--train-only)."),
    as_json: bool = JsonOpt,
):
    """The whole loop on embedded defaults, left running: services, labels, train, release, serve,
    scans, active learning, and the fast retrain as a deployment run (`--train-only`: training alone)."""
    if not train_only:
        from saofu.cli.demo_loop import format_summary, run_demo

        with progress_to_stderr(as_json):
            summary = run_demo()
        emit(summary.as_dict(), as_json, format_summary(summary))
        return
    from flows.train import TrainFlowParams, train_flow
    from tasks.tracking import mlflow_ui_hint

    params = TrainFlowParams(world_n=n, epochs=epochs)
    with progress_to_stderr(as_json):
        result = run_flow(train_flow, params)
    emit(result.model_dump(), as_json, _train_summary(result) + f"\nbrowse: {mlflow_ui_hint()}\n\n{DEMO_NEXT}")


# ---------------------------------------------------------------- steps (dvc.yaml)
@step_app.command("train")
def step_train(
    data: Path = typer.Option(..., "--data"),
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoint.pt, history.csv."),
    model: str = typer.Option("saofu_fu", "--model"),
    epochs: int = typer.Option(TrainConfig.epochs, "--epochs"),
    batch_size: int = typer.Option(TrainConfig.batch_size, "--batch-size"),
    lr: float = typer.Option(TrainConfig.lr, "--lr"),
    image_size: int = typer.Option(TrainConfig.image_size, "--image-size"),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint.pt if it exists."),
    as_json: bool = JsonOpt,
):
    """Train only (no MLflow): the offline `dvc repro` step; data-parallel when run under torchrun."""
    from tasks.train import distributed
    from tasks.train.steps import train_recognizer

    cfg = TrainConfig(model=model, epochs=epochs, batch_size=batch_size, lr=lr, image_size=image_size, seed=seed)
    with progress_to_stderr(as_json):
        _check_train_inputs(data, cfg)
        if not distributed.is_main_process():
            from saofu.settings import get_settings
            from tasks.data.loading import prepare_dataset
            from tasks.train.loop import fit

            # Another torchrun process: it trains in step with rank 0 (same data, same `fit` call as
            # train_recognizer makes) but prints and writes nothing; rank 0 owns the run folder.
            prepared = prepare_dataset(data, cfg.image_size, cfg.val_share, cfg.seed, get_settings().cache_dir)
            fit(cfg, prepared.train, prepared.val, out / "checkpoint.pt", resume=resume)
            return
        outcome = train_recognizer.fn(str(data), cfg, str(out), experiment=None, resume=resume)
    emit(outcome.__dict__, as_json, f"val accuracy {outcome.val_accuracy:.4f}; checkpoint {outcome.checkpoint}")


@step_app.command("export")
def step_export(
    checkpoint: Path = typer.Option(..., "--checkpoint"),
    out: Path = typer.Option(..., "--out", help="Output .onnx file."),
    data: Path | None = typer.Option(None, "--data", help="Images for the parity check."),
    as_json: bool = JsonOpt,
):
    """Export a checkpoint to ONNX and check parity with PyTorch."""
    from tasks.train.steps import export_recognizer

    with progress_to_stderr(as_json):
        outcome = export_recognizer.fn(str(checkpoint), str(out), str(data) if data else None)
    emit(outcome.__dict__, as_json, f"wrote {outcome.onnx_path} (parity {outcome.parity_max_abs_diff:.2e})")


@step_app.command("evaluate")
def step_evaluate(
    model: Path = typer.Option(..., "--model", help="ONNX file."),
    data: Path = typer.Option(..., "--data"),
    out: Path = typer.Option(..., "--out", help="Report JSON."),
    image_size: int = typer.Option(TrainConfig.image_size, "--image-size"),
    threshold: float = typer.Option(0.9, "--threshold"),
    negative_class: str | None = typer.Option(None, "--negative-class"),
    as_json: bool = JsonOpt,
):
    """Evaluate an ONNX graph: accuracy at threshold, per-class precision/recall, latency."""
    from tasks.train.steps import evaluate_recognizer

    with progress_to_stderr(as_json):
        report = evaluate_recognizer.fn(str(model), str(data), str(out), image_size, threshold, negative_class)
    emit(report, as_json, f"accuracy at {threshold}: {report['accuracy_at_threshold']:.4f} (report {out})")
