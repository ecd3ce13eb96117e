"""The serving app before anything is promoted (`wait_for_champion`, what `saofu up` runs).

It starts with no MLflow store and no champion at all, answers 503 with a message saying no model
is promoted yet, and serves the champion once one is registered and aliased, found by its poll.
The model is an untrained colour graph (tests/deploy/test_canary_classes.py): no torch.
"""

from __future__ import annotations

import time

import httpx
import pytest
from mlflow.tracking import MlflowClient

from deploy.app import ServeConfig
from tests.deploy.test_canary_classes import CHAMPION_W, SIZE, TWO, colour_model, png
from tests.deploy.test_serving import running

MODEL = "waiting-model"



@pytest.mark.timeout(180)
def test_no_champion_answers_503_then_serves_the_champion_once_promoted(saofu_home):
    from tasks.tracking import register_onnx, start_run

    uri = f"sqlite:///{saofu_home}/mlflow/mlflow.db"
    assert not (saofu_home / "mlflow" / "mlflow.db").exists()  # not even a store yet
    config = ServeConfig(model_name=MODEL, tracking_uri=uri, poll_seconds=0.2, wait_for_champion=True)
    with running(config) as url, httpx.Client(timeout=10) as http:
        health = http.get(f"{url}/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "no-champion"
        assert "no model is promoted yet" in health.json()["message"]
        assert "no MLflow store" in health.json()["last_error"]
        answer = http.post(f"{url}/predict", content=png((250, 0, 0)), headers={"content-type": "image/png"})
        assert answer.status_code == 503
        assert answer.json()["reason"] == "no_champion"
        assert "no model is promoted yet" in answer.json()["error"]

        # registered but not promoted: still no champion (the alias is what is served)
        path = colour_model(saofu_home / "v1.onnx", TWO, CHAMPION_W)
        run_id = start_run("no-champion-test", "v1", {}, {})
        assert register_onnx(run_id, path, MODEL, SIZE, TWO, {}) == "1"
        time.sleep(1.0)  # several polls
        health = http.get(f"{url}/healthz")
        assert (health.status_code, health.json()["status"]) == (503, "no-champion")
        assert "has no alias 'champion'" in health.json()["last_error"]

        MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(MODEL, "champion", "1")
        deadline = time.monotonic() + 30
        while (health := http.get(f"{url}/healthz")).status_code != 200:
            assert time.monotonic() < deadline, f"champion not picked up: {health.json()}"
            time.sleep(0.1)
        assert health.json()["status"] == "ok"
        assert health.json()["versions"]["champion"] == "1"
        answer = http.post(f"{url}/predict", content=png((250, 0, 0)), headers={"content-type": "image/png"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["version"] == "1"
        assert answer.json()["top_class"] in TWO


@pytest.mark.timeout(120)
def test_without_wait_for_champion_a_missing_champion_still_fails_startup(saofu_home):
    from deploy.model_source import ModelSource
    from saofu.errors import SaofuError

    uri = f"sqlite:///{saofu_home}/mlflow/mlflow.db"
    source = ModelSource(MODEL, tracking_uri=uri, poll_seconds=0.2)
    with pytest.raises(SaofuError, match="no MLflow store"):
        source.start()
    waiting = ModelSource(MODEL, tracking_uri=uri, poll_seconds=0.2)
    try:
        waiting.start(wait_for_champion=True)  # no raise: polls instead
        assert not waiting.loaded and "no MLflow store" in waiting.last_error
    finally:
        waiting.stop()
