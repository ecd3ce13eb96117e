"""The nightly cycle with every stage real: active learning → ingest → short search → train → release.

A real Label Studio (session fixture), the MLflow store under a fresh SAOFU_HOME and Prefect's test
harness; a non-Fu dataset (filled shapes). The cycle runs with the nightly deployment's defaults
where it can: no dataset named (it resolves `<SAOFU_HOME>/data/labelled`), the pool the serving app
logs into (`<SAOFU_HOME>/data/online_pool`, written with `deploy.pool_log.PoolStore`), the second
model found through the alias `second`. SAOFU_HOME lies under Label Studio's files root, as in a
default install, so the pool images the cycle sends to labelers can be shown. The one thing no
flow does, a labeler answering, happens between the active-learning and the ingest stages: the
ingest stage is wrapped so a simulated labeler answers every open task first.
"""

from __future__ import annotations

import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.testing.utilities import prefect_test_harness

import flows.cycle as cycle
from deploy.pool_log import PoolEntry, PoolStore
from flows.cycle import STAGES, CycleParams, cycle_flow
from flows.cycle_summary import cycle_verdict
from flows.release import ReleaseParams, release_flow
from flows.run_summary import artifact_key
from flows.train import TrainFlowParams, train_flow
from tasks import tracking
from tasks.data.manifest import add_images, read_manifest
from tasks.data.versions import list_versions
from tasks.labeling.client import find_project, list_tasks
from tasks.labeling.simulated_labeler import simulate_labeling
from tasks.release import registry
from tests.conftest import SHAPES, make_shapes_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MODEL = "shapes-cycle"
PROJECT = "shapes-cycle"  # unique in the session's Label Studio
DATASET_NAME = "shapes"


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def home(label_studio, tmp_path, monkeypatch):
    """SAOFU_HOME under Label Studio's files root (as `saofu up` sets it), this test's own."""
    home = label_studio.files_root / f"cycle-{tmp_path.name}"
    home.mkdir()
    monkeypatch.setenv("SAOFU_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(label_studio.files_root))
    return home


def _labelled_shapes(home, tmp_path):
    """`<home>/data/labelled`: the shapes as a labelled dataset (tree + manifest), what the cycle resolves."""
    shapes = make_shapes_dataset(tmp_path / "shapes", n_per_class=40)
    dataset = home / "data" / "labelled"
    splits = ("test", "val", "train", "train", "train")
    add_images(dataset, [{"image": str(p), "label": cls, "source": "human", "annotator": "imported",
                          "split": splits[i % len(splits)]}
                         for cls in SHAPES for i, p in enumerate(sorted((shapes / cls).iterdir()))])
    return dataset


def _champion_and_second(dataset) -> str:
    """A released champion (saofu_fu_tiny) and a second registered version of another architecture."""
    train_flow(TrainFlowParams(data_dir=str(dataset), image_size=32, model="saofu_fu_tiny", epochs=10,
                               batch_size=16,
                               registered_model=MODEL, experiment="t", negative_class=None, device="cpu"))
    champion = release_flow(ReleaseParams(registered_model=MODEL, fresh_n=200, prune_amount=0.0, fine_tune_epochs=0,
                                          gate={"max_latency_ms": 50.0}, negative_class=None, threshold=0.5))
    assert champion.promoted
    second = train_flow(TrainFlowParams(data_dir=str(dataset), image_size=32, model="mobilenet_v3_small_050",
                                        epochs=2, batch_size=16, registered_model=MODEL, experiment="t",
                                        negative_class=None, device="cpu"))
    tracking.client().set_registered_model_alias(MODEL, "second", second.version)
    return champion.challenger_version


def _fill_pool(home, tmp_path) -> dict[str, str]:
    """Requests the serving app logged: shape images in `<home>/data/online_pool`; returns truth by sha256."""
    import hashlib

    scans = make_shapes_dataset(tmp_path / "scans", n_per_class=6, seed=7)
    store = PoolStore(home / "data" / "online_pool")
    truth = {}
    try:
        for cls in SHAPES:
            for path in sorted((scans / cls).iterdir()):
                data = path.read_bytes()
                store.add(PoolEntry(data=data, image_format="PNG", timestamp=time.time(),
                                    prediction={"class": cls, "top_class": cls, "score": 0.5,
                                                "model_version": f"{MODEL}:1", "arm": "champion"},
                                    meta={"bytes": len(data), "format": "PNG", "width": 32, "height": 32}))
                truth[hashlib.sha256(data).hexdigest()] = cls
    finally:
        store.close()
    return truth


@pytest.mark.timeout(900)
def test_one_nightly_cycle_runs_every_stage_for_real(prefect_api, home, label_studio, client, tmp_path,
                                                     monkeypatch):
    started = time.perf_counter()
    dataset = _labelled_shapes(home, tmp_path)
    champion_before = _champion_and_second(dataset)
    truth = _fill_pool(home, tmp_path)
    rows_before = read_manifest(dataset)
    versions_before = list_versions(DATASET_NAME)
    setup_s = time.perf_counter() - started

    # The labelers' night: between active learning and ingest, a simulated labeler answers every task.
    real_ingest = cycle.ingest_flow
    answered = {}

    def labelers_then_ingest(params):
        project = find_project(client, PROJECT)
        assert project is not None, "active learning sent no task to Label Studio"
        answered.update(simulate_labeling(client, project.id, truth=lambda t: truth[t["data"]["sha256"]],
                                          annotators=("sim-1",)))
        return real_ingest(params)

    monkeypatch.setattr(cycle, "ingest_flow", labelers_then_ingest)
    params = CycleParams(registered_model=MODEL, dataset_name=DATASET_NAME, project=PROJECT, threshold=0.5,
                         search_trials=2, search_epochs=1, train_epochs=2, device="cpu", reason="cycle e2e test")
    result = cycle_flow.with_options(retries=0)(params)  # a failure fails the test now, not after a retry
    cycle_s = time.perf_counter() - started - setup_s
    print(f"setup {setup_s:.0f} s, cycle {cycle_s:.0f} s\n{cycle.step_table(result)}")

    # The night's summary is on the run's page in the Prefect UI, the verdict as its heading.
    with get_client(sync_client=True) as prefect:
        (stored,) = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[artifact_key("cycle", MODEL)])))
    assert stored.type == "markdown"
    assert stored.data.splitlines()[0] == f"# Nightly cycle of `{MODEL}`: {cycle_verdict(result)}"
    assert result.stages["release"] in stored.data and result.stages["ingest"] in stored.data

    # Every stage ran, none skipped, each timed.
    assert not result.skipped
    assert set(result.stages) == set(STAGES) and set(result.steps) == set(STAGES), result.stages
    assert not any(outcome.startswith("skipped") for outcome in result.stages.values()), result.stages
    assert all(result.steps[stage] > 0 for stage in STAGES)
    assert result.seconds >= sum(result.steps.values()) * 0.99

    # Active learning: every pool image auto-labelled or sent; the sent ones are Label Studio tasks.
    store = MlflowClient(tracking.tracking_uri(), tracking.tracking_uri())
    al_runs = store.search_runs([store.get_experiment_by_name("saofu-active-learning").experiment_id])
    assert len(al_runs) == 1
    al = al_runs[0].data.metrics
    assert al["new_images"] == len(truth) and al["auto"] + al["human"] == len(truth) and al["deferred"] == 0
    assert al["human"] > 0
    tasks = list_tasks(client, find_project(client, PROJECT).id)
    assert len(tasks) == al["human"]
    assert {t["data"]["sha256"] for t in tasks} <= set(truth)
    assert all(sorted(p["model_version"].split(":")[0] for p in t["predictions"]) == [MODEL, MODEL] for t in tasks)
    rows = read_manifest(dataset)
    auto_rows = [r for r in rows if r["source"] == "auto"]
    assert len(auto_rows) == al["auto_added"] == al["auto"]

    # Ingest: the labeler's answers went in, as a new data version; the manifest grew by both.
    assert answered["tasks"] == len(tasks) and answered["correct"] == len(tasks)
    new_human = [r for r in rows if r["source"] == "human" and r["task_id"]]
    assert len(new_human) == len(tasks)
    assert {r["sha256"]: r["label"] for r in new_human} == {t["data"]["sha256"]: truth[t["data"]["sha256"]]
                                                            for t in tasks}
    assert len(rows) == len(rows_before) + len(tasks) + len(auto_rows)
    versions = list_versions(DATASET_NAME)
    assert len(versions) == len(versions_before) + 1
    assert versions[-1].id in result.stages["ingest"] and f"added {len(tasks)}" in result.stages["ingest"]

    # Search: the night's study ran its trials; its best architecture is recorded and trained.
    study_name = cycle._study_name(params)
    study = optuna.load_study(study_name=study_name,
                              storage=f"sqlite:///{home / '.saofu' / 'search' / 'optuna.db'}")
    assert len(study.trials) == 2
    study_runs = store.search_runs([store.get_experiment_by_name("saofu-search").experiment_id],
                                   f"tags.study = '{study_name}'")
    (tags,) = [r.data.tags for r in study_runs if "best_arch" in r.data.tags]  # the study's own run
    assert tags["best_arch"] and tags["best_arch"] in result.stages["search"]
    # The search's resolutions (48-64 px) are not the 32 px champion's: the release below judged two
    # models of different input sizes on the same sets (each sees them decoded at its own size).
    assert int(tags["best_image_size"]) != 32

    # Train: a new version of the chosen architecture, its run tagged with the cycle and the study.
    trained = store.get_model_version(MODEL, result.version)
    assert int(result.version) > int(champion_before)
    run_tags = store.get_run(trained.run_id).data.tags
    assert run_tags["saofu.cycle"] == "nightly" and run_tags["saofu.search.study"] == study_name
    assert trained.tags["model"] == "saofu_from_arch" and trained.tags["data_dir"] == str(dataset.resolve())

    # Release: judged against the champion; the registry agrees with the verdict.
    champion_now = registry.current_champion(MODEL)
    assert result.champion_after == champion_now
    if result.promoted:
        assert champion_now != champion_before and result.stages["release"] == f"promoted v{champion_now}"
        assert store.get_model_version(MODEL, champion_now).tags["parent_version"] == result.version
    else:
        assert champion_now == champion_before
        assert result.stages["release"] == f"not promoted (champion stays v{champion_before})"
