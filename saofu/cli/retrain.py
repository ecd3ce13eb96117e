"""`saofu fast-retrain`: add or correct a class of the serving model in one flow run."""

from __future__ import annotations

import typer

from saofu.cli.common import JsonOpt, emit, progress_to_stderr, run_flow

app = typer.Typer()


@app.command("fast-retrain")
def fast_retrain(
    add: list[str] = typer.Option([], "--add", help="A new class (repeat for several)."),
    refines: list[str] = typer.Option(
        [], "--refines", help="The class a new class refines, one per --add in the same order ('' for none)."),
    change: list[str] = typer.Option([], "--change", help="A class of the model whose labels were corrected."),
    labels: str = typer.Option(..., "--labels", help="A Label Studio project title, or an ImageFolder folder."),
    model: str = typer.Option("fu-recognizer", "--model", help="Registered model."),
    base_version: str = typer.Option("", "--base-version", help="Version to start from (default: the champion)."),
    dataset: str = typer.Option("", "--dataset", help="Labelled dataset the labels join "
                                                      "(default: the base model's training data)."),
    budget_min: float = typer.Option(1.0, "--budget-min", help="Minutes for the fine-tune."),
    replay_share: float = typer.Option(0.5, "--replay-share", help="Share of each epoch from the other classes."),
    new_class_recall: float = typer.Option(0.95, "--new-class-recall", help="Gate: each new class's recall target."),
    max_old_drop: float = typer.Option(0.5, "--max-old-drop-pts", help="Gate: largest old-class recall drop, points."),
    parent_gate: float = typer.Option(0.99, "--parent-gate", help="Answer a new class only where the base model "
                                      "is not this sure of a class other than its --refines parent (0: off)."),
    canary_share: float = typer.Option(0.0, "--canary-share", help="Promote through the serving app's canary."),
    serve_url: str = typer.Option("", "--serve-url", help="Wait until this serving app answers with the new version."),
    as_json: bool = JsonOpt,
):
    """Ingest labels → fine-tune → release (gate, canary) → served: one flow run."""
    from flows.fast_retrain import ClassChange, FastRetrainParams, fast_retrain_flow, step_table
    from saofu.errors import SaofuError

    if not add and not change:
        raise SaofuError("name the change: --add NEW_CLASS [--refines PARENT] and/or --change CLASS")
    if len(refines) > len(add):
        raise SaofuError(f"{len(refines)} --refines for {len(add)} --add: give one --refines per --add, in order")
    parents = list(refines) + [""] * (len(add) - len(refines))
    changes = [ClassChange(name=n, kind="new", refines=p) for n, p in zip(add, parents)]
    changes += [ClassChange(name=n, kind="changed") for n in change]
    params = FastRetrainParams(
        registered_model=model, changes=changes, labels=labels, dataset_dir=dataset, base_version=base_version,
        budget_min=budget_min, replay_share=replay_share, new_class_recall=new_class_recall,
        max_old_class_drop_pts=max_old_drop, parent_gate=parent_gate, canary_share=canary_share, serve_url=serve_url,
    )
    with progress_to_stderr(as_json):
        result = run_flow(fast_retrain_flow, params)
    changed = f"{result.changes_table}\n" if result.changes_table else ""
    emit(result.model_dump(), as_json, f"\n{result.gate_table}\n\n{changed}{step_table(result)}")
