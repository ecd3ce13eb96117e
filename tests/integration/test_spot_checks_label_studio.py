"""Spot checks end to end: blind tasks in a real Label Studio, simulated answers, the ingest flow, MLflow."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.ingest import IngestParams, ingest_flow
from tasks import tracking
from tasks.data.fu_world import WorldConfig, generate_world
from tasks.data.manifest import add_images, read_manifest
from tasks.data.stream import simulate_scans, write_scans
from tasks.labeling.active_learning import label_studio_sink
from tasks.labeling.client import find_project, list_tasks
from tasks.labeling.simulated_labeler import simulate_labeling
from tasks.labeling.spot_checks import SpotCheckLedger, auto_rows_since, send_spot_checks

pytestmark = pytest.mark.integration
CLASSES = ["fu", "not_fu"]
VERSIONS = "fu-recognizer:3;fu-second:1"


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def env(label_studio, tmp_path, monkeypatch):
    monkeypatch.setenv("SAOFU_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(label_studio.files_root))
    return tmp_path


def auto_label(dataset, pool, n, seed, wrong):
    """Pool scans auto-labelled into the dataset, `wrong` of them with the other class; returns truth by sha256."""
    scans = list(simulate_scans(n, seed, datetime(2026, 12, 1, tzinfo=UTC), 60.0, image_size=32))
    paths = write_scans(scans, pool)
    truth = {json.loads(line)["sha256"]: json.loads(line)["truth"] for line in (pool / "index.jsonl").open()}
    rows = []
    for path in paths:
        label = truth.get(path.stem)
        if label not in CLASSES:
            continue
        if len(rows) < wrong:
            label = CLASSES[1 - CLASSES.index(label)]
        rows.append({"image": str(path), "label": label, "source": "auto", "model_versions": VERSIONS,
                     "labeled_at": datetime.now(UTC).isoformat(), "scores": "0.99;0.97"})
    add_images(dataset, rows)
    return truth, rows


@pytest.mark.timeout(600)
def test_spot_check_answers_are_audited_into_mlflow_and_correct_the_auto_labels(prefect_api, env, label_studio,
                                                                                client):
    root = label_studio.files_root / "spot-checks"
    dataset = root / "labelled"  # under the files root, like <SAOFU_HOME>/data/labelled
    generate_world(dataset, WorldConfig(n=40, seed=4, image_size=32), workers=1)
    started = datetime.now(UTC)
    truth, written = auto_label(dataset, root / "pool", 16, seed=11, wrong=3)
    title = "spot-checks"
    sink = label_studio_sink(title, CLASSES)

    sent = send_spot_checks(dataset, auto_rows_since(dataset, started), sink, share=0.5, minimum=10, seed=0,
                            run_id="al-run-1")
    pid = int(find_project(client, title).id)
    tasks = list_tasks(client, pid)
    assert sent == len(tasks) >= 10
    assert all(t["predictions"] == [] and t["data"]["spot_check"] is True for t in tasks)  # blind
    checked = {t["data"]["sha256"] for t in tasks}
    auto = {r["sha256"]: r["label"] for r in read_manifest(dataset) if r["source"] == "auto"}
    wrong = {s for s in checked if auto[s] != truth[s]}
    assert wrong  # the sample holds some of the three wrong auto-labels (seed 0)

    sim = simulate_labeling(client, pid, truth=lambda t: truth[t["data"]["sha256"]])  # labelers tell the truth
    assert sim["tasks"] == sent
    result = ingest_flow(IngestParams(project=title, dataset_dir=str(dataset), classes=CLASSES))

    expected = (sent - len(wrong)) / sent
    assert (result.spot_check_n, result.spot_check_agreed) == (sent, sent - len(wrong))
    assert result.spot_check_precision == pytest.approx(expected)
    metrics = tracking.client().get_run(result.run_id).data.metrics
    assert metrics["spot_check_precision"] == pytest.approx(expected)
    assert metrics["spot_check_n"] == sent
    assert metrics["spot_check_precision.fu-recognizer_3"] == pytest.approx(expected)
    assert metrics["spot_check_precision.run_al-run-1"] == pytest.approx(expected)
    low, high = result.spot_check_interval
    assert metrics["spot_check_precision_low"] == pytest.approx(low) and low < expected <= high
    local = tracking.download_run_artifact(result.run_id, "spot_checks/audit.json", env / "art")
    table = json.loads(Path(local).read_text())
    assert {d["sha256"] for d in table["disagreements"]} == wrong
    assert all(d["auto_label"] != d["human_label"] for d in table["disagreements"])

    # the human answer wins: each wrong auto-label is corrected, the right ones stay auto
    after = {r["sha256"]: r for r in read_manifest(dataset)}
    assert result.relabelled == len(wrong) and result.added == 0
    assert all(after[s]["label"] == truth[s] and after[s]["source"] == "human" for s in wrong)
    assert all(after[s]["source"] == "auto" for s in checked - wrong)
    assert all((dataset / after[s]["path"]).is_file() for s in checked)

    # a later run with nothing new counts nothing twice; the ledger beside the dataset keeps every check
    again = ingest_flow(IngestParams(project=title, dataset_dir=str(dataset), classes=CLASSES))
    assert again.tasks_seen == 0 and again.spot_checks_answered == 0
    assert (again.spot_check_n, again.spot_check_agreed) == (sent, sent - len(wrong))
    kept = SpotCheckLedger.load(dataset, pid).audit()
    assert (kept.checked, kept.agreed) == (sent, sent - len(wrong))

    # An audited precision below the target takes the version's auto-labels back (a new data version);
    # the human labels, the corrected ones included, stay as they are.
    humans = {s: r for s, r in after.items() if r["source"] != "auto"}
    reverting = ingest_flow(IngestParams(project=title, dataset_dir=str(dataset), classes=CLASSES,
                                         revert_below_precision=0.995, revert_min_checks=sent))
    # both versions voted for every row: the first reverted takes them all, the second finds none left
    assert reverting.reverted == ["fu-recognizer:3"]
    left = {r["sha256"]: r for r in read_manifest(dataset)}
    assert not any(r["source"] == "auto" and "fu-recognizer:3" in r["model_versions"].split(";")
                   for r in left.values())
    assert {s: left.get(s) for s in humans} == humans
    # a stricter minimum of checks than were answered reverts nothing
    quiet = ingest_flow(IngestParams(project=title, dataset_dir=str(dataset), classes=CLASSES,
                                     revert_below_precision=0.995, revert_min_checks=sent + 1))
    assert quiet.reverted == []
