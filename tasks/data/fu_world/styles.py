"""Styles and glyphs of the Fu world: the class names, which style and character a crop shows, and
the upright foreground of a crop (the sign in its style: red diamond, shop frame, merchant brand;
and the character drawn with a font in that style: print, brush, handwritten).

Part of the `tasks.data.fu_world` package; `render.py` composes these into a scene.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from saofu.errors import SaofuError
from tasks.data.fonts import (
    FESTIVE_SLOTS,
    FU,
    LOOKALIKE_SLOTS,
    OPTIONAL_FESTIVE,
    OPTIONAL_LOOKALIKES,
    FontFace,
    face_charset,
)

if TYPE_CHECKING:  # annotation only: world.py imports this module
    from tasks.data.fu_world.world import WorldConfig

FU_CLASS = "fu"
NOT_FU_CLASS = "not_fu"
MERCHANT_CLASS = "fu_merchant"

# Styles shared by every class, with their shares; `merchant` is drawn only for fu_merchant and
# for the merchant decoys in not_fu.
STYLE_WEIGHTS: dict[str, float] = {
    "print": 0.28,
    "brush": 0.2,
    "red_diamond": 0.25,
    "handwritten": 0.15,
    "framed": 0.12,
}
# Share of not_fu crops drawn in the merchant frame when the merchant class is on.
MERCHANT_DECOY_SHARE = 0.15

# The merchant's brand: a teal frame, an orange ring and an orange-and-teal logo mark.
BRAND_TEAL = (0.0, 140.0, 140.0)
BRAND_ORANGE = (245.0, 138.0, 31.0)
BRAND_CREAM = (255.0, 247.0, 232.0)
# Frames of other shops (style "framed"), kept away from teal so the brand stays distinctive.
OTHER_FRAME_COLOURS = (
    (190, 20, 30),
    (20, 40, 120),
    (200, 160, 40),
    (30, 110, 40),
    (110, 40, 130),
    (25, 25, 25),
    (220, 90, 140),
    (120, 70, 30),
)


# ---- content: which style and character ----------------------------------------------------


def _choose_content(
    rng: np.random.Generator, label: str, font: FontFace, cfg: WorldConfig
) -> tuple[str, str]:
    """Pick (style, character) for a crop; character "" means a texture with no character."""
    if label == MERCHANT_CLASS:
        return "merchant", FU
    if label == FU_CLASS:
        return _pick_style(rng), FU
    if cfg.merchant and rng.random() < MERCHANT_DECOY_SHARE:
        style = "merchant"
    else:
        style = _pick_style(rng)
    u = rng.random()
    if u < cfg.lookalike_share:
        return style, _pick_char(rng, LOOKALIKE_SLOTS, OPTIONAL_LOOKALIKES, font)
    if u < cfg.lookalike_share + cfg.texture_share:
        return style, ""
    return style, _pick_char(rng, FESTIVE_SLOTS, OPTIONAL_FESTIVE, font)


def _pick_style(rng: np.random.Generator) -> str:
    names = list(STYLE_WEIGHTS)
    p = np.array([STYLE_WEIGHTS[s] for s in names])
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _pick_char(
    rng: np.random.Generator,
    slots: Sequence[tuple[str, ...]],
    optional: Sequence[str],
    font: FontFace,
) -> str:
    """A character the face really draws: a slot uniformly, then one of its forms."""
    charset = face_charset(font)
    candidates = [[c for c in slot if c in charset] for slot in slots]
    candidates += [[c] for c in optional if c in charset]
    candidates = [forms for forms in candidates if forms]
    if not candidates:
        raise SaofuError(f"font {font.family} ({font.path}) draws none of {slots}")
    forms = candidates[int(rng.integers(len(candidates)))]
    return forms[int(rng.integers(len(forms)))]


# ---- drawing helpers shared with render.py -------------------------------------------------


def _lowfreq(rng: np.random.Generator, w: int, cells: int) -> np.ndarray:
    """Smooth noise in about 0..1: a cells x cells random grid upsampled bicubically."""
    small = Image.fromarray(rng.random((cells, cells)).astype(np.float32))
    return np.asarray(small.resize((w, w), Image.Resampling.BICUBIC))


def _jitter(rng: np.random.Generator, base: Sequence[float], amount: float) -> np.ndarray:
    return np.clip(np.asarray(base, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


# ---- foreground: sign (diamond, frame) and glyph, upright ----------------------------------


def _foreground(
    rng: np.random.Generator,
    style: str,
    char: str,
    font: FontFace,
    w: int,
    bg: np.ndarray,
    d: float,
    record: dict[str, Any],
) -> tuple[Image.Image, float]:
    """Draw the upright sign and character as RGBA; return it and the glyph box side."""
    rgb = np.zeros((w, w, 3), np.float32)
    alpha = np.zeros((w, w), np.float32)
    glyph_box = w * rng.uniform(0.5, 0.76)
    ink: np.ndarray | None = None
    if style == "red_diamond":
        glyph_box, ink = _draw_diamond(rng, rgb, alpha, w)
    elif style in ("merchant", "framed"):
        glyph_box, ink = _draw_frame(rng, rgb, alpha, w, brand=(style == "merchant"))
    if ink is None:
        ink = _ink_for(rng, style, bg)
    if not alpha.any():
        rgb[:] = ink  # no sign: transparent pixels carry the ink colour, so edges never darken
    if char:
        mask = _glyph_mask(rng, style, char, font, w, glyph_box, d)
        gold = bool(ink[0] > 180 and 120 < ink[1] < 215 and ink[2] < 130)
        record["ink"] = "gold" if gold else "flat"
        ink_img = _ink_image(rng, ink, w, gold=gold)
        if rng.random() < 0.35 * d and style not in ("red_diamond", "merchant", "framed"):
            # faded print: ink drifts toward the paper colour
            fade = rng.uniform(0.2, 0.55 * d + 0.2)
            ink_img = ink_img * (1 - fade) + bg.mean(axis=(0, 1)) * fade
            record["degradations"].append("low_contrast")
        m = mask[..., None]
        rgb = rgb * (1 - m) + ink_img * m
        alpha = np.maximum(alpha, mask)
    rgba = np.dstack([np.clip(rgb, 0, 255), alpha * 255]).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA"), glyph_box


def _ink_for(rng: np.random.Generator, style: str, bg: np.ndarray) -> np.ndarray:
    """Ink colour that reads on this background: dark on light, light or gold on dark/red."""
    mean = bg.mean(axis=(0, 1))
    luma = float(mean @ np.float32([0.299, 0.587, 0.114]))
    reddish = mean[0] > 1.6 * mean[1] and mean[0] > 120
    if style == "handwritten":
        pens = ((20, 30, 120), (15, 15, 20), (160, 20, 30), (20, 60, 150))
        base = pens[int(rng.integers(len(pens)))]
        return _jitter(rng, base, 15) if luma > 110 else _jitter(rng, (240, 240, 235), 10)
    if reddish and rng.random() < 0.45:
        return _jitter(rng, (225, 180, 70), 20)  # gold on red paper, without the diamond
    if luma > 110:
        darks = ((15, 15, 15), (40, 35, 30), (20, 30, 80), (110, 15, 20))
        return _jitter(rng, darks[int(rng.integers(len(darks)))], 12)
    lights = ((245, 245, 240), (230, 200, 90), (250, 230, 200))
    return _jitter(rng, lights[int(rng.integers(len(lights)))], 10)


def _ink_image(rng: np.random.Generator, ink: np.ndarray, w: int, gold: bool) -> np.ndarray:
    """Ink as an image: flat, or for gold a metallic gradient with a highlight band."""
    if not gold:
        return np.broadcast_to(ink, (w, w, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:w, 0:w].astype(np.float32) / w
    phi = rng.uniform(0, np.pi)
    t = xx * np.cos(phi) + yy * np.sin(phi)
    shine = 0.85 + 0.2 * np.sin(2 * np.pi * (t * rng.uniform(0.7, 1.6) + rng.uniform(0, 1)))
    return np.clip(ink[None, None, :] * shine[..., None], 0, 255).astype(np.float32)


def _paint(rgb: np.ndarray, alpha: np.ndarray, mask: np.ndarray, colour: Any) -> None:
    """Paint `colour` (a colour or an image) through `mask` (0..1) into rgb/alpha in place."""
    m = mask[..., None]
    rgb *= 1 - m
    rgb += np.asarray(colour, np.float32) * m
    np.maximum(alpha, mask, out=alpha)


def _shape_mask(w: int, draw_fn: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    img = Image.new("L", (w, w), 0)
    draw_fn(ImageDraw.Draw(img))
    return np.asarray(img, np.float32) / 255


def _draw_diamond(
    rng: np.random.Generator, rgb: np.ndarray, alpha: np.ndarray, w: int
) -> tuple[float, np.ndarray]:
    """Red square paper turned 45°, the classic door 福; returns glyph box and (gold) ink."""
    c = w / 2
    half = w * rng.uniform(0.4, 0.49)  # half-diagonal
    pts = [(c, c - half), (c + half, c), (c, c + half), (c - half, c)]
    paper = _jitter(rng, (205, 20, 30), 22)
    texture = paper + ((_lowfreq(rng, w, 5) - 0.5) * rng.uniform(8, 30))[..., None]
    rgb[:] = texture  # outside the diamond the colour matters only for edge interpolation
    _paint(rgb, alpha, _shape_mask(w, lambda dr: dr.polygon(pts, fill=255)), texture)
    if rng.random() < 0.5:  # gold border line just inside the edge
        inset = half * rng.uniform(0.82, 0.9)
        inner = [(c, c - inset), (c + inset, c), (c, c + inset), (c - inset, c)]
        width = max(1, int(w / 64))
        border = _shape_mask(w, lambda dr: dr.polygon(inner, outline=255, width=width))
        _paint(rgb, alpha, border, _jitter(rng, (225, 180, 70), 15))
    # the square inscribed in the diamond has side = half-diagonal; big brush 福 overhang it
    box = half * rng.uniform(0.95, 1.2)
    ink = _jitter(rng, (230, 185, 75), 18) if rng.random() < 0.8 else _jitter(rng, (20, 15, 15), 10)
    return box, ink


def _draw_frame(
    rng: np.random.Generator, rgb: np.ndarray, alpha: np.ndarray, w: int, brand: bool
) -> tuple[float, np.ndarray]:
    """A rounded shop frame: the merchant's teal/orange brand, or another shop's colours."""
    c = w / 2
    half = w * rng.uniform(0.38, 0.47)
    radius = half * rng.uniform(0.15, 0.35)
    border = half * rng.uniform(0.1, 0.16)
    if brand:
        outer_c = _jitter(rng, BRAND_TEAL, 10)
        ring_c = _jitter(rng, BRAND_ORANGE, 10)
        fill_c = _jitter(rng, BRAND_CREAM, 6)
        ink = (
            _jitter(rng, (0, 105, 105), 10)
            if rng.random() < 0.6
            else _jitter(rng, (225, 95, 20), 10)
        )
    else:
        palette = OTHER_FRAME_COLOURS
        outer_c = _jitter(rng, palette[int(rng.integers(len(palette)))], 15)
        ring_c = _jitter(rng, palette[int(rng.integers(len(palette)))], 15)
        fill_c = _jitter(rng, rng.uniform(150, 255, 3), 0)
        ink = (
            _jitter(rng, (20, 20, 20), 15)
            if fill_c.mean() > 120
            else _jitter(rng, (240, 235, 220), 10)
        )
    rgb[:] = outer_c
    box_outer = [c - half, c - half, c + half, c + half]
    outer = _shape_mask(w, lambda dr: dr.rounded_rectangle(box_outer, radius, fill=255))
    _paint(rgb, alpha, outer, outer_c)
    ring_half = half - border
    box_ring = [c - ring_half, c - ring_half, c + ring_half, c + ring_half]
    ring = _shape_mask(w, lambda dr: dr.rounded_rectangle(box_ring, radius * 0.8, fill=255))
    _paint(rgb, alpha, ring, ring_c)
    in_half = ring_half - max(1.0, border * 0.35)
    box_in = [c - in_half, c - in_half, c + in_half, c + in_half]
    inner = _shape_mask(w, lambda dr: dr.rounded_rectangle(box_in, radius * 0.7, fill=255))
    _paint(rgb, alpha, inner, fill_c)
    if brand or rng.random() < 0.5:
        _draw_logo(rng, rgb, alpha, w, c - in_half, c - in_half, in_half, brand, outer_c, ring_c)
    return in_half * rng.uniform(1.25, 1.5), ink


def _draw_logo(
    rng: np.random.Generator,
    rgb: np.ndarray,
    alpha: np.ndarray,
    w: int,
    x0: float,
    y0: float,
    in_half: float,
    brand: bool,
    c1: np.ndarray,
    c2: np.ndarray,
) -> None:
    """Small mark in the frame's top-left corner: the brand's orange disc with a teal leaf."""
    r = in_half * 0.17
    cx, cy = x0 + r * 1.3, y0 + r * 1.3
    disc = _shape_mask(w, lambda dr: dr.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255))
    if brand:
        _paint(rgb, alpha, disc, _jitter(rng, BRAND_ORANGE, 8))
        leaf = [
            (cx - r * 0.5, cy + r * 0.45),
            (cx + r * 0.55, cy - r * 0.55),
            (cx + r * 0.1, cy + r * 0.5),
        ]
        _paint(
            rgb,
            alpha,
            _shape_mask(w, lambda dr: dr.polygon(leaf, fill=255)),
            _jitter(rng, BRAND_TEAL, 8),
        )
    else:  # another shop's mark: a square or disc in its own colours
        if rng.random() < 0.5:
            disc = _shape_mask(
                w, lambda dr: dr.rectangle([cx - r, cy - r, cx + r, cy + r], fill=255)
            )
        _paint(rgb, alpha, disc, c2 if rng.random() < 0.5 else c1)


# ---- glyphs ---------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _font(path: str, index: int, px: int) -> ImageFont.FreeTypeFont:
    # BASIC layout: raqm may or may not be installed, and must not change the bytes.
    return ImageFont.truetype(path, px, index=index, layout_engine=ImageFont.Layout.BASIC)


@lru_cache(maxsize=4096)
def _glyph_image(path: str, index: int, char: str, px: int) -> Image.Image:
    """The character rendered white on black and cropped to its ink (cached: fonts are slow)."""
    font = _font(path, index, px)
    img = Image.new("L", (px * 2, px * 2), 0)
    ImageDraw.Draw(img).text((px, px), char, fill=255, font=font, anchor="mm")
    bbox = img.getbbox()
    if bbox is None:
        raise SaofuError(f"font {path} (face {index}) draws no ink for {char!r}")
    return img.crop(bbox)


def _glyph_mask(
    rng: np.random.Generator,
    style: str,
    char: str,
    font: FontFace,
    w: int,
    box: float,
    d: float,
) -> np.ndarray:
    """The styled character as a (w, w) 0..1 mask, upright, centred in its box."""
    glyph = _glyph_image(font.path, font.index, char, w)
    scale = box / max(glyph.size)
    gw, gh = max(1, round(glyph.size[0] * scale)), max(1, round(glyph.size[1] * scale))
    glyph = glyph.resize((gw, gh), Image.Resampling.BILINEAR)
    if style == "handwritten":
        glyph = _mesh_warp(rng, glyph, amp=box * (0.025 + 0.05 * d))
    canvas = Image.new("L", (w, w), 0)
    shift = (
        rng.uniform(-0.04, 0.04, 2) * w if style in ("print", "brush", "handwritten") else (0, 0)
    )
    canvas.paste(
        glyph, (int((w - glyph.size[0]) / 2 + shift[0]), int((w - glyph.size[1]) / 2 + shift[1]))
    )
    if style == "brush":
        return _brush(rng, canvas, w, d)
    # faux bold: door 福 are heavy calligraphy, and some print is bold
    if (style == "red_diamond" and rng.random() < 0.5) or (
        style == "print" and rng.random() < 0.25
    ):
        canvas = canvas.filter(ImageFilter.MaxFilter(3))
    return np.asarray(canvas, np.float32) / 255


def _mesh_warp(rng: np.random.Generator, glyph: Image.Image, amp: float) -> Image.Image:
    """Elastic wobble of a hand-drawn character: a 4x4 mesh with jittered source vertices."""
    pad = math.ceil(amp) + 1
    src = Image.new("L", (glyph.size[0] + 2 * pad, glyph.size[1] + 2 * pad), 0)
    src.paste(glyph, (pad, pad))
    n = 4
    sw, sh = src.size
    xs = np.linspace(0, sw, n + 1)
    ys = np.linspace(0, sh, n + 1)
    # shared vertex offsets keep the warp continuous across cells
    off = rng.uniform(-amp, amp, (n + 1, n + 1, 2))
    off[0, :, :] = off[-1, :, :] = off[:, 0, :] = off[:, -1, :] = 0

    def vertex(col: int, row: int) -> tuple[float, float]:
        return (xs[col] + off[row, col, 0], ys[row] + off[row, col, 1])

    data = []  # per output cell: its box, and the source quad (UL, LL, LR, UR) it samples
    for j in range(n):
        for i in range(n):
            quad = (*vertex(i, j), *vertex(i, j + 1), *vertex(i + 1, j + 1), *vertex(i + 1, j))
            data.append(((int(xs[i]), int(ys[j]), int(xs[i + 1]), int(ys[j + 1])), quad))
    return src.transform(src.size, Image.Transform.MESH, data, resample=Image.Resampling.BILINEAR)


def _brush(rng: np.random.Generator, canvas: Image.Image, w: int, d: float) -> np.ndarray:
    """Thick, rough-edged ink with dry-brush streaks (飞白)."""
    k = int(rng.choice([3, 5])) if w >= 96 else 3
    thick = canvas.filter(ImageFilter.MaxFilter(k)).filter(ImageFilter.GaussianBlur(w / 100))
    m = np.asarray(thick, np.float32) / 255
    cells = max(4, w // 6)
    rough = (_lowfreq(rng, w, cells) - 0.5) * rng.uniform(0.3, 0.6 + 0.4 * d)
    m = np.clip((m - 0.5 + rough) * 4 + 0.5, 0, 1)
    if rng.random() < 0.5 + 0.3 * d:
        rows = Image.fromarray(rng.random((w // 4, 1)).astype(np.float32)).resize(
            (1, w), Image.Resampling.BILINEAR
        )
        gaps = np.asarray(rows)[:, 0] > rng.uniform(0.75, 0.9)
        streaks = 1 - 0.7 * gaps[:, None] * (rng.random((w, w)) < 0.6)
        if rng.random() < 0.5:
            streaks = streaks.T
        m = m * streaks
    return m.astype(np.float32)

