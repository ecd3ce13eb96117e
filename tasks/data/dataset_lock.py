"""One lock per dataset folder for every writer, and the repair of a swap a crash cut in half.

Three kinds of run write a labelled dataset: the ingest (a staged copy swapped in with two
renames), active learning (auto-labels added in place) and the fast retrain (its labelled copy,
then the ingest's path). Without a lock two ingests share one staging folder, and an ingest that
swaps in the copy it staged before active learning wrote drops those auto-labels while the pool's
state says they are done. Every writer therefore holds `dataset_lock` for its whole
read-modify-write (for the ingest: cursor, staged copy, validation, swap, cursor, data version).

The lock is an OS file lock (`filelock`) on `<parent>/.<name>.lock`, beside the dataset rather
than in it: the swap renames the dataset folder, and a file inside it would change the data
version's fingerprint. The OS releases it when its holder exits or dies. Within one thread it is
re-entrant, so a flow that holds it can call a step (`flows.ingest.add_validated`) that takes it.

The swap (`tasks.labeling.ingest.commit_staged`) is `dataset -> .<name>.previous`, then
`.<name>.staging -> dataset`, then `.previous` is deleted. Whoever takes the lock next repairs
what a crash left (`recover_interrupted_swap`): no dataset but a `.previous` means the crash fell
between the renames, and `.previous` (the last dataset that was committed, with its ingest
cursor) is put back; a `.previous` beside a dataset is the old copy of a finished swap and goes,
as does any staging folder (its batch was never committed, so its cursor never moved and the
next ingest fetches the same annotations again).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from saofu.errors import SaofuError

LOCK_WAIT_S = 600.0  # a scheduled run waits this long for a running writer (an ingest validates and versions)

_held = threading.local()  # lock file -> depth, for this thread's re-entrant holds


def lock_path(dataset_dir: str | Path) -> Path:
    """The lock file of a dataset: `<parent>/.<name>.lock` of its resolved path."""
    target = Path(dataset_dir).resolve()
    return target.with_name(f".{target.name}.lock")


def staging_dir(dataset_dir: str | Path) -> Path:
    """The working copy a swap puts in place of the dataset."""
    target = Path(dataset_dir)
    return target.with_name(f".{target.name}.staging")


def previous_dir(dataset_dir: str | Path) -> Path:
    """Where the dataset waits during a swap, between its two renames."""
    target = Path(dataset_dir)
    return target.with_name(f".{target.name}.previous")


def _depths() -> dict[str, int]:
    if not hasattr(_held, "depths"):
        _held.depths = {}
    return _held.depths


def holds_dataset_lock(dataset_dir: str | Path) -> bool:
    """True when this thread holds the dataset's lock."""
    return _depths().get(str(lock_path(dataset_dir)), 0) > 0


def require_dataset_lock(dataset_dir: str | Path, what: str) -> None:
    """Refuse a dataset write made without the lock (a programming error, not a user's)."""
    if not holds_dataset_lock(dataset_dir):
        raise RuntimeError(f"{what} of {dataset_dir} needs `dataset_lock` held (tasks/data/dataset_lock.py): "
                           "without it two writers share one staging folder")


@contextmanager
def dataset_lock(dataset_dir: str | Path, wait_s: float | None = None) -> Iterator[Path]:
    """Hold the dataset's lock; on first taking it, repair a swap a crash left half done.

    Args:
        dataset_dir: the dataset folder (it need not exist yet).
        wait_s: seconds to wait for another holder (default `LOCK_WAIT_S`).

    Yields:
        The lock file.

    Raises:
        SaofuError: another run still held the lock after `wait_s` seconds.
    """
    path = lock_path(dataset_dir)
    key = str(path)
    depths = _depths()
    if depths.get(key, 0):
        depths[key] += 1  # this thread holds it already: re-entrant
        try:
            yield path
        finally:
            depths[key] -= 1
        return
    wait_s = LOCK_WAIT_S if wait_s is None else wait_s
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=wait_s)
    except Timeout:
        raise SaofuError(f"dataset {dataset_dir} is locked: another run (an ingest, active learning or a fast "
                         f"retrain) is writing it and still held {path} after {wait_s:g} s; try again when it "
                         "has finished") from None
    depths[key] = 1
    try:
        recovered = recover_interrupted_swap(dataset_dir)
        if recovered:
            print(f"dataset {dataset_dir}: {recovered}", flush=True)
        yield path
    finally:
        depths.pop(key, None)
        lock.release()


def recover_interrupted_swap(dataset_dir: str | Path) -> str:
    """Put back what a crash during a swap or a staging left; call with the lock held.

    Returns:
        What was repaired, in words ("" when nothing was left over).
    """
    target, old, staging = Path(dataset_dir), previous_dir(dataset_dir), staging_dir(dataset_dir)
    done = []
    if old.exists() and not target.exists():
        # the crash fell between the two renames: `.previous` is the only full copy, and it is the
        # last committed dataset (the staged one's cursor never reached a committed dataset)
        old.rename(target)
        fsync_dir(target.parent)
        done.append(f"restored from {old.name} (a swap was interrupted between its renames)")
    if old.exists():
        shutil.rmtree(old)  # the old copy of a swap that finished: the dataset is the new one
        done.append(f"removed {old.name} left by a finished swap")
    if staging.exists():
        shutil.rmtree(staging)  # a working copy never committed; its annotations are fetched again
        done.append(f"discarded the uncommitted {staging.name}")
    return "; ".join(done)


def repair_if_interrupted(dataset_dir: str | Path) -> bool:
    """Put back a dataset a crash left only as `.previous`; True when it is there now.

    For code that looks for a dataset before any writer has taken its lock (the scheduled flows'
    `tasks.data.project_dataset`): without this the dataset would look absent, and nothing would
    take its lock to repair it. Touches nothing (no lock file) unless `.previous` is there alone.
    """
    target = Path(dataset_dir)
    if target.exists() or not previous_dir(target).exists():
        return target.exists()
    with dataset_lock(target):  # taking it repairs (or waits for the swap in progress to finish)
        pass
    return target.exists()


def fsync_dir(folder: Path) -> None:
    """Make renames in `folder` durable (a crash after this cannot undo them)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # no directory handles on this platform (Windows): renames there are durable enough
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
