"""One lock per dataset for every writer, and a swap that every crash point leaves recoverable (issue 5).

Real files, real threads, the real ingest flow body (`ingest_flow.fn`), real active learning
(`route` with two small ONNX graphs under onnxruntime) and the fast retrain's real labelled copy.
Label Studio is replaced at the client boundary: `completed_annotations` runs on a fake SDK client
that returns tasks as the API does. The validation suite is replaced by a pass that holds the
staged copy for a moment, as a real suite does while it reads every image (the suite itself is
tested in tests/data); MLflow and DVC are replaced by recorders (the data version is asked for
with the dataset's content fingerprint, which is what a DVC version stores).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

import flows.ingest as ingest
from flows.ingest import IngestParams, add_validated, ingest_flow
from saofu.errors import SaofuError
from tasks.data.dataset_lock import dataset_lock, lock_path, previous_dir, repair_if_interrupted, staging_dir
from tasks.data.manifest import add_images, read_manifest
from tasks.data.versions import content_fingerprint
from tasks.labeling.client import completed_annotations
from tasks.labeling.ingest import IngestState

CLASSES = ["fu", "not_fu"]
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def png(path: Path, seed: int) -> Path:
    """A small image whose content (so sha256) is fixed by `seed`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256)).save(path)
    return path


class FakeLabelStudio:
    """The SDK client as `completed_annotations` uses it: users, and the tasks of the project's JSON export."""

    def __init__(self):
        self._tasks: dict[int, dict] = {}
        self.users = SimpleNamespace(list=lambda: [SimpleNamespace(id=1, username="ann", email="")])
        # the project export `completed_annotations` reads: JSON bytes, in chunks, as the SDK yields them
        self.projects = SimpleNamespace(exports=SimpleNamespace(download_sync=lambda *_, **__: iter(
            [json.dumps([t for _, t in sorted(self._tasks.items())]).encode()])))

    def annotate(self, task_id: int, image: Path, label: str, minutes: float) -> None:
        """Task `task_id` (image `image`) gets, or has changed to, `label` at T0 + `minutes`."""
        when = (T0 + timedelta(minutes=minutes)).isoformat()
        result = [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]
        task = self._tasks.setdefault(task_id, {
            "id": task_id, "data": {"path": str(image), "source": "online_pool", "badcase": False},
            "annotations": [{"id": task_id * 10, "completed_by": 1, "was_cancelled": False, "created_at": when}],
        })
        task["annotations"][0].update(result=result, updated_at=when)


class IngestHarness:
    """The ingest flow's outside world: a fake Label Studio, a validation pass, recorded data versions."""

    def __init__(self, dataset: Path, files_root: Path, hold_s: float):
        self.dataset, self.files, self.hold_s = dataset, files_root, hold_s
        self.labelstudio = FakeLabelStudio()
        self.versions: list[dict] = []  # what each ingest asked DVC to store
        self.staged = threading.Event()  # set while an ingest's staged copy is being validated
        self.suite_passes = True

    def image(self, n: int) -> Path:
        return png(self.files / "pool" / f"{n}.png", n)

    def fetch(self, project_id: int, cursor: str | None) -> list[dict]:
        return completed_annotations(self.labelstudio, project_id, since=cursor)

    def validate(self, dataset_dir: str, classes: list[str], docs_dir: str):
        self.staged.set()
        time.sleep(self.hold_s)  # a real suite reads every image of the staged copy meanwhile
        ok = self.suite_passes
        return SimpleNamespace(success=ok, docs_path=None, summary=lambda: "passed" if ok else "1 check FAILED")

    def version(self, dataset_dir: str, name: str, message: str) -> str:
        self.versions.append({"fingerprint": content_fingerprint(dataset_dir)[0], "message": message})
        return f"{name}@v{len(self.versions)}"

    def run(self, classes: list[str] | None = CLASSES) -> ingest.IngestResult:
        return ingest_flow.fn(IngestParams(dataset_dir=str(self.dataset), classes=classes, project="p"))


def _no_tracking() -> SimpleNamespace:
    nothing = lambda *a, **k: None  # noqa: E731
    return SimpleNamespace(start_run=lambda *a, **k: "run", finish_run=nothing, log_dict=nothing, log_file=nothing,
                           log_metrics=nothing, set_tags=nothing)


