"""The Fu world: a deterministic generator of 福 recognition crops.

Classes (ImageFolder order): `fu` (福 in print, brush, gold-on-red-diamond, handwritten and framed
styles), `not_fu` (look-alikes sharing 福's parts, other festive characters, plain textures, all in
the same styles so style never gives the class away) and, when `WorldConfig.merchant` is on,
`fu_merchant` (福 inside one merchant's teal/orange frame with its logo mark; `not_fu` then also
gets that frame around other characters, so the frame alone is not enough).

Every image comes from its own RNG seeded by (seed, index), so bytes do not depend on generation
order or on how many processes draw them. Train and val crops use train-split fonts only, test
crops test-split fonts only (`tasks.data.fonts.split_fonts`), so the test split measures generalisation
to unseen font designs.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import multiprocessing
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from saofu.errors import SaofuError
from tasks.data.fonts import (
    FESTIVE_SLOTS,
    FU,
    LOOKALIKE_SLOTS,
    OPTIONAL_FESTIVE,
    OPTIONAL_LOOKALIKES,
    FontFace,
    design_lineage,
    discover_fonts,
    face_charset,
    prime_charsets,
    split_fonts,
)

GENERATOR_VERSION = 1
FU_CLASS = "fu"
NOT_FU_CLASS = "not_fu"
MERCHANT_CLASS = "fu_merchant"
SPLITS: tuple[str, str, str] = ("train", "val", "test")
MANIFEST_COLUMNS = ("path", "label", "split", "source", "sha256", "font_group", "style", "char")

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
# Parallel generation pays for its start-up only from here on.
POOL_MIN_IMAGES = 2000

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

_IMAGE_STREAM = 1  # SeedSequence spawn keys: one namespace for images, one for the plan
_PLAN_STREAM = 0


@dataclass
class WorldConfig:
    """Everything that determines a Fu world; the same config gives the same bytes.

    Attributes:
        n: total number of images over all splits.
        seed: master seed.
        image_size: side of the square RGB crops, in pixels.
        merchant: add the `fu_merchant` class (and merchant-frame decoys in `not_fu`).
        splits: shares of (train, val, test); all positive, summing to 1.
        class_weights: share of each class; None means equal shares of fu and not_fu, plus
            fu_merchant at 0.2 when `merchant` is on.
        difficulty: 0..1, scales the probability and strength of every degradation (rotation,
            perspective, blur, glare, noise, JPEG, low light, occlusion, clutter, jitter).
        lookalike_share: share of not_fu crops showing a look-alike of 福 (副 幅 富 禄 ...).
        texture_share: share of not_fu crops with no character at all (paper, red paper, an empty
            diamond or frame); the rest are other festive characters (春 喜 寿 ...).
        test_groups: font groups to hold out for the test split; None uses the default split.
    """

    n: int = 4000
    seed: int = 0
    image_size: int = 64
    merchant: bool = False
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15)
    class_weights: dict[str, float] | None = None
    difficulty: float = 0.3
    lookalike_share: float = 0.55
    texture_share: float = 0.15
    test_groups: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self.splits = tuple(float(s) for s in self.splits)  # type: ignore[assignment]
        if self.test_groups is not None:
            groups = [self.test_groups] if isinstance(self.test_groups, str) else self.test_groups
            self.test_groups = tuple(groups)
        self._validate()

    @property
    def classes(self) -> list[str]:
        """Class names in ImageFolder order (sorted)."""
        names = [FU_CLASS, NOT_FU_CLASS] + ([MERCHANT_CLASS] if self.merchant else [])
        return sorted(names)

    def resolved_class_weights(self) -> dict[str, float]:
        """Class shares, normalised to sum to 1, defaults filled in."""
        if self.class_weights is None:
            raw = {FU_CLASS: 0.5, NOT_FU_CLASS: 0.5}
            if self.merchant:
                raw = {FU_CLASS: 0.4, NOT_FU_CLASS: 0.4, MERCHANT_CLASS: 0.2}
        else:
            raw = dict(self.class_weights)
        total = sum(raw.values())
        return {c: raw[c] / total for c in self.classes}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldConfig:
        """Rebuild a config from `to_dict()` output (e.g. world.json's "config")."""
        data = dict(data)
        if data.get("test_groups") is not None:
            data["test_groups"] = tuple(data["test_groups"])
        data["splits"] = tuple(data.get("splits", (0.7, 0.15, 0.15)))
        return cls(**data)

    def _validate(self) -> None:
        """Refuse configs that cannot make a world, naming the bad field."""
        if not isinstance(self.n, int) or self.n < 1:
            raise SaofuError(f"WorldConfig.n must be a positive integer, got {self.n!r}")
        if not isinstance(self.image_size, int) or not 16 <= self.image_size <= 1024:
            raise SaofuError(f"WorldConfig.image_size must be 16..1024, got {self.image_size!r}")
        if len(self.splits) != 3 or any(s <= 0 for s in self.splits):
            raise SaofuError(
                f"WorldConfig.splits must be three positive shares (train, val, test), "
                f"got {self.splits}"
            )
        if abs(sum(self.splits) - 1.0) > 1e-6:
            raise SaofuError(f"WorldConfig.splits must sum to 1, got {self.splits}")
        if not 0.0 <= self.difficulty <= 1.0:
            raise SaofuError(f"WorldConfig.difficulty must be in [0, 1], got {self.difficulty}")
        shares = (self.lookalike_share, self.texture_share)
        if any(not 0.0 <= s <= 1.0 for s in shares) or sum(shares) > 1.0 + 1e-9:
            raise SaofuError(
                f"WorldConfig.lookalike_share ({self.lookalike_share}) and texture_share "
                f"({self.texture_share}) must be in [0, 1] and sum to at most 1"
            )
        if self.class_weights is not None:
            names = set(self.class_weights)
            if names != set(self.classes):
                raise SaofuError(
                    f"WorldConfig.class_weights must name exactly the classes {self.classes} "
                    f"(merchant={self.merchant}), got {sorted(names)}"
                )
            if any(w <= 0 for w in self.class_weights.values()):
                raise SaofuError(
                    f"WorldConfig.class_weights must be positive, got {self.class_weights}"
                )


@dataclass
class WorldSummary:
    """What `generate_world` wrote.

    Attributes:
        out_dir: the world's root folder.
        manifest: path of manifest.csv.
        counts: images per split and class, e.g. counts["test"]["fu"].
        train_font_groups: font groups used by train and val crops.
        test_font_groups: font groups used by test crops.
        world_json: path of world.json.
    """

    out_dir: Path
    manifest: Path
    counts: dict[str, dict[str, int]]
    train_font_groups: list[str]
    test_font_groups: list[str]
    world_json: Path | None = None


# --------------------------------------------------------------------------------------------
# Planning: which index is which split and class
# --------------------------------------------------------------------------------------------


def plan_world(cfg: WorldConfig) -> list[tuple[str, str]]:
    """Assign a (split, label) to every image index.

    Args:
        cfg: the world's config.

    Returns:
        A list of length cfg.n; entry i is (split, label) of image i, in a seeded shuffled order.

    Raises:
        SaofuError: n is too small to give every split every class.
    """
    split_counts = _largest_remainder(cfg.n, dict(zip(SPLITS, cfg.splits)))
    weights = cfg.resolved_class_weights()
    entries: list[tuple[str, str]] = []
    for split in SPLITS:
        class_counts = _largest_remainder(split_counts[split], weights)
        empty = [c for c, k in class_counts.items() if k == 0]
        if empty:
            raise SaofuError(
                f"WorldConfig.n={cfg.n} is too small: split '{split}' would get "
                f"{split_counts[split]} images and no '{empty[0]}'; every split needs every "
                f"class, so raise n (to at least {_min_n(cfg)})"
            )
        for label in cfg.classes:
            entries += [(split, label)] * class_counts[label]
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(_PLAN_STREAM,)))
    order = rng.permutation(len(entries))
    return [entries[i] for i in order]


