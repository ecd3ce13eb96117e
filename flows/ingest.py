"""The ingest flow: Label Studio annotations → validated dataset → a DVC data version.

export completed annotations (since the last ingest) → majority labels → a staged copy of the
dataset with the new rows → Great Expectations suite → (pass) swap it in, advance the cursor,
create a data version; (fail) discard the copy, log the report, stop: no data version, and the
cursor stays where it was so the same annotations are retried once fixed in Label Studio. The run
holds the dataset's lock (tasks/data/dataset_lock.py) from reading the cursor to the data version;
the cursor is written into the staged copy, so it moves exactly when its rows are committed. A
label corrected in Label Studio relabels the image's row (and moves it to its class folder).

With no dataset named (the scheduled deployment), the dataset is resolved at run time
(tasks/data/project_dataset.py). Nothing to work on yet, no dataset or no Label Studio project
anybody created, is not a failure: the run logs one warning saying what to run and returns a
result with `skipped` set. A Label Studio that is not configured or not reachable is a failure,
reported in one line.

Spot checks (tasks/labeling/spot_checks.py): answers to the blind checks of auto-labels that
active learning sends are ingested like any answer (a disagreeing one corrects the auto row), and
are also compared with the auto-labels: the measured precision, cumulative over every spot check
answered so far, is logged per active-learning run and per model version (`spot_check_*` metrics,
`spot_checks/audit.json`). Their ledger is written into the staged copy with the cursor. With
`revert_below_precision`, a model version the checks show below it (95 % confidence, at least
`revert_min_checks` checks) has every auto-label it voted for taken back (`tasks/labeling/revert.py`).
"""


import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from saofu.errors import SaofuError
from tasks import tracking
from tasks.data.dataset_lock import dataset_lock, repair_if_interrupted
from tasks.data.manifest import add_images, read_manifest, relabel_images
from tasks.data.project_dataset import resolve_project_dataset
from tasks.data.validation import ValidationReport, validate_dataset
from tasks.data.versions import ensure_version
from tasks.labeling.client import (
    completed_annotations,
    connect,
    ensure_project,
    latest_update,
    reaching_label_studio,
)
from tasks.labeling.client import find_project as find_labeling_project
from tasks.labeling.ingest import (
    IngestState,
    commit_staged,
    discard_staged,
    staged_copy,
    to_manifest_rows,
)
from tasks.labeling.spot_checks import SpotCheckAudit, SpotCheckLedger, spot_check_outcomes, versions_below_target


class IngestParams(BaseModel):
    """Parameters of one ingest run."""

    project: str = Field("fu-recognizer", min_length=1, description="Label Studio project title.")
    dataset_dir: str = Field("", description="The labelled dataset (ImageFolder tree + manifest.csv); empty: "
                                             "resolved at run time (data/labelled, else the champion's training "
                                             "data or its labelled copy)")
    registered_model: str = Field("fu-recognizer", min_length=1,
                                  description="Whose champion's training data is the dataset when none is named.")
    dataset_name: str = Field("fu", min_length=1, description="Name of the dataset's DVC versions.")
    classes: list[str] | None = Field(
        None, description="The class set; empty: the classes already in the dataset's manifest."
    )
    revert_below_precision: float = Field(
        0.0, ge=0.0, le=1.0, description="0: off. E.g. 0.995: a model version whose spot-checked auto-labels are "
        "below this precision with 95 % confidence has them all taken back (labels revert, a new data version).")
    revert_min_checks: int = Field(20, ge=1, description="Spot checks a model version needs before a revert.")
    experiment: str = Field("saofu-ingest", min_length=1)


class IngestResult(BaseModel):
    project_id: int = 0
    tasks_seen: int = 0
    added: int = 0
    relabelled: int = 0  # images already in the dataset whose label a correction in Label Studio changed
    already_present: int = 0
    ties: list[dict] = []
    tasks_skipped: int = 0  # annotated tasks left out (no vote, bad data, image gone)
    data_version: str | None = None
    validation_docs: str | None = None
    seconds: float = 0.0  # the flow body's wall time
    run_id: str = ""  # the MLflow run
    # spot checks of auto-labels: answers counted in this run, then the figures over every one answered so
    # far (reported once the project has any)
    spot_checks_answered: int = 0
    spot_check_n: int = 0
    spot_check_agreed: int = 0
    spot_check_precision: float | None = None
    spot_check_interval: list[float] = []  # 95 % Wilson interval of the precision
    spot_check_by_version: dict[str, dict] = {}  # model version -> checked, agreed, precision, low, high
    spot_check_by_run: dict[str, dict] = {}  # active-learning run id -> the same
    reverted: list[str] = []  # model versions whose auto-labels this run took back (revert_below_precision)
    skipped: str = ""  # why the run did nothing (no dataset, no project yet); "" when it ran


