"""`saofu search`: architecture and hyper-parameter search (Optuna), then retrain the best."""

from __future__ import annotations

from pathlib import Path

import typer

from saofu.cli.common import JsonOpt, emit, progress_to_stderr, run_flow
from saofu.errors import SaofuError
from tasks.data.fu_world import WorldConfig

app = typer.Typer()


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
        None, "--storage", help="Optuna storage URL (default SQLite under the project; postgresql://... for workers). "
        "A password in it is moved to .saofu/search/pgpass (0600) and never stored with the run."
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
    from tasks.search.passwords import remember_password

    if storage:
        # the flow run's parameters, MLflow and the workers' job file get the URL without it
        storage = remember_password(storage)
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
    with progress_to_stderr(as_json):
        result = run_flow(search_flow, params)
    retrain = result.retrain
    emit(result.model_dump(), as_json, (
        f"\nstudy {result.study_name}: {result.trials} trials ({result.finished} finished, {result.pruned} pruned, "
        f"{result.failed} failed)\nbest trial {result.best_trial}: score {result.best_score:.4f}, "
        f"val accuracy {result.best_accuracy:.4f}\n  {result.best_arch} @ {result.best_image_size}px\n"
        f"Pareto front: trials {result.pareto_trials} (plot {result.pareto_plot})\n"
        + (f"retrained and registered {retrain.registered_model} version {retrain.version}\n" if retrain else "")
        + f"browse the study: {result.dashboard_hint}"
    ))
