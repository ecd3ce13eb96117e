"""The Fu world on disk: its config, the plan of which image is which split and class, and
`generate_world`, which draws every image (in this process or a spawned pool), writes the
ImageFolder tree, manifest.csv and world.json, and `is_same_world`, which recognises a finished one.
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
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image

from saofu.errors import SaofuError
from saofu.pixels import DEFAULT_IMAGE_SIZE
from tasks.data.fonts import (
    FontFace,
    design_lineage,
    discover_fonts,
    face_charset,
    prime_charsets,
    split_fonts,
)
from tasks.data.fu_world.render import render_crop
from tasks.data.fu_world.styles import FU_CLASS, MERCHANT_CLASS, NOT_FU_CLASS

GENERATOR_VERSION = 1
SPLITS: tuple[str, str, str] = ("train", "val", "test")
MANIFEST_COLUMNS = ("path", "label", "split", "source", "sha256", "font_group", "style", "char")

# Parallel generation pays for its start-up only from here on.
POOL_MIN_IMAGES = 2000

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
    image_size: int = DEFAULT_IMAGE_SIZE
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


def world_folder_name(n: int, seed: int, image_size: int, tag: str = "") -> str:
    """The data folder of a Fu world generated by name (the training and search flows, the benches).

    The size is in the name: a folder holds one world and refuses another (`generate_world`), so
    worlds of two sizes, such as a project's 64-px worlds from before the default became 96, each
    keep their own folder instead of one refusing the other.
    """
    return f"fu_world_n{n}_s{seed}_{image_size}px" + (f"_{tag}" if tag else "")


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
