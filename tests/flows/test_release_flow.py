"""The release flow end to end on a small Fu world: compress → evaluate → register → gate → promote / refuse."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from flows.release import ReleaseParams, release_flow
from flows.train import TrainFlowParams, train_flow
from tasks.release import registry
from tasks.release.steps import ARTEFACT_TAG


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
def test_release_ships_int8_gates_against_the_champion_and_rolls_back(prefect_api, saofu_home):
    trained = train_flow(TrainFlowParams(world_n=300, image_size=32, model="saofu_fu_tiny", epochs=6,
                                         registered_model="fu-rel", experiment="t"))
    common = dict(registered_model="fu-rel", fresh_n=60, fine_tune_epochs=1, gate={"max_latency_ms": 50.0})

    first = release_flow(ReleaseParams(**common))
    client = MlflowClient(tracking_uri=trained.tracking_uri, registry_uri=trained.tracking_uri)
    shipped = client.get_model_version("fu-rel", first.challenger_version)
    assert first.candidate_version == trained.version and first.promoted and first.champion_before is None
    assert shipped.tags[ARTEFACT_TAG] in ("int8", "pruned+int8")  # the INT8 artefact ships, never the float model
    assert shipped.tags["parent_version"] == trained.version and shipped.tags["arch"]
    assert registry.current_champion("fu-rel") == first.challenger_version
    run = client.get_run(first.run_id)
    artefacts = {a.path for a in client.list_artifacts(first.run_id)}
    assert {"gate_report.json", "evaluation"} <= artefacts and run.data.tags["gate"] == "passed"
    pngs = {a.path for a in client.list_artifacts(first.run_id, "evaluation/challenger")}
    assert any("confusion_fresh" in p for p in pngs) and any("pr_regression" in p for p in pngs)

    # A latency budget nothing meets: the gate fails alone on it, and the champion stays.
    refused = release_flow(ReleaseParams(**{**common, "gate": {"max_latency_ms": 1e-4}}))
    assert not refused.promoted and refused.champion_after == first.challenger_version
    assert "latency_p95_ms" in refused.gate_table and "fail" in refused.gate_table
    assert client.get_model_version("fu-rel", refused.challenger_version).tags["saofu.gate"] == "failed"

    # The same candidate again is not worse than the champion: promoted; rollback restores the first.
    second = release_flow(ReleaseParams(**common))
    assert second.promoted and second.champion_before == first.challenger_version
    assert registry.current_champion("fu-rel") == second.challenger_version
    record = registry.rollback("fu-rel", reason="test")
    assert record.version == first.challenger_version == registry.current_champion("fu-rel")