@task(name="find-project", retries=2, retry_delay_seconds=3)
def find_project(project: str, classes: list[str]) -> int | None:
    """The project's id (its classes grown to `classes` if need be); None when nobody created it yet.

    Not created here: a project nobody made has no annotations to ingest (active learning creates
    it when it first sends images to labelers).
    """
    client = connect()
    with reaching_label_studio(f"looking up project {project!r}"):
        if find_labeling_project(client, project) is None:
            return None
        return ensure_project(client, project, classes)


@task(name="fetch-annotations", retries=2, retry_delay_seconds=3)
def fetch_annotations(project_id: int, cursor: str | None) -> list[dict]:
    with reaching_label_studio(f"reading project {project_id}'s annotations"):
        return completed_annotations(connect(), project_id, since=cursor)


@task(name="validate-dataset")
def validate(dataset_dir: str, classes: list[str], docs_dir: str):
    return validate_dataset(dataset_dir, classes=classes, docs_dir=Path(docs_dir))


@task(name="create-data-version", retries=1, retry_delay_seconds=3)
def version_dataset(dataset_dir: str, name: str, message: str) -> str:
    return ensure_version(dataset_dir, name, message)


class DatasetChange(BaseModel):
    """What one validated batch changed: rows added, and rows whose label a human corrected."""

    added: list[dict] = []
    relabelled: list[dict] = []  # each with `previous_label`


def apply_validated(dataset: Path, rows: list[dict], classes: list[str], run_id: str,
                    state: IngestState | None = None,
                    ledger: SpotCheckLedger | None = None) -> tuple[DatasetChange, ValidationReport]:
    """Apply labelled rows to a staged copy of `dataset`, run the validation suite, swap it in if it passes.

    New images are added; an image already there whose human label changed is relabelled (moved
    to its new class folder). `state` (the advanced ingest cursor) is written into the staged copy,
    so the cursor moves exactly when the rows it covers are committed; so is `ledger` (the spot checks'
    outcomes), which moves with it. The whole stage → validate →
    swap holds the dataset's lock (re-entrant: the ingest flow holds it already).

    Returns:
        (what changed, the validation report).

    Raises:
        SaofuError: the suite failed (the dataset is left as it was; the report is logged to the run),
            or another run held the dataset's lock too long.
    """
    with dataset_lock(dataset):
        staging = staged_copy(dataset)
        try:
            change = DatasetChange(added=add_images(staging, rows), relabelled=relabel_images(staging, rows))
            if state is not None:
                state.save(staging)
            if ledger is not None:
                ledger.save(staging)
            validation = validate(str(staging), classes, str(dataset.parent / f".{dataset.name}.gx-docs"))
            tracking.log_dict(run_id, {"summary": validation.summary(), "success": validation.success},
                              "validation/report.json")
            if validation.docs_path:
                tracking.log_file(run_id, validation.docs_path, "validation")
            if not validation.success:
                raise SaofuError(f"ingest rejected by the data validation suite:\n{validation.summary()}")
            commit_staged(staging, dataset)
        except BaseException:
            discard_staged(staging)
            raise
    return change, validation


def add_validated(dataset: Path, rows: list[dict], classes: list[str], run_id: str):
    """`apply_validated` for callers that count added rows (the fast retrain's labels from a folder).

    An image of the folder already in the dataset under another label (a `human` or `auto` one) is
    relabelled as well: a folder of corrected labels corrects them.

    Returns:
        (the rows added, the validation report).
    """
    change, validation = apply_validated(dataset, rows, classes, run_id)
    return change.added, validation


