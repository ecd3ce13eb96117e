"""The release flow end to end on a small Fu world: compress → evaluate → register → gate → promote / refuse."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort
from prefect.testing.utilities import prefect_test_harness

from flows.release import ReleaseParams, ReleaseResult, release_flow
from flows.release_summary import release_verdict
from flows.train import TrainFlowParams, train_flow
from tasks.release import registry, report, steps
from tasks.release.evaluation import LatencyStats
from tasks.release.gate import GateReport
from tasks.release.steps import ARTEFACT_TAG

# Timings are pinned: which artefact ships and whether the gate's latency budget holds are decided
# by the rules on these figures, not by how busy the machine was (speed is bench/'s business).
# The unpruned FP32 graph measures clearly fastest (half the others' time, IQRs apart, in every
# round), so `choose_artefact` must ship it: the same candidate released twice ships the same graph.
FASTEST_FILE, FASTEST_MS, OTHERS_MS = "model.fp32.onnx", 1.0, 2.0
PROFILE_P50_MS, PROFILE_P95_MS = 0.3, 0.5  # what `runtime_profile` (the gate's latency) reports


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def pinned_timings(monkeypatch) -> list[list[str]]:
    """Fixed latency figures for the artefact choice and the gate; returns the graphs each choice timed."""
    timed: list[list[str]] = []

    def interleaved(paths, image_size=64, threads=1, rounds=5, runs=200, warmup=50):
        timed.append([str(p) for p in paths])
        stats = []
        for path in paths:
            p50 = FASTEST_MS if str(path).endswith(FASTEST_FILE) else OTHERS_MS
            stats.append(LatencyStats(p50_ms=p50, p95_ms=1.2 * p50, p25_ms=0.95 * p50, p75_ms=1.05 * p50,
                                      mean_ms=p50, round_p50_ms=[p50] * rounds, runs=rounds * runs))
        return stats

    def profile_latency(path, image_size=64, threads=1, warmup=20, runs=200):
        return {"latency_p50_ms": PROFILE_P50_MS, "latency_p95_ms": PROFILE_P95_MS, "latency_mean_ms": PROFILE_P50_MS,
                "threads": threads}

    monkeypatch.setattr(steps, "measure_latency_interleaved", interleaved)
    monkeypatch.setattr(report, "measure_latency", profile_latency)
    return timed


def assert_refused_on_latency_alone(report_json: str, table: str, budget_ms: float) -> None:
    """The gate's recorded decision: failed on latency_p95_ms (its figure over `budget_ms`) and on nothing else."""
    decision = GateReport.model_validate_json(report_json)
    assert not decision.passed and [c.name for c in decision.failed] == ["latency_p95_ms"], decision.summary
    latency = next(c for c in decision.checks if c.name == "latency_p95_ms")
    assert (latency.value, latency.op, latency.limit) == (PROFILE_P95_MS, "<=", budget_ms)
    assert decision.summary == f"gate failed: 1 of {len(decision.checks)} checks (latency_p95_ms)"
    # The table says the same: one FAIL row, the latency one, with its numbers.
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:-1]}
    assert [name for name, cells in rows.items() if "FAIL" in cells] == ["latency_p95_ms"], table
    assert rows["latency_p95_ms"][:5] == ["latency_p95_ms", f"{PROFILE_P95_MS:.4f}", "<=", f"{budget_ms:.4f}", "FAIL"]
    assert table.splitlines()[-1] == decision.summary


