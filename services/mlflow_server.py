"""The MLflow tracking server and UI on the project's store.

`mlflow server` with the project's backend store (`sqlite:///$SAOFU_HOME/mlflow/mlflow.db`, or
MLFLOW_TRACKING_URI when set) and artefact root (`$SAOFU_HOME/mlflow/artifacts` as a file URI, so
the runs saofu logged without the server resolve their artefacts through it too), one worker, on
loopback. Healthy when GET <url>/health answers 200.
"""

from __future__ import annotations

import os
import sys

from saofu.errors import SaofuError
from saofu.settings import get_settings
from saofu.urls import hide_password

DEFAULT_PORT = 5000
DEFAULT_HOST = "127.0.0.1"
START_TIMEOUT_S = 120.0


def server_command(port: int, host: str = DEFAULT_HOST) -> tuple[list[str], dict[str, str], str]:
    """(command, environment, URL) of the MLflow server.

    Raises:
        SaofuError: MLFLOW_TRACKING_URI points at a server, not at a store this one could serve.
    """
    settings = get_settings()
    backend = settings.tracking_uri
    if backend.startswith(("http://", "https://")):
        raise SaofuError(f"mlflow: MLFLOW_TRACKING_URI is a server ({hide_password(backend)}), not a store to "
                         "serve; unset it to serve the project's store")
    settings.mlflow_dir.mkdir(parents=True, exist_ok=True)
    (settings.mlflow_dir / "artifacts").mkdir(parents=True, exist_ok=True)
    url = f"http://{host}:{port}"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend, "--default-artifact-root", settings.artifact_root,
        "--host", host, "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # MLflow 3 starts a job runner and six huey consumers for GenAI scoring jobs saofu never uses:
    # too many processes for a 2-core machine.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    env["SAOFU_HOME"] = str(settings.home)
    return cmd, env, url
