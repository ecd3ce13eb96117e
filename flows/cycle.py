"""The whole loop as one flow, run nightly: active learning → ingest → a short search → train → release.

Each stage is one subflow call of the existing flow with its own parameter model, so each shows
up in the Prefect UI as a child run with its own logs and result. The release goes through
`release_flow`, which holds the registered model's concurrency slot (`flows/locks.py`): a nightly
cycle, a scheduled release and a fast retrain clicked in the UI never move `@champion` at once.

Every field of `CycleParams` has a default and a plain type (the Prefect UI renders unions and
Optional fields badly): "" and 0 mean "the default" where the stage's own model takes None.

With no dataset named, the cycle works on the one tasks/data/project_dataset.py resolves at run
time (data/labelled, else the champion's training data or its labelled copy). When there is none
yet, the whole cycle is skipped with one warning that says what to run (`CycleResult.skipped`), rather
than failing in the training stage every night; a stage that skips itself (active learning without
a second model, ingest without a Label Studio project) is recorded as "skipped: ..." and the cycle
goes on.

The run's page holds the night's summary (markdown artifact `cycle-MODEL`, `flows/cycle_summary.py`):
whether the champion changed as the heading, then each stage's seconds and outcome.

Resuming: the cycle flow has `retries=1`; a retry of the cycle re-runs its stages from the start
(subflows are not cached). What is not redone is what the stages themselves keep: ingest's
cursor (annotations already ingested are not ingested again), active learning's pool state
(images already sent are not sent again), an Optuna study of the same name resumes its trials
(the study name is fixed per night), and the training/release tasks' own Prefect retries.
"""


import time
from datetime import UTC, datetime

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from flows.active_learning import ActiveLearningParams, active_learning_flow
from flows.cycle_summary import cycle_summary
from flows.ingest import IngestParams, ingest_flow
from flows.release import ReleaseParams, release_flow
from flows.run_summary import artifact_key, publish
from flows.search import SearchFlowParams, search_flow
from flows.step_clock import StepClock
from flows.train import TrainFlowParams, train_flow
from tasks.data.project_dataset import ProjectDataset, default_pool_dir, pool_missing, resolve_project_dataset

STAGES = ("active-learning", "ingest", "search", "train", "release")


class CycleParams(BaseModel):
    """Parameters of one cycle (the Prefect UI's form: every field has a default)."""

    # An infinite search budget never ends the stage; NaN passes no bound check it is compared with.
    model_config = ConfigDict(allow_inf_nan=False)

    registered_model: str = Field("fu-recognizer", min_length=1, description="the MLflow registered model")
    dataset_dir: str = Field("", description="the labelled dataset (tree + manifest.csv); empty: resolved at run "
                                             "time (<SAOFU_HOME>/data/labelled, else the champion's training data "
                                             "or its labelled copy)")
    dataset_name: str = Field("fu", min_length=1, description="name of the dataset's DVC data versions")
    project: str = Field("fu-recognizer", min_length=1, description="Label Studio project title")
    pool_dir: str = Field("", description="the serving app's online pool; empty: <SAOFU_HOME>/data/online_pool")
    second_model: str = Field("", description="active learning's second model; empty: <registered_model>@second")
    threshold: float = Field(0.9, ge=0.5, le=1.0, description="confidence both models must reach to auto-label")
    max_tasks: int = Field(0, ge=0, description="most pool tasks sent to labelers per cycle; 0: all")
    active_learning: bool = Field(True, description="run the active-learning stage (skipped when the pool "
                                                    "has no request logged yet)")
    ingest: bool = Field(True, description="run the ingest stage")
    search: bool = Field(True, description="run the short search; off: train the default architecture")
    search_trials: int = Field(6, ge=1, description="trials of the short search")
    search_timeout_min: float = Field(20.0, gt=0, description="wall-clock budget of the short search, minutes")
    search_epochs: int = Field(3, ge=1, description="epochs of an unpruned search trial")
    train_epochs: int = Field(10, ge=1, description="epochs of the training stage")
    device: str = Field("cpu", pattern="^(cpu|cuda|auto)$")
    reason: str = Field("nightly cycle", min_length=1, description="recorded with the promotion")
    seed: int = 0


class CycleResult(BaseModel):
    stages: dict[str, str] = {}  # stage -> one-line outcome ("skipped: ..." for a skipped stage)
    steps: dict[str, float] = {}  # stage -> wall seconds
    version: str = ""  # the version trained this cycle
    promoted: bool = False
    champion_after: str = ""
    seconds: float = 0.0
    skipped: str = ""  # why the whole cycle did nothing (no dataset to work on yet); "" when it ran


def _dataset_dir(params: CycleParams) -> ProjectDataset:
    if params.dataset_dir:
        return ProjectDataset(params.dataset_dir, "named in the cycle's parameters")
    return resolve_project_dataset(params.registered_model)


def _pool_dir(params: CycleParams) -> str:
    return params.pool_dir or str(default_pool_dir())


def _study_name(params: CycleParams) -> str:
    # one study per model and night: a retried cycle resumes the night's trials instead of starting over
    return f"cycle-{params.registered_model}-{datetime.now(UTC):%Y%m%d}"


