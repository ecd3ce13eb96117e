"""The services `saofu up` runs, in order, and `up` / `down` / `status` over them.

    prefect   the Prefect server (API + UI; SQLite or PostgreSQL, below)     :4200
    executor  `python -m flows.deployments`: executes the deployments        (no port)
    mlflow    the MLflow tracking server and UI on the project's store       :5000
    labeling  Label Studio (services.labeling)                               :8080
    serving   the serving app, following the champion alias                  :8000

`up` starts the named services (all five by default) one after the other and waits until each is
healthy. One already running (our pid file, process alive, healthy) is reported as already up,
not restarted. The first one that cannot start (busy port, missing dependency, not healthy in
time) stops `up` with a one-line SaofuError naming it; those already up keep running.
PostgreSQL (services.postgres) is started only when named, or when the Prefect server keeps its
database there (`--prefect-db postgres`, remembered like the ports): then `up` starts it first,
creates the `prefect` database beside the search studies, and `down` (all) stops it last.

Ports and the registered model (`--model`: what the serving app follows and the deployments'
forms default to): an explicit value wins, else the one remembered in `.saofu/stack.json` from
the last `up`, else the default (fu-recognizer). A service already up keeps what it was started
with: `saofu down NAME` first to change it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from saofu.errors import SaofuError
from services import mlflow_server, prefect_server, process, serving
from services.process import progress

SERVICES = ("prefect", "executor", "mlflow", "labeling", "serving")
OPTIONAL = ("postgres",)  # only when named
DEFAULT_PORTS = {
    "prefect": prefect_server.DEFAULT_PORT, "mlflow": mlflow_server.DEFAULT_PORT,
    "labeling": 8080, "serving": serving.DEFAULT_PORT, "postgres": 5433,
}  # fmt: skip
HOST = "127.0.0.1"


def _stack_file() -> Path:
    return process.state_dir() / "stack.json"


def _remembered() -> dict:
    try:
        state = json.loads(_stack_file().read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _remember(**changes) -> None:
    _stack_file().parent.mkdir(parents=True, exist_ok=True)
    _stack_file().write_text(json.dumps({**_remembered(), **changes}, indent=2))


def remembered_ports() -> dict[str, int]:
    try:
        return {k: int(v) for k, v in _remembered().get("ports", {}).items()}
    except (ValueError, TypeError, AttributeError):
        return {}


def _remember_port(name: str, port: int) -> None:
    _remember(ports={**remembered_ports(), name: port})


def resolve_model(explicit: str | None) -> str:
    """The registered model the stack serves and deploys: explicit, else remembered from the last `up`."""
    model = explicit or _remembered().get("model") or serving.DEFAULT_MODEL
    return str(model)


def resolve_prefect_db(explicit: str | None) -> str:
    """Where the Prefect server keeps its database: explicit, else remembered from the last `up`, else SQLite."""
    if explicit is not None and explicit not in prefect_server.DATABASES:
        raise SaofuError(f"--prefect-db must be one of {', '.join(prefect_server.DATABASES)}, not {explicit!r}")
    chosen = explicit or _remembered().get("prefect_db")
    return chosen if chosen in prefect_server.DATABASES else prefect_server.DEFAULT_DATABASE


def resolve_ports(explicit: dict[str, int | None]) -> dict[str, int]:
    remembered = remembered_ports()
    return {name: explicit.get(name) or remembered.get(name) or default for name, default in DEFAULT_PORTS.items()}


def check_names(names: list[str] | None) -> list[str]:
    """The services to act on, in start order; all five when none is named."""
    if not names:
        return list(SERVICES)
    unknown = [n for n in names if n not in SERVICES + OPTIONAL]
    if unknown:
        raise SaofuError(f"unknown service {unknown[0]!r}: choose from {', '.join(SERVICES + OPTIONAL)}")
    order = SERVICES + OPTIONAL
    return sorted(dict.fromkeys(names), key=order.index)


# ------------------------------------------------------------------------------------- health


@dataclass(frozen=True)
class _ProcessService:
    """A service run by services.process: how to build its command and how to tell it is healthy."""

    name: str
    command: Callable[[int], tuple[list[str], dict[str, str], str | None]]
    healthy: Callable[[dict], bool]
    timeout: float
    extra: dict = field(default_factory=dict)  # kept in the service's state file (what `status` reports)


def _prefect_url() -> str:
    state = process.running("prefect")
    if state is None or not prefect_server.server_healthy(state["url"]):
        raise SaofuError("executor: the Prefect server is not running; start it first (saofu up prefect)")
    return state["url"]


def _prefect_command(port: int, database: str):
    if database == "sqlite":
        return prefect_server.server_command(port, HOST)
    from services import postgres

    if postgres.postgres_status() is None:
        raise SaofuError("prefect: its database is on PostgreSQL, which does not run; start it first "
                         "(saofu up postgres prefect --prefect-db postgres)")
    url = postgres.ensure_database(prefect_server.POSTGRES_DATABASE)
    return prefect_server.server_command(port, HOST, database_url=url, passfile=postgres.passfile())


def _services(model: str = serving.DEFAULT_MODEL, prefect_db: str = prefect_server.DEFAULT_DATABASE
              ) -> dict[str, _ProcessService]:
    def executor_command(_port: int):
        url = _prefect_url()
        cmd, env = prefect_server.executor_command(url, model)
        return cmd, env, url

    return {
        "prefect": _ProcessService("prefect", lambda p: _prefect_command(p, prefect_db),
                                   lambda s: prefect_server.server_healthy(s["url"]), prefect_server.START_TIMEOUT_S,
                                   extra={"database": prefect_db}),
        "executor": _ProcessService("executor", executor_command,
                                    lambda s: prefect_server.executor_healthy(
                                        s["url"], Path(s["log"]) if s.get("log") else None, s.get("started_epoch")),
                                    prefect_server.EXECUTOR_TIMEOUT_S),
        "mlflow": _ProcessService("mlflow", lambda p: mlflow_server.server_command(p, HOST),
                                  lambda s: process.http_get(f"{s['url']}/health", timeout=3.0)[0] == 200,
                                  mlflow_server.START_TIMEOUT_S),
        "serving": _ProcessService("serving", lambda p: serving.server_command(p, HOST, model),
                                   lambda s: serving.health(s["url"]) is not None, serving.START_TIMEOUT_S),
    }


def _public(state: dict, **more) -> dict:
    keep = ("url", "pid", "log", "port", "started_at")
    optional = ("database",)  # the Prefect server's
    return {**{k: state.get(k) for k in keep}, **{k: state[k] for k in optional if k in state}, **more}


# ------------------------------------------------------------------------------------- up


def _up_process(svc: _ProcessService, port: int | None, timeout: float | None) -> dict:
    timeout = timeout or svc.timeout
    state = process.running(svc.name)
    if state is not None:
        if svc.healthy(state):
            progress(f"{svc.name} already up at {state.get('url')} (pid {state['pid']})")
            return _public(state, already_up=True)
        progress(f"{svc.name} runs (pid {state['pid']}) but is not healthy yet; waiting")
        process.wait_healthy(svc.name, state["pid"], lambda: svc.healthy(state), timeout,
                             Path(state.get("log") or process.log_file(svc.name)))
        return _public(state, already_up=True)
    if port is not None and not process.port_free(HOST, port):
        raise SaofuError(f"{svc.name}: port {port} on {HOST} is in use (another process); "
                         f"pick another with --{svc.name}-port")
    cmd, env, url = svc.command(port)
    progress(f"starting {svc.name}" + (f" at {url}" if url else "") + f" (log: {process.log_file(svc.name)})")
    state = process.start_detached(svc.name, cmd, url=url, host=HOST, port=port, env=env,
                                   cwd=process.state_dir().parent, extra=svc.extra)
    try:
        process.wait_healthy(svc.name, state["pid"], lambda: svc.healthy(state), timeout, Path(state["log"]))
    except SaofuError:
        process.stop(svc.name, timeout=10)  # a half-started service is not left behind
        raise
    if port is not None:
        _remember_port(svc.name, port)
    progress(f"{svc.name} is up" + (f" at {url}" if url else "") + f" (pid {state['pid']})")
    return _public(state, already_up=False)


def _up_labeling(port: int, files_root: Path | None, timeout: float | None) -> dict:
    from services import labeling

    running = labeling.status()
    if running is not None and process.http_get(f"{running.url}/health", timeout=3.0)[0] == 200:
        progress(f"labeling already up at {running.url} (pid {running.pid})")
        return _labeling_info(running, already_up=True)
    if running is None and not process.port_free(HOST, port):
        raise SaofuError(f"labeling: port {port} on {HOST} is in use (another process); "
                         "pick another with --labeling-port")
    try:
        labeling.ensure_installed()
        handle = labeling.start(port=port, host=HOST, files_root=files_root,
                                **({"timeout": timeout} if timeout else {}))
    except SaofuError as exc:
        first = str(exc).splitlines()[0]
        raise SaofuError(f"labeling: {first}") from exc
    _remember_port("labeling", port)
    return _labeling_info(handle, already_up=False)


def _labeling_info(handle, already_up: bool) -> dict:
    from services import labeling

    return {"url": handle.url, "pid": handle.pid, "log": str(handle.log_path),
            "port": int(handle.url.rsplit(":", 1)[1]),
            "started_at": _mtime(process.state_dir() / "labelstudio.pid"),
            # the password stays in its 0600 file (named here), never in what `up` returns or prints
            "login": {"username": handle.username, "file": str(labeling.login_file())}, "username": handle.username,
            "token": handle.token, "already_up": already_up}


def _up_postgres(port: int) -> dict:
    from services import postgres

    try:
        handle = postgres.start_postgres(port=port)
    except SaofuError as exc:
        raise SaofuError(f"postgres: {exc}") from exc
    _remember_port("postgres", port)
    return {"url": handle.url, "port": handle.port, "pid": handle.pid, "log": str(handle.log_path)}


def up(names: list[str] | None = None, ports: dict[str, int | None] | None = None, *,
       files_root: Path | None = None, timeout: float | None = None, model: str | None = None,
       prefect_db: str | None = None, on_up: Callable[[str, dict], None] | None = None) -> dict[str, dict]:
    """Start `names` (all five by default) in order, each waited for until healthy.

    Args:
        names: services to start; None or [] starts prefect, executor, mlflow, labeling, serving.
        ports: explicit ports by service name (None: remembered, else default).
        files_root: Label Studio's local-files root (default: SAOFU_HOME).
        timeout: seconds each service gets to become healthy (default: its own).
        model: the registered model the serving app follows and the deployments default to
            (default: the one of the last `up`, else fu-recognizer).
        prefect_db: "sqlite" or "postgres": where a Prefect server started now keeps its database
            (default: the last `up`'s, else sqlite); with postgres, PostgreSQL is started first.
        on_up: called as on_up(name, info) after each service is up (progress for callers).

    Returns:
        {name: info} with at least `url` (the executor's: the Prefect server's), pid, log, and
        for labeling the login.

    Raises:
        SaofuError: one line naming the first service that could not start; those started
            before it keep running.
    """
    chosen = check_names(names)
    port_of = resolve_ports(ports or {})
    model = resolve_model(model)
    prefect_db = resolve_prefect_db(prefect_db)
    _remember(model=model, prefect_db=prefect_db)
    if "prefect" in chosen and prefect_db == "postgres":  # its database must be up before it
        chosen = ["postgres"] + [n for n in chosen if n != "postgres"]
    specs = _services(model, prefect_db)
    result: dict[str, dict] = {}
    for name in chosen:
        if name == "labeling":
            info = _up_labeling(port_of["labeling"], files_root, timeout)
        elif name == "postgres":
            info = _up_postgres(port_of["postgres"])
        else:
            info = _up_process(specs[name], None if name == "executor" else port_of[name], timeout)
        if name == "prefect":
            info["ui"] = info["url"]
            running_on = info.get("database") or "sqlite"  # a server started before the choice: SQLite
            if info.get("already_up") and running_on != prefect_db:
                progress(f"prefect keeps the {running_on} database it was started with; "
                         f"`saofu down prefect` first to move it to {prefect_db}")
        result[name] = info
        if on_up is not None:
            on_up(name, info)
    return result


# ------------------------------------------------------------------------------------- down


def down(names: list[str] | None = None) -> dict[str, bool]:
    """Stop `names` (all five by default), serving first and the Prefect server last; then the
    PostgreSQL it keeps its database on, if it does (`up(prefect_db="postgres")`).

    Returns:
        {name: whether a running process was stopped}.
    """
    chosen = list(reversed(check_names(names)))
    if not names and resolve_prefect_db(None) == "postgres":
        chosen.append("postgres")
    stopped: dict[str, bool] = {}
    for name in chosen:
        if name == "labeling":
            from services import labeling

            stopped[name] = labeling.stop()
        elif name == "postgres":
            from services import postgres

            stopped[name] = postgres.stop_postgres()
        else:
            stopped[name] = process.stop(name)
    return stopped


# ------------------------------------------------------------------------------------- status


def _mtime(path: Path) -> str | None:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(path.stat().st_mtime))
    except OSError:
        return None


def status(names: list[str] | None = None) -> dict[str, dict]:
    """What runs: {name: {running, healthy, url, pid, since, log}} for the five services; the
    Prefect server's also says which database it keeps (`database`: sqlite or postgres)."""
    chosen = [n for n in check_names(names) if n in SERVICES]  # postgres: `saofu up postgres` prints its URL
    specs = _services()
    out: dict[str, dict] = {}
    for name in chosen:
        if name == "labeling":
            from services import labeling

            handle = labeling.status()
            if handle is None:
                out[name] = {"running": False, "healthy": False, "url": None, "pid": None, "since": None}
                continue
            healthy = process.http_get(f"{handle.url}/health", timeout=3.0)[0] == 200
            out[name] = {"running": True, "healthy": healthy, "url": handle.url, "pid": handle.pid,
                         "since": _mtime(process.state_dir() / "labelstudio.pid"), "log": str(handle.log_path),
                         "login": {"username": handle.username, "file": str(labeling.login_file())}}
        else:
            state = process.running(name)
            if state is None:
                last = process.read_state(name) or {}
                out[name] = {"running": False, "healthy": False, "url": None, "pid": None, "since": None,
                             "port": last.get("port"), "log": last.get("log")}
                continue
            out[name] = {"running": True, "healthy": specs[name].healthy(state), "url": state.get("url"),
                         "pid": state["pid"], "since": state.get("started_at"), "port": state.get("port"),
                         "log": state.get("log")}
            if name == "prefect":
                out[name]["database"] = state.get("database", "sqlite")  # started before the choice: SQLite
    if not names and resolve_prefect_db(None) == "postgres":
        out["postgres"] = _postgres_status()
    return out


def _postgres_status() -> dict:
    from services import postgres

    handle = postgres.postgres_status()
    if handle is None:
        return {"running": False, "healthy": False, "url": None, "pid": None, "since": None}
    return {"running": True, "healthy": not process.port_free(HOST, handle.port), "url": handle.url,
            "pid": handle.pid, "since": _mtime(handle.data_dir / "postmaster.pid"), "port": handle.port,
            "log": str(handle.log_path)}
