"""`saofu bench ...`: benchmarks that print tables side by side with their peers."""

from __future__ import annotations

from pathlib import Path

import typer

from bench.fast_retrain import BUDGET_MIN as FAST_RETRAIN_BUDGET_MIN
from bench.fast_retrain import PARENT_GATE as FAST_RETRAIN_PARENT_GATE
from bench.fast_retrain import SEEDS as FAST_RETRAIN_SEEDS
from bench.held_out_world import HELD_OUT_N
from saofu.cli.common import JsonOpt, emit, progress_to_stderr
from saofu.errors import SaofuError
from tasks.data.fu_world import WorldConfig
from tasks.train.config import TrainConfig

app = typer.Typer(no_args_is_help=True, help="Benchmarks (tables side by side with their peers).")


@app.command("models")
def bench_models(
    n: int = typer.Option(WorldConfig.n, "--n", help="Images in the generated Fu world."),
    epochs: int = typer.Option(TrainConfig.epochs, "--epochs", help="Training budget, the same for every model."),
    data: Path | None = typer.Option(None, "--data", help="Use this ImageFolder dataset instead."),
    out: Path = typer.Option(Path("bench/results/models.json"), "--out"),
    as_json: bool = JsonOpt,
):
    """saofu's default architecture vs torchvision baselines, same data, same budget."""
    from bench.models import run_models_bench

    with progress_to_stderr(as_json):
        result = run_models_bench(n=n, epochs=epochs, data_dir=data, out=out)
    emit(result["summary"], as_json, result["table"])


@app.command("labeling")
def bench_labeling(
    n_seed: int = typer.Option(1200, "--n-seed", help="Labelled seed set the two models train on."),
    n_pool: int = typer.Option(2400, "--n-pool", help="Unlabelled pool (with known truth) to label."),
    epochs: int = typer.Option(14, "--epochs"),
    model_a: str = typer.Option("saofu_fu", "--model-a", help="The champion: its top class is the auto-label."),
    model_b: str = typer.Option("mobilenet_v2_035", "--model-b", help="The second model, another architecture."),
    thresholds: list[float] = typer.Option([0.8, 0.9, 0.95, 0.98], "--threshold", help="Repeat for several."),
    seeds: list[int] = typer.Option(
        [0, 1, 2], "--seed", help="One draw per seed (repeat): its worlds, trainings and random control."
    ),
    n_val: int = typer.Option(
        0, "--n-val", help="Labelled images added to the held-out slice (calibration, target-precision threshold)."
    ),
    sweep: bool = typer.Option(
        False, "--sweep", help="Retrain every strategy at every threshold: human labels needed within 1 point."
    ),
    retrain: bool = typer.Option(
        True, "--retrain/--no-retrain",
        help="Retrain on the first draw's auto-labels against a human-labelled reference.",
    ),
    out: Path = typer.Option(Path("bench/results/labeling.json"), "--out"),
    as_json: bool = JsonOpt,
):
    """Auto-labelling strategies (dual agreement plain, with TTA, calibrated, for a target precision; single
    confidence; random) over several draws: median and worst draw per strategy, ECE per model."""
    from bench.labeling import run_labeling_bench
    from models import list_models

    for name in (model_a, model_b):
        if name not in list_models():
            raise SaofuError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    with progress_to_stderr(as_json):
        result = run_labeling_bench(n_seed=n_seed, n_pool=n_pool, epochs=epochs, seeds=seeds, n_val=n_val, out=out,
                                    thresholds=thresholds, model_a=model_a, model_b=model_b, sweep=sweep,
                                    **({} if retrain or sweep else {"retrain": ()}))
    emit(result["summary"], as_json, result["table"])


@app.command("search")
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

    with progress_to_stderr(as_json):
        result = run_search_bench(n=n, budget_min=budget_min, trial_epochs=trial_epochs, final_epochs=final_epochs,
                                  seed=seed, out=out, baselines=BENCH_MODELS if baselines else ())
    emit(result["summary"], as_json, result["table"])


