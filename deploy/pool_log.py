"""Every served image and its prediction, written into the online pool that active learning reads.

The pool's format is `tasks.data.stream.write_scans`'s: images content-addressed at
`<pool>/<sha256[:2]>/<sha256>.<ext>` (an image sent twice is stored once) and one JSON line per
request appended to `<pool>/index.jsonl`:

    {"timestamp": "2025-01-28T09:14:03.120512+00:00", "sha256": "...", "path": "ab/ab....png",
     "phase": "serving", "source": "serving",
     "prediction": {"class": "fu", "top_class": "fu", "score": 0.97, "model_version": "fu-recognizer:3",
                    "arm": "champion"},
     "meta": {"bytes": 2345, "format": "PNG", "width": 64, "height": 64}}

There is no `truth`: only the simulator knows it.

The pool is bounded: past `max_files` images or `max_bytes`, the least recently seen images are
deleted and their lines dropped from the index (rewritten atomically), so a reader never finds a
line whose file is gone for good. One writer per pool folder: the app's, on its own thread.

Images sent to labelers are never evicted: a Label Studio task points at the file, and the ingest
reads it from there. Active learning records them in `<pool>/.al_state.json` (`human`, and
`badcases`; see `tasks.labeling.pool`); they do not count against the bounds (how many there are
is set by what labelers are sent). While an active-learning run holds the pool's lock it is about
to send some images, so eviction waits for the next write after the lock is free.

Requests never wait for the disk: `PoolLogger.submit` appends the entry to a bounded buffer and a
background thread writes it; when the buffer is full the entry is dropped and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from saofu.errors import SaofuError

log = logging.getLogger("saofu.serve")

INDEX_NAME = "index.jsonl"  # tasks.data.stream.INDEX_NAME (not imported: tasks.data.stream pulls in the renderer)
# tasks.labeling.pool.STATE_NAME and LOCK_NAME (not imported: that module imports tasks.data.stream)
AL_STATE_NAME = ".al_state.json"
AL_LOCK_NAME = ".al_state.lock"
PHASE = "serving"
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


@dataclass(frozen=True)
class PoolEntry:
    """One request to log: the image as sent, what was predicted, and when."""

    data: bytes
    image_format: str
    prediction: dict[str, Any]
    timestamp: float
    meta: dict[str, Any]


class PoolStore:
    """The pool folder, content-addressed and bounded (synchronous; see `PoolLogger`).

    Args:
        pool_dir: the online pool's folder (created if missing; an existing pool is adopted).
        max_files: most images kept.
        max_bytes: most image bytes kept.
    """

    def __init__(self, pool_dir: str | Path, max_files: int = 10_000, max_bytes: int = 256 * 2**20):
        if max_files < 1 or max_bytes < 1:
            raise SaofuError(f"pool bounds must be positive, got max_files={max_files}, max_bytes={max_bytes}")
        self.root = Path(pool_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.index_path = self.root / INDEX_NAME
        self.max_files = max_files
        self.max_bytes = max_bytes
        # Evict a tenth below the bound at once: the index is rewritten once per batch of evictions.
        self._low_files = max_files - max_files // 10
        self._low_bytes = max_bytes - max_bytes // 10
        self._images: OrderedDict[str, tuple[str, int]] = OrderedDict()  # sha -> (rel path, bytes), oldest first
        self.bytes = 0
        self.evicted = 0
        # Images open Label Studio tasks point at, re-read when the state file changes (see _refresh_pins).
        self._state_path = self.root / AL_STATE_NAME
        self._pins: set[str] = set()
        self._pins_stamp: tuple[int, int] | None = None
        self._pinned_files = 0
        self._pinned_bytes = 0
        self._lock = FileLock(self.root / AL_LOCK_NAME)
        self._adopt()
        self._index = self.index_path.open("a", encoding="utf-8")
        if self._over():
            self._evict()

    @property
    def files(self) -> int:
        return len(self._images)

    def _adopt(self) -> None:
        """Rebuild the age order from an existing index (lines whose file is gone are skipped)."""
        if not self.index_path.is_file():
            return
        for line in self.index_path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                sha, rel = entry["sha256"], entry["path"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
            if sha in self._images:
                self._images.move_to_end(sha)
                continue
            try:
                size = (self.root / rel).stat().st_size
            except OSError:
                continue
            self._images[sha] = (rel, size)
            self.bytes += size

    def add(self, entry: PoolEntry) -> str:
        """Store the image (once per content) and append its index line; evict past the bounds.

        Returns:
            The image's path relative to the pool.
        """
        sha = hashlib.sha256(entry.data).hexdigest()
        known = self._images.get(sha)
        if known is not None:
            rel = known[0]
            self._images.move_to_end(sha)  # seen again: the newest now
        else:
            rel = f"{sha[:2]}/{sha}.{EXTENSIONS.get(entry.image_format, 'img')}"
            path = self.root / rel
            if not path.exists():
                path.parent.mkdir(exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_bytes(entry.data)
                tmp.replace(path)  # readers of the pool never see half a file
            self._images[sha] = (rel, len(entry.data))
            self.bytes += len(entry.data)
            if sha in self._pins:
                self._pinned_files += 1
                self._pinned_bytes += len(entry.data)
        line = {
            "timestamp": datetime.fromtimestamp(entry.timestamp, UTC).isoformat(),
            "sha256": sha,
            "path": rel,
            "phase": PHASE,
            "source": "serving",
            "prediction": entry.prediction,
            "meta": entry.meta,
        }
        self._index.write(json.dumps(line, ensure_ascii=False) + "\n")
        if self._over():
            self._evict()
        return rel

    def flush(self) -> None:
        self._index.flush()

    def close(self) -> None:
        self._index.close()

    def _over(self) -> bool:
        self._refresh_pins()
        return (len(self._images) - self._pinned_files > self.max_files
                or self.bytes - self._pinned_bytes > self.max_bytes)

    def _refresh_pins(self) -> None:
        """Re-read which images were sent to labelers when active learning rewrote its state file.

        A stat per write; the file is read only when it changed. An unreadable file keeps the pins
        already known (better a pool over its bound than a task whose image is gone).
        """
        try:
            st = self._state_path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp == self._pins_stamp:
            return
        if stamp is None:
            pins: set[str] = set()
        else:
            try:
                raw = json.loads(self._state_path.read_text(encoding="utf-8"))
                pins = {str(s) for s in (*raw.get("human", []), *raw.get("badcases", []))}
            except (OSError, ValueError, AttributeError, TypeError) as exc:
                log.warning("online pool: unreadable %s (%s); keeping the images it named before",
                            self._state_path, exc)
                return
        self._pins_stamp = stamp
        self._pins = pins
        held = [self._images[sha][1] for sha in pins if sha in self._images]
        self._pinned_files, self._pinned_bytes = len(held), sum(held)

    def _evict(self) -> None:
        """Delete the oldest images no labeler needs down to the low-water mark; drop their index lines."""
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return  # active learning is choosing images to send: evict after it has recorded them
        except OSError as exc:  # no room for the lock file: a full disk needs the eviction most
            log.warning("online pool: could not take %s (%s); evicting without it", self._lock.lock_file, exc)
            self._refresh_pins()
            self._evict_unpinned()
            return
        try:
            self._refresh_pins()  # it may have recorded some just before releasing the lock
            self._evict_unpinned()
        finally:
            self._lock.release()

    def _evict_unpinned(self) -> None:
        gone: set[str] = set()
        files = len(self._images) - self._pinned_files
        for sha, (rel, size) in list(self._images.items()):  # oldest first
            if files <= self._low_files and self.bytes - self._pinned_bytes <= self._low_bytes:
                break
            if sha in self._pins:
                continue
            del self._images[sha]
            (self.root / rel).unlink(missing_ok=True)
            self.bytes -= size
            files -= 1
            gone.add(sha)
        if not gone:
            return
        self.evicted += len(gone)
        self._index.close()
        kept = []
        for line in self.index_path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("sha256") in gone:
                    continue
            except (json.JSONDecodeError, AttributeError):
                continue
            kept.append(line + "\n")
        tmp = self.index_path.with_name(INDEX_NAME + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.index_path)  # readers see the old index or the new one, never half
        self._index = self.index_path.open("a", encoding="utf-8")

    def stats(self) -> dict[str, int]:
        return {"files": self.files, "bytes": self.bytes, "evicted": self.evicted, "pinned": self._pinned_files,
                "max_files": self.max_files, "max_bytes": self.max_bytes}


class PoolLogger:
    """A `PoolStore` fed by one background thread that wakes every `interval` seconds.

    `submit` only appends to a deque (atomic under the GIL, well under a microsecond): no lock and
    no thread wake-up per request, which a queue.Queue hand-off would cost on every request. The
    writer takes whatever has piled up, writes it and flushes the index once per round.

    Args:
        store: the pool.
        max_pending: entries waiting at most; more are dropped (and counted), never waited for.
        interval: seconds between two writing rounds.
    """

    def __init__(self, store: PoolStore, max_pending: int = 4096, interval: float = 0.1):
        self.store = store
        self.max_pending = max_pending
        self.interval = interval
        self._pending: deque[PoolEntry] = deque()
        self.logged = 0
        self.dropped = 0
        self.failed = 0
        self._rounds = 0
        self._round_done = threading.Condition()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="saofu-pool-log", daemon=True)
            self._thread.start()

    def submit(self, entry: PoolEntry) -> bool:
        """Queue `entry` for writing; False (and counted) when too many are waiting."""
        if len(self._pending) >= self.max_pending:
            self.dropped += 1
            return False
        self._pending.append(entry)
        return True

    def drain(self, timeout: float = 10.0) -> None:
        """Wait until everything submitted so far is written and flushed (tests, shutdown)."""
        with self._round_done:
            target = self._rounds + 2  # the round under way may have started before our entries
            self._wake.set()
            self._round_done.wait_for(lambda: self._rounds >= target or self._thread is None, timeout)

    def stop(self) -> None:
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join(timeout=30)
            self._thread = None
        self._write_pending()  # whatever came after the last round (or when never started)
        self.store.close()

    def stats(self) -> dict[str, int]:
        return {**self.store.stats(), "logged": self.logged, "dropped": self.dropped, "failed": self.failed,
                "queued": len(self._pending)}

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            self._write_pending()
            with self._round_done:
                self._rounds += 1
                self._round_done.notify_all()
            if self._stopping:
                return

    def _write_pending(self) -> None:
        wrote = False
        while self._pending:
            entry = self._pending.popleft()
            try:
                self.store.add(entry)
                self.logged += 1
                wrote = True
            except Exception as exc:  # noqa: BLE001 - a full disk must not stop the app
                self.failed += 1
                log.warning("online pool: could not log a request: %s", exc)
        if wrote:
            try:
                self.store.flush()
            except (OSError, ValueError) as exc:
                log.warning("online pool: could not flush the index: %s", exc)
