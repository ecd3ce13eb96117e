"""Online-stream simulator: "user scans" arriving over time, their distribution drifting.

Scans arrive as a Poisson process. A schedule of drift phases changes what they look like:
darker evenings, font designs the model never trained on, a merchant campaign whose framed 福
(`fu_merchant`) suddenly makes up a share of the traffic. Crops come from the Fu-world renderer
(`tasks.data.fu_world.render_crop`), so the stream and the offline world share one look. Each scan keeps
its ground-truth label, which only the simulator knows; `write_scans` stores it under `truth` so
that the online pool can later measure auto-labels against it, never train on it by accident.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from saofu.errors import SaofuError
from saofu.pixels import DEFAULT_IMAGE_SIZE
from tasks.data.fonts import FontFace, discover_fonts, split_fonts
from tasks.data.fu_world import (
    FU_CLASS,
    MERCHANT_CLASS,
    NOT_FU_CLASS,
    WorldConfig,
    pick_face,
    png_bytes,
    render_crop,
)

FontPool = Literal["train", "test", "all"]

_ARRIVAL_STREAM = 2  # SeedSequence spawn keys, distinct from the world generator's
_SCAN_STREAM = 3
INDEX_NAME = "index.jsonl"


@dataclass(frozen=True)
class DriftPhase:
    """One stretch of the stream, from `start_hour` until the next phase starts.

    Attributes:
        start_hour: hours after the stream's start when this phase begins.
        name: phase name, recorded on every scan.
        lighting: 0 = normal light, 1 = very dark and noisy frames.
        font_pool: fonts scans are drawn in: "train" (designs the model saw), "test" (held-out
            designs) or "all".
        merchant_share: share of scans that are the merchant's framed 福 (`fu_merchant`).
        fu_share: share of scans that are plain 福 (`fu`); the rest are `not_fu`.
    """

    start_hour: float
    name: str
    lighting: float = 0.0
    font_pool: FontPool = "train"
    merchant_share: float = 0.0
    fu_share: float = 0.5


DEFAULT_SCHEDULE: tuple[DriftPhase, ...] = (
    DriftPhase(0.0, "launch", lighting=0.0, font_pool="train", merchant_share=0.0, fu_share=0.5),
    DriftPhase(24.0, "evening", lighting=0.6, font_pool="train", merchant_share=0.0, fu_share=0.5),
    DriftPhase(48.0, "new-fonts", lighting=0.2, font_pool="all", merchant_share=0.0, fu_share=0.5),
    DriftPhase(
        72.0, "merchant-campaign", lighting=0.2, font_pool="all", merchant_share=0.2, fu_share=0.4
    ),
)


@dataclass
class Scan:
    """One simulated user scan.

    Attributes:
        timestamp: when it arrived.
        image: the RGB crop.
        label: ground truth, known only to the simulator.
        phase: name of the drift phase it arrived in.
        meta: render record (style, char, font group, degradations) plus index and hour.
    """

    timestamp: datetime
    image: Image.Image
    label: str
    phase: str
    meta: dict[str, Any] = field(default_factory=dict)


def simulate_scans(
    n: int,
    seed: int,
    start: datetime,
    rate_per_hour: float,
    schedule: Sequence[DriftPhase] = DEFAULT_SCHEDULE,
    image_size: int = DEFAULT_IMAGE_SIZE,
    *,
    difficulty: float | None = None,
    test_groups: Sequence[str] | None = None,
) -> Iterator[Scan]:
    """Yield `n` scans with Poisson arrivals whose content drifts by `schedule`.

    Args:
        n: number of scans.
        seed: same seed, same scans (timestamps and bytes).
        start: time of the stream's start (hour 0 of the schedule).
        rate_per_hour: mean arrivals per hour.
        schedule: drift phases sorted by start_hour, the first starting at hour 0.
        image_size: side of the square crops.
        difficulty: degradation knob passed to the renderer; None uses WorldConfig's default.
        test_groups: held-out font groups, as for the world; None uses the default font split.

    Returns:
        An iterator of Scan, timestamps strictly increasing.

    Raises:
        SaofuError: bad n, rate or schedule.
    """
    if not isinstance(n, int) or n < 0:
        raise SaofuError(f"simulate_scans n must be a non-negative integer, got {n!r}")
    if not rate_per_hour > 0:
        raise SaofuError(f"simulate_scans rate_per_hour must be positive, got {rate_per_hour}")
    phases = _checked_schedule(schedule)
    train_faces, test_faces = split_fonts(discover_fonts(), test_groups)
    pools: dict[str, list[FontFace]] = {
        "train": train_faces,
        "test": test_faces,
        "all": train_faces + test_faces,
    }
    if difficulty is None:
        difficulty = WorldConfig().difficulty
    # one config per phase: the merchant's decoy frames appear only while its campaign runs
    configs = {
        p.name: WorldConfig(
            n=1, image_size=image_size, difficulty=difficulty, merchant=p.merchant_share > 0
        )
        for p in phases
    }
    return _scan_iter(n, seed, start, rate_per_hour, phases, pools, configs)


def _scan_iter(
    n: int,
    seed: int,
    start: datetime,
    rate_per_hour: float,
    phases: list[DriftPhase],
    pools: dict[str, list[FontFace]],
    configs: dict[str, WorldConfig],
) -> Iterator[Scan]:
    arrivals = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_ARRIVAL_STREAM,)))
    hours = 0.0
    last = start
    for i in range(n):
        hours += float(arrivals.exponential(1.0 / rate_per_hour))
        # microsecond clock: two arrivals closer than 1 µs would tie, so nudge the later one
        timestamp = max(start + timedelta(hours=hours), last + timedelta(microseconds=1))
        last = timestamp
        phase = _phase_at(phases, hours)
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SCAN_STREAM, i)))
        label = _draw_label(rng, phase)
        face = pick_face(rng, pools[phase.font_pool])
        image, record = render_crop(rng, label, face, configs[phase.name], lighting=phase.lighting)
        record.update(index=i, hour=round(hours, 6), font_pool=phase.font_pool)
        record["font_group_drawn"] = face.group  # the face picked, even for a texture
        yield Scan(timestamp=timestamp, image=image, label=label, phase=phase.name, meta=record)


def _draw_label(rng: np.random.Generator, phase: DriftPhase) -> str:
    u = rng.random()
    if u < phase.merchant_share:
        return MERCHANT_CLASS
    if u < phase.merchant_share + phase.fu_share:
        return FU_CLASS
    return NOT_FU_CLASS


def _phase_at(phases: list[DriftPhase], hours: float) -> DriftPhase:
    current = phases[0]
    for p in phases:
        if p.start_hour <= hours:
            current = p
    return current


def _checked_schedule(schedule: Sequence[DriftPhase]) -> list[DriftPhase]:
    """Refuse schedules that cannot drive the stream, naming the bad phase."""
    phases = list(schedule)
    if not phases:
        raise SaofuError("drift schedule is empty; give at least one DriftPhase")
    if phases[0].start_hour != 0:
        raise SaofuError(
            f"drift schedule must start at hour 0, first phase {phases[0].name!r} starts at "
            f"{phases[0].start_hour}"
        )
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise SaofuError(f"drift phase names must be unique, got {names}")
    for prev, p in itertools.pairwise(phases):
        if p.start_hour <= prev.start_hour:
            raise SaofuError(
                f"drift phase {p.name!r} starts at hour {p.start_hour}, not after "
                f"{prev.name!r} ({prev.start_hour}); sort the schedule by start_hour"
            )
    for p in phases:
        if p.font_pool not in ("train", "test", "all"):
            raise SaofuError(
                f"drift phase {p.name!r}: font_pool must be train, test or all, got {p.font_pool!r}"
            )
        if not 0 <= p.lighting <= 1:
            raise SaofuError(
                f"drift phase {p.name!r}: lighting must be in [0, 1], got {p.lighting}"
            )
        shares = (p.merchant_share, p.fu_share)
        if any(not 0 <= s <= 1 for s in shares) or sum(shares) > 1 + 1e-9:
            raise SaofuError(
                f"drift phase {p.name!r}: merchant_share ({p.merchant_share}) and fu_share "
                f"({p.fu_share}) must be in [0, 1] and sum to at most 1"
            )
    return phases


def write_scans(scans: Iterable[Scan], pool_dir: str | Path) -> list[Path]:
    """Store scans content-addressed and append one line per scan to the pool's index.

    Files go to pool_dir/<sha256[:2]>/<sha256>.png (a repeated image is stored once); each scan
    appends {"timestamp", "sha256", "path", "phase", "truth", "truth_source", "meta"} to
    pool_dir/index.jsonl. "truth" is the simulator's ground truth, which no real scan would carry:
    consumers must treat it as evaluation-only.

    Args:
        scans: scans, e.g. from `simulate_scans` (consumed lazily).
        pool_dir: the online pool's folder; created if missing, appended to if not.

    Returns:
        The image path of every scan, in order.
    """
    pool = Path(pool_dir)
    pool.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with (pool / INDEX_NAME).open("a", encoding="utf-8") as index:
        for scan in scans:
            data = png_bytes(scan.image)
            digest = hashlib.sha256(data).hexdigest()
            rel = f"{digest[:2]}/{digest}.png"
            path = pool / rel
            if not path.exists():
                path.parent.mkdir(exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(data)
                tmp.replace(path)  # readers of the pool never see half a file
            line = {
                "timestamp": scan.timestamp.isoformat(),
                "sha256": digest,
                "path": rel,
                "phase": scan.phase,
                "truth": scan.label,
                "truth_source": "simulator",
                "meta": _jsonable(scan.meta),
            }
            index.write(json.dumps(line, ensure_ascii=False) + "\n")
            index.flush()  # the pool is read while the stream runs
            written.append(path)
    return written


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
    """Meta without values JSON cannot hold (numpy scalars become Python numbers)."""
    return json.loads(
        json.dumps(meta, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    )
