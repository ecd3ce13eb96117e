"""`saofu serve`: the serving app (onnxruntime, never torch) on the registry's champion."""

from __future__ import annotations

import typer

app = typer.Typer()


@app.command()
def serve(
    # 8000, as `saofu up` serves (services/serving.py DEFAULT_PORT): 8080 is Label Studio's
    port: int = typer.Option(8000, "--port", help="TCP port on loopback."),
    model: str = typer.Option("fu-recognizer", "--model", help="Registered model; serves its @champion."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (put a proxy in front to expose it)."),
    canary_share: float = typer.Option(
        0.0, "--canary-share", help="Share of requests the @challenger answers (0: no canary)."
    ),
    canary_min_requests: int = typer.Option(200, "--canary-min-requests", help="Challenger requests before judging."),
    pool: str = typer.Option("default", "--pool", help='Online pool to log requests into; "none" logs nothing.'),
    pool_max_files: int = typer.Option(10_000, "--pool-max-files"),
    poll_seconds: float = typer.Option(5.0, "--poll-seconds", help="How often the registry aliases are checked."),
    threshold: float = typer.Option(0.9, "--threshold", help="Confidence a prediction needs to count."),
    log_level: str = typer.Option("info", "--log-level"),
    wait_for_champion: bool = typer.Option(
        False, "--wait-for-champion",
        help="Start even before any version is the champion: answer 503 'no model is promoted yet' until one is.",
    ),
):
    """Serve models:/<model>@champion over HTTP (POST /predict, /healthz, /metrics), following the alias."""
    from deploy.server import serve as run_server

    run_server(port, model, host=host, canary_share=canary_share, canary_min_requests=canary_min_requests,
               pool_dir=None if pool == "none" else pool, pool_max_files=pool_max_files, poll_seconds=poll_seconds,
               threshold=threshold, log_level=log_level,
               wait_for_champion=wait_for_champion)
