"""ImageFolder loading: layouts, class maps, caching, and clear errors for bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from saofu.errors import SaofuError
from tasks.data.loading import prepare_dataset, scan_imagefolder
from tests.conftest import make_shapes_dataset


def test_flat_folder_gets_a_stratified_val_split(shapes_dir):
    data = prepare_dataset(shapes_dir, image_size=32, val_share=0.2, seed=0)
    assert data.classes == ["circle", "square", "triangle"]
    assert data.test is None
    assert len(data.train) + len(data.val) == 180
    assert torch.bincount(data.val.labels).tolist() == [12, 12, 12]
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (3, 32, 32)
    assert not set(data.train.paths) & set(data.val.paths)


def test_resizes_to_the_requested_size(shapes_dir):
    data = prepare_dataset(shapes_dir, image_size=24)
    assert data.train.images.shape[1:] == (3, 24, 24)


def test_explicit_splits_share_the_train_class_map(tmp_path):
    for split, n in (("train", 10), ("val", 3), ("test", 4)):
        make_shapes_dataset(tmp_path / split, n_per_class=n, seed=len(split))
    shutil.rmtree(tmp_path / "test" / "circle")  # a test split may lack a class
    data = prepare_dataset(tmp_path, image_size=32)
    assert (len(data.train), len(data.val), len(data.test)) == (30, 9, 8)
    assert data.test.classes == data.classes
    assert set(data.test.labels.tolist()) == {1, 2}  # square, triangle keep their train indices


def test_cache_hit_returns_the_same_tensors_and_a_change_misses(shapes_dir, tmp_path):
    first = prepare_dataset(shapes_dir, 32, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    again = prepare_dataset(shapes_dir, 32, cache_dir=tmp_path)
    assert again.fingerprint == first.fingerprint
    assert torch.equal(again.train.images, first.train.images)
    other = prepare_dataset(shapes_dir, 24, cache_dir=tmp_path)
    assert other.fingerprint != first.fingerprint


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing", "dataset folder not found"),
        ("no_classes", "no class folders"),
        ("empty_class", "class folder has no images"),
        ("unreadable", "cannot be decoded"),  # more than a handful: a few are left out and named
        ("one_class", "at least 2 classes"),
    ],
)
def test_bad_datasets_raise_one_clear_error(tmp_path, breakage, message):
    root = make_shapes_dataset(tmp_path / "ds", n_per_class=4)
    target = root
    if breakage == "missing":
        target = tmp_path / "nope"
    elif breakage == "no_classes":
        target = tmp_path / "empty"
        target.mkdir()
    elif breakage == "empty_class":
        (root / "zebra").mkdir()
    elif breakage == "unreadable":
        for i in range(6):
            (root / "circle" / f"broken{i}.png").write_bytes(b"not a png at all")
    elif breakage == "one_class":
        for cls in ("square", "triangle"):
            shutil.rmtree(root / cls)
    with pytest.raises(SaofuError, match=message) as err:
        prepare_dataset(target, 32)
    if breakage == "unreadable":
        assert all(f"broken{i}.png" in str(err.value) for i in range(6))
    if breakage == "empty_class":
        assert "zebra" in str(err.value)


def test_scan_ignores_hidden_folders_and_non_images(shapes_dir, tmp_path):
    root = make_shapes_dataset(tmp_path / "ds", n_per_class=3)
    (root / ".ipynb_checkpoints").mkdir()
    (root / "circle" / "notes.txt").write_text("hello")
    index = scan_imagefolder(root)
    assert index.classes == ["circle", "square", "triangle"]
    assert len(index.samples) == 9


def test_a_moved_dataset_reuses_the_cache_but_reads_its_own_paths(saofu_home, tmp_path, monkeypatch):
    """Re-extracted elsewhere (same files, same times): the same cache entry, paths under the new root."""
    from saofu.settings import get_settings
    from tasks.data import loading

    cache = get_settings().cache_dir
    first_root = make_shapes_dataset(tmp_path / "first", n_per_class=5)
    for split in ("train", "test"):  # the split layout too: paths keep their split folder
        make_shapes_dataset(tmp_path / "split" / split, n_per_class=4, seed=len(split))
    firsts = {root: prepare_dataset(root, 32, cache_dir=cache) for root in (first_root, tmp_path / "split")}
    moved = {}
    for root in firsts:
        moved[root] = tmp_path / "moved" / root.name
        shutil.copytree(root, moved[root])  # copy2 keeps modification times: the same fingerprint
        shutil.rmtree(root)

    def no_decoding(*_args, **_kwargs):
        raise AssertionError("the moved dataset was decoded again instead of read from the cache")

    monkeypatch.setattr(loading, "_decode", no_decoding)
    for root, first in firsts.items():
        data = prepare_dataset(moved[root], 32, cache_dir=cache)
        assert data.fingerprint == first.fingerprint and data.source == str(moved[root].resolve())
        splits = [data.train, data.val] + ([data.test] if data.test is not None else [])
        paths = [p for split in splits for p in split.paths]
        assert len(paths) == len(first.train) + len(first.val) + (len(first.test) if first.test else 0)
        assert all(Path(p).is_file() and Path(p).is_relative_to(moved[root]) for p in paths)
        assert [Path(p).relative_to(moved[root]) for p in data.train.paths] == \
               [Path(p).relative_to(root) for p in first.train.paths]
        assert torch.equal(data.train.images, first.train.images)
    assert len(list(cache.glob("*.pt"))) == 2  # one entry per dataset, shared by both copies


@pytest.mark.timeout(120)
def test_a_grown_dataset_decodes_only_its_new_and_changed_images(tmp_path, monkeypatch):
    """An ingest's new images miss the cache's fingerprint; the unchanged files keep their decoded rows."""
    from tasks.data import loading

    root = make_shapes_dataset(tmp_path / "ds", n_per_class=6)
    cache = tmp_path / "cache"
    prepare_dataset(root, 32, cache_dir=cache)
    images = sorted(p for p in root.rglob("*.png"))
    new = images[0].with_name("grown.png")
    shutil.copyfile(images[1], new)  # a new file (another name, another time)
    shutil.copyfile(images[3], images[2])  # a file replaced in place: new content, new time
    decoded = []
    real = loading._decode
    monkeypatch.setattr(loading, "_decode", lambda path, size: decoded.append(path) or real(path, size))

    grown = prepare_dataset(root, 32, cache_dir=cache)

    assert sorted(decoded) == sorted([new, images[2]])
    fresh = prepare_dataset(root, 32, cache_dir=None)  # every image decoded from its file
    for a, b in ((grown.train, fresh.train), (grown.val, fresh.val)):
        assert a.paths == b.paths and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    decoded.clear()
    prepare_dataset(root, 24, cache_dir=cache)  # another image size: nothing to reuse
    assert len(decoded) == len(images) + 1


@pytest.mark.parametrize("bad_path", ["../elsewhere/x.png", "/etc/x.png", "circle/../../x.png"])
def test_a_cache_entry_naming_a_file_outside_its_dataset_is_not_read(tmp_path, bad_path):
    """An entry's paths are joined to the dataset being loaded: one leaving it is refused (decoded again)."""
    from tasks.data import loading

    root = make_shapes_dataset(tmp_path / "ds", n_per_class=3)
    prepare_dataset(root, 32, cache_dir=tmp_path / "cache")
    entry = next((tmp_path / "cache").glob("*.pt"))
    assert loading._read_cache(entry, root) is not None
    payload = torch.load(entry, weights_only=True)
    payload["splits"]["train"]["paths"][0] = bad_path
    torch.save(payload, entry)
    assert loading._read_cache(entry, root) is None


