"""The three evaluation sets a release is judged on, as decoded splits.

* fresh online slice: the data the gate compares challenger and champion on. Any dataset has one;
  `choose_fresh_slice` takes the first of these that exists:
    1. a folder the user names: the newest human labels of its manifest when it is a labelled
       dataset with human rows, else every image of it as a plain ImageFolder (class folders, or
       train/val/test folders of class folders);
    2. the newest human labels of the candidate's own training dataset, outside its train split
       (rows with source `human` in its manifest, newest `labeled_at` first);
    3. for a Fu-world model only (decided from its classes): recent scans from the online-stream
       simulator, labelled by the simulator's ground truth and named as simulated wherever it is
       reported. It stands in for online traffic, so it comes before the held-out split, which is
       already the regression set;
    4. the held-out split of the dataset the candidate was trained on (its test split, else the
       validation split the training run carved out with its own share and seed).
  Images of a class the model does not have are refused by name rather than dropped.
* regression set: a fixed set that never changes between releases (by default the Fu world's
  held-out-font test split), so a release cannot quietly get worse on what used to work.
* open badcases: the images the last evaluation got wrong (`badcases.json`), so the report shows
  whether they were fixed.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from saofu.errors import SaofuError
from tasks.data.fu_world import FU_CLASS, MERCHANT_CLASS, NOT_FU_CLASS
from tasks.data.loading import TensorSplit, _decode, dataset_layout, prepare_dataset, scan_imagefolder
from tasks.data.manifest import MANIFEST_NAME, read_manifest
from tasks.release.badcases import read_badcases

FU_WORLD_CLASSES = frozenset({FU_CLASS, NOT_FU_CLASS, MERCHANT_CLASS})
FreshKind = Literal["named-human", "named-folder", "human", "simulated", "held-out"]


def split_from_files(paths: list[Path], labels: list[str], classes: list[str], image_size: int) -> TensorSplit:
    """Decode `paths` with their `labels` into one split over `classes`.

    Raises:
        SaofuError: a label outside `classes`, or an unreadable image (named).
    """
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        counts = ", ".join(f"{u!r}: {labels.count(u)} images" for u in unknown)
        raise SaofuError(f"labels {unknown} are not classes of the model {classes} ({counts})")
    if not paths:
        raise SaofuError("no images to evaluate on")
    arrays = [_decode(Path(p), image_size) for p in paths]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    targets = torch.tensor([classes.index(label) for label in labels], dtype=torch.int64)
    return TensorSplit(images, targets, list(classes), [str(p) for p in paths])


def fresh_online_slice(dataset_dir: str | Path, classes: list[str], image_size: int,
                       n: int = 500, held_out_only: bool = False) -> TensorSplit | None:
    """The `n` most recently human-labelled images of a labelled dataset; None when it has none.

    Args:
        held_out_only: leave out rows of the train split (the dataset the model was trained on).

    Raises:
        SaofuError: a chosen row's label is not one of `classes` (the labels are named).
    """
    root = Path(dataset_dir)
    rows = [r for r in read_manifest(root) if r.get("source") == "human"
            and not (held_out_only and r.get("split") == "train")]
    if not rows:
        return None
    rows.sort(key=lambda r: r.get("labeled_at", ""), reverse=True)
    rows = rows[:n]
    return split_from_files([root / r["path"] for r in rows], [r["label"] for r in rows], classes, image_size)


def imagefolder_slice(folder: str | Path, classes: list[str], image_size: int, n: int = 500,
                      seed: int = 0) -> TensorSplit:
    """Every image of a plain ImageFolder (`<class>/<image>`, or `<split>/<class>/<image>` for all
    splits), a seeded sample of `n` when it has more, labelled by their folders.

    Raises:
        SaofuError: no such folder, no images, or class folders the model does not have (named).
    """
    root = Path(folder)
    if not root.is_dir():
        raise SaofuError(f"fresh-slice folder not found: {root}")
    samples: list[tuple[Path, str]] = []
    for split_dir in dataset_layout(root).values():
        index = scan_imagefolder(split_dir)
        samples += [(path, index.classes[y]) for path, y in index.samples]
    unknown = sorted({label for _, label in samples} - set(classes))
    if unknown:
        counts = ", ".join(f"{u!r}: {sum(label == u for _, label in samples)} images" for u in unknown)
        raise SaofuError(f"class folders {unknown} in {root} are not classes of the model {classes} ({counts}); "
                         "remove them or release a model trained with these classes")
    if len(samples) > n:
        keep = np.random.default_rng(seed).choice(len(samples), n, replace=False)
        samples = [samples[i] for i in sorted(keep.tolist())]
    return split_from_files([p for p, _ in samples], [label for _, label in samples], classes, image_size)


def is_fu_model(classes: list[str]) -> bool:
    """A model of the Fu world: all its classes are ones the Fu world draws, `fu` among them.

    Only such a model can be judged on the stream simulator's scans, whose truths are those classes.
    """
    return FU_CLASS in classes and set(classes) <= FU_WORLD_CLASSES


def held_out_split(data_dir: str | Path, image_size: int, val_share: float = 0.15, seed: int = 0,
                   cache_dir: str | Path | None = None) -> tuple[TensorSplit, str]:
    """The split of a dataset its training run did not train on: (split, "test" or "val").

    `val_share` and `seed` must be the training run's, so a carved-out val split is the same one.
    """
    data = prepare_dataset(data_dir, image_size, val_share, seed, cache_dir)
    return (data.test, "test") if data.test is not None else (data.val, "val")


def _at_most(split: TensorSplit, n: int, seed: int) -> TensorSplit:
    """A seeded sample of `n` rows (in their order) when the split has more."""
    if len(split) <= n:
        return split
    rows = sorted(np.random.default_rng(seed).choice(len(split), n, replace=False).tolist())
    return TensorSplit(split.images[rows], split.labels[rows], split.classes, [split.paths[i] for i in rows])


@dataclass
class FreshSlice:
    """The chosen fresh slice: what it is (`source`, reported and logged) and why it was chosen."""

    split: TensorSplit
    kind: FreshKind
    source: str
    reason: str


def choose_fresh_slice(
    classes: list[str], image_size: int, n: int = 400, *, labelled_dir: str | Path | None = None,
    data_dir: str | Path | None = None, pool_dir: str | Path | None = None, seed: int = 0,
    val_share: float = 0.15, split_seed: int = 0, cache_dir: str | Path | None = None,
) -> FreshSlice:
    """The fresh online slice of a release, the first that exists in the order of the module doc.

    Args:
        classes: the candidate model's classes.
        image_size: its input size.
        n: most images in the slice (a seeded sample of a larger folder or split; simulated scans:
            exactly this many are drawn).
        labelled_dir: the folder the user named (step 1), or None.
        data_dir: the dataset the candidate was trained on (steps 2 and 4), or None.
        pool_dir: where simulated scans are written (step 3).
        seed: seed of the simulator and of sampling a large named folder.
        val_share, split_seed: the training run's split, to find its held-out val split.
        cache_dir: decoded-tensor cache of the held-out split.

    Raises:
        SaofuError: the named folder is unusable or has classes the model lacks, or no step applies.
    """
    skipped: list[str] = []
    if labelled_dir:
        root = Path(labelled_dir)
        split = fresh_online_slice(root, classes, image_size, n)
        if split is not None:
            return FreshSlice(split, "named-human", f"newest human labels in {root}",
                              f"folder named for the fresh slice; its {MANIFEST_NAME} has human labels")
        if (root / MANIFEST_NAME).is_file():
            # A labelled dataset with no human rows yet: its images are generated or auto-labelled
            # (and likely trained on), not fresh; fall through as if no folder had been named.
            skipped.append(f"the named folder {root} is a labelled dataset without human labels yet")
        else:
            split = imagefolder_slice(root, classes, image_size, n, seed)
            return FreshSlice(split, "named-folder", f"ImageFolder {root}",
                              "folder named for the fresh slice (plain ImageFolder, no manifest)")
    else:
        skipped.append("no folder named for the fresh slice")
    data_ok = bool(data_dir) and Path(data_dir).is_dir()
    if data_ok:
        split = fresh_online_slice(data_dir, classes, image_size, n, held_out_only=True)
        if split is not None:
            return FreshSlice(split, "human", f"newest human labels in {data_dir} (outside its train split)",
                              "; ".join(skipped + ["the training dataset has held-out human labels"]))
        skipped.append(f"no held-out human labels in the training dataset {data_dir}")
    else:
        skipped.append(f"the training dataset {data_dir or '(not recorded)'} is not there")
    if is_fu_model(classes):
        pool = pool_dir or Path("online_pool")
        split, info = simulated_fresh_slice(pool, classes, image_size, n, seed)
        return FreshSlice(split, "simulated",
                          f"simulated scans ({info['n']} images, ground truth from the simulator) in {pool}",
                          "; ".join(skipped + [f"a Fu-world model (classes {classes}): simulated recent scans"]))
    skipped.append(f"not a Fu-world model (classes {classes}): no simulated scans")
    if data_ok:
        split, name = held_out_split(data_dir, image_size, val_share, split_seed, cache_dir)
        split = _at_most(split, n, seed)
        return FreshSlice(split, "held-out", f"held-out {name} split of {data_dir}",
                          "; ".join(skipped + [f"the training dataset's own {name} split"]))
    raise SaofuError("no fresh slice to evaluate on: " + "; ".join(skipped)
                     + ". Name an ImageFolder of recent labelled images (saofu release --labelled DIR)")


def simulated_fresh_slice(pool_dir: str | Path, classes: list[str], image_size: int, n: int = 400,
                          seed: int = 0, hours: float = 24.0) -> tuple[TensorSplit, dict]:
    """Recent scans from the stream simulator, written into `pool_dir`, labelled by its truth.

    The last `hours` of the default drift schedule's first two days (daylight and evening light,
    fonts the model was trained on): what users scanned lately. Scans whose class the model does
    not have are left out and counted.

    Returns:
        (the split, {"source": "simulated", "n": ..., "left_out": {label: count}}).
    """
    from tasks.data.stream import simulate_scans, write_scans

    start = datetime.now(UTC) - timedelta(hours=hours)
    scans = list(simulate_scans(n, seed, start, rate_per_hour=n / hours, image_size=image_size))
    paths = write_scans(scans, pool_dir)
    keep = [i for i, s in enumerate(scans) if s.label in classes]
    left_out: dict[str, int] = {}
    for s in scans:
        if s.label not in classes:
            left_out[s.label] = left_out.get(s.label, 0) + 1
    split = split_from_files([paths[i] for i in keep], [scans[i].label for i in keep], classes, image_size)
    return split, {"source": "simulated", "n": len(keep), "left_out": left_out}


def regression_set(dataset_dir: str | Path, image_size: int, cache_dir: str | Path | None = None) -> TensorSplit:
    """The dataset's test split (held-out fonts for the Fu world); its val split when it has no test."""
    data = prepare_dataset(dataset_dir, image_size, 0.15, 0, cache_dir)
    return data.test if data.test is not None else data.val