def _largest_remainder(total: int, shares: dict[str, float]) -> dict[str, int]:
    """Split an integer total by shares so the parts sum exactly to total (ties: dict order)."""
    norm = sum(shares.values())
    exact = {k: total * v / norm for k, v in shares.items()}
    counts = {k: math.floor(x) for k, x in exact.items()}
    left = total - sum(counts.values())
    by_remainder = sorted(exact, key=lambda k: -(exact[k] - counts[k]))
    for k in by_remainder[:left]:
        counts[k] += 1
    return counts


def _min_n(cfg: WorldConfig) -> int:
    """Smallest n that gives every split every class (searched, the formula is fiddly)."""
    for n in range(len(cfg.classes) * 3, 100_000):
        split_counts = _largest_remainder(n, dict(zip(SPLITS, cfg.splits)))
        weights = cfg.resolved_class_weights()
        if all(min(_largest_remainder(split_counts[s], weights).values()) > 0 for s in SPLITS):
            return n
    return 100_000


# --------------------------------------------------------------------------------------------
# One crop
# --------------------------------------------------------------------------------------------


def render_crop(
    rng: np.random.Generator,
    label: str,
    font: FontFace,
    cfg: WorldConfig,
    *,
    lighting: float = 0.0,
) -> tuple[Image.Image, dict[str, Any]]:
    """Draw one crop of class `label`.

    Args:
        rng: the image's own generator; all randomness comes from it.
        label: "fu", "not_fu" or "fu_merchant".
        font: face to draw the character with (texture crops draw none).
        cfg: supplies image_size, difficulty, lookalike/texture shares and the merchant switch.
        lighting: 0..1 extra darkness and sensor noise on top of the difficulty-driven low light
            (the stream simulator's evening drift).

    Returns:
        (RGB image of cfg.image_size squared, record) where the record holds label, style,
        char ("" for textures), font group and family ("" when no character was drawn),
        background, rotation, scale and the list of degradations applied.
    """
    if label not in (FU_CLASS, NOT_FU_CLASS, MERCHANT_CLASS):
        raise SaofuError(f"unknown Fu-world label {label!r}; expected fu, not_fu or fu_merchant")
    size = cfg.image_size
    work = 2 * size  # draw at twice the size: cheap anti-aliasing of masks and shapes
    d = cfg.difficulty
    style, char = _choose_content(rng, label, font, cfg)
    record: dict[str, Any] = {
        "label": label,
        "style": style,
        "char": char,
        "font_group": font.group if char else "",
        "font_family": font.family if char else "",
        "degradations": [],
    }
    bg, bg_kind = _background(rng, style, work, d)
    record["background"] = bg_kind
    if bg_kind == "clutter":
        record["degradations"].append("clutter")
    fg, glyph_box = _foreground(rng, style, char, font, work, bg, d, record)
    img = _place(rng, fg, bg, work, d, record)
    img = _occlude(rng, img, work, glyph_box, d, record)
    img = _photometric(rng, img, work, d, lighting, record)
    out = _finish(rng, img, size, d, lighting, record)
    return out, record


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


