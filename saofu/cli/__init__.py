"""The `saofu` command line.

Every command that produces results takes `--json` and then prints exactly one JSON object on
stdout (progress goes to stderr). Bad input is reported as one `error: ...` line, exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import typer

from saofu.errors import SaofuError
from tasks.data.fu_world import WorldConfig
from tasks.train.loop import TrainConfig

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="saofu: the 福 recogniser's MLOps pipeline.",
)
data_app = typer.Typer(no_args_is_help=True, help="Generate and inspect datasets.")
models_app = typer.Typer(no_args_is_help=True, help="Registered model factories.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (tables side by side with their peers).")
step_app = typer.Typer(no_args_is_help=True, help="Single pipeline steps on files (what dvc.yaml runs).")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")
app.add_typer(step_app, name="step")
up_app = typer.Typer(no_args_is_help=True, help="Start a real local service (loopback only).")
down_app = typer.Typer(no_args_is_help=True, help="Stop a service started by `saofu up`.")
app.add_typer(up_app, name="up")
app.add_typer(down_app, name="down")

JsonOpt = typer.Option(False, "--json", help="Print one machine-readable JSON summary on stdout.")


@contextlib.contextmanager
def _progress_to_stderr(enabled: bool):
    """With --json, stdout carries only the summary: route progress prints to stderr."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _emit(summary: dict, as_json: bool, human: str) -> None:
    if as_json:
        print(json.dumps(summary, default=str))
    else:
        print(human)