@flow(name="cycle", log_prints=True, retries=1, retry_delay_seconds=60)
def cycle_flow(params: CycleParams = CycleParams()) -> CycleResult:
    """Active learning → ingest → short search → train → release, each stage a subflow."""
    log = get_run_logger()
    started = time.perf_counter()
    clock = StepClock()
    out = CycleResult()
    found = _dataset_dir(params)
    if found.path is None:
        # every stage needs the dataset: skip the night with one line instead of failing in train
        log.warning("cycle skipped: %s", found.reason)
        out.skipped = found.reason
        out.stages = {stage: "skipped: no labelled dataset" for stage in STAGES}
        out.seconds = time.perf_counter() - started
        _publish(out, params, "none")
        return out
    dataset = found.path
    log.info("cycle: dataset %s", found.reason)

    # 1. active learning: auto-label what both models agree on, send the rest to labelers
    pool = _pool_dir(params)
    no_pool = pool_missing(pool) if params.active_learning else "switched off"
    if not no_pool:
        al = active_learning_flow(ActiveLearningParams(
            pool_dir=pool, dataset_dir=dataset, registered_model=params.registered_model,
            second_model=params.second_model or None, threshold=params.threshold, project=params.project,
            max_tasks=params.max_tasks or None))
        out.stages["active-learning"] = f"skipped: {al.skipped}" if al.skipped else _summary(al)
    else:
        out.stages["active-learning"] = f"skipped: {no_pool}"
    clock.lap("active-learning")

    # 2. ingest: finished annotations → validated → a new data version
    if params.ingest:
        ing = ingest_flow(IngestParams(project=params.project, dataset_dir=dataset,
                                       dataset_name=params.dataset_name,
                                       registered_model=params.registered_model))
        out.stages["ingest"] = (f"skipped: {ing.skipped}" if ing.skipped else
                                f"added {ing.added}, data version {ing.data_version or '(unchanged)'}")
    else:
        out.stages["ingest"] = "skipped: switched off"
    clock.lap("ingest")

    # 3. a short search (no retrain of its own: the training stage trains the best architecture)
    train = TrainFlowParams(data_dir=dataset, registered_model=params.registered_model, epochs=params.train_epochs,
                            device=params.device, seed=params.seed, tags={"saofu.cycle": "nightly"})
    if params.search:
        searched = search_flow(SearchFlowParams(
            data_dir=dataset, study_name=_study_name(params), n_trials=params.search_trials,
            timeout_min=params.search_timeout_min, epochs=params.search_epochs, final_epochs=0,
            registered_model=f"{params.registered_model}-searched", seed=params.seed, device=params.device))
        train = train.model_copy(update={"model": "saofu_from_arch", "arch": searched.best_arch,
                                         "image_size": searched.best_image_size,
                                         "tags": train.tags | {"saofu.search.study": searched.study_name}})
        out.stages["search"] = f"best trial {searched.best_trial} of {searched.trials}: {searched.best_arch}"
    else:
        out.stages["search"] = "skipped: switched off"
    clock.lap("search")

    # 4. train the chosen architecture on the newest data, register the version
    trained = train_flow(train)
    out.version = trained.version
    out.stages["train"] = f"version {trained.version}, test accuracy {trained.test_accuracy_at_threshold:.3f}"
    clock.lap("train")

    # 5. release: compress → evaluate → gate → promote (under the model's concurrency slot)
    released = release_flow(ReleaseParams(registered_model=params.registered_model,
                                          candidate_version=trained.version, reason=params.reason,
                                          seed=params.seed))
    out.promoted = released.promoted
    out.champion_after = released.champion_after or ""
    out.stages["release"] = (f"promoted v{released.champion_after}" if released.promoted
                             else f"not promoted (champion stays v{released.champion_before})")
    clock.lap("release")

    out.steps = dict(clock.steps)
    out.seconds = time.perf_counter() - started
    log.info("cycle done in %.0f s\n%s", out.seconds, step_table(out))
    _publish(out, params, f"{dataset} ({found.reason})")
    return out


def _publish(result: CycleResult, params: CycleParams, dataset: str) -> None:
    """The night's summary on the run's page (Artifacts tab; Artifacts -> cycle-MODEL, one per night)."""
    publish(cycle_summary(result, params, dataset, STAGES), artifact_key("cycle", params.registered_model),
            f"Nightly cycle of {params.registered_model}")


def _summary(result: BaseModel) -> str:
    data = result.model_dump()
    keys = [k for k, v in data.items() if isinstance(v, int | float | str) and not isinstance(v, bool)][:4]
    return ", ".join(f"{k} {data[k]}" for k in keys)


def step_table(result: CycleResult) -> str:
    """Each stage's wall time and outcome, one line each."""
    rows = [f"{'stage':<16} {'seconds':>8}  outcome"]
    for stage in STAGES:
        rows.append(f"{stage:<16} {result.steps.get(stage, 0.0):>8.1f}  {result.stages.get(stage, '')}")
    rows.append(f"{'total':<16} {result.seconds:>8.1f}")
    return "\n".join(rows)
