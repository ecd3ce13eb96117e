"""The online pool keeps the images Label Studio tasks point at (issue 15, hole 4).

Before: the serving app's pool evicted the oldest images whatever labelers were sent, and the next
ingest failed for the whole batch on the first missing image, so the cursor never moved. Now: an
image in active learning's `human`/`badcases` state is never evicted, nothing is evicted while an
active-learning run holds the pool's lock, and one missing image skips only its own task.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image

import deploy.pool_log as pool_log
from deploy.pool_log import PoolEntry, PoolStore
from tasks.data.manifest import add_images
from tasks.labeling import pool as al_pool
from tasks.labeling.ingest import to_manifest_rows
from tasks.labeling.pool import PoolState, pool_images, pool_lock, save_state


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i * 30 % 256, i * 7 % 256, 99)).save(buf, "PNG")
    return buf.getvalue()


def _entry(data: bytes) -> PoolEntry:
    return PoolEntry(data, "PNG", {"class": "fu", "score": 0.5, "model_version": "m:1"}, time.time(), {})


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _record(task_id: int, image: Path) -> dict:
    ann = {"id": task_id, "annotator": "ann", "label": "fu", "was_cancelled": False,
           "updated_at": datetime(2026, 11, 25, tzinfo=UTC), "created_at": datetime(2026, 11, 25, tzinfo=UTC)}
    return {"task_id": task_id, "image": str(image), "data": {"path": str(image)}, "annotations": [ann],
            "badcase": False}


@pytest.mark.timeout(60)
def test_the_pool_store_reads_the_state_file_that_active_learning_writes():
    assert (pool_log.AL_STATE_NAME, pool_log.AL_LOCK_NAME) == (al_pool.STATE_NAME, al_pool.LOCK_NAME)
    assert pool_log.INDEX_NAME == al_pool.INDEX_NAME


@pytest.mark.timeout(60)
def test_images_sent_to_labelers_are_never_evicted(tmp_path):
    pool = tmp_path / "pool"
    images = [_png(i) for i in range(8)]
    store = PoolStore(pool, max_files=3)
    for data in images[:3]:
        store.add(_entry(data))
    # active learning sent the two oldest images to Label Studio (one as a badcase)
    save_state(pool, PoolState(human={_sha(images[0])}, badcases={_sha(images[1])}))
    for data in images[3:]:
        store.add(_entry(data))
    store.close()

    kept = {p.stem for p in pool.rglob("*.png")}
    assert {_sha(images[0]), _sha(images[1])} <= kept  # the tasks' images are still there
    assert len(kept - {_sha(images[0]), _sha(images[1])}) <= 3  # the others stay within the bound
    assert _sha(images[-1]) in kept and store.evicted >= 3
    index = {json.loads(line)["sha256"] for line in (pool / "index.jsonl").read_text().splitlines()}
    assert index == kept  # every kept image keeps its index line, and no line points at a deleted file

    reopened = PoolStore(pool, max_files=3)  # a restarted app adopts the pool and keeps the pins
    reopened.add(_entry(_png(50)))
    reopened.add(_entry(_png(51)))
    reopened.close()
    assert {_sha(images[0]), _sha(images[1])} <= {p.stem for p in pool.rglob("*.png")}


@pytest.mark.timeout(60)
def test_nothing_is_evicted_while_active_learning_holds_the_pool(tmp_path):
    pool = tmp_path / "pool"
    images = [_png(i) for i in range(6)]
    store = PoolStore(pool, max_files=2)
    for data in images[:2]:
        store.add(_entry(data))
    with pool_lock(pool, wait_s=5):
        # a run has read the pool and is sending images[0] to labelers; it records it before releasing
        store.add(_entry(images[2]))
        store.add(_entry(images[3]))
        assert {p.stem for p in pool.rglob("*.png")} == {_sha(d) for d in images[:4]}
        save_state(pool, PoolState(human={_sha(images[0])}))
    store.add(_entry(images[4]))  # the first write after the lock is free evicts, sparing the sent image
    store.close()
    kept = {p.stem for p in pool.rglob("*.png")}
    assert _sha(images[0]) in kept and _sha(images[4]) in kept and len(kept) <= 3
    assert [img.sha256 for img in pool_images(pool)] and all(img.path.is_file() for img in pool_images(pool))


@pytest.mark.timeout(60)
def test_one_missing_image_skips_its_task_not_the_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("SAOFU_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path / "home"))
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    pool = tmp_path / "home" / "data" / "online_pool"  # the default pool
    present = [pool / "ab" / f"{i}.png" for i in range(3)]
    for i, path in enumerate(present):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png(i))
    gone = pool / "cd" / "evicted.png"  # inside the pool, but no longer on disk
    records = [_record(1, present[0]), _record(2, gone), _record(3, present[1]), _record(4, present[2])]

    rows, report = to_manifest_rows(records)  # the flow's call: default roots

    assert [r["task_id"] for r in rows] == ["1", "3", "4"]
    (skipped,) = report.skipped
    assert skipped["task_id"] == 2 and "task 2" in skipped["reason"] and str(gone) in skipped["reason"]
    added = add_images(tmp_path / "ds", rows)
    assert sorted(r["task_id"] for r in added) == ["1", "3", "4"]
