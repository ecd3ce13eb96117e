"""Ingest: completed Label Studio annotations → dataset manifest rows (source `human`).

Incremental and idempotent: a cursor (the latest annotation time already ingested) is kept per
project, and images already in the manifest (same content hash) are never added twice, so running
the ingest again adds nothing. Each task's label is the majority over its annotators (one vote
each: an annotator's latest annotation); skipped/cancelled annotations do not vote; a tie is
reported and left out until someone breaks it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from saofu.errors import SaofuError

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
    already_present: int = 0
    ties: list[dict] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    cursor: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "tasks_seen": self.tasks_seen, "added": len(self.added), "already_present": self.already_present,
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


def to_manifest_rows(records: list[dict]) -> tuple[list[dict], IngestReport]:
    """Turn annotation records into rows for `tasks.data.manifest.add_images`.

    Raises:
        SaofuError: a task's image is missing on disk (nothing is added then).
    """
    report = IngestReport(tasks_seen=len(records))
    rows = []
    for record in records:
        res = resolve(record)
        if res.status == SKIPPED:
            report.skipped.append(res.task_id)
            continue
        if res.status == TIE:
            report.ties.append({"task_id": res.task_id, "votes": res.votes, "image": record["image"]})
            continue
        if not record.get("image") or not Path(record["image"]).is_file():
            raise SaofuError(f"image of Label Studio task {res.task_id} not found on disk: {record.get('image')}")
        rows.append({
            "image": record["image"],
            "label": res.label,  # an unknown label is kept as-is: validation rejects the batch
            "source": "human",
            "annotator": ";".join(res.annotators),
            "task_id": str(res.task_id),
            "labeled_at": res.labeled_at,
            "badcase": "1" if record.get("badcase") else "",
            # A badcase from an evaluation split goes back to that split: labelled test images
            # must never leak into training (validation rejects an image in train and test).
            "split": (record.get("data") or {}).get("eval_split", ""),
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
        p = cls.path(dataset_dir, project_id)
        return cls(**json.loads(p.read_text())) if p.exists() else cls(project_id)

    def save(self, dataset_dir: Path) -> None:
        p = self.path(dataset_dir, self.project_id)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(asdict(self)))


def staged_copy(dataset_dir: str | Path) -> Path:
    """A working copy of the dataset to ingest into, hard-linked (cheap, even for big datasets).

    The accepted dataset is replaced only after validation passes, so a rejected batch loses
    nothing that was stored before. Files are never modified in place (new images are new files,
    the manifest is rewritten through a rename), which keeps hard links safe.
    """
    src = Path(dataset_dir)
    staging = src.with_name(f".{src.name}.staging")
    if staging.exists():
        shutil.rmtree(staging)  # left over from a crashed run; the dataset itself is intact
    if src.exists():
        shutil.copytree(src, staging, copy_function=os.link)
    else:
        staging.mkdir(parents=True)
    return staging


def commit_staged(staging: Path, dataset_dir: str | Path) -> None:
    """Swap the validated working copy in place of the dataset (two renames)."""
    target = Path(dataset_dir)
    old = target.with_name(f".{target.name}.previous")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    if old.exists():
        shutil.rmtree(old)


def discard_staged(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