@flow(name="ingest", log_prints=True)
def ingest_flow(params: IngestParams) -> IngestResult:
    """Ingest the annotations completed since the last run; version the dataset if it changed.

    From reading the cursor to the data version the run holds the dataset's lock: a second ingest,
    active learning or a fast retrain waits, so none of them works on a copy another replaces.
    """
    started = time.perf_counter()
    logger = get_run_logger()
    if params.dataset_dir:
        dataset = Path(params.dataset_dir)
    else:
        found = resolve_project_dataset(params.registered_model)
        if found.path is None:
            return _skipped(logger, found.reason, started)
        dataset = Path(found.path)
        logger.info("ingest: dataset %s", found.reason)
    repair_if_interrupted(dataset)  # a dataset a crash left only as `.previous` has its classes back
    classes = params.classes or sorted({r["label"] for r in read_manifest(dataset)})
    if not classes:
        raise SaofuError(f"no classes given and no manifest in {dataset} to take them from")
    project_id = find_project(params.project, classes)
    if project_id is None:
        return _skipped(logger, f"Label Studio project {params.project!r} does not exist yet, so nothing is "
                                "annotated: run active learning (it creates the project when it sends images "
                                "to labelers) or create it in Label Studio", started)
    with dataset_lock(dataset):
        state = IngestState.load(dataset, project_id)
        records = fetch_annotations(project_id, state.cursor)
        rows, report = to_manifest_rows(records, classes=classes)  # a label outside them skips its task
        checks = spot_check_outcomes(records, classes)
        ledger = (SpotCheckLedger.load(dataset, project_id)
                  if checks or SpotCheckLedger.path(dataset, project_id).exists() else None)
        if ledger is not None:
            ledger.update(checks)
        newest = latest_update(records)
        advanced = IngestState(project_id, newest.isoformat()) if newest is not None else None
        run_id = tracking.start_run(params.experiment, "ingest", params.model_dump(),
                                    {"prefect_flow_run_id": str(flow_run.get_id() or "")})
        try:
            change, validation = apply_validated(dataset, rows, classes, run_id, state=advanced,
                                                 ledger=ledger if checks else None)
        except BaseException:
            tracking.finish_run(run_id, "FAILED")
            raise
        report.added, report.relabelled = change.added, change.relabelled
        report.already_present = len(rows) - len(change.added) - len(change.relabelled)
        message = f"ingest: {len(change.added)} human labels"
        if change.relabelled:
            message += f", {len(change.relabelled)} corrected (" + ", ".join(
                f"{r['path']}: {r['previous_label']} -> {r['label']}" for r in change.relabelled[:20]) + ")"
        data_version = version_dataset(str(dataset), params.dataset_name, message)
    summary = report.summary()
    tracking.log_metrics(run_id, {k: v for k, v in summary.items() if isinstance(v, int)})
    tracking.set_tags(run_id, {"data_version": data_version})
    measured = _log_spot_checks(run_id, ledger, checks) if ledger is not None else None
    reverted = (_revert_below_target(params, dataset, measured, run_id)
                if measured is not None and params.revert_below_precision else [])
    tracking.finish_run(run_id)
    logger.info("ingest: %s; data version %s", summary, data_version)
    return IngestResult(
        run_id=run_id, **(_spot_check_fields(measured, checks) if measured is not None else {}), reverted=reverted,
        project_id=project_id, tasks_seen=report.tasks_seen, added=len(change.added),
        relabelled=len(change.relabelled), already_present=report.already_present, ties=report.ties,
        tasks_skipped=len(report.skipped), data_version=data_version,
        validation_docs=str(validation.docs_path or ""), seconds=time.perf_counter() - started,
    )


def _log_spot_checks(run_id: str, ledger: SpotCheckLedger, checks: list) -> SpotCheckAudit:
    """Log the precision measured by every spot check answered so far (this run's answers included)."""
    measured = ledger.audit()
    answered = sum(c.agreed is not None for c in checks)
    tracking.log_metrics(run_id, {**measured.metrics(), "spot_checks_answered": answered,
                                  "spot_check_not_counted": len(checks) - answered})
    tracking.log_dict(run_id, {**measured.table(), "answered_this_run": answered,
                               "not_counted_this_run": len(checks) - answered}, "spot_checks/audit.json")
    if measured.checked:
        low, high = measured.overall.interval
        print(f"spot checks: auto-label precision {measured.precision:.3f} (95 % {low:.3f}-{high:.3f}) over "
              f"{measured.checked} checks, {answered} answered in this run", flush=True)
    return measured


def _revert_below_target(params: IngestParams, dataset: Path, measured: SpotCheckAudit, run_id: str) -> list[str]:
    """Take back the auto-labels of every model version the spot checks show below the target."""
    from tasks.labeling.revert import revert_auto_labels

    reverted = []
    for version, tally in versions_below_target(measured, params.revert_below_precision,
                                                params.revert_min_checks).items():
        low, high = tally.interval
        why = (f"spot checks: precision {tally.precision:.3f} (95 % {low:.3f}-{high:.3f}) over {tally.checked} "
               f"checks, below the target {params.revert_below_precision:g}")
        get_run_logger().warning("reverting the auto-labels of %s: %s", version, why)
        if revert_auto_labels(dataset, version, params.dataset_name, message=why).removed:
            reverted.append(version)
    if reverted:
        tracking.set_tags(run_id, {"reverted_model_versions": ",".join(reverted)})
    return reverted


def _spot_check_fields(measured: SpotCheckAudit, checks: list) -> dict:
    return {
        "spot_checks_answered": sum(c.agreed is not None for c in checks),
        "spot_check_n": measured.checked, "spot_check_agreed": measured.agreed,
        "spot_check_precision": measured.precision, "spot_check_interval": list(measured.overall.interval or ()),
        "spot_check_by_version": {k: t.as_dict() for k, t in measured.by_version.items()},
        "spot_check_by_run": {k: t.as_dict() for k, t in measured.by_run.items()},
    }


def _skipped(logger, reason: str, started: float) -> IngestResult:
    # one warning line, not a traceback: the schedule fires again and finds the work once it exists
    logger.warning("ingest skipped: %s", reason)
    return IngestResult(skipped=reason, seconds=time.perf_counter() - started)
