"""Spot checks: a random sample of each active-learning run's auto-labels, answered blind by labelers.

Auto-labels are trusted because two models agreed confidently; spot checks measure how far that
trust holds on real traffic. Every active-learning run sends a small seeded random sample of the
auto-labels it wrote (`pick_spot_checks`, default 5 %, at least 5) to Label Studio as ordinary
tasks marked `spot_check` (`send_spot_checks`). Ingest recognises their answers, compares them
with the auto-labels (`audit`) and logs the measured precision per active-learning run and per
model version, with a 95 % Wilson interval, to MLflow.

The check is blind. A labeler shown the models' answer tends to confirm it, which would measure
the labeler's agreeableness rather than the models' precision, so a spot-check task carries:
  - no prediction (no pre-annotation, unlike every other task saofu sends);
  - no readable auto-label: task data are Data Manager columns any labeler can see, so the
    auto-label is stored sealed (`seal`: a hash of the image's sha256 and the label) and
    compared at ingest by sealing the human answer the same way;
  - an image path without the label in it: the dataset's copy lies in a class folder
    (`train/fu/...`), so the task points at a hard link of it named by its hash in a folder beside
    the dataset (`spot_check_dir`), which, unlike the pool's copy, is never evicted.

How an answer changes the dataset: the human answer wins. Ingest turns a spot-check task into a
`human` row like any other; its image is already in the manifest as an `auto` row, so an agreeing
answer adds nothing (the row keeps its model versions, the provenance the audit is about) and a
disagreeing one corrects the row through `tasks.data.manifest.relabel_images` (source `human`,
moved to its class folder, named in the data version's message).

The measured precision is cumulative: ingest reads only annotations since its cursor, so the
outcome of every spot-check task seen so far is kept in a ledger beside the dataset
(`SpotCheckLedger`, one entry per task: a changed answer replaces its entry, a task whose answer
became a skip or a tie leaves it), written into the staged copy with the cursor.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from saofu.errors import SaofuError
from services.labeling import local_files_root
from tasks.data.dataset_lock import fsync_dir
from tasks.data.manifest import file_sha256, parse_utc, read_manifest
from tasks.labeling.client import LabelingItem
from tasks.labeling.ingest import ACCEPTED, resolve

SPOT_CHECK_SOURCE = "spot_check"
Z_95 = 1.959963984540054  # the normal quantile of a two-sided 95 % interval

Sink = Callable[[list[LabelingItem]], Sequence[int]]  # as tasks.labeling.active_learning.Sink


# ------------------------------------------------------------------------------------ sampling


def pick_spot_checks(auto_rows: Sequence[Mapping[str, Any]], share: float = 0.05, minimum: int = 5,
                     seed: int = 0) -> list[dict]:
    """A seeded random sample of a run's auto-label rows: `share` of them, at least `minimum`, at most all.

    The rows are put in content order (sha256, else image path) before sampling, so the sample
    depends on the seed and on which rows there are, not on the order the caller listed them.

    Raises:
        SaofuError: `share` outside [0, 1] or a negative `minimum`.
    """
    if not 0.0 <= share <= 1.0:
        raise SaofuError(f"spot-check share must be within [0, 1], got {share}")
    if minimum < 0:
        raise SaofuError(f"spot-check minimum must be >= 0, got {minimum}")
    rows = sorted((dict(r) for r in auto_rows), key=lambda r: (str(r.get("sha256") or ""), str(r.get("image") or "")))
    size = min(len(rows), max(minimum, math.ceil(share * len(rows))))
    picked = random.Random(seed).sample(range(len(rows)), size)
    return [rows[i] for i in sorted(picked)]


# ------------------------------------------------------------------------------------- sending


def seal(sha256: str, label: str) -> str:
    """The auto-label as the task carries it: unreadable to a labeler, comparable at ingest."""
    return hashlib.sha256(f"saofu-spot-check\0{sha256}\0{label}".encode()).hexdigest()[:24]


def unseal(sealed: str, sha256: str, candidates: Iterable[str]) -> str | None:
    """The label among `candidates` that `sealed` holds, or None."""
    return next((c for c in candidates if seal(sha256, c) == sealed), None)


def spot_check_dir(dataset_dir: str | Path, files_root: str | Path | None = None) -> Path:
    """Where spot-check images are linked: beside the dataset (not in it: not versioned, not
    validated), where Label Studio can serve them: a dataset outside its local-files root (any
    folder a user names) gets a folder under that root instead."""
    dataset = Path(dataset_dir).resolve()
    root = Path(files_root).resolve() if files_root is not None else local_files_root().resolve()
    if dataset.is_relative_to(root):
        return dataset.parent / f".{dataset.name}.spot-checks"
    return root / ".spot-checks" / dataset.name


def _link_neutral_copy(src: Path, folder: Path, sha256: str) -> Path:
    """A hard link (a copy across file systems) of `src` named by its hash: no class folder in its path."""
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / f"{sha256}{src.suffix.lower() or '.png'}"
    if not dst.exists():
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return dst


def spot_check_items(rows: Sequence[Mapping[str, Any]], run_id: str) -> list[LabelingItem]:
    """Label Studio tasks for picked auto-label rows: each row needs `image`, `sha256`, `label`, `model_versions`.

    Deliberately blind: no predictions (a pre-annotated answer would be confirmed, not checked) and
    the auto-label sealed (see the module docstring).
    """
    items = []
    for row in rows:
        missing = [k for k in ("image", "sha256", "label") if not row.get(k)]
        if missing:
            raise SaofuError(f"auto-label row {dict(row)!r} has no {missing}: cannot make a spot check of it")
        items.append(LabelingItem(
            image=Path(row["image"]), source=SPOT_CHECK_SOURCE, sha256=row["sha256"],
            predictions=[],  # blind: no pre-annotation
            meta={"spot_check": True, "auto_label_sealed": seal(row["sha256"], row["label"]),
                  "model_versions": str(row.get("model_versions") or ""), "al_run_id": str(run_id)},
        ))
    return items


def auto_rows_since(dataset_dir: str | Path, since: datetime | str) -> list[dict]:
    """The dataset's `auto` rows labelled at or after `since`: a run's auto-labels, given the run's start.

    Active learning stamps each auto row with the time it was made (`labeled_at`), and only it
    writes `auto` rows, under the dataset's lock.
    """
    start = parse_utc(since.isoformat() if isinstance(since, datetime) else since)
    if start is None:
        raise SaofuError(f"not an ISO time: {since!r}")
    return [r for r in read_manifest(dataset_dir)
            if r.get("source") == "auto" and (t := parse_utc(r.get("labeled_at"))) is not None and t >= start]


def send_spot_checks(dataset_dir: str | Path, auto_rows: Sequence[Mapping[str, Any]], sink: Sink,
                     share: float = 0.05, minimum: int = 5, seed: int = 0, run_id: str = "") -> int:
    """Send a random sample of a run's auto-labels to labelers as blind spot checks.

    Call it after the auto-labels are written. Rows may be manifest rows (`path` within the
    dataset, `sha256`) or the rows active learning wrote (`image`, no hash); each is looked up in
    the dataset's manifest by content, and only images still labelled `auto` there, with the same
    label, are sampled (one a human corrected meanwhile needs no check).

    Args:
        dataset_dir: the labelled dataset the auto-labels went into.
        auto_rows: this run's auto-label rows.
        sink: takes the tasks, returns their ids (`label_studio_sink`).
        share, minimum, seed: the sample (`pick_spot_checks`).
        run_id: the active-learning run (its MLflow run id): the audit is reported per run.

    Returns:
        The number of spot-check tasks sent.
    """
    dataset = Path(dataset_dir)
    stored = {r["sha256"]: r for r in read_manifest(dataset) if r.get("source") == "auto"}
    candidates = []
    for row in auto_rows:
        sha = row.get("sha256") or (file_sha256(row["image"]) if row.get("image") else "")
        found = stored.get(sha)
        if found is None or found.get("label") != row.get("label"):
            continue
        candidates.append({**found, "image": str(dataset / found["path"])})
    picked = pick_spot_checks(candidates, share, minimum, seed)
    for row in picked:
        row["image"] = str(_link_neutral_copy(Path(row["image"]), spot_check_dir(dataset), row["sha256"]))
    items = spot_check_items(picked, run_id)
    if items:
        sink(items)
    print(f"spot checks: {len(items)} of {len(candidates)} auto-labels sent to labelers (run {run_id or '-'})",
          flush=True)
    return len(items)


# --------------------------------------------------------------------------------------- audit


def is_spot_check(record: Mapping[str, Any]) -> bool:
    """A `completed_annotations` record of a spot-check task (its data says so)."""
    return (record.get("data") or {}).get("spot_check") is True


@dataclass
class SpotCheckOutcome:
    """One spot-check task's result: `agreed` is None when it does not count (skipped, tie, bad data)."""

    task_id: int
    sha256: str
    al_run_id: str
    model_versions: list[str]
    human_label: str | None
    auto_label: str | None  # None when unknown (it differs from the human's, among unknown classes)
    agreed: bool | None
    labeled_at: str = ""
    why_not_counted: str = ""