def _run_flow(flow_fn, params):
    """Run a flow on the configured Prefect API (an ephemeral one when none is set).

    No heartbeat thread: joining it costs ~1 s per flow run, and these runs are supervised by
    the command that started them.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        return flow_fn(params)


# ---------------------------------------------------------------- data
@data_app.command("generate")
def data_generate(
    out: Path = typer.Option(..., "--out", help="Output folder (ImageFolder tree + manifest.csv)."),
    n: int = typer.Option(WorldConfig.n, "--n", help="Number of images."),
    seed: int = typer.Option(0, "--seed"),
    size: int = typer.Option(64, "--size", help="Image side length in pixels."),
    merchant: bool = typer.Option(False, "--merchant", help="Add the directional class fu_merchant."),
    as_json: bool = JsonOpt,
):
    """Generate the Fu world: fu / not_fu crops, fonts split between train and test."""
    from tasks.data.fu_world import WorldConfig, generate_world

    cfg = WorldConfig(n=n, seed=seed, image_size=size, merchant=merchant)
    with _progress_to_stderr(as_json):
        summary = generate_world(out, cfg, progress=lambda d, t: print(f"  {d}/{t} images", flush=True))
    info = {
        "out_dir": str(summary.out_dir),
        "manifest": str(summary.manifest),
        "counts": summary.counts,
        "train_font_groups": summary.train_font_groups,
        "test_font_groups": summary.test_font_groups,
    }
    _emit(info, as_json, f"wrote {n} images to {out} (manifest {summary.manifest})")


@data_app.command("versions")
def data_versions(name: str | None = typer.Option(None, "--name"), as_json: bool = JsonOpt):
    """List the dataset versions (DVC) the ingest flow created."""
    from tasks.data.versions import list_versions

    versions = list_versions(name)
    rows = [v.__dict__ for v in versions]
    lines = [f"{v.id:<24} {v.n_files:>7} files  {v.created_at}  {v.md5}" for v in versions]
    _emit({"versions": rows}, as_json, "\n".join(lines) or "no data versions yet")


@data_app.command("checkout")
def data_checkout(
    version: str = typer.Argument(..., help="A version id from `saofu data versions`, e.g. fu@v3."),
    out: Path = typer.Option(..., "--out", help="Folder to restore the files into."),
    as_json: bool = JsonOpt,
):
    """Restore exactly the files of a dataset version."""
    from tasks.data.versions import checkout_version

    with _progress_to_stderr(as_json):
        path = checkout_version(version, out)
    _emit({"version": version, "out_dir": str(path)}, as_json, f"restored {version} into {path}")


@app.command()
def ingest(
    dataset: Path = typer.Option(..., "--dataset", help="The labelled dataset folder (tree + manifest.csv)."),
    project: str = typer.Option("fu-recognizer", "--project", help="Label Studio project title."),
    name: str = typer.Option("fu", "--name", help="Name of the dataset's data versions."),
    classes: str | None = typer.Option(None, "--classes", help="Comma-separated class set."),
    as_json: bool = JsonOpt,
):
    """Ingest completed Label Studio annotations: validate, add to the dataset, version it."""
    from flows.ingest import IngestParams, ingest_flow

    params = IngestParams(project=project, dataset_dir=str(dataset), dataset_name=name,
                          classes=classes.split(",") if classes else None)
    with _progress_to_stderr(as_json):
        result = _run_flow(ingest_flow, params)
    _emit(result.model_dump(), as_json,
          f"added {result.added} human labels ({len(result.ties)} ties left out); "
          f"data version {result.data_version}")


@app.command("active-learning")
def active_learning(
    pool: Path = typer.Option(..., "--pool", help="The online pool folder (index.jsonl + images)."),
    dataset: Path = typer.Option(..., "--dataset", help="The labelled dataset that auto-labels go into."),
    registered_model: str = typer.Option("fu-recognizer", "--registered-model", help="Its @champion predicts."),
    second: str | None = typer.Option(None, "--second", help="Second model: NAME, NAME@alias or NAME/3."),
    threshold: float = typer.Option(0.9, "--threshold", help="Confidence BOTH models must reach."),
    tta: bool = typer.Option(True, "--tta/--no-tta", help="The champion votes over 5 shifted/zoomed views."),
    project: str = typer.Option("fu-recognizer", "--project", help="Label Studio project for the rest."),
    badcases: Path | None = typer.Option(None, "--badcases", help="A badcases.json to send to labelers too."),
    as_json: bool = JsonOpt,
):
    """Auto-label what two models agree on confidently; send the rest to Label Studio."""
    from flows.active_learning import ActiveLearningParams, active_learning_flow

    params = ActiveLearningParams(
        pool_dir=str(pool), dataset_dir=str(dataset), registered_model=registered_model, second_model=second,
        threshold=threshold, champion_tta=tta, project=project, include_badcases=badcases is not None,
        badcase_file=str(badcases) if badcases else None,
    )
    with _progress_to_stderr(as_json):
        result = _run_flow(active_learning_flow, params)
    _emit(result.model_dump(), as_json,
          f"{result.new_images} new images: {result.auto} auto-labelled, {result.human} to Label Studio, "
          f"{result.badcases} badcases sent")


# ---------------------------------------------------------------- models
@models_app.command("list")
def models_list(
    size: int = typer.Option(64, "--size", help="Input size for the FLOP count."),
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
    _emit({"input_size": size, "num_classes": classes, "models": rows}, as_json, "\n".join(lines))


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
    image_size: int = typer.Option(64, "--image-size"),
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
    with _progress_to_stderr(as_json):
        _check_train_inputs(data, params.train_config())
        result = _run_flow(train_flow, params)
    _emit(result.model_dump(), as_json, _train_summary(result))


def _train_summary(r) -> str:
    return (
        f"\nvalidation accuracy {r.val_accuracy:.4f}; {r.eval_split} accuracy at threshold: "
        f"{r.test_accuracy_at_threshold:.4f}\n"
        f"model: {r.params:,} params, {r.mflops:.2f} MFLOPs, onnxruntime p50 {r.latency_p50_ms:.3f} ms\n"
        f"MLflow run {r.run_id}, registered {r.registered_model} version {r.version}\n"
        f"tracking store: {r.tracking_uri}\nONNX: {r.onnx_path}"
    )


@app.command()
def demo(
    n: int = typer.Option(WorldConfig.n, "--n", help="Images in the generated Fu world."),
    epochs: int = typer.Option(TrainConfig.epochs, "--epochs"),
    as_json: bool = JsonOpt,
):
    """The main job on embedded defaults: the Fu world through the training flow."""
    from flows.train import TrainFlowParams, train_flow
    from tasks.tracking import mlflow_ui_hint

    params = TrainFlowParams(world_n=n, epochs=epochs)
    with _progress_to_stderr(as_json):
        result = _run_flow(train_flow, params)
    _emit(result.model_dump(), as_json, _train_summary(result) + f"\nbrowse: {mlflow_ui_hint()}")


@app.command()
def search(
    data: Path | None = typer.Option(None, "--data", help="ImageFolder dataset (default: generate the Fu world)."),
    n: int = typer.Option(WorldConfig.n, "--n", help="Images in the generated Fu world (without --data)."),
    trials: int = typer.Option(20, "--trials", help="Trials in the study, across all workers."),
    timeout_min: float | None = typer.Option(None, "--timeout-min", help="Wall-clock budget of the study."),
    epochs: int = typer.Option(8, "--epochs", help="Epochs of an unpruned trial (Hyperband's max resource)."),
    sampler: str = typer.Option("tpe", "--sampler", help="tpe, random, grid, cmaes, qmc or nsga2."),
    pruner: str | None = typer.Option(
        None, "--pruner", help="hyperband (default), median or none (the default for nsga2, which cannot prune)."
    ),
    workers: int = typer.Option(1, "--workers", help="Worker processes sharing the study."),
    storage: str | None = typer.Option(
        None, "--storage", help="Optuna storage URL (default SQLite under the project; postgresql://... for workers)."
    ),
    study: str | None = typer.Option(None, "--study", help="Study name; an existing one is resumed."),
    target_mflops: float = typer.Option(5.0, "--target-mflops", help="FLOPs target T_f of the score."),
    target_kparams: float = typer.Option(40.0, "--target-kparams", help="Parameter target T_s (thousands)."),
    latency: bool = typer.Option(False, "--latency", help="Measure INT8 onnxruntime latency as a third cost."),
    max_mflops: float | None = typer.Option(None, "--max-mflops", help="Hard FLOP limit for the chosen best trial."),
    max_kparams: float | None = typer.Option(
        None, "--max-kparams", help="Hard parameter limit (thousands) for the chosen best trial."
    ),
    scale_to_mflops: float | None = typer.Option(
        None, "--scale-to-mflops", help="Compound-scale the best architecture to this FLOP target before retraining."
    ),
    final_epochs: int = typer.Option(20, "--final-epochs", help="Epochs of the best trial's retrain (0: none)."),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = JsonOpt,
):
    """Architecture and hyper-parameter search (Optuna), then retrain and register the best."""
    from flows.search import SearchFlowParams, search_flow

    params = SearchFlowParams(
        data_dir=str(data) if data else None, world_n=n, n_trials=trials, timeout_min=timeout_min, epochs=epochs,
        sampler=sampler, pruner=pruner or ("none" if sampler == "nsga2" else "hyperband"), workers=workers,
        storage=storage, study_name=study,
        targets={"mflops": target_mflops, "kparams": target_kparams}, measure_latency=latency,
        max_mflops=max_mflops, max_kparams=max_kparams,
        scale_to_mflops=scale_to_mflops, final_epochs=final_epochs, seed=seed,
    )
    if data is not None and not data.is_dir():
        raise SaofuError(f"dataset folder not found: {data}")
    with _progress_to_stderr(as_json):
        result = _run_flow(search_flow, params)
    retrain = result.retrain
    _emit(result.model_dump(), as_json, (
        f"\nstudy {result.study_name}: {result.trials} trials ({result.finished} finished, {result.pruned} pruned, "
        f"{result.failed} failed)\nbest trial {result.best_trial}: score {result.best_score:.4f}, "
        f"val accuracy {result.best_accuracy:.4f}\n  {result.best_arch} @ {result.best_image_size}px\n"
        f"Pareto front: trials {result.pareto_trials} (plot {result.pareto_plot})\n"
        + (f"retrained and registered {retrain.registered_model} version {retrain.version}\n" if retrain else "")
        + f"browse the study: {result.dashboard_hint}"
    ))


@app.command()
def release(
    model: str = typer.Option("fu-recognizer", "--model", help="Registered model to release."),
    version: str | None = typer.Option(None, "--version", help="Trained version (default: the newest)."),
    labelled: Path | None = typer.Option(
        None, "--labelled", help="Labelled dataset whose newest human labels are the fresh online slice."
    ),
    fresh_n: int = typer.Option(400, "--fresh-n", help="Images in the fresh online slice."),
    prune: float = typer.Option(0.25, "--prune", help="Share of hidden channels to prune (0: none)."),
    fine_tune_epochs: int = typer.Option(3, "--fine-tune-epochs"),
    max_latency_ms: float = typer.Option(1.0, "--max-latency-ms", help="Gate: p95 latency budget (batch 1, 1 thread)."),
    new_class: str | None = typer.Option(None, "--new-class", help="Gate: a class that must reach its recall target."),
    reason: str = typer.Option("release flow", "--reason", help="Recorded with the promotion."),
    serve_url: str | None = typer.Option(None, "--serve-url", help="Wait until this serving app runs the new model."),
    as_json: bool = JsonOpt,
):
    """Compress → evaluate → register → gate → deploy: promote the INT8 artefact if it beats the champion."""
    from flows.release import ReleaseParams, release_flow

    params = ReleaseParams(
        registered_model=model, candidate_version=version, labelled_dir=str(labelled) if labelled else None,
        fresh_n=fresh_n, prune_amount=prune, fine_tune_epochs=fine_tune_epochs, reason=reason, serve_url=serve_url,
        gate={"max_latency_ms": max_latency_ms, "new_class": new_class},
    )
    with _progress_to_stderr(as_json):
        result = _run_flow(release_flow, params)
    verdict = (f"promoted: {model} version {result.challenger_version} is the champion" if result.promoted
               else f"not promoted: the champion stays {result.champion_after}")
    _emit(result.model_dump(), as_json, f"\n{result.variants_table}\n\n{result.gate_table}\n\n{verdict}")


@app.command()
def promote(
    model: str = typer.Argument(..., help="Registered model."),
    version: str = typer.Argument(..., help="Version to make the champion."),
    reason: str = typer.Option(..., "--reason", help="Why (recorded in the promotion history)."),
    as_json: bool = JsonOpt,
):
    """Move the champion alias by hand (recorded, so `saofu rollback` can undo it)."""
    from tasks.release import registry
    from tasks.tracking import configure_mlflow

    configure_mlflow()
    record = registry.promote(model, version, reason)
    _emit(record.model_dump(mode="json"), as_json,
          f"{model}: champion is version {record.version} (was {record.previous or 'none'})")


@app.command()
def rollback(
    model: str = typer.Argument(..., help="Registered model."),
    reason: str = typer.Option("rollback", "--reason"),
    as_json: bool = JsonOpt,
):
    """Restore the previous champion in one step."""
    from tasks.release import registry
    from tasks.tracking import configure_mlflow

    configure_mlflow()
    record = registry.rollback(model, reason)
    _emit(record.model_dump(mode="json"), as_json,
          f"{model}: rolled back to version {record.version} (was {record.previous})")


@app.command()
def serve(
    port: int = typer.Option(8080, "--port", help="TCP port on loopback."),
    model: str = typer.Option("fu-recognizer", "--model", help="Registered model; serves its @champion."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (put a proxy in front to expose it)."),
    canary_share: float = typer.Option(
        0.0, "--canary-share", help="Share of requests the @challenger answers (0: no canary)."
    ),
    canary_min_requests: int = typer.Option(200, "--canary-min-requests", help="Challenger requests before judging."),
    pool: str = typer.Option("default", "--pool", help='Online pool to log requests into; "none" logs nothing.'),
    pool_max_files: int = typer.Option(10_000, "--pool-max-files"),
    poll_seconds: float = typer.Option(5.0, "--poll-seconds", help="How often the registry aliases are checked."),
    threshold: float = typer.Option(0.9, "--threshold", help="Confidence a prediction needs to count."),
    log_level: str = typer.Option("info", "--log-level"),
):
    """Serve models:/<model>@champion over HTTP (POST /predict, /healthz, /metrics), following the alias."""
    from deploy.server import serve as run_server

    run_server(port, model, host=host, canary_share=canary_share, canary_min_requests=canary_min_requests,
               pool_dir=None if pool == "none" else pool, pool_max_files=pool_max_files, poll_seconds=poll_seconds,
               threshold=threshold, log_level=log_level)


# ---------------------------------------------------------------- steps (dvc.yaml)
@step_app.command("train")
def step_train(
    data: Path = typer.Option(..., "--data"),
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoint.pt, history.csv."),
    model: str = typer.Option("saofu_fu", "--model"),
    epochs: int = typer.Option(TrainConfig.epochs, "--epochs"),
    batch_size: int = typer.Option(TrainConfig.batch_size, "--batch-size"),
    lr: float = typer.Option(TrainConfig.lr, "--lr"),
    image_size: int = typer.Option(64, "--image-size"),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint.pt if it exists."),
    as_json: bool = JsonOpt,
):
    """Train only (no MLflow): the offline `dvc repro` step; data-parallel when run under torchrun."""
    from tasks.train import distributed
    from tasks.train.steps import train_recognizer

    cfg = TrainConfig(model=model, epochs=epochs, batch_size=batch_size, lr=lr, image_size=image_size, seed=seed)
    with _progress_to_stderr(as_json):
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
    _emit(outcome.__dict__, as_json, f"val accuracy {outcome.val_accuracy:.4f}; checkpoint {outcome.checkpoint}")


@step_app.command("export")
def step_export(
    checkpoint: Path = typer.Option(..., "--checkpoint"),
    out: Path = typer.Option(..., "--out", help="Output .onnx file."),
    data: Path | None = typer.Option(None, "--data", help="Images for the parity check."),
    as_json: bool = JsonOpt,
):
    """Export a checkpoint to ONNX and check parity with PyTorch."""
    from tasks.train.steps import export_recognizer

    with _progress_to_stderr(as_json):
        outcome = export_recognizer.fn(str(checkpoint), str(out), str(data) if data else None)
    _emit(outcome.__dict__, as_json, f"wrote {outcome.onnx_path} (parity {outcome.parity_max_abs_diff:.2e})")


@step_app.command("evaluate")
def step_evaluate(
    model: Path = typer.Option(..., "--model", help="ONNX file."),
    data: Path = typer.Option(..., "--data"),
    out: Path = typer.Option(..., "--out", help="Report JSON."),
    image_size: int = typer.Option(64, "--image-size"),
    threshold: float = typer.Option(0.9, "--threshold"),
    negative_class: str | None = typer.Option(None, "--negative-class"),
    as_json: bool = JsonOpt,
):
    """Evaluate an ONNX graph: accuracy at threshold, per-class precision/recall, latency."""
    from tasks.train.steps import evaluate_recognizer

    with _progress_to_stderr(as_json):
        report = evaluate_recognizer.fn(str(model), str(data), str(out), image_size, threshold, negative_class)
    _emit(report, as_json, f"accuracy at {threshold}: {report['accuracy_at_threshold']:.4f} (report {out})")


# ---------------------------------------------------------------- services
@up_app.command("labeling")
def up_labeling(
    port: int = typer.Option(8080, "--port"),
    files_root: Path | None = typer.Option(
        None, "--files-root", help="Images under this folder can be shown to labelers (default: SAOFU_HOME)."
    ),
    as_json: bool = JsonOpt,
):
    """Install Label Studio in its own venv if missing, start it on loopback, print URL and login."""
    from services import labeling as service

    with _progress_to_stderr(as_json):
        service.ensure_installed()
        handle = service.start(port=port, files_root=files_root)
    info = {"url": handle.url, "username": handle.username, "password": handle.password,
            "token": handle.token, "pid": handle.pid, "log": str(handle.log_path)}
    _emit(info, as_json, (
        f"Label Studio is up: {handle.url}\n  login: {handle.username} / {handle.password}\n"
        f"  API token: {handle.token}\n  log: {handle.log_path}\nstop it with: saofu down labeling"
    ))


@down_app.command("labeling")
def down_labeling(as_json: bool = JsonOpt):
    """Stop the Label Studio server started by `saofu up labeling`."""
    from services import labeling as service

    stopped = service.stop()
    _emit({"stopped": stopped}, as_json, "Label Studio stopped" if stopped else "Label Studio was not running")


@up_app.command("postgres")
def up_postgres(
    port: int = typer.Option(5433, "--port"),
    as_json: bool = JsonOpt,
):
    """Start a local PostgreSQL on loopback for multi-worker search (`saofu search --storage URL`)."""
    from services import postgres as postgres_service

    with _progress_to_stderr(as_json):
        handle = postgres_service.start_postgres(port=port)
    _emit({"url": handle.url, "port": handle.port, "pid": handle.pid, "log": str(handle.log_path)}, as_json, (
        f"PostgreSQL is up: {handle.url}\n  log: {handle.log_path}\n"
        f"search with it: saofu search --workers 2 --storage {handle.url}\nstop it with: saofu down postgres"
    ))


@down_app.command("postgres")
def down_postgres(as_json: bool = JsonOpt):
    """Stop the PostgreSQL server started by `saofu up postgres`."""
    from services import postgres as postgres_service

    stopped = postgres_service.stop_postgres()
    _emit({"stopped": stopped}, as_json, "PostgreSQL stopped" if stopped else "PostgreSQL was not running")


# ---------------------------------------------------------------- bench
@bench_app.command("models")
def bench_models(
    n: int = typer.Option(WorldConfig.n, "--n", help="Images in the generated Fu world."),
    epochs: int = typer.Option(TrainConfig.epochs, "--epochs", help="Training budget, the same for every model."),
    data: Path | None = typer.Option(None, "--data", help="Use this ImageFolder dataset instead."),
    out: Path = typer.Option(Path("bench/results/models.json"), "--out"),
    as_json: bool = JsonOpt,
):
    """saofu's default architecture vs torchvision baselines, same data, same budget."""
    from bench.models import run_models_bench

    with _progress_to_stderr(as_json):
        result = run_models_bench(n=n, epochs=epochs, data_dir=data, out=out)
    _emit(result["summary"], as_json, result["table"])


