"""Labels that arrive as a folder instead of through Label Studio: an ImageFolder of labelled images.

A fast retrain takes its new labels from a Label Studio project or from such a folder (a partner
sends a zip of their merchant 福, an ML engineer sorts images by hand). The folder is read as
`<class>/<image>` or `<split>/<class>/<image>` and turned into manifest rows (`source` human,
annotator `folder:<path>`) that go through the same staged copy, Great Expectations suite and DVC
data version as Label Studio annotations (`flows/ingest.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from saofu.errors import SaofuError
from tasks.data.loading import dataset_layout, scan_imagefolder


def folder_label_rows(folder: str | Path, classes: Sequence[str]) -> list[dict]:
    """Manifest rows (for `tasks.data.manifest.add_images`) of every image in an ImageFolder of labels.

    Args:
        folder: `<class>/<image>`, or `<split>/<class>/<image>` (the split is then kept; a flat
            folder's images get their split from their content, like Label Studio labels).
        classes: the classes the labels may have (the model's after the change).

    Returns:
        One row per image: image (its path), label, source, annotator, labeled_at and, for a split
        layout, split.

    Raises:
        SaofuError: no such folder, no images, or class folders outside `classes` (named, with counts).
    """
    root = Path(folder)
    if not root.is_dir():
        raise SaofuError(f"labels folder not found: {root}")
    layout = dataset_layout(root)
    split_layout = layout != {"train": root}
    when = datetime.now(UTC).isoformat()
    rows: list[dict] = []
    for split, split_dir in layout.items():
        index = scan_imagefolder(split_dir)
        for path, y in index.samples:
            row = {"image": str(path), "label": index.classes[y], "source": "human",
                   "annotator": f"folder:{root.resolve()}", "labeled_at": when}
            if split_layout:
                row["split"] = split
            rows.append(row)
    unknown = sorted({r["label"] for r in rows} - set(classes))
    if unknown:
        counts = ", ".join(f"{u!r}: {sum(r['label'] == u for r in rows)} images" for u in unknown)
        raise SaofuError(f"class folders {unknown} in {root} are neither classes of the model nor named in the "
                         f"change ({counts}); the classes after the change are {list(classes)}")
    return rows
