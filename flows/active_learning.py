"""The active-learning flow: the online pool's new images → auto-labels or Label Studio tasks.

champion + second model predict on the pool's new images → both agree AND both confident:
auto-label into the dataset manifest (source `auto`) → the rest, and optionally the latest
evaluation's badcases, become Label Studio tasks with the models' predictions as pre-annotations.
The counts go to MLflow (experiment `saofu-active-learning`).

Calibrated votes (`tasks/labeling/vote_calibration.py`): before voting, each model's probabilities
are temperature-scaled with a temperature fitted on the dataset's labelled val split (`calibrate`,
on by default; a dataset with too few val images votes raw, with a warning). With
`target_precision` (e.g. 0.995) the threshold is found on that split for the target instead of
taken from `threshold`; when the split shows the target out of reach, the pass auto-labels only at
the strictest threshold and says so. Temperatures, ECE before/after, the threshold and its
estimated precision with its interval go to the result and to MLflow.

Spot checks (`tasks/labeling/spot_checks.py`): a blind random sample of each pass's auto-labels
(`spot_check_share`, at least `spot_check_minimum`) goes to labelers with no pre-annotation; the
ingest compares their answers with the auto-labels and logs the measured precision per pass and per
model version, and a disagreeing answer corrects the auto-label.

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
    ModelRef,
    RouteResult,
    label_classes,
    label_studio_sink,
    resolve_models_task,
    route_task,
    send_badcases_task,
)
from tasks.labeling.spot_checks import send_spot_checks
from tasks.labeling.vote_calibration import (
    MIN_VAL_IMAGES,
    VAL_LIMIT,
    VoteCalibration,
    calibrate_vote_task,
    describe,
    has_new_images,
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
    threshold: float = Field(0.95, ge=0.5, le=1.0, description="Confidence BOTH models must reach to auto-label "
                                                              "(calibrated, when `calibrate` is on).")
    per_class_thresholds: dict[str, Annotated[float, Field(ge=0.5, le=1.0)]] | None = Field(
        None, description="Class -> threshold replacing the global one for that class (e.g. stricter for a new class)."
    )
    champion_tta: bool = Field(
        True, description="The champion votes with probabilities averaged over 5 slightly shifted/zoomed views: "
        "fewer confidently wrong auto-labels for 5x its inference (bench/results/labeling_tta.json).",
    )
    second_tta: bool = Field(
        True, description="The second model votes over the same 5 views: with both calibrated, the committee "
        "`saofu bench labeling` kept (bench/results/labeling.json).",
    )
    calibrate: bool = Field(
        True, description="Temperature-scale each model's probabilities on the dataset's labelled val split before "
        "they vote, so one threshold means the same for both models and after a retrain.",
    )
    target_precision: float = Field(
        0.0, ge=0.0, lt=1.0, description="0: use `threshold`. E.g. 0.995: find the threshold at which the vote's "
        "precision (its 95% lower bound) reaches this on the val split; needs labelled val images.",
    )
    calibration_images: int = Field(
        VAL_LIMIT, ge=MIN_VAL_IMAGES, le=20_000, description="At most this many val images to calibrate on.",
    )
    project: str = Field("fu-recognizer", min_length=1, description="Label Studio project title.")
    max_tasks: int | None = Field(
        None, ge=0, description="At most this many pool tasks per run, most informative first. Empty: all."
    )
    spot_check_share: float = Field(0.05, ge=0.0, le=1.0, description="Share of this pass's auto-labels sent to "
                                    "labelers as blind spot checks (ingest measures their precision).")
    spot_check_minimum: int = Field(5, ge=0, description="At least this many spot checks when there are as many "
                                                         "auto-labels.")
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
    spot_checks: int = 0  # auto-labels sent to labelers as blind checks
    reasons: dict[str, int] = {}
    threshold_used: float = 0.0  # the global threshold the pass voted with (found or given)
    # temperature and ECE before/after per model, and with a target the threshold's estimate
    # (`VoteCalibration.metrics`); empty when the votes were not calibrated
    calibration: dict[str, float] = {}
    target_met: bool = False  # a target precision was asked and the val split showed it reachable
    calibration_note: str = ""  # why the votes were not calibrated, or that the target was not met
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


def _calibrated_vote(
    params: ActiveLearningParams, champion: ModelRef, second: ModelRef
) -> tuple[VoteCalibration | None, float, dict[str, float] | None, str]:
    """Calibrate the votes and find the threshold, as the parameters ask.

    Returns:
        (the calibration or None, the global threshold, the per-class thresholds, a note for the
        result: why the votes are not calibrated, or that the target was not met).

    Raises:
        SaofuError: a target precision was asked and the dataset has too few labelled val images
            to estimate it: the pass does not quietly fall back to a hand-set threshold.
    """
    threshold, per_class = params.threshold, params.per_class_thresholds
    if not (params.calibrate or params.target_precision):
        return None, threshold, per_class, ""
    if not has_new_images(params.pool_dir, params.since):
        return None, threshold, per_class, "no new pool images: nothing to calibrate for"
    log = get_run_logger()
    try:
        cal = calibrate_vote_task(
            params.dataset_dir, champion, second, champion_tta=params.champion_tta, second_tta=params.second_tta,
            fit_temperatures=params.calibrate, target_precision=params.target_precision,
            limit=params.calibration_images,
        )
    except SaofuError as exc:
        if params.target_precision:
            raise SaofuError(f"cannot find a threshold for precision {params.target_precision}: {exc}") from None
        log.warning("active learning: votes not calibrated (raw probabilities, threshold %s): %s", threshold, exc)
        return None, threshold, per_class, f"not calibrated: {exc}"
    log.info("active learning: %s", describe(cal))
    if (choice := cal.choice) is None:
        return cal, threshold, per_class, ""
    # per-class thresholds only ever raise the bar the target set, never lower it
    per_class = {name: max(value, choice.threshold) for name, value in (per_class or {}).items()} or None
    note = ""
    if not choice.met:
        note = (f"target precision {choice.target} not met on the val split: auto-labelling only at the strictest "
                f"threshold {choice.threshold:.4f} (estimated {choice.precision:.4f} "
                f"[{choice.lower:.4f}, {choice.upper:.4f}] on {choice.selected} images)")
        log.warning("active learning: %s", note)
    return cal, choice.threshold, per_class, note


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
        cal, threshold, per_class, note = _calibrated_vote(params, champion, second)
        routed: RouteResult = route_task(
            params.pool_dir, params.dataset_dir, champion, second, sink, threshold, per_class, params.max_tasks,
            params.since, champion_tta=params.champion_tta, second_tta=params.second_tta,
            temperatures=cal.temperatures if cal else (1.0, 1.0),
        )
        # a blind sample of this pass's auto-labels to labelers: ingest measures their precision
        spot_checks = send_spot_checks(params.dataset_dir, routed.auto_rows, sink, params.spot_check_share,
                                       params.spot_check_minimum, run_id=run_id) if routed.auto_rows else 0
        sent = (
            send_badcases_task(params.badcase_file, sink, params.pool_dir, params.max_tasks)
            if params.include_badcases else 0
        )
    except BaseException:
        tracking.finish_run(run_id, "FAILED")  # not left RUNNING in the UI
        raise
    calibration = cal.metrics() if cal else {}
    tracking.log_metrics(run_id, {**routed.metrics(), "badcases": sent, "spot_checks": spot_checks,
                                  "threshold_used": threshold, **calibration})
    tracking.finish_run(run_id)
    get_run_logger().info(
        "active learning: %d auto at threshold %.4f, %d to labelers, %d badcases (run %s)", routed.auto, threshold,
        routed.human, sent, run_id,
    )
    return ActiveLearningResult(
        run_id=run_id, champion=champion.model_version, second=second.model_version,
        new_images=routed.new_images, auto=routed.auto, auto_added=routed.auto_added, human=routed.human,
        deferred=routed.deferred, badcases=sent, spot_checks=spot_checks, reasons=routed.reasons,
        threshold_used=threshold,
        calibration=calibration, target_met=bool(cal and cal.choice and cal.choice.met), calibration_note=note,
    )


if __name__ == "__main__":
    import sys

    active_learning_flow(ActiveLearningParams.model_validate_json(sys.argv[1]))