@pytest.mark.slow
def test_release_ships_the_fastest_artefact_gates_against_the_champion_and_rolls_back(prefect_api, saofu_home,
                                                                                       pinned_timings):
    trained = train_flow(TrainFlowParams(world_n=300, image_size=32, model="saofu_fu_tiny", epochs=6,
                                         registered_model="fu-rel", experiment="t"))
    common = dict(registered_model="fu-rel", fresh_n=60, fine_tune_epochs=1, gate={"max_latency_ms": 50.0})

    first = release_flow(ReleaseParams(**common))
    client = MlflowClient(tracking_uri=trained.tracking_uri, registry_uri=trained.tracking_uri)
    shipped = client.get_model_version("fu-rel", first.challenger_version)
    assert first.candidate_version == trained.version and first.promoted and first.champion_before is None
    # All four artefacts were timed together, and the one measured clearly fastest ships.
    assert sorted(p.rsplit("/", 1)[-1] for p in pinned_timings[0]) == [
        "model.fp32.onnx", "model.int8.onnx", "pruned.fp32.onnx", "pruned.int8.onnx"]
    assert shipped.tags[ARTEFACT_TAG] == first.shipped == "fp32"
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
    refused_tags = client.get_model_version("fu-rel", refused.challenger_version).tags
    assert refused_tags["saofu.gate"] == "failed" and refused.gate_passed is False
    assert_refused_on_latency_alone(refused_tags["saofu.gate_report"], refused.gate_table, 1e-4)
    # Paired with the champion image by image: the same graph answers every image alike, on every set.
    assert first.changes_table == ""  # no champion to pair with
    changes = [[c.strip() for c in line.strip("|").split("|")] for line in refused.changes_table.splitlines()[2:]
               if line.startswith("| ")]
    assert {(row[0], row[1]) for row in changes} >= {("fresh", "fu"), ("fresh", "not_fu"), ("regression", "fu")}
    assert all(row[3] == row[4] and row[5:] == ["0", "0", "+0.00", "1"] for row in changes), changes
    logged = {a.path for a in client.list_artifacts(refused.run_id, "evaluation/changes")}
    assert "evaluation/changes/lost_fresh.png" in logged and "evaluation/changes/lost_regression.png" in logged

    # The same candidate again ships the same graph, so it is not worse than the champion on any
    # check: promoted; rollback restores the first.
    second = release_flow(ReleaseParams(**common))
    assert second.shipped == "fp32" and len(pinned_timings) == 3
    assert second.promoted and second.champion_before == first.challenger_version
    assert registry.current_champion("fu-rel") == second.challenger_version
    record = registry.rollback("fu-rel", reason="test")
    assert record.version == first.challenger_version == registry.current_champion("fu-rel")

    # Each run's summary is on its page in the Prefect UI, the verdict as its heading.
    with get_client(sync_client=True) as prefect:
        stored = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["release-fu-rel"])),
                                        sort=ArtifactSort.CREATED_DESC)[::-1]  # oldest first
    assert [a.type for a in stored] == ["markdown"] * 3
    headings = [a.data.splitlines()[0] for a in stored]
    assert headings[0] == f"# Release of `fu-rel`: promoted: version {first.challenger_version} is the champion"
    assert headings[1] == (f"# Release of `fu-rel`: version {refused.challenger_version} refused (gate failed: 1 of "
                           f"{len(refused.gate_table.splitlines()) - 2} checks (latency_p95_ms)): the champion stays "
                           f"version {first.challenger_version}")
    assert refused.gate_table.splitlines()[1] in stored[1].data
    assert refused.variants_table.splitlines()[0] in stored[1].data
    assert f"| champion | {first.challenger_version} -> {first.challenger_version} |" in stored[1].data
    assert "## What changed, image by image" in stored[1].data
    assert refused.changes_table.splitlines()[0] in stored[1].data


def test_the_release_verdict_says_what_changed_and_why_not():
    def result(**changes) -> ReleaseResult:
        base = dict(run_id="r", candidate_version="4", shipped="fp32", challenger_version="5", champion_before="3",
                    champion_after="3", promoted=False, gate_passed=False, gate_table="check\ngate failed: 1 of 7 "
                    "checks (accuracy)", variants_table="", compare_table="", fresh_source="held-out")
        return ReleaseResult(**{**base, **changes})

    assert release_verdict(result()) == (
        "version 5 refused (gate failed: 1 of 7 checks (accuracy)): the champion stays version 3")
    assert release_verdict(result(gate_passed=True)) == "the canary refused version 5: the champion stays version 3"
    assert release_verdict(result(promoted=True, gate_passed=True, champion_after="5", served_version="5")) == (
        "promoted: version 5 is the champion, served (5)")
    assert release_verdict(result(shipped=None, challenger_version=None, gate_passed=None, gate_table="")) == (
        "nothing registered: no artefact met the accuracy bar")
    assert release_verdict(result(champion_before=None, champion_after=None)).endswith("the champion stays unset")


