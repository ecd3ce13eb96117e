"""`flows.heartbeat.without_heartbeat`: subflows (and command-line runs) start no heartbeat thread,
whose join at the run's end costs up to a second; the flow around them keeps its own."""

from __future__ import annotations

import threading

import pytest
from prefect import flow
from prefect.runtime import flow_run
from prefect.testing.utilities import prefect_test_harness

from flows.heartbeat import without_heartbeat


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _own_heartbeats() -> int:
    """Live heartbeat threads of the current flow run: threads running Prefect's `heartbeat_loop`
    (`prefect.flow_engine._send_heartbeats`) whose engine runs this flow run. Counted by run, so a
    thread another test's flow left behind (joined with a timeout) cannot be taken for one."""
    me = str(flow_run.get_id())
    count = 0
    for thread in threading.enumerate():
        for loop in getattr(thread, "_args", ()):
            if getattr(loop, "__name__", "") != "heartbeat_loop":
                continue
            cells = dict(zip(loop.__code__.co_freevars, (c.cell_contents for c in loop.__closure__ or ())))
            engine_run = getattr(cells.get("engine"), "flow_run", None)
            count += str(getattr(engine_run, "id", "")) == me
    return count


@flow
def _child() -> int:
    return _own_heartbeats()


@flow
def _parent() -> tuple[int, int, int, int]:
    own = _own_heartbeats()
    plain = _child()
    with without_heartbeat():
        quiet = _child()
    return own, plain, quiet, _own_heartbeats()


@pytest.mark.timeout(120)
def test_a_subflow_run_without_heartbeat_has_none_and_its_parent_keeps_its_own(prefect_api):
    own, plain, quiet, after = _parent()
    assert own == 1  # Prefect's default: every flow run beats ...
    assert plain == 1  # ... a subflow too
    assert quiet == 0  # not under without_heartbeat
    assert after == 1  # and the parent's goes on


@pytest.mark.timeout(120)
def test_a_command_line_run_without_heartbeat_has_none_nor_its_subflows(prefect_api):
    with without_heartbeat():  # as saofu.cli.common.run_flow runs a flow
        assert _parent() == (0, 0, 0, 0)
