"""`saofu up ...` / `saofu down ...`: real local services on loopback (Label Studio, PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import typer

from saofu.cli.common import JsonOpt, emit, progress_to_stderr

up_app = typer.Typer(no_args_is_help=True, help="Start a real local service (loopback only).")
down_app = typer.Typer(no_args_is_help=True, help="Stop a service started by `saofu up`.")


@up_app.command("labeling")
def up_labeling(
    port: int = typer.Option(8080, "--port"),
    files_root: Path | None = typer.Option(
        None, "--files-root", help="Images under this folder can be shown to labelers (default: SAOFU_HOME)."
    ),
    as_json: bool = JsonOpt,
):
    """Install Label Studio in its own venv if missing, start it on loopback, print URL and login."""
    from services import labeling as service

    with progress_to_stderr(as_json):
        service.ensure_installed()
        handle = service.start(port=port, files_root=files_root)
    info = {"url": handle.url, "username": handle.username, "password": handle.password,
            "token": handle.token, "pid": handle.pid, "log": str(handle.log_path)}
    emit(info, as_json, (
        f"Label Studio is up: {handle.url}\n  login: {handle.username} / {handle.password}\n"
        f"  API token: {handle.token}\n  log: {handle.log_path}\nstop it with: saofu down labeling"
    ))


@down_app.command("labeling")
def down_labeling(as_json: bool = JsonOpt):
    """Stop the Label Studio server started by `saofu up labeling`."""
    from services import labeling as service

    stopped = service.stop()
    emit({"stopped": stopped}, as_json, "Label Studio stopped" if stopped else "Label Studio was not running")


@up_app.command("postgres")
def up_postgres(
    port: int = typer.Option(5433, "--port"),
    as_json: bool = JsonOpt,
):
    """Start a local PostgreSQL on loopback for multi-worker search (`saofu search --storage URL`)."""
    from services import postgres as postgres_service

    with progress_to_stderr(as_json):
        handle = postgres_service.start_postgres(port=port)
    emit({"url": handle.url, "port": handle.port, "pid": handle.pid, "log": str(handle.log_path)}, as_json, (
        f"PostgreSQL is up: {handle.url}\n  log: {handle.log_path}\n"
        f"search with it: saofu search --workers 2 --storage {handle.url}\nstop it with: saofu down postgres"
    ))


@down_app.command("postgres")
def down_postgres(as_json: bool = JsonOpt):
    """Stop the PostgreSQL server started by `saofu up postgres`."""
    from services import postgres as postgres_service

    stopped = postgres_service.stop_postgres()
    emit({"stopped": stopped}, as_json, "PostgreSQL stopped" if stopped else "PostgreSQL was not running")