@app.command("search-seeds")
def bench_search_seeds(
    results: list[Path] = typer.Argument(..., help="JSON files of `saofu bench search` runs, one seed each."),
    out: Path = typer.Option(Path("bench/results/search_pruning.json"), "--out"),
    as_json: bool = JsonOpt,
):
    """The pruning comparison of several `bench search` draws side by side (median share, plot)."""
    from bench.search_seeds import run_search_seeds

    result = run_search_seeds(results, out)
    emit(result["summary"], as_json, result["table"])


@app.command("release")
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

    with progress_to_stderr(as_json):
        result = run_release_bench(n=n, epochs=epochs, fresh_n=fresh_n, out=out, serving=serving,
                                   serving_seconds=seconds)
    emit(result["summary"], as_json, result["table"])


@app.command("fast-retrain")
def bench_fast_retrain(
    n: int = typer.Option(17000, "--n", help="Images in the generated Fu world with merchants (its held-out-font "
                                             "test split is in the regression set: 17000 gives 2040 old-class ones)."),
    held_out_n: int = typer.Option(HELD_OUT_N, "--held-out-n", min=0,
                                   help="Images of a second world drawn in the held-out fonts, judged on beside "
                                        "the test split (12000: 9408 old-class, 2352 merchant); 0: none."),
    budget_min: float = typer.Option(FAST_RETRAIN_BUDGET_MIN, "--budget-min",
                                     help="The fast retrain's budget (the flow's default)."),
    seeds: list[int] = typer.Option(list(FAST_RETRAIN_SEEDS), "--seed",
                                    help="One fast-retrain draw per seed (repeat)."),
    epochs: int = typer.Option(TrainConfig.epochs, "--epochs", help="Epochs of the champion and of the full retrain."),
    full_retrain_draws: int = typer.Option(3, "--full-retrain-draws", min=0,
                                           help="Naive-peer draws (seeds 0, 1, ...; median compared); 0: none."),
    image_size: int = typer.Option(TrainConfig.image_size, "--image-size", min=16, max=512,
                                   help="Side of the world's images and the models' input, in pixels."),
    parent_gate: float = typer.Option(FAST_RETRAIN_PARENT_GATE, "--parent-gate", min=0.0, max=1.0,
                                      help="Gate fu_merchant by its parent in the fast retrain and the ablation "
                                           "(the flow's parent_gate; 0: off)."),
    home: Path = typer.Option(Path("bench/work/fast_retrain"), "--home",
                              help="The bench's folder: new, empty or an earlier run's (it is emptied first; `bench "
                                   "click-path` and `bench retrain-churn` read the default one)."),
    out: Path = typer.Option(Path("bench/results/fast_retrain.json"), "--out"),
    as_json: bool = JsonOpt,
):
    """Fast retrain (one flow run, labels in Label Studio -> served) vs full retrain vs no replay."""
    from bench.fast_retrain import run_fast_retrain_bench

    with progress_to_stderr(as_json):
        result = run_fast_retrain_bench(world_n=n, budget_min=budget_min, seeds=tuple(seeds), epochs=epochs,
                                        full_retrain_draws=full_retrain_draws, out=out, held_out_n=held_out_n,
                                        image_size=image_size, home=home, parent_gate=parent_gate)
    emit({k: v for k, v in result.items() if k != "table"}, as_json, result["table"])


@app.command("train-layout")
def bench_train_layout(
    seeds: list[int] = typer.Option([0, 1, 2, 3, 4], "--seed", help="One draw per seed (repeat)."),
    out: Path = typer.Option(Path("bench/results/train_layout.json"), "--out"),
    as_json: bool = JsonOpt,
):
    """Training images/s with NCHW weights beside channels-last (what `loop.place` uses on the CPU)."""
    from bench.train_layout import run

    with progress_to_stderr(as_json):
        result = run(seeds=tuple(seeds), out=out)
    emit({k: v for k, v in result.items() if k != "table"}, as_json, result["table"])