# ---- backgrounds ---------------------------------------------------------------------------

# Background kinds each style is seen on (name -> weight). Clutter is added with difficulty.
_BACKGROUNDS: dict[str, dict[str, float]] = {
    "print": {"paper": 0.45, "wall": 0.2, "gradient": 0.2, "fabric": 0.15},
    "brush": {"red_paper": 0.45, "paper": 0.35, "wall": 0.1, "wood": 0.1},
    "red_diamond": {"wood": 0.35, "wall": 0.3, "fabric": 0.15, "paper": 0.1, "gradient": 0.1},
    "handwritten": {"notebook": 0.45, "paper": 0.3, "wall": 0.1, "gradient": 0.15},
    "framed": {"wall": 0.3, "gradient": 0.25, "wood": 0.15, "fabric": 0.15, "paper": 0.15},
    "merchant": {"wall": 0.3, "gradient": 0.25, "wood": 0.15, "fabric": 0.15, "paper": 0.15},
}


def _background(rng: np.random.Generator, style: str, w: int, d: float) -> tuple[np.ndarray, str]:
    """A (w, w, 3) float32 background in 0..255 and its kind."""
    if rng.random() < 0.4 * d:
        kind = "clutter"
    else:
        kinds = _BACKGROUNDS[style]
        names = list(kinds)
        p = np.array([kinds[k] for k in names])
        kind = names[int(rng.choice(len(names), p=p / p.sum()))]
    maker = {
        "paper": _bg_paper,
        "red_paper": _bg_red_paper,
        "wall": _bg_wall,
        "wood": _bg_wood,
        "fabric": _bg_fabric,
        "gradient": _bg_gradient,
        "notebook": _bg_notebook,
        "clutter": _bg_clutter,
    }[kind]
    return np.clip(maker(rng, w), 0, 255).astype(np.float32), kind


