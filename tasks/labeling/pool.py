"""The online pool as active learning sees it: its new images, and which ones were handled.

New requests are appended to `index.jsonl` (by `tasks.data.stream.write_scans` and the serving
app), and the serving app drops its oldest lines and images past its bounds, so which images
active learning already handled is kept beside it in `pool_dir/.al_state.json`:

    {"format": 1, "auto": [sha256, ...], "human": [sha256, ...], "badcases": [sha256, ...]}

One run at a time holds the pool's lock (`pool_lock`) while it reads and writes that file.
The serving app's pool store (`deploy.pool_log.PoolStore`) reads it too: it never evicts an image
in `human` or `badcases` (a Label Studio task points at it), and does not evict while the lock is
held, since the run holding it may be sending images it has not recorded yet.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from saofu.errors import SaofuError
from tasks.data.stream import INDEX_NAME

STATE_NAME = ".al_state.json"
STATE_FORMAT = 1
LOCK_NAME = ".al_state.lock"
LOCK_WAIT_S = 600.0  # a scheduled run waits this long for a running one to finish


@dataclass
class PoolImage:
    """A pool image awaiting a label. The simulator's `truth` is deliberately not carried."""

    sha256: str
    path: Path
    timestamp: datetime
    phase: str = ""


@dataclass
class PoolState:
    """The sha256s already handled by active learning (see the module docstring)."""

    auto: set[str] = field(default_factory=set)
    human: set[str] = field(default_factory=set)
    badcases: set[str] = field(default_factory=set)

    @property
    def processed(self) -> set[str]:
        return self.auto | self.human


def state_path(pool_dir: str | Path) -> Path:
    return Path(pool_dir) / STATE_NAME


def load_state(pool_dir: str | Path) -> PoolState:
    """The pool's active-learning state (empty when none was written yet)."""
    path = state_path(pool_dir)
    if not path.exists():
        return PoolState()
    try:
        raw = json.loads(path.read_text())
        return PoolState(set(raw.get("auto", [])), set(raw.get("human", [])), set(raw.get("badcases", [])))
    except (json.JSONDecodeError, AttributeError, TypeError) as exc:
        raise SaofuError(
            f"unreadable active-learning state {path}: {exc}. Delete it to reprocess the whole pool."
        ) from None


def save_state(pool_dir: str | Path, state: PoolState) -> Path:
    """Write the state atomically: a killed run leaves the old file or the new one, never half."""
    path = state_path(pool_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "format": STATE_FORMAT,
        "updated_at": datetime.now(UTC).isoformat(),
        "auto": sorted(state.auto),
        "human": sorted(state.human),
        "badcases": sorted(state.badcases),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=0))
    os.replace(tmp, path)
    return path


@contextmanager
def pool_lock(pool_dir: str | Path, wait_s: float | None = None) -> Iterator[None]:
    """Hold the pool's active-learning lock: one run at a time reads and writes its state file.

    Two runs on one pool (a scheduled one and a click in the UI) would otherwise both read the
    same state, both send the same images to labelers, and the last writer would drop the other's
    record. The lock is an OS file lock (`filelock`), released when its holder exits or dies.

    Raises:
        SaofuError: another run still holds it after `wait_s` seconds (default `LOCK_WAIT_S`).
    """
    wait_s = LOCK_WAIT_S if wait_s is None else wait_s
    path = Path(pool_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=wait_s)
    except Timeout:
        raise SaofuError(f"another active-learning run holds {path} (waited {wait_s:g} s); "
                         "try again when it has finished") from None
    try:
        yield
    finally:
        lock.release()


def _utc(when: datetime | str) -> datetime:
    """Timestamps compare in UTC; naive ones (the stream simulator's) are taken as UTC."""
    if isinstance(when, str):
        when = datetime.fromisoformat(when.replace("Z", "+00:00"))
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _index_lines(index: Path) -> Iterable[dict[str, Any]]:
    lines = index.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                return  # the stream is appending this very line; the next run will see it whole
            raise SaofuError(f"corrupt line {number} in the pool index {index}") from None


def pool_images(
    pool_dir: str | Path, since: datetime | str | None = None, state: PoolState | None = None
) -> list[PoolImage]:
    """The pool's images that active learning has not handled yet, oldest first.

    Reads `pool_dir/index.jsonl` (written by `tasks.data.stream.write_scans` or the serving app) and
    leaves out images recorded in the state file. The index's `truth` field, which only the
    simulator knows, is never read.

    Args:
        pool_dir: the online pool's folder.
        since: only images that arrived strictly after this time (naive times are UTC).
        state: the state to filter by; default the pool's own state file.

    Returns:
        One PoolImage per new image (an image logged twice appears once).
    """
    pool = Path(pool_dir)
    index = pool / INDEX_NAME
    if not index.is_file():
        raise SaofuError(f"no online pool index at {index}: is {pool} the pool folder?")
    done = (state or load_state(pool)).processed
    since_t = _utc(since) if since is not None else None
    seen: set[str] = set()
    images: list[PoolImage] = []
    for entry in _index_lines(index):
        sha = entry["sha256"]
        if sha in done or sha in seen:
            continue
        stamp = _utc(entry["timestamp"])
        if since_t is not None and stamp <= since_t:
            continue
        seen.add(sha)
        images.append(PoolImage(sha, (pool / entry["path"]).resolve(), stamp, entry.get("phase", "")))
    return images
