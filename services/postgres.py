"""PostgreSQL as a real local service on loopback: the shared Optuna study store of a multi-worker search.

Size: one module on purpose (~700 lines): one server's lifecycle over one state folder. Binaries, cluster,
OS user and start/stop share the path helpers, `_OsUser` and `_run_as`; tests patch `VERSIONED_BIN_GLOB` here.

A search keeps its study in SQLite by default; several workers writing one study need a server
(`saofu search --workers N --storage postgresql://...`). `start_postgres` creates a cluster once
(`initdb`), starts it with `pg_ctl -w` on 127.0.0.1 only and creates the study's role and database;
`stop_postgres` stops it (`pg_ctl stop -m fast`). `running_postgres` is a throwaway server for tests.

State (all under `$SAOFU_HOME/.saofu/postgres/`, nothing created at import):

    data/              the cluster; `data/postmaster.pid` (written by PostgreSQL) holds its pid and port
    socket/            the server's unix socket: only its owner (and root) may enter
    pgpass             the study role's password (libpq's passfile format, mode 0600): made at the
                       first start, read by `tasks.search.study.make_storage`, never put in a URL
    postgres.json      database and role of the last start (what `postgres_status` reports)
    postgres.log       the server's output

Authentication: TCP (127.0.0.1 only) takes a password (scram-sha-256), and the superuser, which has
none, is rejected there: any local user can reach a loopback port, and a superuser session runs
`COPY ... TO PROGRAM` as the server's OS user. The study role is an ordinary one owning its
database. The unix socket trusts whoever reaches it, and its folder is closed to everyone except
the server's owner (and root): saofu creates the role and database through it as the superuser.
A cluster made before passwords (trust on TCP) is migrated at its next start: role password set,
pg_hba rewritten, configuration reloaded.

PostgreSQL refuses to run as root. As root, the server runs as the owner of an existing cluster,
else as the `postgres` system user (created when missing); the cluster's files belong to that user,
and it must be able to enter the state folder, which `start_postgres` checks.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from saofu.errors import SaofuError
from saofu.settings import get_settings
from services.process import pid_runs, port_free

HOST = "127.0.0.1"
DEFAULT_PORT = 5433  # not 5432: a system PostgreSQL may already listen there
DEFAULT_DATABASE = "saofu"
DEFAULT_USER = "saofu"
SUPERUSER = "postgres"  # the cluster's bootstrap superuser (`initdb -U`); only creates the role and database
SERVER_OS_USER = "postgres"  # who runs the server when we are root (Debian's package creates this user)
BINARY_NAMES = ("initdb", "pg_ctl", "postgres")
VERSIONED_BIN_GLOB = "/usr/lib/postgresql/*/bin"  # Debian/Ubuntu keep each major version's server here
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with its NUL; PostgreSQL refuses longer socket paths
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class PostgresHandle:
    """A running PostgreSQL server started by `start_postgres`.

    Attributes:
        url: SQLAlchemy URL of the study database, e.g. postgresql+psycopg2://saofu@127.0.0.1:5433/saofu;
            no password in it: `passfile` holds it
        port: TCP port on 127.0.0.1
        pid: the postmaster's process id
        data_dir: the cluster's folder
        log_path: the server's log file
        state_dir: the folder holding all of the above (what `stop_postgres` takes)
        database: the study database
        user: the role owning it (not a superuser)
        passfile: the role's password in libpq's passfile format (0600; `PGPASSFILE=... psql` works)
    """

    url: str
    port: int
    pid: int
    data_dir: Path
    log_path: Path
    state_dir: Path
    database: str
    user: str
    passfile: Path


@dataclass(frozen=True)
class _OsUser:
    """The unprivileged OS account a root-started server runs as."""

    name: str
    uid: int
    gid: int


# --------------------------------------------------------------------------------------- paths


def default_state_dir() -> Path:
    """`$SAOFU_HOME/.saofu/postgres`: where the local server keeps its cluster, log and state."""
    return get_settings().home / ".saofu" / "postgres"


def _resolve_state_dir(state_dir: Path | None) -> Path:
    return Path(state_dir).expanduser().resolve() if state_dir else default_state_dir()


def _data_dir(state_dir: Path) -> Path:
    return state_dir / "data"


def _socket_dir(state_dir: Path) -> Path:
    return state_dir / "socket"


def _log_file(state_dir: Path) -> Path:
    return state_dir / "postgres.log"


def _state_file(state_dir: Path) -> Path:
    return state_dir / "postgres.json"


def passfile(state_dir: Path | None = None) -> Path:
    """The study roles' passwords of the server on `state_dir` (default: the local one), libpq format."""
    return _resolve_state_dir(state_dir) / "pgpass"


