"""The Prefect server (API + UI, SQLite) and the executor that runs the deployments.

    prefect:   `prefect server start --host 127.0.0.1 --port P` with PREFECT_HOME under
               `$SAOFU_HOME/.saofu/prefect` (its SQLite database lives there); healthy when
               GET <url>/api/health answers 200.
    executor:  `python -m flows.deployments` (Prefect's `serve(...)` of every deployment) with
               PREFECT_API_URL pointing at that server; healthy when the server lists its
               deployments and the process has said it serves them all (Prefect's "Your
               deployments are being served" line, printed once every deployment is created).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from saofu.settings import get_settings
from services.process import http_get, state_dir

DEFAULT_PORT = 4200
DEFAULT_HOST = "127.0.0.1"
START_TIMEOUT_S = 180.0  # the first start creates and migrates the database: slow on 2 cores
EXECUTOR_TIMEOUT_S = 180.0  # imports the flows (Prefect, MLflow) and registers every deployment


def prefect_home():
    return state_dir() / "prefect"


def url_of(port: int, host: str = DEFAULT_HOST) -> str:
    return f"http://{host}:{port}"


def _base_env(api_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PREFECT_HOME": str(prefect_home()),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no calls home
        "SAOFU_HOME": str(get_settings().home),
        "PYTHONUNBUFFERED": "1",  # the log shows what happened up to a crash, and the executor's ready line
    })  # fmt: skip
    return env


def server_command(port: int, host: str = DEFAULT_HOST) -> tuple[list[str], dict[str, str], str]:
    """(command, environment, URL) of the Prefect server."""
    url = url_of(port, host)
    env = _base_env(f"{url}/api")
    env["PREFECT_UI_API_URL"] = f"{url}/api"
    env["PREFECT_SERVER_UI_API_URL"] = f"{url}/api"
    prefect_home().mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    return cmd, env, url


def server_healthy(url: str) -> bool:
    return http_get(f"{url}/api/health", timeout=3.0)[0] == 200


def executor_command(prefect_url: str, model: str = "fu-recognizer") -> tuple[list[str], dict[str, str]]:
    """(command, environment) of the process that executes the deployments of `model`."""
    return [sys.executable, "-m", "flows.deployments", "--model", model], _base_env(f"{prefect_url}/api")


def deployment_names(prefect_url: str) -> list[str] | None:
    """Names of the deployments the server knows; None when it does not answer."""
    code, body = http_get(f"{prefect_url}/api/deployments/filter", timeout=5.0, method="POST", body=b"{}")
    if code != 200:
        return None
    try:
        return sorted(d.get("name", "") for d in json.loads(body))
    except (ValueError, AttributeError):
        return None


SERVING_LINE = "deployments are being served"
SAOFU_LOG_MARK = "=== saofu: starting executor"


def executor_healthy(prefect_url: str, log_path: Path | None = None, started_epoch: float | None = None) -> bool:
    """The server lists deployments and the executor has registered them all.

    `serve(...)` creates the deployments one by one, then prints its ready line: until that line
    (in the log since this start), a deployment may still be missing. Without the line (a
    `serve(print_starting_message=False)`), deployments listed for 60 s count as ready.
    """
    if not deployment_names(prefect_url):
        return False
    if log_path is not None:
        try:
            text = log_path.read_text(errors="replace")
        except OSError:
            text = ""
        if SERVING_LINE in text.rsplit(SAOFU_LOG_MARK, 1)[-1]:
            return True
    return started_epoch is not None and time.time() - started_epoch > 60
