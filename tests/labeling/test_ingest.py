"""Ingest logic without a server: majority labels, ties, skips, manifest rows, staging."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from PIL import Image

from tasks.data.dataset_lock import dataset_lock
from tasks.data.manifest import add_images, read_manifest
from tasks.labeling.ingest import (
    ACCEPTED,
    SKIPPED,
    TIE,
    commit_staged,
    discard_staged,
    resolve,
    staged_copy,
    to_manifest_rows,
)

T0 = datetime(2026, 11, 25, tzinfo=UTC)


def ann(i, who, label, minutes=0, cancelled=False):
    return {"id": i, "annotator": who, "label": None if cancelled else label, "was_cancelled": cancelled,
            "updated_at": T0 + timedelta(minutes=minutes), "created_at": T0}


def record(task_id, anns, image="x.png", badcase=False):
    return {"task_id": task_id, "image": image, "annotations": anns, "badcase": badcase}


def test_majority_wins_and_names_its_voters():
    res = resolve(record(1, [ann(1, "ann", "fu"), ann(2, "bob", "fu"), ann(3, "cy", "not_fu")]))
    assert (res.status, res.label, res.annotators) == (ACCEPTED, "fu", ["ann", "bob"])
    assert res.votes == {"fu": 2, "not_fu": 1}


def test_a_tie_is_left_out_and_an_annotator_votes_once_with_their_last_answer():
    assert resolve(record(1, [ann(1, "ann", "fu"), ann(2, "bob", "not_fu")])).status == TIE
    changed = [ann(1, "ann", "not_fu", minutes=0), ann(2, "bob", "fu"), ann(3, "ann", "fu", minutes=5)]
    res = resolve(record(2, changed))
    assert (res.status, res.label, res.votes) == (ACCEPTED, "fu", {"fu": 2})


def test_cancelled_annotations_do_not_vote():
    assert resolve(record(1, [ann(1, "ann", None, cancelled=True)])).status == SKIPPED
    res = resolve(record(2, [ann(1, "ann", None, cancelled=True), ann(2, "bob", "not_fu")]))
    assert (res.status, res.label) == (ACCEPTED, "not_fu")


def test_rows_carry_human_source_annotator_task_and_time(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (200, 0, 0)).save(img)
    records = [
        record(7, [ann(1, "ann", "fu", minutes=3)], image=str(img), badcase=True),
        record(8, [ann(2, "ann", "fu"), ann(3, "bob", "not_fu")], image=str(img)),
        record(9, [ann(4, "bob", None, cancelled=True)], image=str(img)),
    ]
    rows, report = to_manifest_rows(records, roots=[tmp_path])
    assert rows == [{"image": str(img.resolve()), "label": "fu", "source": "human", "annotator": "ann",
                     "task_id": "7", "labeled_at": str(T0 + timedelta(minutes=3)), "badcase": "1", "split": ""}]
    assert [t["task_id"] for t in report.ties] == [8] and [s["task_id"] for s in report.skipped] == [9]
    # a missing image (evicted from the pool) skips its task and says so; it no longer stops the batch
    gone = tmp_path / "gone.png"
    rows, report = to_manifest_rows([record(5, [ann(1, "ann", "fu")], image=str(gone))], roots=[tmp_path])
    assert rows == [] and report.skipped[0]["task_id"] == 5 and str(gone) in report.skipped[0]["reason"]


def test_adding_the_same_rows_twice_adds_nothing(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (0, 200, 0)).save(img)
    row = {"image": str(img), "label": "fu", "source": "human", "task_id": "1"}
    ds = tmp_path / "ds"
    assert len(add_images(ds, [row])) == 1
    assert add_images(ds, [row]) == []
    (only,) = read_manifest(ds)
    assert only["source"] == "human" and (ds / only["path"]).read_bytes() == img.read_bytes()


def test_a_discarded_staging_copy_leaves_the_dataset_untouched(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (0, 0, 200)).save(img)
    ds = tmp_path / "ds"
    add_images(ds, [{"image": str(img), "label": "fu", "source": "human"}])
    before = (ds / "manifest.csv").read_bytes()
    img2 = tmp_path / "b.png"
    Image.new("RGB", (8, 8), (9, 9, 9)).save(img2)
    with dataset_lock(ds):  # staging is one folder per dataset: its writers hold the dataset's lock
        staging = staged_copy(ds)
        add_images(staging, [{"image": str(img2), "label": "cat", "source": "human"}])
        discard_staged(staging)
        assert (ds / "manifest.csv").read_bytes() == before and not staging.exists()
        staging = staged_copy(ds)
        add_images(staging, [{"image": str(img2), "label": "not_fu", "source": "human"}])
        commit_staged(staging, ds)
    assert [r["label"] for r in read_manifest(ds)] == ["fu", "not_fu"]
