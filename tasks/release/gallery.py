"""The release report's gallery: the errors of one evaluation set as one montage PNG.

Drawn with Pillow straight onto one image, not with matplotlib: a matplotlib figure of a hundred
captioned cells cost about a second to lay out and save (1.06 s a gallery on 2 CPU cores, profiled
in `saofu bench fast-retrain`), and a fast retrain's release draws four to six of them, challenger
and champion on every set, inside its wall clock. Pillow draws the same 100-image montage in
0.12 s (saved at zlib level 1: 0.29 s at the default level). The captions use matplotlib's own
DejaVu Sans (shipped inside matplotlib), so the gallery reads like the report's other plots; a
class name in a script that font lacks (a CJK class) takes a CJK face of the machine's
(`tasks.data.fonts`, only loaded then).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from saofu.errors import SaofuError
from tasks.data.loading import TensorSplit
from tasks.release.evaluation import ABSTAIN

GALLERY_COLUMNS = 8
CELL_IMAGE_PX = 128  # images are scaled up (nearest neighbour, whole factors) to about this size
CAPTION_PT = 11  # caption size in pixels
TITLE_PT = 13
PAD_PX = 8


@lru_cache(maxsize=8)
def _font(size: int, needs_cjk: bool) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans from matplotlib's install; a machine CJK face when the text needs one."""
    if needs_cjk:
        try:
            from tasks.data.fonts import discover_fonts

            faces = discover_fonts()
            if faces:
                return ImageFont.truetype(str(faces[0].path), size)
        except SaofuError:  # no CJK face here: DejaVu draws boxes, the gallery still renders
            pass
    from matplotlib import font_manager

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def _save(canvas: Image.Image, path: Path) -> None:
    canvas.save(path, compress_level=1)  # zlib level 1: a third of the default level's time, files a little larger


def _is_cjk(text: str) -> bool:
    return any(ord(ch) > 0x2E80 for ch in text)


def plot_gallery(split: TensorSplit, classes: list[str], probs: np.ndarray, decisions: np.ndarray,
                  shown: list[tuple[int, str]], n_errors: int, path: Path, title: str) -> None:
    """The shown errors as one montage: each image with its caption (kind, truth, top class, decision) under it."""
    if len(shown) < n_errors:
        title += f" (the {len(shown)} most confident of {n_errors} errors)"
    captions = []
    for i, kind in shown:
        top = int(probs[i].argmax())
        decision = "abstain" if decisions[i] == ABSTAIN else classes[decisions[i]]
        truth = split.classes[int(split.labels[i])]
        caption = f"{kind.replace('_', ' ')}\ntrue {truth}\npred {classes[top]} {probs[i, top]:.2f}"
        if decision != classes[top]:
            caption += f"\n-> {decision}"
        captions.append(caption)
    plot_montage(split, [i for i, _ in shown], captions, path, title, "no false positives or negatives")


def plot_montage(split: TensorSplit, rows: list[int], captions: list[str], path: Path, title: str,
                 empty_text: str) -> None:
    """`split`'s images at `rows`, in that order, each with its caption (up to four lines) under it,
    as one PNG; with no rows, a small card saying `empty_text`."""
    cjk = _is_cjk(title) or any(_is_cjk(c) for c in captions)
    caption_font, title_font = _font(CAPTION_PT, cjk), _font(TITLE_PT, cjk)
    line_px = CAPTION_PT + 3
    title_px = TITLE_PT + 2 * PAD_PX

    if not rows:
        canvas = Image.new("RGB", (640, 240), "white")
        draw = ImageDraw.Draw(canvas)
        draw.text((320, PAD_PX), title, fill="black", font=title_font, anchor="ma")
        draw.text((320, 120), empty_text, fill="black", font=caption_font, anchor="mm")
        _save(canvas, path)
        return

    size = int(split.images.shape[-1])
    scale = max(1, round(CELL_IMAGE_PX / size))
    shown_px = size * scale
    cell_w = max(shown_px, 150) + 2 * PAD_PX
    cell_h = shown_px + PAD_PX + 4 * line_px + PAD_PX
    columns = max(1, min(GALLERY_COLUMNS, len(rows)))
    n_rows = max(1, math.ceil(len(rows) / columns))
    title_width = int(title_font.getlength(title)) + 2 * PAD_PX
    canvas = Image.new("RGB", (max(columns * cell_w, title_width), title_px + n_rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((canvas.width // 2, PAD_PX), title, fill="black", font=title_font, anchor="ma")
    for k, (i, caption) in enumerate(zip(rows, captions)):
        row, col = divmod(k, columns)
        x0, y0 = col * cell_w, title_px + row * cell_h
        pixels = split.images[i].permute(1, 2, 0).numpy()[..., :3]
        if pixels.shape[-1] == 1:  # a grey-scale dataset
            pixels = np.repeat(pixels, 3, axis=-1)
        tile = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
        if scale > 1:
            tile = tile.resize((shown_px, shown_px), Image.Resampling.NEAREST)
        canvas.paste(tile, (x0 + (cell_w - shown_px) // 2, y0))
        draw.multiline_text((x0 + cell_w // 2, y0 + shown_px + PAD_PX // 2), caption, fill="black",
                            font=caption_font, anchor="ma", align="center", spacing=3)
    _save(canvas, path)
