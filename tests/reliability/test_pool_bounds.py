"""The online pool stays within its bounds, index and queue included (reliability issue, hole 6).

Before: every request appended an index line, and the byte bound counted image bytes only, so an
image sent again and again grew `index.jsonl` without end (eviction only ever dropped the lines
of evicted images, and a popular image is never the oldest); the pending queue was bounded by
entries only, so a burst of 4 MB images could hold 4096 x 4 MB in memory. Now: index bytes count
against `max_bytes` and eviction drops the oldest lines (an image goes with its last line), the
queue is bounded by bytes as well, and what it drops is counted.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image

from deploy.pool_log import PoolEntry, PoolLogger, PoolStore
from tasks.labeling.pool import PoolState, pool_images, save_state


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i % 256, i // 256 % 256, 99)).save(buf, "PNG")
    return buf.getvalue()


def _entry(data: bytes, when: float | None = None) -> PoolEntry:
    return PoolEntry(data, "PNG", {"class": "fu", "score": 0.5, "model_version": "m:1"},
                     time.time() if when is None else when, {"bytes": len(data)})


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _lines(pool: Path) -> list[dict]:
    return [json.loads(line) for line in (pool / "index.jsonl").read_bytes().split(b"\n") if line]


def _on_disk(pool: Path) -> int:
    """Bytes the pool holds on disk: its images and its index (the state and lock files are active learning's)."""
    return sum(p.stat().st_size for p in pool.rglob("*.png")) + (pool / "index.jsonl").stat().st_size


@pytest.mark.timeout(30)
def test_an_image_sent_again_and_again_does_not_grow_the_index_past_the_bound(tmp_path):
    pool = tmp_path / "pool"
    popular = _png(1)
    store = PoolStore(pool, max_bytes=32 * 1024)
    for i in range(1500):  # ~300 bytes a line: ~450 KB of index if every line stayed
        store.add(_entry(popular, when=1_000_000 + i))
    store.close()

    assert _on_disk(pool) <= 32 * 1024
    lines = _lines(pool)
    assert len(lines) > 50  # a window of recent requests, not a single line
    stamps = [datetime.fromisoformat(x["timestamp"]).timestamp() for x in lines]
    assert stamps == [1_000_000 + i for i in range(1500 - len(lines), 1500)]  # the newest requests, in order
    assert {x["sha256"] for x in lines} == {_sha(popular)} and (pool / lines[0]["path"]).is_file()
    assert [img.sha256 for img in pool_images(pool)] == [_sha(popular)]  # active learning still reads it
    assert store.stats()["index_bytes"] == (pool / "index.jsonl").stat().st_size


@pytest.mark.timeout(30)
def test_the_byte_bound_counts_the_index_as_well_as_the_images(tmp_path):
    pool = tmp_path / "pool"
    store = PoolStore(pool, max_bytes=16 * 1024)
    images = [_png(i) for i in range(300)]  # ~70-byte images, each line several times that
    for data in images:
        store.add(_entry(data))
    store.close()

    assert _on_disk(pool) <= 16 * 1024
    assert store.stats()["bytes"] == _on_disk(pool)  # what /healthz and /metrics report is what is on disk
    lines = _lines(pool)
    kept = {p.stem for p in pool.rglob("*.png")}
    assert {x["sha256"] for x in lines} == kept  # no line points at a deleted file, no image without a line
    assert _sha(images[-1]) in kept and _sha(images[0]) not in kept  # the oldest went first
    assert [img.sha256 for img in pool_images(pool)] == [x["sha256"] for x in lines]


@pytest.mark.timeout(30)
def test_compaction_never_releases_an_image_sent_to_labelers(tmp_path):
    pool = tmp_path / "pool"
    sent = _png(7)
    store = PoolStore(pool, max_files=20, max_bytes=24 * 1024)
    for _ in range(3):
        store.add(_entry(sent))
    save_state(pool, PoolState(human={_sha(sent)}))
    for i in range(400):  # the labelers' image sent again now and then, among a flood of others
        store.add(_entry(sent if i % 4 == 0 else _png(1000 + i)))
    store.close()
    reopened = PoolStore(pool, max_files=20, max_bytes=24 * 1024)  # a restarted app adopts the pool
    for i in range(200):
        reopened.add(_entry(_png(5000 + i)))
    reopened.close()

    assert (pool / f"{_sha(sent)[:2]}/{_sha(sent)}.png").is_file()
    lines = _lines(pool)
    assert sum(x["sha256"] == _sha(sent) for x in lines) == 1  # its newest line stays, its old ones go
    assert _on_disk(pool) <= 24 * 1024 + len(sent)  # the pinned image's bytes do not count
    assert {x["sha256"] for x in lines} == {p.stem for p in pool.rglob("*.png")}
    assert len({x["sha256"] for x in lines}) - 1 <= 20


@pytest.mark.timeout(30)
def test_a_burst_of_large_images_is_bounded_by_bytes_and_what_is_dropped_is_counted(tmp_path):
    big = bytes(4 * 2**20)  # one 4 MB body, shared by every entry: the test itself holds 4 MB
    logger = PoolLogger(PoolStore(tmp_path / "pool"), max_pending_bytes=16 * 2**20)
    # the writer is not started: nothing drains while the burst arrives
    accepted = [logger.submit(_entry(big)) for _ in range(50)]

    stats = logger.stats()
    assert accepted == [True] * 4 + [False] * 46
    assert stats["queued"] == 4 and stats["queued_bytes"] == 16 * 2**20
    assert stats["dropped"] == 46 and stats["dropped_bytes"] == 46 * len(big)
    logger.stop()  # writes what was queued
    assert logger.stats()["logged"] == 4 and logger.stats()["queued_bytes"] == 0
    assert len(_lines(tmp_path / "pool")) == 4


@pytest.mark.timeout(30)
def test_an_entry_the_writer_is_still_writing_counts_as_queued(tmp_path):
    # A write that compacts the index takes a while; the writer has popped the entry by then. A
    # caller waiting for "nothing queued" before reading the counts (the load bench) must not see
    # 0 queued while the entry is neither logged nor failed.
    class SlowStore(PoolStore):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.writing, self.release = threading.Event(), threading.Event()

        def add(self, entry):
            self.writing.set()
            assert self.release.wait(10)
            return super().add(entry)

    store = SlowStore(tmp_path / "pool")
    logger = PoolLogger(store, interval=0.01)
    logger.start()
    try:
        assert logger.submit(_entry(_png(1)))
        assert store.writing.wait(10)  # popped from the buffer, inside the store's add
        during = logger.stats()
        store.release.set()
        logger.drain()
        after = logger.stats()
    finally:
        store.release.set()
        logger.stop()
    assert (during["queued"], during["logged"]) == (1, 0)
    assert (after["queued"], after["logged"]) == (0, 1)


@pytest.mark.timeout(30)
def test_a_line_cut_short_by_a_crash_does_not_swallow_the_next_one(tmp_path):
    pool = tmp_path / "pool"
    store = PoolStore(pool)
    store.add(_entry(_png(1)))
    store.close()
    with (pool / "index.jsonl").open("ab") as index:
        index.write(b'{"timestamp": "2026-01-01T00:00:00+00:00", "sha2')  # the app was killed mid-line

    reopened = PoolStore(pool)
    reopened.add(_entry(_png(2)))
    reopened.add(_entry(_png(3)))
    reopened.close()

    found = pool_images(pool)  # a corrupt line in the middle would make this refuse the whole pool
    assert [img.sha256 for img in found] == [_sha(_png(i)) for i in (1, 2, 3)]
