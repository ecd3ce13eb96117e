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

The pool is bounded, index included. Its index is a window of the most recent requests: past
`max_files` images, or past `max_bytes` of image bytes plus index bytes, the oldest index lines
are dropped (the index is rewritten atomically) and an image left without a line is deleted, so an
image goes when it was last seen longest ago (least recently used), and an image sent a million
times costs a million lines only until the byte bound compacts the old ones away. A reader never
finds a line whose file is gone for good. One writer per pool folder: the app's, on its own thread.

Images sent to labelers are never evicted: a Label Studio task points at the file, and the ingest
reads it from there. Active learning records them in `<pool>/.al_state.json` (`human`, and
`badcases`; see `tasks.labeling.pool`); their bytes do not count against the bounds (how many
there are is set by what labelers are sent), and each keeps its newest index line. While an
active-learning run holds the pool's lock it is about to send some images, so eviction waits for
the next write after the lock is free.

Requests never wait for the disk: `PoolLogger.submit` appends the entry to a buffer bounded by
entries and by bytes, and a background thread writes it; when the buffer is full the entry is
dropped and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import deque
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
SHA_FIELD = b'"sha256": "'  # how json.dumps writes the field (see _line_sha)
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
        max_bytes: most bytes kept: image bytes plus the index's own.
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
        self._images: dict[str, tuple[str, int]] = {}  # sha -> (rel path, bytes)
        self.image_bytes = 0
        self.index_bytes = 0
        self.evicted = 0
        self.compacted_lines = 0  # index lines dropped by compactions, over the store's life
        # Images open Label Studio tasks point at, re-read when the state file changes (see _refresh_pins).
        self._state_path = self.root / AL_STATE_NAME
        self._pins: set[str] = set()
        self._pins_stamp: tuple[int, int] | None = None
        self._pinned_files = 0
        self._pinned_bytes = 0
        self._lock = FileLock(self.root / AL_LOCK_NAME)
        self._adopt()
        # Binary: the byte bound counts what is written, and lines split on b"\n" only.
        self._index = self.index_path.open("ab")
        if self._over():
            self._evict()

    @property
    def files(self) -> int:
        return len(self._images)

    @property
    def bytes(self) -> int:
        """Bytes the pool holds: its images and its index."""
        return self.image_bytes + self.index_bytes

    def _adopt(self) -> None:
        """Take over an existing pool: the images its index names (lines whose file is gone are skipped).

        Image files half written when the last app died (`*.tmp`) are deleted: nothing names them.
        """
        for stray in self.root.glob("??/*.tmp"):
            stray.unlink(missing_ok=True)
        if not self.index_path.is_file():
            return
        raw = b""
        with self.index_path.open("rb") as index:  # streamed: an index can be as large as max_bytes
            for raw in index:
                self.index_bytes += len(raw)
                sha, rel = _line_image(raw)
                if sha is None or sha in self._images:
                    continue
                try:
                    size = (self.root / rel).stat().st_size
                except OSError:
                    continue  # its file is gone: the next compaction drops the line
                self._images[sha] = (rel, size)
                self.image_bytes += size
        if raw and not raw.endswith(b"\n"):
            # The last line has no end (the app killed mid-write): left so, the next line would be
            # glued to it and active learning would refuse the pool for a corrupt line.
            if _line_image(raw)[0] is not None:  # whole but for its newline: end it
                with self.index_path.open("ab") as index:
                    index.write(b"\n")
                self.index_bytes += 1
            else:  # cut short: it can never be read
                log.warning("online pool: %s ends in a line cut short (%d bytes); dropping it",
                            self.index_path, len(raw))
                os.truncate(self.index_path, self.index_bytes - len(raw))
                self.index_bytes -= len(raw)

    def add(self, entry: PoolEntry) -> str:
        """Store the image (once per content) and append its index line; evict past the bounds.

        Returns:
            The image's path relative to the pool.
        """
        sha = hashlib.sha256(entry.data).hexdigest()
        known = self._images.get(sha)
        if known is not None:
            rel = known[0]  # seen again: its new line makes it the newest
        else:
            rel = f"{sha[:2]}/{sha}.{EXTENSIONS.get(entry.image_format, 'img')}"
            path = self.root / rel
            if not path.exists():
                path.parent.mkdir(exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                try:
                    tmp.write_bytes(entry.data)
                    tmp.replace(path)  # readers of the pool never see half a file
                except BaseException:
                    tmp.unlink(missing_ok=True)  # a write cut short (a full disk) leaves nothing behind
                    raise
            self._images[sha] = (rel, len(entry.data))
            self.image_bytes += len(entry.data)
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
        raw = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
        self._index.write(raw)
        self.index_bytes += len(raw)
        if self._over():
            try:
                self._evict()
            except OSError as exc:  # the request is logged; the next write tries to evict again
                log.warning("online pool: could not evict (%s); over its bound until a write can", exc)
        return rel

    def flush(self) -> None:
        self._index.flush()

    def close(self) -> None:
        self._index.close()

    def _held(self) -> tuple[int, int]:
        """(files, bytes) counted against the bounds: what labelers need is not."""
        return len(self._images) - self._pinned_files, self.image_bytes - self._pinned_bytes + self.index_bytes

    def _over(self) -> bool:
        self._refresh_pins()
        files, held = self._held()
        return files > self.max_files or held > self.max_bytes

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
        """Drop the oldest index lines down to the low-water marks; delete the images left without one."""
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return  # active learning is choosing images to send: evict after it has recorded them
        except OSError as exc:  # no room for the lock file: a full disk needs the eviction most
            log.warning("online pool: could not take %s (%s); evicting without it", self._lock.lock_file, exc)
            self._refresh_pins()
            self._compact()
            return
        try:
            self._refresh_pins()  # it may have recorded some just before releasing the lock
            self._compact()
        finally:
            self._lock.release()

    def _compact(self) -> None:
        """Drop the oldest index lines until the pool is under the low-water marks; delete the images
        left without a line.

        Which line is an image's newest is read from the index itself, not kept beside it: a write
        cut short (a full disk) leaves a line that is not what was counted, and positions kept in
        memory would then name the wrong lines. The new index replaces the old one before any image
        is deleted, so a reader sees the old index or the new one, never a line whose file was
        deleted under it. On a full disk the new index may not fit: then the images go first, to
        make room, and the index is written again.
        """
        self._index.close()  # flushed: the walk reads the lines just added too
        try:
            newest, unreadable = self._scan_index()
            cut, gone = self._plan_cut(newest, unreadable)
            try:
                kept_bytes, dropped = self._write_index(cut, gone, newest, unreadable)
            except OSError as exc:
                if not gone:
                    raise  # nothing to free: the old index stands (the write is retried at the next add)
                log.warning("online pool: no room for the compacted index (%s); deleting %d old images first",
                            exc, len(gone))
                self._forget(gone)
                gone = set()
                kept_bytes, dropped = self._write_index(cut, gone, newest, unreadable)
        finally:
            self._index = self.index_path.open("ab")
        self.index_bytes = kept_bytes
        self.compacted_lines += dropped
        self._forget(gone)

    def _scan_index(self) -> tuple[dict[str, int], set[int]]:
        """The position of each image's newest line, and of every line that cannot be read (or
        names an image this store does not hold): one pass, each line parsed."""
        newest: dict[str, int] = {}
        unreadable: set[int] = set()
        with self.index_path.open("rb") as src:
            for pos, raw in enumerate(src):
                sha, _ = _line_image(raw) if raw.endswith(b"\n") else (None, None)
                if sha is None or sha not in self._images:
                    unreadable.add(pos)
                else:
                    newest[sha] = pos
        return newest, unreadable

    def _plan_cut(self, newest: dict[str, int], unreadable: set[int]) -> tuple[int, set[str]]:
        """Where the kept lines start, and which images go: those whose newest line is before it.

        Walks the index oldest line first, dropping lines while over the marks; an image sent to
        labelers keeps its newest line. An image with no line at all goes first: active learning
        cannot see it.
        """
        gone = {sha for sha in self._images if sha not in newest and sha not in self._pins}
        files, held = self._held()
        files -= len(gone)
        held -= sum(self._images[sha][1] for sha in gone)
        pos = 0
        with self.index_path.open("rb") as src:
            for pos, raw in enumerate(src):  # noqa: B007 - pos is the answer
                if files <= self._low_files and held <= self._low_bytes:
                    return pos, gone
                held -= len(raw)
                if pos in unreadable:
                    continue
                sha = _line_sha(raw)
                if newest.get(sha) == pos and sha not in self._pins:
                    gone.add(sha)
                    files -= 1
                    held -= self._images[sha][1]
            return pos + 1, gone

    def _write_index(self, cut: int, gone: set[str], newest: dict[str, int], unreadable: set[int]) -> int:
        """Write the index without the lines before `cut` (but pinned images' newest), unreadable
        lines and lines of images gone; swap it in. Returns (its size, lines dropped)."""
        kept_bytes = dropped = 0
        tmp = self.index_path.with_name(INDEX_NAME + ".tmp")
        try:
            with self.index_path.open("rb") as src, tmp.open("wb") as dst:
                for pos, raw in enumerate(src):
                    sha = None if pos in unreadable else _line_sha(raw)
                    if sha is None or sha in gone or (pos < cut and not (newest[sha] == pos and sha in self._pins)):
                        dropped += 1
                        continue
                    dst.write(raw)
                    kept_bytes += len(raw)
            os.replace(tmp, self.index_path)  # readers see the old index or the new one, never half
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        return kept_bytes, dropped

    def _forget(self, gone: set[str]) -> None:
        for sha in gone:
            rel, size = self._images.pop(sha)
            (self.root / rel).unlink(missing_ok=True)
            self.image_bytes -= size
            if sha in self._pins:  # only an image whose file vanished: keep the counts true
                self._pinned_files -= 1
                self._pinned_bytes -= size
        self.evicted += len(gone)

    def stats(self) -> dict[str, int]:
        return {"files": self.files, "bytes": self.bytes, "index_bytes": self.index_bytes,
                "evicted": self.evicted, "compacted_lines": self.compacted_lines, "pinned": self._pinned_files,
                "max_files": self.max_files, "max_bytes": self.max_bytes}


def _line_image(raw: bytes) -> tuple[str | None, str | None]:
    """(sha256, path) of an index line; (None, None) when it cannot be read."""
    try:
        entry = json.loads(raw)
        sha, rel = entry["sha256"], entry["path"]
    except (ValueError, KeyError, TypeError):
        return None, None
    if not isinstance(sha, str) or not isinstance(rel, str):
        return None, None
    return sha, rel


def _line_sha(raw: bytes) -> str | None:
    """The sha256 of an index line already read whole by `_line_image`, found where json.dumps puts
    it: the second and third walks of a compaction need not parse every line again."""
    at = raw.find(SHA_FIELD)
    if at >= 0:
        start = at + len(SHA_FIELD)
        if raw[start + 64:start + 65] == b'"':
            return raw[start:start + 64].decode("ascii", "replace")
    return _line_image(raw)[0]


class PoolLogger:
    """A `PoolStore` fed by one background thread that wakes every `interval` seconds.

    `submit` only appends to a deque (atomic under the GIL, well under a microsecond): no lock and
    no thread wake-up per request, which a queue.Queue hand-off would cost on every request. The
    writer takes whatever has piled up, writes it and flushes the index once per round.

    The buffer is bounded by bytes as well as by entries: 4096 entries of 4 MB images would be
    16 GB. The bytes waiting are two counters each written by one thread only (`submit`'s, the
    event loop, adds; the writer's subtracts by adding to its own), so no update is lost without
    a lock; a stale read errs towards dropping.

    Args:
        store: the pool.
        max_pending: entries waiting at most; more are dropped (and counted), never waited for.
        max_pending_bytes: image bytes waiting at most; an entry that would pass it is dropped (and
            counted) the same way.
        interval: seconds between two writing rounds.
    """

    def __init__(self, store: PoolStore, max_pending: int = 4096, max_pending_bytes: int = 64 * 2**20,
                 interval: float = 0.1):
        if max_pending < 1 or max_pending_bytes < 1:
            raise SaofuError(f"pool queue bounds must be positive, got max_pending={max_pending}, "
                             f"max_pending_bytes={max_pending_bytes}")
        self.store = store
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.interval = interval
        self._pending: deque[PoolEntry] = deque()
        self._submitted = 0  # written by submit only
        self._bytes_in = 0  # written by submit only
        self._bytes_out = 0  # written by the writer only
        self.logged = 0
        self.dropped = 0  # entries dropped because the queue was full (by entries or by bytes)
        self.dropped_bytes = 0
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
        """Queue `entry` for writing; False (and counted) when too many entries or bytes are waiting."""
        size = len(entry.data)
        if (len(self._pending) >= self.max_pending
                or self._bytes_in - self._bytes_out + size > self.max_pending_bytes):
            self.dropped += 1
            self.dropped_bytes += size
            return False
        self._bytes_in += size
        self._submitted += 1
        self._pending.append(entry)
        return True

    @property
    def queued(self) -> int:
        """Entries submitted and not yet written, the one the writer holds included.

        Not `len(self._pending)`: the writer pops an entry before writing it, and a write that
        compacts the index takes a while, so a caller waiting for "nothing queued" would read the
        counts one entry short (the load bench did, now and then). Each counter only grows, so a
        read racing the writer errs towards more queued.
        """
        return max(0, self._submitted - self.logged - self.failed)

    @property
    def queued_bytes(self) -> int:
        return self._bytes_in - self._bytes_out

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
        return {**self.store.stats(), "logged": self.logged, "dropped": self.dropped,
                "dropped_bytes": self.dropped_bytes, "failed": self.failed, "queued": self.queued,
                "queued_bytes": self.queued_bytes, "max_pending": self.max_pending,
                "max_pending_bytes": self.max_pending_bytes}

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
            finally:
                self._bytes_out += len(entry.data)
        if wrote:
            try:
                self.store.flush()
            except (OSError, ValueError) as exc:
                log.warning("online pool: could not flush the index: %s", exc)
