"""The click-path bench's phases of a deployment run and its medians."""

from __future__ import annotations

import pytest

from bench.click_path import PHASES, phases, summarize, table


@pytest.mark.timeout(10)
def test_a_run_s_phases_run_from_the_click_to_its_first_pending_first_running_and_last_state():
    states = [("Completed", 160.0), ("Scheduled", 100.5), ("Pending", 104.0), ("Running", 109.0),
              ("Running", 130.0)]  # a retry runs again: the phase still starts at the first Running
    assert phases(states, clicked=100.0) == {PHASES[0]: 4.0, PHASES[1]: 5.0, PHASES[2]: 51.0}


@pytest.mark.timeout(10)
def test_a_run_that_never_started_is_an_error_naming_its_states():
    with pytest.raises(ValueError, match="Scheduled"):
        phases([("Scheduled", 1.0), ("Cancelled", 5.0)], clicked=0.0)


@pytest.mark.timeout(10)
def test_each_way_gets_its_median_and_range_and_the_click_its_phases():
    def click(wall: float) -> dict:
        return {"way": "click", "wall_s": wall, "phases": {p: wall / 3 for p in PHASES}}

    draws = [click(60.0), {"way": "in-process", "wall_s": 50.0}, click(66.0), {"way": "in-process", "wall_s": 52.0},
             click(63.0), {"way": "in-process", "wall_s": 51.0}]
    summary = summarize(draws)
    assert summary["click"]["wall_s"] == 63.0 and summary["click"]["wall_range_s"] == [60.0, 66.0]
    assert summary["click"]["phases"] == {p: 21.0 for p in PHASES}
    assert summary["in-process"] == {"draws": 3, "wall_s": 51.0, "wall_range_s": [50.0, 52.0]}
    rows = table(summary).splitlines()
    assert rows[1] == "click | 63.0 (60.0-66.0) | 21.0 | 21.0 | 21.0"
    assert rows[2] == "in-process | 51.0 (50.0-52.0) | - | - | -"
