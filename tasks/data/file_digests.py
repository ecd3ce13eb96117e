"""sha256 of files, each read once while it stays untouched: a cache keyed by device, inode, size,
modification time and inode change time.

A data version's identity is a fingerprint over every file's sha256 (`tasks.data.versions`). A
dataset of 17,000 images that an ingest grew by 2,900 was read whole three times per version
(to look for a version holding it, to version it, and the registry's copy of it), seconds of a
fast retrain spent re-hashing files that had not changed. The change time is in the key because
modification times can be set back (`touch -d`, `cp -p`, `rsync -t` over a file edited in place)
while the change time moves on any write, rename or link: a cached digest is only ever used for
a file nobody touched since it was read. (A hard-linked staged copy moves every change time, so
the first fingerprint after an ingest reads the files again; the ones after it do not.)

One entry per file (device and inode), holding the stat it was read at: a file read again replaces
its entry. Keyed by the whole stat, each ingest's staged copy added an entry for every file of the
dataset; the fast retrain bench's cache reached 440,000 entries (57 MB), and loading and writing
it cost two seconds of every ingest.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Self

from tasks.data.stat_cache import StatCache

MAX_ENTRIES = 500_000  # past this, a save keeps only the files the last reader saw


def file_key(st: os.stat_result) -> str:
    """Which file: its device and inode."""
    return f"{st.st_dev}:{st.st_ino}"


def file_state(st: os.stat_result) -> list[int]:
    """What says it is unchanged since: size, modification and change time."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class FileDigests(StatCache):
    """`sha256(path)` with the digests of files already read, saved in a JSON file."""

    max_entries = MAX_ENTRIES

    @classmethod
    def open(cls, path: Path) -> Self:
        cache = super().open(path)
        stale = [key for key, entry in cache.entries.items() if not isinstance(entry, list)]
        for key in stale:  # the older format's, one per stat: never looked up again
            del cache.entries[key]
        cache.changed = bool(stale)
        return cache

    def sha256(self, path: Path, st: os.stat_result | None = None) -> str:
        """`path`'s digest; `st`: its stat, where the caller has it from walking the folder."""
        st = st if st is not None else path.stat()
        key, state = file_key(st), file_state(st)
        self.seen.add(key)
        entry = self.entries.get(key)
        # [size, mtime, ctime, digest]; anything else (an entry of the older format) is read again
        if isinstance(entry, list) and len(entry) == 4 and entry[:3] == state:
            return entry[3]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        self.entries[key] = [*state, digest]
        self.changed = True
        return digest
