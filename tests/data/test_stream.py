"""Tests of the online-stream simulator (tasks/data/stream.py)."""

from __future__ import annotations

import hashlib
import itertools
import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from saofu.errors import SaofuError
from tasks.data.fonts import FontFace, discover_fonts, split_fonts
from tasks.data.fu_world import png_bytes
from tasks.data.stream import DEFAULT_SCHEDULE, DriftPhase, Scan, simulate_scans, write_scans

START = datetime(2026, 1, 28, 8, 0, 0)


@pytest.fixture(scope="module")
def faces() -> list[FontFace]:
    return discover_fonts()  # no skip: without CJK fonts this fails with the install hint


@pytest.fixture(scope="module")
def four_days(faces: list[FontFace]) -> list[Scan]:
    # 1 scan an hour for ~160 hours crosses every default phase
    return list(simulate_scans(160, seed=4, start=START, rate_per_hour=1.0, image_size=32))


def test_same_seed_same_scans(faces: list[FontFace]) -> None:
    a = list(simulate_scans(20, seed=1, start=START, rate_per_hour=5.0, image_size=32))
    b = list(simulate_scans(20, seed=1, start=START, rate_per_hour=5.0, image_size=32))
    c = list(simulate_scans(20, seed=2, start=START, rate_per_hour=5.0, image_size=32))
    assert [s.timestamp for s in a] == [s.timestamp for s in b]
    assert [png_bytes(s.image) for s in a] == [png_bytes(s.image) for s in b]
    assert [s.label for s in a] == [s.label for s in b]
    assert [png_bytes(s.image) for s in a] != [png_bytes(s.image) for s in c]


def test_timestamps_increase_at_the_given_rate(four_days: list[Scan]) -> None:
    times = [s.timestamp for s in four_days]
    assert times[0] > START
    assert all(t1 > t0 for t0, t1 in itertools.pairwise(times))
    hours = (times[-1] - START) / timedelta(hours=1)
    assert 100 < hours < 230  # 160 arrivals at 1/hour: mean 160 h, sd about 13 h


def test_phases_follow_the_schedule(four_days: list[Scan]) -> None:
    for s in four_days:
        hour = (s.timestamp - START) / timedelta(hours=1)
        expected = [p.name for p in DEFAULT_SCHEDULE if p.start_hour <= hour][-1]
        assert s.phase == expected
    assert {s.phase for s in four_days} == {p.name for p in DEFAULT_SCHEDULE}


def test_merchant_campaign_drift(four_days: list[Scan]) -> None:
    campaign = next(p for p in DEFAULT_SCHEDULE if p.merchant_share > 0)
    before = [s for s in four_days if s.meta["hour"] < campaign.start_hour]
    after = [s for s in four_days if s.meta["hour"] >= campaign.start_hour]
    assert before and after
    assert not any(s.label == "fu_merchant" or s.meta["style"] == "merchant" for s in before)
    assert any(s.label == "fu_merchant" for s in after)


def test_new_fonts_appear_only_after_their_phase(
    faces: list[FontFace], four_days: list[Scan]
) -> None:
    _train, test = split_fonts(faces)
    test_groups = {f.group for f in test}
    new_fonts = next(p for p in DEFAULT_SCHEDULE if p.font_pool != "train")
    before = [s for s in four_days if s.meta["hour"] < new_fonts.start_hour]
    after = [s for s in four_days if s.meta["hour"] >= new_fonts.start_hour]
    assert not any(s.meta["font_group_drawn"] in test_groups for s in before)
    assert any(s.meta["font_group_drawn"] in test_groups for s in after)


def test_evening_is_darker(four_days: list[Scan]) -> None:
    def mean_brightness(scans: list[Scan]) -> float:
        return sum(sum(s.image.convert("L").getdata()) / 1024 for s in scans) / len(scans)

    launch = [s for s in four_days if s.phase == "launch"]
    evening = [s for s in four_days if s.phase == "evening"]
    assert mean_brightness(evening) < mean_brightness(launch) - 10


def test_write_scans_is_content_addressed(four_days: list[Scan], tmp_path: Path) -> None:
    scans = four_days[:12]
    paths = write_scans(scans, tmp_path / "pool")
    assert len(paths) == 12
    for p in paths:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        assert p == tmp_path / "pool" / digest[:2] / f"{digest}.png"
    lines = [json.loads(x) for x in (tmp_path / "pool" / "index.jsonl").read_text().splitlines()]
    assert [x["truth"] for x in lines] == [s.label for s in scans]
    assert all(x["truth_source"] == "simulator" for x in lines)
    assert [x["timestamp"] for x in lines] == [s.timestamp.isoformat() for s in scans]
    assert all((tmp_path / "pool" / x["path"]).is_file() for x in lines)
    # appending the same scans again stores no new files, only new index lines
    write_scans(scans, tmp_path / "pool")
    assert len(list((tmp_path / "pool").rglob("*.png"))) == len(set(paths))
    assert len((tmp_path / "pool" / "index.jsonl").read_text().splitlines()) == 24


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ((), "empty"),
        ((DriftPhase(5.0, "late"),), "hour 0"),
        ((DriftPhase(0.0, "a"), DriftPhase(0.0, "b")), "not after"),
        ((DriftPhase(0.0, "a", merchant_share=0.7, fu_share=0.5),), "sum to at most 1"),
        ((DriftPhase(0.0, "a", font_pool="other"),), "font_pool"),  # type: ignore[arg-type]
    ],
)
def test_bad_schedule_is_refused(faces: list[FontFace], schedule: tuple, message: str) -> None:
    with pytest.raises(SaofuError, match=message):
        simulate_scans(5, seed=0, start=START, rate_per_hour=1.0, schedule=schedule)


def test_bad_rate_is_refused() -> None:
    with pytest.raises(SaofuError, match="rate_per_hour"):
        simulate_scans(5, seed=0, start=START, rate_per_hour=0)
