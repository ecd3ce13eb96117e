"""The release report's gallery: the errors of one evaluation set as one montage PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from tasks.data.loading import TensorSplit
from tasks.release.evaluation import ABSTAIN

GALLERY_COLUMNS = 8


def plot_gallery(split: TensorSplit, classes: list[str], probs: np.ndarray, decisions: np.ndarray,
                  shown: list[tuple[int, str]], n_errors: int, path: Path, title: str) -> None:
    """The shown errors as one montage: each image with its caption (kind, truth, top class, decision) under it.

    One axes holding a montage, not an axes per image: matplotlib lays out every axes it draws, and
    a hundred of them made each gallery cost seconds of a release.
    """
    columns = max(1, min(GALLERY_COLUMNS, len(shown)))
    rows = max(1, math.ceil(len(shown) / columns))
    if len(shown) < n_errors:
        title += f" (the {len(shown)} most confident of {n_errors} errors)"
    cell_in, image_share, title_in = 1.7, 0.62, 0.5  # a cell's width (inches), the image's share of its height
    cell_h_in = cell_in / image_share * 0.8  # the image is 0.8 of the cell wide; the rest of the height: caption
    fig = Figure(figsize=(cell_in * columns, cell_h_in * rows + title_in))
    fig.suptitle(title, fontsize=9)
    if not shown:
        fig.text(0.5, 0.5, "no false positives or negatives", ha="center", va="center")
        fig.savefig(path, dpi=100)
        return
    size = int(split.images.shape[-1])
    cell_w, cell_h = round(size / 0.8), round(size / 0.8 * cell_h_in / cell_in)  # in image pixels
    canvas = np.full((rows * cell_h, columns * cell_w, 3), 255, dtype=np.uint8)
    height_share = cell_h_in * rows / (cell_h_in * rows + title_in)
    ax = fig.add_axes((0.0, 0.0, 1.0, height_share))
    ax.set_axis_off()
    pad = (cell_w - size) // 2
    for k, (i, kind) in enumerate(shown):
        row, col = divmod(k, columns)
        x, y = col * cell_w + pad, row * cell_h + pad // 2
        canvas[y:y + size, x:x + size] = split.images[i].permute(1, 2, 0).numpy()[..., :3]
        top = int(probs[i].argmax())
        decision = "abstain" if decisions[i] == ABSTAIN else classes[decisions[i]]
        truth = split.classes[int(split.labels[i])]
        caption = f"{kind.replace('_', ' ')}\ntrue {truth}\npred {classes[top]} {probs[i, top]:.2f}"
        if decision != classes[top]:
            caption += f"\n-> {decision}"
        ax.text(col * cell_w + cell_w / 2, y + size + 1, caption, ha="center", va="top", fontsize=7)
    ax.imshow(canvas, interpolation="nearest", aspect="auto", extent=(0, canvas.shape[1], canvas.shape[0], 0))
    fig.savefig(path, dpi=100)
