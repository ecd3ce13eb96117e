"""The fast retrain end to end on a dataset outside the Fu world: a class added from a folder of labels,
resumed after a failure without training twice, and two runs of one model kept one after the other."""

from __future__ import annotations

import json
import threading
import time

import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.testing.utilities import prefect_test_harness

import flows.fast_retrain as fast_retrain
from flows.fast_retrain import ClassChange, FastRetrainParams, fast_retrain_flow
from flows.release import ReleaseParams, release_flow
from flows.train import TrainFlowParams, train_flow
from saofu.errors import SaofuError
from tasks import tracking
from tasks.data.manifest import read_manifest
from tasks.release import registry
from tasks.train.onnx_interface import read_metadata
from tests.conftest import make_shapes_dataset

MODEL = "shapes-fast"


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def champion_of_two_shapes(prefect_api, saofu_home, tmp_path):
    """A champion trained on circle and square only, shipped pruned; triangle labels waiting in a folder."""
    shapes = make_shapes_dataset(tmp_path / "shapes", n_per_class=60)
    labels = tmp_path / "labels" / "triangle"
    labels.parent.mkdir()
    (shapes / "triangle").rename(labels)
    train_flow(TrainFlowParams(data_dir=str(shapes), image_size=32, model="saofu_fu_tiny", epochs=10,
                               registered_model=MODEL, experiment="t", negative_class=None))
    with pytest.MonkeyPatch.context() as patch:
        # The pruned graph ships whatever the timing says: the fast retrain must start from it.
        patch.setattr("flows.release.choose_artefact",
                      lambda variants, bar: next(v for v in variants if v.label == "pruned fp32"))
        first = release_flow(ReleaseParams(registered_model=MODEL, fresh_n=200, prune_amount=0.5, fine_tune_epochs=1,
                                           gate={"max_latency_ms": 50.0}, negative_class=None, threshold=0.5))
    assert first.promoted and first.shipped == "pruned fp32"
    return shapes, labels.parent, first.challenger_version


