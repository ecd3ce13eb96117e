"""The nightly cycle's parameters and stage order, with its subflows replaced (unit level).

The stages themselves are each tested against real services in their own tests; here only the
wiring: which subflow runs in which order with which parameters, and what is skipped when.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from pydantic import BaseModel

import flows.cycle as cycle
from flows.active_learning import ActiveLearningParams
from flows.cycle import STAGES, CycleParams, cycle_flow, step_table
from flows.ingest import IngestParams
from flows.release import ReleaseParams
from flows.search import SearchFlowParams
from flows.train import TrainFlowParams


class _AlResult(BaseModel):
    auto_labelled: int = 3
    sent_to_labelers: int = 2
    skipped: str = ""


@pytest.fixture
def stages(monkeypatch, saofu_home):
    """Every subflow replaced by a recorder, on a project with a labelled dataset; returns the (stage, params) calls."""
    calls: list[tuple[str, BaseModel]] = []
    (saofu_home / "data" / "labelled").mkdir(parents=True)
    (saofu_home / "data" / "labelled" / "manifest.csv").write_text("path,label,split,source,sha256\n")

    def record(name, result):
        def fake(params):
            calls.append((name, params))
            return result
        return fake

    monkeypatch.setattr(cycle, "get_run_logger", lambda: logging.getLogger("test-cycle"))
    monkeypatch.setattr(cycle, "active_learning_flow", record("active-learning", _AlResult()))
    monkeypatch.setattr(cycle, "ingest_flow", record("ingest", SimpleNamespace(
        added=5, data_version="fu@v2", skipped="")))
    monkeypatch.setattr(cycle, "search_flow", record("search", SimpleNamespace(
        best_arch="s16k3e2d1-s24k5e3d2", best_image_size=48, study_name="cycle-x", best_trial=4, trials=6)))
    monkeypatch.setattr(cycle, "train_flow", record("train", SimpleNamespace(
        version="7", test_accuracy_at_threshold=0.95)))
    monkeypatch.setattr(cycle, "release_flow", record("release", SimpleNamespace(
        promoted=True, champion_before="6", champion_after="7")))
    return calls


@pytest.mark.timeout(60)
def test_every_field_of_the_cycle_form_has_a_plain_default():
    schema = CycleParams.model_json_schema()
    assert not schema.get("required")
    for name, prop in schema["properties"].items():
        assert "default" in prop, name
        assert "anyOf" not in prop and "oneOf" not in prop, f"{name} is a union: the UI renders it badly"
    p = CycleParams()
    assert p.search and p.search_trials <= 10 and p.search_timeout_min <= 30  # a short search


@pytest.mark.timeout(60)
def test_the_stages_run_in_order_each_with_its_flows_parameters(stages, saofu_home):
    (saofu_home / "data" / "online_pool").mkdir(parents=True)
    (saofu_home / "data" / "online_pool" / "index.jsonl").write_text("")
    result = cycle_flow.fn(CycleParams(registered_model="m", search_trials=3, train_epochs=2, max_tasks=0))

    assert [name for name, _ in stages] == list(STAGES)
    params = dict(stages)
    assert isinstance(params["active-learning"], ActiveLearningParams)
    assert params["active-learning"].pool_dir == str(saofu_home / "data" / "online_pool")
    assert params["active-learning"].max_tasks is None and params["active-learning"].second_model is None
    assert isinstance(params["ingest"], IngestParams)
    assert params["ingest"].dataset_dir == str(saofu_home / "data" / "labelled")
    search = params["search"]
    assert isinstance(search, SearchFlowParams)
    assert search.n_trials == 3 and search.final_epochs == 0 and search.study_name.startswith("cycle-m-")
    train = params["train"]
    assert isinstance(train, TrainFlowParams)
    assert (train.model, train.arch, train.image_size) == ("saofu_from_arch", "s16k3e2d1-s24k5e3d2", 48)
    assert train.registered_model == "m" and train.epochs == 2 and train.tags["saofu.search.study"] == "cycle-x"
    release = params["release"]
    assert isinstance(release, ReleaseParams)
    assert release.registered_model == "m" and release.candidate_version == "7"

    assert result.version == "7" and result.promoted and result.champion_after == "7"
    assert set(result.steps) == set(STAGES)
    table = step_table(result)
    assert all(stage in table for stage in STAGES) and "promoted v7" in table


@pytest.mark.timeout(60)
def test_without_a_pool_or_a_search_the_cycle_trains_the_default_architecture(stages, saofu_home):
    result = cycle_flow.fn(CycleParams(search=False))
    assert [name for name, _ in stages] == ["ingest", "train", "release"]
    assert result.stages["active-learning"].startswith("skipped: no online pool")
    assert result.stages["search"] == "skipped: switched off"
    assert dict(stages)["train"].model == "saofu_fu"



@pytest.fixture
def published(monkeypatch) -> list[tuple[str, str]]:
    """(key, markdown) of every summary the cycle stores on its run's page."""
    stored: list[tuple[str, str]] = []
    monkeypatch.setattr(cycle, "publish", lambda markdown, key, description: stored.append((key, markdown)))
    return stored


@pytest.mark.timeout(60)
def test_the_night_s_summary_says_whether_the_champion_changed_and_each_stage(stages, published, saofu_home,
                                                                              monkeypatch):
    result = cycle_flow.fn(CycleParams(registered_model="m", search=False))
    ((key, markdown),) = published
    assert key == "cycle-m"
    lines = markdown.splitlines()
    assert lines[0] == "# Nightly cycle of `m`: promoted: version 7 is the champion"
    assert f"| dataset | {saofu_home / 'data' / 'labelled'} (" in markdown
    assert "| version trained | 7 |" in markdown
    rows = [line for line in lines if line.startswith("| ") and line.split(" | ")[0][2:] in STAGES]
    assert [r.split(" | ")[0][2:] for r in rows] == list(STAGES)
    assert rows[1] == f"| ingest | {result.steps['ingest']:.1f} | added 5, data version fu@v2 |"
    assert rows[2].endswith("| skipped: switched off |")

    # refused by the release: the heading says who stays champion
    published.clear()
    monkeypatch.setattr(cycle, "release_flow", lambda params: SimpleNamespace(
        promoted=False, champion_before="6", champion_after="6"))
    cycle_flow.fn(CycleParams(registered_model="m", search=False))
    assert published[0][1].splitlines()[0] == (
        "# Nightly cycle of `m`: version 7 trained, not promoted: the champion stays version 6")


@pytest.mark.timeout(60)
def test_a_night_with_no_dataset_says_why_on_its_page(published, saofu_home, monkeypatch):
    monkeypatch.setattr(cycle, "get_run_logger", lambda: logging.getLogger("test-cycle"))
    result = cycle_flow.fn(CycleParams(registered_model="m"))
    assert result.skipped
    ((key, markdown),) = published
    assert markdown.splitlines()[0] == f"# Nightly cycle of `m`: skipped: {result.skipped}"
    assert "| dataset | none |" in markdown and markdown.count("| skipped: no labelled dataset |") == len(STAGES)
