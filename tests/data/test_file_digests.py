"""The digest cache: a file is read once while nobody touches it, and again after any change."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tasks.data.file_digests import FileDigests


@pytest.mark.timeout(30)
def test_an_untouched_file_is_read_once_and_an_edited_one_again_even_with_its_time_set_back(tmp_path: Path,
                                                                                          monkeypatch):
    f = tmp_path / "a.png"
    f.write_bytes(b"first")
    reads = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or real(self))
    cache = FileDigests.open(tmp_path / "digests.json")
    assert cache.sha256(f) == hashlib.sha256(b"first").hexdigest()
    cache.save()
    again = FileDigests.open(tmp_path / "digests.json")  # from disk
    assert again.sha256(f) == hashlib.sha256(b"first").hexdigest()
    assert reads.count(f) == 1
    st = f.stat()
    f.write_bytes(b"other")  # same size, in place, modification time set back
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert again.sha256(f) == hashlib.sha256(b"other").hexdigest()
    assert reads.count(f) == 2


@pytest.mark.timeout(30)
def test_a_damaged_cache_is_read_as_empty(tmp_path: Path):
    (tmp_path / "digests.json").write_text("{not json")
    f = tmp_path / "b.txt"
    f.write_bytes(b"x")
    assert FileDigests.open(tmp_path / "digests.json").sha256(f) == hashlib.sha256(b"x").hexdigest()


@pytest.mark.timeout(30)
def test_one_entry_per_file_however_often_its_links_change(tmp_path: Path):
    """An ingest's staged copy hard-links every file (moving its change time): the file is read
    again, and its entry replaced, not joined by another; the older format's entries are dropped."""
    f = tmp_path / "a.png"
    f.write_bytes(b"pixels")
    path = tmp_path / "digests.json"
    path.write_text('{"1:2:6:3:4": "an entry of the older format"}')
    cache = FileDigests.open(path)
    for i in range(3):
        os.link(f, tmp_path / f"staged{i}.png")  # as a staged copy does
        assert cache.sha256(f) == hashlib.sha256(b"pixels").hexdigest()
    cache.save()
    assert len(FileDigests.open(path).entries) == 1