def test_paths_relative_to_a_dataset_read_the_same_however_they_are_spelled():
    from tasks.data.loading import _relative_to

    rel = _relative_to(Path("data/ds"))
    assert rel("data/ds/train/fu/a.png") == rel(Path("data/ds/train/fu/a.png")) == "train/fu/a.png"
    assert rel("data//ds/train/fu/a.png") == "train/fu/a.png"  # not the scan's spelling: the slow way
    with pytest.raises(ValueError):
        rel("data/other/a.png")


@pytest.mark.timeout(120)
def test_a_copy_of_a_prepared_dataset_that_grew_decodes_only_its_new_images(tmp_path, monkeypatch):
    """A copy loads from the entry its original made (same fingerprint) and keeps its rows when it grows."""
    from tasks.data import loading

    original = make_shapes_dataset(tmp_path / "ds", n_per_class=6)
    cache = tmp_path / "cache"
    prepare_dataset(original, 32, cache_dir=cache)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)  # copy2: same sizes and times, so the same fingerprint
    decoded = []
    real = loading._decode
    monkeypatch.setattr(loading, "_decode", lambda path, size: decoded.append(path) or real(path, size))
    prepare_dataset(copy, 32, cache_dir=cache)
    assert decoded == []  # a cache hit
    new = copy / "circle" / "grown.png"  # a flat ImageFolder
    shutil.copyfile(next(new.parent.glob("*.png")), new)
    prepare_dataset(copy, 32, cache_dir=cache)
    assert decoded == [new]