def _params(labels, **over) -> FastRetrainParams:
    # What a 15-second budget learns depends on how busy the machine is: these tests check the path
    # (lineage, resume, one at a time), so the gate's recall target is open; quality is bench/'s.
    base = dict(registered_model=MODEL, changes=[ClassChange(name="triangle", kind="new")], labels=str(labels),
                budget_min=0.25, new_class_recall=0.0, max_old_class_drop_pts=100.0, max_latency_ms=50.0, threshold=0.5,
                experiment="t-fast")
    return FastRetrainParams(**{**base, **over})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_class_added_from_a_folder_ships_with_lineage_and_resumes_without_training_twice(
        champion_of_two_shapes, saofu_home, monkeypatch):
    shapes, labels, champion = champion_of_two_shapes
    calls = []
    real = fast_retrain.fine_tune_and_register

    def counting(*args, **kwargs):
        calls.append(time.monotonic())
        return real(*args, **kwargs)

    monkeypatch.setattr(fast_retrain, "fine_tune_and_register", counting)

    # A failure in compression, after the fine-tune finished: the run fails, nothing is promoted.
    def broken(*args, **kwargs):
        raise RuntimeError("injected: compression failed")

    with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="injected"):
        patch.setattr("flows.release.build_variants", broken)
        fast_retrain_flow(_params(labels, parent_gate=0.99))
    assert len(calls) == 1 and registry.current_champion(MODEL) == champion

    # The same parameters again: the fine-tune's persisted result is reused, the release finishes.
    result = fast_retrain_flow(_params(labels, parent_gate=0.99))
    assert len(calls) == 1, "the fine-tune ran again on resume"
    assert result.fine_tune_reused and result.steps["fine-tune"] < 5
    assert result.promoted and result.champion_before == champion
    assert registry.current_champion(MODEL) == result.challenger_version
    # The labels went in with the failed run (once: the ingest is idempotent), as a data version.
    assert result.labels_added == 0 and result.data_version
    dataset = saofu_home / "data" / "shapes-labelled"
    assert sum(r["label"] == "triangle" for r in read_manifest(dataset)) == 60

    client = MlflowClient(tracking.tracking_uri(), tracking.tracking_uri())
    tuned = client.get_model_version(MODEL, result.fine_tuned_version).tags
    assert tuned["parent_version"] == champion and tuned["data_version"] == result.data_version
    # Fine-tuned from the weights that served (the pruned champion), not the unpruned model behind it.
    trained_arch = client.get_model_version(MODEL, "1").tags["arch"]
    champion_arch = client.get_model_version(MODEL, champion).tags["arch"]
    run_params = client.get_run(tuned["run_id"]).data.params
    assert run_params["base_weights"] == "shipped"
    # The gate's own old-class check reaches the fine-tune (its --max-old-drop-pts, as a fraction; the
    # keeper of a grown model holds epochs to it).
    assert float(run_params["max_old_class_drop"]) == 1.0
    # ...and so does the parent gate (on a class that refines nothing it has nothing to hold down).
    assert float(run_params["parent_gate"]) == 0.99
    # The budget is the step's: reading the base and the data came out of the training's share.
    training_s = client.get_run(tuned["run_id"]).data.metrics["training_budget_s"]
    assert float(run_params["budget_s"]) == 15.0 and 0.25 * 15.0 <= training_s < 15.0
    assert champion_arch != trained_arch and tuned["arch"] == champion_arch
    assert json.loads(tuned["saofu.change"]) == {"new": ["triangle"], "changed": [], "refines": {}}
    shipped = client.get_model_version(MODEL, result.challenger_version).tags
    assert shipped["parent_version"] == result.fine_tuned_version and shipped["base_version"] == champion
    assert shipped["prefect_flow_run_id"]

    # The run's summary is on its page in the Prefect UI: a markdown artifact keyed by the model.
    with get_client(sync_client=True) as prefect:
        stored = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["fast-retrain-shapes-fast"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[shipped["fast_retrain_flow_run_id"]])))
    assert len(stored) == 1 and stored[0].type == "markdown"
    summary = stored[0].data
    assert summary.startswith(f"# Fast retrain of `{MODEL}`: promoted: version {result.challenger_version}")
    assert "new `triangle`" in summary and f"version {result.fine_tuned_version}: reused" in summary
    assert "parent gate | 0.99: nothing to gate" in summary  # triangle refines nothing
    assert result.gate_table.splitlines()[0] in summary and "release/compress" in summary
    # Paired with the champion image by image, on the classes both know (the new one is judged by its target).
    paired = {line.split("|")[2].strip() for line in result.changes_table.splitlines()[2:] if line.startswith("| ")}
    assert paired == {"circle", "square"} and "## What changed, image by image" in summary

    # The grown model: the base's classes in their order, then the new one; old ones not regressed much.
    onnx_dir = tracking.download_model_version(MODEL, result.challenger_version)
    meta = read_metadata(next(onnx_dir.rglob("*.onnx")))
    assert json.loads(meta["classes"]) == ["circle", "square", "triangle"]
    # measured on the new class (how well a 15-second budget learns it depends on the machine's load:
    # tests/train/test_fine_tune.py checks learning on a fixed schedule, bench/ on the real budget)
    assert "triangle" in result.fine_tune["recall_after"]
    assert set(result.steps) >= {"resolve-base", "ingest", "fine-tune", "held-out-set", "release/compress",
                                 "release/gate", "release/promote"}
    assert 0 <= result.orchestration_share < 1
    # where the orchestration went, step by step: its parts add up to it
    assert {"resolve-base", "ingest", "fine-tune", "release"} <= set(result.orchestration_steps)
    assert sum(result.orchestration_steps.values()) == pytest.approx(result.orchestration_s, abs=0.05)
    assert result.fine_tune["method"] == "expand"  # a new class on a saofu recogniser: the frozen base + a branch
    # A plain ImageFolder gets a labelled copy; the user's folder is untouched.
    assert not (shapes / "manifest.csv").exists() and not (shapes / "triangle").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_fast_retrains_of_one_model_run_one_after_the_other(champion_of_two_shapes):
    _, labels, champion = champion_of_two_shapes
    results, errors = {}, []

    def run(seed: int) -> None:
        try:
            results[seed] = fast_retrain_flow(_params(labels, seed=seed, base_version=champion))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
        time.sleep(0.5)
    for t in threads:
        t.join()
    assert not errors, errors
    waits = sorted(r.steps["wait-for-model"] for r in results.values())
    # The second waited for (nearly) all of the first: its wait is most of the first's run.
    first = min(results.values(), key=lambda r: r.steps["wait-for-model"])
    assert waits[1] >= 0.8 * (first.wall_s - waits[0])
    versions = registry.promotion_history(MODEL)
    assert [r.version for r in versions][-2:] == sorted(r.challenger_version for r in results.values())


