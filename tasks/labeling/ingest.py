"""Ingest: completed Label Studio annotations → dataset manifest rows (source `human`).

Incremental and idempotent: a cursor (the latest annotation time already ingested) is kept per
project, and images already in the manifest (same content hash) are never added twice, so running
the ingest again adds nothing. A label corrected in Label Studio updates the annotation's time, so
its task comes back past the cursor, and the new majority relabels the image's existing row
(`tasks.data.manifest.relabel_images`) rather than being skipped as already present.

Each task's label is the majority over its annotators (one vote each: an annotator's latest
annotation); skipped/cancelled annotations do not vote; a tie is reported and left out until
someone breaks it.

Task data is untrusted: any labeler can edit a task in Label Studio. A task's image is accepted
only inside the online pool or the Label Studio files root (after resolving `..` and symlinks),
its evaluation split only as one of the dataset's splits and its label only as a plain folder name
(a class, when the caller passes the classes); a task that fails a check, or whose image is gone,
is reported and skipped, and the batch goes on.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from saofu.settings import get_settings
from services.labeling import local_files_root
from tasks.data.dataset_lock import (
    fsync_dir,
    previous_dir,
    recover_interrupted_swap,
    require_dataset_lock,
    staging_dir,
)
from tasks.data.manifest import SPLITS, plain_name

# Same as tasks.data.loading.IMAGE_SUFFIXES (not imported: that module loads torch).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})

ACCEPTED, TIE, SKIPPED = "accepted", "tie", "skipped"


@dataclass
class Resolution:
    """One task's outcome: the majority label, or why there is none."""

    task_id: int
    status: str  # accepted | tie | skipped
    label: str | None
    votes: dict[str, int]
    annotators: list[str]  # those who voted for `label`
    labeled_at: str  # latest annotation time of the task


@dataclass
class IngestReport:
    """What one ingest did (`added` rows are in the manifest now)."""

    tasks_seen: int = 0
    added: list[dict] = field(default_factory=list)
    relabelled: list[dict] = field(default_factory=list)  # rows whose label a correction changed
    already_present: int = 0
    ties: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"task_id", "reason"}: no vote, bad data, image gone
    cursor: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "tasks_seen": self.tasks_seen, "added": len(self.added), "relabelled": len(self.relabelled),
            "already_present": self.already_present,
            "ties": len(self.ties), "skipped": len(self.skipped), "cursor": self.cursor,
        }


def resolve(record: dict) -> Resolution:
    """Majority label of one task's annotations (a record of `completed_annotations`)."""
    latest: dict[str, dict] = {}
    for ann in sorted(record["annotations"], key=lambda a: (str(a["updated_at"]), a["id"])):
        latest[ann["annotator"]] = ann  # an annotator who changed their mind votes once, last answer
    labeled_at = max((str(a["updated_at"]) for a in record["annotations"]), default="")
    votes = Counter(a["label"] for a in latest.values() if not a["was_cancelled"] and a["label"])
    if not votes:
        return Resolution(record["task_id"], SKIPPED, None, {}, [], labeled_at)
    ranked = votes.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return Resolution(record["task_id"], TIE, None, dict(votes), [], labeled_at)
    label = ranked[0][0]
    voters = sorted(name for name, a in latest.items() if a["label"] == label and not a["was_cancelled"])
    return Resolution(record["task_id"], ACCEPTED, label, dict(votes), voters, labeled_at)


def allowed_image_roots() -> list[Path]:
    """Where a task's image may lie: the Label Studio files root and the default online pool, resolved.

    Every task saofu imports points under the files root (Label Studio could not show it
    otherwise); the pool is `<SAOFU_HOME>/data/online_pool` unless the caller names others.
    """
    return [local_files_root().resolve(), get_settings().online_pool_dir.resolve()]


def check_task(
    record: dict, label: str, roots: Sequence[Path], classes: Sequence[str] | None = None
) -> tuple[Path | None, str, str]:
    """The task's image and split if its data can be trusted, else why not.

    Args:
        record: a record of `completed_annotations`.
        label: the task's majority label.
        roots: resolved folders the image must lie in.
        classes: the labels allowed; None accepts any plain folder name.

    Returns:
        (resolved image path, split, "") for a good task; (None, "", reason) for a bad one.
    """
    task = record.get("task_id")
    raw = record.get("image")
    if not isinstance(raw, str) or not raw:
        return None, "", f"task {task}: no image path in its data"
    if not Path(raw).is_absolute():
        return None, "", f"task {task}: image path {raw!r} is not absolute"
    try:
        image = Path(raw).resolve()  # `..` and symlinks resolved before the check, not after
    except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a symlink loop
        return None, "", f"task {task}: image path {raw!r} cannot be resolved ({exc})"
    if not any(image.is_relative_to(root) for root in roots):
        return None, "", (f"task {task}: image path {raw!r} resolves to {image}, outside the online pool and "
                          f"the Label Studio files root {[str(r) for r in roots]}")
    if image.suffix.lower() not in IMAGE_SUFFIXES:
        return None, "", f"task {task}: image path {raw!r} is not an image file ({sorted(IMAGE_SUFFIXES)})"
    split = (record.get("data") or {}).get("eval_split") or ""
    if split and split not in SPLITS:
        return None, "", f"task {task}: evaluation split {split!r} is not one of {list(SPLITS)}"
    if classes is not None and label not in classes:
        return None, "", f"task {task}: label {label!r} is not a class of the dataset {list(classes)}"
    if not plain_name(label):
        return None, "", f"task {task}: label {label!r} is not a plain folder name"
    if not image.is_file():
        return None, "", f"task {task}: image {raw!r} is not on disk (evicted from the pool?)"
    return image, split, ""


