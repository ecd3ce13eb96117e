"""Find the CJK fonts installed on this machine, group them by design, and split them.

The Fu world renders every character from operating-system fonts (no downloads). Its test set must
measure generalisation to unseen *designs*, so fonts are grouped by design family and split by
group: the SC/TC/JP/KR variants of Noto Sans CJK are one design and never straddle the split.
Some families that look different by name are one design underneath (AR PL UKai is the AR PL
KaitiM design extended, WenQuanYi Micro Hei is Droid Sans Fallback, LXGW WenKai is Klee One); these
share a *lineage* (`design_lineage`) and the split keeps a lineage on one side too.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from saofu.errors import SaofuError

FU = "福"

# The characters the Fu-world generator draws, as slots of interchangeable forms: a slot is
# covered when the face has ANY of its forms (simplified 辐 or traditional 輻), so Japanese and
# traditional-Chinese fonts qualify without losing look-alikes. They live here, not in the
# generator, so discovery can check coverage without importing it.
LOOKALIKE_SLOTS: tuple[tuple[str, ...], ...] = (
    ("副",),
    ("幅",),
    ("富",),
    ("逼",),
    ("蝠",),
    ("辐", "輻"),
    ("禄", "祿"),
    ("祥",),
    ("祝",),
    ("神",),
)
FESTIVE_SLOTS: tuple[tuple[str, ...], ...] = (
    ("春",),
    ("喜",),
    ("寿", "壽"),
    ("财", "財"),
    ("禧",),
    ("吉",),
    ("发", "發"),
)
# Drawn only by faces that have them: many good fonts lack the lone radical or 囍, and requiring
# them would drop whole design families (all the Japanese ones).
OPTIONAL_LOOKALIKES: tuple[str, ...] = ("礻", "褔", "畐")
OPTIONAL_FESTIVE: tuple[str, ...] = ("囍",)

ALL_CHARS: tuple[str, ...] = tuple(
    dict.fromkeys(
        [FU]
        + [c for slot in LOOKALIKE_SLOTS + FESTIVE_SLOTS for c in slot]
        + list(OPTIONAL_LOOKALIKES + OPTIONAL_FESTIVE)
    )
)

DEFAULT_FONT_DIRS: tuple[str, ...] = (
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "~/.fonts",
    "~/.local/share/fonts",
)
FONT_DIRS_ENV = "SAOFU_FONT_DIRS"
FONT_SUFFIXES = (".ttf", ".ttc", ".otf")
FONT_PACKAGES = "fonts-noto-cjk fonts-arphic-ukai fonts-wqy-zenhei"

# (pattern on the squashed lower-case file stem, group). First match wins, so the more specific
# patterns come first. Squashing (dropping '-', '_', ' ') makes "NotoSansCJKsc-Regular",
# "NotoSansCJK-Bold" and "notosanscjk_tc" all match the same rule.
_GROUP_RULES: tuple[tuple[str, str], ...] = (
    (r"^(notosans|sourcehansans).*cjk|^sourcehansans", "noto-sans-cjk"),
    (r"^(notoserif|sourcehanserif).*cjk|^sourcehanserif", "noto-serif-cjk"),
    (r"ukai", "ukai"),
    (r"uming", "uming"),
    (r"^wqyzenhei|zenhei", "wqy-zenhei"),
    (r"^wqymicrohei|microhei", "wqy-microhei"),
    (r"^gkai", "gkai"),
    (r"^bkai", "bkai"),
    (r"^bsmi", "bsmi"),
    (r"^gbsn", "gbsn"),
    (r"^ipa(ex)?p?gp?$|^ipa(ex)?p?gothic", "ipa-gothic"),  # ipag, ipagp, ipaexg, IPAPGothic
    (r"^ipa(ex)?p?mp?$|^ipa(ex)?p?mincho", "ipa-mincho"),
    (r"^vl(p)?gothic", "vlgothic"),
    (r"^setofont|^seto", "seto"),
    (r"^klee", "klee"),
    (r"^lxgwwenkai", "lxgw-wenkai"),
    (r"^droidsansfallback", "droid"),
)

# Groups that carry one design under two names: the split keeps each lineage on one side, else
# the test set would hold near-copies of training glyphs. (UKai extends AR PL KaitiM; UMing
# extends AR PL Mingti2L / SungtiL; WenQuanYi Micro Hei is derived from Droid Sans Fallback;
# LXGW WenKai is derived from Klee One.)
_LINEAGE: dict[str, str] = {
    "ukai": "arphic-kai",
    "gkai": "arphic-kai",
    "bkai": "arphic-kai",
    "uming": "arphic-ming",
    "bsmi": "arphic-ming",
    "gbsn": "arphic-ming",
    "droid": "droid",
    "wqy-microhei": "droid",
    "klee": "klee",
    "lxgw-wenkai": "klee",
}

# Broad writing style per known group; the default split keeps every style present in train.
_STYLE: dict[str, str] = {
    "noto-sans-cjk": "sans",
    "wqy-zenhei": "sans",
    "wqy-microhei": "sans",
    "droid": "sans",
    "ipa-gothic": "sans",
    "vlgothic": "sans",
    "noto-serif-cjk": "serif",
    "uming": "serif",
    "bsmi": "serif",
    "gbsn": "serif",
    "ipa-mincho": "serif",
    "ukai": "kai",
    "gkai": "kai",
    "bkai": "kai",
    "lxgw-wenkai": "kai",
    "klee": "handwriting",
    "seto": "handwriting",
}

# Default held-out groups, in order: the ming/song lineage (UMing, with bsmi and gbsn it derives
# from: three font files), then kai, then handwriting, then more if the share asks for it. Each is
# expanded to its whole lineage. One lineage by default: holding out kai and the only other
# handwriting design as well left the campaign's own measure (accuracy at 0.9) near 85% for every
# model at the default budget, so model choice no longer showed (measured: README, "The Fu world").
TEST_GROUP_PREFERENCE: tuple[str, ...] = (
    "uming",
    "ukai",
    "seto",
    "vlgothic",
    "ipa-mincho",
    "wqy-zenhei",
    "gkai",
    "gbsn",
)

# Weight/width words stripped from unknown file stems so "FooSans-Bold" and "FooSans-Regular"
# land in one group.
_STYLE_WORDS = {
    "regular",
    "bold",
    "light",
    "medium",
    "thin",
    "black",
    "heavy",
    "semibold",
    "demibold",
    "extrabold",
    "extralight",
    "ultralight",
    "book",
    "italic",
    "oblique",
    "normal",
    "w3",
    "w5",
}


@dataclass(frozen=True)
class FontFace:
    """One face of a font file.

    Attributes:
        path: resolved path of the font file.
        index: face index inside a .ttc collection (0 for .ttf/.otf).
        family: human-readable face name, family and style as the font reports them.
        group: design family; regional variants and weights of one design share it.
    """

    path: str
    index: int
    family: str
    group: str


def font_group(path: str | os.PathLike[str]) -> str:
    """Design-family group of a font file, derived from its file name.

    Args:
        path: font file path (symlinks should be resolved first: the target's name is the real one).

    Returns:
        A known group such as "noto-sans-cjk" or "ukai"; for an unknown file, its stem in lower
        case with weight words dropped ("FooSans-Bold.ttf" -> "foosans").
    """
    stem = Path(path).stem.lower()
    squashed = re.sub(r"[^a-z0-9]", "", stem)
    for pattern, group in _GROUP_RULES:
        if re.search(pattern, squashed):
            return group
    words = [w for w in re.split(r"[^a-z0-9]+", stem) if w and w not in _STYLE_WORDS]
    return "-".join(words) or stem


def design_lineage(group: str) -> str:
    """The design a group derives from; groups of one lineage are never split apart."""
    return _LINEAGE.get(group, group)


def group_style(group: str) -> str:
    """Broad writing style of a group: "sans", "serif", "kai", "handwriting" or "unknown"."""
    return _STYLE.get(group, "unknown")


def font_dirs_searched(font_dirs: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The directories `discover_fonts` scans, in order, with ~ expanded.

    Args:
        font_dirs: explicit directories; None means the defaults plus `$SAOFU_FONT_DIRS`.

    Returns:
        Expanded directory paths (they need not exist).
    """
    if font_dirs is None:
        dirs = list(DEFAULT_FONT_DIRS)
        extra = os.environ.get(FONT_DIRS_ENV, "")
        dirs += [d for d in extra.split(":") if d]
    else:
        dirs = [str(d) for d in font_dirs]
    return [os.path.expanduser(d) for d in dirs]


def discover_fonts(font_dirs: list[str] | tuple[str, ...] | None = None) -> list[FontFace]:
    """Every installed face that can draw 福 and all the generator's look-alikes.

    A glyph counts only if rendering it differs from rendering the font's .notdef (tofu) and has
    ink, which is exactly what the generator will get. Results are cached per process and per
    directory list.

    Args:
        font_dirs: directories to scan recursively; None means /usr/share/fonts,
            /usr/local/share/fonts, ~/.fonts, ~/.local/share/fonts and `$SAOFU_FONT_DIRS`
            (colon-separated).

    Returns:
        Faces sorted by (group, path, index).

    Raises:
        SaofuError: no usable CJK face was found; the message names the directories searched and
            the Debian packages that provide such fonts.
    """
    dirs = tuple(font_dirs_searched(font_dirs))
    faces = _discover_cached(dirs)
    if not faces:
        raise SaofuError(
            f"no CJK font that can draw {FU} and its look-alikes was found in {', '.join(dirs)}; "
            f"install some (Debian/Ubuntu: apt-get install {FONT_PACKAGES}) or point "
            f"{FONT_DIRS_ENV} at a folder of .ttf/.ttc/.otf files"
        )
    return list(faces)


def face_charset(face: FontFace) -> frozenset[str]:
    """The characters of `ALL_CHARS` that this face really draws (cached per process).

    Args:
        face: a face, usually from `discover_fonts`.

    Returns:
        The subset of `ALL_CHARS` with a real glyph in the face.
    """
    key = (face.path, face.index)
    if key not in _CHARSETS:
        _CHARSETS[key] = _probe_charset(face.path, face.index)
    return _CHARSETS[key]


def prime_charsets(charsets: dict[tuple[str, int], frozenset[str]]) -> None:
    """Seed the charset cache, so worker processes skip re-probing fonts the parent probed."""
    _CHARSETS.update(charsets)


def split_fonts(
    faces: list[FontFace],
    test_groups: list[str] | tuple[str, ...] | None = None,
    test_share: float = 0.1,
) -> tuple[list[FontFace], list[FontFace]]:
    """Split faces into train and test by design group (whole lineages move together).

    Args:
        faces: faces to split, e.g. `discover_fonts()`.
        test_groups: groups to hold out; each pulls in the rest of its lineage (naming "ukai"
            also holds out "gkai"). None picks a default: `TEST_GROUP_PREFERENCE` first (the ming
            lineage, then kai, then handwriting), then the remaining lineages in a fixed hash order,
            never taking the last train lineage of a broad style, until about `test_share` of
            the lineages are held out.
        test_share: share of lineages to hold out when `test_groups` is None.

    Returns:
        (train_faces, test_faces), both non-empty and in the input's order.

    Raises:
        SaofuError: fewer than 2 lineages, an unknown test group, or a split leaving a side empty.
    """
    by_lineage: dict[str, set[str]] = {}
    for face in faces:
        by_lineage.setdefault(design_lineage(face.group), set()).add(face.group)
    if len(by_lineage) < 2:
        raise SaofuError(
            f"need fonts of at least 2 design groups to split train/test fonts, found "
            f"{sorted({f.group for f in faces}) or 'none'}; install more CJK fonts "
            f"(apt-get install {FONT_PACKAGES})"
        )
    if test_groups is not None:
        test_lineages = _lineages_of(test_groups, faces)
    else:
        if not 0.0 < test_share < 1.0:
            raise SaofuError(f"test_share must be in (0, 1), got {test_share}")
        test_lineages = _default_test_lineages(by_lineage, test_share)
    if len(test_lineages) == len(by_lineage):
        raise SaofuError(
            f"test_groups {sorted(test_groups or [])} hold out every font design; "
            f"leave at least one group for training"
        )
    train = [f for f in faces if design_lineage(f.group) not in test_lineages]
    test = [f for f in faces if design_lineage(f.group) in test_lineages]
    return train, test


def _lineages_of(test_groups: list[str] | tuple[str, ...], faces: list[FontFace]) -> set[str]:
    """Lineages named by `test_groups`, refusing groups no face belongs to."""
    known = sorted({f.group for f in faces})
    if isinstance(test_groups, str):
        test_groups = [test_groups]  # a bare string would otherwise split into letters
    unknown = [g for g in test_groups if g not in known]
    if unknown:
        raise SaofuError(f"unknown font test group(s) {unknown}; installed groups: {known}")
    if not test_groups:
        raise SaofuError("test_groups is empty; name at least one font group to hold out")
    return {design_lineage(g) for g in test_groups}


def _default_test_lineages(by_lineage: dict[str, set[str]], test_share: float) -> set[str]:
    """Pick held-out lineages: preferred ones first, then a fixed hash order."""
    n = len(by_lineage)
    target = min(n - 1, max(1, round(test_share * n)))
    preferred = [design_lineage(g) for g in TEST_GROUP_PREFERENCE]
    preferred = [lin for lin in dict.fromkeys(preferred) if lin in by_lineage]
    # sha256, not hash(): Python salts str hashes per process.
    rest = sorted(
        (lin for lin in by_lineage if lin not in preferred),
        key=lambda lin: hashlib.sha256(lin.encode()).hexdigest(),
    )
    chosen: set[str] = set()
    for lineage in preferred + rest:
        if len(chosen) >= target:
            break
        if not _leaves_styles_in_train(lineage, chosen, by_lineage):
            continue
        chosen.add(lineage)
    if not chosen:  # e.g. two lineages of different styles: style coverage cannot be kept
        chosen.add((preferred + rest)[0])
    return chosen


def _leaves_styles_in_train(
    lineage: str, chosen: set[str], by_lineage: dict[str, set[str]]
) -> bool:
    """True if holding out `lineage` too still leaves every known style some train group."""
    train_groups = {
        g
        for lin, groups in by_lineage.items()
        if lin not in chosen and lin != lineage
        for g in groups
    }
    all_styles = {group_style(g) for groups in by_lineage.values() for g in groups}
    train_styles = {group_style(g) for g in train_groups}
    return all(s in train_styles for s in all_styles if s != "unknown")


_CHARSETS: dict[tuple[str, int], frozenset[str]] = {}
_PROBE_SIZE = 48
# U+10FFFF is a permanent noncharacter: no font maps it, so it renders the .notdef glyph.
_NOTDEF_PROBE = "\U0010ffff"


@lru_cache(maxsize=16)
def _discover_cached(dirs: tuple[str, ...]) -> tuple[FontFace, ...]:
    """Scan `dirs` once per process (fonts do not change while we run)."""
    faces: list[FontFace] = []
    for path in _font_files(dirs):
        for index, font in _faces_of(path):
            charset = _charset_of(font)
            if not _covers_generator(charset):
                continue
            _CHARSETS[(path, index)] = charset
            family = " ".join(p for p in font.getname() if p)
            faces.append(FontFace(path=path, index=index, family=family, group=font_group(path)))
    faces.sort(key=lambda f: (f.group, f.path, f.index))
    return tuple(faces)


def _font_files(dirs: tuple[str, ...]) -> list[str]:
    """Resolved, de-duplicated font file paths under `dirs` (symlinked aliases collapse)."""
    found: set[str] = set()
    for d in dirs:
        if not os.path.isdir(d):
            continue
        for root, _subdirs, files in os.walk(d, followlinks=True):
            for name in files:
                if name.lower().endswith(FONT_SUFFIXES):
                    real = os.path.realpath(os.path.join(root, name))
                    if os.path.isfile(real):
                        found.add(real)
    return sorted(found)


def _faces_of(path: str) -> list[tuple[int, ImageFont.FreeTypeFont]]:
    """Every loadable face of a font file: .ttc collections are enumerated until OSError."""
    faces = []
    for index in range(64):  # no real collection holds more; bounds a broken file
        try:
            font = ImageFont.truetype(
                path, _PROBE_SIZE, index=index, layout_engine=ImageFont.Layout.BASIC
            )
        except OSError:
            break
        faces.append((index, font))
        if not path.lower().endswith(".ttc"):
            break
    return faces


def _probe_charset(path: str, index: int) -> frozenset[str]:
    """Charset of one face, loading it afresh."""
    font = ImageFont.truetype(path, _PROBE_SIZE, index=index, layout_engine=ImageFont.Layout.BASIC)
    return _charset_of(font)


def _charset_of(font: ImageFont.FreeTypeFont) -> frozenset[str]:
    """Characters of `ALL_CHARS` whose rendering has ink and differs from the .notdef glyph."""
    notdef = _render(font, _NOTDEF_PROBE)
    present = set()
    for ch in ALL_CHARS:
        img = _render(font, ch)
        if img.getbbox() is not None and img.tobytes() != notdef.tobytes():
            present.add(ch)
        elif ch == FU:
            return frozenset()  # no 福: nothing else matters
    return frozenset(present)


def _render(font: ImageFont.FreeTypeFont, ch: str) -> Image.Image:
    """Render one character in a fixed box, so two renderings compare byte for byte."""
    img = Image.new("L", (_PROBE_SIZE * 2, _PROBE_SIZE * 2), 0)
    ImageDraw.Draw(img).text((_PROBE_SIZE, _PROBE_SIZE), ch, fill=255, font=font, anchor="mm")
    return img


def _covers_generator(charset: frozenset[str]) -> bool:
    """True if the face draws 福 and at least one form of every required slot."""
    if FU not in charset:
        return False
    return all(any(c in charset for c in slot) for slot in LOOKALIKE_SLOTS + FESTIVE_SLOTS)
