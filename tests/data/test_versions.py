"""DVC data versions (tasks/data/versions.py): round trips through a real registry and remote.

Every test gets its own SAOFU_HOME (the `saofu_home` fixture), so the registry, the DVC cache and
the default remote live in the test's temporary folder.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

import tasks.data.versions as dv
from saofu.errors import SaofuError
from tasks.data.file_walk import path_order, walk_files
from tasks.data.fu_world import WorldConfig, generate_world
from tasks.data.versions import (
    checkout_version,
    create_version,
    ensure_version,
    list_versions,
    registry_dir,
    version_of,
)


@pytest.fixture(scope="module")
def base_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    generate_world(out, WorldConfig(n=60, seed=7, image_size=32), workers=1)
    return out


@pytest.fixture
def home(saofu_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(dv.REMOTE_ENV, raising=False)
    return saofu_home


@pytest.fixture
def world(base_world: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base_world, tmp_path / "fu_world"))


def hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def change_one_image(world: Path) -> str:
    rel = "train/fu/" + sorted(p.name for p in (world / "train" / "fu").iterdir())[0]
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (250, 10, 10)).save(buf, format="PNG")
    (world / rel).write_bytes(buf.getvalue())
    return rel


def test_version_round_trip_after_the_dataset_is_deleted(home: Path, world: Path, tmp_path: Path) -> None:
    before = hashes(world)
    manifest = (world / "manifest.csv").read_text()

    v1 = create_version(world, "fu_world", "first generated world")

    assert (v1.id, v1.name, v1.number) == ("fu_world@v1", "fu_world", 1)
    assert v1.md5.endswith(".dir")
    assert re.fullmatch(r"[0-9a-f]{40}", v1.commit)
    assert v1.n_files == len(before)
    assert v1.message == "first generated world"
    assert list_versions() == [v1]
    assert registry_dir() == home / ".saofu" / "data-registry"
    assert any((home / ".saofu" / "dvc-remote").rglob("*")), "nothing was pushed to the default remote"

    shutil.rmtree(world)
    # Nothing local to restore from: no workspace copy, no DVC cache; only the remote holds the data.
    shutil.rmtree(registry_dir() / ".dvc" / "cache", ignore_errors=True)
    out = checkout_version("fu_world@v1", tmp_path / "restored")

    assert out == tmp_path / "restored"
    assert hashes(out) == before
    assert (out / "manifest.csv").read_text() == manifest
    assert version_of(out) == "fu_world@v1"


def test_same_content_twice_is_one_version(home: Path, world: Path, tmp_path: Path) -> None:
    assert version_of(world) is None  # no registry yet: nothing is created by asking
    assert not registry_dir().exists()

    v1 = create_version(world, "fu_world", "once")
    again = create_version(Path(shutil.copytree(world, tmp_path / "copy")), "fu_world", "twice")

    assert again == v1
    assert [v.id for v in list_versions()] == ["fu_world@v1"]
    assert version_of(world) == "fu_world@v1"


def test_ensure_version_reuses_any_name_and_fingerprints_once(home: Path, world: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = create_version(world, "fu_world", "once")
    passes = []
    fingerprint = dv.content_fingerprint
    monkeypatch.setattr(dv, "content_fingerprint", lambda *a, **k: passes.append(1) or fingerprint(*a, **k))

    # Same content under another name: the version that holds it, nothing new (as version_of finds it).
    assert ensure_version(world, "campaign_copy", "again") == v1.id
    assert len(passes) == 1  # the folder read once (version_of, then create_version, read it twice)
    change_one_image(world)
    assert ensure_version(world, "campaign_copy", "changed") == "campaign_copy@v1"
    assert len(passes) == 3  # the folder once, then the stored copy checked against it
    assert [v.id for v in list_versions()] == ["campaign_copy@v1", "fu_world@v1"]


def test_changed_image_makes_v2_and_v1_keeps_its_bytes(home: Path, world: Path, tmp_path: Path) -> None:
    old = hashes(world)
    v1 = create_version(world, "fu_world", "v1")
    rel = change_one_image(world)
    new = hashes(world)

    v2 = create_version(world, "fu_world", "one image redrawn")

    assert v2.id == "fu_world@v2" and v2.number == 2
    assert v2.md5 != v1.md5 and v2.commit != v1.commit
    assert [v.id for v in list_versions("fu_world")] == ["fu_world@v1", "fu_world@v2"]
    assert list_versions("other") == []
    assert version_of(world) == "fu_world@v2"

    assert hashes(checkout_version("fu_world@v1", tmp_path / "v1")) == old
    restored_v2 = hashes(checkout_version("fu_world@v2", tmp_path / "v2"))
    assert restored_v2 == new and restored_v2[rel] != old[rel]


def test_a_new_version_copies_only_what_changed_and_keeps_no_third_copy(home: Path, world: Path,
                                                                        tmp_path: Path) -> None:
    create_version(world, "fu_world", "v1")
    workspace = registry_dir() / "datasets" / "fu_world"
    kept = "train/not_fu/" + sorted(p.name for p in (world / "train" / "not_fu").iterdir())[0]
    inode = (workspace / kept).stat().st_ino
    # The workspace's files are the DVC cache's (hard links), not a third copy of the data.
    assert (workspace / kept).stat().st_nlink >= 2
    change_one_image(world)
    gone = "train/not_fu/" + sorted(p.name for p in (world / "train" / "not_fu").iterdir())[-1]
    (world / gone).unlink()

    v2 = create_version(world, "fu_world", "one redrawn, one removed")

    assert (workspace / kept).stat().st_ino == inode, "an unchanged file was copied again"
    assert not (workspace / gone).exists()
    restored = hashes(checkout_version(v2.id, tmp_path / "v2"))
    assert restored == hashes(world) and gone not in restored


def test_a_file_changed_behind_an_unchanged_size_and_time_is_still_versioned(home: Path, world: Path,
                                                                             tmp_path: Path) -> None:
    create_version(world, "fu_world", "v1")
    rel = "manifest.csv"
    st = (world / rel).stat()
    text = (world / rel).read_bytes()
    (world / rel).write_bytes(text.replace(b"train", b"TRAIN", 1))
    os.utime(world / rel, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same time, other bytes

    v2 = create_version(world, "fu_world", "v2")

    assert v2.number == 2
    assert hashes(checkout_version(v2.id, tmp_path / "v2")) == hashes(world)


def test_unknown_version_names_it_and_lists_known(home: Path, world: Path, tmp_path: Path) -> None:
    with pytest.raises(SaofuError, match=r"unknown data version 'fu_world@v1'; known versions: none yet"):
        checkout_version("fu_world@v1", tmp_path / "out")
    create_version(world, "fu_world")
    with pytest.raises(SaofuError, match=r"unknown data version 'fu_world@v9'; known versions: fu_world@v1"):
        checkout_version("fu_world@v9", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failure_mid_way_keeps_earlier_versions(
    home: Path, world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = create_version(world, "fu_world", "v1")
    old = hashes(world)
    change_one_image(world)
    real_git = dv._git

    def git_failing_at_tag(cwd: Path, *args: str) -> str:
        if args[0] == "tag":
            raise SaofuError("simulated crash before tagging")
        return real_git(cwd, *args)

    # The data is pushed and committed, then the process "dies" before the tag: no version.
    monkeypatch.setattr(dv, "_git", git_failing_at_tag)
    with pytest.raises(SaofuError, match="simulated crash"):
        create_version(world, "fu_world", "doomed")
    monkeypatch.setattr(dv, "_git", real_git)
    assert list_versions() == [v1]
    assert hashes(checkout_version(v1.id, tmp_path / "v1")) == old

    # An unreachable remote fails before anything is recorded.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the remote folder should be")
    monkeypatch.setenv(dv.REMOTE_ENV, str(blocker / "remote"))
    with pytest.raises(SaofuError, match="dvc"):
        create_version(world, "fu_world", "doomed too")
    monkeypatch.delenv(dv.REMOTE_ENV)
    assert list_versions() == [v1]

    v2 = create_version(world, "fu_world", "recovered")
    assert v2.id == "fu_world@v2"
    assert hashes(checkout_version(v1.id, tmp_path / "v1-again")) == old


def test_remote_from_setting_and_moving_it(home: Path, world: Path, tmp_path: Path, monkeypatch) -> None:
    first, second = tmp_path / "remote-a", tmp_path / "remote-b"
    monkeypatch.setenv(dv.REMOTE_ENV, str(first))
    v1 = create_version(world, "fu_world")
    assert any(first.rglob("*")) and not (home / ".saofu" / "dvc-remote").exists()

    # A new remote: the next version copies the earlier ones over, so the old remote can go.
    monkeypatch.setenv(dv.REMOTE_ENV, str(second))
    change_one_image(world)
    create_version(world, "fu_world")
    shutil.rmtree(first)
    shutil.rmtree(registry_dir() / ".dvc" / "cache")
    assert checkout_version(v1.id, tmp_path / "v1").is_dir()


def test_a_cloud_remote_without_its_dvc_plugin_is_named_and_nothing_is_stored(
    home: Path, world: Path, tmp_path: Path, monkeypatch
) -> None:
    # Whether or not dvc-s3 is installed here, the check must look for a module that is missing.
    monkeypatch.setitem(dv.REMOTE_PLUGINS, "s3", ("saofu_test_no_such_module", "dvc-s3", "s3"))
    v1 = create_version(world, "fu_world")
    monkeypatch.setenv(dv.REMOTE_ENV, "s3://campaign-bucket/saofu")
    change_one_image(world)
    with pytest.raises(SaofuError, match=r"s3://campaign-bucket/saofu needs DVC's s3 plugin: pip install 'dvc-s3'"):
        create_version(world, "fu_world")
    monkeypatch.delenv(dv.REMOTE_ENV)
    assert [v.id for v in list_versions()] == [v1.id]  # the failed attempt left no version behind


def test_bad_input(home: Path, world: Path, tmp_path: Path) -> None:
    with pytest.raises(SaofuError, match="dataset name"):
        create_version(world, "fu world/../x")
    with pytest.raises(SaofuError, match="not found"):
        create_version(tmp_path / "nope", "fu_world")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaofuError, match="holds no files"):
        create_version(tmp_path / "empty", "fu_world")
    v1 = create_version(world, "fu_world")
    with pytest.raises(SaofuError, match="not empty"):
        checkout_version(v1.id, world)
    assert checkout_version(v1.id, world, force=True) == world


def _fingerprint_as_first_recorded(root: Path) -> str:
    """The fingerprint as versions before the scandir walk recorded it (rglob, Path order)."""
    lines = [f"{p.relative_to(root).as_posix()}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\n"
             for p in sorted(p for p in root.rglob("*") if p.is_file())]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


@pytest.mark.timeout(60)
def test_the_walk_finds_what_rglob_finds_and_fingerprints_as_versions_were_recorded(tmp_path: Path) -> None:
    root = tmp_path / "data"
    # Names whose string order differs from their Path order ("a-b/…" < "a/…" as strings, not as parts),
    # a hidden file, non-ASCII names, and links: a linked file counts, a linked folder is not entered.
    for rel in ("a/b.png", "a-b/c.png", "a.png", "A/z.png", ".manifest.swp", "福/図.png", "x/y/z/deep.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode() * 3)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.png").write_bytes(b"o")
    (root / "linked-folder").symlink_to(outside, target_is_directory=True)
    (root / "linked.png").symlink_to(root / "a.png")

    found = walk_files(root)
    assert set(found) == {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert "linked.png" in found and not any(rel.startswith("linked-folder/") for rel in found)
    assert sorted(found, key=path_order) == [p.relative_to(root).as_posix() for p in sorted(
        p for p in root.rglob("*") if p.is_file())]
    assert dv.content_fingerprint(root) == (_fingerprint_as_first_recorded(root), len(found))
    assert walk_files(tmp_path / "missing") == {}