def _progress(message: str) -> None:
    # stderr, so commands that print JSON on stdout stay parseable
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ binaries


def _version_key(bin_dir: str) -> tuple[int, ...]:
    """(15,) for /usr/lib/postgresql/15/bin: sorts major versions numerically (10 after 9)."""
    return tuple(int(n) for n in re.findall(r"\d+", Path(bin_dir).parent.name)) or (0,)


def find_binaries() -> dict[str, Path]:
    """The server binaries `initdb`, `pg_ctl` and `postgres`, all from one folder.

    PATH is searched first, then `/usr/lib/postgresql/<version>/bin`, newest version first (Debian
    puts only client wrappers on PATH). One folder must hold all three: `pg_ctl` starts the
    `postgres` beside it.

    Returns:
        {"initdb": path, "pg_ctl": path, "postgres": path}
    """
    path_dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    versioned = sorted(glob.glob(VERSIONED_BIN_GLOB), key=_version_key, reverse=True)
    for folder in [*path_dirs, *versioned]:
        found = {name: Path(folder) / name for name in BINARY_NAMES}
        # os.path.isfile, not Path.is_file: a PATH folder we may not enter (/root/... as another user) is skipped
        if all(os.path.isfile(p) and os.access(p, os.X_OK) for p in found.values()):
            return found
    raise SaofuError(
        f"PostgreSQL server binaries not found: searched PATH and {VERSIONED_BIN_GLOB} for "
        f"{', '.join(BINARY_NAMES)} (all three in one folder). Install the server, e.g. "
        "`apt-get install postgresql` (Debian/Ubuntu), or put its bin folder on PATH."
    )