def test_bad_parameters_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="budget_min"):
        FastRetrainParams(budget_min=0)
    with pytest.raises(ValueError, match="refines is only for new classes"):
        FastRetrainParams(changes=[ClassChange(name="fu", kind="changed", refines="not_fu")])
    with pytest.raises(ValueError, match="more than once"):
        FastRetrainParams(changes=[ClassChange(name="a"), ClassChange(name="a")])
    with pytest.raises(ValueError, match="serve_url"):
        FastRetrainParams(canary_share=0.1)
    with pytest.raises(ValueError, match="parent_gate"):
        FastRetrainParams(parent_gate=0.3)
    with pytest.raises(ValueError, match="parent_gate"):
        FastRetrainParams(parent_gate=1.2)
    assert all(f.default is not None or f.default_factory for f in FastRetrainParams.model_fields.values())


def test_labels_name_a_folder_or_a_project(tmp_path):
    assert FastRetrainParams(labels=str(tmp_path)).labels_folder() == tmp_path
    assert FastRetrainParams(labels="fu-campaign").labels_folder() is None
    with pytest.raises(SaofuError, match="labels folder not found"):
        FastRetrainParams(labels=str(tmp_path / "typo")).labels_folder()
    assert FastRetrainParams(labels="team/fu", labels_kind="label-studio").labels_folder() is None


def test_a_change_that_does_not_fit_the_base_is_refused_before_any_data_is_touched():
    from tasks.train.retrain_steps import check_change

    with pytest.raises(SaofuError, match="already classes"):
        check_change(["fu", "not_fu"], ["fu"], [], {})
    with pytest.raises(SaofuError, match="not classes of the base"):
        check_change(["fu", "not_fu"], [], ["fu_merchant"], {})
    with pytest.raises(SaofuError):
        check_change(["fu", "not_fu"], ["fu_merchant"], [], {"fu_merchant": "lucky"})


@pytest.mark.timeout(30)
def test_a_cached_fine_tune_is_reused_only_while_its_version_is_the_one_it_registered(monkeypatch):
    """After a reset of the tracking store, the cached result's version number may name another model."""
    from types import SimpleNamespace

    versions = {"3": SimpleNamespace(tags={"run_id": "run-of-another-model"}),
                "4": SimpleNamespace(tags={"run_id": "cached-run"})}

    def get_model_version(name, version):
        if version not in versions:
            raise RuntimeError(f"RESOURCE_DOES_NOT_EXIST: {name} v{version}")
        return versions[version]

    monkeypatch.setattr(fast_retrain.tracking, "client", lambda: SimpleNamespace(get_model_version=get_model_version))
    assert fast_retrain.registered_from(MODEL, "4", "cached-run")
    assert not fast_retrain.registered_from(MODEL, "3", "cached-run")  # the number, not the model
    assert not fast_retrain.registered_from(MODEL, "9", "cached-run")  # gone


def test_summary_keys_fold_a_model_name_into_what_prefect_takes():
    from flows.run_summary import artifact_key

    assert artifact_key("fast-retrain", "Fu_Recognizer v2") == "fast-retrain-fu-recognizer-v2"
    assert artifact_key("fast-retrain", "shapes-fast") == "fast-retrain-shapes-fast"


@pytest.mark.timeout(120)
def test_a_summary_that_cannot_be_stored_is_a_warning_not_a_failed_run(prefect_api, monkeypatch):
    from prefect import flow

    import flows.run_summary as run_summary

    def refused(**kwargs):
        raise RuntimeError("injected: the API refused the artifact")

    warnings = []
    monkeypatch.setattr(run_summary, "create_markdown_artifact", refused)
    monkeypatch.setattr(run_summary, "get_run_logger",
                        lambda: type("Log", (), {"warning": lambda self, *a: warnings.append(a[0] % a[1:])})())

    @flow
    def shipped() -> str:
        run_summary.publish("# done", "fast-retrain-x", "a model already serving")
        return "shipped"

    assert shipped() == "shipped"
    assert len(warnings) == 1 and "fast-retrain-x" in warnings[0] and "injected" in warnings[0]
