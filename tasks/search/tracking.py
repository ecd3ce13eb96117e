"""Search trials as nested MLflow runs under the study's run.

Each trial run holds the architecture string, resolution and hyper-parameters as parameters (enough
to rebuild it), the per-epoch validation accuracy and score, and at the end the accuracy, FLOPs,
parameters, latency (when measured), epochs trained and whether it was pruned.
"""

from __future__ import annotations

from dataclasses import asdict

import optuna

from tasks import tracking
from tasks.search.objective import TrialCosts, TrialHooks, TrialOutcome
from tasks.search.space import TrialPlan


def mlflow_trial_hooks(experiment: str, parent_run_id: str | None, study_name: str) -> TrialHooks:
    """Hooks that track every trial as an MLflow run nested under `parent_run_id`."""
    runs: dict[int, str] = {}

    def on_start(trial: optuna.Trial, plan: TrialPlan, costs: TrialCosts) -> None:
        # A retry carries its failed predecessor's attributes: close that run, which its dead
        # worker left RUNNING.
        previous = trial.user_attrs.get("mlflow_run_id")
        if previous:
            tracking.finish_run(previous, "KILLED")
        tags = {"study": study_name, "optuna_trial": str(trial.number), "worker": trial.user_attrs.get("worker", "")}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run_id = tracking.start_run(experiment, f"{study_name}-trial-{trial.number}",
                                    {**asdict(plan), **trial.params}, tags)
        tracking.log_metrics(run_id, {"mflops": costs.mflops, "kparams": costs.kparams})
        trial.set_user_attr("mlflow_run_id", run_id)
        runs[trial.number] = run_id

    def on_epoch(trial: optuna.Trial, epoch: int, metrics: dict[str, float]) -> None:
        keep = ("val_accuracy", "val_loss", "train_loss", "score")
        tracking.log_metrics(runs[trial.number], {k: metrics[k] for k in keep if k in metrics}, step=epoch)

    def on_end(trial: optuna.Trial, outcome: TrialOutcome) -> None:
        run_id = runs.pop(trial.number)
        metrics = {"accuracy": outcome.accuracy, "score": outcome.score, "epochs_trained": outcome.epochs,
                   "train_seconds": outcome.seconds}
        if outcome.latency_ms is not None:
            metrics["int8_latency_ms"] = outcome.latency_ms
        tracking.log_metrics(run_id, metrics)
        tracking.set_tags(run_id, {"pruned": str(outcome.pruned).lower()})
        tracking.finish_run(run_id)

    def on_error(trial: optuna.Trial, error: BaseException) -> None:
        run_id = runs.pop(trial.number, None)
        if run_id:
            tracking.set_tags(run_id, {"error": f"{type(error).__name__}: {error}"[:500]})
            tracking.finish_run(run_id, "FAILED")

    return TrialHooks(on_start=on_start, on_epoch=on_epoch, on_end=on_end, on_error=on_error)
