"""Label Studio as a real local service: installed in its own virtual env, started on loopback.

Label Studio pins its own Django stack, so it never shares the project's env: `ensure_installed`
creates a separate venv from `scripts/labelstudio-requirements.txt`. `start` runs
`label-studio start` with a SQLite store under the project's state folder, creates the admin user
with a known API token and serves images from disk to labelers' browsers (local-files serving).

State (all under `$SAOFU_HOME/.saofu/`, nothing created at import):

    labelstudio-venv/        Label Studio's own venv (or $SAOFU_LABELSTUDIO_VENV)
    labelstudio-data/        its SQLite database and media (LABEL_STUDIO_BASE_DATA_DIR), mode 0700
    labelstudio.json         URL, token, login and files root of the server `start` launched (0600)
    labelstudio.pid          the server's process id (its process group is stopped by `stop`)
    labelstudio.log          the server's output

The admin's password and token are secrets: never printed (output names `login_file()`), the
state file and log are 0600 and the data folder 0700 from creation, and the server runs with umask
077, so its SQLite store (plaintext API tokens) and media are its owner's only.

A team's existing server works the same way: set `LABEL_STUDIO_URL` and `LABEL_STUDIO_API_KEY`
(and `LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT` if it serves local files) and `labeling_settings()`
returns those instead of the local server's.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock

from saofu.errors import SaofuError
from saofu.settings import get_settings
from services.process import port_free

LABEL_STUDIO_VERSION = "1.23.2"
DEFAULT_PORT = 8080
DEFAULT_HOST = "127.0.0.1"
DEFAULT_USERNAME = "admin@saofu.local"  # Label Studio logs in by e-mail address
START_TIMEOUT_S = 300.0  # the first start runs all database migrations: slow on a small CPU
STOP_TIMEOUT_S = 20.0

REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "scripts" / "labelstudio-requirements.txt"
_STAMP_NAME = ".saofu-requirements.sha256"

# Label Studio reads most settings as LABEL_STUDIO_<NAME>, then HEARTEX_<NAME>, then the bare <NAME>
# (core/utils/params.py:get_env). Bare names such as HOST, PORT or USERNAME are common in shells
# and CI environments and would silently change the server, so they never reach it; neither does
# the project's venv (PYTHONPATH, VIRTUAL_ENV).
_SHADOWING_ENV = (
    "HOST", "PORT", "USERNAME", "PASSWORD", "USER_TOKEN", "DATABASE_NAME", "BASE_DATA_DIR",
    "LOCAL_FILES_SERVING_ENABLED", "LOCAL_FILES_DOCUMENT_ROOT", "DJANGO_SETTINGS_MODULE",
    "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV",
)  # fmt: skip

# Processes started by this interpreter: polling them reaps the child, so a stopped server does not
# linger as a zombie that `os.kill(pid, 0)` would still report alive.
_CHILDREN: dict[int, subprocess.Popen] = {}


@dataclass(frozen=True)
class LabelStudioHandle:
    """A running Label Studio server started by `start`.

    Attributes:
        url: base URL, e.g. http://127.0.0.1:8080
        token: the admin's API token (legacy token; the SDK's `api_key`)
        pid: the server's process id (also its process group id)
        log_path: the server's log file
        username: the admin's login (an e-mail address)
        password: the admin's password
        data_dir: Label Studio's data folder (SQLite database, media)
        files_root: LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT: images under it can be shown to labelers
    """

    url: str
    token: str
    pid: int
    log_path: Path
    username: str
    password: str
    data_dir: Path
    files_root: Path

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> LabelStudioHandle:
        return cls(
            url=d["url"], token=d["token"], pid=int(d["pid"]), log_path=Path(d["log_path"]),
            username=d["username"], password=d["password"], data_dir=Path(d["data_dir"]),
            files_root=Path(d["files_root"]),
        )  # fmt: skip


# --------------------------------------------------------------------------------------- paths


def state_dir() -> Path:
    """`$SAOFU_HOME/.saofu`: where the local services keep their state."""
    return get_settings().home / ".saofu"


def default_venv_dir() -> Path:
    """Label Studio's venv: `$SAOFU_LABELSTUDIO_VENV`, else `$SAOFU_HOME/.saofu/labelstudio-venv`.

    The environment variable lets several project folders (e.g. tests' temporary ones) share one
    installation, which takes minutes to create.
    """
    override = os.environ.get("SAOFU_LABELSTUDIO_VENV")
    return Path(override).expanduser().resolve() if override else state_dir() / "labelstudio-venv"


def _state_file() -> Path:
    return state_dir() / "labelstudio.json"


def login_file() -> Path:
    """The 0600 file holding the local server's admin login (username, password) and API token."""
    return _state_file()


def _pid_file() -> Path:
    return state_dir() / "labelstudio.pid"


def _log_file() -> Path:
    return state_dir() / "labelstudio.log"


# ------------------------------------------------------------------------------------- install


def _requirements_text() -> str:
    """The pinned requirements of Label Studio's venv (a bare pin if the file is not shipped)."""
    if REQUIREMENTS_FILE.is_file():
        return REQUIREMENTS_FILE.read_text()
    return f"label-studio=={LABEL_STUDIO_VERSION}\n"


def _progress(message: str) -> None:
    # stderr, so commands that print JSON on stdout stay parseable
    print(message, file=sys.stderr, flush=True)


def _run_checked(cmd: list[str], what: str) -> None:
    """Run an installer command, its output shown; raise SaofuError naming `what` on failure."""
    result = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    if result.returncode != 0:
        raise SaofuError(f"{what} failed (exit code {result.returncode}): {' '.join(cmd)}")


def ensure_installed(venv_dir: Path | None = None) -> Path:
    """Install Label Studio into its own venv unless the same requirements are already there.

    Idempotent: a stamp file in the venv holds the hash of the requirements it was built from, so
    a second call returns at once; changed requirements reinstall into the same venv.

    Args:
        venv_dir: the venv folder; default `default_venv_dir()`.

    Returns:
        The path of the venv's `label-studio` executable.
    """
    venv_dir = Path(venv_dir) if venv_dir else default_venv_dir()
    requirements = _requirements_text()
    digest = hashlib.sha256(requirements.encode()).hexdigest()
    exe = venv_dir / "bin" / "label-studio"
    stamp = venv_dir / _STAMP_NAME
    if exe.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return exe
    with FileLock(venv_dir.parent / f".{venv_dir.name}.lock"):  # two processes must not pip-install into one venv
        # another process may have finished the same installation while we waited for the lock
        if exe.exists() and stamp.exists() and stamp.read_text().strip() == digest:
            return exe
        python = venv_dir / "bin" / "python"
        if not python.exists():
            _progress(f"creating Label Studio's own virtual env: {venv_dir}")
            # the running interpreter is one the project supports (>=3.11), and Label Studio
            # accepts it (>=3.10); `-m venv` from inside a venv builds on the base interpreter
            _run_checked([sys.executable, "-m", "venv", str(venv_dir)], "creating the Label Studio venv")
        _progress(f"installing Label Studio {LABEL_STUDIO_VERSION} into {venv_dir} (first time: a few minutes)")
        req_copy = venv_dir / "saofu-requirements.txt"
        req_copy.write_text(requirements)
        pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
        _run_checked([*pip, "install", "--progress-bar", "off", "-r", str(req_copy)], "installing Label Studio")
        if not exe.exists():
            raise SaofuError(f"installing Label Studio left no executable at {exe}")
        stamp.write_text(digest + "\n")
        _progress("Label Studio installed")
    return exe


# ------------------------------------------------------------------------------------ processes


def _pid_alive(pid: int) -> bool:
    """True when `pid` runs and is a Label Studio server (not a zombie, not a reused pid)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        try:
            stat = (proc / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                return False
            return b"label-studio" in (proc / "cmdline").read_bytes()
        except OSError:
            return False
    return True  # no /proc (macOS): trust the signal check


def _http_get(url: str, token: str | None = None, timeout: float = 5.0) -> int:
    """GET `url` and return the HTTP status (0 when nothing answers)."""
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Token {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _server_env(data_dir: Path, files_root: Path) -> dict[str, str]:
    """The environment of the Label Studio process: ours minus shadowing names, plus its settings."""
    env = {k: v for k, v in os.environ.items() if k not in _SHADOWING_ENV}
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
            # 1.2x disables legacy tokens by default; the SDK sends a non-JWT api_key as one
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            # labelers' browsers load task images from disk through /data/local-files/?d=...
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files_root),
            # only the admin and users created through the API log in; no open sign-up page
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            # no calls home: machines here have no internet, and a lab's data should not leave
            "LABEL_STUDIO_SENTRY_DSN": "",
            "LABEL_STUDIO_FRONTEND_SENTRY_DSN": "",
            "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
            "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
        }
    )
    return env


def _read_state() -> dict | None:
    try:
        return json.loads(_state_file().read_text())
    except (OSError, ValueError):
        return None


def _write_state(handle: LabelStudioHandle) -> None:
    """Record a server that answered with its token: what `status` and `labeling_settings` read."""
    path = _state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    # it holds the admin's password and token: private from its first byte (a chmod after writing
    # leaves a moment when others may read it), and a new file, so an old copy's mode does not carry over
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
        fh.write(json.dumps(handle.to_json(), indent=2))
    os.replace(tmp, path)


def _read_pid() -> int | None:
    try:
        return int(_pid_file().read_text().strip())
    except (OSError, ValueError):
        return None


def status() -> LabelStudioHandle | None:
    """The handle of the local server started by `start`, or None when it does not run."""
    pid = _read_pid()
    state = _read_state()
    if pid is None or state is None or not _pid_alive(pid):
        return None
    return LabelStudioHandle.from_json({**state, "pid": pid})


def _wait_until_up(proc: subprocess.Popen, url: str, log_path: Path, timeout: float) -> None:
    """Poll /health until it answers 200; raise SaofuError with the log's tail otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SaofuError(
                f"Label Studio exited with code {proc.returncode} while starting; "
                f"last lines of {log_path}:\n{_log_tail(log_path)}"
            )
        if _http_get(f"{url}/health", timeout=2.0) == 200:
            return
        time.sleep(1.0)
    raise SaofuError(
        f"Label Studio did not answer {url}/health within {timeout:g}s; "
        f"last lines of {log_path}:\n{_log_tail(log_path)}"
    )