def _binaries_major_version(binaries: dict[str, Path]) -> str:
    """The major version of the found server, e.g. "15" (`postgres --version` also works as root)."""
    out = subprocess.run([str(binaries["postgres"]), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    return match.group(1) if match else ""


# ------------------------------------------------------------------------------- OS user, files


def _server_os_user(data_dir: Path) -> _OsUser | None:
    """Whom the server runs as: None for the current user, an unprivileged account when we are root.

    A cluster already made keeps its owner (PostgreSQL insists the data folder is the server's own).
    """
    if os.geteuid() != 0:
        return None
    if (data_dir / "PG_VERSION").exists():
        st = data_dir.stat()
        if st.st_uid == 0:
            raise SaofuError(
                f"the PostgreSQL cluster {data_dir} belongs to root, and PostgreSQL refuses to run as root: "
                f"`chown -R {SERVER_OS_USER}: {data_dir}`, or remove it to start afresh"
            )
        try:
            return _os_user(pwd.getpwuid(st.st_uid).pw_name)
        except KeyError:  # a cluster copied from elsewhere: its uid has no name here
            return _OsUser(str(st.st_uid), st.st_uid, st.st_gid)
    return _os_user(SERVER_OS_USER, create=True)


def _os_user(name: str, create: bool = False) -> _OsUser:
    """The OS account `name`; created as a system user (no login, no home) when missing and `create`."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if not create:
            raise SaofuError(f"OS user {name!r} does not exist") from None
        useradd = shutil.which("useradd")
        if useradd is None:
            raise SaofuError(
                f"PostgreSQL refuses to run as root and there is no {name!r} OS user to run it as; "
                f"create one (e.g. `useradd --system {name}`) or start saofu as an ordinary user"
            ) from None
        _progress(f"creating the system user {name!r} to run PostgreSQL (it refuses to run as root)")
        cmd = [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
               "--shell", "/usr/sbin/nologin", name]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise SaofuError(f"creating the OS user {name!r} failed: {result.stderr.strip()}") from None
        entry = pwd.getpwnam(name)
    return _OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _server_env() -> dict[str, str]:
    """Our environment minus libpq/server variables (PGDATA, PGPORT, ...) that would change the server."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _switch_to(os_user: _OsUser | None) -> dict:
    """subprocess arguments that run the child as `os_user`, with its groups (none: as ourselves)."""
    if os_user is None:
        return {}
    try:
        groups = os.getgrouplist(os_user.name, os_user.gid)
    except (KeyError, OSError):  # an account known only by its uid
        groups = [os_user.gid]
    return {"user": os_user.uid, "group": os_user.gid, "extra_groups": groups}


def _run_as(cmd: list[str], os_user: _OsUser | None, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run a PostgreSQL tool as the server's OS user (None: as ourselves), output captured."""
    try:
        # a session of its own: Ctrl-C in the terminal that ran `saofu up` must not reach the server
        return subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=_server_env(),
            cwd=cwd, timeout=timeout, start_new_session=True, **_switch_to(os_user),
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise SaofuError(f"{Path(cmd[0]).name} did not finish within {timeout:g}s: {' '.join(cmd)}") from exc


def _give_to(path: Path, os_user: _OsUser | None) -> None:
    """Hand a file or folder we created to the server's OS user (no-op when it runs as ourselves)."""
    if os_user is not None:
        os.chown(path, os_user.uid, os_user.gid)


def _can_enter(path: Path, os_user: _OsUser) -> bool:
    """True when `os_user` may enter `path` (search permission on it and every folder above it)."""
    result = subprocess.run(
        ["/bin/sh", "-c", 'cd -- "$1"', "sh", str(path)], capture_output=True, cwd="/", **_switch_to(os_user)
    )
    return result.returncode == 0


def _check_reachable(state_dir: Path, os_user: _OsUser) -> None:
    """Fail clearly when the server's OS user cannot reach the state folder (e.g. under a 0700 /root)."""
    if _can_enter(state_dir, os_user):
        return
    blocking = next((p for p in [*reversed(state_dir.parents), state_dir] if not _can_enter(p, os_user)), state_dir)
    mode = f"{blocking.stat().st_mode & 0o777:04o}"
    raise SaofuError(
        f"PostgreSQL refuses to run as root, so saofu runs it as OS user {os_user.name!r}, which cannot "
        f"enter {blocking} (mode {mode}) on the way to {state_dir}. Let it pass (`setfacl -m u:{os_user.name}:x "
        f"{blocking}` or `chmod o+x {blocking}`), or keep the project (SAOFU_HOME) where that user can reach it."
    )


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------------------------- cluster


def _conf_string(value: str) -> str:
    """A postgresql.conf string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _write_owned(path: Path, text: str, os_user: _OsUser | None) -> None:
    """Write a config file in the data folder, readable only by the server's user (as initdb's are)."""
    path.write_text(text)
    path.chmod(0o600)
    _give_to(path, os_user)


def _init_cluster(
    binaries: dict[str, Path], state_dir: Path, data_dir: Path, os_user: _OsUser | None, fsync: bool
) -> None:
    """`initdb` a new cluster: UTF-8, C locale, passwords on 127.0.0.1, trust on the closed socket."""
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)  # PostgreSQL refuses a data folder others can read
    _give_to(data_dir, os_user)
    cmd = [
        str(binaries["initdb"]), "-D", str(data_dir), "-U", SUPERUSER, "-E", "UTF8", "--locale=C",
        "--auth-local=trust", "--auth-host=scram-sha-256", "--no-instructions",
    ]  # fmt: skip
    if not fsync:
        cmd.append("--no-sync")  # throwaway clusters only: seconds saved per test run
    _progress(f"creating a PostgreSQL cluster in {data_dir}")
    result = _run_as(cmd, os_user, cwd=state_dir, timeout=120)
    if result.returncode != 0:
        raise SaofuError(f"initdb failed (exit code {result.returncode}) for {data_dir}:\n{result.stderr.strip()}")
    _write_hba(data_dir, os_user)
    with open(data_dir / "postgresql.conf", "a") as conf:
        conf.write("\n# saofu's settings (port, addresses, socket, fsync), rewritten at every start\n")
        conf.write("include_if_exists = 'saofu.conf'\n")


# Replaces initdb's pg_hba.conf (which also admits ::1 and replication connections). The superuser
# is rejected on TCP even though it has no password to guess: a password set on it later by hand
# must not open `COPY ... TO PROGRAM` to every local user.
_HBA = (
    "# written by saofu at every start: passwords on loopback IPv4 only, never the superuser there;\n"
    "# the socket is trusted because its folder is closed to everyone but the server's owner (and root)\n"
    "local   all   all                          trust\n"
    f"host    all   {SUPERUSER:<8} 127.0.0.1/32   reject\n"
    "host    all   all        127.0.0.1/32   scram-sha-256\n"
)


def _write_hba(data_dir: Path, os_user: _OsUser | None) -> bool:
    """Write saofu's pg_hba.conf; True when it changed (a running server must then reload it)."""
    path = data_dir / "pg_hba.conf"
    try:
        if path.read_text() == _HBA:
            return False
    except OSError:
        pass
    _write_owned(path, _HBA, os_user)
    return True


def _check_cluster(binaries: dict[str, Path], data_dir: Path) -> None:
    """Fail clearly when an existing cluster was made by another major version than the binaries found."""
    made_by = (data_dir / "PG_VERSION").read_text().strip()
    found = _binaries_major_version(binaries)
    if found and made_by != found:
        raise SaofuError(
            f"the cluster in {data_dir} was made by PostgreSQL {made_by}, but the server found "
            f"({binaries['postgres']}) is PostgreSQL {found}: install version {made_by} "
            f"(`apt-get install postgresql-{made_by}`), or remove {data_dir} to start afresh (its studies are lost)"
        )


def _write_server_config(data_dir: Path, socket_dir: Path, port: int, fsync: bool, os_user: _OsUser | None) -> None:
    """The settings saofu owns, in their own file: a manual `pg_ctl start` gets the same server."""
    _write_owned(
        data_dir / "saofu.conf",
        "# written by saofu at every start; edit postgresql.conf instead\n"
        f"listen_addresses = {_conf_string(HOST)}\n"
        f"port = {port}\n"
        f"unix_socket_directories = {_conf_string(str(socket_dir))}\n"
        "password_encryption = 'scram-sha-256'\n"
        f"fsync = {'on' if fsync else 'off'}\n",
        os_user,
    )


def _read_postmaster_pid(data_dir: Path) -> tuple[int, int] | None:
    """(pid, port) from PostgreSQL's own `postmaster.pid`, or None when there is none."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        return int(lines[0]), int(lines[3])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    """True when `pid` runs and is a PostgreSQL server (not a zombie, not a reused pid)."""
    return pid_runs(pid, b"postgres")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# -------------------------------------------------------------------------------- role, database


def _check_name(kind: str, name: str) -> None:
    """Plain lowercase identifiers only: they go into a URL and SQL unquoted by users."""
    if not _NAME_RE.match(name):
        raise SaofuError(
            f"PostgreSQL {kind} name {name!r} is not a plain identifier: use lowercase letters, digits "
            "and _ (at most 63), starting with a letter or _"
        )


def _read_passwords(path: Path) -> dict[str, str]:
    """{role: password} from saofu's passfile (its lines: 127.0.0.1:PORT:*:ROLE:PASSWORD)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    found = {}
    for line in lines:
        fields = line.split(":")
        if len(fields) == 5 and not line.startswith("#"):
            found[fields[3]] = fields[4]
    return found


def _write_passfile(path: Path, port: int, passwords: dict[str, str]) -> None:
    """Write the passfile private from its first byte (a chmod after writing leaves a readable moment)."""
    text = "".join(f"{HOST}:{port}:*:{role}:{secret}\n" for role, secret in sorted(passwords.items()))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _role_password(state_dir: Path, port: int, user: str) -> str:
    """The role's password: the one kept in the passfile, else a new one; the file is rewritten for `port`."""
    path = passfile(state_dir)
    passwords = _read_passwords(path)
    # URL-safe letters only: the passfile's separators (: and \\) never occur in it
    passwords.setdefault(user, secrets.token_urlsafe(24))
    _write_passfile(path, port, passwords)
    return passwords[user]


def _ensure_role_and_database(state_dir: Path, port: int, database: str, user: str, reload: bool) -> None:
    """Create the login role and the database it owns when missing, and give the role its password.

    Runs as the bootstrap superuser through the unix socket (TCP refuses the superuser). The role
    is made (or, for older clusters, turned) an ordinary one: no superuser, no role or database
    creation. Its password is set at every start, so the passfile and the cluster always agree.
    `reload`: pg_hba.conf was just rewritten under a running server.
    """
    import psycopg2  # the project's dependency; imported here so the module loads without libpq
    from psycopg2 import sql
    from psycopg2.extensions import encrypt_password

    password = _role_password(state_dir, port, user)
    try:
        conn = psycopg2.connect(host=str(_socket_dir(state_dir)), port=port, user=SUPERUSER, dbname="postgres",
                                connect_timeout=10)
    except psycopg2.Error as exc:
        raise SaofuError(f"cannot connect to PostgreSQL on {_socket_dir(state_dir)} (port {port}) as {SUPERUSER}: "
                         f"{exc}".strip()) from exc
    try:
        conn.autocommit = True  # CREATE DATABASE refuses to run inside a transaction
        with conn.cursor() as cur:
            cur.execute("SET password_encryption = 'scram-sha-256'")  # a cluster made by hand may default to md5
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,))
            verb = "ALTER" if cur.fetchone() is not None else "CREATE"
            # hashed here (as psql's \\password does): a failed statement lands in the server's log
            verifier = encrypt_password(password, user, conn, "scram-sha-256")
            cur.execute(sql.SQL("{} ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}").format(
                sql.SQL(verb), sql.Identifier(user), sql.Literal(verifier)))
            if reload:
                cur.execute("SELECT pg_reload_conf()")
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if cur.fetchone() is None:
                # the owner may create tables in its public schema (PostgreSQL 15 no longer lets everyone)
                cur.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database), sql.Identifier(user))
                )
    except psycopg2.Error as exc:
        raise SaofuError(f"creating role {user!r} and database {database!r} failed: {exc}".strip()) from exc
    finally:
        conn.close()