def badcase_set(badcases_path: str | Path, classes: list[str], image_size: int) -> TensorSplit | None:
    """The open badcases of the last evaluation; None when there are none (or no file yet)."""
    path = Path(badcases_path)
    if not path.is_file():
        return None
    cases = [c for c in read_badcases(path)["badcases"] if c.truth in classes and Path(c.path).is_file()]
    if not cases:
        return None
    return split_from_files([Path(c.path) for c in cases], [c.truth for c in cases], classes, image_size)


def held_out_folder(data_dir: str | Path, image_size: int, out_dir: str | Path, val_share: float = 0.15,
                    seed: int = 0, cache_dir: str | Path | None = None) -> tuple[Path, dict[str, int]]:
    """An ImageFolder (hard links) of the dataset's images no training saw, every class included.

    A class change adds labels to a dataset whose test split (held-out fonts, in the Fu world)
    has none of the new class yet: those land in train and val by their content. So each class
    is taken from the test split where the test split has it, else from the validation split
    (the one the training run carved out with `val_share` and `seed` when the dataset has no
    `val/` folder). This is what a fast retrain is judged on: its new class and, at the same
    time, enough images of every old class to see a regression.

    Returns:
        (the folder, {class: images}).
    """
    data = prepare_dataset(data_dir, image_size, val_share, seed, cache_dir)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    counts: dict[str, int] = {}
    for i, cls in enumerate(data.classes):
        split = data.test if data.test is not None and bool((data.test.labels == i).any()) else data.val
        paths = [p for p, y in zip(split.paths, split.labels.tolist()) if y == i]
        (out / cls).mkdir(parents=True, exist_ok=True)
        for j, src in enumerate(paths):
            dst = out / cls / f"{j:06d}{Path(src).suffix.lower()}"
            try:
                os.link(src, dst)
            except OSError:  # another file system: copy
                shutil.copyfile(src, dst)
        counts[cls] = len(paths)
    empty = [c for c, n in counts.items() if not n]
    if empty:
        raise SaofuError(f"no held-out images of {empty} in {data_dir}: a class needs images outside the "
                         "train split to be judged")
    return out, counts