def _kill_group(pid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the server's process group, SIGKILL it if it has not exited after `timeout`."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            break
        time.sleep(0.2)
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        child.wait(timeout=5)


def _credentials(username: str, password: str | None, token: str | None) -> tuple[str, str]:
    """Password and token: given, else those of the last start (the database keeps them), else new.

    Label Studio applies `--user-token` only when it creates the user, so a restart on the same
    data folder must reuse the token it was first given.
    """
    previous = _read_state() or {}
    same_user = previous.get("username") == username
    password = password or (previous.get("password") if same_user else None) or secrets.token_urlsafe(12)
    token = token or (previous.get("token") if same_user else None) or secrets.token_hex(20)
    if len(token) <= 5:  # Label Studio silently ignores shorter ones
        raise SaofuError(f"the Label Studio API token must be longer than 5 characters, got {len(token)}")
    return password, token


def start(
    port: int = DEFAULT_PORT,
    host: str = DEFAULT_HOST,
    data_dir: Path | None = None,
    username: str = DEFAULT_USERNAME,
    password: str | None = None,
    token: str | None = None,
    files_root: Path | None = None,
    venv_dir: Path | None = None,
    timeout: float = START_TIMEOUT_S,
) -> LabelStudioHandle:
    """Start Label Studio in the background (installing it first when missing).

    Starting while the server already runs returns the running one's handle.

    Args:
        port: TCP port; an occupied port is an error (Label Studio itself would silently move).
        host: address to listen on; loopback by default.
        data_dir: SQLite database and media; default `$SAOFU_HOME/.saofu/labelstudio-data`.
        username: the admin's login, an e-mail address.
        password: the admin's password; default: the last start's, else a new random one.
        token: the admin's API token; default: the last start's, else a new random one.
        files_root: images under this folder can be shown to labelers (local-files serving);
            default `$SAOFU_HOME`.
        venv_dir: Label Studio's venv; default `default_venv_dir()`.
        timeout: seconds to wait for the server to answer.

    Returns:
        The running server's handle (URL, token, pid, log path, login).
    """
    # two `saofu up` at once must not race to start two servers on one database
    with FileLock(state_dir() / ".labelstudio-start.lock"):
        running = status()
        if running is not None:
            _progress(f"Label Studio already runs at {running.url} (pid {running.pid})")
            return running
        return _start_new(port, host, data_dir, username, password, token, files_root, venv_dir, timeout)


def _start_new(
    port: int,
    host: str,
    data_dir: Path | None,
    username: str,
    password: str | None,
    token: str | None,
    files_root: Path | None,
    venv_dir: Path | None,
    timeout: float,
) -> LabelStudioHandle:
    """Launch a new server (the caller holds the start lock and knows none runs)."""
    if not port_free(host, port):
        raise SaofuError(f"port {port} on {host} is in use; stop what uses it or choose another port")
    exe = ensure_installed(venv_dir)
    home = get_settings().home
    data_dir = Path(data_dir or state_dir() / "labelstudio-data").resolve()
    files_root = Path(files_root or home).resolve()
    # the SQLite store keeps API tokens in plain text: the folder is its owner's from creation on,
    # and one made before this rule is closed now
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if data_dir.stat().st_mode & 0o077:
        data_dir.chmod(0o700)
    password, token = _credentials(username, password, token)
    url = f"http://{host}:{port}"
    log_path = _log_file()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(exe), "start", "--no-browser", "--internal-host", host, "--port", str(port),
        "--data-dir", str(data_dir), "--enable-legacy-api-token", "--log-level", "WARNING",
    ]  # fmt: skip
    # the login travels in the environment (what --username/--password/--user-token fall back
    # to), not on the command line, where any local user could read it with `ps`
    env = _server_env(data_dir, files_root)
    env.update({"LABEL_STUDIO_USERNAME": username, "LABEL_STUDIO_PASSWORD": password, "LABEL_STUDIO_USER_TOKEN": token})
    _progress(f"starting Label Studio at {url} (log: {log_path})")
    with os.fdopen(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
        log.write(f"\n=== saofu: label-studio start at {url}, {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode())
        log.flush()
        # a session of its own: the server outlives `saofu up`, and `stop` ends its whole group;
        # umask 077: its database, media and exports are created readable by their owner only
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, cwd=data_dir, start_new_session=True, umask=0o077,
        )  # fmt: skip
    _CHILDREN[proc.pid] = proc
    # the pid first, so `stop` can end a server that never came up; the state (with credentials)
    # only once it answers with this token, so a failed start keeps the last good credentials
    _pid_file().write_text(f"{proc.pid}\n")
    handle = LabelStudioHandle(url, token, proc.pid, log_path, username, password, data_dir, files_root)
    try:
        _wait_until_up(proc, url, log_path, timeout)
        _check_token(handle)
    except SaofuError:
        stop()
        raise
    _write_state(handle)
    _progress(f"Label Studio is up at {url}; login {username}, password in {_state_file()}")
    return handle


def _check_token(handle: LabelStudioHandle) -> None:
    """Fail clearly when the data folder's admin already has another token (it is kept on restart)."""
    code = _http_get(f"{handle.url}/api/current-user/whoami", token=handle.token)
    if code == 200:
        return
    raise SaofuError(
        f"Label Studio at {handle.url} rejects the API token (HTTP {code}): the data folder "
        f"{handle.data_dir} already holds user {handle.username} with another token. Start with that "
        "token, or remove the data folder to begin afresh."
    )


def stop() -> bool:
    """Stop the server started by `start` (its whole process group).

    Returns:
        True when a running server was stopped, False when none ran.
    """
    pid = _read_pid()
    was_running = pid is not None and _pid_alive(pid)
    if was_running:
        _progress(f"stopping Label Studio (pid {pid})")
        _kill_group(pid)
    # the state file stays: it holds the login and token the database keeps for the next start
    _pid_file().unlink(missing_ok=True)
    return was_running


# -------------------------------------------------------------------------------------- settings


def labeling_settings() -> tuple[str, str]:
    """URL and API token of the Label Studio to use.

    `LABEL_STUDIO_URL` and `LABEL_STUDIO_API_KEY` (e.g. a team's server) win; otherwise those of
    the local server `start` launched.

    Returns:
        (url, token)
    """
    url = os.environ.get("LABEL_STUDIO_URL")
    key = os.environ.get("LABEL_STUDIO_API_KEY")
    if url:
        if not key:
            raise SaofuError("LABEL_STUDIO_URL is set but LABEL_STUDIO_API_KEY is not: set both")
        return url.rstrip("/"), key
    state = _read_state()
    if state is None:
        raise SaofuError(
            "no Label Studio configured: run `saofu up labeling`, or set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"
        )
    return state["url"], key or state["token"]


def local_files_root() -> Path:
    """The folder Label Studio serves local files from (`/data/local-files/?d=<relative path>`).

    `LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT` (the variable Label Studio itself reads) wins, else the
    local server's, else `$SAOFU_HOME`.
    """
    env = os.environ.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
    if env:
        return Path(env).resolve()
    state = _read_state()
    if state is not None and not os.environ.get("LABEL_STUDIO_URL"):
        return Path(state["files_root"])
    return get_settings().home
