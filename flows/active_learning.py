"""The active-learning flow: the online pool's new images → auto-labels or Label Studio tasks.

champion + second model predict on the pool's new images → both agree AND both confident:
auto-label into the dataset manifest (source `auto`) → the rest, and optionally the latest
evaluation's badcases, become Label Studio tasks with the models' predictions as pre-annotations.
The counts go to MLflow (experiment `saofu-active-learning`).

With no pool or dataset named (the scheduled deployment), both are resolved at run time (the pool
`saofu serve` logs into; tasks/data/project_dataset.py). Nothing to work on yet (no champion, no
second model, no pool, no labelled dataset) is not a failure: the run logs one warning saying what
to run and returns a result with `skipped` set. A pool, dataset or second model named explicitly
is used as before: a missing pool or second model is an error.
"""


from typing import Annotated, Self

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel, Field, model_validator

from saofu.errors import SaofuError
from tasks import tracking
from tasks.data.project_dataset import default_pool_dir, no_store, pool_missing, resolve_project_dataset
from tasks.labeling.active_learning import (
    SECOND_ALIAS,
    RouteResult,
    label_classes,
    label_studio_sink,
    resolve_models_task,
    route_task,
    send_badcases_task,
)

EXPERIMENT = "saofu-active-learning"


class ActiveLearningParams(BaseModel):
    """Parameters of one active-learning pass."""

    pool_dir: str = Field("", description="The online pool (index.jsonl + images), as the serving app logs it; "
                                          "empty: <SAOFU_HOME>/data/online_pool, where `saofu serve` logs")
    dataset_dir: str = Field("", description="The labelled dataset (ImageFolder tree + manifest.csv); empty: "
                                             "resolved at run time (data/labelled, else the champion's training "
                                             "data or its labelled copy)")
    registered_model: str = Field(
        "fu-recognizer", min_length=1, description="MLflow registered model; its @champion is the first model."
    )
    second_model: str | None = Field(
        None,
        description="Second model: NAME, NAME@ALIAS, @ALIAS or NAME/VERSION. Empty: <registered_model>@second.",
    )
    require_different_arch: bool = Field(
        False, description="Stop (instead of warning) when both models have the same architecture."
    )
    threshold: float = Field(0.9, ge=0.5, le=1.0, description="Confidence BOTH models must reach to auto-label.")
    per_class_thresholds: dict[str, Annotated[float, Field(ge=0.5, le=1.0)]] | None = Field(
        None, description="Class -> threshold replacing the global one for that class (e.g. stricter for a new class)."
    )
    champion_tta: bool = Field(
        True, description="The champion votes with probabilities averaged over 5 slightly shifted/zoomed views: "
        "fewer confidently wrong auto-labels for 5x its inference (bench/results/labeling_tta.json).",
    )
    project: str = Field("fu-recognizer", min_length=1, description="Label Studio project title.")
    max_tasks: int | None = Field(
        None, ge=0, description="At most this many pool tasks per run, most informative first. Empty: all."
    )
    include_badcases: bool = Field(False, description="Also send the latest evaluation's badcases to Label Studio.")
    badcase_file: str | None = Field(None, description="badcases.json, written beside every evaluation report.")
    since: str | None = Field(None, description="Only pool images that arrived after this ISO time.")
    experiment: str = Field(EXPERIMENT, min_length=1, description="MLflow experiment.")

    @model_validator(mode="after")
    def _badcases_need_a_file(self) -> Self:
        # checked in the form, before anything starts, rather than after the models are downloaded
        if self.include_badcases and not self.badcase_file:
            raise ValueError("include_badcases is set but no badcase_file is given")
        return self


class ActiveLearningResult(BaseModel):
    run_id: str = ""
    champion: str = ""
    second: str = ""
    new_images: int = 0
    auto: int = 0
    auto_added: int = 0
    human: int = 0
    deferred: int = 0
    badcases: int = 0
    reasons: dict[str, int] = {}
    skipped: str = ""  # why the pass did nothing (no champion, second model, pool or dataset yet); "" when it ran


