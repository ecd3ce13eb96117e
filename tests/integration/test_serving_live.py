"""`deploy.server.serve` as a real process: refuses a missing alias, serves, follows the alias, stops cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from tests.serving_process import free_port, png, register_untrained, serving

MODEL = "live-serving"
SIZE = 32
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A project folder whose store holds two versions of an untrained recogniser; @champion = 1."""
    home = tmp_path_factory.mktemp("live-home")
    register_untrained(home, MODEL, ["a", "b", "c"], SIZE)
    _client(home).set_registered_model_alias(MODEL, "champion", "1")
    return home


def _client(home: Path) -> MlflowClient:
    uri = f"sqlite:///{home}/mlflow/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "SAOFU_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _serve_command(port: int, model: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "deploy.server", "--port", str(port), "--model", model, "--log-level", "warning",
            *extra]


def _serve(home: Path, port: int, model: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(_serve_command(port, model, *extra), env=_env(home), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)


def test_a_missing_alias_stops_serve_with_one_readable_line(home):
    proc = _serve(home, free_port(), "no-such-model")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "error: registered model 'no-such-model' has no alias 'champion'" in err
    assert "Traceback" not in err


def test_serve_answers_follows_the_alias_and_stops_cleanly(home, tmp_path):
    port, pool = free_port(), tmp_path / "pool"
    with serving(_serve_command(port, MODEL, "--pool", str(pool), "--poll-seconds", "0.2"), cwd=REPO,
                 env=_env(home), port=port) as (proc, url):
        first = httpx.post(f"{url}/predict", content=png(SIZE, (10, 200, 30)),
                           headers={"content-type": "image/png"}).json()
        assert first["version"] == "1" and first["top_class"] in ("a", "b", "c")

        _client(home).set_registered_model_alias(MODEL, "champion", "2")
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/healthz").json()["versions"]["champion"] != "2":
            assert time.monotonic() < deadline, "the server did not follow the alias"
            time.sleep(0.1)
        second = httpx.post(f"{url}/predict", content=png(SIZE, (10, 200, 30)),
                            headers={"content-type": "image/png"}).json()
        assert second["version"] == "2"
    assert proc.returncode == 0
    lines = [json.loads(x) for x in (pool / "index.jsonl").read_text().splitlines()]
    assert [x["prediction"]["version"] for x in lines] == ["1", "2"]  # flushed at shutdown
    assert len(list(pool.rglob("*.png"))) == 1  # the same image twice, stored once
