"""What the scheduled deployments do on the project `make demo` leaves behind, and after it.

The scheduled ingest, active learning and cycle name no dataset or pool: they resolve them per run
(tasks/data/project_dataset.py) and, until there is something to work on, complete as skipped with
one warning saying what to run instead of failing every 10 minutes.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from types import SimpleNamespace

import pytest
from prefect.testing.utilities import prefect_test_harness

import flows.active_learning as al_flow
import flows.cycle as cycle
import flows.ingest as ingest
from flows.active_learning import ActiveLearningParams, active_learning_flow
from flows.cycle import STAGES, CycleParams, cycle_flow
from flows.ingest import IngestParams, IngestResult, ingest_flow
from saofu.errors import SaofuError
from saofu.settings import get_settings
from tasks.data import project_dataset
from tasks.data.project_dataset import labelled_copy_dir, resolve_project_dataset
from tests.conftest import make_shapes_dataset
from tests.serving_process import free_port

MODEL = "sched-recognizer"


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def warnings_of(monkeypatch, caplog):
    """Route a flow module's run logger to a plain logger; returns a reader of its WARNING lines."""
    caplog.set_level(logging.INFO)

    def route(module) -> Callable[[], list[str]]:
        name = f"test-{module.__name__}"
        monkeypatch.setattr(module, "get_run_logger", lambda: logging.getLogger(name))
        return lambda: [r.getMessage() for r in caplog.records if r.name == name and r.levelno == logging.WARNING]

    return route