def _models_missing(params: ActiveLearningParams) -> str | None:
    """Why the two models are not there yet, read from the registry without downloading them, or None.

    A second model named explicitly that is missing is left to `resolve_models`, which raises.
    """
    from mlflow.exceptions import MlflowException

    from tasks.release import registry

    name = params.registered_model
    if reason := no_store():
        return f"{reason}: train a model and release it (`saofu train`, `saofu release`)"
    try:
        champion = registry.current_champion(name)
    except SaofuError as exc:  # no such registered model
        return f"{exc}: train a model and release it (`saofu train --registered-model {name}`, `saofu release`)"
    if not champion:
        return f"registered model {name!r} has no champion yet: release one (`saofu release --model {name}`)"
    if params.second_model:
        return None
    try:
        tracking.client().get_model_version_by_alias(name, SECOND_ALIAS)
    except MlflowException:
        return (f"registered model {name!r} has no second model (alias {SECOND_ALIAS!r}) for the dual-model check: "
                f"register a version of another architecture (`saofu train --registered-model {name} --model ...`) "
                f"and point the alias {SECOND_ALIAS!r} at it, or name the second model")
    return None


def _skipped(reason: str) -> ActiveLearningResult:
    # one warning line, not a traceback: the schedule fires again and finds the work once it exists
    get_run_logger().warning("active learning skipped: %s", reason)
    return ActiveLearningResult(skipped=reason)


@flow(name="active-learning", log_prints=True)
def active_learning_flow(params: ActiveLearningParams) -> ActiveLearningResult:
    """One pass: route the pool's new images, send badcases, log the counts."""
    if reason := _models_missing(params):
        return _skipped(reason)
    pool = params.pool_dir
    if not pool:
        pool = str(default_pool_dir())
        if reason := pool_missing(pool):
            return _skipped(reason)
    dataset = params.dataset_dir
    if not dataset:
        found = resolve_project_dataset(params.registered_model)
        if found.path is None:
            return _skipped(found.reason)
        dataset = found.path
        get_run_logger().info("active learning: dataset %s", found.reason)
    params = params.model_copy(update={"pool_dir": pool, "dataset_dir": dataset})  # what runs is what is logged
    champion, second = resolve_models_task(
        params.registered_model, params.second_model, require_different_arch=params.require_different_arch
    )
    sink = label_studio_sink(params.project, label_classes(champion, second))
    run_id = tracking.start_run(
        params.experiment, "active-learning", params.model_dump(),
        {"prefect_flow_run_id": str(flow_run.get_id() or ""), "flow": "active_learning",
         "champion": champion.model_version, "second": second.model_version},
    )
    try:
        routed: RouteResult = route_task(
            params.pool_dir, params.dataset_dir, champion, second, sink, params.threshold,
            params.per_class_thresholds, params.max_tasks, params.since, champion_tta=params.champion_tta,
        )
        sent = (
            send_badcases_task(params.badcase_file, sink, params.pool_dir, params.max_tasks)
            if params.include_badcases else 0
        )
    except BaseException:
        tracking.finish_run(run_id, "FAILED")  # not left RUNNING in the UI
        raise
    tracking.log_metrics(run_id, {**routed.metrics(), "badcases": sent})
    tracking.finish_run(run_id)
    get_run_logger().info(
        "active learning: %d auto, %d to labelers, %d badcases (run %s)", routed.auto, routed.human, sent, run_id
    )
    return ActiveLearningResult(
        run_id=run_id, champion=champion.model_version, second=second.model_version,
        new_images=routed.new_images, auto=routed.auto, auto_added=routed.auto_added, human=routed.human,
        deferred=routed.deferred, badcases=sent, reasons=routed.reasons,
    )


if __name__ == "__main__":
    import sys

    active_learning_flow(ActiveLearningParams.model_validate_json(sys.argv[1]))
