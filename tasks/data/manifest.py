"""The dataset manifest: one row per image of an ImageFolder dataset, whoever labelled it.

A dataset folder holds the ImageFolder tree (`<split>/<label>/<file>`) and `manifest.csv`. The
generator writes rows with source `generated`; the ingest flow adds `human` rows (annotator,
Label Studio task id, time); active learning adds `auto` rows (both model versions and scores).
Validation (Great Expectations) and data versions (DVC) work on this file and the tree beside it.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
from collections.abc import Iterable
from pathlib import Path

from saofu.errors import SaofuError

MANIFEST_NAME = "manifest.csv"
# The generator's own columns (font_group, style, char) come after these; readers keep every
# column they find, writers fill missing ones with "".
BASE_COLUMNS = ("path", "label", "split", "source", "sha256")
SOURCES = ("generated", "human", "auto")
SPLITS = ("train", "val", "test")  # the ImageFolder splits (tasks.data.loading.SPLITS, which loads torch)


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_manifest(dataset_dir: str | Path) -> list[dict[str, str]]:
    """All rows of `dataset_dir/manifest.csv` ([] when the dataset has none yet)."""
    path = Path(dataset_dir) / MANIFEST_NAME
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def write_manifest(dataset_dir: str | Path, rows: Iterable[dict]) -> Path:
    """Rewrite the manifest atomically with the union of all rows' columns, base columns first."""
    rows = list(rows)
    columns = list(BASE_COLUMNS)
    for row in rows:
        columns += [c for c in row if c not in columns]
    path = Path(dataset_dir) / MANIFEST_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def split_for(sha256: str, val_share: float = 0.15) -> str:
    """A new image's split, fixed by its content: the same image always lands in the same split."""
    return "val" if int(sha256[:8], 16) / 0xFFFFFFFF < val_share else "train"


def plain_name(value: object) -> bool:
    """True for a name that is one path component of its own: not empty, `.`, `..`, and no separator.

    Splits and labels become folder names (`<split>/<label>/<file>`); anything else could climb out
    of the dataset or land in another class's folder.
    """
    return (
        isinstance(value, str) and value not in ("", ".", "..")
        and not any(c in value for c in ("/", "\\", "\0"))
    )


def add_images(dataset_dir: str | Path, new_rows: list[dict]) -> list[dict]:
    """Copy labelled images into the ImageFolder tree and append their manifest rows.

    Each row needs `image` (source file), `label`, `source` and may carry `split` and
    label columns (annotator, task_id, labeled_at, model_versions, scores,
    badcase). Images already in the manifest (same sha256) are skipped, so adding the same
    batch twice adds nothing. Every row is checked before the first file is copied.

    Returns:
        The rows actually added.

    Raises:
        SaofuError: a row has an unknown source, a missing image, or a split or label that is
            not a plain folder name or would put the image outside `dataset_dir` (nothing is
            copied then).
    """
    root = Path(dataset_dir)
    rows = read_manifest(root)
    known = {r["sha256"] for r in rows}
    planned: list[tuple[dict, Path, str, str, Path]] = []  # row, source file, sha256, split, relative path
    for new in new_rows:
        if new.get("source") not in SOURCES:
            raise SaofuError(f"manifest source must be one of {SOURCES}, got {new.get('source')!r}")
        src = Path(new["image"])
        if not src.is_file():
            raise SaofuError(f"image not found: {src}")
        digest = file_sha256(src)
        if digest in known:
            continue
        split = new.get("split") or split_for(digest)
        label = new.get("label")
        for what, name in (("split", split), ("label", label)):
            if not plain_name(name):
                raise SaofuError(f"{what} {name!r} of {src} is not a plain folder name: nothing was added to {root}")
        rel = Path(split) / label / f"{digest}{src.suffix.lower() or '.png'}"
        _inside(root, rel, src)
        planned.append((new, src, digest, split, rel))
        known.add(digest)
    added = []
    for new, src, digest, split, rel in planned:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, root / rel)
        row = {k: v for k, v in new.items() if k != "image"}
        row.update(path=rel.as_posix(), split=split, sha256=digest)
        rows.append(row)
        added.append(row)
    if added:
        write_manifest(root, rows)
    return added


def _inside(root: Path, rel: Path, src: Path) -> None:
    """Refuse a destination that resolves outside the dataset (e.g. a class folder that is a symlink)."""
    base = root.resolve()
    if not (base / rel).resolve().is_relative_to(base):
        raise SaofuError(f"{src} would be copied to {(base / rel).resolve()}, outside the dataset {base}; "
                         "nothing was added")
