"""Rendering one Fu-world crop: the background, the upright foreground (`styles.py`) placed in the
scene (rotation, scale, off-centre, perspective), occlusion, photometric degradations (shadow, glare,
low light) and the finish (blur, downsampling, sensor noise, JPEG).

Every draw comes from the image's own generator in a fixed order, so moving code between these
modules must keep the call order of `render_crop` unchanged or the bytes of every world change.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from saofu.errors import SaofuError
from tasks.data.fonts import FontFace
from tasks.data.fu_world.styles import (
    FU_CLASS,
    MERCHANT_CLASS,
    NOT_FU_CLASS,
    _choose_content,
    _foreground,
    _jitter,
    _lowfreq,
)

if TYPE_CHECKING:  # annotation only: world.py imports this module
    from tasks.data.fu_world.world import WorldConfig


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
