"""What a release changes, image by image: the challenger's answers paired with the champion's.

The gate compares rates on a slice (recall per class, accuracy). A class's recall half a point
lower says nothing of what happened underneath: a handful of images the challenger newly gets
wrong, or two larger sets of changed answers that nearly cancel. Both models answered the same
images, so the comparison can be paired. Per class both models know, on each evaluation set:

* **lost**: the champion's decision was right, the challenger's is wrong;
* **won**: the other way round;
* the change in recall they make up, (won - lost) / images, in points (the gate's difference);
* McNemar's test (McNemar 1947) in its exact form, the two-sided binomial test on the lost and
  won images alone: how often chance alone would split the changed answers at least this
  unevenly. A small p says the challenger really does answer that class differently, however
  small the change in points.

Each model is judged by its own decision, as the gate judges the shared classes: a plain `fu`
image the challenger calls `fu_merchant` is lost. After a fast retrain that expands the champion
(`models.expand`) its old logits are kept, so the new class is behind every change: an old-class
image is lost to it (answered as the new class, or pushed under the threshold by the probability
it takes) and won only through the refinement rule (a `fu` the champion was unsure of, whose `fu`
and `fu_merchant` together now clear the threshold); in `saofu bench fast-retrain`, `not_fu` loses
images in every draw and wins none (the README has the figures). The lost images of each set are
drawn as one montage (`lost_<set>.png`, the challenger's most confident wrong answers first), with what the champion
answered and what the challenger answers under each: the images to look at when the gate refuses
a model over half a point.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from saofu.errors import SaofuError
from tasks.data.loading import TensorSplit
from tasks.release.gallery import plot_montage

MAX_LOST_SHOWN = 48  # most images in one set's montage


@dataclass(frozen=True)
class ClassChange:
    """One class on one set: how many of its images each model got right, and how the answers moved."""

    set_name: str
    cls: str
    images: int
    champion_right: int
    challenger_right: int
    lost: int  # the champion right, the challenger wrong
    won: int  # the champion wrong, the challenger right

    @property
    def change_pts(self) -> float:
        """The challenger's recall minus the champion's, in points: (won - lost) / images."""
        return 100.0 * (self.won - self.lost) / self.images

    @property
    def p_value(self) -> float:
        return mcnemar_exact(self.lost, self.won)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "change_pts": self.change_pts, "p_value": self.p_value}


def mcnemar_exact(lost: int, won: int) -> float:
    """Two-sided exact McNemar p-value: P(a split of the lost + won changed answers at least as uneven
    as this one) when each change is equally likely to go either way. 1.0 when nothing changed."""
    if lost < 0 or won < 0:
        raise SaofuError(f"lost and won are counts of images, got {lost} and {won}")
    n = lost + won
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(lost, won) + 1)) / 2 ** n
    return min(1.0, 2.0 * tail)


def _answers(result: Mapping[str, Any], split: TensorSplit, label: str) -> list[str]:
    decisions = result.get("decisions")
    if decisions is None:
        raise SaofuError(f"the {label}'s evaluation has no per-image decisions (an evaluation from before they were "
                         "kept): evaluate it again with tasks.release.report.evaluate_sets")
    if len(decisions) != len(split):
        raise SaofuError(f"the {label} answered {len(decisions)} images but the set has {len(split)}: "
                         "the two evaluations are not of the same images")
    return list(decisions)


def shared_classes(split: TensorSplit, challenger: Mapping[str, Any], champion: Mapping[str, Any]) -> list[str]:
    """The set's classes that both models know, in the set's order."""
    return [c for c in split.classes if c in challenger["model_classes"] and c in champion["model_classes"]]


def _paired(split: TensorSplit, challenger: Mapping[str, Any],
            champion: Mapping[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(each image's true class, the challenger's decisions, the champion's), checked to be of `split`."""
    new, old = _answers(challenger, split, "challenger"), _answers(champion, split, "champion")
    return [split.classes[int(label)] for label in split.labels], new, old