@bench_app.command("labeling")
def bench_labeling(
    n_seed: int = typer.Option(1200, "--n-seed", help="Labelled seed set the two models train on."),
    n_pool: int = typer.Option(2400, "--n-pool", help="Unlabelled pool (with known truth) to label."),
    epochs: int = typer.Option(14, "--epochs"),
    model_a: str = typer.Option("saofu_fu", "--model-a", help="The champion: its top class is the auto-label."),
    model_b: str = typer.Option("mobilenet_v2_035", "--model-b", help="The second model, another architecture."),
    thresholds: list[float] = typer.Option([0.8, 0.9, 0.95, 0.98], "--threshold", help="Repeat for several."),
    sweep: bool = typer.Option(
        False, "--sweep", help="Retrain every strategy at every threshold: human labels needed within 1 point."
    ),
    retrain: bool = typer.Option(
        True, "--retrain/--no-retrain", help="Retrain on the auto-labels against a human-labelled reference."
    ),
    out: Path = typer.Option(Path("bench/results/labeling.json"), "--out"),
    as_json: bool = JsonOpt,
):
    """Dual-model agreement (plain and with TTA) vs single-model confidence vs random, per threshold."""
    from bench.labeling import run_labeling_bench
    from models import list_models

    for name in (model_a, model_b):
        if name not in list_models():
            raise SaofuError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    with _progress_to_stderr(as_json):
        result = run_labeling_bench(n_seed=n_seed, n_pool=n_pool, epochs=epochs, out=out, thresholds=thresholds,
                                    model_a=model_a, model_b=model_b, sweep=sweep,
                                    **({} if retrain or sweep else {"retrain": ()}))
    _emit(result["summary"], as_json, result["table"])


