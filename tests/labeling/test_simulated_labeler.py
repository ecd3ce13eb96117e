"""The simulated labeler's posting, without a server: threads change the time, never the answers."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from tasks.labeling import simulated_labeler
from tasks.labeling.simulated_labeler import simulate_labeling

pytestmark = pytest.mark.timeout(60)

CLASSES = ["fu", "not_fu", "fu_merchant"]


class FakeAnnotations:
    """Records every annotation posted; `fail_on` makes the post for that task raise."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.posted: list[dict] = []
        self.fail_on = fail_on
        self._lock = threading.Lock()

    def create(self, **kwargs) -> None:
        time.sleep(0.001)  # a post takes time, so the threads overlap
        if kwargs["id"] == self.fail_on:
            raise RuntimeError(f"Label Studio refused task {kwargs['id']}")
        with self._lock:
            self.posted.append(kwargs)


@pytest.fixture
def fake_project(monkeypatch):
    """200 open tasks with a true class each; the annotators' user ids fixed."""
    tasks = [{"id": i, "data": {"truth": CLASSES[i % 3]}, "annotations": []} for i in range(1, 201)]
    monkeypatch.setattr(simulated_labeler, "list_tasks", lambda client, pid: list(reversed(tasks)))
    monkeypatch.setattr(simulated_labeler, "project_classes", lambda config: CLASSES)
    monkeypatch.setattr(simulated_labeler, "ensure_users",
                        lambda client, names: {name: 10 + k for k, name in enumerate(names)})
    return tasks


def client_with(annotations: FakeAnnotations) -> SimpleNamespace:
    return SimpleNamespace(projects=SimpleNamespace(get=lambda id: SimpleNamespace(label_config="<View/>")),
                           annotations=annotations)


def answers(posted: list[dict]) -> set[tuple]:
    return {(a["id"], a["completed_by"], tuple(r["value"]["choices"][0] for r in a["result"]),
             a["was_cancelled"], a["lead_time"]) for a in posted}


def run(annotations: FakeAnnotations, **kwargs) -> dict:
    return simulate_labeling(client_with(annotations), 1, truth=lambda task: task["data"]["truth"],
                             seed=7, error_rate=0.2, skip_rate=0.1, annotators=("sim-1", "sim-2"), **kwargs)


def test_threads_post_the_same_answers_as_one(fake_project, monkeypatch):
    monkeypatch.setattr(simulated_labeler, "POSTING_THREADS", 1)
    one = FakeAnnotations()
    counts_one = run(one)
    monkeypatch.setattr(simulated_labeler, "POSTING_THREADS", 4)
    four = FakeAnnotations()
    counts_four = run(four)

    assert len(one.posted) == len(four.posted) == 400  # two annotators, every task
    assert answers(one.posted) == answers(four.posted)
    assert counts_one == counts_four
    assert counts_four["annotations"] == 400 and counts_four["tasks"] == 200
    assert counts_four["correct"] + counts_four["wrong"] + counts_four["skipped"] == 400
    assert counts_four["wrong"] > 0 and counts_four["skipped"] > 0  # the rates were applied
    # The answers are the labeler's, not the order's: cancelled exactly where no class was chosen.
    assert all(a["was_cancelled"] == (a["result"] == []) for a in four.posted)


def test_limit_counts_tasks_not_annotations(fake_project):
    posted = FakeAnnotations()
    counts = run(posted, limit=5)
    assert counts["tasks"] == 5 and counts["annotations"] == 10
    assert {a["id"] for a in posted.posted} == {1, 2, 3, 4, 5}  # the lowest task ids, as before


def test_a_failed_post_raises_and_stops_the_rest(fake_project):
    posted = FakeAnnotations(fail_on=3)
    with pytest.raises(RuntimeError, match="task 3"):
        run(posted)
    assert len(posted.posted) < 100  # of 400: the queued posts were cancelled, not sent
