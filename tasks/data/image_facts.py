"""What an image file really holds (exists, hash, decodes, size, mode), read once per file.

`read_image_facts` reads and decodes a file; `ImageFacts` keeps the facts of files already read,
keyed by inode, size and modification time, in a JSON file, so validating a dataset again after
an ingest added a few images reads only those (saofu never rewrites an image in place: a changed
image is a new file, so a new key).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

from PIL import Image

from tasks.data.stat_cache import StatCache

MAX_ENTRIES = 200_000  # past this, a save keeps only the files the last reader saw


def read_image_facts(path: Path, manifest_sha256: str) -> dict[str, Any]:
    """What one file really holds.

    Args:
        path: the image file.
        manifest_sha256: the hash the manifest recorded for it.

    Returns:
        exists, sha256_ok, decodes, width, height, mode and content_sha256 (the hash of the bytes
        on disk). Facts that cannot be known are None: a missing file neither matches nor fails
        to decode, so only the `files exist` check reports it.
    """
    unknown = {"sha256_ok": None, "decodes": None, "width": None, "height": None, "mode": None}
    if not path.is_file():
        return {"exists": False, "content_sha256": manifest_sha256, **unknown}
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    facts = {"exists": True, "content_sha256": digest, "sha256_ok": digest == manifest_sha256}
    return {**facts, **_decode(data)}


def _decode(data: bytes) -> dict[str, Any]:
    # verify() checks the container without decoding pixels and leaves the image unusable, so the
    # file is opened again; load() then decodes every pixel, which catches truncated files that
    # verify() lets through.
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return {"decodes": True, "width": im.width, "height": im.height, "mode": im.mode}
    except Exception:  # noqa: BLE001 - any decoder failure (PIL raises many types) means unusable
        return {"decodes": False, "width": None, "height": None, "mode": None}


class ImageFacts(StatCache):
    """`read_image_facts` with a cache of the content facts of files already read."""

    max_entries = MAX_ENTRIES

    def read(self, path: Path, manifest_sha256: str) -> dict[str, Any]:
        try:
            st = path.stat()
        except OSError:
            return read_image_facts(path, manifest_sha256)
        key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
        self.seen.add(key)
        known = self.entries.get(key)
        if known is None:
            facts = read_image_facts(path, manifest_sha256)
            if not facts["exists"]:
                return facts
            known = {k: v for k, v in facts.items() if k != "sha256_ok"}
            self.entries[key], self.changed = known, True
        return {**known, "sha256_ok": known["content_sha256"] == manifest_sha256}
