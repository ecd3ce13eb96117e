"""The Prefect server (API + UI) and the executor that runs the deployments.

    prefect:   `prefect server start --host 127.0.0.1 --port P` with PREFECT_HOME under
               `$SAOFU_HOME/.saofu/prefect`; its database is SQLite there (`sqlite`, the default)
               or a `prefect` database on saofu's PostgreSQL (`postgres`, `saofu up
               --prefect-db postgres`); healthy when GET <url>/api/health answers 200.
    executor:  `python -m flows.deployments` (a Prefect Runner serving every deployment) with
               PREFECT_API_URL pointing at that server; healthy when the server lists its
               deployments and the process has said it serves them all (its "saofu executor:
               serving ..." line, printed once every deployment is registered).
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
# Where the server keeps flow runs, deployments and schedules. SQLite is Prefect's default and needs
# nothing else; under concurrent writes it answers some with "database is locked", which the API
# turns into a 503 that Prefect's client retries 2 s later (PrefectHQ/prefect#18934): a 2-s stall
# in a run (`saofu bench prefect-db` measures both). PostgreSQL has no such lock.
DATABASES = ("sqlite", "postgres")
DEFAULT_DATABASE = "sqlite"
POSTGRES_DATABASE = "prefect"  # its database on saofu's PostgreSQL cluster (beside the search studies)
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


def sqlite_path() -> Path:
    return prefect_home() / "prefect.db"  # Prefect's default under PREFECT_HOME


def server_command(port: int, host: str = DEFAULT_HOST, database_url: str | None = None,
                   passfile: Path | None = None) -> tuple[list[str], dict[str, str], str]:
    """(command, environment, URL) of the Prefect server.

    Args:
        database_url: a PostgreSQL URL (postgresql+asyncpg://...) for its database; None: SQLite
            under PREFECT_HOME.
        passfile: the libpq passfile holding the URL's password (asyncpg reads PGPASSFILE).
    """
    url = url_of(port, host)
    env = _base_env(f"{url}/api")
    env["PREFECT_UI_API_URL"] = f"{url}/api"
    env["PREFECT_SERVER_UI_API_URL"] = f"{url}/api"
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)  # the stack says which database, not the shell
    if database_url is not None:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
        if passfile is not None:
            env["PGPASSFILE"] = str(passfile)
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


# `flows.deployments.serve_all` prints it after `Runner.add_flow` has registered every deployment
# (add_flow applies each one before it returns). Prefect's own "Your deployments are being served"
# comes from `serve()`, which the executor does not call: waiting for it cost every `up` the 60-s
# fallback below.
SERVING_LINE = "saofu executor: serving"
SAOFU_LOG_MARK = "=== saofu: starting executor"


def executor_healthy(prefect_url: str, log_path: Path | None = None, started_epoch: float | None = None) -> bool:
    """The server lists deployments and the executor has registered them all.

    The executor registers the deployments one by one, then prints its ready line: until that line
    (in the log since this start), a deployment may still be missing. Without the line (an
    executor of another make), deployments listed for 60 s count as ready.
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
