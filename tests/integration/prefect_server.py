"""A real Prefect server for integration tests (not the in-process test harness).

`prefect server start` runs as a subprocess on a free loopback port with its own PREFECT_HOME
(SQLite database) under the test's temporary folder; the fixture waits for `/api/health`, yields a
handle with the API URL and the environment a child process (an executor started with `serve`)
needs to talk to it, and stops the server's whole process group at the end.

Reuse from any test module:

    from tests.integration.prefect_server import prefect_server, prefect_api  # noqa: F401

`prefect_api` additionally points this test process's Prefect client at the server.

The scheduler's loop is 60 s by default (`PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS`);
here it is 2 s so short-interval schedules are visible within seconds. Startup takes 20-60 s on
a 2-core machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# Settings that make a test server fast to react; every one is an ordinary Prefect 3.9 setting.
FAST_SERVER_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PrefectServer:
    url: str  # the API URL, http://127.0.0.1:PORT/api
    home: Path
    process: subprocess.Popen
    log: Path
    env: dict[str, str] = field(default_factory=dict)  # environment for a client process (PREFECT_API_URL set)


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return env


@contextmanager
def start_prefect_server(home: Path, *, ui: bool = False, extra_env: dict[str, str] | None = None,
                         startup_timeout_s: float = 180.0) -> Iterator[PrefectServer]:
    """Start `prefect server start` on a free loopback port; stop its process group on exit."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = _clean_env(home) | FAST_SERVER_ENV | {"PREFECT_UI_ENABLED": "true" if ui else "false"} | (extra_env or {})
    log = home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {proc.returncode}: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server not healthy after {startup_timeout_s:.0f}s: "
                                   f"{log.read_text()[-3000:]}")
            time.sleep(0.5)
        client_env = _clean_env(home) | {"PREFECT_API_URL": url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                                         "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
        yield PrefectServer(url=url, home=home, process=proc, log=log, env=client_env)
    finally:
        stop_process_group(proc)


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM the process group `proc` leads (it was started with start_new_session), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> Iterator[PrefectServer]:
    """A running Prefect server (SQLite under a temporary PREFECT_HOME), stopped after the module."""
    with start_prefect_server(tmp_path_factory.mktemp("prefect-home")) as server:
        yield server


@pytest.fixture(scope="module")
def prefect_server_on_postgres(tmp_path_factory) -> Iterator[PrefectServer]:
    """A running Prefect server whose database is on a throwaway PostgreSQL (as `saofu up
    --prefect-db postgres` runs it), both stopped after the module."""
    from services.postgres import ensure_database, running_postgres

    tmp = tmp_path_factory.mktemp("prefect-on-postgres")
    with running_postgres(tmp) as pg:
        url = ensure_database("prefect", pg.state_dir)
        env = {"PREFECT_API_DATABASE_CONNECTION_URL": url, "PGPASSFILE": str(pg.passfile)}
        with start_prefect_server(tmp / "prefect-home", extra_env=env) as server:
            yield server


@pytest.fixture
def prefect_api(prefect_server) -> Iterator[str]:
    """This process's Prefect client pointed at the real server for the test; yields the API URL."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}):
        yield prefect_server.url
