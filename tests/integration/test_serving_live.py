"""`deploy.server.serve` as a real process: refuses a missing alias, serves, follows the alias, stops cleanly."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

MODEL = "live-serving"
SIZE = 32
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A project folder whose store holds two versions of an untrained recogniser; @champion = 1."""
    import torch

    from models import create_model
    from tasks.tracking import register_onnx, start_run
    from tasks.train.export import export_onnx

    home = tmp_path_factory.mktemp("live-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAOFU_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for seed in (0, 1):
            torch.manual_seed(seed)
            path = export_onnx(create_model("saofu_fu_tiny", 3).eval(), ["a", "b", "c"], home / f"{seed}.onnx", SIZE)
            register_onnx(start_run("live", f"s{seed}", {}, {}), path, MODEL, SIZE, ["a", "b", "c"], {})
    _client(home).set_registered_model_alias(MODEL, "champion", "1")
    return home


def _client(home: Path) -> MlflowClient:
    uri = f"sqlite:///{home}/mlflow/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _serve(home: Path, port: int, model: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "SAOFU_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [sys.executable, "-m", "deploy.server", "--port", str(port), "--model", model, "--log-level", "warning",
         *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_a_missing_alias_stops_serve_with_one_readable_line(home):
    proc = _serve(home, _free_port(), "no-such-model")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "error: registered model 'no-such-model' has no alias 'champion'" in err
    assert "Traceback" not in err


def test_serve_answers_follows_the_alias_and_stops_cleanly(home, tmp_path):
    port, pool = _free_port(), tmp_path / "pool"
    proc = _serve(home, port, MODEL, "--pool", str(pool), "--poll-seconds", "0.2")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        first = httpx.post(f"{url}/predict", content=_png(), headers={"content-type": "image/png"}).json()
        assert first["version"] == "1" and first["top_class"] in ("a", "b", "c")

        _client(home).set_registered_model_alias(MODEL, "champion", "2")
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/healthz").json()["versions"]["champion"] != "2":
            assert time.monotonic() < deadline, "the server did not follow the alias"
            time.sleep(0.1)
        second = httpx.post(f"{url}/predict", content=_png(), headers={"content-type": "image/png"}).json()
        assert second["version"] == "2"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0
    lines = [json.loads(x) for x in (pool / "index.jsonl").read_text().splitlines()]
    assert [x["prediction"]["version"] for x in lines] == ["1", "2"]  # flushed at shutdown
    assert len(list(pool.rglob("*.png"))) == 1  # the same image twice, stored once
