"""Walking a dataset folder fast: every file with its stat, in one `os.scandir` pass.

A data version walks its dataset four times (`tasks.data.versions`: the fingerprint, both sides of
the registry copy's sync, the copy's fingerprint). On the fast retrain bench's 17,002-file world
(2 busy cores) `Path.rglob` took 0.2 s per walk and this 0.04 s; a fingerprint from cached digests
0.32 s and 0.13 s.
"""

from __future__ import annotations

import os
from pathlib import Path


def walk_files(root: Path) -> dict[str, os.stat_result]:
    """Every file under `root` as `Path.rglob("*")` + `is_file()` find them, relative POSIX path -> stat.

    One `os.scandir` pass: its entries know their type without a stat each. As rglob: hidden files
    included, links to files followed, links to folders not descended into.
    """
    found: dict[str, os.stat_result] = {}
    if not root.is_dir():
        return found
    stack = [("", os.fspath(root))]
    while stack:
        prefix, folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((f"{prefix}{entry.name}/", entry.path))
                elif entry.is_file():
                    found[f"{prefix}{entry.name}"] = entry.stat()
    return found


def path_order(rel: str) -> tuple[str, ...]:
    """Sort key of a relative POSIX path as `Path` objects sort (part by part, so `a/b` < `a-b/c`):
    the order fingerprints were first recorded in."""
    return tuple(rel.split("/"))