@pytest.mark.slow
def test_a_dataset_outside_the_fu_world_goes_through_release_and_serving(prefect_api, saofu_home, shapes_dir,
                                                                          tmp_path, pinned_timings):
    """Shapes (no not_fu, no simulator): fresh slice = its own held-out split, then a named plain ImageFolder."""
    from deploy.model_source import ModelSource
    from tests.conftest import SHAPES, make_shapes_dataset

    trained = train_flow(TrainFlowParams(data_dir=str(shapes_dir), image_size=32, model="saofu_fu_tiny", epochs=4,
                                         registered_model="shapes-rel", experiment="t"))
    common = dict(registered_model="shapes-rel", fresh_n=200, fine_tune_epochs=1, gate={"max_latency_ms": 50.0})

    first = release_flow(ReleaseParams(**common))
    assert first.fresh_kind == "held-out" and "held-out val split" in first.fresh_source
    assert first.gate_passed and first.promoted and "size_bytes" in first.gate_table
    assert registry.current_champion("shapes-rel") == first.challenger_version
    client = MlflowClient(tracking_uri=trained.tracking_uri, registry_uri=trained.tracking_uri)
    run = client.get_run(first.run_id)
    assert run.data.params["negative_class"] == "" and "not a Fu-world model" in run.data.tags["fresh_reason"]

    champion = ModelSource("shapes-rel", challenger_alias=None).load().champion  # what the serving app loads
    assert champion.classes == SHAPES and champion.version == first.challenger_version
    pixels = _pixels(shapes_dir / "circle" / "0000.png")
    assert champion.probabilities(pixels).shape == (1, 3)

    # A plain ImageFolder (no manifest) named as the fresh slice: judged against the champion on it.
    mine = make_shapes_dataset(tmp_path / "mine", n_per_class=6, seed=7)
    second = release_flow(ReleaseParams(**common, labelled_dir=str(mine)))
    assert second.fresh_kind == "named-folder" and str(mine) in second.fresh_source
    assert "recall[circle]" in second.gate_table and second.gate_passed is not None
    assert second.promoted and second.champion_before == first.challenger_version
    assert registry.current_champion("shapes-rel") == second.challenger_version
    assert client.get_run(second.run_id).data.params["fresh_n"] == "18"


def _pixels(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((32, 32)), dtype=np.uint8)[None]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_release_with_a_canary_promotes_only_after_the_serving_apps_verdict(prefect_api, saofu_home, shapes_dir,
                                                                             pinned_timings):
    """`canary_share`: the challenger answers live traffic in the app's canary before it becomes champion."""
    import os
    import sys
    import threading
    import time

    import httpx

    from tests.serving_process import free_port, serving

    train_flow(TrainFlowParams(data_dir=str(shapes_dir), image_size=32, model="saofu_fu_tiny", epochs=4,
                               registered_model="shapes-canary", experiment="t", negative_class=None))
    common = dict(registered_model="shapes-canary", fresh_n=200, prune_amount=0.0, fine_tune_epochs=0,
                  negative_class=None, gate={"max_latency_ms": 50.0, "class_margin": 1.0, "overall_margin": 1.0})
    first = release_flow(ReleaseParams(**common))
    assert first.promoted

    port = free_port()
    saofu = os.path.join(os.path.dirname(sys.executable), "saofu")
    cmd = [saofu, "serve", "--model", "shapes-canary", "--port", str(port), "--canary-share", "0.5",
           "--canary-min-requests", "20", "--poll-seconds", "0.5"]
    images = [p.read_bytes() for p in sorted((shapes_dir / "circle").glob("*.png"))[:20]]
    with serving(cmd, cwd=saofu_home, env={**os.environ}, port=port) as (_, url):
        stop = threading.Event()

        def traffic() -> None:  # users scanning while the release runs
            with httpx.Client(timeout=5) as client:
                i = 0
                while not stop.is_set():
                    client.post(f"{url}/predict", content=images[i % len(images)],
                                headers={"content-type": "image/png"})
                    i += 1
                    time.sleep(0.01)

        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        try:
            with pytest.raises(Exception, match="canary share of 0.2"):  # not what the app runs: refused
                release_flow(ReleaseParams(**common, serve_url=url, canary_share=0.2))
            second = release_flow(ReleaseParams(**common, serve_url=url, canary_share=0.5, canary_timeout_min=3))
        finally:
            stop.set()
            sender.join(timeout=10)
    import re

    assert second.canary.startswith("passed"), second.canary
    assert int(re.search(r"(\d+) canary requests", second.canary).group(1)) >= 20  # the app's minimum
    assert second.promoted and second.served_version == second.challenger_version and "canary" in second.steps
