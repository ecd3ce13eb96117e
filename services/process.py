"""Long-running local services as detached processes: start, wait until healthy, status, stop.

Each service `NAME` keeps its state under `$SAOFU_HOME/.saofu/` (nothing created at import):

    NAME.pid     the process id (also its process group id: it runs in a session of its own)
    NAME.log     its stdout and stderr
    NAME.json    URL, host, port, pid, command, start time and service-specific fields

The process outlives the `saofu up` that started it; `stop` ends its whole process group
(SIGTERM, a grace period, then SIGKILL), so servers that fork workers leave nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from saofu.errors import SaofuError
from saofu.settings import get_settings

STOP_TIMEOUT_S = 20.0

# Processes started by this interpreter: polling them reaps the child, so a stopped or crashed
# service does not linger as a zombie that `os.kill(pid, 0)` would still report alive.
_CHILDREN: dict[int, subprocess.Popen] = {}


def state_dir() -> Path:
    return get_settings().home / ".saofu"


def pid_file(name: str) -> Path:
    return state_dir() / f"{name}.pid"


def log_file(name: str) -> Path:
    return state_dir() / f"{name}.log"


def state_file(name: str) -> Path:
    return state_dir() / f"{name}.json"


def progress(message: str) -> None:
    """Progress on stderr, so commands printing JSON on stdout stay parseable."""
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- probes


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, exited but not reaped, counts as gone)."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    except (OSError, IndexError):
        return True


def pid_runs(pid: int, marker: bytes) -> bool:
    """True when `pid` runs, is not a zombie, and its command line holds `marker` (not a reused pid).

    For servers that are not our children (another OS user's, or one that outlived its starter),
    where only the command line tells a reused pid from the server we recorded.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: /proc still tells what it is
    proc = Path(f"/proc/{pid}")
    if not proc.exists():
        return True  # no /proc (macOS): trust the signal check
    try:
        if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
        return marker in (proc / "cmdline").read_bytes()
    except (OSError, IndexError):
        return False


def port_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port (connections in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        if s.connect_ex((host, port)) == 0:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def http_get(url: str, timeout: float = 5.0, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    """(status, body) of one request; (0, b"") when nothing answers."""
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError, ValueError):
        return 0, b""


def log_tail(path: Path, lines: int = 1) -> str:
    """The last non-empty lines of a log (for one-line errors)."""
    try:
        text = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])


# ------------------------------------------------------------------------------------- state


def read_state(name: str) -> dict | None:
    try:
        return json.loads(state_file(name).read_text())
    except (OSError, ValueError):
        return None


def write_state(name: str, state: dict) -> None:
    path = state_file(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2))


def read_pid(name: str) -> int | None:
    try:
        return int(pid_file(name).read_text().strip())
    except (OSError, ValueError):
        return None


def running(name: str) -> dict | None:
    """The state of service `name` when its recorded process runs, else None."""
    pid = read_pid(name)
    if pid is None or not pid_alive(pid):
        return None
    state = read_state(name) or {}
    return {**state, "pid": pid}


# ------------------------------------------------------------------------------------- lifecycle


def start_detached(name: str, cmd: list[str], *, url: str | None, host: str, port: int | None,
                   env: dict[str, str] | None = None, cwd: Path | None = None, extra: dict | None = None) -> dict:
    """Launch `cmd` in a session of its own, output to NAME.log; record pid and state.

    Returns:
        The state written to NAME.json (name, url, host, port, pid, log, cmd, started_at, ...).
    """
    log_path = log_file(name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== saofu: starting {name} at {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)} ===\n"
                  .encode())
        log.flush()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, cwd=str(cwd) if cwd else None, start_new_session=True,
        )  # fmt: skip
    _CHILDREN[proc.pid] = proc
    pid_file(name).write_text(f"{proc.pid}\n")
    state = {
        "name": name, "url": url, "host": host, "port": port, "pid": proc.pid, "log": str(log_path),
        "cmd": cmd, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "started_epoch": time.time(),
        **(extra or {}),
    }  # fmt: skip
    write_state(name, state)
    return state


def wait_healthy(name: str, pid: int, healthy: Callable[[], bool], timeout: float, log_path: Path) -> None:
    """Poll `healthy()` until it is true; one-line SaofuError when the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if not pid_alive(pid):
            child = _CHILDREN.get(pid)
            code = f" with code {child.returncode}" if child is not None and child.returncode is not None else ""
            tail = log_tail(log_path)
            raise SaofuError(f"{name}: exited{code} while starting; see {log_path}" + (f" (last line: {tail})"
                                                                                      if tail else ""))
        if healthy():
            return
        if time.monotonic() > deadline:
            raise SaofuError(f"{name}: not healthy after {timeout:g}s (it still runs, pid {pid}); see {log_path}")
        time.sleep(0.5)


def kill_group(pid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group led by `pid`, wait up to `timeout`, then SIGKILL what is left."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    except PermissionError:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid) and not _group_alive(pid):
            break
        time.sleep(0.2)
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        time.sleep(0.2)
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # only zombies left (reaped by their parent or init soon) count as gone
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop(name: str, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stop service `name` (its process group). True when a running process was stopped.

    The state file stays (ports and URL for the next `up`/`status`), marked stopped.
    """
    pid = read_pid(name)
    was_running = pid is not None and pid_alive(pid)
    if pid is not None:
        if was_running:
            progress(f"stopping {name} (pid {pid})")
        kill_group(pid, timeout)
    pid_file(name).unlink(missing_ok=True)
    state = read_state(name)
    if state is not None and was_running:
        write_state(name, {**state, "stopped_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return was_running
