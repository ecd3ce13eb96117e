"""The serving app as a service: `saofu serve --wait-for-champion` on loopback.

It follows `models:/<model>@champion` of the project's store and starts even before anything is
promoted: it then answers 503 with `"status": "no-champion"` and picks the champion up through
its alias poll. Healthy when /healthz answers, 200 (a champion is served) or that 503.
"""

from __future__ import annotations

import json
import os
import sys

from saofu.settings import get_settings
from services.process import http_get

DEFAULT_PORT = 8000  # not 8080: Label Studio's
DEFAULT_HOST = "127.0.0.1"
DEFAULT_MODEL = "fu-recognizer"
START_TIMEOUT_S = 90.0


def server_command(port: int, host: str = DEFAULT_HOST, model: str = DEFAULT_MODEL,
                   poll_seconds: float = 5.0) -> tuple[list[str], dict[str, str], str]:
    """(command, environment, URL) of the serving app."""
    cmd = [sys.executable, "-m", "saofu.cli", "serve", "--port", str(port), "--host", host, "--model", model,
           "--poll-seconds", f"{poll_seconds:g}", "--wait-for-champion"]
    env = dict(os.environ)
    env["SAOFU_HOME"] = str(get_settings().home)
    env["PYTHONUNBUFFERED"] = "1"
    return cmd, env, f"http://{host}:{port}"


def health(url: str) -> dict | None:
    """/healthz's JSON when the app answers 200, or 503 "no-champion"; None otherwise."""
    code, body = http_get(f"{url}/healthz", timeout=3.0)
    if code not in (200, 503):
        return None
    try:
        state = json.loads(body)
    except ValueError:
        return None
    if code == 200 or state.get("status") == "no-champion":
        return state
    return None
