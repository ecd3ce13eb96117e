"""`saofu serve` as a user starts it: from the project folder, no SAOFU_HOME, no MLFLOW_TRACKING_URI.

The server is a fresh process that never configured MLflow, so a registry lookup or a download
that fell back to MLflow's global default store (`./mlflow.db`) would not find the model the
project's store (`./mlflow/mlflow.db`) holds, and would leave an empty `./mlflow.db` behind.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from tests.serving_process import free_port, png, register_untrained, serving

MODEL = "folder-serving"
SIZE = 32
CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder whose store holds versions 1 and 2 of an untrained recogniser; @champion = 2."""
    home = tmp_path_factory.mktemp("project")
    register_untrained(home, MODEL, CLASSES, SIZE)
    uri = f"sqlite:///{home}/mlflow/mlflow.db"
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(MODEL, "champion", "2")
    return home


def _command(entry: str, port: int) -> list[str]:
    if entry == "saofu":
        return [str(Path(sys.executable).parent / "saofu"), "serve", "--port", str(port), "--model", MODEL,
                "--log-level", "warning"]
    return [sys.executable, "-m", "deploy.server", "--port", str(port), "--model", MODEL, "--log-level", "warning"]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("entry", ["saofu", "python -m deploy.server"])
def test_serve_from_the_project_folder_uses_its_store(project, entry):
    assert not (project / "mlflow.db").exists()
    env = {k: v for k, v in os.environ.items()
           if k not in ("SAOFU_HOME", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env["OMP_NUM_THREADS"] = "1"
    port = free_port()
    with serving(_command(entry, port), cwd=project, env=env, port=port) as (proc, url):
        answer = httpx.post(f"{url}/predict", content=png(SIZE), headers={"content-type": "image/png"}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["version"] == "2"
        assert answer.json()["top_class"] in CLASSES
    assert proc.returncode == 0
    # No fallback to MLflow's default stores of the working directory.
    assert not (project / "mlflow.db").exists()
    assert not (project / "mlruns").exists()


def test_serving_from_a_folder_without_a_store_says_so_and_creates_none(tmp_path):
    from deploy.model_source import ModelSource
    from saofu.errors import SaofuError

    db = tmp_path / "mlflow" / "mlflow.db"
    with pytest.raises(SaofuError, match=f"no MLflow store at {db}: run from the project folder or set SAOFU_HOME"):
        ModelSource(MODEL, tracking_uri=f"sqlite:///{db}", challenger_alias=None).load()
    assert list(tmp_path.iterdir()) == []
