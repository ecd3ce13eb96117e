"""The stack's choices without servers: where the Prefect server keeps its database, and when the
executor counts as ready. The real servers are in tests/integration/test_prefect_on_postgres.py."""

from __future__ import annotations

import pytest

from saofu.errors import SaofuError
from services import prefect_server, process, stack

pytestmark = pytest.mark.timeout(60)


def test_prefect_db_explicit_then_remembered_then_sqlite(saofu_home):
    assert stack.resolve_prefect_db(None) == "sqlite"
    stack._remember(prefect_db="postgres")
    assert stack.resolve_prefect_db(None) == "postgres"
    assert stack.resolve_prefect_db("sqlite") == "sqlite"
    with pytest.raises(SaofuError, match=r"--prefect-db must be one of sqlite, postgres, not 'mysql'"):
        stack.resolve_prefect_db("mysql")


def test_the_server_gets_the_stacks_database_not_the_shells(saofu_home, monkeypatch):
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "sqlite+aiosqlite:////elsewhere.db")
    _, env, _ = prefect_server.server_command(4200)
    assert "PREFECT_API_DATABASE_CONNECTION_URL" not in env  # SQLite under PREFECT_HOME
    assert env["PREFECT_HOME"] == str(saofu_home / ".saofu" / "prefect")
    url = "postgresql+asyncpg://saofu@127.0.0.1:5433/prefect"
    _, env, _ = prefect_server.server_command(4200, database_url=url, passfile=saofu_home / "pgpass")
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"] == url
    assert env["PGPASSFILE"] == str(saofu_home / "pgpass")


def test_prefect_on_postgres_refuses_to_start_without_it(saofu_home, monkeypatch):
    from services import postgres

    monkeypatch.setattr(postgres, "postgres_status", lambda state_dir=None: None)
    with pytest.raises(SaofuError, match="its database is on PostgreSQL, which does not run"):
        stack._prefect_command(4200, "postgres")


def test_down_stops_the_postgres_prefect_keeps_its_database_on_last(saofu_home, monkeypatch):
    from services import labeling, postgres

    stopped = []
    monkeypatch.setattr(process, "stop", lambda name, timeout=None: stopped.append(name) or True)
    monkeypatch.setattr(labeling, "stop", lambda: stopped.append("labeling") or False)
    monkeypatch.setattr(postgres, "stop_postgres", lambda: stopped.append("postgres") or True)
    stack.down()
    assert stopped == ["serving", "labeling", "mlflow", "executor", "prefect"]  # SQLite: nothing more
    stopped.clear()
    stack._remember(prefect_db="postgres")
    stack.down()
    assert stopped == ["serving", "labeling", "mlflow", "executor", "prefect", "postgres"]
    stopped.clear()
    stack.down(["prefect"])  # named: only that one
    assert stopped == ["prefect"]


def test_the_executor_is_ready_on_the_line_it_prints_after_registering(saofu_home, monkeypatch, capsys):
    """`saofu up` waits for the executor's ready line; a line it never prints cost every `up` 60 s."""
    import prefect.runner

    from flows import deployments

    registered, options = [], {}

    class FakeRunner:  # records what the executor registers; `start` returns at once
        def __init__(self, **kwargs):
            options.update(kwargs)

        def add_flow(self, flow, **kwargs):
            registered.append(kwargs["name"])

        async def start(self):
            return None

    monkeypatch.setattr(prefect.runner, "Runner", FakeRunner)
    deployments.serve_all()
    printed = capsys.readouterr().out
    assert sorted(registered) == sorted(deployments.NAMES)
    # schedules stay active when it stops; a click waits at most POLL_S for it, not Prefect's 10 s
    assert options["pause_on_shutdown"] is False and options["query_seconds"] == deployments.POLL_S == 2
    log = saofu_home / "executor.log"
    log.write_text(f"{prefect_server.SAOFU_LOG_MARK} at now ===\n{printed}")
    monkeypatch.setattr(prefect_server, "deployment_names", lambda url: sorted(registered))
    assert prefect_server.executor_healthy("http://127.0.0.1:4200", log, started_epoch=None)
    # before the line (deployments still being registered), it is not ready
    log.write_text(f"{prefect_server.SAOFU_LOG_MARK} at now ===\n")
    assert not prefect_server.executor_healthy("http://127.0.0.1:4200", log, started_epoch=None)
