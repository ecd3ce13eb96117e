"""The local PostgreSQL asks for a password on loopback, and never admits its superuser there (issue 15, hole 2).

A real throwaway server on 127.0.0.1. Any local user can reach a loopback port, and a superuser
session runs `COPY ... TO PROGRAM` as the server's OS user: TCP must take a password, the study
role must be an ordinary one, and its password must sit in a file only its owner reads. A
cluster made the old way (trust on TCP) is migrated when it is started again.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import psycopg2.errors
import pytest
import sqlalchemy as sa

from services import postgres as pg
from services.postgres import PostgresHandle, running_postgres, start_postgres, stop_postgres

_OLD_HBA = (  # what saofu wrote before passwords
    "local   all   all                  trust\n"
    "host    all   all   127.0.0.1/32   trust\n"
)


@pytest.fixture(scope="module")
def postgres(tmp_path_factory) -> Iterator[PostgresHandle]:
    with running_postgres(tmp_path_factory.mktemp("pg-auth")) as handle:
        yield handle


@pytest.fixture(autouse=True)
def _no_ambient_password(monkeypatch, tmp_path):
    """libpq must not find a password anywhere but where a test hands it one."""
    empty = tmp_path / "empty-pgpass"
    empty.write_text("")
    empty.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(empty))
    monkeypatch.delenv("PGPASSWORD", raising=False)


def _password(handle: PostgresHandle) -> str:
    line = next(li for li in handle.passfile.read_text().splitlines() if li.split(":")[3] == handle.user)
    return line.split(":", 4)[4]


def _tcp(handle: PostgresHandle, user: str, password: str | None = None):
    kw = {"password": password} if password is not None else {}
    return psycopg2.connect(host="127.0.0.1", port=handle.port, user=user, dbname=handle.database,
                            connect_timeout=5, **kw)


def _refused(handle: PostgresHandle, user: str, password: str | None = None) -> bool:
    try:
        _tcp(handle, user, password).close()
    except psycopg2.OperationalError as exc:
        assert "password" in str(exc) or "pg_hba" in str(exc), exc
        return True
    return False


@pytest.mark.timeout(120)
def test_no_password_and_a_wrong_one_are_refused(postgres):
    assert _refused(postgres, postgres.user)
    assert _refused(postgres, postgres.user, "not-the-password")
    assert _refused(postgres, postgres.user, _password(postgres) + "x")


@pytest.mark.timeout(120)
def test_the_superuser_is_refused_on_tcp(postgres):
    assert _refused(postgres, pg.SUPERUSER)
    assert _refused(postgres, pg.SUPERUSER, "")
    assert _refused(postgres, pg.SUPERUSER, _password(postgres))


@pytest.mark.timeout(120)
def test_the_study_role_is_ordinary_and_cannot_run_programs(postgres):
    conn = _tcp(postgres, postgres.user, _password(postgres))
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user")
            assert cur.fetchone() == (False, False, False)
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                cur.execute("COPY (SELECT 1) TO PROGRAM 'true'")
            cur.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()")
            assert cur.fetchone() == (postgres.user,)  # it owns the study database: Optuna makes its tables
    finally:
        conn.close()


@pytest.mark.timeout(120)
def test_the_password_lives_in_a_private_passfile_libpq_reads(postgres, monkeypatch):
    info = postgres.passfile.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid()
    assert stat.S_IMODE((postgres.state_dir / "socket").stat().st_mode) == 0o700  # the trusted socket is closed
    assert _password(postgres) not in postgres.url and ":" not in postgres.url.split("//")[1].split("@")[0]
    hba = [line.split() for line in (postgres.data_dir / "pg_hba.conf").read_text().splitlines()
           if line.strip() and not line.startswith("#")]
    assert all(fields[-1] != "trust" for fields in hba if fields[0] == "host")
    assert _password(postgres) not in postgres.log_path.read_text()  # the role's password is sent hashed
    assert stat.S_IMODE(postgres.log_path.stat().st_mode) == 0o600
    monkeypatch.setenv("PGPASSFILE", str(postgres.passfile))  # the libpq format: psql and workers read it too
    engine = sa.create_engine(postgres.url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT current_user")).scalar() == postgres.user
    finally:
        engine.dispose()


def _as_superuser(handle: PostgresHandle, sql: str) -> None:
    conn = psycopg2.connect(host=str(handle.state_dir / "socket"), port=handle.port, user=pg.SUPERUSER,
                            dbname="postgres", connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def _make_old_style(handle: PostgresHandle) -> None:
    """Turn the cluster into one saofu made before passwords: trust on TCP, no passfile."""
    pg._write_owned(handle.data_dir / "pg_hba.conf", _OLD_HBA, pg._server_os_user(handle.data_dir))
    handle.passfile.unlink()


def _eventually(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.timeout(240)
def test_a_cluster_made_the_old_way_is_migrated_running_or_stopped(tmp_path: Path):
    with running_postgres(tmp_path) as handle:
        # an old server, still running and trusting every loopback connection
        _make_old_style(handle)
        _as_superuser(handle, "SELECT pg_reload_conf()")
        assert _eventually(lambda: not _refused(handle, pg.SUPERUSER))

        again = start_postgres(handle.state_dir, port=handle.port, fsync=False)
        assert again.pid == handle.pid  # migrated in place, not restarted
        assert stat.S_IMODE(handle.passfile.stat().st_mode) == 0o600
        assert _eventually(lambda: _refused(handle, pg.SUPERUSER))
        assert _refused(handle, handle.user)
        assert not _refused(handle, handle.user, _password(handle))

        # an old cluster found stopped: it must not come up trusting TCP, even for a moment
        assert stop_postgres(handle.state_dir)
        _make_old_style(handle)
        again = start_postgres(handle.state_dir, port=handle.port, fsync=False)
        assert _refused(again, pg.SUPERUSER) and _refused(again, again.user)
        assert not _refused(again, again.user, _password(again))
