"""The labels-revert flow: take back every auto-label one model version voted for.

model version (NAME:VERSION) → under the dataset's lock: the dataset as it is kept as a data
version, that version's `auto` rows and their images removed in a staged copy, the copy versioned
and swapped in (tasks/labeling/revert.py) → counts and both data versions logged to MLflow
(experiment `saofu-labels`). Human and generated labels are never touched. The undo is the data
version before (`tasks.labeling.revert.restore_version`, `saofu labels restore`).

An audit can trigger it: given the precision an audit measured for the version's auto-labels and
the target, the run reverts only when the precision is below the target (else it completes as
skipped, saying why). With no dataset named, the dataset is resolved as the scheduled flows
resolve it (tasks/data/project_dataset.py).

No `from __future__ import annotations`: the executor pickles flows by value, and a string
annotation would name a class the unpickled function cannot see (tests/flows/test_served_flows_pickle.py).
"""


import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from pydantic import BaseModel, Field, field_validator

from saofu.errors import SaofuError
from tasks import tracking
from tasks.data.project_dataset import resolve_project_dataset
from tasks.labeling.revert import check_model_version, revert_auto_labels

EXPERIMENT = "saofu-labels"


class LabelsRevertParams(BaseModel):
    """Parameters of one revert (every field has a plain default, for the Prefect UI's form)."""

    model_version: str = Field("", description="NAME:VERSION whose auto-labels are taken back, e.g. "
                                               "fu-recognizer:3 (as the manifest's model_versions column names it)")
    dataset_dir: str = Field("", description="The labelled dataset (ImageFolder tree + manifest.csv); empty: "
                                             "resolved at run time (data/labelled, else the champion's training "
                                             "data or its labelled copy)")
    dataset_name: str = Field("", description="Name of the dataset's DVC versions; empty: the name of the versions "
                                              "it came from (else its folder's name)")
    registered_model: str = Field("fu-recognizer", min_length=1,
                                  description="Whose champion's training data is the dataset when none is named.")
    audited_precision: float = Field(-1.0, le=1.0, description="Precision an audit measured for this version's "
                                                               "auto-labels; below 0: none, revert regardless")
    precision_target: float = Field(0.0, ge=0.0, le=1.0, description="With an audited precision: revert only when "
                                                                     "it is below this target")
    message: str = Field("", description="Why, recorded in the new data version's message.")
    experiment: str = Field(EXPERIMENT, min_length=1)

    @field_validator("model_version")
    @classmethod
    def _name_and_version(cls, value: str) -> str:
        try:
            return check_model_version(value)
        except SaofuError as exc:
            raise ValueError(str(exc)) from None


class LabelsRevertResult(BaseModel):
    model_version: str = ""
    dataset_dir: str = ""
    dataset_name: str = ""
    removed: int = 0
    per_class: dict[str, int] = {}
    version_before: str | None = None
    version_after: str | None = None
    removed_paths: list[str] = []
    removed_sha256: list[str] = []  # the images labelers could be asked about instead
    kept: int = 0
    run_id: str = ""
    seconds: float = 0.0
    skipped: str = ""  # why nothing was reverted (the audit met the target, no dataset); "" when it ran


@task(name="revert-auto-labels")
def revert_step(dataset_dir: str, model_version: str, dataset_name: str, message: str) -> dict:
    return revert_auto_labels(dataset_dir, model_version, dataset_name, message).to_dict()


@flow(name="labels-revert", log_prints=True)
def labels_revert_flow(params: LabelsRevertParams) -> LabelsRevertResult:
    """Remove every auto-label `params.model_version` voted for, as a new data version."""
    started = time.perf_counter()
    logger = get_run_logger()
    check_model_version(params.model_version)  # the form's default "" is no model version
    if params.audited_precision >= params.precision_target > 0.0:  # an audit that met its target
        return _skipped(logger, params, f"the audited precision {params.audited_precision:g} of "
                                        f"{params.model_version}'s auto-labels meets the target "
                                        f"{params.precision_target:g}", started)
    if params.dataset_dir:
        dataset = Path(params.dataset_dir)
    else:
        found = resolve_project_dataset(params.registered_model)
        if found.path is None:
            return _skipped(logger, params, found.reason, started)
        dataset = Path(found.path)
        logger.info("labels revert: dataset %s", found.reason)
    run_id = tracking.start_run(params.experiment, "labels-revert",
                                {**params.model_dump(), "dataset_dir": str(dataset)},
                                {"prefect_flow_run_id": str(flow_run.get_id() or "")})
    try:
        why = "; ".join(x for x in (_audit(params), params.message) if x)
        done = revert_step(str(dataset), params.model_version, params.dataset_name, why)
    except BaseException:
        tracking.finish_run(run_id, "FAILED")  # not left RUNNING in the UI
        raise
    tracking.log_metrics(run_id, {"removed": done["removed"], "kept": done["kept"],
                                  **{f"removed/{label}": n for label, n in done["per_class"].items()}})
    tracking.set_tags(run_id, {"model_version": done["model_version"], "dataset_name": done["dataset_name"],
                               "data_version_before": done["version_before"] or "",
                               "data_version": done["version_after"] or ""})
    tracking.log_dict(run_id, done, "revert.json")
    tracking.finish_run(run_id)
    logger.info("labels revert: %d auto-labels of %s removed %s; data version %s -> %s", done["removed"],
                done["model_version"], done["per_class"], done["version_before"], done["version_after"])
    return LabelsRevertResult(**done, run_id=run_id, seconds=time.perf_counter() - started)


def _audit(params: LabelsRevertParams) -> str:
    """The audit behind the revert, in words for the data version's message ("" when none was given)."""
    if params.audited_precision < 0.0:
        return ""
    if params.precision_target > 0.0:
        return f"audited precision {params.audited_precision:g} below the target {params.precision_target:g}"
    return f"audited precision {params.audited_precision:g}"


def _skipped(logger, params: LabelsRevertParams, reason: str, started: float) -> LabelsRevertResult:
    # one warning line, not a traceback: nothing is wrong, there was just nothing to take back
    logger.warning("labels revert skipped: %s", reason)
    return LabelsRevertResult(model_version=params.model_version, dataset_dir=params.dataset_dir, skipped=reason,
                              seconds=time.perf_counter() - started)
