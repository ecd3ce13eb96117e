"""`saofu labels ...`: take auto-labels back (`revert`) and put a data version back (`restore`)."""

from __future__ import annotations

from pathlib import Path

import typer

from saofu.cli.common import JsonOpt, emit, progress_to_stderr, run_flow

app = typer.Typer(no_args_is_help=True, help="Take auto-labels back from a labelled dataset.")


@app.command("revert")
def labels_revert(
    by_model: str = typer.Option(..., "--by-model", help="NAME:VERSION whose auto-labels go, e.g. fu-recognizer:3."),
    dataset: Path = typer.Option(..., "--dataset", help="The labelled dataset folder (tree + manifest.csv)."),
    name: str = typer.Option("", "--name", help="Name of the dataset's data versions; empty: derived."),
    message: str = typer.Option("", "--message", help="Why, recorded in the new data version."),
    as_json: bool = JsonOpt,
):
    """Remove every auto-label a model version voted for, as a new data version (human labels stay)."""
    from flows.labels_revert import LabelsRevertParams, labels_revert_flow

    params = LabelsRevertParams(model_version=by_model, dataset_dir=str(dataset), dataset_name=name,
                                message=message)
    with progress_to_stderr(as_json):
        result = run_flow(labels_revert_flow, params)
    summary = result.model_dump()
    if result.removed:
        summary["undo"] = f"saofu labels restore {result.version_before} --dataset {dataset}"
    emit(summary, as_json, _told(result, dataset))


def _told(result, dataset: Path) -> str:
    if result.skipped:
        return f"skipped: {result.skipped}"
    if not result.removed:
        return f"no auto-label of {result.model_version} in {dataset}: nothing reverted, no new data version"
    per_class = ", ".join(f"{label} {n}" for label, n in result.per_class.items())
    return (f"removed {result.removed} auto-labels of {result.model_version} ({per_class}); "
            f"{result.kept} rows kept\n"
            f"data version {result.version_before} -> {result.version_after}\n"
            f"undo: saofu labels restore {result.version_before} --dataset {dataset}")


@app.command("restore")
def labels_restore(
    version: str = typer.Argument(..., help="A data version from `saofu data versions`, e.g. fu@v3."),
    dataset: Path = typer.Option(..., "--dataset", help="The dataset folder to put it back in place of."),
    force: bool = typer.Option(False, "--force", help="Also when the dataset holds changes in no data version."),
    as_json: bool = JsonOpt,
):
    """Put a data version back in place of the dataset (e.g. undo a revert)."""
    from tasks.labeling.revert import restore_version

    with progress_to_stderr(as_json):
        restored = restore_version(dataset, version, force=force)
    emit({"version": restored.id, "dataset_dir": str(dataset)}, as_json, f"restored {restored.id} into {dataset}")
