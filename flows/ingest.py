"""The ingest flow: Label Studio annotations → validated dataset → a DVC data version.

export completed annotations (since the last ingest) → majority labels → a staged copy of the
dataset with the new rows → Great Expectations suite → (pass) swap it in, advance the cursor,
create a data version; (fail) discard the copy, log the report, stop: no data version, and the
cursor stays where it was so the same annotations are retried once fixed in Label Studio.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from saofu.errors import SaofuError
from tasks import tracking
from tasks.data.manifest import add_images, read_manifest
from tasks.data.validation import validate_dataset
from tasks.data.versions import create_version, version_of
from tasks.labeling.client import completed_annotations, connect, ensure_project, latest_update
from tasks.labeling.ingest import (
    IngestState,
    commit_staged,
    discard_staged,
    staged_copy,
    to_manifest_rows,
)


class IngestParams(BaseModel):
    """Parameters of one ingest run."""

    project: str = Field("fu-recognizer", min_length=1, description="Label Studio project title.")
    dataset_dir: str = Field(..., description="The labelled dataset (ImageFolder tree + manifest.csv).")
    dataset_name: str = Field("fu", min_length=1, description="Name of the dataset's DVC versions.")
    classes: list[str] | None = Field(
        None, description="The class set; empty: the classes already in the dataset's manifest."
    )
    experiment: str = Field("saofu-ingest", min_length=1)


class IngestResult(BaseModel):
    project_id: int
    tasks_seen: int
    added: int
    already_present: int
    ties: list[dict]
    skipped: int
    data_version: str | None
    validation_docs: str | None
    seconds: float = 0.0  # the flow body's wall time


@task(name="find-project", retries=2, retry_delay_seconds=3)
def find_project(project: str, classes: list[str]) -> int:
    return ensure_project(connect(), project, classes)


@task(name="fetch-annotations", retries=2, retry_delay_seconds=3)
def fetch_annotations(project_id: int, cursor: str | None) -> list[dict]:
    return completed_annotations(connect(), project_id, since=cursor)


@task(name="validate-dataset")
def validate(dataset_dir: str, classes: list[str], docs_dir: str):
    return validate_dataset(dataset_dir, classes=classes, docs_dir=Path(docs_dir))


@task(name="create-data-version", retries=1, retry_delay_seconds=3)
def version_dataset(dataset_dir: str, name: str, message: str) -> str:
    return version_of(dataset_dir) or create_version(dataset_dir, name, message).id


def add_validated(dataset: Path, rows: list[dict], classes: list[str], run_id: str):
    """Add labelled rows to a staged copy of `dataset`, run the validation suite, swap it in if it passes.

    Returns:
        (the rows added, the validation report).

    Raises:
        SaofuError: the suite failed (the dataset is left as it was; the report is logged to the run).
    """
    staging = staged_copy(dataset)
    try:
        added = add_images(staging, rows)
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
    return added, validation


@flow(name="ingest", log_prints=True)
def ingest_flow(params: IngestParams) -> IngestResult:
    """Ingest the annotations completed since the last run; version the dataset if it changed."""
    started = time.perf_counter()
    logger = get_run_logger()
    dataset = Path(params.dataset_dir)
    classes = params.classes or sorted({r["label"] for r in read_manifest(dataset)})
    if not classes:
        raise SaofuError(f"no classes given and no manifest in {dataset} to take them from")
    project_id = find_project(params.project, classes)
    state = IngestState.load(dataset, project_id)
    records = fetch_annotations(project_id, state.cursor)
    rows, report = to_manifest_rows(records)
    run_id = tracking.start_run(params.experiment, "ingest", params.model_dump(),
                                {"prefect_flow_run_id": str(flow_run.get_id() or "")})
    try:
        added, validation = add_validated(dataset, rows, classes, run_id)
    except BaseException:
        tracking.finish_run(run_id, "FAILED")
        raise
    report.added = added
    report.already_present = len(rows) - len(added)
    newest = latest_update(records)
    if newest is not None:
        state.cursor = newest.isoformat()
        state.save(dataset)
    data_version = version_dataset(str(dataset), params.dataset_name, f"ingest: {len(added)} human labels")
    summary = report.summary()
    tracking.log_metrics(run_id, {k: v for k, v in summary.items() if isinstance(v, int)})
    tracking.set_tags(run_id, {"data_version": data_version})
    tracking.finish_run(run_id)
    logger.info("ingest: %s; data version %s", summary, data_version)
    return IngestResult(
        project_id=project_id, tasks_seen=report.tasks_seen, added=len(added),
        already_present=report.already_present, ties=report.ties, skipped=len(report.skipped),
        data_version=data_version, validation_docs=str(validation.docs_path or ""),
        seconds=time.perf_counter() - started,
    )