def _handle(state_dir: Path, pid: int, port: int, database: str, user: str) -> PostgresHandle:
    return PostgresHandle(
        url=f"postgresql+psycopg2://{user}@{HOST}:{port}/{database}", port=port, pid=pid,
        data_dir=_data_dir(state_dir), log_path=_log_file(state_dir), state_dir=state_dir,
        database=database, user=user, passfile=passfile(state_dir),
    )  # fmt: skip


# ------------------------------------------------------------------------------ start, stop, status


def postgres_status(state_dir: Path | None = None) -> PostgresHandle | None:
    """The handle of the server running on `state_dir`'s cluster, or None when it does not run.

    Args:
        state_dir: the server's state folder; default `default_state_dir()`.
    """
    state_dir = _resolve_state_dir(state_dir)
    running = _read_postmaster_pid(_data_dir(state_dir))
    if running is None or not _pid_alive(running[0]):
        return None
    try:
        state = json.loads(_state_file(state_dir).read_text())
    except (OSError, ValueError):
        state = {}
    pid, port = running
    return _handle(state_dir, pid, port, state.get("database", DEFAULT_DATABASE), state.get("user", DEFAULT_USER))


def start_postgres(
    state_dir: Path | None = None,
    port: int = DEFAULT_PORT,
    database: str = DEFAULT_DATABASE,
    user: str = DEFAULT_USER,
    fsync: bool = True,
    timeout: float = START_TIMEOUT_S,
) -> PostgresHandle:
    """Start PostgreSQL on 127.0.0.1 in the background, creating the cluster, role and database once.

    Starting while the server already runs on `state_dir` returns its handle (creating `database`
    and `user` there if they are new).

    Args:
        state_dir: cluster, log and state; default `$SAOFU_HOME/.saofu/postgres`.
        port: TCP port; one in use by another program is an error.
        database: the database to create (owned by `user`).
        user: the login role to create: an ordinary role (not the superuser) with a password kept
            in `passfile(state_dir)`.
        fsync: False only for throwaway clusters (tests): a crash can then corrupt the cluster.
        timeout: seconds to wait for the server to accept connections.

    Returns:
        The running server's handle (URL, port, pid, data folder, log path).
    """
    _check_name("database", database)
    _check_name("role", user)
    if user == SUPERUSER:
        raise SaofuError(f"role {SUPERUSER!r} is the cluster's superuser, which TCP refuses: name a role of its own")
    if not 0 < port < 65536:
        raise SaofuError(f"port {port} is not a TCP port (1-65535)")
    state_dir = _resolve_state_dir(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(state_dir / ".start.lock"):  # two `saofu up postgres` at once must not race on one cluster
        running = postgres_status(state_dir)
        if running is None:
            return _start_new(state_dir, port, database, user, fsync, timeout)
        if running.port != port:
            raise SaofuError(
                f"PostgreSQL on {state_dir} already runs on port {running.port}, not {port}: "
                "use that port, or stop it first (`saofu down postgres`)"
            )
        _progress(f"PostgreSQL already runs on {HOST}:{running.port} (pid {running.pid})")
        # a server started before passwords trusts TCP: migrate it in place (pg_hba, password, reload)
        changed = _write_hba(running.data_dir, _server_os_user(running.data_dir))
        if changed:
            _progress("PostgreSQL trusted loopback connections: now it asks for passwords (pg_hba.conf rewritten)")
        _ensure_role_and_database(state_dir, running.port, database, user, reload=changed)
        _state_file(state_dir).write_text(json.dumps({"database": database, "user": user}, indent=2))
        return _handle(state_dir, running.pid, running.port, database, user)


def _start_new(state_dir: Path, port: int, database: str, user: str, fsync: bool, timeout: float) -> PostgresHandle:
    """Start the cluster (making it first if needed); the caller holds the start lock and knows none runs."""
    # before anything is created: a busy port must not leave a half-made cluster behind
    if not port_free(HOST, port):
        raise SaofuError(
            f"port {port} on {HOST} is in use by another program (another PostgreSQL?); stop it or choose another port"
        )
    binaries = find_binaries()
    data_dir, socket_dir, log_path = _data_dir(state_dir), _socket_dir(state_dir), _log_file(state_dir)
    socket_path = socket_dir / f".s.PGSQL.{port}"
    if len(str(socket_path).encode()) > _SOCKET_PATH_MAX:
        raise SaofuError(
            f"the PostgreSQL socket path {socket_path} is longer than {_SOCKET_PATH_MAX} bytes, which unix "
            "sockets cannot hold: use a shorter state folder (SAOFU_HOME)"
        )
    os_user = _server_os_user(data_dir)
    if os_user is not None:
        _check_reachable(state_dir, os_user)
    if (data_dir / "PG_VERSION").exists():
        _check_cluster(binaries, data_dir)
        if _write_hba(data_dir, os_user):  # made before passwords: never start it trusting TCP again
            _progress(f"the cluster in {data_dir} trusted loopback connections: pg_hba.conf rewritten for passwords")
    else:
        _init_cluster(binaries, state_dir, data_dir, os_user, fsync)
    socket_dir.mkdir(exist_ok=True)
    socket_dir.chmod(0o700)  # the socket trusts whoever can reach it: only the server's owner (and root)
    _give_to(socket_dir, os_user)
    _write_server_config(data_dir, socket_dir, port, fsync, os_user)
    # private from creation: connection failures and statements that failed are logged there
    with os.fdopen(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a") as log:
        log.write(f"\n=== saofu: pg_ctl start on {HOST}:{port}, {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n")
    _give_to(log_path, os_user)  # pg_ctl -l appends to it as the server's user
    _progress(f"starting PostgreSQL on {HOST}:{port} (log: {log_path})")
    # -l: the server's output goes to the log, not to our pipes (which would then never close)
    cmd = [str(binaries["pg_ctl"]), "start", "-D", str(data_dir), "-l", str(log_path), "-w", "-t", str(int(timeout))]
    result = _run_as(cmd, os_user, cwd=state_dir, timeout=timeout + 30)
    running = _read_postmaster_pid(data_dir)
    if result.returncode != 0 or running is None:
        stop_postgres(state_dir)  # one that came up too late must not linger
        raise SaofuError(
            f"PostgreSQL did not start on {HOST}:{port} (pg_ctl exit code {result.returncode}: "
            f"{(result.stdout + result.stderr).strip()}); last lines of {log_path}:\n{_log_tail(log_path)}"
        )
    try:
        _ensure_role_and_database(state_dir, port, database, user, reload=False)
    except SaofuError:
        stop_postgres(state_dir)
        raise
    _state_file(state_dir).write_text(json.dumps({"database": database, "user": user}, indent=2))
    handle = _handle(state_dir, running[0], port, database, user)
    _progress(f"PostgreSQL is up: {handle.url}")
    return handle


def ensure_database(database: str, state_dir: Path | None = None, user: str = DEFAULT_USER) -> str:
    """A database owned by `user` on the running server, created when missing; its asyncpg URL.

    For a second user of the cluster beside the study (the Prefect server's database): the state
    file keeps naming the study's database. No password in the URL: asyncpg reads `passfile()`
    when PGPASSFILE names it.

    Raises:
        SaofuError: no server runs on `state_dir`, or a bad database name.
    """
    _check_name("database", database)
    state_dir = _resolve_state_dir(state_dir)
    running = postgres_status(state_dir)
    if running is None:
        raise SaofuError(f"PostgreSQL does not run on {state_dir}: start it first (`saofu up postgres`)")
    _ensure_role_and_database(state_dir, running.port, database, user, reload=False)
    return f"postgresql+asyncpg://{user}@{HOST}:{running.port}/{database}"


def stop_postgres(state_dir: Path | None = None) -> bool:
    """Stop the server on `state_dir`'s cluster (`pg_ctl stop -m fast`: open sessions are rolled back).

    Args:
        state_dir: the server's state folder; default `default_state_dir()`.

    Returns:
        True when a running server was stopped, False when none ran.
    """
    state_dir = _resolve_state_dir(state_dir)
    data_dir = _data_dir(state_dir)
    running = _read_postmaster_pid(data_dir)
    if running is None or not _pid_alive(running[0]):
        return False
    _progress(f"stopping PostgreSQL (pid {running[0]})")
    cmd = [str(find_binaries()["pg_ctl"]), "stop", "-D", str(data_dir), "-m", "fast", "-w", "-t", str(STOP_TIMEOUT_S)]
    result = _run_as(cmd, _server_os_user(data_dir), cwd=state_dir, timeout=STOP_TIMEOUT_S + 30)
    if result.returncode != 0 and _pid_alive(running[0]):
        raise SaofuError(
            f"pg_ctl stop failed (exit code {result.returncode}: {(result.stdout + result.stderr).strip()}); "
            f"last lines of {_log_file(state_dir)}:\n{_log_tail(_log_file(state_dir))}"
        )
    return True


# ------------------------------------------------------------------------------------------ tests


@contextmanager
def running_postgres(tmp_dir: Path, port: int | None = None) -> Iterator[PostgresHandle]:
    """A throwaway server for tests: a new cluster (fsync off) on a free port, always stopped at the end.

    The cluster lives in `tmp_dir/postgres`. As root, when the server's OS user cannot enter
    `tmp_dir` (pytest's temporary folders are 0700 root), it lives in a private folder under the
    system's temporary folder instead, removed at the end; its log is then copied to
    `tmp_dir/postgres.log`.

    Args:
        tmp_dir: a temporary folder of the caller.
        port: TCP port; default a free one.
    """
    tmp_dir = Path(tmp_dir).resolve()
    state_dir = tmp_dir / "postgres"
    private: Path | None = None
    if os.geteuid() == 0 and not _can_enter(tmp_dir, _os_user(SERVER_OS_USER, create=True)):
        private = Path(tempfile.mkdtemp(prefix="saofu-postgres-"))
        private.chmod(0o711)  # the server's user may enter, nobody may list
        state_dir = private
    try:
        handle = start_postgres(state_dir, port=port or _free_port(), fsync=False)
        try:
            yield handle
        finally:
            stop_postgres(state_dir)
    finally:
        if private is not None:
            if _log_file(private).exists():
                shutil.copyfile(_log_file(private), tmp_dir / "postgres.log")
            shutil.rmtree(private, ignore_errors=True)