def spot_check_outcomes(records: Iterable[Mapping[str, Any]],
                        classes: Sequence[str] = ()) -> list[SpotCheckOutcome]:
    """The outcome of each spot-check task among `completed_annotations` records (others are ignored).

    The human answer is the task's majority label (`tasks.labeling.ingest.resolve`: one vote per
    annotator, skips do not vote). `classes` lets the table name the auto-label of a disagreement.
    """
    outcomes = []
    for record in records:
        if not is_spot_check(record):
            continue
        data = record.get("data") or {}
        sha, sealed = data.get("sha256"), data.get("auto_label_sealed")
        versions = data.get("model_versions")
        res = resolve(dict(record))
        base = dict(task_id=int(record["task_id"]), sha256=str(sha or ""), al_run_id=str(data.get("al_run_id") or ""),
                    model_versions=[v for v in str(versions or "").split(";") if v], labeled_at=res.labeled_at)
        if not isinstance(sha, str) or not isinstance(sealed, str) or not isinstance(versions, str):
            outcomes.append(SpotCheckOutcome(**base, human_label=res.label, auto_label=None, agreed=None,
                                             why_not_counted="task data lack sha256/auto_label_sealed/model_versions"))
        elif res.status != ACCEPTED:
            outcomes.append(SpotCheckOutcome(**base, human_label=None, auto_label=None, agreed=None,
                                             why_not_counted=res.status))
        else:
            agreed = seal(sha, res.label) == sealed
            auto = res.label if agreed else unseal(sealed, sha, [c for c in classes if c != res.label])
            outcomes.append(SpotCheckOutcome(**base, human_label=res.label, auto_label=auto, agreed=agreed))
    return outcomes