@bench_app.command("search")
def bench_search(
    n: int = typer.Option(WorldConfig.n, "--n", help="Images in the generated Fu world."),
    budget_min: float = typer.Option(12.0, "--budget-min", help="Wall-clock budget of each of the three studies."),
    trial_epochs: int = typer.Option(9, "--trial-epochs", help="Epochs of an unpruned trial (9: rungs 1, 3, 9)."),
    final_epochs: int = typer.Option(TrainConfig.epochs, "--final-epochs", help="Epochs of the final comparison."),
    seed: int = typer.Option(0, "--seed", help="Worlds' and samplers' seed: another seed is another draw."),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines",
                                   help="Train the torchvision baselines too (the size comparison)."),
    out: Path = typer.Option(Path("bench/results/search.json"), "--out"),
    as_json: bool = JsonOpt,
):
    """Hyperband vs no pruning vs random at equal compute; the searched model vs the baselines."""
    from bench.models import BENCH_MODELS
    from bench.search import run_search_bench

    with _progress_to_stderr(as_json):
        result = run_search_bench(n=n, budget_min=budget_min, trial_epochs=trial_epochs, final_epochs=final_epochs,
                                  seed=seed, out=out, baselines=BENCH_MODELS if baselines else ())
    _emit(result["summary"], as_json, result["table"])


