"""A JSON file of what saofu learnt about files, keyed by what says a file has not changed.

Two caches share it: the facts of images the validation suite read (`tasks.data.image_facts`, keyed
by inode, size and modification time, so a hard-linked staged copy reads only its new images) and
the digests a data version's fingerprint needs (`tasks.data.file_digests`, which adds the change
time). Each caller owns its key; this holds the entries, remembers which keys the last reader saw,
and writes the file atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Self


class StatCache:
    """Entries by key, loaded from and saved to one JSON file (`path` None: kept in memory only)."""

    max_entries = 200_000  # past this, a save keeps only the keys the last reader saw

    def __init__(self, path: Path | None, entries: dict[str, Any] | None = None):
        self.path, self.entries, self.changed = path, entries if entries is not None else {}, False
        self.seen: set[str] = set()

    @classmethod
    def open(cls, path: Path) -> Self:
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            entries = {}  # no cache yet, or a damaged one: read everything again
        return cls(path, entries if isinstance(entries, dict) else {})

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        if len(self.entries) > self.max_entries:  # files deleted since pile up otherwise
            self.entries = {k: v for k, v in self.entries.items() if k in self.seen}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.entries))
        tmp.replace(self.path)
