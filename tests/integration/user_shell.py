"""The environment of a user who opened a fresh shell in the project and ran `. .venv/bin/activate`.

Tests that promise "as the user types it" run their commands with this environment: none of
saofu's, MLflow's, Prefect's or Label Studio's variables (the README tells a user to set none),
and none of make's own (`make test` exports MAKELEVEL/MAKEFLAGS, which turn a nested `make demo`
into a sub-make that prints "Entering/Leaving directory" lines no user sees).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv"

# Variables a user of the README never sets: a test must not lean on any of them.
FOREIGN_PREFIXES = ("SAOFU_", "MLFLOW_", "PREFECT_", "LABEL_STUDIO_", "PYTHONPATH", "VIRTUAL_ENV")
MAKE_VARIABLES = ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES", "MAKE_TERMOUT", "MAKE_TERMERR")


def user_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_PREFIXES) and k not in MAKE_VARIABLES}
    env["VIRTUAL_ENV"] = str(VENV)
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env