def _lowfreq(rng: np.random.Generator, w: int, cells: int) -> np.ndarray:
    """Smooth noise in about 0..1: a cells x cells random grid upsampled bicubically."""
    small = Image.fromarray(rng.random((cells, cells)).astype(np.float32))
    return np.asarray(small.resize((w, w), Image.Resampling.BICUBIC))


def _jitter(rng: np.random.Generator, base: Sequence[float], amount: float) -> np.ndarray:
    return np.clip(np.asarray(base, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def _bg_paper(rng: np.random.Generator, w: int) -> np.ndarray:
    bases = ((246, 244, 238), (240, 230, 205), (228, 228, 224), (250, 240, 225))
    base = _jitter(rng, bases[int(rng.integers(len(bases)))], 10)
    mottle = (_lowfreq(rng, w, 5) - 0.5) * rng.uniform(6, 22)
    grain = rng.normal(0, rng.uniform(1, 5), (w, w)).astype(np.float32)
    return base + (mottle + grain)[..., None]


def _bg_red_paper(rng: np.random.Generator, w: int) -> np.ndarray:
    base = _jitter(rng, (200, 25, 35), 25)
    img = base + ((_lowfreq(rng, w, 6) - 0.5) * rng.uniform(10, 35))[..., None]
    if rng.random() < 0.5:  # gold flecks of 洒金 paper
        flecks = rng.random((w, w)) < rng.uniform(0.003, 0.02)
        img[flecks] = _jitter(rng, (230, 190, 90), 20)
    return img


def _bg_wall(rng: np.random.Generator, w: int) -> np.ndarray:
    base = _jitter(rng, (rng.uniform(120, 225),) * 3, 25)
    return base + ((_lowfreq(rng, w, 4) - 0.5) * rng.uniform(10, 40))[..., None]


def _bg_wood(rng: np.random.Generator, w: int) -> np.ndarray:
    bases = ((120, 70, 35), (150, 95, 50), (90, 45, 25), (160, 30, 30))  # last: red-lacquer door
    base = _jitter(rng, bases[int(rng.integers(len(bases)))], 15)
    x = np.arange(w, dtype=np.float32)[None, :]
    warp = _lowfreq(rng, w, 3) * rng.uniform(5, 25)
    period = rng.uniform(4, 14)
    grain = np.sin((x + warp) * 2 * np.pi / period) * rng.uniform(5, 18)
    if rng.random() < 0.5:  # grain runs either way depending on the door
        grain = grain.T
    return base + grain[..., None]


def _bg_fabric(rng: np.random.Generator, w: int) -> np.ndarray:
    base = _jitter(rng, rng.uniform(40, 230, 3), 0)
    p = rng.uniform(2.5, 6)
    yy, xx = np.mgrid[0:w, 0:w].astype(np.float32)
    weave = (np.sin(2 * np.pi * xx / p) * np.sin(2 * np.pi * yy / p)) * rng.uniform(6, 20)
    folds = (_lowfreq(rng, w, 3) - 0.5) * rng.uniform(20, 60)
    return base + (weave + folds)[..., None]


def _bg_gradient(rng: np.random.Generator, w: int) -> np.ndarray:
    c0, c1 = rng.uniform(30, 250, 3), rng.uniform(30, 250, 3)
    phi = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:w, 0:w].astype(np.float32) / w
    t = np.clip((xx - 0.5) * np.cos(phi) + (yy - 0.5) * np.sin(phi) + 0.5, 0, 1)[..., None]
    return (c0 * (1 - t) + c1 * t).astype(np.float32)


def _bg_notebook(rng: np.random.Generator, w: int) -> np.ndarray:
    img = _bg_paper(rng, w)
    gap = rng.uniform(w / 8, w / 4)
    offset = rng.uniform(0, gap)
    rows = np.arange(w)
    lines = np.abs((rows - offset) % gap) < max(1.0, w / 96)
    img[lines, :, :] = img[lines, :, :] * 0.6 + np.float32([120, 160, 220]) * 0.4
    if rng.random() < 0.4:  # red margin line
        col = int(rng.uniform(0.05, 0.3) * w)
        img[:, col : col + max(1, w // 96), :] = np.float32([210, 90, 90])
    return img


def _bg_clutter(rng: np.random.Generator, w: int) -> np.ndarray:
    """Busy scene: random shapes and stroke-like lines over a plain base."""
    base = _bg_wall(rng, w) if rng.random() < 0.5 else _bg_gradient(rng, w)
    pil = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(5, 14))):
        colour = tuple(int(c) for c in rng.uniform(0, 255, 3))
        x0, y0, x1, y1 = (rng.uniform(-0.2, 1.2, 4) * w).tolist()
        box = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
        kind = rng.random()
        if kind < 0.3:
            draw.rectangle(box, fill=colour)
        elif kind < 0.55:
            draw.ellipse(box, fill=colour)
        else:  # strokes: the things a character is made of, so strokes alone prove nothing
            draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(1, max(2, w // 14))))
    return np.asarray(pil, np.float32)


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


# ---- geometry: rotation, scale, off-centre, perspective ------------------------------------


def _place(
    rng: np.random.Generator,
    fg: Image.Image,
    bg: np.ndarray,
    w: int,
    d: float,
    record: dict[str, Any],
) -> np.ndarray:
    """Warp the upright foreground into the scene and composite it over the background."""
    angle = float(np.clip(rng.normal(0, 4 + 12 * d), -30, 30))
    if rng.random() < 0.15 * d:  # hung upside down on the door: still 福
        angle += 180
        record["degradations"].append("upside_down")
    scale = rng.uniform(1 - 0.35 * d, 1 + 0.12 * d)
    shift = rng.uniform(-1, 1, 2) * 0.15 * d * w
    jitter = np.zeros((4, 2))
    if rng.random() < 0.6 * d:
        jitter = rng.uniform(-1, 1, (4, 2)) * 0.12 * d * w
        record["degradations"].append("perspective")
    record.update(rotation=round(angle, 2), scale=round(float(scale), 3))
    src = np.array([[0, 0], [w, 0], [w, w], [0, w]], np.float64)
    c = np.array([w / 2, w / 2])
    t = math.radians(angle)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    dst = (src - c) @ rot.T * scale + c + shift + jitter
    coeffs = _homography(dst, src)  # PIL maps output pixels back to input pixels
    fill = fg.getpixel((0, 0))[:3] + (0,)
    warped = fg.transform(
        (w, w), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BILINEAR, fillcolor=fill
    )
    arr = np.asarray(warped, np.float32)
    a = arr[..., 3:4] / 255
    record["_centre"] = (c + shift).tolist()
    record["_scale"] = scale
    return bg * (1 - a) + arr[..., :3] * a


def _homography(frm: np.ndarray, to: np.ndarray) -> tuple[float, ...]:
    """8 coefficients of the projective map taking points `frm` to points `to`."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(frm, to):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return tuple(np.linalg.solve(np.array(rows), np.array(rhs)).tolist())


# ---- occlusion and photometric degradations -----------------------------------------------

_SKIN = ((224, 172, 140), (198, 134, 96), (241, 194, 160), (141, 85, 54), (255, 205, 178))


def _occlude(
    rng: np.random.Generator,
    img: np.ndarray,
    w: int,
    glyph_box: float,
    d: float,
    record: dict[str, Any],
) -> np.ndarray:
    """Cover part of the character with a finger or an object, never most of it."""
    centre = np.array(record.pop("_centre"))
    radius = glyph_box * record.pop("_scale") / 2
    if rng.random() >= 0.3 * d:
        return img
    side = rng.uniform(0, 2 * np.pi)
    direction = np.array([math.cos(side), math.sin(side)])
    # the occluder reaches from outside to 45-85% of the glyph radius from the far edge
    tip = centre + direction * radius * rng.uniform(0.35, 0.75)
    if rng.random() < 0.6:
        width = w * rng.uniform(0.18, 0.3)
        start = tip + direction * w
        mask_img = Image.new("L", (w, w), 0)
        dr = ImageDraw.Draw(mask_img)
        dr.line([*start, *tip], fill=255, width=int(width))
        dr.ellipse(
            [tip[0] - width / 2, tip[1] - width / 2, tip[0] + width / 2, tip[1] + width / 2],
            fill=255,
        )
        mask_img = mask_img.filter(ImageFilter.GaussianBlur(w * rng.uniform(0.01, 0.03)))
        colour = _jitter(rng, _SKIN[int(rng.integers(len(_SKIN)))], 12)
        shade = 0.8 + 0.3 * _lowfreq(rng, w, 3)[..., None]  # a finger is rounded, not flat
        paint = colour * shade
        record["degradations"].append("occlusion_finger")
    else:
        normal = np.array([-direction[1], direction[0]])
        half_len = w
        depth = w
        pts = [
            tip + normal * half_len,
            tip - normal * half_len,
            tip - normal * half_len + direction * depth,
            tip + normal * half_len + direction * depth,
        ]
        mask_img = Image.new("L", (w, w), 0)
        ImageDraw.Draw(mask_img).polygon([tuple(p) for p in pts], fill=255)
        paint = (
            _jitter(rng, rng.uniform(20, 240, 3), 0) + ((_lowfreq(rng, w, 4) - 0.5) * 20)[..., None]
        )
        record["degradations"].append("occlusion_rect")
    m = np.asarray(mask_img, np.float32)[..., None] / 255
    return img * (1 - m) + paint * m


def _photometric(
    rng: np.random.Generator,
    img: np.ndarray,
    w: int,
    d: float,
    lighting: float,
    record: dict[str, Any],
) -> np.ndarray:
    """Shadows, glare and low light on the composed scene (float, 0..255)."""
    degr = record["degradations"]
    yy, xx = np.mgrid[0:w, 0:w].astype(np.float32) / w
    if rng.random() < 0.4 * d:  # cast shadow / uneven light: a linear ramp
        phi = rng.uniform(0, 2 * np.pi)
        ramp = np.clip((xx - 0.5) * np.cos(phi) + (yy - 0.5) * np.sin(phi) + 0.5, 0, 1)
        img = img * (1 - rng.uniform(0.2, 0.2 + 0.45 * d) * ramp)[..., None]
        degr.append("shadow")
    if rng.random() < 0.35 * d:  # specular glare on glossy paper or a screen
        gx, gy = rng.uniform(0.15, 0.85, 2)
        sigma = rng.uniform(0.08, 0.25)
        blob = np.exp(-((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * sigma**2))
        strength = rng.uniform(120, 160 + 160 * d)
        img = img + (blob * strength)[..., None] * np.float32([1.0, 0.98, 0.92])
        degr.append("glare")
    dark = rng.uniform(0.3, 0.3 + 0.5 * d) if rng.random() < 0.35 * d else 0.0
    dark = max(dark, lighting * rng.uniform(0.7, 1.0))
    if dark > 0:
        cast = np.float32([1.0, 0.95, 0.8]) if rng.random() < 0.5 else np.float32([0.85, 0.9, 1.0])
        img = img * (1 - 0.8 * dark) * cast
        degr.append("low_light")
        record["_dark"] = dark
    return np.clip(img, 0, 255)


def _finish(
    rng: np.random.Generator,
    img: np.ndarray,
    size: int,
    d: float,
    lighting: float,
    record: dict[str, Any],
) -> Image.Image:
    """Blur, downsample to the output size, add sensor noise and JPEG artefacts."""
    degr = record["degradations"]
    w = img.shape[0]
    pil = Image.fromarray(img.astype(np.uint8), "RGB")
    if rng.random() < 0.5 * d:
        pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.3 + 2.4 * d) * w / 128))
        degr.append("blur")
    elif rng.random() < 0.2 * d:  # hand shake: a 5-tap line kernel along a random axis
        kernels = {
            "h": [0] * 10 + [1] * 5 + [0] * 10,
            "v": ([0, 0, 1, 0, 0] * 5),
            "d": [1 if i % 6 == 0 else 0 for i in range(25)],
        }
        kernel = kernels[("h", "v", "d")[int(rng.integers(3))]]
        pil = pil.filter(ImageFilter.Kernel((5, 5), kernel, scale=sum(kernel)))
        degr.append("motion_blur")
    pil = pil.resize((size, size), Image.Resampling.BILINEAR)
    dark = record.pop("_dark", 0.0)
    sigma = 0.0
    if rng.random() < 0.6 * d:
        sigma = rng.uniform(1, 2 + 12 * d)
        degr.append("noise")
    sigma += 25 * dark * max(d, lighting)  # a dark frame is a noisy frame
    if sigma > 0:
        arr = np.asarray(pil, np.float32) + rng.normal(0, sigma, (size, size, 3))
        pil = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.5 * d:
        quality = int(rng.uniform(95 - 75 * d, 95))
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        pil = Image.open(buf).convert("RGB")
        degr.append("jpeg")
        record["jpeg_quality"] = quality
    return pil


# --------------------------------------------------------------------------------------------
# The world on disk
# --------------------------------------------------------------------------------------------


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The independent generator of image `index`: same (seed, index), same image."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_IMAGE_STREAM, index)))


def pick_face(rng: np.random.Generator, faces: Sequence[FontFace]) -> FontFace:
    """A group uniformly, then a face of it: a family with 10 regional faces is not 10x likelier."""
    groups = sorted({f.group for f in faces})
    group = groups[int(rng.integers(len(groups)))]
    members = [f for f in faces if f.group == group]
    return members[int(rng.integers(len(members)))]


def png_bytes(img: Image.Image) -> bytes:
    """PNG bytes with no metadata chunks (no time stamps), so equal pixels give equal bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def generate_world(
    out_dir: str | os.PathLike[str],
    cfg: WorldConfig,
    progress: Callable[[int, int], None] | None = None,
    *,
    workers: int | None = None,
) -> WorldSummary:
    """Write a Fu world as an ImageFolder tree with a manifest.

    Layout: out_dir/{train,val,test}/{class}/{index:06d}.png, out_dir/manifest.csv (path, label,
    split, source, sha256, font_group, style, char) and out_dir/world.json (config, classes, font
    split, counts).

    Args:
        out_dir: target folder; may exist if empty or holding the same world (same config).
        cfg: the world's config.
        progress: called as progress(done, total) about every 5% and at the end.
        workers: processes to draw with; None uses all CPUs when cfg.n >= 2000, 0 or 1 draws in
            this process. The bytes are the same either way.

    Returns:
        A WorldSummary.

    Raises:
        SaofuError: n too small for every split to hold every class, unknown test font group,
            no usable fonts, or out_dir holding something else.
    """
    out = Path(out_dir)
    plan = plan_world(cfg)  # fails fast, before touching the disk
    faces = discover_fonts()
    train_faces, test_faces = split_fonts(faces, cfg.test_groups)
    world = _world_record(cfg, plan, train_faces, test_faces)
    _claim_out_dir(out, world)
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        for label in cfg.classes:
            (out / split / label).mkdir(parents=True, exist_ok=True)
    _write_json(out / "world.json", {**world, "complete": False})

    jobs = [(i, split, label) for i, (split, label) in enumerate(plan)]
    chunk = max(1, min(250, len(jobs) // 40 or 1))
    chunks = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
    charsets = {(f.path, f.index): face_charset(f) for f in faces}
    state = (cfg.to_dict(), train_faces, test_faces, charsets, str(out))
    n_workers = _worker_count(cfg.n, workers)
    rows: list[dict[str, str]] = []
    reporter = _Progress(progress, len(jobs))
    if n_workers <= 1:
        _init_worker(*state)
        for part in chunks:
            rows += _render_chunk(part)
            reporter.update(len(rows))
    else:
        ctx = multiprocessing.get_context("spawn")  # fork is unsafe in threaded callers
        with ctx.Pool(n_workers, initializer=_init_worker, initargs=state) as pool:
            for part_rows in pool.imap(_render_chunk, chunks):
                rows += part_rows
                reporter.update(len(rows))
    reporter.finish()

    rows.sort(key=lambda r: r["path"])
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    _write_json(out / "world.json", {**world, "complete": True})
    return WorldSummary(
        out_dir=out,
        manifest=manifest,
        counts=world["counts"],
        train_font_groups=world["fonts"]["train_groups"],
        test_font_groups=world["fonts"]["test_groups"],
        world_json=out / "world.json",
    )


def is_same_world(out_dir: str | os.PathLike[str], cfg: WorldConfig) -> bool:
    """True if out_dir holds a complete world generated from this exact config.

    Args:
        out_dir: a folder that may hold a Fu world.
        cfg: the config to compare with.

    Returns:
        Whether world.json exists, says the generation completed, and has the same config and
        generator version (then regenerating would rewrite the same bytes).
    """
    meta = Path(out_dir) / "world.json"
    try:
        old = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return (
        old.get("complete") is True
        and old.get("generator_version") == GENERATOR_VERSION
        and old.get("config") == cfg.to_dict()
    )


def _world_record(
    cfg: WorldConfig,
    plan: list[tuple[str, str]],
    train_faces: list[FontFace],
    test_faces: list[FontFace],
) -> dict[str, Any]:
    """world.json's content: no absolute paths or times, so two copies of a world compare equal."""
    counts = {s: {c: 0 for c in cfg.classes} for s in SPLITS}
    for split, label in plan:
        counts[split][label] += 1

    def faces_json(faces: list[FontFace]) -> list[dict[str, Any]]:
        return [
            {"file": Path(f.path).name, "index": f.index, "family": f.family, "group": f.group}
            for f in faces
        ]

    return {
        "generator": "tasks.fu_world",
        "generator_version": GENERATOR_VERSION,
        "config": cfg.to_dict(),
        "classes": cfg.classes,
        "splits": list(SPLITS),
        "counts": counts,
        "fonts": {
            "train_groups": sorted({f.group for f in train_faces}),
            "test_groups": sorted({f.group for f in test_faces}),
            "train_lineages": sorted({design_lineage(f.group) for f in train_faces}),
            "test_lineages": sorted({design_lineage(f.group) for f in test_faces}),
            "train_faces": faces_json(train_faces),
            "test_faces": faces_json(test_faces),
            "rule": "train and val crops use train fonts only; test crops use test fonts only",
        },
        "pillow_version": PIL.__version__,
        "numpy_version": np.__version__,
    }


def _claim_out_dir(out: Path, world: dict[str, Any]) -> None:
    """Allow an empty/new folder or the same world; refuse anything else, naming why."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SaofuError(f"Fu world out_dir {out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    meta = out / "world.json"
    if not meta.is_file():
        raise SaofuError(
            f"Fu world out_dir {out} is not empty and holds no world.json; "
            f"choose an empty or new folder"
        )
    try:
        old = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SaofuError(f"Fu world out_dir {out} has an unreadable world.json: {exc}") from exc
    old_cfg = old.get("config", {})
    new_cfg = world["config"]
    differing = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
    if old.get("generator_version") != world["generator_version"]:
        differing.append("generator_version")
    if differing:
        raise SaofuError(
            f"Fu world out_dir {out} holds a different world (differs in {', '.join(differing)}); "
            f"choose another folder or delete it first"
        )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _worker_count(n: int, workers: int | None) -> int:
    if workers is not None:
        return max(1, workers)
    if n < POOL_MIN_IMAGES:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus)


class _Progress:
    """Calls the user's callback about every 5% of the work, and once at the end."""

    def __init__(self, callback: Callable[[int, int], None] | None, total: int) -> None:
        self.callback = callback
        self.total = total
        self.step = max(1, total // 20)
        self.next = self.step
        self.last = -1

    def update(self, done: int) -> None:
        if self.callback is not None and done >= self.next and done < self.total:
            self.callback(done, self.total)
            self.last = done
            self.next = (done // self.step + 1) * self.step

    def finish(self) -> None:
        if self.callback is not None and self.last != self.total:
            self.callback(self.total, self.total)


# Per-process state of the drawing workers (set once by the pool initializer).
_WORKER: dict[str, Any] = {}


def _init_worker(
    cfg_dict: dict[str, Any],
    train_faces: list[FontFace],
    test_faces: list[FontFace],
    charsets: dict[tuple[str, int], frozenset[str]],
    out_dir: str,
) -> None:
    prime_charsets(charsets)
    _WORKER.update(
        cfg=WorldConfig.from_dict(cfg_dict),
        pools={"train": train_faces, "val": train_faces, "test": test_faces},
        out=Path(out_dir),
    )


def _render_chunk(jobs: list[tuple[int, str, str]]) -> list[dict[str, str]]:
    """Draw and write a batch of images; return their manifest rows."""
    cfg: WorldConfig = _WORKER["cfg"]
    out: Path = _WORKER["out"]
    rows = []
    for index, split, label in jobs:
        rng = image_rng(cfg.seed, index)
        face = pick_face(rng, _WORKER["pools"][split])
        img, record = render_crop(rng, label, face, cfg)
        data = png_bytes(img)
        rel = f"{split}/{label}/{index:06d}.png"
        (out / rel).write_bytes(data)
        rows.append(
            {
                "path": rel,
                "label": label,
                "split": split,
                "source": "generated",
                "sha256": hashlib.sha256(data).hexdigest(),
                "font_group": record["font_group"],
                "style": record["style"],
                "char": record["char"],
            }
        )
    return rows
