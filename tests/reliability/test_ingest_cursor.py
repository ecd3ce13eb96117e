"""The ingest cursor is replaced whole, moves only with the rows it covers, and a torn one is survived (issue 9).

The cursor says which annotations are already in the dataset. Written in place, a crash or a full
disk halfway leaves half a JSON file (every later ingest failed on it), and a cursor written into a
staged copy would reach the live dataset through the hard link both share before the batch is
committed: a batch rejected or cut short would then be skipped for good.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest

from saofu.errors import SaofuError
from tasks.data.dataset_lock import dataset_lock
from tasks.labeling.ingest import IngestState, discard_staged, staged_copy
from tests.reliability.test_dataset_lock import CLASSES, T0, by_sha, make_harness

OLD = "2026-12-01T09:00:00+00:00"


@pytest.fixture
def harness(saofu_home, tmp_path, monkeypatch):
    return make_harness(tmp_path, monkeypatch)


@pytest.mark.timeout(30)
def test_a_cursor_write_cut_short_by_a_full_disk_leaves_the_old_cursor_whole(tmp_path):
    dataset = tmp_path / "labelled"
    IngestState(1, OLD).save(dataset)
    # A child process whose files may not grow past 24 bytes: the new cursor (~60 bytes) cannot be
    # written whole, as on a full disk. The limit is set after the imports (their bytecode caches).
    child = textwrap.dedent(f"""
        import resource, signal, sys
        from tasks.labeling.ingest import IngestState
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (24, resource.RLIM_INFINITY))
        try:
            IngestState(1, "2026-12-02T10:30:00.123456+00:00").save({str(dataset)!r})
        except OSError as exc:
            print("write failed:", exc)
            sys.exit(3)
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=25)
    assert done.returncode == 3, done.stdout + done.stderr
    path = IngestState.path(dataset, 1)
    assert json.loads(path.read_text()) == {"project_id": 1, "cursor": OLD}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no half-written file left beside it


@pytest.mark.timeout(30)
def test_a_cursor_saved_into_a_staged_copy_leaves_the_live_dataset_cursor_alone(tmp_path):
    dataset = tmp_path / "labelled"
    IngestState(1, OLD).save(dataset)
    with dataset_lock(dataset):
        staging = staged_copy(dataset)  # hard links: the copy's cursor file IS the dataset's until replaced
        IngestState(1, "2026-12-02T10:30:00+00:00").save(staging)
        assert IngestState.load(dataset, 1).cursor == OLD, "the uncommitted cursor leaked into the dataset"
        discard_staged(staging)
    assert IngestState.load(dataset, 1).cursor == OLD


@pytest.mark.timeout(30)
def test_a_rejected_batch_leaves_the_cursor_and_the_next_run_takes_the_same_annotations(harness):
    harness.hold_s = 0
    harness.labelstudio.annotate(1, harness.image(0), "fu", minutes=0)
    harness.run()
    harness.labelstudio.annotate(2, harness.image(1), "not_fu", minutes=1)
    harness.suite_passes = False
    with pytest.raises(SaofuError, match="rejected by the data validation suite"):
        harness.run()
    assert IngestState.load(harness.dataset, 1).cursor == T0.isoformat()
    harness.suite_passes = True
    assert harness.run().added == 1
    assert IngestState.load(harness.dataset, 1).cursor == (T0 + timedelta(minutes=1)).isoformat()


@pytest.mark.timeout(30)
def test_a_torn_cursor_costs_one_full_refetch_that_adds_nothing_twice(harness):
    harness.hold_s = 0
    for n in range(3):
        harness.labelstudio.annotate(n + 1, harness.image(n), CLASSES[n % 2], minutes=n)
    harness.run()
    IngestState.path(harness.dataset, 1).write_text('{"project_id": 1, "cur')  # what a crash mid-write left

    again = harness.run()

    assert (again.tasks_seen, again.added, again.already_present) == (3, 0, 3)
    assert len(by_sha(harness.dataset)) == 3
    assert IngestState.load(harness.dataset, 1).cursor == (T0 + timedelta(minutes=2)).isoformat()
