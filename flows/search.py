"""The search flow: study → trials (1 or N workers) → Pareto front → best trial retrained and registered.

One pydantic parameter model holds the space, sampler, pruner, budget, score targets and weights.
The study is an MLflow run; every trial is a run nested under it; the best trial (highest combined
score among finished trials) is optionally compound-scaled to a FLOP target, then retrained at the
full budget by the training flow (nested under the study's run too) and registered.
"""


from datetime import UTC, datetime
from pathlib import Path
from typing import Self

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flows.train import TrainFlowParams, TrainFlowResult, train_flow
from saofu.settings import get_settings
from saofu.urls import hide_password
from tasks import tracking
from tasks.data.fu_world import WorldConfig, world_folder_name
from tasks.data.manifest import plain_name
from tasks.search.objective import ScoreTargets
from tasks.search.passwords import dashboard_command, refuse_password
from tasks.search.report import best_row, format_trials, pareto_front, plot_pareto, rebuild_plan, trial_rows
from tasks.search.space import SearchSpace
from tasks.search.study import Pruner, Sampler, grid_size
from tasks.search.worker import SearchJob, launch_workers, open_study, run_job_worker
from tasks.train.steps import generate_fu_world


class SearchFlowParams(BaseModel):
    """Parameters of one architecture and hyper-parameter search."""

    # Prefect stores parameters with the flow run and MLflow logs them: a refused URL is not echoed
    # An infinite timeout never ends the study; NaN passes no bound check it is compared with.
    model_config = ConfigDict(hide_input_in_errors=True, allow_inf_nan=False)

    data_dir: str | None = Field(None, description="ImageFolder dataset. Empty: generate the Fu world.")
    world_n: int = Field(WorldConfig.n, ge=60, description="Images to generate when no data_dir is given.")
    world_seed: int = 0
    study_name: str | None = Field(None, description="Empty: search-<time>. An existing name resumes that study.")
    storage: str | None = Field(
        None, description="Optuna RDB storage URL. Empty: SQLite under the project. postgresql://USER@HOST:PORT/DB "
        "for workers, without a password (saofu's passfiles, PGPASSFILE or ~/.pgpass hold it)."
    )
    workers: int = Field(1, ge=1, le=64, description="worker processes sharing the study")
    space: SearchSpace = SearchSpace()
    sampler: Sampler = "tpe"
    pruner: Pruner = "hyperband"
    n_trials: int = Field(20, ge=1)
    timeout_min: float | None = Field(None, gt=0, description="wall-clock budget of the study, minutes")
    epochs: int = Field(8, ge=1, description="epochs of an unpruned trial")
    min_epochs: int = Field(1, ge=1)
    targets: ScoreTargets = ScoreTargets()
    measure_latency: bool = Field(False, description="INT8 onnxruntime latency as a third cost term")
    max_mflops: float | None = Field(
        None, gt=0, description="hard FLOP limit: the best trial is chosen among those within it"
    )
    max_kparams: float | None = Field(
        None, gt=0, description="hard parameter limit (thousands): the best trial is chosen among those within it"
    )
    scale_to_mflops: float | None = Field(None, gt=0, description="compound-scale the best trial to this FLOP target")
    final_epochs: int = Field(20, ge=0, description="epochs of the best trial's retrain; 0: no retrain")
    registered_model: str = Field("fu-recognizer-searched", min_length=1)
    experiment: str = Field("saofu-search", min_length=1)
    seed: int = 0
    device: str = Field("cpu", pattern="^(cpu|cuda|auto)$", description="trial training device")

    _no_password = field_validator("storage")(refuse_password)

    @field_validator("study_name")
    @classmethod
    def _study_name_is_a_folder_name(cls, value: str | None) -> str | None:
        # The study's files go to <runs>/<study_name>: '..' or an absolute name would put them elsewhere.
        if value and (not plain_name(value) or not value.isprintable()):
            raise ValueError("study_name must be one folder name (not '.' or '..', no '/', '\\' or control "
                             "characters): the study's files go under the runs folder")
        return value

    @model_validator(mode="after")
    def _nsga2_is_not_pruned(self) -> Self:
        if self.sampler == "nsga2" and self.pruner != "none":
            raise ValueError("sampler nsga2 is multi-objective, which Optuna cannot prune: set pruner to 'none'")
        return self


class SearchFlowResult(BaseModel):
    study_name: str
    storage: str
    run_id: str
    trials: int
    finished: int
    pruned: int
    failed: int
    best_trial: int
    best_score: float
    best_accuracy: float
    best_arch: str
    best_image_size: int
    pareto_trials: list[int]
    pareto_plot: str
    retrain: TrainFlowResult | None = None
    dashboard_hint: str


def _default_storage() -> str:
    return f"sqlite:///{get_settings().home / '.saofu' / 'search' / 'optuna.db'}"


@task(name="run-study")
def run_study(job: SearchJob, workers: int, job_file: str) -> None:
    """Run the study's trials: in this process for one worker, else in `workers` processes."""
    if workers == 1:
        run_job_worker(job, "w0")
    else:
        launch_workers(job, workers, Path(job_file))


