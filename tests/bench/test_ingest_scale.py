"""The ingest-scale bench's grown datasets and its medians."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from bench.ingest_scale import dvc_laps, grow_dataset, summarize, table


def small_dataset(root: Path) -> Path:
    from tasks.data.manifest import file_sha256, write_manifest

    rows = []
    for i, (split, label) in enumerate([("train", "fu"), ("train", "not_fu"), ("val", "fu"), ("test", "not_fu")]):
        path = root / split / label / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(path)
        rows.append({"path": f"{split}/{label}/{i}.png", "label": label, "split": split, "source": "generated",
                     "sha256": file_sha256(path)})
    write_manifest(root, rows)
    return root


@pytest.mark.timeout(30)
def test_a_grown_dataset_holds_each_image_k_times_as_new_content_that_still_decodes(tmp_path):
    from tasks.data.manifest import file_sha256, read_manifest
    from tasks.data.validation import validate_dataset

    base = small_dataset(tmp_path / "base")
    assert grow_dataset(base, tmp_path / "grown", 3) == 12
    rows = read_manifest(tmp_path / "grown")
    assert len(rows) == 12 and len({r["sha256"] for r in rows}) == 12  # no two copies share content
    for r in rows:
        path = tmp_path / "grown" / r["path"]
        assert file_sha256(path) == r["sha256"]
        with Image.open(path) as im:
            im.load()  # the bytes after the image's end are ignored
    assert {(r["split"], r["label"]) for r in rows} == {(r["split"], r["label"]) for r in read_manifest(base)}
    assert validate_dataset(tmp_path / "grown", classes=["fu", "not_fu"], docs_dir=tmp_path / "docs").check(
        "decodes").success


@pytest.mark.timeout(10)
def test_dvc_laps_add_up_each_subcommand_and_put_the_registry_back(monkeypatch):
    import tasks.data.versions as versions

    calls = []
    monkeypatch.setattr(versions, "_dvc", lambda cwd, *args: calls.append(args) or "")
    original = versions._dvc
    laps: dict[str, float] = {}
    with dvc_laps(laps):
        versions._dvc(Path("."), "add", "datasets/fu")
        versions._dvc(Path("."), "push", "-r", "storage")
        versions._dvc(Path("."), "add", "datasets/other")
    assert versions._dvc is original
    assert set(laps) == {"dvc add", "dvc push"} and all(v >= 0 for v in laps.values())
    assert calls == [("add", "datasets/fu"), ("push", "-r", "storage"), ("add", "datasets/other")]


@pytest.mark.timeout(10)
def test_the_table_gives_each_size_s_medians_and_the_range_of_its_draws():
    def draw(copies: int, wall: float) -> dict:
        return {"copies": copies, "dataset_files": 100 * copies, "labels_added": 10, "ingest_s": wall,
                "steps": {"validate": wall / 2, "dvc add": wall / 2}, "first_version_s": 3 * wall,
                "first_validation_s": wall}

    rows = summarize([draw(1, 2.0), draw(2, 5.0), draw(1, 4.0), draw(2, 6.0), draw(1, 3.0)])
    assert [(r["dataset_files"], r["draws"], r["ingest_s"], r["ingest_range_s"]) for r in rows] == [
        (100, 3, 3.0, [2.0, 4.0]), (200, 2, 5.5, [5.0, 6.0])]
    assert rows[0]["steps"] == {"validate": 1.5, "dvc add": 1.5} and rows[0]["first_version_s"] == 9.0
    assert table(rows).splitlines()[1] == "100 | 3.0 (2.0-4.0) | 1.5 | 1.5 | 9.0"