@bench_app.command("search-seeds")
def bench_search_seeds(
    results: list[Path] = typer.Argument(..., help="JSON files of `saofu bench search` runs, one seed each."),
    out: Path = typer.Option(Path("bench/results/search_pruning.json"), "--out"),
    as_json: bool = JsonOpt,
):
    """The pruning comparison of several `bench search` draws side by side (median share, plot)."""
    from bench.search_seeds import run_search_seeds

    result = run_search_seeds(results, out)
    _emit(result["summary"], as_json, result["table"])


@bench_app.command("release")
def bench_release(
    n: int = typer.Option(WorldConfig.n, "--n", help="Images in the generated Fu world."),
    epochs: int = typer.Option(TrainConfig.epochs, "--epochs", help="Training epochs of the float model."),
    fresh_n: int = typer.Option(1000, "--fresh-n", help="Images in the simulated fresh online slice."),
    serving: bool = typer.Option(True, "--serving/--no-serving", help="Also the app vs `mlflow models serve`."),
    seconds: float = typer.Option(10.0, "--seconds", help="Measured seconds per serving point."),
    out: Path = typer.Option(Path("bench/results/release.json"), "--out"),
    as_json: bool = JsonOpt,
):
    """FP32 vs INT8 vs pruned+INT8; the serving app vs `mlflow models serve` at 1 and 16 clients."""
    from bench.release import run_release_bench

    with _progress_to_stderr(as_json):
        result = run_release_bench(n=n, epochs=epochs, fresh_n=fresh_n, out=out, serving=serving,
                                   serving_seconds=seconds)
    _emit(result["summary"], as_json, result["table"])


def main() -> None:
    """Entry point: one clear line for bad input, never a traceback."""
    # No machine here reaches the internet: don't let the ephemeral Prefect server try to.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        app(standalone_mode=False)
    except SaofuError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click usage errors and pydantic validation of flow parameters
        import click
        import pydantic

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, pydantic.ValidationError):
            errs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            print(f"error: invalid parameters: {errs}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