@flow(name="search", log_prints=True)
def search_flow(params: SearchFlowParams = SearchFlowParams()) -> SearchFlowResult:
    """Search architectures and hyper-parameters, then retrain and register the best."""
    settings = get_settings()
    log = get_run_logger()
    n_trials = params.n_trials
    if params.sampler == "grid" and n_trials > grid_size(params.space):
        n_trials = grid_size(params.space)
        log.info("grid has %d points: n_trials lowered to that", n_trials)
    data_dir = params.data_dir or generate_fu_world(
        str(settings.data_dir / world_folder_name(params.world_n, params.world_seed, WorldConfig.image_size)),
        params.world_n, params.world_seed,
    )
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    study_name = params.study_name or f"search-{stamp}"
    storage = params.storage or _default_storage()
    tags = {"prefect_flow_run_id": str(flow_run.get_id() or ""), "flow": "search", "study": study_name}
    run_id = tracking.start_run(params.experiment, study_name, {
        "sampler": params.sampler, "pruner": params.pruner, "n_trials": n_trials, "workers": params.workers,
        "timeout_min": params.timeout_min, "epochs": params.epochs, "storage": hide_password(storage),
        "data_dir": str(Path(data_dir).resolve()), **{f"target_{k}": v for k, v in params.targets.model_dump().items()},
        "measure_latency": params.measure_latency,
    }, tags)
    run_dir = settings.runs_dir / study_name
    try:
        tracking.log_dict(run_id, params.space.model_dump(), "search_space.json")
        job = SearchJob(
            study_name=study_name, storage=storage, data_dir=str(data_dir), space=params.space,
            sampler=params.sampler, pruner=params.pruner, n_trials=n_trials,
            timeout_s=params.timeout_min * 60 if params.timeout_min else None, epochs=params.epochs,
            min_epochs=params.min_epochs, targets=params.targets, measure_latency=params.measure_latency,
            seed=params.seed, device=params.device, experiment=params.experiment, parent_run_id=run_id,
        )
        print(f"study {study_name} on {hide_password(storage)}: {n_trials} trials, {params.workers} worker(s), "
              f"sampler {params.sampler}, pruner {params.pruner}", flush=True)
        run_study(job, params.workers, str(run_dir / "job.json"))

        study, _ = open_study(job)
        rows = trial_rows(study, params.targets)
        front = pareto_front(rows)
        plot = plot_pareto(rows, run_dir / "pareto.png", title=study_name)
        tracking.log_file(run_id, plot)
        tracking.log_dict(run_id, {"trials": rows, "pareto": [r["number"] for r in front]}, "trials.json")
        print(format_trials(rows), flush=True)
        best = best_row(rows, params.max_mflops, params.max_kparams)
        plan = rebuild_plan(best, params.space)
        counts = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL")}
        tracking.log_metrics(run_id, {"best_score": best["score"], "best_accuracy": best["accuracy"],
                                      "trials_finished": counts["COMPLETE"], "trials_pruned": counts["PRUNED"],
                                      "trials_failed": counts["FAIL"]})
        arch, image_size = plan.arch, plan.image_size
        if params.scale_to_mflops:
            from models.scaling import compound_scale

            scaled = compound_scale(arch, image_size, params.scale_to_mflops)
            print(f"compound scaling to {params.scale_to_mflops} MFLOPs: phi {scaled.phi:.2f}, "
                  f"{scaled.mflops:.2f} MFLOPs at {scaled.image_size}px: {scaled.arch}", flush=True)
            arch, image_size = scaled.arch, scaled.image_size
        tracking.set_tags(run_id, {"best_trial": str(best["number"]), "best_arch": arch,
                                   "best_image_size": str(image_size)})
        retrain = None
        if params.final_epochs:
            retrain = train_flow(TrainFlowParams(
                data_dir=str(data_dir), model="saofu_from_arch", arch=arch, image_size=image_size,
                epochs=params.final_epochs, batch_size=plan.batch_size, lr=plan.lr, weight_decay=plan.weight_decay,
                label_smoothing=plan.label_smoothing, aug_strength=plan.aug_strength, seed=params.seed,
                device=params.device, registered_model=params.registered_model, experiment=params.experiment,
                tags={"mlflow.parentRunId": run_id, "search_study": study_name,
                      "search_trial": str(best["number"])},
            ))
    except BaseException:
        tracking.finish_run(run_id, "FAILED")
        raise
    tracking.finish_run(run_id)
    return SearchFlowResult(
        study_name=study_name, storage=hide_password(storage), run_id=run_id, trials=len(rows),
        finished=counts["COMPLETE"], pruned=counts["PRUNED"], failed=counts["FAIL"], best_trial=best["number"],
        best_score=best["score"], best_accuracy=best["accuracy"], best_arch=arch, best_image_size=image_size,
        pareto_trials=[r["number"] for r in front], pareto_plot=str(plot), retrain=retrain,
        dashboard_hint=dashboard_command(storage),
    )


if __name__ == "__main__":
    search_flow()
