"""The release's evaluation sets: the fresh slice and the order it is chosen in, regression set, badcases."""

from __future__ import annotations

import pytest
from PIL import Image

from saofu.errors import SaofuError
from tasks.data.loading import prepare_dataset
from tasks.data.manifest import write_manifest
from tasks.release.badcases import BadCase, write_badcases
from tasks.release.sets import (
    badcase_set,
    choose_fresh_slice,
    fresh_online_slice,
    imagefolder_slice,
    is_fu_model,
    regression_set,
    simulated_fresh_slice,
)
from tests.conftest import make_shapes_dataset

CLASSES = ["circle", "square", "triangle"]


def _labelled_dataset(root, shapes_dir, split="train"):
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
        rows.append({"path": f"{cls}/{src.name}", "label": cls, "split": split, "source": source,
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


# ------------------------------------------------------------------ the fresh slice's order


def _choose(**kw):
    kw.setdefault("n", 400)
    return choose_fresh_slice(kw.pop("classes", CLASSES), 32, **kw)


def test_a_named_plain_imagefolder_is_the_fresh_slice(tmp_path, shapes_dir):
    folder = make_shapes_dataset(tmp_path / "mine", n_per_class=4, seed=3)
    chosen = _choose(labelled_dir=folder, data_dir=shapes_dir)
    assert chosen.kind == "named-folder" and str(folder) in chosen.source
    assert len(chosen.split) == 12 and chosen.split.labels.bincount().tolist() == [4, 4, 4]
    assert all(p.startswith(str(folder)) for p in chosen.split.paths)
    sampled = _choose(labelled_dir=folder, n=10, seed=1)
    assert len(sampled.split) == 10  # a seeded sample of a larger folder
    assert sampled.split.paths == _choose(labelled_dir=folder, n=10, seed=1).split.paths


def test_a_named_folder_with_splits_contributes_every_split(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        make_shapes_dataset(tmp_path / "mine" / split, n_per_class=n, seed=len(split))
    split = imagefolder_slice(tmp_path / "mine", CLASSES, 32)
    assert len(split) == 15 and split.classes == CLASSES


def test_a_named_labelled_dataset_gives_its_newest_human_labels(tmp_path, shapes_dir):
    root = _labelled_dataset(tmp_path / "labelled", shapes_dir)
    chosen = _choose(labelled_dir=root, n=2, data_dir=shapes_dir)
    assert chosen.kind == "named-human" and "human labels" in chosen.source
    assert [CLASSES[i] for i in chosen.split.labels.tolist()] == ["triangle", "square"]


def test_a_named_folder_with_classes_the_model_lacks_is_refused_by_name(tmp_path):
    folder = make_shapes_dataset(tmp_path / "mine", n_per_class=2)
    (folder / "star").mkdir()
    (folder / "circle" / "0000.png").rename(folder / "star" / "0000.png")
    with pytest.raises(SaofuError, match=r"class folders \['star'\] in .* are not classes of the model .*'star': 1"):
        _choose(labelled_dir=folder)


def test_human_labels_of_the_training_data_come_next_but_never_its_train_split(tmp_path, shapes_dir):
    held_out = _labelled_dataset(tmp_path / "val_labels", shapes_dir, split="val")
    chosen = _choose(data_dir=held_out)
    assert chosen.kind == "human" and "no folder named" in chosen.reason
    assert len(chosen.split) == 3  # the three human rows, not the generated one
    trained_on = _labelled_dataset(tmp_path / "train_labels", shapes_dir, split="train")
    assert _choose(data_dir=trained_on).kind == "held-out"  # human rows it trained on are not fresh


def test_a_named_labelled_dataset_without_human_labels_falls_through(tmp_path, shapes_dir):
    root = tmp_path / "labelled"
    write_manifest(root, [])
    chosen = _choose(labelled_dir=root, data_dir=shapes_dir)
    assert chosen.kind == "held-out" and "without human labels" in chosen.reason


def test_a_model_outside_the_fu_world_gets_its_own_held_out_split(shapes_dir, tmp_path):
    chosen = _choose(data_dir=shapes_dir, val_share=0.2, split_seed=1, pool_dir=tmp_path / "pool")
    assert chosen.kind == "held-out" and "not a Fu-world model" in chosen.reason
    assert chosen.split.paths == prepare_dataset(shapes_dir, 32, 0.2, 1).val.paths  # the run's own split
    assert not (tmp_path / "pool").exists()  # no simulated scans for shapes
    for split, n in (("train", 4), ("test", 2)):
        make_shapes_dataset(tmp_path / "splits" / split, n_per_class=n, seed=len(split))
    with_test = _choose(data_dir=tmp_path / "splits")
    assert "held-out test split" in with_test.source and len(with_test.split) == 6
    assert len(_choose(data_dir=tmp_path / "splits", n=4).split) == 4


def test_a_fu_model_gets_simulated_scans_before_its_held_out_split(tmp_path, shapes_dir):
    chosen = _choose(classes=["fu", "not_fu"], n=12, data_dir=None, pool_dir=tmp_path / "pool")
    assert chosen.kind == "simulated" and len(chosen.split) == 12 and "simulated" in chosen.source
    assert is_fu_model(["fu", "not_fu", "fu_merchant"]) and is_fu_model(["fu", "fu_merchant"])
    assert not is_fu_model(CLASSES) and not is_fu_model(["fu", "cat"]) and not is_fu_model(["not_fu", "cat"])


def test_no_fresh_slice_at_all_is_one_clear_error(tmp_path):
    with pytest.raises(SaofuError, match="no fresh slice .*--labelled"):
        _choose(data_dir=tmp_path / "gone")
