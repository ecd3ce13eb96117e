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
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tasks.data.stat_cache import StatCache

MAX_ENTRIES = 500_000  # past this, a save keeps only the files the last reader saw


def file_key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class FileDigests(StatCache):
    """`sha256(path)` with the digests of files already read, saved in a JSON file."""

    max_entries = MAX_ENTRIES

    def sha256(self, path: Path, st: os.stat_result | None = None) -> str:
        """`path`'s digest; `st`: its stat, where the caller has it from walking the folder."""
        key = file_key(st if st is not None else path.stat())
        self.seen.add(key)
        digest = self.entries.get(key)
        if digest is None:
            digest = self.entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            self.changed = True
        return digest