def class_changes(set_name: str, split: TensorSplit, challenger: Mapping[str, Any],
                  champion: Mapping[str, Any]) -> list[ClassChange]:
    """Per class both models know (and the set holds images of), the paired counts on `split`.

    Args:
        set_name: the set's name, carried into each row.
        split: the images both models were evaluated on, in the order they were evaluated.
        challenger, champion: each model's `evaluate_sets` result on `split`.

    Raises:
        SaofuError: a result without per-image decisions, or of another number of images.
    """
    truths, new, old = _paired(split, challenger, champion)
    changes = []
    for cls in shared_classes(split, challenger, champion):
        rows = [i for i, truth in enumerate(truths) if truth == cls]
        if not rows:
            continue
        old_right = [old[i] == cls for i in rows]
        new_right = [new[i] == cls for i in rows]
        changes.append(ClassChange(
            set_name=set_name, cls=cls, images=len(rows), champion_right=sum(old_right),
            challenger_right=sum(new_right), lost=sum(o and not n for o, n in zip(old_right, new_right)),
            won=sum(n and not o for o, n in zip(old_right, new_right))))
    return changes


def lost_rows(split: TensorSplit, challenger: Mapping[str, Any], champion: Mapping[str, Any]) -> list[int]:
    """Rows of `split` (of a class both know) the champion answered right and the challenger wrong,
    the challenger's most confident answer first."""
    truths, new, old = _paired(split, challenger, champion)
    shared = set(shared_classes(split, challenger, champion))
    rows = [i for i, truth in enumerate(truths) if truth in shared and old[i] == truth and new[i] != truth]
    return sorted(rows, key=lambda i: -challenger["top_probs"][i])


def _answer(result: Mapping[str, Any], i: int) -> str:
    decision, top, p = result["decisions"][i] or "abstain", result["top_classes"][i], result["top_probs"][i]
    return f"{decision} {p:.2f}" if decision == top else f"{decision} ({top} {p:.2f})"


def plot_lost(set_name: str, split: TensorSplit, challenger: Mapping[str, Any], champion: Mapping[str, Any],
              title: str, path: str | Path) -> Path:
    """`lost_rows` of `split` as one montage (at most `MAX_LOST_SHOWN`): each image with its true
    class, the champion's answer ("was") and the challenger's ("now")."""
    rows = lost_rows(split, challenger, champion)
    shown = rows[:MAX_LOST_SHOWN]
    if len(shown) < len(rows):
        title += f" (the {len(shown)} most confident of {len(rows)})"
    captions = [f"true {split.classes[int(split.labels[i])]}\nwas {_answer(champion, i)}\nnow {_answer(challenger, i)}"
                for i in shown]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_montage(split, shown, captions, path, title, f"{set_name}: no image the champion got right is lost")
    return path


def release_changes(challenger: Mapping[str, Any], champion: Mapping[str, Any], sets: Mapping[str, TensorSplit],
                    names: tuple[str, str], out_dir: str | Path) -> tuple[list[ClassChange], list[Path]]:
    """`class_changes` and the lost images' montage of every set both models were evaluated on.

    Args:
        challenger, champion: each model's `release_report` (its ``sets`` are read).
        sets: set name -> the images evaluated (as given to `release_report`).
        names: how the montages' titles name the two models, e.g. ("challenger v5", "champion v2").
        out_dir: where ``lost_<set>.png`` go.

    Returns:
        (the rows of every set, in the sets' order; the montages' paths).
    """
    changes: list[ClassChange] = []
    plots: list[Path] = []
    for set_name, split in sets.items():
        new, old = challenger["sets"].get(set_name), champion["sets"].get(set_name)
        if new is None or old is None:
            continue
        changes += class_changes(set_name, split, new, old)
        title = f"{set_name}: right by {names[1]}, wrong by {names[0]}"
        plots.append(plot_lost(set_name, split, new, old, title, Path(out_dir) / f"lost_{set_name}.png"))
    return changes, plots


def changes_table(changes: list[ClassChange]) -> str:
    """A Markdown table of `changes`, one row per set and class, and what its columns mean."""
    if not changes:
        return ""
    lines = ["| set | class | images | champion right | challenger right | lost | won | change, pts | p |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in changes:
        lines.append(f"| {c.set_name} | {c.cls} | {c.images} | {c.champion_right} | {c.challenger_right} | {c.lost} "
                     f"| {c.won} | {c.change_pts:+.2f} | {c.p_value:.3g} |")
    return ("\n".join(lines) + "\n\nlost: the champion was right and the challenger is wrong; won: the other way "
            "round; p: McNemar's exact test on lost against won (small: the class's answers really changed)\n")