@app.command("inference-batch")
def bench_inference_batch(
    seeds: list[int] = typer.Option([0, 1, 2], "--seed", help="One draw per seed (repeat)."),
    out: Path = typer.Option(Path("bench/results/inference_batch.json"), "--out"),
    as_json: bool = JsonOpt,
):
    """Whole-split inference images/s by batch size (what `loop.inference_batch` uses on the CPU)."""
    from bench.inference_batch import run

    with progress_to_stderr(as_json):
        result = run(seeds=tuple(seeds), out=out)
    emit({k: v for k, v in result.items() if k != "table"}, as_json, result["table"])


@app.command("retrain-churn")
def bench_retrain_churn(
    seeds: list[int] = typer.Option([1, 2], "--seed", help="One champion trained alike per seed (repeat)."),
    out: Path = typer.Option(Path("bench/results/retrain_churn.json"), "--out"),
    as_json: bool = JsonOpt,
):
    """How far the same model trained and released again moves the old classes (after `bench fast-retrain`)."""
    from bench.retrain_churn import run_retrain_churn_bench

    with progress_to_stderr(as_json):
        result = run_retrain_churn_bench(seeds=tuple(seeds), out=out)
    emit({k: v for k, v in result.items() if k != "table"}, as_json, result["table"])


@app.command("ingest-scale")
def bench_ingest_scale(
    copies: list[int] = typer.Option([1, 2, 4], "--copies", help="Dataset sizes, as copies of the world's (repeat)."),
    draws: int = typer.Option(3, "--draws", help="Draws per size (interleaved)."),
    out: Path = typer.Option(Path("bench/results/ingest_scale.json"), "--out"),
    as_json: bool = JsonOpt,
):
    """The fast retrain's ingest (suite and data version) into datasets 1, 2 and 4 times the world's."""
    from bench.ingest_scale import run

    with progress_to_stderr(as_json):
        result = run(copies, draws, Path("bench/work/ingest_scale").resolve(), out)
    emit({k: v for k, v in result.items() if k != "table"}, as_json, result["table"])


@app.command("click-path")
def bench_click_path(
    draws: int = typer.Option(3, "--draws", help="Draws of each way (alternating which goes first)."),
    out: Path = typer.Option(Path("bench/results/click_path.json"), "--out"),
    as_json: bool = JsonOpt,
):
    """After `bench fast-retrain`: the fast retrain clicked in the Prefect UI vs called in-process, to served."""
    from bench.click_path import run

    with progress_to_stderr(as_json):
        result = run(draws, out=out)
    emit({k: v for k, v in result.items() if k != "table"}, as_json, result["table"])


@app.command("prefect-db")
def bench_prefect_db(
    draws: int = typer.Option(3, "--draws", help="Fresh servers per database (alternating)."),
    subflows: int = typer.Option(150, "--subflows", help="Subflows each client's flow run calls."),
    clients: list[int] = typer.Option([1, 3], "--clients", help="Concurrent clients of a load (repeat)."),
    out: Path = typer.Option(Path("bench/results/prefect_db.json"), "--out"),
    as_json: bool = JsonOpt,
):
    """The Prefect server on SQLite vs on PostgreSQL: how often a run's orchestration stalls."""
    from bench.prefect_db import run_prefect_db_bench

    with progress_to_stderr(as_json):
        result = run_prefect_db_bench(draws=draws, subflows=subflows, client_counts=tuple(clients), out=out)
    emit({k: v for k, v in result.items() if k not in ("table", "runs")}, as_json, result["table"])


@app.command("reliability")
def bench_reliability(
    requests: int = typer.Option(20_000, "--requests", help="Requests sent to the serving app under model swaps."),
    swaps: int = typer.Option(6, "--swaps", help="Champion alias moves during the load (plus one canary rollback)."),
    clients: int = typer.Option(16, "--clients", help="Concurrent clients of the load."),
    out: Path = typer.Option(Path("bench/results/reliability.json"), "--out"),
    as_json: bool = JsonOpt,
):
    """Bad input, injected faults, secrets and load under swaps: what broke, what was lost, what leaked."""
    from bench.reliability.run import run_reliability_bench

    with progress_to_stderr(as_json):
        result = run_reliability_bench(requests=requests, swaps=swaps, clients=clients, out=out)
    emit({k: v for k, v in result.items() if k not in ("table", "sections")}, as_json, result["table"])
