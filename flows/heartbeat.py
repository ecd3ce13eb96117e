"""Flow runs without Prefect's heartbeat thread, where a heartbeat costs more than it tells.

Prefect 3.9 starts a heartbeat thread for every flow run, subflows included (`flows.heartbeat_frequency`,
180 s by default); the thread sleeps in one-second steps and the run's exit joins it, so every flow
run ends up to 1 s late (0.5 s on average; up to 2 s while a beat is being sent;
`prefect.flow_engine._send_heartbeats`). Measured in the fast retrain (`flows.fast_retrain`): the
ingest subflow's exit waited 0.96 s after its body returned (the Label Studio test, DEBUG log);
`saofu bench fast-retrain`'s orchestration share went from 2.9-4.9 % to 0.9 % without these
threads. Two cases gain nothing from the beat:

* a subflow runs in its parent's process, whose own heartbeat already says the process is alive;
* a run started from the command line (`saofu train`, `saofu fast-retrain`) is watched by the
  command that started it.

Deployment runs (the executor's, the Prefect UI's clicks) keep their own heartbeat.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def without_heartbeat() -> Iterator[None]:
    """Flow runs started inside this block (in this thread), and their subflows, have no heartbeat thread."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
