"""The fast retrain with its labels in a real Label Studio: the project grows the new class, the
simulated labeler answers, one flow run ingests, fine-tunes and ships."""

from __future__ import annotations

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.fast_retrain import ClassChange, FastRetrainParams, fast_retrain_flow
from flows.release import ReleaseParams, release_flow
from flows.train import TrainFlowParams, train_flow
from tasks.data.manifest import read_manifest
from tasks.labeling.client import LabelingItem, ensure_project, import_tasks, project_classes
from tasks.labeling.simulated_labeler import simulate_labeling
from tasks.release import registry
from tests.conftest import make_shapes_dataset

pytestmark = pytest.mark.integration
MODEL = "shapes-ls-fast"


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.timeout(900)
def test_labels_from_label_studio_become_the_served_champion(prefect_api, label_studio, client, tmp_path,
                                                             monkeypatch):
    monkeypatch.setenv("SAOFU_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(label_studio.files_root))

    shapes = make_shapes_dataset(tmp_path / "shapes", n_per_class=60)
    triangles = label_studio.files_root / "fast-retrain-triangles"
    (shapes / "triangle").rename(triangles)
    train_flow(TrainFlowParams(data_dir=str(shapes), image_size=32, model="saofu_fu_tiny", epochs=10,
                               registered_model=MODEL, experiment="t", negative_class=None))
    champion = release_flow(ReleaseParams(registered_model=MODEL, fresh_n=200, prune_amount=0.0,
                                          fine_tune_epochs=0, gate={"max_latency_ms": 50.0}, negative_class=None,
                                          threshold=0.5)).challenger_version

    # The labeling project the team already uses knows two classes; the campaign's images go in.
    title = "shapes-campaign"
    pid = ensure_project(client, title, ["circle", "square"])
    ensure_project(client, title, ["circle", "square", "triangle"])  # what the flow does, first here
    import_tasks(client, pid, [LabelingItem(image=p, source="campaign") for p in sorted(triangles.iterdir())])
    simulate_labeling(client, pid, truth=lambda task: "triangle")

    result = fast_retrain_flow(FastRetrainParams(
        registered_model=MODEL, changes=[ClassChange(name="triangle")], labels=title, budget_min=0.25,
        new_class_recall=0.5, max_old_class_drop_pts=100.0, max_latency_ms=50.0, threshold=0.5, experiment="t"))

    assert project_classes(client.projects.get(id=pid).label_config) == ["circle", "square", "triangle"]
    assert result.labels_added == 60 and result.data_version
    rows = read_manifest(tmp_path / "data" / "shapes-labelled")
    human = [r for r in rows if r["label"] == "triangle"]
    assert len(human) == 60 and all(r["source"] == "human" and r["task_id"] for r in human)
    assert result.promoted and result.champion_before == champion
    assert registry.current_champion(MODEL) == result.challenger_version
    assert result.fine_tune["classes"] == ["circle", "square", "triangle"]
