"""PostgreSQL as a real service on loopback: SQL round trip, idempotent start, busy port, stop, shared study."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import optuna
import pytest
import sqlalchemy as sa

from saofu.errors import SaofuError
from services import postgres as postgres_service
from services.postgres import (
    PostgresHandle,
    find_binaries,
    postgres_status,
    running_postgres,
    start_postgres,
    stop_postgres,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def postgres(tmp_path_factory) -> Iterator[PostgresHandle]:
    """One throwaway server for the module's read-only checks (a cluster takes a second or two to make).

    Its URL names no password: libpq reads the role's from the server's passfile, as `psql` would.
    """
    with running_postgres(tmp_path_factory.mktemp("pg")) as handle, pytest.MonkeyPatch.context() as mp:
        mp.setenv("PGPASSFILE", str(handle.passfile))
        yield handle


def _refused(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_sql_round_trip(postgres):
    assert postgres.url == f"postgresql+psycopg2://saofu@127.0.0.1:{postgres.port}/saofu"
    engine = sa.create_engine(postgres.url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE trial_notes (id serial PRIMARY KEY, note text NOT NULL)"))
            conn.execute(sa.text("INSERT INTO trial_notes (note) VALUES (:a), (:b)"), {"a": "fu", "b": "福"})
        with engine.connect() as conn:
            notes = conn.execute(sa.text("SELECT note FROM trial_notes ORDER BY id")).scalars().all()
            who = conn.execute(sa.text("SELECT current_user, inet_server_addr()::text")).one()
    finally:
        engine.dispose()
    assert notes == ["fu", "福"]
    assert who[0] == "saofu" and who[1].startswith("127.0.0.1")


def test_runs_unprivileged_and_writes_its_log(postgres):
    # PostgreSQL refuses root: as root the service must have handed the server to another OS user
    owner = os.stat(f"/proc/{postgres.pid}").st_uid
    assert owner == os.geteuid() if os.geteuid() != 0 else owner != 0
    assert postgres.log_path.is_file() and "database system is ready" in postgres.log_path.read_text()


def test_start_is_idempotent(postgres):
    again = start_postgres(postgres.state_dir, port=postgres.port, fsync=False)
    assert (again.pid, again.url) == (postgres.pid, postgres.url)
    assert postgres_status(postgres.state_dir) == postgres
    with pytest.raises(SaofuError, match=f"already runs on port {postgres.port}"):
        start_postgres(postgres.state_dir, port=postgres.port + 1, fsync=False)


def test_second_cluster_on_busy_port_is_refused(postgres, tmp_path):
    other = tmp_path / "other"
    with pytest.raises(SaofuError, match=rf"port {postgres.port} on 127\.0\.0\.1 is in use"):
        start_postgres(other, port=postgres.port, fsync=False)
    assert not (other / "data").exists()  # refused before a cluster was made
    assert postgres_status(postgres.state_dir).pid == postgres.pid  # the first server is untouched


def test_optuna_study_shared_by_two_workers(postgres):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(storage=postgres.url, study_name="arch-search", direction="minimize")
    # two loads, each with its own storage and connection pool: as two workers would
    worker_a = optuna.load_study(study_name="arch-search", storage=postgres.url)
    worker_b = optuna.load_study(study_name="arch-search", storage=postgres.url)
    worker_a.optimize(lambda t: (t.suggest_float("x", -2, 2) - 1) ** 2, n_trials=3)
    worker_b.optimize(lambda t: (t.suggest_float("x", -2, 2) - 1) ** 2, n_trials=2)
    assert len(worker_a.trials) == len(worker_b.trials) == 5  # each sees the other's trials
    assert {t.number for t in worker_a.trials} == set(range(5))
    assert worker_a.best_trial.number == worker_b.best_trial.number


def test_stop_really_stops(tmp_path):
    with running_postgres(tmp_path) as handle:
        assert not _refused(handle.port)
        assert stop_postgres(handle.state_dir) is True
        assert postgres_status(handle.state_dir) is None
        assert _refused(handle.port)
        engine = sa.create_engine(handle.url, connect_args={"connect_timeout": 3})
        with pytest.raises(sa.exc.OperationalError, match="refused"):
            engine.connect()
        engine.dispose()
        assert stop_postgres(handle.state_dir) is False  # nothing left to stop
    assert _gone(handle.pid)


def _gone(pid: int, timeout: float = 5.0) -> bool:
    """True once `pid` has exited (a zombie awaiting its reaper counts: the postmaster reparents to init)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_missing_binaries_say_what_was_searched(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(postgres_service, "VERSIONED_BIN_GLOB", str(tmp_path / "none" / "*" / "bin"))
    with pytest.raises(SaofuError, match=r"initdb, pg_ctl, postgres.*apt-get install postgresql"):
        find_binaries()
