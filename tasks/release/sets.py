"""The three evaluation sets a release is judged on, as decoded splits.

* fresh online slice: the most recent human-labelled online images (rows with source `human` in a
  labelled dataset's manifest, newest `labeled_at` first). Where no labelling loop has run yet, a
  simulated slice: recent scans from the online-stream simulator, labelled by the simulator's
  ground truth and named as simulated wherever it is reported.
* regression set: a fixed set that never changes between releases (by default the Fu world's
  held-out-font test split), so a release cannot quietly get worse on what used to work.
* open badcases: the images the last evaluation got wrong (`badcases.json`), so the report shows
  whether they were fixed.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import torch

from saofu.errors import SaofuError
from tasks.data.loading import TensorSplit, _decode, prepare_dataset
from tasks.data.manifest import read_manifest
from tasks.release.badcases import read_badcases


def split_from_files(paths: list[Path], labels: list[str], classes: list[str], image_size: int) -> TensorSplit:
    """Decode `paths` with their `labels` into one split over `classes`.

    Raises:
        SaofuError: a label outside `classes`, or an unreadable image (named).
    """
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise SaofuError(f"labels {unknown} are not classes of the model {classes}")
    if not paths:
        raise SaofuError("no images to evaluate on")
    arrays = [_decode(Path(p), image_size) for p in paths]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    targets = torch.tensor([classes.index(label) for label in labels], dtype=torch.int64)
    return TensorSplit(images, targets, list(classes), [str(p) for p in paths])


def fresh_online_slice(dataset_dir: str | Path, classes: list[str], image_size: int,
                       n: int = 500) -> TensorSplit | None:
    """The `n` most recently human-labelled images of a labelled dataset; None when it has none."""
    root = Path(dataset_dir)
    rows = [r for r in read_manifest(root) if r.get("source") == "human" and r.get("label") in classes]
    if not rows:
        return None
    rows.sort(key=lambda r: r.get("labeled_at", ""), reverse=True)
    rows = rows[:n]
    return split_from_files([root / r["path"] for r in rows], [r["label"] for r in rows], classes, image_size)


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
