"""The release's evaluation sets: fresh human-labelled slice, simulated slice, regression set, badcases."""

from __future__ import annotations

import pytest
from PIL import Image

from saofu.errors import SaofuError
from tasks.data.manifest import write_manifest
from tasks.release.badcases import BadCase, write_badcases
from tasks.release.sets import badcase_set, fresh_online_slice, regression_set, simulated_fresh_slice

CLASSES = ["circle", "square", "triangle"]


def _labelled_dataset(root, shapes_dir):
    """A labelled dataset whose manifest mixes generated rows and human rows of different times."""
    rows = []
    for i, (cls, when, source) in enumerate([
        ("circle", "2026-11-20T10:00:00+00:00", "human"),
        ("square", "2026-11-24T10:00:00+00:00", "human"),
        ("triangle", "2026-11-25T09:00:00+00:00", "human"),
        ("circle", "", "generated"),
    ]):
        src = shapes_dir / cls / f"{i:04d}.png"
        dst = root / cls / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
        rows.append({"path": f"{cls}/{src.name}", "label": cls, "split": "train", "source": source,
                     "sha256": str(i), "labeled_at": when})
    write_manifest(root, rows)
    return root


def test_fresh_slice_is_the_newest_human_labels(tmp_path, shapes_dir):
    root = _labelled_dataset(tmp_path / "labelled", shapes_dir)
    split = fresh_online_slice(root, CLASSES, 32, n=2)
    assert [CLASSES[i] for i in split.labels.tolist()] == ["triangle", "square"]  # newest first, generated skipped
    assert tuple(split.images.shape) == (2, 3, 32, 32)
    assert fresh_online_slice(tmp_path / "empty", CLASSES, 32) is None


def test_simulated_slice_is_labelled_by_the_simulator_and_written_to_the_pool(tmp_path):
    split, info = simulated_fresh_slice(tmp_path / "pool", ["fu", "not_fu"], 32, n=12, seed=1)
    assert info["source"] == "simulated" and info["n"] == len(split) == 12
    assert set(split.labels.tolist()) <= {0, 1}
    assert (tmp_path / "pool" / "index.jsonl").read_text().count("\n") == 12
    with Image.open(split.paths[0]) as im:
        assert im.size == (32, 32)


def test_regression_set_is_the_test_split_and_fixed(shapes_dir, tmp_path):
    a = regression_set(shapes_dir, 32)
    b = regression_set(shapes_dir, 32)
    assert a.paths == b.paths and len(a) > 0


def test_badcase_set_reads_the_open_badcases(tmp_path, shapes_dir):
    cases = [BadCase(str(shapes_dir / "circle" / "0001.png"), "x", "circle", "square", "square", 0.95, "confusion"),
             BadCase(str(tmp_path / "gone.png"), "y", "square", "circle", "circle", 0.91, "confusion")]
    path = write_badcases(tmp_path / "badcases.json", cases, "3", CLASSES, 0.9, None, "test", 10)
    split = badcase_set(path, CLASSES, 32)
    assert len(split) == 1 and split.labels.tolist() == [0]  # the missing file is skipped
    assert badcase_set(tmp_path / "none.json", CLASSES, 32) is None


def test_unknown_labels_are_refused_by_name(tmp_path, shapes_dir):
    root = _labelled_dataset(tmp_path / "labelled", shapes_dir)
    with pytest.raises(SaofuError, match=r"labels \['triangle'\] are not classes"):
        from tasks.release.sets import split_from_files

        split_from_files([root / "triangle" / "0002.png"], ["triangle"], ["circle", "square"], 32)
