"""The dataset manifest: one row per image of an ImageFolder dataset, whoever labelled it.

A dataset folder holds the ImageFolder tree (`<split>/<label>/<file>`) and `manifest.csv`. The
generator writes rows with source `generated`; the ingest flow adds `human` rows (annotator,
Label Studio task id, time); active learning adds `auto` rows (both model versions and scores). A
human label that comes again, changed, corrects its row (`relabel_images`) instead of being skipped.
Validation (Great Expectations) and data versions (DVC) work on this file and the tree beside it.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
from collections.abc import Iterable
from datetime import UTC, datetime
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


# Columns that describe who gave a row its label; a correction replaces them all (an auto row's
# model versions and scores no longer explain a label a human gave).
LABEL_COLUMNS = ("label", "source", "annotator", "task_id", "labeled_at", "badcase", "model_versions", "scores")
# Labels a human answer may correct: a model's, and an earlier human answer. A `generated` label is
# the generator's own truth (it drew that character) and stays.
CORRECTABLE_SOURCES = ("human", "auto")


def relabel_images(dataset_dir: str | Path, new_rows: list[dict]) -> list[dict]:
    """Give images already in the manifest the newer human label `new_rows` carry (a correction).

    `add_images` skips an image it already holds, so without this a label corrected in Label
    Studio (or in a folder of labels) would never reach the dataset. A `human` row whose image
    (same sha256) is in the manifest under another label replaces that row's label columns when
    the stored label is `auto`, or `human` and not newer than this one (a stale re-fetch never
    undoes a later correction); of several rows for one image the newest wins. The file moves to
    `<split>/<new label>/` (through a rename: a hard-linked staged copy's files are never
    modified); the split stays, so an image never crosses from test into train.

    Args:
        dataset_dir: the dataset folder.
        new_rows: rows as for `add_images` (`image`, `label`, `source`, label columns).

    Returns:
        The rows changed, as they are now, each with `previous_label`.

    Raises:
        SaofuError: a new label is not a plain folder name (nothing is changed then).
    """
    root = Path(dataset_dir)
    rows = read_manifest(root)
    index = {r["sha256"]: i for i, r in enumerate(rows)}
    newest: dict[int, dict] = {}  # manifest row index -> the newest human row for its image
    for new in new_rows:
        if new.get("source") != "human" or not Path(new["image"]).is_file():
            continue
        i = index.get(file_sha256(new["image"]))
        if i is None:
            continue
        if i not in newest or not _older(new.get("labeled_at"), newest[i].get("labeled_at")):
            newest[i] = new
    planned: list[tuple[int, dict, Path]] = []
    for i, new in sorted(newest.items()):
        old = rows[i]
        if new["label"] == old["label"] or old.get("source") not in CORRECTABLE_SOURCES:
            continue
        if old.get("source") == "human" and _older(new.get("labeled_at"), old.get("labeled_at")):
            continue
        if not plain_name(new["label"]):
            raise SaofuError(f"label {new['label']!r} of {new['image']} is not a plain folder name: nothing was "
                             f"relabelled in {root}")
        rel = Path(old["split"]) / new["label"] / Path(old["path"]).name
        _inside(root, rel, Path(new["image"]))
        planned.append((i, new, rel))
    changed = []
    for i, new, rel in planned:
        old = rows[i]
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if (root / old["path"]).is_file():
            (root / old["path"]).rename(root / rel)
        else:  # the stored file is gone (a damaged dataset): the new row's image has the same content
            shutil.copyfile(new["image"], root / rel)
        row = {**old, **{c: "" for c in LABEL_COLUMNS if c in old},
               **{k: v for k, v in new.items() if k not in ("image", "split", "path", "sha256")}}
        row["path"] = rel.as_posix()
        rows[i] = row
        changed.append({**row, "previous_label": old["label"]})
    if changed:
        write_manifest(root, rows)
    return changed


def parse_utc(value: object) -> datetime | None:
    """An ISO time from a manifest column as an aware datetime (naive: UTC); unreadable: None."""
    try:
        when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _older(a: object, b: object) -> bool:
    """True when time `a` is known to be before time `b` (ISO strings; unknown or unreadable: False)."""
    ta, tb = parse_utc(a) if a else None, parse_utc(b) if b else None
    return ta is not None and tb is not None and ta < tb


def _inside(root: Path, rel: Path, src: Path) -> None:
    """Refuse a destination that resolves outside the dataset (e.g. a class folder that is a symlink)."""
    base = root.resolve()
    if not (base / rel).resolve().is_relative_to(base):
        raise SaofuError(f"{src} would be copied to {(base / rel).resolve()}, outside the dataset {base}; "
                         "nothing was added")
