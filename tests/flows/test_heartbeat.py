"""`flows.heartbeat.without_heartbeat`: subflows (and command-line runs) start no heartbeat thread,
whose join at the run's end costs up to a second; the flow around them keeps its own."""

from __future__ import annotations

import threading

import pytest
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

from flows.heartbeat import without_heartbeat


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _heartbeat_threads() -> int:
    """Live threads running Prefect's flow-run heartbeat loop (`prefect.flow_engine._send_heartbeats`)."""
    return sum(1 for t in threading.enumerate()
               if any(getattr(a, "__name__", "") == "heartbeat_loop" for a in getattr(t, "_args", ())))


@flow
def _child() -> int:
    return _heartbeat_threads()


@flow
def _parent() -> tuple[int, int, int, int]:
    own = _heartbeat_threads()
    plain = _child()
    with without_heartbeat():
        quiet = _child()
    return own, plain, quiet, _heartbeat_threads()


@pytest.mark.timeout(120)
def test_a_subflow_run_without_heartbeat_starts_no_thread_and_its_parent_keeps_its_own(prefect_api):
    assert _heartbeat_threads() == 0
    own, plain, quiet, after = _parent()
    assert own == 1  # the parent's (Prefect's default: every flow run beats)
    assert plain == 2  # a plain subflow adds its own
    assert quiet == 1  # under without_heartbeat it does not; the parent's goes on
    assert after == 1


@pytest.mark.timeout(120)
def test_a_command_line_run_without_heartbeat_has_none_nor_its_subflows(prefect_api):
    with without_heartbeat():  # as saofu.cli.common.run_flow runs a flow
        assert _parent() == (0, 0, 0, 0)