def labelled(folder, rows: str = "") -> str:
    """A labelled dataset: `folder` with a manifest (header, then `rows`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.csv").write_text("path,label,split,source,sha256\n" + rows)
    return str(folder)


# ------------------------------------------------------------------------------------- resolution


@pytest.mark.timeout(60)
def test_resolution_order_labelled_then_champion_data_then_its_copy(saofu_home, monkeypatch):
    data = saofu_home / "data"
    world = data / "fu_world_n4000_s0"
    world.mkdir(parents=True)
    monkeypatch.setattr(project_dataset, "champion_data_dir", lambda name: (str(world), ""))

    missing = resolve_project_dataset(MODEL)
    assert missing.path is None
    assert str(labelled_copy_dir(world)) in missing.reason and "saofu fast-retrain" in missing.reason

    copy = labelled(data / "fu_world_n4000_s0-labelled")
    assert resolve_project_dataset(MODEL).path == copy == str(labelled_copy_dir(world))
    labelled(world)  # the champion's data is itself labelled: it wins over the copy
    assert resolve_project_dataset(MODEL).path == str(world)
    first = labelled(data / "labelled")
    assert resolve_project_dataset(MODEL).path == first

    monkeypatch.setattr(project_dataset, "champion_data_dir", lambda name: (None, "no champion, for the test"))
    assert resolve_project_dataset(MODEL).path == first  # data/labelled needs no registry at all


@pytest.mark.timeout(120)
def test_the_fast_retrain_copy_is_where_the_resolution_looks(saofu_home, tmp_path):
    from flows.fast_retrain import labelled_dataset_step
    from tasks.train.retrain_steps import BaseModelInfo

    plain = make_shapes_dataset(tmp_path / "shapes_plain", n_per_class=6, size=16)
    base = BaseModelInfo(name=MODEL, version="2", trained_version="1", classes=["circle", "square", "triangle"],
                         image_size=16, arch="", data_dir=str(plain), val_share=0.2, split_seed=0)
    made, _ = labelled_dataset_step.fn(base, "")
    assert made == str(get_settings().data_dir / "shapes_plain-labelled") == str(labelled_copy_dir(plain))
    assert (labelled_copy_dir(plain) / "manifest.csv").is_file()


def _register(client, run_params: dict, tags: dict) -> str:
    from tasks.tracking import finish_run, log_dict, start_run

    run_id = start_run("test-scheduled", "v", params=run_params, tags={})
    log_dict(run_id, {"v": 1}, "model/v.json")
    finish_run(run_id)
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    return str(client.create_model_version(MODEL, source, run_id=run_id, tags=tags).version)


@pytest.mark.timeout(180)
def test_the_champion_is_followed_to_its_trained_version_and_active_learning_says_what_is_missing(
    saofu_home, warnings_of
):
    from tasks import tracking
    from tasks.release.steps import ARTEFACT_TAG

    warnings = warnings_of(al_flow)
    # a fresh project: no store, and none is created by asking
    empty = resolve_project_dataset(MODEL)
    assert empty.path is None and "no MLflow store" in empty.reason and "saofu release" in empty.reason
    assert not any(saofu_home.iterdir())

    world = saofu_home / "data" / "fu_world_n4000_s0"  # what `saofu demo` trains on: no manifest
    world.mkdir(parents=True)
    client = tracking.client()
    client.create_registered_model(MODEL)
    # the trained version records its data only in its run's parameters; the release artefact's own
    # data_dir tag points elsewhere, so only following parent_version finds the right folder
    trained = _register(client, {"data_dir": str(world)}, {"parent_version": ""})
    shipped = _register(client, {}, {ARTEFACT_TAG: "int8", "parent_version": trained, "data_dir": "/not/this"})

    no_champion = resolve_project_dataset(MODEL)
    assert no_champion.path is None and "has no champion yet" in no_champion.reason
    reasons = [active_learning_flow.fn(ActiveLearningParams(registered_model=MODEL)).skipped]
    assert "has no champion yet" in reasons[-1] and f"saofu release --model {MODEL}" in reasons[-1]

    client.set_registered_model_alias(MODEL, "champion", shipped)
    no_copy = resolve_project_dataset(MODEL)
    assert no_copy.path is None and str(world) in no_copy.reason and "saofu fast-retrain" in no_copy.reason
    copy = labelled(labelled_copy_dir(world))
    assert resolve_project_dataset(MODEL).path == copy

    reasons.append(active_learning_flow.fn(ActiveLearningParams(registered_model=MODEL)).skipped)
    assert "no second model (alias 'second')" in reasons[-1]
    client.set_registered_model_alias(MODEL, "second", trained)
    reasons.append(active_learning_flow.fn(ActiveLearningParams(registered_model=MODEL)).skipped)
    assert "no online pool" in reasons[-1] and "saofu serve" in reasons[-1]
    (saofu_home / "data" / "online_pool").mkdir()  # what the serving app makes when it starts
    last = active_learning_flow.fn(ActiveLearningParams(registered_model=MODEL))
    reasons.append(last.skipped)
    assert "no request logged yet" in reasons[-1]
    assert (last.run_id, last.new_images, last.auto, last.reasons) == ("", 0, 0, {})
    assert warnings() == [f"active learning skipped: {r}" for r in reasons]  # one line per skipped run
    assert client.get_experiment_by_name(al_flow.EXPERIMENT) is None  # no active-learning run was started

    # a second model named explicitly is not judged here: `resolve_models` raises when it is missing
    named = ActiveLearningParams(registered_model=MODEL, second_model="@nope")
    assert al_flow._models_missing(named) is None


# ------------------------------------------------------------------------ the flows on an empty project


@pytest.mark.timeout(240)
def test_scheduled_ingest_and_active_learning_skip_on_an_empty_project(prefect_api, saofu_home, warnings_of):
    ingest_warnings = warnings_of(ingest)
    al_warnings = warnings_of(al_flow)

    result = ingest_flow(IngestParams())
    assert isinstance(result, IngestResult)
    assert result.skipped.startswith("no labelled dataset") and "saofu data generate --out" in result.skipped
    assert (result.added, result.tasks_seen, result.data_version) == (0, 0, None)
    assert ingest_warnings() == [f"ingest skipped: {result.skipped}"]

    routed = active_learning_flow(ActiveLearningParams())
    assert "no MLflow store" in routed.skipped and "saofu release" in routed.skipped
    assert al_warnings() == [f"active learning skipped: {routed.skipped}"]

    assert not any(saofu_home.iterdir()), "a skipped run wrote into the project"


@pytest.mark.timeout(120)
def test_ingest_skips_a_project_nobody_created_and_fails_on_an_unreachable_label_studio(
    saofu_home, monkeypatch, warnings_of
):
    dataset = labelled(saofu_home / "data" / "labelled", "train/fu/a.png,fu,train,generated,aa\n")
    warnings = warnings_of(ingest)
    asked: list[tuple[str, list[str]]] = []
    real_find_project = ingest.find_project

    def no_such_project(project, classes):
        asked.append((project, classes))
        return None

    monkeypatch.setattr(ingest, "find_project", no_such_project)
    result = ingest_flow.fn(IngestParams(project="not-made-yet", registered_model=MODEL))
    assert asked == [("not-made-yet", ["fu"])]  # the resolved dataset's classes
    assert "'not-made-yet' does not exist yet" in result.skipped and "active learning" in result.skipped
    assert warnings() == [f"ingest skipped: {result.skipped}"]
    assert sorted(p.name for p in (saofu_home / "data" / "labelled").iterdir()) == ["manifest.csv"]
    assert not (saofu_home / "mlflow").exists()
    assert dataset == str(saofu_home / "data" / "labelled")

    # a named dataset that does not exist stays an error
    with pytest.raises(SaofuError, match="no manifest in"):
        ingest_flow.fn(IngestParams(dataset_dir=str(saofu_home / "nope")))

    # a Label Studio that is configured but not there is an error worth failing on
    monkeypatch.setenv("LABEL_STUDIO_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "token")
    with pytest.raises(SaofuError,
                       match=r"Label Studio at http://127\.0\.0\.1:\d+ is not reachable.*saofu up labeling"):
        real_find_project.fn("fu-recognizer", ["fu"])


# ---------------------------------------------------------------------------------------- cycle


@pytest.fixture
def recorded_stages(monkeypatch):
    calls: list[str] = []

    def record(name, result):
        def fake(params):
            calls.append(name)
            return result
        return fake

    monkeypatch.setattr(cycle, "active_learning_flow", record("active-learning", SimpleNamespace(
        skipped="registered model 'm' has no second model")))
    monkeypatch.setattr(cycle, "ingest_flow", record("ingest", SimpleNamespace(
        skipped="Label Studio project 'fu-recognizer' does not exist yet", added=0, data_version=None)))
    monkeypatch.setattr(cycle, "search_flow", record("search", None))
    monkeypatch.setattr(cycle, "train_flow", record("train", SimpleNamespace(
        version="3", test_accuracy_at_threshold=0.9)))
    monkeypatch.setattr(cycle, "release_flow", record("release", SimpleNamespace(
        promoted=False, champion_before="2", champion_after="2")))
    return calls


@pytest.mark.timeout(60)
def test_the_cycle_skips_with_a_reason_when_there_is_no_dataset(saofu_home, recorded_stages, warnings_of):
    warnings = warnings_of(cycle)
    result = cycle_flow.fn(CycleParams(registered_model="m"))
    assert recorded_stages == []  # nothing ran, train least of all
    assert result.skipped.startswith("no labelled dataset") and "saofu release" in result.skipped
    assert set(result.stages) == set(STAGES) and all(v.startswith("skipped") for v in result.stages.values())
    assert warnings() == [f"cycle skipped: {result.skipped}"]
    assert not any(saofu_home.iterdir())


@pytest.mark.timeout(60)
def test_the_cycle_records_stages_that_skip_themselves_and_goes_on(saofu_home, recorded_stages, warnings_of):
    warnings_of(cycle)
    dataset = labelled(saofu_home / "data" / "labelled")
    pool = saofu_home / "data" / "online_pool"
    pool.mkdir()
    result = cycle_flow.fn(CycleParams(registered_model="m", search=False))
    assert result.stages["active-learning"] == "skipped: the online pool " + str(pool) + (
        " has no request logged yet (no index.jsonl): send the serving app images")
    (pool / "index.jsonl").write_text("")
    result = cycle_flow.fn(CycleParams(registered_model="m", search=False))
    assert recorded_stages[-4:] == ["active-learning", "ingest", "train", "release"]
    assert result.stages["active-learning"] == "skipped: registered model 'm' has no second model"
    assert result.stages["ingest"].startswith("skipped: Label Studio project")
    assert result.version == "3" and not result.skipped and dataset.endswith("labelled")


# ------------------------------------------------------------------------------------ deployments


@pytest.mark.timeout(60)
def test_the_deployments_leave_dataset_and_pool_to_each_run(saofu_home):
    from flows.deployments import deployment_specs

    specs = {kw["name"]: kw.get("parameters", {}).get("params") for _, kw in deployment_specs()}
    assert specs["ingest"]["dataset_dir"] == "" and specs["ingest"]["registered_model"] == "fu-recognizer"
    assert (specs["active-learning"]["dataset_dir"], specs["active-learning"]["pool_dir"]) == ("", "")
    assert (specs["cycle"]["dataset_dir"], specs["cycle"]["pool_dir"]) == ("", "")
    assert IngestParams.model_validate(specs["ingest"]).dataset_dir == ""
    assert ActiveLearningParams.model_validate(specs["active-learning"]).pool_dir == ""
    assert not any(saofu_home.iterdir())  # nothing resolved (or created) when the executor starts


@pytest.mark.timeout(60)
def test_saofu_serve_defaults_to_the_port_saofu_up_serves_on_not_label_studios():
    import deploy.server
    from saofu.cli.serve import serve
    from services import labeling, serving

    assert inspect.signature(serve).parameters["port"].default.default == serving.DEFAULT_PORT == 8000
    assert inspect.signature(deploy.server.serve).parameters["port"].default == serving.DEFAULT_PORT
    assert serving.DEFAULT_PORT != labeling.DEFAULT_PORT
