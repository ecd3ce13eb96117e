"""The active-learning flow against a real Label Studio: what the models can't agree on becomes tasks."""

from __future__ import annotations

import numpy as np
import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.active_learning import ActiveLearningParams, active_learning_flow
from tasks import tracking
from tasks.data.manifest import read_manifest
from tasks.data.stream import simulate_scans, write_scans
from tasks.labeling.active_learning import model_ref
from tasks.labeling.client import ensure_project, list_tasks
from tasks.labeling.pool import pool_images
from tasks.train.export import export_onnx
from tests.labeling.test_active_learning import CASES, CLASSES, START, _decoded, _gap, _steered_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_disagreements_become_label_studio_tasks_with_both_predictions(
    prefect_api, label_studio, client, tmp_path, monkeypatch
):
    monkeypatch.setenv("SAOFU_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(label_studio.files_root))
    pool = label_studio.files_root / "al-pool"
    write_scans(simulate_scans(24, seed=3, start=START, rate_per_hour=60.0, image_size=32), pool)

    # Two registered models of different architecture, steered to the predictions CASES lists.
    images = pool_images(pool)
    pixels = _decoded(images)
    for which, name in enumerate(["saofu_fu_tiny", "mobilenet_v3_small_050"]):
        gaps = np.array([_gap(*CASES[i % len(CASES)][which]) for i in range(len(images))])
        path = export_onnx(_steered_model(name, pixels, gaps), CLASSES, tmp_path / f"{name}.onnx", 32)
        ref = model_ref(path, "fu", str(which + 1))
        tracking.register_onnx(tracking.start_run("test-al", "register", {}, {}), ref.onnx_path, "fu", 32,
                               CLASSES, {})
    registry = tracking.client()
    registry.set_registered_model_alias("fu", "champion", "1")
    registry.set_registered_model_alias("fu", "second", "2")

    params = ActiveLearningParams(pool_dir=str(pool), dataset_dir=str(tmp_path / "ds"),
                                  registered_model="fu", project="al-real",
                                  threshold=0.9, champion_tta=False,  # steered on these exact pixels only
                                  second_tta=False)
    result = active_learning_flow(params)

    assert (result.new_images, result.auto, result.human, result.spot_checks) == (24, 12, 12, 5)
    assert len(read_manifest(tmp_path / "ds")) == 12
    tasks = list_tasks(client, ensure_project(client, "al-real", CLASSES))
    checks = [t for t in tasks if t["data"].get("spot_check")]
    routed = [t for t in tasks if not t["data"].get("spot_check")]
    assert len(routed) == 12
    for task in routed:
        versions = [p["model_version"] for p in task["predictions"]]
        assert sorted(versions) == ["fu:1", "fu:2"]
    # the dataset lies outside Label Studio's files root: its blind spot checks are served from under it
    assert len(checks) == 5 and all(not t["predictions"] for t in checks)
    again = active_learning_flow(params)
    assert (again.new_images, again.auto, again.human) == (0, 0, 0)
    assert len(list_tasks(client, ensure_project(client, "al-real", CLASSES))) == 17
