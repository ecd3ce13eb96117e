"""`saofu release`, `saofu promote`, `saofu rollback`: the champion alias and how it moves."""

from __future__ import annotations

from pathlib import Path

import typer

from saofu.cli.common import JsonOpt, emit, progress_to_stderr, run_flow

app = typer.Typer()


@app.command()
def release(
    model: str = typer.Option("fu-recognizer", "--model", help="Registered model to release."),
    version: str | None = typer.Option(None, "--version", help="Trained version (default: the newest)."),
    labelled: Path | None = typer.Option(
        None, "--labelled",
        help="Fresh slice: an ImageFolder of recent labelled images (a labelled dataset: its newest human labels). "
             "Default: the training data's held-out human labels, simulated scans (Fu models), else its held-out "
             "split.",
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
    """Compress → evaluate → register → gate → deploy: promote the fastest artefact if it beats the champion."""
    from flows.release import ReleaseParams, release_flow

    params = ReleaseParams(
        registered_model=model, candidate_version=version, labelled_dir=str(labelled) if labelled else None,
        fresh_n=fresh_n, prune_amount=prune, fine_tune_epochs=fine_tune_epochs, reason=reason, serve_url=serve_url,
        gate={"max_latency_ms": max_latency_ms, "new_class": new_class},
    )
    with progress_to_stderr(as_json):
        result = run_flow(release_flow, params)
    verdict = (f"promoted: {model} version {result.challenger_version} is the champion" if result.promoted
               else f"not promoted: the champion stays {result.champion_after}")
    changed = f"{result.changes_table}\n" if result.changes_table else ""
    emit(result.model_dump(), as_json, f"\n{result.variants_table}\n\n{result.gate_table}\n\n{changed}{verdict}")


@app.command()
def promote(
    model: str = typer.Argument(..., help="Registered model."),
    version: str = typer.Argument(..., help="Version to make the champion."),
    reason: str = typer.Option(..., "--reason", help="Why (recorded in the promotion history)."),
    as_json: bool = JsonOpt,
):
    """Move the champion alias by hand (recorded, so `saofu rollback` can undo it)."""
    from tasks.release import registry

    record = registry.promote(model, version, reason)
    emit(record.model_dump(mode="json"), as_json,
         f"{model}: champion is version {record.version} (was {record.previous or 'none'})")


@app.command()
def rollback(
    model: str = typer.Argument(..., help="Registered model."),
    reason: str = typer.Option("rollback", "--reason"),
    as_json: bool = JsonOpt,
):
    """Restore the previous champion in one step."""
    from tasks.release import registry

    record = registry.rollback(model, reason)
    emit(record.model_dump(mode="json"), as_json,
         f"{model}: rolled back to version {record.version} (was {record.previous})")


@app.command()
def history(
    model: str = typer.Argument(..., help="Registered model."),
    as_json: bool = JsonOpt,
):
    """Every change of champion, oldest first: promotions, rollbacks, and moves made by hand in the MLflow UI."""
    from tasks.release import registry

    records = registry.promotion_history(model)
    lines = [f"{'#':>3}  {'when (UTC)':<19}  {'action':<8}  {'champion':>8}  {'was':>5}  reason"]
    for r in records:
        lines.append(f"{r.seq:>3}  {r.time.strftime('%Y-%m-%d %H:%M:%S'):<19}  {r.action:<8}  {'v' + r.version:>8}  "
                     f"{'v' + r.previous if r.previous else '-':>5}  {r.reason}")
    emit({"model": model, "history": [r.model_dump(mode="json", exclude={"gate_report"}) for r in records]}, as_json,
         "\n".join(lines) if records else f"{model}: no champion has been promoted yet")