@pytest.mark.timeout(120)
def test_an_entry_its_folder_moved_on_from_is_deleted_unless_another_folder_names_it(tmp_path):
    root = make_shapes_dataset(tmp_path / "ds", n_per_class=6)
    cache = tmp_path / "cache"
    first = prepare_dataset(root, 32, cache_dir=cache).fingerprint
    assert [p.name.split(".")[0] for p in cache.glob("*.pt")] == [first]
    image = next(root.rglob("*.png"))
    shutil.copyfile(image, image.with_name("grown1.png"))
    second = prepare_dataset(root, 32, cache_dir=cache).fingerprint
    assert sorted(p.name.split(".")[0] for p in cache.glob("*.pt")) == [second]  # the first is gone
    shutil.copytree(root, tmp_path / "copy")  # names `second` as its last entry too
    prepare_dataset(tmp_path / "copy", 32, cache_dir=cache)
    shutil.copyfile(image, image.with_name("grown2.png"))
    third = prepare_dataset(root, 32, cache_dir=cache).fingerprint
    assert sorted(p.name.split(".")[0] for p in cache.glob("*.pt")) == sorted([second, third])
    assert prepare_dataset(tmp_path / "copy", 32, cache_dir=cache).fingerprint == second  # still a hit


@pytest.mark.timeout(120)
def test_entries_no_existing_folder_names_go_once_unused_for_an_hour(tmp_path):
    """The cache keeps about one entry per dataset folder that exists (a temporary folder's entry,
    tens of MB, was kept for good before), plus what was used lately (a moved dataset's)."""
    import os
    import time

    from tasks.data.loading import CACHE_FORMAT, UNUSED_GRACE_S

    def age(path: Path) -> None:
        then = time.time() - UNUSED_GRACE_S - 60
        os.utime(path, (then, then))

    cache = tmp_path / "cache"
    kept = prepare_dataset(make_shapes_dataset(tmp_path / "kept", n_per_class=4, seed=1), 32, cache_dir=cache)
    entries = {}
    for name, seed in (("held_out", 2), ("moved", 3)):
        folder = make_shapes_dataset(tmp_path / name, n_per_class=4, seed=seed)
        entries[name] = cache / f"{prepare_dataset(folder, 32, cache_dir=cache).fingerprint}.v{CACHE_FORMAT}.pt"
        shutil.move(folder, tmp_path / f"{name}_elsewhere")
    shutil.rmtree(tmp_path / "held_out_elsewhere")  # gone for good
    age(entries["held_out"])
    age(kept_entry := cache / f"{kept.fingerprint}.v{CACHE_FORMAT}.pt")  # old, but its folder exists
    young, old, stray, facts = cache / "young.v5.pt", cache / "old.v4.pt", cache / "x.123.tmp", cache / "facts.json"
    for path in (young, old, stray, facts):
        path.write_bytes(b"x")
    for path in (old, stray, facts):
        age(path)

    third = prepare_dataset(make_shapes_dataset(tmp_path / "third", n_per_class=4, seed=4), 32, cache_dir=cache)

    assert not entries["held_out"].exists()  # its folder is gone and it was not used for an hour
    assert entries["moved"].exists()  # its folder is gone too, but lately: it may have moved
    assert kept_entry.exists() and (cache / f"{third.fingerprint}.v{CACHE_FORMAT}.pt").exists()
    assert young.exists() and facts.exists()  # maybe another process's, not yet recorded; not an entry
    assert not old.exists() and not stray.exists()
    assert "held_out" not in (cache / "last-entries.json").read_text()

    def no_decoding(*_args, **_kwargs):
        raise AssertionError("decoded again instead of read from the cache")

    from tasks.data import loading

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loading, "_decode", no_decoding)
        assert prepare_dataset(tmp_path / "moved_elsewhere", 32, cache_dir=cache).fingerprint == \
            entries["moved"].name.split(".")[0]  # the move found its entry, and touched it
    assert time.time() - entries["moved"].stat().st_mtime < 60
