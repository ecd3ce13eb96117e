"""Faults injected into a running saofu, one function per kind, each returning the `Case`s it tried.

Every fault is real where it can be without root: a Label Studio that drops every connection or
answers 503 (a socket server on loopback), an MLflow tracking server (`mlflow server`, as
`services/mlflow_server.py` starts it) cut off behind a loopback proxy or killed with SIGKILL in the
middle of a registration, a `saofu step train` process and a search worker process killed with
SIGKILL, a `saofu serve` process stopped with SIGTERM under load and started again. Only the full
disk is simulated: an unprivileged process cannot mount a size-limited filesystem, so the pool
writer's files are opened through a stand-in for the kernel's `write` that writes what fits and
then raises `OSError(ENOSPC)`, exactly what a full filesystem does (a short write, then ENOSPC).

What each case checks is what must survive the fault: the dataset, cursor and data versions of an
ingest; the champion alias and every version an alias names; the training epochs already done; the
search trial the dead worker held; the champion answering after a restart, and every answered
request in the pool; the pool's index and images. `lost` counts rows or files that did not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from bench.reliability.faults_processes import pool_disk_full, search_worker_killed, serving_restarted, training_killed
from bench.reliability.faults_services import label_studio_unreachable, mlflow_unreachable
from bench.reliability.section import Case, Section

# ------------------------------------------------------------------------------------------- section

FAULTS: tuple[Callable[[Path], list[Case]], ...] = (
    label_studio_unreachable, mlflow_unreachable, training_killed, search_worker_killed, serving_restarted,
    pool_disk_full,
)


def run_faults(workdir: str | Path) -> Section:
    """Inject every fault kind under `workdir` (one folder per kind); counts `fault_kinds` and
    `rows_or_files_lost`. A fault whose harness itself breaks is one failed case, not a crash."""
    workdir = Path(workdir)
    started = time.perf_counter()
    section = Section("faults")
    for fault in FAULTS:
        try:
            section.cases += fault(workdir)
        except Exception as exc:  # noqa: BLE001 - report it as a case: the other faults still run
            section.cases.append(Case(fault.__name__.replace("_", "-"), fault.__name__, "the fault injected",
                                      f"the harness failed: {type(exc).__name__}: {exc}", ok=False))
    section.counts = {"fault_kinds": len({c.kind for c in section.cases}),
                      "rows_or_files_lost": sum(c.lost for c in section.cases)}
    section.seconds = time.perf_counter() - started
    return section
