"""The error gallery: every shown image in its cell, captions in any script, an empty set still drawn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.data.loading import TensorSplit
from tasks.release.gallery import CELL_IMAGE_PX, GALLERY_COLUMNS, PAD_PX, _font, plot_gallery

pytestmark = pytest.mark.timeout(60)


def _solid_split(colours: list[tuple[int, int, int]], size: int, classes: list[str]) -> TensorSplit:
    images = torch.stack([torch.tensor(c, dtype=torch.uint8).view(3, 1, 1).expand(3, size, size) for c in colours])
    return TensorSplit(images.contiguous(), torch.arange(len(colours)) % len(classes), classes,
                       [f"img{i}.png" for i in range(len(colours))])


@pytest.mark.parametrize("classes", [["circle", "square"], ["福", "not_福"]])
def test_each_shown_image_fills_its_cell_in_the_order_given(tmp_path, classes):
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)] * 3  # 12 images: two rows of 8 columns
    split = _solid_split(colours, 32, classes)
    probs = np.tile([[0.3, 0.7]], (len(colours), 1)).astype(np.float32)
    shown = [(i, "confusion") for i in range(len(colours))][::-1]  # the gallery's order, not the split's
    path = tmp_path / "gallery.png"
    plot_gallery(split, classes, probs, probs.argmax(1), shown, 40, path, f"{classes[0]}: wrong at threshold 0.9")

    with Image.open(path) as im:
        assert im.format == "PNG"
        canvas = np.asarray(im.convert("RGB"))
    cell_w = canvas.shape[1] // GALLERY_COLUMNS
    for col in range(GALLERY_COLUMNS):
        # Down the middle of a column: the colours of the images it holds, top to bottom.
        line = canvas[:, col * cell_w + cell_w // 2].astype(int)
        coloured = (line.max(axis=1) - line.min(axis=1)) > 100
        starts = [y for y in np.flatnonzero(coloured) if y == 0 or not coloured[y - 1]]
        runs = [(y, int(np.argmin(coloured[y:])) or len(line) - y) for y in starts]
        seen = [tuple(line[y]) for y, length in runs if length >= CELL_IMAGE_PX]  # images, not caption ink
        expected = [colours[i] for k, (i, _) in enumerate(shown) if k % GALLERY_COLUMNS == col]
        assert seen == expected, f"column {col}"
    # Captions were drawn under the images: dark ink in the band below the first row.
    first = next(y for y in range(canvas.shape[0]) if (np.ptp(canvas[y].astype(int), axis=1) > 100).any())
    band = canvas[first + CELL_IMAGE_PX + PAD_PX // 2:first + CELL_IMAGE_PX + 4 * PAD_PX]
    assert (band.astype(int).sum(axis=2) < 200).any()
    # A CJK class name is drawn with one of the machine's CJK faces (set-up installs them), not DejaVu's boxes.
    assert _font(11, True).path != _font(11, False).path


def test_a_set_without_errors_still_gets_its_gallery(tmp_path):
    split = _solid_split([(10, 10, 10)], 16, ["a", "b"])
    path = tmp_path / "clean.png"
    plot_gallery(split, ["a", "b"], np.array([[0.9, 0.1]], np.float32), np.array([0]), [], 0, path, "clean")
    with Image.open(path) as im:
        im.verify()
