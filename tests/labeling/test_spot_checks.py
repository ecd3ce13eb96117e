"""Spot checks of auto-labels without a server: the sample, blind tasks, the audit and its ledger."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image

from saofu.errors import SaofuError
from tasks import tracking
from tasks.data.manifest import add_images, file_sha256, relabel_images
from tasks.labeling.spot_checks import (
    SpotCheckLedger,
    audit,
    auto_rows_since,
    pick_spot_checks,
    seal,
    send_spot_checks,
    spot_check_items,
    spot_check_outcomes,
    wilson_interval,
)

T0 = datetime(2026, 12, 1, tzinfo=UTC)
A, B, C = "fu-recognizer:3", "fu-second:1", "fu-recognizer:4"


def ann(i, who, label, minutes=0, cancelled=False):
    return {"id": i, "annotator": who, "label": None if cancelled else label, "was_cancelled": cancelled,
            "updated_at": T0 + timedelta(minutes=minutes), "created_at": T0}


def check_record(task_id, auto_label, answers, versions=f"{A};{B}", run="run-1", sha=None):
    """A `completed_annotations` record of a spot-check task; `answers`: labels (None: a skip)."""
    sha = sha or f"{task_id:064x}"
    anns = [ann(task_id * 10 + k, f"sim-{k}", a, minutes=k, cancelled=a is None) for k, a in enumerate(answers)]
    data = {"spot_check": True, "auto_label_sealed": seal(sha, auto_label), "model_versions": versions,
            "al_run_id": run, "sha256": sha, "source": "spot_check", "path": f"/x/{sha}.png"}
    return {"task_id": task_id, "image": data["path"], "sha256": sha, "source": "spot_check", "badcase": False,
            "data": data, "annotations": anns}


def pool_record(task_id, label):
    data = {"al_reason": "disagree", "sha256": f"{task_id:064x}", "source": "online_pool", "path": "/x/p.png"}
    return {"task_id": task_id, "image": "/x/p.png", "sha256": data["sha256"], "source": "online_pool",
            "badcase": False, "data": data, "annotations": [ann(task_id, "sim-0", label)]}


def rows(n):
    return [{"sha256": f"{i:064x}", "label": "fu", "model_versions": f"{A};{B}"} for i in range(n)]


@pytest.fixture(autouse=True)
def files_root(tmp_path, monkeypatch) -> Path:
    """Label Studio's local-files root: the test's folder (never the checkout, where a test is run from)."""
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path))
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    return tmp_path


@pytest.mark.timeout(30)
def test_spot_check_images_of_a_dataset_outside_the_files_root_are_linked_under_it(tmp_path, monkeypatch):
    from tasks.labeling.spot_checks import spot_check_dir

    inside = tmp_path / "data" / "labelled"
    assert spot_check_dir(inside) == tmp_path / "data" / ".labelled.spot-checks"
    root = tmp_path / "ls-files"
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(root))
    assert spot_check_dir(inside) == root / ".spot-checks" / "labelled"  # Label Studio can serve it


@pytest.mark.timeout(30)
def test_the_sample_is_a_share_with_a_minimum_seeded_and_independent_of_row_order():
    assert len(pick_spot_checks(rows(200), share=0.05, minimum=5)) == 10
    assert len(pick_spot_checks(rows(20), share=0.05, minimum=5)) == 5
    assert len(pick_spot_checks(rows(3), share=0.05, minimum=5)) == 3
    assert pick_spot_checks([], minimum=5) == []
    first = pick_spot_checks(rows(200), seed=7)
    assert first == pick_spot_checks(list(reversed(rows(200))), seed=7)
    assert {r["sha256"] for r in first} != {r["sha256"] for r in pick_spot_checks(rows(200), seed=8)}
    # not the first rows: a random sample spreads over the run
    assert max(int(r["sha256"], 16) for r in first) > 20
    with pytest.raises(SaofuError, match="share"):
        pick_spot_checks(rows(5), share=1.5)
    with pytest.raises(SaofuError, match="minimum"):
        pick_spot_checks(rows(5), minimum=-1)


@pytest.mark.timeout(30)
def test_spot_check_tasks_are_blind_no_prediction_and_no_readable_auto_label(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(img)
    sha = file_sha256(img)
    [item] = spot_check_items([{"image": str(img), "sha256": sha, "label": "fu", "model_versions": f"{A};{B}"}],
                              run_id="run-9")
    assert item.predictions == [] and item.source == "spot_check" and item.sha256 == sha
    assert item.meta["spot_check"] is True and item.meta["al_run_id"] == "run-9"
    assert item.meta["model_versions"] == f"{A};{B}"
    assert "fu" not in [str(v) for v in item.meta.values()]
    assert item.meta["auto_label_sealed"] == seal(sha, "fu") != seal(sha, "not_fu")
    with pytest.raises(SaofuError, match="label"):
        spot_check_items([{"image": str(img), "sha256": sha}], run_id="r")


def make_dataset(tmp_path, n, label="fu"):
    """A dataset whose `n` images were auto-labelled by active learning; returns (dataset, auto rows)."""
    pool = tmp_path / "pool"
    pool.mkdir()
    new = []
    for i in range(n):
        path = pool / f"{i}.png"
        Image.new("RGB", (8, 8), (i, 2 * i, 255 - i)).save(path)
        new.append({"image": str(path), "label": label, "source": "auto", "labeled_at": T0.isoformat(),
                    "model_versions": f"{A};{B}", "scores": "0.99;0.98"})
    dataset = tmp_path / "labelled"
    add_images(dataset, new)
    return dataset, new


@pytest.mark.timeout(30)
def test_send_spot_checks_samples_the_runs_auto_labels_into_the_sink_with_neutral_paths(tmp_path):
    dataset, written = make_dataset(tmp_path, 12)
    # a human corrected one of them meanwhile: it is no longer an auto-label to check
    relabel_images(dataset, [{**written[0], "label": "not_fu", "source": "human", "labeled_at": T0.isoformat()}])
    sent: list = []
    n = send_spot_checks(dataset, written, lambda items: sent.extend(items) or list(range(len(items))),
                         share=0.5, minimum=2, seed=1, run_id="run-1")
    assert n == len(sent) == 6  # half of the 11 still auto, rounded up
    first_sha = file_sha256(written[0]["image"])
    assert first_sha not in {i.sha256 for i in sent}
    for item in sent:
        assert item.predictions == []
        assert "/fu/" not in str(item.image) and item.image.is_file()  # the class is not in the path
        assert file_sha256(item.image) == item.sha256
        assert not item.image.is_relative_to(dataset)  # not inside the versioned dataset
    # manifest rows (as `auto_rows_since` finds them) pick the same sample
    again: list = []
    since = auto_rows_since(dataset, T0 - timedelta(seconds=1))
    assert len(since) == 11 and auto_rows_since(dataset, T0 + timedelta(seconds=1)) == []
    send_spot_checks(dataset, since, lambda items: again.extend(items) or [], share=0.5, minimum=2, seed=1)
    assert [i.sha256 for i in again] == [i.sha256 for i in sent]
    assert send_spot_checks(dataset, [], lambda items: pytest.fail("nothing to send"), run_id="r") == 0


@pytest.mark.timeout(30)
def test_audit_measures_precision_per_model_version_and_run_with_a_wilson_interval():
    records = [
        *[check_record(i, "fu", ["fu"]) for i in range(1, 9)],  # run-1 (A;B): 8 right
        *[check_record(i, "fu", ["not_fu"]) for i in range(9, 11)],  # run-1 (A;B): 2 wrong
        *[check_record(i, "not_fu", ["not_fu"], versions=f"{C};{B}", run="run-2") for i in range(11, 14)],  # 3 right
        check_record(14, "not_fu", ["fu"], versions=f"{C};{B}", run="run-2"),  # 1 wrong
        pool_record(15, "fu"),  # not a spot check: ignored
    ]
    result = audit(records, classes=["fu", "not_fu"])
    assert (result.checked, result.agreed) == (14, 11)
    assert result.precision == pytest.approx(11 / 14)
    low, high = result.overall.interval
    assert low < 11 / 14 < high and (low, high) == pytest.approx(wilson_interval(11, 14))
    version = {v: (t.checked, t.agreed) for v, t in result.by_version.items()}
    assert version == {A: (10, 8), B: (14, 11), C: (4, 3)}
    assert {r: (t.checked, t.agreed) for r, t in result.by_run.items()} == {"run-1": (10, 8), "run-2": (4, 3)}
    assert {(d["task_id"], d["auto_label"], d["human_label"]) for d in result.disagreements} == {
        (9, "fu", "not_fu"), (10, "fu", "not_fu"), (14, "not_fu", "fu")}
    metrics = result.metrics()
    assert metrics["spot_check_precision"] == pytest.approx(11 / 14)
    assert metrics["spot_check_precision.fu-recognizer_3"] == pytest.approx(0.8)
    assert metrics["spot_check_n.fu-second_1"] == 14
    assert metrics["spot_check_precision.run_run-2"] == pytest.approx(0.75)
    assert all(tracking.metric_key(k) == k for k in metrics)  # MLflow takes every key as it is


@pytest.mark.timeout(30)
def test_wilson_interval_is_right_at_the_edges():
    assert wilson_interval(0, 0) is None
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)


@pytest.mark.timeout(30)
def test_skipped_tied_and_unusable_answers_are_not_counted():
    broken = check_record(5, "fu", ["fu"])
    del broken["data"]["auto_label_sealed"]  # a labeler edited the task's data
    records = [check_record(1, "fu", ["fu"]), check_record(2, "fu", [None]), check_record(3, "fu", ["fu", "not_fu"]),
               check_record(4, "fu", [None, "not_fu"]), broken]
    result = audit(records)
    assert (result.checked, result.agreed, result.not_counted) == (2, 1, 3)  # task 4: the skip does not vote
    why = {o.task_id: o.why_not_counted for o in spot_check_outcomes(records)}
    assert why[2] == "skipped" and why[3] == "tie" and "auto_label_sealed" in why[5]


@pytest.mark.timeout(30)
def test_spot_check_answers_update_the_measured_precision(tmp_path):
    dataset = tmp_path / "labelled"
    ledger = SpotCheckLedger.load(dataset, project_id=3)
    assert ledger.audit().precision is None

    # round 1: five answers, all agreeing with the auto-label
    ledger.update(spot_check_outcomes([check_record(i, "fu", ["fu"]) for i in range(1, 6)]))
    ledger.save(dataset)
    ledger = SpotCheckLedger.load(dataset, 3)
    assert (ledger.audit().checked, ledger.audit().precision) == (5, 1.0)

    # round 2 (the next ingest sees only tasks touched since its cursor): three new answers, two of
    # them disagreeing, and a labeler who changed task 1's answer; task 2's answer became a skip
    round_two = [check_record(6, "fu", ["fu"]), check_record(7, "fu", ["not_fu"]), check_record(8, "fu", ["not_fu"]),
                 check_record(1, "fu", ["not_fu"]), check_record(2, "fu", [None])]
    ledger.update(spot_check_outcomes(round_two))
    ledger.save(dataset)
    measured = SpotCheckLedger.load(dataset, 3).audit()
    assert (measured.checked, measured.agreed) == (7, 4)  # tasks 1, 3..8; task 2 left out
    assert measured.precision == pytest.approx(4 / 7)
    assert measured.overall.interval[1] < 1.0  # the interval moved off certainty too
    assert measured.by_version[A].precision == pytest.approx(4 / 7)

    # an unreadable ledger stops the count rather than silently restarting it
    SpotCheckLedger.path(dataset, 3).write_text("{not json")
    with pytest.raises(SaofuError, match="spot-check ledger"):
        SpotCheckLedger.load(dataset, 3)


@pytest.mark.timeout(30)
def test_only_versions_surely_below_the_target_with_enough_checks_are_named_for_a_revert():
    from tasks.labeling.spot_checks import SpotCheckAudit, Tally, versions_below_target

    audit = SpotCheckAudit(by_version={"m:1": Tally(checked=40, agreed=34),   # 85 %: surely below
                                       "m:2": Tally(checked=10, agreed=5),    # below, but too few checks
                                       "m:3": Tally(checked=60, agreed=60),   # all right
                                       "m:4": Tally(checked=400, agreed=397)})  # 99.25 %: can't tell from 99.5
    assert list(versions_below_target(audit, 0.995, min_checks=20)) == ["m:1"]
    assert list(versions_below_target(audit, 0.995, min_checks=5)) == ["m:1", "m:2"]
    with pytest.raises(SaofuError, match="target precision"):
        versions_below_target(audit, 0.0)