def to_manifest_rows(
    records: list[dict], roots: Iterable[str | Path] | None = None, classes: Sequence[str] | None = None
) -> tuple[list[dict], IngestReport]:
    """Turn annotation records into rows for `tasks.data.manifest.add_images`.

    A task whose data fails `check_task` (image outside `roots`, not an image, missing on disk;
    unknown split or label) is reported in `report.skipped` and left out; the rest still go in.

    Args:
        records: `completed_annotations` output.
        roots: folders the images may lie in; default `allowed_image_roots()`.
        classes: the dataset's classes; None accepts any label that is a plain folder name (the
            validation suite then rejects a batch with an unknown one).

    Returns:
        (rows, report).
    """
    allowed = [Path(r).resolve() for r in roots] if roots is not None else allowed_image_roots()
    report = IngestReport(tasks_seen=len(records))
    rows = []
    for record in records:
        res = resolve(record)
        if res.status == SKIPPED:
            report.skipped.append({"task_id": res.task_id, "reason": f"task {res.task_id}: no label (all skipped)"})
            continue
        if res.status == TIE:
            report.ties.append({"task_id": res.task_id, "votes": res.votes, "image": record["image"]})
            continue
        image, split, reason = check_task(record, res.label, allowed, classes)
        if image is None:
            report.skipped.append({"task_id": res.task_id, "reason": reason})
            print(f"ingest: skipped {reason}", flush=True)
            continue
        rows.append({
            "image": str(image),
            "label": res.label,
            "source": "human",
            "annotator": ";".join(res.annotators),
            "task_id": str(res.task_id),
            "labeled_at": res.labeled_at,
            "badcase": "1" if record.get("badcase") else "",
            # A badcase from an evaluation split goes back to that split: labelled test images
            # must never leak into training (validation rejects an image in train and test).
            "split": split,
        })
    return rows, report


@dataclass
class IngestState:
    """Per-project cursor, kept beside the dataset so a copied dataset carries its history."""

    project_id: int
    cursor: str | None = None

    @staticmethod
    def path(dataset_dir: Path, project_id: int) -> Path:
        return Path(dataset_dir) / ".ingest" / f"project-{project_id}.json"

    @classmethod
    def load(cls, dataset_dir: Path, project_id: int) -> IngestState:
        """The project's cursor; none when there is no file or it cannot be read.

        An unreadable cursor (cut short by a crash before saves were atomic) costs one full
        re-fetch, which adds nothing twice, rather than an ingest that fails every run.
        """
        p = cls.path(dataset_dir, project_id)
        if not p.exists():
            return cls(project_id)
        try:
            return cls(**json.loads(p.read_text()))
        except (ValueError, TypeError) as exc:
            print(f"ingest: cursor {p} is unreadable ({exc}); fetching every annotation again", flush=True)
            return cls(project_id)

    def save(self, dataset_dir: Path) -> None:
        """Write the cursor atomically: a crash leaves the old file or the new one, never half of one.

        A temporary file renamed over the old one also never writes into the file's inode, which a
        staged copy shares with the dataset through a hard link.
        """
        p = self.path(dataset_dir, self.project_id)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        try:
            with tmp.open("w") as fh:
                fh.write(json.dumps(asdict(self)))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, p)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk: the old cursor stands, and no half file beside it
            raise
        fsync_dir(p.parent)


def staged_copy(dataset_dir: str | Path) -> Path:
    """A working copy of the dataset to ingest into, hard-linked (cheap, even for big datasets).

    The accepted dataset is replaced only after validation passes, so a rejected batch loses
    nothing that was stored before. Files are never modified in place (new images are new files,
    the manifest and the cursor are rewritten through a rename), which keeps hard links safe.
    The caller holds `dataset_lock` from here to `commit_staged`/`discard_staged`: the staging
    folder is one per dataset. What a crashed run left is repaired first, so a dataset that a
    crash left only as `.previous` is restored before it is copied, never copied as empty.
    """
    src = Path(dataset_dir)
    require_dataset_lock(src, "a staged copy")
    recover_interrupted_swap(src)
    staging = staging_dir(src)
    if src.exists():
        shutil.copytree(src, staging, copy_function=os.link)
    else:
        staging.mkdir(parents=True)
    return staging


def commit_staged(staging: Path, dataset_dir: str | Path) -> None:
    """Swap the validated working copy in place of the dataset (two renames).

    Every crash point leaves a state the next `dataset_lock` repairs without loss: before the first
    rename nothing changed; between them the dataset is whole in `.previous` (put back); after the
    second the new dataset is in place and `.previous` is only deleted. An error on the second
    rename puts the dataset back at once.
    """
    target = Path(dataset_dir)
    require_dataset_lock(target, "a swap")
    old = previous_dir(target)
    if old.exists():  # not after staged_copy's repair under the lock; still, never delete the only copy
        if target.exists():
            shutil.rmtree(old)
        else:
            old.rename(target)
    if target.exists():
        target.rename(old)
    try:
        staging.rename(target)
    except BaseException:
        if old.exists() and not target.exists():
            try:
                old.rename(target)
            except OSError:
                pass  # left to the next run's `recover_interrupted_swap`
        raise
    fsync_dir(target.parent)
    if old.exists():
        shutil.rmtree(old)


def discard_staged(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
