"""Task data from Label Studio is untrusted: path and split attacks on the ingest (issue 15, hole 1).

Any labeler can edit a task's data. A task whose image lies outside the online pool and the
Label Studio files root, or whose split or label is not a plain known name, must be reported and
skipped, nothing of it written; the good tasks of the same batch still go in.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from saofu.errors import SaofuError
from tasks.data.manifest import add_images, read_manifest
from tasks.labeling.client import completed_annotations
from tasks.labeling.ingest import to_manifest_rows

CLASSES = ["fu", "not_fu"]
WHEN = "2026-11-25T10:00:00+00:00"


def _png(path: Path, colour: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def _task(task_id: int, path: str, label: str = "fu", **data) -> dict:
    """A task as Label Studio's project export returns it, with one annotation."""
    result = [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]
    return {"id": task_id, "data": {"image": "/data/local-files/?d=x.png", "path": path, "source": "online_pool",
                                    "badcase": False, **data},
            "annotations": [{"id": task_id * 10, "completed_by": 1, "result": result, "was_cancelled": False,
                             "created_at": WHEN, "updated_at": WHEN}]}


def _export(tasks: list[dict]) -> list[dict]:
    """`completed_annotations` over a fake Label Studio holding `tasks`: the records the ingest reads."""
    client = SimpleNamespace(
        users=SimpleNamespace(list=lambda: [SimpleNamespace(id=1, username="ann", email="")]),
        projects=SimpleNamespace(exports=SimpleNamespace(
            download_sync=lambda *_, **__: iter([json.dumps(tasks).encode()]))),
    )
    return completed_annotations(client, project_id=1)


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """SAOFU_HOME with its default online pool, and a Label Studio files root beside it."""
    home = tmp_path / "home"
    files_root = tmp_path / "ls-files"
    monkeypatch.setenv("SAOFU_HOME", str(home))
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(files_root))
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    return SimpleNamespace(pool=home / "data" / "online_pool", files=files_root, outside=tmp_path / "outside")


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


@pytest.mark.timeout(60)
def test_tasks_pointing_outside_the_pool_and_files_root_are_skipped_and_the_rest_go_in(roots, tmp_path):
    good_pool = _png(roots.pool / "ab" / "good.png", (200, 0, 0))
    good_files = _png(roots.files / "campaign" / "good.png", (0, 200, 0))
    secret = _png(roots.outside / "secret.png", (1, 2, 3))  # an image, but not one labelers were sent
    (roots.pool / "ab" / "link.png").symlink_to(secret)  # inside the pool by name, outside once resolved
    climb = roots.pool / ".." / ".." / ".." / "outside" / "secret.png"
    assert climb.resolve() == secret.resolve()
    tasks = [
        _task(1, str(good_pool)),
        _task(2, "/etc/passwd"),
        _task(3, "../../x.png"),
        _task(4, str(climb)),
        _task(5, str(roots.pool / "ab" / "link.png")),
        _task(6, str(good_files), label="not_fu"),
    ]
    rows, report = to_manifest_rows(_export(tasks))  # the flow's call: default roots from the settings

    reasons = {s["task_id"]: s["reason"] for s in report.skipped}
    assert sorted(reasons) == [2, 3, 4, 5]
    assert "/etc/passwd" in reasons[2] and "'../../x.png'" in reasons[3]
    assert all(reason.startswith(f"task {tid}:") for tid, reason in reasons.items())
    assert sorted(r["task_id"] for r in rows) == ["1", "6"]

    dataset = tmp_path / "ds"
    added = add_images(dataset, rows)
    assert sorted(r["task_id"] for r in added) == ["1", "6"]
    stored = {p.read_bytes() for p in _files(dataset) if p.suffix == ".png"}
    assert stored == {good_pool.read_bytes(), good_files.read_bytes()}
    assert secret.read_bytes() not in stored and b"root:" not in b"".join(stored)


