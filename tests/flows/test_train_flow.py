"""The training flow under Prefect's test harness leaves a registered, rebuildable MLflow model."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from mlflow.tracking import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from flows.train import TrainFlowParams, train_flow
from tasks import tracking


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
def test_train_flow_registers_a_model_version(prefect_api, saofu_home, shapes_dir):
    params = TrainFlowParams(
        data_dir=str(shapes_dir), model="saofu_fu_tiny", epochs=3, batch_size=32, image_size=32,
        registered_model="shapes-recognizer", experiment="test-flow", negative_class=None,
    )
    result = train_flow(params)

    client = MlflowClient(tracking_uri=result.tracking_uri, registry_uri=result.tracking_uri)
    assert result.tracking_uri.startswith(f"sqlite:///{saofu_home}")
    version = client.get_model_version("shapes-recognizer", result.version)
    assert version.run_id == result.run_id
    assert version.tags["arch"].startswith("stem8|")
    assert version.tags["data_fingerprint"]

    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "saofu_fu_tiny"
    assert run.data.tags["arch"] == version.tags["arch"]  # the run alone rebuilds the model
    history = client.get_metric_history(result.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2, 3]
    evaluation = {a.path for a in client.list_artifacts(result.run_id, "evaluation")}
    assert evaluation == {"evaluation/eval.json", "evaluation/badcases.json"}
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"checkpoint", "onnx", "evaluation", "history.csv", "model_card.json"} <= artifacts

    # The registered model is the ONNX graph itself, loadable from the store and runnable on raw pixels.
    local = tracking.download_model_version("shapes-recognizer", result.version)
    sess = ort.InferenceSession(f"{local}/model.onnx", providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"pixels": np.zeros((2, 32, 32, 3), np.uint8)})[0]
    assert logits.shape == (2, 3)
    assert json.loads(sess.get_modelmeta().custom_metadata_map["classes"]) == ["circle", "square", "triangle"]

    # A second run adds version 2 of the same registered model.
    again = train_flow(params)
    assert int(again.version) == int(result.version) + 1


def test_a_run_trained_on_a_data_version_is_tagged_with_it(saofu_home, tmp_path):
    from tasks.data.versions import create_version
    from tasks.train.loop import TrainConfig
    from tasks.train.steps import train_recognizer
    from tests.conftest import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "shapes", n_per_class=12)
    version = create_version(data, "shapes", "test")
    cfg = TrainConfig(model="saofu_fu_tiny", epochs=1, batch_size=16, image_size=32)
    outcome = train_recognizer.fn(str(data), cfg, str(tmp_path / "run"), "test-versions")
    assert outcome.data_version == version.id
    run = MlflowClient(tracking_uri=f"sqlite:///{saofu_home}/mlflow/mlflow.db").get_run(outcome.run_id)
    assert run.data.tags["data_version"] == version.id
