"""`saofu ingest` and `saofu active-learning`: human labels in, auto-labels out."""

from __future__ import annotations

from pathlib import Path

import typer

from saofu.cli.common import JsonOpt, emit, progress_to_stderr, run_flow

app = typer.Typer()


@app.command()
def ingest(
    dataset: Path = typer.Option(..., "--dataset", help="The labelled dataset folder (tree + manifest.csv)."),
    project: str = typer.Option("fu-recognizer", "--project", help="Label Studio project title."),
    name: str = typer.Option("fu", "--name", help="Name of the dataset's data versions."),
    classes: str | None = typer.Option(None, "--classes", help="Comma-separated class set."),
    revert_below: float = typer.Option(0.0, "--revert-below-precision", help="E.g. 0.995: take back the "
                                       "auto-labels of a model version its spot checks show below this."),
    as_json: bool = JsonOpt,
):
    """Ingest completed Label Studio annotations: validate, add to the dataset, version it."""
    from flows.ingest import IngestParams, ingest_flow

    params = IngestParams(project=project, dataset_dir=str(dataset), dataset_name=name,
                          classes=classes.split(",") if classes else None, revert_below_precision=revert_below)
    with progress_to_stderr(as_json):
        result = run_flow(ingest_flow, params)
    emit(result.model_dump(), as_json,
         f"skipped: {result.skipped}" if result.skipped else
         f"added {result.added} human labels ({len(result.ties)} ties left out); "
         f"data version {result.data_version}"
         + (f"; auto-labels of {', '.join(result.reverted)} taken back" if result.reverted else ""))


@app.command("active-learning")
def active_learning(
    pool: Path = typer.Option(..., "--pool", help="The online pool folder (index.jsonl + images)."),
    dataset: Path = typer.Option(..., "--dataset", help="The labelled dataset that auto-labels go into."),
    registered_model: str = typer.Option("fu-recognizer", "--registered-model", help="Its @champion predicts."),
    second: str | None = typer.Option(None, "--second", help="Second model: NAME, NAME@alias or NAME/3."),
    threshold: float = typer.Option(0.95, "--threshold", help="Confidence BOTH models must reach (calibrated)."),
    tta: bool = typer.Option(True, "--tta/--no-tta", help="The champion votes over 5 shifted/zoomed views."),
    second_tta: bool = typer.Option(True, "--second-tta/--no-second-tta",
                                    help="The second model votes over the same views too."),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate",
                                   help="Temperature-scale both models on the dataset's val split before voting."),
    target_precision: float = typer.Option(
        0.0, "--target-precision", help="E.g. 0.995: find the threshold for this precision on the val split "
        "(replaces --threshold); 0: use --threshold."),
    project: str = typer.Option("fu-recognizer", "--project", help="Label Studio project for the rest."),
    badcases: Path | None = typer.Option(None, "--badcases", help="A badcases.json to send to labelers too."),
    as_json: bool = JsonOpt,
):
    """Auto-label what two models agree on confidently; send the rest to Label Studio."""
    from flows.active_learning import ActiveLearningParams, active_learning_flow

    params = ActiveLearningParams(
        pool_dir=str(pool), dataset_dir=str(dataset), registered_model=registered_model, second_model=second,
        threshold=threshold, champion_tta=tta, second_tta=second_tta, calibrate=calibrate,
        target_precision=target_precision,
        project=project, include_badcases=badcases is not None,
        badcase_file=str(badcases) if badcases else None,
    )
    with progress_to_stderr(as_json):
        result = run_flow(active_learning_flow, params)
    emit(result.model_dump(), as_json,
         f"skipped: {result.skipped}" if result.skipped else
         f"{result.new_images} new images: {result.auto} auto-labelled at threshold {result.threshold_used:.4f}, "
         f"{result.human} to Label Studio, {result.badcases} badcases sent"
         + (f"; {result.calibration_note}" if result.calibration_note else ""))