@dataclass
class Tally:
    """Checked and agreed spot checks, and the precision they measure with its 95 % Wilson interval."""

    checked: int = 0
    agreed: int = 0

    @property
    def precision(self) -> float | None:
        return self.agreed / self.checked if self.checked else None

    @property
    def interval(self) -> tuple[float, float] | None:
        return wilson_interval(self.agreed, self.checked)

    def as_dict(self) -> dict[str, Any]:
        low, high = self.interval or (None, None)
        return {"checked": self.checked, "agreed": self.agreed, "precision": self.precision,
                "low": low, "high": high}


def versions_below_target(audit: SpotCheckAudit, target: float, min_checks: int = 20) -> dict[str, Tally]:
    """Model versions whose auto-labels the spot checks show below `target`, with 95 % confidence.

    A version is named only when its interval's upper end is under the target and it has at least
    `min_checks` checks: a few unlucky answers never take a version's labels back, and a version
    the checks cannot tell from the target keeps them. What the ingest reverts when asked
    (`IngestParams.revert_below_precision`).
    """
    if not 0.0 < target <= 1.0 or min_checks < 1:
        raise SaofuError(f"a revert needs a target precision in (0, 1] and min_checks >= 1, got {target}, "
                         f"{min_checks}")
    return {v: t for v, t in sorted(audit.by_version.items())
            if t.checked >= min_checks and t.interval is not None and t.interval[1] < target}


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion (sensible at 0 or n successes, unlike the normal one)."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class SpotCheckAudit:
    """Measured auto-label precision: overall, per model version (each version named by a spot-checked
    row counts that row) and per active-learning run; `not_counted` tasks were skipped, tied or unusable."""

    overall: Tally = field(default_factory=Tally)
    by_version: dict[str, Tally] = field(default_factory=dict)
    by_run: dict[str, Tally] = field(default_factory=dict)
    not_counted: int = 0
    disagreements: list[dict] = field(default_factory=list)

    @property
    def checked(self) -> int:
        return self.overall.checked

    @property
    def agreed(self) -> int:
        return self.overall.agreed

    @property
    def precision(self) -> float | None:
        return self.overall.precision

    def table(self) -> dict[str, Any]:
        """Everything, as JSON (the MLflow artefact)."""
        return {"overall": self.overall.as_dict(), "not_counted": self.not_counted,
                "by_version": {k: t.as_dict() for k, t in sorted(self.by_version.items())},
                "by_run": {k: t.as_dict() for k, t in sorted(self.by_run.items())},
                "disagreements": self.disagreements}

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: `spot_check_*` overall, `.<name>_<version>` per model version, `.run_<id>` per run.

        `:` (in `name:version`) is refused in an MLflow key; `tracking.log_metrics` renames any other
        refused character and keeps the real name in a tag.
        """
        out: dict[str, float] = {"spot_check_n": self.checked, "spot_check_agreed": self.agreed,
                                 "spot_check_not_counted": self.not_counted}
        groups = [("", self.overall)]
        groups += [(f".{v.replace(':', '_')}", t) for v, t in sorted(self.by_version.items())]
        groups += [(f".run_{r or 'unknown'}", t) for r, t in sorted(self.by_run.items())]
        for suffix, tally in groups:
            if tally.checked:
                low, high = tally.interval
                out.update({f"spot_check_precision{suffix}": tally.precision, f"spot_check_n{suffix}": tally.checked,
                            f"spot_check_precision_low{suffix}": low, f"spot_check_precision_high{suffix}": high})
        return out


def audit_outcomes(outcomes: Iterable[SpotCheckOutcome]) -> SpotCheckAudit:
    """Tally outcomes into a `SpotCheckAudit` (those with `agreed` None are only counted as not counted)."""
    result = SpotCheckAudit()
    for o in outcomes:
        if o.agreed is None:
            result.not_counted += 1
            continue
        tallies = [result.overall, result.by_run.setdefault(o.al_run_id, Tally())]
        tallies += [result.by_version.setdefault(v, Tally()) for v in dict.fromkeys(o.model_versions)]
        for tally in tallies:
            tally.checked += 1
            tally.agreed += int(o.agreed)
        if not o.agreed:
            result.disagreements.append({"task_id": o.task_id, "sha256": o.sha256, "auto_label": o.auto_label,
                                         "human_label": o.human_label, "model_versions": o.model_versions,
                                         "al_run_id": o.al_run_id})
    return result


def audit(annotation_records: Iterable[Mapping[str, Any]], classes: Sequence[str] = ()) -> SpotCheckAudit:
    """The audit of the spot-check tasks among `completed_annotations` records (others are ignored)."""
    return audit_outcomes(spot_check_outcomes(annotation_records, classes))


# -------------------------------------------------------------------------------------- ledger


@dataclass
class SpotCheckLedger:
    """Every spot-check task's latest outcome, by task id, kept beside the dataset like the ingest cursor."""

    project_id: int
    outcomes: dict[int, SpotCheckOutcome] = field(default_factory=dict)

    @staticmethod
    def path(dataset_dir: str | Path, project_id: int) -> Path:
        return Path(dataset_dir) / ".ingest" / f"spot-checks-project-{project_id}.json"

    @classmethod
    def load(cls, dataset_dir: str | Path, project_id: int) -> SpotCheckLedger:
        """The ledger; empty when there is none. An unreadable one is an error: silently restarting
        the count would report a precision over fewer checks than were made."""
        p = cls.path(dataset_dir, project_id)
        if not p.exists():
            return cls(project_id)
        try:
            raw = json.loads(p.read_text())
            return cls(project_id, {int(o["task_id"]): SpotCheckOutcome(**o) for o in raw["outcomes"]})
        except (ValueError, TypeError, KeyError) as exc:
            raise SaofuError(f"unreadable spot-check ledger {p} ({exc}): restore it from the dataset's previous "
                             "data version, or delete it to count spot checks from now on") from None

    def update(self, outcomes: Iterable[SpotCheckOutcome]) -> int:
        """Take newer outcomes: a counted one replaces its task's entry, one not counted removes it.

        Returns:
            How many outcomes were taken.
        """
        taken = 0
        for o in outcomes:
            taken += 1
            if o.agreed is None:
                self.outcomes.pop(o.task_id, None)
            else:
                self.outcomes[o.task_id] = o
        return taken

    def audit(self) -> SpotCheckAudit:
        return audit_outcomes(self.outcomes[t] for t in sorted(self.outcomes))

    def save(self, dataset_dir: str | Path) -> None:
        """Write through a renamed temporary file: a staged copy shares the old file's inode by a hard link."""
        p = self.path(dataset_dir, self.project_id)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        doc = {"project_id": self.project_id, "outcomes": [asdict(self.outcomes[t]) for t in sorted(self.outcomes)]}
        with tmp.open("w") as fh:
            fh.write(json.dumps(doc))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
        fsync_dir(p.parent)