@pytest.mark.timeout(60)
def test_split_and_label_attacks_are_skipped_and_write_nothing_outside_the_dataset(roots, tmp_path):
    images = [_png(roots.pool / "cd" / f"{i}.png", (i * 20, 10, 10)) for i in range(7)]
    evil = tmp_path / "evil"
    tasks = [
        _task(10, str(images[0]), eval_split="test"),  # a badcase from the test split goes back there
        _task(11, str(images[1]), eval_split=str(evil)),
        _task(12, str(images[2]), eval_split="../x"),
        _task(13, str(images[3]), eval_split="holdout"),
        _task(14, str(images[4]), label="../../evil"),
        _task(15, str(images[5]), label="..", eval_split="val"),
        _task(16, str(images[6])),
    ]
    outside_before = _files(tmp_path) - _files(tmp_path / "ds")
    rows, report = to_manifest_rows(_export(tasks))  # the flow's call: default roots, no class list

    reasons = {s["task_id"]: s["reason"] for s in report.skipped}
    assert sorted(reasons) == [11, 12, 13, 14, 15]
    assert str(evil) in reasons[11] and "'../x'" in reasons[12] and "'../../evil'" in reasons[14]
    dataset = tmp_path / "ds"
    added = add_images(dataset, rows)
    by_task = {r["task_id"]: r for r in added}
    assert sorted(by_task) == ["10", "16"]
    assert by_task["10"]["split"] == "test" and by_task["16"]["split"] in ("train", "val")
    assert {r["task_id"] for r in read_manifest(dataset)} == {"10", "16"}
    assert not evil.exists() and not (tmp_path / "x").exists() and not (tmp_path / "evil").exists()
    assert _files(tmp_path) - _files(dataset) == outside_before  # nothing written outside the dataset
    stored = {p.read_bytes() for p in _files(dataset) if p.suffix == ".png"}
    assert stored == {images[0].read_bytes(), images[6].read_bytes()}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("field,value", [
    ("split", "{outside}"), ("split", "../x"), ("split", ".."), ("label", "../../evil"),
    ("label", "a/b"), ("label", "{outside}"), ("label", ""),
])
def test_add_images_refuses_a_split_or_label_that_is_not_one_folder_name(tmp_path, field, value):
    # An absolute target inside tmp_path: without the guard this test must not write anywhere else.
    value = value.format(outside=tmp_path / "outside")
    good = _png(tmp_path / "src" / "good.png", (9, 9, 9))
    bad = _png(tmp_path / "src" / "bad.png", (8, 8, 8))
    dataset = tmp_path / "ds"
    rows = [{"image": str(good), "label": "fu", "source": "human"},
            {"image": str(bad), "label": "fu", "source": "human", field: value}]
    before = _files(tmp_path)
    with pytest.raises(SaofuError, match=f"{field} .* is not a plain folder name"):
        add_images(dataset, rows)
    assert _files(tmp_path) == before and not dataset.exists()  # the good row was not copied either


@pytest.mark.timeout(60)
def test_add_images_refuses_a_class_folder_that_leads_outside_the_dataset(tmp_path):
    dataset = tmp_path / "ds"
    (dataset / "train").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (dataset / "train" / "fu").symlink_to(elsewhere, target_is_directory=True)
    img = _png(tmp_path / "src" / "a.png", (7, 7, 7))
    with pytest.raises(SaofuError, match="outside the dataset"):
        add_images(dataset, [{"image": str(img), "label": "fu", "source": "human", "split": "train"}])
    assert list(elsewhere.iterdir()) == [] and read_manifest(dataset) == []


@pytest.mark.timeout(60)
def test_a_label_outside_the_dataset_classes_skips_its_task(roots, tmp_path):
    cat, fu = (_png(roots.files / "campaign" / f"{name}.png", colour) for name, colour in
               (("cat", (1, 100, 1)), ("fu", (100, 1, 1))))
    rows, report = to_manifest_rows(_export([_task(20, str(cat), label="cat"), _task(21, str(fu))]),
                                    roots=[roots.files], classes=CLASSES)
    assert [r["task_id"] for r in rows] == ["21"]
    (skipped,) = report.skipped
    assert skipped["task_id"] == 20 and "'cat'" in skipped["reason"] and "task 20" in skipped["reason"]


@pytest.mark.timeout(60)
def test_unresolvable_image_paths_skip_their_task(roots):
    loop = roots.pool / "loop.png"
    loop.parent.mkdir(parents=True)
    loop.symlink_to(loop)
    good = _png(roots.pool / "ok.png", (3, 30, 90))
    rows, report = to_manifest_rows(_export([_task(30, "/tmp/a\0b.png"), _task(31, str(loop)), _task(32, str(good))]))
    assert [r["task_id"] for r in rows] == ["32"]
    assert sorted(s["task_id"] for s in report.skipped) == [30, 31]
