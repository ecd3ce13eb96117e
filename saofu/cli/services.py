"""`saofu up` / `saofu down` / `saofu status`: the local services on loopback.

`saofu up` starts, in order, the Prefect server, the executor of the deployments, the MLflow
server, Label Studio and the serving app (services.stack), waits until each is healthy and prints
every URL and login; `saofu up NAME...` starts only those. `saofu up postgres` (only when named)
starts the PostgreSQL for multi-worker search; `saofu up --prefect-db postgres` keeps the Prefect
server's database there instead of SQLite (and starts it first). `saofu down [NAME...]` stops
them, `saofu status` shows what runs.
"""

from __future__ import annotations

from pathlib import Path

import typer

from saofu.cli.common import JsonOpt, emit, progress_to_stderr

app = typer.Typer()

NamesArg = typer.Argument(None, help="prefect, executor, mlflow, labeling, serving (default: all five), postgres.")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _login(info: dict) -> str:
    login = info.get("login")
    return f"{login['username']} (password in {login['file']})" if login else ""


@app.command("up")
def up(
    names: list[str] | None = NamesArg,
    prefect_port: int | None = typer.Option(None, "--prefect-port", help="Prefect server port (default 4200)."),
    mlflow_port: int | None = typer.Option(None, "--mlflow-port", help="MLflow server port (default 5000)."),
    labeling_port: int | None = typer.Option(None, "--labeling-port", help="Label Studio port (default 8080)."),
    serving_port: int | None = typer.Option(None, "--serving-port", help="Serving app port (default 8000)."),
    postgres_port: int | None = typer.Option(
        None, "--postgres-port", help="PostgreSQL port (default 5433), when it is started."),
    port: int | None = typer.Option(None, "--port", help="The port of the one service named."),
    files_root: Path | None = typer.Option(
        None, "--files-root", help="Images under this folder can be shown to labelers (default: SAOFU_HOME)."
    ),
    timeout: float | None = typer.Option(None, "--timeout", help="Seconds each service gets to become healthy."),
    model: str | None = typer.Option(
        None, "--model", help="Registered model the serving app follows and the deployments default to "
                              "(default: the last `up`'s, else fu-recognizer)."),
    prefect_db: str | None = typer.Option(
        None, "--prefect-db", help="Where the Prefect server keeps its database: sqlite (a file under .saofu/prefect) "
                                   "or postgres (saofu's PostgreSQL, started first: no 'database is locked' stalls "
                                   "under concurrent runs). Default: the last `up`'s, else sqlite."),
    as_json: bool = JsonOpt,
):
    """Start the local services on loopback (all five, or those named), wait until healthy, print URLs."""
    from saofu.errors import SaofuError
    from services import stack

    chosen = stack.check_names(names)
    ports = {"prefect": prefect_port, "mlflow": mlflow_port, "labeling": labeling_port, "serving": serving_port,
             "postgres": postgres_port}
    if port is not None:
        if len(chosen) != 1 or chosen[0] == "executor":
            raise SaofuError("--port needs exactly one service named (one with a port); use --NAME-port otherwise")
        ports[chosen[0]] = port
    with progress_to_stderr(as_json):
        services = stack.up(chosen, ports, files_root=files_root, timeout=timeout, model=model,
                            prefect_db=prefect_db)
    if list(services) == ["postgres"]:  # `saofu up postgres`: its own output, as before
        from services.postgres import passfile

        info = {**services["postgres"], "passfile": str(passfile())}
        emit({**info, "services": services}, as_json, (
            f"PostgreSQL is up: {info['url']}\n  log: {info['log']}\n"
            f"  password: in {info['passfile']} (owner only; saofu search finds it there)\n"
            f"search with it: saofu search --workers 2 --storage {info['url']}\nstop it with: saofu down postgres"
        ))
        return
    summary: dict = {"services": services}
    if chosen == ["labeling"]:  # `saofu up labeling --json`: the keys it always printed, at the top too
        info = services["labeling"]
        summary.update({k: info[k] for k in ("url", "username", "token", "pid", "log")})
        summary["login_file"] = info["login"]["file"]
    rows = [["service", "url", "pid", "login", "state"]]
    for name, info in services.items():
        rows.append([name, str(info.get("url") or ""), str(info.get("pid") or ""), _login(info),
                     "already up" if info.get("already_up") else "started"])
    extra = ""
    if "prefect" in services and services["prefect"].get("database"):
        extra += f"\nPrefect database: {_database(services['prefect']['database'])}"
    if "labeling" in services:
        extra += f"\nLabel Studio API token: in {services['labeling']['login']['file']} (`saofu up labeling --json`)"
    stop_hint = "saofu down" if len(services) > 1 else f"saofu down {chosen[0]}"
    emit(summary, as_json, f"{_table(rows)}{extra}\nstop with: {stop_hint}")


@app.command("down")
def down(names: list[str] | None = NamesArg, as_json: bool = JsonOpt):
    """Stop the services started by `saofu up` (all five, or those named)."""
    from services import stack

    stopped = stack.down(names)
    if names and len(stopped) == 1:  # `saofu down labeling --json`: {"stopped": bool}, as before
        name, was = next(iter(stopped.items()))
        emit({"stopped": was, "services": stopped}, as_json, f"{name} stopped" if was else f"{name} was not running")
        return
    lines = [f"{name}: {'stopped' if was else 'was not running'}" for name, was in stopped.items()]
    emit({"services": stopped}, as_json, "\n".join(lines))


@app.command("status")
def status(names: list[str] | None = NamesArg, as_json: bool = JsonOpt):
    """What runs: each service's URL, process, health and since when."""
    from services import stack

    services = stack.status(names)
    rows = [["service", "url", "pid", "health", "since"]]
    for name, info in services.items():
        health = "healthy" if info["healthy"] else ("NOT healthy" if info["running"] else "not running")
        rows.append([name, str(info.get("url") or ""), str(info.get("pid") or ""), health,
                     str(info.get("since") or "")])
    extra = ""
    if services.get("prefect", {}).get("database"):
        extra = f"\nPrefect database: {_database(services['prefect']['database'])}"
    emit({"services": services}, as_json, _table(rows) + extra)


def _database(kind: str) -> str:
    if kind == "postgres":
        from services.prefect_server import POSTGRES_DATABASE

        return f"PostgreSQL (database {POSTGRES_DATABASE!r} on saofu's cluster: saofu up postgres)"
    from services.prefect_server import sqlite_path

    return f"SQLite ({sqlite_path()})"
