"""The ingest flow end to end: real Label Studio, simulated labelers, GX validation, DVC versions."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.ingest import IngestParams, ingest_flow
from saofu.errors import SaofuError
from tasks.data.fu_world import WorldConfig, generate_world
from tasks.data.manifest import read_manifest
from tasks.data.stream import simulate_scans, write_scans
from tasks.data.versions import list_versions
from tasks.labeling.client import LabelingItem, ensure_project, import_tasks
from tasks.labeling.simulated_labeler import simulate_labeling

pytestmark = pytest.mark.integration
CLASSES = ["fu", "not_fu"]


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def env(label_studio, tmp_path, monkeypatch):
    """The project folder of this test, and the Label Studio the flow finds through settings."""
    monkeypatch.setenv("SAOFU_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(label_studio.files_root))
    return tmp_path


def make_pool(root, n, seed):
    """Simulated user scans under the server's files root; returns (paths, truth by sha256)."""
    scans = list(simulate_scans(n, seed, datetime(2026, 11, 25, tzinfo=UTC), 60.0, image_size=32))
    paths = write_scans(scans, root)
    index = [json.loads(line) for line in (root / "index.jsonl").read_text().splitlines()]
    return paths, {row["sha256"]: row["truth"] for row in index}


def test_ingest_is_exact_idempotent_and_versioned(prefect_api, env, label_studio, client):
    dataset = env / "dataset"
    generate_world(dataset, WorldConfig(n=60, seed=1, image_size=32), workers=1)
    base_rows = len(read_manifest(dataset))
    pool = label_studio.files_root / "pool-ok"
    paths, truth = make_pool(pool, 10, seed=3)
    truth = {k: v for k, v in truth.items() if v in CLASSES}
    title = "ingest-ok"
    pid = ensure_project(client, title, CLASSES)
    import_tasks(client, pid, [LabelingItem(image=p, source="online_pool") for p in paths
                               if p.stem in truth])
    sim = simulate_labeling(client, pid, truth=lambda t: truth[t["data"]["sha256"]],
                            annotators=("sim-1", "sim-2"))
    assert sim["wrong"] == 0

    result = ingest_flow(IngestParams(project=title, dataset_dir=str(dataset), classes=CLASSES))
    rows = read_manifest(dataset)
    human = [r for r in rows if r["source"] == "human"]
    assert result.added == len(truth) == len(human) == len(rows) - base_rows
    assert {r["sha256"]: r["label"] for r in human} == truth
    assert all(r["annotator"] == "sim-1;sim-2" and r["task_id"] and r["labeled_at"] for r in human)
    assert all((dataset / r["path"]).exists() for r in human)
    assert result.data_version

    again = ingest_flow(IngestParams(project=title, dataset_dir=str(dataset), classes=CLASSES))
    assert again.added == 0 and again.tasks_seen == 0
    assert len(read_manifest(dataset)) == len(rows)
    assert again.data_version == result.data_version


def test_a_corrupted_batch_is_rejected_and_nothing_is_lost(prefect_api, env, label_studio, client):
    dataset = env / "dataset"
    generate_world(dataset, WorldConfig(n=60, seed=2, image_size=32), workers=1)
    manifest_before = (dataset / "manifest.csv").read_bytes()
    versions_before = list_versions()
    pool = label_studio.files_root / "pool-bad"
    paths, truth = make_pool(pool, 4, seed=5)
    broken = pool / "broken.png"
    broken.write_bytes(b"\x89PNG but not really an image")
    title = "ingest-bad"
    pid = ensure_project(client, title, CLASSES)
    import_tasks(client, pid, [LabelingItem(image=p, source="online_pool") for p in [*paths, broken]])
    simulate_labeling(client, pid, truth=lambda t: truth.get(t["data"]["sha256"], "fu"))

    with pytest.raises(SaofuError, match="validation") as err:
        ingest_flow(IngestParams(project=title, dataset_dir=str(dataset), classes=CLASSES))
    assert "decode" in str(err.value).lower()
    assert (dataset / "manifest.csv").read_bytes() == manifest_before
    assert list_versions() == versions_before
