"""`serve(...)`: the serving app under uvicorn on loopback (what `saofu serve --port P` runs).

One process, one event loop: the model is small enough that a single core answers thousands of
requests a second, and one process keeps one canary's statistics and one writer per online pool.
uvicorn is given httptools and uvloop when they are installed (its C parsers; the pure-Python h11
costs more per request than the model does) and no access log (a line per request would too).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import threading
from pathlib import Path

import uvicorn

from deploy.app import ServeConfig, create_app
from deploy.canary import CanaryPolicy
from deploy.model_source import CHALLENGER, CHAMPION, ModelSource
from saofu.settings import get_settings

DEFAULT_MODEL = "fu-recognizer"
DEFAULT_PORT = 8000  # as `saofu up` serves (services/serving.py): 8080 is Label Studio's
DEFAULT_POOL = "default"  # <SAOFU_HOME>/data/online_pool


def uvicorn_config(app, port: int, host: str = "127.0.0.1", log_level: str = "warning") -> uvicorn.Config:
    """uvicorn settings for the app: fastest protocol and loop available, no access log."""
    fast_http = importlib.util.find_spec("httptools") is not None
    fast_loop = importlib.util.find_spec("uvloop") is not None
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False,
        http="httptools" if fast_http else "h11", loop="uvloop" if fast_loop else "asyncio",
        lifespan="on", timeout_keep_alive=30, backlog=2048,
    )


def default_pool_dir() -> Path:
    return get_settings().online_pool_dir


def default_last_good_dir() -> Path:
    """`<SAOFU_HOME>/.saofu/serving/last-good`: the last champion that loaded, served when the alias's cannot be."""
    return get_settings().home / ".saofu" / "serving" / "last-good"


def serve(
    port: int = DEFAULT_PORT,
    model_name: str = DEFAULT_MODEL,
    *,
    host: str = "127.0.0.1",
    tracking_uri: str | None = None,
    champion_alias: str = CHAMPION,
    challenger_alias: str = CHALLENGER,
    canary_share: float = 0.0,
    canary_min_requests: int = 200,
    pool_dir: str | Path | None = DEFAULT_POOL,
    pool_max_files: int = 10_000,
    pool_max_bytes: int = 256 * 2**20,
    poll_seconds: float = 5.0,
    threshold: float = 0.9,
    log_level: str = "info",
    wait_for_champion: bool = False,
) -> None:
    """Serve `models:/<model_name>@<champion_alias>` on http://host:port until interrupted.

    Args:
        port: TCP port.
        model_name: registered model.
        host: interface to bind (loopback by default: put a proxy in front to expose it).
        tracking_uri: MLflow store (default: the project's, or MLFLOW_TRACKING_URI).
        champion_alias: alias that answers requests; the app follows it as it moves.
        challenger_alias: alias of the canary's challenger.
        canary_share: share of requests the challenger answers; 0 turns the canary off.
        canary_min_requests: challenger requests before it can be rolled back.
        pool_dir: online pool for the request log; "default" is <SAOFU_HOME>/data/online_pool,
            None logs nothing.
        pool_max_files: images the pool keeps at most (oldest evicted).
        pool_max_bytes: bytes the pool keeps at most (images and its index).
        poll_seconds: how often the aliases are checked.
        threshold: confidence a prediction needs; below it the answer is the negative class.
        log_level: uvicorn's and the app's log level.
        wait_for_champion: start even when no version has the champion alias yet: the app answers
            503 "no model is promoted yet" until its poll finds one (what `saofu up` runs).

    The last champion that loaded is kept in `default_last_good_dir()`; when the champion's
    version cannot be loaded at start, that copy is served and `/healthz` says `degraded`.

    Raises:
        SaofuError: no such model or alias, or a version without a usable graph and no
            last-known-good copy (before the port is opened).
    """
    _app_logging(log_level)
    # each hot swap downloads the new version's artefacts: without this, MLflow draws a progress
    # bar per download into the serving log, whatever the log level
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    policy = CanaryPolicy(share=canary_share, min_requests=canary_min_requests, threshold=threshold) \
        if canary_share > 0 else None
    config = ServeConfig(
        model_name=model_name, tracking_uri=tracking_uri, champion_alias=champion_alias,
        challenger_alias=challenger_alias, canary=policy, poll_seconds=poll_seconds,
        pool_dir=default_pool_dir() if pool_dir == DEFAULT_POOL else pool_dir,
        pool_max_files=pool_max_files, pool_max_bytes=pool_max_bytes, threshold=threshold,
        wait_for_champion=wait_for_champion, last_good_dir=default_last_good_dir(),
    )
    source = ModelSource(
        model_name, tracking_uri=tracking_uri, champion_alias=champion_alias,
        challenger_alias=challenger_alias if policy else None, poll_seconds=poll_seconds,
        last_good_dir=config.last_good_dir,
    )
    if not wait_for_champion:
        source.load()  # a missing alias is reported here, as one line, not as a failed startup
    server = uvicorn.Server(uvicorn_config(create_app(config, source), port, host, log_level))
    _exit_quietly_after_shutdown()
    server.run()


def _exit_quietly_after_shutdown() -> None:
    """Make a SIGTERM/SIGINT stop end the process with status 0 once uvicorn has shut down.

    uvicorn handles the signal itself (drains requests, runs the app's shutdown: the online pool
    is flushed), then restores the previous handler and raises the signal again. With Python's
    defaults that second delivery kills the process (status -15) or raises KeyboardInterrupt (a
    traceback), which a supervisor or a test reads as a crash. The shutdown has already happened
    by then, so the handlers installed here do nothing.
    """
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)


def _app_logging(level: str) -> None:
    logger = logging.getLogger("saofu.serve")
    logger.setLevel(level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s saofu.serve: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def main(argv: list[str] | None = None) -> None:
    """`python -m deploy.server --port 8000 --model fu-recognizer` (the bench starts it this way)."""
    parser = argparse.ArgumentParser(prog="python -m deploy.server", description=serve.__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--canary-share", type=float, default=0.0)
    parser.add_argument("--pool", default=DEFAULT_POOL, help='online pool folder; "none" logs nothing')
    parser.add_argument("--poll-seconds", type=float, default=5.0)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--wait-for-champion", action="store_true")
    args = parser.parse_args(argv)
    serve(args.port, args.model, host=args.host, canary_share=args.canary_share,
          pool_dir=None if args.pool == "none" else args.pool, poll_seconds=args.poll_seconds,
          log_level=args.log_level, wait_for_champion=args.wait_for_champion)


if __name__ == "__main__":
    from saofu.errors import SaofuError

    try:
        main()
    except SaofuError as exc:
        raise SystemExit(f"error: {exc}") from None