def make_harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> IngestHarness:
    """The ingest flow wired to an IngestHarness (SAOFU_HOME is the caller's `saofu_home`)."""
    files = tmp_path / "ls-files"
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(files))
    h = IngestHarness(tmp_path / "data" / "labelled", files, hold_s=0.3)
    monkeypatch.setattr(ingest, "get_run_logger", lambda: logging.getLogger("test-ingest"))
    monkeypatch.setattr(ingest, "find_project", lambda project, classes: 1)
    monkeypatch.setattr(ingest, "fetch_annotations", h.fetch)
    monkeypatch.setattr(ingest, "validate", h.validate)
    monkeypatch.setattr(ingest, "version_dataset", h.version)
    monkeypatch.setattr(ingest, "tracking", _no_tracking())
    return h


@pytest.fixture
def harness(saofu_home, tmp_path, monkeypatch) -> IngestHarness:
    return make_harness(tmp_path, monkeypatch)


def run_together(*fns) -> list:
    """Run each function in its own thread at once; their results, or the exception each raised."""
    out: list = [None] * len(fns)
    start = threading.Barrier(len(fns))

    def call(i, fn):
        start.wait()
        try:
            out[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the test, which names it
            out[i] = exc

    threads = [threading.Thread(target=call, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def by_sha(dataset: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for r in read_manifest(dataset):
        rows.setdefault(r["sha256"], []).append(r)
    return rows


def assert_whole(dataset: Path) -> None:
    """Every manifest row's file is there, each image once, and no swap leftovers beside the dataset."""
    rows = by_sha(dataset)
    assert all(len(v) == 1 for v in rows.values()), {k: len(v) for k, v in rows.items() if len(v) > 1}
    for (row,) in rows.values():
        assert (dataset / row["path"]).is_file(), row["path"]
    assert not staging_dir(dataset).exists() and not previous_dir(dataset).exists()


# ------------------------------------------------------------------------------ concurrent writers


@pytest.mark.timeout(30)
def test_two_ingests_at_once_add_every_row_once_and_both_succeed(harness):
    for n in range(6):
        harness.labelstudio.annotate(n + 1, harness.image(n), CLASSES[n % 2], minutes=n)

    first, second = run_together(harness.run, harness.run)

    assert not isinstance(first, BaseException), first
    assert not isinstance(second, BaseException), second
    assert sorted([first.added, second.added]) == [0, 6]  # the second waited, then found all six there
    rows = by_sha(harness.dataset)
    assert len(rows) == 6
    assert_whole(harness.dataset)
    assert IngestState.load(harness.dataset, 1).cursor == (T0 + timedelta(minutes=5)).isoformat()
    assert lock_path(harness.dataset).parent == harness.dataset.parent  # beside the dataset, not in it


def _constant_model(path: Path, name: str, logits: tuple[float, float]) -> Path:
    """An ONNX graph with the exported graphs' interface that answers `logits` for every image."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Cast", ["pixels"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["f"], ["m"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["m", "shape"], ["m2"]),
        helper.make_node("MatMul", ["m2", "zeros"], ["z"]),
        helper.make_node("Add", ["z", "bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", 32, 32, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        initializer=[helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 1]),
                     helper.make_tensor("zeros", TensorProto.FLOAT, [1, 2], [0.0, 0.0]),
                     helper.make_tensor("bias", TensorProto.FLOAT, [2], list(logits))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for key, value in {"classes": json.dumps(CLASSES), "image_size": "32", "arch": name}.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    return path


@pytest.mark.timeout(40)
def test_active_learning_beside_an_ingest_loses_no_auto_label(harness, tmp_path):
    from tasks.data.stream import simulate_scans, write_scans
    from tasks.labeling.active_learning import model_ref, route
    from tasks.labeling.pool import load_state

    pool = tmp_path / "pool"
    write_scans(simulate_scans(8, seed=5, start=T0.replace(tzinfo=None), rate_per_hour=60.0, image_size=32), pool)
    champion = model_ref(_constant_model(tmp_path / "a.onnx", "a", (6.0, 0.0)), "champ", "1")
    second = model_ref(_constant_model(tmp_path / "b.onnx", "b", (5.0, 0.0)), "second", "2")
    harness.hold_s = 0
    harness.labelstudio.annotate(1, harness.image(0), "not_fu", minutes=0)
    harness.run()  # the dataset as an earlier ingest left it
    for n in range(1, 3):
        harness.labelstudio.annotate(n + 1, harness.image(n), "not_fu", minutes=n)
    harness.hold_s = 1.0  # active learning writes inside this window when nothing stops it

    def active_learning():
        assert harness.staged.wait(20), "the ingest never staged its copy"
        return route(pool, harness.dataset, champion, second, sink=lambda items: [], threshold=0.9)

    ingested, routed = run_together(harness.run, active_learning)

    assert not isinstance(ingested, BaseException), ingested
    assert not isinstance(routed, BaseException), routed
    done = load_state(pool).auto  # what the pool's state says is in the dataset
    assert ingested.added == 2 and routed.auto == routed.auto_added == len(done) > 0
    rows = by_sha(harness.dataset)
    assert done <= set(rows), f"auto-labels the state calls done but the dataset lost: {sorted(done - set(rows))}"
    assert sorted(r[0]["source"] for r in rows.values()) == ["auto"] * len(done) + ["human"] * 3
    assert_whole(harness.dataset)


@pytest.mark.timeout(60)
def test_two_fast_retrains_of_one_model_make_one_labelled_copy_and_add_each_label_once(saofu_home, tmp_path,
                                                                                         monkeypatch):
    from tasks.train.retrain_steps import labelled_dataset

    monkeypatch.setattr(ingest, "validate", lambda *a: SimpleNamespace(success=True, docs_path=None,
                                                                        summary=lambda: "passed"))
    monkeypatch.setattr(ingest, "tracking", _no_tracking())
    plain = tmp_path / "trained-on"  # the base model's training data: a plain ImageFolder
    for n in range(8):
        png(plain / CLASSES[n % 2] / f"{n}.png", 100 + n)
    copy_dir = tmp_path / "data" / "labelled-copy"
    new = [png(tmp_path / "labels" / f"{n}.png", 200 + n) for n in range(3)]
    rows = [{"image": str(p), "label": "fu", "source": "human", "annotator": "folder"} for p in new]

    def fast_retrain(batch):
        out = labelled_dataset(plain, copy_dir, image_size=24, val_share=0.25, seed=0)
        added, _ = add_validated(Path(out), batch, CLASSES, "run")
        return out, len(added)

    first, second = run_together(lambda: fast_retrain(rows[:2]), lambda: fast_retrain(rows[1:]))

    assert not isinstance(first, BaseException), first
    assert not isinstance(second, BaseException), second
    assert first[0] == second[0] == str(copy_dir)
    assert first[1] + second[1] == 3  # the image both runs carried went in once
    assert len(by_sha(copy_dir)) == 8 + 3
    assert_whole(copy_dir)


@pytest.mark.timeout(20)
def test_a_writer_that_cannot_get_the_lock_says_which_dataset_and_that_another_run_holds_it(tmp_path):
    dataset = tmp_path / "labelled"
    held, release = threading.Event(), threading.Event()

    def holder():
        with dataset_lock(dataset):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(10)
        with pytest.raises(SaofuError, match=rf"dataset {dataset} is locked: another run .* held .*after 0.2 s"):
            with dataset_lock(dataset, wait_s=0.2):
                pass
    finally:
        release.set()
        t.join(10)
    with dataset_lock(dataset, wait_s=1), dataset_lock(dataset, wait_s=0):  # free again; re-entrant
        pass


# ------------------------------------------------------------------------------------- crash points


class Crash(BaseException):
    """The process dying at this point: nothing after it runs (not even the writer's own cleanup)."""


def _crash_at(monkeypatch, point: str, dataset: Path) -> None:
    """Make the swap (or the staging) die at `point`; every later file operation of the run dies too."""
    dead = threading.Event()
    real_rename, real_link = Path.rename, os.link
    renames = {"before the first rename": 1, "between the renames": 2}.get(point)
    calls = {"rename": 0, "link": 0}

    def rename(self, target):
        calls["rename"] += 1
        if dead.is_set() or calls["rename"] == renames:
            dead.set()
            raise Crash(point)
        return real_rename(self, target)

    def link(src, dst, **kw):
        calls["link"] += 1
        if dead.is_set() or (point == "in the middle of staging" and calls["link"] == 2):
            dead.set()
            raise Crash(point)
        return real_link(src, dst, **kw)

    def rmtree(path, *a, **k):  # removing the swap's old copy; or the writer's cleanup, which a dead process skips
        if dead.is_set() or (point == "after the swap, before the old copy is removed"
                             and Path(path) == previous_dir(dataset)):
            dead.set()
            raise Crash(point)
        return real_rmtree(path, *a, **k)

    real_rmtree = shutil.rmtree
    monkeypatch.setattr(Path, "rename", rename)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(shutil, "rmtree", rmtree)


CRASH_POINTS = ["in the middle of staging", "before the first rename", "between the renames",
                "after the swap, before the old copy is removed"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_at_any_point_of_the_swap_loses_nothing_and_the_next_ingest_recovers(harness, monkeypatch,
                                                                                     point):
    harness.hold_s = 0
    generated = [{"image": str(png(harness.files.parent / "gen" / f"{n}.png", 50 + n)), "label": CLASSES[n % 2],
                  "source": "generated"} for n in range(2)]
    with dataset_lock(harness.dataset):
        add_images(harness.dataset, generated)  # rows no Label Studio could give back if they were lost
    for n in range(3):
        harness.labelstudio.annotate(n + 1, harness.image(n), CLASSES[n % 2], minutes=n)
    harness.run()
    stored = set(by_sha(harness.dataset))
    assert len(stored) == 5
    for n in range(3, 5):  # the batch the crashed ingest carries
        harness.labelstudio.annotate(n + 1, harness.image(n), CLASSES[n % 2], minutes=n)

    with monkeypatch.context() as m:
        _crash_at(m, point, harness.dataset)
        with pytest.raises(Crash):
            harness.run()

    if point == "between the renames":  # the state the recovery exists for: the dataset is only `.previous`
        assert not harness.dataset.exists() and previous_dir(harness.dataset).is_dir()
    after = harness.run(classes=None)  # the next run, a clean process, taking the classes from the manifest
    rows = by_sha(harness.dataset)
    assert stored <= set(rows), "rows stored before the crash were lost"
    assert len(rows) == 7, "the crashed batch is neither lost nor doubled: it is in once"
    committed = point == "after the swap, before the old copy is removed"
    assert after.added == (0 if committed else 2)  # a committed batch stays; an uncommitted one is fetched again
    assert IngestState.load(harness.dataset, 1).cursor == (T0 + timedelta(minutes=4)).isoformat()
    assert_whole(harness.dataset)


@pytest.mark.timeout(20)
def test_a_dataset_left_only_as_previous_is_found_again_by_whoever_looks_for_it(tmp_path):
    dataset = tmp_path / "labelled"
    add_images(dataset, [{"image": str(png(tmp_path / "a.png", 1)), "label": "fu", "source": "generated"}])
    manifest = (dataset / "manifest.csv").read_bytes()
    dataset.rename(previous_dir(dataset))  # a swap that died between its renames

    assert repair_if_interrupted(dataset)
    assert (dataset / "manifest.csv").read_bytes() == manifest and not previous_dir(dataset).exists()
    assert repair_if_interrupted(dataset)  # nothing left to repair: a plain look
    assert not repair_if_interrupted(tmp_path / "never-made") and not lock_path(tmp_path / "never-made").exists()


@pytest.mark.timeout(20)
def test_a_scheduled_run_sees_a_half_swapped_dataset_as_labelled(tmp_path):
    """The scheduled flows find their dataset through `is_labelled`: it must put `.previous` back."""
    from tasks.data.project_dataset import is_labelled

    dataset = tmp_path / "labelled"
    add_images(dataset, [{"image": str(png(tmp_path / "a.png", 1)), "label": "fu", "source": "generated"}])
    dataset.rename(previous_dir(dataset))

    assert is_labelled(dataset)
    assert (dataset / "manifest.csv").is_file() and not previous_dir(dataset).exists()
