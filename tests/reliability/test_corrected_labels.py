"""A label corrected in Label Studio reaches the manifest (issue 9).

A correction moves the annotation's `updated_at`, so the next ingest fetches the task again; the
image is already in the dataset, and the ingest used to skip it as "already present", leaving the
wrong label for good. Now the row is relabelled, its file moved to the new class folder, and the
data version records the change. Which labels a human answer may correct is tested on the manifest.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.data.manifest import add_images, read_manifest, relabel_images
from tests.reliability.test_dataset_lock import by_sha, make_harness, png


@pytest.fixture
def harness(saofu_home, tmp_path, monkeypatch):
    return make_harness(tmp_path, monkeypatch)


@pytest.mark.timeout(30)
def test_a_label_corrected_in_label_studio_relabels_its_row_moves_its_file_and_makes_a_new_version(harness):
    harness.hold_s = 0
    wrong, right = harness.image(0), harness.image(1)
    harness.labelstudio.annotate(1, wrong, "fu", minutes=0)
    harness.labelstudio.annotate(2, right, "not_fu", minutes=1)
    assert harness.run().added == 2
    (before,) = [r for r in read_manifest(harness.dataset) if r["task_id"] == "1"]
    assert before["label"] == "fu"

    harness.labelstudio.annotate(1, wrong, "not_fu", minutes=30)  # the labeler fixes the mistake
    result = harness.run()

    assert (result.tasks_seen, result.added, result.relabelled, result.already_present) == (1, 0, 1, 0)
    rows = by_sha(harness.dataset)
    assert len(rows) == 2 and all(len(v) == 1 for v in rows.values())  # relabelled, not added again
    (after,) = rows[before["sha256"]]
    assert after["label"] == "not_fu" and after["split"] == before["split"]
    assert after["path"] == f"{before['split']}/not_fu/{Path(before['path']).name}"
    assert (harness.dataset / after["path"]).read_bytes() == wrong.read_bytes()
    assert not (harness.dataset / before["path"]).exists()  # not left in the old class folder as well
    assert after["labeled_at"] > before["labeled_at"]
    first, second = harness.versions
    assert second["fingerprint"] != first["fingerprint"]
    assert f"{after['path']}: fu -> not_fu" in second["message"]

    assert harness.run().relabelled == 0  # nothing new in Label Studio: nothing changes again


@pytest.mark.timeout(30)
def test_a_human_correction_overrides_a_models_label_but_never_the_generators_or_a_later_humans(tmp_path):
    ds = tmp_path / "ds"
    auto, generated, human = (png(tmp_path / f"{n}.png", n) for n in range(3))
    add_images(ds, [
        {"image": str(auto), "label": "fu", "source": "auto", "model_versions": "a:1;b:2", "scores": "0.95;0.93",
         "labeled_at": "2026-12-01T10:00:00+00:00"},
        {"image": str(generated), "label": "fu", "source": "generated"},
        {"image": str(human), "label": "fu", "source": "human", "annotator": "ann",
         "labeled_at": "2026-12-01T12:00:00+00:00"},
    ])
    corrections = [
        {"image": str(p), "label": "not_fu", "source": "human", "annotator": "bob",
         "labeled_at": "2026-12-01 11:00:00+00:00"}  # Label Studio times as the ingest writes them
        for p in (auto, generated, human)
    ]

    changed = relabel_images(ds, corrections)

    assert [(r["previous_label"], r["label"], r["path"].split("/")[1]) for r in changed] == [("fu", "not_fu", "not_fu")]
    rows = {r["sha256"]: r for r in read_manifest(ds)}
    by_source = sorted((r["source"], r["label"], r["annotator"]) for r in rows.values())
    assert by_source == [("generated", "fu", ""), ("human", "fu", "ann"), ("human", "not_fu", "bob")]
    (was_auto,) = [r for r in rows.values() if r["annotator"] == "bob"]
    assert (was_auto["model_versions"], was_auto["scores"]) == ("", "")  # the models' scores no longer explain it
    assert all((ds / r["path"]).is_file() and r["path"].split("/")[1] == r["label"] for r in rows.values())
