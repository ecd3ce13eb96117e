"""Evaluation badcases: the images a model got wrong, written beside every evaluation report.

`flows/active_learning` sends them to labelers (tagged `badcase`), and a later evaluation can
tell which were fixed (`compare_badcases`).

Badcase file (written by `write_badcases`, read by `read_badcases`), JSON:

    {"format": "saofu-badcases/1", "model_version": "fu-recognizer:3", "classes": [...],
     "threshold": 0.9, "negative_class": "not_fu", "split": "test", "n_evaluated": 400,
     "created_at": "...", "badcases": [{"path": "/abs/img.png", "sha256": "...", "truth": "fu",
     "predicted": "not_fu", "decision": "not_fu", "score": 0.97, "kind": "false_negative"}]}

`predicted` is the model's top class (the pre-annotation shown to labelers), `decision` what the
app decided at the threshold ("" for an abstention), `kind` one of false_positive,
false_negative, confusion.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from saofu.errors import SaofuError
from tasks.data.manifest import file_sha256
from tasks.release.evaluation import ABSTAIN, decide

BADCASE_FORMAT = "saofu-badcases/1"


@dataclass
class BadCase:
    """One evaluation image the model got wrong."""

    path: str
    sha256: str
    truth: str
    predicted: str  # top class: the pre-annotation
    decision: str  # what the app decided at the threshold; "" = abstained
    score: float  # probability of `predicted`
    kind: str  # false_positive | false_negative | confusion


def _kind(truth: str, decision: str, negative_class: str | None) -> str:
    if negative_class is not None and truth == negative_class:
        return "false_positive"
    if decision == "" or decision == negative_class:
        return "false_negative"
    return "confusion"


def find_badcases(
    probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], paths: Sequence[str],
    threshold: float | None = 0.9, negative_class: str | None = None,
) -> list[BadCase]:
    """The images whose decision differs from the truth, decided as `tasks.release.evaluation` decides.

    Args:
        probs: [N,C] probabilities; labels: [N] true class indices; classes: column names.
        paths: image path per row.
        threshold: the evaluation threshold (None: top class, no threshold).
        negative_class: class under-threshold predictions fall back to (None: abstain).

    Returns:
        One BadCase per wrong image, in input order.
    """
    neg = classes.index(negative_class) if negative_class in classes else None
    decisions = probs.argmax(1) if threshold is None else decide(probs, threshold, neg)
    negative_class = negative_class if neg is not None else None
    cases = []
    for i in np.flatnonzero(decisions != np.asarray(labels)):
        decision = "" if decisions[i] == ABSTAIN else classes[decisions[i]]
        truth = classes[int(labels[i])]
        cases.append(BadCase(
            path=str(Path(paths[i]).resolve()), sha256=file_sha256(paths[i]), truth=truth,
            predicted=classes[int(probs[i].argmax())], decision=decision, score=float(probs[i].max()),
            kind=_kind(truth, decision, negative_class),
        ))
    return cases


def write_badcases(
    path: str | Path, cases: Sequence[BadCase], model_version: str, classes: Sequence[str],
    threshold: float | None, negative_class: str | None, split: str, n_evaluated: int,
) -> Path:
    """Write the badcase file (format in the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": BADCASE_FORMAT, "model_version": model_version, "classes": list(classes),
        "threshold": threshold, "negative_class": negative_class, "split": split,
        "n_evaluated": n_evaluated, "created_at": datetime.now(UTC).isoformat(),
        "badcases": [asdict(c) for c in cases],
    }
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False))
    return path


def read_badcases(path: str | Path) -> dict[str, Any]:
    """A badcase file as a dict whose `badcases` are BadCase objects."""
    path = Path(path)
    if not path.is_file():
        raise SaofuError(f"badcase file not found: {path} (write one with tasks.release.badcases.write_badcases)")
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != BADCASE_FORMAT:
            raise SaofuError(
                f"{path} is not a saofu badcase file (format {doc.get('format')!r}, want {BADCASE_FORMAT})"
            )
        doc["badcases"] = [BadCase(**c) for c in doc["badcases"]]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise SaofuError(f"unreadable badcase file {path}: {exc}") from None
    return doc


def compare_badcases(previous: Sequence[BadCase], current: Sequence[BadCase]) -> dict[str, int]:
    """Which earlier badcases a newer model fixed (by content hash).

    Returns:
        {"fixed": earlier badcases no longer wrong, "still_wrong": ..., "new": wrong only now}.
    """
    before, now = {c.sha256 for c in previous}, {c.sha256 for c in current}
    return {"fixed": len(before - now), "still_wrong": len(before & now), "new": len(now - before)}
